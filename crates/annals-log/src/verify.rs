//! Offline tools: `verify` and `rebuild_indexes`.

use std::{collections::HashSet, path::Path, sync::Arc, time::Instant};

use crate::{
    error::LogError,
    format::KIND_EVENT,
    index,
    io::{Io, RealIo},
    recover::{self, BadRecord, Mode, Start},
    store::recover_index,
};

/// What [`verify`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Segment files.
    pub segments: u64,
    /// Records that passed every check (events and stream deletes).
    pub records: u64,
    /// Events among them.
    pub events: u64,
    /// Distinct streams among them.
    pub streams: u64,
    /// Bytes of those records.
    pub bytes: u64,
    /// Hash of the last good record (hex): record it elsewhere to detect a
    /// later rewrite of the whole chain.
    pub head_hash: String,
    /// The first record that failed, if any.
    pub first_bad: Option<BadRecord>,
}

impl VerifyReport {
    /// Whether every record passed.
    pub fn is_ok(&self) -> bool {
        self.first_bad.is_none()
    }
}

/// Walks every record of the log in `dir`, checking framing, CRC32C, the
/// hash chain, segment headers and position sequence, and reports counts and
/// the first bad record. Read-only: it takes no lock, changes nothing and
/// opens every file for reading only (so it works on a read-only copy, such
/// as a mounted backup), so it may run beside an open store (it then checks the prefix it sees; a
/// record being written at that moment can show up as a torn tail).
pub fn verify(dir: impl AsRef<Path>) -> Result<VerifyReport, LogError> {
    verify_with(&RealIo, dir.as_ref())
}

/// [`verify`] over any [`Io`].
pub fn verify_with(io: &dyn Io, dir: &Path) -> Result<VerifyReport, LogError> {
    let mut streams = HashSet::new();
    // A checkpoint only covers synced records: damage below its end is never
    // reported as a torn tail.
    let durable = match index::load(io, dir) {
        Ok(Some(i)) => (i.tail.segment, i.tail.end),
        _ => (0, 0),
    };
    let start = Start { durable, ..Start::beginning() };
    // The same index open builds, so verify checks what open checks
    // (stream versions in sequence, valid stream names) and passes exactly
    // the logs open accepts.
    let mut idx = crate::index::Index::default();
    let scan = recover::scan(io, dir, start, Mode::Verify, &mut |seg, off, raw| {
        if raw.kind == KIND_EVENT && !streams.contains(raw.stream) {
            streams.insert(raw.stream.to_owned());
        }
        crate::store::apply_raw(&mut idx, seg, off, raw)
    })?;
    Ok(VerifyReport {
        segments: scan.files.len() as u64,
        records: scan.records,
        events: scan.events,
        streams: streams.len() as u64,
        bytes: scan.bytes,
        head_hash: scan.tail.last_hash.iter().map(|b| format!("{b:02x}")).collect(),
        first_bad: scan.bad,
    })
}

/// What [`rebuild_indexes`] did.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RebuildReport {
    /// Events indexed.
    pub events: u64,
    /// Records walked.
    pub records: u64,
    /// Streams indexed.
    pub streams: u64,
    /// Wall time, seconds.
    pub seconds: f64,
    /// Events indexed per second.
    pub events_per_second: f64,
}

/// Rebuilds the index checkpoint of the (closed) store in `dir` from the
/// log alone and writes it. Takes the directory lock, so it fails with
/// [`LogError::Locked`] while the store is open. A torn tail is truncated as
/// on open; corruption before it is refused.
pub fn rebuild_indexes(dir: impl AsRef<Path>) -> Result<RebuildReport, LogError> {
    rebuild_indexes_with(Arc::new(RealIo), dir.as_ref())
}

/// [`rebuild_indexes`] over any [`Io`].
pub fn rebuild_indexes_with(io: Arc<dyn Io>, dir: &Path) -> Result<RebuildReport, LogError> {
    let _lock = io.lock(dir)?;
    let started = Instant::now();
    let (idx, scan, _, _) = recover_index(&*io, dir, false, Mode::Open { repair: false })?;
    index::save(&*io, dir, &idx)?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(RebuildReport {
        events: scan.events,
        records: scan.records,
        streams: idx.streams.len() as u64,
        seconds,
        events_per_second: if seconds > 0.0 { scan.events as f64 / seconds } else { 0.0 },
    })
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "segments: {}", self.segments)?;
        writeln!(f, "records:  {} ({} events)", self.records, self.events)?;
        writeln!(f, "streams:  {}", self.streams)?;
        writeln!(f, "bytes:    {}", self.bytes)?;
        writeln!(f, "head:     {}", self.head_hash)?;
        match &self.first_bad {
            None => write!(f, "result:   ok"),
            Some(b) if b.torn_tail => write!(
                f,
                "result:   BAD at segment {}, offset {}, position {}: {} (torn tail: opening the store \
                 would cut the log back to position {})",
                b.segment, b.offset, b.position, b.reason, b.cut_position
            ),
            Some(b) => write!(
                f,
                "result:   BAD at segment {}, offset {}, position {}: {} (`repair` would cut the log \
                 back to position {})",
                b.segment, b.offset, b.position, b.reason, b.cut_position
            ),
        }
    }
}
