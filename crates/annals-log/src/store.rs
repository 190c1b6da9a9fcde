//! `LogStore`: the handle, its builder, opening, and the core traits.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, mpsc},
    thread::JoinHandle,
};

use annals_core::{
    AllReader, AllSlice, AppendResult, Appender, CheckpointStore, DeleteMode, Error, EventStream,
    ExpectedVersion, Limits, ListStreams, ReadAll, ReadStream, RecordedEvent, Result, Snapshot,
    SnapshotStore, StoreStats, StreamAppend, StreamDeleter, StreamInfo, StreamName, StreamReader, Subscriber,
    SubscriptionRequest, Uuid, async_trait, subscription, validate_checkpoint_name, validate_stored_number,
};
use tokio::sync::{oneshot, watch};

use crate::{
    Durability,
    core::{Core, segment_file_name},
    error::LogError,
    format::{
        self, KIND_EVENT, KIND_SOFT_DELETE, MAX_OFFSET, RawRecord, SEGMENT_HEADER_LEN, SegmentHeader,
        pack_loc,
    },
    index::{self, Index, LogTail},
    io::{Io, RealIo},
    kv::Kv,
    recover::{self, BadRecord, GENESIS, Mode, Scan, Start},
    writer::{Request, Writer, WriterConfig},
};

/// Default segment size: 256 MiB.
pub const DEFAULT_SEGMENT_SIZE: u64 = 256 << 20;
/// Default number of events between periodic index checkpoints.
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 5_000_000;
/// Smallest accepted segment size.
pub const MIN_SEGMENT_SIZE: u64 = 4096;

/// Configures and opens a [`LogStore`].
#[must_use]
pub struct LogStoreBuilder {
    dir: PathBuf,
    durability: Durability,
    segment_size: u64,
    limits: Limits,
    repair: bool,
    verify_on_open: bool,
    checkpoint_every: u64,
    background_fill: bool,
    io: Arc<dyn Io>,
}

impl LogStoreBuilder {
    /// When appends are acknowledged (default [`Durability::Always`]).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// Nominal segment size in bytes (default 256 MiB, minimum 4 KiB). A
    /// record larger than a segment gets a segment of its own.
    pub fn segment_size(mut self, bytes: u64) -> Self {
        self.segment_size = bytes;
        self
    }

    /// Append limits (default [`Limits::default`]).
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Truncate the log at the first corrupt record instead of refusing to
    /// open. Everything from that record on is lost; the truncation is
    /// logged. Implies a full walk of the log.
    pub fn repair(mut self, repair: bool) -> Self {
        self.repair = repair;
        self
    }

    /// Walk and check every record on open instead of trusting the index
    /// checkpoint for the part of the log it covers (slower; finds
    /// corruption anywhere before serving).
    pub fn verify_on_open(mut self, verify: bool) -> Self {
        self.verify_on_open = verify;
        self
    }

    /// Writes the index checkpoint after every `events` new events (default
    /// 5,000,000; 0 = only on clean close), bounding what a crash makes the
    /// next open replay. Appends wait while it is written.
    pub fn checkpoint_every(mut self, events: u64) -> Self {
        self.checkpoint_every = events;
        self
    }

    /// Zero-fill segments ahead of the write head on a helper thread
    /// (default on): appends then overwrite allocated blocks and `fdatasync`
    /// has no size change to flush. Off, segment files simply grow.
    pub fn background_fill(mut self, on: bool) -> Self {
        self.background_fill = on;
        self
    }

    /// Replaces the file system (tests use [`crate::io::FaultIo`]).
    pub fn io(mut self, io: Arc<dyn Io>) -> Self {
        self.io = io;
        self
    }

