//! # annals-core
//!
//! The vocabulary of Annals: events, streams, expected versions, the
//! capability traits every storage backend implements, the one error type,
//! and [`MemoryStore`], the reference backend.
//!
//! ```
//! use annals_core::{Appender, EventData, ExpectedVersion, MemoryStore, ReadStream, StreamName, StreamReader};
//!
//! # tokio_test_block_on(async {
//! let store = MemoryStore::new();
//! let stream = StreamName::new("account-42")?;
//! let opened = EventData::json("AccountOpened", &serde_json::json!({ "owner": "Ada" }))?;
//! let result = store.append(&stream, ExpectedVersion::NoStream, vec![opened]).await?;
//! assert_eq!(result.next_version, 1);
//!
//! let events = store.read_stream(&stream, ReadStream::forward()).await?;
//! assert_eq!(events[0].event_type, "AccountOpened");
//! # Ok::<(), annals_core::Error>(())
//! # });
//! # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
//! #     futures::executor::block_on(f)
//! # }
//! ```

/// The README's library example, compiled and run as a doctest so it stays true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeExample;

mod error;
mod event;
mod lease;
mod limits;
mod memory;
pub mod metadata;
mod model;
mod stream_name;
mod stream_state;
pub mod subscription;
mod traits;

pub use error::{Error, LimitKind, Result};
pub use event::{
    ContentType, EventData, MAX_CORRELATION_ID_LEN, MAX_EVENT_TYPE_LEN, RecordedEvent, Timestamp,
};
pub use lease::{
    Lease, Leases, LocalLeases, MAX_LEASE_HOLDER_LEN, MAX_LEASE_NAME_LEN, validate_lease_holder,
    validate_lease_name,
};
pub use limits::{Limits, validate_correlation_id, validate_event_type};
pub use memory::MemoryStore;
pub use metadata::Metadata;
pub use model::{
    AllSlice, AppendResult, DeleteMode, DeletionState, Direction, ExpectedVersion, Filter, ListStreams,
    ReadAll, ReadFrom, ReadStream, Snapshot, StoreStats, StreamAppend, StreamInfo, SubscribeFrom,
    SubscriptionRequest, SubscriptionTarget, TypeMatch,
};
pub use stream_name::{MAX_STREAM_NAME_LEN, StreamName, category_of};
pub use stream_state::{AppendDecision, StreamState};
pub use traits::{
    AllReader, Appender, CheckpointStore, EventStore, EventStream, MAX_STORED_NUMBER, SnapshotStore, Store,
    StreamDeleter, StreamReader, Subscriber, list_streams_by_scan, validate_checkpoint_name,
    validate_stored_number,
};

/// Re-exports for crates implementing backends.
pub use async_trait::async_trait;
pub use bytes::Bytes;
pub use uuid::Uuid;
