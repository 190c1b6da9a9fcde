//! Store failures map to the documented statuses, and readiness follows the
//! store's ability to write.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use annals_core::{
    AllReader, AllSlice, AppendResult, Appender, CheckpointStore, DeleteMode, Error, EventData, EventStream,
    ExpectedVersion, MemoryStore, ReadAll, ReadStream, RecordedEvent, Result, Snapshot, SnapshotStore,
    StreamAppend, StreamDeleter, StreamInfo, StreamName, StreamReader, Subscriber, SubscriptionRequest,
    async_trait,
};
use annals_server::{AppState, Role, ServerConfig, app};
use axum::{body::Body, http::Request};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

/// A MemoryStore whose appends fail with `Poisoned` while `broken` is set
/// (with `OutcomeUnknown` while `lost` is set), and whose health check
/// fails while `unhealthy` is set.
#[derive(Default)]
struct Flaky {
    inner: MemoryStore,
    broken: AtomicBool,
    lost: AtomicBool,
    unhealthy: AtomicBool,
}

impl Flaky {
    fn check(&self) -> Result<()> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(Error::Poisoned { reason: "fsync failed (test)".into() });
        }
        if self.lost.load(Ordering::SeqCst) {
            return Err(Error::OutcomeUnknown { reason: "the connection broke (test)".into() });
        }
        Ok(())
    }
}

#[async_trait]
impl Appender for Flaky {
    async fn append(&self, s: &StreamName, e: ExpectedVersion, ev: Vec<EventData>) -> Result<AppendResult> {
        self.check()?;
        self.inner.append(s, e, ev).await
    }
    async fn append_multi(&self, parts: Vec<StreamAppend>) -> Result<Vec<AppendResult>> {
        self.check()?;
        self.inner.append_multi(parts).await
    }
    async fn health(&self) -> Result<()> {
        if self.unhealthy.load(Ordering::SeqCst) {
            return Err(Error::Backend { message: "database unreachable (test)".into(), source: None });
        }
        Ok(())
    }
}

#[async_trait]
impl StreamReader for Flaky {
    async fn read_stream(&self, s: &StreamName, r: ReadStream) -> Result<Vec<RecordedEvent>> {
        self.inner.read_stream(s, r).await
    }
    async fn stream_info(&self, s: &StreamName) -> Result<StreamInfo> {
        self.inner.stream_info(s).await
    }
}

#[async_trait]
impl AllReader for Flaky {
    async fn read_all(&self, r: ReadAll) -> Result<AllSlice> {
        self.inner.read_all(r).await
    }
    async fn next_position(&self) -> Result<u64> {
        self.inner.next_position().await
    }
}

impl Subscriber for Flaky {
    fn subscribe(&self, r: SubscriptionRequest) -> EventStream {
        self.inner.subscribe(r)
    }
}

#[async_trait]
impl StreamDeleter for Flaky {
    async fn delete_stream(&self, s: &StreamName, e: ExpectedVersion, m: DeleteMode) -> Result<()> {
        self.inner.delete_stream(s, e, m).await
    }
}

#[async_trait]
impl SnapshotStore for Flaky {
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
impl CheckpointStore for Flaky {
    async fn load_checkpoint(&self, n: &str) -> Result<Option<u64>> {
        self.inner.load_checkpoint(n).await
    }
    async fn save_checkpoint(&self, n: &str, p: u64) -> Result<()> {
        self.inner.save_checkpoint(n, p).await
    }
}

async fn call(router: &axum::Router, method: &str, path: &str, body: &str) -> (u16, Value) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from(body.to_owned()))
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test]
async fn poisoned_store_answers_503_and_is_not_ready() {
    let store = Arc::new(Flaky::default());
    let mut config = ServerConfig::default();
    config.auth.anonymous = Some(Role::Admin);
    let router = app(AppState::new(store.clone(), config).unwrap());
    let event = r#"[{"type":"E","data":{}}]"#;
    assert_eq!(call(&router, "POST", "/streams/p-1", event).await.0, 201);
    assert_eq!(call(&router, "GET", "/health/ready", "").await.0, 200);

    store.broken.store(true, Ordering::SeqCst);
    let (status, err) = call(&router, "POST", "/streams/p-1", event).await;
    assert_eq!(status, 503);
    assert_eq!(err["error"]["code"], "store_poisoned");
    let (status, err) = call(&router, "GET", "/health/ready", "").await;
    assert_eq!(status, 503);
    assert_eq!(err["error"]["code"], "store_not_writable");
    // Reads still work and liveness is unaffected.
    assert_eq!(call(&router, "GET", "/streams/p-1", "").await.0, 200);
    assert_eq!(call(&router, "GET", "/health/live", "").await.0, 200);

    store.broken.store(false, Ordering::SeqCst);
    assert_eq!(call(&router, "POST", "/streams/p-1", event).await.0, 201);
    assert_eq!(call(&router, "GET", "/health/ready", "").await.0, 200);
}

