//! Live delivery over Server-Sent Events and WebSocket.
//!
//! Each connection runs one catch-up subscription (history, then live
//! events, in order, each once). Subscriptions read committed history, so
//! writers are never blocked. What must be bounded is the per-connection
//! buffer: a pump moves events from the subscription into a queue of
//! `live.buffer_events`; when the socket cannot drain it for
//! `live.slow_client_timeout_ms`, the client is told `slow_consumer` with
//! the last position it was sent, then disconnected (after
//! `live.disconnect_grace_ms` if it never reads the notice). Nothing is
//! ever skipped silently: the client resumes from that position.

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use annals_core::{
    DeletionState, Error as CoreError, EventStream, RecordedEvent, StreamName, SubscribeFrom,
    SubscriptionRequest, SubscriptionTarget,
};
use axum::{
    Extension,
    extract::{
        State,
        ws::{Message, WebSocket, WebSocketUpgrade},
    },
    http::{HeaderMap, Version},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
};
use futures::{SinkExt, StreamExt, stream};
use prometheus_client::metrics::gauge::Gauge;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::{
    AppState,
    auth::{Principal, Role},
    error::{ApiError, ErrorOut},
    extract::{ApiPath, ApiQuery},
    routes::{
        all::{FilterQuery, refuse_unknown},
        readable_stream,
    },
    serve::ConnCtl,
    wire::EventOut,
};

/// Query of the SSE endpoints.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct LiveQuery {
    /// `start` (default), `end`, or a version (stream) / position (`$all`)
    /// to start at, inclusive. A `Last-Event-ID` header overrides it
    /// (resume strictly after that id).
    pub from: Option<String>,
    /// Credential for `EventSource`, which cannot set headers.
    #[allow(dead_code, reason = "accepted here so unknown-field checks let it through; auth reads it")]
    pub access_token: Option<String>,
    /// `$all` filters (ignored for single streams).
    #[serde(flatten)]
    #[param(ignore)]
    pub filter: FilterQuery,
    /// Whatever else the query holds: refused (400 `invalid_query`), so a
    /// misspelt filter never follows the whole log.
    #[serde(flatten)]
    #[param(ignore)]
    pub unknown: std::collections::BTreeMap<String, String>,
}

/// Parses `from` for subscriptions: inclusive start → `SubscribeFrom`.
fn subscribe_from(from: Option<&Value>) -> Result<SubscribeFrom, ApiError> {
    let bad = || ApiError::bad_request("`from` must be start, end or a number");
    match from {
        None | Some(Value::Null) => Ok(SubscribeFrom::Start),
        Some(Value::String(s)) => match s.trim() {
            "" | "start" => Ok(SubscribeFrom::Start),
            "end" => Ok(SubscribeFrom::End),
            n => n.parse::<u64>().map(at_inclusive).map_err(|_| bad()),
        },
        Some(Value::Number(n)) => n.as_u64().map(at_inclusive).ok_or_else(bad),
        Some(_) => Err(bad()),
    }
}

fn at_inclusive(n: u64) -> SubscribeFrom {
    match n.checked_sub(1) {
        None => SubscribeFrom::Start,
        Some(prev) => SubscribeFrom::After(prev),
    }
}

/// Where an SSE feed starts, and which input said so (for errors).
fn resume_from(
    headers: &HeaderMap,
    query_from: Option<&str>,
) -> Result<(SubscribeFrom, &'static str), ApiError> {
    if let Some(raw) = headers.get("last-event-id") {
        // A value that is not even text is as malformed as one that is not
        // a number: ignoring it would replay the feed from `from`.
        let id = raw
            .to_str()
            .ok()
            .and_then(|id| id.trim().parse::<u64>().ok())
            .ok_or_else(|| ApiError::bad_request("Last-Event-ID must be a number"))?;
        return Ok((SubscribeFrom::After(id), "Last-Event-ID"));
    }
    Ok((subscribe_from(query_from.map(|s| Value::String(s.to_owned())).as_ref())?, "`from`"))
}

