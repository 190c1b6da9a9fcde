//! SQL text, built once per store for its schema, and the `$all` filter
//! translated to a `WHERE` clause.

use annals_core::{Filter, TypeMatch};
use tokio_postgres::types::ToSql;

use crate::timestamp::PgTimestamp;

/// `"name"`, with embedded quotes doubled (names are validated to
/// `[a-z0-9_]` anyway; this is defence in depth).
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The columns every event read selects: whole runs (migration 0009),
/// which [`crate::row::RunRow`] unpacks into events. Unpacking in SQL
/// (`unnest` in a lateral join, a function scan per run) made a page of
/// 1,000 single-event runs five times slower than the row-per-event read
/// it replaced; decoding the arrays here costs about what decoding rows
/// did.
pub(crate) const RUN_COLUMNS: &str = "e.first_position, e.stream, e.first_version, e.event_type, e.recorded_at, e.ids, e.content_types, e.data, e.metadata::text[]";

/// The first position of the run holding position `param` (or 0): reads
/// from a position start at that run (runs never overlap, so it is the
/// last run starting at or before it; one step of the primary key).
fn run_at_position(s: &str, param: &str) -> String {
    format!("coalesce((SELECT max(r.first_position) FROM {s}.runs r WHERE r.first_position <= {param}), 0)")
}

/// The first version of the run of stream `stream` holding version
/// `param` (or 0), by the stream+version index.
fn run_at_version(s: &str, stream: &str, param: &str) -> String {
    format!(
        "coalesce((SELECT max(r.first_version) FROM {s}.runs r
                    WHERE r.stream = {stream} AND r.first_version <= {param}), 0)"
    )
}

/// Where a forward `$all` page carries the head: after the run columns.
pub(crate) const ALL_PAGE_HEAD_COLUMN: usize = 9;

/// Statements of one store.
#[derive(Debug)]
pub(crate) struct Statements {
    /// Quoted schema name.
    pub schema: String,
    /// The schema name as given: the `schema` label of the crate's metrics.
    pub name: String,
    /// NOTIFY channel carrying the log's next position.
    pub channel: String,
    /// Takes the head row lock without moving the head: every writer of
    /// stream rows holds it first (migration 0003, ADR 02).
    pub lock_head: String,
    /// Exact path and deletes, after the head lock: creates the rows of
    /// streams that have none (`$1` names, `$2` categories); rolled back
    /// with the transaction when nothing is written.
    pub ensure_streams: String,
    /// Exact path and deletes, after `ensure_streams`: the state of each
    /// stream in `$1`, from its row and its last run (migration 0011).
    pub read_streams: String,
    pub tail_ids: String,
    /// After a connection broke mid-append: the events among `$2` (ids) at
    /// or after position `$1`, to learn whether the attempt committed.
    pub find_written: String,
    /// After [`Statements::find_written`] found a request committed: the
    /// last `$3` events of stream `$1` before position `$2` (newest first)
    /// as (id, version, position), to answer its parts that were
    /// idempotent re-sends and so wrote nothing.
    pub tail_before: String,
    pub write: String,
    /// The common case of a round of several parts, selected in an implicit
    /// transaction (migrations 0003 and 0006).
    pub append_fast: String,
    /// The common case of a round of one part (migration 0006).
    pub append_part: String,
    pub stream_state: String,
    /// A page of streams by name (byte order), for `list_streams`.
    pub list_streams: String,
    pub read_stream_forward: String,
    pub read_stream_backward: String,
    pub soft_delete: String,
    pub hard_delete: String,
    pub head: String,
    /// Events per type, for `store_stats`.
    pub events_by_type: String,
    /// Bytes of the schema's tables, for `store_stats`: `$1` schema name.
    pub disk_bytes: String,
    pub save_snapshot: String,
    pub load_snapshot: String,
    pub prune_snapshots: String,
    pub load_checkpoint: String,
    pub save_checkpoint: String,
    pub lock_checkpoint: String,
    /// On a lease's connection, right after taking its lock: `$1` name,
    /// `$2` holder description (migration 0007).
    pub publish_lease_holder: String,
    /// The published holder of a lease, if that holder's backend still
    /// holds the lease's lock: `$1` name, `$2` lock class, `$3` lock key.
    pub lease_holder: String,
}

