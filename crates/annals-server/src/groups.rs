//! Persistent subscriptions (consumer groups) over HTTP and WebSocket.
//!
//! The server keeps a registry of running groups ([`Groups`]), created on
//! demand by `PUT /groups/{group}` and stopped by `DELETE` or on shutdown
//! (stopping saves the checkpoint). Definitions are durable: `PUT` and
//! `DELETE` append to the system stream `$groups`, and [`run`](crate::run)
//! restarts every defined group before it accepts connections
//! ([`AppState::restore_groups`]). Consumers connect over
//! `GET /groups/{group}/ws`; each socket is one competing consumer, and
//! closing it hands its unsettled messages back to the group.

use std::{
    collections::BTreeMap,
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use annals::consumers::{
    Consumer, ConsumerError, Delivery, GroupSettings, NackAction, PersistentSubscription, RetryPolicy,
    StartFrom,
};
use annals_core::{
    Direction, EventData, ExpectedVersion, Lease, Leases, ReadFrom, ReadStream, StreamName,
    SubscriptionTarget,
};
use axum::{
    Json,
    extract::{
        State,
        ws::{Message, WebSocket, WebSocketUpgrade},
    },
    http::StatusCode,
    response::{IntoResponse, Response},
};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::{
    AppState,
    auth::{Principal, Role},
    error::{ApiError, ErrorBody, ErrorOut},
    extract::{ApiJson, ApiPath, ApiQuery},
    routes::all::FilterQuery,
};

mod wire;

pub use wire::{
    ConsumerOut, DeliveryOut, GroupCountsOut, GroupListOut, GroupOut, GroupStatsOut, ParkedListOut,
    ParkedOut, PullOut, ReplayOut, SettleErrorOut, SettleOut,
};

/// Longest accepted ack timeout (a day): longer ones are almost surely a
/// unit mistake.
const MAX_ACK_TIMEOUT_MS: u64 = 24 * 60 * 60 * 1000;
/// Most retries a group may be configured with.
const MAX_RETRIES: u32 = 10_000;
/// Most messages one consumer may hold unsettled.
const MAX_IN_FLIGHT: usize = 10_000;
/// Longest long-poll of `POST /groups/{group}/next`.
const MAX_WAIT_MS: u64 = 25_000;
/// Longest nack `reason`: it is stored in the dead-letter event, which
/// the store's event size limit bounds; a park that cannot be stored does
/// not happen (the message comes back later), so a longer reason is
/// refused up front.
const MAX_REASON_BYTES: usize = 16 * 1024;
/// A pull consumer idle for the group's ack timeout, but at least this
/// long, is dropped.
const PULL_IDLE_MIN: Duration = Duration::from_secs(30);

/// The lease that elects the one server process of a shared store that
/// runs the consumer groups.
pub(crate) const GROUPS_LEASE: &str = "consumer-groups";
/// How often a process that does not run the groups tries to take over.
pub(crate) const LEASE_RETRY: Duration = Duration::from_secs(2);
/// While the lease cannot be asked for, every this many failed attempts
/// (about a minute) is logged as a WARN; the others at DEBUG.
const LEASE_WARN_EVERY: u32 = 30;

/// The running groups of one server.
pub(crate) struct Groups {
    inner: Mutex<Registry>,
    /// Whether this process runs the groups: always when it is the store's
    /// only process (no leases attached), otherwise while it holds
    /// [`GROUPS_LEASE`].
    leading: AtomicBool,
    /// While another process leads: the URL it published with the lease,
    /// as this process last read it (refreshed on every take-over attempt).
    leader: std::sync::Mutex<Option<String>>,
    /// Take-over attempts that failed in a row (the store could not be
    /// asked); only the first of a run, and then one a minute, is a WARN.
    lease_failures: AtomicU32,
}

impl Default for Groups {
    fn default() -> Self {
        Groups {
            inner: Mutex::default(),
            leading: AtomicBool::new(true),
            leader: std::sync::Mutex::new(None),
            lease_failures: AtomicU32::new(0),
        }
    }
}

#[derive(Default)]
struct Registry {
    running: BTreeMap<String, Entry>,
    /// Set on shutdown: no group may start after the registry was emptied.
    closed: bool,
    /// The groups lease, while this process holds it; released after the
    /// groups have stopped and saved their checkpoints.
    lease: Option<Lease>,
}

/// Resolves when the groups lease is lost.
type LeaseLost = Pin<Box<dyn Future<Output = ()> + Send>>;

#[derive(Clone)]
struct Entry {
    spec: GroupSpec,
    subscription: Arc<PersistentSubscription>,
    /// HTTP pull consumers by id; each lives across requests until idle.
    pulls: Arc<Mutex<BTreeMap<String, Arc<PullConsumer>>>>,
    /// Cancelled when the group is removed; ends its pull reaper.
    removed: CancellationToken,
}

/// One HTTP pull consumer: a library consumer kept between requests.
struct PullConsumer {
    consumer: Mutex<Consumer>,
    last_used: std::sync::Mutex<Instant>,
}

impl PullConsumer {
    fn touch(&self) {
        if let Ok(mut t) = self.last_used.lock() {
            *t = Instant::now();
        }
    }

    fn idle_for(&self) -> Duration {
        self.last_used.lock().map(|t| t.elapsed()).unwrap_or_default()
    }
}

impl Entry {
    fn new(spec: GroupSpec, subscription: PersistentSubscription) -> Self {
        let entry = Entry {
            spec,
            subscription: Arc::new(subscription),
            pulls: Arc::default(),
            removed: CancellationToken::new(),
        };
        // An abandoned pull consumer would keep its messages (and keep being
        // handed new ones) until the ack timeout; dropping it after the same
        // idle time gives them back to the group.
        let idle = Duration::from_millis(entry.spec.ack_timeout_ms).max(PULL_IDLE_MIN);
        // Weak, so a state dropped without a shutdown (tests driving `app`
        // directly) does not leave this task running forever.
        let (pulls, removed) = (Arc::downgrade(&entry.pulls), entry.removed.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = removed.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {
                        let Some(pulls) = pulls.upgrade() else { break };
                        pulls.lock().await.retain(|_, p| p.idle_for() < idle);
                    }
                }
            }
        });
        entry
    }
}

impl Groups {
    /// Stops every group (saving checkpoints) and refuses new ones; then
    /// releases the groups lease, so the process taking over starts from
    /// those checkpoints.
    pub(crate) async fn stop_all(&self) {
        self.stop_running(true).await;
    }

