//! `MemoryStore`: the reference backend. Everything lives in one
//! `RwLock`-protected structure; it defines correct behaviour for the
//! conformance suite and serves tests and prototypes.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use async_trait::async_trait;
use tokio::sync::watch;
use uuid::Uuid;

use crate::{
    AllReader, AllSlice, AppendDecision, AppendResult, Appender, CheckpointStore, DeleteMode, Direction,
    Error, EventData, EventStream, ExpectedVersion, Limits, ListStreams, ReadAll, ReadFrom, ReadStream,
    RecordedEvent, Result, Snapshot, SnapshotStore, StoreStats, StreamAppend, StreamDeleter, StreamInfo,
    StreamName, StreamReader, StreamState, Subscriber, SubscriptionRequest, Timestamp, subscription,
    validate_checkpoint_name, validate_stored_number,
};

/// An in-memory event store. Cheap to clone (shared handle); fully
/// concurrent; nothing survives the process.
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    state: RwLock<State>,
    head: watch::Sender<u64>,
    limits: Limits,
    leases: crate::LocalLeases,
}

#[derive(Default)]
struct State {
    log: Vec<RecordedEvent>,
    streams: HashMap<StreamName, StreamEntry>,
    snapshots: HashMap<StreamName, BTreeMap<u64, Snapshot>>,
    checkpoints: HashMap<String, u64>,
    /// Events in `log` per event type (deletes never remove events).
    types: HashMap<String, u64>,
}

#[derive(Default)]
struct StreamEntry {
    state: StreamState,
    /// Position of each version; index = version.
    positions: Vec<u64>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store with default limits.
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// An empty store with the given limits.
    pub fn with_limits(limits: Limits) -> Self {
        let (head, _) = watch::channel(0);
        MemoryStore {
            inner: Arc::new(Inner {
                state: RwLock::new(State::default()),
                head,
                limits,
                leases: crate::LocalLeases::new(),
            }),
        }
    }
}

impl Inner {
    fn read(&self) -> Result<RwLockReadGuard<'_, State>> {
        self.state.read().map_err(|_| Error::Poisoned { reason: "a writer panicked".into() })
    }

    fn write(&self) -> Result<RwLockWriteGuard<'_, State>> {
        self.state.write().map_err(|_| Error::Poisoned { reason: "a writer panicked".into() })
    }

    fn append_parts(&self, parts: Vec<StreamAppend>) -> Result<Vec<AppendResult>> {
        self.limits.check_parts(&parts)?;
        let mut state = self.write()?;
        // Decide every part before writing anything: all or nothing.
        let mut decisions = Vec::with_capacity(parts.len());
        for part in &parts {
            let entry = state.streams.get(&part.stream);
            let stream_state = entry.map(|e| e.state).unwrap_or_default();
            let ids: Vec<Uuid> = part.events.iter().map(|e| e.id).collect();
            let decision = stream_state.decide(&part.stream, part.expected, &ids, |n| {
                Ok(entry.and_then(|e| tail_ids(&state.log, &e.positions, n)))
            })?;
            decisions.push(decision);
        }
        let recorded_at = Timestamp::now();
        let mut results = Vec::with_capacity(parts.len());
        for (part, decision) in parts.into_iter().zip(decisions) {
            match decision {
                AppendDecision::AlreadyWritten(result) => results.push(result),
                AppendDecision::Write { first_version } => {
                    let mut version = first_version;
                    let mut position = state.log.len() as u64;
                    let mut written = Vec::with_capacity(part.events.len());
                    for event in part.events {
                        match state.types.get_mut(&event.event_type) {
                            Some(n) => *n += 1,
                            None => {
                                state.types.insert(event.event_type.clone(), 1);
                            }
                        }
                        position = state.log.len() as u64;
                        state.log.push(record(&part.stream, version, position, recorded_at, event));
                        written.push(position);
                        version += 1;
                    }
                    let entry = state.streams.entry(part.stream).or_default();
                    entry.positions.extend(written);
                    entry.state.last_version = Some(version - 1);
                    entry.state.last_position = Some(position);
                    results.push(AppendResult { next_version: version, position });
                }
            }
        }
        let next = state.log.len() as u64;
        drop(state);
        // Published after the events are readable (see `subscription`).
        // Only ever raised: a concurrent append that took the lock later
        // may have published a larger head already, and lowering it would
        // have a subscription from `End` start before events acknowledged
        // to their writers (a larger head woke everyone anyway).
        self.head.send_if_modified(|head| {
            let raised = next > *head;
            if raised {
                *head = next;
            }
            raised
        });
        Ok(results)
    }

    fn read_stream(&self, stream: &StreamName, request: ReadStream) -> Result<Vec<RecordedEvent>> {
        let state = self.read()?;
        let Some(entry) = state.streams.get(stream) else {
            return Err(Error::StreamNotFound { stream: stream.clone() });
        };
        let versions = entry.state.versions_to_read(stream, &request)?;
        Ok(versions
            .filter_map(|v| usize::try_from(v).ok())
            .filter_map(|v| entry.positions.get(v))
            .filter_map(|p| usize::try_from(*p).ok())
            .filter_map(|p| state.log.get(p).cloned())
            .collect())
    }

    fn read_all(&self, request: &ReadAll) -> Result<AllSlice> {
        request.filter.validate()?;
        let state = self.read()?;
        let len = state.log.len() as u64;
        let mut events = Vec::new();
        match request.direction {
            Direction::Forward => {
                let mut pos = match request.from {
                    ReadFrom::Start => 0,
                    ReadFrom::End => len,
                    ReadFrom::At(p) => p.min(len),
                };
                while pos < len && events.len() < request.limit {
                    if let Some(e) = usize::try_from(pos).ok().and_then(|i| state.log.get(i))
                        && request.filter.matches(e)
                    {
                        events.push(e.clone());
                    }
                    pos += 1;
                }
                Ok(AllSlice { events, next: Some(pos) })
            }
            Direction::Backward => {
                if len == 0 {
                    return Ok(AllSlice { events, next: None });
                }
                let mut pos = match request.from {
                    ReadFrom::Start | ReadFrom::End => Some(len - 1),
                    ReadFrom::At(p) => Some(p.min(len - 1)),
                };
                while let Some(p) = pos {
                    if events.len() >= request.limit {
                        break;
                    }
                    if let Some(e) = usize::try_from(p).ok().and_then(|i| state.log.get(i))
                        && request.filter.matches(e)
                    {
                        events.push(e.clone());
                    }
                    pos = p.checked_sub(1);
                }
                Ok(AllSlice { events, next: pos })
            }
        }
    }
}

