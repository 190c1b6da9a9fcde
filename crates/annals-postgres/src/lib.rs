//! # annals-postgres
//!
//! The PostgreSQL backend of Annals: the shared event store for several
//! processes. [`PgStore`] implements every capability trait of
//! [`annals_core`] and passes `annals-conformance`.
//!
//! ```no_run
//! use annals_core::{Appender, EventData, ExpectedVersion, StreamName};
//! use annals_postgres::PgStore;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store = PgStore::builder("postgres://postgres@127.0.0.1:5432/test")
//!     .schema("annals")
//!     .max_connections(8)
//!     .open()
//!     .await?;
//! let stream = StreamName::new("account-42")?;
//! let opened = EventData::json("AccountOpened", &serde_json::json!({ "owner": "Ada" }))?;
//! store.append(&stream, ExpectedVersion::NoStream, vec![opened]).await?;
//! # Ok(())
//! # }
//! ```
//!
//! - **Schema**: tables live in a configurable schema (default `annals`),
//!   created and migrated on open by embedded, versioned SQL files
//!   (`sql/NNNN_*.sql`) under an advisory lock, so several stores share one
//!   database and concurrent opens are safe.
//! - **Ordering**: positions are handed out under a one-row head table's
//!   lock, taken by each append transaction and held to its commit, so they
//!   are gapless and commit in position order; readers never pass over a
//!   late commit. Concurrent
//!   appends are group-committed (one transaction, one head acquisition,
//!   one WAL flush for many appends), each still decided on its own. See
//!   `docs/adr/02-postgres-ordering.md`.
//! - **Runs**: events are stored as runs, one row per run of an append's
//!   consecutive events sharing type and correlation id (migration 0009),
//!   so a batch costs one row and one entry per index; reads unpack them.
//!   Appends only insert: a stream's last version is its last run's, and
//!   its row is written when it is created and by deletes (migration
//!   0011), so an old snapshot elsewhere on the database slows nothing.
//! - **Subscriptions**: woken by `LISTEN/NOTIFY` with a bounded fallback
//!   poll; they read committed rows, so a lost connection delays them but
//!   never loses or repeats an event.
//! - **Exactly-once read models**: [`PgStore::begin_checkpoint_tx`].

mod append;
mod checkpoint;
mod error;
mod lease;
mod listener;
mod migrate;
mod pooled;
mod read;
mod row;
mod sql;
mod store;
mod timestamp;
mod tls;

