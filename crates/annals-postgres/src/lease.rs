//! Named leases ([`annals_core::Leases`]) as session-level advisory locks.
//!
//! A lease is `pg_try_advisory_lock(LEASE_CLASS, hashtext('{schema}/{name}'))`
//! taken on a connection of its own. PostgreSQL releases a session lock
//! when the session ends, so a holder that dies, or whose connection is
//! cut, frees the lease for the next process without anyone cleaning up.
//!
//! The holder pings its connection every [`PING`]. The lease is reported
//! lost as soon as the connection ends (a terminated backend is noticed at
//! once), or when a ping fails or takes longer than [`PING_TIMEOUT`]; the
//! connection is then closed, so the server lets go too. The two sides
//! can disagree only in the safe direction (nobody holds it for a moment)
//! except for one case: the server ended the session but this process has
//! not noticed yet, which lasts until the socket reports it (usually at
//! once) or the next ping, i.e. at most about [`PING`].
//!
//! Two names whose hashes collide contend for one lock: a lease may then
//! look taken when it is free, but one name never has two holders.
//!
//! **Holders.** Right after taking the lock the holder writes its
//! description and its backend pid to `lease_holders` (migration 0007) on
//! the same connection. [`Leases::holder`] believes a row only while that
//! pid still holds the lock in `pg_locks`, so the row of a holder that died
//! is ignored without anyone deleting it.

use std::time::Duration;

use annals_core::{Lease, Leases, Result, async_trait, validate_lease_holder, validate_lease_name};
use tokio::{sync::watch, task::JoinHandle};
use tokio_postgres::Client;

use crate::{
    PgError, PgStore,
    error::{db, unreachable_from},
    pooled::{NoAnswer, marking},
};

/// Advisory-lock class of leases ("anlz"; migrations use another class).
const LEASE_CLASS: i32 = 0x616e_6c7a;
/// How often a holder checks its connection.
pub const PING: Duration = Duration::from_secs(1);
/// A ping slower than this loses the lease.
pub const PING_TIMEOUT: Duration = Duration::from_secs(5);

#[async_trait]
impl Leases for PgStore {
    async fn try_lease_as(&self, name: &str, holder: &str) -> Result<Option<Lease>> {
        validate_lease_name(name)?;
        validate_lease_holder(holder)?;
        // The driver's connect timeout covers the TCP connect only: a
        // server that takes the connection but never answers the start-up
        // (stopped, or behind a wedged proxy) would keep this call waiting
        // for good. Bounded like the pool's and the listener's connects.
        let within = self.inner.connect_timeout;
        let (client, connection) =
            match tokio::time::timeout(within, self.inner.lease_config.connect(self.inner.tls.clone())).await
            {
                Ok(connected) => connected.map_err(unreachable_from)?,
                Err(_) => {
                    return Err(PgError::Unreachable {
                        message: format!("no answer from the server within {within:?}"),
                        source: None,
                    }
                    .into());
                }
            };
        let driver = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "annals-postgres lease connection ended");
            }
        });
        let key = format!("{}/{name}", self.inner.schema);
        let within = self.inner.answer.within;
        // Both statements under the answer timeout; on any failure the
        // session is closed, which releases the lock if it was taken.
        let taken = tokio::time::timeout(within, async {
            client.batch_execute(&self.inner.session_settings).await.map_err(db)?;
            let taken = client
                .query_one("SELECT pg_try_advisory_lock($1, hashtext($2))", &[&LEASE_CLASS, &key])
                .await
                .and_then(|row| row.try_get::<_, bool>(0))
                .map_err(db)?;
            if taken {
                client
                    .execute(self.inner.sql.publish_lease_holder.as_str(), &[&name, &holder])
                    .await
                    .map_err(db)?;
            }
            Ok::<_, annals_core::Error>(taken)
        })
        .await
        .unwrap_or_else(|_| Err(NoAnswer { waited: within }.into()));
        let taken = match taken {
            Ok(taken) => taken,
            Err(e) => {
                driver.abort();
                return Err(e);
            }
        };
        if !taken {
            // Dropping the client closes the session.
            return Ok(None);
        }
        let (lost, lost_rx) = watch::channel(false);
        let keeper = tokio::spawn(keep(client, driver, lost, key));
        Ok(Some(Lease::new(name, lost_rx, Hold(keeper))))
    }

    async fn holder(&self, name: &str) -> Result<Option<String>> {
        validate_lease_name(name)?;
        let key = format!("{}/{name}", self.inner.schema);
        let client = self.inner.client().await?;
        let broken = client.broken();
        let db = marking(&broken);
        client
            .deadline()
            .bound(async {
                let row = client
                    .query_opt(self.inner.sql.lease_holder.as_str(), &[&name, &i64::from(LEASE_CLASS), &key])
                    .await
                    .map_err(db)?;
                row.map(|row| row.try_get::<_, String>(0)).transpose().map_err(db)
            })
            .await
    }
}

/// Holds the lease while it lives: dropping it ends the keeper, which drops
/// the client, which closes the session (and the server releases the lock).
struct Hold(JoinHandle<()>);

impl Drop for Hold {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Watches the lease's connection until it fails, then reports the lease
/// lost and closes the connection.
async fn keep(client: Client, mut driver: JoinHandle<()>, lost: watch::Sender<bool>, key: String) {
    let mut tick = tokio::time::interval(PING);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut driver => {
                tracing::warn!(lease = %key, "lease connection ended; lease lost");
                break;
            }
            _ = tick.tick() => match tokio::time::timeout(PING_TIMEOUT, client.simple_query("SELECT 1")).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(lease = %key, error = %crate::error::describe(&e), "lease ping failed; lease lost");
                    break;
                }
                Err(_) => {
                    tracing::warn!(lease = %key, "lease ping timed out; lease lost");
                    break;
                }
            },
        }
    }
    let _ = lost.send(true);
    // The session may still be open (a slow ping): close it, so the server
    // releases the lock rather than keeping it for a holder that stopped.
    driver.abort();
    drop(client);
}
