//! Prometheus metrics. One registry per [`crate::AppState`] (no global
//! recorder), so several servers in one process — as in tests — never mix
//! their numbers. Crates that report through the `metrics` facade (the
//! event-sourcing layer, the log's fsync histogram) reach `/metrics` through
//! a [`FacadeRecorder`] that the binary installs and attaches to its state
//! (see `facade`).

mod facade;

pub use facade::FacadeRecorder;

use std::{
    borrow::Cow,
    collections::HashSet,
    sync::{
        RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use axum::{
    extract::{MatchedPath, Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::AppState;

/// Labels of `annals_http_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// HTTP method.
    pub method: Cow<'static, str>,
    /// Matched route template, e.g. `/streams/{stream}`.
    pub route: Cow<'static, str>,
    /// Status code.
    pub status: u16,
}

/// Labels naming a live transport (`sse` or `ws`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `sse` or `ws`.
    pub kind: String,
}

/// The server's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests by method, route and status.
    pub requests: Family<HttpLabels, Counter>,
    /// Successful append requests (single-stream and transactions).
    pub appends: Counter,
    /// Events in successful appends.
    pub appended_events: Counter,
    /// Payload bytes (data + metadata) in successful appends.
    pub appended_bytes: Counter,
    /// Append latency as seen by the server, seconds.
    pub append_latency: Histogram,
    /// Appends rejected with 409.
    pub append_conflicts: Counter,
    /// Connected live subscribers.
    pub subscribers: Family<KindLabels, Gauge>,
    /// Events a subscriber is behind the head when it is delivered one.
    pub subscription_lag: Histogram,
    /// Events delivered to live subscribers.
    pub delivered: Counter,
    /// Live clients disconnected for being too slow.
    pub slow_disconnects: Counter,
    /// Requests refused by the rate limiter.
    pub rate_limited: Counter,
    /// 1 while this process runs the consumer groups (set when scraped).
    pub groups_leader: Gauge,
    /// Appends completed since start (for `/stats`).
    pub append_count: AtomicU64,
    /// The last append that failed because the store could not write;
    /// `/health/ready` reports not ready while it counts.
    pub write_failed: WriteFailure,
}

/// How long a transient write failure (I/O, backend, unknown outcome)
/// keeps `/health/ready` at 503 unless an append succeeds first. Bounded:
/// a load balancer that routes only to ready servers sends no appends to
/// clear it, so a server that failed one append during a database blip
/// would otherwise stay out for good (every server, if all saw the blip).
pub const WRITE_FAILURE_READY_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// See [`Metrics::write_failed`]. A poisoned or closed store stays not
/// ready (it cannot heal without a restart); other failures count for
/// [`WRITE_FAILURE_READY_WINDOW`] after the last one.
#[derive(Debug)]
pub struct WriteFailure {
    epoch: tokio::time::Instant,
    permanent: std::sync::atomic::AtomicBool,
    /// Milliseconds since `epoch` of the last transient failure, plus one
    /// (0: none since the last successful append).
    last: AtomicU64,
}

impl WriteFailure {
    fn new() -> Self {
        WriteFailure {
            epoch: tokio::time::Instant::now(),
            permanent: std::sync::atomic::AtomicBool::new(false),
            last: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1)
    }

    fn record(&self, permanent: bool) {
        if permanent {
            self.permanent.store(true, Ordering::Relaxed);
        }
        self.last.store(self.now_ms() + 1, Ordering::Relaxed);
    }

    fn clear(&self) {
        self.permanent.store(false, Ordering::Relaxed);
        self.last.store(0, Ordering::Relaxed);
    }

    /// Whether `/health/ready` should answer `store_not_writable`.
    pub fn blocks_ready(&self) -> bool {
        if self.permanent.load(Ordering::Relaxed) {
            return true;
        }
        let last = self.last.load(Ordering::Relaxed);
        let window = u64::try_from(WRITE_FAILURE_READY_WINDOW.as_millis()).unwrap_or(u64::MAX);
        last != 0 && self.now_ms() < (last - 1).saturating_add(window)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("annals");
        let requests = Family::<HttpLabels, Counter>::default();
        registry.register("http_requests", "HTTP requests by method, route and status", requests.clone());
        let appends = Counter::default();
        registry.register("appends", "Successful append requests", appends.clone());
        let appended_events = Counter::default();
        registry.register("appended_events", "Events appended", appended_events.clone());
        let appended_bytes = Counter::default();
        registry.register(
            "appended_bytes",
            "Payload bytes appended (data + metadata)",
            appended_bytes.clone(),
        );
        let append_latency = Histogram::new(exponential_buckets(0.000_05, 2.0, 18));
        registry.register("append_duration_seconds", "Append latency in the server", append_latency.clone());
        let append_conflicts = Counter::default();
        registry.register(
            "append_conflicts",
            "Appends rejected with a wrong expected version",
            append_conflicts.clone(),
        );
        let subscribers = Family::<KindLabels, Gauge>::default();
        registry.register("subscribers", "Connected live subscribers by transport", subscribers.clone());
        let subscription_lag = Histogram::new(exponential_buckets(1.0, 4.0, 12));
        registry.register(
            "subscription_lag_events",
            "How many events behind the head a subscriber is at delivery",
            subscription_lag.clone(),
        );
        let delivered = Counter::default();
        registry.register("delivered_events", "Events delivered to live subscribers", delivered.clone());
        let slow_disconnects = Counter::default();
        registry.register(
            "slow_consumer_disconnects",
            "Live clients disconnected as too slow",
            slow_disconnects.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "rate_limited_requests",
            "Requests refused by the rate limiter",
            rate_limited.clone(),
        );
        let groups_leader = Gauge::default();
        registry.register(
            "groups_leader",
            "1 while this process runs the consumer groups (on a shared store: holds their lease), else 0",
            groups_leader.clone(),
        );
        Metrics {
            registry,
            groups_leader,
            requests,
            appends,
            appended_events,
            appended_bytes,
            append_latency,
            append_conflicts,
            subscribers,
            subscription_lag,
            delivered,
            slow_disconnects,
            rate_limited,
            append_count: AtomicU64::new(0),
            write_failed: WriteFailure::new(),
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        self.encode_with(None)
    }

    /// The text exposition format, with the facade recorder's metrics (if
    /// any) before the final `# EOF`.
    pub fn encode_with(&self, facade: Option<&FacadeRecorder>) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        if let Some(facade) = facade {
            let eof = out.rfind("# EOF").unwrap_or(out.len());
            let tail = out.split_off(eof);
            facade.render_into(&mut out);
            out.push_str(if tail.is_empty() { "# EOF\n" } else { &tail });
        }
        out
    }

    /// Records a successful append.
    pub fn record_append(&self, events: u64, bytes: u64, seconds: f64) {
        self.appends.inc();
        self.append_count.fetch_add(1, Ordering::Relaxed);
        self.appended_events.inc_by(events);
        self.appended_bytes.inc_by(bytes);
        self.append_latency.observe(seconds);
        self.write_failed.clear();
    }

    /// Records a failed append; store-side failures mark the store as not
    /// writable for `/health/ready` (see [`WriteFailure`]).
    pub fn record_append_error(&self, e: &annals_core::Error) {
        use annals_core::Error as E;
        match e {
            E::WrongExpectedVersion { .. } => {
                self.append_conflicts.inc();
            }
            E::Poisoned { .. } | E::Closed => self.write_failed.record(true),
            E::Io(_) | E::Backend { .. } | E::OutcomeUnknown { .. } => self.write_failed.record(false),
            _ => {}
        }
    }

    /// The gauge of one live transport.
    pub fn subscriber_gauge(&self, kind: &str) -> Gauge {
        self.subscribers.get_or_create(&KindLabels { kind: kind.to_owned() }).clone()
    }
}

/// Middleware counting requests by route and status. The labels borrow
/// `'static` strings (the method's name, an interned route template), so
/// counting a request allocates nothing once its series exists.
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let (method, route) = labels_of(&request);
    let response = next.run(request).await;
    count(&state, method, route, &response);
    response
}

