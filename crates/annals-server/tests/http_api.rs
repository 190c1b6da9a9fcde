//! The HTTP/JSON API over a real socket (and a few `oneshot` calls).

mod common;

use std::sync::Arc;

use annals_server::{AppState, app};
use axum::{body::Body, http::Request};
use common::{event, open_config, start, within};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

#[tokio::test]
async fn append_read_conflict_and_idempotency() {
    within(60, async {
        let s = start(open_config()).await;
        let id = "0190f0b4-0000-7000-8000-0000000000a1";
        let batch =
            json!([{ "id": id, "type": "Opened", "data": { "owner": "Ada" }, "metadata": { "actor": "t" } }]);
        let (status, body) = s.append("account-1", "no_stream", batch.clone()).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(
            body,
            json!({ "stream": "account-1", "next_version": 1, "last_version": 0, "position": 0 })
        );

        // Re-sending the same ids returns the original result, writes nothing.
        let (status, again) = s.append("account-1", "no_stream", batch).await;
        assert_eq!(status, 201);
        assert_eq!(again, body);

        // Conflict: 409 with expected and actual.
        let (status, err) = s.append("account-1", "no_stream", json!([event("Other", json!({}))])).await;
        assert_eq!(status, 409);
        assert_eq!(err["error"]["code"], "wrong_expected_version");
        assert_eq!(err["error"]["details"]["expected"], "no_stream");
        assert_eq!(err["error"]["details"]["actual"], 0);
        let (status, err) = s.append("nobody-1", "stream_exists", json!([event("X", json!({}))])).await;
        assert_eq!(status, 409);
        assert_eq!(err["error"]["details"]["actual"], Value::Null);

        // Expected version in the header.
        let resp = s
            .client
            .post(s.url("/streams/account-1"))
            .header("ES-ExpectedVersion", "0")
            .json(&json!([event("Deposited", json!({ "amount": 5 }))]))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        assert!(resp.headers().contains_key("x-request-id"));
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["last_version"], 1);

        let (status, page) = s.get("/streams/account-1").await;
        assert_eq!(status, 200);
        let events = page["events"].as_array().unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0]["id"], id);
        assert_eq!(events[0]["type"], "Opened");
        assert_eq!(events[0]["data"], json!({ "owner": "Ada" }));
        assert_eq!(events[0]["metadata"], json!({ "actor": "t" }));
        assert_eq!(events[0]["content_type"], "application/json");
        assert_eq!(events[1]["version"], 1);
        let at = events[0]["recorded_at"].as_str().unwrap();
        assert!(at.ends_with('Z') && at.len() == "2026-11-22T18:57:23.123456Z".len(), "{at}");
        assert!(events[0]["recorded_at_micros"].as_i64().unwrap() > 0);
        s.stop().await;
    })
    .await;
}

#[tokio::test]
async fn stream_paging_forward_and_backward() {
    within(60, async {
        let s = start(open_config()).await;
        let events: Vec<Value> = (0..7).map(|i| event("Tick", json!({ "i": i }))).collect();
        assert_eq!(s.append("clock-1", "any", Value::Array(events)).await.0, 201);

        let mut seen = Vec::new();
        let mut path = "/streams/clock-1?limit=3".to_owned();
        loop {
            let (status, page) = s.get(&path).await;
            assert_eq!(status, 200);
            seen.extend(page["events"].as_array().unwrap().iter().map(|e| e["data"]["i"].as_u64().unwrap()));
            match page["links"]["next"].as_str() {
                Some(next) => path = next.to_owned(),
                None => break,
            }
        }
        assert_eq!(seen, vec![0, 1, 2, 3, 4, 5, 6]);

        let (_, page) = s.get("/streams/clock-1?direction=backward&limit=2").await;
        let versions: Vec<u64> =
            page["events"].as_array().unwrap().iter().map(|e| e["version"].as_u64().unwrap()).collect();
        assert_eq!(versions, vec![6, 5]);
        assert_eq!(page["next"], 4);
        let (_, page) = s.get("/streams/clock-1?from=2&limit=2").await;
        assert_eq!(page["events"][0]["version"], 2);

        let (status, err) = s.get("/streams/missing-1").await;
        assert_eq!(status, 404);
        assert_eq!(err["error"]["code"], "stream_not_found");
        let (status, err) = s.get("/streams/clock-1?limit=abc").await;
        assert_eq!(status, 400);
        assert_eq!(err["error"]["code"], "invalid_query");
        let (status, _) = s.get("/streams/clock-1?from=soon").await;
        assert_eq!(status, 400);
        s.stop().await;
    })
    .await;
}

