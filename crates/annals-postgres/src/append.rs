//! Appends: lock the streams, decide with the shared rules, write
//! everything in one statement under the head lock, commit.

use std::{collections::HashMap, time::Duration};

use annals_core::{
    AppendDecision, AppendResult, Error, Result, StreamAppend, StreamName, StreamState, category_of,
};
use uuid::Uuid;

use crate::{
    Inner, PgError,
    error::{db, is_retryable_state},
    listener::bump,
    row::{to_i64, to_u64},
};

/// How often an append is re-run after a deadlock, serialization failure
/// or unique violation before the error is returned.
const MAX_ATTEMPTS: u32 = 5;

/// Why one attempt failed.
enum Failure {
    /// Run the whole transaction again (the database said so by SQLSTATE).
    Retry(tokio_postgres::Error),
    /// Final.
    Fail(Error),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        if e.code().is_some_and(is_retryable_state) { Failure::Retry(e) } else { Failure::Fail(db(e)) }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Fail(e)
    }
}

impl From<deadpool_postgres::PoolError> for Failure {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Failure::Fail(PgError::from(e).into())
    }
}

/// A stream's row as locked by the append.
struct Locked {
    state: StreamState,
    last_event_id: Option<Uuid>,
}

impl Inner {
    /// Appends `parts` atomically (see [`annals_core::Appender`]).
    pub(crate) async fn append_parts(&self, parts: Vec<StreamAppend>) -> Result<Vec<AppendResult>> {
        self.limits.check_parts(&parts)?;
        let mut attempt = 1;
        loop {
            match self.try_append(&parts).await {
                Ok(results) => return Ok(results),
                Err(Failure::Fail(e)) => return Err(e),
                Err(Failure::Retry(e)) if attempt >= MAX_ATTEMPTS => return Err(db(e)),
                Err(Failure::Retry(e)) => {
                    tracing::debug!(error = %e, attempt, "append raced another transaction; retrying");
                    tokio::time::sleep(Duration::from_millis(u64::from(attempt) * 5)).await;
                    attempt += 1;
                }
            }
        }
    }

    async fn try_append(&self, parts: &[StreamAppend]) -> Result<Vec<AppendResult>, Failure> {
        let mut client = self.pool.get().await?;
        let tx = client.transaction().await?;

        // Lock every stream row, in name order so that two multi-stream
        // appends over the same streams cannot deadlock.
        let mut names: Vec<&str> = parts.iter().map(|p| p.stream.as_str()).collect();
        names.sort_unstable();
        let categories: Vec<&str> = names.iter().map(|n| category_of(n)).collect();
        let stmt = tx.prepare_cached(&self.sql.lock_streams).await?;
        let mut locked = HashMap::with_capacity(names.len());
        for row in tx.query(&stmt, &[&names, &categories]).await? {
            let name: String = row.try_get(0)?;
            let last_version: Option<i64> = row.try_get(1)?;
            let last_position: Option<i64> = row.try_get(2)?;
            let truncate_before: i64 = row.try_get(3)?;
            let state = StreamState {
                last_version: last_version.map(|v| to_u64(v, "last_version")).transpose()?,
                last_position: last_position.map(|v| to_u64(v, "last_position")).transpose()?,
                truncate_before: to_u64(truncate_before, "truncate_before")?,
                tombstoned: row.try_get(4)?,
            };
            locked.insert(name, Locked { state, last_event_id: row.try_get(5)? });
        }

        // Decide every part before writing anything: all or nothing.
        let mut decisions = Vec::with_capacity(parts.len());
        for part in parts {
            let Some(Locked { state, last_event_id }) = locked.get(part.stream.as_str()) else {
                return Err(Failure::Fail(Error::Backend {
                    message: format!("stream row '{}' was not locked", part.stream),
                    source: None,
                }));
            };
            let ids: Vec<Uuid> = part.events.iter().map(|e| e.id).collect();
            let tail = self.resend_tail(&tx, &part.stream, state, *last_event_id, &ids).await?;
            decisions.push(state.decide(&part.stream, part.expected, &ids, |_| Ok(tail))?);
        }

        let mut batch = Batch::default();
        for (part, decision) in parts.iter().zip(&decisions) {
            if let AppendDecision::Write { first_version } = decision {
                batch.add(part, *first_version)?;
            }
        }
        if batch.total == 0 {
            // Every part was an idempotent re-send: nothing to commit.
            drop(tx);
            return Ok(decisions.iter().filter_map(already_written).collect());
        }

        let stmt = tx.prepare_cached(&self.sql.write).await?;
        let row = tx
            .query_one(
                &stmt,
                &[
                    &batch.total,
                    &batch.streams,
                    &batch.versions,
                    &batch.ids,
                    &batch.types,
                    &batch.categories,
                    &batch.content_types,
                    &batch.data,
                    &batch.metadata,
                    &batch.correlation_ids,
                    &batch.updated,
                    &batch.last_versions,
                    &batch.last_offsets,
                    &batch.last_ids,
                    &self.sql.channel,
                ],
            )
            .await?;
        let first: i64 = row.try_get(0)?;
        tx.commit().await?;
        let first = to_u64(first, "position")?;
        let next = first + to_u64(batch.total, "total")?;
        // Published only after commit: the events are readable now.
        bump(&self.head, next);

        let mut results = Vec::with_capacity(parts.len());
        let mut offsets = batch.part_offsets.into_iter();
        for decision in &decisions {
            match decision {
                AppendDecision::AlreadyWritten(r) => results.push(*r),
                AppendDecision::Write { .. } => {
                    let (next_version, last_offset) = offsets.next().unwrap_or_default();
                    results.push(AppendResult { next_version, position: first + last_offset });
                }
            }
        }
        Ok(results)
    }

