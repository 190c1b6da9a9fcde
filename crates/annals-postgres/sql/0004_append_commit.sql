-- Annals PostgreSQL schema, version 4: the fast path in one message.
-- `{schema}` is replaced by the store's (quoted) schema name.
--
-- The fast path used to send `BEGIN`, the append_head_first call and
-- `COMMIT` as three pipelined requests: three responses, three wake-ups of
-- the client. This procedure is CALLed outside a transaction block and
-- commits itself, so the whole append is one request. Its result row is
-- produced only after the COMMIT inside it succeeded; an error raised at
-- commit (e.g. a full NOTIFY queue) fails the CALL. (Calling the function
-- in an implicit transaction instead would not do: the commit happens at
-- Sync, after the result, and an error there arrives after the
-- CommandComplete that ends the client's query.)
--
-- The head-first design needs READ COMMITTED (each statement after the head
-- lock sees the previous holder's commit). The exact path begins its
-- transactions with that level explicitly; here the implicit transaction
-- has the session's default, so any other level steps aside (AN001) to the
-- exact path.
CREATE PROCEDURE {schema}.append_commit(
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
    INOUT first_position bigint DEFAULT NULL,
    INOUT first_versions bigint[] DEFAULT NULL
) LANGUAGE plpgsql
AS $fn$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'annals: append needs the exact path' USING ERRCODE = 'AN001';
    END IF;
    SELECT f.first_position, f.first_versions INTO first_position, first_versions
      FROM {schema}.append_head_first(part_streams, part_categories, part_kinds, part_versions, part_counts,
                                      part_last_offs, part_last_ids, ev_parts, ev_streams, ev_categories,
                                      ev_offsets, ev_ids, ev_types, ev_content, ev_data, ev_metadata,
                                      ev_correlation, channel) AS f;
    COMMIT;
END
$fn$;