    /// Until the lease is taken, on a shared store.
    pub(crate) fn set_follower(&self) {
        self.leading.store(false, Ordering::Release);
    }

    pub(crate) fn leading(&self) -> bool {
        self.leading.load(Ordering::Acquire)
    }

    /// The URL the leading process published, when another one leads and
    /// it published one.
    pub(crate) fn leader(&self) -> Option<String> {
        if self.leading() {
            return None;
        }
        self.leader.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn set_leader(&self, url: Option<String>) {
        *self.leader.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = url;
    }

    /// Stops running the groups here: group requests are refused from now
    /// on, the running groups stop (saving their checkpoints) and the lease
    /// is released. The registry stays open for a later take-over.
    async fn step_down(&self) {
        self.leading.store(false, Ordering::Release);
        self.stop_running(false).await;
    }

    /// Empties the registry (closing it for good when `close`), stops the
    /// groups it held, then releases the lease.
    async fn stop_running(&self, close: bool) {
        let (entries, lease) = {
            let mut registry = self.inner.lock().await;
            registry.closed |= close;
            (std::mem::take(&mut registry.running), registry.lease.take())
        };
        for (_, entry) in entries {
            entry.remove().await;
        }
        drop(lease);
    }

    async fn get(&self, group: &str) -> Result<Entry, ApiError> {
        self.inner.lock().await.running.get(group).cloned().ok_or_else(|| unknown_group(group))
    }
}

impl Entry {
    /// Stops a group removed from the registry, now, and waits until its
    /// dispatcher has saved its checkpoint, even while a request still
    /// holds the group (a pull long-poll: it then ends with what it has,
    /// and later calls on the group fail). The lease is released only
    /// after this, so a new leader never runs the group while this process
    /// still delivers it. (It once stopped only when the last handle went:
    /// a long-poll kept a stepped-down or deleted group delivering for up
    /// to its 25 s, beside the new leader or a re-created group.)
    async fn remove(self) {
        self.removed.cancel();
        self.pulls.lock().await.clear();
        self.subscription.halt().await;
    }
}

/// The system stream holding group definitions.
const GROUPS_STREAM: &str = "$groups";
/// Event type: a group was defined (`{ group, settings }`).
const GROUP_SAVED: &str = "$GroupSaved";
/// Event type: a group was deleted (`{ group }`).
const GROUP_DELETED: &str = "$GroupDeleted";

fn groups_stream() -> Result<StreamName, ApiError> {
    StreamName::system(GROUPS_STREAM).map_err(ApiError::from)
}

/// Appends a definition change to `$groups`.
async fn record(state: &AppState, event_type: &str, data: Value) -> Result<(), ApiError> {
    let event = EventData::json(event_type, &data).map_err(ApiError::from)?;
    state.inner.store.append(&groups_stream()?, ExpectedVersion::Any, vec![event]).await?;
    Ok(())
}

/// The groups defined in `$groups` now: the last definition of each group
/// that was not deleted after it.
async fn defined_groups(state: &AppState) -> annals_core::Result<BTreeMap<String, Value>> {
    let stream = StreamName::system(GROUPS_STREAM)?;
    let mut defined = BTreeMap::new();
    let mut from = ReadFrom::Start;
    loop {
        let page = state
            .inner
            .store
            .read_stream(&stream, ReadStream { from, direction: Direction::Forward, limit: 1_000 })
            .await;
        let page = match page {
            Ok(page) => page,
            Err(annals_core::Error::StreamNotFound { .. }) => return Ok(defined),
            Err(e) => return Err(e),
        };
        let Some(last) = page.last() else { return Ok(defined) };
        from = ReadFrom::At(last.version + 1);
        for event in &page {
            let Ok(data) = serde_json::from_slice::<Value>(&event.data) else { continue };
            let Some(group) = data.get("group").and_then(Value::as_str).map(str::to_owned) else { continue };
            match event.event_type.as_str() {
                GROUP_SAVED => {
                    defined.insert(group, data.get("settings").cloned().unwrap_or(Value::Null));
                }
                GROUP_DELETED => {
                    defined.remove(&group);
                }
                _ => {}
            }
        }
    }
}

impl AppState {
    /// Starts every consumer group defined in the store (`$groups`) that is
    /// not running yet; [`run`](crate::run) calls it before accepting
    /// connections. A definition that cannot start any more is logged and
    /// skipped. Returns how many groups it started.
    ///
    /// On a shared store (leases attached, see
    /// [`AppState::attach_leases`]) it starts nothing (and returns 0) unless
    /// this process holds the groups lease: [`run`](crate::run) takes the
    /// lease and then calls it.
    pub async fn restore_groups(&self) -> annals_core::Result<usize> {
        if !self.inner.config.groups.enabled {
            return Ok(0);
        }
        let defined = defined_groups(self).await?;
        let mut registry = self.inner.groups.inner.lock().await;
        if self.inner.leases.get().is_some() && registry.lease.is_none() {
            tracing::debug!("not restoring the consumer groups: another process holds their lease");
            return Ok(0);
        }
        let mut started = 0;
        for (group, settings) in defined {
            if registry.closed || registry.running.contains_key(&group) {
                continue;
            }
            let spec = serde_json::from_value::<GroupIn>(settings)
                .map_err(|e| ApiError::bad_request(format!("stored settings do not parse: {e}")))
                .and_then(GroupSpec::parse);
            let target = spec.as_ref().map_err(Clone::clone).and_then(GroupSpec::target_unchecked);
            let (spec, target) = match (spec, target) {
                (Ok(spec), Ok(target)) => (spec, target),
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!(%group, error = %e.message, "cannot restore consumer group; skipped");
                    continue;
                }
            };
            match PersistentSubscription::start(self.inner.store.clone(), spec.settings(&group, target)).await
            {
                Ok(subscription) => {
                    registry.running.insert(group, Entry::new(spec, subscription));
                    started += 1;
                }
                Err(e) => tracing::error!(%group, error = %e, "cannot restore consumer group; skipped"),
            }
        }
        Ok(started)
    }
}