#[tokio::test]
async fn unhealthy_store_is_not_ready_before_any_append() {
    let store = Arc::new(Flaky::default());
    let mut config = ServerConfig::default();
    config.auth.anonymous = Some(Role::Admin);
    let router = app(AppState::new(store.clone(), config).unwrap());
    assert_eq!(call(&router, "GET", "/health/ready", "").await.0, 200);
    store.unhealthy.store(true, Ordering::SeqCst);
    let (status, err) = call(&router, "GET", "/health/ready", "").await;
    assert_eq!(status, 503);
    assert_eq!(err["error"]["code"], "backend_error");
    let req = Request::builder().uri("/health/ready").body(Body::empty()).unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    assert_eq!(
        resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned()).as_deref(),
        Some("1")
    );
    assert_eq!(call(&router, "GET", "/health/live", "").await.0, 200);
    store.unhealthy.store(false, Ordering::SeqCst);
    assert_eq!(call(&router, "GET", "/health/ready", "").await.0, 200);
}

#[tokio::test]
async fn an_append_of_unknown_outcome_answers_503_outcome_unknown() {
    let store = Arc::new(Flaky::default());
    let mut config = ServerConfig::default();
    config.auth.anonymous = Some(Role::Admin);
    let router = app(AppState::new(store.clone(), config).unwrap());
    let event = r#"[{"id":"7f1c1b5e-0c1a-4e57-9a51-3d1c2f0b9a10","type":"E","data":{}}]"#;
    store.lost.store(true, Ordering::SeqCst);
    let req = Request::builder()
        .method("POST")
        .uri("/streams/u-1")
        .header("content-type", "application/json")
        .body(Body::from(event))
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(resp.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
    let body: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["error"]["code"], "outcome_unknown", "{body}");
    assert_eq!(call(&router, "GET", "/health/ready", "").await.1["error"]["code"], "store_not_writable");

    // The re-send, unchanged, once the store is back: written once.
    store.lost.store(false, Ordering::SeqCst);
    assert_eq!(call(&router, "POST", "/streams/u-1", event).await.0, 201);
    assert_eq!(call(&router, "POST", "/streams/u-1", event).await.0, 201);
    let (status, read) = call(&router, "GET", "/streams/u-1", "").await;
    assert_eq!(status, 200);
    assert_eq!(read["events"].as_array().map(Vec::len), Some(1), "{read}");
    assert_eq!(call(&router, "GET", "/health/ready", "").await.0, 200);
}

/// A transient write failure (here an append of unknown outcome) keeps the
/// server not ready for a bounded window only: a load balancer that routes
/// only to ready servers sends it no append that could clear the flag, so
/// without a bound one database blip took the server out for good.
#[tokio::test(start_paused = true)]
async fn a_transient_write_failure_leaves_readiness_after_a_window() {
    let store = Arc::new(Flaky::default());
    let mut config = ServerConfig::default();
    config.auth.anonymous = Some(Role::Admin);
    let router = app(AppState::new(store.clone(), config).unwrap());
    store.lost.store(true, Ordering::SeqCst);
    assert_eq!(call(&router, "POST", "/streams/w-1", r#"[{"type":"E","data":{}}]"#).await.0, 503);
    store.lost.store(false, Ordering::SeqCst);
    assert_eq!(call(&router, "GET", "/health/ready", "").await.1["error"]["code"], "store_not_writable");
    tokio::time::advance(annals_server::metrics::WRITE_FAILURE_READY_WINDOW / 2).await;
    assert_eq!(call(&router, "GET", "/health/ready", "").await.1["error"]["code"], "store_not_writable");
    tokio::time::advance(annals_server::metrics::WRITE_FAILURE_READY_WINDOW).await;
    let (status, body) = call(&router, "GET", "/health/ready", "").await;
    assert_eq!(status, 200, "{body}");
}

/// A poisoned store stays not ready however long ago it failed (it cannot
/// heal without a restart).
#[tokio::test(start_paused = true)]
async fn a_poisoned_store_stays_not_ready() {
    let store = Arc::new(Flaky::default());
    let mut config = ServerConfig::default();
    config.auth.anonymous = Some(Role::Admin);
    let router = app(AppState::new(store.clone(), config).unwrap());
    store.broken.store(true, Ordering::SeqCst);
    assert_eq!(call(&router, "POST", "/streams/p-1", r#"[{"type":"E","data":{}}]"#).await.0, 503);
    store.broken.store(false, Ordering::SeqCst);
    tokio::time::advance(annals_server::metrics::WRITE_FAILURE_READY_WINDOW * 3).await;
    assert_eq!(call(&router, "GET", "/health/ready", "").await.1["error"]["code"], "store_not_writable");
}
