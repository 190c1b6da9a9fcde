//! Exactly-once read models: a projection's own SQL writes and its
//! checkpoint commit in one PostgreSQL transaction.

use std::sync::Arc;

use annals_core::{Error, Result, validate_checkpoint_name, validate_stored_number};
use tokio_postgres::{Row, types::ToSql};

use crate::{
    Inner, PgStore,
    error::db,
    pooled::marking,
    row::{to_i64, to_u64},
};

/// An open transaction holding a projection's checkpoint locked.
///
/// Run the projection's writes through it, then [`PgCheckpointTx::commit`]
/// with the position of the last event they reflect: both land, or neither
/// does. Because the checkpoint stays locked until then (a transaction-level
/// advisory lock on its name, migration 0012), a second
/// instance of the same projection waits in [`PgStore::begin_checkpoint_tx`]
/// and then sees the new checkpoint, so no event is applied twice.
///
/// Dropping it without committing rolls everything back (the connection is
/// closed rather than returned to the pool mid-transaction).
///
/// ```no_run
/// # async fn demo(store: annals_postgres::PgStore) -> annals_core::Result<()> {
/// let mut tx = store.begin_checkpoint_tx("balances").await?;
/// let from = tx.checkpoint().map_or(0, |p| p + 1);
/// // ... read events from `from`, then:
/// tx.execute("UPDATE balances SET amount = amount + $1 WHERE id = $2", &[&10_i64, &"a-1"]).await?;
/// tx.commit(from + 41).await?;
/// # Ok(())
/// # }
/// ```
pub struct PgCheckpointTx {
    client: Option<crate::pooled::Pooled>,
    inner: Arc<Inner>,
    name: String,
    checkpoint: Option<u64>,
}

impl std::fmt::Debug for PgCheckpointTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCheckpointTx")
            .field("name", &self.name)
            .field("checkpoint", &self.checkpoint)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Begins a READ COMMITTED transaction that locks checkpoint `name`.
    /// See [`PgCheckpointTx`].
    pub async fn begin_checkpoint_tx(&self, name: &str) -> Result<PgCheckpointTx> {
        validate_checkpoint_name(name)?;
        let client = self.inner.client().await?;
        // Owned by the transaction before anything is sent: if this future
        // is dropped while `BEGIN` is on its way (a caller's timeout, a
        // `select!`), the server still runs it, and the connection must be
        // closed, not handed to the next borrower inside a transaction that
        // nobody ends. An append on it would be answered as written and
        // never commit, holding the head: every append of the schema would
        // wait, and the answered one would roll back when it closed.
        let mut tx = PgCheckpointTx {
            client: Some(client),
            inner: self.inner.clone(),
            name: name.to_owned(),
            checkpoint: None,
        };
        // READ COMMITTED whatever the database's default: the lock function
        // reads the latest save in a statement after taking the lock, which
        // sees the previous holder's save only with a fresh snapshot. And
        // exempt from the sessions' idle-in-transaction limit (see
        // `SESSION_SETTINGS`): between its statements this transaction waits on
        // the caller's code (a projection's handler, its retry backoff),
        // which may take longer; the server ending it then would fail a
        // batch that did nothing wrong.
        tx.batch_execute(
            "BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL idle_in_transaction_session_timeout = 0",
        )
        .await?;
        let row = tx.query_one(&tx.inner.sql.lock_checkpoint.clone(), &[&name]).await?;
        let position: Option<i64> = row.try_get(0).map_err(db)?;
        tx.checkpoint = position.map(|p| to_u64(p, "checkpoint")).transpose()?;
        Ok(tx)
    }
}

impl PgCheckpointTx {
    /// The checkpoint's value when the transaction began (`None`: never
    /// saved). Nobody else can change it until this transaction ends.
    pub fn checkpoint(&self) -> Option<u64> {
        self.checkpoint
    }

    /// The checkpoint's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The connection, inside the transaction, for any other driver call.
    /// Calls made through it directly are not bounded by the store's
    /// answer timeout; those of the methods below are.
    pub fn client(&self) -> Result<&tokio_postgres::Client> {
        self.client.as_ref().map(|c| &****c).ok_or(Error::Closed)
    }

    /// Runs `work` on the connection within the store's answer timeout
    /// ([`crate::PgStoreBuilder::answer_timeout`]).
    async fn bounded<T>(&self, work: impl Future<Output = Result<T, tokio_postgres::Error>>) -> Result<T> {
        let client = self.client.as_ref().ok_or(Error::Closed)?;
        let broken = client.broken();
        client.deadline().bound(async { work.await.map_err(marking(&broken)) }).await
    }

    /// Whether the transaction is lost: a statement run through it ended
    /// its session (a terminated backend, a failover, a server restart) or
    /// got no answer in time, its connection closed, or it was committed or
    /// rolled back. Nothing of it can commit then; start again from a new
    /// [`PgStore::begin_checkpoint_tx`], which reads the checkpoint as it
    /// was. (Failures of calls made on [`PgCheckpointTx::client`] directly
    /// show only once the connection is seen closed.)
    pub fn is_lost(&self) -> bool {
        self.client
            .as_ref()
            .is_none_or(|c| c.broken().load(std::sync::atomic::Ordering::Relaxed) || c.is_closed())
    }

    /// Runs a statement in the transaction; returns the rows affected.
    pub async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        self.bounded(self.client()?.execute(sql, params)).await
    }

    /// Runs a query in the transaction.
    pub async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        self.bounded(self.client()?.query(sql, params)).await
    }

    /// Runs a query that returns exactly one row.
    pub async fn query_one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row> {
        self.bounded(self.client()?.query_one(sql, params)).await
    }

    /// Runs several statements (no parameters) in the transaction.
    pub async fn batch_execute(&self, sql: &str) -> Result<()> {
        self.bounded(self.client()?.batch_execute(sql)).await
    }

    /// Stores `position` as the checkpoint and commits it together with
    /// everything run through this transaction. A position above
    /// [`annals_core::MAX_STORED_NUMBER`] is refused and everything rolled
    /// back.
    pub async fn commit(mut self, position: u64) -> Result<()> {
        validate_stored_number("checkpoint position", position)?;
        let sql = self.inner.sql.save_checkpoint.clone();
        self.query_one(&sql, &[&self.name, &to_i64(position)]).await?;
        self.batch_execute("COMMIT").await?;
        // Committed: the connection is clean and can go back to the pool.
        self.client.take();
        Ok(())
    }

    /// Rolls back everything, leaving the checkpoint as it was.
    pub async fn rollback(mut self) -> Result<()> {
        self.batch_execute("ROLLBACK").await?;
        self.client.take();
        Ok(())
    }
}

impl Drop for PgCheckpointTx {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            // Still inside the transaction (not committed, or a statement
            // failed): detach the connection from the pool and close it, so
            // the server rolls back and nobody reuses it mid-transaction.
            client.discard();
        }
    }
}
