//! Opening, recovery and integrity: the directory lock, segment rollover,
//! index checkpoints, rebuild, torn tails, corruption and repair.

mod common;

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use annals_core::{
    AllReader, Appender, DeleteMode, Error, EventData, ExpectedVersion, Filter, ReadAll, ReadStream,
    StreamDeleter, StreamName, StreamReader,
};
use annals_log::{
    Durability, LogError, LogStore, LogStoreBuilder,
    io::{FaultIo, Io, IoFile},
};
use serde_json::json;

use common::record_offsets;

fn stream(name: &str) -> StreamName {
    StreamName::new(name).unwrap()
}

fn event(n: u64) -> EventData {
    let e = EventData::json(
        if n.is_multiple_of(2) { "Even" } else { "Odd" },
        &json!({ "n": n, "pad": "x".repeat(40) }),
    )
    .unwrap();
    let m = e.metadata.with("correlation_id", format!("c-{}", n % 5));
    e.with_metadata(m)
}

async fn fill(store: &LogStore, n: u64) {
    for i in 0..n {
        store
            .append(&stream(&format!("s{}-{}", i % 3, i % 7)), ExpectedVersion::Any, vec![event(i)])
            .await
            .unwrap();
    }
}

fn seg0(dir: &Path) -> std::path::PathBuf {
    dir.join(format!("{:020}.seg", 0))
}

#[tokio::test]
async fn second_open_is_refused_with_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    let err = LogStore::open(dir.path()).unwrap_err();
    assert!(matches!(err, LogError::Locked { .. }), "{err:?}");
    let core: Error = err.into();
    assert!(matches!(core, Error::Backend { .. }));
    // Also while a clone is alive: the lock belongs to the store, not a handle.
    let clone = store.clone();
    drop(store);
    assert!(matches!(LogStore::open(dir.path()), Err(LogError::Locked { .. })));
    clone.close().unwrap();
    assert!(matches!(
        clone.append(&stream("a-1"), ExpectedVersion::Any, vec![event(0)]).await,
        Err(Error::Closed)
    ));
    drop(clone);
    LogStore::open(dir.path()).unwrap().close().unwrap();
}

#[tokio::test]
async fn segments_roll_over_and_reopen_intact() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::builder(dir.path()).segment_size(4096).open().unwrap();
    fill(&store, 120).await;
    // A record larger than a segment gets a segment of its own.
    let big = EventData::raw("Big", vec![7u8; 10_000], annals_core::ContentType::Binary);
    store.append(&stream("big-1"), ExpectedVersion::Any, vec![big]).await.unwrap();
    fill(&store, 5).await;
    let segments = store.stats().segments;
    assert!(segments > 5, "expected several segments, got {segments}");
    let before = store.read_all(ReadAll::forward(usize::MAX)).await.unwrap().events;
    store.close().unwrap();
    drop(store);
    let report = annals_log::verify(dir.path()).unwrap();
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report.events, 126);
    assert_eq!(report.segments as usize, segments);
    let store = LogStore::builder(dir.path()).segment_size(4096).verify_on_open(true).open().unwrap();
    let after = store.read_all(ReadAll::forward(usize::MAX)).await.unwrap().events;
    assert_eq!(before, after);
    assert_eq!(after[120].data.len(), 10_000);
    let back = store.read_all(ReadAll::backward(usize::MAX)).await.unwrap().events;
    assert_eq!(back.len(), 126);
    assert!(back.iter().rev().eq(after.iter()));
}

#[tokio::test]
async fn reopen_loads_the_index_and_replays_only_the_tail() {
    let io = FaultIo::new();
    let dir = Path::new("/store");
    let open =
        |io: &FaultIo| LogStore::builder(dir).io(Arc::new(io.clone())).segment_size(8192).open().unwrap();
    let store = open(&io);
    fill(&store, 300).await;
    store.close().unwrap();
    drop(store);
    let store = open(&io);
    let stats = store.stats();
    assert!(stats.index_loaded);
    assert_eq!(stats.replayed_on_open, 0, "a cleanly closed store replays nothing");
    fill(&store, 7).await;
    // Crash without a clean close: the old checkpoint plus a 7-record tail.
    let crashed = io.crash();
    drop(store);
    let store = open(&crashed);
    let stats = store.stats();
    assert!(stats.index_loaded);
    assert_eq!(stats.replayed_on_open, 7);
    assert_eq!(stats.next_position, 307);
    let by_type = store.read_all(ReadAll::forward(1000).filter(Filter::event_type("Odd"))).await.unwrap();
    assert_eq!(by_type.events.len(), 153);
    let by_corr = store.read_all(ReadAll::forward(1000).filter(Filter::correlation_id("c-3"))).await.unwrap();
    assert!(by_corr.events.iter().all(|e| e.metadata.correlation_id().as_deref() == Some("c-3")));
    assert_eq!(by_corr.events.len(), 300 / 5 + 1);
}

