//! [`Repository`]: loads aggregates and executes commands against a store.

mod snapshot;

use std::{marker::PhantomData, sync::Arc};

use annals_core::{
    AppendResult, EventData, ExpectedVersion, ReadStream, RecordedEvent, Store, StreamAppend, StreamName,
    Timestamp, metadata::keys,
};

use snapshot::{CommandWindow, Envelope, EnvelopeRef, SnapshotWriter};
pub use snapshot::{SnapshotPolicy, SnapshotWrites};

use crate::{Aggregate, CommandMetadata, Error, Result, SchemaRegistry, Upcasters, codec};

/// Events are read in pages of this many, so a long stream never needs one
/// huge allocation from the backend.
const PAGE: usize = 4_096;

/// The stream of aggregate `A` with this id: `{A::TYPE}-{id}`.
pub fn stream_name<A: Aggregate>(id: &str) -> Result<StreamName> {
    if A::TYPE.is_empty() || A::TYPE.contains('-') {
        // The category is everything before the first `-`; a type name
        // with a dash would put the aggregate's streams in another category.
        return Err(Error::InvalidId {
            reason: format!("aggregate type name '{}' must be non-empty and contain no '-'", A::TYPE),
        });
    }
    StreamName::new(format!("{}-{id}", A::TYPE)).map_err(|e| Error::InvalidId { reason: e.to_string() })
}

/// An aggregate's state as loaded.
#[derive(Debug, Clone)]
pub struct Loaded<A> {
    /// The folded state (`A::default()` when the stream has no events).
    pub state: A,
    /// Version of the last event folded in; `None` for a new aggregate.
    pub version: Option<u64>,
    /// Version of the snapshot the load started from, if one was used.
    pub snapshot_version: Option<u64>,
    commands: CommandWindow,
}

impl<A> Loaded<A> {
    /// The expectation an append after this load must carry.
    pub fn expected(&self) -> ExpectedVersion {
        self.version.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact)
    }
}

/// The outcome of [`Repository::execute`].
pub struct Executed<A: Aggregate> {
    /// The events the command produced (for a duplicate: the events the
    /// original execution produced, read back from the store).
    pub events: Vec<A::Event>,
    /// The aggregate's version after the command (for a duplicate: after
    /// the original execution); `None` if the aggregate still has no events.
    pub version: Option<u64>,
    /// Global position of the last event written, if any.
    pub position: Option<u64>,
    /// Whether this command id had already been executed, so nothing new
    /// was decided or written.
    pub duplicate: bool,
}

// Written by hand: a derive would demand `A: Clone + Debug` although only
// events are held.
impl<A: Aggregate> Clone for Executed<A> {
    fn clone(&self) -> Self {
        Executed {
            events: self.events.clone(),
            version: self.version,
            position: self.position,
            duplicate: self.duplicate,
        }
    }
}

impl<A: Aggregate> std::fmt::Debug for Executed<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executed")
            .field("events", &self.events)
            .field("version", &self.version)
            .field("position", &self.position)
            .field("duplicate", &self.duplicate)
            .finish()
    }
}

/// A decided command not yet written: for committing several aggregates in
/// one atomic [`annals_core::Appender::append_multi`].
#[derive(Debug)]
pub struct Decision<A: Aggregate> {
    /// The aggregate's stream.
    pub stream: StreamName,
    /// The expectation the append must carry (the loaded version).
    pub expected: ExpectedVersion,
    /// The decided events (for a duplicate: the original events).
    pub events: Vec<A::Event>,
    /// Whether the command id had already been executed on this aggregate;
    /// then [`Decision::append`] is `None`.
    pub duplicate: bool,
    data: Vec<EventData>,
    state: A,
    previous_count: u64,
    commands: CommandWindow,
    /// For a duplicate: the original events' first version and count.
    original: Option<(u64, u64)>,
}

