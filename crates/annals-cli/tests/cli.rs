//! Runs the built `annals` binary against servers started in the test.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Command, Output, Stdio},
    sync::Arc,
    time::Duration,
};

use annals_server::{AppState, Role, ServerConfig, config::ApiKeyConfig};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_annals");

/// Starts a server over a MemoryStore on its own runtime thread; returns
/// its URL. The thread lives until the test process exits.
fn server_with(config: ServerConfig) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(format!("http://{}", listener.local_addr().unwrap())).unwrap();
            let store: Arc<dyn annals_core::Store> = Arc::new(annals_core::MemoryStore::new());
            let state = AppState::with_backend(store, config, "memory").unwrap();
            annals_server::run(listener, state, std::future::pending()).await.unwrap();
        });
    });
    rx.recv_timeout(Duration::from_secs(30)).unwrap()
}

fn server() -> String {
    let mut c = ServerConfig::default();
    c.auth.anonymous = Some(Role::Admin);
    server_with(c)
}

fn annals(url: &str, args: &[&str]) -> Output {
    annals_stdin(url, args, None)
}

fn annals_stdin(url: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env("ANNALS_URL", url)
        .env_remove("ANNALS_TOKEN")
        .env_remove("ANNALS_API_KEY")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    } else {
        drop(child.stdin.take());
    }
    child.wait_with_output().unwrap()
}

