//! Exactly-once projections on PostgreSQL: the read model's writes and the
//! checkpoint commit together, so a crash, a failing event, a second
//! instance or a rebuild never applies an event twice — checked with a
//! read model whose writes are not idempotent (`n = n + 1`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../annals-postgres/tests/common/mod.rs"]
mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use annals::consumers::{HandlerError, PgProjection, ProjectionRunner, RetryPolicy};
use annals_core::{Appender, CheckpointStore, EventData, ExpectedVersion, RecordedEvent, Store, StreamName};
use annals_postgres::{PgCheckpointTx, PgStore};
use async_trait::async_trait;
use tokio::sync::mpsc;

const STREAMS: u64 = 10;

/// Counts events per stream (`n = n + 1`) and records every application in
/// `applied`, which has no unique key: a duplicate shows up as a second row.
struct Counter {
    schema: String,
    /// Stops forever (a hung process) after writing this position, telling
    /// the test through the channel.
    hang_at: Option<(u64, mpsc::UnboundedSender<()>)>,
    /// At this position, the first time only, its transaction's session is
    /// terminated (as by a failover or a DBA) before the event is written.
    die_at: Option<(u64, Arc<AtomicBool>)>,
}

impl Counter {
    fn new(schema: &str) -> Self {
        Counter { schema: schema.to_owned(), hang_at: None, die_at: None }
    }
}

#[async_trait]
impl PgProjection for Counter {
    fn name(&self) -> &str {
        "counter"
    }

    async fn handle(&mut self, tx: &PgCheckpointTx, event: &RecordedEvent) -> Result<(), HandlerError> {
        let s = &self.schema;
        if event.event_type == "Poison" {
            // A failing statement aborts the transaction unless the runner
            // rolls back to its savepoint.
            tx.execute("SELECT 1 / 0", &[]).await.map_err(|e| HandlerError::permanent(e.to_string()))?;
        }
        if let Some((at, died)) = &self.die_at
            && event.position == *at
            && !died.swap(true, Ordering::SeqCst)
        {
            tx.execute("SELECT pg_terminate_backend(pg_backend_pid())", &[]).await?;
        }
        let position = i64::try_from(event.position).unwrap();
        tx.execute(&format!("INSERT INTO \"{s}\".applied (position) VALUES ($1)"), &[&position]).await?;
        tx.execute(
            &format!(
                "INSERT INTO \"{s}\".counts (stream, n) VALUES ($1, 1)
                 ON CONFLICT (stream) DO UPDATE SET n = counts.n + 1"
            ),
            &[&event.stream.as_str()],
        )
        .await?;
        // After its writes, which must be rolled back.
        assert!(event.event_type != "Panic", "a bug at {}", event.position);
        if let Some((at, tell)) = &self.hang_at
            && event.position == *at
        {
            let _ = tell.send(());
            std::future::pending::<()>().await;
        }
        Ok(())
    }

    async fn reset(&mut self, tx: &PgCheckpointTx) -> Result<(), HandlerError> {
        let s = &self.schema;
        tx.batch_execute(&format!("TRUNCATE \"{s}\".applied, \"{s}\".counts")).await?;
        Ok(())
    }
}

async fn setup() -> Option<(PgStore, common::SchemaGuard)> {
    let (store, guard) = common::open().await?;
    let s = &guard.schema;
    let tx = store.begin_checkpoint_tx("setup").await.unwrap();
    tx.batch_execute(&format!(
        "CREATE TABLE \"{s}\".applied (position bigint NOT NULL);
         CREATE TABLE \"{s}\".counts (stream text PRIMARY KEY, n bigint NOT NULL);"
    ))
    .await
    .unwrap();
    tx.commit(0).await.unwrap();
    Some((store, guard))
}

/// Appends `n` events round-robin over the test streams, in appends of 50.
async fn append(store: &PgStore, n: u64, event_type: impl Fn(u64) -> &'static str) {
    let mut i = 0;
    while i < n {
        let stream = StreamName::new(format!("acct-{}", i / 50 % STREAMS)).unwrap();
        let events: Vec<EventData> = (i..(i + 50).min(n))
            .map(|k| EventData::json(event_type(k), &serde_json::json!({ "k": k })).unwrap())
            .collect();
        i += events.len() as u64;
        store.append(&stream, ExpectedVersion::Any, events).await.unwrap();
    }
}

