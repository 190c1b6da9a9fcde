//! # annals-server
//!
//! The Annals store on the wire: HTTP/JSON, Server-Sent Events and
//! WebSocket over any [`annals_core::Store`].
//!
//! [`app`] builds the [`axum::Router`] (tests can drive it with
//! `tower::ServiceExt::oneshot` and no socket); [`run`] serves it on a
//! listener until a shutdown future resolves, then drains in-flight
//! requests. The JSON contract is in `docs/http-api.md` and served as
//! OpenAPI at `/openapi.json`.
//!
//! ```no_run
//! # async fn demo() -> Result<(), annals_server::ServerError> {
//! use std::sync::Arc;
//! let store: Arc<dyn annals_core::Store> = Arc::new(annals_core::MemoryStore::new());
//! let mut config = annals_server::ServerConfig::default();
//! config.auth.anonymous = Some(annals_server::Role::Admin);
//! let state = annals_server::AppState::new(store, config)?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:2113").await?;
//! annals_server::run(listener, state, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

pub mod auth;
pub mod config;
mod error;
pub mod extract;
mod groups;
mod live;
pub mod metrics;
mod openapi;
mod routes;
mod serve;
mod tls;
pub mod wire;

use std::{sync::Arc, time::Instant};

use annals_core::Store;
use axum::{
    Router,
    extract::{DefaultBodyLimit, Request},
    http::{HeaderName, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post, put},
};
use tokio_util::sync::CancellationToken;
use tower_http::{
    LatencyUnit,
    catch_panic::CatchPanicLayer,
    request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer},
    trace::{DefaultOnResponse, TraceLayer},
};

pub use auth::{Principal, Role};
pub use config::ServerConfig;
pub use error::{ApiError, ErrorBody, ErrorOut, ServerError};
pub use serve::{ConnCtl, run};

/// Shared state of one server: the store, configuration, verifiers,
/// limiter and metrics. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

struct Shared {
    store: Arc<dyn Store>,
    config: ServerConfig,
    backend: String,
    auth: auth::Authenticator,
    limiter: Option<auth::RateLimiter>,
    metrics: metrics::Metrics,
    started: Instant,
    started_at: annals_core::Timestamp,
    shutdown: CancellationToken,
    /// Upgraded WebSocket sessions (live feeds and group consumers): they
    /// outlive the HTTP connection that upgraded, so [`run`] waits for
    /// them on their own (see [`serve::Session`]).
    sessions: tokio_util::task::TaskTracker,
    /// Cancelled once the shutdown grace is over: ends every session still
    /// open.
    end_sessions: CancellationToken,
    groups: groups::Groups,
    facade: std::sync::OnceLock<metrics::FacadeRecorder>,
    /// Set when several processes may share the store (PostgreSQL): the
    /// consumer groups then run on the process holding their lease.
    leases: std::sync::OnceLock<Arc<dyn annals_core::Leases>>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").field("backend", &self.inner.backend).finish_non_exhaustive()
    }
}

impl AppState {
    /// Validates `config` and builds the state over `store`. The backend
    /// name reported by `/info` is taken from the configuration; use
    /// [`AppState::with_backend`] to name it.
    pub fn new(store: Arc<dyn Store>, config: ServerConfig) -> Result<Self, ServerError> {
        let backend = if config.store.memory { "memory" } else { "log" };
        Self::with_backend(store, config, backend)
    }

    /// Like [`AppState::new`], reporting `backend` in `/info`.
    pub fn with_backend(
        store: Arc<dyn Store>,
        config: ServerConfig,
        backend: impl Into<String>,
    ) -> Result<Self, ServerError> {
        config.validate()?;
        let auth = auth::Authenticator::new(&config.auth)?;
        let limiter = auth::RateLimiter::new(&config.rate_limit);
        Ok(AppState {
            inner: Arc::new(Shared {
                store,
                auth,
                limiter,
                backend: backend.into(),
                metrics: metrics::Metrics::new(),
                started: Instant::now(),
                started_at: annals_core::Timestamp::now(),
                shutdown: CancellationToken::new(),
                sessions: tokio_util::task::TaskTracker::new(),
                end_sessions: CancellationToken::new(),
                groups: groups::Groups::default(),
                facade: std::sync::OnceLock::new(),
                leases: std::sync::OnceLock::new(),
                config,
            }),
        })
    }

