-- Annals PostgreSQL schema, version 12: checkpoints are saved by inserting
-- (issue 4). `{schema}` is replaced by the store's (quoted) schema name.
--
-- A checkpoint was one row updated by every save, and a checkpoint
-- transaction (PgCheckpointTx) also rewrote it once to lock it. A projection
-- saving after every event writes that row thousands of times a second;
-- while any session on the database holds an old snapshot (pg_dump, a long
-- report, an idle transaction) none of those versions can be pruned, and
-- every save walked them: 2,588 -> 1,217 saves/s within 25 s (pgbench, one
-- connection), the same decay migrations 0008 and 0011 removed from
-- appends.
--
-- Now every save inserts a row into checkpoint_saves and deletes the
-- previous save of its name (by its key, found by the same lookup). The
-- latest save is the name's highest seq, found by one backward step of an
-- index whatever dead rows an old snapshot keeps; nothing is ever updated.
-- Saves and checkpoint transactions of one name are serialized by a
-- transaction-level advisory lock on the name instead of a row lock, so
-- two instances of a projection still take turns, and the save that holds
-- the lock last (commits last) has the highest seq.
--
-- `checkpoints` becomes a view with its former columns (the latest save
-- per name). Processes of the previous version still running read it
-- correctly; their saves and checkpoint transactions write it and now fail
-- (a DISTINCT ON view cannot be written), writing nothing: upgrade them
-- promptly.

-- One index, led by the name: the lookup of the latest save, and the key
-- the previous save is deleted by.
CREATE TABLE {schema}.checkpoint_saves (
    name     text NOT NULL,
    seq      bigint GENERATED ALWAYS AS IDENTITY,
    position bigint NOT NULL,
    saved_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, seq)
);

INSERT INTO {schema}.checkpoint_saves (name, position, saved_at)
SELECT name, position, updated_at FROM {schema}.checkpoints WHERE position IS NOT NULL ORDER BY name;
DROP TABLE {schema}.checkpoints;

CREATE VIEW {schema}.checkpoints AS
SELECT DISTINCT ON (s.name) s.name, s.position, s.saved_at AS updated_at
  FROM {schema}.checkpoint_saves s
 ORDER BY s.name, s.seq DESC;

-- Takes checkpoint `p_name`'s lock (advisory class "annc", transaction
-- level, so held to commit; re-entrant within a session) and then, in a
-- new statement whose snapshot follows every earlier holder's commit,
-- reads its latest save. READ COMMITTED only: under a transaction
-- snapshot that read could miss the save of the holder it waited for.
CREATE FUNCTION {schema}.lock_checkpoint(p_name text, OUT last_position bigint)
LANGUAGE plpgsql AS $fn$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'annals: checkpoints are locked in READ COMMITTED transactions only'
            USING ERRCODE = 'AN002';
    END IF;
    PERFORM pg_advisory_xact_lock(1634627171, hashtext(p_name));
    SELECT s.position INTO last_position
      FROM {schema}.checkpoint_saves s
     WHERE s.name = p_name
     ORDER BY s.seq DESC LIMIT 1;
END
$fn$;

-- Saves `p_position` as checkpoint `p_name` under the same lock: inserts
-- the new save and, in the same statement (after the lock, so it sees the
-- previous holder's save), deletes the latest one by its key. READ
-- COMMITTED only, as above (a stale read would leave a save undeleted).
CREATE FUNCTION {schema}.save_checkpoint(p_name text, p_position bigint)
RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'annals: checkpoints are saved in READ COMMITTED transactions only'
            USING ERRCODE = 'AN002';
    END IF;
    PERFORM pg_advisory_xact_lock(1634627171, hashtext(p_name));
    WITH previous AS (
        DELETE FROM {schema}.checkpoint_saves s
         WHERE s.name = p_name
           AND s.seq = (SELECT p.seq FROM {schema}.checkpoint_saves p
                         WHERE p.name = p_name ORDER BY p.seq DESC LIMIT 1)
    )
    INSERT INTO {schema}.checkpoint_saves (name, position) VALUES (p_name, p_position);
END
$fn$;