#[tokio::test]
async fn rebuilt_index_equals_the_original() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::builder(dir.path()).segment_size(8192).open().unwrap();
    fill(&store, 200).await;
    store.delete_stream(&stream("s0-0"), ExpectedVersion::Any, DeleteMode::Soft).await.unwrap();
    store.delete_stream(&stream("s1-1"), ExpectedVersion::Any, DeleteMode::Hard).await.unwrap();
    store.delete_stream(&stream("never-1"), ExpectedVersion::NoStream, DeleteMode::Hard).await.unwrap();
    store.append(&stream("s0-0"), ExpectedVersion::NoStream, vec![event(1)]).await.unwrap();
    store.close().unwrap();
    drop(store);
    let original = std::fs::read(dir.path().join("index.bin")).unwrap();
    std::fs::remove_file(dir.path().join("index.bin")).unwrap();
    let report = annals_log::rebuild_indexes(dir.path()).unwrap();
    assert_eq!(report.events, 201);
    assert_eq!(report.records, 204);
    let rebuilt = std::fs::read(dir.path().join("index.bin")).unwrap();
    assert!(original == rebuilt, "rebuilt index differs from the one the writer kept");
    let store = LogStore::open(dir.path()).unwrap();
    assert!(store.stats().index_loaded);
    let info = store.stream_info(&stream("s1-1")).await.unwrap();
    assert_eq!(info.deletion, annals_core::DeletionState::Tombstoned);
    let read = store.read_stream(&stream("s0-0"), ReadStream::forward()).await.unwrap();
    assert_eq!(read.len(), 1);
}

/// Writes 100 events and closes; returns the record offsets in segment 0.
async fn hundred(dir: &Path) -> Vec<u64> {
    let store = LogStore::open(dir).unwrap();
    fill(&store, 100).await;
    store.close().unwrap();
    drop(store);
    let offsets = record_offsets(&std::fs::read(seg0(dir)).unwrap());
    assert_eq!(offsets.len(), 100);
    offsets
}

fn flip(path: &Path, at: u64) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at as usize] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

#[tokio::test]
async fn flipped_byte_mid_log_refuses_to_open_naming_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let offsets = hundred(dir.path()).await;
    flip(&seg0(dir.path()), offsets[50] + 100);
    let expect_location = |err: LogError| match err {
        LogError::Corrupt { segment, offset, position, .. } => {
            assert_eq!((segment, offset, position), (0, offsets[50], Some(50)));
        }
        other => panic!("expected Corrupt, got {other:?}"),
    };
    // Even with the index checkpoint, open re-walks the segment the
    // checkpoint ends in, so the damage is found before anything is served.
    expect_location(LogStore::open(dir.path()).unwrap_err());
    expect_location(LogStore::builder(dir.path()).verify_on_open(true).open().unwrap_err());
    let report = annals_log::verify(dir.path()).unwrap();
    let bad = report.first_bad.clone().unwrap();
    assert_eq!((bad.segment, bad.offset, bad.position, bad.torn_tail), (0, offsets[50], 50, false));
    assert_eq!(report.events, 50);
    // Without the checkpoint, the same.
    std::fs::remove_file(dir.path().join("index.bin")).unwrap();
    expect_location(LogStore::open(dir.path()).unwrap_err());
    // Repair truncates at the bad record, explicitly.
    let store = LogStore::builder(dir.path()).repair(true).open().unwrap();
    let truncated = store.stats().truncated_on_open.unwrap();
    assert_eq!((truncated.offset, truncated.position), (offsets[50], 50));
    assert_eq!(store.stats().next_position, 50);
    let r = store.append(&stream("after-1"), ExpectedVersion::Any, vec![event(0)]).await.unwrap();
    assert_eq!(r.position, 50);
    store.close().unwrap();
    assert!(annals_log::verify(dir.path()).unwrap().is_ok());
}

#[tokio::test]
async fn damage_to_the_last_checkpointed_record_is_corruption_not_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let offsets = hundred(dir.path()).await;
    // The last record was synced and checkpointed: flipping it must not be
    // "repaired" silently by the torn-tail rule, although only zeros follow.
    flip(&seg0(dir.path()), offsets[99] + 90);
    assert!(matches!(LogStore::open(dir.path()), Err(LogError::Corrupt { position: Some(99), .. })));
    assert!(matches!(
        LogStore::builder(dir.path()).verify_on_open(true).open(),
        Err(LogError::Corrupt { position: Some(99), .. })
    ));
    // Asked explicitly, repair drops it (and the stale checkpoint).
    let store = LogStore::builder(dir.path()).repair(true).open().unwrap();
    assert_eq!(store.stats().next_position, 99);
    store.close().unwrap();
    drop(store);
    assert!(LogStore::open(dir.path()).unwrap().stats().index_loaded);
    let offsets = record_offsets(&std::fs::read(seg0(dir.path())).unwrap());
    flip(&seg0(dir.path()), offsets[97] + 90);
    assert!(matches!(LogStore::open(dir.path()), Err(LogError::Corrupt { position: Some(97), .. })));
}