    /// Opens (or creates) the store. Blocking: it takes the directory lock,
    /// loads the index checkpoint, walks the log tail it does not cover,
    /// truncates a torn tail, and starts the writer thread. From async code
    /// with a large store, call it inside `spawn_blocking`.
    pub fn open(self) -> std::result::Result<LogStore, LogError> {
        if !(MIN_SEGMENT_SIZE..=MAX_OFFSET).contains(&self.segment_size) {
            return Err(LogError::Config {
                reason: format!(
                    "segment size {} must be between {MIN_SEGMENT_SIZE} and {MAX_OFFSET}",
                    self.segment_size
                ),
            });
        }
        if let Durability::Interval(d) = self.durability
            && d.is_zero()
        {
            return Err(LogError::Config { reason: "Durability::Interval needs a non-zero duration".into() });
        }
        let io = self.io;
        let dir = self.dir;
        io.create_dir_all(&dir).map_err(|e| match e.kind() {
            // What create_dir_all says when a file holds the name.
            std::io::ErrorKind::AlreadyExists | std::io::ErrorKind::NotADirectory => {
                LogError::Config { reason: format!("{} exists and is not a directory", dir.display()) }
            }
            _ => e.into(),
        })?;
        let lock = io.lock(&dir)?;
        let mode = Mode::Open { repair: self.repair };
        let use_index = !(self.repair || self.verify_on_open);
        let (idx, scan, index_loaded, applied) = recover_index(&*io, &dir, use_index, mode)?;
        let mut files = scan.files;
        let mut tail = idx.tail;
        let mut filled = scan.last_len;
        if files.is_empty() {
            let header = SegmentHeader::new(0, 0, GENESIS);
            let file = io.open(&dir.join(segment_file_name(0)), true)?;
            file.set_len(0)?;
            file.write_at(&header.encode(), 0)?;
            file.sync_all()?;
            io.sync_dir(&dir)?;
            files.push(file);
            tail = LogTail { end: SEGMENT_HEADER_LEN as u64, ..LogTail::default() };
            filled = SEGMENT_HEADER_LEN as u64;
        }
        let active = files.last().cloned().ok_or(LogError::Closed)?;
        let stats = OpenStats { replayed: applied, index_loaded, truncated: scan.truncated };
        let mut idx = idx;
        idx.tail = tail;
        let next = idx.next_position();
        let core = Arc::new(Core::new(&dir, io, self.limits, idx, files));
        let kv = Arc::new(Kv::open(core.clone(), &dir, self.durability)?);
        let (head_tx, head_rx) = watch::channel(next);
        let live_tail: Arc<subscription::Tail> = Arc::default();
        let writer = Writer::new(
            core.clone(),
            WriterConfig {
                durability: self.durability,
                segment_size: self.segment_size,
                checkpoint_every: self.checkpoint_every,
                background_fill: self.background_fill,
                // Appends go to segments of this build's format version only,
                // so every group the store writes can be told whole or torn.
                roll_first: recover::read_header(&*core.io, &dir, tail.segment)
                    .is_some_and(|h| !h.marks_groups()),
            },
            tail,
            active,
            filled,
            head_tx,
            live_tail.clone(),
            lock,
        );
        let (tx, rx) = mpsc::channel();
        let handle =
            std::thread::Builder::new().name("annals-log-writer".into()).spawn(move || writer.run(rx))?;
        Ok(LogStore {
            shared: Arc::new(Shared {
                core,
                kv,
                tx: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(handle)),
                head: head_rx,
                stats,
                dir,
                leases: annals_core::LocalLeases::new(),
                tail: live_tail,
            }),
        })
    }
}

