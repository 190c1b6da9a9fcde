//! Client commands: append, read, tail, streams, stats.

use std::io::Read as _;

use clap::Args;
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, value::RawValue};

use crate::{
    client::{Client, ClientArgs, EventView, RawPage, SseParser, enc, one_line},
    error::CliError,
    output::{emit, events_table, print_json, short, short_raw, table},
};

/// `annals append`.
#[derive(Debug, Clone, Args)]
pub struct AppendArgs {
    /// Target stream.
    pub stream: String,
    /// Events as JSON: an array of `{ "type", "data", "metadata"?, "id"? }`
    /// or one such object. Read from stdin when absent or `-`.
    pub events: Option<String>,
    /// Shorthand for one event of this type (with --data), instead of the
    /// JSON events.
    #[arg(long = "type", short = 't', conflicts_with = "events")]
    pub event_type: Option<String>,
    /// The data of the --type event, as JSON (default {}).
    #[arg(long, requires = "event_type")]
    pub data: Option<String>,
    /// Expected version: any, no_stream, stream_exists or a number.
    #[arg(long, short = 'e', default_value = "any")]
    pub expected: String,
    /// Run on a data directory instead of a server.
    #[command(flatten)]
    pub local: crate::local::LocalArgs,
}

/// `annals read`.
#[derive(Debug, Clone, Args)]
pub struct ReadArgs {
    /// Stream name, or `$all` for the global log.
    pub stream: String,
    /// Start: start, end, or a version / position (inclusive).
    #[arg(long)]
    pub from: Option<String>,
    /// Newest first.
    #[arg(long)]
    pub backward: bool,
    /// Page size.
    #[arg(long, short = 'n', default_value_t = 100)]
    pub limit: usize,
    /// `$all` only: stream-name prefix.
    #[arg(long)]
    pub stream_prefix: Option<String>,
    /// `$all` only: category.
    #[arg(long)]
    pub category: Option<String>,
    /// `$all` only: event types (comma-separated, exact).
    #[arg(long = "event-type")]
    pub event_type: Option<String>,
    /// `$all` only: correlation id.
    #[arg(long)]
    pub correlation_id: Option<String>,
    /// Run on a data directory instead of a server.
    #[command(flatten)]
    pub local: crate::local::LocalArgs,
}

/// `annals tail`.
#[derive(Debug, Clone, Args)]
pub struct TailArgs {
    /// Stream name, or `$all`.
    pub stream: String,
    /// Where to start: start, end (default: the end when the tail starts),
    /// or a version / position (inclusive). After a server restart or a
    /// dropped connection the tail resumes just after the last event it
    /// printed, retrying an unreachable server for up to 60 s.
    #[arg(long, default_value = "end")]
    pub from: String,
    /// Stop after this many events (0: none, only check the arguments).
    #[arg(long)]
    pub count: Option<u64>,
    /// `$all` only: stream-name prefix.
    #[arg(long)]
    pub stream_prefix: Option<String>,
    /// Reconnect (resuming after the last event printed) when a live
    /// connection carries nothing for this many seconds, not even the
    /// server's keep-alive (sent every `live.keep_alive_secs`, default 15):
    /// a server gone without closing the connection would otherwise hold
    /// the tail for good.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub idle_timeout: u64,
    /// Run on a data directory instead of a server.
    #[command(flatten)]
    pub local: crate::local::LocalArgs,
}

/// `annals streams`.
#[derive(Debug, Clone, Args)]
pub struct StreamsArgs {
    /// Only streams whose name starts with this.
    #[arg(long)]
    pub prefix: Option<String>,
    /// At most this many.
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
    /// Start after this name (the `next` of the previous page).
    #[arg(long)]
    pub after: Option<String>,
    /// Run on a data directory instead of a server.
    #[command(flatten)]
    pub local: crate::local::LocalArgs,
}

/// `annals stats`.
#[derive(Debug, Clone, Args)]
pub struct StatsArgs {
    /// Run on a data directory instead of a server.
    #[command(flatten)]
    pub local: crate::local::LocalArgs,
}

fn read_input(arg: Option<&str>) -> Result<String, CliError> {
    match arg {
        Some(s) if s != "-" => Ok(s.to_owned()),
        _ => {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidData => {
                    CliError::Usage("the events on stdin are not UTF-8 text (JSON must be)".into())
                }
                _ => CliError::Other(format!("cannot read stdin: {e}")),
            })?;
            Ok(s)
        }
    }
}

