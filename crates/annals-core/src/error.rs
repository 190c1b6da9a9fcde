//! The one error type of the core API. Every backend maps its failures onto it.

use crate::{ExpectedVersion, StreamName};

/// Result alias used across the Annals API.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, phrased as what the caller should do next.
///
/// The enum is `#[non_exhaustive]`: match the variants you act on and keep a
/// catch-all arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The stream was not at the version the append expected. Nothing was
    /// written. Reload the stream, re-decide, and retry (HTTP 409).
    #[error("wrong expected version for stream '{stream}': expected {expected}, actual {}", fmt_actual(*.actual))]
    WrongExpectedVersion {
        /// The stream whose version did not match.
        stream: StreamName,
        /// What the caller expected.
        expected: ExpectedVersion,
        /// The stream's last version at the time of the check; `None` when
        /// the stream does not exist (never written, or soft-deleted).
        actual: Option<u64>,
    },

    /// The stream does not exist or was soft-deleted. Treat it as empty, or
    /// create it with `ExpectedVersion::NoStream` (HTTP 404).
    #[error("stream '{stream}' not found")]
    StreamNotFound {
        /// The stream that was asked for.
        stream: StreamName,
    },

    /// The stream was hard-deleted (tombstoned) and can never be written or
    /// read again. Use another stream name (HTTP 410).
    #[error("stream '{stream}' is tombstoned (hard-deleted) and cannot be used again")]
    StreamDeleted {
        /// The tombstoned stream.
        stream: StreamName,
    },

    /// The request itself is malformed. Fix the input; retrying the same
    /// request will fail the same way (HTTP 400).
    #[error("invalid input: {reason}")]
    InvalidInput {
        /// Human-readable explanation naming the offending field.
        reason: String,
    },

    /// A configured size or count limit was exceeded. Split the request or
    /// raise the limit in the store's configuration (HTTP 413).
    #[error("limit exceeded: {what} is {actual}, the maximum is {max}")]
    LimitExceeded {
        /// Which limit was hit.
        what: LimitKind,
        /// The configured maximum.
        max: u64,
        /// What the request carried.
        actual: u64,
    },

    /// An earlier write or fsync failed, so the store cannot prove what is
    /// durable. Reads still work; writes are refused until the store is
    /// reopened (HTTP 503).
    #[error("store is poisoned after an earlier write failure ({reason}); reopen it to write again")]
    Poisoned {
        /// The failure that poisoned the store.
        reason: String,
    },

    /// Stored data failed an integrity check (CRC, hash chain, framing).
    /// Nothing was served from it. Run `annals verify` and restore or repair
    /// (HTTP 500).
    #[error("corruption detected: {details}")]
    Corrupt {
        /// Where and what: segment, offset, position.
        details: String,
    },

    /// The store was closed or is shutting down. Reopen it or retry against
    /// another instance (HTTP 503).
    #[error("store is closed")]
    Closed,

    /// An operating-system I/O error. Usually transient or environmental
    /// (disk full, permissions); check the cause and retry (HTTP 503).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),

    /// The backend (database, network) failed. Retry with backoff; if it
    /// persists, check the backend's health (HTTP 503).
    #[error("backend error: {message}")]
    Backend {
        /// What the backend said, without secrets.
        message: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },

    /// An append lost its answer (the connection broke, or the backend did
    /// not answer in time) and the store could not find out whether it was
    /// written: it may have been. Re-send it unchanged, with the same event
    /// ids and the same expected version, once the backend is back. A
    /// re-send whose events are the stream's last is answered as written
    /// without writing them again; with [`ExpectedVersion::Exact`] a re-send
    /// after further appends to the stream fails with
    /// [`Error::WrongExpectedVersion`] rather than writing twice (then read
    /// the stream to see whether the events are in it); with
    /// [`ExpectedVersion::Any`] such a re-send writes them a second time
    /// (HTTP 503, code `outcome_unknown`). The other errors that can leave an
    /// append's outcome open are [`Error::Poisoned`] (settled when the store
    /// is reopened and recovers) and [`Error::Closed`] from a store shut down
    /// mid-append; any other error means nothing of the append was written.
    #[error("outcome unknown: {reason}")]
    OutcomeUnknown {
        /// What was lost, and why it could not be read back.
        reason: String,
    },
}

fn fmt_actual(actual: Option<u64>) -> String {
    match actual {
        Some(v) => v.to_string(),
        None => "no stream".to_owned(),
    }
}

/// Which configured limit an [`Error::LimitExceeded`] refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LimitKind {
    /// Bytes of one event's `data`.
    EventSize,
    /// Bytes of one event's serialized metadata.
    MetadataSize,
    /// Number of events in one append (summed over streams for a
    /// multi-stream append).
    EventsPerAppend,
    /// Number of streams in one multi-stream append.
    StreamsPerTransaction,
    /// Bytes of data plus metadata of all events in one append.
    AppendSize,
}

impl std::fmt::Display for LimitKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LimitKind::EventSize => "event data size (bytes)",
            LimitKind::MetadataSize => "event metadata size (bytes)",
            LimitKind::EventsPerAppend => "events per append",
            LimitKind::StreamsPerTransaction => "streams per transaction",
            LimitKind::AppendSize => "append size (bytes of data and metadata)",
        })
    }
}

impl Error {
    /// Shorthand for [`Error::InvalidInput`].
    pub fn invalid(reason: impl Into<String>) -> Self {
        Error::InvalidInput { reason: reason.into() }
    }

    /// Shorthand for [`Error::Backend`] with a source error.
    pub fn backend<E>(message: impl Into<String>, source: E) -> Self
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        Error::Backend { message: message.into(), source: Some(Box::new(source)) }
    }

    /// Whether retrying the same operation later may succeed without changing
    /// the request (I/O and backend trouble), as opposed to errors that need a
    /// different request or a reopen.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Io(_) | Error::Backend { .. } | Error::OutcomeUnknown { .. })
    }
}
