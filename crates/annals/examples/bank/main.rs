//! The bank example: accounts with invariants, a transfer committed
//! atomically across two streams, then the consumer side: a money-transfer
//! saga (debit A, credit B; when B is closed, refund A) and a balance read
//! model kept by a projection.
//!
//! Run with `cargo run -p annals --example bank`.

mod domain;
// `approve_transfer` is exercised by tests/sagas.rs, not by this walkthrough.
#[allow(dead_code)]
mod transfer;

use std::{sync::Arc, time::Duration};

use annals::{
    CommandMetadata, Error, Repository, SnapshotPolicy,
    consumers::{ProjectionRunner, SagaRunner, SagaStatus, saga_status},
};
use annals_core::{MemoryStore, Store};
use domain::{Account, AccountCommand as C, AccountError, transfer};
use transfer::{BalanceProjection, BalanceTable, TransferRequested, TransferSaga, request_transfer};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let repo = Repository::<Account>::builder(store.clone())
        .snapshots(SnapshotPolicy::every(5).keep_last(2))
        .max_retries(10)
        .build();
    let cmd = |id: &str| CommandMetadata::new(id).correlation_id("demo-session").actor("teller-1");

    println!("== Opening two accounts");
    repo.execute("alice", &C::Open { owner: "Alice".into() }, &cmd("open-alice")).await?;
    repo.execute("bob", &C::Open { owner: "Bob".into() }, &cmd("open-bob")).await?;
    let done = repo.execute("alice", &C::Deposit { amount: eur(100) }, &cmd("dep-1")).await?;
    println!("alice deposited 100.00 -> events {:?}, version {:?}", done.events, done.version);

    println!("\n== Invariants live in `handle`");
    let overdraft = repo.execute("alice", &C::Withdraw { amount: eur(500) }, &cmd("wd-big")).await;
    report("withdraw 500.00 from alice", overdraft);
    repo.execute("alice", &C::Lock { amount: eur(80) }, &cmd("lock-1")).await?;
    println!("alice locked 80.00 (e.g. a card pre-authorisation)");
    let locked = repo.execute("alice", &C::Withdraw { amount: eur(30) }, &cmd("wd-locked")).await;
    report("withdraw 30.00 with only 20.00 unlocked", locked);

    println!("\n== Idempotency: the same command id twice writes once");
    let first = repo.execute("alice", &C::Withdraw { amount: eur(5) }, &cmd("wd-5")).await?;
    let again = repo.execute("alice", &C::Withdraw { amount: eur(5) }, &cmd("wd-5")).await?;
    println!(
        "first: version {:?} duplicate={}; again: version {:?} duplicate={}",
        first.version, first.duplicate, again.version, again.duplicate
    );
    let alice = repo.load("alice").await?.state;
    println!("alice balance {} locked {} available {}", alice.balance, alice.locked, alice.available());

    println!("\n== A transfer is one atomic append over both streams");
    repo.execute("alice", &C::Unlock { amount: eur(80) }, &cmd("unlock-1")).await?;
    let t = transfer(&repo, "alice", "bob", eur(60), "tx-1", &cmd("tx-1")).await?;
    println!("transfer tx-1: {t:?}");
    let t = transfer(&repo, "alice", "bob", eur(60), "tx-1", &cmd("tx-1")).await?;
    println!("transfer tx-1 re-sent: duplicate={}", t.duplicate);
    let too_much = transfer(&repo, "alice", "bob", eur(1_000), "tx-2", &cmd("tx-2")).await;
    report("transfer 1000.00", too_much.map(|_| ()));
    for id in ["alice", "bob"] {
        let loaded = repo.load(id).await?;
        println!("{id}: balance {} at version {:?}", loaded.state.balance, loaded.version);
    }

    println!("\n== Metadata travels with the events");
    for (recorded, event) in repo.events("bob").await? {
        println!(
            "bob@{} {:<40} correlation={:?} causation={:?}",
            recorded.version,
            format!("{event:?}"),
            recorded.metadata.correlation_id(),
            recorded.metadata.causation_id()
        );
    }

    println!("\n== Closing");
    report("close bob with money in it", repo.execute("bob", &C::Close, &cmd("close-bob")).await);
    repo.execute("bob", &C::Withdraw { amount: eur(60) }, &cmd("wd-bob")).await?;
    repo.execute("bob", &C::Close, &cmd("close-bob-2")).await?;
    report("deposit into closed bob", repo.execute("bob", &C::Deposit { amount: 1 }, &cmd("dep-bob")).await);

    println!("\n== State as of a version, and snapshots");
    let early = repo.load_at_version("alice", 1).await?;
    println!("alice at version 1: balance {}", early.state.balance);
    repo.flush_snapshots().await;
    let latest = repo.load("alice").await?;
    println!(
        "alice loads from the snapshot at version {:?}, now at {:?}",
        latest.snapshot_version, latest.version
    );

    consumers(store, repo).await
}

