//! The JSON shapes of the API and their conversions to and from the core
//! types. See `docs/http-api.md` for the contract.

use annals_core::{
    ContentType, EventData, ExpectedVersion, Metadata, RecordedEvent, Snapshot, Timestamp, Uuid,
};
use base64::{Engine, engine::general_purpose::STANDARD as B64};
use serde::{Deserialize, Serialize};
use serde_json::{Value, value::RawValue};

use crate::error::ApiError;

/// An event as a client sends it.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EventIn {
    /// Idempotency key; a fresh UUIDv7 when absent.
    #[serde(default)]
    pub id: Option<Uuid>,
    /// Event type, 1–256 bytes.
    #[serde(rename = "type")]
    pub event_type: String,
    /// `application/json` (default) or `application/octet-stream`.
    #[serde(default)]
    pub content_type: Option<String>,
    /// Any JSON value for JSON events (default `{}`); a base64 string for
    /// binary events.
    #[serde(default)]
    #[schema(value_type = Value)]
    pub data: Option<Box<RawValue>>,
    /// A JSON object, stored as sent (every digit of a number kept).
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<Box<RawValue>>,
}

/// Parses a content type name as the API accepts it.
pub fn parse_content_type(s: &str) -> Option<ContentType> {
    let base = s.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    match base.as_str() {
        "application/json" | "json" => Some(ContentType::Json),
        "application/octet-stream" | "binary" | "octet-stream" => Some(ContentType::Binary),
        _ => None,
    }
}

impl EventIn {
    /// Converts to the core type, adding `correlation_id` to the metadata
    /// from the request's `X-Correlation-Id` when the event carries none.
    pub fn into_event_data(self, index: usize, correlation_id: Option<&str>) -> Result<EventData, ApiError> {
        let content_type = match self.content_type.as_deref() {
            None => ContentType::Json,
            Some(s) => parse_content_type(s).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "event {index}: content_type '{s}' is not supported (use application/json or application/octet-stream)"
                ))
            })?,
        };
        let data: Vec<u8> = match (content_type, self.data) {
            (ContentType::Json, None) => b"{}".to_vec(),
            (ContentType::Json, Some(raw)) => raw.get().as_bytes().to_vec(),
            (ContentType::Binary, None) => Vec::new(),
            (ContentType::Binary, Some(raw)) => {
                let s: String = serde_json::from_str(raw.get()).map_err(|_| {
                    ApiError::bad_request(format!("event {index}: binary data must be a base64 string"))
                })?;
                B64.decode(s.as_bytes()).map_err(|e| {
                    ApiError::bad_request(format!("event {index}: data is not valid base64: {e}"))
                })?
            }
        };
        // Kept as the client wrote it: parsed into a map and written back,
        // a number beyond a double's precision would be stored rounded.
        let mut metadata = match self.metadata {
            None => Metadata::default(),
            Some(raw) => Metadata::from_json(raw.get().as_bytes().to_vec())
                .map_err(|e| ApiError::bad_request(format!("event {index}: {e}")))?,
        };
        if let Some(cid) = correlation_id
            && metadata.get(annals_core::metadata::keys::CORRELATION_ID).is_none()
        {
            metadata = with_first(&metadata, annals_core::metadata::keys::CORRELATION_ID, cid)
                .map_err(|e| ApiError::bad_request(format!("event {index}: {e}")))?;
        }
        let mut event = EventData::raw(self.event_type, data, content_type).with_metadata(metadata);
        if let Some(id) = self.id {
            event = event.with_id(id);
        }
        Ok(event)
    }
}

/// `metadata` (a JSON object) with `key: value` added as its first member,
/// the rest of its text unchanged. `key` must not be in it already.
fn with_first(metadata: &Metadata, key: &str, value: &str) -> annals_core::Result<Metadata> {
    let text = String::from_utf8_lossy(metadata.as_bytes());
    let rest = text.trim().strip_prefix('{').unwrap_or("}").trim_start();
    let entry = format!("{}:{}", Value::from(key), Value::from(value));
    let joined = if rest.starts_with('}') { format!("{{{entry}}}") } else { format!("{{{entry},{rest}") };
    Metadata::from_json(joined.into_bytes())
}

/// An event as the API returns it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventOut {
    /// The event id.
    pub id: Uuid,
    /// The event type.
    #[serde(rename = "type")]
    pub event_type: String,
    /// Stream name.
    pub stream: String,
    /// 0-based version in the stream.
    pub version: u64,
    /// 0-based global position.
    pub position: u64,
    /// MIME type of `data`.
    pub content_type: &'static str,
    /// JSON value for JSON events; base64 string for binary ones.
    #[schema(value_type = Value)]
    pub data: Box<RawValue>,
    /// Metadata object.
    #[schema(value_type = Object)]
    pub metadata: Box<RawValue>,
    /// Commit time, RFC 3339 UTC with microseconds.
    pub recorded_at: String,
    /// Commit time, microseconds since the Unix epoch.
    pub recorded_at_micros: i64,
}

