//! Requests and answers of the store API: versions, reads, filters, deletes.

use std::{collections::BTreeMap, fmt};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{EventData, RecordedEvent, StreamName, Timestamp, stream_name::category_of};

/// What the caller believes about a stream before appending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "version")]
pub enum ExpectedVersion {
    /// No check.
    Any,
    /// The stream must not exist (never written, or soft-deleted).
    NoStream,
    /// The stream must exist.
    StreamExists,
    /// The stream's last event must have exactly this version.
    Exact(u64),
}

impl ExpectedVersion {
    /// Whether a stream whose last version is `actual` (`None` = no stream)
    /// satisfies this expectation.
    pub fn matches(self, actual: Option<u64>) -> bool {
        match self {
            ExpectedVersion::Any => true,
            ExpectedVersion::NoStream => actual.is_none(),
            ExpectedVersion::StreamExists => actual.is_some(),
            ExpectedVersion::Exact(v) => actual == Some(v),
        }
    }
}

impl fmt::Display for ExpectedVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExpectedVersion::Any => f.write_str("any"),
            ExpectedVersion::NoStream => f.write_str("no stream"),
            ExpectedVersion::StreamExists => f.write_str("stream exists"),
            ExpectedVersion::Exact(v) => write!(f, "{v}"),
        }
    }
}

/// The outcome of a successful append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct AppendResult {
    /// The version the next event appended to this stream will get (the
    /// stream's last version + 1).
    pub next_version: u64,
    /// Global position of the last event written by this append.
    pub position: u64,
}

impl AppendResult {
    /// The stream's last version after this append.
    pub fn last_version(&self) -> u64 {
        self.next_version.saturating_sub(1)
    }

    /// The expectation to pass to the next append for optimistic concurrency.
    pub fn expected(&self) -> ExpectedVersion {
        ExpectedVersion::Exact(self.last_version())
    }
}

/// One stream's part of a multi-stream (atomic) append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAppend {
    /// Target stream.
    pub stream: StreamName,
    /// Its expected version.
    pub expected: ExpectedVersion,
    /// Events to write to it (at least one).
    pub events: Vec<EventData>,
}

impl StreamAppend {
    /// Convenience constructor.
    pub fn new(stream: StreamName, expected: ExpectedVersion, events: Vec<EventData>) -> Self {
        StreamAppend { stream, expected, events }
    }
}

/// Read direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Oldest first.
    #[default]
    Forward,
    /// Newest first.
    Backward,
}

/// Where a read starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReadFrom {
    /// The first event (forward) — for backward reads, same as `End`.
    Start,
    /// The last event (backward) — for forward reads, yields nothing.
    End,
    /// This version (stream reads) or position (`$all` reads), inclusive.
    At(u64),
}

/// Reading one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadStream {
    /// Where to start.
    pub from: ReadFrom,
    /// Which way.
    pub direction: Direction,
    /// At most this many events.
    pub limit: usize,
}

impl ReadStream {
    /// Everything, oldest first (`limit` = `usize::MAX`).
    pub fn forward() -> Self {
        ReadStream { from: ReadFrom::Start, direction: Direction::Forward, limit: usize::MAX }
    }

    /// Everything, newest first.
    pub fn backward() -> Self {
        ReadStream { from: ReadFrom::End, direction: Direction::Backward, limit: usize::MAX }
    }

    /// Starting at this version (inclusive).
    pub fn from_version(mut self, version: u64) -> Self {
        self.from = ReadFrom::At(version);
        self
    }

    /// At most `limit` events.
    pub fn limit(mut self, limit: usize) -> Self {
        self.limit = limit;
        self
    }
}

