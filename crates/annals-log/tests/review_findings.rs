//! Review of log format version 2 (group-end marks), 2026-12-03: crash and
//! damage states modelled byte by byte. The tests marked "found by review"
//! failed on the code they were written against and were fixed the same day
//! (group tags in end marks, position windows for frames found past damage,
//! verify checking what open checks, repair rebuilding after a failed end
//! mark); the others are regression tests of cases that held up.
#![allow(clippy::unwrap_used, clippy::indexing_slicing, missing_docs)]
mod common;

use std::path::{Path, PathBuf};

use annals_core::{
    AllReader, Appender, DeleteMode, EventData, ExpectedVersion, ReadAll, StreamDeleter, StreamReader,
};
use annals_log::{
    LogError, LogStore,
    format::{self, SEGMENT_HEADER_LEN},
};
use serde_json::json;

use common::*;

/// Recomputes the hash and CRC of the record at `off` after its fields
/// were edited, chaining from `prev`; returns its new hash.
fn reseal(bytes: &mut [u8], off: usize, prev: &format::Hash) -> format::Hash {
    let len = format::u32_at(&bytes[off..], 0) as usize;
    let frame = &mut bytes[off..off + len];
    let hash = format::chain_hash(prev, format::hashed_body(frame));
    frame[len - 32..].copy_from_slice(&hash);
    let crc = crc32c(&frame[8..]);
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
    hash
}
/// CRC32C (Castagnoli), bitwise: the test crate has no crc32c dependency.
fn crc32c(b: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &x in b {
        crc ^= u32::from(x);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0x82F6_3B78 } else { crc >> 1 };
        }
    }
    !crc
}
fn big_ev(n: u64) -> EventData {
    EventData::json("B", &json!({ "n": n, "pad": "z".repeat(1200) })).unwrap()
}
async fn count_all(store: &LogStore) -> usize {
    store.read_all(ReadAll::forward(10_000)).await.unwrap().events.len()
}

/// Found by review (high), fixed the same day: a damaged *delete-only* group (here one soft delete,
/// acknowledged) followed by one more group is taken for a torn tail and
/// cut, with the acknowledged delete. A delete-only group holds no events,
/// so the next group's first position equals its own: the later group's end
/// mark "closes this group" by the count check in `rest_of_one_group`, and
/// nothing follows it. The deleted stream comes back.
#[tokio::test]
async fn a_damaged_delete_group_followed_by_one_group_is_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.append(&stream("gone-1"), ExpectedVersion::NoStream, vec![ev(0)]).await.unwrap();
        store.delete_stream(&stream("gone-1"), ExpectedVersion::Any, DeleteMode::Soft).await.unwrap();
        // Acknowledged after the delete's group was synced.
        store.append(&stream("later-1"), ExpectedVersion::NoStream, vec![ev(1)]).await.unwrap();
        store.close().unwrap();
    }
    let (path, mut bytes, offs) = without_checkpoint(dir.path());
    assert_eq!(offs.len(), 3);
    // A bit flip in the delete record's stream name (CRC fails).
    bytes[offs[1] as usize + 72] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    match LogStore::open(dir.path()) {
        Err(e) => assert!(matches!(e, LogError::Corrupt { position: Some(1), .. }), "{e}"),
        Ok(store) => panic!(
            "opened with {} events; the acknowledged delete and the append after it were cut: {:?}",
            count_all(&store).await,
            store.stats().truncated_on_open
        ),
    }
}

