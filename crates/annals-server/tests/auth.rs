//! Authentication, authorization, ACLs, rate limiting and start-up safety.

mod common;

use std::time::{SystemTime, UNIX_EPOCH};

use annals_server::{
    Role, ServerConfig, ServerError,
    config::{ApiKeyConfig, JwtConfig},
};
use common::{TestServer, event, start, within};
use futures::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "test-secret-at-least-16-bytes";
const PRIVATE_PEM: &str = include_str!("fixtures/rs256_test_private.pem");
const PUBLIC_PEM: &str = include_str!("fixtures/rs256_test_public.pem");
const READER_KEY: &str = "reader-key-0123456789";
const BILLING_KEY: &str = "billing-writer-key-0123";
const ADMIN_KEY: &str = "admin-key-0123456789ab";

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn hs256(claims: Value) -> String {
    encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET.as_bytes())).unwrap()
}

fn rs256(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::RS256),
        &claims,
        &EncodingKey::from_rsa_pem(PRIVATE_PEM.as_bytes()).unwrap(),
    )
    .unwrap()
}

fn secured_config() -> ServerConfig {
    let mut c = ServerConfig::default();
    c.auth.jwt = Some(JwtConfig {
        hs256_secret: Some(SECRET.into()),
        rs256_public_key: Some(PUBLIC_PEM.into()),
        ..JwtConfig::default()
    });
    c.auth.api_keys = vec![
        ApiKeyConfig { name: "reporting".into(), key: READER_KEY.into(), role: Role::Reader, streams: None },
        ApiKeyConfig {
            name: "billing".into(),
            key: BILLING_KEY.into(),
            role: Role::Writer,
            streams: Some(vec!["billing-".into()]),
        },
        ApiKeyConfig { name: "ops".into(), key: ADMIN_KEY.into(), role: Role::Admin, streams: None },
    ];
    c
}

async fn call(
    s: &TestServer,
    method: reqwest::Method,
    path: &str,
    auth: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut req = s.client.request(method, s.url(path));
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

fn one_event() -> Option<Value> {
    Some(json!([event("E", json!({}))]))
}

#[tokio::test]
async fn jwt_hs256_and_rs256() {
    within(60, async {
        let s = start(secured_config()).await;
        use reqwest::Method as M;
        // No credentials: 401 with a JSON body and a challenge.
        let resp = s.client.get(s.url("/streams/a-1")).send().await.unwrap();
        assert_eq!(resp.status(), 401);
        assert_eq!(resp.headers()["www-authenticate"], "Bearer");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "unauthenticated");
        // Probes stay public.
        assert_eq!(s.get("/health/live").await.0, 200);
        assert_eq!(s.get("/info").await.0, 200);

        let writer =
            format!("Bearer {}", hs256(json!({ "sub": "svc-a", "role": "writer", "exp": now() + 3600 })));
        assert_eq!(call(&s, M::POST, "/streams/a-1", Some(&writer), one_event()).await.0, 201);
        assert_eq!(call(&s, M::GET, "/streams/a-1", Some(&writer), None).await.0, 200);
        // Writers may not delete.
        let (status, v) = call(&s, M::DELETE, "/streams/a-1", Some(&writer), None).await;
        assert_eq!(status, 403);
        assert_eq!(v["error"]["code"], "forbidden");

        let reader =
            format!("Bearer {}", rs256(json!({ "sub": "dash", "roles": ["reader"], "exp": now() + 3600 })));
        assert_eq!(call(&s, M::GET, "/streams/a-1", Some(&reader), None).await.0, 200);
        assert_eq!(call(&s, M::POST, "/streams/a-1", Some(&reader), one_event()).await.0, 403);
        let admin =
            format!("Bearer {}", rs256(json!({ "sub": "root", "role": "admin", "exp": now() + 3600 })));
        assert_eq!(call(&s, M::DELETE, "/streams/a-1", Some(&admin), None).await.0, 204);

        // Expired, wrongly signed, tampered, role-less, or garbage tokens.
        let expired =
            format!("Bearer {}", hs256(json!({ "sub": "x", "role": "admin", "exp": now() - 3600 })));
        let (status, v) = call(&s, M::GET, "/stats", Some(&expired), None).await;
        assert_eq!(status, 401);
        assert_eq!(v["error"]["code"], "invalid_token");
        assert!(v["error"]["message"].as_str().unwrap().contains("expired"));
        let wrong = encode(
            &Header::new(Algorithm::HS256),
            &json!({ "sub": "x", "role": "admin", "exp": now() + 60 }),
            &EncodingKey::from_secret(b"another-secret-entirely"),
        )
        .unwrap();
        assert_eq!(call(&s, M::GET, "/stats", Some(&format!("Bearer {wrong}")), None).await.0, 401);
        // Change one signature character in the middle (always a real
        // change of signature bits, unlike the padding bits of the last).
        let token = rs256(json!({ "sub": "x", "role": "reader", "exp": now() + 60 }));
        let at = token.len() - 20;
        let replacement = if &token[at..at + 1] == "A" { "B" } else { "A" };
        let tampered = format!("{}{replacement}{}", &token[..at], &token[at + 1..]);
        assert_eq!(call(&s, M::GET, "/stats", Some(&format!("Bearer {tampered}")), None).await.0, 401);
        let roleless = format!("Bearer {}", hs256(json!({ "sub": "x", "exp": now() + 60 })));
        assert_eq!(call(&s, M::GET, "/stats", Some(&roleless), None).await.0, 403);
        assert_eq!(call(&s, M::GET, "/stats", Some("Bearer not.a.token"), None).await.0, 401);
        assert_eq!(call(&s, M::GET, "/stats", Some("Basic dXNlcjpwYXNz"), None).await.0, 401);
        s.stop().await;
    })
    .await;
}

