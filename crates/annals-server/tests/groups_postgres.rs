//! Several server processes on a shared PostgreSQL store (here: servers
//! over separate `PgStore` instances on one schema). Live feeds on one
//! serve what is appended through another. Consumer groups run on exactly
//! the one holding the groups lease; the others answer `503
//! groups_elsewhere` and take over when it stops or loses its connection,
//! continuing from the saved checkpoint.

mod common;

use std::{sync::Arc, time::Duration};

use annals_postgres::{PgStore, tokio_postgres};
use annals_server::AppState;
use common::{TestServer, event, open_config, read_sse, within};
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

/// Ends the server session holding the schema's lease (as a network
/// failure or a DBA would), checking there was exactly one; returns the
/// admin connection that did it.
async fn end_the_lease_holders_session(schema: &str) -> tokio_postgres::Client {
    let (admin, conn) = tokio_postgres::connect(&url(), tokio_postgres::NoTls).await.expect("admin");
    tokio::spawn(conn);
    let terminated = admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = $1
               AND pid IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted)",
            &[&format!("annals-lease {schema}")],
        )
        .await
        .expect("terminate")
        .len();
    assert_eq!(terminated, 1, "one lease holder");
    admin
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

/// The served shape's promise: stateless servers on one database. SSE
/// feeds (`$all` and one stream) on one server deliver, exactly once and in
/// order, what concurrent writers append through the other server and
/// then through it; the other server's commits reach it by notification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_feeds_on_one_server_see_what_another_appends() {
    const WRITERS: usize = 4;
    const PER_WRITER: usize = 30;
    let Some((a, b, schema)) = two_stores().await else { return };
    let writer = serve(&a).await;
    let reader = serve(&b).await;
    within(120, async {
        for n in 0..5 {
            assert_eq!(writer.append("hist-1", "any", json!([event("H", json!({ "n": n }))])).await.0, 201);
        }
        let total = 5 + WRITERS * PER_WRITER + 10;
        let resp = reader.client.get(reader.url("/all/live?from=start")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let all = tokio::spawn(read_sse(resp, move |got| got.len() >= total));
        let resp = reader.client.get(reader.url("/streams/w-0/live?from=start")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let one = tokio::spawn(read_sse(resp, |got| got.len() >= PER_WRITER));

        let tasks: Vec<_> = (0..WRITERS)
            .map(|w| {
                let client = writer.client.clone();
                let url = writer.url(&format!("/streams/w-{w}"));
                tokio::spawn(async move {
                    for i in 0..PER_WRITER {
                        let body = json!([event("Tick", json!({ "w": w, "i": i }))]);
                        let resp = client.post(&url).json(&body).send().await.unwrap();
                        assert_eq!(resp.status(), 201);
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        // Only the other server has appended so far: whatever notified this
        // one came from its commits (without them the feeds would still
        // catch up, but only at the fallback poll).
        until("the reader's store is notified", || b.notifications_received() > 0).await;
        for n in 0..10 {
            assert_eq!(reader.append("local-1", "any", json!([event("L", json!({ "n": n }))])).await.0, 201);
        }

        let events: Vec<Value> =
            all.await.unwrap().iter().map(|r| serde_json::from_str(&r.2).unwrap()).collect();
        let positions: Vec<u64> = events.iter().map(|e| e["position"].as_u64().unwrap()).collect();
        assert_eq!(positions, (0..total as u64).collect::<Vec<_>>(), "every position once, in order");
        let mut next_version = std::collections::HashMap::new();
        for e in &events {
            let v = next_version.entry(e["stream"].as_str().unwrap().to_owned()).or_insert(0u64);
            assert_eq!(e["version"].as_u64().unwrap(), *v, "versions in order per stream");
            *v += 1;
        }
        assert_eq!(next_version.len(), 1 + WRITERS + 1);

        let records = one.await.unwrap();
        let is: Vec<u64> = records
            .iter()
            .map(|r| serde_json::from_str::<Value>(&r.2).unwrap()["data"]["i"].as_u64().unwrap())
            .collect();
        assert_eq!(is, (0..PER_WRITER as u64).collect::<Vec<_>>());
    })
    .await;
    writer.stop().await;
    reader.stop().await;
    drop((a, b));
    schema.drop_now().await;
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
    let admin = end_the_lease_holders_session(&schema.0).await;
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

/// A process that loses its lease stops delivering the groups before it
/// lets the lease go, even to a pull long-poll open at that moment. (The
/// long-poll kept the group's dispatcher alive: the old process delivered
/// for up to 25 s beside the new leader, the same event to both.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_on_a_process_that_lost_its_lease_delivers_nothing_more() {
    let Some((a, b, schema)) = two_stores().await else { return };
    let first = serve(&a).await;
    within(60, until("the first server runs the groups", || first.state.leads_groups())).await;
    let second = serve(&b).await;
    let settings = json!({ "stream": "pay-1", "ack_timeout_ms": 600_000 });
    assert_eq!(call(&first, "PUT", "/groups/payments", Some(settings)).await.0, 201);

    // A consumer long-polls the leader; nothing to deliver yet.
    let client = first.client.clone();
    let poll = first.url("/groups/payments/next?consumer=old&max=10&wait_ms=25000");
    let long_poll = tokio::spawn(async move {
        let resp = client.post(poll).send().await.unwrap();
        (resp.status().as_u16(), resp.json::<Value>().await.unwrap_or(Value::Null))
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    let admin = end_the_lease_holders_session(&schema.0).await;
    within(60, until("the first server steps down", || !first.state.leads_groups())).await;
    within(
        60,
        until("some server runs the groups", || first.state.leads_groups() || second.state.leads_groups()),
    )
    .await;
    let leader = if first.state.leads_groups() { &first } else { &second };

    // One event after the hand-over; the new leader delivers it.
    assert_eq!(second.append("pay-1", "any", json!([event("Paid", json!({ "n": 0 }))])).await.0, 201);
    let (status, body) =
        call(leader, "POST", "/groups/payments/next?consumer=new&max=10&wait_ms=5000", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deliveries"].as_array().map(Vec::len), Some(1), "{body}");

    // The process that lost the lease stopped its groups "at once": its
    // long poll must not hand out the same event as well.
    let (status, body) = long_poll.await.unwrap();
    let old_delivered = status == 200 && body["deliveries"].as_array().is_some_and(|d| !d.is_empty());
    assert!(!old_delivered, "the group that stepped down still delivered after the lease moved: {body}");
    first.stop().await;
    second.stop().await;
    drop((a, b, admin));
    schema.drop_now().await;
}

/// The same on one process: a group deleted during a pull long-poll stops
/// at once, so the group created again under its name is the only one
/// delivering. (Both delivered the same event to two consumers.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_deleted_during_a_long_poll_stops_delivering() {
    let Some((a, b, schema)) = two_stores().await else { return };
    drop(b);
    let first = serve(&a).await;
    within(60, until("the first server runs the groups", || first.state.leads_groups())).await;
    let settings = json!({ "stream": "pay-1", "ack_timeout_ms": 600_000 });
    assert_eq!(call(&first, "PUT", "/groups/payments", Some(settings.clone())).await.0, 201);
    let client = first.client.clone();
    let poll = first.url("/groups/payments/next?consumer=old&max=10&wait_ms=10000");
    let long_poll = tokio::spawn(async move {
        let resp = client.post(poll).send().await.unwrap();
        (resp.status().as_u16(), resp.json::<Value>().await.unwrap_or(Value::Null))
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(call(&first, "DELETE", "/groups/payments", None).await.0, 204);
    assert_eq!(call(&first, "PUT", "/groups/payments", Some(settings)).await.0, 201);
    assert_eq!(first.append("pay-1", "any", json!([event("Paid", json!({ "n": 0 }))])).await.0, 201);
    let (status, body) =
        call(&first, "POST", "/groups/payments/next?consumer=new&max=10&wait_ms=5000", None).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = long_poll.await.unwrap();
    let old_delivered = status == 200 && body["deliveries"].as_array().is_some_and(|d| !d.is_empty());
    assert!(!old_delivered, "the deleted group still delivered: {body}");
    first.stop().await;
    drop(a);
    schema.drop_now().await;
}

/// A settle of a delivery made by the previous leader, retried on the new
/// one (as `groups_elsewhere` with Retry-After invites), is unknown there:
/// it must not settle whichever other event the new leader gave the same id.
/// (Every dispatcher numbered its deliveries from 1: an old `nack skip` of
/// event 4 skipped event 6, never handled.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settle_from_before_a_hand_over_settles_nothing_else() {
    let Some((a, b, schema)) = two_stores().await else { return };
    let first = serve(&a).await;
    within(60, until("the first server runs the groups", || first.state.leads_groups())).await;
    let second = serve(&b).await;
    let settings = json!({ "stream": "pay-1", "ack_timeout_ms": 600_000 });
    assert_eq!(call(&first, "PUT", "/groups/payments", Some(settings)).await.0, 201);
    let events: Vec<Value> = (0..10).map(|n| event("Paid", json!({ "n": n }))).collect();
    assert_eq!(first.append("pay-1", "any", Value::Array(events)).await.0, 201);
    let old = within(60, pull(&first, 10)).await;
    assert_eq!(old.iter().map(|d| d.1).collect::<Vec<_>>(), (0..10).collect::<Vec<_>>());
    ack(&first, &[old[0].0, old[1].0]).await; // events 0 and 1 handled
    // The client finds event 4 (delivery old[4]) poison and will skip it.
    let poison_id = old[4].0;
    first.stop().await; // saves checkpoint 2, releases the lease

    within(60, until("the second server takes the groups over", || second.state.leads_groups())).await;
    let new = within(60, pull(&second, 8)).await;
    // The client's skip of its old delivery reaches the new leader.
    let (_, body) = call(
        &second,
        "POST",
        "/groups/payments/nack?consumer=p",
        Some(json!({ "delivery_ids": [poison_id], "action": "skip" })),
    )
    .await;
    let hit = new.iter().find(|d| d.0 == poison_id).map(|d| d.1);
    assert!(
        body["settled"].as_array().is_none_or(|s| s.is_empty()),
        "a delivery id of the previous leader settled (skipped) event n={hit:?} here: {body}"
    );
    assert_eq!(body["errors"][0]["error"]["code"], "unknown_delivery", "{body}");
    second.stop().await;
    drop((a, b));
    schema.drop_now().await;
}
