-- Annals PostgreSQL schema, version 7: who holds a lease (issue 4).
-- `{schema}` is replaced by the store's (quoted) schema name.
--
-- A lease is a session-level advisory lock (src/lease.rs); the lock itself
-- says nothing about its holder. The holder writes one row here on the
-- lease's own connection right after taking the lock: its description
-- (for a server, the URL that other processes point clients at) and the
-- backend pid of that connection. A row is current only while that pid
-- still holds the lock (`pg_locks`), so a holder that died leaves a stale
-- row that nobody believes, and nothing needs cleaning up.

CREATE TABLE {schema}.lease_holders (
    name     text PRIMARY KEY,
    holder   text NOT NULL,
    pid      int4 NOT NULL,
    taken_at timestamptz NOT NULL
);