#[tokio::test]
async fn api_keys_roles_and_prefix_acls() {
    within(60, async {
        let s = start(secured_config()).await;
        use reqwest::Method as M;
        let billing = format!("ApiKey {BILLING_KEY}");
        let reader = format!("Bearer {READER_KEY}");
        let admin = format!("ApiKey {ADMIN_KEY}");
        assert_eq!(call(&s, M::POST, "/streams/billing-1", Some(&billing), one_event()).await.0, 201);
        assert_eq!(call(&s, M::POST, "/streams/hr-1", Some(&admin), one_event()).await.0, 201);
        // The billing key is confined to billing-* streams.
        assert_eq!(call(&s, M::POST, "/streams/hr-1", Some(&billing), one_event()).await.0, 403);
        assert_eq!(call(&s, M::GET, "/streams/hr-1", Some(&billing), None).await.0, 403);
        assert_eq!(call(&s, M::GET, "/all", Some(&billing), None).await.0, 403);
        let (status, v) = call(&s, M::GET, "/all?stream_prefix=billing-", Some(&billing), None).await;
        assert_eq!(status, 200);
        assert_eq!(v["events"].as_array().unwrap().len(), 1);
        let (_, v) = call(&s, M::GET, "/streams", Some(&billing), None).await;
        assert_eq!(v["streams"].as_array().unwrap().len(), 1);
        let tx = json!({ "streams": [
            { "stream": "billing-2", "events": [event("E", json!({}))] },
            { "stream": "hr-2", "events": [event("E", json!({}))] },
        ]});
        assert_eq!(call(&s, M::POST, "/transactions", Some(&billing), Some(tx)).await.0, 403);
        // The reader key reads everything, writes nothing.
        assert_eq!(call(&s, M::GET, "/streams/hr-1", Some(&reader), None).await.0, 200);
        assert_eq!(call(&s, M::POST, "/streams/billing-1", Some(&reader), one_event()).await.0, 403);
        // System streams need admin even to read.
        assert_eq!(call(&s, M::GET, "/all?include_system=true", Some(&reader), None).await.0, 403);
        assert_eq!(call(&s, M::GET, "/all?include_system=true", Some(&admin), None).await.0, 200);
        // X-API-Key and ?access_token= work too.
        let resp = s.client.get(s.url("/stats")).header("x-api-key", READER_KEY).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(s.get(&format!("/stats?access_token={READER_KEY}")).await.0, 200);
        assert_eq!(s.get("/stats?access_token=wrong-wrong-wrong").await.0, 401);
        s.stop().await;
    })
    .await;
}

