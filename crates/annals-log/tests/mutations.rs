//! A stable-toolchain stand-in for fuzzing the on-disk decoder: damage a
//! real segment in many random ways (bit flips, overwritten runs, cuts) and
//! check that verifying, opening and reading never panic and never serve a
//! damaged event: opening either succeeds (torn tail truncated, or the
//! damage lies beyond what is read) or refuses with `Corrupt`.

use std::{path::Path, sync::Arc};

use annals_core::{AllReader, Appender, EventData, ExpectedVersion, ReadAll, StreamName};
use annals_log::{LogError, LogStore, io::FaultIo};

fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[tokio::test]
async fn damaged_segments_never_panic_or_serve_bad_events() {
    let dir = Path::new("/mut");
    let seg = dir.join(format!("{:020}.seg", 0));
    let io = FaultIo::new();
    let store = LogStore::builder(dir).io(Arc::new(io.clone())).background_fill(false).open().unwrap();
    for i in 0..60u64 {
        let e = EventData::json("E", &serde_json::json!({ "i": i })).unwrap();
        store
            .append(&StreamName::new(format!("m-{}", i % 5)).unwrap(), ExpectedVersion::Any, vec![e])
            .await
            .unwrap();
    }
    let originals = store.read_all(ReadAll::forward(100)).await.unwrap().events;
    store.close().unwrap();
    drop(store);
    let pristine = io.read_file(&seg).unwrap();
    let mut seed = 0x1234_5678_9abc_def1u64;
    for round in 0..300 {
        let mut bytes = pristine.clone();
        match next(&mut seed) % 3 {
            0 => {
                for _ in 0..1 + next(&mut seed) % 3 {
                    let at = (next(&mut seed) % bytes.len() as u64) as usize;
                    bytes[at] ^= 1 << (next(&mut seed) % 8);
                }
            }
            1 => {
                let at = (next(&mut seed) % bytes.len() as u64) as usize;
                let len = ((next(&mut seed) % 64) as usize).min(bytes.len() - at);
                let fill = (next(&mut seed) % 256) as u8;
                bytes[at..at + len].fill(fill);
            }
            _ => {
                let cut = (next(&mut seed) % bytes.len() as u64) as usize;
                bytes.truncate(cut);
            }
        }
        let damaged = FaultIo::new();
        damaged.write_file(&seg, bytes);
        let _ = annals_log::verify_with(&damaged, dir);
        match LogStore::builder(dir).io(Arc::new(damaged.clone())).verify_on_open(true).open() {
            Ok(store) => {
                // Whatever opened must be a prefix of the original history.
                let got = store.read_all(ReadAll::forward(100)).await.unwrap().events;
                assert!(got.len() <= originals.len(), "round {round}");
                for (a, b) in got.iter().zip(&originals) {
                    assert_eq!((a.id, &a.data, a.position), (b.id, &b.data, b.position), "round {round}");
                }
                store.close().unwrap();
            }
            Err(LogError::Corrupt { .. }) => {}
            Err(other) => panic!("round {round}: unexpected error {other:?}"),
        }
    }
}
