//! Embedded, versioned schema migrations, applied on open.
//!
//! All migrations run in one transaction that first takes a transaction-level
//! advisory lock keyed by the schema name, so two processes opening the same
//! schema at once serialize: the second waits, then finds everything applied.

use tokio_postgres::Client;

use crate::{PgError, sql::quote_ident};

/// One migration: its number, file name and SQL (with `{schema}` where the
/// quoted schema name goes).
struct Migration {
    version: i32,
    name: &'static str,
    sql: &'static str,
}

/// Every migration, in order. Append only: never edit a released one.
const MIGRATIONS: &[Migration] = &[
    Migration { version: 1, name: "0001_initial.sql", sql: include_str!("../sql/0001_initial.sql") },
    Migration {
        version: 2,
        name: "0002_append_function.sql",
        sql: include_str!("../sql/0002_append_function.sql"),
    },
    Migration { version: 3, name: "0003_head_first.sql", sql: include_str!("../sql/0003_head_first.sql") },
    Migration {
        version: 4,
        name: "0004_append_commit.sql",
        sql: include_str!("../sql/0004_append_commit.sql"),
    },
    Migration {
        version: 5,
        name: "0005_streams_by_name.sql",
        sql: include_str!("../sql/0005_streams_by_name.sql"),
    },
    Migration { version: 6, name: "0006_append_part.sql", sql: include_str!("../sql/0006_append_part.sql") },
    Migration {
        version: 7,
        name: "0007_lease_holders.sql",
        sql: include_str!("../sql/0007_lease_holders.sql"),
    },
    Migration {
        version: 8,
        name: "0008_head_lock_only.sql",
        sql: include_str!("../sql/0008_head_lock_only.sql"),
    },
    Migration { version: 9, name: "0009_runs.sql", sql: include_str!("../sql/0009_runs.sql") },
    Migration { version: 10, name: "0010_runs_lz4.sql", sql: include_str!("../sql/0010_runs_lz4.sql") },
    Migration { version: 11, name: "0011_stream_rows.sql", sql: include_str!("../sql/0011_stream_rows.sql") },
    Migration {
        version: 12,
        name: "0012_checkpoint_saves.sql",
        sql: include_str!("../sql/0012_checkpoint_saves.sql"),
    },
    Migration {
        version: 13,
        name: "0013_checkpoint_locks_per_schema.sql",
        sql: include_str!("../sql/0013_checkpoint_locks_per_schema.sql"),
    },
];

/// Advisory-lock class for migrations ("anna" in ASCII), so the key space
/// does not collide with locks an application takes for itself.
const LOCK_CLASS: i32 = 0x616e_6e61;

/// Brings `schema` up to the newest migration. Idempotent.
pub(crate) async fn migrate(client: &mut Client, schema: &str) -> Result<(), PgError> {
    let quoted = quote_ident(schema);
    // READ COMMITTED whatever the session's default: under a transaction
    // snapshot (REPEATABLE READ, SERIALIZABLE set in the URL) the snapshot
    // is taken by the lock statement, before its wait, so the second of two
    // processes opening at once read the applied version from before the
    // first one's commit and ran the migrations again (failing on "already
    // exists"). Each statement after the lock sees every earlier commit.
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::ReadCommitted)
        .start()
        .await?;
    tx.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", &[&LOCK_CLASS, &schema]).await?;
    // The migrations' notices ("… does not exist, skipping") are noise in
    // the process's log.
    tx.batch_execute("SET LOCAL client_min_messages = warning").await?;
    // Created only when missing, looked up first: PostgreSQL checks the
    // privilege to create before it looks whether the object exists, so
    // `CREATE SCHEMA IF NOT EXISTS` fails for a role that owns its schema
    // but may not create schemas in the database (the usual least-privilege
    // setup), on every open. Under the lock, nobody else creates them
    // between the look-up and the creation.
    let (has_schema, has_table): (bool, bool) = {
        let row = tx
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1),
                        EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                 WHERE n.nspname = $1 AND c.relname = 'schema_migrations')",
                &[&schema],
            )
            .await?;
        (row.get(0), row.get(1))
    };
    if !has_schema {
        tx.batch_execute(&format!("CREATE SCHEMA {quoted}")).await?;
    }
    if !has_table {
        tx.batch_execute(&format!(
            "CREATE TABLE {quoted}.schema_migrations (
                 version    integer PRIMARY KEY,
                 name       text NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )"
        ))
        .await?;
    }
    let applied: Option<i32> =
        tx.query_one(&format!("SELECT max(version) FROM {quoted}.schema_migrations"), &[]).await?.get(0);
    let applied = applied.unwrap_or(0);
    let known = MIGRATIONS.last().map_or(0, |m| m.version);
    if applied > known {
        // Roll back explicitly rather than on drop, so the advisory lock is
        // released before the caller sees the error.
        tx.rollback().await?;
        return Err(PgError::SchemaTooNew { schema: schema.to_owned(), found: applied, known });
    }
    for m in MIGRATIONS.iter().filter(|m| m.version > applied) {
        let sql = m.sql.replace("{schema}", &quoted);
        let wrap = |source| PgError::Migration { version: m.version, name: m.name, source };
        tx.batch_execute(&sql).await.map_err(wrap)?;
        tx.execute(
            &format!("INSERT INTO {quoted}.schema_migrations (version, name) VALUES ($1, $2)"),
            &[&m.version, &m.name],
        )
        .await
        .map_err(wrap)?;
    }
    tx.commit().await?;
    Ok(())
}

/// The newest migration this build knows.
pub fn latest_version() -> i32 {
    MIGRATIONS.last().map_or(0, |m| m.version)
}
