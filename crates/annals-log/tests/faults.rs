//! Fault injection: fail every write and every fsync an append workload
//! performs, one at a time, and check that the store poisons itself, keeps
//! serving reads, and after a reopen (with or without a crash that drops
//! unsynced bytes) holds exactly the acknowledged events.

use std::{path::Path, sync::Arc};

use annals_core::{AllReader, Appender, Error, EventData, ExpectedVersion, ReadAll, StreamName, Uuid};
use annals_log::{LogStore, io::FaultIo};
use serde_json::json;

const DIR: &str = "/faulty";

fn open(io: &FaultIo) -> LogStore {
    open_with(io, false)
}

/// Without the zero-fill thread the I/O sequence is deterministic, so every
/// point can be numbered; with it, failures may also hit the filler.
fn open_with(io: &FaultIo, background_fill: bool) -> LogStore {
    LogStore::builder(Path::new(DIR))
        .io(Arc::new(io.clone()))
        .segment_size(if background_fill { 8 << 20 } else { 4096 })
        .background_fill(background_fill)
        .open()
        .unwrap()
}

fn batch(i: u64) -> Vec<EventData> {
    (0..1 + i % 3)
        .map(|j| EventData::json("E", &json!({ "i": i, "j": j, "pad": "p".repeat(60) })).unwrap())
        .collect()
}

/// Appends until the first failure; returns the acknowledged event ids in
/// position order and whether a failure happened.
async fn workload(store: &LogStore, base: u64, rounds: u64) -> (Vec<Uuid>, bool) {
    let mut acked = Vec::new();
    for i in 0..rounds {
        let events = batch(i);
        let ids: Vec<Uuid> = events.iter().map(|e| e.id).collect();
        let s = StreamName::new(format!("w-{}", i % 4)).unwrap();
        match store.append(&s, ExpectedVersion::Any, events).await {
            Ok(r) => {
                assert_eq!(r.position + 1, base + (acked.len() + ids.len()) as u64);
                acked.extend(ids);
            }
            Err(e) => {
                assert!(matches!(e, Error::Poisoned { .. } | Error::Io(_)), "{e:?}");
                return (acked, true);
            }
        }
    }
    (acked, false)
}

async fn ids_in(store: &LogStore) -> Vec<Uuid> {
    let all = store.read_all(ReadAll::forward(usize::MAX)).await.unwrap().events;
    assert!(all.iter().enumerate().all(|(i, e)| e.position == i as u64), "positions gapless");
    all.into_iter().map(|e| e.id).collect()
}

async fn check_point(fail_sync: bool, k: u64, rounds: u64) -> bool {
    check_point_with(fail_sync, k, rounds, false).await
}

