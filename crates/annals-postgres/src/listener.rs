//! The background task that keeps a store's view of the log head fresh:
//! `LISTEN` on the schema's channel (every append commits a `pg_notify`
//! with the new head), plus a bounded fallback poll of the head row.
//!
//! Owned by the store through a cancellation token; it ends when the last
//! handle to the store (including live subscriptions) is dropped. On a lost
//! connection it reconnects with backoff and polls the head at once, so a
//! notification lost during the outage delays wake-ups by at most one
//! reconnect, never loses events (subscribers read committed rows, the
//! head only tells them when to look). A deletion notified meanwhile is
//! lost the same way and cannot be polled: after a reconnect the stream
//! subscriptions read their streams once, as if one had been notified.
//!
//! A committed stream deletion notifies the channel with [`DELETED`]
//! instead of a head: the listener tells the store's subscription tail (so
//! stream subscriptions it serves read their stream again) and wakes the
//! subscriptions (so one on a tombstoned stream reports it now, not at the
//! next append). Listeners of earlier versions ignore the payload.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use tokio::{sync::watch, task::JoinHandle};
use tokio_postgres::{AsyncMessage, Client, Config};
use tokio_util::sync::CancellationToken;

use crate::{
    PgError,
    error::unreachable_from,
    sql::{Statements, quote_ident},
    tls::Connector,
};

/// Counters about the listener, for tests and operators.
#[derive(Debug, Default)]
pub(crate) struct ListenerStats {
    pub reconnects: AtomicU64,
    pub notifications: AtomicU64,
}

/// Raises the published head to `value` if it is newer (never lowers it).
pub(crate) fn bump(head: &watch::Sender<u64>, value: u64) {
    head.send_if_modified(|current| {
        if value > *current {
            *current = value;
            true
        } else {
            false
        }
    });
}

/// A connected, listening connection.
pub(crate) struct Connected {
    client: Client,
    /// Drives the connection and forwards notifications; ends when the
    /// connection does.
    driver: JoinHandle<()>,
}

impl Drop for Connected {
    /// The driver goes with the client (an attempt given up halfway, a
    /// connection replaced), never left running on its own.
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// How to open the listener's connection.
pub(crate) struct Dial {
    pub config: Config,
    pub tls: Connector,
    /// How long connecting (with `LISTEN`) or one poll of the head may take
    /// before the connection counts as dead (the store's connect timeout).
    /// A server that accepts but never answers, or a connection whose
    /// answers stopped, would otherwise stall the listener, and with it
    /// every wake-up from other processes, until the kernel gives up.
    pub answer_within: Duration,
    /// The store's subscription tail, told of deletions.
    pub tail: Arc<annals_core::subscription::Tail>,
    /// The store's session settings, SET before `LISTEN`.
    pub settings: Arc<str>,
    /// The store's own pool: while the listener's connection cannot be
    /// made again, the head is read through it (see [`run`]).
    pub pool: deadpool_postgres::Pool,
    /// The answer timeout of those reads (the connect timeout) and the
    /// schema's metric label.
    pub answer: crate::pooled::Answer,
    pub schema: Arc<str>,
}

/// The payload a deletion notifies (a head is always a number).
pub(crate) const DELETED: &str = "deleted";

/// A stream was deleted (or may have been): the tail's stream
/// subscriptions read their streams again, and every subscription wakes,
/// although the head did not move.
fn note_deletion(tail: &annals_core::subscription::Tail, head: &watch::Sender<u64>) {
    tail.note_deletion();
    // Wakes them with the value in place: reading it and sending it back
    // would lower a head that an append raised in between.
    head.send_modify(|_| {});
}

/// Connects and issues `LISTEN`.
pub(crate) async fn connect(
    dial: &Dial,
    sql: &Statements,
    head: &Arc<watch::Sender<u64>>,
    stats: &Arc<ListenerStats>,
) -> Result<Connected, PgError> {
    let (client, mut connection) = dial.config.connect(dial.tls.clone()).await.map_err(unreachable_from)?;
    let head = head.clone();
    let stats = stats.clone();
    let tail = dial.tail.clone();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    stats.notifications.fetch_add(1, Ordering::Relaxed);
                    if let Ok(next) = n.payload().parse::<u64>() {
                        bump(&head, next);
                    } else if n.payload() == DELETED {
                        note_deletion(&tail, &head);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "annals-postgres listener connection ended");
                    break;
                }
            }
        }
    });
    let connected = Connected { client, driver };
    connected
        .client
        .batch_execute(&format!("{}; LISTEN {}", dial.settings, quote_ident(&sql.channel)))
        .await?;
    Ok(connected)
}

/// [`connect`], given up after `dial.answer_within`.
pub(crate) async fn connect_within(
    dial: &Dial,
    sql: &Statements,
    head: &Arc<watch::Sender<u64>>,
    stats: &Arc<ListenerStats>,
) -> Result<Connected, PgError> {
    match tokio::time::timeout(dial.answer_within, connect(dial, sql, head, stats)).await {
        Ok(connected) => connected,
        Err(_) => Err(PgError::Unreachable {
            message: format!("no answer from the server within {:?}", dial.answer_within),
            source: None,
        }),
    }
}