fn raw_json(bytes: &[u8]) -> Option<Box<RawValue>> {
    let s = std::str::from_utf8(bytes).ok()?;
    RawValue::from_string(s.to_owned()).ok()
}

fn raw_string(s: &str) -> Box<RawValue> {
    // A serialized string is always valid JSON.
    let text = serde_json::to_string(s).unwrap_or_else(|_| "\"\"".to_owned());
    RawValue::from_string(text).unwrap_or_else(|_| empty_object())
}

fn empty_object() -> Box<RawValue> {
    RawValue::from_string("{}".to_owned()).unwrap_or_default()
}

/// Encodes bytes that should be JSON: raw when they are, else base64.
pub fn json_or_base64(bytes: &[u8], is_json: bool) -> (Box<RawValue>, bool) {
    if is_json && let Some(raw) = raw_json(bytes) {
        return (raw, true);
    }
    (raw_string(&B64.encode(bytes)), false)
}

impl From<&RecordedEvent> for EventOut {
    fn from(e: &RecordedEvent) -> Self {
        let (data, is_json) = json_or_base64(&e.data, e.content_type == ContentType::Json);
        let content_type = if is_json { ContentType::Json.mime() } else { ContentType::Binary.mime() };
        EventOut {
            id: e.id,
            event_type: e.event_type.clone(),
            stream: e.stream.as_str().to_owned(),
            version: e.version,
            position: e.position,
            content_type,
            data,
            metadata: raw_json(e.metadata.as_bytes()).unwrap_or_else(empty_object),
            recorded_at: format_rfc3339(e.recorded_at),
            recorded_at_micros: e.recorded_at.as_micros(),
        }
    }
}

/// The result of an append, as returned with 201.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AppendOut {
    /// The stream appended to.
    pub stream: String,
    /// Version the next event will get.
    pub next_version: u64,
    /// The stream's last version (pass it as `expected` next time).
    pub last_version: u64,
    /// Global position of the last event written.
    pub position: u64,
}

impl AppendOut {
    /// From a core result.
    pub fn new(stream: &str, r: annals_core::AppendResult) -> Self {
        AppendOut {
            stream: stream.to_owned(),
            next_version: r.next_version,
            last_version: r.last_version(),
            position: r.position,
        }
    }
}

/// Which way a page was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DirectionOut {
    /// Oldest first.
    Forward,
    /// Newest first.
    Backward,
}

impl DirectionOut {
    /// The query value (`forward`, `backward`).
    pub fn as_str(self) -> &'static str {
        match self {
            DirectionOut::Forward => "forward",
            DirectionOut::Backward => "backward",
        }
    }
}

impl From<annals_core::Direction> for DirectionOut {
    fn from(d: annals_core::Direction) -> Self {
        match d {
            annals_core::Direction::Forward => DirectionOut::Forward,
            annals_core::Direction::Backward => DirectionOut::Backward,
        }
    }
}

/// Links of a page.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LinksOut {
    /// The next page in the same direction; `null` on the last page.
    pub next: Option<String>,
}

/// The body of `GET /streams/{stream}`: a page of one stream.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct StreamPageOut {
    /// The stream read.
    pub stream: String,
    /// The direction read.
    pub direction: DirectionOut,
    /// The events, in `direction` order.
    pub events: Vec<EventOut>,
    /// Version to pass as `from` for the next page; `null` on the last page.
    pub next: Option<u64>,
    /// The next page's URL.
    pub links: LinksOut,
}

/// The body of `GET /all`: a page of the global log.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AllPageOut {
    /// The direction read.
    pub direction: DirectionOut,
    /// The matching events, in `direction` order.
    pub events: Vec<EventOut>,
    /// Position to pass as `from` for the next page (inclusive): forward,
    /// always set (the head when the read reached the end); backward,
    /// `null` when the read reached position 0.
    pub next: Option<u64>,
    /// The log's next position when the page was read.
    pub head: u64,
    /// The next page's URL.
    pub links: LinksOut,
}

/// The body of `POST /transactions`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TransactionOut {
    /// One result per part, in the order given.
    pub results: Vec<AppendOut>,
}

/// Whether and how a stream was deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeletionOut {
    /// Not deleted.
    Live,
    /// Soft-deleted: reads as not found; can be recreated.
    Deleted,
    /// Hard-deleted: can never be written again.
    Tombstoned,
}