/// The same with a tombstone, the next group being a two-stream
/// transaction: still cut.
#[tokio::test]
async fn a_damaged_tombstone_followed_by_one_transaction_is_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.append(&stream("gone-1"), ExpectedVersion::NoStream, vec![ev(0)]).await.unwrap();
        store.delete_stream(&stream("gone-1"), ExpectedVersion::Any, DeleteMode::Hard).await.unwrap();
        store.append(&stream("later-1"), ExpectedVersion::NoStream, (1..4).map(ev).collect()).await.unwrap();
        store.close().unwrap();
    }
    let (path, mut bytes, offs) = without_checkpoint(dir.path());
    assert_eq!(offs.len(), 5);
    bytes[offs[1] as usize + 20] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    match LogStore::open(dir.path()) {
        Err(e) => assert!(matches!(e, LogError::Corrupt { position: Some(1), .. }), "{e}"),
        Ok(store) => {
            // The tombstone is gone: the stream takes appends again.
            let resurrected =
                store.append(&stream("gone-1"), ExpectedVersion::Any, vec![ev(9)]).await.is_ok();
            panic!(
                "opened with {} events; tombstone lost (stream writable again: {resurrected}): {:?}",
                count_all(&store).await,
                store.stats().truncated_on_open
            )
        }
    }
}

/// Found by review (medium), fixed the same day: `repair(true)` cutting a group whose *last* record
/// fails to apply to the index (here: a stream version out of sequence,
/// with a valid CRC and hash chain) keeps the group's earlier records in
/// the index: `reapply` is only set when a held record fails, not the end
/// mark itself. The store then reports a head past the log's end and
/// serves (or fails to read) events that are no longer in it.
#[tokio::test]
async fn repair_of_a_group_whose_end_mark_fails_to_apply_leaves_no_index_entries() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.append(&stream("ok-1"), ExpectedVersion::NoStream, vec![ev(0)]).await.unwrap();
        store.append(&stream("a-1"), ExpectedVersion::NoStream, vec![ev(1), ev(2)]).await.unwrap();
        store.close().unwrap();
    }
    let (path, mut bytes, offs) = without_checkpoint(dir.path());
    assert_eq!(offs.len(), 3);
    // The group's end mark claims stream version 7 instead of 1; resealed,
    // so only the index (not framing, CRC or chain) can tell.
    let o = offs[2] as usize;
    bytes[o + 24..o + 32].copy_from_slice(&7u64.to_le_bytes());
    let prev = format::decode(&bytes[offs[1] as usize..]).unwrap().hash;
    reseal(&mut bytes, o, &prev);
    std::fs::write(&path, &bytes).unwrap();
    let err = LogStore::open(dir.path()).expect_err("a version gap opened");
    assert!(matches!(err, LogError::Corrupt { .. }), "{err}");
    let store = LogStore::builder(dir.path()).repair(true).open().unwrap();
    let cut = store.stats().truncated_on_open.clone().unwrap();
    assert_eq!(cut.cut_position, 1, "{cut:?}");
    assert_eq!(store.stats().next_position, 1, "head past the end of the repaired log");
    let a = store.stream_info(&stream("a-1")).await.unwrap();
    assert!(!a.exists, "stream a-1 after repair: {a:?}");
    assert_eq!(store.read_all(ReadAll::forward(100)).await.map(|s| s.events.len()).ok(), Some(1));
    store.append(&stream("a-1"), ExpectedVersion::NoStream, vec![ev(3)]).await.unwrap();
    store.close().unwrap();
    assert!(annals_log::verify(dir.path()).unwrap().is_ok());
}

/// Found by review (medium), fixed the same day: `verify` (and so `annals repair`, which plans from
/// it) reports a log as intact that open refuses: a record that frames,
/// checks and chains but breaks a stream's version sequence only fails when
/// applied to the index, which verify's walk never does. `annals repair`
/// then says "nothing to repair" while `annals serve` will not start.
#[tokio::test]
async fn verify_reports_what_open_refuses() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.append(&stream("ok-1"), ExpectedVersion::NoStream, vec![ev(0)]).await.unwrap();
        store.append(&stream("a-1"), ExpectedVersion::NoStream, vec![ev(1)]).await.unwrap();
        store.close().unwrap();
    }
    let (path, mut bytes, offs) = without_checkpoint(dir.path());
    let o = offs[1] as usize;
    bytes[o + 24..o + 32].copy_from_slice(&3u64.to_le_bytes()); // version 3 of a new stream
    let prev = format::decode(&bytes[offs[0] as usize..]).unwrap().hash;
    reseal(&mut bytes, o, &prev);
    std::fs::write(&path, &bytes).unwrap();
    let err = LogStore::open(dir.path()).expect_err("a version gap opened");
    assert!(matches!(err, LogError::Corrupt { .. }), "{err}");
    let report = annals_log::verify(dir.path()).unwrap();
    assert!(!report.is_ok(), "verify says intact, open says: {err}");
}

