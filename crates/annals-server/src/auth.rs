//! Authentication (JWT bearer tokens, API keys, optional anonymous role),
//! authorization (roles and stream-prefix ACLs) and per-client rate
//! limiting.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use axum::{
    extract::{FromRequestParts, Request, State},
    http::{StatusCode, header, request::Parts},
    middleware::Next,
    response::{IntoResponse, Response},
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

use crate::{
    AppState,
    config::{AuthConfig, IpNet, RateLimitConfig},
    error::{ApiError, ServerError},
    serve::ConnCtl,
};

/// What a principal may do. Ordered: each role includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Read streams, `$all`, live subscriptions, snapshots, stats.
    Reader,
    /// Also append, save snapshots and checkpoints.
    Writer,
    /// Also delete streams and read system streams.
    Admin,
}

impl Role {
    /// Parses `reader`, `writer` or `admin`.
    pub fn parse(s: &str) -> Option<Role> {
        match s.trim().to_ascii_lowercase().as_str() {
            "reader" | "read" => Some(Role::Reader),
            "writer" | "write" => Some(Role::Writer),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Who is making a request and what they may touch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Identity: token subject, API key name, or `anonymous`.
    pub name: String,
    /// Granted role.
    pub role: Role,
    /// Stream-name prefixes this principal may touch; `None` = all.
    pub streams: Option<Vec<String>>,
    /// Whether the principal presented credentials.
    pub authenticated: bool,
    /// Until when its credential is accepted, in seconds since the Unix
    /// epoch (a JWT's `exp` plus the leeway); `None` for API keys and
    /// anonymous access. A request is refused once it has passed; so is a
    /// new subscription on a WebSocket opened before.
    pub valid_until: Option<u64>,
}

impl Principal {
    /// Checks the role and, when a stream is given, the ACL (and that the
    /// credential has not expired since it was checked).
    pub fn authorize(&self, needed: Role, stream: Option<&str>) -> Result<(), ApiError> {
        if let Some(until) = self.valid_until {
            let now =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            if now > until {
                return Err(invalid_token("token expired"));
            }
        }
        if self.role < needed {
            return Err(ApiError::forbidden(format!(
                "'{}' has role {:?}; this needs {:?}",
                self.name, self.role, needed
            )));
        }
        if let (Some(stream), Some(prefixes)) = (stream, &self.streams)
            && !prefixes.iter().any(|p| stream.starts_with(p.as_str()))
        {
            return Err(ApiError::forbidden(format!("'{}' may not access stream '{stream}'", self.name)));
        }
        Ok(())
    }

    /// Checks access to `$all` (or a filtered view of it): principals
    /// restricted to prefixes must ask for a `stream_prefix` inside them.
    pub fn authorize_all(&self, needed: Role, stream_prefix: Option<&str>) -> Result<(), ApiError> {
        self.authorize(needed, None)?;
        if let Some(prefixes) = self.streams.as_ref().filter(|_| !self.sees_every_stream()) {
            let ok = stream_prefix.is_some_and(|sp| prefixes.iter().any(|p| sp.starts_with(p.as_str())));
            if !ok {
                return Err(ApiError::forbidden(format!(
                    "'{}' may only read $all with a stream_prefix starting with one of {:?}",
                    self.name, prefixes
                )));
            }
        }
        Ok(())
    }

    /// When its credential stops being accepted, as an instant of the
    /// runtime's clock: the start of the second after `valid_until` (a
    /// request is refused once the clock's whole seconds pass it). `None`
    /// for credentials that do not expire, or expire too far ahead for the
    /// clock to say.
    pub fn expires_at(&self) -> Option<tokio::time::Instant> {
        let until = self.valid_until?;
        let end = std::time::UNIX_EPOCH.checked_add(Duration::from_secs(until.checked_add(1)?))?;
        let left = end.duration_since(std::time::SystemTime::now()).unwrap_or_default();
        tokio::time::Instant::now().checked_add(left)
    }

    /// Whether this principal may see every stream (no prefix list, or an
    /// empty prefix in it), so figures about the whole store are its to see.
    pub fn sees_every_stream(&self) -> bool {
        self.streams.as_ref().is_none_or(|ps| ps.iter().any(String::is_empty))
    }

    /// Whether this principal may see events of `stream` (used to filter
    /// listings).
    pub fn may_see(&self, stream: &str) -> bool {
        self.streams.as_ref().is_none_or(|ps| ps.iter().any(|p| stream.starts_with(p.as_str())))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| ApiError::unauthenticated("no credentials were checked for this request"))
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: Option<String>,
    /// Required (and checked) by the validation; kept for later checks.
    /// A number (some issuers write a fraction).
    exp: f64,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    roles: Option<Vec<String>>,
    #[serde(default)]
    streams: Option<Vec<String>>,
}

/// Verifies credentials against the configuration.
pub struct Authenticator {
    anonymous: Option<Role>,
    hs256: Option<DecodingKey>,
    rs256: Option<DecodingKey>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: u64,
    api_keys: HashMap<String, Principal>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("anonymous", &self.anonymous)
            .field("hs256", &self.hs256.is_some())
            .field("rs256", &self.rs256.is_some())
            .field("api_keys", &self.api_keys.len())
            .finish()
    }
}

impl Authenticator {
    /// Builds the verifier; fails naming the key whose material is bad.
    pub fn new(config: &AuthConfig) -> Result<Self, ServerError> {
        let mut hs256 = None;
        let mut rs256 = None;
        let (mut issuer, mut audience, mut leeway) = (None, None, 30);
        if let Some(jwt) = &config.jwt {
            hs256 = jwt.hs256_secret.as_ref().map(|s| DecodingKey::from_secret(s.as_bytes()));
            let pem = match (&jwt.rs256_public_key, &jwt.rs256_public_key_file) {
                (Some(pem), _) => Some((pem.clone(), "auth.jwt.rs256_public_key")),
                (None, Some(path)) => Some((
                    std::fs::read_to_string(path).map_err(|e| {
                        ServerError::config(
                            "auth.jwt.rs256_public_key_file",
                            format!("{}: {e}", path.display()),
                        )
                    })?,
                    "auth.jwt.rs256_public_key_file",
                )),
                (None, None) => None,
            };
            if let Some((pem, key)) = pem {
                rs256 =
                    Some(DecodingKey::from_rsa_pem(pem.as_bytes()).map_err(|e| {
                        ServerError::config(key, format!("not an RSA public key in PEM: {e}"))
                    })?);
            }
            issuer = jwt.issuer.clone();
            audience = jwt.audience.clone();
            leeway = jwt.leeway_secs.unwrap_or(30);
        }
        let api_keys = config
            .api_keys
            .iter()
            .map(|k| {
                (
                    k.key.clone(),
                    Principal {
                        name: k.name.clone(),
                        role: k.role,
                        streams: k.streams.clone(),
                        authenticated: true,
                        valid_until: None,
                    },
                )
            })
            .collect();
        Ok(Authenticator { anonymous: config.anonymous, hs256, rs256, issuer, audience, leeway, api_keys })
    }