/// Which events of `$all` a read or subscription wants. Empty = all. All
/// set criteria must match (AND); within `event_types` any may match (OR).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// Stream name starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_prefix: Option<String>,
    /// Stream category equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Event type matches one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub event_types: Vec<TypeMatch>,
    /// Metadata `correlation_id` equals this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Recorded at or after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_after: Option<Timestamp>,
    /// Recorded strictly before this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recorded_before: Option<Timestamp>,
    /// Include `$`-prefixed system streams (excluded by default).
    #[serde(default)]
    pub include_system: bool,
}

/// How an event type is matched.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TypeMatch {
    /// Equal to this.
    Exact(String),
    /// Starting with this.
    Prefix(String),
}

impl TypeMatch {
    /// Whether `event_type` matches.
    pub fn matches(&self, event_type: &str) -> bool {
        match self {
            TypeMatch::Exact(t) => event_type == t,
            TypeMatch::Prefix(p) => event_type.starts_with(p.as_str()),
        }
    }
}

impl Filter {
    /// Matches every user event.
    pub fn all() -> Self {
        Filter::default()
    }

    /// Only streams of this category.
    pub fn category(category: impl Into<String>) -> Self {
        Filter { category: Some(category.into()), ..Filter::default() }
    }

    /// Only streams whose name starts with this.
    pub fn stream_prefix(prefix: impl Into<String>) -> Self {
        Filter { stream_prefix: Some(prefix.into()), ..Filter::default() }
    }

    /// Only events of exactly this type.
    pub fn event_type(event_type: impl Into<String>) -> Self {
        Filter { event_types: vec![TypeMatch::Exact(event_type.into())], ..Filter::default() }
    }

    /// Only events whose type starts with this.
    pub fn event_type_prefix(prefix: impl Into<String>) -> Self {
        Filter { event_types: vec![TypeMatch::Prefix(prefix.into())], ..Filter::default() }
    }

    /// Only events with this correlation id.
    pub fn correlation_id(id: impl Into<String>) -> Self {
        Filter { correlation_id: Some(id.into()), ..Filter::default() }
    }

    /// Also include system streams.
    pub fn with_system(mut self) -> Self {
        self.include_system = true;
        self
    }

    /// Refuses criteria no event can meet because of how they are written:
    /// a control character in a prefix, category, type or correlation id
    /// (stream names, event types and correlation ids never contain one,
    /// and PostgreSQL cannot even take NUL as a parameter), or an empty
    /// correlation id (one set to `""` counts as none). Every backend
    /// checks this before reading, so they all answer the same
    /// [`Error::InvalidInput`](crate::Error::InvalidInput).
    pub fn validate(&self) -> crate::Result<()> {
        no_control("filter stream_prefix", self.stream_prefix.as_deref())?;
        no_control("filter category", self.category.as_deref())?;
        for t in &self.event_types {
            let (TypeMatch::Exact(v) | TypeMatch::Prefix(v)) = t;
            no_control("filter event type", Some(v))?;
        }
        if self.correlation_id.as_deref() == Some("") {
            // Backends index no empty id (the log format stores "" for
            // none), so nothing could match: say so rather than differ.
            return Err(crate::Error::invalid(
                "filter correlation_id is empty; an empty correlation id counts as none, leave the criterion out",
            ));
        }
        no_control("filter correlation_id", self.correlation_id.as_deref())
    }

    /// Whether the filter selects every user event (no criteria).
    pub fn is_unfiltered(&self) -> bool {
        self.stream_prefix.is_none()
            && self.category.is_none()
            && self.event_types.is_empty()
            && self.correlation_id.is_none()
            && self.recorded_after.is_none()
            && self.recorded_before.is_none()
    }

