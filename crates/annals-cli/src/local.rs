//! `--data-dir DIR` for the client commands: run them on an embedded log
//! directory instead of against a running server.
//!
//! The command opens the log itself, so it takes the directory's exclusive
//! lock: while a server (or another command) uses the directory, it fails
//! with a usage error that says so. It then serves the HTTP API in-process
//! on a loopback port with a one-time admin API key that only this process
//! knows, and points its own client at it. Every command therefore behaves,
//! validates and prints exactly as it does against `annals serve`, with no
//! second implementation of the API to drift from the first. Consumer groups
//! are not started (a read must not resume anyone's subscription). When the
//! command ends, or on Ctrl-C (exit code 130), the in-process server drains
//! and the log is closed cleanly (synced, index checkpoint written).

use std::{future::Future, path::PathBuf};

use annals_server::{AppState, Role, ServerConfig, config::ApiKeyConfig};
use clap::Args;

use crate::{
    client::ClientArgs,
    commands::serve::{OpenedStore, open_store, shutdown_signal},
    error::CliError,
};

/// Where a client command runs: a server (`--url`, the default) or a data
/// directory.
#[derive(Debug, Clone, Default, Args)]
pub struct LocalArgs {
    /// Run on the embedded log in this directory (the one `annals serve
    /// --data` serves) instead of a server; it must not be in use by a
    /// running server.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

/// Whether a command may create a store where there is none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missing {
    /// Writing commands (`append`, `import`) create the directory.
    Create,
    /// Reading commands refuse a directory that does not exist, rather than
    /// creating an empty store and reporting that it is empty.
    Refuse,
}

/// Runs `command` with client arguments that reach either the server of
/// `client` or, with `--data-dir`, an in-process server on that directory.
pub async fn with_target<F, Fut>(
    local: LocalArgs,
    client: &ClientArgs,
    missing: Missing,
    command: F,
) -> Result<(), CliError>
where
    F: FnOnce(ClientArgs) -> Fut,
    Fut: Future<Output = Result<(), CliError>>,
{
    let Some(dir) = local.data_dir else { return command(client.clone()).await };
    if missing == Missing::Refuse && !dir.is_dir() {
        return Err(CliError::Usage(format!("--data-dir {}: no such directory", dir.display())));
    }
    // Handlers for SIGINT / SIGTERM installed before the log is opened, so
    // that no signal can end the process with the log open.
    let interrupted = shutdown_signal();
    let local = LocalServer::start(dir).await?;
    let args = ClientArgs {
        url: format!("http://{}", local.addr),
        token: None,
        api_key: Some(local.key.clone()),
        ca_cert: None,
        json: client.json,
    };
    // Ctrl-C or SIGTERM (e.g. ending `tail`) stops the command, not the
    // process, so the log is still closed cleanly; the exit code still says
    // that the command did not finish.
    let outcome = tokio::select! {
        result = command(args) => result,
        () = interrupted => Err(CliError::Interrupted),
    };
    let stopped = local.stop().await;
    outcome.and(stopped)
}

/// The in-process server of one command.
struct LocalServer {
    addr: std::net::SocketAddr,
    key: String,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), annals_server::ServerError>>,
    opened: OpenedStore,
}

impl LocalServer {
    async fn start(dir: PathBuf) -> Result<Self, CliError> {
        let mut config = ServerConfig::default();
        config.store.data = dir;
        let opened = open_store(&config.store).await?;
        config.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        // Only this process knows the key: another local user cannot use
        // the port while the command runs.
        let key = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        config.auth.anonymous = None;
        config.auth.api_keys = vec![ApiKeyConfig {
            name: "annals-cli".into(),
            key: key.clone(),
            role: Role::Admin,
            streams: None,
        }];
        config.groups.enabled = false;
        config.validate()?;
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let state = AppState::with_backend(opened.store.clone(), config, opened.backend)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(annals_server::run(listener, state, async move {
            let _ = stopped.await;
        }));
        Ok(LocalServer { addr, key, stop, server, opened })
    }

    /// Drains the server, then closes the log.
    async fn stop(self) -> Result<(), CliError> {
        let _ = self.stop.send(());
        match self.server.await {
            Ok(result) => result?,
            Err(e) => return Err(CliError::Other(format!("the in-process server failed: {e}"))),
        }
        self.opened.close().await
    }
}
