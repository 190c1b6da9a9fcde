//! Server configuration: plain data, deserialized from one TOML file plus
//! environment variables plus flags (the CLI does the layering), and
//! validated before anything starts. Every error names the bad key.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

use crate::{auth::Role, error::ServerError};

/// Everything `annals serve` can be configured with.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on (default `127.0.0.1:2113`).
    pub listen: SocketAddr,
    /// The URL other processes and clients reach this server at (e.g.
    /// `http://annals-2.internal:2113`). On a shared store the process that
    /// runs the consumer groups publishes it, and the others name it in
    /// their `groups_elsewhere` answers and in `/info`. Default: the
    /// listen address when it is a specific one, none for a wildcard
    /// (`0.0.0.0`, `[::]`).
    pub advertise_url: Option<String>,
    /// Allow a non-loopback bind without authentication.
    pub insecure: bool,
    /// Which store to serve (used by the CLI to open it).
    pub store: StoreConfig,
    /// Authentication and authorization.
    pub auth: AuthConfig,
    /// Request and read limits.
    pub limits: LimitsConfig,
    /// Per-client rate limiting.
    pub rate_limit: RateLimitConfig,
    /// Live (SSE / WebSocket) delivery.
    pub live: LiveConfig,
    /// Timeouts.
    pub timeouts: TimeoutsConfig,
    /// TLS; plain HTTP when absent.
    pub tls: Option<TlsConfig>,
    /// Logging.
    pub log: LogConfig,
    /// Consumer groups.
    pub groups: GroupsConfig,
}

/// Consumer groups (persistent subscriptions served over HTTP/WebSocket).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupsConfig {
    /// Whether this server runs consumer groups (default true). With several
    /// server processes on one PostgreSQL schema, the groups run on one of
    /// the processes that have them enabled (the holder of their lease);
    /// `false` keeps a process out of that election altogether.
    pub enabled: bool,
}

impl Default for GroupsConfig {
    fn default() -> Self {
        GroupsConfig { enabled: true }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 2113)),
            advertise_url: None,
            insecure: false,
            store: StoreConfig::default(),
            auth: AuthConfig::default(),
            limits: LimitsConfig::default(),
            rate_limit: RateLimitConfig::default(),
            live: LiveConfig::default(),
            timeouts: TimeoutsConfig::default(),
            tls: None,
            log: LogConfig::default(),
            groups: GroupsConfig::default(),
        }
    }
}

/// Which backend to open.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Data directory of the embedded log backend.
    pub data: PathBuf,
    /// Serve an in-memory store instead (nothing persists).
    pub memory: bool,
    /// PostgreSQL URL (shared backend).
    pub postgres: Option<String>,
    /// PostgreSQL schema holding the store's tables (several stores can
    /// share one database under different schemas).
    pub postgres_schema: String,
    /// Connections in the PostgreSQL pool (default 16, 1 to 1000). Each
    /// process also holds one `LISTEN` connection and, while it runs the
    /// consumer groups, one lease connection: budget `max_connections + 2`
    /// per process against the server's `max_connections`.
    pub postgres_max_connections: usize,
    /// How long one PostgreSQL connection attempt may take, in seconds
    /// (default 5).
    pub postgres_connect_timeout_secs: u64,
    /// How long one operation waits for PostgreSQL to answer, in seconds
    /// (default 10, 1 to 3600): past it the operation fails with a 503 and
    /// its connection is closed (a stopped server or a wedged network path
    /// the TCP probes cannot see). With PostgreSQL configured, twice this
    /// must stay below `timeouts.request_secs`: an append that gets no
    /// answer is checked against the log before it is answered (up to a
    /// second timeout), and a request cut off by the request timeout first
    /// tells its client only `timeout`, not whether the append was written.
    pub postgres_answer_timeout_secs: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            data: PathBuf::from("./annals-data"),
            memory: false,
            postgres: None,
            postgres_schema: "annals".to_owned(),
            postgres_max_connections: 16,
            postgres_connect_timeout_secs: 5,
            postgres_answer_timeout_secs: 10,
        }
    }
}

/// Authentication: JWTs, API keys, and whether anonymous requests are
/// allowed.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Role given to requests without credentials; `None` rejects them
    /// with 401.
    pub anonymous: Option<Role>,
    /// JWT bearer tokens.
    pub jwt: Option<JwtConfig>,
    /// Static API keys.
    pub api_keys: Vec<ApiKeyConfig>,
}

