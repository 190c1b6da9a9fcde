-- Annals PostgreSQL schema, version 8: appends no longer update the head
-- row (issue 4). `{schema}` is replaced by the store's (quoted) schema name.
--
-- Every append used to UPDATE the one head row. While any transaction on
-- the database holds an old snapshot (a long report, pg_dump, an idle
-- session left in a transaction, a replica with hot_standby_feedback), the
-- dead versions of that row cannot be pruned: the head table grew by a page
-- every ~120 appends and every append scanned all of it. Measured with one
-- writer and a 25 s snapshot held elsewhere: 2,313 -> 799 appends/s, still
-- falling when the snapshot ended.
--
-- Now the head row is only LOCKED (FOR NO KEY UPDATE: no new row version,
-- so nothing to prune), which keeps its role as the lock that orders
-- commits (ADR 02), and the next position is read from the events table:
-- one backward step of the primary key, O(1) whatever snapshots exist.
-- Positions stay gapless (they follow the last committed event) and in
-- commit order (the lock is held to commit, and the read happens in a new
-- statement after it). Events are never deleted in this backend (deletes
-- only mark the stream row), so the last event's position never goes back.
--
-- The table becomes head_row, and `head` becomes a VIEW that computes
-- next_position and recorded_at from head_row (a floor: its values at this
-- migration) and the last event. That keeps processes of the previous
-- version correct while they still run: their reads of `head` get the
-- computed head; their `SELECT ... FROM head FOR NO KEY UPDATE` locks
-- head_row through the view; and their `UPDATE head SET next_position =
-- next_position + n ... RETURNING next_position - n` (the exact path) goes
-- to an INSTEAD OF trigger that writes nothing and returns the computed
-- row, so RETURNING yields the right first position. Their fast paths call
-- the functions below, replaced here.

-- The stream rows are still updated per append: a single very hot stream
-- still slows down under an old snapshot (54% after 25 s, against 65%
-- before; appends spread over many streams now lose about 10%: ADR 02).
-- Cached plans of running processes that name `head` are re-planned
-- against the view; the rename waits for in-flight appends.

ALTER TABLE {schema}.head RENAME TO head_row;

-- The log's head as readers (and previous versions) see it: after the last event,
-- never below head_row's floor; recorded_at never before the last event's.
-- Scalar subqueries, not a join: a row lock taken through the view then
-- applies to head_row alone.
CREATE VIEW {schema}.head AS
SELECT r.id,
       greatest(r.next_position,
                coalesce((SELECT e.position + 1 FROM {schema}.events e ORDER BY e.position DESC LIMIT 1), 0))
           AS next_position,
       greatest(r.recorded_at,
                coalesce((SELECT e.recorded_at FROM {schema}.events e ORDER BY e.position DESC LIMIT 1),
                         '-infinity'))
           AS recorded_at
  FROM {schema}.head_row r;

-- Previous versions' exact path moves the head with UPDATE ... RETURNING:
-- write nothing and hand back the computed row, whose next_position (the
-- SET expression applied to the view's value) makes RETURNING right.
CREATE FUNCTION {schema}.head_update() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    RETURN NEW;
END
$fn$;
CREATE TRIGGER head_update INSTEAD OF UPDATE ON {schema}.head
    FOR EACH ROW EXECUTE FUNCTION {schema}.head_update();

CREATE OR REPLACE FUNCTION {schema}.append_part(
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
    -- every stream row. Locked, not updated (0008): see the header.
    PERFORM 1 FROM {schema}.head_row FOR NO KEY UPDATE;
    -- A new statement, so a snapshot that holds the previous holder's
    -- commit: the next position follows the last event. (What the view
    -- `head` computes, in one lookup of the last event instead of two.)
    SELECT greatest(r.next_position, coalesce(t.position + 1, 0)),
           greatest(date_trunc('microseconds', clock_timestamp()), r.recorded_at, t.recorded_at)
      INTO first_position, recorded
      FROM {schema}.head_row r
      LEFT JOIN LATERAL (SELECT e.position, e.recorded_at FROM {schema}.events e
                          ORDER BY e.position DESC LIMIT 1) t ON true;

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

    -- Locked, not updated (0008), as in append_part.
    PERFORM 1 FROM {schema}.head_row FOR NO KEY UPDATE;
    -- A new statement, so a snapshot that holds the previous holder's
    -- commit: the next position follows the last event. (What the view
    -- `head` computes, in one lookup of the last event instead of two.)
    SELECT greatest(r.next_position, coalesce(t.position + 1, 0)),
           greatest(date_trunc('microseconds', clock_timestamp()), r.recorded_at, t.recorded_at)
      INTO first_position, recorded
      FROM {schema}.head_row r
      LEFT JOIN LATERAL (SELECT e.position, e.recorded_at FROM {schema}.events e
                          ORDER BY e.position DESC LIMIT 1) t ON true;

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
