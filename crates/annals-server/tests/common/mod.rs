//! Shared test helpers: a real server on 127.0.0.1:0 over a MemoryStore.

#![allow(dead_code, unreachable_pub, missing_docs)]

use std::{sync::Arc, time::Duration};

use annals_core::MemoryStore;
use annals_server::{AppState, Role, ServerConfig};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};

pub struct TestServer {
    pub base: String,
    pub addr: std::net::SocketAddr,
    pub state: AppState,
    pub client: reqwest::Client,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

/// A config open to anonymous admins (the loopback default of `annals serve`).
pub fn open_config() -> ServerConfig {
    let mut c = ServerConfig::default();
    c.auth.anonymous = Some(Role::Admin);
    c
}

pub async fn start(config: ServerConfig) -> TestServer {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    start_on(listener, config).await
}

pub async fn start_on(listener: TcpListener, config: ServerConfig) -> TestServer {
    start_with_store(listener, Arc::new(MemoryStore::new()), config).await
}

/// A server over `store`; several servers may serve one store in turn
/// (a restart).
pub async fn start_with_store(
    listener: TcpListener,
    store: Arc<dyn annals_core::Store>,
    config: ServerConfig,
) -> TestServer {
    let state = AppState::with_backend(store, config, "memory").expect("config");
    start_state(listener, state).await
}

/// A server over a prepared `state` (e.g. with leases attached).
pub async fn start_state(listener: TcpListener, state: AppState) -> TestServer {
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = oneshot::channel::<()>();
    let run_state = state.clone();
    let handle = tokio::spawn(async move {
        annals_server::run(listener, run_state, async {
            let _ = rx.await;
        })
        .await
        .expect("server run");
    });
    TestServer {
        base: format!("http://{addr}"),
        addr,
        state,
        client: reqwest::Client::new(),
        shutdown: Some(tx),
        handle: Some(handle),
    }
}

impl TestServer {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Appends `events` (JSON array) to `stream`; returns (status, body).
    pub async fn append(&self, stream: &str, expected: &str, events: Value) -> (u16, Value) {
        let resp = self
            .client
            .post(self.url(&format!("/streams/{stream}?expected={expected}")))
            .json(&events)
            .send()
            .await
            .expect("append request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self.client.get(self.url(path)).send().await.expect("get request");
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    }

    /// Stops the server and waits (bounded) for `run` to return.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            tokio::time::timeout(Duration::from_secs(30), h)
                .await
                .expect("server stops in time")
                .expect("join");
        }
    }

    /// The value of a counter/gauge line in `/metrics` (0 when absent).
    pub async fn metric(&self, name: &str) -> f64 {
        let text =
            self.client.get(self.url("/metrics")).send().await.expect("metrics").text().await.expect("text");
        text.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

pub fn event(t: &str, data: Value) -> Value {
    json!({ "type": t, "data": data })
}

/// Bounds every test so a bug hangs nothing.
pub async fn within<F: std::future::Future>(secs: u64, f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(secs), f).await.expect("test step timed out")
}

/// A minimal `text/event-stream` parser: (event, id, data) per record.
#[derive(Default)]
pub struct Sse {
    buf: String,
}

impl Sse {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<(String, Option<String>, String)> {
        self.buf.push_str(&String::from_utf8_lossy(bytes));
        let mut out = Vec::new();
        while let Some(end) = self.buf.find("\n\n") {
            let record: String = self.buf.drain(..end + 2).collect();
            let (mut ev, mut id, mut data) = (String::new(), None, String::new());
            for line in record.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    ev = v.to_owned();
                } else if let Some(v) = line.strip_prefix("id: ") {
                    id = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push_str(v);
                }
            }
            if !ev.is_empty() {
                out.push((ev, id, data));
            }
        }
        out
    }
}

/// Reads SSE records until `done` says stop or the stream ends.
pub async fn read_sse(
    resp: reqwest::Response,
    mut done: impl FnMut(&[(String, Option<String>, String)]) -> bool,
) -> Vec<(String, Option<String>, String)> {
    use futures::StreamExt;
    let mut body = resp.bytes_stream();
    let mut parser = Sse::default();
    let mut all = Vec::new();
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else { break };
        all.extend(parser.push(&chunk));
        if done(&all) {
            break;
        }
    }
    all
}

/// The next text message of a WebSocket as JSON; `None` once it closes or
/// fails.
pub async fn ws_next_json<S>(ws: &mut S) -> Option<Value>
where
    S: futures::Stream<
            Item = Result<tokio_tungstenite::tungstenite::Message, tokio_tungstenite::tungstenite::Error>,
        > + Unpin,
{
    use futures::StreamExt as _;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match ws.next().await? {
            Ok(Message::Text(t)) => return Some(serde_json::from_str(t.as_str()).expect("a JSON message")),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}
