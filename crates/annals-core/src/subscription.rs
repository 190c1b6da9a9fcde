//! The catch-up subscription loop shared by backends.
//!
//! Design: there is no per-subscriber live buffer to overflow. The writer
//! publishes the log's next position on a `tokio::sync::watch` channel after
//! every commit; a subscriber reads committed events from storage in batches
//! and, when it has caught up, waits for that value to change. A slow
//! subscriber therefore never blocks a writer (a `watch` send never waits)
//! and can never lose an event (it only ever reads committed history).

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::stream;
use tokio::sync::watch;

use crate::{
    AllReader, Direction, Error, EventStream, Filter, Metadata, ReadAll, ReadFrom, ReadStream, RecordedEvent,
    Result, StreamReader, SubscribeFrom, SubscriptionRequest, SubscriptionTarget,
};

/// Events fetched per read while catching up.
pub const SUBSCRIPTION_BATCH: usize = 512;

/// What a subscription needs from a backend: its readers.
pub trait SubscriptionSource: StreamReader + AllReader + 'static {}
impl<T: StreamReader + AllReader + 'static> SubscriptionSource for T {}

enum Cursor {
    /// Next position of `$all` to scan.
    All(u64),
    /// Next version of the stream to read.
    Stream(u64),
    /// Stream subscription from the end: skip events before this position.
    StreamFromPosition(u64),
}

struct State {
    source: Arc<dyn SubscriptionSource>,
    head: watch::Receiver<u64>,
    tail: Option<Arc<Tail>>,
    /// Stream subscriptions with a tail: woken by a deletion through the
    /// store, which need not move the head (see [`Tail::note_deletion`]).
    deletions: Option<watch::Receiver<u64>>,
    target: SubscriptionTarget,
    cursor: Cursor,
    buffer: VecDeque<RecordedEvent>,
    done: bool,
    /// The head as seen just before the current fetch.
    seen_head: u64,
    /// Stream subscriptions with a tail: a position below which every
    /// event of the stream has been delivered (or buffered), known once a
    /// read of the stream found nothing more. From there the stream's new
    /// events are taken from the tail, without reading the stream.
    watermark: Option<u64>,
    /// When the stream was last read, and the tail's deletion count then.
    last_read: (Instant, u64),
}

/// Builds a catch-up subscription over `source`, woken by `head`, which
/// carries the log's next position and is updated after every commit.
/// Dropping the returned stream stops it; nothing is left running.
pub fn catch_up(
    source: Arc<dyn SubscriptionSource>,
    head: watch::Receiver<u64>,
    request: SubscriptionRequest,
) -> EventStream {
    subscribe(source, head, None, request)
}

/// [`catch_up`], with `$all` subscriptions served from `tail` (shared by
/// the store's subscriptions) once they reach the recent events it holds.
pub fn catch_up_with_tail(
    source: Arc<dyn SubscriptionSource>,
    head: watch::Receiver<u64>,
    tail: Arc<Tail>,
    request: SubscriptionRequest,
) -> EventStream {
    subscribe(source, head, Some(tail), request)
}