impl From<annals_core::DeletionState> for DeletionOut {
    fn from(d: annals_core::DeletionState) -> Self {
        match d {
            annals_core::DeletionState::Live => DeletionOut::Live,
            annals_core::DeletionState::Deleted => DeletionOut::Deleted,
            annals_core::DeletionState::Tombstoned => DeletionOut::Tombstoned,
        }
    }
}

/// The body of `GET /streams/{stream}/info`.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct StreamInfoOut {
    /// The stream.
    pub stream: String,
    /// Whether it has readable events (written and not deleted).
    pub exists: bool,
    /// Version of its last event ever written (also after a soft delete).
    pub last_version: Option<u64>,
    /// Position of its last event.
    pub last_position: Option<u64>,
    /// Versions below this are not readable (set by a soft delete).
    pub truncate_before: u64,
    /// Deletion state.
    pub deletion: DeletionOut,
}

impl From<annals_core::StreamInfo> for StreamInfoOut {
    fn from(i: annals_core::StreamInfo) -> Self {
        StreamInfoOut {
            stream: i.stream.as_str().to_owned(),
            exists: i.exists,
            last_version: i.last_version,
            last_position: i.last_position,
            truncate_before: i.truncate_before,
            deletion: i.deletion.into(),
        }
    }
}

/// The body of `PUT /streams/{stream}/snapshot` (201).
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SnapshotSavedOut {
    /// The stream.
    pub stream: String,
    /// The version the snapshot includes.
    pub version: u64,
}

/// A snapshot as the API returns it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SnapshotOut {
    /// The stream.
    pub stream: String,
    /// Stream version the snapshot includes.
    pub version: u64,
    /// Schema version of the snapshot encoding.
    pub schema_version: u32,
    /// `json` or `base64` (how `data` is encoded).
    pub encoding: &'static str,
    /// The state.
    #[schema(value_type = Value)]
    pub data: Box<RawValue>,
    /// When it was saved (RFC 3339).
    pub created_at: String,
    /// When it was saved (micros since epoch).
    pub created_at_micros: i64,
}

impl From<&Snapshot> for SnapshotOut {
    fn from(s: &Snapshot) -> Self {
        let (data, is_json) = json_or_base64(&s.data, true);
        SnapshotOut {
            stream: s.stream.as_str().to_owned(),
            version: s.version,
            schema_version: s.schema_version,
            encoding: if is_json { "json" } else { "base64" },
            data,
            created_at: format_rfc3339(s.created_at),
            created_at_micros: s.created_at.as_micros(),
        }
    }
}

/// The body of `PUT /streams/{stream}/snapshot`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotIn {
    /// The stream version the state includes.
    pub version: u64,
    /// Schema version of the state's encoding (default 1).
    #[serde(default = "one")]
    pub schema_version: u32,
    /// The state, any JSON value.
    #[schema(value_type = Value)]
    pub data: Box<RawValue>,
}

fn one() -> u32 {
    1
}

/// The JSON form of an expected version: `"any"`, `"no_stream"`,
/// `"stream_exists"` or a number.
pub fn expected_to_json(e: ExpectedVersion) -> Value {
    match e {
        ExpectedVersion::Any => Value::from("any"),
        ExpectedVersion::NoStream => Value::from("no_stream"),
        ExpectedVersion::StreamExists => Value::from("stream_exists"),
        ExpectedVersion::Exact(v) => Value::from(v),
    }
}

/// Parses an expected version from a header or query value. Accepts the
/// names, a version number, and KurrentDB's numeric codes (-2 any,
/// -1 no stream, -4 stream exists).
pub fn parse_expected(s: &str) -> Result<ExpectedVersion, ApiError> {
    let t = s.trim();
    match t.to_ascii_lowercase().as_str() {
        "any" | "-2" => Ok(ExpectedVersion::Any),
        "no_stream" | "nostream" | "-1" => Ok(ExpectedVersion::NoStream),
        "stream_exists" | "streamexists" | "-4" => Ok(ExpectedVersion::StreamExists),
        other => other.parse::<u64>().map(ExpectedVersion::Exact).map_err(|_| {
            ApiError::bad_request(format!(
                "expected version '{t}' is not valid: use any, no_stream, stream_exists or a version number"
            ))
        }),
    }
}

/// Parses an expected version given as JSON (string or number).
pub fn expected_from_json(v: &Value) -> Result<ExpectedVersion, ApiError> {
    match v {
        Value::String(s) => parse_expected(s),
        Value::Number(n) => match (n.as_u64(), n.as_i64()) {
            (Some(v), _) => Ok(ExpectedVersion::Exact(v)),
            (None, Some(i)) => parse_expected(&i.to_string()),
            _ => Err(ApiError::bad_request(format!("expected version {n} is not valid"))),
        },
        Value::Null => Ok(ExpectedVersion::Any),
        other => Err(ApiError::bad_request(format!("expected version {other} is not valid"))),
    }
}

