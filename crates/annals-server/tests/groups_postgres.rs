//! Consumer groups on a shared PostgreSQL store: several server processes
//! (here: servers over separate `PgStore` instances on one schema), and the
//! groups run on exactly the one holding the groups lease. The others
//! answer `503 groups_elsewhere` and take over when it stops or loses its
//! connection, continuing from the saved checkpoint.

mod common;

use std::{sync::Arc, time::Duration};

use annals_postgres::{PgStore, tokio_postgres};
use annals_server::AppState;
use common::{TestServer, event, open_config, within};
use serde_json::{Value, json};

fn url() -> String {
    std::env::var("ANNALS_POSTGRES_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// The test's schema; dropped at the end of a test that passed (a failed
/// test leaves it behind for a look: its name is unique and harms nothing).
struct Schema(String);

impl Schema {
    async fn drop_now(self) {
        let (client, conn) = tokio_postgres::connect(&url(), tokio_postgres::NoTls).await.expect("admin");
        tokio::spawn(conn);
        client.batch_execute(&format!("DROP SCHEMA \"{}\" CASCADE", self.0)).await.expect("drop schema");
    }
}

/// Two store instances on a fresh schema, or `None` (skip) when PostgreSQL
/// is unreachable and not required.
async fn two_stores() -> Option<(PgStore, PgStore, Schema)> {
    let schema = format!("annals_t_{}", uuid::Uuid::new_v4().simple());
    let open = || PgStore::builder(url()).schema(&schema).max_connections(4).open();
    match open().await {
        Ok(a) => {
            let guard = Schema(schema.clone());
            let b = open().await.expect("second instance");
            Some((a, b, guard))
        }
        Err(e) if std::env::var("ANNALS_REQUIRE_SERVICES").is_ok_and(|v| v == "1") => {
            panic!("PostgreSQL at {} is required (ANNALS_REQUIRE_SERVICES=1): {e}", url())
        }
        Err(e) => {
            eprintln!("SKIPPED: PostgreSQL at {} is unreachable ({e})", url());
            None
        }
    }
}

/// A server over `store` that knows other processes may share it.
async fn serve(store: &PgStore) -> TestServer {
    serve_advertising(store, None).await
}

/// The same, with `advertise_url` set (otherwise the listen address, a
/// specific one here, is what the leader publishes).
async fn serve_advertising(store: &PgStore, advertise_url: Option<&str>) -> TestServer {
    let mut config = open_config();
    config.advertise_url = advertise_url.map(str::to_owned);
    let state = AppState::with_backend(Arc::new(store.clone()), config, "postgres").expect("config");
    state.attach_leases(Arc::new(store.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    common::start_state(listener, state).await
}

async fn call(s: &TestServer, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let (status, _, body) = call_with_headers(s, method, path, body).await;
    (status, body)
}

async fn call_with_headers(
    s: &TestServer,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = s.client.request(method, s.url(path));
    if let Some(body) = body {
        req = req.json(&body);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().await.unwrap_or(Value::Null))
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    for _ in 0..3000 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

/// Pulls until `n` deliveries arrived; returns (delivery id, n) pairs.
async fn pull(s: &TestServer, n: usize) -> Vec<(u64, u64)> {
    let mut got = Vec::new();
    while got.len() < n {
        let path = format!("/groups/payments/next?consumer=p&max={}&wait_ms=5000", n - got.len());
        let (status, body) = call(s, "POST", &path, None).await;
        assert_eq!(status, 200, "{body}");
        for d in body["deliveries"].as_array().expect("deliveries") {
            got.push((d["delivery_id"].as_u64().expect("id"), d["event"]["data"]["n"].as_u64().expect("n")));
        }
    }
    got
}

async fn ack(s: &TestServer, ids: &[u64]) {
    let (status, body) =
        call(s, "POST", "/groups/payments/ack?consumer=p", Some(json!({ "delivery_ids": ids }))).await;
    assert_eq!(status, 200, "{body}");
}

fn assert_elsewhere((status, body): (u16, Value)) {
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "groups_elsewhere", "{body}");
}

/// Waits until `follower` names `leader` in its `groups_elsewhere` answers
/// and in `/info` (it learns the leader on its next take-over attempt).
async fn until_names_leader(follower: &TestServer, leader: &str) {
    for _ in 0..600 {
        let (status, body) = call(follower, "GET", "/groups", None).await;
        assert_eq!(status, 503, "{body}");
        if body["error"]["details"]["leader"] == leader {
            assert!(body["error"]["message"].as_str().unwrap_or("").contains(leader), "{body}");
            let info = follower.get("/info").await.1;
            assert_eq!(info["groups"], "elsewhere", "{info}");
            assert_eq!(info["groups_leader"], leader, "{info}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the follower never named {leader} as the leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_run_on_one_process_and_move_when_it_stops() {
    let Some((a, b, schema)) = two_stores().await else { return };
    let first = serve_advertising(&a, Some("http://leader.example:2113")).await;
    within(60, until("the first server runs the groups", || first.state.leads_groups())).await;
    let second = serve(&b).await;
    within(60, async {
        // The second process stays a follower and says where groups are.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!second.state.leads_groups());
        assert_eq!(second.get("/info").await.1["groups"], "elsewhere");
        // Known from its first attempt at startup.
        let (status, body) = call(&second, "GET", "/groups", None).await;
        assert_eq!(
            (status, &body["error"]["details"]["leader"]),
            (503, &json!("http://leader.example:2113"))
        );
        until_names_leader(&second, "http://leader.example:2113").await;
        let info = first.get("/info").await.1;
        assert_eq!(info["groups"], "here");
        assert!(info.get("groups_leader").is_none(), "the leader names no other process: {info}");
        assert_eq!(first.metric("annals_groups_leader").await, 1.0);
        assert_eq!(second.metric("annals_groups_leader").await, 0.0);
        assert_elsewhere(call(&second, "PUT", "/groups/payments", Some(json!({ "stream": "pay-1" }))).await);
        assert_elsewhere(call(&second, "GET", "/groups", None).await);
        assert_elsewhere(call(&second, "POST", "/groups/payments/next?consumer=p", None).await);
        let (_, headers, _) = call_with_headers(&second, "GET", "/groups/payments", None).await;
        assert_eq!(headers.get("retry-after").map(|v| v.to_str().unwrap_or("")), Some("2"));

        let settings = json!({ "stream": "pay-1", "ack_timeout_ms": 600_000 });
        assert_eq!(call(&first, "PUT", "/groups/payments", Some(settings)).await.0, 201);
        let events: Vec<Value> = (0..10).map(|n| event("Paid", json!({ "n": n }))).collect();
        // Appended through the follower: appends work on every process.
        assert_eq!(second.append("pay-1", "any", Value::Array(events)).await.0, 201);
        let got = pull(&first, 5).await;
        assert_eq!(got.iter().map(|d| d.1).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
        // Four acked; the fifth stays in flight.
        ack(&first, &got[..4].iter().map(|d| d.0).collect::<Vec<_>>()).await;
    })
    .await;
    first.stop().await;

    within(60, async {
        until("the second server takes the groups over", || second.state.leads_groups()).await;
        assert!(second.get("/info").await.1.get("groups_leader").is_none());
        let (status, body) = call(&second, "GET", "/groups", None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["groups"][0]["group"], "payments", "{body}");
        // From the checkpoint: nothing acked comes again; the message that
        // was in flight does.
        let got = pull(&second, 6).await;
        assert_eq!(got.iter().map(|d| d.1).collect::<Vec<_>>(), vec![4, 5, 6, 7, 8, 9]);
        ack(&second, &got.iter().map(|d| d.0).collect::<Vec<_>>()).await;
    })
    .await;
    second.stop().await;
    drop((a, b));
    schema.drop_now().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_loses_its_lease_stops_running_the_groups() {
    let Some((a, b, schema)) = two_stores().await else { return };
    let first = serve(&a).await;
    within(60, until("the first server runs the groups", || first.state.leads_groups())).await;
    let second = serve(&b).await;
    assert_eq!(call(&first, "PUT", "/groups/payments", Some(json!({ "stream": "pay-1" }))).await.0, 201);

    // Cut the leader's lease connection (as a network failure or a DBA
    // would): it must stop running the groups at once.
    let (admin, conn) = tokio_postgres::connect(&url(), tokio_postgres::NoTls).await.expect("admin");
    tokio::spawn(conn);
    let terminated = admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = $1
               AND pid IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)",
            &[&format!("annals-lease {}", schema.0)],
        )
        .await
        .expect("terminate")
        .len();
    assert_eq!(terminated, 1, "one lease holder");
    within(60, until("the first server steps down", || !first.state.leads_groups())).await;

    // Then exactly one process runs the groups again, with the group.
    within(60, async {
        until("some server runs the groups", || first.state.leads_groups() || second.state.leads_groups())
            .await;
        let (leader, follower) =
            if first.state.leads_groups() { (&first, &second) } else { (&second, &first) };
        let (status, body) = call(leader, "GET", "/groups", None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["groups"][0]["group"], "payments", "{body}");
        assert_elsewhere(call(follower, "GET", "/groups", None).await);
        // Without advertise_url the leader publishes its listen address.
        until_names_leader(follower, &leader.url("")).await;
    })
    .await;
    first.stop().await;
    second.stop().await;
    drop((a, b, admin));
    schema.drop_now().await;
}
