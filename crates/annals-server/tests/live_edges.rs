//! Live feeds at their edges: where a subscription starts, and what a
//! client is told when its input is bad.

mod common;

use std::{
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use annals_core::{
    AllReader, AllSlice, AppendResult, Appender, CheckpointStore, DeleteMode, EventData, EventStream,
    ExpectedVersion, Limits, MemoryStore, ReadAll, ReadStream, RecordedEvent, Result, Snapshot,
    SnapshotStore, StreamAppend, StreamDeleter, StreamInfo, StreamName, StreamReader, Subscriber,
    SubscriptionRequest, async_trait,
};
use common::{TestServer, event, open_config, read_sse, start, start_with_store, within, ws_next_json};
use futures::SinkExt;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn ws_connect(s: &TestServer) -> Ws {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", s.addr)).await.expect("ws connect");
    ws
}

fn text(v: Value) -> Message {
    Message::Text(v.to_string().into())
}

/// A MemoryStore whose next `subscribe` call blocks until released (at
/// most 10 s; multi-threaded runtimes only), so a test can commit an event at a chosen point of a
/// subscription's start.
#[derive(Default)]
struct Gated {
    inner: MemoryStore,
    gate: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

impl Gated {
    fn arm(&self) -> std::sync::mpsc::Sender<()> {
        let (tx, rx) = std::sync::mpsc::channel();
        *self.gate.lock().unwrap_or_else(PoisonError::into_inner) = Some(rx);
        tx
    }
}

impl Subscriber for Gated {
    fn subscribe(&self, r: SubscriptionRequest) -> EventStream {
        let gate = self.gate.lock().unwrap_or_else(PoisonError::into_inner).take();
        if let Some(release) = gate {
            // Hand the worker's scheduler to another thread while held,
            // so the runtime's timers and sockets keep going.
            let _ = tokio::task::block_in_place(|| release.recv_timeout(Duration::from_secs(10)));
        }
        self.inner.subscribe(r)
    }
}

#[async_trait]
impl Appender for Gated {
    async fn append(&self, s: &StreamName, e: ExpectedVersion, ev: Vec<EventData>) -> Result<AppendResult> {
        self.inner.append(s, e, ev).await
    }
    async fn append_multi(&self, parts: Vec<StreamAppend>) -> Result<Vec<AppendResult>> {
        self.inner.append_multi(parts).await
    }
}

#[async_trait]
impl StreamReader for Gated {
    async fn read_stream(&self, s: &StreamName, r: ReadStream) -> Result<Vec<RecordedEvent>> {
        self.inner.read_stream(s, r).await
    }
    async fn stream_info(&self, s: &StreamName) -> Result<StreamInfo> {
        self.inner.stream_info(s).await
    }
}

#[async_trait]
impl AllReader for Gated {
    async fn read_all(&self, r: ReadAll) -> Result<AllSlice> {
        self.inner.read_all(r).await
    }
    async fn next_position(&self) -> Result<u64> {
        self.inner.next_position().await
    }
}

#[async_trait]
impl StreamDeleter for Gated {
    async fn delete_stream(&self, s: &StreamName, e: ExpectedVersion, m: DeleteMode) -> Result<()> {
        self.inner.delete_stream(s, e, m).await
    }
}

#[async_trait]
impl SnapshotStore for Gated {
    async fn save_snapshot(&self, s: Snapshot) -> Result<()> {
        self.inner.save_snapshot(s).await
    }
    async fn load_snapshot(&self, s: &StreamName, v: Option<u64>) -> Result<Option<Snapshot>> {
        self.inner.load_snapshot(s, v).await
    }
    async fn prune_snapshots(&self, s: &StreamName, k: usize) -> Result<usize> {
        self.inner.prune_snapshots(s, k).await
    }
}

#[async_trait]
impl CheckpointStore for Gated {
    async fn load_checkpoint(&self, n: &str) -> Result<Option<u64>> {
        self.inner.load_checkpoint(n).await
    }
    async fn save_checkpoint(&self, n: &str, p: u64) -> Result<()> {
        self.inner.save_checkpoint(n, p).await
    }
}

/// Appends one `After` event to `late-1` straight to the store (the
/// server's worker may be held in `subscribe`).
async fn commit_after(store: &Gated) {
    let stream = StreamName::new("late-1").expect("name");
    let event = EventData::json("After", &json!({})).expect("event");
    store.inner.append(&stream, ExpectedVersion::Any, vec![event]).await.expect("append");
}

/// `subscribed` promises that every event committed after it arrives is
/// delivered. The first subscription of a socket used to be answered
/// before it was created, so with `from: "end"` an event committed right
/// after `subscribed` was silently never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_first_subscription_from_end_gets_events_committed_after_subscribed() {
    within(60, async {
        let store = Arc::new(Gated::default());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let s = start_with_store(listener, store.clone(), open_config()).await;
        s.append("early-1", "any", json!([event("Before", json!({}))])).await;
        for (id, stream) in [(None, "$all"), (Some("named"), "$all"), (None, "late-1")] {
            let release = store.arm();
            let mut ws = ws_connect(&s).await;
            let mut subscribe = json!({ "type": "subscribe", "stream": stream, "from": "end" });
            if let Some(id) = id {
                subscribe["id"] = json!(id);
            }
            ws.send(text(subscribe)).await.expect("send subscribe");
            // While the store's subscribe call is held, `subscribed` may
            // only arrive if it was sent before the subscription existed.
            let early = tokio::time::timeout(Duration::from_millis(500), ws_next_json(&mut ws)).await;
            let subscribed = match early {
                Ok(m) => {
                    // Commit while the subscription is still being set up.
                    commit_after(&store).await;
                    release.send(()).expect("release");
                    m
                }
                Err(_) => {
                    release.send(()).expect("release");
                    let m = ws_next_json(&mut ws).await;
                    commit_after(&store).await;
                    m
                }
            };
            let subscribed = subscribed.expect("subscribed");
            assert_eq!(subscribed["type"], "subscribed", "{subscribed}");
            let got = tokio::time::timeout(Duration::from_secs(3), ws_next_json(&mut ws))
                .await
                .unwrap_or_else(|_| panic!("{stream}: the event committed after `subscribed` never came"))
                .expect("socket open");
            assert_eq!(got["type"], "event", "{got}");
            assert_eq!(got["event"]["type"], "After", "{got}");
        }
        s.stop().await;
    })
    .await;
}

/// A `Last-Event-ID` that is not even text is malformed: 400, not ignored
/// (ignoring it replays the feed from `from`, the start by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_that_is_not_text_is_refused() {
    within(60, async {
        let s = start(open_config()).await;
        s.append("lei-1", "any", json!([event("A", json!({}))])).await;
        for path in ["/all/live", "/streams/lei-1/live"] {
            for bad in [&b"\xe9"[..], b"1\xff", b"abc", b"-1", b"1.5"] {
                let value = reqwest::header::HeaderValue::from_bytes(bad).expect("header value");
                let resp =
                    s.client.get(s.url(path)).header("Last-Event-ID", value).send().await.expect("request");
                assert_eq!(resp.status(), 400, "{path} with Last-Event-ID {bad:?}");
                let body: Value = resp.json().await.expect("a JSON body");
                assert!(body["error"]["code"].is_string(), "{body}");
            }
        }
        s.stop().await;
    })
    .await;
}

