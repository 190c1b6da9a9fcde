//! The single writer thread: group commit.
//!
//! Appends and deletes arrive on a channel. The writer drains everything
//! pending, decides each request against the published index plus the
//! effects of earlier requests in the same group (so expected-version checks
//! are serialized with writes), encodes all records into one buffer, issues
//! one write and one `fdatasync`, then publishes the new index entries and
//! the new head position, and only then acknowledges the callers.

use std::{
    collections::HashMap,
    sync::{Arc, mpsc},
    time::{Duration, Instant},
};

use annals_core::{
    AppendDecision, AppendResult, DeleteMode, Error, EventData, ExpectedVersion, Result, StreamAppend,
    StreamName, StreamState, Timestamp, Uuid, subscription,
};
use tokio::sync::{oneshot, watch};

use crate::{
    Durability,
    core::{Core, segment_file_name},
    error::LogError,
    fill::Filler,
    format::{
        self, EventFields, KIND_SOFT_DELETE, KIND_TOMBSTONE, MAX_OFFSET, MAX_SEGMENT, SEGMENT_HEADER_LEN,
        SegmentHeader, pack_loc,
    },
    index::{self, Index, LogTail},
    io::IoFile,
};

/// Most bytes one group gathers before it is written.
const MAX_GROUP_BYTES: usize = 8 << 20;

/// A request to the writer.
pub(crate) enum Request {
    Append {
        parts: Vec<StreamAppend>,
        reply: oneshot::Sender<Result<Vec<AppendResult>>>,
    },
    Delete {
        stream: StreamName,
        expected: ExpectedVersion,
        mode: DeleteMode,
        reply: oneshot::Sender<Result<()>>,
    },
}

impl Request {
    fn size(&self) -> usize {
        match self {
            Request::Append { parts, .. } => parts
                .iter()
                .flat_map(|p| p.events.iter())
                .map(|e| e.data.len() + e.metadata.len() + 128)
                .sum(),
            Request::Delete { .. } => 128,
        }
    }

    fn fail(self, e: Error) {
        match self {
            Request::Append { reply, .. } => drop(reply.send(Err(e))),
            Request::Delete { reply, .. } => drop(reply.send(Err(e))),
        }
    }
}

enum Reply {
    Append(oneshot::Sender<Result<Vec<AppendResult>>>, Vec<AppendResult>),
    Delete(oneshot::Sender<Result<()>>),
}

enum Op {
    Event {
        stream: StreamName,
        version: u64,
        position: u64,
        loc: u64,
        event_type: String,
        correlation: String,
        id: Uuid,
    },
    Delete {
        stream: StreamName,
        hard: bool,
        truncate_before: u64,
    },
}

struct Chunk {
    segment: u64,
    start: u64,
    buf: Vec<u8>,
    header: Option<SegmentHeader>,
}

#[derive(Clone, Default)]
struct Pending {
    state: StreamState,
    last_id: Uuid,
    positions: Vec<u64>,
}

struct Group {
    chunks: Vec<Chunk>,
    /// The last record encoded so far: its chunk, its start in the chunk's
    /// buffer and the hash before it, to mark it as the group's end.
    last: Option<(usize, usize, format::Hash)>,
    /// Event records encoded so far.
    events: u32,
    /// The hash of the record before the group (its end mark's tag).
    before: format::Hash,
    /// Start a new segment before the first record (the active one is of an
    /// older format version).
    roll: bool,
    /// The request being encoded is the group's last: its last event is
    /// encoded with the group-end mark (saving `commit` a second hash of it).
    closing: bool,
    tail: LogTail,
    first_position: u64,
    ids: Vec<Uuid>,
    overlay: HashMap<StreamName, Pending>,
    ops: Vec<Op>,
    replies: Vec<Reply>,
}

