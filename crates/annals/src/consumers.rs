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
/// subscription failed (store closing, transient I/O), the first time.
const RESUBSCRIBE_DELAY: Duration = Duration::from_millis(500);

/// The longest wait between resubscriptions: a failure that lasts (a
/// group's stream tombstoned, the database away for hours) costs a try and
/// a log line this often, not twice a second.
const MAX_RESUBSCRIBE_DELAY: Duration = Duration::from_secs(30);

/// The wait before a background task resubscribes: [`RESUBSCRIBE_DELAY`],
/// doubled after each failure in a row up to [`MAX_RESUBSCRIBE_DELAY`],
/// and back to the start once the subscription delivers again.
#[derive(Debug)]
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff { next: RESUBSCRIBE_DELAY }
    }

    /// The subscription failed: how long to wait before the next one.
    fn failed(&mut self) -> Duration {
        let wait = self.next;
        self.next = self.next.saturating_mul(2).min(MAX_RESUBSCRIBE_DELAY);
        wait
    }

    /// The subscription delivered: the next failure waits the least again.
    fn delivered(&mut self) {
        self.next = RESUBSCRIBE_DELAY;
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resubscriptions_wait_longer_after_each_failure_in_a_row_and_start_over_after_a_delivery() {
        let mut backoff = Backoff::new();
        let waits: Vec<u64> = (0..9).map(|_| backoff.failed().as_millis() as u64).collect();
        assert_eq!(waits, [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]);
        backoff.delivered();
        assert_eq!(backoff.failed(), RESUBSCRIBE_DELAY);
    }
}
