//! The core capability traits, implemented for [`PgStore`].

use std::{sync::Arc, time::Duration};

use annals_core::{
    AllReader, AllSlice, AppendResult, Appender, CheckpointStore, DeleteMode, Error, EventStream,
    ExpectedVersion, ListStreams, ReadAll, ReadStream, RecordedEvent, Result, Snapshot, SnapshotStore,
    StoreStats, StreamAppend, StreamDeleter, StreamInfo, StreamName, StreamReader, Subscriber,
    SubscriptionRequest, async_trait, category_of, subscription, validate_checkpoint_name,
    validate_stored_number,
};
use bytes::Bytes;
use tokio_postgres::{IsolationLevel, error::SqlState, types::ToSql};

use crate::{
    Inner, PgError, PgStore,
    error::{breaks_connection, broke_connection, needs_a_fix},
    pooled::{Pooled, marking},
    row::{stream_name, to_i64, to_u64},
    timestamp::PgTimestamp,
};

#[async_trait]
impl Appender for PgStore {
    async fn append_multi(&self, parts: Vec<StreamAppend>) -> Result<Vec<AppendResult>> {
        self.inner.append_parts(parts).await
    }

    /// Healthy when a pooled connection answers `SELECT 1`.
    async fn health(&self) -> Result<()> {
        self.inner.health().await
    }
}

#[async_trait]
impl StreamReader for PgStore {
    async fn read_stream(&self, stream: &StreamName, request: ReadStream) -> Result<Vec<RecordedEvent>> {
        reading(|| self.inner.read_stream(stream, request)).await
    }

    async fn stream_info(&self, stream: &StreamName) -> Result<StreamInfo> {
        reading(|| self.inner.stream_info(stream)).await
    }
}

#[async_trait]
impl AllReader for PgStore {
    async fn read_all(&self, request: ReadAll) -> Result<AllSlice> {
        reading(|| self.inner.read_all(&request)).await
    }

    async fn next_position(&self) -> Result<u64> {
        reading(|| self.inner.next_position()).await
    }

    /// From the `streams` table, by name.
    async fn list_streams(&self, request: ListStreams) -> Result<Vec<StreamInfo>> {
        reading(|| self.inner.list_streams(&request)).await
    }

    /// Counts by type with one aggregate over `events` (O(events) inside
    /// PostgreSQL, but no event leaves the database) and the schema's
    /// tables' size from `pg_total_relation_size`.
    async fn store_stats(&self) -> Result<StoreStats> {
        self.inner.store_stats().await
    }
}

/// Reads, counting the first: a read that met a connection whose session
/// had ended runs again on another.
const READ_ATTEMPTS: u32 = 3;