#[tokio::test]
async fn corruption_in_an_older_segment_is_caught_on_read_and_by_verify() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::builder(dir.path()).segment_size(4096).open().unwrap();
    fill(&store, 100).await;
    store.close().unwrap();
    drop(store);
    let offsets = record_offsets(&std::fs::read(seg0(dir.path())).unwrap());
    flip(&seg0(dir.path()), offsets[3] + 80);
    // Opening trusts the checkpoint for older segments (fast open) ...
    let store = LogStore::builder(dir.path()).segment_size(4096).open().unwrap();
    assert!(store.stats().index_loaded);
    // ... but never serves the damaged record.
    let err = store.read_all(ReadAll::forward(1000)).await.unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    assert!(err.to_string().contains(&format!("segment 0, offset {}, position 3", offsets[3])), "{err}");
    let ok = store.read_all(ReadAll::forward(1000).from_position(4)).await.unwrap();
    assert_eq!(ok.events.len(), 96);
    store.close().unwrap();
    drop(store);
    let bad = annals_log::verify(dir.path()).unwrap().first_bad.unwrap();
    assert_eq!((bad.segment, bad.offset, bad.position), (0, offsets[3], 3));
    assert!(matches!(
        LogStore::builder(dir.path()).verify_on_open(true).open(),
        Err(LogError::Corrupt { segment: 0, position: Some(3), .. })
    ));
}

/// A file system that records the largest buffer any read was given: the
/// size of the allocation behind it.
#[derive(Clone, Default)]
struct ReadSizes {
    inner: FaultIo,
    largest: Arc<AtomicUsize>,
}

struct ReadSizesFile {
    inner: Arc<dyn IoFile>,
    largest: Arc<AtomicUsize>,
}

impl IoFile for ReadSizesFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.largest.fetch_max(buf.len(), Ordering::SeqCst);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.inner.sync_data()
    }
    fn sync_all(&self) -> std::io::Result<()> {
        self.inner.sync_all()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
}

impl Io for ReadSizes {
    fn open(&self, path: &Path, create: bool) -> std::io::Result<Arc<dyn IoFile>> {
        let inner = self.inner.open(path, create)?;
        Ok(Arc::new(ReadSizesFile { inner, largest: self.largest.clone() }))
    }
    fn list(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        self.inner.list(dir)
    }
    fn exists(&self, path: &Path) -> bool {
        self.inner.exists(path)
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        self.inner.remove(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.inner.rename(from, to)
    }
    fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
        self.inner.create_dir_all(dir)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        self.inner.sync_dir(dir)
    }
    fn lock(&self, dir: &Path) -> Result<Box<dyn Send + Sync>, LogError> {
        self.inner.lock(dir)
    }
}

/// A store of 100 events in 4 KiB segments, closed (so with a checkpoint):
/// its file system, a builder for it and its number of segments.
async fn hundred_in_small_segments() -> (ReadSizes, impl Fn() -> LogStoreBuilder, u64) {
    let io = ReadSizes::default();
    let fs = io.clone();
    let builder = move || LogStore::builder("/huge-length").io(Arc::new(fs.clone())).segment_size(4096);
    let store = builder().open().unwrap();
    fill(&store, 100).await;
    let segments = store.stats().segments as u64;
    store.close().unwrap();
    (io, builder, segments)
}

/// Flips the high byte of the length field of the record at `pick(n)` of
/// the `n` in `segment`: it then claims about a GiB more than it holds.
fn claim_a_gib(io: &ReadSizes, segment: u64, pick: impl Fn(usize) -> usize) {
    let path = Path::new("/huge-length").join(format!("{segment:020}.seg"));
    let mut bytes = io.inner.read_file(&path).unwrap();
    let offsets = record_offsets(&bytes);
    bytes[offsets[pick(offsets.len())] as usize + 3] ^= 0x40;
    io.inner.write_file(&path, bytes);
    io.largest.store(0, Ordering::SeqCst);
}

/// A flipped bit in the length field of a record the index points at makes
/// it claim about a GiB: the read must fail with `Corrupt` without first
/// allocating a buffer of the claimed size (an allocation failure aborts the
/// process).
#[tokio::test]
async fn a_damaged_length_field_never_sizes_a_read_buffer() {
    let (io, builder, _) = hundred_in_small_segments().await;
    claim_a_gib(&io, 0, |_| 3);
    let store = builder().open().unwrap();
    assert!(store.stats().index_loaded);
    let err = store.read_all(ReadAll::forward(1000)).await.unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    let err = store.read_stream(&stream("s0-3"), ReadStream::forward()).await.unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err:?}");
    let largest = io.largest.load(Ordering::SeqCst);
    assert!(largest <= 1 << 20, "a read buffer of {largest} bytes for 4 KiB segments");
}