fn subscribe(
    source: Arc<dyn SubscriptionSource>,
    head: watch::Receiver<u64>,
    tail: Option<Arc<Tail>>,
    request: SubscriptionRequest,
) -> EventStream {
    let now = *head.borrow();
    let cursor = match (&request.target, request.from) {
        (SubscriptionTarget::All(_), SubscribeFrom::Start) => Cursor::All(0),
        (SubscriptionTarget::All(_), SubscribeFrom::After(p)) => Cursor::All(p.saturating_add(1)),
        (SubscriptionTarget::All(_), SubscribeFrom::End) => Cursor::All(now),
        (SubscriptionTarget::Stream(_), SubscribeFrom::Start) => Cursor::Stream(0),
        (SubscriptionTarget::Stream(_), SubscribeFrom::After(v)) => Cursor::Stream(v.saturating_add(1)),
        (SubscriptionTarget::Stream(_), SubscribeFrom::End) => Cursor::StreamFromPosition(now),
    };
    let deletions = match request.target {
        SubscriptionTarget::Stream(_) => tail.as_ref().map(|t| t.deletions.subscribe()),
        SubscriptionTarget::All(_) => None,
    };
    let state = State {
        source,
        head,
        tail,
        deletions,
        target: request.target,
        cursor,
        buffer: VecDeque::new(),
        done: false,
        seen_head: now,
        watermark: None,
        last_read: (Instant::now(), 0),
    };
    Box::pin(stream::unfold(state, |mut st| async move {
        loop {
            if let Some(event) = st.buffer.pop_front() {
                return Some((Ok(event), st));
            }
            if st.done {
                return None;
            }
            // Mark the current head as seen *before* reading, so a commit
            // that lands during the read still wakes us afterwards.
            st.seen_head = *st.head.borrow_and_update();
            // Likewise the deletion count: the fetch decides by it whether
            // the stream must be read, and a deletion noted after that
            // decision must wake us to read it.
            if let Some(deletions) = st.deletions.as_mut() {
                deletions.borrow_and_update();
            }
            match fetch(&mut st).await {
                Ok(true) => continue,
                Ok(false) => {
                    let woken = match st.deletions.as_mut() {
                        Some(deletions) => tokio::select! {
                            woken = st.head.changed() => woken,
                            // The tail owns the sender and we hold the tail,
                            // so this never fails; if it did, the head
                            // still wakes us.
                            Ok(()) = deletions.changed() => Ok(()),
                        },
                        None => st.head.changed().await,
                    };
                    if woken.is_err() {
                        st.done = true;
                        return Some((Err(Error::Closed), st));
                    }
                }
                Err(e) => {
                    st.done = true;
                    return Some((Err(e), st));
                }
            }
        }
    }))
}

/// Reads the next batch into the buffer; `Ok(false)` when caught up.
async fn fetch(st: &mut State) -> Result<bool> {
    match (&st.target, &mut st.cursor) {
        (SubscriptionTarget::All(filter), Cursor::All(next)) => {
            if let Some(tail) = st.tail.clone() {
                // As the backend's own read would (the tail matches in memory).
                filter.validate()?;
                loop {
                    match tail.serve(*next, filter, &mut st.buffer) {
                        Served::Upto(scanned) => {
                            *next = scanned;
                            if !st.buffer.is_empty() {
                                return Ok(true);
                            }
                        }
                        // Older than what the tail holds: read it below.
                        Served::Behind | Served::Gap => break,
                        Served::Ahead => {}
                    }
                    // Everything the tail holds is scanned: caught up, or
                    // the tail reads on (one read for every subscription
                    // at this point) and serves again.
                    let head = *st.head.borrow();
                    if *next >= head {
                        return Ok(false);
                    }
                    if !tail.near(*next, head) {
                        // Far behind: its own (filtered, indexed) reads.
                        break;
                    }
                    if !tail.fill(&st.source, *next).await {
                        // Nothing new, or the read failed: its own read says which.
                        break;
                    }
                }
            }
            let slice = st
                .source
                .read_all(ReadAll {
                    from: ReadFrom::At(*next),
                    direction: Direction::Forward,
                    limit: SUBSCRIPTION_BATCH,
                    filter: filter.clone(),
                })
                .await?;
            let before = *next;
            if let Some(n) = slice.next {
                *next = (*next).max(n);
            }
            if let Some(last) = slice.events.last() {
                *next = (*next).max(last.position + 1);
            }
            if !slice.events.is_empty() {
                st.buffer.extend(slice.events);
                return Ok(true);
            }
            // Nothing matched: keep scanning only while the scan moves and
            // has not reached the published head.
            Ok(*next > before && *next < *st.head.borrow())
        }
        (SubscriptionTarget::Stream(stream), cursor) => {
            if let Cursor::StreamFromPosition(min_position) = *cursor {
                *cursor = Cursor::Stream(first_version_at_or_after(&*st.source, stream, min_position).await?);
            }
            let Cursor::Stream(next) = cursor else {
                return Err(Error::invalid("subscription cursor out of step with its target"));
            };
            // Read the stream anyway after a deletion in this process, and
            // at least every `STREAM_RECHECK` (a deletion elsewhere): it is
            // the read that reports a tombstone.
            let served = st.tail.clone().filter(|tail| {
                tail.deletions() == st.last_read.1 && st.last_read.0.elapsed() < STREAM_RECHECK
            });
            if let (Some(tail), Some(mut mark)) = (served, st.watermark) {
                loop {
                    match tail.serve_stream(stream, mark, next, &mut st.buffer) {
                        Served::Gap | Served::Behind => break,
                        Served::Upto(scanned) => {
                            mark = scanned;
                            st.watermark = Some(mark);
                            if !st.buffer.is_empty() {
                                return Ok(true);
                            }
                        }
                        Served::Ahead => {}
                    }
                    let head = *st.head.borrow();
                    if mark >= head {
                        return Ok(false);
                    }
                    // Far behind, one read of the stream beats the tail
                    // reading all of `$all` up to the head.
                    if !tail.near(mark, head) || !tail.fill(&st.source, mark).await {
                        break;
                    }
                }
            }
            st.last_read = (Instant::now(), st.tail.as_ref().map_or(0, |t| t.deletions()));
            let events = match st
                .source
                .read_stream(
                    stream,
                    ReadStream {
                        from: ReadFrom::At(*next),
                        direction: Direction::Forward,
                        limit: SUBSCRIPTION_BATCH,
                    },
                )
                .await
            {
                Ok(events) => events,
                Err(Error::StreamNotFound { .. }) => Vec::new(),
                Err(e) => return Err(e),
            };
            if let Some(last) = events.last() {
                *next = last.version + 1;
            }
            // Fewer than asked: everything committed before the read began
            // (below the head seen then) is in hand.
            st.watermark = (events.len() < SUBSCRIPTION_BATCH).then_some(st.seen_head);
            st.buffer.extend(events);
            Ok(!st.buffer.is_empty())
        }
        (SubscriptionTarget::All(_), _) => {
            Err(Error::invalid("subscription cursor out of step with its target"))
        }
    }
}

