//! Pooled connections that are discarded, not returned, once a statement
//! on them failed in a way that ends the session.
//!
//! deadpool checks `is_closed` when it hands a connection out again, but a
//! backend that was terminated (failover, a DBA, a server restart) sends
//! its FATAL error before closing the socket, so the client can return the
//! error before it has seen the close: the connection would go back to the
//! pool looking healthy, and the next borrower would fail with "connection
//! closed". Operations map their driver errors through [`marking`], which
//! remembers a broken connection; dropping the [`Pooled`] then detaches it
//! from the pool.
//!
//! A connection can also stop answering without breaking: a server that is
//! stopped (SIGSTOP, a frozen VM whose kernel still acknowledges) or a
//! wedged proxy keeps the socket open, so neither the driver nor the TCP
//! probes notice, and an operation on it would wait forever (and with it
//! every append of the store, queued behind one committer). Operations run
//! their statements under a [`Deadline`]: when the answer does not come
//! within the store's answer timeout, the connection is discarded, the
//! server is asked to cancel what it runs, and the operation fails with
//! [`PgError::NoAnswer`].

use std::{
    ops::{Deref, DerefMut},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use deadpool_postgres::Object;

use crate::{
    PgError,
    error::{breaks_connection, db},
    tls::Connector,
};

/// How long an operation waits for PostgreSQL's answer, and how to reach
/// the server to cancel a statement that took longer.
#[derive(Clone)]
pub(crate) struct Answer {
    pub within: Duration,
    pub tls: Connector,
}

/// A pooled connection plus whether it broke.
pub(crate) struct Pooled {
    object: Option<Object>,
    broken: Arc<AtomicBool>,
    /// The store's schema, for the metric.
    schema: Arc<str>,
    answer: Answer,
}

impl Pooled {
    pub(crate) fn new(object: Object, schema: Arc<str>, answer: Answer) -> Self {
        Pooled { object: Some(object), broken: Arc::default(), schema, answer }
    }

    /// A connection about to run a transaction by hand: discarded when
    /// dropped unless [`Pooled::keep`] says the transaction is over.
    pub(crate) fn discarded_unless_kept(object: Object, schema: Arc<str>, answer: Answer) -> Self {
        let conn = Pooled::new(object, schema, answer);
        conn.discard();
        conn
    }

    /// The answer deadline for work on this connection, from now. Taken
    /// apart from the connection so the work may borrow it mutably.
    pub(crate) fn deadline(&self) -> Deadline {
        Deadline {
            broken: self.broken.clone(),
            cancel: self.cancel_token(),
            answer: self.answer.clone(),
            schema: self.schema.clone(),
        }
    }

    /// Discards the connection when dropped (it is mid-transaction, or
    /// otherwise not fit for the next borrower).
    pub(crate) fn discard(&self) {
        self.broken.store(true, Ordering::Relaxed);
    }

    /// Returns the connection to the pool when dropped after all.
    pub(crate) fn keep(&self) {
        self.broken.store(false, Ordering::Relaxed);
    }

    /// The flag [`marking`] sets; held apart from the connection so errors
    /// can be mapped while a transaction borrows it.
    pub(crate) fn broken(&self) -> Arc<AtomicBool> {
        self.broken.clone()
    }
}

impl Deref for Pooled {
    type Target = Object;

    fn deref(&self) -> &Object {
        // Only `drop` takes the object out.
        self.object.as_ref().unwrap_or_else(|| unreachable!("a Pooled is used after drop"))
    }
}

impl DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut Object {
        self.object.as_mut().unwrap_or_else(|| unreachable!("a Pooled is used after drop"))
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(object) = self.object.take()
            && self.broken.load(Ordering::Relaxed)
        {
            drop(Object::take(object));
            count_discarded(&self.schema);
        }
    }
}

/// Counts a connection taken out of the pool because it broke (or was
/// left mid-transaction): `annals_pg_connections_discarded_total`.
pub(crate) fn count_discarded(schema: &str) {
    metrics::counter!("annals_pg_connections_discarded_total", "schema" => schema.to_owned()).increment(1);
}

/// Like [`db`], and marks `broken` when the error ends the session. Copy,
/// so it can stand in for `db` in `.map_err(db)` throughout a function.
pub(crate) fn marking(
    broken: &AtomicBool,
) -> impl Fn(tokio_postgres::Error) -> annals_core::Error + Copy + '_ {
    move |e| {
        if breaks_connection(&e) {
            broken.store(true, Ordering::Relaxed);
        }
        db(e)
    }
}

/// The answer timeout of one operation on one pooled connection (see the
/// module's documentation).
pub(crate) struct Deadline {
    broken: Arc<AtomicBool>,
    cancel: tokio_postgres::CancelToken,
    answer: Answer,
    schema: Arc<str>,
}

/// The answer did not come in time; see [`PgError::NoAnswer`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct NoAnswer {
    pub waited: Duration,
}

impl From<NoAnswer> for PgError {
    fn from(e: NoAnswer) -> Self {
        PgError::NoAnswer { waited: e.waited }
    }
}

impl From<NoAnswer> for annals_core::Error {
    fn from(e: NoAnswer) -> Self {
        PgError::from(e).into()
    }
}

impl Deadline {
    /// Runs `work`, the statements of one operation on this deadline's
    /// connection. If it has not finished within the answer timeout it is
    /// dropped, the connection is marked broken (so it is discarded, not
    /// reused: whatever is stuck on it would hold up the next borrower
    /// too), the server is asked to cancel the running statement (best
    /// effort, in the background), and the result is [`NoAnswer`].
    pub(crate) async fn bound<T, E: From<NoAnswer>>(
        self,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E> {
        let waited = self.answer.within;
        // Pinned here, not moved into the timeout, so that work which owns
        // its connection is dropped only after the connection is marked.
        let mut work = std::pin::pin!(work);
        match tokio::time::timeout(waited, work.as_mut()).await {
            Ok(done) => done,
            Err(_) => {
                self.expire();
                Err(NoAnswer { waited }.into())
            }
        }
    }

    fn expire(self) {
        self.broken.store(true, Ordering::Relaxed);
        metrics::counter!("annals_pg_answer_timeouts_total", "schema" => self.schema.to_string())
            .increment(1);
        tracing::warn!(
            schema = %self.schema,
            waited = ?self.answer.within,
            "PostgreSQL did not answer in time; dropping the connection and cancelling its statement"
        );
        let Answer { within, tls } = self.answer;
        let cancel = self.cancel;
        // A server that does not answer may not take the cancel request
        // either: bounded like a connection attempt.
        tokio::spawn(async move {
            match tokio::time::timeout(within, cancel.cancel_query(tls)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "cancel request failed"),
                Err(_) => tracing::debug!("cancel request got no answer"),
            }
        });
    }
}