impl Statements {
    pub(crate) fn new(schema: &str) -> Self {
        let s = quote_ident(schema);
        Statements {
            channel: channel_name(schema),
            // The row only (migration 0008): no new version for an old
            // snapshot to pin.
            lock_head: format!("SELECT 1 FROM {s}.head_row FOR NO KEY UPDATE"),
            // Nothing changes an existing row (migration 0011): an old
            // snapshot pins no row version of a hot stream.
            ensure_streams: format!(
                "INSERT INTO {s}.stream_rows (name, category)
                 SELECT * FROM unnest($1::text[], $2::text[])
                 ON CONFLICT (name) DO NOTHING"
            ),
            // Not locked: every writer of runs and stream rows holds the
            // head lock, taken before this statement (its snapshot is newer
            // than every commit that held the head before).
            read_streams: format!(
                "SELECT st.name, t.last_version, t.last_position, st.truncate_before, st.tombstoned, t.last_event_id
                   FROM unnest($1::text[]) AS p(name)
                   JOIN {s}.stream_rows st ON st.name = p.name
                   LEFT JOIN LATERAL (SELECT e.first_version + e.n - 1 AS last_version,
                                             e.first_position + e.n - 1 AS last_position,
                                             e.ids[e.n] AS last_event_id
                                        FROM {s}.runs e
                                       WHERE e.stream = st.name
                                       ORDER BY e.first_version DESC LIMIT 1) t ON true"
            ),
            tail_ids: format!(
                "SELECT u.id, e.first_position + u.o - 1 FROM {s}.runs e
                 CROSS JOIN LATERAL unnest(e.ids) WITH ORDINALITY AS u(id, o)
                 WHERE e.stream = $1 AND e.first_version >= {from} AND e.first_version + u.o - 1 >= $2
                 ORDER BY e.first_version, u.o",
                from = run_at_version(&s, "$1", "$2")
            ),
            // At most `$3` runs hold the last `$3` events (a run holds one
            // or more), found by a backward step of runs_stream_version.
            tail_before: format!(
                "SELECT u.id, e.first_version + u.o - 1, e.first_position + u.o - 1
                   FROM (SELECT r.* FROM {s}.runs r WHERE r.stream = $1 AND r.first_position < $2
                          ORDER BY r.first_version DESC LIMIT $3) e
                  CROSS JOIN LATERAL unnest(e.ids) WITH ORDINALITY AS u(id, o)
                  ORDER BY e.first_version DESC, u.o DESC LIMIT $3"
            ),
            // One statement, after the head lock and `ensure_streams`: insert
            // the events at consecutive positions and queue the notification
            // (sent on commit). Stream rows are not touched (migration 0011).
            write: format!(
                "WITH h AS (
                    SELECT greatest(r.next_position, coalesce(t.next, 0)) AS first,
                           greatest(date_trunc('microseconds', clock_timestamp()), r.recorded_at, t.recorded_at)
                               AS recorded_at
                    FROM {s}.head_row r
                    LEFT JOIN LATERAL (SELECT e.first_position + e.n AS next, e.recorded_at FROM {s}.runs e
                                        ORDER BY e.first_position DESC LIMIT 1) t ON true
                 ), ins AS (
                    INSERT INTO {s}.runs (first_position, stream, first_version, n, event_type, category,
                                          correlation_id, recorded_at, ids, content_types, data, metadata)
                    SELECT h.first + r.off - 1, r.stream, r.version, r.cnt, r.typ, r.cat, r.corr, h.recorded_at,
                           ($9::uuid[])[r.off:r.off + r.cnt - 1], ($10::int2[])[r.off:r.off + r.cnt - 1],
                           ($11::bytea[])[r.off:r.off + r.cnt - 1], ($12::text[])[r.off:r.off + r.cnt - 1]::json[]
                    FROM h, unnest($2::text[], $3::int8[], $4::int4[], $5::int4[], $6::text[], $7::text[],
                                   $8::text[])
                         AS r(stream, version, off, cnt, typ, cat, corr)
                 )
                 SELECT h.first, h.recorded_at, pg_notify($13, (h.first + $1)::text) FROM h"
            ),
            publish_lease_holder: format!(
                "INSERT INTO {s}.lease_holders (name, holder, pid, taken_at)
                 VALUES ($1, $2, pg_backend_pid(), now())
                 ON CONFLICT (name) DO UPDATE
                    SET holder = excluded.holder, pid = excluded.pid, taken_at = excluded.taken_at"
            ),
            // pg_locks shows a two-key advisory lock as classid = first
            // key, objid = second key (as an unsigned oid), objsubid = 2.
            lease_holder: format!(
                "SELECT h.holder FROM {s}.lease_holders h
                 WHERE h.name = $1
                   AND EXISTS (SELECT 1 FROM pg_locks l
                               WHERE l.locktype = 'advisory' AND l.granted AND l.pid = h.pid
                                 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                                 AND l.classid = $2::int8::oid
                                 AND l.objid = (hashtext($3)::int8 & 4294967295)::oid
                                 AND l.objsubid = 2)"
            ),
            // A range of the primary key from a position the attempt cannot
            // precede: only events committed since are looked at.
            find_written: format!(
                "SELECT e.stream, u.id, e.first_version + u.o - 1, e.first_position + u.o - 1 FROM {s}.runs e
                 CROSS JOIN LATERAL unnest(e.ids) WITH ORDINALITY AS u(id, o)
                 WHERE e.first_position >= {from} AND e.first_position + u.o - 1 >= $1 AND u.id = ANY($2)
                 ORDER BY e.first_position, u.o",
                from = run_at_position(&s, "$1")
            ),
            append_fast: format!(
                "SELECT first_position, first_versions FROM {s}.append_head_first(
                     $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)"
            ),
            append_part: format!(
                "SELECT first_position, first_version FROM {s}.append_part(
                     $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
            ),
            stream_state: format!(
                "SELECT last_version, last_position, truncate_before, tombstoned FROM {s}.streams WHERE name = $1"
            ),
            // Byte order (COLLATE "C", index streams_name_bytes from 0005),
            // whatever the database's collation. $1 prefix or NULL, $2 after
            // or NULL, $3 include system streams, $4 limit.
            list_streams: format!(
                "SELECT name, last_version, last_position, truncate_before, tombstoned FROM {s}.streams
                 WHERE last_version IS NOT NULL
                   AND ($1::text IS NULL OR (name COLLATE \"C\") >= $1::text AND starts_with(name, $1::text))
                   AND ($2::text IS NULL OR (name COLLATE \"C\") > $2::text)
                   AND ($3::bool OR NOT starts_with(name, '$'))
                 ORDER BY name COLLATE \"C\" LIMIT $4"
            ),
            // $1 stream, $2 from version, $3 limit: the runs holding
            // versions $2 .. $2 + $3 - 1 (a stream's versions are dense).
            read_stream_forward: format!(
                "SELECT {RUN_COLUMNS} FROM {s}.runs e
                 WHERE e.stream = $1 AND e.first_version >= {from}
                   AND e.first_version < least($2::int8, 9223372036854775807 - $3::int8) + $3::int8
                 ORDER BY e.first_version",
                from = run_at_version(&s, "$1", "$2")
            ),
            // $1 stream, $2 from version (the highest), $3 lowest version,
            // $4 limit: the runs holding versions greatest($3, $2 - $4 + 1)
            // .. $2.
            read_stream_backward: format!(
                "SELECT {RUN_COLUMNS} FROM {s}.runs e
                 WHERE e.stream = $1 AND e.first_version <= $2::int8 AND e.first_version >= {lowest}
                 ORDER BY e.first_version DESC",
                lowest = run_at_version(&s, "$1", "greatest($3::int8, $2::int8 - $4::int8 + 1)")
            ),
            soft_delete: format!("UPDATE {s}.stream_rows SET truncate_before = $2 WHERE name = $1"),
            hard_delete: format!("UPDATE {s}.stream_rows SET tombstoned = true WHERE name = $1"),
            // A view since migration 0008: one past the last event.
            head: format!("SELECT next_position FROM {s}.head"),
            // One aggregate over every run (system streams and deleted
            // streams included: deletes only mark the stream row, so this
            // is what a full `$all` scan counts), summing their event
            // counts. Its cost is O(runs) in PostgreSQL (a scan of the
            // table feeding a group aggregate); it saves shipping every
            // event to the server, not the reading.
            events_by_type: format!(
                "SELECT event_type, sum(n)::int8 FROM {s}.runs GROUP BY event_type ORDER BY event_type"
            ),
            // Tables with their indexes and TOAST data (catalogue lookups,
            // no table is read).
            disk_bytes: "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0)::int8
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = $1 AND c.relkind IN ('r', 'p', 'm')"
                .to_owned(),
            save_snapshot: format!(
                "INSERT INTO {s}.snapshots (stream, version, schema_version, data, created_at)
                 VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (stream, version) DO UPDATE
                 SET schema_version = excluded.schema_version, data = excluded.data,
                     created_at = excluded.created_at"
            ),
            load_snapshot: format!(
                "SELECT stream, version, schema_version, data, created_at FROM {s}.snapshots
                 WHERE stream = $1 AND version <= $2 ORDER BY version DESC LIMIT 1"
            ),
            prune_snapshots: format!(
                "DELETE FROM {s}.snapshots WHERE stream = $1 AND version NOT IN (
                     SELECT version FROM {s}.snapshots WHERE stream = $1 ORDER BY version DESC LIMIT $2)"
            ),
            // The latest save: one backward step of checkpoint_saves' key
            // (migration 0012), whatever dead saves an old snapshot keeps.
            load_checkpoint: format!(
                "SELECT position FROM {s}.checkpoint_saves WHERE name = $1 ORDER BY seq DESC LIMIT 1"
            ),
            // Inside a READ COMMITTED transaction (0012): takes the name's
            // lock and replaces its latest save.
            save_checkpoint: format!("SELECT {s}.save_checkpoint($1, $2)"),
            // Likewise: takes the name's lock, then reads its latest save.
            lock_checkpoint: format!("SELECT last_position FROM {s}.lock_checkpoint($1)"),
            schema: s,
            name: schema.to_owned(),
        }
    }

    /// A forward `$all` page plus the head in the same snapshot (so `next`
    /// is exact): `$1` from, `$2` limit, filter parameters from `$3`. The
    /// runs come with a NULL last column; one more row, all NULL but the
    /// last column, carries the head. Only the runs the page needs: the
    /// window counts the events at or after `$1` in the runs so far (every
    /// filter is on run columns, so a matching run's events all match), and
    /// a run is taken while fewer than `$2` came before it. At most `$2 + 1`
    /// runs are looked at (each has an event, but the first may hold only
    /// earlier ones). (The head used to be joined to the
    /// page with a `LEFT JOIN LATERAL` and the page re-sorted: `EXPLAIN
    /// ANALYZE` of a 1,000-event page took 3.1 ms that way and 1.15 ms
    /// like this.)
    pub(crate) fn read_all_forward(&self, filter: &str) -> String {
        let s = &self.schema;
        self.with_head(&format!(
            "SELECT {RUN_COLUMNS}, NULL::int8 FROM (
                  SELECT e.*, greatest(0, e.n - greatest(0, $1::int8 - e.first_position))::int8 AS mine,
                         sum(greatest(0, e.n - greatest(0, $1::int8 - e.first_position)))
                             OVER (ORDER BY e.first_position ROWS UNBOUNDED PRECEDING)::int8 AS upto
                    FROM {s}.runs e
                   WHERE e.first_position >= {from} {filter}
                   ORDER BY e.first_position LIMIT $2::int8 + 1) e
              WHERE e.upto - e.mine < $2::int8
              ORDER BY e.first_position",
            from = run_at_position(s, "$1")
        ))
    }

