//! The one error type of the event-sourcing layer.

use std::convert::Infallible;

use annals_core::StreamName;

/// Result alias of this crate; `E` is the aggregate's domain error (only
/// [`Repository::execute`](crate::Repository::execute) and friends can fail
/// with one).
pub type Result<T, E = Infallible> = std::result::Result<T, Error<E>>;

/// What went wrong, phrased as what the caller should do next.
///
/// Generic over the aggregate's domain error `E`: operations that run no
/// command (loading, registering schemas) use `Error<Infallible>`, which
/// converts into any `Error<E>` with [`Error::widen`] or `?`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error<E = Infallible> {
    /// The aggregate's `handle` refused the command (a business rule).
    /// Nothing was written. Show it to the user; retrying the same command
    /// against the same state fails the same way (HTTP 422).
    #[error("command rejected: {0}")]
    Rejected(E),

    /// Every attempt lost the optimistic-concurrency race on `stream`.
    /// Nothing was written. Retry later, or raise
    /// [`RepositoryBuilder::max_retries`](crate::RepositoryBuilder::max_retries) (HTTP 409).
    #[error("gave up on stream '{stream}' after {attempts} attempts lost to concurrent writers")]
    Conflict {
        /// The contended stream.
        stream: StreamName,
        /// How many times the command was decided and appended.
        attempts: u32,
    },

    /// An event produced by the aggregate does not match the JSON Schema
    /// registered for its type and version. Nothing was written. This is a
    /// bug in the aggregate or the schema: fix one of them (HTTP 500 when it
    /// came from an aggregate, 400 when the payload came from a client).
    #[error("event {event_type} v{schema_version} violates its schema at '{pointer}': {message}")]
    SchemaViolation {
        /// The event type.
        event_type: String,
        /// Its schema version.
        schema_version: u32,
        /// JSON pointer of the failing field (`""` is the whole payload; for
        /// a missing required property it points at the missing field).
        pointer: String,
        /// What the validator said.
        message: String,
    },

    /// A schema given to the registry is not a valid JSON Schema. Fix the
    /// schema document.
    #[error("schema for {event_type} v{schema_version} is invalid: {message}")]
    InvalidSchema {
        /// The event type.
        event_type: String,
        /// The schema version.
        schema_version: u32,
        /// What the compiler said.
        message: String,
    },

    /// A stored event could not be turned into the aggregate's event type:
    /// its payload does not match, or an upcaster is missing or failed.
    /// Register the missing upcaster (the message names type and version) or
    /// repair the code; the log is never changed by reads.
    #[error("event at {stream}@{version} ({event_type} v{schema_version}) cannot be decoded: {reason}")]
    Decode {
        /// The stream holding the event.
        stream: StreamName,
        /// Its version in the stream.
        version: u64,
        /// Its stored type.
        event_type: String,
        /// Its stored schema version.
        schema_version: u32,
        /// Why.
        reason: String,
    },

    /// An upcaster failed on a stored payload, or the chain loops. Fix the
    /// upcaster; the stored event is untouched.
    #[error("upcasting {event_type} v{schema_version} failed: {reason}")]
    Upcast {
        /// The type the failing step started from.
        event_type: String,
        /// The version the failing step started from.
        schema_version: u32,
        /// Why.
        reason: String,
    },

    /// An event produced by the aggregate could not be encoded (it is not a
    /// serde enum, or it does not serialize). A programming error: fix the
    /// event type.
    #[error("event cannot be encoded: {reason}")]
    Encode {
        /// Why.
        reason: String,
    },

    /// The aggregate id does not make a valid stream name (empty, control
    /// characters, too long). Use another id (HTTP 400).
    #[error("invalid aggregate id: {reason}")]
    InvalidId {
        /// Why.
        reason: String,
    },

    /// The command's metadata is unusable (e.g. an empty command id, which
    /// would make every such command a duplicate of the first). Fix the
    /// caller (HTTP 400).
    #[error("invalid command metadata: {reason}")]
    InvalidMetadata {
        /// Why.
        reason: String,
    },

    /// A state at a version was asked for that the stream has not reached.
    /// Ask for an existing version (HTTP 404).
    #[error("stream '{stream}' has no version {requested} (its last version is {last:?})")]
    VersionNotFound {
        /// The stream.
        stream: StreamName,
        /// The version asked for.
        requested: u64,
        /// The stream's last version, if any.
        last: Option<u64>,
    },

    /// The store failed; the inner error says what to do (its variants are
    /// documented in `annals_core::Error`). A `WrongExpectedVersion` here
    /// comes from an append the caller made without retries.
    #[error(transparent)]
    Store(#[from] annals_core::Error),
}

impl Error<Infallible> {
    /// Converts an error of an operation that runs no command into the
    /// error type of any aggregate.
    pub fn widen<E>(self) -> Error<E> {
        match self {
            Error::Rejected(never) => match never {},
            Error::Conflict { stream, attempts } => Error::Conflict { stream, attempts },
            Error::SchemaViolation { event_type, schema_version, pointer, message } => {
                Error::SchemaViolation { event_type, schema_version, pointer, message }
            }
            Error::InvalidSchema { event_type, schema_version, message } => {
                Error::InvalidSchema { event_type, schema_version, message }
            }
            Error::Decode { stream, version, event_type, schema_version, reason } => {
                Error::Decode { stream, version, event_type, schema_version, reason }
            }
            Error::Upcast { event_type, schema_version, reason } => {
                Error::Upcast { event_type, schema_version, reason }
            }
            Error::Encode { reason } => Error::Encode { reason },
            Error::InvalidId { reason } => Error::InvalidId { reason },
            Error::InvalidMetadata { reason } => Error::InvalidMetadata { reason },
            Error::VersionNotFound { stream, requested, last } => {
                Error::VersionNotFound { stream, requested, last }
            }
            Error::Store(e) => Error::Store(e),
        }
    }
}

impl<E> Error<E> {
    /// The domain error, when the command was rejected by the aggregate.
    pub fn rejection(&self) -> Option<&E> {
        match self {
            Error::Rejected(e) => Some(e),
            _ => None,
        }
    }
}
