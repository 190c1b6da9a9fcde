//! Reads: single streams, `$all` pages, stream state and the head.

use std::collections::BTreeMap;

use annals_core::{
    AllSlice, Direction, Error, ListStreams, ReadAll, ReadFrom, ReadStream, RecordedEvent, Result,
    StoreStats, StreamInfo, StreamName, StreamState,
};

use tokio_postgres::{error::SqlState, types::ToSql};

use crate::{
    Inner, PgError,
    error::db,
    listener::bump,
    pooled::{Pooled, marking},
    row::{RunRow, limit_i64, to_i64, to_u64},
    sql::{ALL_PAGE_HEAD_COLUMN, Param, filter_clause},
};

/// A stream row's state from its columns `last_version, last_position,
/// truncate_before, tombstoned`, starting at column `first`.
pub(crate) fn state_from_row(row: &tokio_postgres::Row, first: usize) -> Result<StreamState> {
    let last_version: Option<i64> = row.try_get(first).map_err(db)?;
    let last_position: Option<i64> = row.try_get(first + 1).map_err(db)?;
    let truncate_before: i64 = row.try_get(first + 2).map_err(db)?;
    Ok(StreamState {
        last_version: last_version.map(|v| to_u64(v, "last_version")).transpose()?,
        last_position: last_position.map(|v| to_u64(v, "last_position")).transpose()?,
        truncate_before: to_u64(truncate_before, "truncate_before")?,
        tombstoned: row.try_get(first + 3).map_err(db)?,
    })
}

impl Inner {
    /// A pooled connection; see [`crate::pooled`] for why operations map
    /// their errors through `marking` and run under its `deadline`.
    pub(crate) async fn client(&self) -> Result<Pooled> {
        match self.store_pool.get().await {
            Ok(object) => Ok(Pooled::new(object, self.schema_label.clone(), self.answer.clone())),
            Err(e) => Err(PgError::from(e).into()),
        }
    }

    /// The stream's row, or the default state when it has none.
    pub(crate) async fn stream_state(&self, stream: &StreamName) -> Result<StreamState> {
        let client = self.client().await?;
        client
            .deadline()
            .bound(async {
                let broken = client.broken();
                let db = marking(&broken);
                let stmt = client.prepare_cached(&self.sql.stream_state).await.map_err(db)?;
                let Some(row) = client.query_opt(&stmt, &[&stream.as_str()]).await.map_err(db)? else {
                    return Ok(StreamState::default());
                };
                state_from_row(&row, 0)
            })
            .await
    }