    /// Whether a recorded event passes the filter. Backends may use indexes
    /// to avoid calling this on every event, but must select exactly the
    /// events for which it returns `true`.
    pub fn matches(&self, event: &RecordedEvent) -> bool {
        let name = event.stream.as_str();
        if !self.include_system && name.starts_with('$') {
            return false;
        }
        if self.stream_prefix.as_ref().is_some_and(|p| !name.starts_with(p.as_str())) {
            return false;
        }
        if self.category.as_ref().is_some_and(|c| category_of(name) != c) {
            return false;
        }
        if !self.event_types.is_empty() && !self.event_types.iter().any(|t| t.matches(&event.event_type)) {
            return false;
        }
        if self.recorded_after.is_some_and(|after| event.recorded_at < after) {
            return false;
        }
        if self.recorded_before.is_some_and(|before| event.recorded_at >= before) {
            return false;
        }
        if let Some(cid) = &self.correlation_id
            && event.metadata.correlation_id().as_deref() != Some(cid.as_str())
        {
            return false;
        }
        true
    }
}

/// Reading `$all`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadAll {
    /// Where to start (a position, inclusive).
    pub from: ReadFrom,
    /// Which way.
    pub direction: Direction,
    /// At most this many matching events.
    pub limit: usize,
    /// Which events.
    pub filter: Filter,
}

impl ReadAll {
    /// Everything, oldest first, up to `limit` events.
    pub fn forward(limit: usize) -> Self {
        ReadAll { from: ReadFrom::Start, direction: Direction::Forward, limit, filter: Filter::default() }
    }

    /// Everything, newest first, up to `limit` events.
    pub fn backward(limit: usize) -> Self {
        ReadAll { from: ReadFrom::End, direction: Direction::Backward, limit, filter: Filter::default() }
    }

    /// Starting at this position (inclusive).
    pub fn from_position(mut self, position: u64) -> Self {
        self.from = ReadFrom::At(position);
        self
    }

    /// With this filter.
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filter = filter;
        self
    }
}

/// A page of `$all`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AllSlice {
    /// Matching events, in the requested direction.
    pub events: Vec<RecordedEvent>,
    /// Where to continue reading in the same direction (inclusive). Forward
    /// reads always set it: the first position not scanned, which equals
    /// the log's next position when the read reached the end. With a filter
    /// it can be far past the last returned event (the positions between were
    /// scanned and did not match). Backward reads set it to the next position
    /// below the scanned range, or `None` when the scan reached position 0.
    pub next: Option<u64>,
}

/// Whether and how a stream was deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeletionState {
    /// Not deleted.
    #[default]
    Live,
    /// Soft-deleted: reads as not found; can be recreated.
    Deleted,
    /// Hard-deleted: can never be written again.
    Tombstoned,
}

/// A page request of [`crate::AllReader::list_streams`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListStreams {
    /// Only streams whose name starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Only streams whose name sorts strictly after this (the last name of
    /// the previous page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// At most this many streams.
    pub limit: usize,
    /// Include `$`-prefixed system streams (excluded by default).
    #[serde(default)]
    pub include_system: bool,
}

impl ListStreams {
    /// The first `limit` streams, in name order.
    pub fn new(limit: usize) -> Self {
        ListStreams { prefix: None, after: None, limit, include_system: false }
    }

    /// Only names starting with `prefix`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// Only names sorting strictly after `name`.
    pub fn after(mut self, name: impl Into<String>) -> Self {
        self.after = Some(name.into());
        self
    }

    /// Include system streams.
    pub fn with_system(mut self) -> Self {
        self.include_system = true;
        self
    }

    /// Refuses a prefix or `after` name with a control character (no
    /// stream name has one), as [`Filter::validate`] does.
    pub fn validate(&self) -> crate::Result<()> {
        no_control("list prefix", self.prefix.as_deref())?;
        no_control("list after", self.after.as_deref())
    }

    /// Whether `name` belongs in the listing (ignoring the limit).
    pub fn matches(&self, name: &str) -> bool {
        (self.include_system || !name.starts_with('$'))
            && self.prefix.as_deref().is_none_or(|p| name.starts_with(p))
            && self.after.as_deref().is_none_or(|a| name > a)
    }
}