async fn check_point_with(fail_sync: bool, k: u64, rounds: u64, background_fill: bool) -> bool {
    let io = FaultIo::new();
    let store = open_with(&io, background_fill);
    store.health().await.unwrap();
    let (mut acked, _) = workload(&store, 0, 3).await;
    if fail_sync {
        io.fail_nth_sync(k);
    } else {
        io.fail_nth_write(k);
    }
    let (more, failed) = workload(&store, acked.len() as u64, rounds).await;
    acked.extend(more);
    if !failed {
        return false;
    }
    // Poisoned from now on; reads still work and show only acknowledged events.
    let err =
        store.append(&StreamName::new("late-1").unwrap(), ExpectedVersion::Any, batch(0)).await.unwrap_err();
    assert!(matches!(err, Error::Poisoned { .. }), "{err:?}");
    // Readiness probes see it without writing.
    let health = store.health().await.unwrap_err();
    assert!(matches!(health, Error::Poisoned { .. }), "{health:?}");
    assert_eq!(ids_in(&store).await, acked, "reads after poison (k = {k}, sync = {fail_sync})");
    let crashed = io.crash();
    drop(store);
    io.heal();
    // Reopen over the bytes the process left behind ...
    let store = open_with(&io, background_fill);
    assert_eq!(ids_in(&store).await, acked, "reopen after failure (k = {k}, sync = {fail_sync})");
    drop(store);
    // ... and over only the bytes that were synced before a crash.
    let store = open_with(&crashed, background_fill);
    assert_eq!(ids_in(&store).await, acked, "reopen after crash (k = {k}, sync = {fail_sync})");
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_and_fsync_failure_keeps_exactly_the_acknowledged_events() {
    const ROUNDS: u64 = 40;
    // Count the I/O points of the workload without faults.
    let io = FaultIo::new();
    let store = open(&io);
    let (first, _) = workload(&store, 0, 3).await;
    let (w0, s0) = (io.writes(), io.syncs());
    workload(&store, first.len() as u64, ROUNDS).await;
    let (writes, syncs) = (io.writes() - w0, io.syncs() - s0);
    drop(store);
    assert!(writes > ROUNDS && syncs >= ROUNDS, "writes {writes}, syncs {syncs}");
    let mut injected = 0;
    for k in 1..=writes {
        injected += u32::from(check_point(false, k, ROUNDS).await);
    }
    for k in 1..=syncs {
        injected += u32::from(check_point(true, k, ROUNDS).await);
    }
    assert_eq!(injected as u64, writes + syncs, "every injected failure must surface to an append");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_with_the_zero_fill_thread_also_poison_and_lose_nothing() {
    for k in 1..=8 {
        // The filler writes too, so the k-th operation may be either thread's;
        // either way the store must end up poisoned with only acked events.
        assert!(check_point_with(false, k, 200, true).await, "write failure {k} never surfaced");
        assert!(check_point_with(true, k, 200, true).await, "sync failure {k} never surfaced");
    }
}

/// The data directory removed under an open store (an operator's `rm -rf`
/// on the real file system): the open segment still takes writes and
/// syncs, but its bytes vanish at close, so no append may be acknowledged
/// and health must say so before the first write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_reports_a_removed_data_directory_and_poisons_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let store = LogStore::open(&dir).unwrap();
    let s = StreamName::new("gone-1").unwrap();
    store.append(&s, ExpectedVersion::Any, batch(0)).await.unwrap();
    store.health().await.unwrap();

    std::fs::remove_dir_all(&dir).unwrap();
    let health = store.health().await;
    assert!(matches!(&health, Err(Error::Poisoned { reason }) if reason.contains("deleted")), "{health:?}");
    let append = store.append(&s, ExpectedVersion::Any, batch(1)).await;
    assert!(matches!(append, Err(Error::Poisoned { .. })), "{append:?}");
    // What was acknowledged before is still readable from the open file.
    let all = store.read_all(ReadAll::forward(100)).await.unwrap();
    assert_eq!(all.events.len(), batch(0).len());
}

/// Without a health check in between, the writer notices on its own
/// within its check interval (100 ms) and refuses every write from then on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_after_the_directory_is_removed_are_refused_within_the_check_interval() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("log");
    let store = LogStore::open(&dir).unwrap();
    let s = StreamName::new("gone-2").unwrap();
    store.append(&s, ExpectedVersion::Any, batch(0)).await.unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let removed = std::time::Instant::now();
    let refused = loop {
        match store.append(&s, ExpectedVersion::Any, batch(1)).await {
            Ok(_) => {
                assert!(removed.elapsed() < std::time::Duration::from_secs(2), "still acknowledged after 2 s")
            }
            Err(e) => break e,
        }
    };
    assert!(matches!(&refused, Error::Poisoned { reason } if reason.contains("deleted")), "{refused:?}");
    let later = store.append(&s, ExpectedVersion::Any, batch(2)).await;
    assert!(matches!(later, Err(Error::Poisoned { .. })), "{later:?}");
}

