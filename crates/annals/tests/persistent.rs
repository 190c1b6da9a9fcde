//! Persistent subscriptions: competing consumers, retry → backoff → park →
//! replay, ack timeouts, and a restart of the consumer host with messages
//! in flight.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use annals::consumers::{
    ConsumerError, GroupSettings, GroupStats, NackAction, PersistentSubscription, RetryPolicy, StartFrom,
};
use annals_core::{
    EventData, ExpectedVersion, Filter, MemoryStore, ReadStream, Store, StreamName, SubscriptionTarget,
};
use tokio::time::Instant;

async fn append(store: &dyn Store, stream: &str, event_type: &str, n: usize) {
    let stream = StreamName::new(stream).unwrap();
    for i in 0..n {
        let event = EventData::json(event_type, &serde_json::json!({ "i": i })).unwrap();
        store.append(&stream, ExpectedVersion::Any, vec![event]).await.unwrap();
    }
}

fn settings(group: &str, filter: Filter) -> GroupSettings {
    GroupSettings::new(group, SubscriptionTarget::All(filter))
}

async fn wait_stats(group: &PersistentSubscription, condition: impl Fn(&GroupStats) -> bool) -> GroupStats {
    loop {
        let stats = group.stats().await.unwrap();
        if condition(&stats) {
            return stats;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn competing_consumers_share_the_load_and_each_message_is_handled_once() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    for i in 0..8 {
        append(&*store, &format!("account-{i}"), "Deposited", 50).await;
    }
    append(&*store, "audit-1", "Noise", 30).await; // filtered out
    let group =
        PersistentSubscription::start(store.clone(), settings("workers", Filter::category("account")))
            .await
            .unwrap();
    let handled: Arc<Mutex<BTreeMap<u64, Vec<usize>>>> = Arc::default();
    // Each worker holds its first message until all four have one: a
    // consumer's window (8 in flight) is then full until the others get
    // work, whichever workers the two runtime threads happen to run first.
    let all_started = Arc::new(tokio::sync::Barrier::new(4));
    let mut tasks = Vec::new();
    for worker in 0..4 {
        let mut consumer = group.connect(format!("worker-{worker}"), 8);
        let (handled, all_started) = (handled.clone(), all_started.clone());
        tasks.push(tokio::spawn(async move {
            let mut first = true;
            while let Some(delivery) = consumer.next().await {
                assert_eq!(delivery.event.category(), "account");
                handled.lock().unwrap().entry(delivery.event.position).or_default().push(worker);
                if std::mem::take(&mut first) {
                    tokio::time::timeout(Duration::from_secs(30), all_started.wait())
                        .await
                        .expect("some consumer got no work while the others' windows were full");
                }
                consumer.ack(delivery.id).await.unwrap();
            }
        }));
    }
    let stats = wait_stats(&group, |s| s.acked == 400).await;
    assert_eq!(stats.in_flight, 0);
    assert_eq!(stats.retried, 0);
    assert_eq!(stats.delivered, 400, "no message was delivered twice");
    // The checkpoint passed every matching event. The filtered-out tail is
    // only passed when the next matching event arrives, so it still counts
    // as lag (lag is measured in positions).
    let stats = wait_stats(&group, |s| s.last_checkpoint == Some(400)).await;
    assert_eq!(stats.lag, 30);
    group.stop().await;
    for task in tasks {
        task.await.unwrap();
    }
    let handled = handled.lock().unwrap().clone();
    assert_eq!(handled.len(), 400);
    assert!(
        handled.values().all(|workers| workers.len() == 1),
        "each message handled by exactly one consumer"
    );
    let per_worker: BTreeSet<usize> = handled.values().flatten().copied().collect();
    assert_eq!(per_worker.len(), 4, "all four consumers got work");
    assert_eq!(store.load_checkpoint("$ps-workers").await.unwrap(), Some(400));
}

#[tokio::test(start_paused = true)]
async fn retry_backs_off_then_parks_and_replay_redelivers() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append(&*store, "order-1", "Placed", 3).await;
    append(&*store, "order-2", "Poison", 1).await; // position 3
    append(&*store, "order-3", "Placed", 3).await;
    let retry = RetryPolicy::attempts(3).backoff(Duration::from_secs(1), Duration::from_secs(60)).jitter(0.0);
    let group = PersistentSubscription::start(store.clone(), settings("orders", Filter::all()).retry(retry))
        .await
        .unwrap();
    let mut consumer = group.connect("c1", 10);
    let mut poison_deliveries = Vec::new();
    let mut acked = 0;
    while acked < 6 || poison_deliveries.len() < 3 {
        let d = consumer.next().await.unwrap();
        if d.event.event_type == "Poison" {
            poison_deliveries.push((d.attempt, Instant::now()));
            consumer
                .nack(d.id, NackAction::Retry, format!("bad order (attempt {})", d.attempt))
                .await
                .unwrap();
        } else {
            consumer.ack(d.id).await.unwrap();
            acked += 1;
        }
    }
    let attempts: Vec<u32> = poison_deliveries.iter().map(|(a, _)| *a).collect();
    assert_eq!(attempts, [1, 2, 3]);
    // Exponential backoff: 1 s, then 2 s (paused time, no jitter).
    assert_eq!(poison_deliveries[1].1 - poison_deliveries[0].1, Duration::from_secs(1));
    assert_eq!(poison_deliveries[2].1 - poison_deliveries[1].1, Duration::from_secs(2));

    let stats = wait_stats(&group, |s| s.parked == 1).await;
    assert_eq!(stats.retried, 3);
    // Parked counts as settled: the checkpoint moved past it.
    let stats = wait_stats(&group, |s| s.last_checkpoint == Some(7)).await;
    assert_eq!(stats.in_flight, 0);
    let parked = group.parked().await.unwrap();
    assert_eq!(parked.len(), 1);
    let p = &parked[0];
    assert_eq!((p.stream.as_str(), p.version, p.position), ("order-2", 0, 3));
    assert_eq!(p.attempts, 3);
    assert_eq!(p.reason, "bad order (attempt 3)");
    assert_eq!(group.inspect_parked(3).await.unwrap().as_ref(), Some(p));
    let dlq = StreamName::system("$dlq-orders").unwrap();
    let records = store.read_stream(&dlq, ReadStream::forward()).await.unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].event_type, "Parked");

    // Replay: delivered again, marked replay; acking resolves it.
    assert_eq!(group.replay_parked(None).await.unwrap(), 1);
    let d = consumer.next().await.unwrap();
    assert!(d.replay);
    assert_eq!(d.event.position, 3);
    assert_eq!(d.attempt, 1);
    consumer.ack(d.id).await.unwrap();
    assert!(group.parked().await.unwrap().is_empty());
    assert_eq!(wait_stats(&group, |s| s.parked == 0).await.parked, 0);
    let records = store.read_stream(&dlq, ReadStream::forward()).await.unwrap();
    assert_eq!(records.last().unwrap().event_type, "Resolved");
}