/// Appends events.
pub async fn append(args: AppendArgs, c: &ClientArgs) -> Result<(), CliError> {
    let client = Client::new(c)?;
    // The events go to the server as the JSON text they were given in:
    // parsed into `Value`, a number beyond `f64` (an amount with many
    // digits) would be rounded, or refused, before it was sent.
    let body = match &args.event_type {
        Some(t) => {
            let data = match &args.data {
                Some(d) => serde_json::from_str::<Box<RawValue>>(d)
                    .map_err(|e| CliError::Usage(format!("--data is not JSON: {e}")))?,
                None => RawValue::from_string("{}".to_owned()).map_err(|e| CliError::Other(e.to_string()))?,
            };
            let event_type = serde_json::to_string(t).map_err(|e| CliError::Other(e.to_string()))?;
            format!(r#"[{{"type":{event_type},"data":{}}}]"#, data.get())
        }
        None => {
            let text = read_input(args.events.as_deref())?;
            let raw: Box<RawValue> = serde_json::from_str(&text)
                .map_err(|e| CliError::Usage(format!("events are not valid JSON: {e}")))?;
            let raw = raw.get().trim();
            if raw.starts_with('{') {
                format!("[{raw}]")
            } else if raw.starts_with('[') {
                raw.to_owned()
            } else {
                return Err(CliError::Usage("events must be a JSON array or object".into()));
            }
        }
    };
    let req = client
        .request(Method::POST, &format!("/streams/{}?expected={}", enc(&args.stream), enc(&args.expected)))
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body);
    let result = client.json(req).await?;
    if c.json {
        print_json(&result)
    } else {
        emit(format_args!(
            "appended to {}: last version {}, position {}",
            args.stream,
            short(&result["last_version"], 20),
            short(&result["position"], 20)
        ))
    }
}

/// Reads a page of a stream or `$all`.
pub async fn read(args: ReadArgs, c: &ClientArgs) -> Result<(), CliError> {
    let client = Client::new(c)?;
    let dir = if args.backward { "backward" } else { "forward" };
    let mut path = if args.stream == "$all" {
        let mut p = format!("/all?direction={dir}&limit={}", args.limit);
        for (k, v) in [
            ("stream_prefix", &args.stream_prefix),
            ("category", &args.category),
            ("type", &args.event_type),
            ("correlation_id", &args.correlation_id),
        ] {
            if let Some(v) = v {
                p.push_str(&format!("&{k}={}", enc(v)));
            }
        }
        p
    } else {
        format!("/streams/{}?direction={dir}&limit={}", enc(&args.stream), args.limit)
    };
    if let Some(f) = &args.from {
        path.push_str(&format!("&from={}", enc(f)));
    }
    // Kept as the server sent it: see `Client::text`.
    let body = client.text(client.request(Method::GET, &path)).await?;
    if c.json {
        return emit(one_line(body.trim_end()));
    }
    let page: RawPage = serde_json::from_str(&body)
        .map_err(|e| CliError::Other(format!("invalid JSON from the server: {e}")))?;
    let events = page
        .events
        .iter()
        .map(|e| serde_json::from_str::<EventView>(e.get()).unwrap_or_default())
        .collect::<Vec<_>>();
    emit(events_table(&events))?;
    match page.next {
        Some(n) => emit(format_args!("{} event(s); next page: --from {n}", events.len())),
        None => emit(format_args!("{} event(s)", events.len())),
    }
}

/// How long `tail` keeps trying to reach the server again after a live
/// connection ended (a restart, a dropped connection) before it gives up
/// with exit code 6. Long enough for a restart whose old process drains for
/// the default `timeouts.shutdown_secs` (30 s) before the new one can open
/// the store.
const RECONNECT_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// The first pause before a reconnect, doubled up to [`RECONNECT_PAUSE_MAX`]
/// while the server stays unreachable.
const RECONNECT_PAUSE: std::time::Duration = std::time::Duration::from_millis(200);
const RECONNECT_PAUSE_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// Connections in a row that may end without delivering an event or
/// saying why before `tail` gives up on the server.
const MAX_SILENT_RECONNECTS: u32 = 100;