/// `Err` naming `what` when `value` holds a control character.
fn no_control(what: &str, value: Option<&str>) -> crate::Result<()> {
    match value.and_then(|v| v.chars().find(|c| c.is_control())) {
        Some(c) => Err(crate::Error::invalid(format!(
            "{what} contains control character U+{:04X}, which no stored value can contain",
            c as u32
        ))),
        None => Ok(()),
    }
}

/// What the store knows about a stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    /// The stream.
    pub stream: StreamName,
    /// Whether it exists (has readable events and is not deleted).
    pub exists: bool,
    /// Version of its last event ever written, if any (also after a soft
    /// delete, so numbering can continue).
    pub last_version: Option<u64>,
    /// Position of its last event, if any.
    pub last_position: Option<u64>,
    /// Versions below this are not readable (set by soft delete).
    pub truncate_before: u64,
    /// Deletion state.
    pub deletion: DeletionState,
}

/// Figures about the whole store that a backend can give without scanning
/// `$all` ([`crate::AllReader::store_stats`]). A field is `None` when the
/// backend cannot answer it cheaply (or it does not apply, such as disk
/// bytes of a store in memory); callers then fall back to a bounded scan or
/// report it as unknown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Events per event type, over every event `$all` holds: system
    /// streams, soft-deleted and tombstoned streams included (deletes hide
    /// events from stream reads but do not remove them from `$all`). This
    /// is exactly what a full scan of `$all` with
    /// `Filter::all().with_system()` counts, so the counts add up to
    /// [`crate::AllReader::next_position`] at the moment they were taken.
    pub events_by_type: Option<BTreeMap<String, u64>>,
    /// Bytes the store's files occupy (for the embedded log: the sizes of
    /// the files in its directory, pre-allocated segment space included;
    /// for a database: its tables with their indexes and TOAST data).
    pub disk_bytes: Option<u64>,
}

impl StoreStats {
    /// Nothing known: what the default [`crate::AllReader::store_stats`]
    /// returns.
    pub fn unknown() -> Self {
        StoreStats::default()
    }

    /// With the exact counts of events per type.
    pub fn with_events_by_type(mut self, counts: BTreeMap<String, u64>) -> Self {
        self.events_by_type = Some(counts);
        self
    }

    /// With the store's size on disk.
    pub fn with_disk_bytes(mut self, bytes: u64) -> Self {
        self.disk_bytes = Some(bytes);
        self
    }
}

/// How to delete a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeleteMode {
    /// Hide existing events; the stream may be recreated and continues its
    /// version numbering.
    Soft,
    /// Tombstone: the stream is gone for good.
    Hard,
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscribeFrom {
    /// From the first event.
    Start,
    /// Strictly after this version (stream) or position (`$all`).
    After(u64),
    /// Only events committed after the subscription starts.
    End,
}

/// What to subscribe to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubscriptionTarget {
    /// One stream.
    Stream(StreamName),
    /// The global log, filtered.
    All(Filter),
}

/// A catch-up subscription request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionRequest {
    /// What to follow.
    pub target: SubscriptionTarget,
    /// Where to start.
    pub from: SubscribeFrom,
}

impl SubscriptionRequest {
    /// Follow one stream.
    pub fn stream(stream: StreamName, from: SubscribeFrom) -> Self {
        SubscriptionRequest { target: SubscriptionTarget::Stream(stream), from }
    }

    /// Follow `$all` with a filter.
    pub fn all(filter: Filter, from: SubscribeFrom) -> Self {
        SubscriptionRequest { target: SubscriptionTarget::All(filter), from }
    }
}

/// A stored snapshot of some state derived from a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The stream it summarises.
    pub stream: StreamName,
    /// The stream version it includes (all events up to and including).
    pub version: u64,
    /// Schema version of the snapshot's own encoding; readers ignore
    /// snapshots whose schema version they do not understand.
    pub schema_version: u32,
    /// The state, usually JSON.
    pub data: Bytes,
    /// When it was saved.
    pub created_at: Timestamp,
}
