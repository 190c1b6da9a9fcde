//! Capability traits. A backend implements the small traits; callers ask for
//! the umbrella they need ([`EventStore`] or [`Store`]).
//!
//! All traits are object safe (`Arc<dyn Store>` works) and `Send + Sync`.

use std::pin::Pin;

use async_trait::async_trait;
use futures::Stream;

use crate::{
    AllSlice, AppendResult, DeleteMode, EventData, ExpectedVersion, ListStreams, ReadAll, ReadStream,
    RecordedEvent, Result, Snapshot, StoreStats, StreamAppend, StreamInfo, StreamName, SubscriptionRequest,
};

/// A live, in-order stream of recorded events (or the error that ended it).
pub type EventStream = Pin<Box<dyn Stream<Item = Result<RecordedEvent>> + Send + 'static>>;

/// Writing events.
#[async_trait]
pub trait Appender: Send + Sync {
    /// Appends `events` to one stream, all or nothing.
    ///
    /// Order of checks: tombstone ([`crate::Error::StreamDeleted`]), then
    /// idempotency (if the ids of `events` are exactly the ids of the stream's
    /// last `events.len()` events, the original result is returned and nothing
    /// is written), then `expected`
    /// ([`crate::Error::WrongExpectedVersion`]). Returns once the events are
    /// durable according to the backend's durability setting.
    async fn append(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        events: Vec<EventData>,
    ) -> Result<AppendResult> {
        // One stream is a one-part transaction: backends implement the rules
        // once, in `append_multi`.
        let mut results =
            self.append_multi(vec![StreamAppend::new(stream.clone(), expected, events)]).await?;
        results.pop().ok_or_else(|| crate::Error::invalid("an append needs at least one event"))
    }

    /// Appends to several streams atomically, each with its own expectation:
    /// either every part is written (at consecutive global positions, in the
    /// order given) or none is. Each part follows the rules of
    /// [`Appender::append`]; a part that is an idempotent re-send writes
    /// nothing and reports its original result. Results come back in the
    /// order of `parts`. A stream may appear only once.
    async fn append_multi(&self, parts: Vec<StreamAppend>) -> Result<Vec<AppendResult>>;

    /// Whether the store can take writes now: `Err` with the reason when it
    /// cannot (poisoned after an I/O failure, closed, backend unreachable).
    /// Readiness probes call it, so it must be cheap and must not write.
    /// The default says healthy; backends that can know better override it.
    async fn health(&self) -> Result<()> {
        Ok(())
    }
}

/// Reading single streams.
#[async_trait]
pub trait StreamReader: Send + Sync {
    /// Reads up to `request.limit` events of one stream. Fails with
    /// [`crate::Error::StreamNotFound`] when the stream does not exist or was
    /// soft-deleted, [`crate::Error::StreamDeleted`] when tombstoned. A
    /// forward read starting past the end returns an empty list.
    async fn read_stream(&self, stream: &StreamName, request: ReadStream) -> Result<Vec<RecordedEvent>>;

    /// What the store knows about a stream (never fails for a valid name
    /// that was never written: `exists` is `false`).
    async fn stream_info(&self, stream: &StreamName) -> Result<StreamInfo>;
}

/// Reading the global log.
#[async_trait]
pub trait AllReader: Send + Sync {
    /// Reads a page of `$all`: events of every stream (including soft-deleted
    /// ones, until scavenged), in position order, filtered.
    async fn read_all(&self, request: ReadAll) -> Result<AllSlice>;

    /// The position the next committed event will get (= number of events
    /// ever committed). `0` for an empty store.
    async fn next_position(&self) -> Result<u64>;

    /// Lists streams that have events (deleted ones included, with their
    /// state) in byte order of their names: those matching
    /// `request.prefix`, sorting after `request.after`, at most
    /// `request.limit` of them. Page on by passing the last name as `after`.
    ///
    /// The default scans all of `$all` (cost grows with the number of
    /// events) and, knowing only what `$all` shows, reports every stream it
    /// finds as live; backends with a stream index override it.
    async fn list_streams(&self, request: ListStreams) -> Result<Vec<StreamInfo>> {
        list_streams_by_scan(self, &request).await
    }

    /// Figures about the whole store that the backend knows without
    /// scanning `$all`: counts of events by type (with exactly the meaning
    /// of a full `$all` scan including system streams, see
    /// [`StoreStats::events_by_type`]) and the size on disk.
    ///
    /// Must cost far less than reading every event (an in-memory index, a
    /// catalogue query); a field the backend cannot answer that way stays
    /// `None`. The default knows nothing; backends override it.
    async fn store_stats(&self) -> Result<StoreStats> {
        Ok(StoreStats::unknown())
    }
}

