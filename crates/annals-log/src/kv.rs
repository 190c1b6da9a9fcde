//! The side store for snapshots and checkpoints: a small append-only file
//! (`kv.log`) of CRC-framed records, replayed into maps on open and
//! compacted (rewritten with only live entries) at every open. Writes follow
//! the store's durability setting and share its poison flag.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
    time::Instant,
};

use annals_core::{Error, Result, Snapshot, StreamName, Timestamp};
use bytes::Bytes;

use crate::{
    Durability,
    core::Core,
    error::LogError,
    format::{u32_at, u64_at},
    io::{IoFile, read_full},
};

const KV_FILE: &str = "kv.log";
const KV_TMP: &str = "kv.log.tmp";
const PUT_SNAPSHOT: u8 = 1;
const DELETE_SNAPSHOT: u8 = 2;
const PUT_CHECKPOINT: u8 = 3;

#[derive(Default)]
struct State {
    snapshots: HashMap<StreamName, BTreeMap<u64, Snapshot>>,
    checkpoints: HashMap<String, u64>,
}

struct Inner {
    state: State,
    file: Arc<dyn IoFile>,
    end: u64,
    last_sync: Instant,
    /// Records written since the last sync (`Never`), or held in `pending`
    /// (`Interval`).
    unsynced: bool,
    /// Under `Interval`: records not yet written. They reach the file only
    /// at a sync, after the log's own sync, so that no snapshot or
    /// checkpoint can be on disk ahead of the events it counts, not even
    /// by the kernel writing back dirty pages early. `state` already holds
    /// them, so reads see them at once.
    pending: Vec<u8>,
    /// Set by `close`: writes fail with `Closed`, the interval sync thread
    /// ends.
    stop: bool,
}

/// What the store's handles and the interval sync thread share.
struct Shared {
    inner: Mutex<Inner>,
    /// Signalled when records are left unsynced, and on stop.
    cv: Condvar,
}

/// The side store.
pub(crate) struct Kv {
    shared: Arc<Shared>,
    durability: Durability,
    core: Arc<Core>,
    /// Under `Interval(d)`: the thread that syncs unsynced records at most
    /// `d` after the last sync, when no later write does it first.
    syncer: Mutex<Option<JoinHandle<()>>>,
}

fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(9 + body.len());
    let len = (9 + body.len()) as u32;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(kind);
    out.extend_from_slice(body);
    let crc = crc32c::crc32c(out.get(8..).unwrap_or_default());
    if let Some(slot) = out.get_mut(4..8) {
        slot.copy_from_slice(&crc.to_le_bytes());
    }
    out
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u32).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn snapshot_record(s: &Snapshot) -> Vec<u8> {
    let mut body = Vec::with_capacity(32 + s.data.len());
    put_str(&mut body, s.stream.as_str());
    body.extend_from_slice(&s.version.to_le_bytes());
    body.extend_from_slice(&s.schema_version.to_le_bytes());
    body.extend_from_slice(&s.created_at.as_micros().to_le_bytes());
    body.extend_from_slice(&s.data);
    frame(PUT_SNAPSHOT, &body)
}

fn delete_record(stream: &StreamName, version: u64) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, stream.as_str());
    body.extend_from_slice(&version.to_le_bytes());
    frame(DELETE_SNAPSHOT, &body)
}

fn checkpoint_record(name: &str, position: u64) -> Vec<u8> {
    let mut body = Vec::new();
    put_str(&mut body, name);
    body.extend_from_slice(&position.to_le_bytes());
    frame(PUT_CHECKPOINT, &body)
}

/// Applies one record; `None` when it does not parse.
fn apply(state: &mut State, kind: u8, body: &[u8]) -> Option<()> {
    let n = u32_at(body, 0) as usize;
    let name = std::str::from_utf8(body.get(4..4 + n)?).ok()?;
    let rest = body.get(4 + n..)?;
    match kind {
        PUT_SNAPSHOT => {
            let stream = StreamName::any(name).ok()?;
            let version = u64_at(rest, 0);
            let schema_version = u32_at(rest, 8);
            let created_at = Timestamp::from_micros(u64_at(rest, 12) as i64);
            let data = Bytes::copy_from_slice(rest.get(20..)?);
            let snap = Snapshot { stream: stream.clone(), version, schema_version, data, created_at };
            state.snapshots.entry(stream).or_default().insert(version, snap);
        }
        DELETE_SNAPSHOT => {
            let stream = StreamName::any(name).ok()?;
            let version = u64_at(rest, 0);
            if let Some(m) = state.snapshots.get_mut(&stream) {
                m.remove(&version);
            }
        }
        PUT_CHECKPOINT => {
            state.checkpoints.insert(name.to_owned(), u64_at(rest, 0));
        }
        _ => return None,
    }
    Some(())
}

