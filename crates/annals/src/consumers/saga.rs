//! Sagas (process managers): react to events, run steps that issue commands,
//! keep their own state as events, wait for events with deadlines, and
//! compensate completed steps in reverse order when a step fails.
//!
//! # Journal
//! Each saga instance writes its journal to the stream `saga-{name}-{id}`:
//! `SagaStarted` (the plan and the triggering event), `StepCompleted`,
//! `AwaitStarted` (with its deadline), `StepFailed`, `StepCompensated`,
//! and one of `SagaCompleted`, `SagaCompensated` or `CompensationFailed`.
//! Every append carries the expected version it was decided on and a
//! deterministic event id, so two runners (or a runner and its own retry)
//! never record a step twice.
//!
//! # Exactly once in effect
//! The command of step `i` carries the command id
//! `saga:{name}:{trigger event id}:{i}:do` (`…:undo` for its compensation).
//! After a crash the new runner reloads every unfinished journal and redoes
//! the first unrecorded step with the same command id; the
//! [`crate::Repository`] recognises the id and writes nothing twice. So a
//! step runs at least once and takes effect exactly once, as long as the
//! step's commands go through an idempotent repository (command ids within
//! its idempotency window).
//!
//! # Deadlines
//! An [`SagaStep::Await`] step records its deadline as a wall-clock
//! [`Timestamp`] from the runner's [`Clock`]; a restarted runner schedules
//! the remaining time again, so deadlines survive restarts. A passed
//! deadline fails the step (and compensates), unless an event that
//! satisfies it, recorded at or before the deadline, is still waiting to be
//! handled (the runner was down or behind): that event completes the step.

use std::{
    collections::{BTreeSet, HashMap},
    fmt::Debug,
    panic::AssertUnwindSafe,
    sync::Arc,
    time::Duration,
};

use annals_core::{
    Direction, EventData, ExpectedVersion, Filter, ReadAll, ReadFrom, ReadStream, RecordedEvent, Store,
    StreamName, SubscribeFrom, SubscriptionRequest, Timestamp, Uuid,
};
use async_trait::async_trait;
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{Backoff, ConsumerError, ConsumerResult, RetryPolicy, validate_name};
use crate::CommandMetadata;

/// How far the resume scan's start must be able to move before it is
/// saved again (bounds the extra scan after a restart, and the writes).
const OPEN_FROM_STEP: u64 = 1_024;

/// Namespace of journal event ids.
const JOURNAL_ID_NAMESPACE: Uuid = Uuid::from_u128(0x3c2f_9a41_77d0_4e8b_a5c6_1f0e_9d8b_2a47);

/// A source of wall-clock time for deadlines.
pub trait Clock: Send + Sync + 'static {
    /// Now.
    fn now(&self) -> Timestamp;
}

/// The system clock (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A clock that moves with tokio's timer, from a fixed starting time: under
/// `tokio::time::pause()` it stands still until the test advances time, so
/// deadline tests are deterministic. Share one instance across the runners
/// of a test so that "restarts" see one continuous time line.
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    start: tokio::time::Instant,
    at: Timestamp,
}

impl TokioClock {
    /// Starts counting now, from the wall-clock time `at`.
    pub fn starting_at(at: Timestamp) -> Self {
        TokioClock { start: tokio::time::Instant::now(), at }
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        let elapsed = i64::try_from(self.start.elapsed().as_micros()).unwrap_or(i64::MAX);
        Timestamp(self.at.0.saturating_add(elapsed))
    }
}

/// One step of a saga's plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SagaStep<S> {
    /// Run [`Saga::execute`] on it (compensated by [`Saga::compensate`]).
    Run(S),
    /// Wait for an event that [`Saga::satisfies`] this step, for at most
    /// `timeout`; then the step fails. Compensated like a run step.
    Await {
        /// What is awaited.
        step: S,
        /// How long.
        timeout: Duration,
    },
}

impl<S> SagaStep<S> {
    fn inner(&self) -> &S {
        match self {
            SagaStep::Run(s) | SagaStep::Await { step: s, .. } => s,
        }
    }
}