/// A resume point past the head names no event this store ever sent (it
/// comes from another store, or one restored from an older backup):
/// following it would silently skip every event committed up to it, so
/// it is refused. The head itself (`$all`) or the stream's next version
/// is a valid start, the same as `end`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_point_past_the_head_is_refused() {
    within(60, async {
        let s = start(open_config()).await;
        s.append("head-1", "any", json!([event("A", json!({})), event("A", json!({}))])).await;
        let open = |path: &str, last_event_id: Option<&str>| {
            let mut req = s.client.get(s.url(path));
            if let Some(id) = last_event_id {
                req = req.header("Last-Event-ID", id);
            }
            req.send()
        };
        let refused = [
            ("/all/live?from=3", None),
            ("/all/live", Some("2")),
            ("/all/live", Some("18446744073709551615")),
            ("/streams/head-1/live?from=3", None),
            ("/streams/head-1/live", Some("2")),
            ("/streams/never-1/live?from=1", None),
            ("/streams/never-1/live", Some("0")),
        ];
        for (path, id) in refused {
            let resp = open(path, id).await.expect("request");
            assert_eq!(resp.status(), 400, "{path} Last-Event-ID {id:?}");
            let body: Value = resp.json().await.expect("a JSON body");
            assert_eq!(body["error"]["code"], "beyond_head", "{body}");
        }
        for (path, id) in [
            ("/all/live?from=2", None),
            ("/all/live", Some("1")),
            ("/streams/head-1/live?from=2", None),
            ("/streams/head-1/live", Some("1")),
            ("/streams/never-1/live?from=0", None),
        ] {
            let resp = open(path, id).await.expect("request");
            assert_eq!(resp.status(), 200, "{path} Last-Event-ID {id:?}");
        }
        // Starting at the head delivers the next event.
        let resp = open("/all/live?from=2", None).await.expect("request");
        let reader = tokio::spawn(common::read_sse(resp, |all| !all.is_empty()));
        s.append("head-1", "any", json!([event("B", json!({}))])).await;
        let records = reader.await.expect("reader");
        assert_eq!(records[0].1.as_deref(), Some("2"));

        // WebSocket: a bad first subscribe closes the socket after the
        // error; a bad further one is refused and the socket goes on.
        let mut ws = ws_connect(&s).await;
        ws.send(text(json!({ "type": "subscribe", "stream": "$all", "from": 4 }))).await.expect("send");
        let m = ws_next_json(&mut ws).await.expect("reply");
        assert_eq!(
            (m["type"].as_str(), m["error"]["code"].as_str()),
            (Some("error"), Some("beyond_head")),
            "{m}"
        );
        let mut ws = ws_connect(&s).await;
        ws.send(text(json!({ "type": "subscribe", "id": "a", "stream": "head-1", "from": 3 })))
            .await
            .expect("send");
        assert_eq!(ws_next_json(&mut ws).await.expect("reply")["type"], "subscribed");
        ws.send(text(json!({ "type": "subscribe", "id": "b", "stream": "head-1", "from": 4 })))
            .await
            .expect("send");
        let m = ws_next_json(&mut ws).await.expect("reply");
        assert_eq!(
            (m["type"].as_str(), m["error"]["code"].as_str()),
            (Some("error"), Some("beyond_head")),
            "{m}"
        );
        s.append("head-1", "any", json!([event("C", json!({}))])).await;
        let m = ws_next_json(&mut ws).await.expect("socket open");
        assert_eq!((m["id"].as_str(), m["event"]["version"].as_u64()), (Some("a"), Some(3)), "{m}");
        s.stop().await;
    })
    .await;
}

