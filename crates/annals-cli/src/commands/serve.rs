//! `annals serve`: layered configuration (defaults < TOML file <
//! `ANNALS_*` environment < flags), store opening, logging, and the server.

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use annals_core::{MemoryStore, Store};
use annals_server::{
    AppState, Role, ServerConfig,
    config::{ApiKeyConfig, JwtConfig, LogFormat, StoreConfig, TlsConfig},
};
use clap::Args;
use figment::{
    Figment,
    providers::{Env, Format, Serialized, Toml},
};

use crate::error::CliError;

/// Flags of `annals serve`. Each overrides the same key of the config file
/// and of the environment.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "ANNALS_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory of the embedded log backend (default ./annals-data).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1:2113; port 0 picks a free one).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
    /// The URL other processes and clients reach this server at; on a
    /// shared store, group requests sent to another process name it.
    #[arg(long)]
    pub advertise_url: Option<String>,
    /// Serve an in-memory store (nothing persists).
    #[arg(long)]
    pub memory: bool,
    /// Serve a PostgreSQL database, e.g. postgres://user@host:5432/db (the
    /// shared backend: several servers can serve one database).
    #[arg(long)]
    pub postgres: Option<String>,
    /// PostgreSQL schema for the store's tables (default `annals`).
    #[arg(long)]
    pub postgres_schema: Option<String>,
    /// Connections in the PostgreSQL pool (default 16).
    #[arg(long)]
    pub postgres_max_connections: Option<usize>,
    /// Allow a non-loopback address without authentication.
    #[arg(long)]
    pub insecure: bool,
    /// Role for requests without credentials: reader, writer, admin or none.
    #[arg(long)]
    pub anonymous: Option<String>,
    /// Shared secret for HS256 JWTs.
    #[arg(long, env = "ANNALS_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM file with the RSA public key for RS256 JWTs.
    #[arg(long)]
    pub jwt_public_key: Option<PathBuf>,
    /// A static API key, `NAME:ROLE:KEY` (repeatable).
    #[arg(long = "add-api-key", value_name = "NAME:ROLE:KEY")]
    pub api_keys: Vec<String>,
    /// Requests per second per client (0 = unlimited).
    #[arg(long)]
    pub rate_limit: Option<f64>,
    /// Rate-limit burst size.
    #[arg(long)]
    pub rate_burst: Option<u32>,
    /// Maximum request body in bytes.
    #[arg(long)]
    pub max_body_bytes: Option<usize>,
    /// TLS certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM); needs --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Log format: pretty or json.
    #[arg(long)]
    pub log_format: Option<String>,
    /// Log filter, e.g. info or annals_server=debug.
    #[arg(long)]
    pub log_level: Option<String>,
    /// Validate the configuration, print it as JSON and exit.
    #[arg(long)]
    pub check_config: bool,
}

/// Top-level keys of the configuration; other `ANNALS_*` variables (such
/// as `ANNALS_URL` for the client commands) are not configuration.
const TOP_LEVEL_KEYS: &[&str] = &[
    "listen",
    "advertise_url",
    "insecure",
    "store",
    "auth",
    "limits",
    "rate_limit",
    "live",
    "timeouts",
    "tls",
    "log",
    "groups",
];

/// Builds the configuration from every layer and validates it.
pub fn load_config(args: &ServeArgs) -> Result<ServerConfig, CliError> {
    let mut figment = Figment::from(Serialized::defaults(ServerConfig::default()));
    if let Some(path) = &args.config {
        if !path.is_file() {
            return Err(CliError::Usage(format!("--config {}: no such file", path.display())));
        }
        figment = figment.merge(Toml::file(path));
    }
    figment = figment.merge(Env::prefixed("ANNALS_").split("__").filter(|k| {
        // Keys can reach the filter in their original (upper) case.
        let k = k.as_str().to_ascii_lowercase();
        TOP_LEVEL_KEYS.iter().any(|t| k == *t || k.starts_with(&format!("{t}.")))
    }));
    let mut config: ServerConfig =
        figment.extract().map_err(|e| CliError::Usage(format!("invalid configuration: {e}")))?;
    apply_flags(&mut config, args)?;
    if !config.auth.has_credentials() && config.auth.anonymous.is_none() && config.listen.ip().is_loopback() {
        // Documented default: a loopback server with no credentials
        // configured is a developer's server, open to local clients.
        config.auth.anonymous = Some(Role::Admin);
    }
    config.validate()?;
    config.check_exposure()?;
    Ok(config)
}