use std::{
    str::FromStr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use annals_core::Limits;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

pub use checkpoint::PgCheckpointTx;
pub use error::PgError;
pub use lease::{PING as LEASE_PING, PING_TIMEOUT as LEASE_PING_TIMEOUT};
pub use migrate::latest_version as latest_migration;
/// The PostgreSQL driver this crate uses, for code that runs its own SQL in
/// a [`PgCheckpointTx`].
pub use tokio_postgres;

use crate::{listener::ListenerStats, sql::Statements};

/// The largest [`Limits::max_append_size`] this backend accepts (512 MiB):
/// one statement carries the whole append, and PostgreSQL refuses a
/// protocol message or array value of 1 GiB or more (the margin leaves
/// room for the other columns and the server's copies).
pub const MAX_APPEND_SIZE: usize = 512 * 1024 * 1024;

/// The schema used when none is configured.
pub const DEFAULT_SCHEMA: &str = "annals";

/// Longest accepted schema name (the NOTIFY channel adds a suffix and must
/// stay within PostgreSQL's 63-byte identifiers).
pub const MAX_SCHEMA_LEN: usize = 56;

/// An event store in a PostgreSQL schema. Cheap to clone (shared handle);
/// every clone shares one connection pool and one listener connection.
#[derive(Clone)]
pub struct PgStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("schema", &self.inner.schema).finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    /// The store's own connections.
    store_pool: Pool,
    /// Connections for applications ([`PgStore::pool`]), never used by
    /// the store itself.
    app_pool: Pool,
    schema: String,
    sql: Arc<Statements>,
    limits: Limits,
    /// The log's next position as this process last saw it; wakes
    /// subscriptions. Fed by own commits, NOTIFY and the fallback poll.
    head: Arc<watch::Sender<u64>>,
    listener: Arc<ListenerStats>,
    /// The schema name, shared with pooled connections (metric label).
    schema_label: Arc<str>,
    /// Connection settings of lease connections (see `lease`).
    lease_config: tokio_postgres::Config,
    /// See [`session_settings`]: run first on lease connections.
    session_settings: Arc<str>,
    /// Makes the TLS side of every connection (see `tls`).
    tls: tls::Connector,
    /// See [`PgStoreBuilder::answer_timeout`].
    answer: pooled::Answer,
    /// See [`PgStoreBuilder::connect_timeout`]: also bounds a lease
    /// connection's start-up.
    connect_timeout: Duration,
    /// How long a subscription keeps retrying reads through a database
    /// outage before it ends with the error.
    subscription_retry: Duration,
    /// See [`PgStoreBuilder::stats_timeout`].
    stats_timeout: Duration,
    /// Appends waiting for a committer task (see `append`); the committers
    /// end when this sender is dropped with the store.
    queue: tokio::sync::mpsc::Sender<append::Request>,
    /// Set when the sessions' default isolation is not READ COMMITTED (see
    /// [`ExplicitReadCommitted`]).
    explicit_rc: ExplicitReadCommitted,
    /// See [`PgStore::exact_append_rounds`].
    exact_rounds: Arc<std::sync::atomic::AtomicU64>,
    /// Recent events read once for all live `$all` subscriptions.
    tail: Arc<annals_core::subscription::Tail>,
    /// Stops the listener task when the last handle goes.
    _listener_guard: DropGuard,
}

/// Options for opening a [`PgStore`]; see [`PgStore::builder`].
#[derive(Debug, Clone)]
#[must_use]
pub struct PgStoreBuilder {
    url: String,
    schema: String,
    max_connections: usize,
    connect_timeout: Duration,
    pool_wait_timeout: Duration,
    answer_timeout: Duration,
    poll_interval: Duration,
    subscription_retry: Duration,
    stats_timeout: Duration,
    limits: Limits,
}

impl PgStoreBuilder {
    /// The schema holding the store's tables (default [`DEFAULT_SCHEMA`]):
    /// 1–56 characters of `a-z`, `0-9`, `_`, not starting with a digit or
    /// with `pg_` (reserved for PostgreSQL's own schemas).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// Pool size (default 16). The listener uses one more connection;
    /// [`PgStore::pool`] opens a second pool of this size for the
    /// application, on first use.
    pub fn max_connections(mut self, n: usize) -> Self {
        self.max_connections = n.max(1);
        self
    }