/// Filters are checked before the feed starts: a bad one is a 400 JSON
/// answer (SSE) or an `error` message (WebSocket), as for `GET /all`, not a
/// 200 feed that ends at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_feeds_refuse_invalid_filters_up_front() {
    within(60, async {
        let s = start(open_config()).await;
        // A misspelt parameter would otherwise follow the whole log.
        for query in ["category=a%01b", "stream_prefix=%07", "type=A%01B", "stream_prefx=a"] {
            let (status, body) = s.get(&format!("/all?{query}")).await;
            assert_eq!(status, 400, "GET /all?{query}: {body}");
            let resp = s.client.get(s.url(&format!("/all/live?{query}"))).send().await.expect("request");
            assert_eq!(resp.status(), 400, "/all/live?{query}");
            let body: Value = resp.json().await.expect("a JSON body");
            assert!(body["error"]["code"].is_string(), "{body}");
        }
        let resp = s.client.get(s.url("/streams/ok-1/live?fro=3")).send().await.expect("request");
        assert_eq!(resp.status(), 400, "/streams/ok-1/live?fro=3");
        let body: Value = resp.json().await.expect("a JSON body");
        assert_eq!(body["error"]["code"], "invalid_query", "{body}");
        let mut ws = ws_connect(&s).await;
        ws.send(text(json!({ "type": "subscribe", "id": "a", "stream": "ok-1" }))).await.expect("send");
        assert_eq!(ws_next_json(&mut ws).await.expect("reply")["type"], "subscribed");
        ws.send(text(
            json!({ "type": "subscribe", "id": "b", "stream": "$all", "filter": { "category": "a\u{1}" } }),
        ))
        .await
        .expect("send");
        let m = ws_next_json(&mut ws).await.expect("reply");
        assert_eq!(m["type"], "error", "a bad filter is refused, not subscribed: {m}");
        // The socket and its first subscription go on.
        s.append("ok-1", "any", json!([event("A", json!({}))])).await;
        let m = ws_next_json(&mut ws).await.expect("socket open");
        assert_eq!((m["type"].as_str(), m["id"].as_str()), (Some("event"), Some("a")), "{m}");
        s.stop().await;
    })
    .await;
}