/// One attempt to run the groups here: takes the groups lease if it is
/// free, publishing `advertise` (this process's URL, or empty) with it, and
/// restores the defined groups under it. Returns what resolves when the
/// lease is lost, or `None` when another process holds it (whose published
/// URL is then remembered for `groups_elsewhere` answers) or the attempt
/// failed (logged).
pub(crate) async fn try_lead(state: &AppState, leases: &dyn Leases, advertise: &str) -> Option<LeaseLost> {
    let groups = &state.inner.groups;
    let lease = match leases.try_lease_as(GROUPS_LEASE, advertise).await {
        Ok(Some(lease)) => lease,
        Ok(None) => {
            groups.lease_failures.store(0, Ordering::Relaxed);
            match leases.holder(GROUPS_LEASE).await {
                Ok(leader) => groups.set_leader(leader.filter(|url| !url.is_empty())),
                Err(e) => tracing::debug!(error = %e, "cannot read who holds the consumer-groups lease"),
            }
            return None;
        }
        Err(e) => {
            // Every LEASE_RETRY while the store is unreachable: say it once,
            // then once a minute.
            let failures = groups.lease_failures.fetch_add(1, Ordering::Relaxed);
            if failures.is_multiple_of(LEASE_WARN_EVERY) {
                tracing::warn!(error = %e, failures = failures + 1, "cannot ask for the consumer-groups lease; trying again every {}s", LEASE_RETRY.as_secs());
            } else {
                tracing::debug!(error = %e, failures = failures + 1, "cannot ask for the consumer-groups lease");
            }
            return None;
        }
    };
    groups.lease_failures.store(0, Ordering::Relaxed);
    groups.set_leader(None);
    let lost = Box::pin(lease.lost());
    {
        let mut registry = state.inner.groups.inner.lock().await;
        if registry.closed {
            return None;
        }
        registry.lease = Some(lease);
    }
    match state.restore_groups().await {
        Ok(restored) => {
            state.inner.groups.leading.store(true, Ordering::Release);
            tracing::info!(groups = restored, "this process runs the consumer groups");
            Some(lost)
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot restore the consumer groups; releasing their lease");
            state.inner.groups.step_down().await;
            None
        }
    }
}

/// Keeps the groups on exactly one process of a shared store: while this
/// process leads, waits for the lease to be lost and then stops its
/// groups; while it does not, tries to take the lease every
/// [`LEASE_RETRY`]. Returns when `stop` is cancelled (shutdown, after which
/// [`Groups::stop_all`] stops the groups and releases the lease).
pub(crate) async fn keep_leading(
    state: AppState,
    leases: Arc<dyn Leases>,
    advertise: String,
    mut lost: Option<LeaseLost>,
    stop: CancellationToken,
) {
    loop {
        match lost.take() {
            Some(lease_lost) => {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = lease_lost => {
                        tracing::warn!(
                            "lost the consumer-groups lease; stopping the groups here (the process that takes it over continues them)"
                        );
                        state.inner.groups.step_down().await;
                    }
                }
            }
            None => {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(LEASE_RETRY) => {}
                }
                lost = try_lead(&state, &*leases, &advertise).await;
            }
        }
    }
}

/// Refuses group operations on a server with `groups.enabled = false`, and
/// on a process that does not run the groups of its shared store.
fn enabled(state: &AppState) -> Result<(), ApiError> {
    if !state.inner.config.groups.enabled {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "groups_disabled",
            "consumer groups are disabled on this server (groups.enabled = false); use the server that runs them",
        ));
    }
    if !state.inner.groups.leading() {
        return Err(elsewhere(state));
    }
    Ok(())
}

/// `503 groups_elsewhere`, naming the leading process's URL (`details.leader`)
/// when it published one (`advertise_url`).
fn elsewhere(state: &AppState) -> ApiError {
    let leader = state.inner.groups.leader();
    let there = match &leader {
        Some(url) => format!("send group requests to {url}"),
        None => "send group requests there (its address is not known here: give every process an \
                 advertise_url)"
            .to_owned(),
    };
    let mut e = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "groups_elsewhere",
        format!(
            "the consumer groups of this store run on another server process now; {there}, or retry: \
             this process takes them over within seconds if that one stops"
        ),
    );
    if let Some(url) = leader {
        e = e.with_details(json!({ "leader": url }));
    }
    e.retry_after = Some(LEASE_RETRY.as_secs());
    e
}

fn unknown_group(group: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "group_not_found", format!("no running group '{group}'"))
        .with_details(json!({ "group": group }))
}

fn consumer_error(e: ConsumerError) -> ApiError {
    let message = e.to_string();
    match e {
        ConsumerError::Store(e) => ApiError::from(e),
        ConsumerError::UnknownDelivery { delivery_id } => {
            ApiError::new(StatusCode::NOT_FOUND, "unknown_delivery", message)
                .with_details(json!({ "delivery_id": delivery_id }))
        }
        ConsumerError::Stopped => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "group_stopped", message),
        ConsumerError::InvalidName { .. } => ApiError::new(StatusCode::BAD_REQUEST, "invalid_name", message),
        ConsumerError::OriginalGone { .. } => ApiError::new(StatusCode::GONE, "original_gone", message),
        _ => ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message),
    }
}

/// Same rules as the library (which does not export them), checked first
/// so a bad name is a 400 before anything touches the store.
fn validate_group(name: &str) -> Result<(), ApiError> {
    let bad = |reason: &str| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_name", format!("invalid group name: {reason}"))
    };
    if name.is_empty() || name.len() > 200 {
        return Err(bad("must be 1–200 bytes"));
    }
    if name.chars().any(char::is_control) {
        return Err(bad("contains a control character"));
    }
    Ok(())
}

/// A `$all` filter in a group's settings: the names of the `GET /all`
/// query parameters.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stream_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    category: Option<String>,
    /// Comma-separated exact event types.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    event_type: Option<String>,
    /// Comma-separated event type prefixes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    type_prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    correlation_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    after: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    before: Option<String>,
    #[serde(default)]
    include_system: bool,
}

impl GroupFilter {
    fn to_query(&self) -> FilterQuery {
        FilterQuery {
            stream_prefix: self.stream_prefix.clone(),
            category: self.category.clone(),
            event_type: self.event_type.clone(),
            type_prefix: self.type_prefix.clone(),
            correlation_id: self.correlation_id.clone(),
            after: self.after.clone(),
            before: self.before.clone(),
            include_system: Some(self.include_system.to_string()),
        }
    }
}