    /// How long one connection attempt may take (default 5 s), start-up
    /// included: past it the attempt fails as [`PgError::Unreachable`].
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long an operation waits for a free pooled connection (default
    /// 30 s) before failing with [`PgError::PoolTimeout`].
    pub fn pool_wait_timeout(mut self, timeout: Duration) -> Self {
        self.pool_wait_timeout = timeout;
        self
    }

    /// How long one operation (a read, an append's transaction, a
    /// checkpoint save, a statement of a [`PgCheckpointTx`]) waits for
    /// PostgreSQL to answer once it has a connection (default 30 s). A
    /// server that is stopped or a network path that holds the connection
    /// open without passing anything is invisible to the TCP probes (the
    /// peer's kernel still acknowledges); past this limit the operation
    /// fails with [`PgError::NoAnswer`], its connection is closed rather
    /// than reused, and the server is asked to cancel the statement. Lock
    /// waits count: a [`PgStore::begin_checkpoint_tx`] waiting for another
    /// instance's checkpoint transaction fails after this long too, and so
    /// does the transfer: raise it with the append size limit where appends
    /// of hundreds of megabytes cross a slow link. Not applied to
    /// migrations at open.
    ///
    /// Appends are committed one round at a time, so an append that gets
    /// no answer (or needs a new connection that cannot be made within the
    /// [`PgStoreBuilder::connect_timeout`]) would hold every append queued
    /// behind it for a timeout each: those fail at once instead, with
    /// [`PgError::NotAnswering`] (not sent, nothing written), and the next
    /// append to arrive tries the database again.
    pub fn answer_timeout(mut self, timeout: Duration) -> Self {
        self.answer_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// Fallback poll of the head when no notification arrives (default
    /// 1 s); bounds how late a subscriber can wake if a NOTIFY is lost.
    /// While the listener's connection is lost and cannot be made again,
    /// the head is read through the pool after each attempt instead (every
    /// 2 s at most, plus the connect timeout of the attempt).
    pub fn poll_interval(mut self, every: Duration) -> Self {
        self.poll_interval = every.max(Duration::from_millis(10));
        self
    }

    /// How long a subscription keeps retrying through a lost database
    /// connection before it ends with the error (default 60 s).
    pub fn subscription_retry(mut self, limit: Duration) -> Self {
        self.subscription_retry = limit;
        self
    }

    /// How long [`annals_core::AllReader::store_stats`] may spend counting
    /// events by type (one aggregate over the whole runs table) before it
    /// reports the counts as unknown (default 5 s; at most a third of the
    /// [`PgStoreBuilder::answer_timeout`], since sizing the tables may wait
    /// as long again and the call must answer within that timeout).
    /// `/stats` then falls back to its bounded scan and says it is
    /// incomplete.
    pub fn stats_timeout(mut self, limit: Duration) -> Self {
        self.stats_timeout = limit.max(Duration::from_millis(1));
        self
    }

    /// Size and count limits enforced on appends.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// A pool of connections made with `config`, sized and timed as
    /// configured, running the session settings on each new one.
    fn pool(
        &self,
        config: tokio_postgres::Config,
        connector: &tls::Connector,
        settings: &Arc<str>,
    ) -> deadpool_postgres::PoolBuilder {
        let manager = Manager::from_config(
            config,
            connector.clone(),
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        Pool::builder(manager)
            .max_size(self.max_connections)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(self.pool_wait_timeout))
            .create_timeout(Some(self.connect_timeout))
            .post_create(set_session(settings.clone(), self.connect_timeout))
    }

    /// Connects, applies migrations, starts the listener.
    ///
    /// Fails with [`PgError::NoRuntime`], [`PgError::InvalidUrl`], [`PgError::InvalidSchemaName`],
    /// [`PgError::InvalidLimits`],
    /// [`PgError::Unreachable`] (server down, wrong credentials, unknown
    /// database), [`PgError::SchemaTooNew`] or [`PgError::Migration`].
    pub async fn open(self) -> Result<PgStore, PgError> {
        // Checked first: spawning the background tasks would panic otherwise.
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(PgError::NoRuntime);
        }
        validate_schema(&self.schema)?;
        if self.limits.max_append_size > MAX_APPEND_SIZE {
            return Err(PgError::InvalidLimits {
                reason: format!(
                    "max_append_size is {} bytes; one append is one statement, at most {} bytes here",
                    self.limits.max_append_size, MAX_APPEND_SIZE
                ),
            });
        }
        let (url, tls) = tls::split_url(&self.url)?;
        let mut config = tokio_postgres::Config::from_str(&url)
            .map_err(|e| PgError::InvalidUrl { reason: e.to_string() })?;
        let connector = tls.apply(&mut config)?;
        config.connect_timeout(self.connect_timeout);
        // The store's session settings are SET on each new connection, not
        // sent in the startup packet's `options`: poolers such as PgBouncer
        // refuse a connection whose `options` name settings they do not
        // track. The URL's own `options` are sent as given.
        let settings: Arc<str> = Arc::from(session_settings(config.get_options()));
        detect_dead_peers(&mut config);
        let mut pool_config = config.clone();
        pool_config.application_name(format!("annals {}", self.schema));
        let mut app_config = config.clone();
        app_config.application_name(format!("annals-app {}", self.schema));
        let mut lease_config = config.clone();
        lease_config.application_name(format!("annals-lease {}", self.schema));
        let mut listen_config = config;
        listen_config.application_name(format!("annals-listen {}", self.schema));

        // The store's own operations end every transaction they begin (or
        // discard the connection), so its pool only checks that a
        // connection is still open when handing it out again.
        let pool = self.pool(pool_config, &connector, &settings).build();
        // Applications get connections of their own (see `PgStore::pool`),
        // checked on every hand-out for a transaction left open.
        let app_pool = self
            .pool(app_config, &connector, &settings)
            .post_recycle(outside_any_transaction(Arc::from(self.schema.as_str()), self.connect_timeout))
            .build();
        let (pool, app_pool) = match (pool, app_pool) {
            (Ok(pool), Ok(app_pool)) => (pool, app_pool),
            (Err(e), _) | (_, Err(e)) => {
                return Err(PgError::Unreachable { message: e.to_string(), source: None });
            }
        };

        let mut client = pool.get().await.map_err(open_error)?;
        migrate::migrate(&mut client, &self.schema).await?;
        let sql = Arc::new(Statements::new(&self.schema));
        let next: i64 = client.query_one(sql.head.as_str(), &[]).await?.get(0);
        let explicit_rc = ExplicitReadCommitted::default();
        let isolation: String = client.query_one("SHOW transaction_isolation", &[]).await?.get(0);
        if isolation != "read committed" {
            explicit_rc.set();
        }
        let version: String = client.query_one("SHOW server_version_num", &[]).await?.get(0);
        let terminate_waits = version.trim().parse::<u32>().is_ok_and(|v| v >= 140_000);
        drop(client);

        let (head, _) = watch::channel(u64::try_from(next).unwrap_or(0));
        let tail: Arc<annals_core::subscription::Tail> = Arc::default();
        let head = Arc::new(head);
        let stats = Arc::new(ListenerStats::default());
        let dial = listener::Dial {
            config: listen_config,
            tls: connector.clone(),
            answer_within: self.connect_timeout,
            tail: tail.clone(),
            settings: settings.clone(),
            pool: pool.clone(),
            // As for its own connection's polls: a head read that takes
            // longer than a connection attempt holds up the next attempt.
            answer: pooled::Answer { within: self.connect_timeout, tls: connector.clone() },
            schema: Arc::from(self.schema.as_str()),
        };
        let first = listener::connect_within(&dial, &sql, &head, &stats).await?;
        let cancel = CancellationToken::new();
        tokio::spawn(listener::run(
            first,
            dial,
            sql.clone(),
            head.clone(),
            stats.clone(),
            self.poll_interval,
            cancel.clone(),
        ));
        tokio::spawn(sample_pool(pool.clone(), self.schema.clone(), cancel.clone()));
        let exact_rounds = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let answer = pooled::Answer { within: self.answer_timeout, tls: connector.clone() };
        let sessions = Arc::new(append::Sessions::default());
        let (queue, receiver) = tokio::sync::mpsc::channel(4096);
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        for _ in 0..append::COMMITTERS {
            let committer = append::Committer {
                pool: pool.clone(),
                schema: Arc::from(self.schema.as_str()),
                sql: sql.clone(),
                head: head.clone(),
                queue: receiver.clone(),
                explicit_rc: explicit_rc.clone(),
                exact_rounds: exact_rounds.clone(),
                answer: answer.clone(),
                sessions: sessions.clone(),
                terminate_waits,
                connect_timeout: self.connect_timeout,
                max_batch_bytes: self.limits.max_append_size,
            };
            tokio::spawn(committer.run());
        }
        Ok(PgStore {
            inner: Arc::new(Inner {
                queue,
                store_pool: pool,
                app_pool,
                schema_label: Arc::from(self.schema.as_str()),
                schema: self.schema,
                sql,
                limits: self.limits,
                head,
                listener: stats,
                lease_config,
                session_settings: settings,
                tls: connector,
                answer,
                connect_timeout: self.connect_timeout,
                subscription_retry: self.subscription_retry,
                stats_timeout: self.stats_timeout,
                explicit_rc,
                exact_rounds,
                tail,
                _listener_guard: cancel.drop_guard(),
            }),
        })
    }
}

/// How long a connection may go without any sign of life from the other
/// end before it counts as dead, on both sides, unless the URL says
/// otherwise. Without it a connection whose peer vanished without closing
/// it (a failover that moves the address, a network cut, a NAT or load
/// balancer forgetting an idle flow) is trusted for as long as the kernel's
/// defaults allow: two hours idle, about fifteen minutes with data unacknowledged.
/// Meanwhile an append, read or notification wait on it hangs, and on the
/// server a transaction of a dead client keeps its locks (the head, a
/// checkpoint, a lease) and blocks the whole schema's appends.
///
/// Client side (the URL's `keepalives_idle`, `keepalives_interval`,
/// `keepalives_retries` and `tcp_user_timeout` win): a probe after 15 s of
/// silence, then every 5 s, dead after 3 unanswered (about 30 s), and sent
/// data unacknowledged for 30 s ends the connection.
fn detect_dead_peers(config: &mut tokio_postgres::Config) {
    /// tokio-postgres's default: not set by the URL.
    const LIBRARY_DEFAULT_IDLE: Duration = Duration::from_secs(2 * 60 * 60);
    if !config.get_keepalives() {
        return;
    }
    if config.get_keepalives_idle() == LIBRARY_DEFAULT_IDLE {
        config.keepalives_idle(Duration::from_secs(15));
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(Duration::from_secs(5));
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(3);
    }
    if config.get_tcp_user_timeout().is_none() {
        config.tcp_user_timeout(Duration::from_secs(30));
    }
}

/// The settings of every session of the store, SET right after it
/// connects (pool, listener and lease connections alike); those the URL's
/// `options` set (`-c name=value`) are left to the URL, except `jit`.
///
/// - `tcp_keepalives_*`: the server side of [`detect_dead_peers`], so a
///   session whose client vanished ends (and its transaction rolls back,
///   releasing its locks) within about 30 s.
/// - `idle_in_transaction_session_timeout`: a session idle inside a
///   transaction for a minute is ended by the server. That is a client that
///   stopped while holding locks without its host going away (a paused
///   process, a wedged proxy, which the probes cannot see), and an append
///   transaction's head lock would otherwise stop every append of the
///   schema until it came back. The store's own transactions are pipelined
///   and never wait on the client for longer than a round trip; a
///   [`PgCheckpointTx`], which waits on the caller's code between its
///   statements, is exempt (it holds only its own checkpoint's lock).
/// - `default_transaction_isolation`: READ COMMITTED, which the append and
///   checkpoint functions need, whatever the database or role says (a
///   session's own setting takes precedence over `ALTER DATABASE/ROLE …
///   SET`). A default changed while a store runs would otherwise reach it
///   through its new connections and send their appends to the exact path.
///   A URL that sets another is handled by [`ExplicitReadCommitted`].
/// - `jit = off`, always: the generic plans of our prepared statements
///   carry inflated cost estimates that trigger JIT compilation (~160 ms
///   measured) for queries whose real work is under a millisecond, which
///   made `$all` paging ~20x slower.
const SESSION_SETTINGS: [(&str, &str); 5] = [
    ("tcp_keepalives_idle", "15"),
    ("tcp_keepalives_interval", "5"),
    ("tcp_keepalives_count", "3"),
    ("idle_in_transaction_session_timeout", "'60s'"),
    ("default_transaction_isolation", "'read committed'"),
];

/// The `SET` statements of [`SESSION_SETTINGS`] that `url_options` leaves
/// to the store, then `jit = off`.
fn session_settings(url_options: Option<&str>) -> String {
    let named = url_options.map(settings_named).unwrap_or_default();
    let mut sql = String::new();
    for (name, value) in SESSION_SETTINGS {
        if !named.iter().any(|n| n == name) {
            sql.push_str(&format!("SET {name} = {value}; "));
        }
    }
    sql.push_str("SET jit = off");
    sql
}

/// The settings a libpq `options` string sets: `-c name=value`,
/// `-cname=value` and `--name=value`, names lower-cased with `-` read as `_`.
fn settings_named(options: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut tokens = options.split_whitespace();
    while let Some(token) = tokens.next() {
        let assignment = if token == "-c" {
            tokens.next()
        } else {
            token.strip_prefix("-c").or_else(|| token.strip_prefix("--"))
        };
        if let Some((name, _)) = assignment.and_then(|a| a.split_once('=')) {
            names.push(name.to_ascii_lowercase().replace('-', "_"));
        }
    }
    names
}

/// Whether the store's sessions default to an isolation other than READ
/// COMMITTED (the URL's `options` set one, overriding
/// [`SESSION_ISOLATION`]). The append and checkpoint functions
/// need READ COMMITTED and refuse anything else; in an implicit
/// transaction they would then fail on every call (one round trip lost and
/// one `ERROR` in the server's log each time) before running again inside
/// an explicit `BEGIN ISOLATION LEVEL READ COMMITTED`. Read once at open
/// and set again by the first refusal seen (a default changed later for new
/// connections), it sends every later call straight to the explicit form,
/// pipelined in the same single round trip.
#[derive(Debug, Clone, Default)]
pub(crate) struct ExplicitReadCommitted(Arc<std::sync::atomic::AtomicBool>);

impl ExplicitReadCommitted {
    pub(crate) fn get(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn set(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Every second until the store is dropped: the pool's size, idle
/// connections and waiting callers as gauges (`annals_pg_pool_*`, label
/// `schema`), for the process's `metrics` recorder.
async fn sample_pool(pool: Pool, schema: String, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {
                let status = pool.status();
                let gauge = |name: &'static str, value: usize| {
                    metrics::gauge!(name, "schema" => schema.clone()).set(value as f64);
                };
                gauge("annals_pg_pool_connections", status.size);
                gauge("annals_pg_pool_max_connections", status.max_size);
                gauge("annals_pg_pool_idle", status.available);
                gauge("annals_pg_pool_waiting", status.waiting);
            }
        }
    }
}

/// The hook that runs the store's session settings on each new pooled
/// connection, bounded by the connect timeout.
fn set_session(settings: Arc<str>, within: Duration) -> deadpool_postgres::Hook {
    deadpool_postgres::Hook::async_fn(move |client: &mut deadpool_postgres::ClientWrapper, _| {
        let settings = settings.clone();
        Box::pin(async move {
            match tokio::time::timeout(within, client.batch_execute(&settings)).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(deadpool_postgres::HookError::Backend(e)),
                Err(_) => Err(deadpool_postgres::HookError::Message(
                    format!("no answer to the session settings within {within:?}").into(),
                )),
            }
        })
    })
}