    /// `page` (run rows with a NULL last column) followed by one row, all
    /// NULL but the last column, carrying the head: one statement, so one
    /// snapshot for both.
    fn with_head(&self, page: &str) -> String {
        let nulls = ["NULL"; ALL_PAGE_HEAD_COLUMN].join(", ");
        format!("({page}) UNION ALL SELECT {nulls}, next_position FROM {}.head", self.schema)
    }

    /// A forward `$all` page read as the position range `$1 .. $1 + $2`
    /// (positions are dense: with a filter that selects everything, exactly
    /// the page), plus the head, like [`Statements::read_all_forward`]; no
    /// counting. With `$1` inside a run, that run is included.
    pub(crate) fn read_all_forward_range(&self, filter: &str) -> String {
        let s = &self.schema;
        self.with_head(&format!(
            "SELECT {RUN_COLUMNS}, NULL::int8 FROM {s}.runs e
              WHERE e.first_position >= {from}
                AND e.first_position < least($1::int8, 9223372036854775807 - $2::int8) + $2::int8 {filter}
              ORDER BY e.first_position",
            from = run_at_position(s, "$1")
        ))
    }

    /// A backward `$all` page read as the position range `$1 - $2 + 1 ..
    /// $1`, newest first (see [`Statements::read_all_forward_range`]).
    pub(crate) fn read_all_backward_range(&self, filter: &str) -> String {
        let s = &self.schema;
        format!(
            "SELECT {RUN_COLUMNS} FROM {s}.runs e
             WHERE e.first_position <= $1::int8 AND e.first_position >= {from} {filter}
             ORDER BY e.first_position DESC",
            from = run_at_position(s, "greatest(0, $1::int8 - $2::int8 + 1)")
        )
    }

