//! The transfer saga of the bank example: happy path, compensation, a crash
//! between a command and its journal entry, and deadlines across a restart
//! (paused time).

mod support;

#[path = "../examples/bank/domain.rs"]
#[allow(dead_code)]
mod domain;
#[path = "../examples/bank/transfer.rs"]
#[allow(dead_code)]
mod transfer;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use annals::{
    CommandMetadata, Repository,
    consumers::{Clock, Saga, SagaPlan, SagaRunner, SagaStatus, StepError, TokioClock, saga_status},
};
use annals_core::{Filter, MemoryStore, RecordedEvent, Store, Timestamp, async_trait};
use domain::{Account, AccountCommand as C, AccountEvent};
use transfer::{TransferRequested, TransferSaga, TransferStep, approve_transfer, request_transfer};

const HOUR: Duration = Duration::from_secs(3_600);

async fn bank() -> (Arc<dyn Store>, Repository<Account>) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let repo = Repository::<Account>::new(store.clone());
    for (id, owner) in [("alice", "Alice"), ("bob", "Bob")] {
        repo.execute(id, &C::Open { owner: owner.into() }, &CommandMetadata::new(format!("open-{id}")))
            .await
            .unwrap();
    }
    repo.execute("alice", &C::Deposit { amount: 100 }, &CommandMetadata::new("dep")).await.unwrap();
    (store, repo)
}

fn saga(repo: &Repository<Account>) -> TransferSaga {
    TransferSaga { repo: repo.clone(), approval_timeout: HOUR }
}

fn request(id: &str, amount: u64, needs_approval: bool) -> TransferRequested {
    TransferRequested {
        transfer_id: id.into(),
        from: "alice".into(),
        to: "bob".into(),
        amount,
        needs_approval,
    }
}

/// Polls the journal without advancing (paused) time.
async fn wait_status(
    store: &dyn Store,
    saga: &impl Saga,
    id: &str,
    done: impl Fn(&SagaStatus) -> bool,
) -> SagaStatus {
    loop {
        if let Some(status) = saga_status(store, saga, id).await.unwrap()
            && done(&status)
        {
            return status;
        }
        tokio::task::yield_now().await;
    }
}

async fn balance(repo: &Repository<Account>, id: &str) -> u64 {
    repo.load(id).await.unwrap().state.balance
}

#[tokio::test]
async fn happy_path_debits_then_credits() {
    let (store, repo) = bank().await;
    let runner = SagaRunner::new(store.clone(), saga(&repo)).start().unwrap();
    request_transfer(&*store, &request("t1", 60, false)).await.unwrap();
    let status = wait_status(&*store, &saga(&repo), "t1", SagaStatus::is_final).await;
    assert_eq!(status, SagaStatus::Completed);
    assert_eq!((balance(&repo, "alice").await, balance(&repo, "bob").await), (40, 60));
    // The commands carry the saga's deterministic ids and correlation.
    let (record, _) = repo.events("bob").await.unwrap().pop().unwrap();
    let command_id = record.metadata.get_str("command_id").unwrap();
    assert!(command_id.starts_with("saga:transfer:") && command_id.ends_with(":1:do"), "{command_id}");
    runner.stop().await;
}

#[tokio::test]
async fn a_closed_destination_refunds_the_source() {
    let (store, repo) = bank().await;
    repo.execute("bob", &C::Close, &CommandMetadata::new("close-bob")).await.unwrap();
    let runner = SagaRunner::new(store.clone(), saga(&repo)).start().unwrap();
    request_transfer(&*store, &request("t2", 60, false)).await.unwrap();
    let status = wait_status(&*store, &saga(&repo), "t2", SagaStatus::is_final).await;
    let SagaStatus::Compensated { failed_step, reason } = status else { panic!("{status:?}") };
    assert_eq!(failed_step, 1);
    assert!(reason.contains("closed"), "{reason}");
    assert_eq!(balance(&repo, "alice").await, 100);
    let alice: Vec<AccountEvent> = repo.events("alice").await.unwrap().into_iter().map(|(_, e)| e).collect();
    assert!(matches!(alice[alice.len() - 2], AccountEvent::TransferredOut { amount: 60, .. }));
    assert!(
        matches!(&alice[alice.len() - 1], AccountEvent::TransferredIn { amount: 60, transfer_id, .. } if transfer_id == "t2-refund")
    );
    runner.stop().await;
}

