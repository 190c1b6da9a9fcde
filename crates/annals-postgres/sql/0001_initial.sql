-- Annals PostgreSQL schema, version 1.
-- `{schema}` is replaced by the store's (quoted) schema name.

-- The log's head: one row. Appenders update it inside their transaction,
-- which hands out gapless positions and serializes commits in position
-- order (see docs/adr/02-postgres-ordering.md).
CREATE TABLE {schema}.head (
    id            boolean PRIMARY KEY DEFAULT true CHECK (id),
    next_position bigint NOT NULL,
    -- recorded_at of the last commit; new commits never go back in time.
    recorded_at   timestamptz NOT NULL
);
INSERT INTO {schema}.head (id, next_position, recorded_at) VALUES (true, 0, '-infinity');

CREATE TABLE {schema}.streams (
    name            text PRIMARY KEY,
    category        text NOT NULL,
    -- NULL while the stream has never been written (e.g. tombstoned first).
    last_version    bigint,
    last_position   bigint,
    -- Cheap idempotency pre-check: a re-send can only match when its last
    -- id equals this.
    last_event_id   uuid,
    truncate_before bigint NOT NULL DEFAULT 0,
    tombstoned      boolean NOT NULL DEFAULT false,
    -- Stream metadata (max age, max count, ACL, custom); reserved.
    metadata        jsonb NOT NULL DEFAULT '{}'
);

CREATE TABLE {schema}.events (
    position       bigint PRIMARY KEY,
    stream         text NOT NULL,
    version        bigint NOT NULL,
    id             uuid NOT NULL,
    event_type     text NOT NULL,
    category       text NOT NULL,
    -- annals_core::ContentType::code
    content_type   smallint NOT NULL,
    data           bytea NOT NULL,
    -- json, not jsonb: kept byte for byte, and accepts every JSON string.
    metadata       json NOT NULL,
    -- metadata.correlation_id when it is a string, copied for the index.
    correlation_id text,
    recorded_at    timestamptz NOT NULL,
    CONSTRAINT events_stream_version UNIQUE (stream, version)
);
CREATE INDEX events_type ON {schema}.events (event_type, position);
CREATE INDEX events_category ON {schema}.events (category, position);
CREATE INDEX events_correlation ON {schema}.events (correlation_id, position) WHERE correlation_id IS NOT NULL;
CREATE INDEX events_recorded_at ON {schema}.events (recorded_at);
CREATE INDEX events_id ON {schema}.events (id);

CREATE TABLE {schema}.snapshots (
    stream         text NOT NULL,
    version        bigint NOT NULL,
    schema_version bigint NOT NULL,
    data           bytea NOT NULL,
    created_at     timestamptz NOT NULL,
    PRIMARY KEY (stream, version)
);

CREATE TABLE {schema}.checkpoints (
    name       text PRIMARY KEY,
    -- NULL: the row exists only as a lock target (see PgCheckpointTx).
    position   bigint,
    updated_at timestamptz NOT NULL DEFAULT now()
);