#[tokio::test(start_paused = true)]
async fn nack_park_and_skip_settle_at_once() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append(&*store, "job-1", "Run", 3).await;
    let group = PersistentSubscription::start(store.clone(), settings("jobs", Filter::all())).await.unwrap();
    let mut consumer = group.connect("c", 3);
    let (a, b, c) =
        (consumer.next().await.unwrap(), consumer.next().await.unwrap(), consumer.next().await.unwrap());
    consumer.nack(a.id, NackAction::Park, "operator asked").await.unwrap();
    consumer.nack(b.id, NackAction::Skip, "not for us").await.unwrap();
    consumer.ack(c.id).await.unwrap();
    // Settling twice is refused.
    assert!(matches!(consumer.ack(c.id).await, Err(ConsumerError::UnknownDelivery { .. })));
    let stats = wait_stats(&group, |s| s.last_checkpoint == Some(3)).await;
    assert_eq!(stats.parked, 1);
    assert_eq!(group.parked().await.unwrap()[0].reason, "operator asked");
}

/// A nack whose reason is longer than the store takes in one event (here
/// 2 MiB, over MemoryStore's 1 MiB) used to fail to park for good: the
/// message was redelivered after every backoff and never listed as parked.
/// The reason is now kept cut, and the message parks.
#[tokio::test(start_paused = true)]
async fn a_reason_too_long_to_store_is_cut_and_the_message_parks() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append(&*store, "job-1", "Run", 1).await;
    let group = PersistentSubscription::start(store.clone(), settings("long", Filter::all())).await.unwrap();
    let mut consumer = group.connect("c", 1);
    let a = consumer.next().await.unwrap();
    let reason = format!("é{}", "x".repeat(2 << 20));
    consumer.nack(a.id, NackAction::Park, reason.clone()).await.unwrap();
    // Bounded (in paused time): the failure this guards against is a park
    // that never happens.
    let parked = wait_stats(&group, |s| s.parked == 1);
    let stats = tokio::time::timeout(Duration::from_secs(600), parked).await.expect("the message parks");
    assert_eq!(stats.parked, 1, "{stats:?}");
    let parked = group.parked().await.unwrap();
    assert_eq!(parked.len(), 1, "listed in the dead-letter stream");
    let kept = &parked[0].reason;
    assert!(kept.len() <= annals::consumers::MAX_PARK_REASON_LEN, "{}", kept.len());
    assert!(kept.starts_with("éxxx") && kept.ends_with("(truncated)"), "{}", &kept[..40]);
    // Parked, not waiting: nothing is delivered again.
    let again = tokio::time::timeout(Duration::from_secs(120), consumer.next()).await;
    assert!(again.is_err(), "a parked message was delivered again");
}