/// Rebuilds the index from the log (or loads the checkpoint and replays the
/// tail). Shared by open and `rebuild_indexes`.
pub(crate) fn recover_index(
    io: &dyn Io,
    dir: &Path,
    use_index: bool,
    mode: Mode,
) -> std::result::Result<(Index, Scan, bool, u64), LogError> {
    let mut loaded = None;
    // A checkpoint only ever covers synced records, so even one that no
    // longer matches the log says where damage cannot be a torn tail.
    let mut durable = (0, 0);
    // Even when not used (full walks), a valid checkpoint bounds the torn-tail rule.
    match index::load(io, dir) {
        Ok(Some(i)) if use_index && recover::tail_matches(io, dir, &i.tail) => loaded = Some(i),
        Ok(Some(i)) => {
            durable = (i.tail.segment, i.tail.end);
            if use_index {
                tracing::warn!("annals-log: index checkpoint does not match the log; rebuilding");
            }
        }
        Ok(None) => {}
        Err(reason) => tracing::warn!(%reason, "annals-log: index checkpoint unusable; rebuilding"),
    }
    let index_loaded = loaded.is_some();
    let mut idx = loaded.unwrap_or_default();
    let checkpoint = idx.tail;
    // With a checkpoint, the walk still starts at the head of the segment the
    // checkpoint ends in: the most recent records are re-checked (CRC, hash
    // chain) on every open, and only those past the checkpoint are applied.
    let start = if index_loaded {
        match recover::read_header(io, dir, checkpoint.segment) {
            Some(h) => Start {
                tail: LogTail {
                    segment: checkpoint.segment,
                    end: 0,
                    next_position: h.first_position,
                    last_hash: h.prev_hash,
                    last_record: None,
                    last_ts: checkpoint.last_ts,
                },
                from_header: true,
                durable: (checkpoint.segment, checkpoint.end),
            },
            None => {
                Start { tail: checkpoint, from_header: false, durable: (checkpoint.segment, checkpoint.end) }
            }
        }
    } else {
        Start { durable, ..Start::beginning() }
    };
    let mut applied = 0u64;
    let scan = recover::scan(io, dir, start, mode, &mut |seg, off, raw| {
        if index_loaded && (seg, off) < (checkpoint.segment, checkpoint.end) {
            return Ok(());
        }
        applied += 1;
        apply_raw(&mut idx, seg, off, raw)
    })?;
    if scan.reapply && scan.truncated.is_some() {
        // `repair` cut a group some of whose records were already applied:
        // build the index again from what is left of the log.
        let (idx, again, index_loaded, applied) = recover_index(io, dir, false, mode)?;
        return Ok((idx, Scan { truncated: scan.truncated, ..again }, index_loaded, applied));
    }
    idx.tail = scan.tail;
    Ok((idx, scan, index_loaded, applied))
}

pub(crate) fn apply_raw(
    idx: &mut Index,
    seg: u64,
    off: u64,
    raw: &RawRecord<'_>,
) -> std::result::Result<(), String> {
    let stream = StreamName::any(raw.stream).map_err(|e| e.to_string())?;
    match raw.kind {
        KIND_EVENT => idx.apply_event(
            &stream,
            raw.version,
            raw.position,
            pack_loc(seg, off),
            raw.event_type,
            raw.correlation,
            Uuid::from_bytes(raw.id),
        ),
        KIND_SOFT_DELETE => idx.apply_delete(&stream, false, raw.version),
        _ => idx.apply_delete(&stream, true, 0),
    }
}

struct OpenStats {
    replayed: u64,
    index_loaded: bool,
    truncated: Option<BadRecord>,
}

/// Figures about an open store.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct LogStats {
    /// Records walked while opening (only the tail the index checkpoint did
    /// not cover, when it was usable).
    pub replayed_on_open: u64,
    /// Whether the index checkpoint was loaded on open.
    pub index_loaded: bool,
    /// The torn tail or corrupt record truncated on open, if any.
    pub truncated_on_open: Option<BadRecord>,
    /// Segment files in use.
    pub segments: usize,
    /// Next global position.
    pub next_position: u64,
}

struct Shared {
    core: Arc<Core>,
    kv: Arc<Kv>,
    tx: Mutex<Option<mpsc::Sender<Request>>>,
    writer: Mutex<Option<JoinHandle<std::result::Result<(), LogError>>>>,
    head: watch::Receiver<u64>,
    stats: OpenStats,
    dir: PathBuf,
    /// One process holds the directory lock, so local leases are global.
    leases: annals_core::LocalLeases,
    /// Recent events read once for all live `$all` subscriptions.
    tail: Arc<subscription::Tail>,
}

impl Shared {
    fn close(&self) -> std::result::Result<(), LogError> {
        // kv.log first, while the writer still holds the directory lock: its
        // last records are written now (after a log sync), and a store
        // opened by someone else once the lock is released must find them.
        let kv = self.kv.close();
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let handle = self.writer.lock().ok().and_then(|mut h| h.take());
        let log = match handle {
            Some(h) => h
                .join()
                .unwrap_or_else(|_| Err(LogError::Poisoned { reason: "writer thread panicked".into() })),
            None => Ok(()),
        };
        log.and(kv)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(error = %e, "annals-log: closing the store did not checkpoint the index");
        }
    }
}

/// The embedded, durable event store: a segmented, checksummed,
/// hash-chained log with group commit and derived indexes.
///
/// Cheap to clone (a handle over shared state). The store closes when the
/// last handle drops (or on [`LogStore::close`]): the writer syncs, writes
/// the index checkpoint and releases the directory lock. Subscriptions keep
/// only the read side alive and end with `Closed` when the store closes.
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore").field("dir", &self.shared.dir).finish_non_exhaustive()
    }
}

