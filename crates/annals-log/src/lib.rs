//! # annals-log
//!
//! The embedded storage engine of Annals: a segmented, append-only log in
//! which every record carries its length, a CRC32C and a BLAKE3 hash chained
//! to the previous record; one writer thread group-commits concurrent
//! appends (one write and one `fdatasync` per group); in-memory indexes by
//! stream, event type, category and correlation id are checkpointed on close
//! and rebuilt from the log when needed. The format is described in
//! `docs/log-format.md`, the index design in `docs/adr/01-log-index.md`.
//!
//! ```
//! use annals_core::{Appender, EventData, ExpectedVersion, ReadStream, StreamName, StreamReader};
//! use annals_log::{Durability, LogStore};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let dir = tempfile::tempdir()?;
//! let store = LogStore::builder(dir.path()).durability(Durability::Always).open()?;
//! let stream = StreamName::new("account-42")?;
//! let opened = EventData::json("AccountOpened", &serde_json::json!({ "owner": "Ada" }))?;
//! store.append(&stream, ExpectedVersion::NoStream, vec![opened]).await?;
//! let events = store.read_stream(&stream, ReadStream::forward()).await?;
//! assert_eq!(events[0].event_type, "AccountOpened");
//! store.close()?;
//! # Ok(())
//! # }
//! ```
//!
//! ## Tools
//!
//! * [`verify`] walks every record (CRC, hash chain, headers, positions) and
//!   returns a [`VerifyReport`] with counts and the first bad record.
//! * [`rebuild_indexes`] rebuilds the index checkpoint of a closed store
//!   from the log alone.
//! * [`bench::run`] measures the figures of issue 3, each beside a baseline
//!   taken in the same run (`cargo run --release -p annals-log --example
//!   log_bench`).
//! * [`io::FaultIo`] is an in-memory file system that fails a chosen write or
//!   fsync and simulates crashes, for tests of this crate and its users.
#![deny(clippy::unwrap_used, clippy::indexing_slicing)]

pub mod bench;
mod core;
mod error;
mod fill;
pub mod format;
pub(crate) mod index;
pub mod io;
mod kv;
mod recover;
mod store;
mod verify;
mod writer;

use std::time::Duration;

pub use error::LogError;
pub use recover::BadRecord;
pub use store::{
    DEFAULT_CHECKPOINT_EVERY, DEFAULT_SEGMENT_SIZE, LogStats, LogStore, LogStoreBuilder, MIN_SEGMENT_SIZE,
};
pub use verify::{RebuildReport, VerifyReport, rebuild_indexes, rebuild_indexes_with, verify, verify_with};

/// When an append is acknowledged relative to `fdatasync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// Acknowledge only after the group's bytes are synced (default).
    #[default]
    Always,
    /// Acknowledge after the write; sync at most this long afterwards. A
    /// crash can lose the last interval's acknowledged appends, and the
    /// snapshots and checkpoints saved in it (those are written only after
    /// the log is synced, so none survives ahead of the events it counts).
    Interval(Duration),
    /// Never sync explicitly (the OS flushes eventually); for tests and
    /// rebuildable data.
    Never,
}