/// An append of one binary event whose data holds a well-formed record
/// frame (ending a group at another position), and before it one
/// acknowledged append; no checkpoint. Returns the directory, segment path,
/// bytes and the offset of the blob's record.
async fn a_blob_after_one_append(embedded: bool) -> (tempfile::TempDir, PathBuf, Vec<u8>, usize) {
    let mut data = vec![0xABu8; 2048];
    if embedded {
        let mut fake = Vec::new();
        format::encode_event(
            &mut fake,
            &[0; 32],
            &format::EventFields {
                position: 999,
                version: 0,
                recorded_at: 0,
                id: [1; 16],
                content_type: 1,
                stream: "x-1",
                event_type: "E",
                correlation: "",
                metadata: b"{}",
                data: b"",
                group_end: Some((1, 0)),
            },
        )
        .unwrap();
        data.extend_from_slice(&fake);
    }
    data.extend_from_slice(&[0xCD; 64]);
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.append(&stream("ok-1"), ExpectedVersion::NoStream, vec![ev(0)]).await.unwrap();
        let blob = EventData::raw("Blob", data, annals_core::ContentType::Binary);
        store.append(&stream("blob-1"), ExpectedVersion::NoStream, vec![blob]).await.unwrap();
        store.close().unwrap();
    }
    let (path, bytes, offs) = without_checkpoint(dir.path());
    assert_eq!(offs.len(), 2);
    (dir, path, bytes, offs[1] as usize)
}

/// Tears the blob's group as a disk flushing sectors in any order can: the
/// sectors holding its record header never landed (old bytes: zeros after
/// the previous group), the later ones did.
fn tear_header_sectors(bytes: &mut [u8], off: usize) {
    let end = (off + 1).next_multiple_of(512) + 512;
    bytes[off..end].fill(0);
}

/// The torn last group goes; the acknowledged append stays.
#[tokio::test]
async fn a_blob_torn_at_its_header_is_a_torn_tail() {
    let (dir, path, mut bytes, off) = a_blob_after_one_append(false).await;
    tear_header_sectors(&mut bytes, off);
    std::fs::write(&path, &bytes).unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(count_all(&store).await, 1);
    assert!(store.stats().truncated_on_open.is_some_and(|b| b.torn_tail && b.cut_position == 1));
}

/// Found by review (medium), fixed the same day: the same torn state refuses to open (Corrupt) when the
/// unacknowledged event's *data* happens to contain a well-formed record
/// frame: `rest_of_one_group` searches byte by byte for intact frames and
/// takes the one inside the payload for a group end mark of another group.
/// Only the unacknowledged last group is affected, yet the store will not
/// start without `repair`. Event data is caller-controlled (any binary
/// payload that embeds annals records, e.g. archived segments).
#[tokio::test]
async fn a_blob_torn_at_its_header_is_a_torn_tail_whatever_its_data() {
    let (dir, path, mut bytes, off) = a_blob_after_one_append(true).await;
    tear_header_sectors(&mut bytes, off);
    std::fs::write(&path, &bytes).unwrap();
    let store = LogStore::open(dir.path()).expect("a torn unacknowledged last group refused");
    assert_eq!(count_all(&store).await, 1);
    assert!(store.stats().truncated_on_open.is_some_and(|b| b.torn_tail && b.cut_position == 1));
}

fn fixture_v1() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1")
}