/// Refuses a start past the head (`$all`) or past the stream's next
/// version: no event there was ever sent, so the client's position comes
/// from elsewhere (another store, a restored backup), and following it
/// would silently skip every event committed up to it. `what` names the
/// input (`from`, `Last-Event-ID`).
async fn check_start(state: &AppState, request: &SubscriptionRequest, what: &str) -> Result<(), ApiError> {
    let store = &state.inner.store;
    let info = match &request.target {
        SubscriptionTarget::All(_) => None,
        SubscriptionTarget::Stream(stream) => match store.stream_info(stream).await {
            // A tombstoned stream is refused before the feed starts (410):
            // a feed that answered 200 and then `stream_deleted` would have
            // `EventSource` reconnect to it for good.
            Ok(info) if info.deletion == DeletionState::Tombstoned => {
                return Err(CoreError::StreamDeleted { stream: stream.clone() }.into());
            }
            Ok(info) => Some(info),
            Err(CoreError::StreamNotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        },
    };
    let SubscribeFrom::After(last) = request.from else { return Ok(()) };
    let (next, unit) = match &request.target {
        SubscriptionTarget::All(_) => (store.next_position().await?, "position"),
        SubscriptionTarget::Stream(_) => {
            (info.and_then(|i| i.last_version).map_or(0, |v| v.saturating_add(1)), "version")
        }
    };
    if last.checked_add(1).is_some_and(|first| first <= next) {
        return Ok(());
    }
    Err(ApiError::new(
        axum::http::StatusCode::BAD_REQUEST,
        "beyond_head",
        format!(
            "{what} is past the head: the next {unit} is {next}, so this store never sent an event \
             there, and following it would skip every event until it; start at {next} or below, or \
             from `end`"
        ),
    )
    .with_details(json!({ "next": next })))
}

/// `GET /streams/{stream}/live`: one stream as Server-Sent Events.
#[utoipa::path(get, path = "/streams/{stream}/live", tag = "live",
    params(("stream" = String, Path, description = "Stream name"), LiveQuery),
    responses((status = 200, content_type = "text/event-stream", body = String,
            description = "`event: event` (id = version, data = EventOut); `event: slow_consumer` / `error` / `shutdown` end the stream"),
        (status = 400, description = "Invalid stream name, `from` or `Last-Event-ID`; `beyond_head`: it starts past the stream's next version", body = ErrorOut),
        (status = 403, description = "Role below reader (admin for `$` streams), or outside the caller's prefixes", body = ErrorOut),
        (status = 410, description = "`stream_deleted`: the stream is tombstoned", body = ErrorOut)))]
pub async fn stream_sse(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(stream): ApiPath<String>,
    ApiQuery(query): ApiQuery<LiveQuery>,
    headers: HeaderMap,
    version: Version,
    conn: Option<Extension<ConnCtl>>,
) -> Result<Response, ApiError> {
    refuse_unknown(&query.unknown)?;
    let stream = readable_stream(&stream)?;
    let needed = if stream.is_system() { Role::Admin } else { Role::Reader };
    principal.authorize(needed, Some(stream.as_str()))?;
    let (from, what) = resume_from(&headers, query.from.as_deref())?;
    let request = SubscriptionRequest::stream(stream, from);
    check_start(&state, &request, what).await?;
    Ok(sse(state, request, kill_switch(version, conn), principal.expires_at()))
}

/// `GET /all/live`: the global log (filtered) as Server-Sent Events.
#[utoipa::path(get, path = "/all/live", tag = "live", params(LiveQuery, FilterQuery),
    responses((status = 200, content_type = "text/event-stream", body = String,
            description = "`event: event` (id = position, data = EventOut); `event: slow_consumer` / `error` / `shutdown` end the stream"),
        (status = 400, description = "Invalid `from`, `Last-Event-ID` or filter; `beyond_head`: it starts past the head", body = ErrorOut),
        (status = 403, description = "Role below reader (admin with `include_system`), or a prefix-restricted caller without a `stream_prefix` inside its prefixes", body = ErrorOut)))]