/// Body of `PUT /groups/{group}`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupIn {
    /// A stream name, or `$all`.
    stream: String,
    /// `$all` only: which events.
    #[serde(default)]
    filter: Option<GroupFilter>,
    /// `start` (default) or `end`: where a group without a checkpoint starts.
    #[serde(default)]
    start_from: Option<String>,
    /// Redeliveries after the first failure before a message is parked.
    #[serde(default)]
    max_retries: Option<u32>,
    /// An unacked delivery is taken back after this long.
    #[serde(default)]
    ack_timeout_ms: Option<u64>,
}

/// A group's settings with defaults filled in: what `PUT` compares for
/// idempotency and what the listing shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct GroupSpec {
    stream: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    filter: Option<GroupFilter>,
    start_from: &'static str,
    max_retries: u32,
    ack_timeout_ms: u64,
}

impl GroupSpec {
    fn parse(body: GroupIn) -> Result<Self, ApiError> {
        let start_from = match body.start_from.as_deref().map(str::trim) {
            None | Some("start") => "start",
            Some("end") => "end",
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "`start_from` must be start or end, got '{other}'"
                )));
            }
        };
        let max_retries = body.max_retries.unwrap_or(RetryPolicy::default().max_attempts.saturating_sub(1));
        if max_retries > MAX_RETRIES {
            return Err(ApiError::bad_request(format!("`max_retries` must be at most {MAX_RETRIES}")));
        }
        let ack_timeout_ms = body.ack_timeout_ms.unwrap_or(30_000);
        if ack_timeout_ms == 0 || ack_timeout_ms > MAX_ACK_TIMEOUT_MS {
            return Err(ApiError::bad_request(format!("`ack_timeout_ms` must be 1..={MAX_ACK_TIMEOUT_MS}")));
        }
        if body.stream != "$all" && body.filter.is_some() {
            return Err(ApiError::bad_request("`filter` applies only to groups over $all"));
        }
        let filter = (body.stream == "$all").then(|| body.filter.unwrap_or_default());
        Ok(GroupSpec { stream: body.stream, filter, start_from, max_retries, ack_timeout_ms })
    }

    /// The subscription target, checking that `principal` has `role` on it
    /// (system streams and `include_system` need admin, as for reads).
    fn target(&self, principal: &Principal, role: Role) -> Result<SubscriptionTarget, ApiError> {
        match &self.filter {
            Some(f) => {
                let query = f.to_query();
                let filter = query.to_filter()?;
                let needed = if filter.include_system { Role::Admin } else { role };
                principal.authorize_all(needed, filter.stream_prefix.as_deref())?;
                Ok(SubscriptionTarget::All(filter))
            }
            None => {
                let name = StreamName::any(&self.stream).map_err(ApiError::from)?;
                let needed = if name.is_system() { Role::Admin } else { role };
                principal.authorize(needed, Some(name.as_str()))?;
                Ok(SubscriptionTarget::Stream(name))
            }
        }
    }

    /// The subscription target without an authorization check: for groups
    /// restored from `$groups`, authorized when they were defined.
    fn target_unchecked(&self) -> Result<SubscriptionTarget, ApiError> {
        match &self.filter {
            Some(f) => Ok(SubscriptionTarget::All(f.to_query().to_filter()?)),
            None => Ok(SubscriptionTarget::Stream(StreamName::any(&self.stream).map_err(ApiError::from)?)),
        }
    }

    fn settings(&self, group: &str, target: SubscriptionTarget) -> GroupSettings {
        let start = if self.start_from == "end" { StartFrom::End } else { StartFrom::Start };
        let retry =
            RetryPolicy { max_attempts: self.max_retries.saturating_add(1), ..RetryPolicy::default() };
        GroupSettings::new(group, target)
            .start_from(start)
            .retry(retry)
            .ack_timeout(Duration::from_millis(self.ack_timeout_ms))
    }
}

fn describe(group: &str, spec: &GroupSpec) -> Value {
    serde_json::to_value(GroupOut::new(group, spec)).unwrap_or(Value::Null)
}

/// `PUT /groups/{group}`: creates and starts a group, or confirms it runs
/// with the same settings.
#[utoipa::path(put, path = "/groups/{group}", tag = "groups",
    params(("group" = String, Path, description = "Group name (1–200 bytes)")),
    request_body = GroupIn,
    responses((status = 201, description = "Started", body = GroupOut),
        (status = 200, description = "Already running with these settings", body = GroupOut),
        (status = 400, description = "Invalid name or settings", body = ErrorOut),
        (status = 403, description = "Role below writer on the group's target", body = ErrorOut),
        (status = 409, description = "`group_exists`: running with different settings (`details.running`)", body = ErrorOut),
        (status = 503, description = "`groups_disabled` on this server, `groups_elsewhere` (another process runs them), or `shutting_down`", body = ErrorOut)))]
pub async fn create(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(group): ApiPath<String>,
    ApiJson(body): ApiJson<GroupIn>,
) -> Result<Response, ApiError> {
    principal.authorize(Role::Writer, None)?;
    enabled(&state)?;
    validate_group(&group)?;
    let spec = GroupSpec::parse(body)?;
    let target = spec.target(&principal, Role::Writer)?;
    // Held across the start so two concurrent creates cannot both start it.
    let mut registry = state.inner.groups.inner.lock().await;
    if registry.closed {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "the server is shutting down",
        ));
    }
    // Again under the registry lock: a step-down that began after the
    // check above has emptied the registry, and must not miss this group.
    if !state.inner.groups.leading() {
        return Err(elsewhere(&state));
    }
    if let Some(entry) = registry.running.get(&group) {
        if entry.spec == spec {
            return Ok((StatusCode::OK, Json(GroupOut::new(&group, &spec))).into_response());
        }
        // Names are shared by every principal: only one that may see the
        // running group's target learns its settings.
        if entry.spec.target(&principal, Role::Reader).is_err() {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "group_exists",
                format!("the group name '{group}' is taken; choose another"),
            ));
        }
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "group_exists",
            format!("group '{group}' is running with different settings; delete it first"),
        )
        .with_details(json!({ "running": describe(&group, &entry.spec) })));
    }
    let subscription =
        PersistentSubscription::start(state.inner.store.clone(), spec.settings(&group, target))
            .await
            .map_err(consumer_error)?;
    // Durable before it is reported: a group that was not recorded would
    // silently be gone after a restart.
    if let Err(e) = record(&state, GROUP_SAVED, json!({ "group": group, "settings": spec })).await {
        subscription.stop().await;
        return Err(e);
    }
    let body = GroupOut::new(&group, &spec);
    registry.running.insert(group, Entry::new(spec, subscription));
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// `GET /groups`: the running groups this principal may see.
#[utoipa::path(get, path = "/groups", tag = "groups",
    responses((status = 200, description = "Running groups the caller may see", body = GroupListOut),
        (status = 403, description = "Role below reader", body = ErrorOut),
        (status = 503, description = "`groups_disabled` on this server, `groups_elsewhere` (another process runs them)", body = ErrorOut)))]