/// How many recent events a [`Tail`] keeps by default.
pub const TAIL_EVENTS: usize = 8192;
/// How many bytes of recent events (data, metadata, names) a [`Tail`]
/// keeps by default.
pub const TAIL_BYTES: usize = 32 * 1024 * 1024;

/// The most recent events of `$all`, read once for all of a store's
/// subscriptions. Without it every live subscription reads the backend on
/// every commit: on PostgreSQL, 100 live `$all` subscriptions cut 8
/// writers' appends from ~12,000/s to ~1,000/s (`pg_fanout`), the reads
/// taking the database's time. With it, the first subscription to find the
/// head past the tail reads the new events (unfiltered, one read, the others
/// wait for it), and each then filters them in memory: `$all` subscriptions
/// by their filter, caught-up stream subscriptions by stream and version.
///
/// It holds a contiguous range `[start, end)` of positions: every event
/// of the log in that range (as a forward read of `$all` returned it;
/// positions without an event were deleted), at most `max_events` events
/// and `max_bytes` bytes; the oldest go first. A subscription whose next
/// position is below `start` reads the backend as before until it reaches
/// the range, so what it delivers is exactly what its own reads would have.
#[derive(Debug)]
pub struct Tail {
    buf: Mutex<TailBuf>,
    /// Set while one subscription reads for the others.
    filling: AtomicBool,
    /// Wakes the others when that read ends.
    filled: tokio::sync::Notify,
    max_events: usize,
    max_bytes: usize,
    /// Streams deleted through this store (see [`Tail::note_deletion`]);
    /// a change wakes the caught-up stream subscriptions.
    deletions: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct TailBuf {
    start: u64,
    end: u64,
    events: VecDeque<RecordedEvent>,
    bytes: usize,
}

/// How often a caught-up stream subscription with a tail reads its stream
/// instead of taking its events from the tail, to learn of a deletion made
/// by another process (the read reports a tombstone, or a soft delete's
/// new start; a deletion is not an event of `$all`). Only checked when the
/// subscription wakes. Deletions through the same store are seen at once
/// ([`Tail::note_deletion`]).
pub const STREAM_RECHECK: Duration = Duration::from_secs(1);

/// What [`Tail::serve`] and [`Tail::serve_stream`] did.
enum Served {
    /// Matching events from the tail are in the buffer (possibly none);
    /// continue from this position.
    Upto(u64),
    /// Stream subscriptions: the stream's next event in the tail is not the
    /// version expected (nothing was served): its own read must decide.
    Gap,
    /// The position is older than what the tail holds.
    Behind,
    /// The position is at or past the tail's end.
    Ahead,
}

impl TailBuf {
    /// The index of the first event at or after `position`, or why the
    /// tail cannot serve from there.
    fn locate(&self, position: u64) -> Result<usize, Served> {
        if position < self.start {
            return Err(Served::Behind);
        }
        if position >= self.end {
            return Err(Served::Ahead);
        }
        Ok(self.events.partition_point(|e| e.position < position))
    }
}

impl Default for Tail {
    fn default() -> Self {
        Tail::new(TAIL_EVENTS, TAIL_BYTES)
    }
}

impl Tail {
    /// A tail keeping at most `max_events` events and `max_bytes` bytes.
    pub fn new(max_events: usize, max_bytes: usize) -> Self {
        Tail {
            buf: Mutex::default(),
            filling: AtomicBool::new(false),
            filled: tokio::sync::Notify::new(),
            max_events: max_events.max(1),
            max_bytes: max_bytes.max(1),
            deletions: watch::Sender::new(0),
        }
    }

