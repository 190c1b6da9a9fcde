//! One writer: what a raw single-row insert and a `PgStore::append` of one
//! event each cost, per operation: CPU in this process and in the server
//! sessions doing the work (the raw client's backend; the store's pool and
//! listener backends), from `/proc` (Linux, server on this machine), and
//! the WAL: bytes (`pg_current_wal_lsn` difference) and the server's WAL
//! writes and syncs (`pg_stat_wal`, cluster-wide, so run it on an otherwise
//! idle server). Blocks of 2,000
//! each; waits for the sessions' statistics to be flushed (up to about
//! 10 s of idle) before reading the counters.
//! `cargo run --release -p annals-postgres --example pg_wal`
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used, missing_docs)]
use std::time::{Duration, Instant};

use annals_core::StreamName;

#[path = "support/lone_writer.rs"]
mod support;

/// CPU seconds (user + system) used so far by process `pid` ("self" for
/// this one), from `/proc` (Linux; 0 elsewhere).
fn cpu(pid: &str) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name, which is in parentheses.
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return 0.0 };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 here.
    (ticks(11) + ticks(12)) / 100.0
}

/// Backend pids of the store's pool sessions, of its listener session,
/// and of the raw client.
async fn backends(client: &tokio_postgres::Client, schema: &str) -> (Vec<String>, Vec<String>, String) {
    let pids = |name: String| async move {
        let rows = client
            .query("SELECT pid::text FROM pg_stat_activity WHERE application_name = $1", &[&name])
            .await
            .unwrap();
        rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>()
    };
    let raw: i32 = client.query_one("SELECT pg_backend_pid()", &[]).await.unwrap().get(0);
    (pids(format!("annals {schema}")).await, pids(format!("annals-listen {schema}")).await, raw.to_string())
}

/// (WAL position, WAL writes, WAL syncs).
async fn wal(client: &tokio_postgres::Client) -> (i64, i64, i64) {
    let row = client
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), '0/0')::int8, wal_write, wal_sync FROM pg_stat_wal",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    const N: usize = 2000;
    let setup = support::open("annals_wal").await;
    let (store, client, stmt) = (&setup.store, &setup.client, &setup.raw_insert);
    let s = StreamName::new("wal-1").unwrap();
    // Warm up both paths (first-touch page images, plans).
    for i in 0..200 {
        client
            .execute(stmt, &[&"raw-1", &(i as i64), &uuid::Uuid::new_v4(), &support::payload(i)])
            .await
            .unwrap();
        support::append_one(store, &s, support::payload(i)).await;
    }
    let settle = Duration::from_secs(11);
    tokio::time::sleep(settle).await;
    let (pool, listener, raw_backend) = backends(client, &setup.schema).await;
    let sum = |pids: &[String]| pids.iter().map(|p| cpu(p)).sum::<f64>();
    for what in ["raw insert", "append"] {
        // The sessions doing the work, and the store's listener session.
        let server_cpu = || -> (f64, f64) {
            if what == "raw insert" { (cpu(&raw_backend), 0.0) } else { (sum(&pool), sum(&listener)) }
        };
        let before = wal(client).await;
        let (client_before, server_before) = (cpu("self"), server_cpu());
        let t = Instant::now();
        for i in 0..N {
            let payload = support::payload(i);
            if what == "raw insert" {
                client
                    .execute(stmt, &[&"raw-1", &(i as i64), &uuid::Uuid::new_v4(), &payload])
                    .await
                    .unwrap();
            } else {
                support::append_one(store, &s, payload).await;
            }
        }
        let took = t.elapsed().as_secs_f64() * 1e3 / N as f64;
        let client_cpu = (cpu("self") - client_before) * 1e3 / N as f64;
        let server_after = server_cpu();
        let server_cpu = (server_after.0 - server_before.0) * 1e3 / N as f64;
        let listener_cpu = (server_after.1 - server_before.1) * 1e3 / N as f64;
        tokio::time::sleep(settle).await;
        let after = wal(client).await;
        let per = |a: i64, b: i64| (a - b) as f64 / N as f64;
        println!(
            "{what:>10}: {took:.3} ms each; CPU {client_cpu:.3} ms here, {server_cpu:.3} ms in its server \
             session(s), {listener_cpu:.3} ms in the listener's; WAL {:.0} bytes, {:.2} writes, {:.2} syncs \
             per operation",
            per(after.0, before.0),
            per(after.1, before.1),
            per(after.2, before.2)
        );
    }
    setup.drop_schema().await;
}