#[tokio::test]
async fn transactions_are_atomic() {
    within(60, async {
        let s = start(open_config()).await;
        let body = json!({ "streams": [
            { "stream": "from-1", "expected": "no_stream", "events": [event("Debited", json!({ "n": 1 }))] },
            { "stream": "to-1", "expected": "no_stream", "events": [event("Credited", json!({ "n": 1 }))] },
        ]});
        let resp = s.client.post(s.url("/transactions")).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 201);
        let out: Value = resp.json().await.unwrap();
        assert_eq!(out["results"][0]["stream"], "from-1");
        assert_eq!(out["results"][0]["position"], 0);
        assert_eq!(out["results"][1]["position"], 1);

        // Second part conflicts: nothing is written to the first.
        let body = json!({ "streams": [
            { "stream": "from-1", "expected": 0, "events": [event("Debited", json!({ "n": 2 }))] },
            { "stream": "to-1", "expected": 5, "events": [event("Credited", json!({ "n": 2 }))] },
        ]});
        let resp = s.client.post(s.url("/transactions")).json(&body).send().await.unwrap();
        assert_eq!(resp.status(), 409);
        let (_, page) = s.get("/streams/from-1").await;
        assert_eq!(page["events"].as_array().unwrap().len(), 1);

        let resp =
            s.client.post(s.url("/transactions")).json(&json!({ "streams": [] })).send().await.unwrap();
        assert_eq!(resp.status(), 400);
        s.stop().await;
    })
    .await;
}

#[tokio::test]
async fn all_with_filters_and_paging_links() {
    within(60, async {
        let s = start(open_config()).await;
        let resp = s
            .client
            .post(s.url("/streams/order-1"))
            .header("X-Correlation-Id", "corr-7")
            .json(&json!([event("OrderPlaced", json!({})), event("OrderPaid", json!({}))]))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        s.append("order-2", "any", json!([event("OrderPlaced", json!({}))])).await;
        s.append("customer-1", "any", json!([event("CustomerJoined", json!({}))])).await;
        s.append("orderly-1", "any", json!([event("Misc", json!({}))])).await;

        let count = |v: &Value| v["events"].as_array().unwrap().len();
        let (_, all) = s.get("/all").await;
        assert_eq!(count(&all), 5);
        assert_eq!(all["head"], 5);
        let (_, v) = s.get("/all?category=order").await;
        assert_eq!(count(&v), 3);
        let (_, v) = s.get("/all?stream_prefix=order").await;
        assert_eq!(count(&v), 4);
        let (_, v) = s.get("/all?type=OrderPlaced").await;
        assert_eq!(count(&v), 2);
        let (_, v) = s.get("/all?type_prefix=Order").await;
        assert_eq!(count(&v), 3);
        let (_, v) = s.get("/all?type=OrderPaid,CustomerJoined").await;
        assert_eq!(count(&v), 2);
        let (_, v) = s.get("/all?correlation_id=corr-7").await;
        assert_eq!(count(&v), 2);
        assert_eq!(v["events"][0]["metadata"]["correlation_id"], "corr-7");
        let (_, v) = s.get("/all?after=2999-01-01T00:00:00Z").await;
        assert_eq!(count(&v), 0);
        let (_, v) = s.get("/all?before=2999-01-01T00:00:00Z&after=0").await;
        assert_eq!(count(&v), 5);
        let (status, v) = s.get("/all?after=yesterday").await;
        assert_eq!(status, 400, "{v}");
        let (_, v) = s.get("/all?direction=backward&limit=2").await;
        let positions: Vec<u64> =
            v["events"].as_array().unwrap().iter().map(|e| e["position"].as_u64().unwrap()).collect();
        assert_eq!(positions, vec![4, 3]);

        // Following `links.next` pages through a filtered view.
        let mut path = "/all?limit=1&category=order".to_owned();
        let mut streams = Vec::new();
        for _ in 0..10 {
            let (_, page) = s.get(&path).await;
            let events = page["events"].as_array().unwrap();
            if events.is_empty() {
                break;
            }
            streams.extend(events.iter().map(|e| e["stream"].as_str().unwrap().to_owned()));
            path = page["links"]["next"].as_str().unwrap().to_owned();
        }
        assert_eq!(streams, vec!["order-1", "order-1", "order-2"]);
        s.stop().await;
    })
    .await;
}

