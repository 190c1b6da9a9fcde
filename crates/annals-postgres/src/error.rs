//! The crate's error type: what can go wrong talking to PostgreSQL, phrased
//! as what the caller should do. Converts into [`annals_core::Error`].

use tokio_postgres::error::SqlState;

/// Errors of the PostgreSQL backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PgError {
    /// The connection URL could not be parsed. Fix the URL (form:
    /// `postgres://user:password@host:port/database`); retrying will not help.
    #[error("invalid PostgreSQL connection URL: {reason}")]
    InvalidUrl {
        /// What the parser said (the URL itself is not repeated: it may
        /// carry a password).
        reason: String,
    },

    /// The TLS settings of the connection URL (`sslmode`, `sslrootcert`)
    /// cannot be used: an unknown mode, a missing or unreadable root
    /// certificate file, or an unsupported option such as client
    /// certificates. Fix the URL; retrying will not help.
    #[error("invalid PostgreSQL TLS settings: {reason}")]
    InvalidTls {
        /// What is wrong.
        reason: String,
    },
    /// The configured [`annals_core::Limits`] allow appends PostgreSQL
    /// cannot take (`max_append_size` above
    /// [`crate::MAX_APPEND_SIZE`]). Lower the limit.
    #[error("limits PostgreSQL cannot meet: {reason}")]
    InvalidLimits {
        /// What is wrong.
        reason: String,
    },
    /// The schema name is not usable. Use 1–56 characters of `a-z`, `0-9`
    /// and `_`, starting with a letter or `_`, and not with `pg_`
    /// (PostgreSQL's own schemas).
    #[error(
        "invalid schema name '{name}': use 1-56 characters of a-z, 0-9 and _, not starting with a digit or with pg_"
    )]
    InvalidSchemaName {
        /// The rejected name.
        name: String,
    },

    /// No connection could be made: the server is down, unreachable, refused
    /// the login, or the database does not exist. Check the server and the
    /// URL, then retry with backoff.
    #[error("cannot connect to PostgreSQL: {message}")]
    Unreachable {
        /// What failed, without secrets.
        message: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<tokio_postgres::Error>,
    },

    /// Waiting for a pooled connection timed out: every connection is busy.
    /// Retry later, or raise `max_connections` in the builder.
    #[error("timed out waiting for a pooled PostgreSQL connection")]
    PoolTimeout,

    /// PostgreSQL did not answer within the store's answer timeout
    /// ([`crate::PgStoreBuilder::answer_timeout`]): the server is stopped or
    /// overloaded, or the network between holds the connection open without
    /// passing anything. The connection was closed and the server asked to
    /// cancel the statement. Retry with backoff; an append that ends with
    /// this error was checked against the log and not written (its
    /// message says when that could not be checked: then re-send it with
    /// the same event ids).
    #[error("no answer from PostgreSQL within {waited:?}; the connection was closed")]
    NoAnswer {
        /// How long the operation waited.
        waited: std::time::Duration,
    },

    /// The append was not sent: PostgreSQL had stopped answering. An append
    /// ahead of it in the store's queue got no answer within the answer
    /// timeout, and rather than make every append queued behind it wait a
    /// full timeout of its own, the store answered those at once. Nothing
    /// of this append was written; retry with backoff (the next append
    /// after this answer is sent again, and finds out whether the database
    /// is back).
    #[error(
        "append not sent: PostgreSQL stopped answering (an append ahead of it got no answer within {waited:?}); nothing was written"
    )]
    NotAnswering {
        /// How long the append ahead of it waited.
        waited: std::time::Duration,
    },

    /// The database schema was written by a newer version of Annals than
    /// this one. Upgrade this process; never run an older one against it.
    #[error(
        "schema '{schema}' is at migration {found}, newer than the {known} this version of annals-postgres knows"
    )]
    SchemaTooNew {
        /// The schema.
        schema: String,
        /// The highest migration applied in the database.
        found: i32,
        /// The highest migration this build knows.
        known: i32,
    },

    /// A schema migration failed; nothing of it was applied (it runs in one
    /// transaction). Read the cause, fix the database, and reopen.
    #[error("migration {version} ({name}) failed: {}", describe(source))]
    Migration {
        /// The migration's number.
        version: i32,
        /// The migration's file name.
        name: &'static str,
        /// What PostgreSQL said.
        #[source]
        source: tokio_postgres::Error,
    },

    /// PostgreSQL answered a statement with an error (or the connection
    /// broke mid-statement). Retry with backoff when [`PgError::is_transient`]
    /// says so; otherwise check the cause.
    #[error("PostgreSQL error: {}", describe(.0))]
    Database(#[from] tokio_postgres::Error),

    /// The store was opened outside a Tokio runtime; it needs one for its
    /// connections and background tasks. Open it from code running on Tokio.
    #[error("annals-postgres needs a Tokio runtime: open the store from code running on Tokio")]
    NoRuntime,

    /// Stored data could not be decoded (unknown content type code, negative
    /// version). Nothing was served from it; inspect the row.
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl PgError {
    /// The SQLSTATE of a database error, if it carries one.
    pub fn sql_state(&self) -> Option<&SqlState> {
        match self {
            PgError::Database(e) | PgError::Migration { source: e, .. } => e.code(),
            PgError::Unreachable { source: Some(e), .. } => e.code(),
            _ => None,
        }
    }

    /// Whether retrying the same operation later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            PgError::Unreachable { .. }
            | PgError::PoolTimeout
            | PgError::NoAnswer { .. }
            | PgError::NotAnswering { .. } => true,
            PgError::Database(e) => e.is_closed() || e.code().is_none_or(is_retryable_state),
            _ => false,
        }
    }
}

