-- Annals PostgreSQL schema, version 9: events are stored in runs (issue 4).
-- `{schema}` is replaced by the store's (quoted) schema name.
--
-- A run is one row holding consecutive events of one append to one stream
-- that share their event type and correlation id (at most 100 events and
-- about 64 KiB of data: the writer splits longer ones). Per event it keeps
-- the id, content type, data and metadata in arrays; everything the
-- indexes need (position, stream and version, type, category, correlation
-- id, recorded_at) is the same for the whole run and is stored once. So a
-- batch of 100 events of one type is one heap row and one entry in each
-- b-tree instead of 100; a single event is one row as before.
--
-- Why: with a row per event, every event fed four b-trees (position,
-- stream+version, type, category) and batches of 100 ran at about half the
-- rate of a plain 100-row INSERT into a table with only a primary key
-- (ADR 02). Reads keep ordered b-tree scans for every filter, because the
-- filtered columns are the run's own.
--
-- Invariants (readers rely on them):
-- - runs tile the log: a run covers positions first_position ..
--   first_position + n - 1, the next run starts right after it, no gaps;
-- - within a stream, a run covers versions first_version ..
--   first_version + n - 1, runs of a stream never overlap;
-- - the i-th element (1-based) of each array is the event at position
--   first_position + i - 1 and version first_version + i - 1.
--
-- Upgrading: this migration rewrites every event (one run per existing
-- event, in one transaction) and removes the functions and the table that
-- processes of earlier versions write through. Stop every process of an
-- earlier version before starting this one: until then their appends fail
-- with an error (undefined function, or "cannot insert into view") and
-- write nothing; their reads go through the `events` view below and stay
-- correct, but scan the whole log.

CREATE TABLE {schema}.runs (
    first_position bigint PRIMARY KEY,
    stream         text NOT NULL,
    first_version  bigint NOT NULL,
    n              int NOT NULL,
    event_type     text NOT NULL,
    category       text NOT NULL,
    correlation_id text,
    recorded_at    timestamptz NOT NULL,
    ids            uuid[] NOT NULL,
    -- annals_core::ContentType::code, per event.
    content_types  int2[] NOT NULL,
    data           bytea[] NOT NULL,
    -- json, not jsonb: kept byte for byte, per event.
    metadata       json[] NOT NULL,
    CONSTRAINT runs_stream_version UNIQUE (stream, first_version),
    CONSTRAINT runs_arrays CHECK (
        n > 0 AND cardinality(ids) = n AND cardinality(content_types) = n
        AND cardinality(data) = n AND cardinality(metadata) = n)
);

INSERT INTO {schema}.runs (first_position, stream, first_version, n, event_type, category, correlation_id,
                           recorded_at, ids, content_types, data, metadata)
SELECT position, stream, version, 1, event_type, category, correlation_id, recorded_at,
       ARRAY[id], ARRAY[content_type], ARRAY[data], ARRAY[metadata]
  FROM {schema}.events
 ORDER BY position;

CREATE INDEX runs_type ON {schema}.runs (event_type, first_position);
CREATE INDEX runs_category ON {schema}.runs (category, first_position);
CREATE INDEX runs_correlation ON {schema}.runs (correlation_id, first_position)
    WHERE correlation_id IS NOT NULL;
-- recorded_at grows with position (ADR 02): see 0003.
CREATE INDEX runs_recorded_at ON {schema}.runs USING brin (recorded_at)
    WITH (pages_per_range = 32, autosummarize = on);

-- The head as readers see it: after the last run.
CREATE OR REPLACE VIEW {schema}.head AS
SELECT r.id,
       greatest(r.next_position,
                coalesce((SELECT e.first_position + e.n FROM {schema}.runs e
                           ORDER BY e.first_position DESC LIMIT 1), 0))
           AS next_position,
       greatest(r.recorded_at,
                coalesce((SELECT e.recorded_at FROM {schema}.runs e ORDER BY e.first_position DESC LIMIT 1),
                         '-infinity'))
           AS recorded_at
  FROM {schema}.head_row r;

-- What earlier versions write through.
DROP PROCEDURE {schema}.append_commit;
DROP FUNCTION {schema}.append_fast;
DROP FUNCTION {schema}.append_head_first;
DROP FUNCTION {schema}.append_part;
DROP TABLE {schema}.events;