pub async fn all_sse(
    State(state): State<AppState>,
    principal: Principal,
    ApiQuery(query): ApiQuery<LiveQuery>,
    headers: HeaderMap,
    version: Version,
    conn: Option<Extension<ConnCtl>>,
) -> Result<Response, ApiError> {
    refuse_unknown(&query.unknown)?;
    let filter = query.filter.to_filter()?;
    query.filter.authorize(&principal, &filter)?;
    let (from, what) = resume_from(&headers, query.from.as_deref())?;
    let request = SubscriptionRequest::all(filter, from);
    check_start(&state, &request, what).await?;
    Ok(sse(state, request, kill_switch(version, conn), principal.expires_at()))
}

/// What ends the connection of a slow SSE client that does not even read
/// its notice. Only an HTTP/1 connection is closed: it carries nothing
/// else. An HTTP/2 connection carries the client's other requests (a
/// browser sends its `fetch` calls beside its `EventSource`), which closing
/// it would break mid-flight; its flow control already keeps the stalled
/// stream from holding them up, and that stream ends when the client reads
/// the notice or closes.
fn kill_switch(version: Version, conn: Option<Extension<ConnCtl>>) -> Option<CancellationToken> {
    conn.filter(|_| version < Version::HTTP_2).map(|c| c.0.kill)
}

/// Why a live connection ends early.
#[derive(Debug, Clone)]
struct Notice {
    code: &'static str,
    message: String,
    /// The connection ended, not the subscription: its body says where to
    /// reconnect from.
    resume: bool,
}

impl Notice {
    fn slow(timeout: Duration) -> Self {
        Notice {
            code: "slow_consumer",
            message: format!("the client did not keep up for {} ms", timeout.as_millis()),
            resume: true,
        }
    }

    fn ping_timeout(silent: Duration) -> Self {
        Notice {
            code: "ping_timeout",
            message: format!("no pong or message for {} ms", silent.as_millis()),
            resume: true,
        }
    }

    fn unreadable(e: &axum::Error) -> Self {
        Notice {
            code: "protocol_error",
            message: format!("a client message could not be read ({e}); messages are text, at most 64 KiB"),
            resume: true,
        }
    }

    fn shutdown() -> Self {
        Notice { code: "shutdown", message: "the server is shutting down".into(), resume: true }
    }

    fn token_expired() -> Self {
        Notice {
            code: "token_expired",
            message: "the access token expired; reconnect with a fresh one".into(),
            resume: true,
        }
    }

    fn from_error(e: CoreError) -> Self {
        let api = ApiError::from(e);
        let code: &'static str = match api.code.as_str() {
            "stream_deleted" => "stream_deleted",
            "store_closed" => "store_closed",
            _ => "error",
        };
        Notice { code, message: api.message, resume: false }
    }

    /// `last`: position and version of the last event sent; `is_all`:
    /// whether the feed is `$all` (resumed by position) or a stream
    /// (resumed by version).
    fn body(&self, last: Option<(u64, u64)>, is_all: bool) -> Value {
        let message = match (self.resume, last) {
            (false, _) => self.message.clone(),
            (true, None) => format!("{}; nothing was sent yet: reconnect from the same start", self.message),
            (true, Some((position, _))) if is_all => format!(
                "{}; reconnect from position {} (last_position + 1)",
                self.message,
                position.saturating_add(1)
            ),
            (true, Some((_, version))) => format!(
                "{}; reconnect from version {} (last_version + 1)",
                self.message,
                version.saturating_add(1)
            ),
        };
        json!({
            "code": self.code,
            "message": message,
            "last_position": last.map(|l| l.0),
            "last_version": last.map(|l| l.1),
        })
    }
}

enum Item {
    Event(RecordedEvent),
    End(Notice),
}

/// Decrements the subscriber gauge when the connection's work ends.
struct GaugeGuard(Gauge);