/// (rows in `applied`, distinct positions in it, sum of the counters).
async fn totals(store: &PgStore, schema: &str) -> (i64, i64, i64) {
    let tx = store.begin_checkpoint_tx("totals").await.unwrap();
    let row = tx
        .query_one(
            &format!(
                "SELECT (SELECT count(*) FROM \"{schema}\".applied),
                        (SELECT count(DISTINCT position) FROM \"{schema}\".applied),
                        (SELECT coalesce(sum(n), 0)::bigint FROM \"{schema}\".counts)"
            ),
            &[],
        )
        .await
        .unwrap();
    let totals = (row.get(0), row.get(1), row.get(2));
    tx.rollback().await.unwrap();
    totals
}

const CHECKPOINT: &str = "$projection-counter-v1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_mid_batch_applies_nothing_twice() {
    let Some((store, guard)) = setup().await else { return };
    let schema = guard.schema.clone();
    append(&store, 2_000, |_| "Deposited").await;

    // First process: hangs after writing position 1,250, in the middle of
    // the 13th batch of 100, with that batch's writes uncommitted.
    let (tell, mut hung) = mpsc::unbounded_channel();
    let mut first = Counter::new(&schema);
    first.hang_at = Some((1_250, tell));
    let running = ProjectionRunner::exactly_once(&store, first).batch_size(100).start().unwrap();
    tokio::time::timeout(Duration::from_secs(60), hung.recv()).await.unwrap().unwrap();
    assert_eq!(store.load_checkpoint(CHECKPOINT).await.unwrap(), Some(1_200));
    assert_eq!(totals(&store, &schema).await, (1_200, 1_200, 1_200), "only committed batches are visible");

    // The process dies: its connection goes, PostgreSQL rolls back.
    drop(running);

    // Second process, a fresh store instance on the same schema.
    let second = common::reopen(&schema).await;
    let running =
        ProjectionRunner::exactly_once(&second, Counter::new(&schema)).batch_size(100).start().unwrap();
    let store_dyn: Arc<dyn Store> = Arc::new(second.clone());
    tokio::time::timeout(Duration::from_secs(60), running.wait_until_caught_up(&*store_dyn))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(totals(&second, &schema).await, (2_000, 2_000, 2_000));

    // It follows live appends too, still once each.
    append(&second, 300, |_| "Deposited").await;
    tokio::time::timeout(Duration::from_secs(60), running.wait_until_caught_up(&*store_dyn))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(totals(&second, &schema).await, (2_300, 2_300, 2_300));
    assert_eq!(second.load_checkpoint(CHECKPOINT).await.unwrap(), Some(2_300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_work_without_duplicates() {
    let Some((store, guard)) = setup().await else { return };
    let schema = guard.schema.clone();
    append(&store, 1_000, |_| "Deposited").await;

    let other = common::reopen(&schema).await;
    let a = ProjectionRunner::exactly_once(&store, Counter::new(&schema)).batch_size(50).start().unwrap();
    let b = ProjectionRunner::exactly_once(&other, Counter::new(&schema)).batch_size(50).start().unwrap();
    append(&store, 1_000, |_| "Deposited").await;

    let store_dyn: Arc<dyn Store> = Arc::new(store.clone());
    let head = 2_000;
    tokio::time::timeout(Duration::from_secs(60), async {
        while store.load_checkpoint(CHECKPOINT).await.unwrap() != Some(head) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    // Neither instance stopped, and between them every event landed once.
    assert!(a.stats().stopped.is_none() && b.stats().stopped.is_none());
    assert_eq!(totals(&store, &schema).await, (2_000, 2_000, 2_000));
    assert!(store_dyn.next_position().await.unwrap() == head);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_statement_parks_its_event_and_keeps_the_rest_of_the_batch() {
    let Some((store, guard)) = setup().await else { return };
    let schema = guard.schema.clone();
    // Positions 130 and 260 are poison; batches of 100.
    append(&store, 400, |k| if k == 130 || k == 260 { "Poison" } else { "Deposited" }).await;

    let retry = RetryPolicy {
        max_attempts: 2,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(2),
        ..RetryPolicy::default()
    };
    let running = ProjectionRunner::exactly_once(&store, Counter::new(&schema))
        .batch_size(100)
        .retry(retry)
        .start()
        .unwrap();
    let store_dyn: Arc<dyn Store> = Arc::new(store.clone());
    let stats = tokio::time::timeout(Duration::from_secs(60), running.wait_until_caught_up(&*store_dyn))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stats.parked, 2);
    assert!(stats.stopped.is_none());
    // Every other event once; nothing of the poison events.
    assert_eq!(totals(&store, &schema).await, (398, 398, 398));
    let parked = annals::consumers::DeadLetterQueue::new(store_dyn.clone(), "projection-counter")
        .unwrap()
        .list()
        .await
        .unwrap();
    let mut positions: Vec<u64> = parked.iter().map(|p| p.position).collect();
    positions.sort_unstable();
    assert_eq!(positions, vec![130, 260]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_resets_the_model_and_the_checkpoint_together() {
    let Some((store, guard)) = setup().await else { return };
    let schema = guard.schema.clone();
    append(&store, 500, |_| "Deposited").await;
    let store_dyn: Arc<dyn Store> = Arc::new(store.clone());

    let running =
        ProjectionRunner::exactly_once(&store, Counter::new(&schema)).batch_size(64).start().unwrap();
    tokio::time::timeout(Duration::from_secs(60), running.wait_until_caught_up(&*store_dyn))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(totals(&store, &schema).await, (500, 500, 500));

    let running = running.rebuild().await.unwrap();
    append(&store, 100, |_| "Deposited").await;
    tokio::time::timeout(Duration::from_secs(60), running.wait_until_caught_up(&*store_dyn))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(totals(&store, &schema).await, (600, 600, 600));
}

/// The transaction of a batch dies in the middle (its session terminated):
/// the event being handled is not the culprit, so it is neither retried
/// into the dead transaction nor parked. The runner starts over from the
/// checkpoint, replaying the batch on a new transaction, and every event
/// lands once, with nothing in the dead-letter stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_whose_transaction_dies_is_replayed_not_parked() {
    let Some((store, guard)) = setup().await else { return };
    let schema = guard.schema.clone();
    append(&store, 300, |_| "Deposited").await;
    let store_dyn: Arc<dyn Store> = Arc::new(store.clone());
    let retry = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(2),
        ..RetryPolicy::default()
    };

    let died = Arc::new(AtomicBool::new(false));
    let mut counter = Counter::new(&schema);
    counter.die_at = Some((150, died.clone()));
    let running =
        ProjectionRunner::exactly_once(&store, counter).batch_size(100).retry(retry).start().unwrap();
    let stats = tokio::time::timeout(Duration::from_secs(60), running.wait_until_caught_up(&*store_dyn))
        .await
        .unwrap()
        .unwrap();
    assert!(died.load(Ordering::SeqCst));
    assert_eq!((stats.parked, stats.restarts), (0, 1), "{stats:?}");
    assert!(stats.stopped.is_none());
    assert_eq!(totals(&store, &schema).await, (300, 300, 300));
    let parked = annals::consumers::DeadLetterQueue::new(store_dyn.clone(), "projection-counter")
        .unwrap()
        .list()
        .await
        .unwrap();
    assert!(parked.is_empty(), "parked: {:?}", parked.iter().map(|p| p.position).collect::<Vec<_>>());
}

/// Told not to restart, the runner stops on a lost batch transaction,
/// saying why, having parked nothing; a new runner replays the batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_told_not_to_restart_stops_on_a_lost_batch_transaction() {
    let Some((store, guard)) = setup().await else { return };
    let schema = guard.schema.clone();
    append(&store, 300, |_| "Deposited").await;
    let store_dyn: Arc<dyn Store> = Arc::new(store.clone());
    let died = Arc::new(AtomicBool::new(false));
    let mut counter = Counter::new(&schema);
    counter.die_at = Some((150, died.clone()));
    let running = ProjectionRunner::exactly_once(&store, counter)
        .batch_size(100)
        .restart_on_store_errors(false)
        .start()
        .unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(60), running.wait_until_caught_up(&*store_dyn))
        .await
        .unwrap();
    assert!(stopped.is_err(), "caught up through a dead transaction: {stopped:?}");
    let stats = running.stats();
    assert_eq!(stats.parked, 0);
    assert!(stats.stopped.as_deref().is_some_and(|r| r.contains("transaction was lost")), "{stats:?}");
    assert_eq!(store.load_checkpoint(CHECKPOINT).await.unwrap(), Some(100));
    assert_eq!(totals(&store, &schema).await, (100, 100, 100));

    let running =
        ProjectionRunner::exactly_once(&store, Counter::new(&schema)).batch_size(100).start().unwrap();
    tokio::time::timeout(Duration::from_secs(60), running.wait_until_caught_up(&*store_dyn))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(totals(&store, &schema).await, (300, 300, 300));
}

/// Counts like [`Counter`], but its first two batches fail part-way (as a
/// lock timeout or a deadlock with another writer of the model would): the
/// batch at its third event, then the re-application of the events before
/// it at its second.
struct Flaky {
    inner: Counter,
    calls: Arc<std::sync::atomic::AtomicU32>,
}

#[async_trait]
impl PgProjection for Flaky {
    fn name(&self) -> &str {
        "counter"
    }

    async fn handle(&mut self, tx: &PgCheckpointTx, event: &RecordedEvent) -> Result<(), HandlerError> {
        self.inner.handle(tx, event).await
    }

    async fn handle_batch(
        &mut self,
        tx: &PgCheckpointTx,
        events: &[RecordedEvent],
    ) -> Result<(), annals::consumers::BatchError> {
        let fail_at = match self.calls.fetch_add(1, Ordering::SeqCst) {
            0 => Some(2),
            1 => Some(1),
            _ => None,
        };
        for (i, e) in events.iter().enumerate() {
            if Some(i) == fail_at {
                return Err(annals::consumers::BatchError {
                    failed_at: i,
                    error: HandlerError::new("lock timeout"),
                });
            }
            self.inner
                .handle(tx, e)
                .await
                .map_err(|error| annals::consumers::BatchError { failed_at: i, error })?;
        }
        Ok(())
    }
}

/// When a failed batch fails again while the events before its failure are
/// re-applied, the rollback undoes the re-application too: nothing of the
/// batch is applied, and the runner must not take the events before the
/// second failure as done. (It did: event 0 was never applied, nothing was
/// parked, and the checkpoint moved past it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_failing_again_while_re_applied_skips_nothing() {
    let Some((store, guard)) = setup().await else { return };
    let schema = guard.schema.clone();
    append(&store, 10, |_| "Deposited").await;
    let retry = RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(2),
        ..RetryPolicy::default()
    };
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let flaky = Flaky { inner: Counter::new(&schema), calls: calls.clone() };
    let running = ProjectionRunner::exactly_once(&store, flaky).batch_size(100).retry(retry).start().unwrap();
    let store_dyn: Arc<dyn Store> = Arc::new(store.clone());
    let stats = tokio::time::timeout(Duration::from_secs(60), running.wait_until_caught_up(&*store_dyn))
        .await
        .expect("never caught up")
        .unwrap();
    assert!(calls.load(Ordering::SeqCst) >= 3, "the failures were never exercised");
    assert_eq!(stats.parked, 0);
    assert_eq!(totals(&store, &schema).await, (10, 10, 10), "every event applied once");
    running.stop().await.unwrap();
}

/// A runner stopped in the middle of a batch keeps nothing of it open: its
/// checkpoint transaction is rolled back, so another instance of the
/// projection takes the checkpoint at once while the stopped runner is
/// still kept (before, it waited out its answer timeout, again and again),
/// and rebuilding the stopped runner starts from a clean transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_stopped_mid_batch_keeps_no_checkpoint_locked() {
    let Some((store, guard)) = setup().await else { return };
    let schema = guard.schema.clone();
    append(&store, 100, |_| "Deposited").await;
    let (tell, mut hung) = mpsc::unbounded_channel();
    let mut first = Counter::new(&schema);
    first.hang_at = Some((50, tell));
    let running = ProjectionRunner::exactly_once(&store, first).batch_size(100).start().unwrap();
    tokio::time::timeout(Duration::from_secs(60), hung.recv()).await.unwrap().unwrap();
    let stopped = running.stop().await.unwrap();

    let other = PgStore::builder(common::url())
        .schema(&schema)
        .answer_timeout(Duration::from_secs(3))
        .open()
        .await
        .unwrap();
    let begun = other.begin_checkpoint_tx(CHECKPOINT).await;
    let tx = begun.expect("the stopped runner still holds the checkpoint");
    assert_eq!(tx.checkpoint(), None, "nothing of the stopped batch committed");
    tx.rollback().await.unwrap();
    assert_eq!(totals(&store, &schema).await, (0, 0, 0), "nothing of the stopped batch applied");
    drop(stopped);
}

/// [`Counter`] over `Deposited` events only, so a batch can scan events it
/// skips.
struct Deposits(Counter);

#[async_trait]
impl PgProjection for Deposits {
    fn name(&self) -> &str {
        "counter"
    }

    fn filter(&self) -> annals_core::Filter {
        annals_core::Filter::event_type("Deposited")
    }

    async fn handle(&mut self, tx: &PgCheckpointTx, event: &RecordedEvent) -> Result<(), HandlerError> {
        self.0.handle(tx, event).await
    }
}

/// How many of the schema's sessions wait for an advisory lock (a
/// checkpoint's).
async fn lock_waiters(schema: &str) -> i64 {
    let (client, conn) = tokio_postgres::connect(&common::url(), tokio_postgres::NoTls).await.unwrap();
    let driver = tokio::spawn(conn);
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE l.locktype = 'advisory' AND NOT l.granted AND a.application_name = $1",
            &[&format!("annals {schema}")],
        )
        .await
        .unwrap();
    drop(client);
    let _ = driver.await;
    row.get(0)
}