/// A client message over the 64 KiB limit (or any frame that cannot be
/// read) used to drop the socket without a word, so the client could not
/// tell where its subscriptions stopped. It now ends like any other
/// connection-wide ending: one notice per subscription with its last
/// position and version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_websocket_message_ends_with_where_each_subscription_stopped() {
    let s = start(open_config()).await;
    let (status, _) = s.append("big-1", "any", json!([event("A", json!({})), event("B", json!({}))])).await;
    assert_eq!(status, 201);
    let mut ws = ws_connect(&s).await;
    ws.send(text(json!({ "type": "subscribe", "id": "a", "stream": "big-1" }))).await.expect("send");
    within(10, async {
        assert_eq!(ws_next_json(&mut ws).await.expect("subscribed")["type"], "subscribed");
        for version in 0..2 {
            let m = ws_next_json(&mut ws).await.expect("event");
            assert_eq!(m["event"]["version"], version, "{m}");
        }
    })
    .await;
    let huge = json!({ "type": "unsubscribe", "id": "x".repeat(70 * 1024) });
    // The server may close before the whole frame is written.
    let _ = ws.send(text(huge)).await;
    let notice = within(10, ws_next_json(&mut ws)).await.expect("a notice before the socket closes");
    assert_eq!(notice["type"], "protocol_error", "{notice}");
    assert_eq!(notice["id"], "a", "{notice}");
    assert_eq!(notice["last_position"], 1, "{notice}");
    assert_eq!(notice["last_version"], 1, "{notice}");
    assert!(notice["message"].as_str().is_some_and(|m| m.contains("64 KiB")), "{notice}");
    s.stop().await;
}

/// An error about a message that names a subscription carries that `id`,
/// so a client running several subscriptions knows which request failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_errors_name_the_subscription_they_concern() {
    let s = start(open_config()).await;
    let mut ws = ws_connect(&s).await;
    ws.send(text(json!({ "type": "subscribe", "id": "a", "stream": "e-1" }))).await.expect("send");
    assert_eq!(within(10, ws_next_json(&mut ws)).await.expect("subscribed")["type"], "subscribed");
    let cases = [
        (json!({ "type": "subscribe", "id": "a", "stream": "e-2" }), "a"),
        (json!({ "type": "subscribe", "id": "b", "stream": "e-2", "from": "nowhere" }), "b"),
        (json!({ "type": "subscribe", "id": "c", "stream": "e-2", "filter": {} }), "c"),
        (json!({ "type": "unsubscribe", "id": "zz" }), "zz"),
        // Invalid as a message (unknown field), still naming its id.
        (json!({ "type": "subscribe", "id": "d", "stream": "e-2", "color": 1 }), "d"),
    ];
    for (message, id) in cases {
        ws.send(text(message.clone())).await.expect("send");
        let reply = within(10, ws_next_json(&mut ws)).await.expect("reply");
        assert_eq!(reply["type"], "error", "{message} -> {reply}");
        assert_eq!(reply["id"], id, "{message} -> {reply}");
    }
    // A message with no id gets an error without one, and the socket stays.
    ws.send(text(json!({ "type": "nonsense" }))).await.expect("send");
    let reply = within(10, ws_next_json(&mut ws)).await.expect("reply");
    assert_eq!(reply["type"], "error", "{reply}");
    assert!(reply.get("id").is_none(), "{reply}");
    // An invalid first message closes the socket, naming its id too.
    let mut other = ws_connect(&s).await;
    other
        .send(text(json!({ "type": "subscribe", "id": "q", "stream": "e-1", "from": -1 })))
        .await
        .expect("send");
    let reply = within(10, ws_next_json(&mut other)).await.expect("reply");
    assert_eq!((reply["type"].as_str(), reply["id"].as_str()), (Some("error"), Some("q")), "{reply}");
    s.stop().await;
}