/// Reads the head on a connection of the store's pool (bounded by the
/// answer timeout; a connection that breaks or does not answer is
/// discarded) and raises the published head to it. Failures are left to
/// the next attempt.
async fn poll_through_pool(dial: &Dial, sql: &Statements, head: &watch::Sender<u64>) {
    let object = match tokio::time::timeout(dial.answer_within, dial.pool.get()).await {
        Ok(Ok(object)) => object,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "annals-postgres head poll through the pool: no connection");
            return;
        }
        Err(_) => return,
    };
    let client = crate::pooled::Pooled::new(object, dial.schema.clone(), dial.answer.clone());
    let read = client
        .deadline()
        .bound(async {
            let broken = client.broken();
            client.query_one(sql.head.as_str(), &[]).await.map_err(crate::pooled::marking(&broken))
        })
        .await;
    match read {
        Ok(row) => {
            if let Some(next) = row.try_get::<_, i64>(0).ok().and_then(|v| u64::try_from(v).ok()) {
                bump(head, next);
            }
        }
        Err(e) => tracing::debug!(error = %e, "annals-postgres head poll through the pool failed"),
    }
}

/// Runs the listener until `cancel` fires.
pub(crate) async fn run(
    first: Connected,
    dial: Dial,
    sql: Arc<Statements>,
    head: Arc<watch::Sender<u64>>,
    stats: Arc<ListenerStats>,
    poll_every: Duration,
    cancel: CancellationToken,
) {
    let mut connected = Some(first);
    let mut backoff = Duration::from_millis(50);
    loop {
        let Some(mut conn) = connected.take() else {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            match connect_within(&dial, &sql, &head, &stats).await {
                Ok(c) => {
                    // A deletion notified while the listener was away is
                    // lost with its notification, and unlike a head it
                    // cannot be polled: have the stream subscriptions read
                    // their streams once, as a notification would have.
                    // (The head is polled just below.)
                    note_deletion(&dial.tail, &head);
                    stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("annals_pg_listener_reconnects_total", "schema" => sql.name.clone())
                        .increment(1);
                    backoff = Duration::from_millis(50);
                    connected = Some(c);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "annals-postgres listener cannot reconnect; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    // Only this connection may be out (a proxy or firewall
                    // rule, the role's connection limit reached while the
                    // pool's connections stay up): read the head through
                    // the pool meanwhile, so live subscriptions still learn
                    // of other processes' commits, after each attempt.
                    poll_through_pool(&dial, &sql, &head).await;
                }
            }
            continue;
        };
        // The first tick fires at once: after a (re)connect the head is
        // read immediately, covering notifications missed while away.
        let mut ticker = tokio::time::interval(poll_every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = &mut conn.driver => break,
                _ = ticker.tick() => {
                    let polled = tokio::time::timeout(dial.answer_within, conn.client.query_one(sql.head.as_str(), &[]));
                    match polled.await {
                        Ok(Ok(row)) => {
                            if let Some(next) = row.try_get::<_, i64>(0).ok().and_then(|v| u64::try_from(v).ok()) {
                                bump(&head, next);
                            }
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(error = %e, "annals-postgres listener poll failed; reconnecting");
                            break;
                        }
                        Err(_) => {
                            tracing::warn!(waited = ?dial.answer_within,
                                "annals-postgres listener connection stopped answering; reconnecting");
                            break;
                        }
                    }
                }
            }
        }
        conn.driver.abort();
    }
}

/// Runs `wake` in a loop on one thread while another raises the head
/// 200,000 times, and fails if the head was ever lowered: the raiser looks
/// before each raise, and a lowered head stays lowered until then.
#[cfg(test)]
pub(crate) fn assert_never_lowers_the_head(
    wake: impl Fn(&annals_core::subscription::Tail, &watch::Sender<u64>) + Send + 'static,
) {
    use std::sync::atomic::AtomicBool;

    const RAISES: u64 = 200_000;
    let head = Arc::new(watch::Sender::new(0u64));
    let tail = Arc::new(annals_core::subscription::Tail::default());
    let done = Arc::new(AtomicBool::new(false));
    let waker = {
        let (head, tail, done) = (head.clone(), tail.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                wake(&tail, &head);
            }
        })
    };
    let mut lowered = 0u64;
    for v in 1..=RAISES {
        if *head.borrow() < v - 1 {
            lowered += 1;
        }
        bump(&head, v);
        for _ in 0..20 {
            std::hint::spin_loop();
        }
    }
    done.store(true, Ordering::SeqCst);
    waker.join().expect("waker");
    assert_eq!(lowered, 0, "a wake-up put an older head back {lowered} times");
    assert_eq!(*head.borrow(), RAISES);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deletion notified while this process's appends raise the head
    /// (on other threads) must wake the subscriptions without ever putting
    /// an older head back: a subscription from `End` would start before
    /// events already acknowledged.
    #[test]
    fn a_deletion_never_lowers_the_head() {
        assert_never_lowers_the_head(note_deletion);
    }
}
