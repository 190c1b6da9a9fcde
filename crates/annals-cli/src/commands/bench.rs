//! `annals bench`: a load generator against a running server, or (with
//! `--data-dir DIR`) directly against the embedded log in `DIR`, through the
//! library API with no HTTP in between.
//!
//! `append` mode: `--concurrency` workers each append batches of
//! `--batch` events of `--event-size` bytes to their own stream for
//! `--duration`, and the request latencies are reported as percentiles.
//! `fanout` mode: `--subscribers` SSE clients follow `$all` (filtered to
//! this run's streams) while the workers append; each event carries its
//! send time, so delivered events/s and append→delivery latency are
//! measured.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

mod embedded;

use clap::{Args, ValueEnum};
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

use crate::{
    client::{Client, ClientArgs, SseParser, enc},
    error::CliError,
    output::{emit, print_json, table},
};

/// What to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Append throughput and latency.
    Append,
    /// Live fan-out to SSE subscribers.
    Fanout,
}

/// `annals bench`.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// What to measure.
    #[arg(long, value_enum, default_value_t = Mode::Append)]
    pub mode: Mode,
    /// Concurrent appending connections.
    #[arg(long, short = 'c', default_value_t = 64)]
    pub concurrency: usize,
    /// Bytes of payload per event.
    #[arg(long, default_value_t = 256)]
    pub event_size: usize,
    /// Events per append request.
    #[arg(long, short = 'b', default_value_t = 1)]
    pub batch: usize,
    /// How long to run, seconds.
    #[arg(long, short = 'd', default_value_t = 10.0)]
    pub duration: f64,
    /// Fan-out mode: number of SSE subscribers.
    #[arg(long, default_value_t = 100)]
    pub subscribers: usize,
    /// Load the embedded log in this directory directly (library calls, no
    /// HTTP) instead of a running server; the directory is created when
    /// missing and must not be in use by a server.
    #[command(flatten)]
    pub local: crate::local::LocalArgs,
}

/// How the append workers reach the server.
#[derive(Debug, Clone)]
enum TargetKind {
    /// `http://`: raw hyper HTTP/1 connections.
    Lean,
    /// `https://`: through the reqwest client (TLS, custom CA).
    Reqwest,
}

/// The server as the append workers see it.
#[derive(Debug, Clone)]
struct LeanTarget {
    kind: TargetKind,
    /// `host:port` to connect to and send as `Host`.
    authority: String,
    /// Path part of `--url` (usually empty), without a trailing `/`.
    path_prefix: String,
    /// `Authorization` header value, if any.
    auth: Option<hyper::header::HeaderValue>,
}

impl LeanTarget {
    fn parse(url: &str, auth: Option<&str>) -> Result<Self, CliError> {
        let url = url.trim_end_matches('/');
        let uri: hyper::Uri =
            url.parse().map_err(|e| CliError::Usage(format!("--url '{url}' is not a URL: {e}")))?;
        let kind = match uri.scheme_str() {
            Some("http") => TargetKind::Lean,
            _ => TargetKind::Reqwest,
        };
        let host = uri.host().unwrap_or("127.0.0.1");
        let authority = format!("{host}:{}", uri.port_u16().unwrap_or(80));
        let auth = auth
            .map(|a| {
                hyper::header::HeaderValue::from_str(a)
                    .map_err(|_| CliError::Usage("the credential is not a valid header value".into()))
            })
            .transpose()?;
        Ok(LeanTarget { kind, authority, path_prefix: uri.path().trim_end_matches('/').to_owned(), auth })
    }
}

/// The JSON body of one append request, with the send time spliced in.
#[derive(Debug, Clone)]
struct BodyTemplate {
    /// `{"type":"BenchEvent","data":{"p":"xxx…"},"metadata":{"bench_sent_at":`
    head: String,
    batch: usize,
}

