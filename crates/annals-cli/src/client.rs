//! A small HTTP client for the Annals API (reqwest).

use clap::Args;
use reqwest::{Method, RequestBuilder, Response};
use serde_json::{Value, value::RawValue};

use crate::error::CliError;

/// Where the server is and how to authenticate.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Server URL.
    #[arg(long, env = "ANNALS_URL", default_value = "http://127.0.0.1:2113", global = true)]
    pub url: String,
    /// JWT bearer token.
    #[arg(long, env = "ANNALS_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// API key.
    #[arg(long, env = "ANNALS_API_KEY", global = true, hide_env_values = true)]
    pub api_key: Option<String>,
    /// PEM file of a CA certificate to trust for https:// URLs (in addition
    /// to the bundled web roots).
    #[arg(long, env = "ANNALS_CA_CERT", global = true)]
    pub ca_cert: Option<std::path::PathBuf>,
    /// Print JSON instead of tables (for scripts).
    #[arg(long, global = true)]
    pub json: bool,
}

/// A connected client.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: String,
    auth: Option<String>,
}

impl Client {
    /// From the command-line arguments.
    pub fn new(args: &ClientArgs) -> Result<Self, CliError> {
        let base = args.url.trim_end_matches('/').to_owned();
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(CliError::Usage(format!("--url must start with http:// or https://, got '{base}'")));
        }
        let mut builder = reqwest::Client::builder().pool_max_idle_per_host(256).tcp_nodelay(true);
        if let Some(path) = &args.ca_cert {
            let pem = std::fs::read(path)
                .map_err(|e| CliError::Usage(format!("--ca-cert {}: {e}", path.display())))?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                CliError::Usage(format!("--ca-cert {}: not a PEM certificate: {e}", path.display()))
            })?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder.build().map_err(|e| CliError::Other(e.to_string()))?;
        let auth = match (&args.token, &args.api_key) {
            (Some(t), _) => Some(format!("Bearer {t}")),
            (None, Some(k)) => Some(format!("ApiKey {k}")),
            (None, None) => None,
        };
        Ok(Client { http, base, auth })
    }

    /// A request to `path` (which starts with `/`).
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(a) = &self.auth {
            req = req.header(reqwest::header::AUTHORIZATION, a);
        }
        req
    }

    /// The `Authorization` header value sent with every request, if any.
    pub fn auth_header(&self) -> Option<&str> {
        self.auth.as_deref()
    }

    /// Sends and turns error statuses into [`CliError::Api`].
    pub async fn send(&self, req: RequestBuilder) -> Result<Response, CliError> {
        let resp = req.send().await.map_err(|e| self.transport(e))?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        Err(api_error(resp).await)
    }

    /// Sends and parses a JSON answer.
    pub async fn json(&self, req: RequestBuilder) -> Result<Value, CliError> {
        let resp = self.send(req).await?;
        if resp.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        resp.json().await.map_err(|e| CliError::Other(format!("invalid JSON from the server: {e}")))
    }

    /// Sends and returns the body of a successful answer as it came, for
    /// answers that carry event data: that is the exact JSON text the store
    /// holds, which a round trip through [`Value`] would change (numbers
    /// beyond `f64` rounded, or refused).
    pub async fn text(&self, req: RequestBuilder) -> Result<String, CliError> {
        let resp = self.send(req).await?;
        resp.text().await.map_err(|e| self.transport(e))
    }

    /// Sends and parses the answer into `T`. Fields `T` does not name (event
    /// data in a page whose `head` is all that is wanted) are skipped
    /// without being parsed.
    pub async fn parse<T: serde::de::DeserializeOwned>(&self, req: RequestBuilder) -> Result<T, CliError> {
        let text = self.text(req).await?;
        serde_json::from_str(&text).map_err(|e| CliError::Other(format!("invalid JSON from the server: {e}")))
    }

    /// Maps a transport error.
    pub fn transport(&self, e: reqwest::Error) -> CliError {
        CliError::Unreachable { url: self.base.clone(), message: e.to_string() }
    }
}

/// Reads the JSON error body of a failed response.
pub async fn api_error(resp: Response) -> CliError {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or(Value::Null);
    let field =
        |k: &str| body.pointer(&format!("/error/{k}")).and_then(Value::as_str).unwrap_or("").to_owned();
    let (code, message) = (field("code"), field("message"));
    CliError::Api {
        status,
        code: if code.is_empty() { "error".into() } else { code },
        message: if message.is_empty() { "(no message)".into() } else { message },
    }
}

pub use annals_server::wire::enc;

/// A page of events as the server sent it: each event is kept as its JSON
/// text.
#[derive(Debug, serde::Deserialize)]
pub struct RawPage {
    /// The events, unparsed.
    #[serde(default)]
    pub events: Vec<Box<RawValue>>,
    /// Where the next page starts, when there may be one.
    #[serde(default)]
    pub next: Option<u64>,
}

/// The fields of an event the CLI shows; `data` stays the stored JSON text.
#[derive(Debug, Default, serde::Deserialize)]
pub struct EventView {
    /// Global position.
    #[serde(default)]
    pub position: Value,
    /// Stream name.
    #[serde(default)]
    pub stream: Value,
    /// Version in the stream.
    #[serde(default)]
    pub version: Value,
    /// Event type.
    #[serde(default, rename = "type")]
    pub event_type: Value,
    /// Commit time.
    #[serde(default)]
    pub recorded_at: Value,
    /// The data, as stored.
    #[serde(default)]
    pub data: Box<RawValue>,
}

/// JSON text on one line. A raw line feed or carriage return can only be
/// whitespace between tokens (inside a string JSON escapes them), so each
/// becomes a space: the same JSON, every other byte and every number kept.
pub fn one_line(json: &str) -> std::borrow::Cow<'_, str> {
    if json.contains(['\n', '\r']) {
        std::borrow::Cow::Owned(json.replace(['\n', '\r'], " "))
    } else {
        std::borrow::Cow::Borrowed(json)
    }
}

/// Splits a `text/event-stream` body into `(event, id, data)` records.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    event: String,
    id: Option<String>,
    data: String,
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub struct SseEvent {
    /// The `event:` field (`message` when absent).
    pub event: String,
    /// The `id:` field.
    pub id: Option<String>,
    /// The joined `data:` lines.
    pub data: String,
}

impl SseParser {
    /// Feeds bytes; returns the complete events they finish.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<SseEvent> {
        self.buf.extend_from_slice(chunk);
        let mut out = Vec::new();
        while let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if !self.data.is_empty() || !self.event.is_empty() {
                    out.push(SseEvent {
                        event: if self.event.is_empty() {
                            "message".into()
                        } else {
                            std::mem::take(&mut self.event)
                        },
                        id: self.id.take(),
                        data: std::mem::take(&mut self.data),
                    });
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "event" => self.event = value.to_owned(),
                "id" => self.id = Some(value.to_owned()),
                "data" => {
                    if !self.data.is_empty() {
                        self.data.push('\n');
                    }
                    self.data.push_str(value);
                }
                _ => {}
            }
        }
        out
    }
}