#[tokio::test]
async fn live_endpoints_are_authenticated() {
    within(60, async {
        let s = start(secured_config()).await;
        assert_eq!(s.client.get(s.url("/all/live")).send().await.unwrap().status(), 401);
        assert_eq!(s.client.get(s.url("/ws")).send().await.unwrap().status(), 401);
        let resp = s
            .client
            .get(s.url("/streams/hr-1/live"))
            .header("authorization", format!("ApiKey {BILLING_KEY}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403);
        let resp = s.client.get(s.url(&format!("/all/live?access_token={READER_KEY}"))).send().await.unwrap();
        assert_eq!(resp.status(), 200);

        // WebSocket without credentials is refused at the upgrade.
        assert!(tokio_tungstenite::connect_async(format!("ws://{}/ws", s.addr)).await.is_err());
        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("ws://{}/ws?access_token={BILLING_KEY}", s.addr))
                .await
                .unwrap();
        ws.send(Message::Text(json!({ "type": "subscribe", "stream": "hr-1" }).to_string().into()))
            .await
            .unwrap();
        let Some(Ok(Message::Text(t))) = ws.next().await else { panic!("expected a message") };
        let m: Value = serde_json::from_str(t.as_str()).unwrap();
        assert_eq!(m["type"], "error");
        assert_eq!(m["error"]["code"], "forbidden");
        s.stop().await;
    })
    .await;
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after() {
    within(60, async {
        let mut config = secured_config();
        config.rate_limit.requests_per_second = 0.5;
        config.rate_limit.burst = 3;
        let s = start(config).await;
        let get = |key: &'static str| s.client.get(s.url("/stats")).header("x-api-key", key).send();
        for _ in 0..3 {
            assert_eq!(get(READER_KEY).await.unwrap().status(), 200);
        }
        let resp = get(READER_KEY).await.unwrap();
        assert_eq!(resp.status(), 429);
        let retry: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
        assert!(retry >= 1);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], "rate_limited");
        // Buckets are per client: another identity is unaffected.
        assert_eq!(get(ADMIN_KEY).await.unwrap().status(), 200);
        assert!(s.state.metrics().rate_limited.get() >= 1);
        s.stop().await;
    })
    .await;
}

#[test]
fn configuration_errors_name_the_key() {
    let mut c = ServerConfig::default();
    c.auth.jwt = Some(JwtConfig { hs256_secret: Some("short".into()), ..JwtConfig::default() });
    let err = c.validate().unwrap_err();
    assert!(matches!(&err, ServerError::Config { key, .. } if key == "auth.jwt.hs256_secret"), "{err}");

    let mut c = ServerConfig::default();
    c.limits.default_read_limit = 0;
    assert!(
        matches!(c.validate(), Err(ServerError::Config { key, .. }) if key == "limits.default_read_limit")
    );

    let mut c = ServerConfig::default();
    c.auth.jwt = Some(JwtConfig { rs256_public_key: Some("not a key".into()), ..JwtConfig::default() });
    let store: std::sync::Arc<dyn annals_core::Store> = std::sync::Arc::new(annals_core::MemoryStore::new());
    let err = annals_server::AppState::new(store, c).unwrap_err();
    assert!(matches!(&err, ServerError::Config { key, .. } if key == "auth.jwt.rs256_public_key"), "{err}");
}

#[test]
fn public_bind_without_auth_refuses_unless_insecure() {
    let mut c = ServerConfig { listen: "0.0.0.0:2113".parse().unwrap(), ..ServerConfig::default() };
    assert!(matches!(c.check_exposure(), Err(ServerError::Config { key, .. }) if key == "listen"));
    c.insecure = true;
    assert!(c.check_exposure().is_ok());
    let mut c = secured_config();
    c.listen = "0.0.0.0:2113".parse().unwrap();
    assert!(c.check_exposure().is_ok());
    c.auth.anonymous = Some(Role::Reader);
    assert!(c.check_exposure().is_err());
    // Loopback is always allowed.
    assert!(ServerConfig::default().check_exposure().is_ok());
}

