//! Helpers for writing behaviours.

use std::time::Duration;

use annals_core::{
    ContentType, EventData, EventStream, Metadata, ReadStream, RecordedEvent, StreamName, StreamReader,
};
use futures::StreamExt;
use serde_json::json;

/// How long a behaviour waits for something that should happen promptly.
pub const PATIENCE: Duration = Duration::from_secs(20);

pub fn stream(name: &str) -> StreamName {
    StreamName::new(name).expect("valid stream name")
}

pub fn event(event_type: &str, n: u64) -> EventData {
    EventData::json(event_type, &json!({ "n": n })).expect("serializable")
}

pub fn events(event_type: &str, count: u64) -> Vec<EventData> {
    (0..count).map(|n| event(event_type, n)).collect()
}

pub fn with_correlation(e: EventData, id: &str) -> EventData {
    let m = e.metadata.with(annals_core::metadata::keys::CORRELATION_ID, id);
    e.with_metadata(m)
}

pub fn binary(event_type: &str, bytes: Vec<u8>) -> EventData {
    EventData::raw(event_type, bytes, ContentType::Binary)
}

pub fn meta(value: serde_json::Value) -> Metadata {
    Metadata::from_value(value).expect("object")
}

pub async fn read_versions<S: StreamReader>(store: &S, s: &StreamName) -> Vec<u64> {
    store.read_stream(s, ReadStream::forward()).await.expect("read").iter().map(|e| e.version).collect()
}

/// Takes exactly `n` events from a subscription, failing the test if they
/// do not arrive within [`PATIENCE`].
pub async fn take(sub: &mut EventStream, n: usize) -> Vec<RecordedEvent> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(PATIENCE, sub.next()).await {
            Ok(Some(Ok(e))) => out.push(e),
            Ok(Some(Err(e))) => panic!("subscription failed after {} events: {e}", out.len()),
            Ok(None) => panic!("subscription ended after {} of {n} events", out.len()),
            Err(_) => panic!("timed out waiting for event {} of {n}", out.len() + 1),
        }
    }
    out
}

/// Asserts nothing more arrives on the subscription for a short while.
pub async fn assert_quiet(sub: &mut EventStream) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(200), sub.next()).await {
        panic!("expected no further events, got {:?}", item.map(|r| r.map(|e| (e.stream, e.version))));
    }
}