/// Settings the writer needs.
pub(crate) struct WriterConfig {
    pub durability: Durability,
    pub segment_size: u64,
    /// Checkpoint the index after this many new events (0 = only on close).
    pub checkpoint_every: u64,
    /// Zero-fill segments ahead of the write head on a helper thread.
    pub background_fill: bool,
    /// The active segment is of an older format version (no group-end
    /// marks): start a new segment before the first write.
    pub roll_first: bool,
}

/// The segment being appended to.
struct Active {
    index: u64,
    file: Arc<dyn IoFile>,
}

pub(crate) struct Writer {
    core: Arc<Core>,
    cfg: WriterConfig,
    active: Active,
    tail: LogTail,
    head: watch::Sender<u64>,
    /// Told of every committed deletion, which wakes stream subscriptions.
    live_tail: Arc<subscription::Tail>,
    buf: Vec<u8>,
    filler: Filler,
    unsynced: bool,
    last_sync: Instant,
    /// When the active segment was last checked for having been deleted.
    unlink_checked: Instant,
    checkpointed_at: u64,
    _lock: Box<dyn Send + Sync>,
}

impl Writer {
    #[expect(clippy::too_many_arguments, reason = "called once, by open, with what it has recovered")]
    pub(crate) fn new(
        core: Arc<Core>,
        cfg: WriterConfig,
        tail: LogTail,
        active_file: Arc<dyn IoFile>,
        file_len: u64,
        head: watch::Sender<u64>,
        live_tail: Arc<subscription::Tail>,
        lock: Box<dyn Send + Sync>,
    ) -> Self {
        let filler = if cfg.background_fill {
            Filler::start(
                core.clone(),
                tail.segment,
                active_file.clone(),
                file_len,
                tail.end,
                cfg.segment_size,
            )
        } else {
            Filler::disabled()
        };
        Writer {
            core,
            cfg,
            active: Active { index: tail.segment, file: active_file },
            tail,
            head,
            live_tail,
            buf: Vec::new(),
            filler,
            unsynced: false,
            last_sync: Instant::now(),
            unlink_checked: Instant::now(),
            checkpointed_at: tail.next_position,
            _lock: lock,
        }
    }

