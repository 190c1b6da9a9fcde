//! Consumer groups over HTTP and WebSocket: competing consumers, parking
//! and replay, redelivery on disconnect, shutdown, and the error cases.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use annals_server::{Role, ServerConfig, config::ApiKeyConfig};
use common::{TestServer, event, open_config, start, within};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, tungstenite::Message};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const READER_KEY: &str = "reader-key-0123456789";
const WRITER_KEY: &str = "writer-key-0123456789";

async fn call(
    s: &TestServer,
    method: &str,
    path: &str,
    body: Option<Value>,
    key: Option<&str>,
) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = s.client.request(method, s.url(path));
    if let Some(body) = body {
        req = req.json(&body);
    }
    if let Some(key) = key {
        req = req.header("authorization", format!("ApiKey {key}"));
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

async fn create(s: &TestServer, group: &str, body: Value) -> (u16, Value) {
    call(s, "PUT", &format!("/groups/{group}"), Some(body), None).await
}

async fn consumer(s: &TestServer, group: &str, id: &str, max_in_flight: usize) -> Ws {
    let url = format!("ws://{}/groups/{group}/ws?consumer={id}&max_in_flight={max_in_flight}", s.addr);
    let (ws, _) = tokio_tungstenite::connect_async(url).await.expect("ws connect");
    ws
}

/// The next JSON message, `None` once the socket closed.
async fn next_json(ws: &mut Ws) -> Option<Value> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(t)) => {
                return Some(serde_json::from_str(t.as_str()).expect("server sends JSON"));
            }
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.expect("ws send");
}