/// What a triggering event starts: the instance id and its steps.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaPlan<S> {
    /// The instance id (its journal is `saga-{name}-{id}`); the same
    /// trigger must always give the same id.
    pub id: String,
    /// The steps, in order.
    pub steps: Vec<SagaStep<S>>,
}

/// Why a step (or a compensation) failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepError {
    /// A business refusal: retrying will not help. The step fails and the
    /// completed steps are compensated.
    Rejected(String),
    /// Infrastructure trouble (a step that panics counts as this too):
    /// retried with the runner's policy. Once the attempts are used up the
    /// step has not failed (its command may have taken effect, say when an
    /// acknowledgement was lost): the instance is driven again after the
    /// policy's `max_backoff`, with the same command id, for as long as it
    /// takes; other instances go on meanwhile.
    Transient(String),
}

impl<E: std::fmt::Display> From<crate::Error<E>> for StepError {
    fn from(error: crate::Error<E>) -> Self {
        match error {
            crate::Error::Store(e) if e.is_transient() => StepError::Transient(e.to_string()),
            crate::Error::Conflict { .. } => StepError::Transient(error.to_string()),
            other => StepError::Rejected(other.to_string()),
        }
    }
}

/// A process manager. See the module docs for the guarantees.
#[async_trait]
pub trait Saga: Send + Sync + 'static {
    /// A step's data (serialized into the journal).
    type Step: Serialize + DeserializeOwned + Clone + Debug + Send + Sync + 'static;

    /// Stable name (1–200 bytes, no `-` so journals form their own prefix).
    fn name(&self) -> &str;

    /// The events the saga reacts to (triggers and awaited events).
    fn filter(&self) -> Filter;

    /// The plan this event starts, if it is a trigger. Must be
    /// deterministic: the same event gives the same plan.
    fn start(&self, event: &RecordedEvent) -> Option<SagaPlan<Self::Step>>;

    /// The instance an event is addressed to (for await steps).
    fn correlate(&self, _event: &RecordedEvent) -> Option<String> {
        None
    }

    /// Whether `event` completes the await step `step`.
    fn satisfies(&self, _step: &Self::Step, _event: &RecordedEvent) -> bool {
        false
    }

    /// Runs a step: issue its command(s) with `command`'s id (through
    /// [`crate::Repository::execute`], which makes them idempotent).
    async fn execute(&self, step: &Self::Step, command: &CommandMetadata) -> Result<(), StepError>;

    /// Undoes a completed step (default: nothing to undo).
    async fn compensate(&self, _step: &Self::Step, _command: &CommandMetadata) -> Result<(), StepError> {
        Ok(())
    }
}

/// Where a saga instance is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SagaStatus {
    /// Running its steps; `next_step` is the first not completed.
    Running {
        /// Index of the next step.
        next_step: usize,
    },
    /// Waiting for an event until `deadline`.
    Awaiting {
        /// Index of the await step.
        step: usize,
        /// When the wait fails.
        deadline: Timestamp,
    },
    /// A step failed; completed steps are being undone.
    Compensating {
        /// The step that failed.
        failed_step: usize,
        /// Why.
        reason: String,
    },
    /// Every step completed.
    Completed,
    /// A step failed and every completed step was compensated.
    Compensated {
        /// The step that failed.
        failed_step: usize,
        /// Why.
        reason: String,
    },
    /// A compensation failed: needs an operator.
    Failed {
        /// The step whose compensation failed.
        step: usize,
        /// Why.
        reason: String,
    },
}