/// An SSE subscription that fails (its stream tombstoned) while the
/// connection's queue is full used to end without saying why: the notice
/// waited `slow_client_timeout_ms` for room in the queue and was then
/// dropped, so the client saw the stream end after its last event with no
/// `stream_deleted`. The notice now needs no room: it follows the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_ending_is_told_even_behind_a_full_queue() {
    let limits = Limits { max_event_size: 64 << 20, max_append_size: 128 << 20, ..Limits::default() };
    let store = Arc::new(MemoryStore::with_limits(limits));
    let mut config = open_config();
    config.live.buffer_events = 2;
    config.live.slow_client_timeout_ms = 200;
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let s = start_with_store(listener, store.clone(), config).await;
    let stream = StreamName::new("full-1").expect("name");
    // 32 MiB: more than the socket buffers of both ends hold, so the
    // connection stalls inside this event while the client reads nothing.
    let big = EventData::json("Big", &json!({ "pad": "x".repeat(32 << 20) })).expect("event");
    store.append(&stream, ExpectedVersion::Any, vec![big]).await.expect("append");
    let resp = s.client.get(s.url("/streams/full-1/live")).send().await.expect("subscribe");
    assert_eq!(resp.status(), 200);
    for _ in 0..2 {
        let small = EventData::json("Small", &json!({})).expect("event");
        store.append(&stream, ExpectedVersion::Any, vec![small]).await.expect("append");
    }
    // The big event is with the connection, the two small ones fill the
    // queue.
    within(30, async {
        while s.metric("annals_delivered_events_total").await < 3.0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    store.delete_stream(&stream, ExpectedVersion::Any, DeleteMode::Hard).await.expect("tombstone");
    // Longer than the slow-client timeout, which the notice used to wait.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let records = within(60, read_sse(resp, |all| all.iter().any(|r| r.0 != "event"))).await;
    let ids: Vec<_> = records.iter().filter(|r| r.0 == "event").filter_map(|r| r.1.clone()).collect();
    assert_eq!(ids, ["0", "1", "2"]);
    let (kind, _, data) = records.last().expect("records");
    assert_eq!(kind, "stream_deleted", "{data}");
    let data: Value = serde_json::from_str(data).expect("json");
    assert_eq!(data["last_version"], 2, "{data}");
    s.stop().await;
}

/// Endings told every client to "reconnect from last_position + 1", but a
/// stream feed resumes by version: `from` (and `Last-Event-ID`) of a
/// stream is a version, so a client that followed the text on a stream
/// whose positions run ahead of its versions was refused with
/// `beyond_head`, or, once the stream had grown that far, skipped the
/// events in between. The text now names the number to use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endings_say_how_to_resume_in_the_feeds_own_numbering() {
    let s = start(open_config()).await;
    let (status, _) = s.append("noise-1", "any", json!([event("N", json!({})), event("N", json!({}))])).await;
    assert_eq!(status, 201);
    let (status, _) = s.append("guide-1", "any", json!([event("A", json!({})), event("B", json!({}))])).await;
    assert_eq!(status, 201);
    // guide-1: versions 0 and 1 at positions 2 and 3.
    let resp = s.client.get(s.url("/streams/guide-1/live")).send().await.expect("sse");
    let sse = tokio::spawn(read_sse(resp, |all| all.iter().any(|r| r.0 != "event")));
    let mut ws = ws_connect(&s).await;
    ws.send(text(json!({ "type": "subscribe", "id": "s", "stream": "guide-1" }))).await.expect("send");
    ws.send(text(json!({ "type": "subscribe", "id": "a", "stream": "$all" }))).await.expect("send");
    within(30, async {
        let (mut subscribed, mut events) = (0, 0);
        while subscribed < 2 || events < 2 + 4 {
            let m = ws_next_json(&mut ws).await.expect("message");
            match m["type"].as_str() {
                Some("subscribed") => subscribed += 1,
                Some("event") => events += 1,
                _ => panic!("{m}"),
            }
        }
    })
    .await;
    s.stop().await;
    let records = within(30, sse).await.expect("reader");
    let (last, _) = records.split_last().expect("records");
    assert_eq!(last.0, "shutdown");
    let notice: Value = serde_json::from_str(&last.2).expect("json");
    let message = notice["message"].as_str().expect("message");
    assert!(message.contains("version 2") && !message.contains("last_position"), "{notice}");
    let mut told = std::collections::BTreeMap::new();
    within(30, async {
        while let Some(m) = ws_next_json(&mut ws).await {
            told.insert(
                m["id"].as_str().expect("id").to_owned(),
                m["message"].as_str().expect("text").to_owned(),
            );
        }
    })
    .await;
    assert!(told["s"].contains("version 2") && !told["s"].contains("last_position"), "{told:?}");
    assert!(told["a"].contains("position 4"), "{told:?}");
}

