//! PostgreSQL backend benchmark: raw INSERT baselines and `PgStore` in one
//! run, medians of several runs.
//!
//! ```text
//! cargo run --release -p annals-postgres --example pg_bench -- \
//!     [--url postgres://postgres@127.0.0.1:5432/test] [--events 20000] [--runs 3] [--writers 1,8,32] \
//!     [--store-sslmode disable] [--types 1]
//! ```
//!
//! `--types N` cycles the store's events through N event types (event *i*
//! has type `E{i mod N}`): with 100, every event of a batch has its own
//! type, so a batch is 100 runs (rows) instead of one.
//!
//! The raw baselines connect without TLS; so does the store unless
//! `--store-sslmode` says otherwise (e.g. `require`, to see what TLS costs).
//!
//! For each writer count it measures, from that many connections:
//! - raw single-row `INSERT`s in autocommit into a bare table with an
//!   event's columns, a row per event (primary key only; the store keeps
//!   runs of events since migration 0009);
//! - raw 100-row multi-row `INSERT`s into the same table (the issue's
//!   baseline: four bound parameters a row, the other columns constants);
//! - `PgStore` appends of one event each, and of 100 events each (all of
//!   one type: one run of 100);
//! - for comparison only, the 100-row `INSERT`s with every column an append
//!   supplies bound (nine a row), printed below the table;
//!
//! then the `$all` read rate (forward pages of 1,000). Everything runs in a
//! fresh schema that is dropped at the end.

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use annals_core::{AllReader, Appender, EventData, ExpectedVersion, Filter, ReadAll, StreamName, TypeMatch};
use annals_postgres::PgStore;
use tokio_postgres::{Client, NoTls, types::ToSql};

#[path = "support/lone_writer.rs"]
#[allow(dead_code)] // pg_bench only needs the raw table
mod support;

struct Args {
    url: String,
    store_sslmode: String,
    events: usize,
    runs: usize,
    writers: Vec<usize>,
    types: usize,
}

fn args() -> Args {
    let mut a = Args {
        url: std::env::var("ANNALS_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned()),
        store_sslmode: "disable".to_owned(),
        events: 20_000,
        runs: 3,
        writers: vec![1, 8, 32],
        types: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => a.url = value,
            "--store-sslmode" => a.store_sslmode = value,
            "--events" => a.events = value.parse().expect("--events N"),
            "--runs" => a.runs = value.parse().expect("--runs N"),
            "--types" => a.types = value.parse::<usize>().expect("--types N").max(1),
            "--writers" => {
                a.writers = value.split(',').map(|w| w.parse().expect("--writers 1,8,32")).collect()
            }
            other => panic!("unknown flag {other}"),
        }
    }
    a
}

async fn connect(url: &str) -> Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await.expect("connect");
    tokio::spawn(conn);
    client
}

fn payload(i: usize) -> Vec<u8> {
    format!(r#"{{"n":{i},"note":"benchmark event with a modest payload"}}"#).into_bytes()
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs.get(xs.len() / 2).copied().unwrap_or(0.0)
}

/// One raw connection per writer.
async fn clients(url: &str, writers: usize) -> Vec<std::sync::Arc<Client>> {
    let mut clients = Vec::with_capacity(writers);
    for _ in 0..writers {
        clients.push(std::sync::Arc::new(connect(url).await));
    }
    clients
}

/// Runs `work(writer)` on `writers` tasks; returns events per second.
async fn timed<F, Fut>(writers: usize, events: usize, work: F) -> f64
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let tasks: Vec<_> = (0..writers).map(&work).collect();
    let start = Instant::now();
    let handles: Vec<_> = tasks.into_iter().map(tokio::spawn).collect();
    for h in handles {
        h.await.expect("writer task");
    }
    events as f64 / start.elapsed().as_secs_f64().max(1e-9)
}

const RAW_COLUMNS: &str =
    "stream, version, id, event_type, category, content_type, data, metadata, correlation_id, recorded_at";

async fn raw_single(url: &str, schema: &str, writers: usize, events: usize, run: usize) -> f64 {
    let per = events / writers;
    let clients = clients(url, writers).await;
    let sql = format!(
        "INSERT INTO \"{schema}\".raw_events ({RAW_COLUMNS})
         VALUES ($1, $2, $3, 'E', 'raw', 0, $4, '{{}}', NULL, now())"
    );
    timed(writers, per * writers, |w| {
        let client = clients[w].clone();
        let sql = sql.clone();
        async move {
            let stmt = client.prepare(&sql).await.unwrap();
            let stream = format!("raw-{run}-{w}");
            for i in 0..per {
                let id = uuid::Uuid::new_v4();
                client.execute(&stmt, &[&stream, &(i as i64), &id, &payload(i)]).await.unwrap();
            }
        }
    })
    .await
}