impl SagaStatus {
    /// Whether the instance has finished (nothing more will happen).
    pub fn is_final(&self) -> bool {
        matches!(self, SagaStatus::Completed | SagaStatus::Compensated { .. } | SagaStatus::Failed { .. })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(bound = "S: Serialize + DeserializeOwned")]
enum Journal<S> {
    SagaStarted {
        trigger: Uuid,
        trigger_position: u64,
        correlation_id: Option<String>,
        steps: Vec<SagaStep<S>>,
    },
    StepCompleted {
        index: usize,
    },
    AwaitStarted {
        index: usize,
        deadline: Timestamp,
    },
    StepFailed {
        index: usize,
        reason: String,
    },
    StepCompensated {
        index: usize,
    },
    SagaCompleted,
    SagaCompensated,
    CompensationFailed {
        index: usize,
        reason: String,
    },
}

impl<S> Journal<S> {
    fn event_type(&self) -> &'static str {
        match self {
            Journal::SagaStarted { .. } => "SagaStarted",
            Journal::StepCompleted { .. } => "StepCompleted",
            Journal::AwaitStarted { .. } => "AwaitStarted",
            Journal::StepFailed { .. } => "StepFailed",
            Journal::StepCompensated { .. } => "StepCompensated",
            Journal::SagaCompleted => "SagaCompleted",
            Journal::SagaCompensated => "SagaCompensated",
            Journal::CompensationFailed { .. } => "CompensationFailed",
        }
    }
}

/// One saga instance, folded from its journal.
struct Instance<S> {
    stream: StreamName,
    /// Position of the journal's first entry (`SagaStarted`).
    started_at: u64,
    last_version: Option<u64>,
    trigger: Uuid,
    correlation_id: Option<String>,
    steps: Vec<SagaStep<S>>,
    status: SagaStatus,
    /// While compensating: steps below this index remain to be undone.
    undo_below: usize,
}

impl<S: Clone> Instance<S> {
    fn apply(&mut self, entry: Journal<S>) {
        match entry {
            Journal::SagaStarted { trigger, correlation_id, steps, .. } => {
                self.trigger = trigger;
                self.correlation_id = correlation_id;
                self.steps = steps;
                self.status = SagaStatus::Running { next_step: 0 };
            }
            Journal::StepCompleted { index } => self.status = SagaStatus::Running { next_step: index + 1 },
            Journal::AwaitStarted { index, deadline } => {
                self.status = SagaStatus::Awaiting { step: index, deadline };
            }
            Journal::StepFailed { index, reason } => {
                self.undo_below = index;
                self.status = SagaStatus::Compensating { failed_step: index, reason };
            }
            Journal::StepCompensated { index } => self.undo_below = index,
            Journal::SagaCompleted => self.status = SagaStatus::Completed,
            Journal::SagaCompensated => {
                if let SagaStatus::Compensating { failed_step, reason } = &self.status {
                    self.status =
                        SagaStatus::Compensated { failed_step: *failed_step, reason: reason.clone() };
                }
            }
            Journal::CompensationFailed { index, reason } => {
                self.status = SagaStatus::Failed { step: index, reason }
            }
        }
    }
}

fn journal_stream(name: &str, id: &str) -> ConsumerResult<StreamName> {
    StreamName::new(format!("saga-{name}-{id}"))
        .map_err(|e| ConsumerError::InvalidName { reason: e.to_string() })
}

/// The status of one saga instance, read from its journal (`None` when it
/// was never started).
pub async fn saga_status<S: Saga>(
    store: &dyn Store,
    saga: &S,
    id: &str,
) -> ConsumerResult<Option<SagaStatus>> {
    let stream = journal_stream(saga.name(), id)?;
    Ok(load_instance::<S::Step>(store, &stream, id).await?.map(|i| i.status))
}