fn apply_flags(config: &mut ServerConfig, args: &ServeArgs) -> Result<(), CliError> {
    if let Some(d) = &args.data {
        config.store.data = d.clone();
    }
    if let Some(l) = args.listen {
        config.listen = l;
    }
    if let Some(url) = &args.advertise_url {
        config.advertise_url = Some(url.clone());
    }
    if args.memory {
        config.store.memory = true;
    }
    if let Some(p) = &args.postgres {
        config.store.postgres = Some(p.clone());
    }
    if let Some(s) = &args.postgres_schema {
        config.store.postgres_schema = s.clone();
    }
    if let Some(n) = args.postgres_max_connections {
        config.store.postgres_max_connections = n;
    }
    if args.insecure {
        config.insecure = true;
    }
    if let Some(a) = &args.anonymous {
        config.auth.anonymous = match a.as_str() {
            "none" => None,
            other => Some(Role::parse(other).ok_or_else(|| {
                CliError::Usage(format!("--anonymous must be reader, writer, admin or none, got '{other}'"))
            })?),
        };
    }
    if args.jwt_secret.is_some() || args.jwt_public_key.is_some() {
        let jwt = config.auth.jwt.get_or_insert_with(JwtConfig::default);
        if let Some(s) = &args.jwt_secret {
            jwt.hs256_secret = Some(s.clone());
        }
        if let Some(p) = &args.jwt_public_key {
            jwt.rs256_public_key_file = Some(p.clone());
            jwt.rs256_public_key = None;
        }
    }
    for spec in &args.api_keys {
        let mut parts = spec.splitn(3, ':');
        let (Some(name), Some(role), Some(key)) = (parts.next(), parts.next(), parts.next()) else {
            return Err(CliError::Usage(format!("--add-api-key expects NAME:ROLE:KEY, got '{spec}'")));
        };
        let role = Role::parse(role).ok_or_else(|| {
            CliError::Usage(format!("--add-api-key: role must be reader, writer or admin, got '{role}'"))
        })?;
        config.auth.api_keys.push(ApiKeyConfig { name: name.into(), key: key.into(), role, streams: None });
    }
    if let Some(r) = args.rate_limit {
        config.rate_limit.requests_per_second = r;
    }
    if let Some(b) = args.rate_burst {
        config.rate_limit.burst = b;
    }
    if let Some(m) = args.max_body_bytes {
        config.limits.max_body_bytes = m;
    }
    if let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) {
        config.tls = Some(TlsConfig { cert: cert.clone(), key: key.clone() });
    }
    if let Some(f) = &args.log_format {
        config.log.format = match f.as_str() {
            "pretty" => LogFormat::Pretty,
            "json" => LogFormat::Json,
            other => {
                return Err(CliError::Usage(format!("--log-format must be pretty or json, got '{other}'")));
            }
        };
    }
    if let Some(l) = &args.log_level {
        config.log.level = l.clone();
    }
    Ok(())
}

/// An opened store and what the server needs to know about it.
pub struct OpenedStore {
    /// The store, behind the object-safe umbrella trait.
    pub store: Arc<dyn Store>,
    /// Backend name for `/info` and logs.
    pub backend: &'static str,
    /// Leases, for a store several processes may share (PostgreSQL).
    pub leases: Option<Arc<dyn annals_core::Leases>>,
    /// The embedded log, kept to close it explicitly (sync + index
    /// checkpoint) after the server has drained.
    log: Option<annals_log::LogStore>,
}

impl OpenedStore {
    /// Closes the backend cleanly. For the embedded log this syncs and
    /// writes the index checkpoint, so the next open does not replay.
    pub async fn close(self) -> Result<(), CliError> {
        drop(self.store);
        if let Some(log) = self.log {
            tokio::task::spawn_blocking(move || log.close())
                .await
                .map_err(|e| CliError::Other(format!("closing the store failed: {e}")))?
                .map_err(|e| CliError::Other(format!("closing the store failed: {e}")))?;
        }
        Ok(())
    }
}

