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

/// One run (migration 0009) as read by [`crate::sql::RUN_COLUMNS`]: the
/// columns its events share, and theirs as arrays.
pub(crate) struct RunRow {
    first_position: u64,
    stream: StreamName,
    first_version: u64,
    event_type: String,
    recorded_at: annals_core::Timestamp,
    ids: Vec<Uuid>,
    content_types: Vec<i16>,
    data: Vec<Vec<u8>>,
    metadata: Vec<String>,
}

impl RunRow {
    /// Decodes a row of [`crate::sql::RUN_COLUMNS`], re-using `last` when
    /// the run's stream is the same as the previous one's.
    pub(crate) fn decode(row: &Row, last: &mut Option<StreamName>) -> Result<Self> {
        let get = |e: tokio_postgres::Error| crate::error::db(e);
        let first_position = to_u64(row.try_get(0).map_err(get)?, "position")?;
        let stream: &str = row.try_get(1).map_err(get)?;
        let stream = match last {
            Some(name) if name.as_str() == stream => name.clone(),
            _ => {
                let name = stream_name(stream)?;
                *last = Some(name.clone());
                name
            }
        };
        let run = RunRow {
            first_position,
            stream,
            first_version: to_u64(row.try_get(2).map_err(get)?, "version")?,
            event_type: row.try_get(3).map_err(get)?,
            recorded_at: row.try_get::<_, PgTimestamp>(4).map_err(get)?.0,
            ids: row.try_get(5).map_err(get)?,
            content_types: row.try_get(6).map_err(get)?,
            data: row.try_get(7).map_err(get)?,
            metadata: row.try_get(8).map_err(get)?,
        };
        let n = run.ids.len();
        if n == 0 || run.content_types.len() != n || run.data.len() != n || run.metadata.len() != n {
            return Err(PgError::Corrupt(format!(
                "run at position {first_position}: arrays of unequal length"
            ))
            .into());
        }
        Ok(run)
    }

    /// Appends its events to `out` until `out` holds `take`: oldest first
    /// from `from` on, or with `backward` newest first from `from` down,
    /// where `from` is a version (`by_version`) or a position.
    pub(crate) fn unpack(
        self,
        from: u64,
        by_version: bool,
        backward: bool,
        take: usize,
        out: &mut Vec<RecordedEvent>,
    ) -> Result<()> {
        let n = self.ids.len();
        let first = if by_version { self.first_version } else { self.first_position };
        let skip =
            if backward { (first + n as u64 - 1).saturating_sub(from) } else { from.saturating_sub(first) };
        let skip = usize::try_from(skip).unwrap_or(usize::MAX);
        let take = take.saturating_sub(out.len());
        let RunRow {
            first_position,
            stream,
            first_version,
            event_type,
            recorded_at,
            ids,
            content_types,
            data,
            metadata,
        } = self;
        let events = ids.into_iter().zip(content_types).zip(data).zip(metadata).enumerate().map(
            |(i, (((id, content_type), data), metadata))| -> Result<RecordedEvent> {
                let position = first_position + i as u64;
                let content_type =
                    u8::try_from(content_type).ok().and_then(ContentType::from_code).ok_or_else(|| {
                        PgError::Corrupt(format!("event at position {position}: content type {content_type}"))
                    })?;
                Ok(RecordedEvent {
                    stream: stream.clone(),
                    version: first_version + i as u64,
                    position,
                    id,
                    event_type: event_type.clone(),
                    data: Bytes::from(data),
                    content_type,
                    // Written by this store from validated metadata.
                    metadata: Metadata::from_trusted_json(Bytes::from(metadata)),
                    recorded_at,
                })
            },
        );
        if backward {
            // Offsets from the newest event.
            let keep: Vec<RecordedEvent> = events.take(n.saturating_sub(skip)).collect::<Result<Vec<_>>>()?;
            out.extend(keep.into_iter().rev().take(take));
        } else {
            for event in events.skip(skip).take(take) {
                out.push(event?);
            }
        }
        Ok(())
    }

    pub(crate) fn first_position(&self) -> u64 {
        self.first_position
    }

    pub(crate) fn len(&self) -> usize {
        self.ids.len()
    }
}
