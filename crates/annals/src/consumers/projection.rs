//! Checkpointed projections: read models built from `$all`.
//!
//! # Delivery guarantee: at least once
//! The runner hands events to the projection in batches, in position order,
//! and commits the checkpoint (the position after the batch) through a
//! [`ProjectionCheckpoint`] after each batch. A crash between the
//! projection's writes and the checkpoint commit replays that batch on
//! restart, so handlers must be idempotent: upsert by key, or remember the
//! last applied position per row and ignore older ones. A backend that can
//! commit the projection's writes and the checkpoint in one transaction
//! (PostgreSQL) implements [`ProjectionCheckpoint::begin`] and
//! [`ProjectionCheckpoint::commit`] to do exactly that, which makes the
//! projection exactly once: `ProjectionRunner::exactly_once` (feature
//! `postgres`).
//!
//! # Failures
//! An event whose handler fails is retried with the runner's
//! [`RetryPolicy`]; when the attempts are used up (or the failure is
//! [`HandlerError::permanent`]) it is parked in `$dlq-projection-{name}`
//! and the projection moves on. While retrying, the stuck event is visible
//! in [`ProjectionStats::retrying`]; parked events count in
//! [`ProjectionStats::parked`] and the `annals_projection_parked_total`
//! counter, so a failing projection is never silently stalled.
//!
//! A store that fails instead (a lost connection, a failover, a checkpoint
//! that cannot be committed, a lost batch transaction:
//! [`ProjectionCheckpoint::intact`]) is not the event's fault: nothing is
//! parked. The runner starts over from its checkpoint after the retry
//! policy's backoff, for as long as the error is transient, counting
//! [`ProjectionStats::restarts`] (and `annals_projection_restarts_total`)
//! and showing the error in [`ProjectionStats::store_error`]; other errors,
//! or any with [`ProjectionRunner::restart_on_store_errors`] off, stop it.

use std::{panic::AssertUnwindSafe, sync::Arc};

use annals_core::{
    Direction, Filter, ReadAll, ReadFrom, RecordedEvent, Store, SubscribeFrom, SubscriptionRequest,
};
use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{
    Backoff, ConsumerError, ConsumerResult, DeadLetterQueue, HandlerError, ParkedMessage, RetryPolicy,
    validate_name,
};

/// A handler failed at one event of a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchError {
    /// Index in the batch of the event that failed; every event before it
    /// was applied, it and those after were not.
    pub failed_at: usize,
    /// Why.
    pub error: HandlerError,
}

/// A read model fed from `$all`.
///
/// The runner owns the projection; share the read model with readers
/// through something the projection holds (an `Arc<RwLock<..>>`, a
/// database pool).
#[async_trait]
pub trait Projection: Send + 'static {
    /// Stable name (1–200 bytes): names the checkpoint and dead letters.
    fn name(&self) -> &str;

    /// Version of the projection's logic and schema. Bump it to rebuild
    /// beside the old one (see [`blue_green_switch`]).
    fn version(&self) -> u32 {
        1
    }

    /// Which events it wants (default: every user event).
    fn filter(&self) -> Filter {
        Filter::all()
    }

    /// Applies one event. Must be idempotent (see the module docs).
    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), HandlerError>;

    /// Applies a batch, in order. Override to write a batch at once; report
    /// the first failing event in [`BatchError::failed_at`] (events before it
    /// must be applied, it and later ones not). The default calls
    /// [`Projection::handle`] for each event.
    /// A handler that panics fails its event like an error.
    async fn handle_batch(&mut self, events: &[RecordedEvent]) -> Result<(), BatchError> {
        for (index, event) in events.iter().enumerate() {
            AssertUnwindSafe(self.handle(event))
                .catch_unwind()
                .await
                .unwrap_or_else(|p| Err(HandlerError::panicked(p)))
                .map_err(|error| BatchError { failed_at: index, error })?;
        }
        Ok(())
    }

    /// Clears the read model before a rebuild.
    async fn reset(&mut self) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// Where a projection's progress is kept. The runner calls `commit` after
