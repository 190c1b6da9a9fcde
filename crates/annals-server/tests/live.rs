//! Live delivery: SSE and WebSocket under concurrent appends, slow clients,
//! and shutdown.

mod common;

use std::time::Duration;

use common::{Sse, TestServer, event, open_config, read_sse, start, start_on, within, ws_next_json};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};
use tokio_tungstenite::tungstenite::Message;

/// `writers` tasks each append `per_writer` single-event requests to their
/// own stream, concurrently.
async fn concurrent_appends(s: &TestServer, prefix: &str, writers: usize, per_writer: usize) {
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let client = s.client.clone();
            let url = s.url(&format!("/streams/{prefix}-{w}"));
            tokio::spawn(async move {
                for i in 0..per_writer {
                    let resp = client
                        .post(&url)
                        .json(&json!([event("Tick", json!({ "w": w, "i": i }))]))
                        .send()
                        .await;
                    assert_eq!(resp.unwrap().status(), 201);
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

fn assert_complete_in_order(events: &[Value], expected: usize) {
    let positions: Vec<u64> = events.iter().map(|e| e["position"].as_u64().unwrap()).collect();
    assert_eq!(positions, (0..expected as u64).collect::<Vec<_>>(), "every position once, in order");
    let mut next_version = std::collections::HashMap::new();
    for e in events {
        let v = next_version.entry(e["stream"].as_str().unwrap().to_owned()).or_insert(0u64);
        assert_eq!(e["version"].as_u64().unwrap(), *v, "versions in order per stream");
        *v += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_all_delivers_everything_in_order_under_concurrent_appends() {
    within(120, async {
        let s = start(open_config()).await;
        // Some history first, then live events while subscribed.
        concurrent_appends(&s, "hist", 2, 10).await;
        let resp = s.client.get(s.url("/all/live?from=start")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        let total = 20 + 4 * 40;
        let reader = tokio::spawn(read_sse(resp, move |all| all.len() >= total));
        concurrent_appends(&s, "live", 4, 40).await;
        let records = reader.await.unwrap();
        assert!(records.iter().all(|r| r.0 == "event"));
        let events: Vec<Value> = records.iter().map(|r| serde_json::from_str(&r.2).unwrap()).collect();
        assert_complete_in_order(&events, total);
        // SSE ids are positions for $all.
        assert!(
            records.iter().zip(&events).all(|(r, e)| r.1.as_deref() == Some(&e["position"].to_string()[..]))
        );
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_stream_from_and_last_event_id() {
    within(60, async {
        let s = start(open_config()).await;
        let batch: Vec<Value> = (0..5).map(|i| event("N", json!({ "i": i }))).collect();
        s.append("feed-1", "any", Value::Array(batch)).await;
        s.append("other-1", "any", json!([event("Noise", json!({}))])).await;

        let resp = s.client.get(s.url("/streams/feed-1/live?from=3")).send().await.unwrap();
        let records = read_sse(resp, |all| all.len() >= 2).await;
        let ids: Vec<_> = records.iter().map(|r| r.1.clone().unwrap()).collect();
        assert_eq!(ids, vec!["3", "4"]);

        // Last-Event-ID resumes strictly after that version.
        let resp =
            s.client.get(s.url("/streams/feed-1/live")).header("Last-Event-ID", "1").send().await.unwrap();
        let reader = tokio::spawn(read_sse(resp, |all| all.len() >= 4));
        s.append("feed-1", "any", json!([event("N", json!({ "i": 5 }))])).await;
        let ids: Vec<_> = reader.await.unwrap().iter().map(|r| r.1.clone().unwrap()).collect();
        assert_eq!(ids, vec!["2", "3", "4", "5"]);

        // from=end: only events committed after subscribing, filtered.
        let resp = s.client.get(s.url("/all/live?from=end&category=feed")).send().await.unwrap();
        let reader = tokio::spawn(read_sse(resp, |all| !all.is_empty()));
        // The subscription starts when the response is produced, so these
        // appends land after it.
        s.append("other-1", "any", json!([event("Noise", json!({}))])).await;
        s.append("feed-1", "any", json!([event("N", json!({ "i": 6 }))])).await;
        let records = reader.await.unwrap();
        let e: Value = serde_json::from_str(&records[0].2).unwrap();
        assert_eq!(e["stream"], "feed-1");
        assert_eq!(e["data"]["i"], 6);
        s.stop().await;
    })
    .await;
}

async fn ws_connect(
    s: &TestServer,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>> {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", s.addr)).await.expect("ws connect");
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_all_and_stream_under_concurrent_appends() {
    within(120, async {
        let s = start(open_config()).await;
        concurrent_appends(&s, "pre", 1, 5).await;
        let mut all = ws_connect(&s).await;
        all.send(Message::Text(
            json!({ "type": "subscribe", "stream": "$all", "from": "start" }).to_string().into(),
        ))
        .await
        .unwrap();
        assert_eq!(ws_next_json(&mut all).await.unwrap()["type"], "subscribed");
        let mut one = ws_connect(&s).await;
        one.send(Message::Text(
            json!({ "type": "subscribe", "stream": "ws-2", "from": 0 }).to_string().into(),
        ))
        .await
        .unwrap();
        assert_eq!(ws_next_json(&mut one).await.unwrap()["type"], "subscribed");
        let mut filtered = ws_connect(&s).await;
        filtered
            .send(Message::Text(
                json!({ "type": "subscribe", "stream": "$all", "filter": { "stream_prefix": "ws-1" } })
                    .to_string()
                    .into(),
            ))
            .await
            .unwrap();
        assert_eq!(ws_next_json(&mut filtered).await.unwrap()["type"], "subscribed");

        let total = 5 + 3 * 30;
        let reader_all = tokio::spawn(async move {
            let mut events = Vec::new();
            while events.len() < total {
                let m = ws_next_json(&mut all).await.expect("socket open");
                assert_eq!(m["type"], "event", "{m}");
                events.push(m["event"].clone());
            }
            events
        });
        let reader_one = tokio::spawn(async move {
            let mut versions = Vec::new();
            while versions.len() < 30 {
                let m = ws_next_json(&mut one).await.expect("socket open");
                assert_eq!(m["event"]["stream"], "ws-2");
                versions.push(m["event"]["version"].as_u64().unwrap());
            }
            versions
        });
        let reader_filtered = tokio::spawn(async move {
            let mut n = 0;
            while n < 30 {
                let m = ws_next_json(&mut filtered).await.expect("socket open");
                assert_eq!(m["event"]["stream"], "ws-1");
                n += 1;
            }
            n
        });
        concurrent_appends(&s, "ws", 3, 30).await;
        assert_complete_in_order(&reader_all.await.unwrap(), total);
        assert_eq!(reader_one.await.unwrap(), (0..30).collect::<Vec<u64>>());
        assert_eq!(reader_filtered.await.unwrap(), 30);
        s.stop().await;
    })
    .await;
}

#[tokio::test]
async fn websocket_rejects_bad_subscribe_messages() {
    within(60, async {
        let s = start(open_config()).await;
        for bad in [
            json!({ "type": "subscribe" }).to_string(),
            json!({ "type": "dance", "stream": "x" }).to_string(),
            json!({ "type": "subscribe", "stream": "a-1", "from": "later" }).to_string(),
            json!({ "type": "subscribe", "stream": "a-1", "filter": { "category": "a" } }).to_string(),
            "not json".to_owned(),
        ] {
            let mut ws = ws_connect(&s).await;
            ws.send(Message::Text(bad.clone().into())).await.unwrap();
            let m = ws_next_json(&mut ws).await.expect("an error message");
            assert_eq!(m["type"], "error", "{bad}: {m}");
            assert!(m["error"]["code"].is_string());
        }
        s.stop().await;
    })
    .await;
}

/// A listener whose accepted sockets have a small send buffer, so a client
/// that stops reading backs up quickly.
async fn small_buffer_listener() -> tokio::net::TcpListener {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(4096).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    socket.listen(64).unwrap()
}

fn slow_config() -> annals_server::ServerConfig {
    let mut c = open_config();
    c.live.buffer_events = 4;
    c.live.slow_client_timeout_ms = 300;
    c.live.disconnect_grace_ms = 60_000;
    c.limits.max_body_bytes = 16 * 1024 * 1024;
    c
}

/// 300 events of ~16 KiB: far more than the socket buffers and queue hold.
async fn flood(s: &TestServer, stream: &str) {
    let payload = "y".repeat(16 * 1024);
    for batch in 0..15 {
        let events: Vec<Value> =
            (0..20).map(|i| event("Big", json!({ "b": batch, "i": i, "p": payload }))).collect();
        let resp = s.client.post(s.url(&format!("/streams/{stream}"))).json(&events).send().await.unwrap();
        assert_eq!(resp.status(), 201, "writers are never blocked by a slow reader");
    }
}

async fn wait_for_slow_disconnect(s: &TestServer) {
    for _ in 0..600 {
        if s.metric("annals_slow_consumer_disconnects_total").await >= 1.0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the server never noticed the slow client");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_sse_client_is_told_and_disconnected() {
    within(120, async {
        let s = start_on(small_buffer_listener().await, slow_config()).await;
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut tcp = socket.connect(s.addr).await.unwrap();
        // HTTP/1.0: the body is close-delimited, no chunk framing to parse.
        tcp.write_all(b"GET /all/live?from=start HTTP/1.0\r\nHost: test\r\n\r\n").await.unwrap();

        // The client reads nothing while the writer floods; every append
        // still succeeds.
        flood(&s, "flood-1").await;
        wait_for_slow_disconnect(&s).await;

        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await.unwrap();
        let text = String::from_utf8_lossy(&raw);
        let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
        let records = Sse::default().push(body.as_bytes());
        let (last, events) = records.split_last().unwrap();
        assert_eq!(last.0, "slow_consumer", "the final record tells the client why");
        let notice: Value = serde_json::from_str(&last.2).unwrap();
        let ids: Vec<u64> = events.iter().map(|r| r.1.as_deref().unwrap().parse().unwrap()).collect();
        assert!(!ids.is_empty());
        assert_eq!(ids, (0..ids.len() as u64).collect::<Vec<_>>(), "nothing skipped before the notice");
        assert_eq!(
            notice["last_position"],
            *ids.last().unwrap(),
            "the notice names the last delivered position"
        );
        assert!(ids.len() < 300, "the client was cut off, not served everything");
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_websocket_client_is_told_and_disconnected() {
    within(120, async {
        let s = start_on(small_buffer_listener().await, slow_config()).await;
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let tcp = socket.connect(s.addr).await.unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/ws", s.addr), tcp).await.unwrap();
        ws.send(Message::Text(json!({ "type": "subscribe", "stream": "$all" }).to_string().into()))
            .await
            .unwrap();
        assert_eq!(ws_next_json(&mut ws).await.unwrap()["type"], "subscribed");

        flood(&s, "flood-2").await;
        wait_for_slow_disconnect(&s).await;

        let mut positions = Vec::new();
        let notice = loop {
            let m = ws_next_json(&mut ws).await.expect("the notice arrives before the close");
            if m["type"] == "event" {
                positions.push(m["event"]["position"].as_u64().unwrap());
            } else {
                break m;
            }
        };
        assert_eq!(notice["type"], "slow_consumer", "{notice}");
        assert_eq!(positions, (0..positions.len() as u64).collect::<Vec<_>>());
        assert_eq!(notice["last_position"], *positions.last().unwrap());
        assert!(positions.len() < 300);
        assert!(ws_next_json(&mut ws).await.is_none(), "then the connection closes");
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_clients_are_told_about_shutdown() {
    within(60, async {
        let s = start(open_config()).await;
        s.append("bye-1", "any", json!([event("A", json!({}))])).await;
        let resp = s.client.get(s.url("/all/live")).send().await.unwrap();
        let reader = tokio::spawn(read_sse(resp, |_| false));
        let mut ws = ws_connect(&s).await;
        ws.send(Message::Text(json!({ "type": "subscribe", "stream": "bye-1" }).to_string().into()))
            .await
            .unwrap();
        assert_eq!(ws_next_json(&mut ws).await.unwrap()["type"], "subscribed");
        assert_eq!(ws_next_json(&mut ws).await.unwrap()["type"], "event");
        // Wait until both subscriptions are counted before shutting down.
        for _ in 0..200 {
            if s.metric("annals_subscribers").await >= 2.0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        s.stop().await;
        let records = reader.await.unwrap();
        assert_eq!(records.last().unwrap().0, "shutdown");
        let m = ws_next_json(&mut ws).await.unwrap();
        assert_eq!(m["type"], "shutdown");
        assert_eq!(m["last_position"], 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_client_that_never_reads_is_disconnected_after_the_grace_period() {
    within(120, async {
        let mut config = slow_config();
        config.live.disconnect_grace_ms = 300;
        let s = start_on(small_buffer_listener().await, config).await;
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut tcp = socket.connect(s.addr).await.unwrap();
        tcp.write_all(b"GET /all/live?from=start HTTP/1.0\r\nHost: test\r\n\r\n").await.unwrap();
        flood(&s, "stuck-1").await;
        wait_for_slow_disconnect(&s).await;
        // The subscription is released once the connection is dropped.
        let mut released = false;
        for _ in 0..200 {
            if s.metric("annals_subscribers").await == 0.0 {
                released = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(released, "the subscriber gauge returns to zero");
        // Reading now drains what the kernel held and then hits the end:
        // the server closed the connection instead of waiting forever.
        let mut raw = Vec::new();
        let _ = tcp.read_to_end(&mut raw).await;
        let text = String::from_utf8_lossy(&raw);
        let body = &text[text.find("\r\n\r\n").unwrap() + 4..];
        let records = Sse::default().push(body.as_bytes());
        let ids: Vec<u64> = records
            .iter()
            .filter(|r| r.0 == "event")
            .map(|r| r.1.as_deref().unwrap().parse().unwrap())
            .collect();
        assert_eq!(ids, (0..ids.len() as u64).collect::<Vec<_>>(), "what arrived is a gapless prefix");
        assert!(ids.len() < 300);
        s.stop().await;
    })
    .await;
}

#[tokio::test]
async fn json_with_carriage_returns_streams_over_sse() {
    within(60, async {
        let s = start(open_config()).await;
        let body = "[{\"type\":\"Crlf\",\"data\":{\r\n\"a\":\r\n1}}]";
        let resp = s
            .client
            .post(s.url("/streams/crlf-1"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        let resp = s.client.get(s.url("/streams/crlf-1/live")).send().await.unwrap();
        let mut stream = resp.bytes_stream();
        let mut text = String::new();
        while !text.contains("\n\n") {
            text.push_str(&String::from_utf8_lossy(&stream.next().await.unwrap().unwrap()));
        }
        let data: String =
            text.lines().filter_map(|l| l.strip_prefix("data: ")).collect::<Vec<_>>().join("\n");
        let e: Value = serde_json::from_str(&data).unwrap();
        assert_eq!(e["data"], json!({ "a": 1 }));
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_pings_and_drops_clients_that_stop_answering() {
    within(60, async {
        let mut config = open_config();
        config.live.ws_ping_ms = 100;
        let s = start(config).await;
        let subscribe = || {
            Message::Text(json!({ "type": "subscribe", "stream": "$all", "from": "end" }).to_string().into())
        };

        // A client that keeps reading answers the pings (tungstenite sends
        // the pongs) and stays subscribed well past three intervals.
        let mut alive = ws_connect(&s).await;
        alive.send(subscribe()).await.unwrap();
        assert_eq!(ws_next_json(&mut alive).await.unwrap()["type"], "subscribed");
        let mut pings = 0;
        let until = tokio::time::Instant::now() + Duration::from_millis(800);
        while let Ok(Some(msg)) = tokio::time::timeout_at(until, alive.next()).await {
            match msg.unwrap() {
                Message::Ping(_) => pings += 1,
                Message::Close(_) => panic!("a client answering pings was dropped"),
                other => panic!("unexpected {other:?}"),
            }
        }
        assert!(pings >= 3, "{pings} pings in 800 ms at 100 ms intervals");
        s.append("ka-1", "any", json!([event("E", json!({}))])).await;
        let got = ws_next_json(&mut alive).await.unwrap();
        assert_eq!((got["type"].as_str(), got["event"]["stream"].as_str()), (Some("event"), Some("ka-1")));

        let gauge = s.state.metrics().subscriber_gauge("ws");
        alive.close(None).await.unwrap();
        wait_until(|| gauge.get() == 0).await;

        // A client that never reads never pongs: after three silent
        // intervals the server tells it `ping_timeout` and drops it (the
        // notice itself may be lost to the reset when the client's queued
        // pongs hit the closed socket, so the test watches the gauge).
        let mut silent = ws_connect(&s).await;
        silent.send(subscribe()).await.unwrap();
        wait_until(|| gauge.get() == 1).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(gauge.get(), 1, "not dropped before three intervals");
        wait_until(|| gauge.get() == 0).await;
        drop(silent);
        s.stop().await;
    })
    .await;
}

async fn wait_until(mut done: impl FnMut() -> bool) {
    for _ in 0..200 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached within 2 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_carries_several_named_subscriptions() {
    within(60, async {
        let s = start(open_config()).await;
        s.append("multi-a", "any", json!([event("A", json!({ "n": 0 }))])).await;
        let mut ws = ws_connect(&s).await;
        let send = |v: Value| Message::Text(v.to_string().into());
        ws.send(send(json!({ "type": "subscribe", "id": "a", "stream": "multi-a", "from": "start" })))
            .await
            .unwrap();
        let m = ws_next_json(&mut ws).await.unwrap();
        assert_eq!((m["type"].as_str(), m["id"].as_str()), (Some("subscribed"), Some("a")));
        let m = ws_next_json(&mut ws).await.unwrap();
        assert_eq!((m["id"].as_str(), m["event"]["version"].as_u64()), (Some("a"), Some(0)));
        ws.send(send(json!({ "type": "subscribe", "id": "b", "stream": "multi-b", "from": "start" })))
            .await
            .unwrap();
        let m = ws_next_json(&mut ws).await.unwrap();
        assert_eq!((m["type"].as_str(), m["id"].as_str()), (Some("subscribed"), Some("b")));
        // A duplicate id, an unnamed second subscription and an unknown
        // unsubscribe are refused without closing the socket.
        for bad in [
            json!({ "type": "subscribe", "id": "a", "stream": "x" }),
            json!({ "type": "subscribe", "stream": "x" }),
            json!({ "type": "unsubscribe", "id": "zzz" }),
        ] {
            ws.send(send(bad)).await.unwrap();
            assert_eq!(ws_next_json(&mut ws).await.unwrap()["type"], "error");
        }
        // Events of both streams arrive, each tagged with its subscription,
        // in order per subscription.
        for n in 1..4 {
            s.append("multi-a", "any", json!([event("A", json!({ "n": n }))])).await;
            s.append("multi-b", "any", json!([event("B", json!({ "n": n }))])).await;
        }
        let (mut a, mut b) = (Vec::new(), Vec::new());
        while a.len() < 3 || b.len() < 3 {
            let m = ws_next_json(&mut ws).await.unwrap();
            assert_eq!(m["type"], "event", "{m}");
            let v = m["event"]["version"].as_u64().unwrap();
            match (m["id"].as_str().unwrap(), m["event"]["stream"].as_str().unwrap()) {
                ("a", "multi-a") => a.push(v),
                ("b", "multi-b") => b.push(v),
                other => panic!("mismatched {other:?}"),
            }
        }
        assert_eq!((a, b), (vec![1, 2, 3], vec![0, 1, 2]));
        // Unsubscribe "a": only "b" keeps receiving.
        ws.send(send(json!({ "type": "unsubscribe", "id": "a" }))).await.unwrap();
        let m = ws_next_json(&mut ws).await.unwrap();
        assert_eq!((m["type"].as_str(), m["id"].as_str()), (Some("unsubscribed"), Some("a")));
        s.append("multi-a", "any", json!([event("A", json!({}))])).await;
        s.append("multi-b", "any", json!([event("B", json!({}))])).await;
        let m = ws_next_json(&mut ws).await.unwrap();
        assert_eq!((m["id"].as_str(), m["event"]["stream"].as_str()), (Some("b"), Some("multi-b")));
        s.stop().await;
    })
    .await;
}

/// `run` returned as soon as the HTTP connections had drained, but a
/// WebSocket session outlives its HTTP connection (the upgrade hands the
/// socket over), so it was never waited for: `annals serve` then closed
/// the store and exited while sessions were still telling clients where
/// to resume (a client a little behind got a reset instead of its
/// `shutdown` notice), and a session stuck on a client that does not read
/// was never forced to end. Now `run` waits for the sessions too, within
/// `timeouts.shutdown_secs`, and ends the ones still open after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_waits_for_websocket_sessions_and_ends_stuck_ones() {
    within(120, async {
        let mut config = slow_config();
        // A send to this client never times out on its own during the test.
        config.live.slow_client_timeout_ms = 600_000;
        config.live.disconnect_grace_ms = 600_000;
        config.timeouts.shutdown_secs = 1;
        let s = start_on(small_buffer_listener().await, config).await;
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let tcp = socket.connect(s.addr).await.unwrap();
        let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/ws", s.addr), tcp).await.unwrap();
        ws.send(Message::Text(json!({ "type": "subscribe", "stream": "$all" }).to_string().into()))
            .await
            .unwrap();
        assert_eq!(ws_next_json(&mut ws).await.unwrap()["type"], "subscribed");
        // The client stops reading: the session's sends back up.
        flood(&s, "stuck-1").await;
        let state = s.state.clone();
        assert_eq!(state.metrics().subscriber_gauge("ws").get(), 1);
        s.stop().await;
        assert_eq!(
            state.metrics().subscriber_gauge("ws").get(),
            0,
            "run returned while a WebSocket session was still running"
        );
        drop(ws);
    })
    .await;
}

/// A WebSocket that had not sent its subscribe message yet did not notice
/// the shutdown: it waited up to 30 s for that message, holding the
/// shutdown up, and then ended without saying why. It now gets `shutdown`
/// at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_not_yet_subscribed_is_told_about_shutdown() {
    within(120, async {
        let mut config = open_config();
        config.timeouts.shutdown_secs = 20;
        let s = start(config).await;
        let mut ws = ws_connect(&s).await;
        // The upgrade is done; the server waits for the subscribe message.
        s.stop().await;
        let m = ws_next_json(&mut ws).await.expect("a notice before the close");
        assert_eq!(m["type"], "shutdown", "{m}");
        assert_eq!(m["last_position"], Value::Null, "{m}");
    })
    .await;
}

/// Over HTTP/2 one connection carries many requests (a browser sends its
/// `EventSource` and its `fetch` calls over one). A slow SSE client was
/// disconnected by closing its whole connection, which also broke every
/// other request in flight on it, an append included (committed or not,
/// the client could not tell). HTTP/2 flow control already keeps a slow
/// stream from holding anything else up, so only HTTP/1 connections are
/// closed now; on HTTP/2 the other requests finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_sse_over_http2_does_not_break_other_requests_on_the_connection() {
    within(120, async {
        let mut config = slow_config();
        config.live.disconnect_grace_ms = 3_000;
        config.timeouts.shutdown_secs = 2;
        let s = start_on(small_buffer_listener().await, config).await;
        let h2 = reqwest::Client::builder()
            .http2_prior_knowledge()
            .http2_adaptive_window(false)
            .http2_initial_stream_window_size(65_535)
            .http2_initial_connection_window_size(64 * 1024 * 1024)
            .build()
            .unwrap();
        let resp = h2.get(s.url("/all/live?from=start")).send().await.unwrap();
        assert_eq!(resp.version(), reqwest::Version::HTTP_2);
        // The SSE body is never read.
        flood(&s, "h2-flood").await;
        wait_for_slow_disconnect(&s).await;
        // A request on the same connection, in flight when the grace ends.
        let (status, _) = s
            .client
            .put(s.url("/groups/h2-g"))
            .json(&json!({ "stream": "h2-jobs" }))
            .send()
            .await
            .map(|r| (r.status().as_u16(), ()))
            .unwrap();
        assert_eq!(status, 201);
        let poll = tokio::spawn(h2.post(s.url("/groups/h2-g/next?consumer=p&wait_ms=8000")).send());
        let other = poll.await.unwrap().expect("the other request on the connection is answered");
        assert_eq!(other.status(), 200);
        drop(resp);
        s.stop().await;
    })
    .await;
}