    /// Tells the store's stream subscriptions that a stream was deleted
    /// (soft or hard): each is woken and reads its stream. Backends call it
    /// after a deletion commits (is readable).
    pub fn note_deletion(&self) {
        // A deletion need not move the head, and one that wakes them
        // through it (the log publishes its head before the deleting caller
        // gets here) may do so before this count changes, and they would
        // take the stream's events from the tail again and sleep.
        self.deletions.send_modify(|n| *n += 1);
    }

    fn deletions(&self) -> u64 {
        *self.deletions.borrow()
    }

    /// Moves the events of `stream` from position `position` on into
    /// `out`, up to a subscription batch, provided they continue from
    /// version `*version` (which then moves past them); earlier versions
    /// are skipped as delivered.
    fn serve_stream(
        &self,
        stream: &crate::StreamName,
        position: u64,
        version: &mut u64,
        out: &mut VecDeque<RecordedEvent>,
    ) -> Served {
        let buf = self.buf.lock().unwrap_or_else(PoisonError::into_inner);
        let first = match buf.locate(position) {
            Ok(first) => first,
            Err(other) => return other,
        };
        let mut expected = *version;
        let mut taken = Vec::new();
        let mut scanned = buf.end;
        for event in buf.events.range(first..) {
            if event.version < expected || event.stream != *stream {
                continue;
            }
            if event.version != expected {
                return Served::Gap;
            }
            taken.push(event.clone());
            expected += 1;
            if taken.len() >= SUBSCRIPTION_BATCH {
                scanned = event.position + 1;
                break;
            }
        }
        *version = expected;
        out.extend(taken);
        Served::Upto(scanned)
    }

    /// The range of positions held, `[start, end)`.
    pub fn range(&self) -> (u64, u64) {
        let buf = self.buf.lock().unwrap_or_else(PoisonError::into_inner);
        (buf.start, buf.end)
    }

    /// Whether a subscription at `next` is near enough to `head` for the
    /// tail to read for it: within half the tail. One further behind (a
    /// catch-up from the start, a filtered one over a long history, a large
    /// burst) reads for itself, as its own reads can use the backend's
    /// indexes where the tail reads every event.
    fn near(&self, next: u64, head: u64) -> bool {
        head.saturating_sub(next) <= (self.max_events / 2) as u64
    }

    /// Moves the events matching `filter` from position `next` on into
    /// `out`, up to a subscription batch.
    fn serve(&self, next: u64, filter: &Filter, out: &mut VecDeque<RecordedEvent>) -> Served {
        let buf = self.buf.lock().unwrap_or_else(PoisonError::into_inner);
        let first = match buf.locate(next) {
            Ok(first) => first,
            Err(other) => return other,
        };
        for event in buf.events.range(first..) {
            if filter.matches(event) {
                out.push_back(event.clone());
                if out.len() >= SUBSCRIPTION_BATCH {
                    return Served::Upto(event.position + 1);
                }
            }
        }
        Served::Upto(buf.end)
    }

    /// Has the tail read on from its end for a subscription at `from` (at
    /// or past the end), or waits for the read another subscription
    /// started. `true` when the tail now reaches past `from`; `false` when
    /// the read found nothing new or failed, and the subscription should
    /// read for itself (its own read reports an error).
    ///
    /// The read runs on a task of its own: a subscription whose consumer
    /// stops polling it (an SSE client with a full socket) must not hold up
    /// every other subscription waiting for the read it started. A
    /// subscription far past the end (the tail idle for a while, or a new
    /// one from the end) starts the tail again at `from`.
    async fn fill(self: &Arc<Self>, source: &Arc<dyn SubscriptionSource>, from: u64) -> bool {
        let mut waited = false;
        loop {
            let mut finished = std::pin::pin!(self.filled.notified());
            finished.as_mut().enable();
            if self.range().1 > from {
                return true;
            }
            if waited {
                return false;
            }
            if self.filling.compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
                let reading = Reading(self.clone());
                let source = source.clone();
                let read = async move {
                    // Errors are the waiting subscriptions' to meet, each
                    // through its own read.
                    let _ = reading.0.read_on(&*source, from).await;
                    drop(reading);
                };
                match tokio::runtime::Handle::try_current() {
                    Ok(runtime) => drop(runtime.spawn(read)),
                    Err(_) => read.await,
                }
            }
            finished.await;
            waited = true;
        }
    }

