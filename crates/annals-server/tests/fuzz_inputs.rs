//! Garbage in, JSON 4xx out: deterministic pseudo-random inputs through the
//! router (no socket). The server must never answer 5xx or panic on input.

use std::sync::Arc;

use annals_server::{AppState, Role, ServerConfig, app};
use axum::{body::Body, http::Request};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;

/// xorshift64*: reproducible without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

const FRAGMENTS: &[&str] = &[
    "[",
    "]",
    "{",
    "}",
    "\"type\"",
    ":",
    ",",
    "\"data\"",
    "\"id\"",
    "\"metadata\"",
    "\"content_type\"",
    "null",
    "1e999",
    "-1",
    "\"\\u0000\"",
    "\"application/octet-stream\"",
    "\"x\"",
    "true",
    "\"=\"",
    "\"streams\"",
    "\"events\"",
    "\"expected\"",
    "\"version\"",
    "\"stream\"",
    "\u{7f}",
    "\r\n",
    "\"$all\"",
    "[]",
    "{}",
    "18446744073709551616",
    "\"0190f0b4-0000-7000-8000-000000000001\"",
    "\"not-a-uuid\"",
];

const PATHS: &[&str] = &[
    "/streams/s-1",
    "/streams/%24sys",
    "/streams/a%00b",
    "/streams/%FF%FE",
    "/transactions",
    "/streams/s-1/snapshot",
    "/checkpoints/c",
    "/checkpoints/%0A",
    "/all?from=-1",
    "/all?direction=sideways",
    "/all?after=2026-02-30T25:61:61Z",
    "/all?limit=99999999999999999999999",
    "/all?include_system=maybe",
    "/streams/s-1?from=18446744073709551615&direction=backward",
    "/streams/s-1/live?from=x",
    "/all/live?from=-5",
    "/streams/s-1?expected=%FF",
];

#[tokio::test]
async fn random_garbage_never_gets_a_5xx() {
    let store: Arc<dyn annals_core::Store> = Arc::new(annals_core::MemoryStore::new());
    let mut config = ServerConfig::default();
    config.auth.anonymous = Some(Role::Admin);
    let router = app(AppState::new(store, config).unwrap());
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for _ in 0..1500 {
        let mut body = String::new();
        for _ in 0..(rng.next() % 24) {
            body.push_str(rng.pick(FRAGMENTS));
        }
        let method = rng.pick(&["GET", "POST", "PUT", "DELETE"]);
        let path = rng.pick(PATHS);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .header("ES-ExpectedVersion", rng.pick(&["any", "-7", "zz", "3", "stream_exists"]))
            .body(Body::from(body.clone()))
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        assert!(!status.is_server_error(), "{method} {path} {body:?} → {status}");
        if status.is_client_error() {
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            let v: Value = serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| panic!("{method} {path} → {status} without a JSON body"));
            assert!(v["error"]["code"].is_string(), "{v}");
        }
    }
}
