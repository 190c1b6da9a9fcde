//! Repository behaviour on the memory store: optimistic concurrency,
//! command idempotency, metadata propagation, state at a version or time.

mod support;

use std::sync::{Arc, atomic::Ordering};

use annals::doc::{Counter, CounterCommand, CounterError, CounterEvent};
use annals::{CommandMetadata, Error, Repository, SnapshotPolicy};
use annals_core::{
    Appender, DeleteMode, EventData, ExpectedVersion, MemoryStore, ReadStream, Store, StreamDeleter,
    Timestamp, metadata::keys,
};
use support::FaultyStore;

fn repo(store: Arc<dyn Store>) -> Repository<Counter> {
    Repository::<Counter>::builder(store).max_retries(500).build()
}

fn inc(by: u64) -> CounterCommand {
    CounterCommand::Increment { by }
}

async fn stored(store: &dyn Store, id: &str) -> Vec<annals_core::RecordedEvent> {
    let stream = annals::stream_name::<Counter>(id).unwrap();
    match store.read_stream(&stream, ReadStream::forward()).await {
        Ok(events) => events,
        Err(annals_core::Error::StreamNotFound { .. }) => Vec::new(),
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn execute_appends_and_reports_the_new_version() {
    let store = Arc::new(MemoryStore::new());
    let repo = repo(store.clone());
    let first = repo.execute("1", &inc(2), &CommandMetadata::new("a")).await.unwrap();
    assert_eq!(first.events, vec![CounterEvent::Incremented { by: 2 }]);
    assert_eq!((first.version, first.duplicate), (Some(0), false));
    let second = repo.execute("1", &inc(3), &CommandMetadata::new("b")).await.unwrap();
    assert_eq!(second.version, Some(1));
    let loaded = repo.load("1").await.unwrap();
    assert_eq!((loaded.state.value, loaded.version), (5, Some(1)));
    assert_eq!(stored(&*store, "1").await[0].stream.as_str(), "counter-1");
    // A new aggregate loads as the default state.
    let fresh = repo.load("nobody").await.unwrap();
    assert_eq!((fresh.state, fresh.version), (Counter::default(), None));
}

#[tokio::test]
async fn rejected_commands_write_nothing() {
    let store = Arc::new(MemoryStore::new());
    let repo = repo(store.clone());
    let err = repo
        .execute("1", &CounterCommand::Decrement { by: 1 }, &CommandMetadata::new("a"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Rejected(CounterError::WouldGoNegative)));
    assert!(stored(&*store, "1").await.is_empty());
}

#[tokio::test]
async fn metadata_propagates_to_every_event() {
    let store = Arc::new(MemoryStore::new());
    let repo = repo(store.clone());
    let meta = CommandMetadata::new("cmd-7")
        .correlation_id("req-1")
        .causation_id("evt-3")
        .actor("ada")
        .tenant("t1")
        .with("ip", "10.0.0.1");
    repo.execute("1", &inc(1), &meta).await.unwrap();
    let m = &stored(&*store, "1").await[0].metadata;
    assert_eq!(m.correlation_id().as_deref(), Some("req-1"));
    assert_eq!(m.causation_id().as_deref(), Some("cmd-7"));
    assert_eq!(m.get_str(keys::COMMAND_ID).as_deref(), Some("cmd-7"));
    assert_eq!(m.get_str(annals::COMMAND_CAUSATION_ID).as_deref(), Some("evt-3"));
    assert_eq!(m.get_str(keys::ACTOR).as_deref(), Some("ada"));
    assert_eq!(m.get_str(keys::TENANT).as_deref(), Some("t1"));
    assert_eq!(m.get_str("ip").as_deref(), Some("10.0.0.1"));
    assert_eq!(m.schema_version(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_concurrent_writers_lose_no_update() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let repo = repo(store.clone());
    repo.execute("hot", &inc(1), &CommandMetadata::new("seed")).await.unwrap();
    let mut tasks = Vec::new();
    for task in 0..16u64 {
        let repo = repo.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10u64 {
                let by = task * 100 + i;
                repo.execute("hot", &inc(by), &CommandMetadata::new(format!("t{task}-{i}"))).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // A serial execution of the same commands.
    let serial = Repository::<Counter>::new(Arc::new(MemoryStore::new()));
    serial.execute("hot", &inc(1), &CommandMetadata::new("seed")).await.unwrap();
    for task in 0..16u64 {
        for i in 0..10u64 {
            serial
                .execute("hot", &inc(task * 100 + i), &CommandMetadata::new(format!("t{task}-{i}")))
                .await
                .unwrap();
        }
    }
    let concurrent = repo.load("hot").await.unwrap();
    let expected = serial.load("hot").await.unwrap();
    assert_eq!(concurrent.state, expected.state);
    assert_eq!(concurrent.version, Some(160));
    // Every command wrote exactly one event.
    let mut ids: Vec<String> =
        stored(&*store, "hot").await.iter().filter_map(|e| e.metadata.get_str(keys::COMMAND_ID)).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 161);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_respect_invariants() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let repo = repo(store);
    repo.execute("c", &inc(100), &CommandMetadata::new("seed")).await.unwrap();
    let mut tasks = Vec::new();
    for task in 0..16 {
        let repo = repo.clone();
        tasks.push(tokio::spawn(async move {
            repo.execute(
                "c",
                &CounterCommand::Decrement { by: 10 },
                &CommandMetadata::new(format!("d{task}")),
            )
            .await
        }));
    }
    let mut ok = 0;
    let mut rejected = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(Error::Rejected(CounterError::WouldGoNegative)) => rejected += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!((ok, rejected), (10, 6));
    assert_eq!(repo.load("c").await.unwrap().state.value, 0);
}

#[tokio::test]
async fn exhausted_retries_are_a_conflict_error() {
    let faulty = FaultyStore::default();
    let repo = Repository::<Counter>::builder(Arc::new(faulty.clone())).max_retries(3).build();
    faulty.always_conflict.store(true, Ordering::SeqCst);
    let err = repo.execute("1", &inc(1), &CommandMetadata::new("a")).await.unwrap_err();
    assert!(
        matches!(err, Error::Conflict { attempts: 4, ref stream } if stream.as_str() == "counter-1"),
        "{err}"
    );
    assert!(stored(&faulty, "1").await.is_empty());
}

#[tokio::test]
async fn the_same_command_id_twice_writes_once() {
    let store = Arc::new(MemoryStore::new());
    let repo = repo(store.clone());
    let meta = CommandMetadata::new("once");
    let first = repo.execute("1", &inc(5), &meta).await.unwrap();
    let second = repo.execute("1", &inc(5), &meta).await.unwrap();
    assert!(!first.duplicate && second.duplicate);
    assert_eq!(second.events, first.events);
    assert_eq!((second.version, second.position), (first.version, first.position));
    assert_eq!(stored(&*store, "1").await.len(), 1);
    assert_eq!(repo.load("1").await.unwrap().state.value, 5);
}

#[tokio::test]
async fn a_repeated_older_command_returns_its_original_outcome() {
    let store = Arc::new(MemoryStore::new());
    let repo = repo(store.clone());
    let a = repo.execute("1", &inc(1), &CommandMetadata::new("a")).await.unwrap();
    repo.execute("1", &inc(2), &CommandMetadata::new("b")).await.unwrap();
    repo.execute("1", &inc(3), &CommandMetadata::new("c")).await.unwrap();
    // Even with a different payload, the command id decides.
    let again = repo.execute("1", &inc(100), &CommandMetadata::new("a")).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.events, vec![CounterEvent::Incremented { by: 1 }]);
    assert_eq!((again.version, again.position), (a.version, a.position));
    assert_eq!(stored(&*store, "1").await.len(), 3);
}

#[tokio::test]
async fn duplicates_are_found_across_snapshots() {
    let store = Arc::new(MemoryStore::new());
    let repo =
        Repository::<Counter>::builder(store.clone()).snapshots(SnapshotPolicy::every(2).inline()).build();
    repo.execute("1", &inc(1), &CommandMetadata::new("first")).await.unwrap();
    for i in 0..6 {
        repo.execute("1", &inc(1), &CommandMetadata::new(format!("n{i}"))).await.unwrap();
    }
    assert_eq!(repo.load("1").await.unwrap().snapshot_version, Some(5));
    let again = repo.execute("1", &inc(1), &CommandMetadata::new("first")).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.version, Some(0));
    assert_eq!(stored(&*store, "1").await.len(), 7);
}

#[tokio::test]
async fn commands_older_than_the_window_are_decided_again() {
    // The documented limit of the guarantee.
    let store = Arc::new(MemoryStore::new());
    let repo = Repository::<Counter>::builder(store.clone()).idempotency_window(2).build();
    for id in ["a", "b", "c"] {
        repo.execute("1", &inc(1), &CommandMetadata::new(id)).await.unwrap();
    }
    assert!(repo.execute("1", &inc(1), &CommandMetadata::new("b")).await.unwrap().duplicate);
    assert!(!repo.execute("1", &inc(1), &CommandMetadata::new("a")).await.unwrap().duplicate);
}

#[tokio::test]
async fn a_lost_ack_retried_by_the_caller_writes_once() {
    let faulty = FaultyStore::default();
    let repo = repo(Arc::new(faulty.clone()));
    repo.execute("1", &inc(1), &CommandMetadata::new("before")).await.unwrap();
    faulty.lose_next_ack.store(true, Ordering::SeqCst);
    let meta = CommandMetadata::new("lost");
    let err = repo.execute("1", &inc(7), &meta).await.unwrap_err();
    assert!(matches!(err, Error::Store(annals_core::Error::Backend { .. })));
    // The append did commit; the caller cannot know and retries.
    let retried = repo.execute("1", &inc(7), &meta).await.unwrap();
    assert!(retried.duplicate);
    assert_eq!(retried.version, Some(1));
    assert_eq!(stored(&faulty, "1").await.len(), 2);
    assert_eq!(repo.load("1").await.unwrap().state.value, 8);
}

#[tokio::test]
async fn a_stale_decision_the_store_takes_for_a_resend_is_a_duplicate() {
    // The loser loads version 0; before its append lands, another writer
    // appends "d" and then executes the loser's own command "e" on the newer
    // state. The loser's append carries the same event ids, so the store
    // answers it as a re-send of the winner's append although the loser
    // decided on older state: its state must not be snapshotted as the
    // stream's, and it did not write anything.
    let faulty = FaultyStore::default();
    let repo = Repository::<Counter>::builder(Arc::new(faulty.clone()))
        .snapshots(SnapshotPolicy::every(3).inline())
        .build();
    repo.execute("1", &inc(1), &CommandMetadata::new("a")).await.unwrap();
    let other = Repository::<Counter>::new(Arc::new(faulty.inner.clone()));
    faulty.before_next_append(async move {
        other.execute("1", &inc(100), &CommandMetadata::new("d")).await.unwrap();
        other.execute("1", &inc(5), &CommandMetadata::new("e")).await.unwrap();
    });
    let done = repo.execute("1", &inc(5), &CommandMetadata::new("e")).await.unwrap();
    assert!(done.duplicate, "the winner wrote the events; this execution wrote nothing");
    assert_eq!((done.events, done.version), (vec![CounterEvent::Incremented { by: 5 }], Some(2)));
    assert_eq!(stored(&faulty, "1").await.len(), 3);
    // 1 + 100 + 5, whether from a snapshot or from the events.
    let loaded = repo.load("1").await.unwrap();
    assert_eq!((loaded.version, loaded.state.value), (Some(2), 106));
    let replayed = Repository::<Counter>::new(Arc::new(faulty.inner.clone())).load("1").await.unwrap();
    assert_eq!(replayed.state.value, 106);
}

#[tokio::test]
async fn a_command_id_reused_after_a_soft_delete_is_an_error_not_a_silent_no_op() {
    // The deleted events keep their ids, so the store answers the new
    // append as a re-send and writes nothing; reporting success would lose it.
    let store = Arc::new(MemoryStore::new());
    let repo = repo(store.clone());
    repo.execute("1", &inc(3), &CommandMetadata::new("open")).await.unwrap();
    let stream = repo.stream("1").unwrap();
    store.delete_stream(&stream, ExpectedVersion::Any, DeleteMode::Soft).await.unwrap();
    let err = repo.execute("1", &inc(3), &CommandMetadata::new("open")).await.unwrap_err();
    assert!(matches!(err, Error::InvalidMetadata { ref reason } if reason.contains("open")), "{err}");
    // A fresh command id recreates the stream.
    let done = repo.execute("1", &inc(3), &CommandMetadata::new("reopen")).await.unwrap();
    assert_eq!(done.version, Some(1));
    assert_eq!(repo.load("1").await.unwrap().state.value, 3);
}

#[tokio::test]
async fn a_resent_decision_is_recognised_by_the_store() {
    // Deterministic event ids make a blind re-send of the same append an
    // idempotent no-op at the store level too.
    let store = Arc::new(MemoryStore::new());
    let repo = repo(store.clone());
    let decision = repo.decide("1", &inc(4), &CommandMetadata::new("x")).await.unwrap();
    let part = decision.append().unwrap();
    let first = store.append(&part.stream, part.expected, part.events.clone()).await.unwrap();
    let again = store.append(&part.stream, part.expected, part.events).await.unwrap();
    assert_eq!(first, again);
    // Re-deciding the same command yields the same ids.
    let redecided = repo.decide("1", &inc(4), &CommandMetadata::new("x")).await.unwrap();
    assert!(redecided.duplicate && redecided.append().is_none());
    assert_eq!(stored(&*store, "1").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_executions_of_one_command_write_once() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let repo = repo(store.clone());
    repo.execute("1", &inc(1), &CommandMetadata::new("seed")).await.unwrap();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let repo = repo.clone();
        tasks.push(tokio::spawn(
            async move { repo.execute("1", &inc(5), &CommandMetadata::new("same")).await },
        ));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap().version, Some(1));
    }
    assert_eq!(stored(&*store, "1").await.len(), 2);
}

#[tokio::test]
async fn state_at_a_version_and_at_a_time() {
    let store = Arc::new(MemoryStore::new());
    let repo =
        Repository::<Counter>::builder(store.clone()).snapshots(SnapshotPolicy::every(2).inline()).build();
    for (i, by) in [1u64, 10, 100, 1000].into_iter().enumerate() {
        repo.execute("1", &inc(by), &CommandMetadata::new(format!("c{i}"))).await.unwrap();
        // Distinct commit times make the time queries meaningful; the
        // expectations below are derived from the recorded times, so the
        // test holds whatever the clock does.
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let values = [1u64, 11, 111, 1111];
    for (v, value) in values.iter().enumerate() {
        let at = repo.load_at_version("1", v as u64).await.unwrap();
        assert_eq!((at.state.value, at.version), (*value, Some(v as u64)));
    }
    // The snapshot at version 1 serves version 2, never a later one.
    assert_eq!(repo.load_at_version("1", 2).await.unwrap().snapshot_version, Some(1));
    assert_eq!(repo.load_at_version("1", 0).await.unwrap().snapshot_version, None);
    assert!(matches!(
        repo.load_at_version("1", 4).await,
        Err(Error::VersionNotFound { requested: 4, last: Some(3), .. })
    ));

    let recorded = stored(&*store, "1").await;
    for event in &recorded {
        let last = recorded.iter().filter(|e| e.recorded_at <= event.recorded_at).map(|e| e.version).max();
        let at = repo.load_at_time("1", event.recorded_at).await.unwrap();
        assert_eq!(at.version, last);
        assert_eq!(at.state.value, values[last.unwrap() as usize]);
    }
    let before = Timestamp::from_micros(recorded[0].recorded_at.as_micros() - 1);
    let empty = repo.load_at_time("1", before).await.unwrap();
    assert_eq!((empty.state.value, empty.version), (0, None));
}

#[tokio::test]
async fn invalid_ids_and_foreign_events_are_typed_errors() {
    let store = Arc::new(MemoryStore::new());
    let repo = repo(store.clone());
    assert!(matches!(repo.load("bad\nid").await, Err(Error::InvalidId { .. })));
    let err = repo.execute("1", &inc(1), &CommandMetadata::new(" ")).await.unwrap_err();
    assert!(matches!(err, Error::InvalidMetadata { .. }));
    // An event the aggregate does not know cannot be silently skipped.
    let stream = repo.stream("1").unwrap();
    store
        .append(
            &stream,
            ExpectedVersion::NoStream,
            vec![EventData::json("Exploded", &serde_json::json!({})).unwrap()],
        )
        .await
        .unwrap();
    let err = repo.load("1").await.unwrap_err();
    assert!(
        matches!(err, Error::Decode { ref event_type, version: 0, .. } if event_type == "Exploded"),
        "{err}"
    );
}

#[tokio::test]
async fn a_type_name_with_a_dash_is_refused() {
    #[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
    struct Dashed;
    impl annals::Aggregate for Dashed {
        const TYPE: &'static str = "bank-account";
        type Command = ();
        type Event = CounterEvent;
        type Error = CounterError;
        fn handle(&self, _: &()) -> Result<Vec<CounterEvent>, CounterError> {
            Ok(Vec::new())
        }
        fn apply(&mut self, _: &CounterEvent) {}
    }
    let repo = Repository::<Dashed>::new(Arc::new(MemoryStore::new()));
    assert!(matches!(repo.load("1").await, Err(Error::InvalidId { .. })));
}

/// The largest version there is, asked of a stream that never gets there,
/// is "not found" (the page size computed from it overflowed: a panic in
/// debug builds, a zero-sized page read forever in release builds).
#[tokio::test]
async fn the_state_at_version_u64_max_is_not_found() {
    let store = Arc::new(MemoryStore::new());
    let repo = repo(store.clone());
    repo.execute("1", &inc(1), &CommandMetadata::new("c")).await.unwrap();
    for id in ["1", "never-written"] {
        let result =
            tokio::time::timeout(std::time::Duration::from_secs(20), repo.load_at_version(id, u64::MAX))
                .await
                .expect("loading hung");
        assert!(
            matches!(result, Err(Error::VersionNotFound { requested: u64::MAX, .. })),
            "{:?}",
            result.map(|l| l.version)
        );
    }
}
