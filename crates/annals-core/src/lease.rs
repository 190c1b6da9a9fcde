//! Named leases: at most one holder at a time among every process that
//! shares a store.
//!
//! A server process uses a lease to decide which of several processes on
//! one shared (PostgreSQL) store runs work that must run once, such as the
//! consumer groups. A store that only one process can open (the embedded
//! log, which locks its directory; the in-memory store) needs none: the
//! caller is the only process by construction.
//!
//! A lease is held until it is dropped or until the backend can no longer
//! vouch for it (the connection that holds it ended). [`Lease::lost`]
//! resolves then; the holder must stop the work it guards, because another
//! process may take the lease right away.

use std::{
    collections::HashMap,
    future::Future,
    sync::{Arc, Mutex},
};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::{Error, Result};

/// Longest accepted lease name, in bytes.
pub const MAX_LEASE_NAME_LEN: usize = 200;

/// Longest accepted holder description, in bytes.
pub const MAX_LEASE_HOLDER_LEN: usize = 1000;

/// Taking named leases shared by every process on the store.
#[async_trait]
pub trait Leases: Send + Sync {
    /// Takes the lease `name` when nobody holds it, publishing `holder` (a
    /// description of the holder, such as the URL other processes should
    /// send its work to; may be empty) for [`Leases::holder`] to report:
    /// `Ok(None)` when another holder (in this process or another) has it.
    /// Names are 1 to [`MAX_LEASE_NAME_LEN`] bytes without control
    /// characters, holders at most
    /// [`MAX_LEASE_HOLDER_LEN`] bytes without control characters
    /// ([`Error::InvalidInput`] otherwise).
    async fn try_lease_as(&self, name: &str, holder: &str) -> Result<Option<Lease>>;

    /// Takes the lease `name` with an empty holder description (see
    /// [`Leases::try_lease_as`]).
    async fn try_lease(&self, name: &str) -> Result<Option<Lease>> {
        self.try_lease_as(name, "").await
    }

    /// The holder description of the lease `name` as published by the
    /// process holding it now, or `None` when nobody holds it (or the
    /// holder has not published yet: a lease taken a moment ago may read
    /// as free for that moment). Any process may ask.
    async fn holder(&self, name: &str) -> Result<Option<String>>;
}

/// A held lease. Dropping it releases it.
#[must_use = "a lease is released as soon as it is dropped"]
pub struct Lease {
    name: String,
    lost: watch::Receiver<bool>,
    /// Whatever keeps the lease held (a connection, a task); dropped with
    /// the lease, which releases it.
    _hold: Box<dyn Send + Sync>,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease").field("name", &self.name).field("lost", &self.is_lost()).finish()
    }
}

impl Lease {
    /// For backends: a lease named `name`, held while `hold` lives and
    /// until `lost` turns `true` (or its sender is dropped).
    pub fn new(
        name: impl Into<String>,
        lost: watch::Receiver<bool>,
        hold: impl Send + Sync + 'static,
    ) -> Self {
        Lease { name: name.into(), lost, _hold: Box::new(hold) }
    }

    /// The lease's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the backend stopped vouching for the lease.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow() || self.lost.has_changed().is_err()
    }

    /// Resolves once the lease is lost; never while it is held. The future
    /// does not borrow the lease, so it can be awaited beside other work.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut lost = self.lost.clone();
        async move {
            // Err: the sender is gone, which also means nobody vouches.
            let _ = lost.wait_for(|lost| *lost).await;
        }
    }
}

/// Leases that only this process sees: right for stores one process opens
/// at a time (the embedded log locks its directory; the in-memory store
/// lives in one process), where holding a name here holds it everywhere.
/// Clones share the held names. A lease is never lost, only dropped.
#[derive(Debug, Clone, Default)]
pub struct LocalLeases {
    /// Held names and their holder descriptions.
    held: Arc<Mutex<HashMap<String, String>>>,
}

impl LocalLeases {
    /// No lease held.
    pub fn new() -> Self {
        LocalLeases::default()
    }
}