/// The check an application's connection passes before it is handed out
/// again ([`PgStore::pool`]): it must be outside any transaction. One left
/// inside one (a bare `BEGIN` and an early return) would run the next
/// borrower's statements in that transaction, which nobody commits: its
/// writes would be answered and then lost when the session ends. Such a
/// connection is discarded instead (the server rolls its transaction back)
/// and the next one tried.
///
/// In the simple query protocol a statement that starts a transaction
/// takes its start time as the transaction's, so `now()` (the
/// transaction's start) equals `statement_timestamp()` exactly when no
/// transaction was open before; in an aborted transaction the statement
/// fails. (Not so in the extended protocol, where the transaction starts
/// at the Bind message and the statement's clock is read again at
/// Execute.) The round trip is bounded by the connect timeout (deadpool's
/// recycle timeout does not cover hooks).
fn outside_any_transaction(schema: Arc<str>, within: Duration) -> deadpool_postgres::Hook {
    deadpool_postgres::Hook::async_fn(move |client: &mut deadpool_postgres::ClientWrapper, _| {
        let schema = schema.clone();
        Box::pin(async move {
            let check = client.simple_query("SELECT now() = statement_timestamp()");
            let messages = match tokio::time::timeout(within, check).await {
                Ok(answer) => answer.map_err(deadpool_postgres::HookError::Backend)?,
                Err(_) => {
                    return Err(deadpool_postgres::HookError::Message(
                        format!("no answer to the transaction check within {within:?}").into(),
                    ));
                }
            };
            let outside = messages.iter().any(
                |m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(row) if row.get(0) == Some("t")),
            );
            if outside {
                return Ok(());
            }
            tracing::warn!(
                %schema,
                "a connection of PgStore::pool() came back inside a transaction; \
                 discarded (its transaction is rolled back)"
            );
            pooled::count_discarded(&schema);
            Err(deadpool_postgres::HookError::message("left inside a transaction"))
        })
    })
}