fn record(
    stream: &StreamName,
    version: u64,
    position: u64,
    recorded_at: Timestamp,
    e: EventData,
) -> RecordedEvent {
    RecordedEvent {
        stream: stream.clone(),
        version,
        position,
        id: e.id,
        event_type: e.event_type,
        data: e.data,
        content_type: e.content_type,
        metadata: e.metadata,
        recorded_at,
    }
}

fn tail_ids(log: &[RecordedEvent], positions: &[u64], n: usize) -> Option<(Vec<Uuid>, u64)> {
    let start = positions.len().checked_sub(n)?;
    let tail = positions.get(start..)?;
    let ids = tail
        .iter()
        .map(|p| usize::try_from(*p).ok().and_then(|i| log.get(i)).map(|e| e.id))
        .collect::<Option<Vec<_>>>()?;
    Some((ids, *tail.last()?))
}

#[async_trait]
impl Appender for MemoryStore {
    async fn append_multi(&self, parts: Vec<StreamAppend>) -> Result<Vec<AppendResult>> {
        self.inner.append_parts(parts)
    }
}

#[async_trait]
impl StreamReader for MemoryStore {
    async fn read_stream(&self, stream: &StreamName, request: ReadStream) -> Result<Vec<RecordedEvent>> {
        self.inner.read_stream(stream, request)
    }

    async fn stream_info(&self, stream: &StreamName) -> Result<StreamInfo> {
        let state = self.inner.read()?;
        Ok(state.streams.get(stream).map(|e| e.state).unwrap_or_default().info(stream))
    }
}

#[async_trait]
impl StreamReader for Inner {
    async fn read_stream(&self, stream: &StreamName, request: ReadStream) -> Result<Vec<RecordedEvent>> {
        Inner::read_stream(self, stream, request)
    }

    async fn stream_info(&self, stream: &StreamName) -> Result<StreamInfo> {
        let state = self.read()?;
        Ok(state.streams.get(stream).map(|e| e.state).unwrap_or_default().info(stream))
    }
}

#[async_trait]
impl AllReader for MemoryStore {
    async fn read_all(&self, request: ReadAll) -> Result<AllSlice> {
        self.inner.read_all(&request)
    }

    async fn next_position(&self) -> Result<u64> {
        Ok(self.inner.read()?.log.len() as u64)
    }

    async fn list_streams(&self, request: ListStreams) -> Result<Vec<StreamInfo>> {
        request.validate()?;
        let state = self.inner.read()?;
        let mut found: Vec<(&StreamName, &StreamEntry)> = state
            .streams
            .iter()
            .filter(|(name, e)| e.state.last_version.is_some() && request.matches(name.as_str()))
            .collect();
        // Only the page is sorted: select its names first.
        if found.len() > request.limit {
            found.select_nth_unstable_by(request.limit, |a, b| a.0.as_str().cmp(b.0.as_str()));
            found.truncate(request.limit);
        }
        found.sort_unstable_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
        Ok(found.into_iter().map(|(name, e)| e.state.info(name)).collect())
    }

    /// Counts by type from a map kept on append; no disk, so no disk bytes.
    async fn store_stats(&self) -> Result<StoreStats> {
        let state = self.inner.read()?;
        let counts = state.types.iter().map(|(t, n)| (t.clone(), *n)).collect();
        Ok(StoreStats::unknown().with_events_by_type(counts))
    }
}

