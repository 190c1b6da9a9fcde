//! Stream endpoints: append, read, info, delete, snapshots, transactions,
//! listing.

use std::time::Instant;

use annals_core::{
    DeleteMode, Direction, EventData, ExpectedVersion, ListStreams, ReadAll, ReadFrom, ReadStream, Snapshot,
    StreamAppend, Timestamp,
};
use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{correlation_id, enc, parse_from, readable_stream, user_stream};
use crate::{
    AppState,
    auth::{Principal, Role},
    error::{ApiError, ErrorOut},
    extract::{ApiJson, ApiPath, ApiQuery},
    wire::{
        AppendOut, DeletionOut, DirectionOut, EventIn, EventOut, LinksOut, SnapshotIn, SnapshotOut,
        SnapshotSavedOut, StreamInfoOut, StreamPageOut, TransactionOut, expected_from_json, parse_expected,
    },
};

/// Header carrying the expected version of an append or delete.
pub const EXPECTED_VERSION_HEADER: &str = "es-expectedversion";

/// Query of append and delete.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct WriteQuery {
    /// Expected version: any, no_stream, stream_exists or a number.
    pub expected: Option<String>,
    /// Delete only: tombstone the stream for good.
    #[serde(default)]
    pub hard: Option<bool>,
    /// Credential for clients that cannot set headers.
    #[serde(default)]
    #[allow(dead_code, reason = "accepted here so unknown-field checks let it through; auth reads it")]
    pub access_token: Option<String>,
}

fn expected_of(headers: &HeaderMap, query: &WriteQuery) -> Result<ExpectedVersion, ApiError> {
    let header = headers
        .get(EXPECTED_VERSION_HEADER)
        .map(|v| v.to_str().map_err(|_| ApiError::bad_request("ES-ExpectedVersion is not ASCII")))
        .transpose()?;
    match (header, query.expected.as_deref()) {
        (Some(h), Some(q)) if parse_expected(h)? != parse_expected(q)? => {
            Err(ApiError::bad_request("ES-ExpectedVersion header and ?expected= disagree"))
        }
        (Some(v), _) | (None, Some(v)) => parse_expected(v),
        (None, None) => Ok(ExpectedVersion::Any),
    }
}

fn event_bytes(events: &[EventData]) -> u64 {
    events.iter().map(|e| (e.data.len() + e.metadata.len()) as u64).sum()
}

fn convert_events(events: Vec<EventIn>, headers: &HeaderMap) -> Result<Vec<EventData>, ApiError> {
    if events.is_empty() {
        return Err(ApiError::bad_request("send at least one event"));
    }
    let cid = correlation_id(headers);
    events.into_iter().enumerate().map(|(i, e)| e.into_event_data(i, cid.as_deref())).collect()
}

/// `POST /streams/{stream}`: appends a JSON array of events.
#[utoipa::path(post, path = "/streams/{stream}", tag = "streams",
    params(("stream" = String, Path, description = "Stream name"), WriteQuery,
        ("ES-ExpectedVersion" = Option<String>, Header, description = "any | no_stream | stream_exists | <version>")),
    request_body = Vec<EventIn>,
    responses((status = 201, description = "Written (or an idempotent re-send of the stream's last events)", body = AppendOut),
        (status = 400, description = "Invalid stream name, expected version or event", body = ErrorOut),
        (status = 403, description = "Role below writer, or the stream is outside the caller's prefixes", body = ErrorOut),
        (status = 409, description = "`wrong_expected_version`, with `details: { stream, expected, actual }`", body = ErrorOut),
        (status = 410, description = "`stream_deleted`: the stream is tombstoned", body = ErrorOut),
        (status = 413, description = "`limit_exceeded` (event size, events per append) or body too large", body = ErrorOut)))]