impl GaugeGuard {
    fn new(g: Gauge) -> Self {
        g.inc();
        GaugeGuard(g)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Samples the subscriber's lag every this many events (asking the store
/// for its head on every event would cost a read per delivery).
const LAG_SAMPLE_EVERY: u64 = 64;

async fn observe_lag(state: &AppState, event: &RecordedEvent, count: u64) {
    if count.is_multiple_of(LAG_SAMPLE_EVERY)
        && let Ok(head) = state.inner.store.next_position().await
    {
        state.inner.metrics.subscription_lag.observe(head.saturating_sub(event.position + 1) as f64);
    }
}

fn sse(
    state: AppState,
    request: SubscriptionRequest,
    kill: Option<CancellationToken>,
    expires: Option<tokio::time::Instant>,
) -> Response {
    let is_all = matches!(request.target, SubscriptionTarget::All(_));
    let live = &state.inner.config.live;
    let (tx, rx) = mpsc::channel::<Item>(live.buffer_events);
    let (stop_tx, stop_rx) = oneshot::channel::<Notice>();
    // The subscription's own ending (an error), told after every queued
    // event: it needs no room in the queue, so it cannot be lost behind a
    // full one.
    let (last_tx, last_rx) = oneshot::channel::<Notice>();
    let finished = Arc::new(AtomicBool::new(false));
    let subscription = state.inner.store.subscribe(request);
    let keep_alive = Duration::from_secs(live.keep_alive_secs.max(1));
    let ends = Ends { stop: stop_tx, last: last_tx };
    tokio::spawn(pump(state.clone(), subscription, tx, ends, kill, finished.clone(), expires));

    struct Body {
        rx: mpsc::Receiver<Item>,
        stop: Option<oneshot::Receiver<Notice>>,
        ending: Option<oneshot::Receiver<Notice>>,
        last: Option<(u64, u64)>,
        done: bool,
        finished: Arc<AtomicBool>,
        is_all: bool,
    }
    let body =
        Body { rx, stop: Some(stop_rx), ending: Some(last_rx), last: None, done: false, finished, is_all };
    // The queue is drained and its sender gone: the pump's last word, if any.
    fn after_queue(ending: &mut Option<oneshot::Receiver<Notice>>) -> Option<Item> {
        ending.take().and_then(|mut rx| rx.try_recv().ok()).map(Item::End)
    }
    let events = stream::unfold(body, |mut b| async move {
        if b.done {
            // Polled again after the final notice: it was handed to the
            // connection, so the pump need not force a disconnect.
            b.finished.store(true, Ordering::Release);
            return None;
        }
        loop {
            let item = match b.stop.as_mut() {
                Some(stop) => tokio::select! {
                    biased;
                    notice = stop => match notice {
                        Ok(n) => Item::End(n),
                        // The pump ended without an urgent notice: keep
                        // draining the queue.
                        Err(_) => { b.stop = None; continue; }
                    },
                    item = b.rx.recv() => match item.or_else(|| after_queue(&mut b.ending)) {
                        Some(i) => i,
                        None => return None,
                    },
                },
                None => match b.rx.recv().await.or_else(|| after_queue(&mut b.ending)) {
                    Some(i) => i,
                    None => return None,
                },
            };
            let sse_event = match item {
                Item::Event(e) => {
                    b.last = Some((e.position, e.version));
                    let id = if b.is_all { e.position } else { e.version };
                    let mut data = serde_json::to_string(&EventOut::from(&e)).unwrap_or_else(|_| "{}".into());
                    // SSE cannot carry a carriage return (axum panics on
                    // one). In valid JSON a raw CR is only ever whitespace
                    // between tokens (inside strings it is escaped), so
                    // dropping it keeps the document equal.
                    if data.contains('\r') {
                        data.retain(|c| c != '\r');
                    }
                    Event::default().event("event").id(id.to_string()).data(data)
                }
                Item::End(n) => {
                    b.done = true;
                    Event::default().event(n.code).data(n.body(b.last, b.is_all).to_string())
                }
            };
            return Some((Ok::<_, Infallible>(sse_event), b));
        }
    });
    Sse::new(events).keep_alive(KeepAlive::new().interval(keep_alive)).into_response()
}

/// How the pump ends a connection early.
struct Ends {
    /// Urgent: told before any queued event (shutdown, slow client).
    stop: oneshot::Sender<Notice>,
    /// Told after every queued event (the subscription failed).
    last: oneshot::Sender<Notice>,
}

/// Completes when the connection's credential expires (see
/// [`Principal::expires_at`]); never for one that does not. Live feeds end
/// then, as a new request with it would be refused.
pub(crate) async fn expiry(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Moves events from the subscription into the connection's queue.
async fn pump(
    state: AppState,
    mut subscription: EventStream,
    tx: mpsc::Sender<Item>,
    ends: Ends,
    kill: Option<CancellationToken>,
    finished: Arc<AtomicBool>,
    expires: Option<tokio::time::Instant>,
) {
    let _gauge = GaugeGuard::new(state.inner.metrics.subscriber_gauge("sse"));
    let live = state.inner.config.live.clone();
    let shutdown = state.inner.shutdown.clone();
    let mut expiry = std::pin::pin!(expiry(expires));
    let mut count = 0u64;
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => { let _ = ends.stop.send(Notice::shutdown()); return; }
            () = &mut expiry => { let _ = ends.stop.send(Notice::token_expired()); return; }
            () = tx.closed() => return,
            next = subscription.next() => next,
        };
        let item = match next {
            Some(Ok(event)) => {
                count += 1;
                observe_lag(&state, &event, count).await;
                Item::Event(event)
            }
            Some(Err(e)) => {
                // Dropping `tx` on return lets the body drain the queue,
                // then tell this.
                let _ = ends.last.send(Notice::from_error(e));
                return;
            }
            None => return,
        };
        let sent = tokio::select! {
            () = shutdown.cancelled() => { let _ = ends.stop.send(Notice::shutdown()); return; }
            () = &mut expiry => { let _ = ends.stop.send(Notice::token_expired()); return; }
            sent = tx.send_timeout(item, live.slow_client_timeout()) => sent,
        };
        match sent {
            Ok(()) => {
                state.inner.metrics.delivered.inc();
            }
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                state.inner.metrics.slow_disconnects.inc();
                tracing::info!("SSE client too slow; telling it and disconnecting");
                drop(subscription);
                let _ = ends.stop.send(Notice::slow(live.slow_client_timeout()));
                if let Some(kill) = kill {
                    tokio::time::sleep(live.disconnect_grace()).await;
                    if !finished.load(Ordering::Acquire) {
                        kill.cancel();
                    }
                }
                return;
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => return,
        }
    }
}

/// A `$all` filter as the WebSocket subscribe message carries it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct WsFilter {
    stream_prefix: Option<String>,
    category: Option<String>,
    #[serde(default)]
    types: Vec<String>,
    #[serde(default)]
    type_prefixes: Vec<String>,
    correlation_id: Option<String>,
    after: Option<String>,
    before: Option<String>,
    #[serde(default)]
    include_system: bool,
}