/// The transfer saga, but the "process" dies right after the debit command
/// committed and before the saga could record it.
struct DiesAfterDebit {
    inner: TransferSaga,
    armed: Arc<AtomicBool>,
    died: Arc<tokio::sync::Notify>,
}

#[async_trait]
impl Saga for DiesAfterDebit {
    type Step = TransferStep;
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn filter(&self) -> Filter {
        self.inner.filter()
    }
    fn start(&self, event: &RecordedEvent) -> Option<SagaPlan<TransferStep>> {
        self.inner.start(event)
    }
    async fn execute(&self, step: &TransferStep, command: &CommandMetadata) -> Result<(), StepError> {
        self.inner.execute(step, command).await?;
        if matches!(step, TransferStep::Debit { .. }) && self.armed.swap(false, Ordering::SeqCst) {
            self.died.notify_one();
            std::future::pending::<()>().await;
        }
        Ok(())
    }
    async fn compensate(&self, step: &TransferStep, command: &CommandMetadata) -> Result<(), StepError> {
        self.inner.compensate(step, command).await
    }
}

#[tokio::test]
async fn a_crash_between_command_and_journal_resumes_exactly_once() {
    let (store, repo) = bank().await;
    let died = Arc::new(tokio::sync::Notify::new());
    let crashy =
        DiesAfterDebit { inner: saga(&repo), armed: Arc::new(AtomicBool::new(true)), died: died.clone() };
    let runner = SagaRunner::new(store.clone(), crashy).start().unwrap();
    request_transfer(&*store, &request("t3", 30, false)).await.unwrap();
    died.notified().await;
    drop(runner); // crash: debit committed, journal says only "started"
    assert_eq!(balance(&repo, "alice").await, 70);
    assert_eq!(
        saga_status(&*store, &saga(&repo), "t3").await.unwrap(),
        Some(SagaStatus::Running { next_step: 0 })
    );

    let runner = SagaRunner::new(store.clone(), saga(&repo)).start().unwrap();
    let status = wait_status(&*store, &saga(&repo), "t3", SagaStatus::is_final).await;
    assert_eq!(status, SagaStatus::Completed);
    // The debit was redone with the same command id: written once.
    assert_eq!((balance(&repo, "alice").await, balance(&repo, "bob").await), (70, 30));
    let debits = repo
        .events("alice")
        .await
        .unwrap()
        .into_iter()
        .filter(|(_, e)| matches!(e, AccountEvent::TransferredOut { .. }))
        .count();
    assert_eq!(debits, 1);
    runner.stop().await;
}

#[tokio::test(start_paused = true)]
async fn deadlines_survive_a_restart() {
    let (store, repo) = bank().await;
    let clock: Arc<dyn Clock> =
        Arc::new(TokioClock::starting_at(Timestamp::from_micros(1_700_000_000_000_000)));
    let start =
        |store: Arc<dyn Store>| SagaRunner::new(store, saga(&repo)).clock(clock.clone()).start().unwrap();

    let runner = start(store.clone());
    request_transfer(&*store, &request("big", 80, true)).await.unwrap();
    request_transfer(&*store, &request("ok", 10, true)).await.unwrap();
    let status =
        wait_status(&*store, &saga(&repo), "big", |s| matches!(s, SagaStatus::Awaiting { .. })).await;
    let SagaStatus::Awaiting { step: 1, deadline } = status else { panic!("{status:?}") };
    assert_eq!(deadline.as_micros() - clock.now().as_micros(), 3_600_000_000);
    wait_status(&*store, &saga(&repo), "ok", |s| matches!(s, SagaStatus::Awaiting { .. })).await;
    assert_eq!(balance(&repo, "alice").await, 10);

    // The host goes down for half an hour.
    drop(runner);
    tokio::time::advance(HOUR / 2).await;
    let runner = start(store.clone());
    approve_transfer(&*store, "ok").await.unwrap();
    assert_eq!(wait_status(&*store, &saga(&repo), "ok", SagaStatus::is_final).await, SagaStatus::Completed);
    tokio::task::yield_now().await;
    assert!(matches!(
        saga_status(&*store, &saga(&repo), "big").await.unwrap(),
        Some(SagaStatus::Awaiting { .. })
    ));

    // The deadline (scheduled by the new runner from the journal) passes.
    tokio::time::advance(HOUR / 2 + Duration::from_secs(1)).await;
    let status = wait_status(&*store, &saga(&repo), "big", SagaStatus::is_final).await;
    assert_eq!(status, SagaStatus::Compensated { failed_step: 1, reason: "deadline passed".into() });
    assert_eq!((balance(&repo, "alice").await, balance(&repo, "bob").await), (90, 10));
    runner.stop().await;
}