impl<A: Aggregate> Decision<A> {
    /// The part to pass to `append_multi`, or `None` when there is nothing
    /// to write (no events, or a duplicate command).
    pub fn append(&self) -> Option<StreamAppend> {
        if self.duplicate || self.data.is_empty() {
            return None;
        }
        Some(StreamAppend::new(self.stream.clone(), self.expected, self.data.clone()))
    }

    /// The state after the decided events.
    pub fn state(&self) -> &A {
        &self.state
    }
}

/// Configures a [`Repository`].
pub struct RepositoryBuilder<A> {
    store: Arc<dyn Store>,
    max_retries: u32,
    snapshots: SnapshotPolicy,
    upcasters: Upcasters,
    schemas: Option<SchemaRegistry>,
    idempotency_window: usize,
    _aggregate: PhantomData<fn() -> A>,
}

impl<A: Aggregate> RepositoryBuilder<A> {
    /// How many times `execute` reloads and re-decides after losing an
    /// optimistic-concurrency race (default 10). Each retry runs `handle`
    /// again on fresh state.
    pub fn max_retries(mut self, n: u32) -> Self {
        self.max_retries = n;
        self
    }

    /// The snapshot policy (default: none).
    pub fn snapshots(mut self, policy: SnapshotPolicy) -> Self {
        self.snapshots = policy;
        self
    }

    /// Upcasters applied to every event read (default: none).
    pub fn upcasters(mut self, upcasters: Upcasters) -> Self {
        self.upcasters = upcasters;
        self
    }

    /// Validates every event against this registry before appending
    /// (default: no validation).
    pub fn schemas(mut self, registry: SchemaRegistry) -> Self {
        self.schemas = Some(registry);
        self
    }

    /// How many of an aggregate's most recent commands (those that wrote
    /// events) are remembered for duplicate detection (default 100).
    pub fn idempotency_window(mut self, n: usize) -> Self {
        self.idempotency_window = n;
        self
    }

    /// Builds the repository.
    pub fn build(self) -> Repository<A> {
        Repository {
            shared: Arc::new(Shared {
                store: self.store,
                max_retries: self.max_retries,
                snapshots: self.snapshots,
                upcasters: self.upcasters,
                schemas: self.schemas,
                idempotency_window: self.idempotency_window,
                writer: SnapshotWriter::default(),
                _aggregate: PhantomData,
            }),
        }
    }
}

/// Loads aggregates of type `A` and executes commands against them, over
/// any [`Store`]. Cheap to clone; clones share configuration and pending
/// snapshot writes.
///
/// # Concurrency
/// `execute` is optimistic: it appends with the version it loaded
/// (`NoStream` for a new aggregate) and, when another writer got there
/// first, reloads, re-decides and retries, at most
/// [`max_retries`](RepositoryBuilder::max_retries) times, then fails with
/// [`Error::Conflict`]. No update is ever lost.
///
/// # Idempotency
/// Every event written by a command carries the command id
/// (`command_id` metadata) and an id derived from (stream, command id,
/// index). Executing a command id that is among the aggregate's last
/// [`idempotency_window`](RepositoryBuilder::idempotency_window) commands
/// that wrote events does not call `handle` and writes nothing: it returns
/// the original events and version with `duplicate: true`. This also covers
/// a lost acknowledgement (the append committed but the caller saw an
/// error): the caller retries with the same command id and gets the
/// original outcome. Two concurrent executions of one command id write once
/// (the loser's append is either recognised by the store as an idempotent
/// re-send or conflicts, reloads and finds the command). Not covered:
/// commands older than the window, and commands that wrote no events or
/// were rejected, which leave no trace and are decided afresh. A command id
/// whose events were soft-deleted cannot write again (the store still knows
/// its event ids): `execute` fails with [`Error::InvalidMetadata`].
pub struct Repository<A> {
    shared: Arc<Shared<A>>,
}

impl<A> Clone for Repository<A> {
    fn clone(&self) -> Self {
        Repository { shared: self.shared.clone() }
    }
}

