//! `annals bench --data-dir DIR`: the same load, straight into the embedded log
//! through the library API (`Appender::append`, `Subscriber::subscribe`),
//! so the figures are the store's own, without HTTP, JSON or sockets.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use annals_core::{
    ContentType, EventData, ExpectedVersion, Filter, Metadata, StreamName, SubscribeFrom,
    SubscriptionRequest, SubscriptionTarget,
};
use bytes::Bytes;
use futures::StreamExt;

use super::{BenchArgs, Mode, Outcome, drain, now_micros};
use crate::{commands::serve::open_store, error::CliError};

/// Key of the send time (µs since the epoch) in each event's metadata, as
/// in the HTTP benchmark.
const SENT_AT: &str = "bench_sent_at";

/// Runs the load of `args` against the log in `dir` (created when missing).
pub(super) async fn run(
    args: &BenchArgs,
    dir: &Path,
    prefix: &str,
    duration: Duration,
) -> Result<Outcome, CliError> {
    let config = annals_server::config::StoreConfig { data: dir.to_path_buf(), ..Default::default() };
    let opened = open_store(&config).await?;
    let store = opened.store.clone();

    let stop = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(AtomicU64::new(0));
    let mut subscribers = Vec::new();
    if args.mode == Mode::Fanout {
        for _ in 0..args.subscribers {
            let mut events = store.subscribe(SubscriptionRequest {
                target: SubscriptionTarget::All(Filter::stream_prefix(prefix)),
                from: SubscribeFrom::End,
            });
            let (stop, delivered) = (stop.clone(), delivered.clone());
            subscribers.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let event = match tokio::time::timeout(Duration::from_millis(200), events.next()).await {
                        Ok(Some(Ok(e))) => e,
                        Ok(_) => break,
                        Err(_) => continue,
                    };
                    if let Some(sent) = event.metadata.get(SENT_AT).and_then(|v| v.as_i64()) {
                        latencies.push(now_micros().saturating_sub(sent).max(0) as u64);
                        delivered.fetch_add(1, Ordering::Relaxed);
                    }
                }
                latencies
            }));
        }
    }

    let payload = Bytes::from(
        serde_json::to_vec(&serde_json::json!({ "p": "x".repeat(args.event_size.saturating_sub(12)) }))
            .map_err(|e| CliError::Other(e.to_string()))?,
    );
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..args.concurrency {
        let stream = StreamName::new(format!("{prefix}{w}")).map_err(|e| CliError::Other(e.to_string()))?;
        let (store, payload, batch) = (store.clone(), payload.clone(), args.batch);
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            while started.elapsed() < duration {
                let metadata =
                    Metadata::from_trusted_json(Bytes::from(format!("{{\"{SENT_AT}\":{}}}", now_micros())));
                let events = (0..batch)
                    .map(|_| {
                        EventData::raw("BenchEvent", payload.clone(), ContentType::Json)
                            .with_metadata(metadata.clone())
                    })
                    .collect();
                let t = Instant::now();
                match store.append(&stream, ExpectedVersion::Any, events).await {
                    Ok(_) => latencies.push(t.elapsed().as_micros() as u64),
                    Err(_) => errors += 1,
                }
            }
            (latencies, errors)
        }));
    }
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for w in workers {
        match w.await {
            Ok((l, e)) => {
                latencies.extend(l);
                errors += e;
            }
            Err(_) => errors += 1,
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut fanout = None;
    if args.mode == Mode::Fanout {
        let expected = latencies.len() as u64 * args.batch as u64 * args.subscribers as u64;
        fanout = Some(drain(expected, &delivered, &stop, subscribers, started).await);
    }
    drop(store);
    opened.close().await?;
    Ok(Outcome { elapsed, latencies, errors, fanout })
}
