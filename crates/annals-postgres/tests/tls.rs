//! TLS to PostgreSQL with libpq's `sslmode` meanings, against the real
//! server. The machine's PostgreSQL serves TLS with a self-signed
//! certificate for `localhost` (`SHOW ssl_cert_file`); on a server without
//! TLS the test checks that `require` refuses to connect instead.

mod common;

use annals_core::{Appender, EventData, ExpectedVersion, Leases, StreamName, StreamReader};
use annals_postgres::{PgError, PgStore};

async fn admin() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&common::url(), tokio_postgres::NoTls).await.expect("admin");
    tokio::spawn(conn);
    client
}

/// `url` with `params` added to its query.
fn with(url: &str, params: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{params}")
}

async fn open(url: &str) -> Result<(PgStore, common::SchemaGuard), PgError> {
    let schema = common::fresh_schema();
    let guard = common::SchemaGuard { schema: schema.clone() };
    let store = PgStore::builder(url).schema(&schema).max_connections(2).open().await?;
    Ok((store, guard))
}

/// Whether each of the schema's connections (pool, listener, lease) is
/// encrypted, by application name.
async fn encrypted(schema: &str) -> Vec<(String, bool)> {
    let rows = admin()
        .await
        .query(
            "SELECT a.application_name, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.application_name LIKE '% ' || $1 ORDER BY 1",
            &[&schema],
        )
        .await
        .expect("pg_stat_ssl");
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

/// Appends and reads one event, and takes a lease (its own connection).
async fn exercise(store: &PgStore) -> annals_core::Lease {
    let s = StreamName::new("tls-1").unwrap();
    store
        .append(&s, ExpectedVersion::NoStream, vec![EventData::json("E", &serde_json::json!({})).unwrap()])
        .await
        .unwrap();
    assert_eq!(store.read_stream(&s, annals_core::ReadStream::forward()).await.unwrap().len(), 1);
    store.try_lease("tls").await.unwrap().expect("free")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmodes_encrypt_and_verify_as_libpq_does() {
    // Reachability first, the way every PostgreSQL test decides skip/fail.
    let Some((_plain_probe, _g)) = common::open().await else { return };
    let ssl_on: String = admin().await.query_one("SHOW ssl", &[]).await.unwrap().get(0);
    let url = common::url();

    if ssl_on != "on" {
        let err = open(&with(&url, "sslmode=require")).await.unwrap_err();
        assert!(matches!(err, PgError::Unreachable { .. }), "{err:?}");
        eprintln!("NOTE: this PostgreSQL serves no TLS; only the refusal was checked");
        return;
    }

    // require: every connection of the store is encrypted.
    let (store, guard) = open(&with(&url, "sslmode=require")).await.unwrap();
    let lease = exercise(&store).await;
    let seen = encrypted(&guard.schema).await;
    let kinds: Vec<&str> = seen.iter().map(|(app, _)| app.split(' ').next().unwrap_or("")).collect();
    for kind in ["annals", "annals-lease", "annals-listen"] {
        assert!(kinds.contains(&kind), "no {kind} connection among {seen:?}");
    }
    assert!(seen.iter().all(|(_, ssl)| *ssl), "{seen:?}");
    drop((lease, store));

    // prefer (the default) encrypts when the server offers it.
    let (store, guard) = open(&url).await.unwrap();
    drop(exercise(&store).await);
    assert!(encrypted(&guard.schema).await.iter().all(|(_, ssl)| *ssl));
    drop(store);

    // disable: none is.
    let (store, guard) = open(&with(&url, "sslmode=disable")).await.unwrap();
    drop(exercise(&store).await);
    let seen = encrypted(&guard.schema).await;
    assert!(!seen.is_empty() && seen.iter().all(|(_, ssl)| !*ssl), "{seen:?}");
    drop(store);

    // Certificate checks, with the server's own (self-signed) certificate
    // as the root. It names `localhost`, so connecting to 127.0.0.1 passes
    // verify-ca (chain only) and fails verify-full (name).
    let cert: String = admin().await.query_one("SHOW ssl_cert_file", &[]).await.unwrap().get(0);
    if std::fs::read(&cert).is_err() {
        eprintln!("NOTE: the server certificate {cert} is not readable here; certificate checks not run");
        return;
    }
    if !url.contains("127.0.0.1") {
        eprintln!("NOTE: the test URL does not name 127.0.0.1; certificate checks not run");
        return;
    }
    let root = format!("sslrootcert={cert}");
    let by_ip = url.clone();
    let by_name = url.replacen("127.0.0.1", "localhost", 1);

    let (store, guard) = open(&with(&by_ip, &format!("sslmode=verify-ca&{root}"))).await.unwrap();
    drop(exercise(&store).await);
    assert!(encrypted(&guard.schema).await.iter().all(|(_, ssl)| *ssl));
    drop(store);

    let (store, _guard) = open(&with(&by_name, &format!("sslmode=verify-full&{root}"))).await.unwrap();
    drop(exercise(&store).await);
    drop(store);

    let err = open(&with(&by_ip, &format!("sslmode=verify-full&{root}"))).await.unwrap_err();
    assert!(matches!(err, PgError::Unreachable { .. }), "{err:?}");
    assert!(err.to_string().contains("certificate"), "names the certificate problem: {err}");

    // A root that did not sign the server's certificate.
    let other_roots = "/etc/ssl/certs/ca-certificates.crt";
    if std::fs::metadata(other_roots).is_ok() {
        let err = open(&with(&by_name, &format!("sslmode=verify-full&sslrootcert={other_roots}")))
            .await
            .unwrap_err();
        assert!(matches!(err, PgError::Unreachable { .. }), "{err:?}");
        assert!(err.to_string().contains("certificate"), "{err}");
    }
}

#[tokio::test]
async fn unusable_tls_settings_are_typed_errors_before_connecting() {
    let url = common::url();
    for params in [
        "sslmode=sometimes",
        "sslmode=verify-full",
        "sslmode=verify-ca&sslrootcert=/nonexistent/root.pem",
        "sslcert=/etc/client.pem",
    ] {
        let err = PgStore::builder(with(&url, params)).open().await.unwrap_err();
        assert!(matches!(err, PgError::InvalidTls { .. }), "{params}: {err:?}");
        assert!(matches!(annals_core::Error::from(err), annals_core::Error::InvalidInput { .. }), "{params}");
    }
}