impl WsFilter {
    fn into_query(self) -> FilterQuery {
        let join = |v: Vec<String>| (!v.is_empty()).then(|| v.join(","));
        FilterQuery {
            stream_prefix: self.stream_prefix,
            category: self.category,
            event_type: join(self.types),
            type_prefix: join(self.type_prefixes),
            correlation_id: self.correlation_id,
            after: self.after,
            before: self.before,
            include_system: Some(self.include_system.to_string()),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ClientMessage {
    Subscribe {
        /// Client-chosen name of the subscription, echoed on its messages;
        /// needed for a second subscription on the same socket.
        #[serde(default)]
        id: Option<String>,
        /// A stream name, or `$all`.
        stream: String,
        #[serde(default)]
        from: Option<Value>,
        #[serde(default)]
        filter: Option<Box<WsFilter>>,
    },
    Unsubscribe {
        /// The `id` given when subscribing.
        id: String,
    },
}

/// `GET /ws`: WebSocket. The client sends one
/// `{"type":"subscribe","stream":"<name>|$all","from":"start"|"end"|n,"filter":{…}}`
/// and receives `subscribed`, then `event` messages.
#[utoipa::path(get, path = "/ws", tag = "live",
    responses((status = 101, description = "WebSocket upgrade; access is checked per `subscribe` message"),
        (status = 400, description = "Not a valid WebSocket handshake", body = ErrorOut),
        (status = 426, description = "`upgrade_required`: the connection cannot be upgraded", body = ErrorOut)))]
pub async fn ws(State(state): State<AppState>, principal: Principal, upgrade: WebSocketUpgrade) -> Response {
    let session = crate::serve::Session::begin(&state);
    upgrade
        .max_message_size(64 * 1024)
        .on_upgrade(move |socket| session.run(ws_session(state, principal, socket)))
}

fn ws_json(v: &Value) -> Message {
    Message::Text(v.to_string().into())
}

fn ws_error(e: &ApiError) -> Message {
    ws_json(&error_body(e))
}

fn error_body(e: &ApiError) -> Value {
    json!({ "type": "error", "error": { "code": e.code, "message": e.message } })
}

/// The `id` a client message names, when it is a JSON object with a string
/// `id` (even one otherwise invalid), so the error about it can say which
/// subscription it concerns.
fn message_id(text: &str) -> Option<String> {
    match serde_json::from_str::<Value>(text).ok()? {
        Value::Object(mut map) => match map.remove("id")? {
            Value::String(id) => Some(id),
            _ => None,
        },
        _ => None,
    }
}

/// Most subscriptions one WebSocket may hold.
pub const MAX_WS_SUBSCRIPTIONS: usize = 64;

fn parse_message(text: &str) -> Result<ClientMessage, ApiError> {
    serde_json::from_str(text)
        .map_err(|e| ApiError::new(axum::http::StatusCode::BAD_REQUEST, "invalid_message", format!("{e}")))
}

fn parse_subscribe(
    stream: String,
    from: Option<Value>,
    filter: Option<Box<WsFilter>>,
    principal: &Principal,
) -> Result<SubscriptionRequest, ApiError> {
    let from = subscribe_from(from.as_ref())?;
    if stream == "$all" {
        let query = filter.map(|f| *f).unwrap_or_default().into_query();
        let filter = query.to_filter()?;
        query.authorize(principal, &filter)?;
        Ok(SubscriptionRequest::all(filter, from))
    } else {
        if filter.is_some() {
            return Err(ApiError::bad_request("`filter` applies only to $all subscriptions"));
        }
        let name = StreamName::any(&stream).map_err(ApiError::from)?;
        let needed = if name.is_system() { Role::Admin } else { Role::Reader };
        principal.authorize(needed, Some(name.as_str()))?;
        Ok(SubscriptionRequest::stream(name, from))
    }
}

/// One subscription of a WebSocket session.
#[derive(Default)]
struct WsSub {
    /// The client's id (`None` for the classic single, unnamed one).
    id: Option<String>,
    /// Position and version of the last event delivered.
    last: Option<(u64, u64)>,
    /// A `$all` subscription (resumed by position), not a stream.
    all: bool,
}

/// Adds the subscription's id (when it has one) to an outgoing message.
fn tagged(mut body: Value, id: Option<&str>) -> Message {
    if let (Some(obj), Some(id)) = (body.as_object_mut(), id) {
        obj.insert("id".into(), Value::from(id));
    }
    ws_json(&body)
}

fn notice_message(n: &Notice, sub: &WsSub) -> Message {
    let mut body = n.body(sub.last, sub.all);
    if let Some(obj) = body.as_object_mut() {
        obj.insert("type".into(), Value::from(n.code));
    }
    tagged(body, sub.id.as_deref())
}

/// Sends one message within `live.slow_client_timeout_ms`. `Err` ends the
/// session: `Err(None)` when the connection failed (nothing more can be
/// said on it), `Err(Some(slow_consumer))` when the send did not complete
/// in time (the client is counted as slow).
async fn send_or_end<S>(sink: &mut S, message: Message, state: &AppState) -> Result<(), Option<Notice>>
where
    S: futures::Sink<Message> + Unpin,
{
    let timeout = state.inner.config.live.slow_client_timeout();
    match tokio::time::timeout(timeout, sink.send(message)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(None),
        Err(_) => {
            state.inner.metrics.slow_disconnects.inc();
            tracing::info!("WebSocket client too slow; telling it and disconnecting");
            Err(Some(Notice::slow(timeout)))
        }
    }
}

async fn ws_session(state: AppState, principal: Principal, mut socket: WebSocket) {
    let live = state.inner.config.live.clone();
    let first = tokio::select! {
        // Nothing subscribed yet: only the reason to reconnect.
        () = state.inner.shutdown.cancelled() => {
            let bye = notice_message(&Notice::shutdown(), &WsSub::default());
            let _ = tokio::time::timeout(live.disconnect_grace(), socket.send(bye)).await;
            let _ = tokio::time::timeout(Duration::from_secs(1), socket.close()).await;
            return;
        }
        first = tokio::time::timeout(Duration::from_secs(30), socket.recv()) => first,
    };
    let text = match first {
        Ok(Some(Ok(Message::Text(t)))) => t,
        Ok(Some(Ok(_))) => {
            let _ =
                socket.send(ws_error(&ApiError::bad_request("send a text subscribe message first"))).await;
            return;
        }
        Ok(_) => return,
        Err(_) => {
            let _ = socket.send(ws_error(&ApiError::bad_request("no subscribe message within 30 s"))).await;
            return;
        }
    };
    // The first message must be a valid subscribe; otherwise the socket is
    // closed after the error, as before several subscriptions existed.
    let first = match parse_message(text.as_str()) {
        Ok(ClientMessage::Subscribe { id, stream, from, filter }) => {
            match parse_subscribe(stream, from, filter, &principal) {
                Ok(request) => check_start(&state, &request, "`from`").await.map(|()| (id, request)),
                Err(e) => Err(e),
            }
        }
        Ok(ClientMessage::Unsubscribe { .. }) => Err(ApiError::bad_request("subscribe first")),
        Err(e) => Err(e),
    };
    let (first_id, request) = match first {
        Ok(pair) => pair,
        Err(e) => {
            let _ = socket.send(tagged(error_body(&e), message_id(text.as_str()).as_deref())).await;
            let _ = socket.close().await;
            return;
        }
    };
    let _gauge = GaugeGuard::new(state.inner.metrics.subscriber_gauge("ws"));
    // Subscriptions by key ("" for the unnamed one), polled fairly.
    let mut streams: tokio_stream::StreamMap<String, EventStream> = tokio_stream::StreamMap::new();
    let mut subs: std::collections::HashMap<String, WsSub> = std::collections::HashMap::new();
    let subscribed = |request: &SubscriptionRequest, id: Option<&str>| {
        let target = match &request.target {
            SubscriptionTarget::All(_) => "$all".to_owned(),
            SubscriptionTarget::Stream(s) => s.as_str().to_owned(),
        };
        tagged(json!({ "type": "subscribed", "stream": target }), id)
    };
    // Subscribe before saying so: `from: "end"` starts at the head as the
    // store sees it when `subscribe` is called, and the client may commit
    // the moment it reads `subscribed`.
    let reply = subscribed(&request, first_id.as_deref());
    let key = first_id.clone().unwrap_or_default();
    let all = matches!(request.target, SubscriptionTarget::All(_));
    streams.insert(key.clone(), state.inner.store.subscribe(request));
    subs.insert(key, WsSub { id: first_id, last: None, all });
    if socket.send(reply).await.is_err() {
        return;
    }
    let (mut sink, mut incoming) = socket.split();
    let shutdown = state.inner.shutdown.clone();
    let mut count = 0u64;
    // Keepalive: a ping every `live.ws_ping_ms`; anything the client sends
    // (pongs included) proves it is there. Silent for three intervals: gone.
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + live.ws_ping(), live.ws_ping());
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = tokio::time::Instant::now();
    // Connection-wide endings tell every subscription where it stopped.
    let mut ending: Option<Notice> = None;
    let mut expiry = std::pin::pin!(expiry(principal.expires_at()));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                ending = Some(Notice::shutdown());
                break;
            }
            () = &mut expiry => {
                ending = Some(Notice::token_expired());
                break;
            }
            _ = ping.tick() => {
                let silent = heard.elapsed();
                if silent >= live.ws_ping() * 3 {
                    tracing::info!(silent_ms = silent.as_millis() as u64, "WebSocket client stopped answering pings");
                    ending = Some(Notice::ping_timeout(silent));
                    break;
                }
                if let Err(end) = send_or_end(&mut sink, Message::Ping(Default::default()), &state).await {
                    ending = end;
                    break;
                }
            }
            msg = incoming.next() => match msg {
                None | Some(Ok(Message::Close(_))) => break,
                Some(Err(e)) => {
                    // Too large, or not a valid frame: the socket cannot be
                    // read on, but it can still say where each
                    // subscription stopped.
                    tracing::info!(error = %e, "unreadable WebSocket message");
                    ending = Some(Notice::unreadable(&e));
                    break;
                }
                Some(Ok(Message::Text(t))) => {
                    heard = tokio::time::Instant::now();
                    let about = message_id(t.as_str());
                    let reply = match parse_message(t.as_str()) {
                        Ok(ClientMessage::Subscribe { id: None, .. }) => Err(ApiError::bad_request(
                            "give each further subscription on this socket an `id`",
                        )),
                        Ok(ClientMessage::Subscribe { id: Some(id), stream, from, filter }) => {
                            if subs.contains_key(&id) {
                                Err(ApiError::bad_request(format!("subscription `{id}` already exists")))
                            } else if subs.len() >= MAX_WS_SUBSCRIPTIONS {
                                Err(ApiError::bad_request(format!(
                                    "at most {MAX_WS_SUBSCRIPTIONS} subscriptions per socket"
                                )))
                            } else {
                                match parse_subscribe(stream, from, filter, &principal) {
                                    Ok(request) => check_start(&state, &request, "`from`").await.map(|()| {
                                        let msg = subscribed(&request, Some(&id));
                                        let all = matches!(request.target, SubscriptionTarget::All(_));
                                        streams.insert(id.clone(), state.inner.store.subscribe(request));
                                        subs.insert(id.clone(), WsSub { id: Some(id), last: None, all });
                                        msg
                                    }),
                                    Err(e) => Err(e),
                                }
                            }
                        }
                        Ok(ClientMessage::Unsubscribe { id }) => match subs.remove(&id) {
                            Some(_) => {
                                streams.remove(&id);
                                Ok(tagged(json!({ "type": "unsubscribed" }), Some(&id)))
                            }
                            None => Err(ApiError::bad_request(format!("no subscription `{id}`"))),
                        },
                        Err(e) => Err(e),
                    };
                    let out = reply.unwrap_or_else(|e| tagged(error_body(&e), about.as_deref()));
                    if let Err(end) = send_or_end(&mut sink, out, &state).await {
                        ending = end;
                        break;
                    }
                }
                Some(Ok(Message::Binary(_))) => {
                    heard = tokio::time::Instant::now();
                    let e = ApiError::bad_request("send JSON text messages");
                    if let Err(end) = send_or_end(&mut sink, ws_error(&e), &state).await {
                        ending = end;
                        break;
                    }
                }
                Some(Ok(_)) => heard = tokio::time::Instant::now(),
            },
            next = streams.next(), if !streams.is_empty() => match next {
                Some((key, Ok(event))) => {
                    count += 1;
                    observe_lag(&state, &event, count).await;
                    let position = (event.position, event.version);
                    let Some(sub) = subs.get_mut(&key) else { continue };
                    let body = tagged(json!({ "type": "event", "event": EventOut::from(&event) }), sub.id.as_deref());
                    match send_or_end(&mut sink, body, &state).await {
                        Ok(()) => {
                            sub.last = Some(position);
                            state.inner.metrics.delivered.inc();
                        }
                        Err(end) => {
                            // A slow send is queued in front of the notice,
                            // so a client that reads the notice has it.
                            if end.is_some() {
                                sub.last = Some(position);
                            }
                            ending = end;
                            break;
                        }
                    }
                }
                Some((key, Err(e))) => {
                    // This subscription ended (e.g. its stream was
                    // tombstoned); the others go on.
                    streams.remove(&key);
                    let sub = subs.remove(&key).unwrap_or_default();
                    let notice = notice_message(&Notice::from_error(e), &sub);
                    match send_or_end(&mut sink, notice, &state).await {
                        Ok(()) if subs.is_empty() => break,
                        Ok(()) => {}
                        Err(end) => {
                            ending = end;
                            break;
                        }
                    }
                }
                None => break,
            },
        }
    }
    if let Some(notice) = ending {
        let mut subs: Vec<&WsSub> = subs.values().collect();
        subs.sort_by(|a, b| a.id.cmp(&b.id));
        for sub in subs {
            let sent =
                tokio::time::timeout(live.disconnect_grace(), sink.send(notice_message(&notice, sub))).await;
            if !matches!(sent, Ok(Ok(()))) {
                break;
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
}
