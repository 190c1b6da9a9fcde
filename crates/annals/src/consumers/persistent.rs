//! Persistent subscriptions (consumer groups).
//!
//! One background task (the *dispatcher*) per group owns all of the group's
//! state; consumers and the group handle talk to it over channels, so there
//! are no locks and every operation is applied in the order it arrived.
//!
//! # Delivery guarantee: at least once
//! - Each message is in flight with at most one consumer at a time. It goes
//!   to another consumer only after a nack with [`NackAction::Retry`], an
//!   ack timeout, or its consumer disconnecting.
//! - The checkpoint (`$ps-{group}`, the position (or stream version) of the
//!   first message not yet settled) advances only over a contiguous prefix
//!   of settled messages: acked, skipped, or parked (durably written to
//!   `$dlq-{group}` first). After a restart, delivery resumes from the
//!   checkpoint: messages acked but not yet covered by the checkpoint are
//!   delivered again (the at-least-once window); nothing unsettled is lost.
//! - A message found already parked in the dead-letter stream when it is
//!   read again after a restart is not delivered again.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::Arc,
    time::Duration,
};

use annals_core::{RecordedEvent, Store, SubscribeFrom, SubscriptionRequest, SubscriptionTarget};
use futures::StreamExt;
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{
    Backoff, ConsumerError, ConsumerResult, DeadLetterQueue, ParkedMessage, RetryPolicy, validate_name,
};

/// Where a new group (one without a checkpoint) starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartFrom {
    /// From the first event.
    #[default]
    Start,
    /// From events committed after the group is created.
    End,
}

/// A group's configuration.
#[derive(Debug, Clone)]
pub struct GroupSettings {
    /// The group name (1–200 bytes); names the checkpoint and the
    /// dead-letter stream.
    pub group: String,
    /// What it follows: one stream, or `$all` with a filter.
    pub target: SubscriptionTarget,
    /// Where a new group starts.
    pub start_from: StartFrom,
    /// Retries and backoff before parking.
    pub retry: RetryPolicy,
    /// An unacked delivery is taken back after this long (counts as a
    /// failed attempt) and delivered again.
    pub ack_timeout: Duration,
    /// At most this many messages past the checkpoint are held in memory;
    /// reading pauses while the buffer is full.
    pub buffer_size: usize,
    /// Save the checkpoint once it has moved this many positions past the
    /// saved one (default 256).
    pub checkpoint_every: u64,
    /// Save a checkpoint that moved at most this long ago, even if fewer
    /// than `checkpoint_every` positions (default 1 s). Stopping the group
    /// always saves. Only a crash can leave the saved checkpoint behind the
    /// settled messages, and then they are delivered again (at least once).
    pub checkpoint_interval: Duration,
}

impl GroupSettings {
    /// Defaults: start from the beginning, [`RetryPolicy::default`], 30 s
    /// ack timeout, 1,024 buffered messages.
    pub fn new(group: impl Into<String>, target: SubscriptionTarget) -> Self {
        GroupSettings {
            group: group.into(),
            target,
            start_from: StartFrom::Start,
            retry: RetryPolicy::default(),
            ack_timeout: Duration::from_secs(30),
            buffer_size: 1_024,
            checkpoint_every: 256,
            checkpoint_interval: Duration::from_secs(1),
        }
    }

    /// Sets how often the checkpoint is saved: after `every` positions, or
    /// `interval` after it moved, whichever comes first. Each save is a
    /// durable write on disk-backed stores, so saving per message caps the
    /// group at the store's fsync rate.
    pub fn checkpoint(mut self, every: u64, interval: Duration) -> Self {
        self.checkpoint_every = every.max(1);
        self.checkpoint_interval = interval;
        self
    }

    /// Sets where a new group starts.
    pub fn start_from(mut self, start: StartFrom) -> Self {
        self.start_from = start;
        self
    }

    /// Sets the retry policy.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Sets the ack timeout.
    pub fn ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }

    /// Sets the buffer size (at least 1).
    pub fn buffer_size(mut self, n: usize) -> Self {
        self.buffer_size = n.max(1);
        self
    }
}

/// What to do with a message a consumer could not handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NackAction {
    /// Deliver it again after a backoff; parked once the retry policy's
    /// attempts are used up.
    Retry,
    /// Park it in the dead-letter stream now.
    Park,
    /// Drop it: settled without being handled.
    Skip,
}