pub async fn list(
    State(state): State<AppState>,
    principal: Principal,
) -> Result<Json<GroupListOut>, ApiError> {
    principal.authorize(Role::Reader, None)?;
    enabled(&state)?;
    let registry = state.inner.groups.inner.lock().await;
    let groups = registry
        .running
        .iter()
        .filter(|(_, e)| e.spec.target(&principal, Role::Reader).is_ok())
        .map(|(g, e)| GroupOut::new(g, &e.spec))
        .collect();
    Ok(Json(GroupListOut { groups }))
}

/// Looks a group up and checks `principal` has `role` on its target.
async fn authorized(
    state: &AppState,
    principal: &Principal,
    group: &str,
    role: Role,
) -> Result<Entry, ApiError> {
    principal.authorize(role, None)?;
    enabled(state)?;
    validate_group(group)?;
    let entry = state.inner.groups.get(group).await?;
    entry.spec.target(principal, role)?;
    Ok(entry)
}

/// `GET /groups/{group}`: settings and live statistics.
#[utoipa::path(get, path = "/groups/{group}", tag = "groups",
    params(("group" = String, Path, description = "Group name")),
    responses((status = 200, description = "Settings and live figures", body = GroupStatsOut),
        (status = 400, description = "Invalid group name", body = ErrorOut),
        (status = 403, description = "Role below reader on the group's target", body = ErrorOut),
        (status = 404, description = "`group_not_found`", body = ErrorOut),
        (status = 503, description = "`groups_disabled` on this server, `groups_elsewhere` (another process runs them), or `group_stopped`", body = ErrorOut)))]
pub async fn stats(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(group): ApiPath<String>,
) -> Result<Json<GroupStatsOut>, ApiError> {
    let entry = authorized(&state, &principal, &group, Role::Reader).await?;
    let s = entry.subscription.stats().await.map_err(consumer_error)?;
    Ok(Json(GroupStatsOut::new(group, &entry.spec, &s)))
}

/// `DELETE /groups/{group}`: stops the group (its checkpoint and dead
/// letters stay in the store; `PUT` resumes it). Connected consumers are
/// disconnected.
#[utoipa::path(delete, path = "/groups/{group}", tag = "groups",
    params(("group" = String, Path, description = "Group name")),
    responses((status = 204, description = "Stopped and forgotten (checkpoint and parked messages stay)"),
        (status = 400, description = "Invalid group name", body = ErrorOut),
        (status = 403, description = "Role below writer on the group's target", body = ErrorOut),
        (status = 404, description = "`group_not_found`", body = ErrorOut),
        (status = 503, description = "`groups_disabled` on this server, `groups_elsewhere` (another process runs them)", body = ErrorOut)))]
pub async fn delete(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(group): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    authorized(&state, &principal, &group, Role::Writer).await?;
    let removed = {
        let mut registry = state.inner.groups.inner.lock().await;
        if registry.running.contains_key(&group) {
            // Recorded first: if the store refuses, the group keeps running
            // and the caller gets the error.
            record(&state, GROUP_DELETED, json!({ "group": group })).await?;
        }
        registry.running.remove(&group)
    };
    match removed {
        Some(entry) => {
            entry.remove().await;
            Ok(StatusCode::NO_CONTENT)
        }
        None => Err(unknown_group(&group)),
    }
}

/// `GET /groups/{group}/parked`: the messages parked now.
#[utoipa::path(get, path = "/groups/{group}/parked", tag = "groups",
    params(("group" = String, Path, description = "Group name")),
    responses((status = 200, description = "The messages parked now", body = ParkedListOut),
        (status = 400, description = "Invalid group name", body = ErrorOut),
        (status = 403, description = "Role below reader on the group's target", body = ErrorOut),
        (status = 404, description = "`group_not_found`", body = ErrorOut),
        (status = 503, description = "`groups_disabled` on this server, `groups_elsewhere` (another process runs them), or `group_stopped`", body = ErrorOut)))]
pub async fn parked(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(group): ApiPath<String>,
) -> Result<Json<ParkedListOut>, ApiError> {
    let entry = authorized(&state, &principal, &group, Role::Reader).await?;
    let parked = entry.subscription.parked().await.map_err(consumer_error)?;
    Ok(Json(ParkedListOut { group, parked: parked.iter().map(ParkedOut::from).collect() }))
}

/// `GET /groups/{group}/parked/{position}`: one parked message, by its
/// original position.
#[utoipa::path(get, path = "/groups/{group}/parked/{position}", tag = "groups",
    params(("group" = String, Path, description = "Group name"), ("position" = u64, Path, description = "Original position")),
    responses((status = 200, description = "The parked message", body = ParkedOut),
        (status = 400, description = "Invalid group name or position", body = ErrorOut),
        (status = 403, description = "Role below reader on the group's target", body = ErrorOut),
        (status = 404, description = "`group_not_found` or `parked_not_found`", body = ErrorOut),
        (status = 503, description = "`groups_disabled` on this server, `groups_elsewhere` (another process runs them), or `group_stopped`", body = ErrorOut)))]
pub async fn inspect_parked(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath((group, position)): ApiPath<(String, u64)>,
) -> Result<Json<ParkedOut>, ApiError> {
    let entry = authorized(&state, &principal, &group, Role::Reader).await?;
    match entry.subscription.inspect_parked(position).await.map_err(consumer_error)? {
        Some(p) => Ok(Json(ParkedOut::from(&p))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "parked_not_found",
            format!("nothing parked at position {position} in group '{group}'"),
        )),
    }
}

/// Body of `POST /groups/{group}/parked/replay` (optional).
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplayIn {
    /// Original positions of the messages to replay (default: all).
    #[serde(default)]
    positions: Option<Vec<u64>>,
}