impl LogStore {
    /// A builder for the store in `dir` (created if missing).
    pub fn builder(dir: impl AsRef<Path>) -> LogStoreBuilder {
        LogStoreBuilder {
            dir: dir.as_ref().to_path_buf(),
            durability: Durability::Always,
            segment_size: DEFAULT_SEGMENT_SIZE,
            limits: Limits::default(),
            repair: false,
            verify_on_open: false,
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
            background_fill: true,
            io: Arc::new(RealIo),
        }
    }

    /// Opens `dir` with default settings.
    pub fn open(dir: impl AsRef<Path>) -> std::result::Result<LogStore, LogError> {
        Self::builder(dir).open()
    }

    /// Stops the writer, syncs, checkpoints the index and releases the lock.
    /// Every handle sees the store closed afterwards (writes fail with
    /// `Closed`; reads keep working). Blocking.
    pub fn close(&self) -> std::result::Result<(), LogError> {
        self.shared.close()
    }

    /// Figures about the store.
    pub fn stats(&self) -> LogStats {
        LogStats {
            replayed_on_open: self.shared.stats.replayed,
            index_loaded: self.shared.stats.index_loaded,
            truncated_on_open: self.shared.stats.truncated.clone(),
            segments: self.shared.core.segment_count(),
            next_position: *self.shared.head.borrow(),
        }
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    fn sender(&self) -> Result<mpsc::Sender<Request>> {
        self.shared.tx.lock().ok().and_then(|t| t.clone()).ok_or(Error::Closed)
    }

    async fn append_parts(&self, parts: Vec<StreamAppend>) -> Result<Vec<AppendResult>> {
        self.shared.core.limits.check_parts(&parts)?;
        check_sizes(&parts)?;
        self.shared.core.check_poison()?;
        let (reply, rx) = oneshot::channel();
        self.sender()?.send(Request::Append { parts, reply }).map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }
}

/// Rejects events whose fields cannot be framed (only reachable with limits
/// raised far beyond the defaults).
fn check_sizes(parts: &[StreamAppend]) -> Result<()> {
    for e in parts.iter().flat_map(|p| p.events.iter()) {
        let total = format::MIN_RECORD_LEN + 2 * 256 + e.metadata.len() * 2 + e.data.len();
        if u32::try_from(total).is_err() {
            return Err(Error::invalid(format!("event {} is too large for the log format", e.id)));
        }
    }
    Ok(())
}

#[async_trait]
impl Appender for LogStore {
    async fn append_multi(&self, parts: Vec<StreamAppend>) -> Result<Vec<AppendResult>> {
        self.append_parts(parts).await
    }

    /// Unhealthy once poisoned (a write or fsync failed) or closed.
    /// Unhealthy when poisoned, closed, or when the active segment has been
    /// deleted while open (then nothing more can be written safely, so the
    /// store is poisoned right away rather than at the next write).
    async fn health(&self) -> Result<()> {
        let core = &self.shared.core;
        core.check_poison()?;
        if let Some(last) = core.segment_count().checked_sub(1)
            && core.segment(last as u64)?.is_unlinked().unwrap_or(false)
        {
            core.set_poisoned(format!(
                "the active segment was deleted while the store was open (was the data directory {} removed?)",
                core.dir.display()
            ));
            core.check_poison()?;
        }
        self.sender().map(drop)
    }
}

#[async_trait]
impl StreamReader for LogStore {
    async fn read_stream(&self, stream: &StreamName, request: ReadStream) -> Result<Vec<RecordedEvent>> {
        self.shared.core.read_stream(stream, request).await
    }

    async fn stream_info(&self, stream: &StreamName) -> Result<StreamInfo> {
        self.shared.core.stream_info(stream).await
    }
}

#[async_trait]
impl AllReader for LogStore {
    async fn read_all(&self, request: ReadAll) -> Result<AllSlice> {
        self.shared.core.read_all(request).await
    }

    async fn next_position(&self) -> Result<u64> {
        self.shared.core.next_position().await
    }

