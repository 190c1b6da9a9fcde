//! Errors: [`ApiError`] is what a request gets back (always a JSON body
//! `{ "error": { "code", "message" } }`); [`ServerError`] is what starting or
//! running the server can fail with.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::wire::expected_to_json;

/// Failures of configuring, starting or running the server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A configuration value is invalid; `key` names it (e.g.
    /// `auth.jwt.hs256_secret`). Fix the configuration and start again.
    #[error("invalid configuration `{key}`: {reason}")]
    Config {
        /// The offending key, dotted.
        key: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Binding, accepting or another socket operation failed. Check the
    /// address and permissions, then retry.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// TLS material could not be loaded. Check the certificate and key files.
    #[error("TLS error: {0}")]
    Tls(String),
    /// The store failed while the server started (restoring consumer
    /// groups); the inner error says whether retrying can help.
    #[error("store error at start: {0}")]
    Store(#[from] annals_core::Error),
}

impl ServerError {
    /// Shorthand for [`ServerError::Config`].
    pub fn config(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ServerError::Config { key: key.into(), reason: reason.into() }
    }
}

/// An error answer to one request: status, machine-readable code, message,
/// optional details. Renders as `{ "error": { "code", "message", "details"? } }`.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable snake_case code clients can match on.
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// Structured extra information (e.g. expected/actual versions).
    pub details: Option<Value>,
    /// Seconds to put in `Retry-After` (rate limiting, overload).
    pub retry_after: Option<u64>,
}

impl ApiError {
    /// An error with this status, code and message.
    pub fn new(status: StatusCode, code: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError { status, code: code.into(), message: message.into(), details: None, retry_after: None }
    }

    /// 400 `bad_request`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// 401 `unauthenticated`.
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthenticated", message)
    }

    /// 403 `forbidden`.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }

    /// 404 `not_found`.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// Adds structured details.
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// A generic error for a status produced outside our handlers (axum
    /// rejections, timeouts, unknown routes).
    pub fn from_status(status: StatusCode, message: impl Into<String>) -> Self {
        Self::new(status, code_for_status(status), message)
    }
}

/// The snake_case code used for errors that only have a status.
pub fn code_for_status(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "bad_request",
        401 => "unauthenticated",
        403 => "forbidden",
        404 => "not_found",
        405 => "method_not_allowed",
        406 => "not_acceptable",
        408 => "request_timeout",
        409 => "conflict",
        410 => "gone",
        411 => "length_required",
        413 => "payload_too_large",
        414 => "uri_too_long",
        415 => "unsupported_media_type",
        422 => "unprocessable_entity",
        426 => "upgrade_required",
        429 => "rate_limited",
        431 => "headers_too_large",
        500 => "internal",
        501 => "not_implemented",
        503 => "unavailable",
        504 => "timeout",
        s if (400..500).contains(&s) => "client_error",
        _ => "server_error",
    }
}

impl From<annals_core::Error> for ApiError {
    fn from(e: annals_core::Error) -> Self {
        use annals_core::Error as E;
        let message = e.to_string();
        match e {
            E::WrongExpectedVersion { stream, expected, actual } => {
                ApiError::new(StatusCode::CONFLICT, "wrong_expected_version", message).with_details(json!({
                    "stream": stream.as_str(),
                    "expected": expected_to_json(expected),
                    "actual": actual,
                }))
            }
            E::StreamNotFound { stream } => ApiError::new(StatusCode::NOT_FOUND, "stream_not_found", message)
                .with_details(json!({ "stream": stream.as_str() })),
            E::StreamDeleted { stream } => ApiError::new(StatusCode::GONE, "stream_deleted", message)
                .with_details(json!({ "stream": stream.as_str() })),
            E::InvalidInput { .. } => ApiError::new(StatusCode::BAD_REQUEST, "invalid_input", message),
            E::LimitExceeded { what, max, actual } => {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "limit_exceeded", message).with_details(json!({
                    "limit": what.to_string(),
                    "max": max,
                    "actual": actual,
                }))
            }
            E::Poisoned { .. } => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_poisoned", message),
            E::Closed => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "store_closed", message),
            E::Io(_) => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "io_error", message),
            E::Backend { .. } => {
                // A database outage, failover or timeout: worth trying again
                // shortly (clients that honour Retry-After back off by it).
                let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "backend_error", message);
                e.retry_after = Some(1);
                e
            }
            E::OutcomeUnknown { .. } => {
                // May have been written: re-send unchanged (same ids, same
                // expectation) once the backend is back.
                let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "outcome_unknown", message);
                e.retry_after = Some(1);
                e
            }
            E::Corrupt { .. } => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "corrupt", message),
            _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message),
        }
    }
}

/// The body of every error answer: `{ "error": { "code", "message",
/// "details"? } }`. One schema for all of them in `/openapi.json`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorOut {
    /// What went wrong.
    pub error: ErrorBody,
}

/// The inside of an [`ErrorOut`].
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Stable snake_case code clients can match on (e.g.
    /// `wrong_expected_version`, `stream_not_found`, `rate_limited`).
    pub code: String,
    /// Human-readable explanation.
    pub message: String,
    /// Structured extra information, when the error has some (e.g.
    /// `{ stream, expected, actual }` for a version conflict).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub details: Option<Value>,
}

/// The same body, borrowed from an [`ApiError`] (serializes exactly like
/// [`ErrorOut`], without copying the strings).
#[derive(Serialize)]
struct ErrorOutRef<'a> {
    error: ErrorBodyRef<'a>,
}

#[derive(Serialize)]
struct ErrorBodyRef<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<&'a Value>,
}

impl ApiError {
    fn out(&self) -> ErrorOutRef<'_> {
        ErrorOutRef {
            error: ErrorBodyRef { code: &self.code, message: &self.message, details: self.details.as_ref() },
        }
    }

    /// The JSON body of this error.
    pub fn body(&self) -> Value {
        serde_json::to_value(self.out()).unwrap_or_else(|_| json!({ "error": { "code": self.code } }))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // A follower of a shared store answers every group request with
        // `groups_elsewhere`: routine, not worth a warning each time.
        if self.code == "groups_elsewhere" {
            tracing::debug!(status = %self.status, code = %self.code, "request for groups run elsewhere");
        } else if self.status.is_server_error() {
            tracing::warn!(status = %self.status, code = %self.code, message = %self.message, "request failed");
        }
        let mut response = (self.status, Json(self.out())).into_response();
        if let Some(secs) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}