#[tokio::test]
async fn info_delete_and_tombstone() {
    within(60, async {
        let s = start(open_config()).await;
        s.append("cart-1", "any", json!([event("Added", json!({}))])).await;
        let (status, info) = s.get("/streams/cart-1/info").await;
        assert_eq!(status, 200);
        assert_eq!(info["exists"], true);
        assert_eq!(info["last_version"], 0);
        assert_eq!(info["deletion"], "live");

        let resp = s.client.delete(s.url("/streams/cart-1")).send().await.unwrap();
        assert_eq!(resp.status(), 204);
        assert_eq!(s.get("/streams/cart-1").await.0, 404);
        // Recreated after a soft delete, numbering continues.
        let (status, body) = s.append("cart-1", "no_stream", json!([event("Added", json!({}))])).await;
        assert_eq!(status, 201);
        assert_eq!(body["last_version"], 1);

        let resp = s.client.delete(s.url("/streams/cart-1?hard=true&expected=5")).send().await.unwrap();
        assert_eq!(resp.status(), 409);
        let resp = s.client.delete(s.url("/streams/cart-1?hard=true")).send().await.unwrap();
        assert_eq!(resp.status(), 204);
        let (status, err) = s.get("/streams/cart-1").await;
        assert_eq!(status, 410);
        assert_eq!(err["error"]["code"], "stream_deleted");
        assert_eq!(s.append("cart-1", "any", json!([event("Added", json!({}))])).await.0, 410);
        s.stop().await;
    })
    .await;
}

#[tokio::test]
async fn snapshots_and_checkpoints() {
    within(60, async {
        let s = start(open_config()).await;
        let events: Vec<Value> = (0..8).map(|i| event("Deposited", json!({ "amount": i }))).collect();
        assert_eq!(s.append("account-9", "no_stream", Value::Array(events)).await.0, 201);
        for (v, balance) in [(3, 30), (7, 70)] {
            let resp = s
                .client
                .put(s.url("/streams/account-9/snapshot"))
                .json(&json!({ "version": v, "data": { "balance": balance } }))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 201);
        }
        let (status, snap) = s.get("/streams/account-9/snapshot").await;
        assert_eq!(status, 200);
        assert_eq!(snap["version"], 7);
        assert_eq!(snap["data"], json!({ "balance": 70 }));
        assert_eq!(snap["schema_version"], 1);
        let (_, snap) = s.get("/streams/account-9/snapshot?version=5").await;
        assert_eq!(snap["version"], 3);
        let (status, err) = s.get("/streams/account-9/snapshot?version=1").await;
        assert_eq!(status, 404);
        assert_eq!(err["error"]["code"], "snapshot_not_found");

        let resp = s
            .client
            .put(s.url("/checkpoints/projector-a"))
            .json(&json!({ "position": 42 }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 204);
        let (status, cp) = s.get("/checkpoints/projector-a").await;
        assert_eq!(status, 200);
        assert_eq!(cp, json!({ "name": "projector-a", "position": 42 }));
        assert_eq!(s.get("/checkpoints/unknown").await.0, 404);
        s.stop().await;
    })
    .await;
}