/// The v1 fixture upgraded by a three-event append (which rolls to a new
/// v2 segment 2), then put back in the state of a crash during that append:
/// the old checkpoint (from before it), or none, and segment 2 `mangle`d.
async fn v1_upgraded_then(keep_checkpoint: bool, mangle: impl Fn(&mut Vec<u8>)) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture_v1(), tmp.path());
    let old_index = std::fs::read(tmp.path().join("index.bin")).unwrap();
    {
        let store = LogStore::builder(tmp.path()).segment_size(4096).open().unwrap();
        store.append(&stream("new-1"), ExpectedVersion::NoStream, (0..3).map(ev).collect()).await.unwrap();
        assert_eq!(store.stats().segments, 3);
        store.close().unwrap();
    }
    if keep_checkpoint {
        std::fs::write(tmp.path().join("index.bin"), &old_index).unwrap();
    } else {
        std::fs::remove_file(tmp.path().join("index.bin")).unwrap();
    }
    let mut bytes = std::fs::read(seg(tmp.path(), 2)).unwrap();
    assert_eq!(bytes[8], 2);
    mangle(&mut bytes);
    std::fs::write(seg(tmp.path(), 2), &bytes).unwrap();
    tmp
}

/// A crash inside the first group written after a v1 → v2 upgrade (torn,
/// unfinished, or right after the new segment was created) loses just that
/// group, with or without the pre-upgrade checkpoint; the store goes on
/// writing version 2 into the new segment.
#[tokio::test]
async fn a_crash_in_the_first_group_after_a_v1_upgrade_cuts_only_that_group() {
    type Mangle = fn(&mut Vec<u8>);
    let cases: [(&str, Mangle); 3] = [
        ("hole in the middle record", |b| {
            let offs = record_offsets(b);
            let (s, e) = (offs[1] as usize, offs[2] as usize);
            b[s..e].fill(0);
        }),
        ("end mark never written", |b| {
            let offs = record_offsets(b);
            let s = offs[2] as usize;
            b[s..].fill(0);
        }),
        ("nothing after the header", |b| b.truncate(SEGMENT_HEADER_LEN)),
    ];
    for keep in [true, false] {
        for (what, mangle) in cases {
            let tmp = v1_upgraded_then(keep, mangle).await;
            let what = format!("{what}, checkpoint kept: {keep}");
            let store = LogStore::builder(tmp.path()).segment_size(4096).open().unwrap();
            assert_eq!(count_all(&store).await, 40, "{what}");
            assert_eq!(store.stats().next_position, 40, "{what}");
            store
                .append(&stream("new-1"), ExpectedVersion::NoStream, (0..3).map(ev).collect())
                .await
                .unwrap();
            assert_eq!(store.stats().segments, 3, "{what}: the retry went to segment 2");
            store.close().unwrap();
            assert!(annals_log::verify(tmp.path()).unwrap().is_ok(), "{what}");
            let store = LogStore::builder(tmp.path()).segment_size(4096).open().unwrap();
            assert_eq!(count_all(&store).await, 43, "{what}");
            store.close().unwrap();
        }
    }
}

/// `rebuild_indexes` writes the very file the writer checkpoints, after a
/// v1 upgrade, deletes ending groups, transactions and groups spanning
/// several segments (including a record larger than a segment).
#[tokio::test]
async fn rebuild_gives_the_writers_checkpoint_after_upgrade_deletes_and_spanning_groups() {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture_v1(), tmp.path());
    {
        let store = LogStore::builder(tmp.path()).segment_size(4096).open().unwrap();
        store.append(&stream("acct-3"), ExpectedVersion::Any, vec![ev(1)]).await.unwrap();
        store.delete_stream(&stream("acct-2"), ExpectedVersion::Any, DeleteMode::Hard).await.unwrap();
        let big = EventData::json("Big", &json!({ "pad": "y".repeat(9000) })).unwrap();
        let mut group: Vec<EventData> = (0..12).map(big_ev).collect();
        group.insert(4, big);
        store.append(&stream("span-1"), ExpectedVersion::NoStream, group).await.unwrap();
        store.delete_stream(&stream("span-1"), ExpectedVersion::Any, DeleteMode::Soft).await.unwrap();
        store.append(&stream("span-1"), ExpectedVersion::Any, vec![ev(99)]).await.unwrap();
        assert!(store.stats().segments >= 6, "{} segments", store.stats().segments);
        store.close().unwrap();
    }
    let written = std::fs::read(tmp.path().join("index.bin")).unwrap();
    assert!(annals_log::verify(tmp.path()).unwrap().is_ok());
    annals_log::rebuild_indexes(tmp.path()).unwrap();
    assert!(std::fs::read(tmp.path().join("index.bin")).unwrap() == written, "rebuilt index differs");
    // And a full walk (no checkpoint) reads the same.
    std::fs::remove_file(tmp.path().join("index.bin")).unwrap();
    let store = LogStore::builder(tmp.path()).segment_size(4096).open().unwrap();
    assert_eq!(count_all(&store).await, 55);
    assert!(!store.stream_info(&stream("acct-2")).await.unwrap().exists);
    store.close().unwrap();
    assert!(std::fs::read(tmp.path().join("index.bin")).unwrap() == written);
}

