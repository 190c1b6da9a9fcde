//! Request handlers, by area.

pub mod all;
pub mod ops;
pub mod streams;

use annals_core::StreamName;
use axum::http::HeaderMap;

use crate::error::ApiError;

/// A user stream name from a path: `$`-prefixed names are refused (400).
pub fn user_stream(name: &str) -> Result<StreamName, ApiError> {
    StreamName::new(name).map_err(ApiError::from)
}

/// A stream name that may be read: system streams are allowed for reads
/// (their access is checked separately: admin only).
pub fn readable_stream(name: &str) -> Result<StreamName, ApiError> {
    StreamName::any(name).map_err(ApiError::from)
}

/// The request's correlation id header, if any: one the store could not
/// keep (over 256 bytes, or with a control character such as a tab, which
/// header values may hold) is ignored, since the client did not put it in
/// the events itself.
pub fn correlation_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get("x-correlation-id")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty() && s.len() <= 256 && !s.chars().any(char::is_control))
        .map(str::to_owned)
}

/// Parses `from` for stream reads: `start`, `end` or a number.
pub fn parse_from(s: Option<&str>) -> Result<Option<annals_core::ReadFrom>, ApiError> {
    use annals_core::ReadFrom;
    match s.map(str::trim) {
        None | Some("") => Ok(None),
        Some("start") => Ok(Some(ReadFrom::Start)),
        Some("end") => Ok(Some(ReadFrom::End)),
        Some(n) => n
            .parse::<u64>()
            .map(|v| Some(ReadFrom::At(v)))
            .map_err(|_| ApiError::bad_request(format!("`from` must be start, end or a number, got '{n}'"))),
    }
}

pub use crate::wire::enc;
