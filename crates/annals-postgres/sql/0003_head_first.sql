-- Annals PostgreSQL schema, version 3: cheaper appends (issue 4).
-- `{schema}` is replaced by the store's (quoted) schema name.
--
-- 1. Every writer of `streams` rows now takes the head row lock FIRST
--    (append_head_first below, and in src/append.rs and src/store.rs the
--    exact path and deletes). Under the head lock all writers of the schema
--    are serialized, so the fast path reads the streams with a plain SELECT
--    and writes each stream row once (one upsert), instead of locking it
--    with a placeholder upsert and then updating it (two tuple writes and
--    one statement more per stream).
-- 2. Index diet: each event row fed six or seven indexes.
--    - events_id is used by no query: dropped.
--    - events_recorded_at becomes a BRIN index: recorded_at only grows with
--      position (ADR 02), so block ranges summarize it tightly, and an
--      insert costs next to nothing. autosummarize: a filled range is
--      summarized by autovacuum right away (an unsummarized range matches
--      every query); 32 pages per range keeps a time-window read to a few
--      hundred rows rechecked per range.
--    The other indexes are what reads need (stream+version, position,
--    type, category, correlation id), see sql.rs.
-- See docs/adr/02-postgres-ordering.md.

DROP INDEX {schema}.events_id;
DROP INDEX {schema}.events_recorded_at;
CREATE INDEX events_recorded_at ON {schema}.events USING brin (recorded_at)
    WITH (pages_per_range = 32, autosummarize = on);

-- The fast path of migration 0002, head first.
CREATE FUNCTION {schema}.append_head_first(
    -- Per part, in request order: stream, its category, expectation (0 any,
    -- 1 no stream, 2 stream exists, 3 exact), the exact version, event
    -- count, offset of its last event in the event arrays, and its last
    -- event id. Streams are distinct (Limits::check_parts and the
    -- committer's rounds guarantee it).
    part_streams    text[],
    part_categories text[],
    part_kinds      int2[],
    part_versions   int8[],
    part_counts     int8[],
    part_last_offs  int8[],
    part_last_ids   uuid[],
    -- Per event, in position order: its part (1-based), its offset within
    -- the part, and the columns.
    ev_parts        int4[],
    ev_streams      text[],
    ev_categories   text[],
    ev_offsets      int8[],
    ev_ids          uuid[],
    ev_types        text[],
    ev_content      int2[],
    ev_data         bytea[],
    ev_metadata     text[],
    ev_correlation  text[],
    channel         text,
    -- Results: first position of the batch, and each part's first version.
    OUT first_position bigint,
    OUT first_versions bigint[]
) LANGUAGE plpgsql
-- Generic plans: see 0002.
SET plan_cache_mode = force_generic_plan
AS $fn$
DECLARE
    total bigint := cardinality(ev_ids);
    stepped_aside boolean;
    recorded timestamptz;
BEGIN
    -- The head first: the row lock that orders commits (ADR 02) and, since
    -- every writer of stream rows takes it first, also guards the streams.
    UPDATE {schema}.head
       SET next_position = next_position + total,
           recorded_at = greatest(date_trunc('microseconds', clock_timestamp()), recorded_at)
    RETURNING next_position - total, recorded_at INTO first_position, recorded;

    -- A new statement, so a new snapshot (READ COMMITTED, volatile
    -- function): it sees every transaction that held the head before us.
    -- visible version = last_version unless soft-deleted past it
    -- (StreamState::visible_version); a possible re-send is any part whose
    -- last id equals the stream's last event id.
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
        -- Aborts the transaction: the head update above is undone too.
        RAISE EXCEPTION 'annals: append needs the exact path' USING ERRCODE = 'AN001';
    END IF;

    -- Events and streams in one statement (data-modifying CTE): one
    -- executor start less. One tuple write per stream, creating the row of
    -- a new stream.
    WITH ins AS (
        INSERT INTO {schema}.events (position, stream, version, id, event_type, category, content_type,
                                     data, metadata, correlation_id, recorded_at)
        SELECT first_position + e.ord - 1, e.stream, first_versions[e.part] + e.off, e.id,
               e.event_type, e.category, e.content_type, e.data, e.metadata::json,
               e.correlation_id, recorded
          FROM unnest(ev_parts, ev_streams, ev_categories, ev_offsets, ev_ids, ev_types, ev_content, ev_data,
                      ev_metadata, ev_correlation)
                   WITH ORDINALITY AS e(part, stream, category, off, id, event_type, content_type, data,
                                        metadata, correlation_id, ord)
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

-- Processes of the previous version may still run during an upgrade: their
-- fast path now goes head first too (same signature, so they keep working)
-- instead of locking streams before the head, which could deadlock with
-- ours (each stall lasting deadlock_timeout). Their exact path and deletes
-- still lock stream rows without the head: see ADR 02 on upgrading.
CREATE OR REPLACE FUNCTION {schema}.append_fast(
    lock_names      text[],
    lock_categories text[],
    part_streams    text[],
    part_kinds      int2[],
    part_versions   int8[],
    part_counts     int8[],
    part_last_offs  int8[],
    part_last_ids   uuid[],
    ev_parts        int4[],
    ev_streams      text[],
    ev_categories   text[],
    ev_offsets      int8[],
    ev_ids          uuid[],
    ev_types        text[],
    ev_content      int2[],
    ev_data         bytea[],
    ev_metadata     text[],
    ev_correlation  text[],
    channel         text,
    OUT first_position bigint,
    OUT first_versions bigint[]
) LANGUAGE sql
AS $fn$
    SELECT * FROM {schema}.append_head_first(
        part_streams,
        ARRAY(SELECT l.category
                FROM unnest(part_streams) WITH ORDINALITY AS p(name, ord)
                JOIN unnest(lock_names, lock_categories) AS l(name, category) ON l.name = p.name
               ORDER BY p.ord),
        part_kinds, part_versions, part_counts, part_last_offs, part_last_ids,
        ev_parts, ev_streams, ev_categories, ev_offsets, ev_ids, ev_types, ev_content, ev_data,
        ev_metadata, ev_correlation, channel)
$fn$;