/// Waits until the group lists `n` connected consumers (connecting happens
/// after the upgrade, so the socket opening is not enough).
async fn wait_consumers(s: &TestServer, group: &str, n: usize) {
    loop {
        let (status, body) = s.get(&format!("/groups/{group}")).await;
        assert_eq!(status, 200, "{body}");
        if body["stats"]["consumers"].as_array().map(Vec::len) == Some(n) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Reads messages until a delivery; acks/errors in between are returned
/// through `others`.
async fn next_delivery(ws: &mut Ws, others: &mut Vec<Value>) -> Value {
    loop {
        let msg = next_json(ws).await.expect("socket open");
        if msg["type"] == "delivery" {
            return msg;
        }
        others.push(msg);
    }
}

/// Reads messages until one of type `kind`, skipping deliveries into `skipped`.
async fn next_of(ws: &mut Ws, kind: &str, skipped: &mut Vec<Value>) -> Value {
    loop {
        let msg = next_json(ws).await.expect("socket open");
        if msg["type"] == kind {
            return msg;
        }
        skipped.push(msg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_share_200_events_each_delivered_once() {
    let s = start(open_config()).await;
    within(60, async {
        let (status, body) =
            create(&s, "billing", json!({ "stream": "orders-1", "start_from": "start" })).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["group"], "billing");
        assert_eq!(body["max_retries"], 4);

        let mut a = consumer(&s, "billing", "a", 5).await;
        let mut b = consumer(&s, "billing", "b", 5).await;
        wait_consumers(&s, "billing", 2).await;

        for batch in 0..10 {
            let events: Vec<Value> =
                (0..20).map(|i| event("OrderPlaced", json!({ "n": batch * 20 + i }))).collect();
            let (status, body) = s.append("orders-1", "any", Value::Array(events)).await;
            assert_eq!(status, 201, "{body}");
        }

        // Both consumers ack everything they get; together they must see
        // each of the 200 versions exactly once.
        let mut seen: BTreeMap<u64, &str> = BTreeMap::new();
        let mut duplicates = Vec::new();
        let mut count = BTreeMap::from([("a", 0usize), ("b", 0usize)]);
        let mut acked = 0;
        // Until every ack is confirmed too, so closing the sockets below
        // cannot lose one.
        while seen.len() < 200 || acked < 200 {
            let (name, msg) = tokio::select! {
                m = next_json(&mut a) => ("a", m.expect("a open")),
                m = next_json(&mut b) => ("b", m.expect("b open")),
            };
            match msg["type"].as_str() {
                Some("delivery") => {
                    assert_eq!(msg["event"]["stream"], "orders-1");
                    assert_eq!(msg["event"]["type"], "OrderPlaced");
                    assert_eq!(msg["replay"], false);
                    let version = msg["event"]["version"].as_u64().expect("version");
                    if seen.insert(version, name).is_some() {
                        duplicates.push(version);
                    }
                    *count.entry(name).or_default() += 1;
                    let ack = json!({ "type": "ack", "delivery_id": msg["delivery_id"] });
                    send(if name == "a" { &mut a } else { &mut b }, ack).await;
                }
                Some("acked") => acked += 1,
                other => panic!("unexpected message {other:?}: {msg}"),
            }
        }
        assert!(duplicates.is_empty(), "delivered twice: {duplicates:?}");
        assert_eq!(seen.keys().copied().collect::<Vec<_>>(), (0..200).collect::<Vec<u64>>());
        assert!(count["a"] > 0 && count["b"] > 0, "both consumers compete: {count:?}");

        let (_, body) = s.get("/groups/billing").await;
        assert_eq!(body["stats"]["acked"], 200, "{body}");
        assert_eq!(body["stats"]["in_flight"], 0);
        assert_eq!(body["stats"]["parked"], 0);
        drop((a, b));

        let (status, body) = s.get("/groups").await;
        assert_eq!(status, 200);
        assert_eq!(body["groups"][0]["group"], "billing");
        assert_eq!(body["groups"][0]["stream"], "orders-1");
    })
    .await;
    let state = s.state.clone();
    s.stop().await;
    // Shutdown stops the group, which saves its checkpoint past everything acked.
    let saved = state.store().load_checkpoint("$ps-billing").await.expect("load checkpoint");
    assert_eq!(saved, Some(200));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_message_is_listed_and_replayed() {
    let s = start(open_config()).await;
    within(60, async {
        let (status, _) =
            create(&s, "audit", json!({ "stream": "$all", "filter": { "stream_prefix": "pay-" } })).await;
        assert_eq!(status, 201);
        let mut ws = consumer(&s, "audit", "only", 1).await;
        s.append("other-1", "any", json!([event("Ignored", json!({}))])).await;
        s.append("pay-1", "any", json!([event("Paid", json!({ "amount": 5 }))])).await;

        let mut others = Vec::new();
        let d = next_delivery(&mut ws, &mut others).await;
        assert_eq!(d["event"]["stream"], "pay-1");
        assert_eq!(d["attempt"], 1);
        let position = d["event"]["position"].as_u64().expect("position");
        send(&mut ws, json!({ "type": "nack", "delivery_id": d["delivery_id"], "action": "park", "reason": "bad amount" }))
            .await;
        let nacked = next_of(&mut ws, "nacked", &mut others).await;
        assert_eq!(nacked["delivery_id"], d["delivery_id"]);
        assert!(others.is_empty(), "{others:?}");

        let (status, body) = s.get("/groups/audit/parked").await;
        assert_eq!(status, 200, "{body}");
        let parked = body["parked"].as_array().expect("array");
        assert_eq!(parked.len(), 1, "{body}");
        assert_eq!(parked[0]["position"], position);
        assert_eq!(parked[0]["stream"], "pay-1");
        assert_eq!(parked[0]["reason"], "bad amount");
        let (status, one) = s.get(&format!("/groups/audit/parked/{position}")).await;
        assert_eq!(status, 200, "{one}");
        assert_eq!(one, parked[0]);
        let (status, body) = s.get(&format!("/groups/audit/parked/{}", position + 1)).await;
        assert_eq!(status, 404);
        assert_eq!(body["error"]["code"], "parked_not_found");
        let (status, _) = s.get("/groups/audit/parked/minus-one").await;
        assert_eq!(status, 400);

        let (status, body) = call(&s, "POST", "/groups/audit/parked/replay", Some(json!({ "positions": [position] })), None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["queued"], 1);

        let d = next_delivery(&mut ws, &mut others).await;
        assert_eq!(d["replay"], true);
        assert_eq!(d["event"]["position"], position);
        send(&mut ws, json!({ "type": "ack", "delivery_id": d["delivery_id"] })).await;
        next_of(&mut ws, "acked", &mut others).await;
        // Acking the replay resolves the dead letter.
        loop {
            let (_, body) = s.get("/groups/audit/parked").await;
            if body["parked"].as_array().is_some_and(Vec::is_empty) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_messages_of_a_disconnected_consumer_go_to_the_other() {
    let s = start(open_config()).await;
    within(60, async {
        // A long ack timeout: redelivery below can only come from the disconnect.
        let (status, _) = create(&s, "mail", json!({ "stream": "mail-1", "ack_timeout_ms": 600_000 })).await;
        assert_eq!(status, 201);
        let mut a = consumer(&s, "mail", "a", 10).await;
        wait_consumers(&s, "mail", 1).await;
        let events: Vec<Value> = (0..3).map(|i| event("Send", json!({ "i": i }))).collect();
        s.append("mail-1", "any", Value::Array(events)).await;

        let mut others = Vec::new();
        let mut first = BTreeSet::new();
        for _ in 0..3 {
            let d = next_delivery(&mut a, &mut others).await;
            first.insert(d["event"]["id"].as_str().expect("id").to_owned());
        }
        a.close(None).await.expect("close");
        drop(a);

        let mut b = consumer(&s, "mail", "b", 10).await;
        let mut again = BTreeSet::new();
        for _ in 0..3 {
            let d = next_delivery(&mut b, &mut others).await;
            again.insert(d["event"]["id"].as_str().expect("id").to_owned());
            send(&mut b, json!({ "type": "ack", "delivery_id": d["delivery_id"] })).await;
        }
        assert_eq!(first, again);
        assert!(others.iter().all(|m| m["type"] == "acked"), "{others:?}");
    })
    .await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_messages_get_errors_and_the_connection_stays() {
    let s = start(open_config()).await;
    within(60, async {
        create(&s, "g", json!({ "stream": "s-1" })).await;
        let mut ws = consumer(&s, "g", "c", 1).await;
        let mut skipped = Vec::new();
        for bad in [
            "not json".to_owned(),
            json!({ "type": "dance" }).to_string(),
            json!({ "type": "nack", "delivery_id": 1, "action": "explode" }).to_string(),
        ] {
            ws.send(Message::Text(bad.into())).await.expect("send");
            let e = next_of(&mut ws, "error", &mut skipped).await;
            assert_eq!(e["error"]["code"], "invalid_message", "{e}");
        }
        ws.send(Message::Binary(vec![1, 2, 3].into())).await.expect("send");
        let e = next_of(&mut ws, "error", &mut skipped).await;
        assert_eq!(e["error"]["code"], "invalid_message");
        send(&mut ws, json!({ "type": "ack", "delivery_id": 999 })).await;
        let e = next_of(&mut ws, "error", &mut skipped).await;
        assert_eq!(e["error"]["code"], "unknown_delivery");
        assert_eq!(e["delivery_id"], 999);

        // Still consuming.
        s.append("s-1", "any", json!([event("E", json!({}))])).await;
        let d = next_delivery(&mut ws, &mut skipped).await;
        assert_eq!(d["event"]["stream"], "s-1");
        assert!(skipped.is_empty(), "{skipped:?}");

        // Stopping the group tells the consumer and closes the socket.
        let (status, _) = call(&s, "DELETE", "/groups/g", None, None).await;
        assert_eq!(status, 204);
        let e = next_of(&mut ws, "error", &mut skipped).await;
        assert_eq!(e["error"]["code"], "group_stopped");
        assert!(next_json(&mut ws).await.is_none());
    })
    .await;
    s.stop().await;
}

#[tokio::test]
async fn http_errors() {
    let s = start(open_config()).await;
    within(60, async {
        for path in ["/groups/nope", "/groups/nope/parked"] {
            let (status, body) = s.get(path).await;
            assert_eq!(status, 404, "{path}");
            assert_eq!(body["error"]["code"], "group_not_found");
        }
        let (status, _) = call(&s, "DELETE", "/groups/nope", None, None).await;
        assert_eq!(status, 404);
        let (status, _) = call(&s, "POST", "/groups/nope/parked/replay", None, None).await;
        assert_eq!(status, 404);
        let err = tokio_tungstenite::connect_async(format!("ws://{}/groups/nope/ws", s.addr)).await;
        match err {
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status().as_u16(), 404),
            other => panic!("expected a 404 handshake, got {:?}", other.map(|_| ())),
        }

        for (body, why) in [
            (json!({}), "no stream"),
            (json!({ "stream": "s-1", "start_from": "middle" }), "bad start_from"),
            (json!({ "stream": "s-1", "extra": 1 }), "unknown field"),
            (json!({ "stream": "s-1", "filter": { "category": "s" } }), "filter on a stream"),
            (json!({ "stream": "$all", "filter": { "after": "yesterday" } }), "bad time"),
            (json!({ "stream": "s-1", "ack_timeout_ms": 0 }), "zero ack timeout"),
            (json!({ "stream": "" }), "empty stream"),
        ] {
            let (status, body) = create(&s, "g", body).await;
            assert_eq!(status, 400, "{why}: {body}");
            assert!(body["error"]["code"].is_string());
        }
        let resp = s
            .client
            .put(s.url("/groups/g"))
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .await
            .expect("put");
        assert_eq!(resp.status().as_u16(), 400);

        let long = "x".repeat(201);
        let (status, body) = create(&s, &long, json!({ "stream": "s-1" })).await;
        assert_eq!(status, 400);
        assert_eq!(body["error"]["code"], "invalid_name");
        let (status, _) = create(&s, "bad%01name", json!({ "stream": "s-1" })).await;
        assert_eq!(status, 400);

        // Idempotent with the same settings, 409 with others.
        let (status, _) = create(&s, "g", json!({ "stream": "s-1" })).await;
        assert_eq!(status, 201);
        let (status, _) =
            create(&s, "g", json!({ "stream": "s-1", "start_from": "start", "max_retries": 4 })).await;
        assert_eq!(status, 200);
        let (status, body) = create(&s, "g", json!({ "stream": "s-2" })).await;
        assert_eq!(status, 409);
        assert_eq!(body["error"]["details"]["running"]["stream"], "s-1");

        let (status, _) = call(&s, "POST", "/groups/g/parked/replay", None, None).await;
        assert_eq!(status, 200);
        let (status, body) =
            call(&s, "POST", "/groups/g/parked/replay", Some(json!({ "positions": "all" })), None).await;
        assert_eq!(status, 400, "{body}");
        let err =
            tokio_tungstenite::connect_async(format!("ws://{}/groups/g/ws?max_in_flight=0", s.addr)).await;
        assert!(matches!(err, Err(tokio_tungstenite::tungstenite::Error::Http(ref r)) if r.status() == 400));

        // Deleting stops it; it can be created again with other settings.
        let (status, _) = call(&s, "DELETE", "/groups/g", None, None).await;
        assert_eq!(status, 204);
        let (status, _) = s.get("/groups/g").await;
        assert_eq!(status, 404);
        let (status, _) = create(&s, "g", json!({ "stream": "s-2" })).await;
        assert_eq!(status, 201);
    })
    .await;
    s.stop().await;
}

/// A misspelt pull parameter (`wait` for `wait_ms`, `consumer_id`) must
/// not be ignored: the pull, settle and WebSocket consumer queries refuse
/// unknown parameters (`400 invalid_query`).
#[tokio::test]
async fn group_consumer_queries_refuse_unknown_parameters() {
    let s = start(open_config()).await;
    within(60, async {
        let (status, _) = create(&s, "q", json!({ "stream": "jobs-q" })).await;
        assert_eq!(status, 201);
        let (status, body) = call(&s, "POST", "/groups/q/next?consumer=p&wait=5000", None, None).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "invalid_query");
        let (status, body) =
            call(&s, "POST", "/groups/q/ack?consumer=p&id=3", Some(json!({ "delivery_ids": [] })), None)
                .await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "invalid_query");
        let err =
            tokio_tungstenite::connect_async(format!("ws://{}/groups/q/ws?max_inflight=1", s.addr)).await;
        assert!(matches!(err, Err(tokio_tungstenite::tungstenite::Error::Http(ref r)) if r.status() == 400));
        // Known parameters still pass.
        let (status, body) = call(&s, "POST", "/groups/q/next?consumer=p&max=1&wait_ms=0", None, None).await;
        assert_eq!(status, 200, "{body}");
    })
    .await;
    s.stop().await;
}

#[tokio::test]
async fn roles() {
    let mut config = ServerConfig::default();
    config.auth.api_keys = vec![
        ApiKeyConfig { name: "reader".into(), key: READER_KEY.into(), role: Role::Reader, streams: None },
        ApiKeyConfig { name: "writer".into(), key: WRITER_KEY.into(), role: Role::Writer, streams: None },
    ];
    let s = start(config).await;
    within(60, async {
        let body = json!({ "stream": "s-1" });
        let (status, _) = call(&s, "PUT", "/groups/g", Some(body.clone()), None).await;
        assert_eq!(status, 401);
        let (status, b) = call(&s, "PUT", "/groups/g", Some(body.clone()), Some(READER_KEY)).await;
        assert_eq!(status, 403, "{b}");
        let (status, _) = call(&s, "PUT", "/groups/g", Some(body.clone()), Some(WRITER_KEY)).await;
        assert_eq!(status, 201);
        // A system stream needs admin, as for reads.
        let (status, _) =
            call(&s, "PUT", "/groups/sys", Some(json!({ "stream": "$dlq-g" })), Some(WRITER_KEY)).await;
        assert_eq!(status, 403);

        for path in ["/groups", "/groups/g", "/groups/g/parked"] {
            let (status, _) = call(&s, "GET", path, None, None).await;
            assert_eq!(status, 401, "{path}");
            let (status, b) = call(&s, "GET", path, None, Some(READER_KEY)).await;
            assert_eq!(status, 200, "{path}: {b}");
        }
        let (status, _) = call(&s, "POST", "/groups/g/parked/replay", None, Some(READER_KEY)).await;
        assert_eq!(status, 403);
        let (status, _) = call(&s, "DELETE", "/groups/g", None, Some(READER_KEY)).await;
        assert_eq!(status, 403);

        let ws = |key: &str| format!("ws://{}/groups/g/ws?consumer=x&access_token={key}", s.addr);
        let err = tokio_tungstenite::connect_async(ws(READER_KEY)).await;
        assert!(matches!(err, Err(tokio_tungstenite::tungstenite::Error::Http(ref r)) if r.status() == 403));
        let (mut c, _) = tokio_tungstenite::connect_async(ws(WRITER_KEY)).await.expect("writer consumes");
        c.close(None).await.expect("close");

        let (status, _) = call(&s, "DELETE", "/groups/g", None, Some(WRITER_KEY)).await;
        assert_eq!(status, 204);
    })
    .await;
    s.stop().await;
}

/// Group names are shared by every principal, but a principal confined to
/// stream prefixes must not learn, through a name clash, the settings of a
/// group over streams it may not see.
#[tokio::test]
async fn a_name_clash_does_not_reveal_another_principals_group() {
    const HR_KEY: &str = "hr-writer-key-0123456789";
    const BILLING_KEY: &str = "billing-writer-key-0123";
    let mut config = ServerConfig::default();
    config.auth.api_keys = vec![
        ApiKeyConfig {
            name: "hr".into(),
            key: HR_KEY.into(),
            role: Role::Writer,
            streams: Some(vec!["hr-".into()]),
        },
        ApiKeyConfig {
            name: "billing".into(),
            key: BILLING_KEY.into(),
            role: Role::Writer,
            streams: Some(vec!["billing-".into()]),
        },
    ];
    let s = start(config).await;
    within(60, async {
        let hr =
            json!({ "stream": "$all", "filter": { "stream_prefix": "hr-salaries-", "type": "RaiseGiven" } });
        let (status, _) = call(&s, "PUT", "/groups/audit", Some(hr.clone()), Some(HR_KEY)).await;
        assert_eq!(status, 201);
        // The owner learns what runs under the name.
        let (status, b) =
            call(&s, "PUT", "/groups/audit", Some(json!({ "stream": "hr-1" })), Some(HR_KEY)).await;
        assert_eq!(status, 409, "{b}");
        assert_eq!(b["error"]["details"]["running"]["filter"]["stream_prefix"], "hr-salaries-");
        // Another tenant is told the name is taken, and nothing else.
        let (status, b) =
            call(&s, "PUT", "/groups/audit", Some(json!({ "stream": "billing-1" })), Some(BILLING_KEY)).await;
        assert_eq!(status, 409, "{b}");
        assert_eq!(b["error"]["code"], "group_exists");
        assert!(!b.to_string().contains("hr-"), "leaks the other group: {b}");
    })
    .await;
    s.stop().await;
}

/// A park reason is stored in the dead-letter event, which has the store's
/// event size limit: one too big to store is refused (400), instead of a
/// `settled` answer for a message that was not parked (the park failed and
/// the message came back later).
#[tokio::test]
async fn an_oversized_park_reason_is_refused() {
    let s = start(open_config()).await;
    within(60, async {
        let (status, _) = create(&s, "dl", json!({ "stream": "jobs-dl" })).await;
        assert_eq!(status, 201);
        s.append("jobs-dl", "any", json!([event("Job", json!({}))])).await;
        let (status, body) =
            call(&s, "POST", "/groups/dl/next?consumer=p&max=1&wait_ms=5000", None, None).await;
        assert_eq!(status, 200, "{body}");
        let id = body["deliveries"][0]["delivery_id"].as_u64().expect("a delivery");
        let nack = |reason: String| json!({ "delivery_ids": [id], "action": "park", "reason": reason });
        let (status, body) =
            call(&s, "POST", "/groups/dl/nack?consumer=p", Some(nack("x".repeat(2 * 1024 * 1024))), None)
                .await;
        assert_eq!(status, 400, "{body}");
        // Still in flight with the consumer: a normal reason parks it.
        let (status, body) =
            call(&s, "POST", "/groups/dl/nack?consumer=p", Some(nack("bad job".into())), None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["settled"], json!([id]));
        let mut parked = Value::Null;
        for _ in 0..100 {
            let (_, body) = s.get("/groups/dl/parked").await;
            parked = body["parked"].clone();
            if parked.as_array().is_some_and(|p| !p.is_empty()) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(parked[0]["reason"], "bad job", "{parked}");
    })
    .await;
    s.stop().await;
}

/// A long-poll ends before the whole-request timeout: with
/// `timeouts.request_secs` below the `wait_ms` asked for, an empty pull is
/// still an empty list, not `503 timeout` (which says "the outcome is
/// unknown, retry").
#[tokio::test]
async fn a_long_poll_ends_within_the_request_timeout() {
    let mut config = open_config();
    config.timeouts.request_secs = 2;
    let s = start(config).await;
    within(60, async {
        let (status, _) = create(&s, "lp", json!({ "stream": "jobs-lp" })).await;
        assert_eq!(status, 201);
        let (status, body) = call(&s, "POST", "/groups/lp/next?consumer=p&wait_ms=5000", None, None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["deliveries"], json!([]));
    })
    .await;
    s.stop().await;
}

#[tokio::test]
async fn http_pull_consumer_acks_and_nacks() {
    let s = start(open_config()).await;
    within(60, async {
        let (status, _) = create(&s, "pull", json!({ "stream": "jobs-1", "ack_timeout_ms": 600_000 })).await;
        assert_eq!(status, 201);
        // Nothing yet: a short long-poll returns an empty batch.
        let (status, body) =
            call(&s, "POST", "/groups/pull/next?consumer=p&max=3&wait_ms=50", None, None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["deliveries"], json!([]));

        let events: Vec<Value> = (0..5).map(|i| event("Job", json!({ "i": i }))).collect();
        s.append("jobs-1", "any", Value::Array(events)).await;

        // At most `max` per call, and never more than max_in_flight unsettled.
        let mut got = Vec::new();
        while got.len() < 3 {
            let (status, body) =
                call(&s, "POST", "/groups/pull/next?consumer=p&max=3&wait_ms=5000", None, None).await;
            assert_eq!(status, 200, "{body}");
            got.extend(body["deliveries"].as_array().expect("array").iter().cloned());
        }
        assert_eq!(got.len(), 3);
        let ids: Vec<u64> = got.iter().map(|d| d["delivery_id"].as_u64().expect("id")).collect();
        let versions: Vec<u64> =
            got.iter().map(|d| d["event"]["version"].as_u64().expect("version")).collect();
        assert_eq!(versions, vec![0, 1, 2]);

        let (status, body) = call(
            &s,
            "POST",
            "/groups/pull/ack?consumer=p",
            Some(json!({ "delivery_ids": [ids[0], ids[1], 999] })),
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["settled"], json!([ids[0], ids[1]]));
        assert_eq!(body["errors"][0]["delivery_id"], 999);
        assert_eq!(body["errors"][0]["error"]["code"], "unknown_delivery");

        let (status, body) = call(
            &s,
            "POST",
            "/groups/pull/nack?consumer=p",
            Some(json!({ "delivery_ids": [ids[2]], "action": "park", "reason": "no worker" })),
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["settled"], json!([ids[2]]));
        let (_, body) = s.get("/groups/pull/parked").await;
        assert_eq!(body["parked"][0]["reason"], "no worker");
        assert_eq!(body["parked"][0]["version"], 2);

        let mut rest = Vec::new();
        while rest.len() < 2 {
            let (_, body) =
                call(&s, "POST", "/groups/pull/next?consumer=p&max=10&wait_ms=5000", None, None).await;
            rest.extend(body["deliveries"].as_array().expect("array").iter().cloned());
        }
        let versions: Vec<u64> =
            rest.iter().map(|d| d["event"]["version"].as_u64().expect("version")).collect();
        assert_eq!(versions, vec![3, 4]);

        // Error cases.
        let (status, body) = call(
            &s,
            "POST",
            "/groups/pull/ack?consumer=stranger",
            Some(json!({ "delivery_ids": [1] })),
            None,
        )
        .await;
        assert_eq!(status, 404);
        assert_eq!(body["error"]["code"], "consumer_not_found");
        let (status, _) =
            call(&s, "POST", "/groups/pull/nack?consumer=p", Some(json!({ "delivery_ids": [1] })), None)
                .await;
        assert_eq!(status, 400, "nack without action");
        let (status, _) = call(&s, "POST", "/groups/pull/next?max=1", None, None).await;
        assert_eq!(status, 400, "consumer is required");
        let (status, _) = call(&s, "POST", "/groups/pull/next?consumer=p&wait_ms=999999", None, None).await;
        assert_eq!(status, 400);
        let (status, _) = call(&s, "POST", "/groups/nope/next?consumer=p", None, None).await;
        assert_eq!(status, 404);
    })
    .await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_survive_a_restart_and_resume_after_the_last_ack() {
    let store: std::sync::Arc<dyn annals_core::Store> = std::sync::Arc::new(annals_core::MemoryStore::new());
    let listen = || async { tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind") };

    // First server: two groups defined, one deleted again; 4 of 10 acked.
    let s = common::start_with_store(listen().await, store.clone(), open_config()).await;
    let settings = json!({ "stream": "$all", "filter": { "category": "pay" }, "max_retries": 2, "ack_timeout_ms": 5000 });
    within(30, async {
        assert_eq!(create(&s, "payments", settings.clone()).await.0, 201);
        assert_eq!(create(&s, "scratch", json!({ "stream": "pay-1" })).await.0, 201);
        assert_eq!(call(&s, "DELETE", "/groups/scratch", None, None).await.0, 204);
        let events: Vec<Value> = (0..10).map(|n| event("Paid", json!({ "n": n }))).collect();
        assert_eq!(s.append("pay-1", "any", Value::Array(events)).await.0, 201);

        let mut ws = consumer(&s, "payments", "a", 1).await;
        let mut others = Vec::new();
        for expected in 0..4u64 {
            let d = next_delivery(&mut ws, &mut others).await;
            assert_eq!(d["event"]["data"]["n"], expected, "{d}");
            send(&mut ws, json!({ "type": "ack", "delivery_id": d["delivery_id"] })).await;
            next_of(&mut ws, "acked", &mut others).await;
        }
    })
    .await;
    s.stop().await;

    // Second server on the same store: the group runs again, with the same
    // settings, before anyone defines it, and resumes after the acked four
    // (the fifth was in flight, unacked, at the restart: it comes again).
    let s = common::start_with_store(listen().await, store.clone(), open_config()).await;
    within(30, async {
        let (status, body) = s.get("/groups").await;
        assert_eq!(status, 200);
        let groups = body["groups"].as_array().expect("groups");
        assert_eq!(groups.len(), 1, "only the undeleted group comes back: {body}");
        assert_eq!(groups[0]["group"], "payments");
        assert_eq!(groups[0]["filter"]["category"], "pay");
        assert_eq!(groups[0]["max_retries"], 2);
        assert_eq!(groups[0]["ack_timeout_ms"], 5000);
        // Same settings: PUT confirms rather than conflicts.
        assert_eq!(create(&s, "payments", settings.clone()).await.0, 200);

        let mut ws = consumer(&s, "payments", "b", 10).await;
        let mut others = Vec::new();
        for expected in 4..10u64 {
            let d = next_delivery(&mut ws, &mut others).await;
            assert_eq!(d["event"]["data"]["n"], expected, "nothing acked comes again: {d}");
            send(&mut ws, json!({ "type": "ack", "delivery_id": d["delivery_id"] })).await;
        }
    })
    .await;
    s.stop().await;
}

#[tokio::test]
async fn a_server_with_groups_disabled_neither_runs_nor_restores_them() {
    let store: std::sync::Arc<dyn annals_core::Store> = std::sync::Arc::new(annals_core::MemoryStore::new());
    let listen = || async { tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind") };
    let s = common::start_with_store(listen().await, store.clone(), open_config()).await;
    assert_eq!(create(&s, "payments", json!({ "stream": "pay-1" })).await.0, 201);
    s.stop().await;

    // Another process on the same store, with groups off.
    let mut config = open_config();
    config.groups.enabled = false;
    let s = common::start_with_store(listen().await, store.clone(), config).await;
    for (method, path, body) in [
        ("PUT", "/groups/payments", Some(json!({ "stream": "pay-1" }))),
        ("GET", "/groups", None),
        ("GET", "/groups/payments", None),
        ("POST", "/groups/payments/next?consumer=a", None),
    ] {
        let (status, body) = call(&s, method, path, body, None).await;
        assert_eq!(status, 503, "{method} {path}: {body}");
        assert_eq!(body["error"]["code"], "groups_disabled", "{method} {path}: {body}");
    }
    assert_eq!(s.get("/info").await.1["groups"], "disabled");
    s.stop().await;

    // The definition is still there for a server that runs groups.
    let s = common::start_with_store(listen().await, store, open_config()).await;
    let (_, body) = s.get("/groups").await;
    assert_eq!(body["groups"][0]["group"], "payments", "{body}");
    s.stop().await;
}

/// A long-poll did not notice the shutdown: the drain waited for it (up to
/// its 25 s) and, with a shorter `timeouts.shutdown_secs`, cut it off, so
/// the client got a broken connection instead of an answer. It now ends
/// at once with what it has (here nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_poll_ends_with_an_answer_on_shutdown() {
    let mut config = open_config();
    config.timeouts.shutdown_secs = 2;
    let s = start(config).await;
    within(60, async {
        let (status, _) = create(&s, "lp-bye", json!({ "stream": "jobs-lp-bye" })).await;
        assert_eq!(status, 201);
        let poll = s.client.post(s.url("/groups/lp-bye/next?consumer=p&wait_ms=20000")).send();
        let poll = tokio::spawn(poll);
        // The pull consumer exists once the long-poll has started.
        wait_consumers(&s, "lp-bye", 1).await;
        s.stop().await;
        let resp = poll.await.expect("join").expect("the long-poll gets an answer");
        assert_eq!(resp.status(), 200);
        let body: Value = resp.json().await.expect("json");
        assert_eq!(body["deliveries"], json!([]), "{body}");
    })
    .await;
}

/// A client message the socket cannot read (over 64 KiB, or not a valid
/// frame) closed a group consumer without a word, so the client could not
/// tell a server bug from its own. It now gets an `error` (code
/// `protocol_error`) first; its unsettled messages go back to the group
/// as on any close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_consumer_message_is_answered_before_the_close() {
    let s = start(open_config()).await;
    within(60, async {
        create(&s, "big", json!({ "stream": "s-big" })).await;
        let mut ws = consumer(&s, "big", "c", 1).await;
        wait_consumers(&s, "big", 1).await;
        let huge = json!({ "type": "ack", "delivery_id": 1, "pad": "x".repeat(70 * 1024) });
        // The server may close before the whole frame is written.
        let _ = ws.send(Message::Text(huge.to_string().into())).await;
        let e = next_json(&mut ws).await.expect("an error before the socket closes");
        assert_eq!(e["type"], "error", "{e}");
        assert_eq!(e["error"]["code"], "protocol_error", "{e}");
        assert!(e["error"]["message"].as_str().is_some_and(|m| m.contains("64 KiB")), "{e}");
        assert!(next_json(&mut ws).await.is_none(), "then the socket closes");
    })
    .await;
    s.stop().await;
}

/// A consumer whose peer is gone without a close (a dead host, a dropped
/// NAT entry) still took its share of deliveries: small messages fit the
/// socket buffers, so no send ever timed out, and with no keepalive the
/// server never noticed. Each of those messages waited out its ack
/// timeout, counted as a failed attempt and, with retries used up, was
/// parked although a healthy consumer was there all along. Group sockets
/// are now pinged like live ones (`live.ws_ping_ms`); a consumer silent
/// for three intervals is dropped and its messages go to the others at
/// once. The dead peer here is a client that is never polled again, so it
/// answers no ping.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_stops_answering_pings_is_dropped_and_its_messages_go_to_the_others() {
    let mut config = open_config();
    config.live.ws_ping_ms = 100;
    let s = start(config).await;
    within(60, async {
        let (status, body) =
            create(&s, "dead", json!({ "stream": "jobs-dead", "ack_timeout_ms": 10_000, "max_retries": 0 }))
                .await;
        assert_eq!(status, 201, "{body}");
        let mut alive = consumer(&s, "dead", "alive", 100).await;
        let silent = consumer(&s, "dead", "silent", 100).await;
        wait_consumers(&s, "dead", 2).await;
        let events: Vec<Value> = (0..10).map(|i| event("Job", json!({ "i": i }))).collect();
        s.append("jobs-dead", "any", Value::Array(events)).await;
        let mut seen = BTreeSet::new();
        let mut others = Vec::new();
        while seen.len() < 10 {
            let d = next_delivery(&mut alive, &mut others).await;
            seen.insert(d["event"]["data"]["i"].as_u64().expect("i"));
            send(&mut alive, json!({ "type": "ack", "delivery_id": d["delivery_id"] })).await;
        }
        let (_, body) = s.get("/groups/dead/parked").await;
        assert_eq!(body["parked"], json!([]), "{body}");
        drop(silent);
    })
    .await;
    s.stop().await;
}
