-- Annals PostgreSQL schema, version 13: a checkpoint's lock names its
-- schema (issue 4). `{schema}` is replaced by the store's (quoted) schema
-- name; schema names are [a-z0-9_] (checked on open), so it is safe inside
-- a string literal too.
--
-- Until now the lock was `pg_advisory_xact_lock(class "annc",
-- hashtext(name))`. Advisory locks belong to the database, not to a
-- schema, so a checkpoint transaction of projection "balances" in one
-- schema kept every save and checkpoint transaction named "balances" in
-- every other schema of the database waiting (one schema per tenant running
-- the same projections waited on each other, and timed out). The key is now
-- `hashtext('{schema}/' || name)`, as leases already do.
--
-- Switching keys safely: a checkpoint transaction of this schema that
-- locked the old key before this migration committed may still be open,
-- and one that locks the new key would not wait for it. So the functions
-- first take the old key *shared*: that waits for an old-style (exclusive)
-- holder, and for one queued before, and the save read after the new key
-- is then the holder's. Shared locks do not conflict with each other, so
-- transactions of migrated schemas no longer wait for each other on it;
-- only schemas of the same database not yet migrated, which still take it
-- exclusively, wait and are waited for, as before. The old key comes
-- first: an old-style transaction that saves through the new body (its
-- statements call these functions by name) already holds it, and a new
-- one waiting for it holds nothing yet, so the two cannot deadlock.
-- (Transaction-level, not a session lock taken and released at once: a
-- cancel between the two would leave a session lock behind on a pooled
-- connection.)
--
-- The signatures are unchanged: statements prepared by processes of
-- version 12 call these bodies from now on.

CREATE OR REPLACE FUNCTION {schema}.lock_checkpoint(p_name text, OUT last_position bigint)
LANGUAGE plpgsql AS $fn$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'annals: checkpoints are locked in READ COMMITTED transactions only'
            USING ERRCODE = 'AN002';
    END IF;
    PERFORM pg_advisory_xact_lock_shared(1634627171, hashtext(p_name));
    PERFORM pg_advisory_xact_lock(1634627171, hashtext('{schema}/' || p_name));
    SELECT s.position INTO last_position
      FROM {schema}.checkpoint_saves s
     WHERE s.name = p_name
     ORDER BY s.seq DESC LIMIT 1;
END
$fn$;

CREATE OR REPLACE FUNCTION {schema}.save_checkpoint(p_name text, p_position bigint)
RETURNS void LANGUAGE plpgsql AS $fn$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'annals: checkpoints are saved in READ COMMITTED transactions only'
            USING ERRCODE = 'AN002';
    END IF;
    PERFORM pg_advisory_xact_lock_shared(1634627171, hashtext(p_name));
    PERFORM pg_advisory_xact_lock(1634627171, hashtext('{schema}/' || p_name));
    WITH previous AS (
        DELETE FROM {schema}.checkpoint_saves s
         WHERE s.name = p_name
           AND s.seq = (SELECT p.seq FROM {schema}.checkpoint_saves p
                         WHERE p.name = p_name ORDER BY p.seq DESC LIMIT 1)
    )
    INSERT INTO {schema}.checkpoint_saves (name, position) VALUES (p_name, p_position);
END
$fn$;