/// The same damage to the record the index checkpoint names as its last:
/// open checks that record before trusting the checkpoint.
#[tokio::test]
async fn a_damaged_length_of_the_checkpointed_tail_never_sizes_a_read_buffer() {
    let (io, builder, segments) = hundred_in_small_segments().await;
    claim_a_gib(&io, segments - 1, |n| n - 1);
    let err = builder().open().unwrap_err();
    assert!(matches!(err, LogError::Corrupt { position: Some(99), .. }), "{err}");
    let largest = io.largest.load(Ordering::SeqCst);
    assert!(largest <= 4 << 20, "a read buffer of {largest} bytes for 4 KiB segments");
}

/// A file system mounted read-only (a backup, a snapshot): opening a file
/// for writing fails; reading works.
#[derive(Clone)]
struct ReadOnlyMount(FaultIo);

impl Io for ReadOnlyMount {
    fn open(&self, _path: &Path, _create: bool) -> std::io::Result<Arc<dyn IoFile>> {
        Err(std::io::Error::new(std::io::ErrorKind::ReadOnlyFilesystem, "read-only file system"))
    }
    fn open_read(&self, path: &Path) -> std::io::Result<Arc<dyn IoFile>> {
        self.0.open(path, false)
    }
    fn list(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        self.0.list(dir)
    }
    fn exists(&self, path: &Path) -> bool {
        self.0.exists(path)
    }
    fn remove(&self, _path: &Path) -> std::io::Result<()> {
        Err(std::io::Error::new(std::io::ErrorKind::ReadOnlyFilesystem, "read-only file system"))
    }
    fn rename(&self, _from: &Path, _to: &Path) -> std::io::Result<()> {
        Err(std::io::Error::new(std::io::ErrorKind::ReadOnlyFilesystem, "read-only file system"))
    }
    fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
        self.0.create_dir_all(dir)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        self.0.sync_dir(dir)
    }
    fn lock(&self, _dir: &Path) -> Result<Box<dyn Send + Sync>, LogError> {
        Err(std::io::Error::new(std::io::ErrorKind::ReadOnlyFilesystem, "read-only file system").into())
    }
}

/// `verify` is read-only, so it works on a read-only copy of a store
/// (`annals verify` on a mounted backup failed with "Read-only file
/// system") and finds the same as on the writable original.
#[tokio::test]
async fn verify_works_on_a_read_only_file_system() {
    let io = FaultIo::new();
    let dir = Path::new("/read-only");
    let store = LogStore::builder(dir).io(Arc::new(io.clone())).segment_size(4096).open().unwrap();
    fill(&store, 100).await;
    store.close().unwrap();
    drop(store);
    let writable = annals_log::verify_with(&io, dir).unwrap();
    let report = annals_log::verify_with(&ReadOnlyMount(io.clone()), dir)
        .unwrap_or_else(|e| panic!("verify of a read-only copy failed: {e}"));
    assert!(report.is_ok(), "{report:?}");
    assert_eq!(report, writable);
    assert_eq!(report.events, 100);
}

