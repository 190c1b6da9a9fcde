//! Rows to core types, and the integer conversions between PostgreSQL's
//! signed `bigint` and the API's `u64`.

use annals_core::{ContentType, Metadata, RecordedEvent, Result, StreamName};
use bytes::Bytes;
use tokio_postgres::Row;
use uuid::Uuid;

use crate::{PgError, timestamp::PgTimestamp};

/// A `bigint` read back as `u64`; negative values mean a corrupt row.
pub(crate) fn to_u64(v: i64, what: &str) -> Result<u64> {
    u64::try_from(v).map_err(|_| PgError::Corrupt(format!("{what} is negative ({v})")).into())
}

/// A `u64` (version, position, limit) as a `bigint`; values beyond
/// `i64::MAX` cannot exist in the table, so clamping keeps comparisons
/// right.
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A `usize` limit as a `bigint`.
pub(crate) fn limit_i64(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A stored stream name: user names and `$` system names both come back.
pub(crate) fn stream_name(name: &str) -> Result<StreamName> {
    if name.starts_with('$') { StreamName::system(name) } else { StreamName::new(name) }
        .map_err(|e| PgError::Corrupt(format!("stored stream name '{name}' is invalid: {e}")).into())
}

/// Decodes the columns of [`crate::sql::EVENT_COLUMNS`] starting at `at`,
/// re-using `last` when the row's stream is the same (pages are often runs
/// of one stream: no new allocation then).
pub(crate) fn event_from_row_cached(
    row: &Row,
    at: usize,
    last: &mut Option<StreamName>,
) -> Result<RecordedEvent> {
    let get = |e: tokio_postgres::Error| crate::error::db(e);
    let position: i64 = row.try_get(at).map_err(get)?;
    let stream: &str = row.try_get(at + 1).map_err(get)?;
    let version: i64 = row.try_get(at + 2).map_err(get)?;
    let id: Uuid = row.try_get(at + 3).map_err(get)?;
    let event_type: String = row.try_get(at + 4).map_err(get)?;
    let content_type: i16 = row.try_get(at + 5).map_err(get)?;
    let data: Vec<u8> = row.try_get(at + 6).map_err(get)?;
    let metadata: String = row.try_get(at + 7).map_err(get)?;
    let recorded_at: PgTimestamp = row.try_get(at + 8).map_err(get)?;
    let content_type = u8::try_from(content_type).ok().and_then(ContentType::from_code).ok_or_else(|| {
        PgError::Corrupt(format!("event at position {position}: content type {content_type}"))
    })?;
    Ok(RecordedEvent {
        stream: match last {
            Some(name) if name.as_str() == stream => name.clone(),
            _ => {
                let name = stream_name(stream)?;
                *last = Some(name.clone());
                name
            }
        },
        version: to_u64(version, "version")?,
        position: to_u64(position, "position")?,
        id,
        event_type,
        data: Bytes::from(data),
        content_type,
        // Written by this store from validated metadata.
        metadata: Metadata::from_trusted_json(Bytes::from(metadata)),
        recorded_at: recorded_at.0,
    })
}
