//! A tombstone while clients follow the stream: each live feed of it ends
//! with `stream_deleted` at once, on every backend a server runs on, and a
//! WebSocket's other subscriptions go on.

mod common;

use std::{sync::Arc, time::Duration};

use annals_core::{MemoryStore, Store};
use common::{TestServer, event, open_config, read_sse, start_with_store, within, ws_next_json};
use futures::SinkExt;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn subscribe(ws: &mut Ws, id: &str, stream: &str) {
    let msg = json!({ "type": "subscribe", "id": id, "stream": stream });
    ws.send(Message::Text(msg.to_string().into())).await.expect("send");
    let m = ws_next_json(ws).await.expect("reply");
    assert_eq!((m["type"].as_str(), m["id"].as_str()), (Some("subscribed"), Some(id)), "{m}");
}

/// How long a feed may take to report the tombstone. Nothing else is
/// appended meanwhile: the report must not wait for a later commit.
const REPORTED_WITHIN: Duration = Duration::from_secs(5);

/// Follows `rounds` streams live (SSE and WebSocket), tombstones each in
/// turn, and checks every feed of it ends with `stream_deleted`.
async fn tombstones_are_reported(s: &TestServer, rounds: usize) {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", s.addr)).await.expect("ws");
    subscribe(&mut ws, "other", "bystander-1").await;
    for round in 0..rounds {
        let stream = format!("tomb-{round}");
        s.append(&stream, "any", json!([event("A", json!({}))])).await;
        let resp = s.client.get(s.url(&format!("/streams/{stream}/live"))).send().await.expect("request");
        // The tombstone must come after the feed has read the event: a
        // feed that reads only after it finds the stream gone (and says
        // so, with nothing sent), which is not what this test is about.
        let (first_tx, first_rx) = tokio::sync::oneshot::channel::<()>();
        let mut first_tx = Some(first_tx);
        let sse = tokio::spawn(read_sse(resp, move |all| {
            if !all.is_empty()
                && let Some(tx) = first_tx.take()
            {
                let _ = tx.send(());
            }
            all.iter().any(|r| r.0 != "event")
        }));
        first_rx.await.unwrap_or_else(|_| panic!("round {round}: the SSE feed ended before any record"));
        subscribe(&mut ws, &stream, &stream).await;
        let m = ws_next_json(&mut ws).await.expect("event");
        assert_eq!((m["id"].as_str(), m["event"]["version"].as_u64()), (Some(&stream[..]), Some(0)), "{m}");

        let resp =
            s.client.delete(s.url(&format!("/streams/{stream}?hard=true"))).send().await.expect("delete");
        assert_eq!(resp.status(), 204);
        let m = tokio::time::timeout(REPORTED_WITHIN, ws_next_json(&mut ws))
            .await
            .unwrap_or_else(|_| panic!("round {round}: WebSocket never told of the tombstone"))
            .expect("socket open");
        assert_eq!(
            (m["type"].as_str(), m["id"].as_str()),
            (Some("stream_deleted"), Some(&stream[..])),
            "{m}"
        );
        assert_eq!(m["last_version"], 0, "{m}");
        let records = tokio::time::timeout(REPORTED_WITHIN, sse)
            .await
            .unwrap_or_else(|_| panic!("round {round}: SSE never told of the tombstone"))
            .expect("reader");
        let (last, events) = records.split_last().expect("records");
        assert_eq!(last.0, "stream_deleted", "round {round}");
        assert_eq!(events.len(), 1, "round {round}: the event, then the notice");
    }
    // The socket's other subscription went on throughout.
    s.append("bystander-1", "any", json!([event("B", json!({}))])).await;
    let m = ws_next_json(&mut ws).await.expect("socket open");
    assert_eq!((m["type"].as_str(), m["id"].as_str()), (Some("event"), Some("other")), "{m}");
}

async fn serve(store: Arc<dyn Store>) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    start_with_store(listener, store, open_config()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstone_while_live_is_reported_at_once_in_memory() {
    within(120, async {
        let s = serve(Arc::new(MemoryStore::new())).await;
        tombstones_are_reported(&s, 3).await;
        s.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstone_while_live_is_reported_at_once_on_the_log() {
    within(300, async {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = annals_log::LogStore::open(dir.path()).expect("open the log");
        let s = serve(Arc::new(store)).await;
        // The report raced the deletion's bookkeeping: several rounds.
        tombstones_are_reported(&s, 20).await;
        s.stop().await;
    })
    .await;
}