/// A failed first connection is "unreachable", whatever deadpool calls it.
fn open_error(e: deadpool_postgres::PoolError) -> PgError {
    match e {
        deadpool_postgres::PoolError::Timeout(_) => {
            PgError::Unreachable { message: "timed out connecting".into(), source: None }
        }
        other => other.into(),
    }
}

fn validate_schema(name: &str) -> Result<(), PgError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SCHEMA_LEN
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !name.as_bytes().first().is_some_and(u8::is_ascii_digit)
        // PostgreSQL's own schemas (pg_catalog, pg_toast, pg_temp_N): it
        // refuses to create one, or a table in one.
        && !name.starts_with("pg_");
    if ok { Ok(()) } else { Err(PgError::InvalidSchemaName { name: name.to_owned() }) }
}

impl PgStore {
    /// Options for opening a store at `url`
    /// (`postgres://user:password@host:port/database`).
    pub fn builder(url: impl Into<String>) -> PgStoreBuilder {
        PgStoreBuilder {
            url: url.into(),
            schema: DEFAULT_SCHEMA.to_owned(),
            max_connections: 16,
            connect_timeout: Duration::from_secs(5),
            pool_wait_timeout: Duration::from_secs(30),
            answer_timeout: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            subscription_retry: Duration::from_secs(60),
            stats_timeout: Duration::from_secs(5),
            limits: Limits::default(),
        }
    }

