//! One writer, raw single-row insert and `PgStore::append` interleaved
//! append by append (3,000 each): p50, p90 and mean latency, and their
//! ratios. `cargo run --release -p annals-postgres --example pg_latency`
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used, missing_docs)]
use annals_core::StreamName;
use std::time::Instant;

#[path = "support/lone_writer.rs"]
mod support;

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let setup = support::open("annals_lat").await;
    let (store, client, stmt) = (&setup.store, &setup.client, &setup.raw_insert);
    let s = StreamName::new("lat-1").unwrap();
    let n = 3000;
    let (mut raw, mut ours) = (Vec::new(), Vec::new());
    for i in 0..n {
        let payload = support::payload(i);
        let t = Instant::now();
        client.execute(stmt, &[&"raw-1", &(i as i64), &uuid::Uuid::new_v4(), &payload]).await.unwrap();
        raw.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        support::append_one(store, &s, payload).await;
        ours.push(t.elapsed().as_secs_f64() * 1e3);
    }
    raw.sort_by(f64::total_cmp);
    ours.sort_by(f64::total_cmp);
    let p = |v: &Vec<f64>, q: f64| v[((v.len() as f64) * q) as usize];
    let mr: f64 = raw.iter().sum::<f64>() / n as f64;
    let mo: f64 = ours.iter().sum::<f64>() / n as f64;
    println!("raw  p50 {:.3} p90 {:.3} mean {:.3} ms", p(&raw, 0.5), p(&raw, 0.9), mr);
    println!(
        "ours p50 {:.3} p90 {:.3} mean {:.3} ms   ratio(mean) {:.2} ratio(p50) {:.2}",
        p(&ours, 0.5),
        p(&ours, 0.9),
        mo,
        mr / mo,
        p(&raw, 0.5) / p(&ours, 0.5)
    );
    setup.drop_schema().await;
}