/// `POST /groups/{group}/parked/replay`: delivers parked messages again
/// (all, or those at `positions`).
#[utoipa::path(post, path = "/groups/{group}/parked/replay", tag = "groups",
    params(("group" = String, Path, description = "Group name")),
    request_body(content = Option<ReplayIn>, description = "Optional (any content type): an empty body replays every parked message"),
    responses((status = 200, description = "Queued for delivery again", body = ReplayOut),
        (status = 400, description = "Invalid group name or `invalid_json`", body = ErrorOut),
        (status = 403, description = "Role below writer on the group's target", body = ErrorOut),
        (status = 404, description = "`group_not_found`", body = ErrorOut),
        (status = 410, description = "`original_gone`: a parked message's event is no longer readable", body = ErrorOut),
        (status = 503, description = "`groups_disabled` on this server, `groups_elsewhere` (another process runs them), or `group_stopped`", body = ErrorOut)))]
pub async fn replay(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(group): ApiPath<String>,
    body: Bytes,
) -> Result<Json<ReplayOut>, ApiError> {
    let entry = authorized(&state, &principal, &group, Role::Writer).await?;
    // The body is optional, so an empty one (and no content type) is fine.
    let input: ReplayIn = if body.iter().all(u8::is_ascii_whitespace) {
        ReplayIn::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_json", format!("invalid JSON body: {e}"))
        })?
    };
    let queued = entry.subscription.replay_parked(input.positions).await.map_err(consumer_error)?;
    Ok(Json(ReplayOut { group, queued }))
}

/// Query of `GET /groups/{group}/ws`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ConsumeQuery {
    /// Consumer id (a label shown in stats; default `ws`).
    pub consumer: Option<String>,
    /// Unsettled messages this consumer accepts at a time (default 10).
    pub max_in_flight: Option<usize>,
    /// Credential for clients that cannot set headers.
    #[allow(dead_code, reason = "accepted here so unknown-field checks let it through; auth reads it")]
    pub access_token: Option<String>,
}

/// `GET /groups/{group}/ws`: one competing consumer over WebSocket. The
/// server sends `delivery` messages; the client settles each with `ack` or
/// `nack` (see `docs/http-api.md`).
#[utoipa::path(get, path = "/groups/{group}/ws", tag = "groups",
    params(("group" = String, Path, description = "Group name"), ConsumeQuery),
    responses((status = 101, description = "WebSocket upgrade; then `delivery` messages (DeliveryOut)"),
        (status = 400, description = "Invalid group name, consumer or `max_in_flight`; not a WebSocket request", body = ErrorOut),
        (status = 403, description = "Role below writer on the group's target", body = ErrorOut),
        (status = 404, description = "`group_not_found`", body = ErrorOut),
        (status = 426, description = "`upgrade_required`: the connection cannot be upgraded", body = ErrorOut),
        (status = 503, description = "`groups_disabled` on this server, `groups_elsewhere` (another process runs them)", body = ErrorOut)))]