async fn raw_batch(url: &str, schema: &str, writers: usize, events: usize, run: usize) -> f64 {
    const BATCH: usize = 100;
    let batches = (events / writers / BATCH).max(1);
    let clients = clients(url, writers).await;
    let values: Vec<String> = (0..BATCH)
        .map(|r| {
            let b = r * 4;
            format!("(${}, ${}, ${}, 'E', 'raw', 0, ${}, '{{}}', NULL, now())", b + 1, b + 2, b + 3, b + 4)
        })
        .collect();
    let sql = format!("INSERT INTO \"{schema}\".raw_events ({RAW_COLUMNS}) VALUES {}", values.join(", "));
    timed(writers, batches * BATCH * writers, |w| {
        let client = clients[w].clone();
        let sql = sql.clone();
        async move {
            let stmt = client.prepare(&sql).await.unwrap();
            let stream = format!("rawb-{run}-{w}");
            for b in 0..batches {
                let rows: Vec<(String, i64, uuid::Uuid, Vec<u8>)> = (0..BATCH)
                    .map(|r| {
                        let i = b * BATCH + r;
                        (stream.clone(), i as i64, uuid::Uuid::new_v4(), payload(i))
                    })
                    .collect();
                let params: Vec<&(dyn ToSql + Sync)> = rows
                    .iter()
                    .flat_map(|(s, v, id, d)| {
                        [s as &(dyn ToSql + Sync), v as &(dyn ToSql + Sync), id, d as &(dyn ToSql + Sync)]
                    })
                    .collect();
                client.execute(&stmt, &params).await.unwrap();
            }
        }
    })
    .await
}

/// Like `raw_batch`, but every column an append supplies per event is a
/// bound parameter (as in an application's own insert of varied events):
/// 9 per row, `recorded_at` from `now()`.
async fn raw_batch_bound(url: &str, schema: &str, writers: usize, events: usize, run: usize) -> f64 {
    const BATCH: usize = 100;
    let batches = (events / writers / BATCH).max(1);
    let clients = clients(url, writers).await;
    let values: Vec<String> = (0..BATCH)
        .map(|r| {
            let b = r * 9;
            format!(
                "(${}, ${}, ${}, ${}, ${}, ${}, ${}, ${}::text::json, ${}, now())",
                b + 1,
                b + 2,
                b + 3,
                b + 4,
                b + 5,
                b + 6,
                b + 7,
                b + 8,
                b + 9
            )
        })
        .collect();
    let sql = format!("INSERT INTO \"{schema}\".raw_events ({RAW_COLUMNS}) VALUES {}", values.join(", "));
    timed(writers, batches * BATCH * writers, |w| {
        let client = clients[w].clone();
        let sql = sql.clone();
        async move {
            let stmt = client.prepare(&sql).await.unwrap();
            let stream = format!("rawf-{run}-{w}");
            for b in 0..batches {
                type Row = (String, i64, uuid::Uuid, String, String, i16, Vec<u8>, String, Option<String>);
                let rows: Vec<Row> = (0..BATCH)
                    .map(|r| {
                        let i = b * BATCH + r;
                        let meta = "{}".to_owned();
                        (
                            stream.clone(),
                            i as i64,
                            uuid::Uuid::new_v4(),
                            "E".into(),
                            "rawf".into(),
                            0,
                            payload(i),
                            meta,
                            None,
                        )
                    })
                    .collect();
                let params: Vec<&(dyn ToSql + Sync)> = rows
                    .iter()
                    .flat_map(|(s, v, id, t, c, ct, d, m, corr)| {
                        [
                            s as &(dyn ToSql + Sync),
                            v as &(dyn ToSql + Sync),
                            id,
                            t,
                            c,
                            ct,
                            d as &(dyn ToSql + Sync),
                            m,
                            corr,
                        ]
                    })
                    .collect();
                client.execute(&stmt, &params).await.unwrap();
            }
        }
    })
    .await
}

fn event(i: usize, types: usize) -> EventData {
    let event_type = if types == 1 { "E".to_owned() } else { format!("E{}", i % types) };
    EventData::raw(event_type, payload(i), annals_core::ContentType::Json)
}