impl BodyTemplate {
    fn new(payload: &str, batch: usize) -> Self {
        let data = serde_json::to_string(&json!({ "p": payload })).unwrap_or_else(|_| "{}".into());
        BodyTemplate {
            head: format!(r#"{{"type":"BenchEvent","data":{data},"metadata":{{"bench_sent_at":"#),
            batch,
        }
    }

    fn render(&self, sent_at: i64) -> Vec<u8> {
        use std::io::Write;
        let mut out = Vec::with_capacity((self.head.len() + 24) * self.batch + 2);
        out.push(b'[');
        for i in 0..self.batch {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(self.head.as_bytes());
            let _ = write!(out, "{sent_at}}}}}");
        }
        out.push(b']');
        out
    }
}

/// One append worker on its own keep-alive HTTP/1 connection; reconnects
/// after a connection error. Returns request latencies (µs) and errors.
///
/// The connection future is polled in the worker's own task (`join!`), not
/// spawned: a response then wakes one task instead of two, which matters
/// when the client shares two cores with the server it measures.
async fn lean_worker(
    target: &LeanTarget,
    path: &str,
    body: &BodyTemplate,
    started: Instant,
    duration: Duration,
) -> (Vec<u64>, u64) {
    let mut latencies = Vec::new();
    let mut errors = 0u64;
    let Ok(uri) = path.parse::<hyper::Uri>() else { return (latencies, 1) };
    while started.elapsed() < duration {
        let (sender, conn) = match connect(&target.authority).await {
            Ok(pair) => pair,
            Err(_) => {
                errors += 1;
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let requests = send_loop(sender, target, &uri, body, started, duration, &mut latencies, &mut errors);
        // `send_loop` drops the sender when it returns, which ends `conn`.
        let (_, ()) = tokio::join!(conn, requests);
    }
    (latencies, errors)
}

type Sender = hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>;

#[allow(clippy::too_many_arguments, reason = "a private loop body split out of lean_worker")]
async fn send_loop(
    mut sender: Sender,
    target: &LeanTarget,
    uri: &hyper::Uri,
    body: &BodyTemplate,
    started: Instant,
    duration: Duration,
    latencies: &mut Vec<u64>,
    errors: &mut u64,
) {
    use http_body_util::{BodyExt, Full};
    use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
    let host = HeaderValue::from_str(&target.authority).unwrap_or(HeaderValue::from_static("localhost"));
    let json = HeaderValue::from_static("application/json");
    while started.elapsed() < duration {
        if sender.ready().await.is_err() {
            *errors += 1;
            return;
        }
        let mut req = hyper::Request::new(Full::new(bytes::Bytes::from(body.render(now_micros()))));
        *req.method_mut() = hyper::Method::POST;
        *req.uri_mut() = uri.clone();
        req.headers_mut().insert(HOST, host.clone());
        req.headers_mut().insert(CONTENT_TYPE, json.clone());
        if let Some(a) = &target.auth {
            req.headers_mut().insert(AUTHORIZATION, a.clone());
        }
        let t = Instant::now();
        match sender.send_request(req).await {
            Ok(resp) => {
                let status = resp.status();
                if resp.into_body().collect().await.is_ok() && status.is_success() {
                    latencies.push(t.elapsed().as_micros() as u64);
                } else {
                    *errors += 1;
                }
            }
            Err(_) => {
                *errors += 1;
                return;
            }
        }
    }
}

async fn connect(
    authority: &str,
) -> Result<
    (
        Sender,
        hyper::client::conn::http1::Connection<
            hyper_util::rt::TokioIo<tokio::net::TcpStream>,
            http_body_util::Full<bytes::Bytes>,
        >,
    ),
    CliError,
> {
    let tcp = tokio::net::TcpStream::connect(authority).await?;
    let _ = tcp.set_nodelay(true);
    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| CliError::Other(format!("HTTP handshake with {authority}: {e}")))
}

fn now_micros() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(idx.min(sorted.len() - 1)).copied().unwrap_or(0)
}

fn summary(lat_us: &mut [u64]) -> Value {
    lat_us.sort_unstable();
    json!({
        "p50_ms": percentile(lat_us, 0.50) as f64 / 1000.0,
        "p90_ms": percentile(lat_us, 0.90) as f64 / 1000.0,
        "p99_ms": percentile(lat_us, 0.99) as f64 / 1000.0,
        "max_ms": lat_us.last().copied().unwrap_or(0) as f64 / 1000.0,
    })
}

/// Runs the benchmark.
pub async fn run(args: BenchArgs, c: &ClientArgs) -> Result<(), CliError> {
    if args.concurrency == 0 || args.batch == 0 || args.duration.is_nan() || args.duration <= 0.0 {
        return Err(CliError::Usage("--concurrency, --batch and --duration must be positive".into()));
    }
    let duration = Duration::try_from_secs_f64(args.duration)
        .map_err(|e| CliError::Usage(format!("--duration {}: {e}", args.duration)))?;
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let prefix = format!("bench{}-", &run_id[..8]);
    if let Some(dir) = &args.local.data_dir {
        let outcome = embedded::run(&args, dir, &prefix, duration).await?;
        return finish(&args, c, outcome);
    }
    let client = Client::new(c)?;
    client.json(client.request(Method::GET, "/health/ready")).await?;

    // Fan-out subscribers connect before the load starts.
    let stop = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(AtomicU64::new(0));
    let mut subscribers = Vec::new();
    if args.mode == Mode::Fanout {
        for _ in 0..args.subscribers {
            let client = client.clone();
            let path = format!("/all/live?from=end&stream_prefix={}", enc(&prefix));
            let resp = client.send(client.request(Method::GET, &path)).await?;
            let stop = stop.clone();
            let delivered = delivered.clone();
            subscribers.push(tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut body = resp.bytes_stream();
                let mut parser = SseParser::default();
                while !stop.load(Ordering::Relaxed) {
                    let chunk = match tokio::time::timeout(Duration::from_millis(200), body.next()).await {
                        Ok(Some(Ok(c))) => c,
                        Ok(_) => break,
                        Err(_) => continue,
                    };
                    for ev in parser.push(&chunk) {
                        if ev.event != "event" {
                            continue;
                        }
                        let received = now_micros();
                        if let Ok(v) = serde_json::from_str::<Value>(&ev.data)
                            && let Some(sent) = v["metadata"]["bench_sent_at"].as_i64()
                        {
                            latencies.push(received.saturating_sub(sent).max(0) as u64);
                            delivered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                latencies
            }));
        }
    }

    let payload = "x".repeat(args.event_size.saturating_sub(12));
    let target = LeanTarget::parse(&c.url, client.auth_header())?;
    let started = Instant::now();
    let mut workers = Vec::new();
    for w in 0..args.concurrency {
        let stream = format!("{prefix}{w}");
        let path = format!("{}/streams/{}", target.path_prefix, enc(&stream));
        let body = BodyTemplate::new(&payload, args.batch);
        let worker = match &target.kind {
            // Plain HTTP: one lean hyper HTTP/1 connection per worker, no
            // pool, no URL parsing per request, a body spliced from a
            // template — the client shares the machine with the server, so
            // every microsecond it spends is one the server does not get.
            TargetKind::Lean => {
                let target = target.clone();
                tokio::spawn(async move { lean_worker(&target, &path, &body, started, duration).await })
            }
            TargetKind::Reqwest => {
                let client = client.clone();
                tokio::spawn(async move {
                    let mut latencies = Vec::new();
                    let mut errors = 0u64;
                    while started.elapsed() < duration {
                        let t = Instant::now();
                        let req = client
                            .request(Method::POST, &path)
                            .header(reqwest::header::CONTENT_TYPE, "application/json")
                            .body(body.render(now_micros()));
                        match client.send(req).await {
                            Ok(_) => latencies.push(t.elapsed().as_micros() as u64),
                            Err(_) => errors += 1,
                        }
                    }
                    (latencies, errors)
                })
            }
        };
        workers.push(worker);
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    for w in workers {
        if let Ok((l, e)) = w.await {
            latencies.extend(l);
            errors += e;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut outcome = Outcome { elapsed, latencies, errors, fanout: None };
    if args.mode == Mode::Fanout {
        let expected = outcome.latencies.len() as u64 * args.batch as u64 * args.subscribers as u64;
        outcome.fanout = Some(drain(expected, &delivered, &stop, subscribers, started).await);
    }
    finish(&args, c, outcome)
}

/// Waits (up to 10 s) until the subscribers have received `expected`
/// events, then stops them and collects their latencies.
async fn drain(
    expected: u64,
    delivered: &AtomicU64,
    stop: &AtomicBool,
    subscribers: Vec<tokio::task::JoinHandle<Vec<u64>>>,
    started: Instant,
) -> Fanout {
    let drain_until = Instant::now() + Duration::from_secs(10);
    while delivered.load(Ordering::Relaxed) < expected && Instant::now() < drain_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut deliveries = Vec::new();
    for s in subscribers {
        if let Ok(l) = s.await {
            deliveries.extend(l);
        }
    }
    Fanout { expected, elapsed, deliveries }
}

/// What one benchmark run measured, wherever it ran.
struct Outcome {
    /// Seconds the append load ran.
    elapsed: f64,
    /// One latency (µs) per successful append request.
    latencies: Vec<u64>,
    errors: u64,
    fanout: Option<Fanout>,
}

/// Fan-out mode: what the subscribers received.
struct Fanout {
    expected: u64,
    /// Seconds from the start of the load to the last delivery waited for.
    elapsed: f64,
    /// One append-to-delivery latency (µs) per delivered event.
    deliveries: Vec<u64>,
}

/// Prints the report of `outcome`; fails when no append succeeded.
fn finish(args: &BenchArgs, c: &ClientArgs, outcome: Outcome) -> Result<(), CliError> {
    let Outcome { elapsed, mut latencies, errors, fanout } = outcome;
    let requests = latencies.len() as u64;
    let events = requests * args.batch as u64;
    let mut report = json!({
        "mode": match args.mode { Mode::Append => "append", Mode::Fanout => "fanout" },
        "target": if args.local.data_dir.is_some() { "embedded" } else { "server" },
        "concurrency": args.concurrency,
        "batch": args.batch,
        "event_size": args.event_size,
        "seconds": elapsed,
        "requests": requests,
        "errors": errors,
        "events": events,
        "requests_per_sec": requests as f64 / elapsed,
        "events_per_sec": events as f64 / elapsed,
        "append_latency": summary(&mut latencies),
    });
    if let Some(Fanout { expected, elapsed, mut deliveries }) = fanout {
        let delivered = deliveries.len() as u64;
        if let Some(obj) = report.as_object_mut() {
            obj.insert("subscribers".into(), json!(args.subscribers));
            obj.insert("delivered".into(), json!(delivered));
            obj.insert("expected_deliveries".into(), json!(expected));
            obj.insert("delivered_per_sec".into(), json!(delivered as f64 / elapsed));
            obj.insert("delivery_latency".into(), summary(&mut deliveries));
        }
    }
    let printed = if c.json {
        print_json(&report)
    } else {
        let mut t = table(&["metric", "value"]);
        if let Some(obj) = report.as_object() {
            for (k, v) in obj {
                let text = match v {
                    Value::Number(n) if n.is_f64() => format!("{:.2}", n.as_f64().unwrap_or(0.0)),
                    Value::Object(o) => {
                        o.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
                    }
                    other => other.to_string(),
                };
                t.add_row(vec![k.clone(), text]);
            }
        }
        emit(t)
    };
    if requests == 0 {
        return Err(CliError::Other(format!("no append succeeded ({errors} errors)")));
    }
    printed
}