#[tokio::test(start_paused = true)]
async fn unacked_messages_time_out_and_go_to_another_consumer() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append(&*store, "mail-1", "Send", 1).await;
    let group = PersistentSubscription::start(
        store.clone(),
        settings("mailer", Filter::all()).ack_timeout(Duration::from_secs(10)),
    )
    .await
    .unwrap();
    let mut slow = group.connect("slow", 1);
    let first = slow.next().await.unwrap();
    let mut fast = group.connect("fast", 1);
    // While `slow` holds it, nobody else gets it.
    assert!(tokio::time::timeout(Duration::from_secs(9), fast.next()).await.is_err());
    let again = tokio::time::timeout(Duration::from_secs(5), fast.next()).await.unwrap().unwrap();
    assert_eq!(again.event.id, first.event.id);
    assert_eq!(again.attempt, 2);
    // The late ack of the first delivery is refused; the new one counts.
    assert!(matches!(slow.ack(first.id).await, Err(ConsumerError::UnknownDelivery { .. })));
    fast.ack(again.id).await.unwrap();
    let stats = wait_stats(&group, |s| s.last_checkpoint == Some(1)).await;
    assert_eq!(stats.timed_out, 1);
    assert_eq!(stats.acked, 1);
}

#[tokio::test(start_paused = true)]
async fn a_disconnected_consumers_messages_are_redelivered_at_once() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append(&*store, "mail-1", "Send", 2).await;
    let group =
        PersistentSubscription::start(store.clone(), settings("mailer", Filter::all())).await.unwrap();
    let mut gone = group.connect("gone", 2);
    let d = gone.next().await.unwrap();
    drop(gone);
    let mut other = group.connect("other", 2);
    let again = other.next().await.unwrap();
    assert_eq!(again.event.id, d.event.id);
    assert_eq!(again.attempt, 1, "a disconnect is not a failure");
}