/// `repair` of a group whose first (held) record fails to apply cuts at the
/// group's start and rebuilds the index from what is left (`reapply`).
#[tokio::test]
async fn repair_of_a_group_whose_held_record_fails_rebuilds_the_index() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.append(&stream("ok-1"), ExpectedVersion::NoStream, vec![ev(0)]).await.unwrap();
        store.append(&stream("a-1"), ExpectedVersion::NoStream, (1..4).map(ev).collect()).await.unwrap();
        store.close().unwrap();
    }
    let (path, mut bytes, offs) = without_checkpoint(dir.path());
    // Record 2 (the group's second) claims version 5; re-chain the rest.
    let o = offs[2] as usize;
    bytes[o + 24..o + 32].copy_from_slice(&5u64.to_le_bytes());
    let mut prev = format::decode(&bytes[offs[1] as usize..]).unwrap().hash;
    for &r in &offs[2..] {
        prev = reseal(&mut bytes, r as usize, &prev);
    }
    std::fs::write(&path, &bytes).unwrap();
    assert!(matches!(LogStore::open(dir.path()), Err(LogError::Corrupt { .. })));
    let store = LogStore::builder(dir.path()).repair(true).open().unwrap();
    assert_eq!(store.stats().truncated_on_open.unwrap().cut_position, 1);
    assert_eq!(store.stats().next_position, 1);
    assert!(!store.stream_info(&stream("a-1")).await.unwrap().exists);
    store.append(&stream("a-1"), ExpectedVersion::NoStream, vec![ev(3)]).await.unwrap();
    store.close().unwrap();
    assert!(annals_log::verify(dir.path()).unwrap().is_ok());
}

/// Events of append `a`: `n` of them, each about `pad` bytes.
fn tagged(a: u64, n: u64, pad: usize) -> Vec<EventData> {
    (0..n)
        .map(|i| EventData::json("T", &json!({ "a": a, "i": i, "n": n, "pad": "q".repeat(pad) })).unwrap())
        .collect()
}

