//! `GET /all`: pages of the global log with filters.

use annals_core::{Direction, Filter, ReadAll, ReadFrom, TypeMatch};
use axum::{Json, extract::State};
use serde::Deserialize;

use super::{enc, parse_from, streams::page_limit};
use crate::{
    AppState,
    auth::{Principal, Role},
    error::{ApiError, ErrorOut},
    extract::ApiQuery,
    wire::{AllPageOut, DirectionOut, EventOut, LinksOut, parse_time},
};

/// Filter parameters shared by `GET /all` and `GET /all/live`.
#[derive(Debug, Default, Clone, Deserialize, utoipa::IntoParams)]
pub struct FilterQuery {
    /// Stream name starts with this.
    pub stream_prefix: Option<String>,
    /// Stream category (part of the name before the first `-`).
    pub category: Option<String>,
    /// Event type equals one of these (comma-separated).
    #[serde(rename = "type")]
    #[param(rename = "type")]
    pub event_type: Option<String>,
    /// Event type starts with one of these (comma-separated).
    pub type_prefix: Option<String>,
    /// Metadata `correlation_id` equals this.
    pub correlation_id: Option<String>,
    /// Recorded at or after (RFC 3339 or micros since epoch).
    pub after: Option<String>,
    /// Recorded strictly before (RFC 3339 or micros since epoch).
    pub before: Option<String>,
    /// Include `$` system streams (admin only): `true` or `false`. A
    /// string because `serde(flatten)` cannot parse booleans from queries.
    pub include_system: Option<String>,
}

impl FilterQuery {
    /// Builds the core filter.
    pub fn to_filter(&self) -> Result<Filter, ApiError> {
        let list = |s: &Option<String>| -> Vec<String> {
            s.iter()
                .flat_map(|v| v.split(','))
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect()
        };
        let mut event_types: Vec<TypeMatch> =
            list(&self.event_type).into_iter().map(TypeMatch::Exact).collect();
        event_types.extend(list(&self.type_prefix).into_iter().map(TypeMatch::Prefix));
        let time = |name: &str, v: &Option<String>| {
            v.as_deref()
                .map(|s| {
                    parse_time(s).ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "`{name}` must be RFC 3339 (2026-01-31T12:00:00Z) or microseconds since the epoch"
                        ))
                    })
                })
                .transpose()
        };
        let filter = Filter {
            stream_prefix: self.stream_prefix.clone().filter(|s| !s.is_empty()),
            category: self.category.clone().filter(|s| !s.is_empty()),
            event_types,
            correlation_id: self.correlation_id.clone().filter(|s| !s.is_empty()),
            recorded_after: time("after", &self.after)?,
            recorded_before: time("before", &self.before)?,
            include_system: self.include_system()?,
        };
        // Checked here, not only by the store's read: a live feed (SSE or
        // WebSocket) would otherwise answer 200 / `subscribed` first and
        // end with an error event.
        filter.validate()?;
        Ok(filter)
    }

    fn include_system(&self) -> Result<bool, ApiError> {
        match self.include_system.as_deref() {
            None | Some("false" | "0" | "") => Ok(false),
            Some("true" | "1") => Ok(true),
            Some(other) => {
                Err(ApiError::bad_request(format!("`include_system` must be true or false, got '{other}'")))
            }
        }
    }

    /// Checks the principal may read this view of `$all`.
    pub fn authorize(&self, principal: &Principal, filter: &Filter) -> Result<(), ApiError> {
        let needed = if filter.include_system { Role::Admin } else { Role::Reader };
        principal.authorize_all(needed, filter.stream_prefix.as_deref())
    }

    fn query_string(&self) -> String {
        let mut out = String::new();
        let mut push = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                out.push_str(&format!("&{k}={}", enc(v)));
            }
        };
        push("stream_prefix", &self.stream_prefix);
        push("category", &self.category);
        push("type", &self.event_type);
        push("type_prefix", &self.type_prefix);
        push("correlation_id", &self.correlation_id);
        push("after", &self.after);
        push("before", &self.before);
        if self.include_system().unwrap_or(false) {
            out.push_str("&include_system=true");
        }
        out
    }
}

/// Query of `GET /all`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct AllQuery {
    /// `start`, `end` or a position (inclusive).
    pub from: Option<String>,
    /// `forward` (default) or `backward`.
    #[param(value_type = Option<String>)]
    pub direction: Option<Direction>,
    /// Page size.
    pub limit: Option<usize>,
    /// Credential for clients that cannot set headers.
    #[allow(dead_code, reason = "accepted here so unknown-field checks let it through; auth reads it")]
    pub access_token: Option<String>,
    /// Filters.
    #[serde(flatten)]
    #[param(ignore)]
    pub filter: FilterQuery,
    /// Whatever else the query holds (`deny_unknown_fields` does not work
    /// with `flatten`): refused, so that a misspelt filter never reads
    /// the whole log.
    #[serde(flatten)]
    #[param(ignore)]
    pub unknown: std::collections::BTreeMap<String, String>,
}

impl AllQuery {
    /// `400 invalid_query` naming the first unknown parameter, if any.
    fn refuse_unknown(&self) -> Result<(), ApiError> {
        refuse_unknown(&self.unknown)
    }
}

/// `400 invalid_query` naming the first of the parameters a query with a
/// flattened filter collected as unknown, if any.
pub fn refuse_unknown(unknown: &std::collections::BTreeMap<String, String>) -> Result<(), ApiError> {
    match unknown.keys().next() {
        None => Ok(()),
        Some(name) => Err(ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "invalid_query",
            format!("Failed to deserialize query string: unknown field `{name}`"),
        )),
    }
}

/// `GET /all`: reads a page of the global log.
#[utoipa::path(get, path = "/all", tag = "all", params(AllQuery, FilterQuery),
    responses((status = 200, description = "A page of `$all`", body = AllPageOut),
        (status = 400, description = "Invalid `from`, time or `include_system`; `invalid_query`", body = ErrorOut),
        (status = 403, description = "Role below reader (admin with `include_system`), or a prefix-restricted caller without a `stream_prefix` inside its prefixes", body = ErrorOut)))]
pub async fn read_all(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<AllQuery>,
) -> Result<Json<AllPageOut>, ApiError> {
    query.refuse_unknown()?;
    let filter = query.filter.to_filter()?;
    query.filter.authorize(&principal, &filter)?;
    let direction = query.direction.unwrap_or_default();
    let limit = page_limit(&state, query.limit);
    let from = parse_from(query.from.as_deref())?.unwrap_or(match direction {
        Direction::Forward => ReadFrom::Start,
        Direction::Backward => ReadFrom::End,
    });
    let slice = state.inner.store.read_all(ReadAll { from, direction, limit, filter }).await?;
    let head = state.inner.store.next_position().await?;
    let dir = DirectionOut::from(direction);
    let link = slice.next.map(|n| {
        format!("/all?from={n}&direction={}&limit={limit}{}", dir.as_str(), query.filter.query_string())
    });
    Ok(Json(AllPageOut {
        direction: dir,
        events: slice.events.iter().map(EventOut::from).collect(),
        next: slice.next,
        head,
        links: LinksOut { next: link },
    }))
}