/// The record at `at` if its length and checksum hold.
fn valid_record(bytes: &[u8], at: usize) -> Option<&[u8]> {
    let len = u32_at(bytes.get(at..)?, 0) as usize;
    let rec = bytes.get(at..at.checked_add(len)?)?;
    (len >= 9 && crc32c::crc32c(rec.get(8..)?) == u32_at(rec, 4)).then_some(rec)
}

/// The offset of the first record in `from..until` (and within `bytes`)
/// whose length, checksum and fields hold, if any. Cheap field checks come
/// before the checksum, so the search stays linear in practice.
fn intact_record_in(bytes: &[u8], from: usize, until: usize) -> Option<usize> {
    let until = until.min(bytes.len());
    (from..until).find(|&p| {
        let Some(b) = bytes.get(p..) else { return false };
        let len = u32_at(b, 0) as usize;
        let name = u32_at(b, 9) as usize;
        let plausible = matches!(b.get(8), Some(&(PUT_SNAPSHOT | DELETE_SNAPSHOT | PUT_CHECKPOINT)))
            && name <= usize::from(u16::MAX)
            && len >= 9 + 4 + name + 8
            && len <= b.len();
        plausible
            && valid_record(bytes, p).is_some_and(|rec| {
                apply(
                    &mut State::default(),
                    rec.get(8).copied().unwrap_or(0),
                    rec.get(9..).unwrap_or_default(),
                )
                .is_some()
            })
    })
}