/// Follows a stream or `$all` live. `--from end` is resolved once, before
/// the first connection, to the log's position (or the stream's next
/// version) at that moment; every later connection, after a
/// `slow_consumer` or `shutdown` notice or a dropped connection, resumes
/// strictly after the last event printed. So events appended while the
/// tail is between connections are neither skipped nor printed twice.
pub async fn tail(args: TailArgs, c: &ClientArgs) -> Result<(), CliError> {
    let client = Client::new(c)?;
    let mut from = start_of_tail(&client, &args).await?;
    if args.count == Some(0) {
        // Checked before the first event, which `seen >= n` below is not.
        return Ok(());
    }
    let mut seen = 0u64;
    let mut silent = 0u32;
    let mut reconnecting = false;
    loop {
        let resp = connect_live(&client, &live_path(&args, from), reconnecting).await?;
        let before = seen;
        let mut body = resp.bytes_stream();
        let mut parser = SseParser::default();
        let mut notice = false;
        'conn: loop {
            let idle = std::time::Duration::from_secs(args.idle_timeout);
            let Ok(next) = tokio::time::timeout(idle, body.next()).await else {
                eprintln!(
                    "nothing from the server for {} s, not even a keep-alive; reconnecting",
                    args.idle_timeout
                );
                break 'conn;
            };
            let Some(chunk) = next else { break 'conn };
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => {
                    eprintln!("connection lost ({e}); resuming");
                    break 'conn;
                }
            };
            for ev in parser.push(&chunk) {
                match ev.event.as_str() {
                    "event" => {
                        // Printed as sent (see `Client::text`).
                        if c.json {
                            emit(one_line(&ev.data))?;
                        } else {
                            let e: EventView = serde_json::from_str(&ev.data).unwrap_or_default();
                            emit(format_args!(
                                "{:>8} {}@{} {} {}",
                                short(&e.position, 20),
                                short(&e.stream, 60),
                                short(&e.version, 20),
                                short(&e.event_type, 60),
                                short_raw(&e.data, 120)
                            ))?;
                        }
                        // The id is the position (`$all`) or version (a
                        // stream): the next connection starts just after it.
                        let id = ev.id.as_deref().and_then(|id| id.trim().parse::<u64>().ok());
                        from = id.and_then(|n| n.checked_add(1)).ok_or_else(|| {
                            CliError::Other(format!(
                                "the server sent an event without a numeric id ({:?}); cannot resume after it",
                                ev.id
                            ))
                        })?;
                        seen += 1;
                        if args.count.is_some_and(|n| seen >= n) {
                            return Ok(());
                        }
                    }
                    "slow_consumer" | "shutdown" => {
                        let v: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
                        eprintln!("server: {} ({}); resuming", ev.event, short(&v["message"], 200));
                        notice = true;
                        break 'conn;
                    }
                    other => {
                        let v: Value = serde_json::from_str(&ev.data).unwrap_or(Value::Null);
                        return Err(CliError::Api {
                            // A live feed reports these as events, after its
                            // 200: exit as a read of the same stream would.
                            status: match other {
                                "stream_deleted" => 410,
                                "token_expired" => 401,
                                "stream_not_found" | "not_found" => 404,
                                _ => 0,
                            },
                            code: other.to_owned(),
                            message: short(&v["message"], 500),
                        });
                    }
                }
            }
        }
        silent = if notice || seen > before { 0 } else { silent + 1 };
        if silent > MAX_SILENT_RECONNECTS {
            return Err(CliError::Other("the live connection keeps closing".into()));
        }
        reconnecting = true;
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

/// The concrete first version (stream) or position (`$all`) of a tail,
/// inclusive: `start` is 0, a number is itself, and `end` is asked of the
/// server once, so that a reconnect never re-resolves it.
async fn start_of_tail(client: &Client, args: &TailArgs) -> Result<u64, CliError> {
    match args.from.trim() {
        "start" => Ok(0),
        "end" if args.stream == "$all" => {
            let mut path = "/all?from=end&limit=1".to_owned();
            // A caller restricted to stream prefixes may only read `$all`
            // through one of them.
            if let Some(p) = &args.stream_prefix {
                path.push_str(&format!("&stream_prefix={}", enc(p)));
            }
            // The page's event is not looked at (nor parsed).
            let page: Head = client.parse(client.request(Method::GET, &path)).await?;
            page.head
                .ok_or_else(|| CliError::Other("the server did not say where `$all` ends (no head)".into()))
        }
        "end" => {
            let path = format!("/streams/{}/info", enc(&args.stream));
            let info = client.json(client.request(Method::GET, &path)).await?;
            match &info["last_version"] {
                Value::Null => Ok(0),
                v => v
                    .as_u64()
                    .and_then(|v| v.checked_add(1))
                    .ok_or_else(|| CliError::Other(format!("the server sent an unusable last_version: {v}"))),
            }
        }
        n => n.parse::<u64>().map_err(|_| {
            CliError::Usage(format!("--from must be start, end or a version / position, got '{n}'"))
        }),
    }
}

/// The `head` of a page of `$all`: the log's next position.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct Head {
    #[serde(default)]
    pub(crate) head: Option<u64>,
}

