//! Event-sourcing benchmark, generic over the store.
//!
//! Measures
//! 1. loading an account with `--events` events (default 10,000) without a
//!    snapshot and with one (p50/p99 over `--samples` loads), and
//! 2. `execute` throughput on `--accounts` distinct accounts (default 1,000)
//!    from `--tasks` concurrent tasks (default 64), `--per-account`
//!    deposits each (default 10).
//!
//! Real figures: `cargo run --release -p annals --example es_bench`.
//! Quick check: `cargo run -p annals --example es_bench -- --events 500 --accounts 50 --samples 10`.
//! On the embedded log: add `--log DIR` (a fresh directory, removed afterwards).
//! Runs on `MemoryStore`; [`run`] takes any `Arc<dyn Store>`, so another
//! backend is one line in `main`.

#[path = "bank/domain.rs"]
#[allow(dead_code)]
mod domain;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use annals::{CommandMetadata, Repository, SnapshotPolicy};
use annals_core::{EventData, ExpectedVersion, MemoryStore, Metadata, Store, metadata::keys};
use domain::{Account, AccountCommand, AccountEvent};

#[derive(Debug, Clone, Copy)]
struct Config {
    events: u64,
    samples: usize,
    accounts: usize,
    tasks: usize,
    per_account: usize,
}