/// Torn crashes (`crash_torn`, every sync of a single writer, several
/// seeds) while groups span up to six 4 KiB segments, one holds a record
/// larger than a segment, deletes end groups, and index checkpoints are
/// written after every group (so walks start at segment heads inside
/// groups begun in the segment before, and at checkpoints mid-segment):
/// every snapshot opens, keeps every acknowledged append and no part of
/// another.
#[tokio::test]
async fn torn_crashes_with_groups_over_many_segments_and_checkpoints_after_each() {
    use std::sync::{Arc, Mutex};
    for (checkpoint_every, fill) in [(1, true), (0, false), (7, true)] {
        let dir = Path::new("/many");
        let io = annals_log::io::FaultIo::new();
        let store = LogStore::builder(dir)
            .io(Arc::new(io.clone()))
            .segment_size(4096)
            .checkpoint_every(checkpoint_every)
            .background_fill(fill)
            .open()
            .unwrap();
        let acked: Arc<Mutex<Vec<u64>>> = Arc::default();
        let snaps = Arc::new(Mutex::new(Vec::new()));
        {
            let (acked, snaps) = (acked.clone(), snaps.clone());
            let seed = Mutex::new(0x1234_5678_u64 + checkpoint_every);
            io.before_every_sync(move |io| {
                let before = acked.lock().unwrap().clone();
                let mut snaps = snaps.lock().unwrap();
                snaps.push((io.crash(), before.clone()));
                for _ in 0..3 {
                    let mut s = seed.lock().unwrap();
                    *s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    snaps.push((io.crash_torn(*s >> 1), before.clone()));
                }
            });
        }
        let plan: [(u64, u64, usize); 6] =
            [(1, 1, 10), (2, 12, 1200), (3, 3, 10), (4, 20, 1000), (5, 2, 9000), (6, 5, 700)];
        for (a, n, pad) in plan {
            let s = stream(&format!("s-{}", a % 2));
            let mut events = tagged(a, n, pad);
            if a == 5 {
                events.extend(tagged(a, 1, 10).into_iter().map(|mut e| {
                    e.data =
                        serde_json::to_vec(&json!({ "a": a, "i": 2, "n": 3, "pad": "" })).unwrap().into();
                    e
                }));
                for e in &mut events[..2] {
                    let mut v: serde_json::Value = serde_json::from_slice(&e.data).unwrap();
                    v["n"] = json!(3);
                    e.data = serde_json::to_vec(&v).unwrap().into();
                }
            }
            store.append(&s, ExpectedVersion::Any, events).await.unwrap();
            acked.lock().unwrap().push(a);
            if a == 3 {
                store.delete_stream(&stream("s-0"), ExpectedVersion::Any, DeleteMode::Soft).await.unwrap();
            }
        }
        store.close().unwrap();
        let snaps = std::mem::take(&mut *snaps.lock().unwrap());
        assert!(snaps.len() > 20);
        for (k, (disk, before)) in snaps.into_iter().enumerate() {
            let what = format!("checkpoint_every {checkpoint_every}, snapshot {k}");
            let store = LogStore::builder(dir)
                .io(Arc::new(disk.clone()))
                .segment_size(4096)
                .open()
                .unwrap_or_else(|e| panic!("{what}: open failed: {e}"));
            let all = store.read_all(ReadAll::forward(10_000)).await.unwrap().events;
            let mut found: std::collections::BTreeMap<u64, (u64, Vec<u64>)> = Default::default();
            for e in &all {
                let v: serde_json::Value = e.decode().unwrap();
                let (a, i, n) =
                    (v["a"].as_u64().unwrap(), v["i"].as_u64().unwrap(), v["n"].as_u64().unwrap());
                found.entry(a).or_insert((n, Vec::new())).1.push(i);
            }
            for a in &before {
                assert!(found.contains_key(a), "{what}: acknowledged append {a} lost");
            }
            for (a, (n, is)) in &found {
                assert_eq!(is, &(0..*n).collect::<Vec<_>>(), "{what}: append {a} survived in part");
            }
            store.append(&stream("after-1"), ExpectedVersion::Any, tagged(77, 4, 900)).await.unwrap();
            store.close().unwrap();
            let report = annals_log::verify_with(&disk, dir).unwrap();
            assert!(report.is_ok(), "{what}: {report:?}");
            annals_log::rebuild_indexes_with(Arc::new(disk.clone()), dir).unwrap();
        }
    }
}