    /// Streams by name from the `streams` view: stream rows with their last
    /// runs (never a scan of events).
    pub(crate) async fn list_streams(&self, request: &ListStreams) -> Result<Vec<StreamInfo>> {
        request.validate()?;
        if request.limit == 0 {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        client
            .deadline()
            .bound(async {
                let broken = client.broken();
                let db = marking(&broken);
                let stmt = client.prepare_cached(&self.sql.list_streams).await.map_err(db)?;
                let limit = limit_i64(request.limit);
                let rows = client
                    .query(&stmt, &[&request.prefix, &request.after, &request.include_system, &limit])
                    .await
                    .map_err(db)?;
                rows.iter()
                    .map(|row| {
                        let name: String = row.try_get(0).map_err(db)?;
                        Ok(state_from_row(row, 1)?.info(&StreamName::any(&name)?))
                    })
                    .collect()
            })
            .await
    }

    /// Counts by type (one aggregate, O(events): see the statement) and the
    /// size of the schema's tables, in one read-only snapshot.
    ///
    /// The aggregate may run at most `stats_timeout` (and at most a third of
    /// the answer timeout, so the call still answers in time): on a store too
    /// big to count in that time the counts are reported as unknown
    /// (`/stats` then falls back to its bounded scan and says it is
    /// incomplete) instead of keeping a connection and a core of the
    /// database busy for every poll of a dashboard.
    pub(crate) async fn store_stats(&self) -> Result<StoreStats> {
        let mut client = self.client().await?;
        let deadline = client.deadline();
        deadline
            .bound(async {
                let broken = client.broken();
                let db = marking(&broken);
                let mut tx = client
                    .build_transaction()
                    .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start()
                    .await
                    .map_err(db)?;
                // Each of the two statistics may wait this long (a lock on
                // the tables holds both up), and the whole call answers
                // within the answer timeout: past it the call would fail
                // with `NoAnswer` instead of reporting the figures unknown.
                let limit = self.stats_timeout.min(self.answer.within / 3);
                let timeout_ms = limit.as_millis().clamp(1, i32::MAX as u128);
                tx.batch_execute(&format!("SET LOCAL statement_timeout = {timeout_ms}")).await.map_err(db)?;
                // Prepared here, under the timeout: parsing takes the tables' locks
                // too, and would wait without one behind a lock held elsewhere.
                let counts = within_timeout(&mut tx, &self.sql.events_by_type, &[], timeout_ms).await?;
                let counts = match counts {
                    Some(rows) => {
                        let mut counts = BTreeMap::new();
                        for row in &rows {
                            let event_type: String = row.try_get(0).map_err(db)?;
                            let n: i64 = row.try_get(1).map_err(db)?;
                            counts.insert(event_type, to_u64(n, "count")?);
                        }
                        Some(counts)
                    }
                    None => None,
                };
                let bytes =
                    match within_timeout(&mut tx, &self.sql.disk_bytes, &[&self.schema], timeout_ms).await? {
                        Some(rows) => match rows.first() {
                            Some(row) => Some(to_u64(row.try_get::<_, i64>(0).map_err(db)?, "disk_bytes")?),
                            None => None,
                        },
                        None => None,
                    };
                tx.commit().await.map_err(db)?;
                let mut stats = StoreStats::unknown();
                if let Some(counts) = counts {
                    stats = stats.with_events_by_type(counts);
                }
                if let Some(bytes) = bytes {
                    stats = stats.with_disk_bytes(bytes);
                }
                Ok(stats)
            })
            .await
    }

    /// Whether a pooled connection answers a trivial query.
    pub(crate) async fn health(&self) -> Result<()> {
        let client = self.client().await?;
        client
            .deadline()
            .bound(async {
                let broken = client.broken();
                let db = marking(&broken);
                client.simple_query("SELECT 1").await.map_err(db)?;
                Ok(())
            })
            .await
    }

    pub(crate) async fn stream_info(&self, stream: &StreamName) -> Result<StreamInfo> {
        Ok(self.stream_state(stream).await?.info(stream))
    }

    pub(crate) async fn read_stream(
        &self,
        stream: &StreamName,
        request: ReadStream,
    ) -> Result<Vec<RecordedEvent>> {
        let state = self.stream_state(stream).await?;
        if state.tombstoned {
            return Err(Error::StreamDeleted { stream: stream.clone() });
        }
        let Some(last) = state.visible_version().filter(|_| state.exists()) else {
            return Err(Error::StreamNotFound { stream: stream.clone() });
        };
        let first = state.truncate_before;
        let limit = limit_i64(request.limit);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let client = self.client().await?;
        client
            .deadline()
            .bound(async {
                let broken = client.broken();
                let db = marking(&broken);
                let take = usize::try_from(limit).unwrap_or(usize::MAX);
                let mut events = Vec::new();
                let mut name = None;
                match request.direction {
                    Direction::Forward => {
                        let start = match request.from {
                            ReadFrom::Start => first,
                            ReadFrom::End => return Ok(Vec::new()),
                            ReadFrom::At(v) => v.max(first),
                        };
                        if start > last {
                            return Ok(Vec::new());
                        }
                        let stmt = client.prepare_cached(&self.sql.read_stream_forward).await.map_err(db)?;
                        let rows = client
                            .query(&stmt, &[&stream.as_str(), &to_i64(start), &limit])
                            .await
                            .map_err(db)?;
                        for row in &rows {
                            let run = RunRow::decode(row, &mut name)?;
                            run.unpack(start, true, false, take, &mut events)?;
                        }
                        // The state was read on another connection, a moment
                        // earlier: events after its last version may belong to
                        // a later generation of the stream (soft-deleted and
                        // written again meanwhile) and are left to the next
                        // read. Events up to it never change, so the page is
                        // the stream as that state saw it.
                        events.retain(|e| e.version <= last);
                    }
                    Direction::Backward => {
                        let start = match request.from {
                            ReadFrom::Start | ReadFrom::End => last,
                            ReadFrom::At(v) => v.min(last),
                        };
                        if start < first {
                            return Ok(Vec::new());
                        }
                        let stmt = client.prepare_cached(&self.sql.read_stream_backward).await.map_err(db)?;
                        let rows = client
                            .query(&stmt, &[&stream.as_str(), &to_i64(start), &to_i64(first), &limit])
                            .await
                            .map_err(db)?;
                        for row in &rows {
                            let run = RunRow::decode(row, &mut name)?;
                            run.unpack(start, true, true, take, &mut events)?;
                        }
                        // The oldest run may reach below a soft delete's truncation.
                        events.retain(|e| e.version >= first);
                    }
                }
                Ok(events)
            })
            .await
    }

    /// A `$all` page. Positions are dense, so the page is first read as the
    /// position range it would cover, which needs no counting (an index
    /// range scan, about a third of the counting statement's cost); only if
    /// that range held events the filter leaves out is the rest read by
    /// counting events run by run (the statements of
    /// [`Statements::read_all_forward`] and `read_all_backward`). A filter
    /// that selects most events thus costs one statement per page, a
    /// selective one two.
    pub(crate) async fn read_all(&self, request: &ReadAll) -> Result<AllSlice> {
        request.filter.validate()?;
        let limit = limit_i64(request.limit);
        if limit == 0 {
            return self.empty_page(request).await;
        }
        // The counting statements look at `$2 + 1` runs.
        let limit = limit.min(i64::MAX - 1);
        let take = usize::try_from(limit).unwrap_or(usize::MAX);
        let client = self.client().await?;
        client
            .deadline()
            .bound(async {
                let broken = client.broken();
                let filter = &request.filter;
                let mut events = Vec::new();
                match request.direction {
                    Direction::Forward => {
                        let from = match request.from {
                            ReadFrom::Start => 0,
                            ReadFrom::End => i64::MAX,
                            ReadFrom::At(p) => to_i64(p),
                        };
                        let (clause, params) = filter_clause(filter, 3);
                        let sql = self.sql.read_all_forward_range(&clause);
                        let (mut head, covered) = self
                            .all_runs(&client, &broken, &sql, from, limit, params, take, false, &mut events)
                            .await?;
                        // Past the range and past every run read (the last may
                        // reach beyond the range; it must not be read twice).
                        let end = from.saturating_add(limit).max(covered.map_or(0, |(_, end)| to_i64(end)));
                        if events.len() < take && u64::try_from(end).is_ok_and(|end| end < head) {
                            let (clause, params) = filter_clause(filter, 3);
                            let sql = self.sql.read_all_forward(&clause);
                            let rest = (take - events.len()) as i64;
                            let (later, _) = self
                                .all_runs(&client, &broken, &sql, end, rest, params, take, false, &mut events)
                                .await?;
                            head = head.max(later);
                        }
                        bump(&self.head, head);
                        let next = if events.len() >= take {
                            events.last().map_or(head, |e| e.position + 1)
                        } else {
                            head
                        };
                        Ok(AllSlice { events, next: Some(next) })
                    }
                    Direction::Backward => {
                        let from = match request.from {
                            ReadFrom::Start | ReadFrom::End => i64::MAX,
                            ReadFrom::At(p) => to_i64(p),
                        };
                        let (clause, params) = filter_clause(filter, 3);
                        let sql = self.sql.read_all_backward_range(&clause);
                        let (_, covered) = self
                            .all_runs(&client, &broken, &sql, from, limit, params, take, true, &mut events)
                            .await?;
                        // The range held (from - limit, from]; what the filter left
                        // out there is made up from below it, and below every run
                        // read (the oldest may reach below the range).
                        let low = from
                            .saturating_sub(limit)
                            .min(covered.map_or(i64::MAX, |(first, _)| to_i64(first)) - 1);
                        if events.len() < take && low >= 0 {
                            let (clause, params) = filter_clause(filter, 3);
                            let sql = self.sql.read_all_backward(&clause);
                            let rest = (take - events.len()) as i64;
                            self.all_runs(&client, &broken, &sql, low, rest, params, take, true, &mut events)
                                .await?;
                        }
                        let next = if events.len() >= take {
                            events.last().and_then(|e| e.position.checked_sub(1))
                        } else {
                            None
                        };
                        Ok(AllSlice { events, next })
                    }
                }
            })
            .await
    }

    /// Runs one `$all` page statement (`$1` from, `$2` limit, the filter's
    /// parameters) and unpacks its runs into `events`, from `from` on (or
    /// down), until `events` holds `take`. Returns the head a forward page
    /// carries (0 for a backward one) and the positions its runs covered
    /// (first position of the oldest, one past the newest's last event).
    #[allow(clippy::too_many_arguments)]
    async fn all_runs(
        &self,
        client: &Pooled,
        broken: &std::sync::atomic::AtomicBool,
        sql: &str,
        from: i64,
        limit: i64,
        filter_params: Vec<Param>,
        take: usize,
        backward: bool,
        events: &mut Vec<RecordedEvent>,
    ) -> Result<(u64, Option<(u64, u64)>)> {
        let db = marking(broken);
        let stmt = client.prepare_cached(sql).await.map_err(db)?;
        let mut params: Vec<Param> = vec![Box::new(from), Box::new(limit)];
        params.extend(filter_params);
        let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| &**p as _).collect();
        let rows = client.query(&stmt, &refs).await.map_err(db)?;
        let mut head = if backward { Some(0) } else { None };
        let mut runs = Vec::with_capacity(rows.len());
        let mut name = None;
        for row in &rows {
            if backward || row.try_get::<_, Option<i64>>(0).map_err(db)?.is_some() {
                runs.push(RunRow::decode(row, &mut name)?);
            } else {
                head = Some(to_u64(row.try_get(ALL_PAGE_HEAD_COLUMN).map_err(db)?, "next_position")?);
            }
        }
        let head = head.ok_or_else(|| PgError::Corrupt("the head row is missing".into()))?;
        let covered = runs.iter().fold(None, |acc: Option<(u64, u64)>, r| {
            let (first, end) = (r.first_position(), r.first_position() + r.len() as u64);
            Some(acc.map_or((first, end), |(a, b)| (a.min(first), b.max(end))))
        });
        let from = u64::try_from(from).unwrap_or(u64::MAX);
        if backward {
            // Newest first, as selected.
            runs.sort_by_key(|r| std::cmp::Reverse(r.first_position()));
            for run in runs {
                run.unpack(from, false, true, take, events)?;
            }
        } else {
            // UNION ALL does not promise to keep the page's order; it does
            // in practice, and sorting sorted input is linear.
            runs.sort_by_key(|r| r.first_position());
            for run in runs {
                run.unpack(from, false, false, take, events)?;
            }
        }
        Ok((head, covered))
    }

