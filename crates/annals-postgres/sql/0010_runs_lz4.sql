-- Annals PostgreSQL schema, version 10: runs compress with lz4 (issue 4).
-- `{schema}` is replaced by the store's (quoted) schema name.
--
-- A run of many events is one row of a few KiB, over PostgreSQL's TOAST
-- threshold (~2 KiB), so its arrays are compressed on every batched
-- append and decompressed on every read of it. lz4 does both faster than
-- the default pglz: a 100-event append took 0.91-0.96 ms against 1.03 ms
-- (pgbench -M prepared, one connection, commit flush on). Only new values
-- are written with it; existing ones stay readable as they are.
--
-- A server built without lz4 refuses the setting: the columns then keep
-- the default and nothing else changes. Before PostgreSQL 14 there is no
-- per-column compression at all (the clause is a syntax error there), so
-- the statement is only run from 14 on. (Added after release: on 12 and 13
-- this migration failed, and with it every open; where it applied, it
-- did the same as now.)
DO $lz4$
BEGIN
    IF current_setting('server_version_num')::int >= 140000 THEN
        EXECUTE 'ALTER TABLE {schema}.runs
                     ALTER COLUMN ids SET COMPRESSION lz4,
                     ALTER COLUMN data SET COMPRESSION lz4,
                     ALTER COLUMN metadata SET COMPRESSION lz4';
    ELSE
        RAISE NOTICE 'annals: PostgreSQL before 14 has no lz4; runs keep the default compression';
    END IF;
EXCEPTION WHEN feature_not_supported OR invalid_parameter_value THEN
    RAISE NOTICE 'annals: lz4 is not available on this server; runs keep the default compression';
END
$lz4$;
