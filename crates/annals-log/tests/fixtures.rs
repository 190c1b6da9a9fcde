//! Stores written by earlier builds must keep opening. `tests/fixtures/vN`
//! was written by format version N (write one for a new format version, into
//! a new folder, with `cargo test -p annals-log --test fixtures -- --ignored
//! write_fixture`; never rewrite an old one).

use std::path::{Path, PathBuf};

use annals_core::{
    AllReader, Appender, CheckpointStore, DeleteMode, EventData, ExpectedVersion, Filter, Metadata, ReadAll,
    ReadStream, StreamDeleter, StreamName, StreamReader, Uuid,
};
use annals_log::LogStore;

fn fixture_dir(version: u32) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/v{version}"))
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[tokio::test]
#[ignore = "writes the fixture; run once per format version"]
async fn write_fixture() {
    let dir = fixture_dir(annals_log::format::FORMAT_VERSION);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store = LogStore::builder(&dir).segment_size(4096).open().unwrap();
    for i in 0..40u128 {
        let s = StreamName::new(format!("acct-{}", i % 4)).unwrap();
        let e = EventData::json(
            if i % 2 == 0 { "Deposited" } else { "Withdrawn" },
            &serde_json::json!({ "i": i as u64 }),
        )
        .unwrap()
        .with_id(Uuid::from_u128(i + 1))
        .with_metadata(Metadata::new().with("correlation_id", format!("c-{}", i % 3)));
        store.append(&s, ExpectedVersion::Any, vec![e]).await.unwrap();
    }
    let s = StreamName::new("acct-3").unwrap();
    store.delete_stream(&s, ExpectedVersion::Any, DeleteMode::Soft).await.unwrap();
    store.save_checkpoint("proj", 39).await.unwrap();
    store.close().unwrap();
    drop(store);
    // Keep the fixture small: drop the zero fill after the last record.
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().and_then(|x| x.to_str()) == Some("seg") {
            let mut bytes = std::fs::read(&p).unwrap();
            while bytes.last() == Some(&0) {
                bytes.pop();
            }
            std::fs::write(&p, bytes).unwrap();
        }
    }
    let _ = std::fs::remove_file(dir.join("LOCK"));
}

#[tokio::test]
async fn v1_store_still_opens_and_reads() {
    opens_and_reads(1).await;
}

#[tokio::test]
async fn v2_store_still_opens_and_reads() {
    opens_and_reads(2).await;
}

async fn opens_and_reads(version: u32) {
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&fixture_dir(version), tmp.path());
    assert!(annals_log::verify(tmp.path()).unwrap().is_ok());
    let store = LogStore::builder(tmp.path()).segment_size(4096).open().unwrap();
    assert!(store.stats().index_loaded, "the v1 index checkpoint loads");
    let all = store.read_all(ReadAll::forward(100)).await.unwrap().events;
    assert_eq!(all.len(), 40);
    assert_eq!(all[7].id, Uuid::from_u128(8));
    assert_eq!(all[7].decode::<serde_json::Value>().unwrap(), serde_json::json!({ "i": 7 }));
    let by_corr = store.read_all(ReadAll::forward(100).filter(Filter::correlation_id("c-1"))).await.unwrap();
    assert_eq!(by_corr.events.len(), 13);
    let acct1 = store.read_stream(&StreamName::new("acct-1").unwrap(), ReadStream::forward()).await.unwrap();
    assert_eq!(acct1.len(), 10);
    assert!(!store.stream_info(&StreamName::new("acct-3").unwrap()).await.unwrap().exists);
    assert_eq!(store.load_checkpoint("proj").await.unwrap(), Some(39));
    // And it keeps working.
    let r = store
        .append(
            &StreamName::new("acct-9").unwrap(),
            ExpectedVersion::NoStream,
            vec![EventData::json("New", &1).unwrap()],
        )
        .await
        .unwrap();
    assert_eq!(r.position, 40);
    // A version 1 segment has no group-end marks: the first write goes to a
    // new segment of this build's format version, and only one does.
    let segments = store.stats().segments;
    let last = tmp.path().join(format!("{:020}.seg", segments - 1));
    assert_eq!(std::fs::read(&last).unwrap()[8], annals_log::format::FORMAT_VERSION as u8);
    if version == 1 {
        assert_eq!(std::fs::read(tmp.path().join(format!("{:020}.seg", segments - 2))).unwrap()[8], 1);
    }
    let more = (0..3).map(|i| EventData::json("New", &i).unwrap()).collect();
    store.append(&StreamName::new("acct-9").unwrap(), ExpectedVersion::Exact(0), more).await.unwrap();
    assert_eq!(store.stats().segments, segments);
    store.close().unwrap();
    drop(store);
    assert!(annals_log::verify(tmp.path()).unwrap().is_ok());
    let store = LogStore::builder(tmp.path()).segment_size(4096).open().unwrap();
    assert_eq!(store.stats().segments, segments);
    assert_eq!(store.read_all(ReadAll::forward(100)).await.unwrap().events.len(), 44);
}