impl Kv {
    pub(crate) fn open(
        core: Arc<Core>,
        dir: &Path,
        durability: Durability,
    ) -> std::result::Result<Self, LogError> {
        let io = &core.io;
        let path = dir.join(KV_FILE);
        let mut state = State::default();
        if io.exists(&path) {
            let file = io.open(&path, false)?;
            let len = usize::try_from(file.len()?)
                .map_err(|_| LogError::Format { reason: "kv.log too large".into() })?;
            let mut bytes = vec![0u8; len];
            let n = read_full(&*file, &mut bytes, 0)?;
            bytes.truncate(n);
            let mut at = 0usize;
            while at + 9 <= bytes.len() {
                let len = u32_at(&bytes, at) as usize;
                if valid_record(&bytes, at).is_some_and(|rec| {
                    apply(&mut state, rec.get(8).copied().unwrap_or(0), rec.get(9..).unwrap_or_default())
                        .is_some()
                }) {
                    at += len;
                    continue;
                }
                let end = at.saturating_add(len.max(9));
                // A bad record whose length field leads to a record that
                // checks: damage in the middle. Lose this one update only
                // (later ones, which supersede most, stay), and say so.
                if valid_record(&bytes, end).is_some() {
                    tracing::error!(
                        offset = at,
                        "annals-log: kv.log record damaged in the middle of the file; skipped it (one snapshot or \
                         checkpoint update lost), kept the records after it"
                    );
                    at = end;
                    continue;
                }
                // Nothing intact anywhere after it: the last thing written,
                // torn by a crash (its sectors land in any order, so even
                // its length field may be missing): dropped below. Anything
                // intact after it means later writes followed it, so it was
                // acknowledged: a damaged length field can claim past the
                // records after it, up to or beyond the end of the file.
                let Some(found) = intact_record_in(&bytes, at + 1, bytes.len()) else { break };
                // Nothing to resume from: refuse rather than compact away
                // every record after it.
                return Err(LogError::KvCorrupt {
                    offset: at as u64,
                    reason: format!(
                        "bad checksum, length or kind, no intact record where it claims to end, and an intact \
                         record at offset {found} after it (not a torn last write)"
                    ),
                });
            }
            if at < bytes.len() && bytes.get(at..).is_some_and(|r| r.iter().any(|&b| b != 0)) {
                tracing::warn!(offset = at, "annals-log: dropped a torn tail of kv.log");
            }
        }
        // Compact: rewrite the live entries, then atomically replace.
        let tmp = dir.join(KV_TMP);
        let file = io.open(&tmp, true)?;
        file.set_len(0)?;
        let mut buf = Vec::new();
        for m in state.snapshots.values() {
            for s in m.values() {
                buf.extend_from_slice(&snapshot_record(s));
            }
        }
        for (name, pos) in &state.checkpoints {
            buf.extend_from_slice(&checkpoint_record(name, *pos));
        }
        if !buf.is_empty() {
            file.write_at(&buf, 0)?;
        }
        file.sync_all()?;
        io.rename(&tmp, &path)?;
        io.sync_dir(dir)?;
        let file = io.open(&path, false)?;
        let inner = Inner {
            state,
            file,
            end: buf.len() as u64,
            last_sync: Instant::now(),
            unsynced: false,
            pending: Vec::new(),
            stop: false,
        };
        let shared = Arc::new(Shared { inner: Mutex::new(inner), cv: Condvar::new() });
        let syncer = match durability {
            Durability::Interval(d) => {
                let (s, c) = (shared.clone(), core.clone());
                Some(
                    std::thread::Builder::new()
                        .name("annals-log-kv-sync".into())
                        .spawn(move || interval_syncs(&s, &c, d))?,
                )
            }
            _ => None,
        };
        Ok(Kv { shared, durability, core, syncer: Mutex::new(syncer) })
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>> {
        self.shared.inner.lock().map_err(|_| Error::Poisoned { reason: "kv lock poisoned".into() })
    }

    /// Stops the interval sync thread and syncs what is unsynced (the
    /// store's clean close: like the log, `Interval` and `Never` writes are
    /// then durable).
    pub(crate) fn close(&self) -> std::result::Result<(), LogError> {
        if let Ok(mut inner) = self.shared.inner.lock() {
            inner.stop = true;
        }
        self.shared.cv.notify_all();
        if let Some(h) = self.syncer.lock().ok().and_then(|mut h| h.take()) {
            let _ = h.join();
        }
        let mut inner =
            self.shared.inner.lock().map_err(|_| LogError::Poisoned { reason: "kv lock poisoned".into() })?;
        if !inner.pending.is_empty() {
            // A poisoned store's log may not hold what was acknowledged:
            // the records would be written ahead of it.
            if let Some(reason) = self.core.poisoned() {
                inner.pending.clear();
                return Err(LogError::Poisoned { reason });
            }
            flush(&mut inner, &self.core).map_err(|reason| LogError::Poisoned { reason })?;
        } else if inner.unsynced {
            inner.file.sync_data()?;
            inner.unsynced = false;
        }
        Ok(())
    }

    fn write(&self, inner: &mut Inner, record: &[u8]) -> Result<()> {
        // Closed: the directory lock is gone, so another store may already
        // have replaced kv.log; a write now would be acknowledged and lost.
        if inner.stop {
            return Err(Error::Closed);
        }
        self.core.check_poison()?;
        if let Durability::Interval(d) = self.durability {
            inner.pending.extend_from_slice(record);
            if inner.last_sync.elapsed() >= d {
                return flush(inner, &self.core).map_err(|reason| Error::Poisoned { reason });
            }
            inner.unsynced = true;
            self.shared.cv.notify_all();
            return Ok(());
        }
        let sync = self.durability == Durability::Always;
        let res = inner
            .file
            .write_at(record, inner.end)
            .and_then(|()| if sync { inner.file.sync_data() } else { Ok(()) });
        match res {
            Ok(()) => {
                inner.end += record.len() as u64;
                if sync {
                    inner.last_sync = Instant::now();
                    inner.unsynced = false;
                } else {
                    inner.unsynced = true;
                    self.shared.cv.notify_all();
                }
                Ok(())
            }
            Err(e) => {
                let reason = format!("kv write failed: {e}");
                self.core.set_poisoned(reason.clone());
                // Cut the partial record so a reopen does not see it.
                let _ = inner.file.set_len(inner.end);
                Err(Error::Poisoned { reason })
            }
        }
    }

    pub(crate) fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        // The record's u32 length must also hold the name and fixed fields.
        if snapshot.data.len() > (u32::MAX as usize) - 4096 {
            return Err(Error::invalid("snapshot data is larger than 4 GiB"));
        }
        let mut inner = self.lock()?;
        self.write(&mut inner, &snapshot_record(&snapshot))?;
        inner.state.snapshots.entry(snapshot.stream.clone()).or_default().insert(snapshot.version, snapshot);
        Ok(())
    }

