-- Annals PostgreSQL schema, version 6: cheaper fast paths (issue 4).
-- `{schema}` is replaced by the store's (quoted) schema name.
--
-- 1. No procedure call. `CALL append_commit` (0004) cost about 0.065 ms of
--    server CPU more than selecting from the function it wraps in an
--    implicit transaction (`pgbench -M prepared`, one event, 0.31 vs
--    0.25 ms with synchronous_commit off): CALL is a utility statement,
--    analysed again on every execution, and a procedure that commits runs
--    its statements non-atomically. The fast paths are now functions
--    selected outside a transaction block: the implicit transaction
--    commits at the protocol's Sync, and the client reads up to
--    ReadyForQuery, so an error raised by the commit still fails the call
--    (tokio-postgres reports it; a test checks it with a deferred trigger).
--    The isolation check of append_commit moves into the functions.
-- 2. append_part: a round of one part (one stream and its events; every
--    round of a lone writer). The stream row is checked and advanced by one
--    UPDATE whose WHERE clause is the plain-write condition, instead of a
--    SELECT over unnest(...) followed by an INSERT ... ON CONFLICT DO
--    UPDATE (which also locks the row before updating it: two tuple writes).
--    With scalar stream arguments this cost 0.185 ms against 0.25 ms for
--    append_head_first (one event, same measurement).
-- See docs/adr/02-postgres-ordering.md.

CREATE FUNCTION {schema}.append_part(
    -- The stream, its category, the expectation (0 any, 1 no stream,
    -- 2 stream exists, 3 exact) and the exact version.
    p_stream        text,
    p_category      text,
    p_kind          int2,
    p_version       int8,
    -- Per event, in order.
    ev_ids          uuid[],
    ev_types        text[],
    ev_content      int2[],
    ev_data         bytea[],
    ev_metadata     text[],
    ev_correlation  text[],
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
    -- The head-first design needs each statement after the head lock to
    -- take a fresh snapshot (READ COMMITTED); under any other level the
    -- exact path runs the append (it begins its own READ COMMITTED
    -- transaction).
    IF n IS NULL OR n = 0 OR current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'annals: append needs the exact path' USING ERRCODE = 'AN001';
    END IF;

    -- The head first: the row lock that orders commits (ADR 02) and guards
    -- every stream row.
    UPDATE {schema}.head
       SET next_position = next_position + n,
           recorded_at = greatest(date_trunc('microseconds', clock_timestamp()), recorded_at)
    RETURNING next_position - n, recorded_at INTO first_position, recorded;

    -- A plain write (StreamState::decide): not tombstoned, cannot be an
    -- idempotent re-send (the stream's last event id differs from ours), and
    -- the expectation holds for the visible version (last_version unless
    -- soft-deleted past it). Anything else is left to the exact path.
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
        -- No row: a new stream, which "any" and "no stream" accept. A row
        -- that failed the conditions makes the insert do nothing.
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

    INSERT INTO {schema}.events (position, stream, version, id, event_type, category, content_type,
                                 data, metadata, correlation_id, recorded_at)
    SELECT first_position + e.ord - 1, p_stream, first_version + e.ord - 1, e.id, e.event_type,
           p_category, e.content_type, e.data, e.metadata::json, e.correlation_id, recorded
      FROM unnest(ev_ids, ev_types, ev_content, ev_data, ev_metadata, ev_correlation)
               WITH ORDINALITY AS e(id, event_type, content_type, data, metadata, correlation_id, ord);

    PERFORM pg_notify(channel, (first_position + n)::text);
END
$fn$;

-- append_head_first (0003) is now also selected directly, in an implicit
-- transaction, for rounds of several parts: it takes over the isolation
-- check from append_commit. Same signature and body otherwise, so
-- processes of the previous version (which reach it through append_commit)
-- keep working.
CREATE OR REPLACE FUNCTION {schema}.append_head_first(
    part_streams    text[],
    part_categories text[],
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

    UPDATE {schema}.head
       SET next_position = next_position + total,
           recorded_at = greatest(date_trunc('microseconds', clock_timestamp()), recorded_at)
    RETURNING next_position - total, recorded_at INTO first_position, recorded;

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
