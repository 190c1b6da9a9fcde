//! Leases on PostgreSQL: one holder per name across store instances
//! (processes), released on drop, lost when the holder's session ends, and
//! the holder's description visible to every instance while (and only
//! while) it holds the lease.

mod common;

use std::time::{Duration, Instant};

use annals_core::{Error, Leases};

const PATIENCE: Duration = Duration::from_secs(20);

async fn admin_client() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&common::url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// Retries `try_lease` until it succeeds (a released session lock is freed
/// when the server has ended that backend, a moment after the client went).
async fn lease_eventually(store: &impl Leases, name: &str) -> annals_core::Lease {
    let start = Instant::now();
    loop {
        if let Some(lease) = store.try_lease(name).await.unwrap() {
            return lease;
        }
        assert!(start.elapsed() < PATIENCE, "lease '{name}' was never released");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_holder_per_name_across_instances_until_dropped() {
    let Some((a, guard)) = common::open().await else { return };
    let b = common::reopen(&guard.schema).await;

    let held = a.try_lease("consumer-groups").await.unwrap().expect("free at first");
    assert_eq!(held.name(), "consumer-groups");
    assert!(!held.is_lost());
    assert!(b.try_lease("consumer-groups").await.unwrap().is_none(), "another instance");
    assert!(a.try_lease("consumer-groups").await.unwrap().is_none(), "the same instance, again");
    // Other names, and the same name in another schema, are independent.
    let other = b.try_lease("projections").await.unwrap().expect("another name is free");
    let Some((elsewhere, _guard2)) = common::open().await else { return };
    let there = elsewhere.try_lease("consumer-groups").await.unwrap().expect("another schema is free");

    drop(held);
    let taken_over = lease_eventually(&b, "consumer-groups").await;
    assert!(!taken_over.is_lost());
    assert!(a.try_lease("consumer-groups").await.unwrap().is_none());
    drop((other, there));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminated_session_loses_the_lease_and_frees_it() {
    let Some((a, guard)) = common::open().await else { return };
    let b = common::reopen(&guard.schema).await;
    let held = a.try_lease_as("consumer-groups", "http://a:7070").await.unwrap().expect("free at first");
    let lost = tokio::spawn(held.lost());
    assert_eq!(b.holder("consumer-groups").await.unwrap().as_deref(), Some("http://a:7070"));

    let admin = admin_client().await;
    let terminated = admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&format!("annals-lease {}", guard.schema)],
        )
        .await
        .unwrap()
        .len();
    assert_eq!(terminated, 1, "exactly one lease connection");

    tokio::time::timeout(PATIENCE, lost).await.expect("the holder learns it lost the lease").unwrap();
    assert!(held.is_lost());
    // Its row is still there, but its backend holds no lock any more.
    let start = Instant::now();
    while b.holder("consumer-groups").await.unwrap().is_some() {
        assert!(start.elapsed() < PATIENCE, "a dead holder is still reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Freed on the server: the other instance takes it while the first
    // still has its (lost) lease object.
    let next = lease_eventually(&b, "consumer-groups").await;
    assert!(!next.is_lost());
    assert_eq!(a.holder("consumer-groups").await.unwrap().as_deref(), Some(""), "the new holder's");
    drop(held);
}

#[tokio::test]
async fn bad_names_are_refused() {
    let Some((a, _guard)) = common::open().await else { return };
    assert!(matches!(a.try_lease("").await, Err(Error::InvalidInput { .. })));
    assert!(matches!(a.try_lease(&"x".repeat(201)).await, Err(Error::InvalidInput { .. })));
}

/// A server that takes the lease connection but never answers its
/// start-up (stopped, or behind a wedged proxy) fails `try_lease` within
/// the connect timeout with a typed error instead of keeping it waiting;
/// once the server answers again, the lease is taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_connection_that_gets_no_answer_fails_in_time() {
    let Some((_writer, guard)) = common::open().await else { return };
    let proxy = common::proxy::Proxy::start().await;
    let store = annals_postgres::PgStore::builder(&proxy.url)
        .schema(&guard.schema)
        .connect_timeout(Duration::from_millis(500))
        .answer_timeout(Duration::from_secs(2))
        .open()
        .await
        .unwrap();
    proxy.blackhole(b"annals-lease");
    let start = Instant::now();
    let tried = tokio::time::timeout(PATIENCE, store.try_lease("groups")).await.expect("try_lease hung");
    let err = tried.expect_err("nothing answered, so no lease");
    assert!(start.elapsed() < Duration::from_secs(5), "gave up only after {:?}", start.elapsed());
    assert!(err.is_transient(), "{err:?}");
    assert!(err.to_string().contains("no answer from the server within 500ms"), "{err}");
    proxy.restore();
    let lease = store.try_lease("groups").await.unwrap().expect("free");
    assert!(!lease.is_lost());
}