/// SQLSTATEs after which the whole transaction can simply be run again:
/// unique violations (a concurrent writer got there first; re-deciding
/// under the lock gives the right answer), deadlocks, serialization
/// failures, and writes refused by a read-only server.
pub(crate) fn is_retryable_state(state: &SqlState) -> bool {
    *state == SqlState::UNIQUE_VIOLATION
        || *state == SqlState::T_R_DEADLOCK_DETECTED
        || *state == SqlState::T_R_SERIALIZATION_FAILURE
        // The connection reaches a server that takes no writes (a primary
        // that became a standby in a failover): nothing was written, and
        // the connection is dropped (see `breaks_connection`), so the run
        // again gets a new one, which may reach the new primary.
        || *state == SqlState::READ_ONLY_SQL_TRANSACTION
}

impl From<deadpool_postgres::PoolError> for PgError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        use deadpool_postgres::PoolError as P;
        match e {
            // Making a new connection took longer than the connect
            // timeout: the server took the TCP connection but did not
            // finish the start-up (stopped, overloaded, or a wedged proxy).
            P::Timeout(deadpool_postgres::TimeoutType::Create) => PgError::Unreachable {
                message: "the server did not complete the connection start-up within the connect timeout"
                    .into(),
                source: None,
            },
            P::Timeout(_) => PgError::PoolTimeout,
            P::Backend(e) => unreachable_from(e),
            P::Closed => {
                PgError::Unreachable { message: "the connection pool is closed".into(), source: None }
            }
            P::NoRuntimeSpecified => PgError::Unreachable {
                message: "no async runtime configured for the pool".into(),
                source: None,
            },
            P::PostCreateHook(e) => PgError::Unreachable { message: e.to_string(), source: None },
        }
    }
}

/// What PostgreSQL said: `tokio_postgres::Error`'s own `Display` is only
/// "db error" for every server error, so the message, SQLSTATE, detail and
/// hint are spelled out here; other errors get their cause appended.
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut out = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            out.push_str(&format!(" (detail: {detail})"));
        }
        if let Some(hint) = db.hint() {
            out.push_str(&format!(" (hint: {hint})"));
        }
        return out;
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// Whether `e` leaves its connection unusable: closed, or a FATAL/PANIC
/// from the server (a terminated backend, a server shutting down), whose
/// session ends with it, or a refused write on a read-only server. Such a connection must not go back to the pool:
/// the client may not have seen the socket close yet, and the next
/// borrower would fail with "connection closed".
pub(crate) fn breaks_connection(e: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::Severity;
    e.is_closed()
        || e.as_db_error().is_some_and(|db| {
            matches!(db.parsed_severity(), Some(Severity::Fatal | Severity::Panic))
                || db.code().code().starts_with("08")
                || db.code().code().starts_with("57P")
                // A read-only server: keeping the connection would keep
                // every later write on the old host after a failover.
                || *db.code() == SqlState::READ_ONLY_SQL_TRANSACTION
        })
}

