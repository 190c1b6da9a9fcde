//! # annals — the event-sourcing layer
//!
//! Aggregates decide commands into events; a [`Repository`] loads them from
//! any [`annals_core::Store`] (snapshot + later events), executes commands
//! with optimistic concurrency and bounded retry, propagates correlation and
//! causation metadata, makes command ids idempotent, snapshots by policy,
//! upcasts old event versions on read and validates payloads against a
//! JSON [`SchemaRegistry`] before appending. [`TestFramework`] tests an
//! aggregate's rules with given/when/then.
//!
//! ```
//! use std::sync::Arc;
//!
//! use annals::doc::{Counter, CounterCommand, CounterError};
//! use annals::{CommandMetadata, Error, Repository, SnapshotPolicy};
//! use annals_core::MemoryStore;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let repo = Repository::<Counter>::builder(Arc::new(MemoryStore::new()))
//!     .snapshots(SnapshotPolicy::every(100).keep_last(2))
//!     .build();
//!
//! // Stream `counter-7`; the command id makes the call idempotent.
//! let cmd = CommandMetadata::new("cmd-1").correlation_id("request-42").actor("ada");
//! let done = repo.execute("7", &CounterCommand::Increment { by: 5 }, &cmd).await?;
//! assert_eq!(done.version, Some(0));
//!
//! // Same command id again: nothing new is written, the original outcome returns.
//! let again = repo.execute("7", &CounterCommand::Increment { by: 5 }, &cmd).await?;
//! assert!(again.duplicate);
//! assert_eq!(repo.load("7").await?.state.value, 5);
//!
//! // Business rules live in `handle`.
//! let err = repo
//!     .execute("7", &CounterCommand::Decrement { by: 9 }, &CommandMetadata::new("cmd-2"))
//!     .await
//!     .unwrap_err();
//! assert!(matches!(err, Error::Rejected(CounterError::WouldGoNegative)));
//! # Ok(())
//! # }
//! ```
//!
//! The consumer side lives in [`consumers`]: persistent subscriptions
//! (consumer groups with dead letters), checkpointed projections with
//! blue/green rebuilds, sagas with compensation and deadlines, and an
//! in-process event bus.
//!
//! See `docs/event-sourcing.md`, `docs/consumers.md` and the `bank` and
//! `orders` examples (`cargo run -p annals --example bank`).

mod aggregate;
mod codec;
mod command;
pub mod consumers;
#[doc(hidden)]
pub mod doc;
mod error;
mod repository;
mod schema;
mod testing;
mod upcast;

pub use aggregate::{Aggregate, DomainEvent};
pub use codec::{Encoded, decode, decode_parts, encode};
pub use command::{COMMAND_CAUSATION_ID, CommandMetadata};
pub use error::{Error, Result};
pub use repository::{
    Decision, Executed, Loaded, Repository, RepositoryBuilder, SnapshotPolicy, SnapshotWrites, stream_name,
};
pub use schema::SchemaRegistry;
pub use testing::{TestFramework, TestOutcome};
pub use upcast::{Upcasted, Upcasters};