/// The zero-fill thread fails (here its fsync) while the writer has a
/// group written but not yet acknowledged. The store is poisoned from that
/// moment, so the group must not be acknowledged: on Linux an fsync error
/// is reported once per open file, so the writer's own `fdatasync` of the
/// same file may well succeed although the group's pages were dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_fill_failure_while_a_group_is_written_fails_that_group() {
    use std::{
        sync::atomic::{AtomicBool, Ordering},
        time::{Duration, Instant},
    };
    let io = FaultIo::new();
    let store = open_with(&io, true);
    // The filler's first step (1 MiB ahead of the header) ends with a sync.
    let seg0 = Path::new(DIR).join(format!("{:020}.seg", 0));
    let started = Instant::now();
    while io.read_file(&seg0).map_or(0, |b| b.len()) < (1 << 20) + 72 || io.syncs() < 3 {
        assert!(started.elapsed() < Duration::from_secs(10), "the filler never filled");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let filler_failed = Arc::new(AtomicBool::new(false));
    let writer_waits = Arc::new(AtomicBool::new(true));
    let (failed, waits) = (filler_failed.clone(), writer_waits.clone());
    io.before_every_sync(move |io| match std::thread::current().name() {
        // The append's reservation wakes the filler for its next step:
        // fail the sync that ends it.
        Some("annals-log-fill") if !failed.swap(true, Ordering::SeqCst) => io.fail_nth_sync(1),
        // The group's sync waits until the filler has failed and had
        // time to say so.
        Some("annals-log-writer") if waits.swap(false, Ordering::SeqCst) => {
            let started = Instant::now();
            while !failed.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(10) {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        _ => {}
    });
    let r = store.append(&StreamName::new("fill-fail-1").unwrap(), ExpectedVersion::Any, batch(0)).await;
    assert!(filler_failed.load(Ordering::SeqCst), "the filler did not run during the append");
    assert!(matches!(r, Err(Error::Poisoned { .. })), "acknowledged after the store was poisoned: {r:?}");
    drop(store);
    io.heal();
    let store = open_with(&io, true);
    assert_eq!(ids_in(&store).await, Vec::<Uuid>::new(), "the unacknowledged group was kept");
}

/// A file system that reports a writeback error the way Linux does since
/// 4.13 (`errseq_t`): once to every open file of the inode that was open
/// when it happened, at its next fsync. `inject` marks an error on a path.
#[derive(Clone, Default)]
struct ErrSeqIo {
    inner: FaultIo,
    errors: Arc<std::sync::Mutex<std::collections::HashMap<std::path::PathBuf, u64>>>,
}

impl ErrSeqIo {
    fn errors_of(&self, path: &Path) -> u64 {
        self.errors.lock().unwrap().get(path).copied().unwrap_or(0)
    }
    fn inject(&self, path: &Path) {
        *self.errors.lock().unwrap().entry(path.to_path_buf()).or_default() += 1;
    }
}

/// Runs before (`false`) and after (`true`) each sync's error check.
type SyncHook = Arc<dyn Fn(&ErrSeqIo, &Path, bool) + Send + Sync>;

/// One open file of [`ErrSeqIo`]; `hook` runs on every sync.
struct ErrSeqFile {
    io: ErrSeqIo,
    path: std::path::PathBuf,
    inner: Arc<dyn annals_log::io::IoFile>,
    seen: std::sync::atomic::AtomicU64,
    hook: SyncHook,
}

impl ErrSeqFile {
    fn sync(&self, all: bool) -> std::io::Result<()> {
        (self.hook)(&self.io, &self.path, false);
        let errors = self.io.errors_of(&self.path);
        let failed = self.seen.swap(errors, std::sync::atomic::Ordering::SeqCst) < errors;
        (self.hook)(&self.io, &self.path, true);
        if failed {
            return Err(std::io::Error::other("writeback error (EIO)"));
        }
        if all { self.inner.sync_all() } else { self.inner.sync_data() }
    }
}

impl annals_log::io::IoFile for ErrSeqFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn sync_data(&self) -> std::io::Result<()> {
        self.sync(false)
    }
    fn sync_all(&self) -> std::io::Result<()> {
        self.sync(true)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
}

/// [`ErrSeqIo`] with a hook run on every sync.
#[derive(Clone)]
struct HookedErrSeqIo {
    io: ErrSeqIo,
    hook: SyncHook,
}

impl annals_log::io::Io for HookedErrSeqIo {
    fn open(&self, path: &Path, create: bool) -> std::io::Result<Arc<dyn annals_log::io::IoFile>> {
        Ok(Arc::new(ErrSeqFile {
            io: self.io.clone(),
            path: path.to_path_buf(),
            inner: self.io.inner.open(path, create)?,
            seen: self.io.errors_of(path).into(),
            hook: self.hook.clone(),
        }))
    }
    fn list(&self, dir: &Path) -> std::io::Result<Vec<String>> {
        self.io.inner.list(dir)
    }
    fn exists(&self, path: &Path) -> bool {
        self.io.inner.exists(path)
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        self.io.inner.remove(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.io.inner.rename(from, to)
    }
    fn create_dir_all(&self, dir: &Path) -> std::io::Result<()> {
        self.io.inner.create_dir_all(dir)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        self.io.inner.sync_dir(dir)
    }
    fn lock(&self, dir: &Path) -> Result<Box<dyn Send + Sync>, annals_log::LogError> {
        self.io.inner.lock(dir)
    }
}

/// The kernel side of the failure above: a writeback error on the active
/// segment while a group is in flight, which the filler's fsync happens to
/// see first and which it has not yet reported when the writer's sync
/// returns. The writer must see the error through its own sync, not only
/// through the filler's report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writeback_error_seen_first_by_the_filler_still_fails_the_group() {
    use std::sync::atomic::{AtomicU8, Ordering};
    use std::time::{Duration, Instant};
    let wait_for = |cond: &dyn Fn() -> bool| {
        let started = Instant::now();
        while !cond() && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    // 0: idle, 1: armed, 2: the filler's sync saw the error, 3: the
    // writer's group sync saw what it sees.
    let stage = Arc::new(AtomicU8::new(0));
    let s = stage.clone();
    let hook: SyncHook = Arc::new(move |io, path, checked| match std::thread::current().name() {
        Some("annals-log-fill") if !checked && s.load(Ordering::SeqCst) == 1 => io.inject(path),
        Some("annals-log-fill")
            if checked && s.compare_exchange(1, 2, Ordering::SeqCst, Ordering::SeqCst).is_ok() =>
        {
            // It reports the error only after the writer's sync returned.
            wait_for(&|| s.load(Ordering::SeqCst) == 3);
            std::thread::sleep(Duration::from_millis(50));
        }
        Some("annals-log-writer") if !checked && matches!(s.load(Ordering::SeqCst), 1 | 2) => {
            wait_for(&|| s.load(Ordering::SeqCst) == 2);
        }
        Some("annals-log-writer") if checked && s.load(Ordering::SeqCst) == 2 => s.store(3, Ordering::SeqCst),
        _ => {}
    });
    let io = HookedErrSeqIo { io: ErrSeqIo::default(), hook };
    let open = || {
        LogStore::builder(Path::new(DIR))
            .io(Arc::new(io.clone()))
            .segment_size(8 << 20)
            .background_fill(true)
            .open()
            .unwrap()
    };
    let store = open();
    let seg0 = Path::new(DIR).join(format!("{:020}.seg", 0));
    let fs = io.io.inner.clone();
    wait_for(&|| fs.read_file(&seg0).map_or(0, |b| b.len()) >= (1 << 20) + 72 && fs.syncs() >= 3);
    tokio::time::sleep(Duration::from_millis(50)).await;
    stage.store(1, Ordering::SeqCst);
    let r = store.append(&StreamName::new("errseq-1").unwrap(), ExpectedVersion::Any, batch(0)).await;
    assert_eq!(stage.load(Ordering::SeqCst), 3, "the filler and the group did not meet");
    assert!(matches!(r, Err(Error::Poisoned { .. })), "acknowledged past a writeback error: {r:?}");
}

/// One append whose events each nearly fill a 4 KiB segment, so its group
/// rolls over twice. Every write and every sync it performs fails in turn:
/// the store must reopen (over what the process left, and after a crash)
/// holding exactly the acknowledged events. A failure while creating the
/// second new segment used to leave that file behind after the first one
/// was removed, and every later open refused the directory (a missing
/// segment), `repair` included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_in_a_group_spanning_two_rollovers_leaves_no_segment_behind() {
    let spanning = || {
        (0..3).map(|j| EventData::json("Big", &json!({ "j": j, "pad": "b".repeat(3000) })).unwrap()).collect()
    };
    let s = StreamName::new("span-1").unwrap();
    // Count the I/O points of the spanning append.
    let io = FaultIo::new();
    let store = open(&io);
    workload(&store, 0, 3).await;
    let (w0, s0) = (io.writes(), io.syncs());
    store.append(&s, ExpectedVersion::Any, spanning()).await.unwrap();
    let (writes, syncs) = (io.writes() - w0, io.syncs() - s0);
    assert!(store.stats().segments >= 3, "the append did not roll over twice");
    drop(store);
    for (fail_sync, k) in (1..=writes).map(|k| (false, k)).chain((1..=syncs).map(|k| (true, k))) {
        let io = FaultIo::new();
        let store = open(&io);
        let (acked, _) = workload(&store, 0, 3).await;
        if fail_sync {
            io.fail_nth_sync(k);
        } else {
            io.fail_nth_write(k);
        }
        let r = store.append(&s, ExpectedVersion::Any, spanning()).await;
        assert!(matches!(r, Err(Error::Poisoned { .. })), "k = {k}, sync = {fail_sync}: {r:?}");
        let crashed = io.crash();
        drop(store);
        io.heal();
        for (what, fs) in [("reopen", &io), ("crash", &crashed)] {
            let store = LogStore::builder(Path::new(DIR))
                .io(Arc::new(fs.clone()))
                .segment_size(4096)
                .background_fill(false)
                .open()
                .unwrap_or_else(|e| panic!("{what} after failure k = {k}, sync = {fail_sync}: {e}"));
            assert_eq!(ids_in(&store).await, acked, "{what} after failure k = {k}, sync = {fail_sync}");
        }
    }
}