#[tokio::test(start_paused = true)]
async fn restart_with_messages_in_flight_loses_nothing_and_redelivers_only_past_the_checkpoint() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append(&*store, "task-1", "Do", 20).await;
    let group = PersistentSubscription::start(store.clone(), settings("tasks", Filter::all())).await.unwrap();
    let mut consumer = group.connect("host-1", 20);
    let mut deliveries = Vec::new();
    for _ in 0..20 {
        deliveries.push(consumer.next().await.unwrap());
    }
    for d in &deliveries {
        if d.event.position < 10 || d.event.position == 15 {
            consumer.ack(d.id).await.unwrap();
        }
    }
    let stats = wait_stats(&group, |s| s.last_checkpoint == Some(10)).await;
    assert_eq!(stats.in_flight, 9);
    // The host dies with 9 messages in flight.
    drop(consumer);
    group.stop().await;

    let group = PersistentSubscription::start(store.clone(), settings("tasks", Filter::all())).await.unwrap();
    let mut consumer = group.connect("host-2", 20);
    let mut redelivered = BTreeSet::new();
    for _ in 0..10 {
        let d = consumer.next().await.unwrap();
        redelivered.insert(d.event.position);
        consumer.ack(d.id).await.unwrap();
    }
    // Everything unacked came back; of the acked ones only 15 (acked past the
    // checkpoint: the at-least-once window), none below the checkpoint.
    assert_eq!(redelivered, (10..20).collect());
    wait_stats(&group, |s| s.last_checkpoint == Some(20)).await;
    drop(consumer);
    group.stop().await;

    let group = PersistentSubscription::start(store.clone(), settings("tasks", Filter::all())).await.unwrap();
    let mut consumer = group.connect("host-3", 20);
    assert!(
        tokio::time::timeout(Duration::from_secs(60), consumer.next()).await.is_err(),
        "nothing acked is redelivered"
    );
}

#[tokio::test(start_paused = true)]
async fn a_parked_message_is_not_delivered_again_after_a_restart() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append(&*store, "task-1", "Do", 2).await;
    let group = PersistentSubscription::start(store.clone(), settings("tasks", Filter::all()).buffer_size(1))
        .await
        .unwrap();
    let mut consumer = group.connect("c", 2);
    let d = consumer.next().await.unwrap();
    assert_eq!(d.event.position, 0);
    consumer.nack(d.id, NackAction::Park, "poison").await.unwrap();
    // Simulate a crash before the checkpoint was saved by rewinding it.
    wait_stats(&group, |s| s.parked == 1).await;
    drop(consumer);
    group.stop().await;
    store.save_checkpoint("$ps-tasks", 0).await.unwrap();

    let group = PersistentSubscription::start(store.clone(), settings("tasks", Filter::all())).await.unwrap();
    let mut consumer = group.connect("c", 2);
    let d = consumer.next().await.unwrap();
    assert_eq!(d.event.position, 1, "the parked message was recognised and skipped");
    assert_eq!(group.stats().await.unwrap().parked, 1);
}

#[tokio::test(start_paused = true)]
async fn a_group_on_one_stream_starting_at_the_end() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append(&*store, "cart-1", "Added", 5).await;
    let stream = StreamName::new("cart-1").unwrap();
    let settings = GroupSettings::new("carts", SubscriptionTarget::Stream(stream)).start_from(StartFrom::End);
    let group = PersistentSubscription::start(store.clone(), settings.clone()).await.unwrap();
    assert_eq!(store.load_checkpoint("$ps-carts").await.unwrap(), Some(5));
    let mut consumer = group.connect("c", 1);
    append(&*store, "cart-1", "Added", 1).await;
    let d = consumer.next().await.unwrap();
    assert_eq!(d.event.version, 5);
    consumer.ack(d.id).await.unwrap();
    let stats = wait_stats(&group, |s| s.last_checkpoint == Some(6)).await;
    assert_eq!(stats.lag, 0);
}