/// every batch, once the projection has handled it.
///
/// The default, [`CheckpointStoreCheckpoint`], uses the store's named
/// checkpoints. A transactional backend implements this trait on a type
/// that shares a transaction with the projection: the projection writes
/// into the open transaction in `handle_batch`, and `commit` writes the
/// checkpoint into the same transaction and commits it.
#[async_trait]
pub trait ProjectionCheckpoint: Send + Sync + 'static {
    /// The position of the first event not yet processed, if any was saved.
    async fn load(&self, name: &str) -> annals_core::Result<Option<u64>>;

    /// Called before every batch is read, and followed by exactly one
    /// [`ProjectionCheckpoint::commit`] (unless the runner stops on an
    /// error). A checkpoint that someone else may move — another instance
    /// of the same projection on a shared database — returns its current
    /// value here, held (locked) until the commit, and the runner continues
    /// from that value instead of its own. The default returns `None`: the
    /// runner keeps its own position.
    async fn begin(&self, name: &str) -> annals_core::Result<Option<u64>> {
        let _ = name;
        Ok(None)
    }

    /// Records that every event before `next_position` is processed.
    async fn commit(&self, name: &str, next_position: u64) -> annals_core::Result<()>;

    /// Whether the batch begun by [`ProjectionCheckpoint::begin`] can still
    /// be committed. A transactional checkpoint whose transaction was lost
    /// (its connection broke) answers `false`: what the batch applied went
    /// with it, so a failing event is then no fault of its own. The runner
    /// asks after a handler fails and, on `false`, starts over from the
    /// checkpoint (replaying the batch) instead of retrying the event or
    /// parking it. The default: always `true`.
    async fn intact(&self) -> bool {
        true
    }

    /// Called once the runner has stopped (told to, or on an error),
    /// wherever it was: a batch begun by [`ProjectionCheckpoint::begin`]
    /// will not be committed. A transactional checkpoint rolls it back
    /// here, so that it holds no lock or connection while the stopped
    /// runner is kept (another instance would wait for it). The default
    /// does nothing.
    async fn abandon(&self) {}
}

/// [`ProjectionCheckpoint`] over the store's named checkpoints.
pub struct CheckpointStoreCheckpoint(pub Arc<dyn Store>);

#[async_trait]
impl ProjectionCheckpoint for CheckpointStoreCheckpoint {
    async fn load(&self, name: &str) -> annals_core::Result<Option<u64>> {
        self.0.load_checkpoint(name).await
    }

    async fn commit(&self, name: &str, next_position: u64) -> annals_core::Result<()> {
        self.0.save_checkpoint(name, next_position).await
    }
}

/// A projection's progress, published after every batch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ProjectionStats {
    /// The projection.
    pub name: String,
    /// Its version.
    pub version: u32,
    /// The committed checkpoint: the first position not yet processed.
    pub checkpoint: Option<u64>,
    /// Events handled (or parked) since this runner started.
    pub processed: u64,
    /// Events parked since this runner started.
    pub parked: u64,
    /// Positions of `$all` not yet scanned (the head minus the
    /// checkpoint; events the filter skips count until they are scanned).
    pub lag: u64,
    /// Whether the runner has read up to the head at least once and now
    /// follows live.
    pub live: bool,
    /// The event being retried now: (position, failed attempts, reason).
    pub retrying: Option<(u64, u32, String)>,
    /// Set when the runner stopped on an error it could not get past: a
    /// store error that is not transient, or any store error when
    /// [`ProjectionRunner::restart_on_store_errors`] is off. Restart it.
    pub stopped: Option<String>,
    /// How often the runner started over from its checkpoint after a
    /// transient store error (a lost connection, a failover, a lost batch
    /// transaction), waiting the retry policy's backoff before each.
    pub restarts: u64,
    /// The store error behind the latest restart, until a batch commits
    /// again.
    pub store_error: Option<String>,
}

/// Configures and starts a projection.
pub struct ProjectionRunner {
    store: Arc<dyn Store>,
    projection: Box<dyn Projection>,
    checkpoint: Arc<dyn ProjectionCheckpoint>,
    batch_size: usize,
    retry: RetryPolicy,
    restart: bool,
}

/// The checkpoint name of a projection version.
pub(super) fn checkpoint_name(name: &str, version: u32) -> String {
    format!("$projection-{name}-v{version}")
}

/// The checkpoint holding which version of a projection serves reads.
fn active_name(name: &str) -> String {
    format!("$projection-{name}-active")
}

