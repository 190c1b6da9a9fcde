//! Test support: the database URL, skip-or-fail when it is unreachable, and
//! a fresh schema per test that is dropped afterwards.

#![allow(dead_code)]

use std::time::Duration;

use annals_conformance::Fixture;
use annals_postgres::PgStore;

pub mod proxy;

/// Where the tests' PostgreSQL is (CI sets `ANNALS_POSTGRES_URL`).
pub fn url() -> String {
    std::env::var("ANNALS_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Whether a missing database must fail the test rather than skip it.
pub fn required() -> bool {
    std::env::var("ANNALS_REQUIRE_SERVICES").is_ok_and(|v| v == "1")
}

/// A fresh, unique schema name.
pub fn fresh_schema() -> String {
    format!("annals_t_{}", uuid::Uuid::new_v4().simple())
}

/// Drops its schema when dropped (best effort: a leftover schema has a
/// unique name and harms nothing).
#[derive(Debug)]
pub struct SchemaGuard {
    pub schema: String,
}

/// Runs `work` on an admin connection, on a thread and runtime of its
/// own, and waits for it: usable from `Drop`, inside a runtime or not.
/// Best effort: nothing runs if the database cannot be reached.
pub fn blocking_admin<F: Future<Output = ()>>(
    work: impl FnOnce(tokio_postgres::Client) -> F + Send + 'static,
) {
    let _ = std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
        rt.block_on(async move {
            let Ok((client, conn)) = tokio_postgres::connect(&url(), tokio_postgres::NoTls).await else {
                return;
            };
            let driver = tokio::spawn(conn);
            work(client).await;
            let _ = driver.await;
        });
    })
    .join();
}

impl Drop for SchemaGuard {
    fn drop(&mut self) {
        let schema = self.schema.clone();
        blocking_admin(move |client| async move {
            // The store's own sessions first (their application_name
            // names the schema): this drop runs on a thread the test's
            // runtime waits for, so a task of the store still on that
            // runtime (a subscription tail's read, mid-transaction) cannot
            // finish and would hold its locks past the lock timeout.
            let terminate = format!(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid()
                       AND application_name IN ('annals {schema}', 'annals-listen {schema}', 'annals-lease {schema}')"
                );
            let _ = tokio::time::timeout(Duration::from_secs(10), client.batch_execute(&terminate)).await;
            // Bounded: a lock held by a leaked connection must not hang
            // the test run; a leftover schema is harmless.
            let sql = format!("SET lock_timeout = '10s'; DROP SCHEMA IF EXISTS \"{schema}\" CASCADE");
            let _ = tokio::time::timeout(Duration::from_secs(30), client.batch_execute(&sql)).await;
        });
    }
}

/// The tests' URL with `options` (percent-encoded) added, e.g.
/// `-c%20default_transaction_isolation%3Dserializable`.
pub fn url_with_options(encoded: &str) -> String {
    let base = url();
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}options={encoded}")
}

/// Opens a store in a fresh schema with a small pool. `None` (after a skip
/// notice) when the database is unreachable and not required; panics with a
/// clear message when it is required.
pub async fn open() -> Option<(PgStore, SchemaGuard)> {
    open_with(|b| b).await
}

/// Like [`open`], with extra builder options.
pub async fn open_with(
    configure: impl FnOnce(annals_postgres::PgStoreBuilder) -> annals_postgres::PgStoreBuilder,
) -> Option<(PgStore, SchemaGuard)> {
    open_url_with(url(), configure).await
}

/// The tests' URL on plain TCP (`sslmode=disable`): for tests about
/// connections coming and going, where a TLS handshake in a debug build
/// costs more than the rest.
pub fn plain_url() -> String {
    let base = url();
    let sep = if base.contains('?') { '&' } else { '?' };
    format!("{base}{sep}sslmode=disable")
}

/// Like [`open_with`], connecting to `url`.
pub async fn open_url_with(
    at: String,
    configure: impl FnOnce(annals_postgres::PgStoreBuilder) -> annals_postgres::PgStoreBuilder,
) -> Option<(PgStore, SchemaGuard)> {
    let schema = fresh_schema();
    let guard = SchemaGuard { schema: schema.clone() };
    let builder = PgStore::builder(at).schema(&schema).max_connections(4);
    match configure(builder).open().await {
        Ok(store) => Some((store, guard)),
        Err(e @ annals_postgres::PgError::Unreachable { .. }) => {
            std::mem::forget(guard);
            if required() {
                panic!(
                    "PostgreSQL at {} is required (ANNALS_REQUIRE_SERVICES=1) but unreachable: {e}",
                    url()
                );
            }
            eprintln!(
                "SKIPPED: PostgreSQL at {} is unreachable ({e}); set ANNALS_REQUIRE_SERVICES=1 to fail instead",
                url()
            );
            None
        }
        Err(e) => panic!("opening a PgStore failed: {e}"),
    }
}

/// A conformance fixture, or `None` to skip.
pub async fn fixture() -> Option<Fixture<PgStore>> {
    let (store, guard) = open().await?;
    Some(Fixture::with_guard(store, guard))
}

/// Opens a second store on an existing schema (another "process").
pub async fn reopen(schema: &str) -> PgStore {
    PgStore::builder(url()).schema(schema).max_connections(4).open().await.expect("reopen")
}

/// Opens a store on `schema`, returning the error.
pub async fn try_reopen(schema: &str) -> Result<PgStore, annals_postgres::PgError> {
    PgStore::builder(url()).schema(schema).max_connections(4).open().await
}
