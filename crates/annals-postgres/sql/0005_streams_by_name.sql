-- Annals PostgreSQL schema, version 5: stream listing by name.
-- `{schema}` is replaced by the store's (quoted) schema name.
--
-- list_streams pages through streams in byte order of their names
-- (COLLATE "C"), whatever the database's default collation; the primary
-- key's index follows the default collation, so it gets its own index.
CREATE INDEX streams_name_bytes ON {schema}.streams (name COLLATE "C");