    /// Authenticates a request from its `Authorization` / `X-API-Key`
    /// headers or its `access_token` query parameter (for browsers'
    /// `EventSource` and `WebSocket`, which cannot set headers).
    pub fn authenticate(&self, parts: &Parts) -> Result<Principal, ApiError> {
        let mut credential: Option<String> = None;
        if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
            let value = value.to_str().map_err(|_| invalid_token("Authorization header is not ASCII"))?;
            let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
            if !(scheme.eq_ignore_ascii_case("bearer") || scheme.eq_ignore_ascii_case("apikey")) {
                return Err(invalid_token("use `Authorization: Bearer <token>` or `ApiKey <key>`"));
            }
            credential = Some(rest.trim().to_owned());
        } else if let Some(value) = parts.headers.get("x-api-key") {
            credential =
                Some(value.to_str().map_err(|_| invalid_token("X-API-Key is not ASCII"))?.trim().to_owned());
        } else if let Some(q) = parts.uri.query() {
            credential = q
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == "access_token")
                .map(|(_, v)| percent_decode(v));
        }
        match credential {
            None => match self.anonymous {
                Some(role) => Ok(Principal {
                    name: "anonymous".into(),
                    role,
                    streams: None,
                    authenticated: false,
                    valid_until: None,
                }),
                None => Err(ApiError::unauthenticated(
                    "credentials required: send `Authorization: Bearer <jwt>` or an API key",
                )),
            },
            Some(c) if c.is_empty() => Err(invalid_token("empty credential")),
            Some(c) => {
                if let Some(p) = self.api_keys.get(&c) {
                    return Ok(p.clone());
                }
                self.verify_jwt(&c)
            }
        }
    }

    fn verify_jwt(&self, token: &str) -> Result<Principal, ApiError> {
        let header =
            jsonwebtoken::decode_header(token).map_err(|_| invalid_token("not a valid API key or JWT"))?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref(),
            Algorithm::RS256 => self.rs256.as_ref(),
            _ => None,
        }
        .ok_or_else(|| invalid_token(format!("JWT algorithm {:?} is not accepted here", header.alg)))?;
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway;
        // Off by default in jsonwebtoken; a token not valid yet is refused
        // like an expired one (when it carries `nbf`).
        validation.validate_nbf = true;
        // jsonwebtoken checks `iss` and `aud` only when the token has them:
        // configured ones are required too, so that a token minted without
        // them (for another use of the same key) is refused.
        let mut required = vec!["exp", "sub"];
        match &self.issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        let data = jsonwebtoken::decode::<Claims>(token, key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            match e.kind() {
                ErrorKind::ExpiredSignature => invalid_token("token expired"),
                ErrorKind::ImmatureSignature => invalid_token("token not valid yet (`nbf` is in the future)"),
                ErrorKind::InvalidSignature => invalid_token("token signature is invalid"),
                ErrorKind::InvalidIssuer => invalid_token("token issuer is not accepted"),
                ErrorKind::InvalidAudience => invalid_token("token audience is not accepted"),
                ErrorKind::MissingRequiredClaim(c) => invalid_token(format!("token lacks the `{c}` claim")),
                _ => invalid_token(format!("token rejected: {e}")),
            }
        })?;
        let claims = data.claims;
        let mut role = None;
        for r in claims.role.iter().chain(claims.roles.iter().flatten()) {
            if let Some(r) = Role::parse(r) {
                role = role.max(Some(r));
            }
        }
        let role = role.ok_or_else(|| {
            ApiError::forbidden("token grants no role (set `role` or `roles` to reader, writer or admin)")
        })?;
        Ok(Principal {
            name: claims.sub.unwrap_or_else(|| "jwt".into()),
            role,
            streams: claims.streams,
            authenticated: true,
            // `as` saturates (and maps NaN to 0): the validation already
            // accepted this `exp`.
            valid_until: Some((claims.exp as u64).saturating_add(self.leeway)),
        })
    }
}