#[tokio::test]
async fn forwarded_for_counts_only_behind_trusted_proxies() {
    within(60, async {
        let limited = |trusted: Vec<String>| {
            let mut c = ServerConfig::default();
            c.auth.anonymous = Some(Role::Reader);
            c.rate_limit.requests_per_second = 0.01;
            c.rate_limit.burst = 1;
            c.rate_limit.trusted_proxies = trusted;
            c
        };
        // No trusted proxies: the header is ignored, every request is the
        // peer 127.0.0.1's.
        let s = start(limited(Vec::new())).await;
        let get = |xff: &'static str| s.client.get(s.url("/stats")).header("x-forwarded-for", xff).send();
        assert_eq!(get("203.0.113.1").await.unwrap().status(), 200);
        assert_eq!(get("203.0.113.2").await.unwrap().status(), 429);
        s.stop().await;

        // Loopback trusted: each forwarded client has its own bucket; the
        // nearest untrusted hop (right end, past trusted ones) is the client.
        let s = start(limited(vec!["127.0.0.0/8".into(), "10.0.0.0/8".into()])).await;
        let get = |xff: &'static str| s.client.get(s.url("/stats")).header("x-forwarded-for", xff).send();
        assert_eq!(get("203.0.113.1").await.unwrap().status(), 200);
        assert_eq!(get("203.0.113.2").await.unwrap().status(), 200);
        assert_eq!(get("198.51.100.9, 203.0.113.1, 10.1.2.3").await.unwrap().status(), 429);
        assert_eq!(get("203.0.113.3").await.unwrap().status(), 200);
        s.stop().await;
    })
    .await;
}

#[test]
fn trusted_proxies_are_validated() {
    let mut c = ServerConfig::default();
    c.rate_limit.trusted_proxies = vec!["10.0.0.0/8".into(), "::1".into(), "not-an-ip".into()];
    assert!(
        matches!(c.validate(), Err(ServerError::Config { key, .. }) if key == "rate_limit.trusted_proxies")
    );
    c.rate_limit.trusted_proxies = vec!["10.0.0.0/33".into()];
    assert!(c.validate().is_err());
    c.rate_limit.trusted_proxies = vec!["10.0.0.0/8".into(), "fd00::/8".into()];
    assert!(c.validate().is_ok());
}

#[test]
fn advertise_url_is_validated() {
    let mut c = ServerConfig::default();
    for bad in ["annals-2:2113", "ftp://host", "http://", "http:///path", "http://a b", "http://a\n"] {
        c.advertise_url = Some(bad.to_owned());
        assert!(
            matches!(c.validate(), Err(ServerError::Config { ref key, .. }) if key == "advertise_url"),
            "{bad} must be refused"
        );
    }
    c.advertise_url = Some(format!("http://{}", "h".repeat(annals_core::MAX_LEASE_HOLDER_LEN)));
    assert!(c.validate().is_err(), "too long to publish");
    for good in ["http://annals-2.internal:2113", "https://[fd00::7]:2113/", "https://events.example.com"] {
        c.advertise_url = Some(good.to_owned());
        assert!(c.validate().is_ok(), "{good}");
    }
}

#[test]
fn postgres_pool_settings_are_validated() {
    let mut c = ServerConfig::default();
    assert_eq!((c.store.postgres_max_connections, c.store.postgres_connect_timeout_secs), (16, 5));
    for (n, ok) in [(0, false), (1, true), (1000, true), (1001, false)] {
        c.store.postgres_max_connections = n;
        let got = c.validate();
        assert_eq!(got.is_ok(), ok, "{n}: {got:?}");
        if !ok {
            assert!(
                matches!(got, Err(ServerError::Config { ref key, .. }) if key == "store.postgres_max_connections")
            );
        }
    }
    c.store.postgres_max_connections = 16;
    c.store.postgres_connect_timeout_secs = 0;
    assert!(
        matches!(c.validate(), Err(ServerError::Config { ref key, .. }) if key == "store.postgres_connect_timeout_secs")
    );
    c.store.postgres_connect_timeout_secs = 5;
    assert_eq!(c.store.postgres_answer_timeout_secs, 10);
    for (secs, ok) in [(0, false), (1, true), (3600, true), (3601, false)] {
        c.store.postgres_answer_timeout_secs = secs;
        let got = c.validate();
        assert_eq!(got.is_ok(), ok, "{secs}: {got:?}");
        if !ok {
            assert!(
                matches!(got, Err(ServerError::Config { ref key, .. }) if key == "store.postgres_answer_timeout_secs")
            );
        }
    }
    // With PostgreSQL, an append's no-answer verdict (attempt, then the
    // check) must come before the request timeout cuts the request off.
    c.store.postgres = Some("postgres://postgres@127.0.0.1:5432/test".into());
    assert_eq!(c.timeouts.request_secs, 30);
    for (secs, ok) in [(10, true), (14, true), (15, false), (3600, false)] {
        c.store.postgres_answer_timeout_secs = secs;
        let got = c.validate();
        assert_eq!(got.is_ok(), ok, "{secs}: {got:?}");
        if !ok {
            assert!(
                matches!(got, Err(ServerError::Config { ref key, ref reason }) if key == "store.postgres_answer_timeout_secs" && reason.contains("timeouts.request_secs")),
                "{got:?}"
            );
        }
    }
    c.store.postgres_answer_timeout_secs = 15;
    c.timeouts.request_secs = 31;
    assert!(c.validate().is_ok());
}