    /// The store being served.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The configuration in force.
    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    /// The metrics registry.
    pub fn metrics(&self) -> &metrics::Metrics {
        &self.inner.metrics
    }

    /// Has `/metrics` also render `recorder`, the process's `metrics`
    /// facade recorder (see [`metrics::FacadeRecorder::install`]). Only the
    /// first call has an effect.
    pub fn attach_facade_recorder(&self, recorder: metrics::FacadeRecorder) {
        let _ = self.inner.facade.set(recorder);
    }

    /// Declares that other server processes may share the store (the
    /// PostgreSQL backend), with `leases` to decide between them: the
    /// consumer groups then run on whichever process holds their lease,
    /// the others answer group requests with `503 groups_elsewhere` and
    /// take over when the holder stops or loses its connection. Call it
    /// before [`run`]; later calls are ignored. Without it the server
    /// assumes it is the store's only process (the embedded log locks its
    /// directory) and always runs the groups.
    pub fn attach_leases(&self, leases: Arc<dyn annals_core::Leases>) {
        if self.inner.leases.set(leases).is_ok() {
            // Until [`run`] has taken the lease.
            self.inner.groups.set_follower();
        }
    }

    /// Whether this process runs the consumer groups now (see
    /// [`AppState::attach_leases`]); `false` also when groups are disabled.
    pub fn leads_groups(&self) -> bool {
        self.inner.config.groups.enabled && self.inner.groups.leading()
    }

    /// Cancelled when the server starts shutting down; live connections
    /// watch it to say goodbye.
    pub fn shutdown_token(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// Stops every running consumer group, saving their checkpoints, and
    /// refuses new ones. [`run`] calls it once connections have drained.
    pub async fn stop_groups(&self) {
        self.inner.groups.stop_all().await;
    }
}

/// The whole API as a router (no socket needed; see the crate docs).
pub fn app(state: AppState) -> Router {
    let request_secs = state.inner.config.timeouts.request_secs;
    let body_limit = state.inner.config.limits.max_body_bytes;
    // Plain request/response routes get the whole-request timeout; live
    // routes (SSE, WebSocket) run for as long as the client stays.
    let api = Router::new()
        .route("/streams", get(routes::streams::list))
        .route(
            "/streams/{stream}",
            post(routes::streams::append).get(routes::streams::read).delete(routes::streams::delete),
        )
        .route("/streams/{stream}/info", get(routes::streams::info))
        .route(
            "/streams/{stream}/snapshot",
            put(routes::streams::save_snapshot).get(routes::streams::load_snapshot),
        )
        .route("/transactions", post(routes::streams::transaction))
        .route("/all", get(routes::all::read_all))
        .route("/checkpoints/{name}", put(routes::ops::save_checkpoint).get(routes::ops::load_checkpoint))
        .route("/health/live", get(routes::ops::live))
        .route("/health/ready", get(routes::ops::ready))
        .route("/metrics", get(routes::ops::metrics))
        .route("/stats", get(routes::ops::stats))
        .route("/info", get(routes::ops::info))
        .route("/openapi.json", get(openapi::serve))
        .route("/groups", get(groups::list))
        .route("/groups/{group}", put(groups::create).get(groups::stats).delete(groups::delete))
        .route("/groups/{group}/parked", get(groups::parked))
        .route("/groups/{group}/parked/{position}", get(groups::inspect_parked))
        .route("/groups/{group}/parked/replay", post(groups::replay))
        .route("/groups/{group}/next", post(groups::pull))
        .route("/groups/{group}/ack", post(groups::pull_ack))
        .route("/groups/{group}/nack", post(groups::pull_nack))
        .route_layer(middleware::from_fn_with_state(state.clone(), move |st, req, next| {
            metrics::track_within(st, req, next, request_secs)
        }));
    let live = Router::new()
        .route("/streams/{stream}/live", get(live::stream_sse))
        .route("/all/live", get(live::all_sse))
        .route("/ws", get(live::ws))
        .route("/groups/{group}/ws", get(groups::ws))
        .route_layer(middleware::from_fn_with_state(state.clone(), metrics::track));
    // Few middleware layers on purpose: each `from_fn` costs a boxed
    // service clone and a boxed future per request. Requests metrics and
    // the timeout share one layer; authentication and the JSON error shape
    // share another (`gate`).
    api.merge(live)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), gate))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the server hit a bug; it was logged",
            )
            .into_response()
        }))
        .layer(PropagateRequestIdLayer::new(HeaderName::from_static("x-request-id")))
        .layer(
            // The span is INFO so that warnings and errors logged while
            // serving carry the request and correlation ids; the per-request
            // "finished" line is DEBUG (at INFO it cost a formatted, flushed
            // stderr line per request, the largest single item in a profile
            // of small appends). Server errors are still logged by
            // `on_failure` at ERROR, except 503: those are answers the
            // server chose (shutting down, groups elsewhere or disabled, the
            // store unavailable), already logged at WARN with their code by
            // `ApiError`, and a follower of a shared store gives them for
            // every group request.
            TraceLayer::new_for_http()
                .on_response(
                    DefaultOnResponse::new().level(tracing::Level::DEBUG).latency_unit(LatencyUnit::Micros),
                )
                .on_failure(
                    |class: tower_http::classify::ServerErrorsFailureClass,
                     latency: std::time::Duration,
                     _span: &tracing::Span| {
                        let latency_us = latency.as_micros();
                        match class {
                            tower_http::classify::ServerErrorsFailureClass::StatusCode(
                                StatusCode::SERVICE_UNAVAILABLE,
                            ) => {}
                            class => tracing::error!(%class, latency_us, "response failed"),
                        }
                    },
                )
                .make_span_with(|req: &Request| {
                    let header =
                        |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).unwrap_or("");
                    tracing::info_span!(
                        "request",
                        method = %req.method(),
                        uri = %req.uri().path(),
                        request_id = %header("x-request-id"),
                        correlation_id = %header("x-correlation-id"),
                    )
                }),
        )
        .layer(SetRequestIdLayer::new(HeaderName::from_static("x-request-id"), RequestIds::new()))
        .with_state(state)
}