/// Days since 1970-01-01 → (year, month, day) (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Days of month `m` (1–12) of year `y` in the proleptic Gregorian calendar.
fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if y % 4 == 0 && (y % 100 != 0 || y % 400 == 0) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Formats a timestamp as RFC 3339 UTC with microseconds,
/// e.g. `2026-11-22T18:57:23.123456Z`.
pub fn format_rfc3339(t: Timestamp) -> String {
    let micros = t.as_micros();
    let secs = micros.div_euclid(1_000_000);
    let frac = micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:06}Z", sod / 3600, (sod % 3600) / 60, sod % 60)
}

/// Parses a time given as RFC 3339 (`2026-11-22T18:57:23.5Z`,
/// `…+02:00`) or as integer microseconds since the epoch.
pub fn parse_time(s: &str) -> Option<Timestamp> {
    let s = s.trim();
    if let Ok(micros) = s.parse::<i64>() {
        return Some(Timestamp::from_micros(micros));
    }
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = s.get(r)?;
        if part.bytes().all(|c| c.is_ascii_digit()) { part.parse().ok() } else { None }
    };
    if b.len() < 20 || b.get(4) != Some(&b'-') || b.get(7) != Some(&b'-') || b.get(13) != Some(&b':') {
        return None;
    }
    if !matches!(b.get(10), Some(b'T' | b't' | b' ')) || b.get(16) != Some(&b':') {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=days_in_month(y, mo)).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut i = 19;
    let mut micros = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let start = i;
        while b.get(i).is_some_and(u8::is_ascii_digit) {
            i += 1;
        }
        let digits = s.get(start..i)?;
        if digits.is_empty() {
            return None;
        }
        let mut padded: String = digits.chars().take(6).collect();
        while padded.len() < 6 {
            padded.push('0');
        }
        micros = padded.parse().ok()?;
    }
    let offset_secs = match s.get(i..)? {
        "Z" | "z" => 0,
        rest if rest.len() == 6 && matches!(rest.as_bytes().first(), Some(b'+' | b'-')) => {
            let oh = num(i + 1..i + 3)?;
            let om = num(i + 4..i + 6)?;
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            sign * (oh * 3600 + om * 60)
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo as u32, d as u32);
    let secs = days * 86_400 + h * 3600 + mi * 60 + se - offset_secs;
    Some(Timestamp::from_micros(secs.checked_mul(1_000_000)?.checked_add(micros)?))
}

/// What a URL path segment or query value may keep unescaped: RFC 3986
/// "unreserved" characters.
const COMPONENT: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// Percent-encodes a path segment or query value (used by the server's
/// paging links and by the CLI's requests).
pub fn enc(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, COMPONENT).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips() {
        for micros in [0i64, 1, 1_790_000_000_123_456, -1, 951_782_400_000_000] {
            let t = Timestamp::from_micros(micros);
            let s = format_rfc3339(t);
            assert_eq!(parse_time(&s), Some(t), "{s}");
        }
        assert_eq!(format_rfc3339(Timestamp::from_micros(0)), "1970-01-01T00:00:00.000000Z");
        assert_eq!(parse_time("1970-01-01T01:00:00+01:00"), Some(Timestamp::from_micros(0)));
        assert_eq!(parse_time("1970-01-01T00:00:01.5Z"), Some(Timestamp::from_micros(1_500_000)));
        assert_eq!(parse_time("yesterday"), None);
        assert_eq!(parse_time("2026-13-01T00:00:00Z"), None);
    }

    /// A day the month does not have is refused, not rolled over into the
    /// next month (`2026-02-31` read as 3 March).
    #[test]
    fn impossible_dates_are_refused() {
        for bad in
            ["2026-02-29T00:00:00Z", "2026-02-31T00:00:00Z", "2026-04-31T12:00:00Z", "1900-02-29T00:00:00Z"]
        {
            assert_eq!(parse_time(bad), None, "{bad}");
        }
        for good in
            ["2024-02-29T00:00:00Z", "2000-02-29T00:00:00Z", "2026-01-31T00:00:00Z", "2026-12-31T23:59:59Z"]
        {
            assert!(parse_time(good).is_some(), "{good}");
        }
    }

    #[test]
    fn expected_versions_parse() {
        assert_eq!(parse_expected("any").ok(), Some(ExpectedVersion::Any));
        assert_eq!(parse_expected("-1").ok(), Some(ExpectedVersion::NoStream));
        assert_eq!(parse_expected("stream_exists").ok(), Some(ExpectedVersion::StreamExists));
        assert_eq!(parse_expected("7").ok(), Some(ExpectedVersion::Exact(7)));
        assert!(parse_expected("seven").is_err());
    }
}
