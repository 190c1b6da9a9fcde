//! Operations: health, metrics, stats, info, checkpoints.

use std::{collections::BTreeMap, sync::atomic::Ordering};

use annals_core::{Filter, ListStreams, StoreStats, validate_checkpoint_name};
use axum::{
    Json,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::streams::scan_all;
use crate::{
    AppState,
    auth::{Principal, Role},
    error::{ApiError, ErrorOut},
    extract::{ApiJson, ApiPath},
    wire::format_rfc3339,
};

/// The body of `GET /health/live`.
#[derive(Debug, Serialize, ToSchema)]
pub struct LiveOut {
    /// Always `ok`.
    pub status: &'static str,
}

/// The body of `GET /health/ready` (200).
#[derive(Debug, Serialize, ToSchema)]
pub struct ReadyOut {
    /// Always `ok`.
    pub status: &'static str,
    /// The log's next position.
    pub head: u64,
}

/// `GET /health/live`: the process is up.
#[utoipa::path(get, path = "/health/live", tag = "ops",
    responses((status = 200, description = "The process is up", body = LiveOut)))]
pub async fn live() -> Json<LiveOut> {
    Json(LiveOut { status: "ok" })
}

/// `GET /health/ready`: the server is not shutting down, its last append
/// did not fail on the store side, the store reports itself healthy
/// (`Appender::health`: e.g. the log is not poisoned) and answers reads.
#[utoipa::path(get, path = "/health/ready", tag = "ops",
    responses((status = 200, description = "Ready to take requests", body = ReadyOut),
        (status = 503, description = "`shutting_down`, `store_not_writable`, or the store's own error", body = ErrorOut)))]
pub async fn ready(State(state): State<AppState>) -> Response {
    if state.inner.shutdown.is_cancelled() {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        )
        .into_response();
    }
    if state.inner.metrics.write_failed.blocks_ready() {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_not_writable",
            "the last append failed in the store (poisoned, closed, I/O or backend error)",
        )
        .into_response();
    }
    // The store's own view first: a poisoned log or an unreachable
    // database is not ready even before an append has failed.
    if let Err(e) = state.inner.store.health().await {
        let mut err = ApiError::from(e);
        err.status = StatusCode::SERVICE_UNAVAILABLE;
        return err.into_response();
    }
    match state.inner.store.next_position().await {
        Ok(head) => Json(ReadyOut { status: "ok", head }).into_response(),
        Err(e) => {
            let mut err = ApiError::from(e);
            err.status = StatusCode::SERVICE_UNAVAILABLE;
            err.into_response()
        }
    }
}

/// `GET /metrics`: Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "ops",
    responses((status = 200, description = "Prometheus / OpenMetrics text exposition", body = String,
            content_type = "application/openmetrics-text"),
        (status = 403, description = "Role below reader", body = ErrorOut)))]
pub async fn metrics(State(state): State<AppState>, principal: Principal) -> Result<Response, ApiError> {
    principal.authorize(Role::Reader, None)?;
    state.inner.metrics.groups_leader.set(i64::from(state.leads_groups()));
    Ok((
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.inner.metrics.encode_with(state.inner.facade.get()),
    )
        .into_response())
}

/// Live subscribers by transport, in `/stats`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SubscribersOut {
    /// Open Server-Sent Events subscriptions.
    pub sse: i64,
    /// Open WebSocket subscriptions.
    pub ws: i64,
}

/// The body of `GET /stats`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StatsOut {
    /// Events in the store (the log's next position), system and deleted
    /// streams included; for a caller restricted to stream prefixes, the
    /// events of the streams it may see (as far as `complete` says).
    pub events: u64,
    /// Streams with events that the caller may see, system and deleted
    /// streams included.
    pub streams: u64,
    /// Events per type, over the streams the caller may see (system and
    /// deleted streams included, as `$all` holds them).
    pub by_type: BTreeMap<String, u64>,
    /// Whether `by_type` counts every event: `false` when the counts came
    /// from a scan of `$all` that stopped at `limits.max_scan_events`.
    pub complete: bool,
    /// Bytes the store occupies on disk; `null` when the backend cannot
    /// tell or the caller is restricted to stream prefixes.
    pub disk_bytes: Option<u64>,
    /// Appends this server process has answered since it started.
    pub appends_since_start: u64,
    /// Live subscribers of this server process.
    pub subscribers: SubscribersOut,
}

/// `GET /stats`: counts of events, streams and event types, and the size
/// on disk.
///
/// For a principal that may see every stream, counts by type come from
/// the store (`AllReader::store_stats`) when it can give them, complete
/// and exact however large the store is. Otherwise (a backend without
/// them, or a principal restricted to stream prefixes, whose visibility
/// cannot be applied to store-wide counts) they come from a scan of `$all`
/// bounded by `limits.max_scan_events`, and `complete` says whether it
/// reached the end.
#[utoipa::path(get, path = "/stats", tag = "ops",
    responses((status = 200, description = "Counts and sizes", body = StatsOut),
        (status = 403, description = "Role below reader", body = ErrorOut)))]