    /// A zero-limit page: no events, `next` where the scan would start.
    async fn empty_page(&self, request: &ReadAll) -> Result<AllSlice> {
        let head = self.next_position().await?;
        let next = match (request.direction, request.from) {
            (Direction::Forward, ReadFrom::Start) => Some(0),
            (Direction::Forward, ReadFrom::End) => Some(head),
            (Direction::Forward, ReadFrom::At(p)) => Some(p.min(head)),
            (Direction::Backward, ReadFrom::At(p)) => head.checked_sub(1).map(|last| p.min(last)),
            (Direction::Backward, _) => head.checked_sub(1),
        };
        Ok(AllSlice { events: Vec::new(), next })
    }

    pub(crate) async fn next_position(&self) -> Result<u64> {
        let client = self.client().await?;
        client
            .deadline()
            .bound(async {
                let broken = client.broken();
                let db = marking(&broken);
                let stmt = client.prepare_cached(&self.sql.head).await.map_err(db)?;
                let next: i64 = client.query_one(&stmt, &[]).await.map_err(db)?.try_get(0).map_err(db)?;
                let next = to_u64(next, "next_position")?;
                bump(&self.head, next);
                Ok(next)
            })
            .await
    }
}

/// Runs `sql` under a savepoint of `tx`; `None` when the transaction's
/// `statement_timeout` cancelled it (the transaction stays usable).
async fn within_timeout(
    tx: &mut tokio_postgres::Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
    timeout_ms: u128,
) -> Result<Option<Vec<tokio_postgres::Row>>> {
    let sp = tx.savepoint("within_timeout").await.map_err(db)?;
    let rows = match sp.prepare(sql).await {
        Ok(stmt) => sp.query(&stmt, params).await,
        Err(e) => Err(e),
    };
    match rows {
        Ok(rows) => {
            sp.commit().await.map_err(db)?;
            Ok(Some(rows))
        }
        Err(e) if e.code() == Some(&SqlState::QUERY_CANCELED) => {
            tracing::warn!(
                timeout_ms = timeout_ms as u64,
                "a store statistic took too long; reporting it as unknown"
            );
            sp.rollback().await.map_err(db)?;
            Ok(None)
        }
        Err(e) => Err(db(e)),
    }
}