fn stdout_json(out: &Output) -> Value {
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn help_and_version() {
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["serve", "append", "read", "tail", "streams", "stats", "export", "import", "bench"] {
        assert!(text.contains(cmd), "--help lacks {cmd}");
    }
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("annals {}", env!("CARGO_PKG_VERSION")));
    let out = Command::new(BIN).arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn append_read_and_exit_codes() {
    let url = server();
    let out = annals(
        &url,
        &[
            "append",
            "account-1",
            "--expected",
            "no_stream",
            r#"[{"type":"Opened","data":{"owner":"Ada"}}]"#,
            "--json",
        ],
    );
    let v = stdout_json(&out);
    assert_eq!(v["last_version"], 0);
    // From stdin, one object.
    let out = annals_stdin(
        &url,
        &["append", "account-1", "-e", "0"],
        Some(r#"{"type":"Deposited","data":{"amount":5}}"#),
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("last version 1"));
    let out = annals(&url, &["append", "account-1", "--type", "Closed", "--data", "{}"]);
    assert!(out.status.success());

    let v = stdout_json(&annals(&url, &["read", "account-1", "--json"]));
    let types: Vec<&str> =
        v["events"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, vec!["Opened", "Deposited", "Closed"]);
    let out = annals(&url, &["read", "account-1"]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("Deposited") && table.contains("3 event(s)"), "{table}");
    let v = stdout_json(&annals(&url, &["read", "$all", "--backward", "-n", "1", "--json"]));
    assert_eq!(v["events"][0]["type"], "Closed");

    // Conflict → 3, not found → 4, bad input → 2, unreachable → 6.
    let out = annals(&url, &["append", "account-1", "-e", "no_stream", "--type", "X"]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong_expected_version"));
    assert_eq!(annals(&url, &["read", "nothing-here"]).status.code(), Some(4));
    assert_eq!(annals(&url, &["append", "a-1", "not json"]).status.code(), Some(2));
    assert_eq!(annals("http://127.0.0.1:1", &["stats"]).status.code(), Some(6));
}

#[test]
fn streams_stats_and_auth_failures() {
    let url = server();
    assert!(annals(&url, &["append", "s-1", "--type", "A"]).status.success());
    assert!(annals(&url, &["append", "s-2", "--type", "B"]).status.success());
    let v = stdout_json(&annals(&url, &["streams", "--json"]));
    assert_eq!(v["streams"].as_array().unwrap().len(), 2);
    // Paging by name.
    let v = stdout_json(&annals(&url, &["streams", "--json", "--limit", "1"]));
    assert_eq!((v["streams"][0]["stream"].as_str(), v["next"].as_str()), (Some("s-1"), Some("s-1")));
    let v = stdout_json(&annals(&url, &["streams", "--json", "--after", "s-1"]));
    assert_eq!(v["streams"][0]["stream"], "s-2");
    assert_eq!(v["streams"].as_array().unwrap().len(), 1);
    let out = annals(&url, &["streams"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("s-2"));
    let v = stdout_json(&annals(&url, &["stats", "--json"]));
    assert_eq!(v["events"], 2);
    assert_eq!(v["disk_bytes"], serde_json::Value::Null);
    let out = annals(&url, &["stats"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("disk") && text.contains("unknown"), "{text}");

    let mut c = ServerConfig::default();
    c.auth.api_keys = vec![ApiKeyConfig {
        name: "r".into(),
        key: "reader-key-0123456789".into(),
        role: Role::Reader,
        streams: None,
    }];
    let secured = server_with(c);
    assert_eq!(annals(&secured, &["stats"]).status.code(), Some(5));
    assert!(annals(&secured, &["stats", "--api-key", "reader-key-0123456789"]).status.success());
    let out = annals(&secured, &["append", "x-1", "--type", "A", "--api-key", "reader-key-0123456789"]);
    assert_eq!(out.status.code(), Some(5));
}

/// Exit codes follow the error, wherever the server reports it: a bad
/// argument the server refuses is 2, a live feed of a tombstoned stream 4,
/// and an export through a key restricted to a prefix works.
#[test]
fn exit_codes_of_server_side_errors() {
    let url = server();
    assert!(annals(&url, &["append", "gone-1", "--type", "A"]).status.success());
    let out = annals(&url, &["read", "gone-1", "--from", "soon"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let status = rt.block_on(async {
        reqwest::Client::new()
            .delete(format!("{url}/streams/gone-1?hard=true"))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert_eq!(status.as_u16(), 204);
    assert_eq!(annals(&url, &["read", "gone-1"]).status.code(), Some(4));
    let out = annals(&url, &["tail", "gone-1", "--from", "start"]);
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));

    let mut c = ServerConfig::default();
    c.auth.api_keys = vec![ApiKeyConfig {
        name: "team".into(),
        key: "team-key-0123456789ab".into(),
        role: Role::Reader,
        streams: Some(vec!["team-".into()]),
    }];
    let secured = server_with(c);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("team.jsonl");
    let out = annals(
        &secured,
        &[
            "export",
            "-o",
            file.to_str().unwrap(),
            "--stream-prefix",
            "team-",
            "--api-key",
            "team-key-0123456789ab",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(stdout_json(&out)["exported"], 0);
}

#[test]
fn export_and_import_resume() {
    let source = server();
    for i in 0..5 {
        let stream = format!("item-{}", i % 2);
        assert!(
            annals(&source, &["append", &stream, "--type", "Made", "--data", &format!(r#"{{"i":{i}}}"#)])
                .status
                .success()
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    let file_s = file.to_str().unwrap();
    let out = annals(&source, &["export", "-o", file_s, "--json"]);
    assert_eq!(stdout_json(&out)["exported"], 5);
    assert_eq!(std::fs::read_to_string(&file).unwrap().lines().count(), 5);

    // More events, then a resumed export appends only those.
    assert!(annals(&source, &["append", "item-0", "--type", "Made"]).status.success());
    let out = annals(&source, &["export", "-o", file_s, "--resume", "--json"]);
    assert_eq!(stdout_json(&out)["exported"], 1);
    let lines: Vec<Value> =
        std::fs::read_to_string(&file).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let positions: Vec<u64> = lines.iter().map(|e| e["position"].as_u64().unwrap()).collect();
    assert_eq!(positions, vec![0, 1, 2, 3, 4, 5]);

    let target = server();
    // An interrupted import: only the first three lines made it.
    let partial = dir.path().join("partial.jsonl");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&partial, text.lines().take(3).map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let v = stdout_json(&annals(&target, &["import", partial.to_str().unwrap(), "--json"]));
    assert_eq!(v["written"], 3);
    // Re-running the whole import skips what is there and writes the rest.
    let v = stdout_json(&annals(&target, &["import", file_s, "--json", "--batch", "2"]));
    assert_eq!(v["written"].as_u64().unwrap() + v["skipped"].as_u64().unwrap(), 6);
    assert_eq!(v["skipped"], 3);
    let v = stdout_json(&annals(&target, &["import", file_s, "--json"]));
    assert_eq!(v, serde_json::json!({ "written": 0, "skipped": 6 }));
    // Same ids, same per-stream order.
    let src = stdout_json(&annals(&source, &["read", "item-0", "--json"]));
    let dst = stdout_json(&annals(&target, &["read", "item-0", "--json"]));
    let ids = |v: &Value| v["events"].as_array().unwrap().iter().map(|e| e["id"].clone()).collect::<Vec<_>>();
    assert_eq!(ids(&src), ids(&dst));
}

#[test]
fn tail_follows_live_events() {
    let url = server();
    assert!(annals(&url, &["append", "t-1", "--type", "First"]).status.success());
    let child = Command::new(BIN)
        .args(["tail", "t-1", "--from", "start", "--count", "3", "--json"])
        .env("ANNALS_URL", &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(annals(&url, &["append", "t-1", "--type", "Second"]).status.success());
    assert!(annals(&url, &["append", "t-1", "--type", "Third"]).status.success());
    let out = wait_with_timeout(child, Duration::from_secs(30));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let types: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["type"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(types, vec!["First", "Second", "Third"]);
}

fn wait_with_timeout(mut child: std::process::Child, limit: Duration) -> Output {
    let start = std::time::Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("child did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn bench_runs_append_and_fanout_modes() {
    let url = server();
    let v = stdout_json(&annals(
        &url,
        &["bench", "--duration", "1", "--concurrency", "2", "--batch", "3", "--json"],
    ));
    assert!(v["requests"].as_u64().unwrap() > 0);
    assert_eq!(v["events"].as_u64().unwrap(), v["requests"].as_u64().unwrap() * 3);
    assert!(v["append_latency"]["p99_ms"].as_f64().is_some());
    let v = stdout_json(&annals(
        &url,
        &[
            "bench",
            "--mode",
            "fanout",
            "--subscribers",
            "3",
            "--concurrency",
            "1",
            "--duration",
            "1",
            "--json",
        ],
    ));
    assert!(v["delivered"].as_u64().unwrap() > 0);
    assert!(v["delivery_latency"]["p99_ms"].as_f64().is_some());
    let out = annals(&url, &["bench", "--duration", "0.3", "--concurrency", "1"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("events_per_sec"));
}

#[test]
fn serve_starts_and_validates_configuration() {
    // A public address without auth refuses to start.
    let out = Command::new(BIN).args(["serve", "--memory", "--listen", "0.0.0.0:0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--insecure"));
    // Config file errors name the key.
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("annals.toml");
    std::fs::write(&cfg, "[limits]\nmax_body_bytes = \"lots\"\n").unwrap();
    let out =
        Command::new(BIN).args(["serve", "--memory", "--config", cfg.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("max_body_bytes"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&cfg, "[rate_limit]\nrequests_per_second = 50\nburst = 10\n[live]\nbuffer_events = 0\n")
        .unwrap();
    let out =
        Command::new(BIN).args(["serve", "--memory", "--config", cfg.to_str().unwrap()]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("live.buffer_events"));
    // File + env + flags layer, flags last.
    std::fs::write(&cfg, "listen = \"127.0.0.1:9999\"\n[rate_limit]\nrequests_per_second = 50\n").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--memory", "--config", cfg.to_str().unwrap(), "--rate-burst", "7", "--check-config"])
        .env("ANNALS_RATE_LIMIT__REQUESTS_PER_SECOND", "60")
        .env("ANNALS_ADVERTISE_URL", "http://annals-2.internal:2113")
        .env("ANNALS_STORE__POSTGRES_MAX_CONNECTIONS", "40")
        .env("ANNALS_URL", "http://ignored")
        .output()
        .unwrap();
    let v = stdout_json(&out);
    assert_eq!(v["listen"], "127.0.0.1:9999");
    assert_eq!(v["rate_limit"]["requests_per_second"], 60.0);
    assert_eq!(v["rate_limit"]["burst"], 7);
    assert_eq!(v["advertise_url"], "http://annals-2.internal:2113");
    assert_eq!(v["store"]["postgres_max_connections"], 40);
    assert_eq!(v["auth"]["anonymous"], "admin", "loopback without credentials defaults to anonymous admin");

    // A real in-memory server on a free port.
    let mut child = Command::new(BIN)
        .args(["serve", "--memory", "--listen", "127.0.0.1:0", "--log-format", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    reader.read_line(&mut line).unwrap();
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap().to_owned();
    let ok = annals(&url, &["append", "srv-1", "--type", "Hello"]).status.success();
    let stats = annals(&url, &["stats", "--json"]);
    // SIGTERM shuts down gracefully with exit code 0.
    let term = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    let exited = wait_with_timeout(child, Duration::from_secs(30));
    assert!(ok);
    assert_eq!(stdout_json(&stats)["events"], 1);
    if term.is_ok_and(|s| s.success()) {
        assert!(exited.status.success(), "graceful shutdown exits 0: {:?}", exited.status);
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut reader, &mut rest).unwrap();
        assert!(rest.contains("annals stopped"), "{rest}");
    }
}

#[test]
fn talks_https_with_a_trusted_ca() {
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../annals-server/tests/fixtures");
    let mut c = ServerConfig::default();
    c.auth.anonymous = Some(Role::Admin);
    c.tls = Some(annals_server::config::TlsConfig {
        cert: format!("{fixtures}/tls_test_cert.pem").into(),
        key: format!("{fixtures}/tls_test_key.pem").into(),
    });
    let url = server_with(c).replace("http://", "https://");
    let ca = format!("{fixtures}/tls_test_ca.pem");
    let out = annals(&url, &["append", "tls-1", "--type", "Secure", "--ca-cert", &ca, "--json"]);
    assert_eq!(stdout_json(&out)["position"], 0);
    // Without trusting the CA the connection fails (unreachable → 6).
    assert_eq!(annals(&url, &["stats"]).status.code(), Some(6));
}

/// Starts `annals serve` on the embedded log in `data`; returns the child,
/// its stdout reader and its URL.
fn serve_log(data: &std::path::Path) -> (std::process::Child, BufReader<std::process::ChildStdout>, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--data", data.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("backend: log"), "{line}");
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap().to_owned();
    (child, reader, url)
}

fn http_get(url: &str) -> String {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async { reqwest::get(url).await.unwrap().text().await.unwrap() })
}

fn stop(child: std::process::Child) {
    let term = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(term.success());
    let exited = wait_with_timeout(child, Duration::from_secs(30));
    assert!(exited.status.success(), "graceful shutdown exits 0: {:?}", exited.status);
}

#[test]
fn serves_the_embedded_log_and_keeps_data_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (child, _out, url) = serve_log(&data);
    for i in 0..3 {
        let out =
            annals(&url, &["append", "acct-1", "--type", "Deposited", "--data", &format!("{{\"n\":{i}}}")]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // The binary installs the `metrics` facade recorder: the log's fsync
    // histogram shows up in /metrics with the server's own metrics.
    let text = http_get(&format!("{url}/metrics"));
    let fsyncs: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("annals_log_fsync_seconds_count "))
        .unwrap_or_else(|| panic!("no fsync histogram in {text}"))
        .parse()
        .unwrap();
    assert!(fsyncs >= 3.0, "{text}");
    assert!(text.contains("annals_appends_total"), "{text}");
    assert!(text.ends_with("# EOF\n"), "{text}");
    // A second server on the same directory is refused: the lock is exclusive.
    let second = Command::new(BIN)
        .args(["serve", "--data", data.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&second.stderr).contains("locked"),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    stop(child);

    // Offline tools on the closed store.
    let out = Command::new(BIN).args(["verify", data.to_str().unwrap(), "--json"]).output().unwrap();
    let report = stdout_json(&out);
    assert_eq!(report["ok"], true);
    assert_eq!(report["events"], 3);
    let out = Command::new(BIN).args(["rebuild-index", data.to_str().unwrap(), "--json"]).output().unwrap();
    assert_eq!(stdout_json(&out)["events"], 3);

    // Restart: the events are still there and numbering continues.
    let (child, _out, url) = serve_log(&data);
    let out = annals(&url, &["read", "acct-1", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("Deposited").count(), 3, "{text}");
    let out = annals(&url, &["append", "acct-1", "--type", "Deposited", "--expected", "2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    stop(child);

    // Damage one byte in the middle of the log: verify says where and exits 7.
    let segment = std::fs::read_dir(&data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "seg"))
        .expect("a segment file");
    let mut bytes = std::fs::read(&segment).unwrap();
    // The third of the four events (position 2).
    let at = bytes
        .windows(9)
        .enumerate()
        .filter(|(_, w)| *w == b"Deposited")
        .map(|(i, _)| i)
        .nth(2)
        .expect("the third event's type");
    bytes[at] ^= 0x20;
    std::fs::write(&segment, &bytes).unwrap();
    let out = Command::new(BIN).args(["verify", data.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(7), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(String::from_utf8_lossy(&out.stdout).contains("BAD"));
    // The server refuses the damaged store and says how to repair it.
    let refused = Command::new(BIN)
        .args(["serve", "--data", data.to_str().unwrap(), "--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("annals repair"));

    // `repair` without --yes says what would go and changes nothing.
    let d = data.to_str().unwrap();
    let dry = Command::new(BIN).args(["repair", d, "--json"]).output().unwrap();
    assert_eq!(dry.status.code(), Some(7), "{}", String::from_utf8_lossy(&dry.stderr));
    let plan: Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!((plan["cut"].clone(), plan["first_bad"]["cut_position"].clone()), (json!(false), json!(2)));
    assert_eq!(std::fs::read(&segment).unwrap(), bytes, "a dry run changed the log");
    // The text plan: three plain lines (it carried the source's indentation).
    let dry = Command::new(BIN).args(["repair", d]).output().unwrap();
    assert_eq!(dry.status.code(), Some(7));
    let text = String::from_utf8_lossy(&dry.stdout);
    assert_eq!(text.lines().count(), 3, "{text}");
    assert!(text.contains("position 2 on are removed (") && !text.contains("  "), "{text}");
    // With --yes it cuts back to the damaged event's group: two events left,
    // intact, and the store opens and goes on from there.
    let cut = Command::new(BIN).args(["repair", d, "--yes", "--json"]).output().unwrap();
    assert!(cut.status.success(), "{}", String::from_utf8_lossy(&cut.stderr));
    assert_eq!(stdout_json(&cut)["events"], 2);
    let report = stdout_json(&Command::new(BIN).args(["verify", d, "--json"]).output().unwrap());
    assert_eq!((report["ok"].clone(), report["events"].clone()), (json!(true), json!(2)));
    let again = Command::new(BIN).args(["repair", d]).output().unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to repair"));
    let (child, _out, url) = serve_log(&data);
    let out = annals(&url, &["append", "acct-1", "--type", "Deposited", "--expected", "1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    stop(child);
}

/// The PostgreSQL URL for tests, or `None` (with a notice) when the database
/// is unreachable and `ANNALS_REQUIRE_SERVICES` is not set.
fn postgres_url() -> Option<String> {
    let url = std::env::var("ANNALS_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let reachable =
        std::net::TcpStream::connect_timeout(&"127.0.0.1:5432".parse().unwrap(), Duration::from_secs(2))
            .is_ok()
            || !url.contains("127.0.0.1:5432");
    if reachable {
        return Some(url);
    }
    assert!(
        std::env::var("ANNALS_REQUIRE_SERVICES").as_deref() != Ok("1"),
        "PostgreSQL at {url} is unreachable and ANNALS_REQUIRE_SERVICES=1"
    );
    eprintln!("skipping: PostgreSQL at {url} is unreachable");
    None
}

fn serve_postgres(
    url: &str,
    schema: &str,
) -> (std::process::Child, BufReader<std::process::ChildStdout>, String) {
    let mut child = Command::new(BIN)
        .args(["serve", "--postgres", url, "--postgres-schema", schema, "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut reader = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    if !line.contains("backend: postgres") {
        let mut err = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
        panic!("server did not start on PostgreSQL: {line} {err}");
    }
    let url = line.split_whitespace().find(|w| w.starts_with("http://")).unwrap().to_owned();
    (child, reader, url)
}

#[test]
fn two_servers_share_one_postgres_schema() {
    let Some(pg) = postgres_url() else { return };
    let schema = format!("annals_cli_{}", uuid::Uuid::new_v4().simple());
    let (a, _ao, url_a) = serve_postgres(&pg, &schema);
    let (b, _bo, url_b) = serve_postgres(&pg, &schema);
    let out = annals(&url_a, &["append", "shared-1", "--type", "FromA", "--expected", "no_stream"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The other server sees it and enforces the same expected version.
    let out = annals(&url_b, &["append", "shared-1", "--type", "FromB", "--expected", "no_stream"]);
    assert_eq!(
        out.status.code(),
        Some(3),
        "conflict across servers: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = annals(&url_b, &["append", "shared-1", "--type", "FromB", "--expected", "0"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = annals(&url_a, &["read", "shared-1", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success());
    let a_at = text.find("FromA").expect("A's event");
    let b_at = text.find("FromB").expect("B's event");
    assert!(a_at < b_at, "{text}");
    // The store's pool gauges reach /metrics through the facade recorder
    // (sampled every second).
    let wanted = format!("annals_pg_pool_max_connections{{schema=\"{schema}\"}} 16");
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = http_get(&format!("{url_a}/metrics"));
        if metrics.contains(&wanted) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(metrics.contains(&wanted), "{wanted} not in {metrics}");
    assert!(metrics.contains(&format!("annals_pg_pool_connections{{schema=\"{schema}\"}}")), "{metrics}");
    stop(a);
    stop(b);
    let _ = Command::new("psql")
        .args([pg.as_str(), "-q", "-c", &format!("DROP SCHEMA IF EXISTS {schema} CASCADE")])
        .output();
}

/// `annals` with `--data-dir` and no server: `ANNALS_URL` points at a port
/// nobody listens on, so anything that reaches for a server fails.
fn annals_local(args: &[&str]) -> Output {
    annals_stdin("http://127.0.0.1:9", args, None)
}

#[test]
fn client_commands_run_directly_on_a_data_directory() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();

    // Reading a directory that does not exist is a usage error, and creates nothing.
    let out = annals_local(&["read", "acct-1", "--data-dir", d]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such directory"));
    assert!(!data.exists());

    // Appends create the store; expectations and exit codes are the server's.
    for (i, expected) in ["no_stream", "0", "1"].iter().enumerate() {
        let payload = format!("{{\"n\":{i}}}");
        let out = annals_local(&[
            "append",
            "acct-1",
            "--type",
            "Deposited",
            "--data",
            &payload,
            "-e",
            expected,
            "--data-dir",
            d,
        ]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    let conflict = annals_local(&["append", "acct-1", "--type", "Deposited", "-e", "0", "--data-dir", d]);
    assert_eq!(conflict.status.code(), Some(3), "{}", String::from_utf8_lossy(&conflict.stderr));
    annals_local(&["append", "other-7", "--type", "Opened", "--data-dir", d]);

    let read = stdout_json(&annals_local(&["read", "acct-1", "--json", "--data-dir", d]));
    let events = read["events"].as_array().unwrap();
    let ns: Vec<i64> = events.iter().map(|e| e["data"]["n"].as_i64().unwrap()).collect();
    assert_eq!(ns, [0, 1, 2]);
    let all = stdout_json(&annals_local(&["read", "$all", "--category", "acct", "--json", "--data-dir", d]));
    assert_eq!(all["events"].as_array().unwrap().len(), 3);
    let streams = stdout_json(&annals_local(&["streams", "--json", "--data-dir", d]));
    assert_eq!(streams["streams"].as_array().unwrap().len(), 2, "{streams}");
    let stats = stdout_json(&annals_local(&["stats", "--json", "--data-dir", d]));
    assert_eq!(stats["events"], 4);
    assert_eq!(stats["by_type"]["Deposited"], 3);
    // From the end of a directory nothing could ever arrive (the command
    // holds its lock): refused rather than waiting forever, also by default.
    for args in
        [&["tail", "acct-1", "--data-dir", d][..], &["tail", "$all", "--from", "end", "--data-dir", d]]
    {
        let child = Command::new(BIN)
            .args(args)
            .env("ANNALS_URL", "http://127.0.0.1:9")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = wait_with_timeout(child, Duration::from_secs(60));
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).contains("--from start"), "{args:?}");
    }
    let tail = annals_local(&["tail", "acct-1", "--from", "start", "--count", "3", "--data-dir", d]);
    assert!(tail.status.success(), "{}", String::from_utf8_lossy(&tail.stderr));
    assert_eq!(String::from_utf8_lossy(&tail.stdout).matches("Deposited").count(), 3);

    // Export from one directory, import into another.
    let file = dir.path().join("export.jsonl");
    let out = annals_local(&["export", "-o", file.to_str().unwrap(), "--json", "--data-dir", d]);
    assert_eq!(stdout_json(&out)["exported"], 4);
    let copy = dir.path().join("copy");
    let out =
        annals_local(&["import", file.to_str().unwrap(), "--json", "--data-dir", copy.to_str().unwrap()]);
    assert_eq!(stdout_json(&out)["written"], 4);

    // Every command closed the log cleanly: it verifies, and a server
    // serves what the commands wrote.
    let report = stdout_json(&Command::new(BIN).args(["verify", d, "--json"]).output().unwrap());
    assert_eq!(report["ok"], true);
    assert_eq!(report["events"], 4);
    let (child, _out, url) = serve_log(&data);
    let read = stdout_json(&annals(&url, &["read", "acct-1", "--json"]));
    assert_eq!(read["events"].as_array().unwrap().len(), 3);

    // While a server holds the directory, a local command is refused
    // (the log's lock is exclusive) instead of opening it twice.
    let out = annals_local(&["read", "acct-1", "--data-dir", d]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("locked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stop(child);
}

#[test]
fn bench_loads_an_embedded_store_directly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("bench");
    let d = d.to_str().unwrap();
    let report =
        stdout_json(&annals_local(&["bench", "--data-dir", d, "-c", "4", "-b", "10", "-d", "0.5", "--json"]));
    assert_eq!(report["target"], "embedded");
    assert_eq!(report["errors"], 0);
    let events = report["events"].as_u64().unwrap();
    assert!(events >= 10, "{report}");
    assert!(report["append_latency"]["p99_ms"].as_f64().unwrap() > 0.0, "{report}");
    // The events are really in the log.
    let verified = stdout_json(&Command::new(BIN).args(["verify", d, "--json"]).output().unwrap());
    assert_eq!(verified["events"].as_u64(), Some(events));

    let report = stdout_json(&annals_local(&[
        "bench",
        "--data-dir",
        d,
        "--mode",
        "fanout",
        "-c",
        "2",
        "--subscribers",
        "3",
        "-d",
        "0.5",
        "--json",
    ]));
    assert_eq!(report["errors"], 0);
    assert!(report["delivered"].as_u64().unwrap() > 0, "{report}");
    assert_eq!(report["delivered"], report["expected_deliveries"], "{report}");
}

#[test]
fn stats_of_a_log_server_show_exact_counts_and_disk_size() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (child, _out, url) = serve_log(&data);
    let appended =
        ["A", "A", "B"].iter().all(|t| annals(&url, &["append", "log-1", "--type", t]).status.success());
    let json = annals(&url, &["stats", "--json"]);
    let table = annals(&url, &["stats"]);
    stop(child);
    assert!(appended);
    let v = stdout_json(&json);
    assert_eq!(v["by_type"], serde_json::json!({ "A": 2, "B": 1 }));
    assert_eq!(v["complete"], true);
    let bytes = v["disk_bytes"].as_u64().expect("the log reports its size");
    assert!(bytes > 0);
    // The table shows it in binary units (the exact figure may have moved
    // since: the log pre-allocates segment space in the background).
    let text = String::from_utf8_lossy(&table.stdout);
    let disk = text.lines().find(|l| l.contains("disk")).unwrap_or_default();
    assert!(disk.contains(" bytes)") && disk.contains("iB"), "{text}");
}

#[test]
fn ctrl_c_ends_a_local_tail_with_the_log_closed_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let d = data.to_str().unwrap();
    for t in ["First", "Second"] {
        assert!(annals_local(&["append", "t-1", "--type", t, "--data-dir", d]).status.success());
    }
    // Follows forever (no --count) until interrupted.
    let mut child = Command::new(BIN)
        .args(["tail", "t-1", "--from", "start", "--json", "--data-dir", d])
        .env("ANNALS_URL", "http://127.0.0.1:9")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    for expected in ["First", "Second"] {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(serde_json::from_str::<Value>(&line).unwrap()["type"], expected, "{line}");
    }
    let int = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(int.success());
    let exited = wait_with_timeout(child, Duration::from_secs(30));
    assert_eq!(exited.status.code(), Some(130), "{}", String::from_utf8_lossy(&exited.stderr));
    // Closed, not abandoned: the lock is free, the index checkpoint is
    // written, and every record verifies.
    assert!(data.join("index.bin").exists(), "a clean close writes the index checkpoint");
    let report = stdout_json(&Command::new(BIN).args(["verify", d, "--json"]).output().unwrap());
    assert_eq!((report["ok"].as_bool(), report["events"].as_u64()), (Some(true), Some(2)));
}

/// A server over `store` on `listener`, on its own runtime thread, that a
/// test can stop (gracefully: live clients are told `shutdown`) and start
/// again on the same address, as an operator restarts one.
struct StoppableServer {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StoppableServer {
    fn start(store: Arc<dyn annals_core::Store>, listener: std::net::TcpListener) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        listener.set_nonblocking(true).unwrap();
        let thread = std::thread::spawn(move || {
            let rt =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let mut config = ServerConfig::default();
                config.auth.anonymous = Some(Role::Admin);
                let state = AppState::with_backend(store, config, "memory").unwrap();
                annals_server::run(listener, state, async move {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
            });
        });
        StoppableServer { stop: Some(stop), thread: Some(thread) }
    }

    /// Stops it and waits until it has drained and closed its listener.
    fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            thread.join().unwrap();
        }
    }
}

/// Waits until the server at `url` has `n` SSE subscribers.
fn wait_for_sse_subscribers(url: &str, n: u64) {
    for _ in 0..200 {
        let stats: Value = serde_json::from_str(&http_get(&format!("{url}/stats"))).unwrap();
        if stats["subscribers"]["sse"].as_u64() == Some(n) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("the server at {url} never had {n} SSE subscriber(s)");
}

/// Appends one event straight to `store` (no server involved).
fn append_to(store: &Arc<dyn annals_core::Store>, stream: &str, event_type: &str) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let stream = annals_core::StreamName::new(stream).unwrap();
        let event = annals_core::EventData::json(event_type, &serde_json::json!({})).unwrap();
        annals_core::Appender::append(&**store, &stream, annals_core::ExpectedVersion::Any, vec![event])
            .await
            .unwrap();
    });
}

/// The `type` of each JSON line `tail --json` printed.
fn tailed_types(out: &Output) -> Vec<String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["type"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Waits up to `limit` for `child`; kills it when it is still running and
/// returns what it printed either way (`None` status: it had to be killed).
fn wait_or_kill(mut child: std::process::Child, limit: Duration) -> (Option<i32>, Output) {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            return (out.status.code(), out);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    (None, child.wait_with_output().unwrap())
}

fn spawn_tail(url: &str, args: &[&str]) -> std::process::Child {
    Command::new(BIN)
        .arg("tail")
        .args(args)
        .env("ANNALS_URL", url)
        .env_remove("ANNALS_TOKEN")
        .env_remove("ANNALS_API_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// `tail --from end` means "from where the log ended when the tail
/// started": an event appended while the tail is between connections (the
/// server said `shutdown`, and nothing had been delivered yet) must still
/// be shown after the reconnect, not skipped by asking for "end" again.
#[test]
fn tail_from_end_keeps_events_appended_while_it_reconnects() {
    for (target, args) in
        [("$all", ["$all", "--count", "2", "--json"]), ("t-9", ["t-9", "--count", "2", "--json"])]
    {
        let store: Arc<dyn annals_core::Store> = Arc::new(annals_core::MemoryStore::new());
        append_to(&store, "t-9", "Before");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let url = format!("http://{addr}");
        let first = StoppableServer::start(store.clone(), listener);
        let tail = spawn_tail(&url, &args);
        wait_for_sse_subscribers(&url, 1);
        first.stop();
        // The tail was told `shutdown` and waits before reconnecting; this
        // event lands after it started, so it is the tail's to show.
        append_to(&store, "t-9", "During");
        let second = StoppableServer::start(store.clone(), std::net::TcpListener::bind(addr).unwrap());
        wait_for_sse_subscribers(&url, 1);
        assert!(annals(&url, &["append", "t-9", "--type", "After"]).status.success());
        let (code, out) = wait_or_kill(tail, Duration::from_secs(10));
        second.stop();
        assert_eq!(
            (code, tailed_types(&out)),
            (Some(0), vec!["During".to_owned(), "After".to_owned()]),
            "{target}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A restart takes longer than one reconnect pause: the tail keeps trying
/// until the server is back, then resumes strictly after the last event it
/// printed (nothing twice, nothing skipped).
#[test]
fn tail_waits_out_a_restart_and_resumes_after_the_last_event() {
    let store: Arc<dyn annals_core::Store> = Arc::new(annals_core::MemoryStore::new());
    append_to(&store, "t-8", "Before");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let url = format!("http://{addr}");
    let first = StoppableServer::start(store.clone(), listener);
    let mut tail = spawn_tail(&url, &["t-8", "--from", "start", "--count", "3", "--json"]);
    let mut stdout = BufReader::new(tail.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert!(line.contains("Before"), "{line}");
    first.stop();
    append_to(&store, "t-8", "During");
    std::thread::sleep(Duration::from_millis(1500));
    let second = StoppableServer::start(store.clone(), std::net::TcpListener::bind(addr).unwrap());
    wait_for_sse_subscribers(&url, 1);
    assert!(annals(&url, &["append", "t-8", "--type", "After"]).status.success());
    let mut rest = Vec::new();
    for _ in 0..2 {
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            break;
        }
        rest.push(
            serde_json::from_str::<Value>(&line).unwrap()["type"].as_str().unwrap_or_default().to_owned(),
        );
    }
    let (code, out) = wait_or_kill(tail, Duration::from_secs(10));
    second.stop();
    assert_eq!(
        (code, rest),
        (Some(0), vec!["During".to_owned(), "After".to_owned()]),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Appends `n` events of `event_type` to `stream` on the server at `url`.
fn append_n(url: &str, stream: &str, event_type: &str, n: usize) {
    for i in 0..n {
        let data = format!(r#"{{"i":{i}}}"#);
        let out = annals(url, &["append", stream, "--type", event_type, "--data", &data]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

fn positions_in(file: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(file)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["position"].as_u64().unwrap())
        .collect()
}

/// An interrupted export can stop between an event's last byte and its
/// newline. That event is whole: `--resume` must neither drop it nor skip
/// it (it used to count it as exported, then cut it off as torn).
#[test]
fn export_resume_keeps_a_whole_last_line_without_its_newline() {
    let source = server();
    append_n(&source, "item-1", "Made", 3);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    let f = file.to_str().unwrap();
    assert_eq!(stdout_json(&annals(&source, &["export", "-o", f, "--json"]))["exported"], 3);
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, text.trim_end_matches('\n')).unwrap();
    append_n(&source, "item-1", "Made", 1);
    let out = annals(&source, &["export", "-o", f, "--resume", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(positions_in(&file), vec![0, 1, 2, 3]);
    // A line that really is torn (not JSON) is still cut off and exported again.
    let text = std::fs::read_to_string(&file).unwrap();
    let cut = text.trim_end_matches('\n').len() - 10;
    std::fs::write(&file, &text[..cut]).unwrap();
    let out = annals(&source, &["export", "-o", f, "--resume", "--json"]);
    assert_eq!(stdout_json(&out)["exported"], 1);
    assert_eq!(positions_in(&file), vec![0, 1, 2, 3]);
}

/// One line of an export file, as `annals export` writes it.
fn export_line(stream: &str, version: u64, event_type: &str) -> String {
    serde_json::json!({
        "id": uuid::Uuid::new_v4(), "stream": stream, "version": version, "position": 0,
        "type": event_type, "content_type": "application/json", "data": {}, "metadata": {},
    })
    .to_string()
}

/// A file that cannot be imported whole is refused before anything is
/// written: a bad line in the middle used to leave the events before it
/// in the target (the earlier batches were already appended).
#[test]
fn import_writes_nothing_from_a_file_with_a_bad_line() {
    let dir = tempfile::tempdir().unwrap();
    let good = [export_line("a-1", 0, "A"), export_line("b-1", 0, "B"), export_line("a-1", 1, "A")];
    let bad_lines = [
        ("not json", "line 3"),
        (r#"{"stream":"c-1","type":"C"}"#, "line 3"),
        (&*export_line("c-1", 0, ""), "line 3"),
        (&*export_line("c-1", 0, "C").replace("application/json", "text/plain"), "line 3"),
    ];
    for (bad, what) in bad_lines {
        let target = server();
        let file = dir.path().join("bad.jsonl");
        std::fs::write(&file, format!("{}\n{}\n{bad}\n{}\n", good[0], good[1], good[2])).unwrap();
        let out = annals(&target, &["import", file.to_str().unwrap(), "--json"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {stderr}");
        assert!(stderr.contains(what), "{bad}: {stderr}");
        assert_eq!(stdout_json(&annals(&target, &["stats", "--json"]))["events"], 0, "{bad}: {stderr}");
        // The same from stdin.
        let input = std::fs::read_to_string(&file).unwrap();
        let out = annals_stdin(&target, &["import", "--json"], Some(&input));
        assert_eq!(out.status.code(), Some(2), "{bad}: {}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(stdout_json(&annals(&target, &["stats", "--json"]))["events"], 0);
    }
    // Once the file is right, it imports.
    let target = server();
    let file = dir.path().join("good.jsonl");
    std::fs::write(&file, good.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
    let v = stdout_json(&annals(&target, &["import", file.to_str().unwrap(), "--json"]));
    assert_eq!(v, serde_json::json!({ "written": 3, "skipped": 0 }));
}

/// A file whose versions of a stream do not continue the target's (an
/// `export --from N` imported into an empty store, a hole in the file)
/// would be renumbered on import, and a re-run then wrote it a second
/// time. It is refused, with nothing written.
#[test]
fn import_refuses_versions_that_do_not_continue_the_target() {
    let source = server();
    append_n(&source, "item-0", "Made", 4);
    let dir = tempfile::tempdir().unwrap();
    let part = dir.path().join("part.jsonl");
    let out = annals(&source, &["export", "--from", "2", "-o", part.to_str().unwrap(), "--json"]);
    assert_eq!(stdout_json(&out)["exported"], 2);
    let target = server();
    for batch in ["500", "1"] {
        let out = annals(&target, &["import", part.to_str().unwrap(), "--json", "--batch", batch]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("item-0") && stderr.contains("version 2"), "{stderr}");
    }
    assert_eq!(stdout_json(&annals(&target, &["stats", "--json"]))["events"], 0);
    // Onto a target that has the first two events, it continues them.
    let head = dir.path().join("head.jsonl");
    let out = annals(&source, &["export", "-o", head.to_str().unwrap(), "--json"]);
    assert_eq!(stdout_json(&out)["exported"], 4);
    let first_two: String =
        std::fs::read_to_string(&head).unwrap().lines().take(2).map(|l| format!("{l}\n")).collect();
    std::fs::write(&head, first_two).unwrap();
    assert_eq!(stdout_json(&annals(&target, &["import", head.to_str().unwrap(), "--json"]))["written"], 2);
    let v = stdout_json(&annals(&target, &["import", part.to_str().unwrap(), "--json"]));
    assert_eq!(v, serde_json::json!({ "written": 2, "skipped": 0 }));
    let v = stdout_json(&annals(&target, &["import", part.to_str().unwrap(), "--json", "--batch", "1"]));
    assert_eq!(v, serde_json::json!({ "written": 0, "skipped": 2 }));
    let read = stdout_json(&annals(&target, &["read", "item-0", "--json"]));
    let is: Vec<i64> =
        read["events"].as_array().unwrap().iter().map(|e| e["data"]["i"].as_i64().unwrap()).collect();
    assert_eq!(is, [0, 1, 2, 3]);
    // Checked for every stream before the first write: a good stream
    // before the bad one is not written either.
    let mixed = dir.path().join("mixed.jsonl");
    std::fs::write(&mixed, format!("{}\n{}\n", export_line("g-1", 0, "A"), export_line("g-2", 5, "A")))
        .unwrap();
    let out = annals(&target, &["import", mixed.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("line 2") && stderr.contains("g-2") && stderr.contains("version 5"), "{stderr}");
    assert_eq!(annals(&target, &["read", "g-1"]).status.code(), Some(4), "g-1 was written");
    // A hole inside the file: refused too.
    let holey = dir.path().join("holey.jsonl");
    std::fs::write(&holey, format!("{}\n{}\n", export_line("h-1", 0, "A"), export_line("h-1", 2, "A")))
        .unwrap();
    let out = annals(&target, &["import", holey.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("line 2") && stderr.contains("h-1"), "{stderr}");
    let info = stdout_json(&annals(&target, &["read", "$all", "--stream-prefix", "h-", "--json"]));
    assert_eq!(info["events"].as_array().unwrap().len(), 0);
}

/// `--count 0` asks for no events: it ends at once, printing nothing
/// (it used to print one event, or wait for one).
#[test]
fn tail_count_zero_prints_nothing() {
    let url = server();
    append_n(&url, "z-1", "Z", 2);
    let tail = spawn_tail(&url, &["z-1", "--from", "start", "--count", "0", "--json"]);
    let (code, out) = wait_or_kill(tail, Duration::from_secs(10));
    assert_eq!((code, String::from_utf8_lossy(&out.stdout).into_owned()), (Some(0), String::new()));
}

/// Event data is kept as the server stores it: the exact JSON text. The
/// commands used to parse it into `f64`s and print that, so a big integer
/// or a long decimal (an amount) was silently rounded by `append`, `read`,
/// `tail`, `export` and `import`, and a number beyond `f64` (valid JSON)
/// made `read` and `export` fail.
#[test]
fn numbers_in_event_data_keep_their_exact_text() {
    const DATA: &str =
        r#"{"amount":123456789012345678901234567890.000000000000000001,"price":1.10,"huge":1e400}"#;
    let source = server();
    let events = format!(r#"[{{"type":"Priced","data":{DATA}}}]"#);
    let out = annals(&source, &["append", "p-1", &events]);
    assert!(out.status.success(), "append: {}", String::from_utf8_lossy(&out.stderr));
    let out = annals(&source, &["append", "p-1", "--type", "Priced", "--data", DATA]);
    assert!(out.status.success(), "append --data: {}", String::from_utf8_lossy(&out.stderr));
    // What the server stored, read without the CLI.
    let stored = http_get(&format!("{source}/streams/p-1"));
    assert_eq!(stored.matches(DATA).count(), 2, "{stored}");

    let out = annals(&source, &["read", "p-1", "--json"]);
    assert!(out.status.success(), "read --json: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).matches(DATA).count(), 2);
    let out = annals(&source, &["read", "p-1"]);
    assert!(out.status.success(), "read: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("123456789012345678901234567890.0"));

    let tail = spawn_tail(&source, &["p-1", "--from", "start", "--count", "2", "--json"]);
    let (code, out) = wait_or_kill(tail, Duration::from_secs(20));
    assert_eq!(code, Some(0), "tail: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).matches(DATA).count(), 2);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    let out = annals(&source, &["export", "-o", file.to_str().unwrap(), "--json"]);
    assert_eq!(stdout_json(&out)["exported"], 2, "export: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read_to_string(&file).unwrap().matches(DATA).count(), 2);
    let target = server();
    let out = annals(&target, &["import", file.to_str().unwrap(), "--json"]);
    assert_eq!(stdout_json(&out)["written"], 2);
    let imported = http_get(&format!("{target}/streams/p-1"));
    assert_eq!(imported.matches(DATA).count(), 2, "{imported}");
}

/// Data sent with whitespace (newlines) between its tokens is stored as
/// sent; the export must still hold one event per line.
#[test]
fn export_writes_one_line_per_event_whatever_the_data_layout() {
    let source = server();
    let out =
        annals(&source, &["append", "w-1", "[{\"type\":\"W\",\"data\":{\"a\":\n  1,\r\n \"s\":\"x\\ny\"}}]"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    assert_eq!(
        stdout_json(&annals(&source, &["export", "-o", file.to_str().unwrap(), "--json"]))["exported"],
        1
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert_eq!(text.lines().count(), 1, "{text}");
    let event: Value = serde_json::from_str(text.trim_end()).unwrap();
    assert_eq!(event["data"], json!({"a": 1, "s": "x\ny"}));
    let target = server();
    assert_eq!(stdout_json(&annals(&target, &["import", file.to_str().unwrap(), "--json"]))["written"], 1);
    let v = stdout_json(&annals(&target, &["read", "w-1", "--json"]));
    assert_eq!(v["events"][0]["data"], json!({"a": 1, "s": "x\ny"}));
}

/// Runs `annals` with its stdout read up to the first line and then
/// closed, as `annals … | head -1` does; returns the exit code and stderr.
fn annals_into_head(url: &str, args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("ANNALS_URL", url)
        .env_remove("ANNALS_TOKEN")
        .env_remove("ANNALS_API_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(!line.is_empty(), "{args:?} printed nothing");
    drop(out);
    let (code, output) = wait_or_kill(child, Duration::from_secs(30));
    (code, String::from_utf8_lossy(&output.stderr).into_owned())
}

/// Output larger than a pipe holds, read by `head -1`: the command must
/// end quietly with 0. `streams` (and the summary lines of the others)
/// printed with `println!`, which panicked on the closed pipe (exit 101
/// with a backtrace); `export` to stdout ended with "error: Broken pipe".
#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    let url = server();
    // 800 streams with long names in one transaction: a listing well over 64 KiB.
    let parts: Vec<Value> = (0..800)
        .map(|i| {
            json!({ "stream": format!("closed-pipe-{i:04}-{}", "x".repeat(80)), "expected": "any",
                    "events": [{ "type": "Made", "data": { "i": i } }] })
        })
        .collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let status = rt.block_on(async {
        reqwest::Client::new()
            .post(format!("{url}/transactions"))
            .json(&json!({ "streams": parts }))
            .send()
            .await
            .unwrap()
            .status()
    });
    assert!(status.is_success(), "{status}");
    for args in [
        &["streams"][..],
        &["streams", "--json"],
        &["read", "$all", "-n", "800"],
        &["read", "$all", "-n", "800", "--json"],
        &["export"],
        &["tail", "$all", "--from", "start"],
    ] {
        let (code, stderr) = annals_into_head(&url, args);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked") && !stderr.contains("error"), "{args:?}: {stderr}");
    }
}

/// Events given both ways (a JSON argument and `--type`) are refused as a
/// usage error; the JSON used to be dropped without a word and a `--type`
/// event with `{}` data appended in its place.
#[test]
fn append_refuses_events_given_both_as_json_and_with_type() {
    let url = server();
    let out = annals(&url, &["append", "c-1", r#"[{"type":"Given","data":{"a":1}}]"#, "--type", "Other"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(annals(&url, &["read", "c-1"]).status.code(), Some(4), "something was appended");
}

/// `export --resume` finds the last exported position in a file whose
/// last event holds a number beyond `f64` (valid JSON, exported exactly):
/// that line used to be skipped as unreadable, so the event was exported a
/// second time.
#[test]
fn export_resume_reads_the_position_of_any_exported_line() {
    let source = server();
    append_n(&source, "big-1", "Made", 1);
    let out = annals(&source, &["append", "big-1", "--type", "Huge", "--data", r#"{"n":1e400}"#]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    let f = file.to_str().unwrap();
    assert_eq!(stdout_json(&annals(&source, &["export", "-o", f, "--json"]))["exported"], 2);
    append_n(&source, "big-1", "Made", 1);
    let out = annals(&source, &["export", "-o", f, "--resume", "--json"]);
    assert_eq!(stdout_json(&out)["exported"], 1);
    let positions: Vec<String> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(|l| l.split(r#""position":"#).nth(1).unwrap().split(',').next().unwrap().to_owned())
        .collect();
    assert_eq!(positions, ["0", "1", "2"]);
}

/// A batch of an import larger than the server takes in one request
/// (`limits.max_body_bytes`) is split, instead of failing the import with
/// 413 (the default `--batch 500` of events that are each well within the
/// limits was refused whole, and only guessing a smaller `--batch` helped).
#[test]
fn import_splits_a_batch_the_server_finds_too_large() {
    let source = server();
    let data = format!(r#"{{"s":"{}"}}"#, "x".repeat(10_000));
    for _ in 0..20 {
        let out = annals(&source, &["append", "wide-1", "--type", "Wide", "--data", &data]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(annals(&source, &["append", "narrow-1", "--type", "Narrow"]).status.success());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("events.jsonl");
    assert_eq!(
        stdout_json(&annals(&source, &["export", "-o", file.to_str().unwrap(), "--json"]))["exported"],
        21
    );
    let mut config = ServerConfig::default();
    config.auth.anonymous = Some(Role::Admin);
    config.limits.max_body_bytes = 64 * 1024;
    let target = server_with(config);
    let out = annals(&target, &["import", file.to_str().unwrap(), "--json"]);
    assert_eq!(stdout_json(&out), json!({ "written": 21, "skipped": 0 }));
    let ids = |url: &str, stream: &str| {
        let v = stdout_json(&annals(url, &["read", stream, "--json"]));
        v["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["id"].clone(), e["version"].clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&source, "wide-1"), ids(&target, "wide-1"));
    assert_eq!(ids(&source, "narrow-1"), ids(&target, "narrow-1"));
    // A re-run writes nothing.
    let out = annals(&target, &["import", file.to_str().unwrap(), "--json"]);
    assert_eq!(stdout_json(&out), json!({ "written": 0, "skipped": 21 }));
}

/// Events on stdin that are not UTF-8 are bad input (exit 2), like events
/// that are not JSON; they were reported as a failure (exit 1).
#[test]
fn append_from_stdin_refuses_bytes_that_are_not_utf8_as_bad_input() {
    let url = server();
    let mut child = Command::new(BIN)
        .args(["append", "u-1"])
        .env("ANNALS_URL", &url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(b"[{\"type\":\"A\",\"data\":\"\xff\xfe\"}]").unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("UTF-8"), "{stderr}");
    assert_eq!(annals(&url, &["read", "u-1"]).status.code(), Some(4));
}

/// A live connection that goes silent without closing (a server gone
/// behind a half-open connection: no event, no keep-alive) is given up
/// after `--idle-timeout` and the tail reconnects, resuming where it was.
/// (It waited on the dead connection for good.) The stand-in server
/// answers the first connection with the feed's headers and then nothing;
/// the second gets one event.
#[test]
fn tail_reconnects_when_the_connection_goes_silent() {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = requests.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(mut conn) = conn else { return };
            let mut request = Vec::new();
            let mut byte = [0u8; 1];
            while !request.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap_or(0) == 1 {
                request.push(byte[0]);
            }
            seen.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&request).lines().next().unwrap_or("").to_owned());
            let head = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n";
            let _ = conn.write_all(head.as_bytes());
            if n > 0 {
                let event = r#"{"id":"00000000-0000-0000-0000-000000000001","type":"Late","stream":"t-s","version":3,"position":3,"content_type":"application/json","data":{},"metadata":{},"recorded_at":"2026-01-01T00:00:00Z"}"#;
                let _ = conn.write_all(format!("event: event\nid: 3\ndata: {event}\n\n").as_bytes());
            }
            let _ = conn.flush();
            held.push(conn);
        }
    });
    let tail = spawn_tail(&url, &["t-s", "--from", "3", "--count", "1", "--json", "--idle-timeout", "1"]);
    let (code, out) = wait_or_kill(tail, Duration::from_secs(30));
    assert_eq!(
        (code, tailed_types(&out)),
        (Some(0), vec!["Late".to_owned()]),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("not even a keep-alive"));
    let requests = requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert!(requests.iter().all(|r| r.contains("/streams/t-s/live?from=3")), "{requests:?}");
}