pub async fn append(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(stream): ApiPath<String>,
    ApiQuery(query): ApiQuery<WriteQuery>,
    headers: HeaderMap,
    ApiJson(events): ApiJson<Vec<EventIn>>,
) -> Result<Response, ApiError> {
    if query.hard.is_some() {
        // Shared with DELETE, where it belongs: here it is a mistake.
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_query",
            "`hard` applies only to DELETE /streams/{stream}",
        ));
    }
    let stream = user_stream(&stream)?;
    principal.authorize(Role::Writer, Some(stream.as_str()))?;
    let expected = expected_of(&headers, &query)?;
    let events = convert_events(events, &headers)?;
    let (count, bytes) = (events.len() as u64, event_bytes(&events));
    let started = Instant::now();
    let result = state.inner.store.append(&stream, expected, events).await;
    let metrics = &state.inner.metrics;
    match result {
        Ok(r) => {
            metrics.record_append(count, bytes, started.elapsed().as_secs_f64());
            Ok((StatusCode::CREATED, Json(AppendOut::new(stream.as_str(), r))).into_response())
        }
        Err(e) => {
            metrics.record_append_error(&e);
            Err(e.into())
        }
    }
}

/// One stream's part of `POST /transactions`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransactionPart {
    /// Target stream.
    pub stream: String,
    /// Expected version (default any): `"any"`, `"no_stream"`,
    /// `"stream_exists"` or a version number.
    #[serde(default)]
    #[schema(value_type = Value)]
    pub expected: Value,
    /// Events for this stream.
    pub events: Vec<EventIn>,
}

/// Body of `POST /transactions`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransactionIn {
    /// The parts, written atomically at consecutive positions.
    pub streams: Vec<TransactionPart>,
}

/// `POST /transactions`: atomic multi-stream append.
#[utoipa::path(post, path = "/transactions", tag = "streams", request_body = TransactionIn,
    responses((status = 201, description = "Every part written, results in the order given", body = TransactionOut),
        (status = 400, description = "Invalid stream name, expected version or event; no parts; a stream twice", body = ErrorOut),
        (status = 403, description = "Role below writer, or a stream outside the caller's prefixes", body = ErrorOut),
        (status = 409, description = "`wrong_expected_version` of one part; nothing written", body = ErrorOut),
        (status = 410, description = "`stream_deleted`: a part's stream is tombstoned", body = ErrorOut),
        (status = 413, description = "`limit_exceeded` or body too large", body = ErrorOut)))]
pub async fn transaction(
    State(state): State<AppState>,
    principal: Principal,
    headers: HeaderMap,
    ApiJson(body): ApiJson<TransactionIn>,
) -> Result<Response, ApiError> {
    let mut parts = Vec::with_capacity(body.streams.len());
    let (mut count, mut bytes) = (0u64, 0u64);
    for part in body.streams {
        let stream = user_stream(&part.stream)?;
        principal.authorize(Role::Writer, Some(stream.as_str()))?;
        let expected = expected_from_json(&part.expected)?;
        let events = convert_events(part.events, &headers)?;
        count += events.len() as u64;
        bytes += event_bytes(&events);
        parts.push(StreamAppend::new(stream, expected, events));
    }
    if parts.is_empty() {
        return Err(ApiError::bad_request("a transaction needs at least one stream"));
    }
    let names: Vec<String> = parts.iter().map(|p| p.stream.as_str().to_owned()).collect();
    let started = Instant::now();
    match state.inner.store.append_multi(parts).await {
        Ok(results) => {
            state.inner.metrics.record_append(count, bytes, started.elapsed().as_secs_f64());
            let results: Vec<AppendOut> =
                names.iter().zip(results).map(|(n, r)| AppendOut::new(n, r)).collect();
            Ok((StatusCode::CREATED, Json(TransactionOut { results })).into_response())
        }
        Err(e) => {
            state.inner.metrics.record_append_error(&e);
            Err(e.into())
        }
    }
}

/// Query of `GET /streams/{stream}`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ReadQuery {
    /// `start`, `end` or a version (inclusive).
    pub from: Option<String>,
    /// `forward` (default) or `backward`.
    #[param(value_type = Option<String>)]
    pub direction: Option<Direction>,
    /// Page size (default limits.default_read_limit, at most limits.max_read_limit).
    pub limit: Option<usize>,
    /// Credential for clients that cannot set headers.
    #[allow(dead_code, reason = "accepted here so unknown-field checks let it through; auth reads it")]
    pub access_token: Option<String>,
}

/// Clamps a requested page size to the configured bounds.
pub fn page_limit(state: &AppState, limit: Option<usize>) -> usize {
    let l = &state.inner.config.limits;
    limit.unwrap_or(l.default_read_limit).clamp(1, l.max_read_limit)
}