#[tokio::test(start_paused = true)]
async fn checkpoints_are_saved_in_batches_after_an_interval_and_on_stop() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append(&*store, "job-1", "Do", 12).await;
    let settings = settings("batched", Filter::all()).checkpoint(5, Duration::from_secs(10));
    let group = PersistentSubscription::start(store.clone(), settings.clone()).await.unwrap();
    let mut consumer = group.connect("c", 20);
    let mut deliveries = Vec::new();
    for _ in 0..12 {
        deliveries.push(consumer.next().await.unwrap());
    }
    let saved = || async { store.load_checkpoint("$ps-batched").await.unwrap() };
    // Four settled: below the batch size and before the interval, so only in memory.
    for d in &deliveries[..4] {
        consumer.ack(d.id).await.unwrap();
    }
    let stats = group.stats().await.unwrap();
    assert_eq!(stats.last_checkpoint, None);
    assert_eq!(saved().await, None);
    // The fifth makes a batch: saved at once.
    consumer.ack(deliveries[4].id).await.unwrap();
    wait_stats(&group, |s| s.last_checkpoint == Some(5)).await;
    assert_eq!(saved().await, Some(5));
    // One more, then the interval passes: saved without a full batch.
    consumer.ack(deliveries[5].id).await.unwrap();
    let before = Instant::now();
    wait_stats(&group, |s| s.last_checkpoint == Some(6)).await;
    assert!(before.elapsed() >= Duration::from_secs(10), "saved by the interval, not at once");
    // Stopping saves whatever was settled since.
    consumer.ack(deliveries[6].id).await.unwrap();
    group.stats().await.unwrap();
    drop(consumer);
    group.stop().await;
    assert_eq!(saved().await, Some(7));
}

/// A consumer that stops polling for longer than the ack timeout: its
/// delivery times out while still waiting in its channel and is
/// redelivered. Once it polls again it first gets the stale delivery (whose
/// ack is refused) and then the redelivery. (The dispatcher found the
/// channel full of the stale delivery, counted the consumer as busy for
/// good, and never sent it anything again: the group stalled.)
#[tokio::test(start_paused = true)]
async fn a_consumer_that_stops_polling_past_the_ack_timeout_still_gets_the_redelivery() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append(&*store, "mail-1", "Send", 1).await;
    let settings = settings("mailer", Filter::all())
        .ack_timeout(Duration::from_secs(10))
        .retry(RetryPolicy::attempts(5).backoff(Duration::from_secs(1), Duration::from_secs(1)));
    let group = PersistentSubscription::start(store.clone(), settings).await.unwrap();
    let mut consumer = group.connect("paused", 1);
    wait_stats(&group, |s| s.timed_out == 1).await;
    tokio::time::sleep(Duration::from_secs(60)).await;

    let stale = consumer.next().await.unwrap();
    assert_eq!(stale.attempt, 1);
    assert!(matches!(consumer.ack(stale.id).await, Err(ConsumerError::UnknownDelivery { .. })));
    let again = tokio::time::timeout(Duration::from_secs(60), consumer.next())
        .await
        .expect("the redelivery never came")
        .unwrap();
    assert_eq!((again.event.id, again.attempt), (stale.event.id, 2));
    consumer.ack(again.id).await.unwrap();
    wait_stats(&group, |s| s.last_checkpoint == Some(1)).await;
}

/// An operator discards one of two parked messages through the group's
/// dead-letter queue, then replays "all parked": only the one still parked
/// comes back, and the group's parked count drops at once. (The group
/// replayed from what it had parked itself, so the discarded message was
/// delivered and handled again; its count stayed 2 until a replay.)
#[tokio::test(start_paused = true)]
async fn a_discarded_dead_letter_is_not_replayed() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append(&*store, "pay-1", "Pay", 2).await;
    let group =
        PersistentSubscription::start(store.clone(), settings("payments", Filter::all())).await.unwrap();
    let mut consumer = group.connect("c", 2);
    for _ in 0..2 {
        let d = consumer.next().await.unwrap();
        consumer.nack(d.id, NackAction::Park, "card declined").await.unwrap();
    }
    wait_stats(&group, |s| s.parked == 2).await;

    group.dead_letters().resolve(0, "discarded").await.unwrap();
    assert_eq!(group.parked().await.unwrap().iter().map(|p| p.position).collect::<Vec<_>>(), [1]);
    // The count follows the queue at once, before any replay re-reads it.
    assert_eq!(group.stats().await.unwrap().parked, 1, "stats still counted the discarded message");
    assert_eq!(group.replay_parked(None).await.unwrap(), 1);
    let d = consumer.next().await.unwrap();
    assert_eq!((d.event.position, d.replay), (1, true));
    consumer.ack(d.id).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_secs(60), consumer.next()).await.is_err(),
        "the discarded message came back"
    );
    assert_eq!(wait_stats(&group, |s| s.parked == 0).await.parked, 0);
}