    /// Opens the store at `url` in the default schema with default options.
    pub async fn connect(url: impl Into<String>) -> Result<Self, PgError> {
        Self::builder(url).open().await
    }

    /// The schema this store lives in.
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// How many times the listener connection was re-established after it
    /// was lost.
    pub fn listener_reconnects(&self) -> u64 {
        self.inner.listener.reconnects.load(Ordering::Relaxed)
    }

    /// How many notifications the listener has received.
    pub fn notifications_received(&self) -> u64 {
        self.inner.listener.notifications.load(Ordering::Relaxed)
    }

    /// How many append rounds (one transaction each, one or more appends)
    /// ran on the exact path rather than in the single call of the fast
    /// path: the rounds with an idempotent re-send, a tombstoned stream, a
    /// failed expectation or events the functions cannot take (also counted
    /// as `annals_pg_append_exact_rounds_total`). Each costs two more round
    /// trips while it holds the head; a steady share of them in normal
    /// traffic points at clients re-sending or racing on streams.
    pub fn exact_append_rounds(&self) -> u64 {
        self.inner.exact_rounds.load(Ordering::Relaxed)
    }

    /// A connection pool for running other SQL against the same database
    /// (e.g. a projection's read queries). Its sessions have the store's
    /// session settings (READ COMMITTED whatever the database's default,
    /// unless the URL's `options` set another) and are not bounded by the
    /// answer timeout.
    ///
    /// These connections are the application's alone: the store's appends
    /// and reads run on a pool of their own, so nothing an application
    /// leaves in a session reaches them. Up to `max_connections` of them
    /// are opened, on first use, in addition to the store's own (named
    /// `annals-app {schema}` in `pg_stat_activity`). Each is checked when
    /// handed out again, one round trip: a connection given back inside a
    /// transaction (a bare `BEGIN` and an early return, or an aborted
    /// transaction) is discarded, which rolls that transaction back, rather
    /// than lending it to the next borrower, whose writes would otherwise
    /// be answered and never committed. Session settings an application
    /// changes (`SET`) stay with the connection.
    pub fn pool(&self) -> &Pool {
        &self.inner.app_pool
    }