/// One message handed to one consumer.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// Identifies this delivery for [`Consumer::ack`] / [`Consumer::nack`];
    /// a redelivery of the same event gets a new id.
    pub id: u64,
    /// The event.
    pub event: RecordedEvent,
    /// 1 for the first delivery, then counting retries and timeouts.
    pub attempt: u32,
    /// Whether this is a replay of a parked message.
    pub replay: bool,
}

/// One consumer's view in [`GroupStats`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumerStats {
    /// The id it connected with.
    pub id: String,
    /// Messages delivered to it and not settled yet.
    pub in_flight: usize,
    /// Its limit.
    pub max_in_flight: usize,
}

/// A snapshot of a group's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStats {
    /// The group.
    pub group: String,
    /// Connected consumers.
    pub consumers: Vec<ConsumerStats>,
    /// Messages delivered and not settled.
    pub in_flight: usize,
    /// Messages read and waiting for delivery (including those waiting out
    /// a retry backoff).
    pub waiting: usize,
    /// Messages parked now in the dead-letter stream.
    pub parked: usize,
    /// The stored checkpoint: the first position (or stream version) not
    /// yet settled; `None` before the first save.
    pub last_checkpoint: Option<u64>,
    /// Events committed to the target past the checkpoint (for `$all`,
    /// positions, including ones the filter skips).
    pub lag: u64,
    /// Deliveries made (including redeliveries).
    pub delivered: u64,
    /// Messages acked.
    pub acked: u64,
    /// Deliveries that failed (nack with retry, or timeout).
    pub retried: u64,
    /// Deliveries taken back after the ack timeout.
    pub timed_out: u64,
    /// The error the group's store subscription last ended with, until it
    /// reads an event again (e.g. `StreamDeleted` for a group over a
    /// tombstoned stream); `None` while nothing failed. The group keeps
    /// resubscribing, waiting 0.5 s after the first failure, doubling up to
    /// 30 s.
    pub subscription_error: Option<String>,
}

enum Command {
    Connect { id: String, slot: u64, max_in_flight: usize, tx: mpsc::Sender<Delivery> },
    Disconnect { slot: u64 },
    Drained { slot: u64 },
    Settle { slot: u64, delivery: u64, action: Settle, reply: oneshot::Sender<ConsumerResult<()>> },
    Stats { reply: oneshot::Sender<ConsumerResult<GroupStats>> },
    Replay { positions: Option<Vec<u64>>, reply: oneshot::Sender<ConsumerResult<usize>> },
}

enum Settle {
    Ack,
    Nack(NackAction, String),
}

/// A consumer group: competing consumers over one stream or `$all`, with a
/// server-side checkpoint and a dead-letter stream. See the module docs for
/// the delivery guarantee.
///
/// Dropping the handle (or [`PersistentSubscription::stop`]) stops the
/// dispatcher task; consumers then see `next()` return `None`.
pub struct PersistentSubscription {
    group: String,
    commands: mpsc::UnboundedSender<Command>,
    dlq: DeadLetterQueue,
    next_slot: std::sync::atomic::AtomicU64,
    /// Taken by the first stop, which waits for it.
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    cancel: CancellationToken,
    _guard: DropGuard,
}

