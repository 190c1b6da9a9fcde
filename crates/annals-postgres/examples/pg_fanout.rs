//! Live subscribers against append throughput: for each number of
//! subscribers, a fresh schema, that many subscriptions from the end, and
//! `--writers` tasks appending single events for `--seconds`. Prints
//! appends/s, deliveries/s and how long after the last append the slowest
//! subscriber had seen it. `--kind all` (default): `$all` subscriptions,
//! each sees every event; `--kind stream`: subscription `i` follows the
//! writers' stream `fan-{i % writers}`.
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
    streams: bool,
}

fn args() -> Args {
    let mut a = Args {
        url: std::env::var("ANNALS_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned()),
        subscribers: vec![0, 10, 100],
        writers: 8,
        seconds: 10,
        streams: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().expect("a value after each flag");
        match flag.as_str() {
            "--url" => a.url = value,
            "--subscribers" => a.subscribers = value.split(',').map(|v| v.parse().unwrap()).collect(),
            "--writers" => a.writers = value.parse().unwrap(),
            "--seconds" => a.seconds = value.parse().unwrap(),
            "--kind" => a.streams = value == "stream",
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
    let kind = if args.streams { "stream" } else { "$all" };
    println!("writers {} seconds {} {kind} subscriptions", args.writers, args.seconds);
    for &subscribers in &args.subscribers {
        let schema = format!("annals_fan_{}", uuid::Uuid::new_v4().simple());
        let store = PgStore::builder(url.clone()).schema(&schema).open().await.unwrap();
        // Per subscriber: the next position (`$all`) or version (stream) it waits for.
        let seen: Arc<Vec<AtomicU64>> = Arc::new((0..subscribers).map(|_| AtomicU64::new(0)).collect());
        let delivered = Arc::new(AtomicU64::new(0));
        let mut subs = Vec::new();
        for i in 0..subscribers {
            let request = if args.streams {
                let s = StreamName::new(format!("fan-{}", i % args.writers)).unwrap();
                SubscriptionRequest::stream(s, SubscribeFrom::Start)
            } else {
                SubscriptionRequest::all(Filter::all(), SubscribeFrom::End)
            };
            let mut sub = store.subscribe(request);
            let (seen, delivered, streams) = (seen.clone(), delivered.clone(), args.streams);
            subs.push(tokio::spawn(async move {
                let mut last = None;
                while let Some(event) = sub.next().await {
                    let event = event.unwrap();
                    let at = if streams { event.version } else { event.position };
                    assert!(last.is_none_or(|l| at == l + 1), "out of order");
                    last = Some(at);
                    seen[i].store(at + 1, Ordering::Relaxed);
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
                    let mut last = (0, 0);
                    while !stop.load(Ordering::Relaxed) {
                        let data = format!(r#"{{"w":{w},"note":"benchmark event with a modest payload"}}"#);
                        let event = EventData::raw("E", data.into_bytes(), ContentType::Json);
                        let r = store.append(&s, ExpectedVersion::Any, vec![event]).await.unwrap();
                        last = (r.position + 1, r.next_version);
                        appended.fetch_add(1, Ordering::Relaxed);
                    }
                    last
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(args.seconds)).await;
        stop.store(true, Ordering::Relaxed);
        // What each subscriber must reach: the head, or its stream's next version.
        let mut head = 0;
        let mut next_versions = Vec::new();
        for w in writers {
            let (position, version) = w.await.unwrap();
            head = head.max(position);
            next_versions.push(version);
        }
        let target = |i: usize| if args.streams { next_versions[i % args.writers] } else { head };
        let elapsed = started.elapsed().as_secs_f64();
        let appends = appended.load(Ordering::Relaxed);
        let delivered_during = delivered.load(Ordering::Relaxed);
        let stopped = Instant::now();
        while seen.iter().enumerate().any(|(i, s)| s.load(Ordering::Relaxed) < target(i)) {
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