    /// The store's own pool, for tests that break or inspect the
    /// connections its operations run on. Not for applications: see
    /// [`PgStore::pool`].
    #[doc(hidden)]
    pub fn store_pool(&self) -> &Pool {
        &self.inner.store_pool
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_peers_are_detected_unless_the_url_says_otherwise() {
        let mut config: tokio_postgres::Config = "postgres://u@h/db".parse().unwrap();
        detect_dead_peers(&mut config);
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(15));
        assert_eq!(config.get_keepalives_interval(), Some(Duration::from_secs(5)));
        assert_eq!(config.get_keepalives_retries(), Some(3));
        assert_eq!(config.get_tcp_user_timeout(), Some(&Duration::from_secs(30)));

        let mut config: tokio_postgres::Config =
            "postgres://u@h/db?keepalives_idle=600&keepalives_interval=60&keepalives_retries=9&tcp_user_timeout=120"
                .parse()
                .unwrap();
        detect_dead_peers(&mut config);
        assert_eq!(config.get_keepalives_idle(), Duration::from_secs(600));
        assert_eq!(config.get_keepalives_interval(), Some(Duration::from_secs(60)));
        assert_eq!(config.get_keepalives_retries(), Some(9));
        assert_eq!(config.get_tcp_user_timeout(), Some(&Duration::from_secs(120)));

        let mut config: tokio_postgres::Config = "postgres://u@h/db?keepalives=0".parse().unwrap();
        detect_dead_peers(&mut config);
        assert!(!config.get_keepalives());
        assert_eq!(config.get_tcp_user_timeout(), None);
    }

