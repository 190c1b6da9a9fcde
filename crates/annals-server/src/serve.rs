//! The accept loop: one hyper connection task per socket, graceful
//! shutdown that drains in-flight requests, and a per-connection kill
//! switch so live handlers can drop a client that stopped reading.

use std::{future::Future, net::SocketAddr, time::Duration};

use axum::{body::Body, extract::Request};
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use crate::{AppState, app, error::ServerError};

/// Per-connection control, available to handlers as a request extension
/// (absent when the router is driven without a socket, e.g. `oneshot`).
#[derive(Debug, Clone)]
pub struct ConnCtl {
    /// The client's address.
    pub remote: SocketAddr,
    /// Cancelling it closes the connection at once (no draining).
    pub kill: CancellationToken,
}

/// Serves `state` on `listener` until `shutdown` resolves; then stops
/// accepting, tells live clients goodbye, lets in-flight requests (appends
/// included) finish for up to `timeouts.shutdown_secs`, and returns.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    let router = app(state.clone());
    let config = state.config().clone();
    let header_timeout = Duration::from_secs(config.timeouts.header_read_secs);
    let tls = match &config.tls {
        Some(tls) => Some(crate::tls::acceptor(tls)?),
        None => None,
    };
    let draining = state.shutdown_token().clone();
    // Cancelled once the shutdown grace is over: closes every connection
    // still open (each one's kill switch is a child of it).
    let force = CancellationToken::new();
    // Consumer groups defined before a restart run again before the first
    // consumer can connect. On a shared store only the process holding the
    // groups lease runs them; the others keep trying to take over.
    let leadership = match state.inner.leases.get().cloned() {
        Some(leases) if config.groups.enabled => {
            let advertise = advertised_url(&config, listener.local_addr()?);
            let lost = crate::groups::try_lead(&state, &*leases, &advertise).await;
            if lost.is_none() {
                tracing::info!(
                    leader = state.inner.groups.leader().as_deref().unwrap_or("unknown"),
                    "another server process runs the consumer groups of this store"
                );
            }
            Some(tokio::spawn(crate::groups::keep_leading(
                state.clone(),
                leases,
                advertise,
                lost,
                draining.clone(),
            )))
        }
        _ => {
            let restored = state.restore_groups().await?;
            if restored > 0 {
                tracing::info!(groups = restored, "restored consumer groups");
            }
            None
        }
    };
    let tracker = TaskTracker::new();
    tracing::info!(addr = %listener.local_addr()?, tls = tls.is_some(), "annals server listening");
    tokio::pin!(shutdown);
    loop {
        let (tcp, remote) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Usually EMFILE or a reset during the handshake: keep
                    // serving, but do not spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let router = router.clone();
        let draining = draining.clone();
        let kill = force.child_token();
        let tls = tls.clone();
        tracker.spawn(async move {
            match tls {
                None => {
                    serve_connection(TokioIo::new(tcp), remote, router, draining, kill, header_timeout).await
                }
                Some(acceptor) => match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        serve_connection(TokioIo::new(stream), remote, router, draining, kill, header_timeout)
                            .await
                    }
                    Ok(Err(e)) => tracing::debug!(%remote, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                },
            }
        });
    }
    tracing::info!("shutting down: draining in-flight requests");
    draining.cancel();
    drop(listener);
    tracker.close();
    // WebSocket sessions left their connection's task at the upgrade: they
    // are waited for too, so each has told its client where to resume (and
    // group consumers have given their messages back) before this returns.
    let sessions = &state.inner.sessions;
    sessions.close();
    let grace = Duration::from_secs(config.timeouts.shutdown_secs);
    let drained = async {
        tracker.wait().await;
        sessions.wait().await;
    };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            secs = grace.as_secs(),
            "connections still open after the shutdown timeout; closing them"
        );
        // Each connection task and session ends as soon as it sees its
        // kill switch.
        force.cancel();
        state.inner.end_sessions.cancel();
        tracker.wait().await;
        sessions.wait().await;
    }
    if let Some(leadership) = leadership {
        let _ = leadership.await;
    }
    // After the drain, so consumers disconnected first and their unsettled
    // messages are back in the group when it saves its checkpoint; the
    // groups lease (if any) goes last.
    state.stop_groups().await;
    Ok(())
}

/// The URL other processes give out for this one (published with the
/// groups lease): `advertise_url` when set, else this listener's own
/// address when it is a specific one, else nothing (`""`: a wildcard
/// address names no host that others could reach).
fn advertised_url(config: &crate::ServerConfig, local: SocketAddr) -> String {
    if let Some(url) = &config.advertise_url {
        return url.clone();
    }
    if local.ip().is_unspecified() {
        return String::new();
    }
    let scheme = if config.tls.is_some() { "https" } else { "http" };
    format!("{scheme}://{local}")
}

async fn serve_connection<I>(
    io: TokioIo<I>,
    remote: SocketAddr,
    router: axum::Router,
    draining: CancellationToken,
    kill: CancellationToken,
    header_timeout: Duration,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let ctl = ConnCtl { remote, kill: kill.clone() };
    let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ctl.clone());
        router.clone().oneshot(req.map(Body::new))
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(header_timeout);
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    tokio::select! {
        result = conn.as_mut() => log_conn_end(remote, result),
        () = kill.cancelled() => {}
        () = draining.cancelled() => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                result = conn.as_mut() => log_conn_end(remote, result),
                () = kill.cancelled() => {}
            }
        }
    }
}

/// A WebSocket session that [`run`] waits for on shutdown (within
/// `timeouts.shutdown_secs`, after which it is ended). Begin it in the
/// handler, before the upgrade, so it is counted while the connection's
/// own task still is; an upgrade that fails drops it.
pub(crate) struct Session {
    _counted: tokio_util::task::task_tracker::TaskTrackerToken,
    end: CancellationToken,
}

impl Session {
    pub(crate) fn begin(state: &AppState) -> Self {
        Session { _counted: state.inner.sessions.token(), end: state.inner.end_sessions.clone() }
    }

    /// Runs the whole session, or until the shutdown grace is over.
    pub(crate) async fn run(self, session: impl Future<Output = ()>) {
        tokio::select! {
            () = session => {}
            () = self.end.cancelled() => {}
        }
    }
}

fn log_conn_end(remote: SocketAddr, result: Result<(), Box<dyn std::error::Error + Send + Sync>>) {
    if let Err(e) = result {
        tracing::debug!(%remote, error = %e, "connection ended with an error");
    }
}
