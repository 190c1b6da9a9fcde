//! Exactly-once projections into PostgreSQL (feature `postgres`).
//!
//! A [`PgProjection`] writes its read model with SQL inside a transaction
//! that also holds the projection's checkpoint locked
//! ([`annals_postgres::PgCheckpointTx`]). For every batch the runner:
//!
//! 1. begins the transaction, which locks the checkpoint and reads it
//!    (so a second instance of the same projection waits here, then
//!    continues from wherever the first one got to);
//! 2. reads the next events from that checkpoint;
//! 3. hands them to the projection, which runs its statements in the
//!    transaction;
//! 4. writes the new checkpoint and commits: the read model's changes and
//!    the checkpoint land together or not at all.
//!
//! A crash anywhere before the commit rolls the batch back, and the next
//! start replays it from the old checkpoint; a crash after it starts from
//! the new one. Each event therefore changes the read model exactly once,
//! even for writes that are not idempotent (`n = n + 1`).
//!
//! A failing handler does not poison the transaction: each batch (and each
//! retry of a single event) runs under a savepoint, rolled back on failure,
//! so the events before the failing one stay applied and the failing one
//! follows the runner's retry → park policy. Parking appends to the
//! dead-letter stream outside the transaction; a crash between parking and
//! the commit parks that event again on replay, which the dead-letter
//! stream absorbs (the record's id is derived from the message, so the
//! second append is an idempotent re-send, see
//! [`DeadLetterQueue::park`](super::DeadLetterQueue::park)).

use std::{panic::AssertUnwindSafe, sync::Arc};

use annals_core::{CheckpointStore, Filter, RecordedEvent, Store};
use annals_postgres::{PgCheckpointTx, PgStore};
use async_trait::async_trait;
use futures::FutureExt;
use tokio::sync::Mutex;

use super::{BatchError, HandlerError, Projection, ProjectionCheckpoint, ProjectionRunner};

/// A read model kept in PostgreSQL, updated exactly once per event.
///
/// Every statement goes through the transaction passed in (`tx.execute`,
/// `tx.query`, or `tx.client()` for anything else); statements on another
/// connection are outside the exactly-once guarantee.
#[async_trait]
pub trait PgProjection: Send + 'static {
    /// Stable name (1–200 bytes): names the checkpoint and dead letters.
    fn name(&self) -> &str;

    /// Version of the projection's logic and schema (see
    /// [`Projection::version`]).
    fn version(&self) -> u32 {
        1
    }

    /// Which events it wants (default: every user event).
    fn filter(&self) -> Filter {
        Filter::all()
    }

    /// Applies one event inside `tx`.
    async fn handle(&mut self, tx: &PgCheckpointTx, event: &RecordedEvent) -> Result<(), HandlerError>;

    /// Applies a batch inside `tx`, in order. Override to write a batch in
    /// one statement; report the first failing event in
    /// [`BatchError::failed_at`]. The default calls [`PgProjection::handle`]
    /// for each event.
    async fn handle_batch(
        &mut self,
        tx: &PgCheckpointTx,
        events: &[RecordedEvent],
    ) -> Result<(), BatchError> {
        for (index, event) in events.iter().enumerate() {
            AssertUnwindSafe(self.handle(tx, event))
                .catch_unwind()
                .await
                .unwrap_or_else(|p| Err(HandlerError::panicked(p)))
                .map_err(|error| BatchError { failed_at: index, error })?;
        }
        Ok(())
    }

    /// Clears the read model before a rebuild, inside the transaction that
    /// also resets the checkpoint.
    async fn reset(&mut self, tx: &PgCheckpointTx) -> Result<(), HandlerError> {
        let _ = tx;
        Ok(())
    }
}

impl ProjectionRunner {
    /// A runner that applies `projection` exactly once: its SQL writes and
    /// its checkpoint commit in one PostgreSQL transaction per batch (see
    /// the [module docs](self)). Events are read from the same store.
    pub fn exactly_once(store: &PgStore, projection: impl PgProjection) -> Self {
        let shared = Arc::new(Shared { store: store.clone(), tx: Mutex::new(None) });
        let events: Arc<dyn Store> = Arc::new(store.clone());
        ProjectionRunner::new(events, Adapter { projection, shared: shared.clone() })
            .checkpoint(Arc::new(TxCheckpoint(shared)))
    }
}

/// The transaction the projection and the checkpoint share.
struct Shared {
    store: PgStore,
    tx: Mutex<Option<PgCheckpointTx>>,
}

/// The savepoint each batch runs under.
const SAVEPOINT: &str = "annals_projection_batch";

struct Adapter<P> {
    projection: P,
    shared: Arc<Shared>,
}

/// The open transaction, beginning one if the runner did not (a rebuild
/// resets before any batch).
async fn open<'a>(
    shared: &'a Shared,
    name: &str,
) -> annals_core::Result<tokio::sync::MutexGuard<'a, Option<PgCheckpointTx>>> {
    let mut guard = shared.tx.lock().await;
    if guard.is_none() {
        *guard = Some(shared.store.begin_checkpoint_tx(name).await?);
    }
    Ok(guard)
}

fn handler_error(e: annals_core::Error) -> HandlerError {
    HandlerError::new(format!("projection transaction: {e}"))
}

impl<P: PgProjection> Adapter<P> {
    fn checkpoint_name(&self) -> String {
        super::projection::checkpoint_name(self.projection.name(), self.projection.version())
    }
}