    #[test]
    fn session_settings_leave_what_the_url_sets_to_the_url() {
        let all = session_settings(None);
        assert_eq!(
            all,
            "SET tcp_keepalives_idle = 15; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3; \
             SET idle_in_transaction_session_timeout = '60s'; SET default_transaction_isolation = 'read committed'; \
             SET jit = off"
        );
        let some = session_settings(Some(
            "-c tcp_keepalives_idle=600 -cdefault_transaction_isolation=serializable --idle-in-transaction-session-timeout=0 -c jit=on",
        ));
        assert_eq!(some, "SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3; SET jit = off");
        assert_eq!(settings_named("  -c  a=1  -c B-c=2 --x=3 -c"), ["a", "b_c", "x"]);
    }

    #[test]
    fn schema_names_are_checked() {
        for ok in ["annals", "_x", "a1_b2", &"s".repeat(MAX_SCHEMA_LEN), "pg", "pgx_1", "_pg_x"] {
            assert!(validate_schema(ok).is_ok(), "{ok}");
        }
        for bad in
            ["", "1a", "A", "a-b", "a b", "a\"b", &"s".repeat(MAX_SCHEMA_LEN + 1), "pg_catalog", "pg_x"]
        {
            assert!(matches!(validate_schema(bad), Err(PgError::InvalidSchemaName { .. })), "{bad}");
        }
        // The NOTIFY channel of the longest schema still fits an identifier.
        assert!(sql::channel_name(&"s".repeat(MAX_SCHEMA_LEN)).len() <= 63);
    }
}