impl Config {
    fn from_args() -> Result<Self, String> {
        let mut cfg = Config { events: 10_000, samples: 200, accounts: 1_000, tasks: 64, per_account: 10 };
        let mut args = std::env::args().skip(1);
        while let Some(flag) = args.next() {
            let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
            if flag == "--log" {
                continue; // read by main
            }
            let n: u64 = value.parse().map_err(|_| format!("{flag}: '{value}' is not a number"))?;
            let as_usize = || usize::try_from(n).map_err(|_| format!("{flag} is too large"));
            match flag.as_str() {
                "--events" => cfg.events = n.max(2),
                "--samples" => cfg.samples = as_usize()?.max(1),
                "--accounts" => cfg.accounts = as_usize()?.max(1),
                "--tasks" => cfg.tasks = as_usize()?.max(1),
                "--per-account" => cfg.per_account = as_usize()?.max(1),
                other => return Err(format!("unknown flag {other}")),
            }
        }
        Ok(cfg)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let cfg = Config::from_args()?;
    let args: Vec<String> = std::env::args().collect();
    if let Some(dir) =
        args.iter().position(|a| a == "--log").and_then(|i| args.get(i + 1)).map(std::path::PathBuf::from)
    {
        // A fresh directory: the figures are for this run's data only.
        let _ = std::fs::remove_dir_all(&dir);
        println!("es_bench on the embedded log in {}: {cfg:?}", dir.display());
        let log = annals_log::LogStore::open(&dir)?;
        let result = run(Arc::new(log.clone()), cfg).await;
        tokio::task::spawn_blocking(move || log.close()).await??;
        let _ = std::fs::remove_dir_all(&dir);
        return result;
    }
    println!("es_bench on MemoryStore: {cfg:?}");
    run(Arc::new(MemoryStore::new()), cfg).await
}

/// Runs both measurements on `store`.
async fn run(store: Arc<dyn Store>, cfg: Config) -> Result<(), Box<dyn std::error::Error>> {
    bench_load(store.clone(), cfg).await?;
    bench_execute(store, cfg).await
}

async fn bench_load(store: Arc<dyn Store>, cfg: Config) -> Result<(), Box<dyn std::error::Error>> {
    // Both streams get `events - 1` events written directly (fast), then
    // one command through the repository; for "snap" that command crosses
    // the snapshot boundary, so its snapshot covers the whole stream.
    let plain = Repository::<Account>::builder(store.clone()).build();
    let snapshotting = Repository::<Account>::builder(store.clone())
        .snapshots(SnapshotPolicy::every(cfg.events).inline())
        .build();
    for (id, repo) in [("plain", &plain), ("snap", &snapshotting)] {
        seed(&*store, &repo.stream(id)?, cfg.events - 1).await?;
        repo.execute(id, &AccountCommand::Deposit { amount: 1 }, &CommandMetadata::new(format!("last-{id}")))
            .await?;
    }
    let check = snapshotting.load("snap").await?;
    if check.snapshot_version.is_none() {
        return Err("the snapshot was not written".into());
    }
    for (label, id, repo) in [("without snapshot", "plain", &plain), ("with snapshot", "snap", &snapshotting)]
    {
        let mut times = Vec::with_capacity(cfg.samples);
        for _ in 0..cfg.samples {
            let start = Instant::now();
            let loaded = repo.load(id).await?;
            times.push(start.elapsed());
            if loaded.version != Some(cfg.events - 1) {
                return Err(format!("{id} loaded at {:?}", loaded.version).into());
            }
        }
        let (p50, p99) = percentiles(&mut times);
        println!(
            "load {} events {label:<17} p50 {p50:>10.3?}  p99 {p99:>10.3?}  ({} samples)",
            cfg.events, cfg.samples
        );
    }
    Ok(())
}

/// Writes an opening and `count - 1` deposits in batches.
async fn seed(
    store: &dyn Store,
    stream: &annals_core::StreamName,
    count: u64,
) -> Result<(), Box<dyn std::error::Error>> {
    let meta = Metadata::new().with(keys::SCHEMA_VERSION, 1);
    let event = |e: &AccountEvent| -> Result<EventData, Box<dyn std::error::Error>> {
        let encoded = annals::encode(e)?;
        Ok(EventData::json(encoded.event_type, &encoded.payload)?.with_metadata(meta.clone()))
    };
    let mut batch = vec![event(&AccountEvent::Opened { owner: "bench".into() })?];
    let mut expected = ExpectedVersion::NoStream;
    for _ in 1..count {
        batch.push(event(&AccountEvent::Deposited { amount: 1 })?);
        if batch.len() == 1_000 {
            expected = store.append(stream, expected, std::mem::take(&mut batch)).await?.expected();
        }
    }
    if !batch.is_empty() {
        store.append(stream, expected, batch).await?;
    }
    Ok(())
}

async fn bench_execute(store: Arc<dyn Store>, cfg: Config) -> Result<(), Box<dyn std::error::Error>> {
    let repo = Repository::<Account>::builder(store).snapshots(SnapshotPolicy::every(100)).build();
    for a in 0..cfg.accounts {
        let id = format!("acc{a}");
        repo.execute(
            &id,
            &AccountCommand::Open { owner: id.clone() },
            &CommandMetadata::new(format!("open-{a}")),
        )
        .await?;
    }
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(cfg.tasks);
    for t in 0..cfg.tasks {
        let repo = repo.clone();
        tasks.push(tokio::spawn(async move {
            let mut times = Vec::new();
            for round in 0..cfg.per_account {
                for a in (t..cfg.accounts).step_by(cfg.tasks) {
                    let meta = CommandMetadata::new(format!("dep-{a}-{round}"));
                    let begin = Instant::now();
                    repo.execute(&format!("acc{a}"), &AccountCommand::Deposit { amount: 1 }, &meta)
                        .await
                        .map_err(|e| e.to_string())?;
                    times.push(begin.elapsed());
                }
            }
            Ok::<_, String>(times)
        }));
    }
    let mut times = Vec::new();
    for task in tasks {
        times.extend(task.await??);
    }
    let elapsed = start.elapsed();
    repo.flush_snapshots().await;
    let total = times.len();
    let (p50, p99) = percentiles(&mut times);
    println!(
        "execute: {total} commands on {} accounts from {} tasks in {elapsed:.3?} = {:.0} commands/s; latency p50 {p50:.3?} p99 {p99:.3?}",
        cfg.accounts,
        cfg.tasks,
        total as f64 / elapsed.as_secs_f64()
    );
    Ok(())
}

fn percentiles(times: &mut [Duration]) -> (Duration, Duration) {
    times.sort();
    let at =
        |q: f64| times.get(((times.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or_default();
    (at(0.50), at(0.99))
}