async fn load_instance<S: Serialize + DeserializeOwned + Clone>(
    store: &dyn Store,
    stream: &StreamName,
    id: &str,
) -> ConsumerResult<Option<Instance<S>>> {
    let records = match store.read_stream(stream, ReadStream::forward()).await {
        Ok(records) => records,
        Err(annals_core::Error::StreamNotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let _ = id;
    let mut instance = Instance {
        stream: stream.clone(),
        started_at: records.first().map_or(0, |r| r.position),
        last_version: None,
        trigger: Uuid::nil(),
        correlation_id: None,
        steps: Vec::new(),
        status: SagaStatus::Running { next_step: 0 },
        undo_below: 0,
    };
    for record in &records {
        let entry: Journal<S> =
            record.decode().map_err(|e| ConsumerError::Decode { reason: e.to_string() })?;
        instance.apply(entry);
        instance.last_version = Some(record.version);
    }
    Ok((!records.is_empty()).then_some(instance))
}

/// Configures and starts a saga runner.
pub struct SagaRunner<S: Saga> {
    store: Arc<dyn Store>,
    saga: Arc<S>,
    retry: RetryPolicy,
    clock: Arc<dyn Clock>,
}

impl<S: Saga> SagaRunner<S> {
    /// A runner with the default retry policy and the system clock.
    pub fn new(store: Arc<dyn Store>, saga: S) -> Self {
        SagaRunner {
            store,
            saga: Arc::new(saga),
            retry: RetryPolicy::default(),
            clock: Arc::new(SystemClock),
        }
    }

    /// Retries for transient step failures.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// The clock deadlines are measured with.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Starts the runner task: resumes every unfinished instance, then
    /// follows the saga's events from its checkpoint (`$saga-{name}`).
    pub fn start(self) -> ConsumerResult<RunningSaga> {
        let name = self.saga.name().to_owned();
        validate_name("saga", &name)?;
        if name.contains('-') {
            return Err(ConsumerError::InvalidName {
                reason: format!("saga name '{name}' must not contain '-'"),
            });
        }
        let cancel = CancellationToken::new();
        let mut engine = Engine {
            store: self.store,
            saga: self.saga,
            retry: self.retry,
            clock: self.clock,
            checkpoint_name: format!("$saga-{name}"),
            open_from_name: format!("$saga-{name}-open-from"),
            open_from: 0,
            name,
            active: HashMap::new(),
            deadlines: BTreeSet::new(),
            retries: BTreeSet::new(),
        };
        let token = cancel.clone();
        let saga_name = engine.name.clone();
        let (stopped_tx, stopped) = tokio::sync::watch::channel(None);
        let task = tokio::spawn(async move {
            // A panic in the saga's own code (`start`, `correlate`, ...)
            // ends the runner like a fatal error, and says so.
            let run = AssertUnwindSafe(engine.run_until_fatal()).catch_unwind();
            tokio::select! {
                biased;
                () = token.cancelled() => {}
                outcome = run => {
                    let (saga, error) = match outcome {
                        Ok((saga, error)) => (saga, error.to_string()),
                        Err(p) => {
                            metrics::counter!("annals_saga_stopped_total", "saga" => saga_name.clone())
                                .increment(1);
                            (saga_name, format!("panicked: {}", super::retry::panic_message(&*p)))
                        }
                    };
                    tracing::error!(%saga, %error, "saga runner stopped");
                    let _ = stopped_tx.send(Some(error));
                }
            }
        });
        Ok(RunningSaga { task: Some(task), stopped, _guard: cancel.clone().drop_guard(), cancel })
    }
}

/// A running saga runner. Dropping it stops the task wherever it is (a
/// "crash"); the next start resumes every unfinished instance.
pub struct RunningSaga {
    task: Option<tokio::task::JoinHandle<()>>,
    stopped: tokio::sync::watch::Receiver<Option<String>>,
    cancel: CancellationToken,
    _guard: DropGuard,
}

impl RunningSaga {
    /// Why the runner stopped on its own, if it did. Transient store
    /// errors do not stop it (it restarts from its journals after a
    /// backoff); an error that retrying cannot fix (a journal that does not
    /// decode, an invalid instance id, a panic in the saga's `start`,
    /// `correlate` or `satisfies`) does, and is reported here and in the
    /// `annals_saga_stopped_total` counter.
    pub fn stopped(&self) -> Option<String> {
        self.stopped.borrow().clone()
    }

    /// Stops the task and waits for it.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

struct Engine<S: Saga> {
    store: Arc<dyn Store>,
    saga: Arc<S>,
    retry: RetryPolicy,
    clock: Arc<dyn Clock>,
    name: String,
    checkpoint_name: String,
    /// Checkpoint holding where the resume scan starts: no unfinished
    /// journal begins before it.
    open_from_name: String,
    /// Its last saved value.
    open_from: u64,
    active: HashMap<String, Instance<S::Step>>,
    deadlines: BTreeSet<(Timestamp, String, usize)>,
    /// Instances whose step (or compensation) ran out of retries on
    /// transient errors, and when to drive them again.
    retries: BTreeSet<(Timestamp, String)>,
}

/// Whether restarting the runner can get past `error`.
fn is_transient(error: &ConsumerError) -> bool {
    matches!(error, ConsumerError::Store(e) if e.is_transient())
}

impl<S: Saga> Engine<S> {
    /// Runs, restarting from the journals after transient store errors
    /// (with the retry policy's backoff); returns the first error a restart
    /// cannot fix.
    async fn run_until_fatal(&mut self) -> (String, ConsumerError) {
        let mut failures = 0;
        loop {
            let Err(error) = self.run().await;
            if !is_transient(&error) {
                metrics::counter!("annals_saga_stopped_total", "saga" => self.name.clone()).increment(1);
                return (self.name.clone(), error);
            }
            failures += 1;
            metrics::counter!("annals_saga_restarts_total", "saga" => self.name.clone()).increment(1);
            let delay = self.retry.delay(failures.min(self.retry.max_attempts.max(1)), u64::from(failures));
            tracing::warn!(saga = %self.name, %error, attempt = failures, ?delay, "saga runner failed; restarting from the journals");
            tokio::time::sleep(delay).await;
            // Everything in memory is rebuilt from the store.
            self.active.clear();
            self.deadlines.clear();
            self.retries.clear();
        }
    }

    async fn run(&mut self) -> ConsumerResult<std::convert::Infallible> {
        self.resume_all().await?;
        let mut next = self.store.load_checkpoint(&self.checkpoint_name).await?.unwrap_or(0);
        let mut backoff = Backoff::new();
        loop {
            let from = if next == 0 { SubscribeFrom::Start } else { SubscribeFrom::After(next - 1) };
            let mut events = self.store.subscribe(SubscriptionRequest::all(self.saga.filter(), from));
            loop {
                let due = [self.deadlines.first().map(|d| d.0), self.retries.first().map(|r| r.0)];
                let wait = due.into_iter().flatten().min().map(|at| {
                    let micros = at.0.saturating_sub(self.clock.now().0).max(0);
                    Duration::from_micros(u64::try_from(micros).unwrap_or(0))
                });
                tokio::select! {
                    biased;
                    () = sleep_for(wait) => {
                        self.fire_deadlines(next).await?;
                        self.fire_retries().await?;
                    }
                    item = events.next() => match item {
                        Some(Ok(event)) => {
                            backoff.delivered();
                            let position = event.position;
                            self.on_event(event).await?;
                            next = position + 1;
                            self.store.save_checkpoint(&self.checkpoint_name, next).await?;
                            self.advance_open_from(next).await?;
                        }
                        Some(Err(error)) => {
                            let wait = backoff.failed();
                            tracing::warn!(saga = %self.name, %error, ?wait, "subscription failed; resubscribing");
                            tokio::time::sleep(wait).await;
                            break;
                        }
                        None => break,
                    },
                }
            }
        }
    }

    /// Moves the resume scan's start forward, at most every
    /// [`OPEN_FROM_STEP`] positions. Every unfinished journal begins at or
    /// after the oldest active instance's start, and a journal started
    /// later lands at or after the head, which is past `next`; a value
    /// saved late is only lower (a longer scan), never wrong.
    async fn advance_open_from(&mut self, next: u64) -> ConsumerResult<()> {
        let oldest = self.active.values().map(|i| i.started_at).min().unwrap_or(next).min(next);
        if oldest >= self.open_from.saturating_add(OPEN_FROM_STEP) {
            self.store.save_checkpoint(&self.open_from_name, oldest).await?;
            self.open_from = oldest;
        }
        Ok(())
    }

    /// Finds every journal of this saga and continues the unfinished ones.
    /// The scan starts where the last run said no unfinished journal
    /// begins earlier, so a restart reads the recent part of `$all`, not
    /// all of it.
    async fn resume_all(&mut self) -> ConsumerResult<()> {
        let prefix = format!("saga-{}-", self.name);
        let mut streams = BTreeSet::new();
        self.open_from = self.store.load_checkpoint(&self.open_from_name).await?.unwrap_or(0);
        let mut from = self.open_from;
        loop {
            let slice = self
                .store
                .read_all(ReadAll {
                    from: ReadFrom::At(from),
                    direction: Direction::Forward,
                    limit: 4_096,
                    filter: Filter::stream_prefix(prefix.clone()).with_system(),
                })
                .await?;
            for event in &slice.events {
                if event.version == 0 {
                    streams.insert(event.stream.clone());
                }
            }
            let scanned = slice.next.unwrap_or(from);
            if slice.events.is_empty() && scanned <= from {
                break;
            }
            from = scanned.max(slice.events.last().map_or(0, |e| e.position + 1));
        }
        for stream in streams {
            let Some(id) = stream.as_str().strip_prefix(&prefix) else { continue };
            let Some(instance) = load_instance::<S::Step>(&*self.store, &stream, id).await? else { continue };
            if instance.status.is_final() {
                continue;
            }
            tracing::info!(saga = %self.name, id, status = ?instance.status, "resuming saga");
            self.active.insert(id.to_owned(), instance);
            self.drive(id.to_owned()).await?;
        }
        Ok(())
    }

    async fn on_event(&mut self, event: RecordedEvent) -> ConsumerResult<()> {
        if let Some(plan) = self.saga.start(&event) {
            self.begin(plan, &event).await?;
        }
        if let Some(id) = self.saga.correlate(&event)
            && let Some(instance) = self.active.get(&id)
            && let SagaStatus::Awaiting { step, .. } = instance.status
            && instance.steps.get(step).is_some_and(|s| self.saga.satisfies(s.inner(), &event))
        {
            self.record(&id, Journal::StepCompleted { index: step }).await?;
            self.drive(id).await?;
        }
        Ok(())
    }

    async fn begin(&mut self, plan: SagaPlan<S::Step>, trigger: &RecordedEvent) -> ConsumerResult<()> {
        if self.active.contains_key(&plan.id) {
            return Ok(()); // the trigger was seen again after a restart
        }
        let stream = journal_stream(&self.name, &plan.id)?;
        if let Some(existing) = load_instance::<S::Step>(&*self.store, &stream, &plan.id).await? {
            if !existing.status.is_final() {
                self.active.insert(plan.id.clone(), existing);
                self.drive(plan.id).await?;
            }
            return Ok(());
        }
        let mut instance = Instance {
            stream,
            // Set from the append below; the head is a lower bound until then.
            started_at: self.store.next_position().await?,
            last_version: None,
            trigger: trigger.id,
            correlation_id: trigger.metadata.correlation_id(),
            steps: Vec::new(),
            status: SagaStatus::Running { next_step: 0 },
            undo_below: 0,
        };
        instance.steps = plan.steps.clone();
        self.active.insert(plan.id.clone(), instance);
        let started = Journal::SagaStarted {
            trigger: trigger.id,
            trigger_position: trigger.position,
            correlation_id: trigger.metadata.correlation_id(),
            steps: plan.steps,
        };
        self.record(&plan.id, started).await?;
        self.drive(plan.id).await
    }

    /// Appends a journal entry at the version the instance was decided on,
    /// then folds it in.
    async fn record(&mut self, id: &str, entry: Journal<S::Step>) -> ConsumerResult<()> {
        let Some(instance) = self.active.get_mut(id) else { return Ok(()) };
        let next_version = instance.last_version.map_or(0, |v| v + 1);
        let expected = instance.last_version.map_or(ExpectedVersion::NoStream, ExpectedVersion::Exact);
        let event_id =
            Uuid::new_v5(&JOURNAL_ID_NAMESPACE, format!("{}\n{next_version}", instance.stream).as_bytes());
        let mut metadata = annals_core::Metadata::new()
            .with(annals_core::metadata::keys::CAUSATION_ID, instance.trigger.to_string());
        if let Some(correlation) = &instance.correlation_id {
            metadata = metadata.with(annals_core::metadata::keys::CORRELATION_ID, correlation.clone());
        }
        let data = EventData::json(entry.event_type(), &entry)?.with_id(event_id).with_metadata(metadata);
        let result = self.store.append(&instance.stream, expected, vec![data]).await?;
        instance.last_version = Some(result.last_version());
        if matches!(entry, Journal::SagaStarted { .. }) {
            instance.started_at = result.position;
        }
        if let Journal::AwaitStarted { index, deadline } = &entry {
            self.deadlines.insert((*deadline, id.to_owned(), *index));
        }
        instance.apply(entry);
        Ok(())
    }

    fn command(&self, instance: &Instance<S::Step>, index: usize, phase: &str) -> CommandMetadata {
        let trigger = instance.trigger.to_string();
        CommandMetadata::new(format!("saga:{}:{trigger}:{index}:{phase}", self.name))
            .correlation_id(instance.correlation_id.clone().unwrap_or_else(|| trigger.clone()))
            .causation_id(trigger)
            .source(format!("saga:{}", self.name))
    }

    /// Runs the instance until it waits or finishes.
    async fn drive(&mut self, id: String) -> ConsumerResult<()> {
        loop {
            let Some(instance) = self.active.get(&id) else { return Ok(()) };
            match instance.status.clone() {
                SagaStatus::Running { next_step } => {
                    let Some(step) = instance.steps.get(next_step).cloned() else {
                        self.record(&id, Journal::SagaCompleted).await?;
                        continue;
                    };
                    match step {
                        SagaStep::Run(step) => {
                            let command = self.command(instance, next_step, "do");
                            let entry = match self.attempt(&step, &command, false).await {
                                Ok(()) => Journal::StepCompleted { index: next_step },
                                Err(Failure::Rejected(reason)) => {
                                    Journal::StepFailed { index: next_step, reason }
                                }
                                Err(Failure::Unknown(reason)) => {
                                    self.retry_later(id, &reason);
                                    return Ok(());
                                }
                            };
                            self.record(&id, entry).await?;
                        }
                        SagaStep::Await { timeout, .. } => {
                            let micros = i64::try_from(timeout.as_micros()).unwrap_or(i64::MAX);
                            let deadline = Timestamp(self.clock.now().0.saturating_add(micros));
                            self.record(&id, Journal::AwaitStarted { index: next_step, deadline }).await?;
                        }
                    }
                }
                SagaStatus::Awaiting { step, deadline } => {
                    self.deadlines.insert((deadline, id.clone(), step));
                    return Ok(());
                }
                SagaStatus::Compensating { .. } => {
                    let Some(index) = instance.undo_below.checked_sub(1) else {
                        self.record(&id, Journal::SagaCompensated).await?;
                        continue;
                    };
                    let Some(step) = instance.steps.get(index).map(|s| s.inner().clone()) else {
                        self.record(&id, Journal::SagaCompensated).await?;
                        continue;
                    };
                    let command = self.command(instance, index, "undo");
                    let entry = match self.attempt(&step, &command, true).await {
                        Ok(()) => Journal::StepCompensated { index },
                        Err(Failure::Rejected(reason)) => Journal::CompensationFailed { index, reason },
                        Err(Failure::Unknown(reason)) => {
                            self.retry_later(id, &reason);
                            return Ok(());
                        }
                    };
                    self.record(&id, entry).await?;
                }
                _ => {
                    self.active.remove(&id);
                    return Ok(());
                }
            }
        }
    }

    /// Drives instance `id` again after the retry policy's longest backoff:
    /// its step ran out of retries on transient errors, so whether its
    /// command took effect is unknown. Recording it as failed would
    /// compensate only the steps before it, never its own effect; retrying
    /// with the same command id finds out (the repository answers a command
    /// that took effect as a duplicate).
    fn retry_later(&mut self, id: String, reason: &str) {
        let micros = i64::try_from(self.retry.max_backoff.as_micros()).unwrap_or(i64::MAX);
        let at = Timestamp(self.clock.now().0.saturating_add(micros));
        tracing::warn!(saga = %self.name, id, reason, "step still failing after its retries; trying again later");
        self.retries.insert((at, id));
    }

    async fn fire_retries(&mut self) -> ConsumerResult<()> {
        let now = self.clock.now();
        while let Some((at, id)) = self.retries.first().cloned() {
            if at > now {
                break;
            }
            self.retries.pop_first();
            self.drive(id).await?;
        }
        Ok(())
    }

    /// Executes (or compensates) a step, retrying transient failures.
    async fn attempt(&self, step: &S::Step, command: &CommandMetadata, undo: bool) -> Result<(), Failure> {
        let mut failures = 0;
        loop {
            let run = async {
                if undo {
                    self.saga.compensate(step, command).await
                } else {
                    self.saga.execute(step, command).await
                }
            };
            // A step that panics may have taken effect before it did: its
            // outcome is unknown, as after a transient error.
            let result = AssertUnwindSafe(run).catch_unwind().await.unwrap_or_else(|p| {
                Err(StepError::Transient(format!("step panicked: {}", super::retry::panic_message(&*p))))
            });
            match result {
                Ok(()) => return Ok(()),
                Err(StepError::Rejected(reason)) => return Err(Failure::Rejected(reason)),
                Err(StepError::Transient(reason)) => {
                    failures += 1;
                    if !self.retry.should_retry(failures) {
                        return Err(Failure::Unknown(reason));
                    }
                    tracing::warn!(saga = %self.name, command = %command.command_id, %reason, "step failed; retrying");
                    tokio::time::sleep(self.retry.delay(failures, u64::from(failures))).await;
                }
            }
        }
    }

    /// Fails the await steps whose deadline has passed. `next` is the first
    /// position of `$all` not handled yet.
    async fn fire_deadlines(&mut self, next: u64) -> ConsumerResult<()> {
        let now = self.clock.now();
        while let Some((at, id, step)) = self.deadlines.first().cloned() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            let still_waiting = self
                .active
                .get(&id)
                .is_some_and(|i| matches!(i.status, SagaStatus::Awaiting { step: s, .. } if s == step));
            if still_waiting && self.answered_in_time(next, &id, step, at).await? {
                // Its event is on its way through the subscription (a
                // runner that was down, or busy, is behind): it completes
                // the step, as it would have on time.
                tracing::info!(saga = %self.name, id, step, "deadline passed, but the awaited event came before it");
            } else if still_waiting {
                tracing::info!(saga = %self.name, id, step, "deadline passed");
                self.record(&id, Journal::StepFailed { index: step, reason: "deadline passed".into() })
                    .await?;
                self.drive(id).await?;
            }
        }
        Ok(())
    }

    /// Whether an event not handled yet (at or after `next`), recorded at
    /// or before `deadline`, satisfies await step `step` of instance `id`.
    async fn answered_in_time(
        &self,
        next: u64,
        id: &str,
        step: usize,
        deadline: Timestamp,
    ) -> ConsumerResult<bool> {
        let Some(awaited) = self.active.get(id).and_then(|i| i.steps.get(step)) else { return Ok(false) };
        let filter = self.saga.filter();
        let mut from = next;
        loop {
            let slice = self
                .store
                .read_all(ReadAll {
                    from: ReadFrom::At(from),
                    direction: Direction::Forward,
                    limit: 512,
                    filter: filter.clone(),
                })
                .await?;
            let answered = slice.events.iter().any(|event| {
                event.recorded_at <= deadline
                    && self.saga.correlate(event).as_deref() == Some(id)
                    && self.saga.satisfies(awaited.inner(), event)
            });
            if answered {
                return Ok(true);
            }
            let scanned = slice.next.unwrap_or(from).max(slice.events.last().map_or(0, |e| e.position + 1));
            if scanned <= from {
                return Ok(false);
            }
            from = scanned;
        }
    }
}

/// Why [`Engine::attempt`] gave up.
enum Failure {
    /// The step (or compensation) refused: it did not take effect.
    Rejected(String),
    /// Transient errors to the last retry: it may have taken effect.
    Unknown(String),
}

async fn sleep_for(wait: Option<Duration>) {
    match wait {
        Some(wait) => tokio::time::sleep(wait).await,
        None => std::future::pending().await,
    }
}