-- One row per event, for ad-hoc SQL (and the reads of processes of earlier
-- versions until they stop). Filters on run columns (stream, event_type,
-- category, correlation_id, recorded_at) reach the runs' indexes; a filter
-- on position or version is applied after unnesting. Not insertable.
CREATE VIEW {schema}.events AS
SELECT e.first_position + u.o - 1 AS position, e.stream, e.first_version + u.o - 1 AS version, u.id,
       e.event_type, e.category, u.content_type, u.data, u.metadata, e.correlation_id, e.recorded_at
  FROM {schema}.runs e
 CROSS JOIN LATERAL unnest(e.ids, e.content_types, e.data, e.metadata)
           WITH ORDINALITY AS u(id, content_type, data, metadata, o);

CREATE FUNCTION {schema}.append_part(
    -- The stream, its category, the expectation (0 any, 1 no stream,
    -- 2 stream exists, 3 exact) and the exact version.
    p_stream        text,
    p_category      text,
    p_kind          int2,
    p_version       int8,
    -- Per run, in order: offset of its first event in the event arrays
    -- (1-based), its event count, type and correlation id.
    run_offs        int4[],
    run_counts      int4[],
    run_types       text[],
    run_corrs       text[],
    -- Per event, in order.
    ev_ids          uuid[],
    ev_content      int2[],
    ev_data         bytea[],
    ev_metadata     text[],
    channel         text,
    -- Results: position and version of the first event.
    OUT first_position bigint,
    OUT first_version bigint
) LANGUAGE plpgsql
-- Generic plans: see 0002.
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    n bigint := cardinality(ev_ids);
    last_id uuid := ev_ids[cardinality(ev_ids)];
    recorded timestamptz;
BEGIN
    -- See 0006 and 0008: READ COMMITTED only, else the exact path.
    IF n IS NULL OR n = 0 OR current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'annals: append needs the exact path' USING ERRCODE = 'AN001';
    END IF;

    -- The head first (ADR 02), locked, not updated (0008); then, in a new
    -- statement, the next position follows the last run.
    PERFORM 1 FROM {schema}.head_row FOR NO KEY UPDATE;
    SELECT greatest(r.next_position, coalesce(t.next, 0)),
           greatest(date_trunc('microseconds', clock_timestamp()), r.recorded_at, t.recorded_at)
      INTO first_position, recorded
      FROM {schema}.head_row r
      LEFT JOIN LATERAL (SELECT e.first_position + e.n AS next, e.recorded_at FROM {schema}.runs e
                          ORDER BY e.first_position DESC LIMIT 1) t ON true;

    -- A plain write, as in 0006/0008; anything else steps aside.
    UPDATE {schema}.streams st
       SET last_version = coalesce(st.last_version, -1) + n,
           last_position = first_position + n - 1,
           last_event_id = last_id
     WHERE st.name = p_stream
       AND NOT st.tombstoned
       AND st.last_event_id IS DISTINCT FROM last_id
       AND CASE p_kind
               WHEN 0 THEN true
               WHEN 1 THEN NOT coalesce(st.last_version >= st.truncate_before, false)
               WHEN 2 THEN coalesce(st.last_version >= st.truncate_before, false)
               WHEN 3 THEN st.last_version >= st.truncate_before AND st.last_version = p_version
               ELSE false
           END
    RETURNING st.last_version - n + 1 INTO first_version;
    IF NOT FOUND THEN
        IF p_kind NOT IN (0, 1) THEN
            RAISE EXCEPTION 'annals: append needs the exact path' USING ERRCODE = 'AN001';
        END IF;
        INSERT INTO {schema}.streams (name, category, last_version, last_position, last_event_id)
        VALUES (p_stream, p_category, n - 1, first_position + n - 1, last_id)
        ON CONFLICT (name) DO NOTHING;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'annals: append needs the exact path' USING ERRCODE = 'AN001';
        END IF;
        first_version := 0;
    END IF;

    INSERT INTO {schema}.runs (first_position, stream, first_version, n, event_type, category, correlation_id,
                               recorded_at, ids, content_types, data, metadata)
    SELECT first_position + r.off - 1, p_stream, first_version + r.off - 1, r.cnt, r.typ, p_category, r.corr,
           recorded, ev_ids[r.off:r.off + r.cnt - 1], ev_content[r.off:r.off + r.cnt - 1],
           ev_data[r.off:r.off + r.cnt - 1], ev_metadata[r.off:r.off + r.cnt - 1]::json[]
      FROM unnest(run_offs, run_counts, run_types, run_corrs) AS r(off, cnt, typ, corr);

    PERFORM pg_notify(channel, (first_position + n)::text);