/// `GET /streams/{stream}`: reads a page of one stream.
#[utoipa::path(get, path = "/streams/{stream}", tag = "streams",
    params(("stream" = String, Path, description = "Stream name"), ReadQuery),
    responses((status = 200, description = "A page of the stream", body = StreamPageOut),
        (status = 400, description = "Invalid stream name or `from`", body = ErrorOut),
        (status = 403, description = "Role below reader (admin for `$` streams), or outside the caller's prefixes", body = ErrorOut),
        (status = 404, description = "`stream_not_found`: never written or soft-deleted", body = ErrorOut),
        (status = 410, description = "`stream_deleted`: tombstoned", body = ErrorOut)))]
pub async fn read(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(stream): ApiPath<String>,
    ApiQuery(query): ApiQuery<ReadQuery>,
) -> Result<Json<StreamPageOut>, ApiError> {
    let stream = readable_stream(&stream)?;
    let needed = if stream.is_system() { Role::Admin } else { Role::Reader };
    principal.authorize(needed, Some(stream.as_str()))?;
    let direction = query.direction.unwrap_or_default();
    let limit = page_limit(&state, query.limit);
    let from = parse_from(query.from.as_deref())?.unwrap_or(match direction {
        Direction::Forward => ReadFrom::Start,
        Direction::Backward => ReadFrom::End,
    });
    let events = state.inner.store.read_stream(&stream, ReadStream { from, direction, limit }).await?;
    let next = match (direction, events.last()) {
        (Direction::Forward, Some(last)) if events.len() == limit => Some(last.version + 1),
        (Direction::Backward, Some(last)) if events.len() == limit && last.version > 0 => {
            Some(last.version - 1)
        }
        _ => None,
    };
    let dir = DirectionOut::from(direction);
    let link = next.map(|n| {
        format!("/streams/{}?from={n}&direction={}&limit={limit}", enc(stream.as_str()), dir.as_str())
    });
    Ok(Json(StreamPageOut {
        stream: stream.as_str().to_owned(),
        direction: dir,
        events: events.iter().map(EventOut::from).collect(),
        next,
        links: LinksOut { next: link },
    }))
}

/// `GET /streams/{stream}/info`.
#[utoipa::path(get, path = "/streams/{stream}/info", tag = "streams",
    params(("stream" = String, Path, description = "Stream name")),
    responses((status = 200, description = "What the store knows about the stream (also for a stream never written)", body = StreamInfoOut),
        (status = 400, description = "Invalid stream name", body = ErrorOut),
        (status = 403, description = "Role below reader (admin for `$` streams), or outside the caller's prefixes", body = ErrorOut)))]
pub async fn info(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(stream): ApiPath<String>,
) -> Result<Json<StreamInfoOut>, ApiError> {
    let stream = readable_stream(&stream)?;
    let needed = if stream.is_system() { Role::Admin } else { Role::Reader };
    principal.authorize(needed, Some(stream.as_str()))?;
    Ok(Json(state.inner.store.stream_info(&stream).await?.into()))
}

/// `DELETE /streams/{stream}`: soft delete, or tombstone with `?hard=true`.
#[utoipa::path(delete, path = "/streams/{stream}", tag = "streams",
    params(("stream" = String, Path, description = "Stream name"), WriteQuery),
    responses((status = 204, description = "Deleted (soft) or tombstoned (`hard=true`)"),
        (status = 400, description = "Invalid stream name or expected version", body = ErrorOut),
        (status = 403, description = "Role below admin, or outside the caller's prefixes", body = ErrorOut),
        (status = 404, description = "`stream_not_found`: soft delete of a stream that does not exist", body = ErrorOut),
        (status = 409, description = "`wrong_expected_version`", body = ErrorOut),
        (status = 410, description = "`stream_deleted`: already tombstoned", body = ErrorOut)))]
