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

/// The columns every event read selects, in [`crate::row::event_from_row_cached`]
/// order.
pub(crate) const EVENT_COLUMNS: &str = "e.position, e.stream, e.version, e.id, e.event_type, e.content_type, e.data, e.metadata::text, e.recorded_at";

/// Where a forward `$all` page carries the head: after the event columns.
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
    pub lock_streams: String,
    pub tail_ids: String,
    /// After a connection broke mid-append: the events among `$2` (ids) at
    /// or after position `$1`, to learn whether the attempt committed.
    pub find_written: String,
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
            // Exact path and deletes, after the head lock: creates the row
            // of a new stream (the write statement updates it) and returns
            // the state. `name = name` makes ON CONFLICT lock and return the
            // existing row.
            // The row only (migration 0008): no new version for an old
            // snapshot to pin.
            lock_head: format!("SELECT 1 FROM {s}.head_row FOR NO KEY UPDATE"),
            lock_streams: format!(
                "INSERT INTO {s}.streams AS st (name, category)
                 SELECT * FROM unnest($1::text[], $2::text[])
                 ON CONFLICT (name) DO UPDATE SET name = excluded.name
                 RETURNING st.name, st.last_version, st.last_position, st.truncate_before, st.tombstoned,
                           st.last_event_id"
            ),
            tail_ids: format!(
                "SELECT id, position FROM {s}.events WHERE stream = $1 AND version >= $2 ORDER BY version"
            ),
            // One statement: take the head (the global lock that orders
            // commits), insert the events at consecutive positions, advance
            // the streams, and queue the notification (sent on commit).
            write: format!(
                "WITH h AS (
                    SELECT greatest(r.next_position, coalesce(t.position + 1, 0)) AS first,
                           greatest(date_trunc('microseconds', clock_timestamp()), r.recorded_at, t.recorded_at)
                               AS recorded_at
                    FROM {s}.head_row r
                    LEFT JOIN LATERAL (SELECT e.position, e.recorded_at FROM {s}.events e
                                        ORDER BY e.position DESC LIMIT 1) t ON true
                 ), ins AS (
                    INSERT INTO {s}.events (position, stream, version, id, event_type, category, content_type,
                                            data, metadata, correlation_id, recorded_at)
                    SELECT h.first + e.ord - 1, e.stream, e.version, e.id, e.event_type, e.category,
                           e.content_type, e.data, e.metadata::json, e.correlation_id, h.recorded_at
                    FROM h, unnest($2::text[], $3::int8[], $4::uuid[], $5::text[], $6::text[], $7::int2[],
                                   $8::bytea[], $9::text[], $10::text[])
                         WITH ORDINALITY AS e(stream, version, id, event_type, category, content_type, data,
                                              metadata, correlation_id, ord)
                 ), upd AS (
                    UPDATE {s}.streams st SET last_version = u.last_version,
                                             last_position = h.first + u.last_offset,
                                             last_event_id = u.last_id
                    FROM h, unnest($11::text[], $12::int8[], $13::int8[], $14::uuid[])
                         AS u(name, last_version, last_offset, last_id)
                    WHERE st.name = u.name
                 )
                 SELECT h.first, h.recorded_at, pg_notify($15, (h.first + $1)::text) FROM h"
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
                "SELECT stream, id, version, position FROM {s}.events
                 WHERE position >= $1 AND id = ANY($2) ORDER BY position"
            ),
            append_fast: format!(
                "SELECT first_position, first_versions FROM {s}.append_head_first(
                     $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)"
            ),
            append_part: format!(
                "SELECT first_position, first_version FROM {s}.append_part(
                     $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
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
            read_stream_forward: format!(
                "SELECT {EVENT_COLUMNS} FROM {s}.events e
                 WHERE e.stream = $1 AND e.version >= $2 ORDER BY e.version LIMIT $3"
            ),
            read_stream_backward: format!(
                "SELECT {EVENT_COLUMNS} FROM {s}.events e
                 WHERE e.stream = $1 AND e.version <= $2 AND e.version >= $3 ORDER BY e.version DESC LIMIT $4"
            ),
            soft_delete: format!("UPDATE {s}.streams SET truncate_before = $2 WHERE name = $1"),
            hard_delete: format!("UPDATE {s}.streams SET tombstoned = true WHERE name = $1"),
            // A view since migration 0008: one past the last event.
            head: format!("SELECT next_position FROM {s}.head"),
            // One aggregate over every row of `events` (system streams and
            // deleted streams included: deletes only mark the stream row,
            // so this is what a full `$all` scan counts). Its cost is
            // O(events) in PostgreSQL: at best an index-only scan of
            // `events_type (event_type, position)` feeding a group
            // aggregate, which reads every index entry (and heap pages not
            // yet all-visible); at worst a sequential scan of the table. It
            // saves shipping every event to the server, not the reading.
            events_by_type: format!(
                "SELECT event_type, count(*) FROM {s}.events GROUP BY event_type ORDER BY event_type"
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
            load_checkpoint: format!("SELECT position FROM {s}.checkpoints WHERE name = $1"),
            save_checkpoint: format!(
                "INSERT INTO {s}.checkpoints (name, position, updated_at) VALUES ($1, $2, now())
                 ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at = now()"
            ),
            lock_checkpoint: format!(
                "INSERT INTO {s}.checkpoints AS c (name) VALUES ($1)
                 ON CONFLICT (name) DO UPDATE SET name = excluded.name
                 RETURNING c.position"
            ),
            schema: s,
            name: schema.to_owned(),
        }
    }

    /// A forward `$all` page plus the head in the same snapshot (so `next`
    /// is exact): `$1` from, `$2` limit, filter parameters from `$3`. The
    /// events come with a NULL last column; one more row, all NULL but the
    /// last column, carries the head. (The head used to be joined to the
    /// page with a `LEFT JOIN LATERAL` and the page re-sorted: `EXPLAIN
    /// ANALYZE` of a 1,000-event page took 3.1 ms that way and 1.15 ms
    /// like this.)
    pub(crate) fn read_all_forward(&self, filter: &str) -> String {
        let s = &self.schema;
        let nulls = ["NULL"; ALL_PAGE_HEAD_COLUMN].join(", ");
        format!(
            "(SELECT {EVENT_COLUMNS}, NULL::int8 FROM {s}.events e
              WHERE e.position >= $1 {filter} ORDER BY e.position LIMIT $2)
             UNION ALL
             SELECT {nulls}, next_position FROM {s}.head"
        )
    }

    /// A backward `$all` page: `$1` from (inclusive), `$2` limit, filter
    /// parameters from `$3`.
    pub(crate) fn read_all_backward(&self, filter: &str) -> String {
        let s = &self.schema;
        format!(
            "SELECT {EVENT_COLUMNS} FROM {s}.events e WHERE e.position <= $1 {filter}
             ORDER BY e.position DESC LIMIT $2"
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
        assert_eq!(EVENT_COLUMNS.split(',').count(), ALL_PAGE_HEAD_COLUMN);
        let sql = Statements::new("s").read_all_forward("");
        assert_eq!(sql.matches("NULL").count(), ALL_PAGE_HEAD_COLUMN + 1, "{sql}");
    }

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("annals"), "\"annals\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
    }
}