#[async_trait]
impl AllReader for Inner {
    async fn read_all(&self, request: ReadAll) -> Result<AllSlice> {
        Inner::read_all(self, &request)
    }

    async fn next_position(&self) -> Result<u64> {
        Ok(self.read()?.log.len() as u64)
    }
}

impl Subscriber for MemoryStore {
    fn subscribe(&self, request: SubscriptionRequest) -> EventStream {
        subscription::catch_up(self.inner.clone(), self.inner.head.subscribe(), request)
    }
}

#[async_trait]
impl StreamDeleter for MemoryStore {
    async fn delete_stream(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        mode: DeleteMode,
    ) -> Result<()> {
        let mut state = self.inner.write()?;
        // Checked before an entry is made: a refused delete of a stream
        // never written must leave nothing behind (each would otherwise
        // keep an entry for good, a leak any caller can drive).
        let current = state.streams.get(stream).map(|e| e.state).unwrap_or_default();
        current.check_delete(stream, expected, mode == DeleteMode::Hard)?;
        let entry = state.streams.entry(stream.clone()).or_default();
        match mode {
            DeleteMode::Soft => entry.state.truncate_before = entry.state.next_version(),
            DeleteMode::Hard => entry.state.tombstoned = true,
        }
        drop(state);
        // Wake the subscriptions although the head did not move, so a live
        // subscriber of this stream reads it and learns of a tombstone now,
        // not at the next append.
        self.inner.head.send_modify(|_| {});
        Ok(())
    }
}

#[async_trait]
impl SnapshotStore for MemoryStore {
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        validate_stored_number("snapshot version", snapshot.version)?;
        let mut state = self.inner.write()?;
        state.snapshots.entry(snapshot.stream.clone()).or_default().insert(snapshot.version, snapshot);
        Ok(())
    }

    async fn load_snapshot(
        &self,
        stream: &StreamName,
        at_or_before: Option<u64>,
    ) -> Result<Option<Snapshot>> {
        let state = self.inner.read()?;
        Ok(state
            .snapshots
            .get(stream)
            .and_then(|m| m.range(..=at_or_before.unwrap_or(u64::MAX)).next_back())
            .map(|(_, s)| s.clone()))
    }

    async fn prune_snapshots(&self, stream: &StreamName, keep_last: usize) -> Result<usize> {
        let mut state = self.inner.write()?;
        let Some(map) = state.snapshots.get_mut(stream) else { return Ok(0) };
        let excess = map.len().saturating_sub(keep_last);
        let doomed: Vec<u64> = map.keys().take(excess).copied().collect();
        for v in &doomed {
            map.remove(v);
        }
        Ok(doomed.len())
    }
}

#[async_trait]
impl CheckpointStore for MemoryStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<u64>> {
        validate_checkpoint_name(name)?;
        Ok(self.inner.read()?.checkpoints.get(name).copied())
    }

    async fn save_checkpoint(&self, name: &str, position: u64) -> Result<()> {
        validate_checkpoint_name(name)?;
        validate_stored_number("checkpoint position", position)?;
        self.inner.write()?.checkpoints.insert(name.to_owned(), position);
        Ok(())
    }
}

/// The store lives in one process: leases are local ([`crate::LocalLeases`]).
#[async_trait]
impl crate::Leases for MemoryStore {
    async fn try_lease_as(&self, name: &str, holder: &str) -> Result<Option<crate::Lease>> {
        self.inner.leases.try_lease_as(name, holder).await
    }

    async fn holder(&self, name: &str) -> Result<Option<String>> {
        self.inner.leases.holder(name).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ExpectedVersion;

    /// Refused deletes of streams never written (the 404s and 409s an HTTP
    /// client can send in a loop) keep no entry each.
    #[tokio::test]
    async fn refused_deletes_of_unknown_streams_leave_nothing_behind() {
        let store = MemoryStore::new();
        for n in 0..100 {
            let s = StreamName::new(format!("ghost-{n}")).unwrap();
            let soft = store.delete_stream(&s, ExpectedVersion::Any, DeleteMode::Soft).await;
            assert!(matches!(soft, Err(Error::StreamNotFound { .. })), "{soft:?}");
            let hard = store.delete_stream(&s, ExpectedVersion::Exact(3), DeleteMode::Hard).await;
            assert!(matches!(hard, Err(Error::WrongExpectedVersion { .. })), "{hard:?}");
        }
        assert_eq!(store.inner.read().unwrap().streams.len(), 0);
        // A hard delete that succeeds still keeps its tombstone.
        let s = StreamName::new("ghost-x").unwrap();
        store.delete_stream(&s, ExpectedVersion::Any, DeleteMode::Hard).await.unwrap();
        let err = store.append(&s, ExpectedVersion::Any, vec![EventData::json("E", &1).unwrap()]).await;
        assert!(matches!(err, Err(Error::StreamDeleted { .. })), "{err:?}");
    }
}