pub async fn delete(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(stream): ApiPath<String>,
    ApiQuery(query): ApiQuery<WriteQuery>,
    headers: HeaderMap,
) -> Result<StatusCode, ApiError> {
    let stream = user_stream(&stream)?;
    principal.authorize(Role::Admin, Some(stream.as_str()))?;
    let expected = expected_of(&headers, &query)?;
    let mode = if query.hard.unwrap_or(false) { DeleteMode::Hard } else { DeleteMode::Soft };
    state.inner.store.delete_stream(&stream, expected, mode).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `PUT /streams/{stream}/snapshot`: saves a snapshot.
#[utoipa::path(put, path = "/streams/{stream}/snapshot", tag = "snapshots",
    params(("stream" = String, Path, description = "Stream name")), request_body = SnapshotIn,
    responses((status = 201, description = "Saved (replacing one at the same version)", body = SnapshotSavedOut),
        (status = 400, description = "Invalid stream name or body", body = ErrorOut),
        (status = 403, description = "Role below writer, or outside the caller's prefixes", body = ErrorOut),
        (status = 409, description = "`snapshot_ahead_of_stream`: `version` is past the stream's last version (`details: { stream, version, last_version }`)", body = ErrorOut)))]
pub async fn save_snapshot(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(stream): ApiPath<String>,
    ApiJson(body): ApiJson<SnapshotIn>,
) -> Result<Response, ApiError> {
    let stream = user_stream(&stream)?;
    principal.authorize(Role::Writer, Some(stream.as_str()))?;
    // A state cannot include versions the stream does not have yet; a
    // loader starting from it would skip the events up to that version.
    // (Versions only grow, so the check cannot go stale before the save.)
    let last_version = state.inner.store.stream_info(&stream).await?.last_version;
    if last_version.is_none_or(|last| body.version > last) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "snapshot_ahead_of_stream",
            format!(
                "a snapshot of '{stream}' at version {} is ahead of the stream, whose last version is {}",
                body.version,
                last_version.map_or_else(|| "none (no events)".to_owned(), |v| v.to_string())
            ),
        )
        .with_details(serde_json::json!({
            "stream": stream.as_str(),
            "version": body.version,
            "last_version": last_version,
        })));
    }
    let snapshot = Snapshot {
        stream: stream.clone(),
        version: body.version,
        schema_version: body.schema_version,
        data: bytes::Bytes::from(body.data.get().as_bytes().to_vec()),
        created_at: Timestamp::now(),
    };
    state.inner.store.save_snapshot(snapshot).await?;
    Ok((
        StatusCode::CREATED,
        Json(SnapshotSavedOut { stream: stream.as_str().to_owned(), version: body.version }),
    )
        .into_response())
}

/// Query of `GET /streams/{stream}/snapshot`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct SnapshotQuery {
    /// The newest snapshot at or before this version (default: newest).
    pub version: Option<u64>,
    /// Credential for clients that cannot set headers.
    #[allow(dead_code, reason = "accepted here so unknown-field checks let it through; auth reads it")]
    pub access_token: Option<String>,
}

/// `GET /streams/{stream}/snapshot`: the newest snapshot (at or before
/// `?version=`).
#[utoipa::path(get, path = "/streams/{stream}/snapshot", tag = "snapshots",
    params(("stream" = String, Path, description = "Stream name"), SnapshotQuery),
    responses((status = 200, description = "The newest snapshot at or before `version`", body = SnapshotOut),
        (status = 400, description = "Invalid stream name or query", body = ErrorOut),
        (status = 403, description = "Role below reader, or outside the caller's prefixes", body = ErrorOut),
        (status = 404, description = "`snapshot_not_found`", body = ErrorOut)))]
pub async fn load_snapshot(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(stream): ApiPath<String>,
    ApiQuery(query): ApiQuery<SnapshotQuery>,
) -> Result<Json<SnapshotOut>, ApiError> {
    let stream = user_stream(&stream)?;
    principal.authorize(Role::Reader, Some(stream.as_str()))?;
    match state.inner.store.load_snapshot(&stream, query.version).await? {
        Some(s) => Ok(Json(SnapshotOut::from(&s))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "snapshot_not_found",
            format!(
                "no snapshot of '{stream}'{}",
                query.version.map(|v| format!(" at or before version {v}")).unwrap_or_default()
            ),
        )),
    }
}

/// Query of `GET /streams`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only streams whose name starts with this.
    pub prefix: Option<String>,
    /// At most this many streams (default 1000, at most 10000).
    pub limit: Option<usize>,
    /// Only streams whose name sorts after this: pass the previous page's
    /// `next`.
    pub after: Option<String>,
    /// Credential for clients that cannot set headers.
    #[allow(dead_code, reason = "accepted here so unknown-field checks let it through; auth reads it")]
    pub access_token: Option<String>,
}