/// [`track`] plus the whole-request timeout of plain (not live) routes:
/// `503 timeout` after `secs`.
pub async fn track_within(
    State(state): State<AppState>,
    request: Request,
    next: Next,
    secs: u64,
) -> Response {
    let (method, route) = labels_of(&request);
    let response = match tokio::time::timeout(std::time::Duration::from_secs(secs), next.run(request)).await {
        Ok(r) => r,
        Err(_) => crate::ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            format!("the request did not complete within timeouts.request_secs = {secs}"),
        )
        .into_response(),
    };
    count(&state, method, route, &response);
    response
}

fn labels_of(request: &Request) -> (Cow<'static, str>, Cow<'static, str>) {
    let method = method_label(request.method());
    let route =
        request.extensions().get::<MatchedPath>().map_or(Cow::Borrowed("unmatched"), |m| intern(m.as_str()));
    (method, route)
}

fn count(state: &AppState, method: Cow<'static, str>, route: Cow<'static, str>, response: &Response) {
    state
        .inner
        .metrics
        .requests
        .get_or_create(&HttpLabels { method, route, status: response.status().as_u16() })
        .inc();
}

fn method_label(m: &axum::http::Method) -> Cow<'static, str> {
    use axum::http::Method as M;
    Cow::Borrowed(match *m {
        M::GET => "GET",
        M::POST => "POST",
        M::PUT => "PUT",
        M::DELETE => "DELETE",
        M::HEAD => "HEAD",
        M::OPTIONS => "OPTIONS",
        M::PATCH => "PATCH",
        _ => return Cow::Owned(m.as_str().to_owned()),
    })
}

/// Route templates seen so far, leaked once each: they come from the
/// router's own (finite) route table, never from request input.
static ROUTES: RwLock<Option<HashSet<&'static str>>> = RwLock::new(None);

fn intern(route: &str) -> Cow<'static, str> {
    if let Some(r) = ROUTES.read().ok().and_then(|set| set.as_ref().and_then(|s| s.get(route).copied())) {
        return Cow::Borrowed(r);
    }
    let Ok(mut guard) = ROUTES.write() else { return Cow::Owned(route.to_owned()) };
    let set = guard.get_or_insert_with(HashSet::new);
    if let Some(r) = set.get(route) {
        return Cow::Borrowed(r);
    }
    let leaked: &'static str = Box::leak(route.to_owned().into_boxed_str());
    set.insert(leaked);
    Cow::Borrowed(leaked)
}