#[async_trait]
impl Leases for LocalLeases {
    async fn try_lease_as(&self, name: &str, holder: &str) -> Result<Option<Lease>> {
        validate_lease_name(name)?;
        validate_lease_holder(holder)?;
        let mut held = self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if held.contains_key(name) {
            return Ok(None);
        }
        held.insert(name.to_owned(), holder.to_owned());
        let (vouch, lost) = watch::channel(false);
        let hold = LocalHold { name: name.to_owned(), held: self.held.clone(), _vouch: vouch };
        Ok(Some(Lease::new(name, lost, hold)))
    }

    async fn holder(&self, name: &str) -> Result<Option<String>> {
        validate_lease_name(name)?;
        Ok(self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(name).cloned())
    }
}

/// Releases a local lease when dropped; its sender keeps the lease from
/// reading as lost until then.
struct LocalHold {
    name: String,
    held: Arc<Mutex<HashMap<String, String>>>,
    _vouch: watch::Sender<bool>,
}

impl Drop for LocalHold {
    fn drop(&mut self) {
        self.held.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&self.name);
    }
}

/// Checks a lease name (for backends).
pub fn validate_lease_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_LEASE_NAME_LEN {
        return Err(Error::invalid(format!(
            "a lease name is 1 to {MAX_LEASE_NAME_LEN} bytes, not {}",
            name.len()
        )));
    }
    // PostgreSQL cannot store a NUL; no backend should take what another
    // refuses.
    if name.chars().any(char::is_control) {
        return Err(Error::invalid("a lease name must not contain control characters"));
    }
    Ok(())
}

/// Checks a holder description (for backends).
pub fn validate_lease_holder(holder: &str) -> Result<()> {
    if holder.len() > MAX_LEASE_HOLDER_LEN {
        return Err(Error::invalid(format!(
            "a lease holder description is at most {MAX_LEASE_HOLDER_LEN} bytes, not {}",
            holder.len()
        )));
    }
    if holder.chars().any(char::is_control) {
        return Err(Error::invalid("a lease holder description must not contain control characters"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every backend refuses what PostgreSQL cannot store (a NUL) and
    /// every other control character, before taking anything.
    #[tokio::test]
    async fn lease_names_with_control_characters_are_refused() {
        let leases = LocalLeases::new();
        for bad in ["a\0b", "tab\there", "\n", ""] {
            assert!(
                matches!(leases.try_lease(bad).await, Err(Error::InvalidInput { .. })),
                "{bad:?} was taken"
            );
            assert!(matches!(leases.holder(bad).await, Err(Error::InvalidInput { .. })), "{bad:?}");
        }
        assert!(leases.try_lease("consumer-groups").await.expect("a valid name").is_some());
    }

    #[tokio::test]
    async fn lost_resolves_when_the_backend_says_so_or_goes_away() {
        let (tx, rx) = watch::channel(false);
        let lease = Lease::new("a", rx, ());
        assert!(!lease.is_lost());
        let waiting = tokio::spawn(lease.lost());
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        tx.send(true).unwrap();
        waiting.await.unwrap();
        assert!(lease.is_lost());

        let (tx, rx) = watch::channel(false);
        let lease = Lease::new("b", rx, ());
        drop(tx);
        assert!(lease.is_lost());
        lease.lost().await;
    }

    #[test]
    fn names_are_checked() {
        assert!(validate_lease_name("consumer-groups").is_ok());
        assert!(validate_lease_name("").is_err());
        assert!(validate_lease_name(&"x".repeat(MAX_LEASE_NAME_LEN + 1)).is_err());
        assert!(validate_lease_holder("").is_ok());
        assert!(validate_lease_holder(&"x".repeat(MAX_LEASE_HOLDER_LEN)).is_ok());
        assert!(validate_lease_holder(&"x".repeat(MAX_LEASE_HOLDER_LEN + 1)).is_err());
        assert!(validate_lease_holder("a\nb").is_err());
    }
}