/// Scans `$all` from the start and calls `f` per matching event, reading
/// no page past position `limits.max_scan_events`. Returns whether the scan
/// reached the head (`false`: it stopped at the cap).
pub async fn scan_all(
    state: &AppState,
    filter: annals_core::Filter,
    mut f: impl FnMut(&annals_core::RecordedEvent),
) -> Result<bool, ApiError> {
    let max = state.inner.config.limits.max_scan_events;
    // Scan up to the head as it was when the scan started, so a busy
    // store cannot keep the scan running forever.
    let head = state.inner.store.next_position().await?;
    let mut from = 0u64;
    loop {
        if from >= head {
            return Ok(true);
        }
        if from >= max {
            return Ok(false);
        }
        // The last page stops at the cap rather than a whole page later.
        let page = usize::try_from((max - from).min(4096)).unwrap_or(4096);
        let slice = state
            .inner
            .store
            .read_all(ReadAll::forward(page).from_position(from).filter(filter.clone()))
            .await?;
        for e in slice.events.iter().filter(|e| e.position < head) {
            f(e);
        }
        let next = slice.next.unwrap_or(head);
        if next <= from {
            return Ok(true);
        }
        from = next;
    }
}

/// Most streams one `GET /streams` page returns.
pub const MAX_LIST_LIMIT: usize = 10_000;

/// `GET /streams`: lists streams in name order, one page at a time, from
/// the store's stream index (`AllReader::list_streams`).
#[utoipa::path(get, path = "/streams", tag = "streams", params(ListQuery),
    responses((status = 200, description = "A page of streams the caller may see, in name order", body = StreamListOut),
        (status = 400, description = "`invalid_query`", body = ErrorOut),
        (status = 403, description = "Role below reader", body = ErrorOut)))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<StreamListOut>, ApiError> {
    principal.authorize(Role::Reader, None)?;
    let limit = query.limit.unwrap_or(1000).clamp(1, MAX_LIST_LIMIT);
    let mut streams = Vec::new();
    let mut after = query.after.clone();
    let mut more = false;
    // A principal confined to prefixes may see only part of a page: keep
    // asking until one stream past a full page is visible (so `next` never
    // promises a page with nothing in it) or the store has no more. Pages
    // of at least 64, so that looking for that one stream past many others
    // does not take a store call each.
    'pages: loop {
        let want = (limit - streams.len() + 1).max(64);
        let mut request = ListStreams::new(want);
        request.prefix = query.prefix.clone();
        request.after = after.clone();
        let page = state.inner.store.list_streams(request).await?;
        let exhausted = page.len() < want;
        for info in page {
            after = Some(info.stream.as_str().to_owned());
            if !principal.may_see(info.stream.as_str()) {
                continue;
            }
            if streams.len() == limit {
                more = true;
                break 'pages;
            }
            streams.push(StreamSummaryOut::from(info));
        }
        if exhausted {
            break;
        }
    }
    let next = if more { streams.last().map(|s| s.stream.clone()) } else { None };
    Ok(Json(StreamListOut { streams, next, complete: true }))
}

/// One stream in `GET /streams`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StreamSummaryOut {
    /// Stream name.
    pub stream: String,
    /// Events ever written to it (`last_version + 1`; deleted ones included).
    pub events: u64,
    /// Version of its last event.
    pub last_version: Option<u64>,
    /// Position of its last event.
    pub last_position: Option<u64>,
    /// Whether it reads (not deleted).
    pub exists: bool,
    /// `live`, `deleted` (soft) or `tombstoned`.
    pub deletion: DeletionOut,
}

impl From<annals_core::StreamInfo> for StreamSummaryOut {
    fn from(i: annals_core::StreamInfo) -> Self {
        StreamSummaryOut {
            stream: i.stream.as_str().to_owned(),
            events: i.last_version.map_or(0, |v| v + 1),
            last_version: i.last_version,
            last_position: i.last_position,
            exists: i.exists,
            deletion: i.deletion.into(),
        }
    }
}

/// Body of `GET /streams`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StreamListOut {
    /// The page, in name order.
    pub streams: Vec<StreamSummaryOut>,
    /// Pass as `after` for the next page; `null` on the last page.
    pub next: Option<String>,
    /// Always `true` (kept for clients of the earlier, scan-bounded listing).
    pub complete: bool,
}