#[tokio::test]
async fn reordered_records_break_the_hash_chain() {
    let dir = tempfile::tempdir().unwrap();
    let offsets = hundred(dir.path()).await;
    let path = seg0(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    // Swap records 10 and 11 (each keeps a valid CRC).
    let (a, b, c) = (offsets[10] as usize, offsets[11] as usize, offsets[12] as usize);
    let first = bytes[a..b].to_vec();
    let second = bytes[b..c].to_vec();
    bytes.splice(a..c, second.into_iter().chain(first));
    std::fs::write(&path, bytes).unwrap();
    match LogStore::builder(dir.path()).verify_on_open(true).open().unwrap_err() {
        LogError::Corrupt { offset, position, reason, .. } => {
            assert_eq!((offset, position), (offsets[10], Some(10)));
            assert!(reason.contains("hash chain"), "{reason}");
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[tokio::test]
async fn record_cut_mid_way_is_truncated_back_to_the_previous_one() {
    let dir = tempfile::tempdir().unwrap();
    let offsets = hundred(dir.path()).await;
    // A torn write is never covered by an index checkpoint (it only covers
    // synced records): model the crash by dropping the checkpoint.
    std::fs::remove_file(dir.path().join("index.bin")).unwrap();
    let path = seg0(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    let cut = offsets[99] as usize + 30;
    std::fs::write(&path, &bytes[..cut]).unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    let stats = store.stats();
    let truncated = stats.truncated_on_open.unwrap();
    assert!(truncated.torn_tail);
    assert_eq!((truncated.offset, truncated.position), (offsets[99], 99));
    assert_eq!(stats.next_position, 99);
    let all = store.read_all(ReadAll::forward(1000)).await.unwrap().events;
    assert_eq!(all.len(), 99);
    let r = store.append(&stream("again-1"), ExpectedVersion::Any, vec![event(1)]).await.unwrap();
    assert_eq!(r.position, 99);
    store.close().unwrap();
    assert!(annals_log::verify(dir.path()).unwrap().is_ok());
}

#[tokio::test]
async fn interval_and_never_durability_persist_on_close() {
    for durability in [Durability::Interval(std::time::Duration::from_millis(5)), Durability::Never] {
        let dir = tempfile::tempdir().unwrap();
        let store = LogStore::builder(dir.path()).durability(durability).open().unwrap();
        fill(&store, 50).await;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        store.close().unwrap();
        drop(store);
        let store = LogStore::open(dir.path()).unwrap();
        assert_eq!(store.stats().next_position, 50);
    }
}

/// Checkpoints (kv.log) written under `Interval` or `Never` are synced by a
/// clean close, like the log: a crash after the close loses nothing.
#[tokio::test]
async fn kv_writes_under_interval_and_never_durability_persist_on_close() {
    use annals_core::CheckpointStore;
    for durability in [Durability::Interval(std::time::Duration::from_secs(10)), Durability::Never] {
        let io = FaultIo::new();
        let open =
            |io: &FaultIo| LogStore::builder("/kv-close").io(Arc::new(io.clone())).durability(durability);
        let store = open(&io).open().unwrap();
        store.save_checkpoint("proj", 9).await.unwrap();
        store.save_checkpoint("proj", 10).await.unwrap();
        store.close().unwrap();
        drop(store);
        let store = open(&io.crash()).open().unwrap();
        assert_eq!(store.load_checkpoint("proj").await.unwrap(), Some(10), "{durability:?}");
    }
}

/// Under `Interval(d)` a checkpoint is synced at most about `d` after it
/// was written, even when nothing is written after it: a crash later
/// than that keeps it.
#[tokio::test]
async fn kv_writes_under_interval_durability_are_synced_within_the_interval() {
    use annals_core::CheckpointStore;
    let d = std::time::Duration::from_millis(50);
    let io = FaultIo::new();
    let open = |io: &FaultIo| {
        LogStore::builder("/kv-interval").io(Arc::new(io.clone())).durability(Durability::Interval(d))
    };
    let store = open(&io).open().unwrap();
    store.save_checkpoint("proj", 9).await.unwrap();
    store.save_checkpoint("proj", 10).await.unwrap();
    tokio::time::sleep(d * 10).await;
    let crashed = io.crash();
    drop(store);
    let store = open(&crashed).open().unwrap();
    assert_eq!(store.load_checkpoint("proj").await.unwrap(), Some(10));
}

/// Under `Interval`, a checkpoint is never durable ahead of the events it
/// counts: a consumer saves position 10 after reading ten acknowledged
/// (but not yet synced) events; when the checkpoint's sync comes first, the
/// log is synced before it. Otherwise a crash would keep the checkpoint and
/// lose events 5..10, new appends would take those positions again, and
/// the consumer would skip them.
#[tokio::test]
async fn under_interval_a_synced_checkpoint_is_never_ahead_of_the_log() {
    use annals_core::CheckpointStore;
    let d = std::time::Duration::from_secs(1);
    let io = FaultIo::new();
    let dir = Path::new("/kv-ahead");
    // No background zero-fill: its syncs would make the log durable too.
    let store = LogStore::builder(dir)
        .io(Arc::new(io.clone()))
        .durability(Durability::Interval(d))
        .background_fill(false)
        .open()
        .unwrap();
    // Both the log's and kv.log's interval have passed: the next append is
    // synced at once, and so is the next checkpoint.
    tokio::time::sleep(d + std::time::Duration::from_millis(100)).await;
    fill(&store, 5).await;
    // Within the log's new interval: written, acknowledged, not synced.
    fill(&store, 5).await;
    let seen = store.read_all(ReadAll::forward(100)).await.unwrap();
    assert_eq!(seen.events.len(), 10);
    store.save_checkpoint("proj", seen.events.last().unwrap().position + 1).await.unwrap();
    let crashed = io.crash();
    drop(store);
    let store = LogStore::builder(dir).io(Arc::new(crashed)).open().unwrap();
    let head = store.stats().next_position;
    let saved = store.load_checkpoint("proj").await.unwrap();
    assert!(saved.is_none_or(|p| p <= head), "checkpoint {saved:?} survived ahead of the log's head {head}");
}

/// The same under a disk that writes unsynced pages in any order (the
/// kernel's writeback): an unsynced checkpoint record must not reach the
/// disk before the events it counts are synced, whatever survives.
#[tokio::test]
async fn under_interval_no_torn_crash_leaves_a_checkpoint_ahead_of_the_log() {
    use annals_core::{CheckpointStore, Snapshot, SnapshotStore, Timestamp};
    let io = FaultIo::new();
    let dir = Path::new("/kv-ahead-torn");
    let long = Durability::Interval(std::time::Duration::from_secs(3600));
    let store = LogStore::builder(dir).io(Arc::new(io.clone())).durability(long).open().unwrap();
    fill(&store, 40).await;
    let seen = store.read_all(ReadAll::forward(100)).await.unwrap();
    store.save_checkpoint("proj", seen.events.last().unwrap().position + 1).await.unwrap();
    let s = stream("s0-0");
    let version = store.stream_info(&s).await.unwrap().last_version.unwrap();
    let snap = Snapshot {
        stream: s.clone(),
        version,
        schema_version: 1,
        data: vec![7u8; 600].into(),
        created_at: Timestamp::now(),
    };
    store.save_snapshot(snap).await.unwrap();
    for seed in 0..64 {
        let crashed = io.crash_torn(seed);
        // Unsynced groups can survive with holes: repair truncates at the
        // first one (what an operator does after such a crash).
        let store = LogStore::builder(dir).io(Arc::new(crashed)).repair(true).open().unwrap();
        let head = store.stats().next_position;
        let saved = store.load_checkpoint("proj").await.unwrap();
        assert!(saved.is_none_or(|p| p <= head), "seed {seed}: checkpoint {saved:?} ahead of head {head}");
        let now = store.stream_info(&s).await.unwrap().last_version;
        if let Some(snap) = store.load_snapshot(&s, None).await.unwrap() {
            assert!(
                now.is_some_and(|v| snap.version <= v),
                "seed {seed}: snapshot {} ahead of {now:?}",
                snap.version
            );
        }
        store.close().unwrap();
    }
    drop(store);
}

/// After `close`, writes of every kind fail with `Closed`, checkpoints
/// and snapshots too: the directory lock is released, so another store may
/// already have opened the directory and replaced kv.log (its compaction),
/// and a checkpoint acknowledged through the old handle would be lost.
#[tokio::test]
async fn checkpoint_and_snapshot_writes_after_close_fail_with_closed() {
    use annals_core::{CheckpointStore, Snapshot, SnapshotStore, Timestamp};
    let dir = tempfile::tempdir().unwrap();
    let old = LogStore::open(dir.path()).unwrap();
    old.save_checkpoint("proj", 1).await.unwrap();
    old.close().unwrap();
    let new = LogStore::open(dir.path()).unwrap();
    let saved = old.save_checkpoint("proj", 2).await;
    assert!(matches!(saved, Err(Error::Closed)), "{saved:?}");
    let snap = Snapshot {
        stream: stream("snap-1"),
        version: 1,
        schema_version: 1,
        data: vec![1u8; 10].into(),
        created_at: Timestamp::now(),
    };
    let saved = old.save_snapshot(snap).await;
    assert!(matches!(saved, Err(Error::Closed)), "{saved:?}");
    let pruned = old.prune_snapshots(&stream("snap-1"), 0).await;
    assert!(matches!(pruned, Err(Error::Closed) | Ok(0)), "{pruned:?}");
    // Reads through the old handle keep working.
    assert_eq!(old.load_checkpoint("proj").await.unwrap(), Some(1));
    assert_eq!(new.load_checkpoint("proj").await.unwrap(), Some(1));
}

#[tokio::test]
async fn snapshots_and_checkpoints_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let s = stream("snap-1");
    {
        use annals_core::{CheckpointStore, Snapshot, SnapshotStore, Timestamp};
        let store = LogStore::open(dir.path()).unwrap();
        for v in [1u64, 2, 3] {
            let snap = Snapshot {
                stream: s.clone(),
                version: v,
                schema_version: 1,
                data: vec![v as u8; 10].into(),
                created_at: Timestamp::now(),
            };
            store.save_snapshot(snap).await.unwrap();
        }
        assert_eq!(store.prune_snapshots(&s, 2).await.unwrap(), 1);
        store.save_checkpoint("proj", 9).await.unwrap();
        store.save_checkpoint("proj", 10).await.unwrap();
    }
    use annals_core::{CheckpointStore, SnapshotStore};
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(store.load_checkpoint("proj").await.unwrap(), Some(10));
    assert_eq!(store.load_snapshot(&s, None).await.unwrap().unwrap().version, 3);
    assert_eq!(store.load_snapshot(&s, Some(1)).await.unwrap(), None);
    assert_eq!(store.load_snapshot(&s, Some(2)).await.unwrap().unwrap().data.as_ref(), &[2u8; 10]);
}

#[tokio::test]
async fn interrupted_segment_creation_is_removed_on_open() {
    let io = FaultIo::new();
    let dir = Path::new("/torn-segment");
    let open = |io: &FaultIo| LogStore::builder(dir).io(Arc::new(io.clone())).segment_size(4096).open();
    // A first open that died while creating segment 0.
    io.write_file(&dir.join(format!("{:020}.seg", 0)), b"ANNALS".to_vec());
    let store = open(&io).unwrap();
    fill(&store, 30).await;
    let segments = store.stats().segments;
    store.close().unwrap();
    drop(store);
    // A later crash while creating the next segment: header cut short.
    let next = dir.join(format!("{segments:020}.seg"));
    io.write_file(&next, vec![0x41; 40]);
    let store = open(&io).unwrap();
    assert!(io.read_file(&next).is_none(), "the half-created segment is gone");
    assert_eq!(store.stats().next_position, 30);
    fill(&store, 30).await;
    store.close().unwrap();
    drop(store);
    assert!(annals_log::verify_with(&io, dir).unwrap().is_ok());
    // A segment whose header is damaged but which holds records is not
    // "half-created": that is corruption.
    let first = dir.join(format!("{:020}.seg", 0));
    let mut bytes = io.read_file(&first).unwrap();
    bytes[3] ^= 0xff;
    io.write_file(&first, bytes);
    assert!(matches!(
        LogStore::builder(dir).io(Arc::new(io.clone())).verify_on_open(true).open(),
        Err(LogError::Corrupt { segment: 0, offset: 0, .. })
    ));
}

#[tokio::test]
async fn periodic_checkpoints_bound_the_replay_after_a_crash() {
    let io = FaultIo::new();
    let dir = Path::new("/periodic");
    let store = LogStore::builder(dir).io(Arc::new(io.clone())).checkpoint_every(50).open().unwrap();
    fill(&store, 120).await;
    // No clean close: only the periodic checkpoints exist.
    let crashed = io.crash();
    drop(store);
    let store = LogStore::builder(dir).io(Arc::new(crashed)).open().unwrap();
    let stats = store.stats();
    assert!(stats.index_loaded);
    assert!(stats.replayed_on_open < 50, "replayed {}", stats.replayed_on_open);
    assert_eq!(stats.next_position, 120);
    assert_eq!(store.read_all(ReadAll::forward(1000)).await.unwrap().events.len(), 120);
}

/// A tombstone whose caller gave up waiting (its future dropped once the
/// request was sent: an HTTP client that disconnected) still commits, and
/// a live subscription of the stream must learn of it then, not only when
/// some later commit happens to wake it.
#[tokio::test]
async fn a_tombstone_whose_caller_went_away_still_ends_live_stream_subscriptions() {
    use annals_core::{SubscribeFrom, Subscriber, SubscriptionRequest};
    use futures::{FutureExt, StreamExt};
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    let s = stream("tomb-1");
    store.append(&s, ExpectedVersion::NoStream, vec![event(0)]).await.unwrap();
    let mut live = store.subscribe(SubscriptionRequest::stream(s.clone(), SubscribeFrom::Start));
    assert!(matches!(live.next().await, Some(Ok(_))));
    // Sent, then dropped before the reply.
    let delete = store.delete_stream(&s, ExpectedVersion::Any, DeleteMode::Hard);
    assert!(delete.now_or_never().is_none(), "the delete finished on its first poll");
    let started = std::time::Instant::now();
    while store.stream_info(&s).await.unwrap().deletion != annals_core::DeletionState::Tombstoned {
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "the tombstone never committed");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let end = tokio::time::timeout(std::time::Duration::from_secs(5), live.next())
        .await
        .expect("the live subscription never learnt of the tombstone");
    assert!(matches!(end, Some(Err(Error::StreamDeleted { .. }))), "{end:?}");
}

#[tokio::test]
async fn subscriptions_end_with_closed_when_the_store_closes() {
    use annals_core::{SubscribeFrom, Subscriber, SubscriptionRequest};
    use futures::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    fill(&store, 3).await;
    let mut sub = store.subscribe(SubscriptionRequest::all(Filter::all(), SubscribeFrom::Start));
    for _ in 0..3 {
        assert!(matches!(sub.next().await, Some(Ok(_))));
    }
    store.close().unwrap();
    let end = tokio::time::timeout(std::time::Duration::from_secs(20), sub.next()).await.unwrap();
    assert!(matches!(end, Some(Err(Error::Closed))), "{end:?}");
    // The directory is free again although the subscription still exists.
    drop(store);
    LogStore::open(dir.path()).unwrap().close().unwrap();
    drop(sub);
}

#[tokio::test]
async fn a_crash_under_interval_durability_leaves_a_consistent_prefix() {
    let io = FaultIo::new();
    let dir = Path::new("/interval");
    let store = LogStore::builder(dir)
        .io(Arc::new(io.clone()))
        .durability(Durability::Interval(std::time::Duration::from_secs(3600)))
        .segment_size(4096)
        .open()
        .unwrap();
    fill(&store, 80).await;
    let acked = store.read_all(ReadAll::forward(1000)).await.unwrap().events;
    let crashed = io.crash();
    drop(store);
    // Unsynced appends may be lost, but what survives is a gapless prefix
    // whose hash chain verifies.
    let store = LogStore::builder(dir).io(Arc::new(crashed.clone())).segment_size(4096).open().unwrap();
    let survived = store.read_all(ReadAll::forward(1000)).await.unwrap().events;
    assert!(survived.len() <= acked.len());
    assert!(survived.iter().zip(&acked).all(|(a, b)| a.id == b.id && a.position == b.position));
    store.close().unwrap();
    assert!(annals_log::verify_with(&crashed, dir).unwrap().is_ok());
}

#[tokio::test]
async fn missing_segments_and_unknown_versions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::builder(dir.path()).segment_size(4096).open().unwrap();
    fill(&store, 100).await;
    let segments = store.stats().segments;
    store.close().unwrap();
    drop(store);
    assert!(segments >= 4);
    // A segment from a future format version.
    let first = seg0(dir.path());
    let mut bytes = std::fs::read(&first).unwrap();
    let pristine = bytes.clone();
    bytes[8] = 3;
    let crc = crc32c::crc32c(&bytes[..68]);
    bytes[68..72].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(&first, &bytes).unwrap();
    match LogStore::builder(dir.path()).verify_on_open(true).open().unwrap_err() {
        LogError::Corrupt { segment: 0, offset: 0, reason, .. } => {
            assert!(reason.contains("version 3 is not supported"), "{reason}");
        }
        other => panic!("expected Corrupt at segment 0, got {other:?}"),
    }
    std::fs::write(&first, pristine).unwrap();
    // A segment removed from the middle.
    std::fs::remove_file(dir.path().join(format!("{:020}.seg", 2))).unwrap();
    let err = LogStore::open(dir.path()).unwrap_err();
    assert!(matches!(err, LogError::Corrupt { segment: 2, .. }), "{err:?}");
    assert!(annals_log::verify(dir.path()).is_err());
}

/// The index checkpoint only covers synced records, so a log that ends
/// before the checkpoint's end lost acknowledged records: its last
/// segments were removed, or its last segment was cut short (a partial
/// copy or restore). Open must refuse, not start over from what is left
/// (and then overwrite the checkpoint at close); verify must say so.
#[tokio::test]
async fn a_log_ending_before_its_checkpoint_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = LogStore::builder(dir.path()).segment_size(4096).open().unwrap();
    fill(&store, 100).await;
    let segments = store.stats().segments as u64;
    store.close().unwrap();
    drop(store);
    let segment = |i: u64| dir.path().join(format!("{i:020}.seg"));
    let last = std::fs::read(segment(segments - 1)).unwrap();
    let offsets = record_offsets(&last);
    let refused = |what: &str| {
        match LogStore::builder(dir.path()).segment_size(4096).open() {
            Err(e) => assert!(matches!(e, LogError::Corrupt { .. }), "{what}: {e}"),
            Ok(store) => panic!("{what}: opened with {} of 100 events", store.stats().next_position),
        }
        let report = annals_log::verify(dir.path()).unwrap();
        assert!(!report.is_ok(), "{what}: verify passed");
    };
    // The last segment cut short after its first record.
    std::fs::write(segment(segments - 1), &last[..offsets[1] as usize]).unwrap();
    refused("last segment cut short");
    // The last segment gone.
    std::fs::remove_file(segment(segments - 1)).unwrap();
    refused("last segment removed");
    // Every segment gone.
    for i in 0..segments - 1 {
        std::fs::remove_file(segment(i)).unwrap();
    }
    refused("every segment removed");
    // Asked explicitly, repair starts over (and drops the stale checkpoint).
    let store = LogStore::builder(dir.path()).segment_size(4096).repair(true).open().unwrap();
    assert_eq!(store.stats().next_position, 0);
    assert!(store.stats().truncated_on_open.is_some_and(|b| !b.torn_tail));
    store.close().unwrap();
    assert!(annals_log::verify(dir.path()).unwrap().is_ok());
}

#[tokio::test]
async fn store_stats_come_from_the_index_and_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    // No background fill: it would grow the active segment between the
    // two measurements.
    let open = || LogStore::builder(dir.path()).segment_size(8192).background_fill(false).open().unwrap();
    let store = open();
    for n in 0..60 {
        store.append(&stream(&format!("s-{}", n % 3)), ExpectedVersion::Any, vec![event(n)]).await.unwrap();
    }
    store.delete_stream(&stream("s-1"), ExpectedVersion::Any, DeleteMode::Hard).await.unwrap();
    assert!(store.stats().segments > 1, "the test wants several segments");
    let on_disk = |dir: &Path| -> u64 {
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
    };
    let stats = store.store_stats().await.unwrap();
    let counts = stats.events_by_type.clone().unwrap();
    assert_eq!((counts.get("Even"), counts.get("Odd"), counts.len()), (Some(&30), Some(&30), 2));
    assert_eq!(stats.disk_bytes, Some(on_disk(dir.path())));
    store.close().unwrap();
    drop(store);

    // Reopened from the index checkpoint: the same counts.
    let store = open();
    assert!(store.stats().index_loaded);
    let again = store.store_stats().await.unwrap();
    assert_eq!(again.events_by_type, Some(counts));
    assert_eq!(again.disk_bytes, Some(on_disk(dir.path())));
}

/// A data directory path naming a file is refused with an error that says
/// so, not with the operating system's "File exists".
#[tokio::test]
async fn a_data_path_that_is_a_file_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data");
    std::fs::write(&file, b"not a store").unwrap();
    let err = LogStore::open(&file).unwrap_err();
    assert!(matches!(&err, LogError::Config { reason } if reason.contains("is not a directory")), "{err}");
    // A path below a file, too.
    let err = LogStore::open(file.join("below")).unwrap_err();
    assert!(matches!(&err, LogError::Config { reason } if reason.contains("is not a directory")), "{err}");
    assert_eq!(std::fs::read(&file).unwrap(), b"not a store");
}
