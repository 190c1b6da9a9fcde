//! An in-process event bus: typed handlers by event type, middleware, a
//! concurrency limit, retries with backoff and dead letters.
//!
//! It is a [`PersistentSubscription`] underneath (group `bus-{name}`, with a
//! filter on the handled event types) and one consumer whose
//! `max_in_flight` is the concurrency limit, so retries, backoff, parking in
//! `$dlq-bus-{name}`, replay and the checkpoint all work exactly as for any
//! consumer group.
//!
//! # Delivery guarantee: at least once
//! Each event is handed to every handler registered for its type; the event
//! is acked when all of them succeeded. If one fails, the whole event is
//! retried, so the other handlers of that type see it again: handlers must
//! be idempotent. A handler (or middleware) that panics fails its event
//! like an error; the bus goes on.

use std::{
    collections::HashMap, future::Future, panic::AssertUnwindSafe, pin::Pin, sync::Arc, time::Duration,
};

use annals_core::{Filter, RecordedEvent, Store, SubscriptionTarget, TypeMatch};
use async_trait::async_trait;
use futures::{FutureExt, StreamExt, stream::FuturesUnordered};
use serde::de::DeserializeOwned;
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::Instrument;

use super::{
    ConsumerResult, GroupSettings, GroupStats, HandlerError, NackAction, ParkedMessage,
    PersistentSubscription, RetryPolicy, StartFrom, validate_name,
};

/// What a handler and middleware learn about the delivery.
#[derive(Debug, Clone)]
pub struct HandlerContext {
    /// The event as recorded.
    pub event: RecordedEvent,
    /// 1 for the first delivery, then counting retries.
    pub attempt: u32,
}

type HandlerFuture = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send>>;
type Handler = Arc<dyn Fn(HandlerContext) -> HandlerFuture + Send + Sync>;

/// Runs around every delivery (all handlers of one event), in the order
/// added: `before` first to last, `after` last to first.
#[async_trait]
pub trait Middleware: Send + Sync + 'static {
    /// Before the handlers run.
    async fn before(&self, _ctx: &HandlerContext) {}

    /// After they ran, with the outcome and how long they took.
    async fn after(&self, _ctx: &HandlerContext, _outcome: &Result<(), HandlerError>, _elapsed: Duration) {}
}

/// Logs each delivery's outcome with `tracing` (failures at `warn`).
#[derive(Debug, Clone, Copy, Default)]
pub struct LoggingMiddleware;

#[async_trait]
impl Middleware for LoggingMiddleware {
    async fn after(&self, ctx: &HandlerContext, outcome: &Result<(), HandlerError>, elapsed: Duration) {
        match outcome {
            Ok(()) => {
                tracing::debug!(event_type = %ctx.event.event_type, position = ctx.event.position, ?elapsed, "handled")
            }
            Err(e) => {
                tracing::warn!(event_type = %ctx.event.event_type, position = ctx.event.position, attempt = ctx.attempt, reason = %e, "handler failed")
            }
        }
    }
}

/// Records `annals_bus_handled_total{event_type, outcome}` and
/// `annals_bus_handler_seconds{event_type}` with the `metrics` crate.
#[derive(Debug, Clone, Copy, Default)]
pub struct MetricsMiddleware;

#[async_trait]
impl Middleware for MetricsMiddleware {
    async fn after(&self, ctx: &HandlerContext, outcome: &Result<(), HandlerError>, elapsed: Duration) {
        let outcome = if outcome.is_ok() { "ok" } else { "error" };
        let event_type = ctx.event.event_type.clone();
        metrics::counter!("annals_bus_handled_total", "event_type" => event_type.clone(), "outcome" => outcome)
            .increment(1);
        metrics::histogram!("annals_bus_handler_seconds", "event_type" => event_type)
            .record(elapsed.as_secs_f64());
    }
}

/// Configures an [`EventBus`].
pub struct EventBusBuilder {
    store: Arc<dyn Store>,
    name: String,
    handlers: HashMap<String, Vec<Handler>>,
    middleware: Vec<Arc<dyn Middleware>>,
    concurrency: usize,
    retry: RetryPolicy,
    ack_timeout: Duration,
    start_from: StartFrom,
}

impl EventBusBuilder {
    /// Handles events of type `event_type`, decoded from JSON into `T`. A
    /// payload that does not decode is parked at once (retrying cannot fix
    /// it).
    pub fn on<T, F, Fut>(mut self, event_type: impl Into<String>, handler: F) -> Self
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(T, HandlerContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased: Handler = Arc::new(move |ctx: HandlerContext| {
            let handler = handler.clone();
            Box::pin(async move {
                let payload: T = ctx.event.decode().map_err(|e| HandlerError::permanent(e.to_string()))?;
                handler(payload, ctx).await
            })
        });
        self.handlers.entry(event_type.into()).or_default().push(erased);
        self
    }

    /// Adds a middleware.
    pub fn middleware(mut self, middleware: impl Middleware) -> Self {
        self.middleware.push(Arc::new(middleware));
        self
    }