#[async_trait]
impl<P: PgProjection> Projection for Adapter<P> {
    fn name(&self) -> &str {
        self.projection.name()
    }

    fn version(&self) -> u32 {
        self.projection.version()
    }

    fn filter(&self) -> Filter {
        self.projection.filter()
    }

    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), HandlerError> {
        let name = self.checkpoint_name();
        let guard = open(&self.shared, &name).await.map_err(handler_error)?;
        let tx = guard.as_ref().ok_or_else(|| HandlerError::new("no projection transaction"))?;
        tx.batch_execute(&format!("SAVEPOINT {SAVEPOINT}")).await.map_err(handler_error)?;
        // A panic is a failure too, and must be rolled back like one.
        let outcome = AssertUnwindSafe(self.projection.handle(tx, event))
            .catch_unwind()
            .await
            .unwrap_or_else(|p| Err(HandlerError::panicked(p)));
        match outcome {
            Ok(()) => Ok(()),
            Err(error) => {
                tx.batch_execute(&format!("ROLLBACK TO SAVEPOINT {SAVEPOINT}"))
                    .await
                    .map_err(handler_error)?;
                Err(error)
            }
        }
    }

    async fn handle_batch(&mut self, events: &[RecordedEvent]) -> Result<(), BatchError> {
        let name = self.checkpoint_name();
        let at_start = |error: annals_core::Error| BatchError { failed_at: 0, error: handler_error(error) };
        let guard = open(&self.shared, &name).await.map_err(at_start)?;
        let tx = guard.as_ref().ok_or_else(|| BatchError {
            failed_at: 0,
            error: HandlerError::new("no projection transaction"),
        })?;
        tx.batch_execute(&format!("SAVEPOINT {SAVEPOINT}")).await.map_err(at_start)?;
        let Err(failure) = guarded(self.projection.handle_batch(tx, events)).await else {
            return Ok(());
        };
        // A failed statement aborts the whole transaction: undo the batch,
        // then re-apply the events before the failing one, which the
        // runner takes as applied.
        tx.batch_execute(&format!("ROLLBACK TO SAVEPOINT {SAVEPOINT}")).await.map_err(at_start)?;
        let applied = events.get(..failure.failed_at).unwrap_or_default();
        if !applied.is_empty() {
            tx.batch_execute(&format!("SAVEPOINT {SAVEPOINT}")).await.map_err(at_start)?;
            if let Err(again) = guarded(self.projection.handle_batch(tx, applied)).await {
                // Not deterministic after all (a lock timeout, a deadlock
                // with another writer of the model): the rollback undoes the
                // whole re-application, so nothing of the batch is applied.
                // Reporting `again.failed_at` would let the runner take the
                // events before it as applied and skip them.
                tx.batch_execute(&format!("ROLLBACK TO SAVEPOINT {SAVEPOINT}")).await.map_err(at_start)?;
                return Err(BatchError { failed_at: 0, error: again.error });
            }
        }
        Err(failure)
    }

    async fn reset(&mut self) -> Result<(), HandlerError> {
        let name = self.checkpoint_name();
        let guard = open(&self.shared, &name).await.map_err(handler_error)?;
        let tx = guard.as_ref().ok_or_else(|| HandlerError::new("no projection transaction"))?;
        self.projection.reset(tx).await
    }
}

/// A batch's outcome, a panic counting as a failure at its first event (as
/// far as anyone can tell): the caller rolls back to the savepoint either
/// way, which a panic unwinding past it would skip, leaving the events
/// before it applied in the transaction and applied again on retry.
async fn guarded(batch: impl Future<Output = Result<(), BatchError>>) -> Result<(), BatchError> {
    AssertUnwindSafe(batch)
        .catch_unwind()
        .await
        .unwrap_or_else(|p| Err(BatchError { failed_at: 0, error: HandlerError::panicked(p) }))
}

/// The checkpoint side: begins the batch transaction, commits it.
struct TxCheckpoint(Arc<Shared>);

#[async_trait]
impl ProjectionCheckpoint for TxCheckpoint {
    async fn load(&self, name: &str) -> annals_core::Result<Option<u64>> {
        // A transaction left open by a runner that stopped on an error is
        // rolled back (dropping it closes its connection).
        self.0.tx.lock().await.take();
        self.0.store.load_checkpoint(name).await
    }

    async fn begin(&self, name: &str) -> annals_core::Result<Option<u64>> {
        let mut guard = self.0.tx.lock().await;
        if guard.is_none() {
            *guard = Some(self.0.store.begin_checkpoint_tx(name).await?);
        }
        Ok(Some(guard.as_ref().and_then(PgCheckpointTx::checkpoint).unwrap_or(0)))
    }

    /// False once the open transaction is lost ([`PgCheckpointTx::is_lost`]).
    async fn intact(&self) -> bool {
        self.0.tx.lock().await.as_ref().is_none_or(|tx| !tx.is_lost())
    }

    /// Rolls back the open batch, if any (dropping the transaction closes
    /// its connection): a stopped runner keeps no checkpoint locked.
    async fn abandon(&self) {
        self.0.tx.lock().await.take();
    }

    async fn commit(&self, name: &str, next_position: u64) -> annals_core::Result<()> {
        let tx = open(&self.0, name).await?.take();
        match tx {
            Some(tx) => tx.commit(next_position).await,
            None => Ok(()),
        }
    }
}