pub async fn ws(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(group): ApiPath<String>,
    ApiQuery(query): ApiQuery<ConsumeQuery>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let entry = authorized(&state, &principal, &group, Role::Writer).await?;
    let consumer = query.consumer.unwrap_or_else(|| "ws".to_owned());
    validate_consumer(&consumer)?;
    let max_in_flight = query.max_in_flight.unwrap_or(10);
    if max_in_flight == 0 || max_in_flight > MAX_IN_FLIGHT {
        return Err(ApiError::bad_request(format!("`max_in_flight` must be 1..={MAX_IN_FLIGHT}")));
    }
    let subscription = entry.subscription;
    let expires = principal.expires_at();
    let tracked = crate::serve::Session::begin(&state);
    Ok(upgrade.max_message_size(64 * 1024).on_upgrade(move |socket| async move {
        // Connect only once upgraded, so a failed handshake holds nothing.
        let consumer = subscription.connect(consumer, max_in_flight);
        // The session must not keep a stopped group alive.
        drop(subscription);
        tracked.run(session(state, consumer, socket, expires)).await;
    }))
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum ClientMessage {
    Ack {
        delivery_id: u64,
    },
    Nack {
        delivery_id: u64,
        action: NackAction,
        #[serde(default)]
        reason: Option<String>,
    },
}

fn text(v: &Value) -> Message {
    Message::Text(v.to_string().into())
}

fn error_message(e: &ApiError, delivery_id: Option<u64>) -> Message {
    let mut body = json!({ "type": "error", "error": { "code": e.code, "message": e.message } });
    if let (Some(id), Some(obj)) = (delivery_id, body.as_object_mut()) {
        obj.insert("delivery_id".into(), Value::from(id));
    }
    text(&body)
}

/// Settles one client message; the answer to send back.
async fn on_client_message(consumer: &Consumer, raw: &str) -> Message {
    let msg: ClientMessage = match serde_json::from_str(raw) {
        Ok(m) => m,
        Err(e) => {
            let e = ApiError::new(StatusCode::BAD_REQUEST, "invalid_message", e.to_string());
            return error_message(&e, None);
        }
    };
    match msg {
        ClientMessage::Ack { delivery_id } => match consumer.ack(delivery_id).await {
            Ok(()) => text(&json!({ "type": "acked", "delivery_id": delivery_id })),
            Err(e) => error_message(&consumer_error(e), Some(delivery_id)),
        },
        ClientMessage::Nack { delivery_id, action, reason } => {
            if let Err(e) = check_reason(reason.as_deref()) {
                return error_message(&e, Some(delivery_id));
            }
            let reason = reason.unwrap_or_else(|| "nacked by consumer".to_owned());
            match consumer.nack(delivery_id, action, reason).await {
                Ok(()) => text(&json!({ "type": "nacked", "delivery_id": delivery_id, "action": action })),
                Err(e) => error_message(&consumer_error(e), Some(delivery_id)),
            }
        }
    }
}

fn check_reason(reason: Option<&str>) -> Result<(), ApiError> {
    match reason {
        Some(r) if r.len() > MAX_REASON_BYTES => {
            Err(ApiError::bad_request(format!("`reason` is {} bytes; at most {MAX_REASON_BYTES}", r.len())))
        }
        _ => Ok(()),
    }
}

fn delivery_message(d: &Delivery) -> Message {
    // Serializing this struct (strings, numbers, raw JSON) cannot fail.
    Message::Text(serde_json::to_string(&DeliveryOut::from(d)).unwrap_or_default().into())
}

fn validate_consumer(consumer: &str) -> Result<(), ApiError> {
    if consumer.is_empty() || consumer.len() > 200 || consumer.chars().any(char::is_control) {
        return Err(ApiError::bad_request("`consumer` must be 1–200 bytes without control characters"));
    }
    Ok(())
}

async fn session(
    state: AppState,
    mut consumer: Consumer,
    socket: WebSocket,
    expires: Option<tokio::time::Instant>,
) {
    let live = state.inner.config.live.clone();
    let shutdown = state.inner.shutdown.clone();
    let (mut sink, mut incoming) = socket.split();
    // Every send is bounded: a client that stops reading is disconnected,
    // and dropping its consumer hands its messages to the others.
    let slow = live.slow_client_timeout();
    // Keepalive, as for live sockets: a peer gone without a close would
    // otherwise keep taking deliveries that fit the socket buffers, each
    // then waiting out its ack timeout and counting as a failed attempt.
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + live.ws_ping(), live.ws_ping());
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = tokio::time::Instant::now();
    // A consumer's credential is checked when it connects; the session
    // ends when it expires, as a new request with it would be refused.
    let mut expiry = std::pin::pin!(crate::live::expiry(expires));
    loop {
        let out = tokio::select! {
            () = &mut expiry => {
                let e = ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "token_expired",
                    "the access token expired; unsettled deliveries go back to the group; \
                     reconnect with a fresh one",
                );
                let _ = tokio::time::timeout(live.disconnect_grace(), sink.send(error_message(&e, None))).await;
                break;
            }
            _ = ping.tick() => {
                let silent = heard.elapsed();
                if silent >= live.ws_ping() * 3 {
                    tracing::info!(silent_ms = silent.as_millis() as u64, "group consumer stopped answering pings");
                    let e = ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "ping_timeout",
                        format!(
                            "no pong or message for {} ms; unsettled deliveries go back to the group",
                            silent.as_millis()
                        ),
                    );
                    let _ = tokio::time::timeout(live.disconnect_grace(), sink.send(error_message(&e, None))).await;
                    break;
                }
                Message::Ping(Default::default())
            }
            () = shutdown.cancelled() => {
                let bye = text(&json!({ "type": "shutdown", "message": "the server is shutting down" }));
                let _ = tokio::time::timeout(live.disconnect_grace(), sink.send(bye)).await;
                break;
            }
            msg = incoming.next() => match msg {
                None | Some(Ok(Message::Close(_))) => break,
                Some(Err(e)) => {
                    // Too large, or not a valid frame: the socket cannot be
                    // read on, but the client can still be told why.
                    tracing::info!(error = %e, "unreadable group consumer message");
                    let e = ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "protocol_error",
                        format!(
                            "a client message could not be read ({e}); messages are text, at most 64 KiB; \
                             unsettled deliveries go back to the group"
                        ),
                    );
                    let _ = tokio::time::timeout(live.disconnect_grace(), sink.send(error_message(&e, None))).await;
                    break;
                }
                Some(Ok(Message::Text(t))) => {
                    heard = tokio::time::Instant::now();
                    on_client_message(&consumer, t.as_str()).await
                }
                Some(Ok(Message::Binary(_))) => {
                    heard = tokio::time::Instant::now();
                    error_message(&ApiError::new(StatusCode::BAD_REQUEST, "invalid_message", "send text JSON messages"), None)
                }
                Some(Ok(_)) => {
                    heard = tokio::time::Instant::now();
                    continue;
                }
            },
            delivery = consumer.next() => match delivery {
                Some(d) => delivery_message(&d),
                None => {
                    let e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "group_stopped", "the group was stopped");
                    let _ = tokio::time::timeout(slow, sink.send(error_message(&e, None))).await;
                    break;
                }
            },
        };
        match tokio::time::timeout(slow, sink.send(out)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break,
            Err(_) => {
                state.inner.metrics.slow_disconnects.inc();
                tracing::info!("group consumer too slow; disconnecting it");
                break;
            }
        }
    }
    drop(consumer);
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
}

/// Query of `POST /groups/{group}/next`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PullQuery {
    /// Consumer id (required: acks must name the consumer that pulled).
    pub consumer: String,
    /// Most deliveries to return (default 10, 1–10,000). The first pull of
    /// a consumer also makes this its `max_in_flight`.
    pub max: Option<usize>,
    /// Wait up to this long for a first delivery (default 0, at most
    /// 25,000).
    pub wait_ms: Option<u64>,
    /// Credential for clients that cannot set headers.
    #[allow(dead_code, reason = "accepted here so unknown-field checks let it through; auth reads it")]
    pub access_token: Option<String>,
}

/// `POST /groups/{group}/next`: pulls deliveries for an HTTP consumer.
#[utoipa::path(post, path = "/groups/{group}/next", tag = "groups",
    params(("group" = String, Path, description = "Group name"), PullQuery),
    responses((status = 200, description = "Deliveries (possibly none)", body = PullOut),
        (status = 400, description = "Invalid group name, consumer, `max` or `wait_ms`", body = ErrorOut),
        (status = 403, description = "Role below writer on the group's target", body = ErrorOut),
        (status = 404, description = "`group_not_found`", body = ErrorOut),
        (status = 503, description = "`groups_disabled` on this server, `groups_elsewhere` (another process runs them), or `group_stopped`", body = ErrorOut)))]