/// `nbf` (not before) is checked like `exp`, with the same leeway: a token
/// that is not valid yet is refused.
#[tokio::test]
async fn jwt_not_valid_yet_is_refused() {
    within(60, async {
        let s = start(secured_config()).await;
        use reqwest::Method as M;
        let token = |nbf: i64| {
            format!(
                "Bearer {}",
                hs256(json!({ "sub": "svc", "role": "reader", "exp": now() + 7200, "nbf": nbf }))
            )
        };
        let (status, v) = call(&s, M::GET, "/stats", Some(&token(now() + 3600)), None).await;
        assert_eq!(status, 401, "{v}");
        assert_eq!(v["error"]["code"], "invalid_token");
        // Within the leeway (30 s) and in the past: accepted.
        assert_eq!(call(&s, M::GET, "/stats", Some(&token(now() + 5)), None).await.0, 200);
        assert_eq!(call(&s, M::GET, "/stats", Some(&token(now() - 60)), None).await.0, 200);
        s.stop().await;
    })
    .await;
}

/// The store's own checkpoints (`$ps-{group}`, `$projection-…`,
/// `$saga-…`) steer consumer groups, projections and sagas: moving one
/// makes them skip or repeat events. Only an admin may write them.
#[tokio::test]
async fn system_checkpoints_need_admin_to_write() {
    within(60, async {
        let s = start(secured_config()).await;
        use reqwest::Method as M;
        let writer =
            format!("Bearer {}", hs256(json!({ "sub": "svc", "role": "writer", "exp": now() + 3600 })));
        let admin = format!("ApiKey {ADMIN_KEY}");
        let body = Some(json!({ "position": 1_000_000 }));
        for name in ["$ps-orders", "$projection-balances-active", "$saga-transfer"] {
            let path = format!("/checkpoints/{}", name.replace('$', "%24"));
            let (status, v) = call(&s, M::PUT, &path, Some(&writer), body.clone()).await;
            assert_eq!(status, 403, "{name}: {v}");
            assert_eq!(v["error"]["code"], "forbidden");
            assert_eq!(s.state.store().load_checkpoint(name).await.unwrap(), None, "{name}");
            assert_eq!(call(&s, M::PUT, &path, Some(&admin), body.clone()).await.0, 204, "{name}");
        }
        // User checkpoints stay the writer's to keep.
        assert_eq!(call(&s, M::PUT, "/checkpoints/my-projection", Some(&writer), body.clone()).await.0, 204);
        s.stop().await;
    })
    .await;
}

/// Requests with bad credentials are limited too (by client address):
/// otherwise guessing API keys, or sending tokens that each cost a
/// signature check, is never slowed down.
#[tokio::test]
async fn failed_authentication_is_rate_limited() {
    within(60, async {
        let mut config = secured_config();
        config.rate_limit.requests_per_second = 0.01;
        config.rate_limit.burst = 3;
        let s = start(config).await;
        let mut statuses = Vec::new();
        for i in 0..6 {
            let resp = s
                .client
                .get(s.url("/stats"))
                .header("x-api-key", format!("guess-{i:016}"))
                .send()
                .await
                .unwrap();
            statuses.push(resp.status().as_u16());
        }
        assert_eq!(statuses, [401, 401, 401, 429, 429, 429]);
        // A valid credential has its own bucket.
        let resp = s.client.get(s.url("/stats")).header("x-api-key", READER_KEY).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        s.stop().await;
    })
    .await;
}

