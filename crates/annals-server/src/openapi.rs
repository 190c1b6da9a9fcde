//! The OpenAPI description served at `/openapi.json`.
//!
//! Each handler's `#[utoipa::path]` declares its success body and the
//! errors it produces itself. The errors that come from the layers around
//! every handler (authentication and rate limiting in `gate`, the body
//! extractor, the request timeout, the panic catcher) are added here, once,
//! by [`add_layer_responses`], which also gives every error response the
//! one shared body schema, `ErrorOut`.

use std::sync::OnceLock;

use axum::{
    http::header,
    response::{IntoResponse, Response},
};
use serde_json::{Map, Value, json};
use utoipa::OpenApi;

use crate::{auth, error, groups, live, routes, wire};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Annals HTTP API",
        description = "Event store over HTTP/JSON, SSE and WebSocket. See docs/http-api.md. \
            Every error answer has the body `ErrorOut`: `{ \"error\": { \"code\", \"message\", \"details\"? } }`."
    ),
    paths(
        routes::streams::append,
        routes::streams::read,
        routes::streams::info,
        routes::streams::delete,
        routes::streams::transaction,
        routes::streams::save_snapshot,
        routes::streams::load_snapshot,
        routes::streams::list,
        routes::all::read_all,
        routes::ops::live,
        routes::ops::ready,
        routes::ops::metrics,
        routes::ops::stats,
        routes::ops::info,
        routes::ops::save_checkpoint,
        routes::ops::load_checkpoint,
        live::stream_sse,
        live::all_sse,
        live::ws,
        groups::create,
        groups::list,
        groups::stats,
        groups::delete,
        groups::parked,
        groups::inspect_parked,
        groups::replay,
        groups::ws,
        groups::pull,
        groups::pull_ack,
        groups::pull_nack,
    ),
    components(schemas(
        error::ErrorOut,
        error::ErrorBody,
        wire::EventIn,
        wire::EventOut,
        wire::AppendOut,
        wire::SnapshotIn,
        wire::SnapshotOut,
        wire::SnapshotSavedOut,
        wire::StreamPageOut,
        wire::AllPageOut,
        wire::LinksOut,
        wire::DirectionOut,
        wire::TransactionOut,
        wire::StreamInfoOut,
        wire::DeletionOut,
        routes::streams::TransactionIn,
        routes::streams::TransactionPart,
        routes::streams::StreamListOut,
        routes::streams::StreamSummaryOut,
        routes::ops::CheckpointIn,
        routes::ops::CheckpointOut,
        routes::ops::StatsOut,
        routes::ops::SubscribersOut,
        routes::ops::LiveOut,
        routes::ops::ReadyOut,
        routes::ops::InfoOut,
        groups::GroupOut,
        groups::GroupListOut,
        groups::GroupStatsOut,
        groups::GroupCountsOut,
        groups::ConsumerOut,
        groups::ParkedOut,
        groups::ParkedListOut,
        groups::ReplayOut,
        groups::DeliveryOut,
        groups::PullOut,
        groups::SettleOut,
        groups::SettleErrorOut,
    ))
)]
struct ApiDoc;

const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

/// The document as JSON, with the layers' responses added.
pub fn document() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).unwrap_or_else(|_| json!({}));
    add_layer_responses(&mut doc);
    doc
}

/// Whether an operation stays open (a WebSocket upgrade or a Server-Sent
/// Events stream), which the router serves without the whole-request
/// timeout. Read from the operation's own declared responses, so that the
/// router's list of live routes is not written a second time here.
fn is_live(op: &Map<String, Value>) -> bool {
    let Some(responses) = op.get("responses").and_then(Value::as_object) else { return false };
    responses.contains_key("101")
        || responses.values().any(|r| {
            r.get("content").and_then(Value::as_object).is_some_and(|c| c.contains_key("text/event-stream"))
        })
}