impl AuthConfig {
    /// Whether any credential is configured.
    pub fn has_credentials(&self) -> bool {
        self.jwt.is_some() || !self.api_keys.is_empty()
    }
}

/// JWT verification keys and claims checks.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtConfig {
    /// Shared secret for HS256 tokens.
    pub hs256_secret: Option<String>,
    /// PEM text of the RSA public key for RS256 tokens.
    pub rs256_public_key: Option<String>,
    /// Path of a PEM file with the RSA public key for RS256 tokens.
    pub rs256_public_key_file: Option<PathBuf>,
    /// Required `iss`, if set.
    pub issuer: Option<String>,
    /// Required `aud`, if set.
    pub audience: Option<String>,
    /// Clock skew tolerated when checking `exp`/`nbf`, seconds (default 30,
    /// at most [`MAX_JWT_LEEWAY_SECS`]).
    pub leeway_secs: Option<u64>,
}

/// Largest `auth.jwt.leeway_secs` accepted: a day.
pub const MAX_JWT_LEEWAY_SECS: u64 = 86_400;

/// One static API key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Name used in logs and as the rate-limit identity.
    pub name: String,
    /// The secret key (at least 16 characters).
    pub key: String,
    /// Role granted.
    pub role: Role,
    /// Stream-name prefixes this key may touch; all streams when absent.
    #[serde(default)]
    pub streams: Option<Vec<String>>,
}

/// Size limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Maximum request body, bytes (default 8 MiB).
    pub max_body_bytes: usize,
    /// Default page size of reads (default 100).
    pub default_read_limit: usize,
    /// Maximum page size of reads (default 4096).
    pub max_read_limit: usize,
    /// `/stats` scans at most this many events of `$all` when it counts by
    /// type itself (a backend that cannot count natively, or a principal
    /// restricted to stream prefixes), and says `complete: false` when the
    /// scan stopped there.
    pub max_scan_events: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_body_bytes: 8 * 1024 * 1024,
            default_read_limit: 100,
            max_read_limit: 4096,
            max_scan_events: 1_000_000,
        }
    }
}

/// Token-bucket rate limiting per client (authenticated identity, or the
/// remote IP for anonymous requests).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Sustained requests per second per client; 0 disables limiting.
    pub requests_per_second: f64,
    /// Bucket size: requests allowed in a burst.
    pub burst: u32,
    /// Reverse proxies (addresses like `10.0.0.7` or networks like
    /// `10.0.0.0/8`) whose `X-Forwarded-For` header is believed: an anonymous
    /// request arriving from one of them is limited by the nearest
    /// untrusted address in that header. Empty (the default): the header is
    /// ignored, since any client can send it.
    pub trusted_proxies: Vec<String>,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig { requests_per_second: 0.0, burst: 100, trusted_proxies: Vec::new() }
    }
}

/// An address or network of `rate_limit.trusted_proxies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: std::net::IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Parses `1.2.3.4`, `10.0.0.0/8`, `::1` or `fd00::/8`.
    pub fn parse(s: &str) -> Option<IpNet> {
        let (addr, prefix) = match s.trim().split_once('/') {
            Some((a, p)) => (a.parse().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (s.trim().parse().ok()?, None),
        };
        let max = match addr {
            std::net::IpAddr::V4(_) => 32,
            std::net::IpAddr::V6(_) => 128,
        };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(IpNet { addr, prefix })
    }

    /// Whether `ip` is inside (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Live delivery to SSE and WebSocket clients.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LiveConfig {
    /// Events buffered per connection between the store and the socket.
    pub buffer_events: usize,
    /// A connection whose buffer stays full this long is told
    /// `slow_consumer` and disconnected, milliseconds (default 5000).
    pub slow_client_timeout_ms: u64,
    /// After the notice, how long the client gets to read it before the
    /// connection is closed, milliseconds (default 5000).
    pub disconnect_grace_ms: u64,
    /// SSE keep-alive comment interval, seconds (default 15).
    pub keep_alive_secs: u64,
    /// WebSocket ping interval, milliseconds (default 20000). A client that
    /// sends nothing — no pong, no message — for three intervals is told
    /// `ping_timeout` and disconnected.
    pub ws_ping_ms: u64,
}