    /// One read of `$all` from the tail's end (see [`Tail::fill`]).
    async fn read_on(&self, source: &dyn SubscriptionSource, from: u64) -> Result<()> {
        let read_from = {
            let mut buf = self.buf.lock().unwrap_or_else(PoisonError::into_inner);
            if buf.end > from {
                return Ok(());
            }
            if buf.events.is_empty() || from - buf.end > (SUBSCRIPTION_BATCH * 4) as u64 {
                *buf = TailBuf { start: from, end: from, events: VecDeque::new(), bytes: 0 };
            }
            buf.end
        };
        let slice = source
            .read_all(ReadAll {
                from: ReadFrom::At(read_from),
                direction: Direction::Forward,
                limit: SUBSCRIPTION_BATCH,
                filter: Filter::all().with_system(),
            })
            .await?;
        let mut end = slice.next.unwrap_or(read_from);
        if let Some(last) = slice.events.last() {
            end = end.max(last.position + 1);
        }
        let mut buf = self.buf.lock().unwrap_or_else(PoisonError::into_inner);
        if end <= buf.end {
            return Ok(());
        }
        for mut event in slice.events {
            // Own copies: a backend may hand out slices of a larger buffer
            // (the log reads 256 KiB windows), which the tail would
            // otherwise keep alive whole, one per event in the worst case.
            event.data = Bytes::copy_from_slice(&event.data);
            event.metadata = Metadata::from_trusted_json(Bytes::copy_from_slice(event.metadata.as_bytes()));
            buf.bytes += footprint(&event);
            buf.events.push_back(event);
        }
        buf.end = end;
        while buf.events.len() > self.max_events || buf.bytes > self.max_bytes {
            let Some(oldest) = buf.events.pop_front() else { break };
            buf.bytes -= footprint(&oldest);
            buf.start = oldest.position + 1;
        }
        Ok(())
    }
}

/// The right to read for a tail; on release (the read done, failed or
/// abandoned) the waiting subscriptions are woken.
struct Reading(Arc<Tail>);

impl Drop for Reading {
    fn drop(&mut self) {
        self.0.filling.store(false, Ordering::SeqCst);
        self.0.filled.notify_waiters();
    }
}

/// What an event costs the tail, roughly.
fn footprint(event: &RecordedEvent) -> usize {
    event.data.len()
        + event.metadata.as_bytes().len()
        + event.event_type.len()
        + event.stream.as_str().len()
        + 96
}

/// The first version of `stream` whose position is `>= min_position`: the
/// starting point of a subscription "from the end" that must still deliver
/// events committed between the call and the first poll.
async fn first_version_at_or_after(
    source: &dyn SubscriptionSource,
    stream: &crate::StreamName,
    min_position: u64,
) -> Result<u64> {
    let info = source.stream_info(stream).await?;
    let Some(last) = info.last_version else { return Ok(0) };
    if info.last_position.is_some_and(|p| p < min_position) {
        return Ok(last + 1);
    }
    let mut from = ReadFrom::End;
    loop {
        let page = match source
            .read_stream(
                stream,
                ReadStream { from, direction: Direction::Backward, limit: SUBSCRIPTION_BATCH },
            )
            .await
        {
            Ok(page) => page,
            Err(Error::StreamNotFound { .. }) => return Ok(info.truncate_before.max(last + 1)),
            Err(e) => return Err(e),
        };
        let mut candidate = None;
        for event in &page {
            if event.position < min_position {
                return Ok(event.version + 1);
            }
            candidate = Some(event.version);
        }
        match candidate {
            Some(0) | None => return Ok(candidate.unwrap_or(0)),
            Some(v) => from = ReadFrom::At(v - 1),
        }
    }
}