/// Adds to every operation the errors of the layers it passes through
/// (when the handler did not already describe that status), and gives
/// every 4xx/5xx response the `ErrorOut` body.
fn add_layer_responses(doc: &mut Value) {
    let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) else { return };
    for (path, item) in paths.iter_mut() {
        let public = auth::is_public(path);
        let Some(item) = item.as_object_mut() else { continue };
        for method in METHODS {
            let Some(op) = item.get_mut(method).and_then(Value::as_object_mut) else { continue };
            let live = is_live(op);
            let has_body = op.contains_key("requestBody");
            // Required bodies go through `ApiJson`, which checks the media
            // type; the one optional body is read as bytes.
            let json_body = op
                .get("requestBody")
                .and_then(|b| b.get("required"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
            let has_query = op
                .get("parameters")
                .and_then(Value::as_array)
                .is_some_and(|ps| ps.iter().any(|p| p.get("in").and_then(Value::as_str) == Some("query")));
            let responses = op.entry("responses").or_insert_with(|| json!({}));
            let Some(responses) = responses.as_object_mut() else { continue };
            let mut add = |status: &str, description: &str| {
                responses.entry(status.to_owned()).or_insert_with(|| json!({ "description": description }));
            };
            if has_query {
                add("400", "`invalid_query`: a query parameter is malformed or unknown");
            }
            if has_body {
                add("400", "`invalid_json`: the body is not valid JSON of the expected shape");
                add("413", "`payload_too_large`: the body is larger than `limits.max_body_bytes`");
            }
            if json_body {
                add("415", "`unsupported_media_type`: send `Content-Type: application/json`");
            }
            if !public {
                add("401", "`unauthenticated`: missing, invalid or expired credentials");
                add("429", "`rate_limited` (only with `rate_limit` configured); see `Retry-After`");
            }
            if !live {
                add(
                    "503",
                    "`timeout` (over `timeouts.request_secs`) or the store is unavailable \
                     (`store_closed`, `store_poisoned`, `io_error`, `backend_error`; for appends also \
                     `outcome_unknown`: may have been written, re-send unchanged)",
                );
            }
            add("500", "`internal` (a bug, logged) or `corrupt` (the store found damaged data)");
            for (status, response) in responses.iter_mut() {
                let is_error = status.starts_with('4') || status.starts_with('5');
                if let (true, Some(response)) = (is_error, response.as_object_mut()) {
                    response.entry("content").or_insert_with(error_content);
                }
            }
        }
    }
}

fn error_content() -> Value {
    let mut content = Map::new();
    content
        .insert("application/json".into(), json!({ "schema": { "$ref": "#/components/schemas/ErrorOut" } }));
    Value::Object(content)
}

/// `GET /openapi.json` (built once per process).
pub async fn serve() -> Response {
    static DOC: OnceLock<bytes::Bytes> = OnceLock::new();
    let body = DOC.get_or_init(|| serde_json::to_vec(&document()).unwrap_or_default().into());
    ([(header::CONTENT_TYPE, "application/json")], body.clone()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The operations the document treats as live (no whole-request
    /// timeout, so no 503 `timeout`) are exactly the router's live routes.
    #[test]
    fn live_operations_are_the_routers_live_routes() {
        let doc = ApiDoc::openapi();
        let doc = serde_json::to_value(doc).unwrap_or_default();
        let mut live = Vec::new();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            for method in METHODS {
                if let Some(op) = item.get(method).and_then(Value::as_object)
                    && is_live(op)
                {
                    live.push(format!("{method} {path}"));
                }
            }
        }
        live.sort();
        assert_eq!(
            live,
            ["get /all/live", "get /groups/{group}/ws", "get /streams/{stream}/live", "get /ws"]
        );
        let full = document();
        assert!(full["paths"]["/ws"]["get"]["responses"].get("503").is_none());
        assert!(full["paths"]["/stats"]["get"]["responses"].get("503").is_some());
    }
}