    /// From the in-memory stream index: no event is read.
    async fn list_streams(&self, request: ListStreams) -> Result<Vec<StreamInfo>> {
        request.validate()?;
        let idx = self.shared.core.index()?;
        let by_name = |a: &(&StreamName, _), b: &(&StreamName, _)| a.0.as_str().cmp(b.0.as_str());
        let mut found: Vec<(&StreamName, &index::StreamEntry)> = idx
            .streams
            .iter()
            .filter(|(name, e)| e.state.last_version.is_some() && request.matches(name.as_str()))
            .collect();
        // Only the page is sorted: select its names first.
        if found.len() > request.limit {
            found.select_nth_unstable_by(request.limit, by_name);
            found.truncate(request.limit);
        }
        found.sort_unstable_by(by_name);
        Ok(found.into_iter().map(|(name, e)| e.state.info(name)).collect())
    }

    /// Counts by type from the in-memory type index (every event ever
    /// written, as `$all` holds them: deletes only add records), and the
    /// sizes of the files in the directory (segments with their
    /// pre-allocated tail, index checkpoint, side store, lock file).
    async fn store_stats(&self) -> Result<StoreStats> {
        let counts = {
            let idx = self.shared.core.index()?;
            idx.types.iter().map(|(t, positions)| (t.clone(), positions.len() as u64)).collect()
        };
        let core = self.shared.core.clone();
        let disk_bytes = blocking(move || directory_bytes(&*core.io, &core.dir)).await?;
        Ok(StoreStats::unknown().with_events_by_type(counts).with_disk_bytes(disk_bytes))
    }
}

impl Subscriber for LogStore {
    fn subscribe(&self, request: SubscriptionRequest) -> EventStream {
        subscription::catch_up_with_tail(
            self.shared.core.clone(),
            self.shared.head.clone(),
            self.shared.tail.clone(),
            request,
        )
    }
}

#[async_trait]
impl StreamDeleter for LogStore {
    async fn delete_stream(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        mode: DeleteMode,
    ) -> Result<()> {
        self.shared.core.check_poison()?;
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .send(Request::Delete { stream: stream.clone(), expected, mode, reply })
            .map_err(|_| Error::Closed)?;
        // The writer tells subscriptions once the deletion commits, even
        // when this caller has stopped waiting.
        rx.await.map_err(|_| Error::Closed)?
    }
}

/// The summed sizes of the files in `dir`. A file that disappears while
/// it is being measured (the index checkpoint's temporary file, renamed
/// into place) counts as empty.
fn directory_bytes(io: &dyn Io, dir: &Path) -> Result<u64> {
    let mut total = 0u64;
    for name in io.list(dir)? {
        match io.file_size(&dir.join(&name)) {
            Ok(n) => total = total.saturating_add(n),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(total)
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| Error::backend("side-store task failed", e))?
}

#[async_trait]
impl SnapshotStore for LogStore {
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        validate_stored_number("snapshot version", snapshot.version)?;
        let kv = self.shared.kv.clone();
        blocking(move || kv.save_snapshot(snapshot)).await
    }

    async fn load_snapshot(
        &self,
        stream: &StreamName,
        at_or_before: Option<u64>,
    ) -> Result<Option<Snapshot>> {
        self.shared.kv.load_snapshot(stream, at_or_before)
    }

    async fn prune_snapshots(&self, stream: &StreamName, keep_last: usize) -> Result<usize> {
        let kv = self.shared.kv.clone();
        let stream = stream.clone();
        blocking(move || kv.prune_snapshots(&stream, keep_last)).await
    }
}

/// The directory lock keeps every other process out, so the leases of this
/// process are the store's ([`annals_core::LocalLeases`]).
#[async_trait]
impl annals_core::Leases for LogStore {
    async fn try_lease_as(&self, name: &str, holder: &str) -> Result<Option<annals_core::Lease>> {
        self.shared.leases.try_lease_as(name, holder).await
    }

    async fn holder(&self, name: &str) -> Result<Option<String>> {
        self.shared.leases.holder(name).await
    }
}

#[async_trait]
impl CheckpointStore for LogStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<u64>> {
        validate_checkpoint_name(name)?;
        self.shared.kv.load_checkpoint(name)
    }

    async fn save_checkpoint(&self, name: &str, position: u64) -> Result<()> {
        validate_checkpoint_name(name)?;
        validate_stored_number("checkpoint position", position)?;
        let kv = self.shared.kv.clone();
        let name = name.to_owned();
        blocking(move || kv.save_checkpoint(&name, position)).await
    }
}