impl PersistentSubscription {
    /// Starts (or resumes) the group: loads its checkpoint and dead letters,
    /// then reads from the checkpoint. Fails on an invalid name or when the
    /// store fails while loading.
    pub async fn start(store: Arc<dyn Store>, settings: GroupSettings) -> ConsumerResult<Self> {
        validate_name("group", &settings.group)?;
        let dlq = DeadLetterQueue::new(store.clone(), &settings.group)?;
        let checkpoint_name = format!("$ps-{}", settings.group);
        let saved = store.load_checkpoint(&checkpoint_name).await?;
        let checkpoint = match (saved, settings.start_from) {
            (Some(next), _) => next,
            (None, StartFrom::Start) => 0,
            (None, StartFrom::End) => {
                // Pin "the end" now, so a restart does not move it.
                let next = head_of(&*store, &settings.target).await?;
                store.save_checkpoint(&checkpoint_name, next).await?;
                next
            }
        };
        let parked = dlq.load().await?;
        let cancel = CancellationToken::new();
        let (tx, rx) = mpsc::unbounded_channel();
        let dispatcher = Dispatcher {
            store,
            retry: settings.retry,
            ack_timeout: settings.ack_timeout,
            buffer_size: settings.buffer_size.max(1),
            checkpoint_every: settings.checkpoint_every.max(1),
            checkpoint_interval: settings.checkpoint_interval,
            unsaved_since: None,
            target: settings.target,
            group: settings.group.clone(),
            dlq: dlq.clone(),
            checkpoint_name,
            saved_checkpoint: saved.or((settings.start_from == StartFrom::End).then_some(checkpoint)),
            checkpoint,
            read_next: checkpoint,
            entries: BTreeMap::new(),
            ready: BTreeSet::new(),
            delayed: BTreeSet::new(),
            deadlines: BTreeSet::new(),
            deliveries: HashMap::new(),
            consumers: BTreeMap::new(),
            round_robin: 0,
            next_delivery: first_delivery_id(),
            next_replay: 0,
            parked,
            parked_version: None,
            replaying: BTreeSet::new(),
            counters: Counters::default(),
            subscription_error: None,
        };
        let task = tokio::spawn(dispatcher.run(rx, cancel.clone()));
        Ok(PersistentSubscription {
            group: settings.group,
            commands: tx,
            dlq,
            next_slot: std::sync::atomic::AtomicU64::new(1),
            task: tokio::sync::Mutex::new(Some(task)),
            _guard: cancel.clone().drop_guard(),
            cancel,
        })
    }

    /// The group's name.
    pub fn group(&self) -> &str {
        &self.group
    }

    /// Connects a consumer that accepts up to `max_in_flight` unsettled
    /// messages at a time (at least 1, at most `usize::MAX / 16`). A consumer id is a label for stats;
    /// two connections with the same id are two consumers.
    pub fn connect(&self, consumer_id: impl Into<String>, max_in_flight: usize) -> Consumer {
        // The channel behind a consumer refuses sizes near `usize::MAX`
        // (tokio's semaphore limit): "no limit" gets a window that large.
        let max_in_flight = max_in_flight.clamp(1, usize::MAX >> 4);
        let slot = self.next_slot.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(max_in_flight);
        let id = consumer_id.into();
        // A send fails only when the dispatcher is gone; the consumer then
        // sees `next() == None` at once, which is how it learns.
        let _ = self.commands.send(Command::Connect { id: id.clone(), slot, max_in_flight, tx });
        Consumer { id, slot, deliveries: rx, commands: self.commands.clone() }
    }

    /// The group's current state.
    pub async fn stats(&self) -> ConsumerResult<GroupStats> {
        let (reply, rx) = oneshot::channel();
        self.request(Command::Stats { reply }, rx).await
    }

    /// The messages parked now.
    pub async fn parked(&self) -> ConsumerResult<Vec<ParkedMessage>> {
        self.dlq.list().await
    }

    /// One parked message, by its original position.
    pub async fn inspect_parked(&self, position: u64) -> ConsumerResult<Option<ParkedMessage>> {
        self.dlq.inspect(position).await
    }

    /// The group's dead-letter queue.
    pub fn dead_letters(&self) -> &DeadLetterQueue {
        &self.dlq
    }

    /// Delivers parked messages to the group again (all of them, or those at
    /// the given original positions, as the dead-letter stream lists them
    /// now: a message discarded with [`DeadLetterQueue::resolve`] is not);
    /// returns how many were queued. A replayed message stops being listed
    /// as parked once it is acked or skipped; if it fails again it is parked
    /// again with the new reason. A replay is not itself durable: after a
    /// restart, messages whose replay had not been acked are still parked
    /// and can be replayed again.
    pub async fn replay_parked(&self, positions: Option<Vec<u64>>) -> ConsumerResult<usize> {
        let (reply, rx) = oneshot::channel();
        self.request(Command::Replay { positions, reply }, rx).await
    }

    /// Stops the dispatcher and waits for it to finish. Unsettled messages
    /// are delivered again by the next start.
    pub async fn stop(self) {
        self.halt().await;
    }

