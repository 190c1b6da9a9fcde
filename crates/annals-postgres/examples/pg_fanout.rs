//! Live `$all` subscribers against append throughput: for each number of
//! subscribers, a fresh schema, that many `$all` subscriptions from the
//! end, and `--writers` tasks appending single events for `--seconds`.
//! Prints appends/s, deliveries/s and how long after the last append the
//! slowest subscriber had seen it.
//!
//! `cargo run --release -p annals-postgres --example pg_fanout -- --subscribers 0,10,100 --writers 8 --seconds 10`
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used, missing_docs)]
use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use annals_core::{
    Appender, ContentType, EventData, ExpectedVersion, Filter, StreamName, SubscribeFrom, Subscriber,
    SubscriptionRequest,
};
use annals_postgres::PgStore;
use futures::StreamExt;

struct Args {
    url: String,
    subscribers: Vec<usize>,
    writers: usize,
    seconds: u64,
}

fn args() -> Args {
    let mut a = Args {
        url: std::env::var("ANNALS_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned()),
        subscribers: vec![0, 10, 100],
        writers: 8,
        seconds: 10,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().expect("a value after each flag");
        match flag.as_str() {
            "--url" => a.url = value,
            "--subscribers" => a.subscribers = value.split(',').map(|v| v.parse().unwrap()).collect(),
            "--writers" => a.writers = value.parse().unwrap(),
            "--seconds" => a.seconds = value.parse().unwrap(),
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args = args();
    let sep = if args.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{sep}sslmode=disable", args.url);
    println!("writers {} seconds {}", args.writers, args.seconds);
    for &subscribers in &args.subscribers {
        let schema = format!("annals_fan_{}", uuid::Uuid::new_v4().simple());
        let store = PgStore::builder(url.clone()).schema(&schema).open().await.unwrap();
        let seen: Arc<Vec<AtomicU64>> = Arc::new((0..subscribers).map(|_| AtomicU64::new(0)).collect());
        let delivered = Arc::new(AtomicU64::new(0));
        let mut subs = Vec::new();
        for i in 0..subscribers {
            let mut sub = store.subscribe(SubscriptionRequest::all(Filter::all(), SubscribeFrom::End));
            let (seen, delivered) = (seen.clone(), delivered.clone());
            subs.push(tokio::spawn(async move {
                let mut last = None;
                while let Some(event) = sub.next().await {
                    let event = event.unwrap();
                    assert!(last.is_none_or(|l| event.position == l + 1), "out of order");
                    last = Some(event.position);
                    seen[i].store(event.position + 1, Ordering::Relaxed);
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let stop = Arc::new(AtomicBool::new(false));
        let appended = Arc::new(AtomicU64::new(0));
        let started = Instant::now();
        let writers: Vec<_> = (0..args.writers)
            .map(|w| {
                let (store, stop, appended) = (store.clone(), stop.clone(), appended.clone());
                tokio::spawn(async move {
                    let s = StreamName::new(format!("fan-{w}")).unwrap();
                    let mut last = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let data = format!(r#"{{"w":{w},"note":"benchmark event with a modest payload"}}"#);
                        let event = EventData::raw("E", data.into_bytes(), ContentType::Json);
                        last = store.append(&s, ExpectedVersion::Any, vec![event]).await.unwrap().position;
                        appended.fetch_add(1, Ordering::Relaxed);
                    }
                    last
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(args.seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let mut end = 0;
        for w in writers {
            end = end.max(w.await.unwrap() + 1);
        }
        let elapsed = started.elapsed().as_secs_f64();
        let appends = appended.load(Ordering::Relaxed);
        let delivered_during = delivered.load(Ordering::Relaxed);
        let stopped = Instant::now();
        while seen.iter().any(|s| s.load(Ordering::Relaxed) < end) {
            assert!(stopped.elapsed() < Duration::from_secs(120), "subscribers never caught up");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let catch_up = stopped.elapsed().as_secs_f64() * 1e3;
        println!(
            "subscribers {subscribers:>4}: appends {:>7.0}/s  deliveries {:>9.0}/s  last append seen by all {catch_up:>7.1} ms later",
            appends as f64 / elapsed,
            delivered_during as f64 / elapsed,
        );
        for s in subs {
            s.abort();
        }
        drop(store);
        let (client, conn) = tokio_postgres::connect(&args.url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(conn);
        client.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE")).await.unwrap();
    }
}
