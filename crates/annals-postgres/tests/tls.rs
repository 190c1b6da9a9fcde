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
        "sslcert=/nonexistent/client.pem&sslkey=/nonexistent/client.key",
        "sslcert=/etc/client.pem&sslkey=/etc/client.key&sslpassword=secret",
    ] {
        let err = PgStore::builder(with(&url, params)).open().await.unwrap_err();
        assert!(matches!(err, PgError::InvalidTls { .. }), "{params}: {err:?}");
        assert!(matches!(annals_core::Error::from(err), annals_core::Error::InvalidInput { .. }), "{params}");
    }
}

/// A throwaway PostgreSQL cluster (the machine's binaries, a temporary
/// directory, a free port) that authenticates role `annals_cert` by client
/// certificate only (`hostssl … cert`), with a CA made for the test. The
/// shared server is never reconfigured. Stopped and removed on drop.
struct CertCluster {
    dir: std::path::PathBuf,
    port: u16,
    as_postgres: bool,
}

/// Runs `program args` (as the `postgres` user when `as_postgres`),
/// panicking with its output when it fails.
fn run(as_postgres: bool, program: &str, args: &[&str]) {
    let mut command = if as_postgres {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--", program]);
        c
    } else {
        std::process::Command::new(program)
    };
    let out = command.args(args).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl CertCluster {
    /// `None` (after a notice) when the tools are missing and the test
    /// is not required to run.
    fn start() -> Option<Self> {
        let have = |tool: &str, arg: &str| {
            std::process::Command::new(tool).arg(arg).output().is_ok_and(|o| o.status.success())
        };
        if !(have("initdb", "--version") && have("pg_ctl", "--version") && have("openssl", "version")) {
            assert!(!common::required(), "initdb, pg_ctl and openssl are needed (ANNALS_REQUIRE_SERVICES=1)");
            eprintln!("SKIPPED: initdb, pg_ctl or openssl missing");
            return None;
        }
        // initdb refuses to run as root: then the cluster belongs to postgres.
        let uid = std::process::Command::new("id").arg("-u").output().unwrap();
        let as_postgres = String::from_utf8_lossy(&uid.stdout).trim() == "0";
        let dir = std::env::temp_dir().join(format!("annals-cert-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cluster = CertCluster { dir: dir.clone(), port, as_postgres };
        let path = |name: &str| dir.join(name).to_str().unwrap().to_owned();
        let ssl = |args: &[&str]| run(false, "openssl", args);
        std::fs::write(dir.join("server.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n").unwrap();
        std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
        for (ca, subject) in [("ca", "/CN=annals test CA"), ("rogue", "/CN=annals rogue CA")] {
            ssl(&[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                subject,
                "-keyout",
                &path(&format!("{ca}.key")),
                "-out",
                &path(&format!("{ca}.pem")),
            ]);
        }
        for (leaf, subject, ca, ext) in [
            ("server", "/CN=localhost", "ca", "server.ext"),
            ("client", "/CN=annals_cert", "ca", "client.ext"),
            ("rogue-client", "/CN=annals_cert", "rogue", "client.ext"),
        ] {
            ssl(&[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                subject,
                "-keyout",
                &path(&format!("{leaf}.key")),
                "-out",
                &path(&format!("{leaf}.csr")),
            ]);
            ssl(&[
                "x509",
                "-req",
                "-days",
                "2",
                "-in",
                &path(&format!("{leaf}.csr")),
                "-CA",
                &path(&format!("{ca}.pem")),
                "-CAkey",
                &path(&format!("{ca}.key")),
                "-CAcreateserial",
                "-extfile",
                &path(ext),
                "-out",
                &path(&format!("{leaf}.pem")),
            ]);
        }
        if as_postgres {
            run(false, "chown", &["-R", "postgres", dir.to_str().unwrap()]);
        }
        run(false, "chmod", &["600", &path("server.key")]);
        run(as_postgres, "initdb", &["-D", &path("data"), "-U", "postgres", "-A", "trust"]);
        let conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{d}'\nfsync = off\n\
             ssl = on\nssl_cert_file = '{d}/server.pem'\nssl_key_file = '{d}/server.key'\nssl_ca_file = '{d}/ca.pem'\n",
            d = dir.display()
        );
        let hba = "local all all trust\nhostssl all annals_cert 127.0.0.1/32 cert\nhost all postgres 127.0.0.1/32 trust\n";
        let append = |file: &str, text: &str| {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new().append(true).open(dir.join("data").join(file)).unwrap();
            f.write_all(text.as_bytes()).unwrap();
        };
        append("postgresql.conf", &conf);
        std::fs::write(dir.join("data").join("pg_hba.conf"), hba).unwrap();
        run(as_postgres, "pg_ctl", &["-D", &path("data"), "-l", &path("log"), "-w", "-t", "60", "start"]);
        Some(cluster)
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_owned()
    }
}

impl Drop for CertCluster {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        let _ = std::panic::catch_unwind(|| {
            run(self.as_postgres, "pg_ctl", &["-D", data.to_str().unwrap(), "-m", "immediate", "stop"])
        });
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `sslcert`/`sslkey` give a client certificate: a server that accepts
/// only certificates for the role lets the store in with one signed by its
/// CA (and sees its subject), and refuses it without one or with one
/// signed by another CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_authenticate_where_the_server_demands_them() {
    let Some(cluster) = tokio::task::spawn_blocking(CertCluster::start).await.unwrap() else { return };
    let (admin, conn) = tokio_postgres::connect(
        &format!("postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable", cluster.port),
        tokio_postgres::NoTls,
    )
    .await
    .expect("the test cluster");
    tokio::spawn(conn);
    admin
        .batch_execute("CREATE ROLE annals_cert LOGIN; GRANT CREATE ON DATABASE postgres TO annals_cert")
        .await
        .unwrap();

    let base = format!(
        "postgres://annals_cert@localhost:{}/postgres?sslmode=verify-full&sslrootcert={}",
        cluster.port,
        cluster.file("ca.pem")
    );
    let url = format!("{base}&sslcert={}&sslkey={}", cluster.file("client.pem"), cluster.file("client.key"));
    let store = PgStore::builder(&url).schema("annals_cert_test").max_connections(2).open().await.unwrap();
    let _lease = exercise(&store).await;
    let dn: Option<String> = store
        .pool()
        .get()
        .await
        .unwrap()
        .query_one("SELECT client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(dn.as_deref(), Some("/CN=annals_cert"));
    drop(store);

    // No certificate: the server's FATAL says so. One from another CA: the
    // handshake's alert, with a hint at sslcert/sslkey.
    let rogue = format!(
        "{base}&sslcert={}&sslkey={}",
        cluster.file("rogue-client.pem"),
        cluster.file("rogue-client.key")
    );
    for (refused, says) in
        [(base.clone(), "requires a valid client certificate"), (rogue, "check sslcert and sslkey")]
    {
        let err = PgStore::builder(&refused).schema("annals_cert_test").open().await.unwrap_err();
        assert!(matches!(err, PgError::Unreachable { .. }), "{err:?}");
        assert!(err.to_string().contains(says), "names the certificate problem: {err}");
    }
}