    /// A backward `$all` page: `$1` from (inclusive), `$2` limit, filter
    /// parameters from `$3`. The runs it needs, newest first, counted as
    /// in [`Statements::read_all_forward`].
    pub(crate) fn read_all_backward(&self, filter: &str) -> String {
        let s = &self.schema;
        format!(
            "SELECT {RUN_COLUMNS} FROM (
                 SELECT e.*, (least(e.n - 1, $1::int8 - e.first_position) + 1)::int8 AS mine,
                        sum((least(e.n - 1, $1::int8 - e.first_position) + 1))
                            OVER (ORDER BY e.first_position DESC ROWS UNBOUNDED PRECEDING)::int8 AS upto
                   FROM {s}.runs e
                  WHERE e.first_position <= $1::int8 {filter}
                  ORDER BY e.first_position DESC LIMIT $2::int8) e
             WHERE e.upto - e.mine < $2::int8
             ORDER BY e.first_position DESC"
        )
    }
}

/// The NOTIFY channel of a schema (schema names are at most 56 bytes, so
/// this stays under PostgreSQL's 63-byte identifier limit).
pub(crate) fn channel_name(schema: &str) -> String {
    format!("{schema}_head")
}

/// A boxed SQL parameter.
pub(crate) type Param = Box<dyn ToSql + Sync + Send>;