/// [`AllReader::list_streams`] by scanning `$all`, keeping only the
/// `request.limit` smallest matching names in memory.
pub async fn list_streams_by_scan<R: AllReader + ?Sized>(
    reader: &R,
    request: &ListStreams,
) -> Result<Vec<StreamInfo>> {
    request.validate()?;
    let mut found: std::collections::BTreeMap<String, (StreamName, u64, u64)> = Default::default();
    if request.limit == 0 {
        return Ok(Vec::new());
    }
    let head = reader.next_position().await?;
    let filter = crate::Filter {
        stream_prefix: request.prefix.clone(),
        include_system: request.include_system,
        ..Default::default()
    };
    let mut from = 0u64;
    while from < head {
        let slice =
            reader.read_all(ReadAll::forward(4096).from_position(from).filter(filter.clone())).await?;
        for e in slice.events.iter().filter(|e| e.position < head) {
            let name = e.stream.as_str();
            if !request.matches(name) {
                continue;
            }
            match found.get_mut(name) {
                Some(entry) => (entry.1, entry.2) = (e.version, e.position),
                None => {
                    found.insert(name.to_owned(), (e.stream.clone(), e.version, e.position));
                    if found.len() > request.limit {
                        found.pop_last();
                    }
                }
            }
        }
        let next = slice.next.unwrap_or(head);
        if next <= from {
            break;
        }
        from = next;
    }
    Ok(found
        .into_values()
        .map(|(stream, version, position)| {
            crate::StreamState {
                last_version: Some(version),
                last_position: Some(position),
                truncate_before: 0,
                tombstoned: false,
            }
            .info(&stream)
        })
        .collect())
}

/// Catch-up subscriptions.
pub trait Subscriber: Send + Sync {
    /// History from `request.from`, then live events, in order, each exactly
    /// once. Never blocks writers and never skips an event: a subscriber that
    /// is slow simply reads further behind from storage. The stream ends with
    /// an error when the store closes or the stream is tombstoned.
    fn subscribe(&self, request: SubscriptionRequest) -> EventStream;
}

/// Deleting streams.
#[async_trait]
pub trait StreamDeleter: Send + Sync {
    /// Soft delete: the stream reads as not found and can be recreated with
    /// `ExpectedVersion::NoStream`, continuing its version numbering. Hard
    /// delete: a tombstone; every later append or read fails with
    /// [`crate::Error::StreamDeleted`]. `expected` is checked as for appends.
    async fn delete_stream(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        mode: DeleteMode,
    ) -> Result<()>;
}

/// Snapshots of state derived from a stream.
#[async_trait]
pub trait SnapshotStore: Send + Sync {
    /// Saves (or replaces) the snapshot for `(stream, version)`.
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()>;

    /// The newest snapshot of `stream` whose version is `<= at_or_before`
    /// (or the newest of all when `None`).
    async fn load_snapshot(&self, stream: &StreamName, at_or_before: Option<u64>)
    -> Result<Option<Snapshot>>;

    /// Keeps the newest `keep_last` snapshots of `stream`, deletes the rest;
    /// returns how many were deleted.
    async fn prune_snapshots(&self, stream: &StreamName, keep_last: usize) -> Result<usize>;
}

/// Named checkpoints (e.g. a projection's last processed position).
#[async_trait]
pub trait CheckpointStore: Send + Sync {
    /// The stored value, if any.
    async fn load_checkpoint(&self, name: &str) -> Result<Option<u64>>;

    /// Stores `position` under `name` (1–256 bytes, no control characters).
    /// A position above [`MAX_STORED_NUMBER`] is refused
    /// ([`Error::InvalidInput`](crate::Error::InvalidInput)), never clamped.
    async fn save_checkpoint(&self, name: &str, position: u64) -> Result<()>;
}

/// Everything about events: append, read, subscribe, delete.
pub trait EventStore: Appender + StreamReader + AllReader + Subscriber + StreamDeleter {}
impl<T: Appender + StreamReader + AllReader + Subscriber + StreamDeleter + ?Sized> EventStore for T {}

/// A full store: events plus snapshots and checkpoints. Every backend
/// implements this and passes `annals-conformance`.
pub trait Store: EventStore + SnapshotStore + CheckpointStore {}
impl<T: EventStore + SnapshotStore + CheckpointStore + ?Sized> Store for T {}

/// The largest position or version a store keeps: 2^63 − 1, PostgreSQL's
/// `bigint`, so that every backend keeps the same numbers. No log comes
/// near it; a checkpoint or snapshot naming a larger one is refused.
pub const MAX_STORED_NUMBER: u64 = i64::MAX as u64;

/// Refuses `value` above [`MAX_STORED_NUMBER`]; `what` names it in the
/// error (shared by backends, before anything is written).
pub fn validate_stored_number(what: &str, value: u64) -> Result<()> {
    if value > MAX_STORED_NUMBER {
        return Err(crate::Error::invalid(format!(
            "{what} {value} is above {MAX_STORED_NUMBER}, the largest a store keeps"
        )));
    }
    Ok(())
}

/// Validates a checkpoint name (shared by backends).
pub fn validate_checkpoint_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > 256 {
        return Err(crate::Error::invalid(format!(
            "checkpoint name must be 1–256 bytes, got {}",
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(crate::Error::invalid("checkpoint name contains a control character"));
    }
    Ok(())
}