/// Which version of the projection `name` serves reads (set by
/// [`blue_green_switch`]); `None` before the first switch.
pub async fn active_version(store: &dyn Store, name: &str) -> ConsumerResult<Option<u32>> {
    Ok(store.load_checkpoint(&active_name(name)).await?.and_then(|v| u32::try_from(v).ok()))
}

impl ProjectionRunner {
    /// A runner over `store` with default settings: batches of 500, the
    /// default retry policy, checkpoints in the store.
    pub fn new(store: Arc<dyn Store>, projection: impl Projection) -> Self {
        Self::boxed(store, Box::new(projection))
    }

    /// [`ProjectionRunner::new`] for an already boxed projection.
    pub fn boxed(store: Arc<dyn Store>, projection: Box<dyn Projection>) -> Self {
        ProjectionRunner {
            checkpoint: Arc::new(CheckpointStoreCheckpoint(store.clone())),
            store,
            projection,
            batch_size: 500,
            retry: RetryPolicy::default(),
            restart: true,
        }
    }

    /// Events per batch (and per checkpoint commit); at least 1.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// The retry policy for failing events.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Whether a transient store error (reading, committing, a lost batch
    /// transaction) makes the runner start over from its checkpoint after
    /// the retry policy's backoff, for as long as it lasts (default), or
    /// stop it (`false`: for callers that supervise runners themselves).
    /// Either way no event is skipped: the batch in flight is handled
    /// again, at least once (exactly once with
    /// `ProjectionRunner::exactly_once`). Errors that are not transient
    /// always stop it.
    pub fn restart_on_store_errors(mut self, restart: bool) -> Self {
        self.restart = restart;
        self
    }

    /// Where progress is kept (default: the store's checkpoints).
    pub fn checkpoint(mut self, checkpoint: Arc<dyn ProjectionCheckpoint>) -> Self {
        self.checkpoint = checkpoint;
        self
    }

    /// The checkpoint name this runner uses.
    pub fn checkpoint_name(&self) -> String {
        checkpoint_name(self.projection.name(), self.projection.version())
    }

    /// Starts the runner task: it resumes from the checkpoint, catches up,
    /// then follows live. Fails on an invalid projection name.
    pub fn start(self) -> ConsumerResult<RunningProjection> {
        let name = self.projection.name().to_owned();
        let version = self.projection.version();
        validate_name("projection", &name)?;
        let dlq = DeadLetterQueue::new(self.store.clone(), &format!("projection-{name}"))?;
        let (stats_tx, stats) =
            watch::channel(ProjectionStats { name: name.clone(), version, ..ProjectionStats::default() });
        let cancel = CancellationToken::new();
        let config = Config {
            store: self.store,
            checkpoint: self.checkpoint,
            batch_size: self.batch_size,
            retry: self.retry,
            restart: self.restart,
            name,
            version,
            dlq,
        };
        let task = tokio::spawn(run(config, self.projection, stats_tx, cancel.clone()));
        Ok(RunningProjection { stats, task: Some(task), _guard: cancel.clone().drop_guard(), cancel })
    }
}

/// A projection runner's task. Dropping it stops the task (an unfinished
/// batch is handled again by the next start: at least once).
pub struct RunningProjection {
    stats: watch::Receiver<ProjectionStats>,
    task: Option<tokio::task::JoinHandle<(ProjectionRunner, Option<String>)>>,
    cancel: CancellationToken,
    _guard: DropGuard,
}

impl RunningProjection {
    /// The latest stats.
    pub fn stats(&self) -> ProjectionStats {
        self.stats.borrow().clone()
    }

    /// Waits until `condition` holds for the stats (checked after every
    /// batch). Fails with [`ConsumerError::Stopped`] if the runner stops first.
    pub async fn wait_for(
        &self,
        condition: impl Fn(&ProjectionStats) -> bool,
    ) -> ConsumerResult<ProjectionStats> {
        let mut rx = self.stats.clone();
        let result = rx.wait_for(|s| condition(s) || s.stopped.is_some()).await.map(|s| s.clone());
        match result {
            Ok(stats) if stats.stopped.is_none() || condition(&stats) => Ok(stats),
            _ => Err(ConsumerError::Stopped),
        }
    }

