//! The repository on the embedded log (`annals-log`), not only on the
//! memory store: execute, concurrency, idempotency, snapshots, and state
//! surviving a reopen of the data directory.

use std::sync::Arc;

use annals::{
    CommandMetadata, Repository, SnapshotPolicy,
    doc::{Counter, CounterCommand},
};
use annals_core::Store;
use annals_log::LogStore;

fn open(dir: &std::path::Path) -> (LogStore, Arc<dyn Store>) {
    let log = LogStore::open(dir).expect("open the log");
    let store: Arc<dyn Store> = Arc::new(log.clone());
    (log, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repository_on_the_log_survives_reopen_and_uses_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (log, store) = open(dir.path());
        let repo =
            Repository::<Counter>::builder(store).snapshots(SnapshotPolicy::every(10).inline()).build();
        for i in 0..25u64 {
            let out = repo
                .execute(
                    "c1",
                    &CounterCommand::Increment { by: 2 },
                    &CommandMetadata::new(format!("cmd-{i}")),
                )
                .await
                .unwrap();
            assert_eq!(out.version, Some(i));
        }
        // The same command id again writes nothing.
        let again = repo
            .execute("c1", &CounterCommand::Increment { by: 2 }, &CommandMetadata::new("cmd-24"))
            .await
            .unwrap();
        assert!(again.duplicate);
        repo.flush_snapshots().await;
        drop(repo);
        tokio::task::spawn_blocking(move || log.close().unwrap()).await.unwrap();
    }
    let (log, store) = open(dir.path());
    let repo = Repository::<Counter>::builder(store).snapshots(SnapshotPolicy::every(10).inline()).build();
    let loaded = repo.load("c1").await.unwrap();
    assert_eq!(loaded.state.value, 50);
    assert_eq!(loaded.version, Some(24));
    assert_eq!(loaded.snapshot_version, Some(19), "loads start from the newest snapshot");
    let at = repo.load_at_version("c1", 9).await.unwrap();
    assert_eq!(at.state.value, 20);
    drop(repo);
    tokio::task::spawn_blocking(move || log.close().unwrap()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_execute_on_the_log_loses_no_update() {
    let dir = tempfile::tempdir().unwrap();
    let (log, store) = open(dir.path());
    let repo = Repository::<Counter>::builder(store).max_retries(1_000).build();
    let tasks: Vec<_> = (0..16)
        .map(|t| {
            let repo = repo.clone();
            tokio::spawn(async move {
                for i in 0..10 {
                    let meta = CommandMetadata::new(format!("t{t}-{i}"));
                    repo.execute("shared", &CounterCommand::Increment { by: 1 }, &meta).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let loaded = repo.load("shared").await.unwrap();
    assert_eq!(loaded.state.value, 160);
    assert_eq!(loaded.version, Some(159));
    drop(repo);
    tokio::task::spawn_blocking(move || log.close().unwrap()).await.unwrap();
}