    /// The ids and last position of the stream's tail when this append may
    /// be an idempotent re-send. The stream's last event id is kept on its
    /// row, so the tail is only read when that id matches the batch's last
    /// id (a re-send), never on an ordinary append.
    async fn resend_tail(
        &self,
        tx: &deadpool_postgres::Transaction<'_>,
        stream: &StreamName,
        state: &StreamState,
        last_event_id: Option<Uuid>,
        ids: &[Uuid],
    ) -> Result<Option<(Vec<Uuid>, u64)>, Failure> {
        let n = ids.len() as u64;
        let Some(last) = state.last_version else { return Ok(None) };
        if state.tombstoned || last_event_id.is_none() || last_event_id != ids.last().copied() || last + 1 < n
        {
            return Ok(None);
        }
        let stmt = tx.prepare_cached(&self.sql.tail_ids).await?;
        let rows = tx.query(&stmt, &[&stream.as_str(), &to_i64(last + 1 - n)]).await?;
        let mut tail = Vec::with_capacity(rows.len());
        let mut position = None;
        for row in rows {
            tail.push(row.try_get::<_, Uuid>(0)?);
            position = Some(row.try_get::<_, i64>(1)?);
        }
        match position {
            Some(p) if tail.len() == ids.len() => Ok(Some((tail, to_u64(p, "position")?))),
            _ => Ok(None),
        }
    }
}

fn already_written(d: &AppendDecision) -> Option<AppendResult> {
    match d {
        AppendDecision::AlreadyWritten(r) => Some(*r),
        AppendDecision::Write { .. } => None,
    }
}

/// The events to insert, as column arrays for `unnest`.
#[derive(Default)]
struct Batch<'a> {
    total: i64,
    streams: Vec<&'a str>,
    versions: Vec<i64>,
    ids: Vec<Uuid>,
    types: Vec<&'a str>,
    categories: Vec<&'a str>,
    content_types: Vec<i16>,
    data: Vec<&'a [u8]>,
    metadata: Vec<&'a str>,
    correlation_ids: Vec<Option<String>>,
    /// Per written stream: name, last version, offset of its last event.
    updated: Vec<&'a str>,
    last_versions: Vec<i64>,
    last_offsets: Vec<i64>,
    last_ids: Vec<Uuid>,
    /// Per written part: (next version, offset of its last event).
    part_offsets: Vec<(u64, u64)>,
}

impl<'a> Batch<'a> {
    fn add(&mut self, part: &'a StreamAppend, first_version: u64) -> Result<()> {
        let stream = part.stream.as_str();
        let mut version = first_version;
        for event in &part.events {
            let metadata = std::str::from_utf8(event.metadata.as_bytes())
                .map_err(|_| Error::invalid(format!("metadata of event {} is not UTF-8", event.id)))?;
            self.streams.push(stream);
            self.versions.push(to_i64(version));
            self.ids.push(event.id);
            self.types.push(&event.event_type);
            self.categories.push(category_of(stream));
            self.content_types.push(i16::from(event.content_type.code()));
            self.data.push(&event.data);
            self.metadata.push(metadata);
            self.correlation_ids.push(event.metadata.correlation_id());
            version += 1;
        }
        self.total += part.events.len() as i64;
        let last_offset = self.total - 1;
        let last_id = part.events.last().map(|e| e.id).unwrap_or_default();
        self.updated.push(stream);
        self.last_versions.push(to_i64(version - 1));
        self.last_offsets.push(last_offset);
        self.last_ids.push(last_id);
        self.part_offsets.push((version, last_offset as u64));
        Ok(())
    }
}