/// A snapshot says which stream version its state includes. One past the
/// stream's last event cannot have been derived from it, and a loader
/// would start from it and skip the events written up to that version:
/// such a save is refused (409), nothing stored.
#[tokio::test]
async fn a_snapshot_ahead_of_its_stream_is_refused() {
    within(60, async {
        let s = start(open_config()).await;
        s.append("acct-5", "any", json!([event("A", json!({})), event("B", json!({}))])).await;
        let put = |stream: &'static str, version: u64| {
            s.client
                .put(s.url(&format!("/streams/{stream}/snapshot")))
                .json(&json!({ "version": version, "data": { "v": version } }))
                .send()
        };
        for (stream, version) in [("acct-5", 2), ("acct-5", 100), ("nobody-5", 0)] {
            let resp = put(stream, version).await.unwrap();
            assert_eq!(resp.status(), 409, "{stream}@{version}");
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["error"]["code"], "snapshot_ahead_of_stream", "{v}");
            assert_eq!(v["error"]["details"]["version"], version);
        }
        let (status, _) = s.get("/streams/acct-5/snapshot").await;
        assert_eq!(status, 404, "nothing was stored");
        // At or below the last version: saved.
        assert_eq!(put("acct-5", 1).await.unwrap().status(), 201);
        assert_eq!(put("acct-5", 0).await.unwrap().status(), 201);
        let (_, snap) = s.get("/streams/acct-5/snapshot").await;
        assert_eq!(snap["version"], 1);
        s.stop().await;
    })
    .await;
}