/// Whether a core error returned by this crate stands for a statement whose
/// connection's session ended ([`breaks_connection`]).
pub(crate) fn broke_connection(e: &annals_core::Error) -> bool {
    match e {
        annals_core::Error::Backend { source: Some(source), .. } => source
            .downcast_ref::<PgError>()
            .is_some_and(|p| matches!(p, PgError::Database(e) if breaks_connection(e))),
        _ => false,
    }
}

/// Whether a core error returned by this crate cannot go away by waiting:
/// the statement is wrong for this database (SQLSTATE classes 42, syntax
/// or access, e.g. a dropped schema or a revoked grant; 0A, not supported;
/// 3F, no such schema), the data is (22), one of our own functions refused
/// (`AN…`), or a value could not be decoded (a driver error with neither a
/// SQLSTATE nor a broken connection or I/O behind it). A subscription ends
/// at once with such an error instead of retrying it for its whole retry
/// window, which only hid it.
pub(crate) fn needs_a_fix(e: &annals_core::Error) -> bool {
    let annals_core::Error::Backend { source: Some(source), .. } = e else { return false };
    let Some(PgError::Database(e)) = source.downcast_ref::<PgError>() else { return false };
    match e.code() {
        Some(state) => ["42", "0A", "3F", "22", "AN"].iter().any(|class| state.code().starts_with(class)),
        None => {
            let io = std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>());
            !e.is_closed() && !io
        }
    }
}

/// Wraps a failed connection attempt.
pub(crate) fn unreachable_from(e: tokio_postgres::Error) -> PgError {
    // The cause of a connect error names what failed (refused, auth,
    // unknown database) and never includes the password.
    let mut message = describe(&e);
    if client_certificate_refused(&e) {
        message.push_str(
            " (the server refused this client's certificate, or wants one: check sslcert and sslkey, and that \
             the server's ssl_ca_file holds the CA that signed it)",
        );
    }
    PgError::Unreachable { message, source: Some(e) }
}

/// Whether the TLS handshake ended with an alert from the server about the
/// client's certificate (missing, unknown CA, expired, …).
fn client_certificate_refused(e: &tokio_postgres::Error) -> bool {
    use rustls::AlertDescription as A;
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(c) = cause {
        let tls = c
            .downcast_ref::<rustls::Error>()
            .or_else(|| c.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref()?.downcast_ref()));
        if let Some(rustls::Error::AlertReceived(alert)) = tls {
            return matches!(
                alert,
                A::UnknownCA
                    | A::BadCertificate
                    | A::CertificateRequired
                    | A::CertificateUnknown
                    | A::CertificateExpired
                    | A::CertificateRevoked
                    | A::UnsupportedCertificate
                    | A::AccessDenied
            );
        }
        cause = c.source();
    }
    false
}

impl From<PgError> for annals_core::Error {
    fn from(e: PgError) -> Self {
        match e {
            PgError::InvalidUrl { .. }
            | PgError::InvalidTls { .. }
            | PgError::InvalidSchemaName { .. }
            | PgError::InvalidLimits { .. }
            | PgError::NoRuntime => annals_core::Error::invalid(e.to_string()),
            PgError::Corrupt(details) => annals_core::Error::Corrupt { details },
            other => annals_core::Error::backend(other.to_string(), other),
        }
    }
}

/// Shorthand used by the store: a database error as a core error.
pub(crate) fn db(e: tokio_postgres::Error) -> annals_core::Error {
    PgError::Database(e).into()
}
