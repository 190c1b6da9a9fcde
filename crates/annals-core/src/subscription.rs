//! The catch-up subscription loop shared by backends.
//!
//! Design: there is no per-subscriber live buffer to overflow. The writer
//! publishes the log's next position on a `tokio::sync::watch` channel after
//! every commit; a subscriber reads committed events from storage in batches
//! and, when it has caught up, waits for that value to change. A slow
//! subscriber therefore never blocks a writer (a `watch` send never waits)
//! and can never lose an event (it only ever reads committed history).

use std::{collections::VecDeque, sync::Arc};

use futures::stream;
use tokio::sync::watch;

use crate::{
    AllReader, Direction, Error, EventStream, ReadAll, ReadFrom, ReadStream, RecordedEvent, Result,
    StreamReader, SubscribeFrom, SubscriptionRequest, SubscriptionTarget,
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
    target: SubscriptionTarget,
    cursor: Cursor,
    buffer: VecDeque<RecordedEvent>,
    done: bool,
}

/// Builds a catch-up subscription over `source`, woken by `head`, which
/// carries the log's next position and is updated after every commit.
/// Dropping the returned stream stops it; nothing is left running.
pub fn catch_up(
    source: Arc<dyn SubscriptionSource>,
    head: watch::Receiver<u64>,
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
    let state = State { source, head, target: request.target, cursor, buffer: VecDeque::new(), done: false };
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
            st.head.borrow_and_update();
            match fetch(&mut st).await {
                Ok(true) => continue,
                Ok(false) => {
                    if st.head.changed().await.is_err() {
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
            st.buffer.extend(events);
            Ok(!st.buffer.is_empty())
        }
        (SubscriptionTarget::All(_), _) => {
            Err(Error::invalid("subscription cursor out of step with its target"))
        }
    }
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