/// Generates `X-Request-Id`s: a random per-process prefix and a counter
/// (`3f9c1a7e-000000000000002a`). Unique within a process and, with high
/// probability, across restarts — and, unlike a UUIDv4 per request, it costs
/// no call into the OS random source.
#[derive(Clone)]
struct RequestIds {
    prefix: u32,
    next: Arc<std::sync::atomic::AtomicU64>,
}

impl RequestIds {
    fn new() -> Self {
        let prefix = (uuid::Uuid::new_v4().as_u128() & 0xffff_ffff) as u32;
        RequestIds { prefix, next: Arc::new(std::sync::atomic::AtomicU64::new(0)) }
    }
}

impl MakeRequestId for RequestIds {
    fn make_request_id<B>(&mut self, _request: &axum::http::Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{:08x}-{n:016x}", self.prefix);
        axum::http::HeaderValue::from_str(&id).ok().map(RequestId::new)
    }
}

/// Authentication and rate limiting (`auth::auth_layer`), then the JSON
/// error shape for whatever came back.
async fn gate(state: axum::extract::State<AppState>, req: Request, next: Next) -> Response {
    json_errors(auth::auth_layer(state, req, next).await).await
}

async fn not_found(req: Request) -> ApiError {
    ApiError::not_found(format!("no route for {} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// Turns any error response that is not already JSON (axum's own
/// rejections, upgrade failures) into the JSON error shape.
async fn json_errors(response: Response) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if is_json {
        return response;
    }
    let (parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 4096).await.unwrap_or_default();
    let message = match std::str::from_utf8(&text) {
        Ok(t) if !t.trim().is_empty() => t.trim().to_owned(),
        _ => status.canonical_reason().unwrap_or("error").to_owned(),
    };
    let mut out = ApiError::from_status(status, message).into_response();
    for (name, value) in parts.headers.iter() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            out.headers_mut().insert(name.clone(), value.clone());
        }
    }
    out
}
