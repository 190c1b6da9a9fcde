//! The in-process event bus: typed handlers, middleware, concurrency limit,
//! retry with backoff, dead letters (paused time).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use annals::consumers::{EventBus, HandlerContext, HandlerError, Middleware, RetryPolicy};
use annals_core::{EventData, ExpectedVersion, MemoryStore, Store, StreamName, async_trait};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Deposited {
    amount: u64,
}

#[derive(Debug, Deserialize)]
struct Job {
    n: u64,
}

async fn publish(store: &dyn Store, stream: &str, event_type: &str, payload: serde_json::Value) {
    let stream = StreamName::new(stream).unwrap();
    let event = EventData::json(event_type, &payload).unwrap();
    store.append(&stream, ExpectedVersion::Any, vec![event]).await.unwrap();
}

#[derive(Default, Clone)]
struct Recorder {
    calls: Arc<Mutex<Vec<String>>>,
}

#[async_trait]
impl Middleware for Recorder {
    async fn before(&self, ctx: &HandlerContext) {
        self.calls.lock().unwrap().push(format!("before {}", ctx.event.position));
    }
    async fn after(&self, ctx: &HandlerContext, outcome: &Result<(), HandlerError>, _elapsed: Duration) {
        self.calls.lock().unwrap().push(format!("after {} ok={}", ctx.event.position, outcome.is_ok()));
    }
}

#[tokio::test(start_paused = true)]
async fn typed_handlers_middleware_concurrency_retry_and_dead_letters() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    publish(&*store, "account-1", "Deposited", serde_json::json!({ "amount": 5 })).await; // 0
    publish(&*store, "account-1", "Ignored", serde_json::json!({})).await; // 1: no handler
    publish(&*store, "account-1", "Deposited", serde_json::json!({ "amount": 7 })).await; // 2
    publish(&*store, "jobs-1", "Job", serde_json::json!({ "n": 13 })).await; // 3: always fails
    publish(&*store, "jobs-1", "Job", serde_json::json!({ "n": 1 })).await; // 4: fails once
    publish(&*store, "jobs-1", "Job", serde_json::json!({ "wrong": true })).await; // 5: does not decode
    for n in 100..110 {
        publish(&*store, "jobs-2", "Job", serde_json::json!({ "n": n })).await; // slow ones
    }

    let total = Arc::new(AtomicUsize::new(0));
    let jobs_done = Arc::new(Mutex::new(Vec::new()));
    let (running, max_running) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let recorder = Recorder::default();
    let bus = EventBus::builder(store.clone(), "demo")
        .concurrency(3)
        .retry(RetryPolicy::attempts(3).backoff(Duration::from_secs(1), Duration::from_secs(10)))
        .middleware(recorder.clone())
        .middleware(annals::consumers::LoggingMiddleware)
        .middleware(annals::consumers::MetricsMiddleware)
        .on("Deposited", {
            let total = total.clone();
            move |e: Deposited, _ctx| {
                let total = total.clone();
                async move {
                    total.fetch_add(e.amount as usize, Ordering::SeqCst);
                    Ok(())
                }
            }
        })
        .on("Job", {
            let (done, running, max_running) = (jobs_done.clone(), running.clone(), max_running.clone());
            move |job: Job, ctx: HandlerContext| {
                let (done, running, max_running) = (done.clone(), running.clone(), max_running.clone());
                async move {
                    if job.n == 13 {
                        return Err(HandlerError::new("unlucky"));
                    }
                    if job.n == 1 && ctx.attempt == 1 {
                        return Err(HandlerError::new("flaky"));
                    }
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    max_running.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    running.fetch_sub(1, Ordering::SeqCst);
                    done.lock().unwrap().push(job.n);
                    Ok(())
                }
            }
        })
        .start()
        .await
        .unwrap();

    // Settled: 2 deposits + 11 jobs done + 2 parked (unlucky, undecodable).
    loop {
        let stats = bus.stats().await.unwrap();
        if stats.acked == 13 && stats.parked == 2 && stats.in_flight == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(total.load(Ordering::SeqCst), 12);
    let mut done = jobs_done.lock().unwrap().clone();
    done.sort_unstable();
    assert_eq!(done, [1, 100, 101, 102, 103, 104, 105, 106, 107, 108, 109]);
    let max = max_running.load(Ordering::SeqCst);
    assert!(max <= 3, "concurrency limit held (max {max})");
    assert!(max >= 2, "handlers did run concurrently (max {max})");

    let dead = bus.dead_letters().await.unwrap();
    let summary: Vec<(u64, u32, bool)> =
        dead.iter().map(|d| (d.position, d.attempts, d.reason == "unlucky")).collect();
    assert_eq!(summary, [(3, 3, true), (5, 1, false)], "retried 3 times vs parked at once: {dead:?}");

    // The middleware wrapped every delivery (the event without a handler
    // never reached the bus).
    let calls = recorder.calls.lock().unwrap().clone();
    assert!(calls.contains(&"before 0".to_owned()) && calls.contains(&"after 0 ok=true".to_owned()));
    assert!(calls.contains(&"after 4 ok=false".to_owned()) && calls.contains(&"after 4 ok=true".to_owned()));
    assert!(!calls.contains(&"before 1".to_owned()));
    bus.stop().await;
}

/// A handler that panics on one event fails that event (retried, then
/// parked) and the bus goes on with the next ones. (The panic ended the
/// bus's task: nothing was handled any more, and nothing said so.)
#[tokio::test(start_paused = true)]
async fn a_panicking_handler_fails_its_event_and_the_bus_goes_on() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    publish(&*store, "jobs-1", "Job", serde_json::json!({ "n": 0 })).await; // 0: panics
    publish(&*store, "jobs-1", "Job", serde_json::json!({ "n": 1 })).await; // 1
    let done = Arc::new(Mutex::new(Vec::new()));
    let bus = EventBus::builder(store.clone(), "panicky")
        .retry(RetryPolicy::attempts(2).backoff(Duration::from_secs(1), Duration::from_secs(1)))
        .on("Job", {
            let done = done.clone();
            move |job: Job, _ctx: HandlerContext| {
                let done = done.clone();
                async move {
                    assert!(job.n != 0, "a bug in the handler");
                    done.lock().unwrap().push(job.n);
                    Ok(())
                }
            }
        })
        .start()
        .await
        .unwrap();
    let stats = tokio::time::timeout(Duration::from_secs(600), async {
        loop {
            let stats = bus.stats().await.unwrap();
            if stats.acked == 1 && stats.parked == 1 {
                return stats;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the bus stopped handling events");
    assert_eq!(stats.in_flight, 0);
    assert_eq!(*done.lock().unwrap(), [1]);
    let dead = bus.dead_letters().await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(dead[0].position == 0 && dead[0].reason.contains("a bug in the handler"), "{dead:?}");
    bus.stop().await;
}