    /// [`PersistentSubscription::stop`] through a shared handle: the
    /// dispatcher stops now (saving its checkpoint) even while others
    /// still hold the subscription, and this waits for it to finish. Its
    /// consumers then get `None`, and every later call fails with
    /// [`ConsumerError::Stopped`].
    pub async fn halt(&self) {
        self.cancel.cancel();
        let task = self.task.lock().await.take();
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    async fn request<T>(
        &self,
        command: Command,
        rx: oneshot::Receiver<ConsumerResult<T>>,
    ) -> ConsumerResult<T> {
        self.commands.send(command).map_err(|_| ConsumerError::Stopped)?;
        rx.await.map_err(|_| ConsumerError::Stopped)?
    }
}

/// One connected consumer. Receive with [`Consumer::next`], settle each
/// delivery with [`Consumer::ack`] or [`Consumer::nack`]. Dropping it
/// disconnects: its unsettled messages go back to the group at once.
pub struct Consumer {
    id: String,
    slot: u64,
    deliveries: mpsc::Receiver<Delivery>,
    commands: mpsc::UnboundedSender<Command>,
}

impl Consumer {
    /// The id it connected with.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The next delivery; `None` once the group has stopped.
    pub async fn next(&mut self) -> Option<Delivery> {
        let delivery = self.deliveries.recv().await?;
        if self.deliveries.len() + 1 >= self.deliveries.max_capacity() {
            // The channel was full: the dispatcher may be waiting for room
            // (see `Slot::blocked`), which `Drained` gives it. Fails only
            // when it is gone.
            let _ = self.commands.send(Command::Drained { slot: self.slot });
        }
        Some(delivery)
    }

    /// The message was handled. Fails with [`ConsumerError::UnknownDelivery`]
    /// when the delivery is no longer this consumer's (timed out, settled).
    pub async fn ack(&self, delivery_id: u64) -> ConsumerResult<()> {
        self.settle(delivery_id, Settle::Ack).await
    }

    /// The message was not handled; `action` says what happens to it and
    /// `reason` is recorded if it ends up parked.
    pub async fn nack(
        &self,
        delivery_id: u64,
        action: NackAction,
        reason: impl Into<String>,
    ) -> ConsumerResult<()> {
        self.settle(delivery_id, Settle::Nack(action, reason.into())).await
    }

    async fn settle(&self, delivery: u64, action: Settle) -> ConsumerResult<()> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Settle { slot: self.slot, delivery, action, reply })
            .map_err(|_| ConsumerError::Stopped)?;
        rx.await.map_err(|_| ConsumerError::Stopped)?
    }
}

impl Drop for Consumer {
    fn drop(&mut self) {
        // Fails only when the dispatcher is gone, and then there is nothing
        // to give back.
        let _ = self.commands.send(Command::Disconnect { slot: self.slot });
    }
}

/// Where a message sits in the dispatcher. Replays sort first so that an
/// operator's replay is not stuck behind a long live backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Key {
    Replay(u64),
    Live(u64),
}

enum State {
    Waiting,
    InFlight,
    Done,
}

struct Entry {
    event: RecordedEvent,
    failures: u32,
    state: State,
}

struct Slot {
    id: String,
    tx: mpsc::Sender<Delivery>,
    max_in_flight: usize,
    /// Deliveries to it not settled, timed out or given back.
    in_flight: usize,
    /// Its channel was found full: deliveries that timed out before the
    /// consumer received them still take room there, so `in_flight` is
    /// below the limit while nothing more fits. Cleared when the consumer
    /// next receives ([`Command::Drained`]).
    blocked: bool,
}

#[derive(Default)]
struct Counters {
    delivered: u64,
    acked: u64,
    retried: u64,
    timed_out: u64,
}

struct Dispatcher {
    store: Arc<dyn Store>,
    retry: RetryPolicy,
    ack_timeout: Duration,
    buffer_size: usize,
    checkpoint_every: u64,
    checkpoint_interval: Duration,
    /// When the in-memory checkpoint first moved past the saved one.
    unsaved_since: Option<Instant>,
    target: SubscriptionTarget,
    group: String,
    dlq: DeadLetterQueue,
    checkpoint_name: String,
    /// What the store holds.
    saved_checkpoint: Option<u64>,
    /// The first unsettled sequence number (position or version).
    checkpoint: u64,
    /// The sequence number after the last one read.
    read_next: u64,
    entries: BTreeMap<Key, Entry>,
    ready: BTreeSet<Key>,
    delayed: BTreeSet<(Instant, Key)>,
    deadlines: BTreeSet<(Instant, u64)>,
    /// delivery id → (message, consumer slot)
    deliveries: HashMap<u64, (Key, u64)>,
    consumers: BTreeMap<u64, Slot>,
    round_robin: u64,
    next_delivery: u64,
    next_replay: u64,
    /// Parked now, by original position.
    parked: BTreeMap<u64, ParkedMessage>,
    /// The dead-letter stream's last version when `parked` was last read
    /// from it. Stats read it again once the stream moved: a message
    /// resolved through the queue itself (an operator discarding it) is no
    /// longer parked, whatever this dispatcher remembers.
    parked_version: Option<u64>,
    replaying: BTreeSet<u64>,
    counters: Counters,
    /// See [`GroupStats::subscription_error`].
    subscription_error: Option<String>,
}