fn invalid_token(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "invalid_token", message)
}

/// Minimal `%XX` / `+` decoding for the `access_token` query parameter.
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    None => out.push(b),
                }
            }
            b'+' => out.push(b' '),
            _ => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A token bucket per client key.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
    trusted: Vec<IpNet>,
}

/// Buckets kept before idle (full) ones are dropped, bounding memory.
const MAX_BUCKETS: usize = 100_000;

impl RateLimiter {
    /// From the configuration; `None` when limiting is off.
    pub fn new(config: &RateLimitConfig) -> Option<Self> {
        (config.requests_per_second > 0.0).then(|| RateLimiter {
            rate: config.requests_per_second,
            burst: f64::from(config.burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
            // Validated with the configuration.
            trusted: config.trusted_proxies.iter().filter_map(|p| IpNet::parse(p)).collect(),
        })
    }

    /// The client address a request is limited by: the peer, or — when the
    /// peer is a trusted proxy — the nearest address in `X-Forwarded-For`
    /// that is not a trusted proxy itself (entries are appended left to
    /// right by each hop, so the right end is the one our proxies wrote).
    pub fn client_ip(&self, peer: IpAddr, headers: &axum::http::HeaderMap) -> IpAddr {
        let trusted = |ip: IpAddr| self.trusted.iter().any(|n| n.contains(ip));
        if !trusted(peer) {
            return peer;
        }
        // Several header lines read as one comma-separated list, in order.
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|t| t.split(','))
            .collect();
        let mut client = peer;
        for hop in hops.into_iter().rev() {
            let Ok(ip) = hop.trim().parse::<IpAddr>() else { return client };
            client = ip;
            if !trusted(ip) {
                return ip;
            }
        }
        client
    }

    /// Takes one token for `key`, or says how long until one is available.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(key) {
            let full_after = self.burst / self.rate;
            buckets.retain(|_, (_, last)| now.duration_since(*last).as_secs_f64() < full_after);
        }
        let (tokens, last) = buckets.entry(key.to_owned()).or_insert((self.burst, now));
        let refill = now.duration_since(*last).as_secs_f64() * self.rate;
        *tokens = (*tokens + refill).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::try_from_secs_f64((1.0 - *tokens) / self.rate).unwrap_or(Duration::MAX))
        }
    }
}

/// Paths anyone may call: liveness/readiness probes, version info and the
/// API description.
/// Paths served without authentication or rate limiting.
pub(crate) fn is_public(path: &str) -> bool {
    matches!(path, "/health/live" | "/health/ready" | "/info" | "/openapi.json")
}

/// Middleware: authenticates, rate-limits, and stores the [`Principal`] in
/// the request's extensions for handlers.
pub async fn auth_layer(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if is_public(request.uri().path()) {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    let by_address = |limiter: &RateLimiter| match parts.extensions.get::<ConnCtl>() {
        Some(ctl) => format!("ip:{}", limiter.client_ip(ctl.remote.ip(), &parts.headers)),
        None => "anonymous".to_owned(),
    };
    let principal = match state.inner.auth.authenticate(&parts) {
        Ok(p) => p,
        Err(e) => {
            // Failed attempts count against the client's address, so that
            // guessing keys (or sending tokens that each cost a signature
            // check) is limited like anonymous requests.
            if let Some(limiter) = &state.inner.limiter
                && let Err(wait) = limiter.check(&by_address(limiter))
            {
                return rate_limited(&state, wait);
            }
            return e.into_response();
        }
    };
    if let Some(limiter) = &state.inner.limiter {
        let key =
            if principal.authenticated { format!("user:{}", principal.name) } else { by_address(limiter) };
        if let Err(wait) = limiter.check(&key) {
            return rate_limited(&state, wait);
        }
    }
    parts.extensions.insert(principal);
    next.run(Request::from_parts(parts, body)).await
}

fn rate_limited(state: &AppState, wait: Duration) -> Response {
    state.inner.metrics.rate_limited.inc();
    let mut e =
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", "too many requests; retry later");
    e.retry_after = Some(wait.as_secs_f64().ceil().max(1.0) as u64);
    e.into_response()
}