/// A live feed of a tombstoned stream is refused before it starts (410
/// `stream_deleted`), whatever its starting point: answering 200 and then
/// `stream_deleted` had `EventSource` reconnect to it for good. A
/// soft-deleted stream can be recreated, so its feed starts as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feeds_of_a_tombstoned_stream_are_refused_up_front() {
    let s = start(open_config()).await;
    for stream in ["tomb-1", "soft-1"] {
        let (status, _) =
            s.append(stream, "any", json!([event("A", json!({})), event("B", json!({}))])).await;
        assert_eq!(status, 201);
    }
    let deleted = s.client.delete(s.url("/streams/tomb-1?hard=true")).send().await.expect("delete");
    assert!(deleted.status().is_success(), "{}", deleted.status());
    let deleted = s.client.delete(s.url("/streams/soft-1")).send().await.expect("delete");
    assert!(deleted.status().is_success(), "{}", deleted.status());
    for (path, last_event_id) in [
        ("/streams/tomb-1/live", None),
        ("/streams/tomb-1/live?from=end", None),
        ("/streams/tomb-1/live?from=1", None),
        ("/streams/tomb-1/live", Some("0")),
    ] {
        let mut request = s.client.get(s.url(path));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        let resp = within(10, request.send()).await.expect("request");
        assert_eq!(resp.status(), 410, "{path} {last_event_id:?}");
        let body: Value = resp.json().await.expect("a JSON body");
        assert_eq!(body["error"]["code"], "stream_deleted", "{path}: {body}");
    }
    let resp = within(10, s.client.get(s.url("/streams/soft-1/live")).send()).await.expect("request");
    assert_eq!(resp.status(), 200, "a soft-deleted stream's feed starts");
    let mut ws = ws_connect(&s).await;
    ws.send(text(json!({ "type": "subscribe", "id": "s", "stream": "soft-1" }))).await.expect("send");
    assert_eq!(within(10, ws_next_json(&mut ws)).await.expect("reply")["type"], "subscribed");
    ws.send(text(json!({ "type": "subscribe", "id": "t", "stream": "tomb-1" }))).await.expect("send");
    let reply = within(10, ws_next_json(&mut ws)).await.expect("reply");
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!((reply["error"]["code"].as_str(), reply["id"].as_str()), (Some("stream_deleted"), Some("t")));
    s.stop().await;
}