impl Default for LiveConfig {
    fn default() -> Self {
        LiveConfig {
            buffer_events: 1024,
            slow_client_timeout_ms: 5000,
            disconnect_grace_ms: 5000,
            keep_alive_secs: 15,
            ws_ping_ms: 20_000,
        }
    }
}

impl LiveConfig {
    /// `slow_client_timeout_ms` as a duration.
    pub fn slow_client_timeout(&self) -> Duration {
        Duration::from_millis(self.slow_client_timeout_ms)
    }

    /// `ws_ping_ms` as a duration (at least 10 ms).
    pub fn ws_ping(&self) -> Duration {
        Duration::from_millis(self.ws_ping_ms.max(10))
    }

    /// `disconnect_grace_ms` as a duration.
    pub fn disconnect_grace(&self) -> Duration {
        Duration::from_millis(self.disconnect_grace_ms)
    }
}

/// Timeouts.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// Whole-request timeout for non-streaming requests, seconds (default 30).
    pub request_secs: u64,
    /// Time to read a request's headers, seconds (default 10).
    pub header_read_secs: u64,
    /// How long shutdown waits for in-flight requests, seconds (default 30).
    pub shutdown_secs: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        TimeoutsConfig { request_secs: 30, header_read_secs: 10, shutdown_secs: 30 }
    }
}

/// TLS certificate and key (PEM files).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificate chain, PEM.
    pub cert: PathBuf,
    /// Private key, PEM.
    pub key: PathBuf,
}

/// Log output.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `pretty` (default) or `json`.
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `annals_server=debug` (default `info`).
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Pretty, level: "info".into() }
    }
}

/// Log format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    Pretty,
    /// One JSON object per line.
    Json,
}

