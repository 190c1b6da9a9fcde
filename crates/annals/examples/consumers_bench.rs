//! Consumer-side throughput: a persistent subscription with 4 consumers
//! acking every message, and projection catch-up over N events for a no-op
//! projection and one that updates an in-memory `HashMap`.
//!
//! ```text
//! cargo run --release -p annals --example consumers_bench -- [--events N] [--messages M] [--runs R] [--log DIR]
//! ```
//! Defaults: N = 1,000,000 events, M = 100,000 messages, R = 3 runs; each
//! figure is the median of the runs. Generic over `Arc<dyn Store>`:
//! [`open_store`] is the one place that picks the backend.

use std::{collections::HashMap, sync::Arc, time::Instant};

use annals::consumers::{
    BatchError, GroupSettings, HandlerError, PersistentSubscription, Projection, ProjectionRunner,
};
use annals_core::{
    EventData, ExpectedVersion, Filter, MemoryStore, RecordedEvent, Store, StreamName, SubscriptionTarget,
    async_trait,
};

/// The backend under test.
/// MemoryStore, or the embedded log with `--log DIR` (fresh directory; the
/// log is closed when the process exits).
fn open_store() -> Arc<dyn Store> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(base) = args.iter().position(|a| a == "--log").and_then(|i| args.get(i + 1)) {
        // Each call gets its own fresh directory (runs must not share data).
        static OPENED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = OPENED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = format!("{base}/store-{n}");
        let _ = std::fs::remove_dir_all(&dir);
        let log = annals_log::LogStore::builder(&dir)
            .durability(annals_log::Durability::Always)
            .open()
            .unwrap_or_else(|e| panic!("cannot open the log in {dir}: {e}"));
        return Arc::new(log);
    }
    Arc::new(MemoryStore::new())
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.replace('_', "").parse().ok())
        .unwrap_or(default)
}

async fn fill(store: &dyn Store, n: usize) -> Result<(), Box<dyn std::error::Error>> {
    const BATCH: usize = 1_000;
    let payload = serde_json::json!({ "amount": 42, "note": "benchmark" });
    let mut written = 0;
    while written < n {
        let count = BATCH.min(n - written);
        let stream = StreamName::new(format!("account-{}", (written / BATCH) % 1_000))?;
        let events =
            (0..count).map(|_| EventData::json("Deposited", &payload)).collect::<Result<Vec<_>, _>>()?;
        store.append(&stream, ExpectedVersion::Any, events).await?;
        written += count;
    }
    Ok(())
}

struct NoOp;

#[async_trait]
impl Projection for NoOp {
    fn name(&self) -> &str {
        "bench-noop"
    }
    async fn handle(&mut self, _event: &RecordedEvent) -> Result<(), HandlerError> {
        Ok(())
    }
    async fn handle_batch(&mut self, _events: &[RecordedEvent]) -> Result<(), BatchError> {
        Ok(())
    }
}

struct Counts(HashMap<String, (u64, u64)>);

#[async_trait]
impl Projection for Counts {
    fn name(&self) -> &str {
        "bench-map"
    }
    async fn handle(&mut self, event: &RecordedEvent) -> Result<(), HandlerError> {
        let row = self.0.entry(event.stream.as_str().to_owned()).or_default();
        row.0 += 1;
        row.1 = event.position;
        Ok(())
    }
}

async fn projection_rate(
    store: Arc<dyn Store>,
    projection: impl Projection,
    n: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let started = Instant::now();
    let running = ProjectionRunner::new(store.clone(), projection).batch_size(1_000).start()?;
    running.wait_until_caught_up(&*store).await?;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    running.stop().await?;
    Ok(rate)
}

async fn subscription_rate(
    store: Arc<dyn Store>,
    m: usize,
    run: usize,
) -> Result<f64, Box<dyn std::error::Error>> {
    let settings =
        GroupSettings::new(format!("bench-{run}"), SubscriptionTarget::All(Filter::all())).buffer_size(4_096);
    let started = Instant::now();
    let group = PersistentSubscription::start(store, settings).await?;
    let mut workers = Vec::new();
    for i in 0..4 {
        let mut consumer = group.connect(format!("worker-{i}"), 256);
        workers.push(tokio::spawn(async move {
            while let Some(delivery) = consumer.next().await {
                if consumer.ack(delivery.id).await.is_err() {
                    break;
                }
            }
        }));
    }
    loop {
        let stats = group.stats().await?;
        if stats.acked as usize >= m {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let rate = m as f64 / started.elapsed().as_secs_f64();
    group.stop().await;
    for w in workers {
        let _ = w.await;
    }
    Ok(rate)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n = arg("--events", 1_000_000);
    let m = arg("--messages", 100_000);
    let runs = arg("--runs", 3).max(1);
    println!(
        "consumers bench: {n} events for projections, {m} messages for the group, median of {runs} runs"
    );

    let (mut noop, mut map) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        // A fresh store per run: every run starts without a checkpoint.
        let fresh = open_store();
        fill(&*fresh, n).await?;
        noop.push(projection_rate(fresh.clone(), NoOp, n).await?);
        map.push(projection_rate(fresh, Counts(HashMap::new()), n).await?);
    }
    println!("projection catch-up, no-op:        {:>12.0} events/s", median(noop));
    println!("projection catch-up, HashMap:      {:>12.0} events/s", median(map));

    let store = open_store();
    fill(&*store, m).await?;
    let mut group = Vec::new();
    for run in 0..runs {
        group.push(subscription_rate(store.clone(), m, run).await?);
    }
    println!("persistent subscription, 4 consumers acking: {:>8.0} messages/s", median(group));
    Ok(())
}