    /// Waits until the checkpoint has passed `position`.
    pub async fn wait_for_position(&self, position: u64) -> ConsumerResult<ProjectionStats> {
        self.wait_for(|s| s.checkpoint.is_some_and(|c| c > position)).await
    }

    /// Waits until the runner has caught up with the head of `$all` as of
    /// now.
    pub async fn wait_until_caught_up(&self, store: &dyn Store) -> ConsumerResult<ProjectionStats> {
        let head = store.next_position().await?;
        self.wait_for(|s| s.live && s.checkpoint.unwrap_or(0) >= head).await
    }

    /// Stops the task and gives back the runner (with the projection) to
    /// start again later.
    pub async fn stop(mut self) -> ConsumerResult<ProjectionRunner> {
        self.cancel.cancel();
        let task = self.task.take().ok_or(ConsumerError::Stopped)?;
        let (runner, _) = task.await.map_err(|_| ConsumerError::Stopped)?;
        Ok(runner)
    }

    /// Rebuilds in place: stops, resets the read model and the checkpoint,
    /// and replays everything. Readers see a partial model until it has
    /// caught up; use [`blue_green_switch`] to avoid that.
    pub async fn rebuild(self) -> ConsumerResult<RunningProjection> {
        let mut runner = self.stop().await?;
        runner.projection.reset().await.map_err(|e| ConsumerError::ResetFailed { reason: e.reason })?;
        runner.checkpoint.commit(&runner.checkpoint_name(), 0).await?;
        runner.start()
    }
}

/// Blue/green rebuild: starts `next` (a new version of the projection
/// behind `current`) beside it under its own checkpoint, waits until it has
/// caught up, records it as the active version (see [`active_version`]),
/// then stops the old runner and puts the new one in its place in
/// `current`. Readers keep using the old read model until the switch.
///
/// When the switch fails (the same version again, the new runner stopped
/// before it caught up, the store failed) `current` is untouched and still
/// serving, and the new runner is stopped (a retry resumes it from its own
/// checkpoint).
pub async fn blue_green_switch(
    store: Arc<dyn Store>,
    current: &mut RunningProjection,
    next: ProjectionRunner,
) -> ConsumerResult<()> {
    let old = current.stats();
    let name = next.projection.name().to_owned();
    if name != old.name || next.projection.version() == old.version {
        return Err(ConsumerError::InvalidName {
            reason: format!(
                "blue/green needs the same projection name ('{}' vs '{name}') and a different version",
                old.name
            ),
        });
    }
    let version = next.projection.version();
    let running = next.start()?;
    running.wait_until_caught_up(&*store).await?;
    store.save_checkpoint(&active_name(&name), u64::from(version)).await?;
    tracing::info!(projection = %name, from = old.version, to = version, "switched projection version");
    let _ = std::mem::replace(current, running).stop().await;
    Ok(())
}

struct Config {
    store: Arc<dyn Store>,
    checkpoint: Arc<dyn ProjectionCheckpoint>,
    batch_size: usize,
    retry: RetryPolicy,
    restart: bool,
    name: String,
    version: u32,
    dlq: DeadLetterQueue,
}

impl Config {
    fn into_runner(self, projection: Box<dyn Projection>) -> ProjectionRunner {
        ProjectionRunner {
            store: self.store,
            projection,
            checkpoint: self.checkpoint,
            batch_size: self.batch_size,
            retry: self.retry,
            restart: self.restart,
        }
    }
}

async fn run(
    config: Config,
    mut projection: Box<dyn Projection>,
    stats: watch::Sender<ProjectionStats>,
    cancel: CancellationToken,
) -> (ProjectionRunner, Option<String>) {
    let outcome = tokio::select! {
        biased;
        () = cancel.cancelled() => None,
        result = supervise(&config, &mut *projection, &stats) => result.err().map(|e| e.to_string()),
    };
    // Stopped between `begin` and `commit` (a cancel lands anywhere):
    // nothing of that batch commits.
    config.checkpoint.abandon().await;
    if let Some(reason) = &outcome {
        tracing::error!(projection = %config.name, %reason, "projection runner stopped");
        stats.send_modify(|s| s.stopped = Some(reason.clone()));
    }
    (config.into_runner(projection), outcome)
}

