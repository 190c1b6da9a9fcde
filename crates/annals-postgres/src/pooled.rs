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

use std::{
    ops::{Deref, DerefMut},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use deadpool_postgres::Object;

use crate::error::{breaks_connection, db};

/// A pooled connection plus whether it broke.
pub(crate) struct Pooled {
    object: Option<Object>,
    broken: Arc<AtomicBool>,
    /// The store's schema, for the metric.
    schema: Arc<str>,
}

impl Pooled {
    pub(crate) fn new(object: Object, schema: Arc<str>) -> Self {
        Pooled { object: Some(object), broken: Arc::default(), schema }
    }

    /// A connection about to run a transaction by hand: discarded when
    /// dropped unless [`Pooled::keep`] says the transaction is over.
    pub(crate) fn discarded_unless_kept(object: Object, schema: Arc<str>) -> Self {
        let conn = Pooled::new(object, schema);
        conn.discard();
        conn
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