/// Runs a read, again on a fresh connection when it failed because its
/// connection's session had ended (a failover, a terminated backend, a
/// server restart; the pool may still hold several such connections, each
/// discarded as it is met). Reads change nothing, so running one again is
/// always safe; any other error is returned as it is.
async fn reading<T, F, Fut>(mut op: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut attempt = 1;
    loop {
        match op().await {
            Err(e) if attempt < READ_ATTEMPTS && broke_connection(&e) => {
                tracing::debug!(error = %e, attempt, "read met a broken connection; running it again");
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// The readers a subscription uses: the store's, retrying transient
/// failures (a dropped connection, a restarting server) with backoff for up
/// to the configured limit, but not errors that waiting cannot fix (see
/// [`needs_a_fix`]: a dropped schema, a revoked grant, an undecodable row). The subscription's cursor only advances on a
/// successful read, so a retried read resumes exactly where it stopped:
/// nothing is lost or delivered twice.
struct Resilient(Arc<Inner>);

impl Resilient {
    async fn retry<T, F, Fut>(&self, mut op: F) -> Result<T>
    where
        F: FnMut() -> Fut + Send,
        Fut: Future<Output = Result<T>> + Send,
    {
        let started = tokio::time::Instant::now();
        let mut backoff = Duration::from_millis(20);
        loop {
            match op().await {
                Err(e)
                    if e.is_transient()
                        && !needs_a_fix(&e)
                        && started.elapsed() < self.0.subscription_retry =>
                {
                    tracing::debug!(error = %e, "subscription read failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                other => return other,
            }
        }
    }
}

#[async_trait]
impl StreamReader for Resilient {
    async fn read_stream(&self, stream: &StreamName, request: ReadStream) -> Result<Vec<RecordedEvent>> {
        self.retry(|| self.0.read_stream(stream, request)).await
    }

    async fn stream_info(&self, stream: &StreamName) -> Result<StreamInfo> {
        self.retry(|| self.0.stream_info(stream)).await
    }
}

#[async_trait]
impl AllReader for Resilient {
    async fn read_all(&self, request: ReadAll) -> Result<AllSlice> {
        self.retry(|| self.0.read_all(&request)).await
    }

    async fn next_position(&self) -> Result<u64> {
        self.retry(|| self.0.next_position()).await
    }
}

impl Subscriber for PgStore {
    /// Catch-up subscription (see [`annals_core::subscription`]). Woken by
    /// `LISTEN/NOTIFY` or the fallback poll; reads committed rows only.
    /// Transient database failures are retried (see
    /// [`crate::PgStoreBuilder::subscription_retry`]) without loss or
    /// duplication.
    fn subscribe(&self, request: SubscriptionRequest) -> EventStream {
        subscription::catch_up_with_tail(
            Arc::new(Resilient(self.inner.clone())),
            self.inner.head.subscribe(),
            self.inner.tail.clone(),
            request,
        )
    }
}

#[async_trait]
impl StreamDeleter for PgStore {
    async fn delete_stream(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        mode: DeleteMode,
    ) -> Result<()> {
        let sql = &self.inner.sql;
        let mut client = self.inner.client().await?;
        let deadline = client.deadline();
        deadline
            .bound(async {
                let broken = client.broken();
                let db = marking(&broken);
                let tx = client
                    .build_transaction()
                    .isolation_level(IsolationLevel::ReadCommitted)
                    .start()
                    .await
                    .map_err(db)?;
                // The head first, like every writer of stream rows (ADR 02): appends
                // read stream rows under the head lock without locking them, so a
                // delete must not change a row while an append holds the head. It
                // keeps appends of the whole schema waiting for this transaction;
                // deletes are rare.
                let lock_head = tx.prepare_cached(&sql.lock_head).await.map_err(db)?;
                tx.query_one(&lock_head, &[]).await.map_err(db)?;
                let ensure = tx.prepare_cached(&sql.ensure_streams).await.map_err(db)?;
                tx.execute(&ensure, &[&vec![stream.as_str()], &vec![category_of(stream.as_str())]])
                    .await
                    .map_err(db)?;
                let stmt = tx.prepare_cached(&sql.read_streams).await.map_err(db)?;
                let row = tx.query_one(&stmt, &[&vec![stream.as_str()]]).await.map_err(db)?;
                let state = crate::read::state_from_row(&row, 1)?;
                // On error the transaction is dropped, rolling back the row `ensure_streams`
                // may have created.
                state.check_delete(stream, expected, mode == DeleteMode::Hard)?;
                match mode {
                    DeleteMode::Soft => {
                        let stmt = tx.prepare_cached(&sql.soft_delete).await.map_err(db)?;
                        tx.execute(&stmt, &[&stream.as_str(), &to_i64(state.next_version())])
                            .await
                            .map_err(db)?;
                    }
                    DeleteMode::Hard => {
                        let stmt = tx.prepare_cached(&sql.hard_delete).await.map_err(db)?;
                        tx.execute(&stmt, &[&stream.as_str()]).await.map_err(db)?;
                    }
                }
                // Other processes' subscriptions learn of it from their
                // listeners (notified on commit); this one's just below.
                let notify = tx.prepare_cached("SELECT pg_notify($1, $2)").await.map_err(db)?;
                tx.execute(&notify, &[&sql.channel, &crate::listener::DELETED]).await.map_err(db)?;
                tx.commit().await.map_err(db)?;
                deleted(&self.inner.tail, &self.inner.head, mode);
                Ok(())
            })
            .await
    }
}

/// After a committed delete: the tail's stream subscriptions read their
/// streams again, and after a hard delete every subscription wakes, so one
/// of the stream sees the tombstone now rather than at the next append.
/// Woken with the head in place: reading it and sending it back would lower
/// a head that a commit raised in between, and a subscription from `End`
/// would then start before events already acknowledged.
fn deleted(tail: &annals_core::subscription::Tail, head: &tokio::sync::watch::Sender<u64>, mode: DeleteMode) {
    tail.note_deletion();
    if mode == DeleteMode::Hard {
        head.send_modify(|_| {});
    }
}

#[async_trait]
impl SnapshotStore for PgStore {
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        validate_stored_number("snapshot version", snapshot.version)?;
        if !crate::timestamp::storable(snapshot.created_at) {
            return Err(Error::invalid(format!(
                "snapshot created_at {} µs since 1970 is before 4714 BC, which PostgreSQL cannot store",
                snapshot.created_at.as_micros()
            )));
        }
        let client = self.inner.client().await?;
        client
            .deadline()
            .bound(async {
                let broken = client.broken();
                let db = marking(&broken);
                let stmt = client.prepare_cached(&self.inner.sql.save_snapshot).await.map_err(db)?;
                client
                    .execute(
                        &stmt,
                        &[
                            &snapshot.stream.as_str(),
                            &to_i64(snapshot.version),
                            &i64::from(snapshot.schema_version),
                            &snapshot.data.as_ref(),
                            &PgTimestamp(snapshot.created_at),
                        ],
                    )
                    .await
                    .map_err(db)?;
                Ok(())
            })
            .await
    }

    async fn load_snapshot(
        &self,
        stream: &StreamName,
        at_or_before: Option<u64>,
    ) -> Result<Option<Snapshot>> {
        reading(|| self.load_snapshot_once(stream, at_or_before)).await
    }

    async fn prune_snapshots(&self, stream: &StreamName, keep_last: usize) -> Result<usize> {
        let client = self.inner.client().await?;
        client
            .deadline()
            .bound(async {
                let broken = client.broken();
                let db = marking(&broken);
                let stmt = client.prepare_cached(&self.inner.sql.prune_snapshots).await.map_err(db)?;
                let keep = i64::try_from(keep_last).unwrap_or(i64::MAX);
                let deleted = client.execute(&stmt, &[&stream.as_str(), &keep]).await.map_err(db)?;
                Ok(usize::try_from(deleted).unwrap_or(usize::MAX))
            })
            .await
    }
}

impl PgStore {
    async fn load_snapshot_once(
        &self,
        stream: &StreamName,
        at_or_before: Option<u64>,
    ) -> Result<Option<Snapshot>> {
        let client = self.inner.client().await?;
        client
            .deadline()
            .bound(async {
                let broken = client.broken();
                let db = marking(&broken);
                let stmt = client.prepare_cached(&self.inner.sql.load_snapshot).await.map_err(db)?;
                let at = at_or_before.map_or(i64::MAX, to_i64);
                let Some(row) = client.query_opt(&stmt, &[&stream.as_str(), &at]).await.map_err(db)? else {
                    return Ok(None);
                };
                let name: &str = row.try_get(0).map_err(db)?;
                let schema_version: i64 = row.try_get(2).map_err(db)?;
                let data: Vec<u8> = row.try_get(3).map_err(db)?;
                let created_at: PgTimestamp = row.try_get(4).map_err(db)?;
                Ok(Some(Snapshot {
                    stream: stream_name(name)?,
                    version: to_u64(row.try_get(1).map_err(db)?, "snapshot version")?,
                    schema_version: u32::try_from(schema_version).map_err(|_| Error::Corrupt {
                        details: format!("snapshot schema version {schema_version}"),
                    })?,
                    data: Bytes::from(data),
                    created_at: created_at.0,
                }))
            })
            .await
    }

    async fn load_checkpoint_once(&self, name: &str) -> Result<Option<u64>> {
        let client = self.inner.client().await?;
        client
            .deadline()
            .bound(async {
                let broken = client.broken();
                let db = marking(&broken);
                let stmt = client.prepare_cached(&self.inner.sql.load_checkpoint).await.map_err(db)?;
                let Some(row) = client.query_opt(&stmt, &[&name]).await.map_err(db)? else { return Ok(None) };
                let position: Option<i64> = row.try_get(0).map_err(db)?;
                position.map(|p| to_u64(p, "checkpoint")).transpose()
            })
            .await
    }
}

/// SQLSTATE raised by the checkpoint functions outside READ COMMITTED
/// (migration 0012).
const NOT_READ_COMMITTED: &str = "AN002";

#[async_trait]
impl CheckpointStore for PgStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<u64>> {
        validate_checkpoint_name(name)?;
        reading(|| self.load_checkpoint_once(name)).await
    }

    /// One statement in an implicit transaction (migration 0012's
    /// function), or, when the sessions' default isolation is not READ
    /// COMMITTED (the function then refuses, SQLSTATE `AN002`), the same
    /// inside `BEGIN ISOLATION LEVEL READ COMMITTED` … `COMMIT`, pipelined:
    /// straight away once the store knows it (`ExplicitReadCommitted`).
    async fn save_checkpoint(&self, name: &str, position: u64) -> Result<()> {
        validate_checkpoint_name(name)?;
        validate_stored_number("checkpoint position", position)?;
        let position = to_i64(position);
        let params: [&(dyn ToSql + Sync); 2] = [&name, &position];
        if !self.inner.explicit_rc.get() {
            let client = self.inner.client().await?;
            let broken = client.broken();
            let db = marking(&broken);
            let saved = client
                .deadline()
                .bound(async {
                    let stmt = client.prepare_cached(&self.inner.sql.save_checkpoint).await.map_err(db)?;
                    match client.execute(&stmt, &params).await {
                        Ok(_) => Ok(true),
                        Err(e) if e.code().map(SqlState::code) == Some(NOT_READ_COMMITTED) => Ok(false),
                        Err(e) => Err(db(e)),
                    }
                })
                .await?;
            if saved {
                return Ok(());
            }
            self.inner.explicit_rc.set();
        }
        let object = self.inner.store_pool.get().await.map_err(PgError::from)?;
        // Discarded unless kept: a cancelled future must not hand an open
        // transaction to the next borrower.
        let client =
            Pooled::discarded_unless_kept(object, self.inner.schema_label.clone(), self.inner.answer.clone());
        let broken = client.broken();
        let db = marking(&broken);
        client
            .deadline()
            .bound(async {
                let stmt = client.prepare_cached(&self.inner.sql.save_checkpoint).await.map_err(db)?;
                let (begun, saved, committed) = futures::join!(
                    client.batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED"),
                    client.execute(&stmt, &params),
                    client.batch_execute("COMMIT")
                );
                // A failed statement turns the COMMIT into a rollback: the
                // transaction is over unless the connection broke.
                let failed = [begun.as_ref().err(), saved.as_ref().err(), committed.as_ref().err()];
                if !failed.iter().flatten().any(|e| breaks_connection(e)) {
                    client.keep();
                }
                begun.map_err(db)?;
                saved.map_err(db)?;
                committed.map_err(db)?;
                Ok(())
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hard delete wakes the subscriptions while this process's commits
    /// raise the head on other threads: it must never put an older head
    /// back.
    #[test]
    fn a_hard_delete_never_lowers_the_head() {
        crate::listener::assert_never_lowers_the_head(|tail, head| deleted(tail, head, DeleteMode::Hard));
    }
}