/// [`follow`], started over from the checkpoint after a transient store
/// error (see [`ProjectionRunner::restart_on_store_errors`]).
async fn supervise(
    config: &Config,
    projection: &mut dyn Projection,
    stats: &watch::Sender<ProjectionStats>,
) -> ConsumerResult<()> {
    // Failures in a row; a commit in between starts the backoff again.
    let mut failures = 0;
    let mut checkpoint_then = None;
    loop {
        let error = match follow(config, projection, stats).await {
            Err(ConsumerError::Store(e)) if config.restart && e.is_transient() => e,
            other => return other,
        };
        let checkpoint = stats.borrow().checkpoint;
        failures = if checkpoint == checkpoint_then { failures + 1 } else { 1 };
        checkpoint_then = checkpoint;
        let wait = config.retry.delay(failures, failures.into());
        tracing::warn!(projection = %config.name, %error, ?wait, "store error; starting over from the checkpoint");
        metrics::counter!("annals_projection_restarts_total", "projection" => config.name.clone())
            .increment(1);
        stats.send_modify(|s| {
            s.restarts += 1;
            s.store_error = Some(error.to_string());
        });
        tokio::time::sleep(wait).await;
    }
}

/// Reads pages of `read_all` from the checkpoint until the head, then waits
/// for the next commit and reads again. Pages give the exact scan position
/// even when the filter skips events, so the checkpoint (and the lag) moves
/// over skipped ranges too. The wake-up comes from a store subscription used
/// only as a doorbell: it is created before the first read, so no commit can
/// slip between a read and the wait.
async fn follow(
    config: &Config,
    projection: &mut dyn Projection,
    stats: &watch::Sender<ProjectionStats>,
) -> ConsumerResult<()> {
    let checkpoint_name = checkpoint_name(&config.name, config.version);
    let filter = projection.filter();
    let doorbell =
        || config.store.subscribe(SubscriptionRequest::all(Filter::all().with_system(), SubscribeFrom::End));
    let mut wake = doorbell();
    let mut backoff = Backoff::new();
    let mut next = config.checkpoint.load(&checkpoint_name).await?.unwrap_or(0);
    stats.send_modify(|s| s.checkpoint = Some(next));
    loop {
        // Whether the last `begin` still waits for its one `commit`.
        let begun = loop {
            if let Some(current) = config.checkpoint.begin(&checkpoint_name).await?
                && current != next
            {
                tracing::info!(projection = %config.name, from = next, to = current, "checkpoint moved by another instance; following it");
                next = current;
            }
            let slice = config
                .store
                .read_all(ReadAll {
                    from: ReadFrom::At(next),
                    direction: Direction::Forward,
                    limit: config.batch_size,
                    filter: filter.clone(),
                })
                .await?;
            let scanned_to =
                slice.next.unwrap_or(next).max(slice.events.last().map_or(0, |e| e.position + 1));
            if slice.events.is_empty() && scanned_to <= next {
                break true;
            }
            process(config, projection, &slice.events, stats).await?;
            next = scanned_to.max(next);
            commit(config, &checkpoint_name, next, stats, false).await?;
            if slice.events.is_empty() {
                break false;
            }
        };
        if begun {
            commit(config, &checkpoint_name, next, stats, true).await?;
        } else {
            // Committed already. Committing `next` again, without a `begin`,
            // would write it over whatever another instance committed since
            // (a transactional checkpoint opens a transaction of its own for
            // it), moving the checkpoint back over events that instance
            // applied, which this runner would then apply again.
            publish(config, next, stats, true).await?;
        }
        match wake.next().await {
            Some(Ok(_)) => backoff.delivered(),
            Some(Err(error)) => {
                let wait = backoff.failed();
                tracing::warn!(projection = %config.name, %error, ?wait, "wake-up subscription failed; resubscribing");
                tokio::time::sleep(wait).await;
                wake = doorbell();
            }
            None => {
                tokio::time::sleep(backoff.failed()).await;
                wake = doorbell();
            }
        }
        // One read serves every commit that is already known.
        while let Some(Some(Ok(_))) = wake.next().now_or_never() {}
    }
}