/// Translates a filter into ` AND …` conditions on alias `e`, with
/// parameters numbered from `first_param`. Selects exactly the events for
/// which [`Filter::matches`] is true.
pub(crate) fn filter_clause(filter: &Filter, first_param: usize) -> (String, Vec<Param>) {
    let mut sql = String::new();
    let mut params: Vec<Param> = Vec::new();
    let next = |params: &mut Vec<Param>, p: Param| {
        params.push(p);
        first_param + params.len() - 1
    };
    if !filter.include_system {
        sql.push_str(" AND NOT starts_with(e.stream, '$')");
    }
    if let Some(prefix) = &filter.stream_prefix {
        let n = next(&mut params, Box::new(prefix.clone()));
        sql.push_str(&format!(" AND starts_with(e.stream, ${n})"));
    }
    if let Some(category) = &filter.category {
        let n = next(&mut params, Box::new(category.clone()));
        sql.push_str(&format!(" AND e.category = ${n}"));
    }
    if !filter.event_types.is_empty() {
        let mut exact = Vec::new();
        let mut prefixes = Vec::new();
        for t in &filter.event_types {
            match t {
                TypeMatch::Exact(x) => exact.push(x.clone()),
                TypeMatch::Prefix(p) => prefixes.push(p.clone()),
            }
        }
        let e = next(&mut params, Box::new(exact));
        let p = next(&mut params, Box::new(prefixes));
        sql.push_str(&format!(
            " AND (e.event_type = ANY(${e}::text[])
                   OR EXISTS (SELECT 1 FROM unnest(${p}::text[]) p WHERE starts_with(e.event_type, p)))"
        ));
    }
    if let Some(cid) = &filter.correlation_id {
        let n = next(&mut params, Box::new(cid.clone()));
        sql.push_str(&format!(" AND e.correlation_id = ${n}"));
    }
    if let Some(after) = filter.recorded_after {
        let n = next(&mut params, Box::new(PgTimestamp(after)));
        sql.push_str(&format!(" AND e.recorded_at >= ${n}"));
    }
    if let Some(before) = filter.recorded_before {
        let n = next(&mut params, Box::new(PgTimestamp(before)));
        sql.push_str(&format!(" AND e.recorded_at < ${n}"));
    }
    (sql, params)
}

#[cfg(test)]
mod tests {
    use annals_core::Timestamp;

    use super::*;

    #[test]
    fn filter_parameters_are_numbered_from_the_given_index() {
        let (sql, params) = filter_clause(&Filter::all(), 3);
        assert_eq!(sql, " AND NOT starts_with(e.stream, '$')");
        assert!(params.is_empty());

        let filter = Filter {
            stream_prefix: Some("acc".into()),
            category: Some("account".into()),
            event_types: vec![TypeMatch::Exact("A".into()), TypeMatch::Prefix("B".into())],
            correlation_id: Some("c".into()),
            recorded_after: Some(Timestamp::from_micros(1)),
            recorded_before: Some(Timestamp::from_micros(2)),
            include_system: true,
        };
        let (sql, params) = filter_clause(&filter, 3);
        assert_eq!(params.len(), 7);
        for n in 3..=9 {
            assert!(sql.contains(&format!("${n}")), "{sql} lacks ${n}");
        }
        assert!(!sql.contains("$10") && !sql.contains("'$'"), "{sql}");
    }

    #[test]
    fn the_head_column_follows_the_event_columns() {
        assert_eq!(RUN_COLUMNS.split(',').count(), ALL_PAGE_HEAD_COLUMN);
        for sql in
            [Statements::new("s").read_all_forward(""), Statements::new("s").read_all_forward_range("")]
        {
            assert_eq!(sql.matches("NULL").count(), ALL_PAGE_HEAD_COLUMN + 1, "{sql}");
        }
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("annals"), "\"annals\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