/// The consumer side: a saga moves money between accounts through the
/// repository, and a projection keeps a balance table from the events.
async fn consumers(
    store: Arc<dyn Store>,
    repo: Repository<Account>,
) -> Result<(), Box<dyn std::error::Error>> {
    println!("\n== Consumers: a transfer saga and a balance read model");
    let table = BalanceTable::default();
    let projection =
        ProjectionRunner::new(store.clone(), BalanceProjection { table: table.clone() }).start()?;
    let saga = || TransferSaga { repo: repo.clone(), approval_timeout: Duration::from_secs(3_600) };
    let sagas = SagaRunner::new(store.clone(), saga()).start()?;
    let cmd = |id: &str| CommandMetadata::new(id).correlation_id("demo-consumers");
    repo.execute("carol", &C::Open { owner: "Carol".into() }, &cmd("open-carol")).await?;
    repo.execute("carol", &C::Deposit { amount: eur(50) }, &cmd("dep-carol")).await?;
    for (id, to) in [("tx-saga-1", "alice"), ("tx-saga-2", "bob")] {
        let request = TransferRequested {
            transfer_id: id.into(),
            from: "carol".into(),
            to: to.into(),
            amount: eur(20),
            needs_approval: false,
        };
        request_transfer(&*store, &request).await?;
        let status = loop {
            match saga_status(&*store, &saga(), id).await? {
                Some(status) if status.is_final() => break status,
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        match status {
            SagaStatus::Completed => println!("saga {id}: carol -> {to} 20.00 completed"),
            SagaStatus::Compensated { reason, .. } => {
                println!("saga {id}: carol -> {to} 20.00 compensated (carol refunded): {reason}")
            }
            other => println!("saga {id}: {other:?}"),
        }
    }
    projection.wait_until_caught_up(&*store).await?;
    let stats = projection.stats();
    println!("read model at checkpoint {:?}, lag {}, parked {}", stats.checkpoint, stats.lag, stats.parked);
    let rows = table.read().map_err(|_| "balance table lock poisoned")?.clone();
    for id in ["alice", "bob", "carol"] {
        let from_events = repo.load(id).await?.state.balance;
        let row = rows.get(id).copied().unwrap_or_default();
        println!("{id}: read model {} / aggregate {}", row.balance, from_events);
    }
    sagas.stop().await;
    projection.stop().await?;
    Ok(())
}

fn report<T: std::fmt::Debug>(what: &str, result: Result<T, Error<AccountError>>) {
    match result {
        Ok(v) => println!("{what}: ok {v:?}"),
        Err(Error::Rejected(reason)) => println!("{what}: rejected — {reason}"),
        Err(other) => println!("{what}: failed — {other}"),
    }
}

/// Whole euros in cents.
fn eur(euros: u64) -> u64 {
    euros * 100
}