async fn commit(
    config: &Config,
    checkpoint_name: &str,
    next: u64,
    stats: &watch::Sender<ProjectionStats>,
    live: bool,
) -> ConsumerResult<()> {
    config.checkpoint.commit(checkpoint_name, next).await?;
    publish(config, next, stats, live).await
}

/// Publishes the committed checkpoint `next` in the stats and the lag gauge.
async fn publish(
    config: &Config,
    next: u64,
    stats: &watch::Sender<ProjectionStats>,
    live: bool,
) -> ConsumerResult<()> {
    let head = config.store.next_position().await?;
    let lag = head.saturating_sub(next);
    metrics::gauge!("annals_projection_lag", "projection" => config.name.clone()).set(lag as f64);
    stats.send_modify(|s| {
        s.checkpoint = Some(next);
        s.lag = lag;
        s.live |= live;
        s.retrying = None;
        s.store_error = None;
    });
    Ok(())
}

/// Handles a batch: the batch path first; a failing event is retried
/// alone, then parked; the rest of the batch continues after it.
async fn process(
    config: &Config,
    projection: &mut dyn Projection,
    events: &[RecordedEvent],
    stats: &watch::Sender<ProjectionStats>,
) -> ConsumerResult<()> {
    let mut start = 0;
    while start < events.len() {
        let Some(rest) = events.get(start..) else { break };
        // A panic fails the batch at its first event, as far as the runner
        // can tell: at least once, those before it may be applied again.
        let outcome = AssertUnwindSafe(projection.handle_batch(rest))
            .catch_unwind()
            .await
            .unwrap_or_else(|p| Err(BatchError { failed_at: 0, error: HandlerError::panicked(p) }));
        let Err(BatchError { failed_at, error }) = outcome else {
            break;
        };
        let index = start + failed_at.min(rest.len().saturating_sub(1));
        let Some(event) = events.get(index) else { break };
        retry_or_park(config, projection, event, error, stats).await?;
        start = index + 1;
    }
    metrics::counter!("annals_projection_events_total", "projection" => config.name.clone())
        .increment(events.len() as u64);
    stats.send_modify(|s| s.processed += events.len() as u64);
    Ok(())
}

/// The (transient) error that sends a runner whose batch transaction was
/// lost back to its checkpoint (see [`ProjectionCheckpoint::intact`]).
fn batch_lost(event: &RecordedEvent, error: &HandlerError) -> ConsumerError {
    ConsumerError::Store(annals_core::Error::Backend {
        message: format!(
            "the projection's transaction was lost in the batch holding position {} ({error}); the batch is \
             replayed from the checkpoint",
            event.position
        ),
        source: None,
    })
}

async fn retry_or_park(
    config: &Config,
    projection: &mut dyn Projection,
    event: &RecordedEvent,
    mut error: HandlerError,
    stats: &watch::Sender<ProjectionStats>,
) -> ConsumerResult<()> {
    let mut failures = 1;
    loop {
        if !config.checkpoint.intact().await {
            return Err(batch_lost(event, &error));
        }
        tracing::warn!(projection = %config.name, position = event.position, attempt = failures, reason = %error, "projection handler failed");
        stats.send_modify(|s| s.retrying = Some((event.position, failures, error.reason.clone())));
        if error.permanent || !config.retry.should_retry(failures) {
            break;
        }
        tokio::time::sleep(config.retry.delay(failures, event.position)).await;
        let outcome = AssertUnwindSafe(projection.handle(event))
            .catch_unwind()
            .await
            .unwrap_or_else(|p| Err(HandlerError::panicked(p)));
        match outcome {
            Ok(()) => {
                stats.send_modify(|s| s.retrying = None);
                return Ok(());
            }
            Err(e) => {
                error = e;
                failures += 1;
            }
        }
    }
    // Parking must be durable before the checkpoint passes the event; keep
    // trying (visibly) while the store refuses.
    let message = ParkedMessage::of(event, error.reason.clone(), failures);
    while let Err(e) = config.dlq.park(&message).await {
        tracing::error!(projection = %config.name, error = %e, "could not park a failing event; retrying");
        tokio::time::sleep(config.retry.max_backoff).await;
    }
    metrics::counter!("annals_projection_parked_total", "projection" => config.name.clone()).increment(1);
    stats.send_modify(|s| {
        s.parked += 1;
        s.retrying = None;
    });
    Ok(())
}