impl ServerConfig {
    /// Checks every value; the error names the first bad key.
    pub fn validate(&self) -> Result<(), ServerError> {
        if let Some(url) = &self.advertise_url {
            let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
            if !rest.is_some_and(|host| !host.is_empty() && !host.starts_with('/')) {
                return Err(ServerError::config(
                    "advertise_url",
                    "must be an http:// or https:// URL with a host, e.g. http://annals-2.internal:2113",
                ));
            }
            if url.len() > annals_core::MAX_LEASE_HOLDER_LEN
                || url.chars().any(|c| c.is_whitespace() || c.is_control())
            {
                return Err(ServerError::config(
                    "advertise_url",
                    format!("must be at most {} bytes without spaces", annals_core::MAX_LEASE_HOLDER_LEN),
                ));
            }
        }
        if !(1..=1000).contains(&self.store.postgres_max_connections) {
            return Err(ServerError::config("store.postgres_max_connections", "must be between 1 and 1000"));
        }
        if !(1..=300).contains(&self.store.postgres_connect_timeout_secs) {
            return Err(ServerError::config(
                "store.postgres_connect_timeout_secs",
                "must be between 1 and 300",
            ));
        }
        if !(1..=3600).contains(&self.store.postgres_answer_timeout_secs) {
            return Err(ServerError::config(
                "store.postgres_answer_timeout_secs",
                "must be between 1 and 3600",
            ));
        }
        if self.store.postgres.is_some()
            && self.store.postgres_answer_timeout_secs.saturating_mul(2) >= self.timeouts.request_secs
        {
            return Err(ServerError::config(
                "store.postgres_answer_timeout_secs",
                format!(
                    "twice it ({}) must be below timeouts.request_secs ({}): an append that gets no answer is \
                     checked against the log before it is answered, and a request cut off first only learns \
                     'timeout', not whether it was written",
                    self.store.postgres_answer_timeout_secs.saturating_mul(2),
                    self.timeouts.request_secs
                ),
            ));
        }
        let l = &self.limits;
        if l.max_body_bytes < 1024 {
            return Err(ServerError::config("limits.max_body_bytes", "must be at least 1024"));
        }
        if l.max_read_limit == 0 {
            return Err(ServerError::config("limits.max_read_limit", "must be at least 1"));
        }
        if l.default_read_limit == 0 || l.default_read_limit > l.max_read_limit {
            return Err(ServerError::config(
                "limits.default_read_limit",
                "must be between 1 and limits.max_read_limit",
            ));
        }
        let r = &self.rate_limit;
        if !r.requests_per_second.is_finite() || r.requests_per_second < 0.0 {
            return Err(ServerError::config("rate_limit.requests_per_second", "must be a number >= 0"));
        }
        if let Some(bad) = r.trusted_proxies.iter().find(|p| IpNet::parse(p).is_none()) {
            return Err(ServerError::config(
                "rate_limit.trusted_proxies",
                format!("'{bad}' is not an IP address or network (e.g. 10.0.0.7 or 10.0.0.0/8)"),
            ));
        }
        if r.requests_per_second > 0.0 && r.burst == 0 {
            return Err(ServerError::config(
                "rate_limit.burst",
                "must be at least 1 when rate limiting is on",
            ));
        }
        if self.live.buffer_events == 0 {
            return Err(ServerError::config("live.buffer_events", "must be at least 1"));
        }
        if self.live.slow_client_timeout_ms == 0 {
            return Err(ServerError::config("live.slow_client_timeout_ms", "must be at least 1"));
        }
        if self.timeouts.request_secs == 0 {
            return Err(ServerError::config("timeouts.request_secs", "must be at least 1"));
        }
        if self.timeouts.header_read_secs == 0 {
            return Err(ServerError::config("timeouts.header_read_secs", "must be at least 1"));
        }
        if let Some(jwt) = &self.auth.jwt {
            if jwt.hs256_secret.is_none()
                && jwt.rs256_public_key.is_none()
                && jwt.rs256_public_key_file.is_none()
            {
                return Err(ServerError::config(
                    "auth.jwt",
                    "set hs256_secret, rs256_public_key or rs256_public_key_file",
                ));
            }
            if jwt.hs256_secret.as_ref().is_some_and(|s| s.len() < 16) {
                return Err(ServerError::config("auth.jwt.hs256_secret", "must be at least 16 bytes"));
            }
            // Added to and subtracted from the clock when tokens are
            // checked: beyond any real clock skew it would overflow there.
            if jwt.leeway_secs.is_some_and(|s| s > MAX_JWT_LEEWAY_SECS) {
                return Err(ServerError::config(
                    "auth.jwt.leeway_secs",
                    format!("must be at most {MAX_JWT_LEEWAY_SECS} (a day)"),
                ));
            }
            if jwt.rs256_public_key.is_some() && jwt.rs256_public_key_file.is_some() {
                return Err(ServerError::config(
                    "auth.jwt.rs256_public_key_file",
                    "set either rs256_public_key or rs256_public_key_file, not both",
                ));
            }
        }
        let mut names = std::collections::HashSet::new();
        for (i, k) in self.auth.api_keys.iter().enumerate() {
            if k.key.len() < 16 {
                return Err(ServerError::config(
                    format!("auth.api_keys[{i}].key"),
                    "must be at least 16 characters",
                ));
            }
            if k.name.is_empty() || !names.insert(k.name.as_str()) {
                return Err(ServerError::config(
                    format!("auth.api_keys[{i}].name"),
                    "must be non-empty and unique",
                ));
            }
            if k.streams.as_ref().is_some_and(|s| s.iter().any(String::is_empty)) {
                return Err(ServerError::config(
                    format!("auth.api_keys[{i}].streams"),
                    "prefixes must not be empty (omit `streams` to allow all)",
                ));
            }
        }
        if let Some(tls) = &self.tls {
            if !tls.cert.is_file() {
                return Err(ServerError::config(
                    "tls.cert",
                    format!("{} is not a readable file", tls.cert.display()),
                ));
            }
            if !tls.key.is_file() {
                return Err(ServerError::config(
                    "tls.key",
                    format!("{} is not a readable file", tls.key.display()),
                ));
            }
        }
        Ok(())
    }

    /// The startup safety rule: a bind address that is not loopback needs
    /// authentication configured (or `insecure`). Anonymous access on a
    /// public address is refused too unless `insecure`.
    pub fn check_exposure(&self) -> Result<(), ServerError> {
        if self.listen.ip().is_loopback() || self.insecure {
            return Ok(());
        }
        if !self.auth.has_credentials() {
            return Err(ServerError::config(
                "listen",
                format!(
                    "{} is not a loopback address and no authentication is configured; configure auth.jwt or auth.api_keys, or pass --insecure",
                    self.listen
                ),
            ));
        }
        if self.auth.anonymous.is_some() {
            return Err(ServerError::config(
                "auth.anonymous",
                "anonymous access on a non-loopback address needs --insecure",
            ));
        }
        Ok(())
    }
}