pub async fn stats(State(state): State<AppState>, principal: Principal) -> Result<Json<StatsOut>, ApiError> {
    principal.authorize(Role::Reader, None)?;
    // Streams from the store's stream index, a page at a time.
    let mut streams = 0u64;
    let mut after: Option<String> = None;
    loop {
        let mut request = ListStreams::new(10_000).with_system();
        request.after = after.take();
        let page = state.inner.store.list_streams(request).await?;
        let full = page.len() == 10_000;
        after = page.last().map(|i| i.stream.as_str().to_owned());
        streams += page.iter().filter(|i| principal.may_see(i.stream.as_str())).count() as u64;
        if !full {
            break;
        }
    }
    // Store-wide figures only for principals they describe: asking for
    // them costs a full aggregate on some backends.
    let native = if principal.sees_every_stream() {
        state.inner.store.store_stats().await?
    } else {
        StoreStats::unknown()
    };
    // Read after the counts, so that they never add up to more than it.
    let head = state.inner.store.next_position().await?;
    let (by_type, complete) = match native.events_by_type {
        Some(counts) => (counts, true),
        None => {
            let mut by_type: BTreeMap<String, u64> = BTreeMap::new();
            let complete = scan_all(&state, Filter::all().with_system(), |e| {
                if principal.may_see(e.stream.as_str()) {
                    match by_type.get_mut(&e.event_type) {
                        Some(n) => *n += 1,
                        None => {
                            by_type.insert(e.event_type.clone(), 1);
                        }
                    }
                }
            })
            .await?;
            (by_type, complete)
        }
    };
    // A principal restricted to stream prefixes learns how many events it
    // may see, not how big the whole store is.
    let events = if principal.sees_every_stream() { head } else { by_type.values().sum() };
    let m = &state.inner.metrics;
    Ok(Json(StatsOut {
        events,
        streams,
        by_type,
        complete,
        disk_bytes: native.disk_bytes,
        appends_since_start: m.append_count.load(Ordering::Relaxed),
        subscribers: SubscribersOut {
            sse: m.subscriber_gauge("sse").get(),
            ws: m.subscriber_gauge("ws").get(),
        },
    }))
}

/// The body of `GET /info`.
#[derive(Debug, Serialize, ToSchema)]
pub struct InfoOut {
    /// Always `annals`.
    pub name: &'static str,
    /// The server's version.
    pub version: &'static str,
    /// The backend served: `memory`, `log` or `postgres`.
    pub backend: String,
    /// When this process started (RFC 3339).
    pub started_at: String,
    /// Seconds since it started.
    pub uptime_secs: u64,
    /// Whether it serves TLS.
    pub tls: bool,
    /// Where the consumer groups of this store run: `here`, `elsewhere`
    /// (another process of a shared store holds their lease; this one
    /// takes over if it stops) or `disabled` (`groups.enabled = false`).
    /// A load balancer can route `/groups` to the process saying `here`.
    pub groups: &'static str,
    /// When `groups` is `elsewhere`: the URL the process running them
    /// published (its `advertise_url`), if it published one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups_leader: Option<String>,
}

/// `GET /info`: version, backend, uptime.
#[utoipa::path(get, path = "/info", tag = "ops",
    responses((status = 200, description = "About this server", body = InfoOut)))]
pub async fn info(State(state): State<AppState>) -> Json<InfoOut> {
    Json(InfoOut {
        name: "annals",
        version: env!("CARGO_PKG_VERSION"),
        backend: state.inner.backend.clone(),
        started_at: format_rfc3339(state.inner.started_at),
        uptime_secs: state.inner.started.elapsed().as_secs(),
        tls: state.inner.config.tls.is_some(),
        groups: if !state.inner.config.groups.enabled {
            "disabled"
        } else if state.leads_groups() {
            "here"
        } else {
            "elsewhere"
        },
        groups_leader: if state.inner.config.groups.enabled { state.inner.groups.leader() } else { None },
    })
}

/// Body of `PUT /checkpoints/{name}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointIn {
    /// The position to store.
    pub position: u64,
}

/// `PUT /checkpoints/{name}`.
#[utoipa::path(put, path = "/checkpoints/{name}", tag = "checkpoints",
    params(("name" = String, Path, description = "Checkpoint name")), request_body = CheckpointIn,
    responses((status = 204, description = "Saved"),
        (status = 400, description = "Invalid name (1–256 bytes, no control characters) or body", body = ErrorOut),
        (status = 403, description = "Role below writer (admin for `$` names, the store's own checkpoints)", body = ErrorOut)))]
pub async fn save_checkpoint(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(name): ApiPath<String>,
    ApiJson(body): ApiJson<CheckpointIn>,
) -> Result<StatusCode, ApiError> {
    // `$` names are the store's own (`$ps-{group}`, `$projection-…`,
    // `$saga-…`): moving one makes a group, projection or saga skip or
    // repeat events, so only an admin may.
    let needed = if name.starts_with('$') { Role::Admin } else { Role::Writer };
    principal.authorize(needed, None)?;
    validate_checkpoint_name(&name)?;
    state.inner.store.save_checkpoint(&name, body.position).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The body of `GET /checkpoints/{name}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CheckpointOut {
    /// The checkpoint's name.
    pub name: String,
    /// The stored position.
    pub position: u64,
}

/// `GET /checkpoints/{name}`.
#[utoipa::path(get, path = "/checkpoints/{name}", tag = "checkpoints",
    params(("name" = String, Path, description = "Checkpoint name")),
    responses((status = 200, description = "The stored position", body = CheckpointOut),
        (status = 400, description = "Invalid name", body = ErrorOut),
        (status = 403, description = "Role below reader", body = ErrorOut),
        (status = 404, description = "`checkpoint_not_found`", body = ErrorOut)))]
pub async fn load_checkpoint(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<CheckpointOut>, ApiError> {
    principal.authorize(Role::Reader, None)?;
    validate_checkpoint_name(&name)?;
    match state.inner.store.load_checkpoint(&name).await? {
        Some(position) => Ok(Json(CheckpointOut { name, position })),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "checkpoint_not_found",
            format!("no checkpoint '{name}'"),
        )),
    }
}