/// The leeway is added to and subtracted from the clock when tokens are
/// checked: one beyond any clock skew (here past the Unix epoch) overflowed
/// there, failing every token (a panic, so 500, in debug builds; "expired"
/// in release). It is refused when the configuration is checked.
#[test]
fn jwt_leeway_is_bounded() {
    let mut c = secured_config();
    for (secs, ok) in [(0, true), (86_400, true), (86_401, false), (4_000_000_000, false), (u64::MAX, false)]
    {
        c.auth.jwt.as_mut().unwrap().leeway_secs = Some(secs);
        let got = c.validate();
        assert_eq!(got.is_ok(), ok, "{secs}: {got:?}");
        if !ok {
            assert!(
                matches!(got, Err(ServerError::Config { ref key, .. }) if key == "auth.jwt.leeway_secs"),
                "{got:?}"
            );
        }
    }
}

/// A listing for a principal confined to prefixes pages through the
/// streams it may see: `next` is `null` once none of those is left, even
/// when other principals' streams follow.
#[tokio::test]
async fn a_confined_listing_ends_with_its_last_visible_stream() {
    within(60, async {
        let s = start(secured_config()).await;
        use reqwest::Method as M;
        let admin = format!("ApiKey {ADMIN_KEY}");
        for stream in ["billing-1", "billing-2", "hr-1", "hr-2"] {
            assert_eq!(
                call(&s, M::POST, &format!("/streams/{stream}"), Some(&admin), one_event()).await.0,
                201
            );
        }
        let billing = format!("ApiKey {BILLING_KEY}");
        let mut seen = Vec::new();
        let mut path = "/streams?limit=1".to_owned();
        for _ in 0..5 {
            let (status, v) = call(&s, M::GET, &path, Some(&billing), None).await;
            assert_eq!(status, 200, "{v}");
            let page: Vec<String> = v["streams"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["stream"].as_str().unwrap().to_owned())
                .collect();
            assert!(!page.is_empty(), "{path} gave an empty page after a non-null next: {v}");
            seen.extend(page);
            match v["next"].as_str() {
                Some(next) => path = format!("/streams?limit=1&after={next}"),
                None => break,
            }
        }
        assert_eq!(seen, ["billing-1", "billing-2"]);
        s.stop().await;
    })
    .await;
}

/// A token whose `streams` holds the empty prefix may touch every stream
/// (and `/stats` treats it so): it reads `$all` without a `stream_prefix`
/// like an unconfined one.
#[tokio::test]
async fn an_empty_prefix_in_a_token_reads_all() {
    within(60, async {
        let s = start(secured_config()).await;
        use reqwest::Method as M;
        let token = format!(
            "Bearer {}",
            hs256(json!({ "sub": "wide", "role": "writer", "streams": [""], "exp": now() + 3600 }))
        );
        assert_eq!(call(&s, M::POST, "/streams/any-1", Some(&token), one_event()).await.0, 201);
        let (status, v) = call(&s, M::GET, "/all", Some(&token), None).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["events"].as_array().unwrap().len(), 1);
        s.stop().await;
    })
    .await;
}

/// With `issuer` and `audience` configured, a token must carry them:
/// one without `iss` or `aud` (minted for some other use by the same key)
/// is refused like one naming another issuer or audience.
#[tokio::test]
async fn configured_issuer_and_audience_are_required() {
    within(60, async {
        let mut config = secured_config();
        let jwt = config.auth.jwt.as_mut().unwrap();
        jwt.issuer = Some("https://id.example".into());
        jwt.audience = Some("annals".into());
        let s = start(config).await;
        use reqwest::Method as M;
        let base = json!({ "sub": "svc", "role": "reader", "exp": now() + 3600 });
        let with = |extra: Value| {
            let mut claims = base.clone();
            claims.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            format!("Bearer {}", rs256(claims))
        };
        let good = with(json!({ "iss": "https://id.example", "aud": "annals" }));
        assert_eq!(call(&s, M::GET, "/stats", Some(&good), None).await.0, 200);
        for (why, token) in [
            ("no iss", with(json!({ "aud": "annals" }))),
            ("no aud", with(json!({ "iss": "https://id.example" }))),
            ("neither", with(json!({}))),
            ("other iss", with(json!({ "iss": "https://evil.example", "aud": "annals" }))),
            ("other aud", with(json!({ "iss": "https://id.example", "aud": "billing" }))),
        ] {
            let (status, v) = call(&s, M::GET, "/stats", Some(&token), None).await;
            assert_eq!(status, 401, "{why}: {v}");
            assert_eq!(v["error"]["code"], "invalid_token", "{why}");
        }
        s.stop().await;
    })
    .await;
}

