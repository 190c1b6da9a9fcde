//! The crate's one error type.

use std::path::PathBuf;

/// What went wrong in the log engine, phrased as what the caller should do.
///
/// Trait methods of [`crate::LogStore`] return [`annals_core::Error`]; this
/// enum converts into it (`Corrupt`, `Poisoned`, `Io`, `Closed`, …).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LogError {
    /// Another `LogStore` (in this or another process) has the directory
    /// open. Close it first, or open a different directory.
    #[error("data directory {dir} is locked by another open store")]
    Locked {
        /// The locked directory.
        dir: PathBuf,
    },

    /// Stored bytes failed an integrity check before the tail of the log.
    /// Nothing was served from them. Run `annals verify`; restore from a
    /// backup, or open with `.repair(true)` to truncate the log at this
    /// record (losing it and everything after it).
    #[error("corrupt log: segment {segment}, offset {offset}, position {}: {reason}", fmt_pos(*.position))]
    Corrupt {
        /// Segment index.
        segment: u64,
        /// Byte offset inside the segment file.
        offset: u64,
        /// Global position of the event expected there, when known.
        position: Option<u64>,
        /// What check failed.
        reason: String,
    },

    /// `kv.log`, the side file of snapshots and checkpoints, holds a damaged
    /// record followed by more records (a torn tail is dropped at open, but
    /// this is not one). Nothing was served from it. Restore the file from a
    /// backup, or move it aside to open without the snapshots and
    /// checkpoints it held.
    #[error(
        "kv.log (snapshots and checkpoints) is damaged at offset {offset}, with more records after it: {reason}"
    )]
    KvCorrupt {
        /// Byte offset of the damaged record in `kv.log`.
        offset: u64,
        /// What check failed.
        reason: String,
    },

    /// The directory holds files this build cannot read (unknown format
    /// version, foreign files). Use a matching build or another directory.
    #[error("unsupported or foreign data: {reason}")]
    Format {
        /// What is wrong.
        reason: String,
    },

    /// An earlier write or fsync failed, so durability cannot be proven.
    /// Reads still work; reopen the store to write again.
    #[error("store is poisoned after an earlier write failure ({reason}); reopen it to write again")]
    Poisoned {
        /// The failure that poisoned the store.
        reason: String,
    },

    /// A value does not fit the format's length fields. Make it smaller.
    #[error("{what} is {len} bytes, too large for the log format")]
    TooLarge {
        /// Which field.
        what: &'static str,
        /// Its length.
        len: usize,
    },

    /// The builder was given an unusable setting. Fix the configuration.
    #[error("invalid configuration: {reason}")]
    Config {
        /// What is wrong.
        reason: String,
    },

    /// The store was closed. Reopen it.
    #[error("store is closed")]
    Closed,

    /// An operating-system I/O error (disk full, permissions, …). Check the
    /// cause; writes after a failed write are refused until reopen.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

fn fmt_pos(p: Option<u64>) -> String {
    p.map_or_else(|| "unknown".to_owned(), |p| p.to_string())
}

impl LogError {
    pub(crate) fn too_big(what: &'static str, len: usize) -> Self {
        LogError::TooLarge { what, len }
    }

    pub(crate) fn corrupt(
        segment: u64,
        offset: u64,
        position: Option<u64>,
        reason: impl Into<String>,
    ) -> Self {
        LogError::Corrupt { segment, offset, position, reason: reason.into() }
    }
}

impl From<LogError> for annals_core::Error {
    fn from(e: LogError) -> Self {
        match e {
            LogError::Corrupt { .. } | LogError::KvCorrupt { .. } => {
                annals_core::Error::Corrupt { details: e.to_string() }
            }
            LogError::Poisoned { reason } => annals_core::Error::Poisoned { reason },
            LogError::Closed => annals_core::Error::Closed,
            LogError::Io(io) => annals_core::Error::Io(io),
            LogError::TooLarge { .. } | LogError::Config { .. } => annals_core::Error::invalid(e.to_string()),
            LogError::Locked { .. } | LogError::Format { .. } => {
                annals_core::Error::Backend { message: e.to_string(), source: None }
            }
        }
    }
}
