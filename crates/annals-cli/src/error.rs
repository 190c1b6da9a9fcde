//! The CLI's error type and its exit codes.

/// What went wrong in a command.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CliError {
    /// The server answered with an error. The message is the server's.
    #[error("{status} {code}: {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The error code from the JSON body.
        code: String,
        /// The message from the JSON body.
        message: String,
    },
    /// The server could not be reached; check `--url` and that it runs.
    #[error("cannot reach the server at {url}: {message}")]
    Unreachable {
        /// The URL tried.
        url: String,
        /// The transport error.
        message: String,
    },
    /// Bad input or configuration; fix it and run again.
    #[error("{0}")]
    Usage(String),
    /// `verify` found damaged data; the report names the first bad record.
    #[error("{0}")]
    Damaged(String),
    /// Stopped by Ctrl-C before it finished (a `--data-dir` command, which
    /// closes the log cleanly first); exit code 130, as a shell reports a
    /// command ended by SIGINT.
    #[error("interrupted")]
    Interrupted,
    /// Stdout was closed by its reader (`annals tail | head -1`): there is
    /// nothing left to do. Ends the command quietly with exit code 0.
    #[error("stdout was closed")]
    StdoutClosed,
    /// Anything else (I/O, server start-up).
    #[error("{0}")]
    Other(String),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            CliError::Api { status: 409, .. } => 3,
            CliError::Api { status: 404 | 410, .. } => 4,
            CliError::Api { status: 401 | 403, .. } => 5,
            // The server found the input bad: a usage error like one the
            // CLI finds itself.
            CliError::Api { status: 400 | 413 | 422, .. } => 2,
            CliError::Api { .. } => 1,
            CliError::Unreachable { .. } => 6,
            CliError::Usage(_) => 2,
            CliError::Damaged(_) => 7,
            CliError::Interrupted => 130,
            CliError::StdoutClosed => 0,
            CliError::Other(_) => 1,
        }
    }
}

impl From<std::io::Error> for CliError {
    fn from(e: std::io::Error) -> Self {
        CliError::Other(e.to_string())
    }
}

impl From<annals_server::ServerError> for CliError {
    fn from(e: annals_server::ServerError) -> Self {
        match e {
            annals_server::ServerError::Config { .. } => CliError::Usage(e.to_string()),
            other => CliError::Other(other.to_string()),
        }
    }
}