/// A group of an append and a delete (the delete ending it, resealed with
/// the group's event count), made by holding the writer in a sync while
/// both are queued: it reopens and verifies, a full walk applies it whole,
/// a hole in its append is cut with the delete when it is the last group,
/// and damage to its end mark with a group after it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_ended_by_a_delete_is_counted_and_recovered_whole() {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };
    let dir = Path::new("/mixed");
    let io = annals_log::io::FaultIo::new();
    let store = LogStore::builder(dir).io(Arc::new(io.clone())).background_fill(false).open().unwrap();
    store.append(&stream("d-1"), ExpectedVersion::NoStream, vec![ev(0)]).await.unwrap();
    // Every sync waits while `hold` is set: the writer sits in the sync of
    // the first append while the next two are queued behind it.
    let hold = Arc::new(AtomicBool::new(true));
    {
        let hold = hold.clone();
        io.before_every_sync(move |_| {
            while hold.load(Ordering::SeqCst) {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        });
    }
    let first = {
        let s = store.clone();
        tokio::spawn(async move { s.append(&stream("x-1"), ExpectedVersion::Any, vec![ev(1)]).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let append = {
        let s = store.clone();
        tokio::spawn(async move { s.append(&stream("y-1"), ExpectedVersion::Any, vec![ev(2), ev(3)]).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let delete = {
        let s = store.clone();
        tokio::spawn(
            async move { s.delete_stream(&stream("d-1"), ExpectedVersion::Any, DeleteMode::Soft).await },
        )
    };
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    hold.store(false, Ordering::SeqCst);
    first.await.unwrap().unwrap();
    append.await.unwrap().unwrap();
    delete.await.unwrap().unwrap();
    store.close().unwrap();
    let path = dir.join(format!("{:020}.seg", 0));
    let bytes = io.read_file(&path).unwrap();
    let offs = record_offsets(&bytes);
    assert_eq!(offs.len(), 5);
    let last = format::decode(&bytes[offs[4] as usize..]).unwrap();
    let mid = format::decode(&bytes[offs[3] as usize..]).unwrap();
    assert_eq!(
        (last.kind, last.flags & format::FLAG_GROUP_END, last.group_events, last.position),
        (format::KIND_SOFT_DELETE, 1, 2, 4)
    );
    assert_eq!(mid.flags, 0, "the append and the delete were not one group");
    assert!(annals_log::verify_with(&io, dir).unwrap().is_ok());
    let written = io.read_file(&dir.join("index.bin")).unwrap();
    annals_log::rebuild_indexes_with(Arc::new(io.clone()), dir).unwrap();
    assert!(io.read_file(&dir.join("index.bin")).unwrap() == written);

    // Last group torn inside its append: it goes whole, delete included.
    let torn = io.crash();
    annals_log::io::Io::remove(&torn, &dir.join("index.bin")).unwrap();
    let mut b = bytes.clone();
    b[offs[2] as usize + 30] ^= 1;
    torn.write_file(&path, b);
    let store = LogStore::builder(dir).io(Arc::new(torn.clone())).open().unwrap();
    assert_eq!(store.stats().next_position, 2);
    assert!(store.stream_info(&stream("d-1")).await.unwrap().exists, "the delete of the cut group survived");
    assert!(!store.stream_info(&stream("y-1")).await.unwrap().exists);
    store.close().unwrap();

    // Its end mark damaged with a group after it: refused.
    let later = io.crash();
    annals_log::io::Io::remove(&later, &dir.join("index.bin")).unwrap();
    let store = LogStore::builder(dir).io(Arc::new(later.clone())).open().unwrap();
    store.append(&stream("z-1"), ExpectedVersion::Any, vec![ev(5)]).await.unwrap();
    store.close().unwrap();
    annals_log::io::Io::remove(&later, &dir.join("index.bin")).unwrap();
    let mut b = later.read_file(&path).unwrap();
    b[offs[4] as usize + 20] ^= 1;
    later.write_file(&path, b);
    let err =
        LogStore::builder(dir).io(Arc::new(later)).open().expect_err("damage before a later group opened");
    assert!(matches!(err, LogError::Corrupt { position: Some(4), .. }), "{err}");
}

/// One acknowledged append, then one append of ten 1,000,000-byte binary
/// events (about 10 MB, so the search after a hole crosses several 4 MiB
/// scan chunks), then `later` more single-event appends; no checkpoint.
async fn a_big_group_then(later: u64) -> (tempfile::TempDir, PathBuf, Vec<u8>, Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.append(&stream("ok-1"), ExpectedVersion::NoStream, vec![ev(0)]).await.unwrap();
        let big = (0..10u8)
            .map(|i| {
                EventData::raw(
                    "Big",
                    vec![i.wrapping_mul(37) | 1; 1_000_000],
                    annals_core::ContentType::Binary,
                )
            })
            .collect();
        store.append(&stream("big-1"), ExpectedVersion::NoStream, big).await.unwrap();
        for i in 0..later {
            store.append(&stream("later-1"), ExpectedVersion::Any, vec![ev(i)]).await.unwrap();
        }
        store.close().unwrap();
    }
    let (path, bytes, offs) = without_checkpoint(dir.path());
    assert_eq!(offs.len() as u64, 11 + later);
    (dir, path, bytes, offs)
}

/// Holes in a big unacknowledged last group (at its start, or every record
/// but its end mark, which then lies past several scan chunks; with the
/// zero fill after it or the file ending right at the mark) are a torn
/// tail; the same hole with a later group after it is refused.
#[tokio::test]
async fn holes_in_a_big_last_group_are_torn_and_before_a_later_group_corrupt() {
    for trim in [false, true] {
        for holes in [1usize, 9] {
            let (dir, path, mut bytes, offs) = a_big_group_then(0).await;
            for &o in &offs[1..=holes] {
                tear_header_sectors(&mut bytes, o as usize);
            }
            if trim {
                let end = offs[10] as usize + format::decode(&bytes[offs[10] as usize..]).unwrap().len;
                bytes.truncate(end);
            }
            std::fs::write(&path, &bytes).unwrap();
            let store =
                LogStore::open(dir.path()).unwrap_or_else(|e| panic!("trim {trim}, holes {holes}: {e}"));
            assert_eq!(count_all(&store).await, 1);
            assert!(store.stats().truncated_on_open.is_some_and(|b| b.torn_tail && b.cut_position == 1));
            store.close().unwrap();
        }
    }
    let (dir, path, mut bytes, offs) = a_big_group_then(1).await;
    tear_header_sectors(&mut bytes, offs[1] as usize);
    std::fs::write(&path, &bytes).unwrap();
    let err = LogStore::open(dir.path()).expect_err("a hole in an acknowledged group opened");
    assert!(matches!(err, LogError::Corrupt { position: Some(1), .. }), "{err}");
}

/// Damage in the middle segment of a group spanning several segments is
/// corruption (that segment was synced at the rollover); `verify` names the
/// group's start as the cut, and `repair` cuts there, in the segment the
/// group began in, removing the segments after it.
#[tokio::test]
async fn damage_inside_a_group_over_many_segments_is_repaired_at_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let (before, segs);
    {
        let store = LogStore::builder(dir.path()).segment_size(4096).open().unwrap();
        for i in 0..5 {
            store.append(&stream("fill-1"), ExpectedVersion::Any, vec![ev(i)]).await.unwrap();
        }
        before = store.stats().segments;
        store
            .append(&stream("span-1"), ExpectedVersion::NoStream, (0..14).map(big_ev).collect())
            .await
            .unwrap();
        store.append(&stream("fill-1"), ExpectedVersion::Any, vec![ev(9)]).await.unwrap();
        segs = store.stats().segments;
        store.close().unwrap();
    }
    assert!(segs >= before + 3, "{before} -> {segs}");
    std::fs::remove_file(dir.path().join("index.bin")).unwrap();
    let mid = seg(dir.path(), before as u64 + 1);
    let mut bytes = std::fs::read(&mid).unwrap();
    let offs = record_offsets(&bytes);
    bytes[offs[0] as usize + 200] ^= 0x20;
    std::fs::write(&mid, &bytes).unwrap();
    let err = LogStore::builder(dir.path()).segment_size(4096).open().expect_err("opened");
    assert!(matches!(err, LogError::Corrupt { .. }), "{err}");
    let report = annals_log::verify(dir.path()).unwrap();
    let bad = report.first_bad.unwrap();
    assert_eq!((bad.torn_tail, bad.cut_position), (false, 5), "{bad:?}");
    let store = LogStore::builder(dir.path()).segment_size(4096).repair(true).open().unwrap();
    assert_eq!(store.stats().next_position, 5);
    assert_eq!(store.stats().segments, before);
    assert_eq!(count_all(&store).await, 5);
    store.append(&stream("span-1"), ExpectedVersion::NoStream, (0..14).map(big_ev).collect()).await.unwrap();
    store.close().unwrap();
    assert!(annals_log::verify(dir.path()).unwrap().is_ok());
    annals_log::rebuild_indexes(dir.path()).unwrap();
}
