-- Annals PostgreSQL schema, version 11: appends no longer update stream
-- rows (issue 4). `{schema}` is replaced by the store's (quoted) schema name.
--
-- Until now every append rewrote its stream's row (last version, position
-- and event id). While any session on the database holds an old snapshot
-- (a long report, pg_dump, an idle session left in a transaction, a
-- replica with hot_standby_feedback) none of those row versions can be
-- pruned, so appends to a hot stream walked an ever longer chain of them:
-- one writer on one stream slowed by 54% within 25 s (ADR 02). Migration
-- 0008 did the same for the head row.
--
-- Now the three values are read from the stream's last run (one backward
-- step of runs_stream_version), which is what they always were: events are
-- never deleted in this backend and runs of a stream never overlap (0009).
-- A stream row is written when its stream is created and by deletes
-- (truncate_before, tombstoned), never by an append to an existing stream.
-- Appends still take the head lock first, so under it the last run and
-- the row are read without locking them, exactly as the rows were before.
--
-- The table becomes stream_rows and `streams` becomes a view with every
-- column it had, computed. That keeps processes of the previous version
-- correct while they still run: their fast path calls the two functions
-- replaced below (same signatures, so their prepared calls go on working);
-- their reads of `streams` see the computed values; their exact path and
-- their deletes write `streams` and now fail (a view joined to runs cannot
-- be written), rolling back whatever they did, so they write nothing
-- wrong. Upgrade them promptly: until then their rare exact-path appends
-- (re-sends, failed expectations) and their deletes return errors.

ALTER TABLE {schema}.streams RENAME TO stream_rows;
ALTER TABLE {schema}.stream_rows
    DROP COLUMN last_version,
    DROP COLUMN last_position,
    DROP COLUMN last_event_id;

-- A stream as readers (and previous versions) see it.
CREATE VIEW {schema}.streams AS
SELECT s.name, s.category, t.last_version, t.last_position, t.last_event_id, s.truncate_before, s.tombstoned,
       s.metadata
  FROM {schema}.stream_rows s
  LEFT JOIN LATERAL (SELECT r.first_version + r.n - 1 AS last_version, r.first_position + r.n - 1 AS last_position,
                            r.ids[r.n] AS last_event_id
                       FROM {schema}.runs r
                      WHERE r.stream = s.name
                      ORDER BY r.first_version DESC LIMIT 1) t ON true;

CREATE OR REPLACE FUNCTION {schema}.append_part(
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
    st record;
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

    -- The stream: its row (deletes) and its last run (versions). A plain
    -- write, as in 0006/0008; anything else steps aside.
    SELECT s.tombstoned, s.truncate_before, t.last_version, t.last_event_id INTO st
      FROM {schema}.stream_rows s
      LEFT JOIN LATERAL (SELECT e.first_version + e.n - 1 AS last_version, e.ids[e.n] AS last_event_id
                           FROM {schema}.runs e
                          WHERE e.stream = s.name
                          ORDER BY e.first_version DESC LIMIT 1) t ON true
     WHERE s.name = p_stream;
    IF FOUND THEN
        -- In parentheses: IF reads its condition up to the first THEN.
        IF (st.tombstoned
            OR st.last_event_id IS NOT DISTINCT FROM last_id
            OR NOT CASE p_kind
                       WHEN 0 THEN true
                       WHEN 1 THEN NOT coalesce(st.last_version >= st.truncate_before, false)
                       WHEN 2 THEN coalesce(st.last_version >= st.truncate_before, false)
                       WHEN 3 THEN coalesce(st.last_version >= st.truncate_before
                                            AND st.last_version = p_version, false)
                       ELSE false
                   END) THEN
            RAISE EXCEPTION 'annals: append needs the exact path' USING ERRCODE = 'AN001';
        END IF;
        first_version := coalesce(st.last_version, -1) + 1;
    ELSE
        IF p_kind NOT IN (0, 1) THEN
            RAISE EXCEPTION 'annals: append needs the exact path' USING ERRCODE = 'AN001';
        END IF;
        INSERT INTO {schema}.stream_rows (name, category) VALUES (p_stream, p_category)
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

CREATE OR REPLACE FUNCTION {schema}.append_head_first(
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
    -- Parts (1-based) whose stream has no row yet.
    new_parts int8[];
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
                   OR coalesce(t.last_event_id = p.last_id, false)
                   OR NOT CASE p.kind
                       WHEN 0 THEN true
                       WHEN 1 THEN v.visible IS NULL
                       WHEN 2 THEN v.visible IS NOT NULL
                       WHEN 3 THEN v.visible IS NOT NULL AND v.visible = p.version
                       ELSE false
                   END),
           array_agg(coalesce(t.last_version + 1, 0) ORDER BY p.ord),
           array_agg(p.ord) FILTER (WHERE st.name IS NULL)
      INTO stepped_aside, first_versions, new_parts
      FROM unnest(part_streams, part_kinds, part_versions, part_last_ids) WITH ORDINALITY
               AS p(name, kind, version, last_id, ord)
      LEFT JOIN {schema}.stream_rows st ON st.name = p.name
      LEFT JOIN LATERAL (SELECT e.first_version + e.n - 1 AS last_version, e.ids[e.n] AS last_event_id
                           FROM {schema}.runs e
                          WHERE e.stream = p.name
                          ORDER BY e.first_version DESC LIMIT 1) t ON true
      CROSS JOIN LATERAL (SELECT CASE WHEN t.last_version >= st.truncate_before
                                      THEN t.last_version END AS visible) v;
    IF stepped_aside IS NOT false OR cardinality(first_versions) <> cardinality(part_streams) THEN
        RAISE EXCEPTION 'annals: append needs the exact path' USING ERRCODE = 'AN001';
    END IF;

    -- The runs, and a row for each new stream (existing rows stay as they
    -- are: nothing for an old snapshot to pin).
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
    INSERT INTO {schema}.stream_rows (name, category)
    SELECT part_streams[o], part_categories[o] FROM unnest(new_parts) AS o
    ON CONFLICT (name) DO NOTHING;

    PERFORM pg_notify(channel, (first_position + total)::text);
END
$fn$;
