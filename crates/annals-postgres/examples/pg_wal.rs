//! One writer: what a raw single-row insert and a `PgStore::append` of one
//! event each cost the WAL, per operation: bytes (`pg_current_wal_lsn`
//! difference) and the server's WAL writes and syncs (`pg_stat_wal`,
//! cluster-wide, so run it on an otherwise idle server). Blocks of 2,000
//! each; waits for the sessions' statistics to be flushed (up to about
//! 10 s of idle) before reading the counters.
//! `cargo run --release -p annals-postgres --example pg_wal`
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used, missing_docs)]
use std::time::{Duration, Instant};

use annals_core::StreamName;

#[path = "support/lone_writer.rs"]
mod support;

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
    for what in ["raw insert", "append"] {
        let before = wal(client).await;
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
        tokio::time::sleep(settle).await;
        let after = wal(client).await;
        let per = |a: i64, b: i64| (a - b) as f64 / N as f64;
        println!(
            "{what:>10}: {took:.3} ms each; WAL {:.0} bytes, {:.2} writes, {:.2} syncs per operation",
            per(after.0, before.0),
            per(after.1, before.1),
            per(after.2, before.2)
        );
    }
    setup.drop_schema().await;
}
