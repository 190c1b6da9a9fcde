//! The consumer side: persistent subscriptions (consumer groups) with dead
//! letters, checkpointed projections, sagas (process managers) with
//! compensation, and an in-process event bus.
//!
//! Everything here is generic over `Arc<dyn annals_core::Store>` and built on
//! the store's catch-up subscriptions and named checkpoints; nothing needs a
//! backend feature beyond the [`annals_core::Store`] traits.
//!
//! | piece | delivery guarantee | state it keeps in the store |
//! |---|---|---|
//! | [`PersistentSubscription`] | at least once per group; each message in flight with one consumer at a time | checkpoint `$ps-{group}`, dead letters in `$dlq-{group}` |
//! | [`ProjectionRunner`] | at least once; exactly once on PostgreSQL (feature `postgres`: `ProjectionRunner::exactly_once` commits the projection's writes and its checkpoint in one transaction) | checkpoint `$projection-{name}-v{version}`, dead letters in `$dlq-projection-{name}` |
//! | [`SagaRunner`] | commands exactly once in effect (deterministic command ids + idempotent repository) | the saga's journal in `saga-{name}-{id}`, checkpoint `$saga-{name}` |
//! | [`EventBus`] | at least once per handler group (a persistent subscription underneath) | as for persistent subscriptions |
//!
//! See `docs/consumers.md` for the guide.

mod bus;
mod dlq;
mod persistent;
#[cfg(feature = "postgres")]
pub mod postgres;
mod projection;
mod retry;
mod saga;

use std::time::Duration;

pub use bus::{EventBus, EventBusBuilder, HandlerContext, LoggingMiddleware, MetricsMiddleware, Middleware};
pub use dlq::{DeadLetterQueue, MAX_PARK_REASON_LEN, ParkedMessage};
pub use persistent::{
    Consumer, ConsumerStats, Delivery, GroupSettings, GroupStats, NackAction, PersistentSubscription,
    StartFrom,
};
#[cfg(feature = "postgres")]
pub use postgres::PgProjection;
pub use projection::{
    BatchError, CheckpointStoreCheckpoint, Projection, ProjectionCheckpoint, ProjectionRunner,
    ProjectionStats, RunningProjection, active_version, blue_green_switch,
};
pub use retry::{HandlerError, RetryPolicy};
pub use saga::{
    Clock, RunningSaga, Saga, SagaPlan, SagaRunner, SagaStatus, SagaStep, StepError, SystemClock, TokioClock,
    saga_status,
};

/// What went wrong on the consumer side, phrased as what the caller should do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// The store failed; the inner error says what to do (retry transient
    /// errors with backoff).
    #[error(transparent)]
    Store(#[from] annals_core::Error),

    /// The delivery id is not in flight any more: it was acked or nacked
    /// already, or it timed out and was (or will be) redelivered, possibly
    /// to another consumer. Drop the message; do not retry the ack (HTTP 404).
    #[error("delivery {delivery_id} is not in flight (already settled or timed out)")]
    UnknownDelivery {
        /// The delivery id the caller sent.
        delivery_id: u64,
    },

    /// The group, runner or bus has stopped (dropped, or its task ended after
    /// an error that was logged). Start it again (HTTP 503).
    #[error("the consumer machinery has stopped")]
    Stopped,

    /// A name (group, projection, saga) is unusable. Fix the name (HTTP 400).
    #[error("invalid name: {reason}")]
    InvalidName {
        /// Why.
        reason: String,
    },

    /// A record this module wrote (dead letter, saga journal) does not
    /// decode. The stream was written by other code or a newer version; fix
    /// or move the offending stream.
    #[error("stored record does not decode: {reason}")]
    Decode {
        /// What and where.
        reason: String,
    },

    /// A projection's `reset` failed during a rebuild; the old checkpoint is
    /// untouched. Fix the cause and rebuild again.
    #[error("projection reset failed: {reason}")]
    ResetFailed {
        /// What the projection said.
        reason: String,
    },

    /// A parked message's original event is gone (its stream was deleted or
    /// truncated), so it cannot be replayed. Discard it.
    #[error("the original of parked message at position {position} is gone")]
    OriginalGone {
        /// The parked message's original position.
        position: u64,
    },
}

/// Result alias of this module.
pub type ConsumerResult<T> = std::result::Result<T, ConsumerError>;

/// How long a background task waits before resubscribing after its store
/// subscription failed (store closing, transient I/O).
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(500);

/// Validates a user-chosen name used inside stream and checkpoint names.
fn validate_name(kind: &str, name: &str) -> ConsumerResult<()> {
    if name.is_empty() || name.len() > 200 {
        return Err(ConsumerError::InvalidName { reason: format!("{kind} name must be 1–200 bytes") });
    }
    if name.chars().any(char::is_control) {
        return Err(ConsumerError::InvalidName {
            reason: format!("{kind} name contains a control character"),
        });
    }
    Ok(())
}