END
$fn$;

CREATE FUNCTION {schema}.append_head_first(
    -- Per part, in request order (streams distinct): stream, category,
    -- expectation, exact version, event count, offset of its last event in
    -- the event arrays (0-based), its last event id.
    part_streams    text[],
    part_categories text[],
    part_kinds      int2[],
    part_versions   int8[],
    part_counts     int8[],
    part_last_offs  int8[],
    part_last_ids   uuid[],
    -- Per run, in order: its part (1-based), offset of its first event in
    -- the event arrays (1-based), offset of its first event within the
    -- part (0-based: its version is the part's first version plus this),
    -- count, type, correlation id.
    run_parts       int4[],
    run_offs        int4[],
    run_voffs       int8[],
    run_counts      int4[],
    run_types       text[],
    run_corrs       text[],
    -- Per event, in order.
    ev_ids          uuid[],
    ev_content      int2[],
    ev_data         bytea[],
    ev_metadata     text[],
    channel         text,
    OUT first_position bigint,
    OUT first_versions bigint[]
) LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    total bigint := cardinality(ev_ids);
    stepped_aside boolean;
    recorded timestamptz;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'annals: append needs the exact path' USING ERRCODE = 'AN001';
    END IF;

    PERFORM 1 FROM {schema}.head_row FOR NO KEY UPDATE;
    SELECT greatest(r.next_position, coalesce(t.next, 0)),
           greatest(date_trunc('microseconds', clock_timestamp()), r.recorded_at, t.recorded_at)
      INTO first_position, recorded
      FROM {schema}.head_row r
      LEFT JOIN LATERAL (SELECT e.first_position + e.n AS next, e.recorded_at FROM {schema}.runs e
                          ORDER BY e.first_position DESC LIMIT 1) t ON true;

    SELECT bool_or(coalesce(st.tombstoned, false)
                   OR coalesce(st.last_event_id = p.last_id, false)
                   OR NOT CASE p.kind
                       WHEN 0 THEN true
                       WHEN 1 THEN v.visible IS NULL
                       WHEN 2 THEN v.visible IS NOT NULL
                       WHEN 3 THEN v.visible IS NOT NULL AND v.visible = p.version
                       ELSE false
                   END),
           array_agg(coalesce(st.last_version + 1, 0) ORDER BY p.ord)
      INTO stepped_aside, first_versions
      FROM unnest(part_streams, part_kinds, part_versions, part_last_ids) WITH ORDINALITY
               AS p(name, kind, version, last_id, ord)
      LEFT JOIN {schema}.streams st ON st.name = p.name
      CROSS JOIN LATERAL (SELECT CASE WHEN st.last_version >= st.truncate_before
                                      THEN st.last_version END AS visible) v;
    IF stepped_aside IS NOT false OR cardinality(first_versions) <> cardinality(part_streams) THEN
        RAISE EXCEPTION 'annals: append needs the exact path' USING ERRCODE = 'AN001';
    END IF;

    WITH ins AS (
        INSERT INTO {schema}.runs (first_position, stream, first_version, n, event_type, category,
                                   correlation_id, recorded_at, ids, content_types, data, metadata)
        SELECT first_position + r.off - 1, part_streams[r.part], first_versions[r.part] + r.voff, r.cnt,
               r.typ, part_categories[r.part], r.corr, recorded,
               ev_ids[r.off:r.off + r.cnt - 1], ev_content[r.off:r.off + r.cnt - 1],
               ev_data[r.off:r.off + r.cnt - 1], ev_metadata[r.off:r.off + r.cnt - 1]::json[]
          FROM unnest(run_parts, run_offs, run_voffs, run_counts, run_types, run_corrs)
                   AS r(part, off, voff, cnt, typ, corr)
    )
    INSERT INTO {schema}.streams AS st (name, category, last_version, last_position, last_event_id)
    SELECT p.name, p.category, first_versions[p.ord] + p.n - 1, first_position + p.last_off, p.last_id
      FROM unnest(part_streams, part_categories, part_counts, part_last_offs, part_last_ids)
               WITH ORDINALITY AS p(name, category, n, last_off, last_id, ord)
    ON CONFLICT (name) DO UPDATE
       SET last_version = excluded.last_version,
           last_position = excluded.last_position,
           last_event_id = excluded.last_event_id;

    PERFORM pg_notify(channel, (first_position + total)::text);
END
$fn$;