#[tokio::test]
async fn a_lost_journal_ack_restarts_the_runner_which_then_completes_the_saga() {
    let faulty = support::FaultyStore::default();
    let store: Arc<dyn Store> = Arc::new(faulty.clone());
    let repo = Repository::<Account>::new(store.clone());
    for (id, owner) in [("alice", "Alice"), ("bob", "Bob")] {
        let open = C::Open { owner: owner.into() };
        repo.execute(id, &open, &CommandMetadata::new(format!("open-{id}"))).await.unwrap();
    }
    repo.execute("alice", &C::Deposit { amount: 100 }, &CommandMetadata::new("dep")).await.unwrap();
    let runner = SagaRunner::new(store.clone(), saga(&repo)).start().unwrap();

    // The saga's first append (its journal's SagaStarted) commits, but the
    // runner is told it failed: a transient store error mid-saga.
    faulty.lose_next_ack.store(true, Ordering::SeqCst);
    request_transfer(&faulty.inner, &request("t5", 40, false)).await.unwrap();

    let status = tokio::time::timeout(
        Duration::from_secs(20),
        wait_status(&*store, &saga(&repo), "t5", SagaStatus::is_final),
    )
    .await
    .expect("the runner restarted and finished the saga");
    assert_eq!(status, SagaStatus::Completed);
    assert!(!faulty.lose_next_ack.load(Ordering::SeqCst), "the fault was hit");
    assert_eq!(runner.stopped(), None);
    assert_eq!((balance(&repo, "alice").await, balance(&repo, "bob").await), (60, 40));
    runner.stop().await;
}