    /// Runs until every sender is gone, then syncs and checkpoints the index.
    pub(crate) fn run(mut self, rx: mpsc::Receiver<Request>) -> std::result::Result<(), LogError> {
        let _guard = PanicGuard(self.core.clone());
        let mut just_worked = false;
        let mut spin = SpinPolicy::default();
        loop {
            // A caller acknowledged a moment ago usually sends its next
            // append within microseconds: catching it without sleeping saves
            // a futex wake-up on the single-writer path. Spinning only pays
            // while it catches something, so `SpinPolicy` backs off after
            // misses (a miss burns a core that, on a small machine, the
            // callers need).
            let spun = if just_worked && spin.should_spin() {
                let r = spin_recv(&rx);
                spin.record(r.is_some());
                r
            } else {
                None
            };
            let first = match (spun, self.unsynced, self.cfg.durability) {
                (Some(r), _, _) => Some(r),
                (None, true, Durability::Interval(d)) => {
                    let wait = d.saturating_sub(self.last_sync.elapsed());
                    match rx.recv_timeout(wait) {
                        Ok(r) => Some(r),
                        Err(mpsc::RecvTimeoutError::Timeout) => None,
                        Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
                _ => match rx.recv() {
                    Ok(r) => Some(r),
                    Err(_) => break,
                },
            };
            let Some(first) = first else {
                self.interval_sync();
                just_worked = false;
                continue;
            };
            just_worked = true;
            let mut bytes = first.size();
            let mut batch = vec![first];
            while bytes < MAX_GROUP_BYTES {
                match rx.try_recv() {
                    Ok(r) => {
                        bytes += r.size();
                        batch.push(r);
                    }
                    Err(_) => break,
                }
            }
            self.process(batch);
            if matches!(self.cfg.durability, Durability::Interval(_)) {
                self.interval_sync();
            }
            self.maybe_checkpoint();
        }
        self.shutdown()
    }

    fn shutdown(&mut self) -> std::result::Result<(), LogError> {
        self.filler.stop();
        if let Some(reason) = self.core.poisoned() {
            // Do not checkpoint: what is on disk may differ from what was
            // acknowledged; the next open rescans the tail.
            return Err(LogError::Poisoned { reason });
        }
        if self.unsynced {
            self.active.file.sync_data()?;
        }
        let idx = self.core.index().map_err(|e| LogError::Poisoned { reason: e.to_string() })?;
        index::save(&*self.core.io, &self.core.dir, &idx)
    }

    /// Writes the index checkpoint every `checkpoint_every` events, so a
    /// crash only costs replaying the log written since. It runs on the
    /// writer thread (appends wait meanwhile) and only covers synced data.
    fn maybe_checkpoint(&mut self) {
        let every = self.cfg.checkpoint_every;
        if every == 0
            || self.tail.next_position - self.checkpointed_at < every
            || self.core.poisoned().is_some()
        {
            return;
        }
        if self.unsynced {
            if let Err(e) = self.active.file.sync_data() {
                self.core.set_poisoned(format!("fdatasync before checkpoint failed: {e}"));
                return;
            }
            self.unsynced = false;
            self.last_sync = Instant::now();
        }
        let saved = match self.core.index() {
            Ok(idx) => index::save(&*self.core.io, &self.core.dir, &idx),
            Err(e) => Err(LogError::Poisoned { reason: e.to_string() }),
        };
        match saved {
            Ok(()) => self.checkpointed_at = self.tail.next_position,
            // The checkpoint is an optimisation: the log stays the truth.
            Err(e) => {
                tracing::warn!(error = %e, "annals-log: periodic index checkpoint failed");
                self.checkpointed_at = self.tail.next_position;
            }
        }
    }

    fn interval_sync(&mut self) {
        if !self.unsynced {
            return;
        }
        if let Durability::Interval(d) = self.cfg.durability
            && self.last_sync.elapsed() < d
        {
            return;
        }
        match timed_sync(&*self.active.file) {
            Ok(()) => {
                self.unsynced = false;
                self.last_sync = Instant::now();
            }
            Err(e) => self.core.set_poisoned(format!("periodic fdatasync failed: {e}")),
        }
    }

    fn process(&mut self, batch: Vec<Request>) {
        if let Some(reason) = self.core.poisoned() {
            for r in batch {
                r.fail(Error::Poisoned { reason: reason.clone() });
            }
            return;
        }
        let mut group = Group {
            chunks: vec![Chunk {
                segment: self.tail.segment,
                start: self.tail.end,
                buf: std::mem::take(&mut self.buf),
                header: None,
            }],
            last: None,
            events: 0,
            before: self.tail.last_hash,
            roll: self.cfg.roll_first,
            closing: false,
            tail: self.tail,
            first_position: self.tail.next_position,
            ids: Vec::new(),
            overlay: HashMap::new(),
            ops: Vec::new(),
            replies: Vec::new(),
        };
        if let Some(c) = group.chunks.first_mut() {
            c.buf.clear();
        }
        let now = Timestamp::now().as_micros();
        {
            let idx = match self.core.index() {
                Ok(i) => i,
                Err(e) => {
                    for r in batch {
                        r.fail(Error::Poisoned { reason: e.to_string() });
                    }
                    return;
                }
            };
            let mut requests = batch.into_iter();
            while let Some(req) = requests.next() {
                group.closing = requests.len() == 0;
                // One timestamp per request, never behind the previous one;
                // it becomes the tail's only when a record is written.
                let ts = group.tail.last_ts.max(now);
                let failed: String = match req {
                    Request::Append { parts, reply } => match self.decide(&idx, &mut group, &parts) {
                        Ok(decisions) => match self.encode_append(&idx, &mut group, parts, decisions, ts) {
                            Ok(results) => {
                                group.replies.push(Reply::Append(reply, results));
                                continue;
                            }
                            Err(e) => {
                                let failed = e.to_string();
                                drop(reply.send(Err(e)));
                                failed
                            }
                        },
                        Err(e) => {
                            drop(reply.send(Err(e)));
                            continue;
                        }
                    },
                    Request::Delete { stream, expected, mode, reply } => {
                        let (state, last_id) = state_of(&idx, &group, &stream);
                        match state.check_delete(&stream, expected, mode == DeleteMode::Hard) {
                            Ok(()) => {
                                match self.encode_delete(&mut group, stream, state, last_id, mode, ts) {
                                    Ok(()) => {
                                        group.replies.push(Reply::Delete(reply));
                                        continue;
                                    }
                                    Err(e) => {
                                        let failed = e.to_string();
                                        drop(reply.send(Err(e.into())));
                                        failed
                                    }
                                }
                            }
                            Err(e) => {
                                drop(reply.send(Err(e)));
                                continue;
                            }
                        }
                    }
                };
                // A request that could not be encoded may have left part
                // of its records in the group: write none of it, so no
                // part of an atomic append lands. The writer cannot go on
                // (its segment space is exhausted), so the store is
                // poisoned and every request of the group fails.
                let reason = format!("encoding failed: {failed}");
                self.core.set_poisoned(reason.clone());
                for r in group.replies {
                    match r {
                        Reply::Append(tx, _) => {
                            drop(tx.send(Err(Error::Poisoned { reason: reason.clone() })))
                        }
                        Reply::Delete(tx) => drop(tx.send(Err(Error::Poisoned { reason: reason.clone() }))),
                    }
                }
                for r in requests {
                    r.fail(Error::Poisoned { reason: reason.clone() });
                }
                return;
            }
        }
        self.commit(group);
    }

    fn decide(&self, idx: &Index, group: &mut Group, parts: &[StreamAppend]) -> Result<Vec<AppendDecision>> {
        let mut out = Vec::with_capacity(parts.len());
        for part in parts {
            let ids: Vec<Uuid> = part.events.iter().map(|e| e.id).collect();
            let (state, last_id) = state_of(idx, group, &part.stream);
            let decision = state.decide(&part.stream, part.expected, &ids, |n| {
                // Only a re-send can match; the last id tells cheaply.
                if ids.last() != Some(&last_id) {
                    return Ok(None);
                }
                self.tail_ids(idx, group, &part.stream, n)
            })?;
            out.push(decision);
        }
        Ok(out)
    }

    fn tail_ids(
        &self,
        idx: &Index,
        group: &Group,
        stream: &StreamName,
        n: usize,
    ) -> Result<Option<(Vec<Uuid>, u64)>> {
        let published = idx.streams.get(stream).map(|e| e.positions.as_slice()).unwrap_or_default();
        let pending = group.overlay.get(stream).map(|p| p.positions.as_slice()).unwrap_or_default();
        let total = published.len() + pending.len();
        let Some(skip) = total.checked_sub(n) else { return Ok(None) };
        let mut ids = Vec::with_capacity(n);
        let mut last = None;
        for &p in published.iter().chain(pending.iter()).skip(skip) {
            let id = if p >= group.first_position {
                usize::try_from(p - group.first_position).ok().and_then(|i| group.ids.get(i)).copied()
            } else {
                let loc = usize::try_from(p).ok().and_then(|i| idx.locs.get(i)).copied();
                match loc {
                    Some(loc) => Some(self.core.event_id(p, loc)?),
                    None => None,
                }
            };
            let Some(id) = id else {
                return Err(Error::Corrupt {
                    details: format!("position {p} of stream '{stream}' is not indexed"),
                });
            };
            ids.push(id);
            last = Some(p);
        }
        Ok(last.map(|p| (ids, p)))
    }

    /// Reserves room for a frame of `len` bytes, rolling to a new segment
    /// when the current one is full, and returns the frame's location and
    /// the chunk to encode it into.
    fn place<'g>(
        &self,
        group: &'g mut Group,
        len: usize,
    ) -> std::result::Result<(u64, &'g mut Chunk), LogError> {
        let len = len as u64;
        let end = group.tail.end;
        let roll = std::mem::take(&mut group.roll);
        if roll || (end + len > self.cfg.segment_size && end > SEGMENT_HEADER_LEN as u64) {
            let next = group.tail.segment + 1;
            if next > MAX_SEGMENT {
                return Err(LogError::Config { reason: "segment index space exhausted".into() });
            }
            let header = SegmentHeader::new(next, group.tail.next_position, group.tail.last_hash);
            group.chunks.push(Chunk {
                segment: next,
                start: SEGMENT_HEADER_LEN as u64,
                buf: Vec::new(),
                header: Some(header),
            });
            group.tail.segment = next;
            group.tail.end = SEGMENT_HEADER_LEN as u64;
        }
        let offset = group.tail.end;
        if offset + len > MAX_OFFSET {
            return Err(LogError::Config { reason: "segment grew past the 1 TiB offset limit".into() });
        }
        group.tail.end += len;
        let loc = pack_loc(group.tail.segment, offset);
        let chunk = group.chunks.last_mut().ok_or(LogError::Closed)?;
        Ok((loc, chunk))
    }

    fn encode_append(
        &self,
        idx: &Index,
        group: &mut Group,
        parts: Vec<StreamAppend>,
        decisions: Vec<AppendDecision>,
        ts: i64,
    ) -> Result<Vec<AppendResult>> {
        let mut results = Vec::with_capacity(parts.len());
        // The part whose last event ends the group, if this request closes it.
        let closing_part = if group.closing {
            decisions.iter().rposition(|d| matches!(d, AppendDecision::Write { .. }))
        } else {
            None
        };
        for (i, (part, decision)) in parts.into_iter().zip(decisions).enumerate() {
            let first_version = match decision {
                AppendDecision::AlreadyWritten(r) => {
                    results.push(r);
                    continue;
                }
                AppendDecision::Write { first_version } => first_version,
            };
            let stream = part.stream;
            // Taken out and put back, never cloned: a group may hold many
            // appends to one stream.
            let mut pending = match group.overlay.remove(&stream) {
                Some(p) => p,
                None => {
                    let (state, last_id) = state_of(idx, group, &stream);
                    Pending { state, last_id, positions: Vec::new() }
                }
            };
            let mut version = first_version;
            let mut position = group.tail.next_position;
            let count = part.events.len();
            for (j, event) in part.events.into_iter().enumerate() {
                position = group.tail.next_position;
                let ends_group = closing_part == Some(i) && j + 1 == count;
                let EventData { id, event_type, data, content_type, metadata } = event;
                let correlation = metadata.correlation_id();
                let fields = EventFields {
                    position,
                    version,
                    recorded_at: ts,
                    id: *id.as_bytes(),
                    content_type: content_type.code(),
                    stream: stream.as_str(),
                    event_type: &event_type,
                    correlation: correlation.as_deref().unwrap_or(""),
                    metadata: metadata.as_bytes(),
                    data: &data,
                    group_end: ends_group.then_some((group.events + 1, format::group_tag(&group.before))),
                };
                let len = format::event_frame_len(&fields);
                let prev = group.tail.last_hash;
                let (loc, chunk) = self.place(group, len)?;
                let start = chunk.buf.len();
                let hash = format::encode_event(&mut chunk.buf, &prev, &fields)?;
                // Marked already when it ends the group: nothing for `commit` to do.
                group.last = (!ends_group).then(|| (group.chunks.len() - 1, start, prev));
                group.events += 1;
                group.tail.last_hash = hash;
                group.tail.last_record = Some(loc);
                group.tail.last_ts = ts;
                group.tail.next_position += 1;
                group.ids.push(id);
                pending.positions.push(position);
                group.ops.push(Op::Event {
                    stream: stream.clone(),
                    version,
                    position,
                    loc,
                    event_type,
                    correlation: correlation.unwrap_or_default(),
                    id,
                });
                pending.last_id = id;
                version += 1;
            }
            pending.state.last_version = Some(version - 1);
            pending.state.last_position = Some(position);
            group.overlay.insert(stream, pending);
            results.push(AppendResult { next_version: version, position });
        }
        Ok(results)
    }

    fn encode_delete(
        &self,
        group: &mut Group,
        stream: StreamName,
        state: StreamState,
        last_id: Uuid,
        mode: DeleteMode,
        ts: i64,
    ) -> std::result::Result<(), LogError> {
        let hard = mode == DeleteMode::Hard;
        let truncate_before = if hard { state.truncate_before } else { state.next_version() };
        let len = format::MIN_RECORD_LEN + stream.as_str().len();
        let prev = group.tail.last_hash;
        let next_position = group.tail.next_position;
        let (loc, chunk) = self.place(group, len)?;
        let start = chunk.buf.len();
        let kind = if hard { KIND_TOMBSTONE } else { KIND_SOFT_DELETE };
        let hash = format::encode_delete(
            &mut chunk.buf,
            &prev,
            kind,
            stream.as_str(),
            truncate_before,
            next_position,
            ts,
        )?;
        group.last = Some((group.chunks.len() - 1, start, prev));
        group.tail.last_hash = hash;
        group.tail.last_record = Some(loc);
        group.tail.last_ts = ts;
        let mut pending =
            group.overlay.remove(&stream).unwrap_or(Pending { state, last_id, positions: Vec::new() });
        if hard {
            pending.state.tombstoned = true;
        } else {
            pending.state.truncate_before = truncate_before;
        }
        group.overlay.insert(stream.clone(), pending);
        group.ops.push(Op::Delete { stream, hard, truncate_before });
        Ok(())
    }

    /// Writes the group, syncs it as the durability setting asks, publishes
    /// it and acknowledges the callers; on failure poisons the store and
    /// rolls the files back to the last acknowledged byte.
    fn commit(&mut self, mut group: Group) {
        let wrote_anything = group.chunks.iter().any(|c| !c.buf.is_empty() || c.header.is_some());
        if let Some((chunk, start, prev)) = group.last
            && let Some(frame) = group.chunks.get_mut(chunk).and_then(|c| c.buf.get_mut(start..))
        {
            // The group's last record says so: recovery keeps the group only
            // when this mark is intact (see docs/log-format.md).
            group.tail.last_hash =
                format::mark_group_end(frame, &prev, group.events, format::group_tag(&group.before));
        }
        if wrote_anything && let Err(e) = self.write_group(&mut group) {
            let reason = format!("append failed: {e}");
            self.core.set_poisoned(reason.clone());
            self.rollback();
            for r in group.replies {
                match r {
                    Reply::Append(tx, _) => drop(tx.send(Err(Error::Poisoned { reason: reason.clone() }))),
                    Reply::Delete(tx) => drop(tx.send(Err(Error::Poisoned { reason: reason.clone() }))),
                }
            }
            return;
        }
        // Keep the first chunk's buffer for the next group.
        if let Some(first) = group.chunks.drain(..).next() {
            self.buf = first.buf;
        }
        if wrote_anything {
            let deletes = group.ops.iter().any(|op| matches!(op, Op::Delete { .. }));
            match self.core.index_mut() {
                Ok(mut idx) => {
                    for op in group.ops {
                        let r = match op {
                            Op::Event { stream, version, position, loc, event_type, correlation, id } => idx
                                .apply_event(&stream, version, position, loc, &event_type, &correlation, id),
                            Op::Delete { stream, hard, truncate_before } => {
                                idx.apply_delete(&stream, hard, truncate_before)
                            }
                        };
                        if let Err(e) = r {
                            self.core.set_poisoned(format!("index update failed: {e}"));
                        }
                    }
                    idx.tail = group.tail;
                }
                Err(e) => self.core.set_poisoned(e.to_string()),
            }
            self.tail = group.tail;
            self.cfg.roll_first = false;
            // Published after the events are readable (see annals_core::subscription).
            self.head.send_replace(self.tail.next_position);
            // Here rather than by the deleting caller, which may have
            // stopped waiting (its future dropped) once the request was sent.
            if deletes {
                self.live_tail.note_deletion();
            }
        }
        for r in group.replies {
            match r {
                Reply::Append(tx, results) => drop(tx.send(Ok(results))),
                Reply::Delete(tx) => drop(tx.send(Ok(()))),
            }
        }
    }

    fn write_group(&mut self, group: &mut Group) -> std::result::Result<(), LogError> {
        let always = self.cfg.durability == Durability::Always;
        let n = group.chunks.len();
        for (i, chunk) in group.chunks.iter().enumerate() {
            if let Some(header) = chunk.header {
                // Roll over: the previous segment's data is made durable
                // before the next segment exists, so a torn write can only
                // ever be in the last segment.
                self.active.file.sync_data()?;
                let path = self.core.dir.join(segment_file_name(chunk.segment));
                let file = self.core.io.open(&path, true)?;
                file.set_len(0)?;
                file.write_at(&header.encode(), 0)?;
                file.sync_all()?;
                self.core.io.sync_dir(&self.core.dir)?;
                self.core
                    .push_segment(file.clone())
                    .map_err(|e| LogError::Poisoned { reason: e.to_string() })?;
                self.active = Active { index: chunk.segment, file };
            }
            if !chunk.buf.is_empty() {
                let end = chunk.start + chunk.buf.len() as u64;
                self.filler.reserve(chunk.segment, &self.active.file, chunk.start, end);
                self.active.file.write_at(&chunk.buf, chunk.start)?;
            }
            if i + 1 == n {
                if always {
                    timed_sync(&*self.active.file)?;
                    self.last_sync = Instant::now();
                } else {
                    self.unsynced = true;
                }
                // The zero-fill thread may have failed a write or fsync of
                // this file meanwhile. An fsync error is reported once per
                // open file, so the sync above can succeed although the
                // group's pages were dropped: after any failure, nothing
                // more is acknowledged (invariant 6).
                if let Some(reason) = self.core.poisoned() {
                    return Err(LogError::Poisoned { reason });
                }
                // A segment removed while open (the data directory deleted
                // under a running store) still takes writes and syncs, but
                // its bytes are gone once it is closed: stop acknowledging
                // them. Checked at most every UNLINK_CHECK_EVERY, not per
                // group: an fstat right after the fdatasync measured about
                // 45 µs here, a quarter of a one-writer append.
                if self.unlink_checked.elapsed() >= UNLINK_CHECK_EVERY && {
                    self.unlink_checked = Instant::now();
                    self.active.file.is_unlinked()?
                } {
                    return Err(LogError::Poisoned {
                        reason: format!(
                            "segment {} was deleted while the store was open (was the data directory {} removed?)",
                            segment_file_name(self.active.index),
                            self.core.dir.display()
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    /// Removes whatever a failed group left on disk beyond the last
    /// acknowledged record, so a later reopen cannot resurrect it.
    fn rollback(&mut self) {
        // Poisoned already, so the filler stops; wait for it so it cannot
        // extend the file again after the truncation below.
        self.filler.stop();
        let published = self.tail;
        // A segment being created when the group failed is not open yet:
        // it is the one after the newest open segment.
        let created = self.active.index + 1;
        let mut ok = true;
        while self.active.index > published.segment {
            let path = self.core.dir.join(segment_file_name(self.active.index));
            ok &= self.core.io.remove(&path).is_ok();
            ok &= self.core.pop_segment().is_ok();
            match self.core.segment(published.segment) {
                Ok(file) => self.active = Active { index: published.segment, file },
                Err(_) => {
                    ok = false;
                    break;
                }
            }
        }
        for segment in published.segment + 1..=created {
            let orphan = self.core.dir.join(segment_file_name(segment));
            if self.core.io.exists(&orphan) {
                ok &= self.core.io.remove(&orphan).is_ok();
            }
        }
        ok &= self.active.file.set_len(published.end).is_ok();
        ok &= self.active.file.sync_all().is_ok();
        ok &= self.core.io.sync_dir(&self.core.dir).is_ok();
        if !ok {
            tracing::error!(
                "annals-log: could not roll back a failed write; the next open will truncate or refuse"
            );
        }
    }
}

/// How often the writer checks that its active segment still has a name
/// (see `write_group`): at most this long of acknowledged appends can go to
/// a data directory that was deleted under the store.
const UNLINK_CHECK_EVERY: Duration = Duration::from_millis(100);

/// How long the writer polls for the next request before sleeping.
const SPIN: Duration = Duration::from_micros(50);

/// `fdatasync` of a group (or of an interval's writes), timed into the
/// `annals_log_fsync_seconds` histogram of the `metrics` facade (a no-op
/// unless the process installed a recorder, as `annals serve` does).
fn timed_sync(file: &dyn IoFile) -> std::io::Result<()> {
    let started = Instant::now();
    let result = file.sync_data();
    metrics::histogram!("annals_log_fsync_seconds").record(started.elapsed().as_secs_f64());
    result
}

/// Most commits skipped between two spins after consecutive misses.
const MAX_SPIN_BACKOFF: u32 = 64;

/// When the writer spins after a commit: always while spins catch the next
/// request (one caller appending in a loop), then, after misses, only every
/// 2nd, 4th, … up to every [`MAX_SPIN_BACKOFF`]th commit, so a many-caller
/// or idle workload wastes at most one spin in 64 commits.
#[derive(Debug, Default)]
struct SpinPolicy {
    /// Commits to skip before the next spin.
    skip: u32,
    /// Current back-off (0 after a hit).
    backoff: u32,
}

impl SpinPolicy {
    fn should_spin(&mut self) -> bool {
        if self.skip == 0 {
            return true;
        }
        self.skip -= 1;
        false
    }

    fn record(&mut self, hit: bool) {
        if hit {
            self.backoff = 0;
        } else {
            self.backoff = (self.backoff * 2).clamp(1, MAX_SPIN_BACKOFF);
        }
        self.skip = self.backoff;
    }
}

fn spin_recv(rx: &mpsc::Receiver<Request>) -> Option<Request> {
    let until = Instant::now() + SPIN;
    loop {
        match rx.try_recv() {
            Ok(r) => return Some(r),
            Err(mpsc::TryRecvError::Disconnected) => return None,
            Err(mpsc::TryRecvError::Empty) if Instant::now() >= until => return None,
            Err(mpsc::TryRecvError::Empty) => std::hint::spin_loop(),
        }
    }
}

/// Poisons the store if the writer thread unwinds, so callers get
/// `Poisoned` rather than a bare `Closed`.
struct PanicGuard(Arc<Core>);

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.set_poisoned("the writer thread panicked".into());
        }
    }
}

fn state_of(idx: &Index, group: &Group, stream: &StreamName) -> (StreamState, Uuid) {
    if let Some(p) = group.overlay.get(stream) {
        return (p.state, p.last_id);
    }
    idx.streams.get(stream).map(|e| (e.state, e.last_id)).unwrap_or_default()
}

#[cfg(test)]
mod spin_tests {
    use super::{MAX_SPIN_BACKOFF, SpinPolicy};

    #[test]
    fn spins_while_hitting_and_backs_off_after_misses() {
        let mut p = SpinPolicy::default();
        for _ in 0..10 {
            assert!(p.should_spin());
            p.record(true);
        }
        // First miss: skip one commit, then spin again.
        p.record(false);
        assert!(!p.should_spin());
        assert!(p.should_spin());
        // Repeated misses double the gap up to the cap.
        for _ in 0..20 {
            p.record(false);
            while !p.should_spin() {}
        }
        p.record(false);
        let skipped = std::iter::from_fn(|| (!p.should_spin()).then_some(())).count();
        assert_eq!(skipped as u32, MAX_SPIN_BACKOFF);
        // One hit restores spinning after every commit.
        p.record(true);
        assert!(p.should_spin());
    }
}
