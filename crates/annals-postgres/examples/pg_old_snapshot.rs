//! Appends while another session holds an old snapshot (a long report,
//! `pg_dump`, a session left idle in a transaction): one writer appends
//! single events for `--secs` seconds; from second 10 to second 35 a second
//! connection holds a REPEATABLE READ snapshot open. Prints appends per
//! second for every 5 s window, and the sizes of the head and stream-row
//! tables at the end (`streams` before migration 0011).
//!
//! ```text
//! cargo run --release -p annals-postgres --example pg_old_snapshot -- \
//!     [--url postgres://postgres@127.0.0.1:5432/test] [--secs 45] [--streams 1] [--checkpoints 0]
//! ```
//!
//! `--streams N` spreads the appends over N streams (round robin).
//! `--checkpoints N` saves checkpoints instead (`CheckpointStore`, one of
//! N names in turn; every fifth save through a checkpoint transaction).

#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::time::{Duration, Instant};

use annals_core::{Appender, CheckpointStore, ContentType, EventData, ExpectedVersion, StreamName};
use annals_postgres::PgStore;

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut url = std::env::var("ANNALS_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let (mut secs, mut streams, mut checkpoints) = (45u64, 1usize, 0usize);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--url" => url = value,
            "--secs" => secs = value.parse().expect("--secs N"),
            "--streams" => streams = value.parse().expect("--streams N"),
            "--checkpoints" => checkpoints = value.parse().expect("--checkpoints N"),
            other => panic!("unknown flag {other}"),
        }
    }
    let schema = format!("annals_snap_{}", uuid::Uuid::new_v4().simple());
    let sep = if url.contains('?') { '&' } else { '?' };
    let store =
        PgStore::builder(format!("{url}{sep}sslmode=disable")).schema(&schema).open().await.expect("open");
    let (holder, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(conn);
    let snapshot = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(10)).await;
        holder
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM pg_class")
            .await
            .unwrap();
        println!("(snapshot held from t=10s)");
        tokio::time::sleep(Duration::from_secs(25)).await;
        holder.batch_execute("COMMIT").await.unwrap();
        println!("(snapshot released at t=35s)");
        holder
    });
    let names: Vec<StreamName> =
        (0..streams).map(|i| StreamName::new(format!("snap-{i}")).unwrap()).collect();
    let start = Instant::now();
    let (mut window, mut n, mut i) = (Instant::now(), 0u64, 0usize);
    while start.elapsed() < Duration::from_secs(secs) {
        if checkpoints > 0 {
            let name = format!("proj-{}", i % checkpoints);
            if i % 5 == 0 {
                let tx = store.begin_checkpoint_tx(&name).await.unwrap();
                tx.commit(i as u64).await.unwrap();
            } else {
                store.save_checkpoint(&name, i as u64).await.unwrap();
            }
        } else {
            let event = EventData::raw("E", b"{\"n\":1}".to_vec(), ContentType::Json);
            store.append(&names[i % streams], ExpectedVersion::Any, vec![event]).await.unwrap();
        }
        i += 1;
        n += 1;
        if window.elapsed() >= Duration::from_secs(5) {
            println!(
                "t={:>3}s {:>7.0} {}/s",
                start.elapsed().as_secs(),
                n as f64 / window.elapsed().as_secs_f64(),
                if checkpoints > 0 { "saves" } else { "appends" }
            );
            (n, window) = (0, Instant::now());
        }
    }
    let admin = snapshot.await.unwrap();
    let sizes = admin
        .query_one(
            &format!(
                "SELECT pg_relation_size('\"{schema}\".head_row'), pg_relation_size(coalesce(to_regclass('\"{schema}\".stream_rows'), '\"{schema}\".streams'))"
            ),
            &[],
        )
        .await
        .unwrap();
    println!("head table {} bytes, streams table {} bytes", sizes.get::<_, i64>(0), sizes.get::<_, i64>(1));
    drop(store);
    tokio::time::sleep(Duration::from_millis(100)).await;
    admin.batch_execute(&format!("DROP SCHEMA \"{schema}\" CASCADE")).await.unwrap();
}
