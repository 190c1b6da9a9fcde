//! Projection runner: catch-up then live, crash and resume without loss,
//! retry → park without stalling, rebuild, blue/green switch.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use annals::consumers::{
    HandlerError, Projection, ProjectionRunner, RetryPolicy, RunningProjection, active_version,
    blue_green_switch,
};
use annals_core::{EventData, ExpectedVersion, MemoryStore, RecordedEvent, Store, StreamName, async_trait};

/// Counts how often each position was handled; can hang at a position to
/// simulate a crash mid-batch, and fails on `Poison` events.
struct Counting {
    name: &'static str,
    version: u32,
    seen: Arc<Mutex<BTreeMap<u64, u32>>>,
    hang_at: Option<u64>,
}

#[async_trait]
impl Projection for Counting {
    fn name(&self) -> &str {
        self.name
    }
    fn version(&self) -> u32 {
        self.version
    }
    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), HandlerError> {
        if self.hang_at == Some(event.position) {
            // The process "dies" here: never returns.
            std::future::pending::<()>().await;
        }
        if event.event_type == "Poison" {
            return Err(HandlerError::new(format!("cannot digest {}", event.position)));
        }
        assert!(event.event_type != "Panic", "a bug at {}", event.position);
        *self.seen.lock().unwrap().entry(event.position).or_default() += self.version;
        Ok(())
    }
    async fn reset(&mut self) -> Result<(), HandlerError> {
        self.seen.lock().unwrap().clear();
        Ok(())
    }
}

fn counting(name: &'static str, version: u32) -> (Counting, Arc<Mutex<BTreeMap<u64, u32>>>) {
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    (Counting { name, version, seen: seen.clone(), hang_at: None }, seen)
}

async fn append_n(store: &dyn Store, n: usize, event_type: &str) {
    for i in 0..n {
        let stream = StreamName::new(format!("account-{}", i % 7)).unwrap();
        let event = EventData::json(event_type, &serde_json::json!({ "i": i })).unwrap();
        store.append(&stream, ExpectedVersion::Any, vec![event]).await.unwrap();
    }
}

async fn caught_up(running: &RunningProjection, store: &dyn Store) {
    running.wait_until_caught_up(store).await.unwrap();
}

#[tokio::test]
async fn catches_up_then_follows_live() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append_n(&*store, 1_200, "Deposited").await;
    let (projection, seen) = counting("balances", 1);
    let running = ProjectionRunner::new(store.clone(), projection).batch_size(100).start().unwrap();
    caught_up(&running, &*store).await;
    assert_eq!(seen.lock().unwrap().len(), 1_200);
    append_n(&*store, 30, "Deposited").await;
    let stats = running.wait_for_position(1_229).await.unwrap();
    assert!(stats.live);
    assert_eq!(stats.checkpoint, Some(1_230));
    assert_eq!(stats.lag, 0);
    assert_eq!(stats.parked, 0);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1_230);
    assert!(seen.values().all(|&n| n == 1), "each event handled once in one uninterrupted run");
    assert_eq!(store.load_checkpoint("$projection-balances-v1").await.unwrap(), Some(1_230));
}

#[tokio::test]
async fn crash_mid_batch_and_resume_loses_nothing() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append_n(&*store, 1_000, "Deposited").await;
    let (mut projection, seen) = counting("crashy", 1);
    projection.hang_at = Some(437);
    let running = ProjectionRunner::new(store.clone(), projection).batch_size(100).start().unwrap();
    // Wait for the checkpoint of the last full batch before the hang.
    running.wait_for(|s| s.checkpoint == Some(400)).await.unwrap();
    while !seen.lock().unwrap().contains_key(&436) {
        tokio::task::yield_now().await;
    }
    drop(running); // the crash: the task is cancelled mid-batch
    assert_eq!(store.load_checkpoint("$projection-crashy-v1").await.unwrap(), Some(400));
    assert!(!seen.lock().unwrap().contains_key(&437));

    // A new process: same store, same read model.
    let resumed = Counting { name: "crashy", version: 1, seen: seen.clone(), hang_at: None };
    let running = ProjectionRunner::new(store.clone(), resumed).batch_size(100).start().unwrap();
    caught_up(&running, &*store).await;
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1_000, "every event reached the read model");
    let twice: Vec<u64> = seen.iter().filter(|(_, n)| **n > 1).map(|(p, _)| *p).collect();
    assert_eq!(twice, (400..437).collect::<Vec<_>>(), "only the unfinished batch ran twice (at least once)");
}

