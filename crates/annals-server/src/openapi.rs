//! The OpenAPI description served at `/openapi.json`.

use axum::Json;
use utoipa::OpenApi;

use crate::{groups, live, routes, wire};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Annals HTTP API",
        description = "Event store over HTTP/JSON, SSE and WebSocket. See docs/http-api.md."
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
        wire::EventIn,
        wire::EventOut,
        wire::AppendOut,
        wire::SnapshotIn,
        wire::SnapshotOut,
        routes::streams::TransactionIn,
        routes::streams::TransactionPart,
        routes::ops::CheckpointIn,
        routes::streams::StreamListOut,
        routes::streams::StreamSummaryOut,
    ))
)]
struct ApiDoc;

/// `GET /openapi.json`.
pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