async fn store_appends(
    store: &PgStore,
    writers: usize,
    events: usize,
    batch: usize,
    run: usize,
    types: usize,
) -> f64 {
    let appends = (events / writers / batch).max(1);
    timed(writers, appends * batch * writers, |w| {
        let store = store.clone();
        async move {
            let s = StreamName::new(format!("bench{batch}-{run}-{w}")).unwrap();
            for a in 0..appends {
                let events = (0..batch).map(|i| event(a * batch + i, types)).collect();
                store.append(&s, ExpectedVersion::Any, events).await.unwrap();
            }
        }
    })
    .await
}

async fn read_all_rate(store: &PgStore, filter: Filter) -> (f64, u64) {
    let start = Instant::now();
    let mut from = 0;
    let mut count = 0u64;
    loop {
        let page =
            store.read_all(ReadAll::forward(1000).from_position(from).filter(filter.clone())).await.unwrap();
        if page.events.is_empty() {
            break;
        }
        count += page.events.len() as u64;
        from = page.next.unwrap();
    }
    (count as f64 / start.elapsed().as_secs_f64().max(1e-9), count)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args = args();
    let schema = format!("annals_bench_{}", uuid::Uuid::new_v4().simple());
    let max_writers = args.writers.iter().copied().max().unwrap_or(1);
    let sep = if args.url.contains('?') { '&' } else { '?' };
    let store_url = format!("{}{sep}sslmode={}", args.url, args.store_sslmode);
    let store = PgStore::builder(&store_url)
        .schema(&schema)
        .max_connections(max_writers)
        .open()
        .await
        .unwrap_or_else(|e| panic!("cannot open the store: {e}"));
    let admin = connect(&args.url).await;
    support::create_raw_table(&admin, &schema).await;
    println!(
        "pg_bench: {} events per measurement, median of {} runs, schema {schema}; store sslmode={}, raw without TLS; {} event type(s)",
        args.events, args.runs, args.store_sslmode, args.types
    );
    println!(
        "{:>7} | {:>12} {:>12} {:>6} | {:>13} {:>13} {:>6}",
        "writers", "raw 1-row/s", "append 1/s", "ratio", "raw 100-row/s", "append 100/s", "ratio"
    );
    let mut bound = Vec::new();
    for &writers in &args.writers {
        let (mut raw1, mut raw100, mut ours1, mut ours100) = (vec![], vec![], vec![], vec![]);
        let mut bound100 = vec![];
        for run in 0..args.runs {
            raw1.push(raw_single(&args.url, &schema, writers, args.events, run).await);
            ours1.push(store_appends(&store, writers, args.events, 1, run, args.types).await);
            raw100.push(raw_batch(&args.url, &schema, writers, args.events, run).await);
            ours100.push(store_appends(&store, writers, args.events, 100, run, args.types).await);
            bound100.push(raw_batch_bound(&args.url, &schema, writers, args.events, run).await);
        }
        let bound100 = median(bound100);
        let (raw1, ours1, raw100, ours100) = (median(raw1), median(ours1), median(raw100), median(ours100));
        println!(
            "{writers:>7} | {raw1:>12.0} {ours1:>12.0} {:>6.2} | {raw100:>13.0} {ours100:>13.0} {:>6.2}",
            ours1 / raw1,
            ours100 / raw100
        );
        bound.push((writers, bound100, ours100 / bound100));
    }
    println!("raw 100-row INSERTs with every per-event column bound (9 parameters a row, not 4):");
    for (writers, rate, ratio) in &bound {
        println!("{writers:>7} | {rate:>13.0} rows/s, append 100 at {ratio:.2} of it");
    }
    let mut reads = Vec::new();
    let mut total = 0;
    for _ in 0..args.runs {
        let (rate, n) = read_all_rate(&store, Filter::all()).await;
        reads.push(rate);
        total = n;
    }
    println!("$all forward read: {:.0} events/s (median; {total} events, pages of 1,000)", median(reads));
    // The same pages through a type filter that every event matches: the
    // plan a projection subscribed by type gets.
    let types: Vec<TypeMatch> = if args.types == 1 {
        vec![TypeMatch::Exact("E".into())]
    } else {
        (0..args.types).map(|t| TypeMatch::Exact(format!("E{t}"))).collect()
    };
    let by_type = Filter { event_types: types, ..Filter::all() };
    let mut reads = Vec::new();
    for _ in 0..args.runs {
        reads.push(read_all_rate(&store, by_type.clone()).await.0);
    }
    println!("$all forward read by type: {:.0} events/s (median)", median(reads));
    drop(store);
    tokio::time::sleep(Duration::from_millis(100)).await;
    admin.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE")).await.unwrap();
}
