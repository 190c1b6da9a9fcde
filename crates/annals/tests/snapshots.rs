//! Snapshot policy, pruning, invalidation by schema version, and snapshot
//! failures that must not fail commands.

mod support;

use std::sync::{Arc, atomic::Ordering};

use annals::doc::{Counter, CounterCommand, CounterError, CounterEvent};
use annals::{Aggregate, CommandMetadata, Repository, SnapshotPolicy};
use annals_core::{MemoryStore, Snapshot, SnapshotStore, Store, Timestamp};
use serde::{Deserialize, Serialize};
use support::FaultyStore;

async fn run(repo: &Repository<impl Aggregate<Command = CounterCommand>>, id: &str, n: usize, tag: &str) {
    for i in 0..n {
        repo.execute(id, &CounterCommand::Increment { by: 1 }, &CommandMetadata::new(format!("{tag}{i}")))
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn every_n_events_keeping_the_last_k() {
    let store = Arc::new(MemoryStore::new());
    let repo = Repository::<Counter>::builder(store.clone())
        .snapshots(SnapshotPolicy::every(3).keep_last(2))
        .build();
    run(&repo, "1", 10, "c").await;
    repo.flush_snapshots().await;
    let stream = repo.stream("1").unwrap();
    // Counts 3, 6, 9 crossed → versions 2, 5, 8; the oldest was pruned.
    let newest = store.load_snapshot(&stream, None).await.unwrap().unwrap();
    assert_eq!((newest.version, newest.schema_version), (8, Counter::SNAPSHOT_VERSION));
    assert_eq!(store.load_snapshot(&stream, Some(7)).await.unwrap().map(|s| s.version), Some(5));
    assert_eq!(store.load_snapshot(&stream, Some(4)).await.unwrap(), None);
    let loaded = repo.load("1").await.unwrap();
    assert_eq!((loaded.snapshot_version, loaded.version, loaded.state.value), (Some(8), Some(9), 10));
}

#[tokio::test]
async fn multi_event_commands_still_snapshot_when_crossing_a_boundary() {
    // A command writing several events can jump over a multiple of N.
    let store = Arc::new(MemoryStore::new());
    let repo =
        Repository::<Batch>::builder(store.clone()).snapshots(SnapshotPolicy::every(4).inline()).build();
    repo.execute("1", &3, &CommandMetadata::new("a")).await.unwrap();
    repo.execute("1", &3, &CommandMetadata::new("b")).await.unwrap();
    let snap = store.load_snapshot(&repo.stream("1").unwrap(), None).await.unwrap().unwrap();
    assert_eq!(snap.version, 5);
    assert_eq!(repo.load("1").await.unwrap().state.0, 6);
}

#[tokio::test]
async fn a_snapshot_of_another_schema_version_is_ignored() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let v1 = Repository::<Counter>::builder(store.clone()).snapshots(SnapshotPolicy::every(2)).build();
    run(&v1, "1", 5, "a").await;
    v1.flush_snapshots().await;
    assert_eq!(v1.load("1").await.unwrap().snapshot_version, Some(3));

    // The same stream, read by code whose snapshot encoding changed.
    let v2 = Repository::<CounterV2>::builder(store.clone()).snapshots(SnapshotPolicy::every(2)).build();
    let loaded = v2.load("1").await.unwrap();
    assert_eq!((loaded.snapshot_version, loaded.version, loaded.state.0.value), (None, Some(4), 5));
    // Its next snapshot is written in the new version and used from then on.
    run(&v2, "1", 1, "b").await;
    v2.flush_snapshots().await;
    let loaded = v2.load("1").await.unwrap();
    assert_eq!((loaded.snapshot_version, loaded.state.0.value), (Some(5), 6));
    // And the old code now ignores the new-version snapshot instead of misreading it.
    let loaded = v1.load("1").await.unwrap();
    assert_eq!((loaded.snapshot_version, loaded.state.value), (None, 6));
}

#[tokio::test]
async fn an_undecodable_snapshot_is_ignored() {
    let store = Arc::new(MemoryStore::new());
    let repo = Repository::<Counter>::builder(store.clone()).snapshots(SnapshotPolicy::every(100)).build();
    run(&repo, "1", 3, "a").await;
    let stream = repo.stream("1").unwrap();
    store
        .save_snapshot(Snapshot {
            stream,
            version: 1,
            schema_version: Counter::SNAPSHOT_VERSION,
            data: "not json".into(),
            created_at: Timestamp::now(),
        })
        .await
        .unwrap();
    let loaded = repo.load("1").await.unwrap();
    assert_eq!((loaded.snapshot_version, loaded.state.value), (None, 3));
}

#[tokio::test]
async fn failing_snapshot_writes_never_fail_the_command() {
    for policy in [SnapshotPolicy::every(1), SnapshotPolicy::every(1).inline()] {
        let faulty = FaultyStore::default();
        faulty.fail_snapshots.store(true, Ordering::SeqCst);
        let repo = Repository::<Counter>::builder(Arc::new(faulty.clone())).snapshots(policy).build();
        run(&repo, "1", 3, "a").await;
        repo.flush_snapshots().await;
        let loaded = repo.load("1").await.unwrap();
        assert_eq!((loaded.snapshot_version, loaded.state.value), (None, 3));
    }
}

#[tokio::test]
async fn snapshots_are_off_by_default() {
    let store = Arc::new(MemoryStore::new());
    let repo = Repository::<Counter>::new(store.clone());
    run(&repo, "1", 50, "a").await;
    repo.flush_snapshots().await;
    assert_eq!(store.load_snapshot(&repo.stream("1").unwrap(), None).await.unwrap(), None);
}

/// The counter after a change of its snapshot encoding.
#[derive(Debug, Default, Serialize, Deserialize)]
struct CounterV2(Counter);

impl Aggregate for CounterV2 {
    const TYPE: &'static str = Counter::TYPE;
    const SNAPSHOT_VERSION: u32 = 2;
    type Command = CounterCommand;
    type Event = CounterEvent;
    type Error = CounterError;

    fn handle(&self, command: &CounterCommand) -> Result<Vec<CounterEvent>, CounterError> {
        self.0.handle(command)
    }

    fn apply(&mut self, event: &CounterEvent) {
        self.0.apply(event);
    }
}

/// Writes `n` events per command.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Batch(u64);

impl Aggregate for Batch {
    const TYPE: &'static str = "batch";
    type Command = u64;
    type Event = CounterEvent;
    type Error = CounterError;

    fn handle(&self, n: &u64) -> Result<Vec<CounterEvent>, CounterError> {
        Ok((0..*n).map(|_| CounterEvent::Incremented { by: 1 }).collect())
    }

    fn apply(&mut self, _: &CounterEvent) {
        self.0 += 1;
    }
}

#[tokio::test]
async fn a_recreated_stream_never_starts_from_the_old_incarnations_snapshot() {
    use annals_core::{DeleteMode, ExpectedVersion, StreamDeleter};
    let store = Arc::new(MemoryStore::new());
    let repo =
        Repository::<Counter>::builder(store.clone()).snapshots(SnapshotPolicy::every(2).inline()).build();
    run(&repo, "1", 4, "old").await;
    store.delete_stream(&repo.stream("1").unwrap(), ExpectedVersion::Any, DeleteMode::Soft).await.unwrap();
    let gone = repo.load("1").await.unwrap();
    assert_eq!((gone.version, gone.state.value), (None, 0));
    // Recreated: version numbering continues in the store.
    let done =
        repo.execute("1", &CounterCommand::Increment { by: 1 }, &CommandMetadata::new("new")).await.unwrap();
    assert_eq!(done.version, Some(4));
    let loaded = repo.load("1").await.unwrap();
    assert_eq!((loaded.version, loaded.state.value), (Some(4), 1));
    assert!(
        repo.execute("1", &CounterCommand::Increment { by: 1 }, &CommandMetadata::new("new"))
            .await
            .unwrap()
            .duplicate
    );
}

#[tokio::test]
async fn a_command_that_decides_nothing_writes_nothing() {
    let store = Arc::new(MemoryStore::new());
    let repo = Repository::<Batch>::new(store.clone());
    let done = repo.execute("1", &0, &CommandMetadata::new("a")).await.unwrap();
    assert!(done.events.is_empty());
    assert_eq!((done.version, done.position, done.duplicate), (None, None, false));
    assert!(
        !annals_core::StreamReader::stream_info(&*store, &repo.stream("1").unwrap()).await.unwrap().exists
    );
}

/// `keep_last` is "at least 1" however the policy was built: a policy
/// written as a struct literal with 0 keeps the newest snapshot (the prune
/// after each write deleted the snapshot just written).
#[tokio::test]
async fn a_policy_keeping_zero_snapshots_keeps_the_newest() {
    let store = Arc::new(MemoryStore::new());
    let policy = SnapshotPolicy { keep_last: 0, ..SnapshotPolicy::every(2).inline() };
    let repo = Repository::<Counter>::builder(store.clone()).snapshots(policy).build();
    run(&repo, "1", 4, "c").await;
    let newest = store.load_snapshot(&repo.stream("1").unwrap(), None).await.unwrap();
    assert_eq!(newest.map(|s| s.version), Some(3));
    assert_eq!(repo.load("1").await.unwrap().snapshot_version, Some(3));
}

/// A snapshot can outlive the events it summarises (the events restored
/// from an older backup, a snapshot table kept across a log's recovery, a
/// store whose snapshot and event writes are not one transaction). It is
/// newer than the stream: starting from it would report events that do not
/// exist and make every append expect a version the stream never reaches.
#[tokio::test]
async fn a_snapshot_newer_than_the_stream_is_ignored() {
    let ahead = Arc::new(MemoryStore::new());
    let repo =
        Repository::<Counter>::builder(ahead.clone()).snapshots(SnapshotPolicy::every(2).inline()).build();
    run(&repo, "1", 4, "c").await;
    let snapshot = ahead.load_snapshot(&repo.stream("1").unwrap(), None).await.unwrap().unwrap();
    assert_eq!(snapshot.version, 3);

    // The same history, two events shorter, next to the newer snapshot.
    let store = Arc::new(MemoryStore::new());
    let repo = Repository::<Counter>::builder(store.clone()).snapshots(SnapshotPolicy::every(100)).build();
    run(&repo, "1", 2, "c").await;
    store.save_snapshot(snapshot).await.unwrap();
    let loaded = repo.load("1").await.unwrap();
    assert_eq!((loaded.snapshot_version, loaded.version, loaded.state.value), (None, Some(1), 2));
    assert!(matches!(
        repo.load_at_version("1", 3).await,
        Err(annals::Error::VersionNotFound { requested: 3, last: Some(1), .. })
    ));
    let done =
        repo.execute("1", &CounterCommand::Increment { by: 1 }, &CommandMetadata::new("next")).await.unwrap();
    assert_eq!(done.version, Some(2));
    assert_eq!(repo.load("1").await.unwrap().state.value, 3);
}