fn live_path(args: &TailArgs, from: u64) -> String {
    if args.stream == "$all" {
        let mut path = format!("/all/live?from={from}");
        if let Some(p) = &args.stream_prefix {
            path.push_str(&format!("&stream_prefix={}", enc(p)));
        }
        path
    } else {
        format!("/streams/{}/live?from={from}", enc(&args.stream))
    }
}

/// Opens a live connection. The first one fails at once when the server
/// cannot be reached (a wrong `--url` should not hang); a reconnect keeps
/// trying for [`RECONNECT_WINDOW`], as a restarting server comes back.
async fn connect_live(
    client: &Client,
    path: &str,
    reconnecting: bool,
) -> Result<reqwest::Response, CliError> {
    let deadline = tokio::time::Instant::now() + RECONNECT_WINDOW;
    let mut pause = RECONNECT_PAUSE;
    let mut told = false;
    loop {
        match client.send(client.request(Method::GET, path)).await {
            Err(CliError::Unreachable { .. })
                if reconnecting && tokio::time::Instant::now() + pause < deadline =>
            {
                if !told {
                    eprintln!("server unreachable; retrying for up to {} s", RECONNECT_WINDOW.as_secs());
                    told = true;
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(RECONNECT_PAUSE_MAX);
            }
            other => return other,
        }
    }
}

/// Lists streams.
pub async fn streams(args: StreamsArgs, c: &ClientArgs) -> Result<(), CliError> {
    let client = Client::new(c)?;
    let mut path = format!("/streams?limit={}", args.limit);
    if let Some(p) = &args.prefix {
        path.push_str(&format!("&prefix={}", enc(p)));
    }
    if let Some(a) = &args.after {
        path.push_str(&format!("&after={}", enc(a)));
    }
    let v = client.json(client.request(Method::GET, &path)).await?;
    if c.json {
        return print_json(&v);
    }
    let mut t = table(&["stream", "events", "last_version", "last_position", "state"]);
    let list = v["streams"].as_array().cloned().unwrap_or_default();
    for s in &list {
        t.add_row(vec![
            short(&s["stream"], 80),
            short(&s["events"], 20),
            short(&s["last_version"], 20),
            short(&s["last_position"], 20),
            short(&s["deletion"], 20),
        ]);
    }
    emit(t)?;
    match v["next"].as_str() {
        Some(next) => emit(format_args!("{} stream(s); more with --after {next}", list.len())),
        None => emit(format_args!("{} stream(s)", list.len())),
    }
}

/// Shows statistics.
pub async fn stats(_args: StatsArgs, c: &ClientArgs) -> Result<(), CliError> {
    let client = Client::new(c)?;
    let v = client.json(client.request(Method::GET, "/stats")).await?;
    if c.json {
        return print_json(&v);
    }
    let mut t = table(&["metric", "value"]);
    for key in ["events", "streams", "appends_since_start", "complete"] {
        t.add_row(vec![key.to_owned(), short(&v[key], 40)]);
    }
    let disk = v["disk_bytes"].as_u64().map_or_else(|| "unknown".to_owned(), human_bytes);
    t.add_row(vec!["disk".to_owned(), disk]);
    t.add_row(vec!["subscribers (sse)".to_owned(), short(&v["subscribers"]["sse"], 20)]);
    t.add_row(vec!["subscribers (ws)".to_owned(), short(&v["subscribers"]["ws"], 20)]);
    emit(t)?;
    if let Some(by_type) = v["by_type"].as_object()
        && !by_type.is_empty()
    {
        let mut t = table(&["event type", "count"]);
        for (k, n) in by_type {
            t.add_row(vec![k.clone(), short(n, 20)]);
        }
        emit(t)?;
    }
    Ok(())
}

/// `1536` → `1.5 KiB (1536 bytes)`; exact bytes below 1 KiB.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} bytes");
    }
    let mut value = bytes as f64;
    let mut unit = "bytes";
    for next in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    format!("{value:.1} {unit} ({bytes} bytes)")
}

#[cfg(test)]
mod tests {
    use super::human_bytes;

    #[test]
    fn bytes_read_as_binary_units() {
        assert_eq!(human_bytes(0), "0 bytes");
        assert_eq!(human_bytes(1023), "1023 bytes");
        assert_eq!(human_bytes(1536), "1.5 KiB (1536 bytes)");
        assert_eq!(human_bytes(5 << 30), "5.0 GiB (5368709120 bytes)");
    }
}