#[tokio::test]
async fn a_restart_resumes_from_the_oldest_open_journal_not_from_the_start_of_all() {
    let (store, repo) = bank().await;
    let runner = SagaRunner::new(store.clone(), saga(&repo)).start().unwrap();
    // A finished saga, then a long history, then one left waiting.
    request_transfer(&*store, &request("early", 5, false)).await.unwrap();
    wait_status(&*store, &saga(&repo), "early", SagaStatus::is_final).await;
    let noise = annals_core::StreamName::new("noise-1").unwrap();
    for chunk in 0..30 {
        let events = (0..100)
            .map(|i| {
                annals_core::EventData::json("Noise", &serde_json::json!({ "n": chunk * 100 + i })).unwrap()
            })
            .collect();
        store.append(&noise, annals_core::ExpectedVersion::Any, events).await.unwrap();
    }
    request_transfer(&*store, &request("late", 20, true)).await.unwrap();
    wait_status(&*store, &saga(&repo), "late", |s| matches!(s, SagaStatus::Awaiting { .. })).await;
    // The runner saves the scan start once it has handled the request.
    let open_from = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some(at) = store.load_checkpoint("$saga-transfer-open-from").await.unwrap() {
                return at;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("scan start saved");
    runner.stop().await;

    // It moved past the noise but not past the open journal.
    let late_journal = store
        .read_stream(
            &annals_core::StreamName::new("saga-transfer-late").unwrap(),
            annals_core::ReadStream::forward(),
        )
        .await
        .unwrap();
    assert!(open_from >= 2_048, "{open_from}");
    assert!(open_from <= late_journal[0].position, "{open_from} vs {}", late_journal[0].position);

    let runner = SagaRunner::new(store.clone(), saga(&repo)).start().unwrap();
    approve_transfer(&*store, "late").await.unwrap();
    assert_eq!(wait_status(&*store, &saga(&repo), "late", SagaStatus::is_final).await, SagaStatus::Completed);
    assert_eq!((balance(&repo, "alice").await, balance(&repo, "bob").await), (75, 25));
    runner.stop().await;
}

/// The approval comes in while the host is down, well before the deadline;
/// the host comes back after the deadline. The approval counts: the
/// transfer completes. (The restarted runner fired the passed deadline
/// before it read the approval waiting for it, and refunded an approved
/// transfer.)
#[tokio::test(start_paused = true)]
async fn an_approval_recorded_before_the_deadline_counts_after_a_restart_past_it() {
    let (store, repo) = bank().await;
    // On the store's time line: the approval's `recorded_at` is the store's
    // wall clock, which paused tokio time does not move.
    let clock: Arc<dyn Clock> = Arc::new(TokioClock::starting_at(Timestamp::now()));
    let start =
        |store: Arc<dyn Store>| SagaRunner::new(store, saga(&repo)).clock(clock.clone()).start().unwrap();

    let runner = start(store.clone());
    request_transfer(&*store, &request("late-host", 80, true)).await.unwrap();
    wait_status(&*store, &saga(&repo), "late-host", |s| matches!(s, SagaStatus::Awaiting { .. })).await;
    drop(runner);

    tokio::time::advance(HOUR / 2).await;
    approve_transfer(&*store, "late-host").await.unwrap();
    tokio::time::advance(HOUR).await;

    let runner = start(store.clone());
    let status = wait_status(&*store, &saga(&repo), "late-host", SagaStatus::is_final).await;
    assert_eq!(status, SagaStatus::Completed);
    assert_eq!((balance(&repo, "alice").await, balance(&repo, "bob").await), (20, 80));
    runner.stop().await;
}

/// The counterpart: an approval recorded after the deadline, while the host
/// was down, does not save the transfer.
#[tokio::test(start_paused = true)]
async fn an_approval_recorded_after_the_deadline_does_not_count_after_a_restart() {
    let (store, repo) = bank().await;
    // The saga's time line runs two hours behind the store's, so the
    // deadline (one hour on) has passed on the store's clock already.
    let two_hours = i64::try_from((2 * HOUR).as_micros()).unwrap();
    let clock: Arc<dyn Clock> =
        Arc::new(TokioClock::starting_at(Timestamp::from_micros(Timestamp::now().as_micros() - two_hours)));
    let start =
        |store: Arc<dyn Store>| SagaRunner::new(store, saga(&repo)).clock(clock.clone()).start().unwrap();

    let runner = start(store.clone());
    request_transfer(&*store, &request("too-late", 80, true)).await.unwrap();
    wait_status(&*store, &saga(&repo), "too-late", |s| matches!(s, SagaStatus::Awaiting { .. })).await;
    drop(runner);

    approve_transfer(&*store, "too-late").await.unwrap();
    tokio::time::advance(HOUR + Duration::from_secs(1)).await;

    let runner = start(store.clone());
    let status = wait_status(&*store, &saga(&repo), "too-late", SagaStatus::is_final).await;
    assert_eq!(status, SagaStatus::Compensated { failed_step: 1, reason: "deadline passed".into() });
    assert_eq!((balance(&repo, "alice").await, balance(&repo, "bob").await), (100, 0));
    runner.stop().await;
}

/// The transfer saga, but its debit's acknowledgement is lost (the command
/// committed, the step saw an error) and the store then stays unreachable
/// for longer than the step's retries.
struct OutageAfterDebit {
    inner: TransferSaga,
    /// Debit calls so far.
    calls: Arc<std::sync::atomic::AtomicU32>,
    /// Calls after the first that find the store unreachable.
    outage: u32,
}

#[async_trait]
impl Saga for OutageAfterDebit {
    type Step = TransferStep;
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn filter(&self) -> Filter {
        self.inner.filter()
    }
    fn start(&self, event: &RecordedEvent) -> Option<SagaPlan<TransferStep>> {
        self.inner.start(event)
    }
    async fn execute(&self, step: &TransferStep, command: &CommandMetadata) -> Result<(), StepError> {
        if matches!(step, TransferStep::Debit { .. }) {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            if call == 0 {
                self.inner.execute(step, command).await?;
                return Err(StepError::Transient("connection reset after commit".into()));
            }
            if call <= self.outage {
                return Err(StepError::Transient("store unreachable".into()));
            }
        }
        self.inner.execute(step, command).await
    }
    async fn compensate(&self, step: &TransferStep, command: &CommandMetadata) -> Result<(), StepError> {
        self.inner.compensate(step, command).await
    }
}

/// A step whose retries all end in transient errors has not failed: its
/// command may have taken effect (here it did). The saga retries it later
/// with the same command id and completes. (It recorded the step as failed
/// and compensated the steps before it, none, so the debit was never
/// refunded: the money was gone.)
#[tokio::test]
async fn a_step_whose_retries_end_in_transient_errors_is_retried_later_not_failed() {
    let (store, repo) = bank().await;
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let saga = OutageAfterDebit { inner: saga(&repo), calls: calls.clone(), outage: 6 };
    let retry = annals::consumers::RetryPolicy::attempts(3)
        .backoff(Duration::from_millis(1), Duration::from_millis(5));
    let runner = SagaRunner::new(store.clone(), saga).retry(retry).start().unwrap();
    request_transfer(&*store, &request("t6", 60, false)).await.unwrap();
    let status = tokio::time::timeout(
        Duration::from_secs(60),
        wait_status(
            &*store,
            &TransferSaga { repo: repo.clone(), approval_timeout: HOUR },
            "t6",
            SagaStatus::is_final,
        ),
    )
    .await
    .expect("the saga never finished");
    assert_eq!(status, SagaStatus::Completed);
    assert!(calls.load(Ordering::SeqCst) > 7, "the outage outlasted the retries");
    assert_eq!((balance(&repo, "alice").await, balance(&repo, "bob").await), (40, 60));
    assert_eq!(runner.stopped(), None);
    runner.stop().await;
}

/// The transfer saga, but its credit step panics the first `panics` times.
struct PanicsOnCredit {
    inner: TransferSaga,
    panics: Arc<std::sync::atomic::AtomicU32>,
}

#[async_trait]
impl Saga for PanicsOnCredit {
    type Step = TransferStep;
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn filter(&self) -> Filter {
        self.inner.filter()
    }
    fn start(&self, event: &RecordedEvent) -> Option<SagaPlan<TransferStep>> {
        self.inner.start(event)
    }
    async fn execute(&self, step: &TransferStep, command: &CommandMetadata) -> Result<(), StepError> {
        if matches!(step, TransferStep::Credit { .. })
            && self.panics.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
        {
            panic!("a bug in the credit step");
        }
        self.inner.execute(step, command).await
    }
    async fn compensate(&self, step: &TransferStep, command: &CommandMetadata) -> Result<(), StepError> {
        self.inner.compensate(step, command).await
    }
}

/// A step that panics is a step whose outcome is unknown, like one that
/// kept failing transiently: it is tried again, and the runner goes on.
/// (The panic ended the runner's task: the saga stalled half done, and
/// `stopped()` said nothing.)
#[tokio::test]
async fn a_panicking_step_is_tried_again_and_the_runner_goes_on() {
    let (store, repo) = bank().await;
    let panics = Arc::new(std::sync::atomic::AtomicU32::new(4));
    let saga = PanicsOnCredit { inner: saga(&repo), panics: panics.clone() };
    let retry = annals::consumers::RetryPolicy::attempts(3)
        .backoff(Duration::from_millis(1), Duration::from_millis(5));
    let runner = SagaRunner::new(store.clone(), saga).retry(retry).start().unwrap();
    request_transfer(&*store, &request("t7", 30, false)).await.unwrap();
    let status = tokio::time::timeout(
        Duration::from_secs(60),
        wait_status(
            &*store,
            &TransferSaga { repo: repo.clone(), approval_timeout: HOUR },
            "t7",
            SagaStatus::is_final,
        ),
    )
    .await
    .expect("the saga never finished");
    assert_eq!(status, SagaStatus::Completed);
    assert_eq!(panics.load(Ordering::SeqCst), 0, "every panic happened");
    assert_eq!((balance(&repo, "alice").await, balance(&repo, "bob").await), (70, 30));
    assert_eq!(runner.stopped(), None);
    runner.stop().await;
}

/// A saga whose `start` panics on its trigger.
struct PanicsOnStart;

#[async_trait]
impl Saga for PanicsOnStart {
    type Step = TransferStep;
    fn name(&self) -> &str {
        "fragile"
    }
    fn filter(&self) -> Filter {
        Filter::category("transfer")
    }
    fn start(&self, _event: &RecordedEvent) -> Option<SagaPlan<TransferStep>> {
        panic!("a bug in start");
    }
    async fn execute(&self, _step: &TransferStep, _command: &CommandMetadata) -> Result<(), StepError> {
        Ok(())
    }
}

/// A runner that ends on a panic in the saga's own code says so in
/// `stopped()` (it said nothing: the runner looked alive).
#[tokio::test]
async fn a_runner_ended_by_a_panic_says_so() {
    let (store, _repo) = bank().await;
    let runner = SagaRunner::new(store.clone(), PanicsOnStart).start().unwrap();
    request_transfer(&*store, &request("t8", 1, false)).await.unwrap();
    let stopped = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            if let Some(reason) = runner.stopped() {
                return reason;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("stopped() never said why");
    assert!(stopped.contains("a bug in start"), "{stopped}");
}