/// Access lasts as long as the credential: a live feed opened with a JWT
/// ends when the token expires, as a new request with it would be refused,
/// telling the client where to resume with a fresh one. Over a WebSocket
/// every subscription gets `token_expired` with its last position and the
/// socket closes; an SSE feed ends with a `token_expired` record; a group
/// consumer's socket gets an `error` with that code (its unsettled
/// deliveries go back to the group). (Feeds once went on for as long as
/// the connection lived.)
#[tokio::test]
async fn live_feeds_end_when_their_token_expires() {
    within(60, async {
        let mut config = secured_config();
        if let Some(jwt) = config.auth.jwt.as_mut() {
            jwt.leeway_secs = Some(0);
        }
        let s = start(config).await;
        let admin = format!("ApiKey {ADMIN_KEY}");
        let (status, _) = call(
            &s,
            reqwest::Method::PUT,
            "/groups/exp-g",
            Some(admin.as_str()),
            Some(json!({ "stream": "exp-1" })),
        )
        .await;
        assert_eq!(status, 201);
        let (status, _) =
            call(&s, reqwest::Method::POST, "/streams/exp-1?expected=no_stream", Some(&admin), one_event())
                .await;
        assert_eq!(status, 201);
        let exp = now() + 2;
        let token = hs256(json!({ "sub": "svc", "role": "writer", "exp": exp }));

        let (mut ws, _) =
            tokio_tungstenite::connect_async(format!("ws://{}/ws?access_token={token}", s.addr))
                .await
                .expect("connect before expiry");
        ws.send(Message::Text(
            json!({ "type": "subscribe", "id": "a", "stream": "exp-1" }).to_string().into(),
        ))
        .await
        .unwrap();
        assert_eq!(common::ws_next_json(&mut ws).await.expect("reply")["type"], "subscribed");
        assert_eq!(common::ws_next_json(&mut ws).await.expect("event")["type"], "event");
        let sse =
            s.client.get(s.url(&format!("/streams/exp-1/live?access_token={token}"))).send().await.unwrap();
        assert_eq!(sse.status(), 200);
        let (mut group, _) = tokio_tungstenite::connect_async(format!(
            "ws://{}/groups/exp-g/ws?consumer=c&access_token={token}",
            s.addr
        ))
        .await
        .expect("consume before expiry");
        let delivery = common::ws_next_json(&mut group).await.expect("delivery");
        assert_eq!(delivery["type"], "delivery", "{delivery}");

        let ended = common::ws_next_json(&mut ws).await.expect("an ending notice");
        assert!(now() > exp, "ended before the token expired: {ended}");
        assert_eq!(ended["type"], "token_expired", "{ended}");
        assert_eq!(ended["id"], "a", "{ended}");
        assert_eq!(ended["last_version"], 0, "{ended}");
        assert!(common::ws_next_json(&mut ws).await.is_none(), "the socket stayed open");

        let records = common::read_sse(sse, |r| r.iter().any(|(e, _, _)| e != "event")).await;
        let (last, _, data) = records.last().expect("records");
        assert_eq!(last, "token_expired", "{records:?}");
        let data: Value = serde_json::from_str(data).unwrap();
        assert_eq!(data["last_version"], 0, "{data}");

        let ended = common::ws_next_json(&mut group).await.expect("an ending message");
        assert_eq!(ended["type"], "error", "{ended}");
        assert_eq!(ended["error"]["code"], "token_expired", "{ended}");
        assert!(common::ws_next_json(&mut group).await.is_none(), "the consumer's socket stayed open");

        // A plain request with the same token is refused too.
        let (status, v) =
            call(&s, reqwest::Method::GET, "/stats", Some(&format!("Bearer {token}")), None).await;
        assert_eq!(status, 401);
        assert_eq!(v["error"]["code"], "invalid_token");
        s.stop().await;
    })
    .await;
}