    /// At most this many events are handled at once (default 8).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self
    }

    /// Retries before an event is parked (default [`RetryPolicy::default`]).
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// A handler running longer than this is presumed dead and its event
    /// delivered again (default 30 s).
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// Where a new bus starts (default: from the first event).
    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.start_from = start;
        self
    }

    /// Starts the bus.
    pub async fn start(self) -> ConsumerResult<EventBus> {
        validate_name("bus", &self.name)?;
        let filter = Filter {
            event_types: self.handlers.keys().map(|t| TypeMatch::Exact(t.clone())).collect(),
            ..Filter::default()
        };
        let settings = GroupSettings::new(format!("bus-{}", self.name), SubscriptionTarget::All(filter))
            .start_from(self.start_from)
            .retry(self.retry)
            .ack_timeout(self.ack_timeout)
            .buffer_size(self.concurrency.saturating_mul(4).max(64));
        let group = PersistentSubscription::start(self.store, settings).await?;
        let consumer = group.connect(format!("bus-{}", self.name), self.concurrency);
        let cancel = CancellationToken::new();
        let shared = Arc::new(Dispatch { handlers: self.handlers, middleware: self.middleware });
        let token = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                biased;
                () = token.cancelled() => {}
                () = shared.run(consumer) => {}
            }
        });
        Ok(EventBus { group, _guard: cancel.drop_guard() })
    }
}

struct Dispatch {
    handlers: HashMap<String, Vec<Handler>>,
    middleware: Vec<Arc<dyn Middleware>>,
}

impl Dispatch {
    async fn run(self: Arc<Self>, mut consumer: super::Consumer) {
        let mut running = FuturesUnordered::new();
        loop {
            tokio::select! {
                delivery = consumer.next() => {
                    let Some(delivery) = delivery else { break };
                    let this = self.clone();
                    let ctx = HandlerContext { event: delivery.event, attempt: delivery.attempt };
                    let span = tracing::info_span!(
                        "bus.handle",
                        event_type = %ctx.event.event_type,
                        stream = %ctx.event.stream,
                        position = ctx.event.position,
                        correlation_id = ctx.event.metadata.correlation_id().unwrap_or_default(),
                    );
                    // A panicking middleware fails its event too, instead of
                    // ending this task (and with it the bus, silently).
                    let handled = async move {
                        let caught = AssertUnwindSafe(this.handle(ctx)).catch_unwind().await;
                        caught.unwrap_or_else(|p| Err(HandlerError::panicked(p)))
                    };
                    running.push(async move { (delivery.id, handled.await) }.instrument(span));
                }
                Some((id, outcome)) = running.next(), if !running.is_empty() => {
                    let settled = match outcome {
                        Ok(()) => consumer.ack(id).await,
                        Err(HandlerError { reason, permanent: true }) => consumer.nack(id, NackAction::Park, reason).await,
                        Err(HandlerError { reason, .. }) => consumer.nack(id, NackAction::Retry, reason).await,
                    };
                    if let Err(error) = settled {
                        // Timed out meanwhile: it is delivered again anyway.
                        tracing::debug!(%error, "could not settle a bus delivery");
                    }
                }
            }
        }
    }

    async fn handle(&self, ctx: HandlerContext) -> Result<(), HandlerError> {
        for m in &self.middleware {
            m.before(&ctx).await;
        }
        let started = tokio::time::Instant::now();
        let mut outcome = Ok(());
        for handler in self.handlers.get(&ctx.event.event_type).into_iter().flatten() {
            // A handler that panics failed this event (retried, then parked).
            let result = AssertUnwindSafe(handler(ctx.clone())).catch_unwind().await;
            if let Err(e) = result.unwrap_or_else(|p| Err(HandlerError::panicked(p))) {
                outcome = Err(e);
                break;
            }
        }
        let elapsed = started.elapsed();
        for m in self.middleware.iter().rev() {
            m.after(&ctx, &outcome, elapsed).await;
        }
        outcome
    }
}

/// A running event bus. Dropping it stops dispatching; in-flight handlers
/// are cancelled and their events delivered again on the next start.
pub struct EventBus {
    group: PersistentSubscription,
    _guard: DropGuard,
}

impl EventBus {
    /// A builder for the bus `name` (its group is `bus-{name}`).
    pub fn builder(store: Arc<dyn Store>, name: impl Into<String>) -> EventBusBuilder {
        EventBusBuilder {
            store,
            name: name.into(),
            handlers: HashMap::new(),
            middleware: Vec::new(),
            concurrency: 8,
            retry: RetryPolicy::default(),
            ack_timeout: Duration::from_secs(30),
            start_from: StartFrom::Start,
        }
    }

    /// The underlying group's stats.
    pub async fn stats(&self) -> ConsumerResult<GroupStats> {
        self.group.stats().await
    }

    /// Events parked after their handlers kept failing.
    pub async fn dead_letters(&self) -> ConsumerResult<Vec<ParkedMessage>> {
        self.group.parked().await
    }

    /// Delivers parked events to the handlers again.
    pub async fn replay_dead_letters(&self) -> ConsumerResult<usize> {
        self.group.replay_parked(None).await
    }

    /// Stops the bus and its group.
    pub async fn stop(self) {
        let EventBus { group, _guard } = self;
        drop(_guard);
        group.stop().await;
    }
}