/// Opens the configured store. The one place that knows the backends:
/// PostgreSQL (`store.postgres`), in-memory (`store.memory`), or the
/// embedded log in `store.data` (the default).
pub async fn open_store(config: &StoreConfig) -> Result<OpenedStore, CliError> {
    if let Some(url) = &config.postgres {
        if config.memory {
            return Err(CliError::Usage(
                "--memory and --postgres exclude each other; pick one backend".into(),
            ));
        }
        let store = annals_postgres::PgStore::builder(url.clone())
            .schema(config.postgres_schema.clone())
            .max_connections(config.postgres_max_connections)
            .connect_timeout(std::time::Duration::from_secs(config.postgres_connect_timeout_secs))
            .answer_timeout(std::time::Duration::from_secs(config.postgres_answer_timeout_secs))
            .open()
            .await
            .map_err(|e| match e {
                annals_postgres::PgError::InvalidUrl { .. }
                | annals_postgres::PgError::InvalidTls { .. }
                | annals_postgres::PgError::InvalidSchemaName { .. } => {
                    CliError::Usage(format!("invalid configuration `store.postgres`: {e}"))
                }
                other => CliError::Other(format!("cannot open the PostgreSQL store: {other}")),
            })?;
        return Ok(OpenedStore {
            store: Arc::new(store.clone()),
            backend: "postgres",
            leases: Some(Arc::new(store)),
            log: None,
        });
    }
    if config.memory {
        return Ok(OpenedStore {
            store: Arc::new(MemoryStore::new()),
            backend: "memory",
            leases: None,
            log: None,
        });
    }
    let log = annals_log::LogStore::open(&config.data).map_err(|e| match e {
        annals_log::LogError::Locked { .. } => CliError::Usage(format!(
            "{e}; another annals process is using it (stop it, or use a different data directory)"
        )),
        annals_log::LogError::Corrupt { .. } => CliError::Damaged(format!(
            "{e}; run `annals verify {}` and restore from a backup, or cut the log back to the last \
             whole group before the damage with `annals repair {} --yes`",
            config.data.display(),
            config.data.display()
        )),
        other => {
            CliError::Other(format!("cannot open the data directory {}: {other}", config.data.display()))
        }
    })?;
    Ok(OpenedStore { store: Arc::new(log.clone()), backend: "log", leases: None, log: Some(log) })
}

fn init_logging(config: &ServerConfig) -> Result<(), CliError> {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log.level)
        .map_err(|e| CliError::Usage(format!("invalid configuration `log.level`: {e}")))?;
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let result = match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(true).try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
    result.map_err(|e| CliError::Other(format!("cannot initialise logging: {e}")))
}

/// Runs the server until Ctrl-C or SIGTERM.
pub async fn run(args: ServeArgs) -> Result<(), CliError> {
    let config = load_config(&args)?;
    if args.check_config {
        return crate::output::emit(
            serde_json::to_string_pretty(&config).map_err(|e| CliError::Other(e.to_string()))?,
        );
    }
    init_logging(&config)?;
    let opened = open_store(&config.store).await?;
    let (store, backend) = (opened.store.clone(), opened.backend);
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| CliError::Other(format!("cannot listen on {}: {e}", config.listen)))?;
    let addr = listener.local_addr()?;
    let scheme = if config.tls.is_some() { "https" } else { "http" };
    let anonymous = config.auth.anonymous;
    let state = AppState::with_backend(store, config, backend)?;
    if let Some(leases) = opened.leases.clone() {
        state.attach_leases(leases);
    }
    // Consumers, projections and the log's fsync timings report through the
    // `metrics` facade; `/metrics` renders them with the server's own.
    if let Some(recorder) = annals_server::metrics::FacadeRecorder::install() {
        state.attach_facade_recorder(recorder);
    }
    let shutdown = shutdown_signal();
    // Tests and scripts read this line to find the port.
    say(&format!("annals listening on {scheme}://{addr} (backend: {backend}, anonymous: {anonymous:?})"));
    annals_server::run(listener, state, shutdown).await?;
    opened.close().await?;
    say("annals stopped");
    Ok(())
}

/// Prints a status line on stdout; a closed stdout (the reader went away)
/// must not take the server down, so write errors are ignored.
fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Installs the SIGTERM / SIGINT handlers now (so a signal that arrives
/// right after start-up is not lost to the default action) and returns the
/// future that resolves on either.
#[cfg(unix)]
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate()).ok();
    let int = signal(SignalKind::interrupt()).ok();
    async move {
        match (term, int) {
            (Some(mut term), Some(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Some(mut one), None) | (None, Some(mut one)) => {
                one.recv().await;
            }
            (None, None) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}

/// Ctrl-C elsewhere.
#[cfg(not(unix))]
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}