#[tokio::test(start_paused = true)]
async fn failing_event_is_retried_then_parked_and_the_projection_moves_on() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append_n(&*store, 10, "Deposited").await;
    append_n(&*store, 1, "Poison").await;
    append_n(&*store, 10, "Deposited").await;
    let (projection, seen) = counting("picky", 1);
    let running =
        ProjectionRunner::new(store.clone(), projection).retry(RetryPolicy::attempts(3)).start().unwrap();
    let stats = running.wait_for(|s| s.parked == 1 && s.live).await.unwrap();
    assert_eq!(stats.processed, 21);
    // 22: the dead letter itself was appended at position 21 (a system
    // event the filter skips, which the checkpoint moves over).
    assert_eq!(stats.checkpoint, Some(22));
    assert!(stats.retrying.is_none());
    assert_eq!(seen.lock().unwrap().len(), 20);
    let dlq = annals::consumers::DeadLetterQueue::new(store.clone(), "projection-picky").unwrap();
    let parked = dlq.list().await.unwrap();
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].position, 10);
    assert_eq!(parked[0].attempts, 3);
    assert_eq!(parked[0].reason, "cannot digest 10");
}

#[tokio::test(start_paused = true)]
async fn a_stuck_event_is_visible_while_it_is_retried() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append_n(&*store, 1, "Poison").await;
    let (projection, _seen) = counting("stuck", 1);
    let retry = RetryPolicy::attempts(100)
        .backoff(std::time::Duration::from_secs(60), std::time::Duration::from_secs(60));
    let running = ProjectionRunner::new(store.clone(), projection).retry(retry).start().unwrap();
    let stats = running.wait_for(|s| s.retrying.as_ref().is_some_and(|r| r.1 >= 2)).await.unwrap();
    let (position, _, reason) = stats.retrying.unwrap();
    assert_eq!(position, 0);
    assert_eq!(reason, "cannot digest 0");
    assert_eq!(stats.checkpoint, Some(0));
}

#[tokio::test]
async fn rebuild_resets_and_replays() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append_n(&*store, 50, "Deposited").await;
    let (projection, seen) = counting("rebuilt", 1);
    let running = ProjectionRunner::new(store.clone(), projection).start().unwrap();
    caught_up(&running, &*store).await;
    seen.lock().unwrap().insert(9_999, 1); // garbage the rebuild must clear
    let running = running.rebuild().await.unwrap();
    caught_up(&running, &*store).await;
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 50);
    assert!(seen.values().all(|&n| n == 1));
}

#[tokio::test]
async fn blue_green_builds_the_new_version_beside_the_old_and_switches() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append_n(&*store, 300, "Deposited").await;
    let (v1, seen_v1) = counting("balances", 1);
    let blue = ProjectionRunner::new(store.clone(), v1).start().unwrap();
    caught_up(&blue, &*store).await;
    assert_eq!(active_version(&*store, "balances").await.unwrap(), None);

    let (v2, seen_v2) = counting("balances", 2);
    let mut green = blue;
    blue_green_switch(store.clone(), &mut green, ProjectionRunner::new(store.clone(), v2)).await.unwrap();
    assert_eq!(active_version(&*store, "balances").await.unwrap(), Some(2));
    assert_eq!(green.stats().version, 2);
    // The new version built its own model under its own checkpoint.
    assert_eq!(seen_v2.lock().unwrap().len(), 300);
    assert!(seen_v2.lock().unwrap().values().all(|&n| n == 2));
    assert_eq!(store.load_checkpoint("$projection-balances-v2").await.unwrap(), Some(300));
    assert_eq!(store.load_checkpoint("$projection-balances-v1").await.unwrap(), Some(300));

    // The old runner stopped: new events reach only the new version.
    append_n(&*store, 5, "Deposited").await;
    green.wait_for_position(304).await.unwrap();
    assert_eq!(seen_v2.lock().unwrap().len(), 305);
    assert_eq!(seen_v1.lock().unwrap().len(), 300);

    // Same version twice is refused.
    let (again, _) = counting("balances", 2);
    let err = blue_green_switch(store.clone(), &mut green, ProjectionRunner::new(store.clone(), again)).await;
    assert!(matches!(err, Err(annals::consumers::ConsumerError::InvalidName { .. })));
}