async fn wait_for_lock_waiters(schema: &str, n: i64) {
    tokio::time::timeout(Duration::from_secs(60), async {
        while lock_waiters(schema).await < n {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("nobody queued for the checkpoint");
}

/// A batch that scans only events the filter skips commits the scan; the
/// runner must then wait for new events, not commit its position again in
/// a transaction of its own: another instance may have committed a batch
/// in between, and committing the older position over it moved the
/// checkpoint back, so the runner applied that instance's events a second
/// time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scan_of_skipped_events_never_moves_the_checkpoint_back_over_another_instance() {
    let Some((store, guard)) = setup().await else { return };
    let schema = guard.schema.clone();
    append(&store, 10, |_| "Deposited").await;
    let running = ProjectionRunner::exactly_once(&store, Deposits(Counter::new(&schema))).start().unwrap();
    let store_dyn: Arc<dyn Store> = Arc::new(store.clone());
    tokio::time::timeout(Duration::from_secs(60), running.wait_until_caught_up(&*store_dyn))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(totals(&store, &schema).await, (10, 10, 10));

    // Hold the checkpoint while an event the runner skips arrives: its
    // next batch queues for the lock.
    let held = store.begin_checkpoint_tx(CHECKPOINT).await.unwrap();
    assert_eq!(held.checkpoint(), Some(10));
    let noise = StreamName::new("audit-1").unwrap();
    let event = EventData::json("Noise", &serde_json::json!({})).unwrap();
    store.append(&noise, ExpectedVersion::Any, vec![event]).await.unwrap();
    wait_for_lock_waiters(&schema, 1).await;
    // A second instance queues behind it.
    let other = store.clone();
    let second = tokio::spawn(async move { other.begin_checkpoint_tx(CHECKPOINT).await.unwrap() });
    wait_for_lock_waiters(&schema, 2).await;
    held.commit(10).await.unwrap();

    // The runner scans the skipped event and commits 11; then the second
    // instance gets the checkpoint and applies a deposit the runner has not
    // read yet.
    let second = tokio::time::timeout(Duration::from_secs(60), second).await.unwrap().unwrap();
    assert_eq!(second.checkpoint(), Some(11));
    let event = EventData::json("Deposited", &serde_json::json!({ "k": 11 })).unwrap();
    let deposit = StreamName::new("acct-0").unwrap();
    store.append(&deposit, ExpectedVersion::Any, vec![event]).await.unwrap();
    second.execute(&format!("INSERT INTO \"{schema}\".applied (position) VALUES (11)"), &[]).await.unwrap();
    second
        .execute(&format!("UPDATE \"{schema}\".counts SET n = n + 1 WHERE stream = 'acct-0'"), &[])
        .await
        .unwrap();
    second.commit(12).await.unwrap();

    let stats =
        tokio::time::timeout(Duration::from_secs(60), running.wait_for_position(11)).await.unwrap().unwrap();
    assert_eq!(stats.checkpoint, Some(12));
    assert_eq!(totals(&store, &schema).await, (11, 11, 11), "the second instance's deposit applied once");
    assert_eq!(store.load_checkpoint(CHECKPOINT).await.unwrap(), Some(12));
    running.stop().await.unwrap();
}

/// A handler that panics mid-batch, after some of its statements ran: the
/// panic fails its event like an error, and the batch's other events are
/// applied once (the panic unwound past the savepoint's rollback, so the
/// events before it stayed applied in the transaction and were applied
/// again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_parks_its_event_and_applies_the_rest_once() {
    let Some((store, guard)) = setup().await else { return };
    let schema = guard.schema.clone();
    append(&store, 100, |k| if k == 30 { "Panic" } else { "Deposited" }).await;
    let retry = RetryPolicy {
        max_attempts: 2,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(2),
        ..RetryPolicy::default()
    };
    let running = ProjectionRunner::exactly_once(&store, Counter::new(&schema))
        .batch_size(100)
        .retry(retry)
        .start()
        .unwrap();
    let store_dyn: Arc<dyn Store> = Arc::new(store.clone());
    let stats = tokio::time::timeout(Duration::from_secs(60), running.wait_until_caught_up(&*store_dyn))
        .await
        .expect("never caught up")
        .expect("the runner stopped");
    assert_eq!((stats.parked, stats.stopped), (1, None));
    assert_eq!(totals(&store, &schema).await, (99, 99, 99), "every other event applied once");
    running.stop().await.unwrap();
}

/// [`Counter`] with its own `handle_batch`, which lets a handler's panic
/// through.
struct WholeBatch(Counter);

#[async_trait]
impl PgProjection for WholeBatch {
    fn name(&self) -> &str {
        "counter"
    }

    async fn handle(&mut self, tx: &PgCheckpointTx, event: &RecordedEvent) -> Result<(), HandlerError> {
        self.0.handle(tx, event).await
    }

    async fn handle_batch(
        &mut self,
        tx: &PgCheckpointTx,
        events: &[RecordedEvent],
    ) -> Result<(), annals::consumers::BatchError> {
        for (i, e) in events.iter().enumerate() {
            self.0
                .handle(tx, e)
                .await
                .map_err(|error| annals::consumers::BatchError { failed_at: i, error })?;
        }
        Ok(())
    }
}

/// The same through a `handle_batch` of the projection's own: the batch's
/// writes before the panic are rolled back with it, not left applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_through_a_projections_own_batch_applies_nothing_twice() {
    let Some((store, guard)) = setup().await else { return };
    let schema = guard.schema.clone();
    append(&store, 40, |k| if k == 30 { "Panic" } else { "Deposited" }).await;
    let retry = RetryPolicy {
        max_attempts: 2,
        initial_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(2),
        ..RetryPolicy::default()
    };
    let running = ProjectionRunner::exactly_once(&store, WholeBatch(Counter::new(&schema)))
        .batch_size(100)
        .retry(retry)
        .start()
        .unwrap();
    let store_dyn: Arc<dyn Store> = Arc::new(store.clone());
    let stats = tokio::time::timeout(Duration::from_secs(60), running.wait_until_caught_up(&*store_dyn))
        .await
        .expect("never caught up")
        .expect("the runner stopped");
    assert_eq!((stats.parked, stats.stopped), (1, None));
    assert_eq!(totals(&store, &schema).await, (39, 39, 39), "every other event applied once");
    running.stop().await.unwrap();
}