    pub(crate) fn load_snapshot(
        &self,
        stream: &StreamName,
        at_or_before: Option<u64>,
    ) -> Result<Option<Snapshot>> {
        let inner = self.lock()?;
        Ok(inner
            .state
            .snapshots
            .get(stream)
            .and_then(|m| m.range(..=at_or_before.unwrap_or(u64::MAX)).next_back())
            .map(|(_, s)| s.clone()))
    }

    pub(crate) fn prune_snapshots(&self, stream: &StreamName, keep_last: usize) -> Result<usize> {
        let mut inner = self.lock()?;
        let doomed: Vec<u64> = match inner.state.snapshots.get(stream) {
            Some(m) => m.keys().take(m.len().saturating_sub(keep_last)).copied().collect(),
            None => return Ok(0),
        };
        if doomed.is_empty() {
            return Ok(0);
        }
        let mut buf = Vec::new();
        for v in &doomed {
            buf.extend_from_slice(&delete_record(stream, *v));
        }
        self.write(&mut inner, &buf)?;
        if let Some(m) = inner.state.snapshots.get_mut(stream) {
            for v in &doomed {
                m.remove(v);
            }
        }
        Ok(doomed.len())
    }

    pub(crate) fn load_checkpoint(&self, name: &str) -> Result<Option<u64>> {
        Ok(self.lock()?.state.checkpoints.get(name).copied())
    }

    pub(crate) fn save_checkpoint(&self, name: &str, position: u64) -> Result<()> {
        let mut inner = self.lock()?;
        self.write(&mut inner, &checkpoint_record(name, position))?;
        inner.state.checkpoints.insert(name.to_owned(), position);
        Ok(())
    }
}

impl Drop for Kv {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(error = %e, "annals-log: syncing kv.log at close failed");
        }
    }
}

/// The interval sync thread: syncs records left unsynced by `Interval(d)`
/// writes once `d` has passed since the last sync, so none stays unsynced
/// longer than about `d` (the log's writer does the same for segments).
fn interval_syncs(shared: &Shared, core: &Core, d: std::time::Duration) {
    let mut inner = shared.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    loop {
        if inner.stop {
            return;
        }
        if !inner.unsynced {
            inner = shared.cv.wait(inner).unwrap_or_else(std::sync::PoisonError::into_inner);
            continue;
        }
        let left = d.saturating_sub(inner.last_sync.elapsed());
        if !left.is_zero() {
            inner = shared.cv.wait_timeout(inner, left).unwrap_or_else(std::sync::PoisonError::into_inner).0;
            continue;
        }
        if core.poisoned().is_some() {
            // Written ahead of a log that may not hold what was
            // acknowledged; dropped (writes fail from now on anyway).
            inner.pending.clear();
            inner.unsynced = false;
            continue;
        }
        // Failures poison the store (in `flush`).
        let _ = flush(&mut inner, core);
    }
}

/// Under `Interval`: syncs the log, then writes and syncs the pending
/// records. On failure the store is poisoned, the partial write is cut off
/// and the reason returned.
fn flush(inner: &mut Inner, core: &Core) -> std::result::Result<(), String> {
    let res =
        core.sync_log().map_err(|e| format!("log fdatasync before kv.log sync failed: {e}")).and_then(|()| {
            inner
                .file
                .write_at(&inner.pending, inner.end)
                .and_then(|()| inner.file.sync_data())
                .map_err(|e| format!("kv write failed: {e}"))
        });
    inner.unsynced = false;
    match res {
        Ok(()) => {
            inner.end += inner.pending.len() as u64;
            inner.pending.clear();
            inner.last_sync = Instant::now();
            Ok(())
        }
        Err(reason) => {
            inner.pending.clear();
            core.set_poisoned(reason.clone());
            let _ = inner.file.set_len(inner.end);
            Err(reason)
        }
    }
}