/// "Never" spelled `Duration::MAX`: no ack timeout, no timed checkpoint
/// saves, no cap on the backoff. The group works (its dispatcher panicked
/// adding the duration to the current instant, and the consumer saw the
/// group end).
#[tokio::test(start_paused = true)]
async fn durations_of_duration_max_mean_never_and_do_not_stop_the_group() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append(&*store, "job-1", "Do", 3).await;
    let settings = settings("patient", Filter::all())
        .ack_timeout(Duration::MAX)
        .checkpoint(10, Duration::MAX)
        .retry(RetryPolicy::attempts(3).backoff(Duration::from_secs(1), Duration::MAX));
    let group = PersistentSubscription::start(store.clone(), settings).await.unwrap();
    let mut consumer = group.connect("c", 3);
    let first = consumer.next().await.expect("the group is running");
    consumer.nack(first.id, NackAction::Retry, "later").await.unwrap();
    let mut acked = 0;
    while acked < 3 {
        let d = tokio::time::timeout(Duration::from_secs(60), consumer.next()).await.unwrap().unwrap();
        consumer.ack(d.id).await.unwrap();
        acked += 1;
    }
    // Not saved by the interval, ever; stopping saves it.
    tokio::time::sleep(Duration::from_secs(3_600)).await;
    assert_eq!(group.stats().await.unwrap().last_checkpoint, None);
    drop(consumer);
    group.stop().await;
    assert_eq!(store.load_checkpoint("$ps-patient").await.unwrap(), Some(3));
}

/// "No limit" spelled `usize::MAX` is a consumer with a very large window,
/// not a panic in `connect` (the channel behind it refused that size).
#[tokio::test(start_paused = true)]
async fn a_consumer_with_no_in_flight_limit_connects() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append(&*store, "job-1", "Do", 3).await;
    let group =
        PersistentSubscription::start(store.clone(), settings("greedy", Filter::all())).await.unwrap();
    let mut consumer = group.connect("c", usize::MAX);
    for _ in 0..3 {
        let d = consumer.next().await.unwrap();
        consumer.ack(d.id).await.unwrap();
    }
    let stats = group.stats().await.unwrap();
    assert_eq!(stats.consumers[0].in_flight, 0);
}

/// A group over a stream that is then tombstoned cannot read on: its
/// stats say why (`subscription_error`), and the error stays while the
/// group retries (with a growing delay, not twice a second for good).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_over_a_tombstoned_stream_says_why_it_cannot_read() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    append(&*store, "order-1", "Placed", 2).await;
    let stream = StreamName::new("order-1").unwrap();
    let group = PersistentSubscription::start(
        store.clone(),
        GroupSettings::new("orders", SubscriptionTarget::Stream(stream.clone())),
    )
    .await
    .unwrap();
    let mut consumer = group.connect("c", 10);
    for _ in 0..2 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.unwrap().unwrap();
        consumer.ack(delivery.id).await.unwrap();
    }
    let before = group.stats().await.unwrap();
    assert_eq!(before.subscription_error, None);

    store.delete_stream(&stream, ExpectedVersion::Any, annals_core::DeleteMode::Hard).await.unwrap();
    let stats =
        tokio::time::timeout(Duration::from_secs(10), wait_stats(&group, |s| s.subscription_error.is_some()))
            .await
            .expect("the group never reported its failing subscription");
    let error = stats.subscription_error.unwrap();
    assert!(error.contains("deleted"), "{error}");
    // Still so after a few retries.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let later = group.stats().await.unwrap().subscription_error.unwrap_or_default();
    assert!(later.contains("deleted"), "{later}");
    drop(consumer);
    group.stop().await;
}