/// `at + wait`; for a wait too long to add (`Duration::MAX`, meaning
/// "never"), a time a century away.
fn later(at: Instant, wait: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3_600);
    at.checked_add(wait).or_else(|| at.checked_add(CENTURY)).unwrap_or(at)
}

async fn head_of(store: &dyn Store, target: &SubscriptionTarget) -> ConsumerResult<u64> {
    Ok(match target {
        SubscriptionTarget::All(_) => store.next_position().await?,
        SubscriptionTarget::Stream(stream) => {
            store.stream_info(stream).await?.last_version.map_or(0, |v| v + 1)
        }
    })
}

async fn next_item(
    subscription: &mut Option<annals_core::EventStream>,
) -> Option<annals_core::Result<RecordedEvent>> {
    match subscription {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Dispatcher {
    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>, cancel: CancellationToken) {
        let mut subscription = Some(self.subscribe());
        let mut resubscribe_at: Option<Instant> = None;
        let mut backoff = Backoff::new();
        loop {
            self.dispatch();
            let save_at = self.unsaved_since.map(|t| later(t, self.checkpoint_interval));
            let wake = [
                self.delayed.first().map(|d| d.0),
                self.deadlines.first().map(|d| d.0),
                resubscribe_at,
                save_at,
            ]
            .into_iter()
            .flatten()
            .min();
            let live = self.entries.len().saturating_sub(self.replaying.len());
            let can_read = subscription.is_some() && live < self.buffer_size;
            tokio::select! {
                biased;
                () = cancel.cancelled() => break,
                command = commands.recv() => match command {
                    Some(command) => self.on_command(command).await,
                    None => break,
                },
                () = sleep_until(wake) => {
                    if resubscribe_at.is_some_and(|at| at <= Instant::now()) {
                        resubscribe_at = None;
                        subscription = Some(self.subscribe());
                    }
                    self.on_timer().await;
                }
                item = next_item(&mut subscription), if can_read => match item {
                    Some(Ok(event)) => {
                        backoff.delivered();
                        self.subscription_error = None;
                        self.on_event(event);
                    }
                    Some(Err(error)) => {
                        let wait = backoff.failed();
                        let message = error.to_string();
                        // Said once per cause: a failure that lasts (the
                        // stream tombstoned) is retried every 30 s at most.
                        if self.subscription_error.as_deref() != Some(message.as_str()) {
                            tracing::warn!(group = %self.group, %error, ?wait, "subscription failed; resubscribing");
                        } else {
                            tracing::debug!(group = %self.group, %error, ?wait, "subscription failed again");
                        }
                        self.subscription_error = Some(message);
                        subscription = None;
                        resubscribe_at = Some(Instant::now() + wait);
                    }
                    None => {
                        subscription = None;
                        resubscribe_at = Some(Instant::now() + backoff.failed());
                    }
                },
            }
            self.advance_checkpoint(false).await;
        }
        // Stopping (or being dropped) saves what was settled.
        self.advance_checkpoint(true).await;
    }

    fn subscribe(&self) -> annals_core::EventStream {
        let from = match self.read_next {
            0 => SubscribeFrom::Start,
            n => SubscribeFrom::After(n - 1),
        };
        self.store.subscribe(SubscriptionRequest { target: self.target.clone(), from })
    }

    fn seq(&self, event: &RecordedEvent) -> u64 {
        match self.target {
            SubscriptionTarget::All(_) => event.position,
            SubscriptionTarget::Stream(_) => event.version,
        }
    }

    fn on_event(&mut self, event: RecordedEvent) {
        let seq = self.seq(&event);
        if seq < self.read_next {
            return; // seen before a resubscribe
        }
        self.read_next = seq + 1;
        if self.parked.contains_key(&event.position) {
            // Parked before a restart that came before the checkpoint moved
            // past it: settled already.
            return;
        }
        let key = Key::Live(seq);
        self.entries.insert(key, Entry { event, failures: 0, state: State::Waiting });
        self.ready.insert(key);
    }

    fn pick_consumer(&mut self) -> Option<u64> {
        let rr = self.round_robin;
        let found = self
            .consumers
            .range(rr.saturating_add(1)..)
            .chain(self.consumers.range(..=rr))
            .find(|(_, slot)| !slot.blocked && slot.in_flight < slot.max_in_flight)
            .map(|(id, _)| *id)?;
        self.round_robin = found;
        Some(found)
    }

    fn dispatch(&mut self) {
        let now = Instant::now();
        while let Some(&key) = self.ready.first() {
            let Some(slot_id) = self.pick_consumer() else { return };
            self.ready.remove(&key);
            let Some(entry) = self.entries.get_mut(&key) else { continue };
            if !matches!(entry.state, State::Waiting) {
                continue; // settled or handed out meanwhile
            }
            let Some(slot) = self.consumers.get_mut(&slot_id) else { continue };
            let delivery = Delivery {
                id: self.next_delivery,
                event: entry.event.clone(),
                attempt: entry.failures + 1,
                replay: matches!(key, Key::Replay(_)),
            };
            match slot.tx.try_send(delivery) {
                Ok(()) => {
                    entry.state = State::InFlight;
                    slot.in_flight += 1;
                    self.deliveries.insert(self.next_delivery, (key, slot_id));
                    self.deadlines.insert((later(now, self.ack_timeout), self.next_delivery));
                    self.next_delivery += 1;
                    self.counters.delivered += 1;
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    // Stale deliveries (timed out before the consumer took
                    // them) fill the channel. Wait until it takes one; do not
                    // count them as in flight, or the consumer, once it has
                    // taken them and had their acks refused, would count as
                    // busy for good and never get anything again.
                    self.ready.insert(key);
                    slot.blocked = true;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.ready.insert(key);
                    self.disconnect(slot_id);
                }
            }
        }
    }

    /// Gives a consumer's unsettled messages back without counting a failure:
    /// the consumer went away, the message did not fail.
    fn disconnect(&mut self, slot: u64) {
        if self.consumers.remove(&slot).is_none() {
            return;
        }
        let taken: Vec<u64> =
            self.deliveries.iter().filter(|(_, (_, s))| *s == slot).map(|(d, _)| *d).collect();
        for delivery in taken {
            if let Some((key, _)) = self.deliveries.remove(&delivery)
                && let Some(entry) = self.entries.get_mut(&key)
            {
                entry.state = State::Waiting;
                self.ready.insert(key);
            }
        }
    }

    async fn on_command(&mut self, command: Command) {
        match command {
            Command::Connect { id, slot, max_in_flight, tx } => {
                self.consumers.insert(slot, Slot { id, tx, max_in_flight, in_flight: 0, blocked: false });
            }
            Command::Disconnect { slot } => self.disconnect(slot),
            Command::Drained { slot } => {
                if let Some(s) = self.consumers.get_mut(&slot) {
                    s.blocked = false;
                }
            }
            Command::Settle { slot, delivery, action, reply } => {
                let result = self.settle(slot, delivery, action).await;
                let _ = reply.send(result);
            }
            Command::Stats { reply } => {
                let _ = reply.send(self.stats().await);
            }
            Command::Replay { positions, reply } => {
                let _ = reply.send(self.replay(positions).await);
            }
        }
    }

    async fn settle(&mut self, slot: u64, delivery: u64, action: Settle) -> ConsumerResult<()> {
        match self.deliveries.get(&delivery) {
            Some(&(_, owner)) if owner == slot => {}
            _ => return Err(ConsumerError::UnknownDelivery { delivery_id: delivery }),
        }
        let Some((key, _)) = self.deliveries.remove(&delivery) else {
            return Err(ConsumerError::UnknownDelivery { delivery_id: delivery });
        };
        if let Some(s) = self.consumers.get_mut(&slot) {
            s.in_flight = s.in_flight.saturating_sub(1);
        }
        match action {
            Settle::Ack => {
                self.counters.acked += 1;
                self.complete(key).await;
            }
            Settle::Nack(NackAction::Skip, _) => self.complete(key).await,
            Settle::Nack(NackAction::Park, reason) => self.park(key, reason).await,
            Settle::Nack(NackAction::Retry, reason) => self.fail(key, reason).await,
        }
        Ok(())
    }

    async fn complete(&mut self, key: Key) {
        match key {
            Key::Live(_) => {
                if let Some(entry) = self.entries.get_mut(&key) {
                    entry.state = State::Done;
                }
            }
            Key::Replay(_) => {
                let Some(entry) = self.entries.remove(&key) else { return };
                let position = entry.event.position;
                self.replaying.remove(&position);
                match self.dlq.resolve(position, "replayed").await {
                    Ok(()) => {
                        self.parked.remove(&position);
                    }
                    // Still listed as parked; replaying it again is harmless
                    // under at-least-once.
                    Err(error) => {
                        tracing::warn!(group = %self.group, %error, position, "could not mark a replayed message resolved")
                    }
                }
            }
        }
    }

    async fn fail(&mut self, key: Key, reason: String) {
        let Some(entry) = self.entries.get_mut(&key) else { return };
        entry.failures += 1;
        self.counters.retried += 1;
        if self.retry.should_retry(entry.failures) {
            entry.state = State::Waiting;
            let wait = self.retry.delay(entry.failures, entry.event.position);
            self.delayed.insert((later(Instant::now(), wait), key));
        } else {
            self.park(key, reason).await;
        }
    }

    async fn park(&mut self, key: Key, reason: String) {
        let Some(entry) = self.entries.get_mut(&key) else { return };
        let message = ParkedMessage::of(&entry.event, reason, entry.failures.max(1));
        match self.dlq.park(&message).await {
            Ok(()) => {
                tracing::info!(group = %self.group, position = message.position, reason = %message.reason, "message parked");
                let position = message.position;
                self.parked.insert(position, message);
                match key {
                    Key::Live(_) => entry.state = State::Done,
                    Key::Replay(_) => {
                        self.entries.remove(&key);
                        self.replaying.remove(&position);
                    }
                }
            }
            Err(error) => {
                // Never settle a message whose dead letter is not durable:
                // deliver it again later instead.
                tracing::warn!(group = %self.group, %error, "could not park a message; it will be redelivered");
                entry.state = State::Waiting;
                self.delayed.insert((later(Instant::now(), self.retry.max_backoff), key));
            }
        }
    }

    async fn on_timer(&mut self) {
        let now = Instant::now();
        while let Some(&(at, key)) = self.delayed.first() {
            if at > now {
                break;
            }
            self.delayed.pop_first();
            if self.entries.get(&key).is_some_and(|e| matches!(e.state, State::Waiting)) {
                self.ready.insert(key);
            }
        }
        while let Some(&(at, delivery)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            // Settled deliveries leave their deadline behind; skip those.
            let Some((key, slot)) = self.deliveries.remove(&delivery) else { continue };
            if let Some(s) = self.consumers.get_mut(&slot) {
                s.in_flight = s.in_flight.saturating_sub(1);
            }
            self.counters.timed_out += 1;
            tracing::debug!(group = %self.group, delivery, "ack timeout; redelivering");
            self.fail(key, "ack timeout".to_owned()).await;
        }
    }

    /// Moves the in-memory checkpoint over settled messages and saves it
    /// when due (see [`GroupSettings::checkpoint_every`]) or when `force`d.
    async fn advance_checkpoint(&mut self, force: bool) {
        while let Some(entry) = self.entries.range(Key::Live(0)..).next() {
            if !matches!(entry.1.state, State::Done) {
                break;
            }
            let key = *entry.0;
            self.entries.remove(&key);
        }
        let next = match self.entries.range(Key::Live(0)..).next() {
            Some((Key::Live(seq), _)) => *seq,
            _ => self.read_next,
        };
        self.checkpoint = next;
        if self.saved_checkpoint.is_some_and(|saved| saved >= next)
            || (self.saved_checkpoint.is_none() && next == 0)
        {
            self.unsaved_since = None;
            return;
        }
        let now = Instant::now();
        let since = *self.unsaved_since.get_or_insert(now);
        let due = force
            || next.saturating_sub(self.saved_checkpoint.unwrap_or(0)) >= self.checkpoint_every
            || now.saturating_duration_since(since) >= self.checkpoint_interval;
        if !due {
            return;
        }
        match self.store.save_checkpoint(&self.checkpoint_name, next).await {
            Ok(()) => {
                self.saved_checkpoint = Some(next);
                self.unsaved_since = None;
                // Gauges follow the saved checkpoint (at most every
                // `checkpoint_every` positions or `checkpoint_interval`), so
                // /metrics shows a group's state without anyone asking for
                // its stats.
                if let Err(error) = self.stats().await {
                    tracing::debug!(group = %self.group, %error, "could not refresh the group's gauges");
                }
            }
            // Retried after the next message; a stale checkpoint only widens
            // the at-least-once window.
            Err(error) => tracing::warn!(group = %self.group, %error, "could not save the checkpoint"),
        }
    }

    async fn stats(&mut self) -> ConsumerResult<GroupStats> {
        let head = head_of(&*self.store, &self.target).await?;
        let dlq_version = match self.store.stream_info(self.dlq.stream()).await {
            Ok(info) => info.last_version,
            Err(annals_core::Error::StreamNotFound { .. }) => None,
            Err(e) => return Err(e.into()),
        };
        if dlq_version.is_some() && dlq_version != self.parked_version {
            self.parked = self.dlq.load().await?;
            self.parked_version = dlq_version;
        }
        let lag = head.saturating_sub(self.checkpoint);
        let in_flight = self.deliveries.len();
        let labels = [("group", self.group.clone())];
        metrics::gauge!("annals_subscription_lag", &labels).set(lag as f64);
        metrics::gauge!("annals_subscription_in_flight", &labels).set(in_flight as f64);
        metrics::gauge!("annals_dlq_size", &labels).set(self.parked.len() as f64);
        if let Some(saved) = self.saved_checkpoint {
            metrics::gauge!("annals_subscription_checkpoint", &labels).set(saved as f64);
        }
        Ok(GroupStats {
            group: self.group.clone(),
            consumers: self
                .consumers
                .values()
                .map(|s| ConsumerStats {
                    id: s.id.clone(),
                    in_flight: s.in_flight,
                    max_in_flight: s.max_in_flight,
                })
                .collect(),
            in_flight,
            waiting: self.entries.values().filter(|e| matches!(e.state, State::Waiting)).count(),
            parked: self.parked.len(),
            last_checkpoint: self.saved_checkpoint,
            lag,
            delivered: self.counters.delivered,
            acked: self.counters.acked,
            retried: self.counters.retried,
            timed_out: self.counters.timed_out,
            subscription_error: self.subscription_error.clone(),
        })
    }

    async fn replay(&mut self, positions: Option<Vec<u64>>) -> ConsumerResult<usize> {
        // The dead-letter stream, not what this dispatcher parked, says what
        // is parked now: an operator may have discarded messages through
        // the queue itself ([`DeadLetterQueue::resolve`]) since.
        self.parked = self.dlq.load().await?;
        let wanted: Vec<ParkedMessage> = self
            .parked
            .values()
            .filter(|m| positions.as_ref().is_none_or(|p| p.contains(&m.position)))
            .filter(|m| !self.replaying.contains(&m.position))
            .cloned()
            .collect();
        let mut queued = 0;
        for message in wanted {
            match self.dlq.original(&message).await {
                Ok(event) => {
                    let key = Key::Replay(self.next_replay);
                    self.next_replay += 1;
                    self.entries.insert(key, Entry { event, failures: 0, state: State::Waiting });
                    self.ready.insert(key);
                    self.replaying.insert(message.position);
                    queued += 1;
                }
                Err(ConsumerError::OriginalGone { position }) => {
                    tracing::warn!(group = %self.group, position, "parked message's original is gone; not replayed");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(queued)
    }
}

/// Where a dispatcher starts numbering its deliveries: random in
/// [2^20, 2^52), so that ids stay exact as JSON numbers (below 2^53) and a
/// delivery id handed out by another dispatcher of the same group (before a
/// leader hand-over, a restart, or a DELETE and PUT of the group) is all but
/// certain to be unknown here instead of naming another event: settling it
/// would ack, skip or park an event the consumer never saw. (Every
/// dispatcher counted from 1, and an old `nack skip` settled the new
/// leader's delivery of another event.)
fn first_delivery_id() -> u64 {
    const LOW: u64 = 1 << 20;
    const HIGH: u64 = 1 << 52;
    LOW + (uuid::Uuid::new_v4().as_u128() as u64) % (HIGH - LOW)
}