pub async fn pull(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(group): ApiPath<String>,
    ApiQuery(query): ApiQuery<PullQuery>,
) -> Result<Json<PullOut>, ApiError> {
    let entry = authorized(&state, &principal, &group, Role::Writer).await?;
    validate_consumer(&query.consumer)?;
    let max = query.max.unwrap_or(10);
    if max == 0 || max > MAX_IN_FLIGHT {
        return Err(ApiError::bad_request(format!("`max` must be 1..={MAX_IN_FLIGHT}")));
    }
    let wait = query.wait_ms.unwrap_or(0);
    if wait > MAX_WAIT_MS {
        return Err(ApiError::bad_request(format!("`wait_ms` must be at most {MAX_WAIT_MS}")));
    }
    // Ends before the whole-request timeout, which would answer `503
    // timeout` for what is only an empty pull.
    let request_ms = state.inner.config.timeouts.request_secs.saturating_mul(1000);
    let wait = wait.min(request_ms.saturating_sub(500).max(request_ms / 2));
    let puller = {
        let mut pulls = entry.pulls.lock().await;
        if entry.removed.is_cancelled() {
            return Err(unknown_group(&group));
        }
        pulls
            .entry(query.consumer.clone())
            .or_insert_with(|| {
                Arc::new(PullConsumer {
                    consumer: Mutex::new(entry.subscription.connect(query.consumer.clone(), max)),
                    last_used: std::sync::Mutex::new(Instant::now()),
                })
            })
            .clone()
    };
    puller.touch();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(wait);
    let mut deliveries = Vec::new();
    loop {
        {
            let mut consumer = puller.consumer.lock().await;
            while deliveries.len() < max {
                // Cancel-safe: a delivery not taken stays in the channel.
                match futures::FutureExt::now_or_never(consumer.next()) {
                    Some(Some(d)) => deliveries.push(DeliveryOut::from(&d)),
                    Some(None) => return Err(consumer_error(ConsumerError::Stopped)),
                    None => break,
                }
            }
        }
        // On shutdown, answer now with what there is: the drain would
        // otherwise wait out the poll, or cut it off without an answer.
        if !deliveries.is_empty()
            || tokio::time::Instant::now() >= deadline
            || state.inner.shutdown.is_cancelled()
        {
            break;
        }
        // Short naps instead of holding the consumer across the whole wait,
        // so acks from the same consumer are not blocked behind a long poll.
        let nap = deadline.min(tokio::time::Instant::now() + Duration::from_millis(20));
        tokio::select! {
            () = tokio::time::sleep_until(nap) => {}
            () = state.inner.shutdown.cancelled() => {}
        }
    }
    puller.touch();
    Ok(Json(PullOut { group, consumer: query.consumer, deliveries }))
}

/// Query of the pull ack/nack endpoints.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct SettleQuery {
    /// The consumer that pulled the deliveries.
    pub consumer: String,
    /// Credential for clients that cannot set headers.
    #[allow(dead_code, reason = "accepted here so unknown-field checks let it through; auth reads it")]
    pub access_token: Option<String>,
}

/// Body of `POST /groups/{group}/ack` and `/nack`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettleIn {
    /// Deliveries to settle.
    delivery_ids: Vec<u64>,
    /// Nack only: `retry`, `park` or `skip`.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    action: Option<NackAction>,
    /// Nack only: recorded if the message is parked.
    #[serde(default)]
    reason: Option<String>,
}

async fn settle(
    state: AppState,
    principal: Principal,
    group: String,
    consumer: String,
    body: SettleIn,
    nack: bool,
) -> Result<Json<SettleOut>, ApiError> {
    let entry = authorized(&state, &principal, &group, Role::Writer).await?;
    let action = match (nack, body.action) {
        (false, None) => None,
        (false, Some(_)) => return Err(ApiError::bad_request("`action` applies only to nack")),
        (true, Some(a)) => Some(a),
        (true, None) => return Err(ApiError::bad_request("nack needs `action`: retry, park or skip")),
    };
    if !nack && body.reason.is_some() {
        return Err(ApiError::bad_request("`reason` applies only to nack"));
    }
    check_reason(body.reason.as_deref())?;
    let puller = entry.pulls.lock().await.get(&consumer).cloned().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "consumer_not_found",
            format!("no pull consumer '{consumer}' in group '{group}' (it may have been idle too long)"),
        )
    })?;
    puller.touch();
    let consumer_guard = puller.consumer.lock().await;
    let reason = body.reason.unwrap_or_else(|| "nacked by consumer".to_owned());
    let mut settled = Vec::new();
    let mut errors = Vec::new();
    for id in body.delivery_ids {
        let result = match action {
            None => consumer_guard.ack(id).await,
            Some(a) => consumer_guard.nack(id, a, reason.clone()).await,
        };
        match result {
            Ok(()) => settled.push(id),
            Err(e) => {
                let e = consumer_error(e);
                errors.push(SettleErrorOut {
                    delivery_id: id,
                    error: ErrorBody { code: e.code, message: e.message, details: None },
                });
            }
        }
    }
    Ok(Json(SettleOut { settled, errors }))
}

/// `POST /groups/{group}/ack`: acks deliveries of a pull consumer.
#[utoipa::path(post, path = "/groups/{group}/ack", tag = "groups",
    params(("group" = String, Path, description = "Group name"), SettleQuery),
    request_body(content = SettleIn, description = "`{ delivery_ids }` (no `action` or `reason`)"),
    responses((status = 200, description = "Settled ids, and per delivery the reason it was not", body = SettleOut),
        (status = 400, description = "Invalid group name or consumer; `action`/`reason` misuse", body = ErrorOut),
        (status = 403, description = "Role below writer on the group's target", body = ErrorOut),
        (status = 404, description = "`group_not_found` or `consumer_not_found`", body = ErrorOut),
        (status = 503, description = "`groups_disabled` on this server, `groups_elsewhere` (another process runs them)", body = ErrorOut)))]
pub async fn pull_ack(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(group): ApiPath<String>,
    ApiQuery(query): ApiQuery<SettleQuery>,
    ApiJson(body): ApiJson<SettleIn>,
) -> Result<Json<SettleOut>, ApiError> {
    settle(state, principal, group, query.consumer, body, false).await
}

/// `POST /groups/{group}/nack`: nacks deliveries of a pull consumer.
#[utoipa::path(post, path = "/groups/{group}/nack", tag = "groups",
    params(("group" = String, Path, description = "Group name"), SettleQuery),
    request_body(content = SettleIn, description = "`{ delivery_ids, action: retry|park|skip, reason? }`"),
    responses((status = 200, description = "Settled ids, and per delivery the reason it was not", body = SettleOut),
        (status = 400, description = "Invalid group name or consumer; `action`/`reason` misuse", body = ErrorOut),
        (status = 403, description = "Role below writer on the group's target", body = ErrorOut),
        (status = 404, description = "`group_not_found` or `consumer_not_found`", body = ErrorOut),
        (status = 503, description = "`groups_disabled` on this server, `groups_elsewhere` (another process runs them)", body = ErrorOut)))]
pub async fn pull_nack(
    State(state): State<AppState>,
    principal: Principal,
    ApiPath(group): ApiPath<String>,
    ApiQuery(query): ApiQuery<SettleQuery>,
    ApiJson(body): ApiJson<SettleIn>,
) -> Result<Json<SettleOut>, ApiError> {
    settle(state, principal, group, query.consumer, body, true).await
}