struct Shared<A> {
    store: Arc<dyn Store>,
    max_retries: u32,
    snapshots: SnapshotPolicy,
    upcasters: Upcasters,
    schemas: Option<SchemaRegistry>,
    idempotency_window: usize,
    writer: SnapshotWriter,
    _aggregate: PhantomData<fn() -> A>,
}

/// Where a load stops.
#[derive(Clone, Copy)]
enum Until {
    Latest,
    Version(u64),
    Time(Timestamp),
}

impl<A: Aggregate> Repository<A> {
    /// A repository with default settings.
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self::builder(store).build()
    }

    /// A builder to configure retries, snapshots, upcasters and schemas.
    pub fn builder(store: Arc<dyn Store>) -> RepositoryBuilder<A> {
        RepositoryBuilder {
            store,
            max_retries: 10,
            snapshots: SnapshotPolicy::never(),
            upcasters: Upcasters::new(),
            schemas: None,
            idempotency_window: 100,
            _aggregate: PhantomData,
        }
    }

    /// The store this repository writes to.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.shared.store
    }

    /// The upcasters applied on read.
    pub fn upcasters(&self) -> &Upcasters {
        &self.shared.upcasters
    }

    /// The stream of the aggregate with this id.
    pub fn stream(&self, id: &str) -> Result<StreamName> {
        stream_name::<A>(id)
    }

    /// The current state: from the newest usable snapshot, then the events
    /// after it. A snapshot with another `A::SNAPSHOT_VERSION`, one that
    /// does not decode, or one newer than the stream's last event is ignored
    /// (the state is rebuilt from events).
    pub async fn load(&self, id: &str) -> Result<Loaded<A>> {
        self.load_stream(&self.stream(id)?, Until::Latest).await
    }

    /// The state right after the event with version `version`. Fails with
    /// [`Error::VersionNotFound`] when the stream is shorter.
    pub async fn load_at_version(&self, id: &str, version: u64) -> Result<Loaded<A>> {
        let stream = self.stream(id)?;
        let loaded = self.load_stream(&stream, Until::Version(version)).await?;
        if loaded.version != Some(version) {
            return Err(Error::VersionNotFound { stream, requested: version, last: loaded.version });
        }
        Ok(loaded)
    }

    /// The state including every event recorded at or before `at`. Replays
    /// from the first event (snapshots record no event time).
    pub async fn load_at_time(&self, id: &str, at: Timestamp) -> Result<Loaded<A>> {
        self.load_stream(&self.stream(id)?, Until::Time(at)).await
    }

    /// Every event of the aggregate, decoded and upcast, with its record.
    pub async fn events(&self, id: &str) -> Result<Vec<(RecordedEvent, A::Event)>> {
        let stream = self.stream(id)?;
        let mut out = Vec::new();
        let mut from = 0;
        loop {
            let page = self.read_page(&stream, from, PAGE).await?;
            let len = page.len();
            for recorded in page {
                from = recorded.version + 1;
                let event = codec::decode(&recorded, &self.shared.upcasters)?;
                out.push((recorded, event));
            }
            if len < PAGE {
                return Ok(out);
            }
        }
    }

    /// Load → handle → append with the loaded version, retrying on
    /// conflicts. See the type's docs for the concurrency and idempotency
    /// guarantees. A snapshot due after the append is written as the policy
    /// says and never fails the command.
    pub async fn execute(
        &self,
        id: &str,
        command: &A::Command,
        metadata: &CommandMetadata,
    ) -> Result<Executed<A>, A::Error> {
        let attempts = self.shared.max_retries.saturating_add(1);
        for attempt in 1..=attempts {
            let decision = self.decide(id, command, metadata).await?;
            let Some(part) = decision.append() else {
                return self.unwritten_outcome(decision).await;
            };
            match self.shared.store.append(&part.stream, part.expected, part.events).await {
                Ok(result) if self.wrote_itself(&decision, &result).await => {
                    let position = Some(result.position);
                    let events = decision.events.clone();
                    let version = Some(result.last_version());
                    self.snapshot_if_due(decision, result).await;
                    return Ok(Executed { events, version, position, duplicate: false });
                }
                Ok(result) => {
                    if let Ok(info) = self.shared.store.stream_info(&part.stream).await
                        && result.next_version <= info.truncate_before
                    {
                        // The earlier append was soft-deleted since: the
                        // store keeps recognising its ids, so this command
                        // id can never be written to the stream again.
                        return Err(Error::InvalidMetadata {
                            reason: format!(
                                "command id '{}' already wrote events to '{}' that were deleted since; \
                                 use a new command id",
                                metadata.command_id, part.stream
                            ),
                        });
                    }
                    // The store took the append for a re-send of this
                    // command's earlier append (same event ids), which
                    // another writer made on newer state: nothing of this
                    // decision was written. Reloading finds the command and
                    // returns what the stream really holds.
                    tracing::debug!(stream = %part.stream, attempt, "the command was written meanwhile; reloading");
                }
                Err(annals_core::Error::WrongExpectedVersion { .. }) => {
                    tracing::debug!(stream = %part.stream, attempt, "lost a concurrency race; reloading");
                    // Let the winner finish before re-reading.
                    tokio::task::yield_now().await;
                }
                Err(e) => return Err(Error::Store(e)),
            }
        }
        Err(Error::Conflict { stream: self.stream(id).map_err(Error::widen)?, attempts })
    }

    /// Loads the aggregate and decides `command` without writing: for
    /// committing several aggregates atomically. Validates the events
    /// against the schema registry. After a successful `append_multi`, pass
    /// the decision and its result to [`Repository::committed`] so the
    /// snapshot policy runs.
    pub async fn decide(
        &self,
        id: &str,
        command: &A::Command,
        metadata: &CommandMetadata,
    ) -> Result<Decision<A>, A::Error> {
        let stream = self.stream(id).map_err(Error::widen)?;
        if metadata.command_id.trim().is_empty() {
            return Err(Error::InvalidMetadata { reason: "the command id must not be empty".into() });
        }
        let loaded = self.load_stream(&stream, Until::Latest).await.map_err(Error::widen)?;
        let expected = loaded.expected();
        let previous_count = loaded.version.map_or(0, |v| v + 1);
        if let Some(span) = loaded.commands.find(&metadata.command_id) {
            let (first, count) = (span.first_version, span.count);
            let events = self.read_decoded(&stream, first, count).await.map_err(Error::widen)?;
            return Ok(Decision {
                stream,
                expected,
                events,
                duplicate: true,
                data: Vec::new(),
                state: loaded.state,
                previous_count,
                commands: loaded.commands,
                original: Some((first, count)),
            });
        }
        let events = loaded.state.handle(command).map_err(Error::Rejected)?;
        let base = metadata.event_metadata();
        let mut data = Vec::with_capacity(events.len());
        for (index, event) in events.iter().enumerate() {
            let encoded = codec::encode(event).map_err(Error::widen)?;
            if let Some(schemas) = &self.shared.schemas {
                schemas
                    .validate(&encoded.event_type, encoded.schema_version, &encoded.payload)
                    .map_err(Error::widen)?;
            }
            data.push(
                codec::to_event_data(&encoded, metadata.event_id(&stream, index), &base)
                    .map_err(Error::widen)?,
            );
        }
        let mut state = loaded.state;
        events.iter().for_each(|event| state.apply(event));
        Ok(Decision {
            stream,
            expected,
            events,
            duplicate: false,
            data,
            state,
            previous_count,
            commands: loaded.commands,
            original: None,
        })
    }

    /// Tells the repository that `decision` was appended with `result`
    /// (by [`Repository::execute`] or by the caller's own `append_multi`),
    /// so a snapshot is written when the policy says one is due.
    ///
    /// When `result` is the store answering a re-send of an earlier append
    /// of the same command (its event ids were already there, written by
    /// another decision), no snapshot is written: the decision's state is
    /// not the stream's.
    pub async fn committed(&self, decision: Decision<A>, result: AppendResult) {
        if self.wrote_itself(&decision, &result).await {
            self.snapshot_if_due(decision, result).await;
        }
    }

    /// Whether `result` reports `decision`'s own events being written, as
    /// opposed to the store's idempotent-append rule recognising their ids
    /// (derived from the command id) as already written by another decision
    /// of the same command, possibly made on other state. When unsure
    /// (the stream cannot be inspected) it answers no, which only costs a
    /// reload or a snapshot.
    async fn wrote_itself(&self, decision: &Decision<A>, result: &AppendResult) -> bool {
        let count = decision.data.len() as u64;
        let Some(first) = result.next_version.checked_sub(count) else { return false };
        match decision.expected {
            // A fresh write lands right after the version the decision saw.
            ExpectedVersion::Exact(v) => v.checked_add(1) == Some(first),
            // A fresh creation starts at the first visible version: 0, or
            // where a soft delete left off. A re-send's events follow other
            // visible events or are hidden by a soft delete (also at 0).
            ExpectedVersion::NoStream => match self.shared.store.stream_info(&decision.stream).await {
                Ok(info) => info.truncate_before == first,
                Err(error) => {
                    tracing::warn!(stream = %decision.stream, %error, "cannot tell a write from a re-send");
                    false
                }
            },
            _ => true,
        }
    }

    async fn snapshot_if_due(&self, decision: Decision<A>, result: AppendResult) {
        let policy = self.shared.snapshots;
        if decision.duplicate || !policy.due(decision.previous_count, result.next_version) {
            return;
        }
        // The window is completed here, from the versions the store actually
        // assigned (they can differ from the loaded count after a soft delete).
        let mut commands = decision.commands;
        let count = decision.data.len() as u64;
        let first = result.next_version.saturating_sub(count);
        for (version, event) in (first..).zip(&decision.data) {
            commands.record(
                event.metadata.get_str(keys::COMMAND_ID),
                version,
                self.shared.idempotency_window,
            );
        }
        let envelope = EnvelopeRef { state: &decision.state, commands: &commands };
        let data = match serde_json::to_vec(&envelope) {
            Ok(data) => data,
            Err(error) => {
                tracing::warn!(stream = %decision.stream, %error, "aggregate state does not serialize; no snapshot");
                return;
            }
        };
        let snapshot = (decision.stream, result.last_version(), A::SNAPSHOT_VERSION, data);
        self.shared.writer.write(self.shared.store.clone(), policy, snapshot).await;
    }

    /// Waits until every background snapshot write started so far has
    /// finished (successfully or not). For tests and orderly shutdown.
    pub async fn flush_snapshots(&self) {
        self.shared.writer.flush().await;
    }

    async fn unwritten_outcome(&self, decision: Decision<A>) -> Result<Executed<A>, A::Error> {
        if !decision.duplicate {
            // The command decided that nothing happens.
            let version = decision.previous_count.checked_sub(1);
            return Ok(Executed { events: decision.events, version, position: None, duplicate: false });
        }
        let (version, position) = match decision.original {
            Some((first, count)) => {
                let last = first + count.saturating_sub(1);
                let recorded = self.read_page(&decision.stream, last, 1).await.map_err(Error::widen)?;
                (Some(last), recorded.first().map(|r| r.position))
            }
            None => (decision.previous_count.checked_sub(1), None),
        };
        Ok(Executed { events: decision.events, version, position, duplicate: true })
    }

    async fn read_decoded(&self, stream: &StreamName, first: u64, count: u64) -> Result<Vec<A::Event>> {
        let limit = usize::try_from(count).unwrap_or(usize::MAX);
        let page = self.read_page(stream, first, limit).await?;
        page.iter().map(|r| codec::decode(r, &self.shared.upcasters)).collect()
    }

    /// One page of events; a missing stream is an empty page.
    async fn read_page(&self, stream: &StreamName, from: u64, limit: usize) -> Result<Vec<RecordedEvent>> {
        let request = ReadStream::forward().from_version(from).limit(limit);
        match self.shared.store.read_stream(stream, request).await {
            Ok(events) => Ok(events),
            Err(annals_core::Error::StreamNotFound { .. }) => Ok(Vec::new()),
            Err(e) => Err(Error::Store(e)),
        }
    }

    async fn load_stream(&self, stream: &StreamName, until: Until) -> Result<Loaded<A>> {
        let mut loaded = match until {
            Until::Time(_) => None,
            Until::Latest => self.usable_snapshot(stream, None).await?,
            Until::Version(v) => self.usable_snapshot(stream, Some(v)).await?,
        }
        .unwrap_or_else(|| Loaded {
            state: A::default(),
            version: None,
            snapshot_version: None,
            commands: CommandWindow::default(),
        });
        let mut from = loaded.version.map_or(0, |v| v + 1);
        loop {
            let limit = match until {
                Until::Version(v) if v < from => return Ok(loaded),
                // `v - from + 1` overflows for `v == u64::MAX`.
                Until::Version(v) => {
                    usize::try_from(v - from).map_or(PAGE, |n| n.saturating_add(1)).min(PAGE)
                }
                _ => PAGE,
            };
            let page = self.read_page(stream, from, limit).await?;
            let len = page.len();
            for recorded in page {
                if let Until::Time(at) = until
                    && recorded.recorded_at > at
                {
                    return Ok(loaded);
                }
                let mut metadata = recorded.metadata.to_map();
                let stored_version = codec::stored_version(&recorded, metadata.get(keys::SCHEMA_VERSION))?;
                let command_id = match metadata.remove(keys::COMMAND_ID) {
                    Some(serde_json::Value::String(id)) => Some(id),
                    _ => None,
                };
                let event: A::Event = codec::decode_at(&recorded, stored_version, &self.shared.upcasters)?;
                loaded.state.apply(&event);
                loaded.commands.record(command_id, recorded.version, self.shared.idempotency_window);
                loaded.version = Some(recorded.version);
                from = recorded.version + 1;
            }
            if len < limit {
                return Ok(loaded);
            }
        }
    }

    /// The newest snapshot at or before `at_or_before` that this code can
    /// use, as a starting point.
    async fn usable_snapshot(
        &self,
        stream: &StreamName,
        at_or_before: Option<u64>,
    ) -> Result<Option<Loaded<A>>> {
        if !self.shared.snapshots.enabled() {
            return Ok(None);
        }
        let Some(snapshot) = self.shared.store.load_snapshot(stream, at_or_before).await? else {
            return Ok(None);
        };
        if snapshot.schema_version != A::SNAPSHOT_VERSION {
            tracing::debug!(%stream, stored = snapshot.schema_version, current = A::SNAPSHOT_VERSION,
                "ignoring a snapshot of another schema version");
            return Ok(None);
        }
        // A soft delete hides the versions a snapshot summarises; a stream
        // recreated after it must not start from the old state.
        let info = self.shared.store.stream_info(stream).await?;
        if !info.exists || snapshot.version < info.truncate_before {
            return Ok(None);
        }
        // A snapshot can outlive events it summarises (a restore of older
        // events, a log that recovered to an earlier point): starting from
        // it would report events that do not exist and make every append
        // expect a version the stream never reaches.
        if info.last_version.is_none_or(|last| snapshot.version > last) {
            tracing::warn!(%stream, version = snapshot.version, last = ?info.last_version,
                "ignoring a snapshot newer than the stream");
            return Ok(None);
        }
        match serde_json::from_slice::<Envelope<A>>(&snapshot.data) {
            Ok(envelope) => Ok(Some(Loaded {
                state: envelope.state,
                version: Some(snapshot.version),
                snapshot_version: Some(snapshot.version),
                commands: envelope.commands,
            })),
            Err(error) => {
                tracing::warn!(%stream, version = snapshot.version, %error, "ignoring a snapshot that does not decode");
                Ok(None)
            }
        }
    }
}