/// A projection that only wants one category.
struct OnlyAccounts(Arc<Mutex<BTreeMap<u64, u32>>>);

#[async_trait]
impl Projection for OnlyAccounts {
    fn name(&self) -> &str {
        "accounts-only"
    }
    fn filter(&self) -> annals_core::Filter {
        annals_core::Filter::category("account")
    }
    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), HandlerError> {
        *self.0.lock().unwrap().entry(event.position).or_default() += 1;
        Ok(())
    }
}

#[tokio::test]
async fn a_filtered_projection_scans_past_events_it_skips_and_reports_no_lag() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append_n(&*store, 10, "Deposited").await;
    let seen = Arc::new(Mutex::new(BTreeMap::new()));
    let running = ProjectionRunner::new(store.clone(), OnlyAccounts(seen.clone())).start().unwrap();
    caught_up(&running, &*store).await;
    // Live: a tail of events the filter skips still moves the checkpoint.
    let other = StreamName::new("audit-1").unwrap();
    for _ in 0..5 {
        let event = EventData::json("Logged", &serde_json::json!({})).unwrap();
        store.append(&other, ExpectedVersion::Any, vec![event]).await.unwrap();
    }
    let stats = running.wait_for(|s| s.checkpoint == Some(15)).await.unwrap();
    assert_eq!(stats.lag, 0);
    assert_eq!(seen.lock().unwrap().len(), 10);
}

/// A checkpoint hook like a transactional backend's: records each commit
/// (where PostgreSQL would commit the projection's writes with it) and can
/// fail.
#[derive(Default)]
struct RecordingCheckpoint {
    commits: Mutex<Vec<u64>>,
    fail: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl annals::consumers::ProjectionCheckpoint for RecordingCheckpoint {
    async fn load(&self, _name: &str) -> annals_core::Result<Option<u64>> {
        Ok(self.commits.lock().unwrap().last().copied())
    }
    async fn commit(&self, name: &str, next_position: u64) -> annals_core::Result<()> {
        assert_eq!(name, "$projection-hooked-v1");
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(annals_core::Error::Backend { message: "commit failed".into(), source: None });
        }
        self.commits.lock().unwrap().push(next_position);
        Ok(())
    }
}

#[tokio::test]
async fn the_checkpoint_hook_commits_after_every_batch_and_a_failed_commit_is_visible() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append_n(&*store, 250, "Deposited").await;
    let hook = Arc::new(RecordingCheckpoint::default());
    let (projection, _seen) = counting("hooked", 1);
    let running = ProjectionRunner::new(store.clone(), projection)
        .batch_size(100)
        .checkpoint(hook.clone())
        .start()
        .unwrap();
    caught_up(&running, &*store).await;
    let commits = hook.commits.lock().unwrap().clone();
    assert_eq!(&commits[..3], [100, 200, 250], "one commit per batch, after it");
    assert!(commits.iter().all(|&c| c <= 250));

    // A failing commit (a transient store error) sends the runner back to
    // its checkpoint, with backoff, until the store recovers.
    hook.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    append_n(&*store, 1, "Deposited").await;
    let failing = running
        .wait_for(|s| {
            s.restarts >= 2 && s.store_error.as_deref().is_some_and(|e| e.contains("commit failed"))
        })
        .await
        .unwrap();
    assert!(failing.stopped.is_none());
    hook.fail.store(false, std::sync::atomic::Ordering::SeqCst);
    let recovered = running.wait_until_caught_up(&*store).await.unwrap();
    assert_eq!(recovered.store_error, None);
    assert_eq!(hook.commits.lock().unwrap().last(), Some(&251));
}