#[tokio::test]
async fn binary_events_round_trip_as_base64() {
    within(60, async {
        let s = start(open_config()).await;
        let (status, body) = s
            .append(
                "blob-1",
                "any",
                json!([{ "type": "Blob", "content_type": "application/octet-stream", "data": "AAECAw==" }]),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let (_, page) = s.get("/streams/blob-1").await;
        assert_eq!(page["events"][0]["content_type"], "application/octet-stream");
        assert_eq!(page["events"][0]["data"], "AAECAw==");
        let (status, _) = s
            .append(
                "blob-1",
                "any",
                json!([{ "type": "Blob", "content_type": "application/octet-stream", "data": "!!" }]),
            )
            .await;
        assert_eq!(status, 400);
        s.stop().await;
    })
    .await;
}

#[tokio::test]
async fn malformed_oversized_and_invalid_requests_get_json_errors() {
    within(60, async {
        let mut config = open_config();
        config.limits.max_body_bytes = 4096;
        let s = start(config).await;
        let post = |path: &str, ct: Option<&str>, body: Vec<u8>| {
            let mut req = s.client.post(s.url(path)).body(body);
            if let Some(ct) = ct {
                req = req.header("content-type", ct);
            }
            req.send()
        };
        let check = |resp: reqwest::Response, status: u16, code: &'static str| async move {
            assert_eq!(resp.status().as_u16(), status);
            assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("application/json"));
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["error"]["code"], code, "{v}");
            assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        };
        check(
            post("/streams/a-1", Some("application/json"), b"[{".to_vec()).await.unwrap(),
            400,
            "invalid_json",
        )
        .await;
        check(post("/streams/a-1", None, b"[]".to_vec()).await.unwrap(), 415, "unsupported_media_type").await;
        check(
            post("/streams/a-1", Some("application/json"), b"[]".to_vec()).await.unwrap(),
            400,
            "bad_request",
        )
        .await;
        check(
            post("/streams/a-1", Some("application/json"), b"{}".to_vec()).await.unwrap(),
            400,
            "invalid_json",
        )
        .await;
        check(
            post("/streams/a-1", Some("application/json"), br#"[{"type":"X","bogus":1}]"#.to_vec())
                .await
                .unwrap(),
            400,
            "invalid_json",
        )
        .await;
        check(
            post("/streams/a-1", Some("application/json"), br#"[{"type":"","data":{}}]"#.to_vec())
                .await
                .unwrap(),
            400,
            "invalid_input",
        )
        .await;
        let big = format!(r#"[{{"type":"X","data":"{}"}}]"#, "x".repeat(10_000));
        check(
            post("/streams/a-1", Some("application/json"), big.into_bytes()).await.unwrap(),
            413,
            "payload_too_large",
        )
        .await;
        check(
            post("/streams/%24system", Some("application/json"), b"[{\"type\":\"X\"}]".to_vec())
                .await
                .unwrap(),
            400,
            "invalid_input",
        )
        .await;
        check(
            post("/streams/a%0Ab", Some("application/json"), b"[{\"type\":\"X\"}]".to_vec()).await.unwrap(),
            400,
            "invalid_input",
        )
        .await;
        check(
            post("/streams/a-1?expected=soon", Some("application/json"), b"[{\"type\":\"X\"}]".to_vec())
                .await
                .unwrap(),
            400,
            "bad_request",
        )
        .await;
        // A correlation id no backend can index.
        check(
            post(
                "/streams/a-1",
                Some("application/json"),
                br#"[{"type":"X","metadata":{"correlation_id":"a\u0000b"}}]"#.to_vec(),
            )
            .await
            .unwrap(),
            400,
            "invalid_input",
        )
        .await;
        // Filters that can match nothing because of a control character.
        for query in
            ["/all?type=X%00", "/all?correlation_id=%0A", "/all?stream_prefix=a%01", "/streams?prefix=%00"]
        {
            check(s.client.get(s.url(query)).send().await.unwrap(), 400, "invalid_input").await;
        }
        check(s.client.get(s.url("/no/such/route")).send().await.unwrap(), 404, "not_found").await;
        check(s.client.patch(s.url("/streams/a-1")).send().await.unwrap(), 405, "method_not_allowed").await;
        // A WebSocket route hit without an upgrade is still a JSON error.
        let resp = s.client.get(s.url("/ws")).send().await.unwrap();
        assert!(resp.status().is_client_error());
        let v: Value = resp.json().await.unwrap();
        assert!(v["error"]["code"].is_string());
        // Nothing above wrote anything.
        let (_, all) = s.get("/all").await;
        assert_eq!(all["events"].as_array().unwrap().len(), 0);
        s.stop().await;
    })
    .await;
}

#[tokio::test]
async fn event_size_limit_maps_to_413() {
    within(60, async {
        let s = start(open_config()).await;
        let big = "x".repeat(1024 * 1024 + 10);
        let (status, err) = s.append("big-1", "any", json!([{ "type": "Big", "data": big }])).await;
        assert_eq!(status, 413);
        assert_eq!(err["error"]["code"], "limit_exceeded");
        s.stop().await;
    })
    .await;
}

#[tokio::test]
async fn operations_endpoints() {
    within(60, async {
        let s = start(open_config()).await;
        s.append("ops-1", "any", json!([event("A", json!({})), event("B", json!({}))])).await;
        s.append("ops-2", "any", json!([event("A", json!({}))])).await;
        assert_eq!(s.get("/health/live").await, (200, json!({ "status": "ok" })));
        let (status, ready) = s.get("/health/ready").await;
        assert_eq!(status, 200);
        assert_eq!(ready["head"], 3);
        let (_, info) = s.get("/info").await;
        assert_eq!(info["backend"], "memory");
        assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(info["groups"], "here", "the only process of its store runs the groups");
        let (_, stats) = s.get("/stats").await;
        assert_eq!(stats["events"], 3);
        assert_eq!(stats["streams"], 2);
        assert_eq!(stats["by_type"], json!({ "A": 2, "B": 1 }));
        let (_, list) = s.get("/streams").await;
        assert_eq!(
            list["streams"][0],
            json!({ "stream": "ops-1", "events": 2, "last_version": 1, "last_position": 1,
                    "exists": true, "deletion": "live" })
        );
        let (_, list) = s.get("/streams?prefix=ops-2").await;
        assert_eq!(list["streams"].as_array().unwrap().len(), 1);
        // Paging by name: `next` is the `after` of the following page.
        let (_, page) = s.get("/streams?limit=1").await;
        assert_eq!(page["streams"][0]["stream"], "ops-1");
        assert_eq!(page["next"], "ops-1");
        let (_, page) = s.get("/streams?limit=1&after=ops-1").await;
        assert_eq!(page["streams"][0]["stream"], "ops-2");
        assert_eq!(page["next"], Value::Null);
        let (status, v) = s.get("/streams?limit=abc").await;
        assert_eq!((status, v["error"]["code"].as_str()), (400, Some("invalid_query")));

        assert_eq!(s.metric("annals_appended_events_total").await, 3.0);
        assert_eq!(s.metric("annals_appends_total").await, 2.0);
        let text = s.client.get(s.url("/metrics")).send().await.unwrap().text().await.unwrap();
        for name in [
            "annals_http_requests_total",
            "annals_append_duration_seconds_bucket",
            "annals_appended_bytes_total",
        ] {
            assert!(text.contains(name), "missing {name}");
        }
        let (status, api) = s.get("/openapi.json").await;
        assert_eq!(status, 200);
        for path in
            ["/streams/{stream}", "/all", "/transactions", "/all/live", "/ws", "/streams/{stream}/snapshot"]
        {
            assert!(api["paths"].get(path).is_some(), "openapi lacks {path}");
        }
        for schema in ["StreamListOut", "StreamSummaryOut", "EventIn", "AppendOut"] {
            assert!(api["components"]["schemas"].get(schema).is_some(), "openapi lacks schema {schema}");
        }
        s.stop().await;
    })
    .await;
}

#[tokio::test]
async fn stats_count_every_event_past_the_scan_cap_for_an_admin_only() {
    within(60, async {
        const BILLING_KEY: &str = "billing-reader-key-0123";
        let mut config = open_config();
        // A cap far below the store's size: a scan stops after 4 events.
        config.limits.max_scan_events = 4;
        config.auth.api_keys = vec![annals_server::config::ApiKeyConfig {
            name: "billing".into(),
            key: BILLING_KEY.into(),
            role: annals_server::Role::Reader,
            streams: Some(vec!["billing-".into()]),
        }];
        let store = annals_core::MemoryStore::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = common::start_with_store(listener, Arc::new(store.clone()), config).await;
        let two = |t: &str| json!([event(t, json!({})), event(t, json!({}))]);
        s.append("billing-1", "any", two("Invoiced")).await; // positions 0, 1
        s.append("ops-1", "any", two("Deployed")).await; // 2, 3
        s.append("billing-2", "any", two("Paid")).await; // 4, 5: past the cap
        s.append("ops-2", "any", two("Deployed")).await; // 6, 7
        let sys = annals_core::StreamName::system("$settings").unwrap();
        let setting = annals_core::EventData::json("Changed", &json!({})).unwrap();
        annals_core::Appender::append(&store, &sys, annals_core::ExpectedVersion::Any, vec![setting])
            .await
            .unwrap(); // 8
        // Deletes hide streams from reads, not their events from `$all`.
        let resp = s.client.delete(s.url("/streams/ops-1?expected=any")).send().await.unwrap();
        assert_eq!(resp.status(), 204);
        let resp = s.client.delete(s.url("/streams/billing-1?expected=any&hard=true")).send().await.unwrap();
        assert_eq!(resp.status(), 204);

        let (status, stats) = s.get("/stats").await;
        assert_eq!(status, 200, "{stats}");
        assert_eq!(stats["events"], 9);
        assert_eq!(stats["complete"], true, "{stats}");
        assert_eq!(
            stats["by_type"],
            json!({ "Changed": 1, "Deployed": 4, "Invoiced": 2, "Paid": 2 }),
            "every event counted, system and deleted streams included"
        );
        assert_eq!(stats["streams"], 5);
        assert_eq!(stats["disk_bytes"], Value::Null, "a memory store has no disk");

        // Restricted to `billing-`: only its streams, from the bounded scan,
        // which says it stopped early.
        let resp = s.client.get(s.url("/stats")).header("x-api-key", BILLING_KEY).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let limited: Value = resp.json().await.unwrap();
        assert_eq!(limited["by_type"], json!({ "Invoiced": 2 }), "{limited}");
        assert_eq!(limited["events"], 2, "the events it may see, not the store's size: {limited}");
        assert_eq!(limited["complete"], false);
        assert_eq!(limited["streams"], 2);
        assert_eq!(limited["disk_bytes"], Value::Null);
        s.stop().await;
    })
    .await;
}

#[tokio::test]
async fn oneshot_without_a_socket() {
    let store: Arc<dyn annals_core::Store> = Arc::new(annals_core::MemoryStore::new());
    let state = AppState::new(store, open_config()).unwrap();
    let router = app(state);
    let resp = router
        .clone()
        .oneshot(
            Request::post("/streams/solo-1?expected=no_stream")
                .header("content-type", "application/json")
                .body(Body::from(r#"[{"type":"Hello","data":{"n":1}}]"#))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let body: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["position"], 0);
    let resp = router.oneshot(Request::get("/streams/solo-1").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["events"][0]["type"], "Hello");
}

#[tokio::test]
async fn graceful_shutdown_completes_in_flight_appends() {
    within(60, async {
        let s = start(open_config()).await;
        let client = s.client.clone();
        let url = s.url("/streams/drain-1");
        let writers: Vec<_> = (0..20)
            .map(|i| {
                let client = client.clone();
                let url = url.clone();
                tokio::spawn(async move {
                    client
                        .post(url)
                        .json(&json!([event("E", json!({ "i": i }))]))
                        .send()
                        .await
                        .map(|r| r.status().as_u16())
                })
            })
            .collect();
        let store = s.state.store().clone();
        s.stop().await;
        // Every append that got an answer got a success, and each success
        // is in the store.
        let mut ok = 0;
        for w in writers {
            if let Ok(Ok(status)) = w.await {
                assert_eq!(status, 201);
                ok += 1;
            }
        }
        let head = store.next_position().await.unwrap();
        assert_eq!(head, ok, "acknowledged appends must all be stored");
    })
    .await;
}

/// A misspelt filter (`stream_prefx`, `typ`) must not quietly read the
/// whole log: `/all` refuses unknown query parameters like every other
/// route (`400 invalid_query`, as `/openapi.json` declares).
#[tokio::test]
async fn all_refuses_unknown_query_parameters() {
    within(60, async {
        let s = start(open_config()).await;
        s.append("order-1", "any", json!([event("OrderPlaced", json!({}))])).await;
        s.append("hr-1", "any", json!([event("Hired", json!({}))])).await;
        for path in ["/all?stream_prefx=order-", "/all?typ=OrderPlaced", "/all?limit=1&stream=order-1"] {
            let (status, v) = s.get(path).await;
            assert_eq!(status, 400, "{path}: {v}");
            assert_eq!(v["error"]["code"], "invalid_query", "{path}");
        }
        // The known ones still work.
        let (status, v) = s.get("/all?stream_prefix=order-&type=OrderPlaced&include_system=false").await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["events"].as_array().unwrap().len(), 1);
        s.stop().await;
    })
    .await;
}

/// `X-Correlation-Id` is advisory (a longer one is ignored): one that could
/// not be stored (a tab inside) is ignored too, rather than failing the
/// append with an error about metadata the client never sent.
/// Metadata is stored as the client wrote it: a number beyond a double's
/// precision keeps every digit (it was parsed into a map and written back
/// rounded, `1.2345678901234568e29`), also when the server adds the
/// request's correlation id. Metadata that is not an object is refused.
#[tokio::test]
async fn metadata_keeps_the_exact_text_of_its_numbers() {
    within(60, async {
        let s = start(open_config()).await;
        let body = r#"[{"type":"Paid","data":{},"metadata":{"amount":123456789012345678901234567890,"rate":0.10000000000000000555}},
                      {"type":"Paid","metadata":{ }},
                      {"type":"Paid","metadata":{"correlation_id":"mine","n":1}}]"#;
        let resp = s
            .client
            .post(s.url("/streams/meta-1"))
            .header("content-type", "application/json")
            .header("x-correlation-id", "gw-42")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
        let text = s.client.get(s.url("/streams/meta-1")).send().await.unwrap().text().await.unwrap();
        assert!(text.contains("123456789012345678901234567890"), "{text}");
        assert!(text.contains("0.10000000000000000555"), "{text}");
        let page: Value = serde_json::from_str(&text).unwrap();
        let ids: Vec<&Value> = page["events"].as_array().unwrap().iter().map(|e| &e["metadata"]["correlation_id"]).collect();
        assert_eq!(ids, [&json!("gw-42"), &json!("gw-42"), &json!("mine")], "{page}");
        assert_eq!(page["events"][2]["metadata"]["n"], 1);

        let (status, body) = s.append("meta-1", "any", json!([{ "type": "Paid", "metadata": [1, 2] }])).await;
        assert_eq!(status, 400, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("event 0"), "{body}");
        s.stop().await;
    })
    .await;
}

#[tokio::test]
async fn an_unstorable_correlation_header_is_ignored() {
    within(60, async {
        let s = start(open_config()).await;
        let resp = s
            .client
            .post(s.url("/streams/corr-1"))
            .header("x-correlation-id", "gw\t42")
            .json(&json!([event("A", json!({}))]))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "{}", resp.text().await.unwrap());
        let (_, page) = s.get("/streams/corr-1").await;
        assert!(page["events"][0]["metadata"].get("correlation_id").is_none(), "{page}");
        s.stop().await;
    })
    .await;
}

/// `run` gives in-flight requests `timeouts.shutdown_secs`, then closes
/// what is left: a request still going (here one whose body never comes)
/// must not outlive `run`, holding its connection and the store.
#[tokio::test]
async fn connections_left_after_the_shutdown_grace_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    within(120, async {
        let mut config = open_config();
        config.timeouts.shutdown_secs = 1;
        config.timeouts.request_secs = 3600;
        let s = start(config).await;
        let mut tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
        tcp.write_all(
            b"POST /streams/slow-1 HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n[",
        )
        .await
        .unwrap();
        // Give the server a moment to start on the request.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        s.stop().await;
        // After `run` returned, the connection is closed (EOF or reset),
        // not left waiting for the rest of the body for an hour.
        let mut buf = [0u8; 1024];
        let read = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(read.is_ok(), "the connection outlived run()");
    })
    .await;
}

/// `hard` belongs to DELETE: on an append it would be a client's mistake
/// (a delete sent as POST), so it is refused rather than ignored.
#[tokio::test]
async fn an_append_refuses_the_delete_parameter() {
    within(60, async {
        let s = start(open_config()).await;
        let (status, v) = s.append("hard-1", "any&hard=true", json!([event("A", json!({}))])).await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["code"], "invalid_query");
        assert_eq!(s.get("/streams/hard-1").await.0, 404, "nothing was written");
        s.stop().await;
    })
    .await;
}