#[tokio::test]
async fn a_runner_told_not_to_restart_stops_on_a_failed_commit() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append_n(&*store, 10, "Deposited").await;
    let hook = Arc::new(RecordingCheckpoint::default());
    hook.fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let (projection, _seen) = counting("hooked", 1);
    let running = ProjectionRunner::new(store.clone(), projection)
        .checkpoint(hook.clone())
        .restart_on_store_errors(false)
        .start()
        .unwrap();
    let err = running.wait_for(|_| false).await;
    assert!(matches!(err, Err(annals::consumers::ConsumerError::Stopped)));
    let stats = running.stats();
    assert!(stats.stopped.unwrap().contains("commit failed"));
    assert_eq!(stats.restarts, 0);
}

/// A switch that fails leaves the old version running: it keeps serving
/// (the switch took the old runner and dropped it, which stopped it).
#[tokio::test]
async fn a_failed_switch_leaves_the_old_version_serving() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append_n(&*store, 10, "Deposited").await;
    let (v1, seen_v1) = counting("ledger", 1);
    let mut running = ProjectionRunner::new(store.clone(), v1).start().unwrap();
    caught_up(&running, &*store).await;

    // Refused at once: the same version again.
    let (same, _) = counting("ledger", 1);
    let err =
        blue_green_switch(store.clone(), &mut running, ProjectionRunner::new(store.clone(), same)).await;
    assert!(matches!(err, Err(annals::consumers::ConsumerError::InvalidName { .. })));
    // Failed while building: the new version stops on a failing checkpoint.
    let (v2, _) = counting("ledger", 2);
    let failing = ProjectionRunner::new(store.clone(), v2)
        .checkpoint(Arc::new(FailingCheckpoint))
        .restart_on_store_errors(false);
    let err = blue_green_switch(store.clone(), &mut running, failing).await;
    assert!(matches!(err, Err(annals::consumers::ConsumerError::Stopped)), "{err:?}");
    assert_eq!(active_version(&*store, "ledger").await.unwrap(), None);

    append_n(&*store, 5, "Deposited").await;
    let stats = running.wait_for_position(14).await.expect("the old version stopped serving");
    assert_eq!((stats.version, seen_v1.lock().unwrap().len()), (1, 15));
}

/// Every commit fails.
struct FailingCheckpoint;

#[async_trait]
impl annals::consumers::ProjectionCheckpoint for FailingCheckpoint {
    async fn load(&self, _name: &str) -> annals_core::Result<Option<u64>> {
        Ok(None)
    }
    async fn commit(&self, _name: &str, _next_position: u64) -> annals_core::Result<()> {
        Err(annals_core::Error::Backend { message: "commit failed".into(), source: None })
    }
}

/// A handler that panics fails its event like an error: retried, parked,
/// and the projection moves on. (The panic ended the runner's task: the
/// projection stalled, its stats said nothing about it, and `stop` could
/// not give the runner back.)
#[tokio::test(start_paused = true)]
async fn a_panicking_handler_fails_its_event_and_the_projection_moves_on() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append_n(&*store, 10, "Deposited").await;
    append_n(&*store, 1, "Panic").await;
    append_n(&*store, 10, "Deposited").await;
    let (projection, seen) = counting("buggy", 1);
    let running =
        ProjectionRunner::new(store.clone(), projection).retry(RetryPolicy::attempts(3)).start().unwrap();
    let stats = running.wait_for(|s| s.parked == 1 && s.live).await.unwrap();
    assert_eq!((stats.processed, stats.stopped), (21, None));
    assert_eq!(seen.lock().unwrap().len(), 20);
    let dlq = annals::consumers::DeadLetterQueue::new(store.clone(), "projection-buggy").unwrap();
    let parked = dlq.list().await.unwrap();
    assert_eq!((parked.len(), parked[0].position, parked[0].attempts), (1, 10, 3));
    assert!(parked[0].reason.contains("a bug at 10"), "{}", parked[0].reason);
    running.stop().await.unwrap();
}
