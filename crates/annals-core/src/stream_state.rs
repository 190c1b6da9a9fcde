//! The per-stream bookkeeping every backend keeps, and the append decision
//! rules written once so every backend applies them identically.

use uuid::Uuid;

use crate::{
    AppendResult, DeletionState, Direction, Error, ExpectedVersion, ReadFrom, ReadStream, Result, StreamInfo,
    StreamName,
};

/// What a backend knows about one stream, enough to decide an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamState {
    /// Version of the last event ever written (survives soft delete).
    pub last_version: Option<u64>,
    /// Position of that last event.
    pub last_position: Option<u64>,
    /// Versions below this are hidden (soft delete sets it to last + 1).
    pub truncate_before: u64,
    /// Hard-deleted.
    pub tombstoned: bool,
}

/// What to do with one stream's part of an append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendDecision {
    /// Write the events starting at this version.
    Write {
        /// Version of the first new event.
        first_version: u64,
    },
    /// An idempotent re-send: write nothing, answer this.
    AlreadyWritten(AppendResult),
}

impl StreamState {
    /// The version expected-version checks see: the last version if the
    /// stream has visible events, `None` if it was never written or was
    /// soft-deleted (and not recreated since).
    pub fn visible_version(&self) -> Option<u64> {
        self.last_version.filter(|v| *v >= self.truncate_before)
    }

    /// Whether the stream exists for readers.
    pub fn exists(&self) -> bool {
        !self.tombstoned && self.visible_version().is_some()
    }

    /// The version the next appended event gets.
    pub fn next_version(&self) -> u64 {
        self.last_version.map_or(0, |v| v + 1)
    }

    /// Public description of this state.
    pub fn info(&self, stream: &StreamName) -> StreamInfo {
        let deletion = if self.tombstoned {
            DeletionState::Tombstoned
        } else if self.truncate_before > 0 && self.visible_version().is_none() {
            DeletionState::Deleted
        } else {
            DeletionState::Live
        };
        StreamInfo {
            stream: stream.clone(),
            exists: self.exists(),
            last_version: self.last_version,
            last_position: self.last_position,
            truncate_before: self.truncate_before,
            deletion,
        }
    }

    /// Decides one stream's part of an append, applying the rules in the
    /// order the conformance suite pins down: tombstone, idempotency,
    /// expected version.
    ///
    /// `tail_ids(n)` must return the ids of the stream's last `n` events in
    /// version order, together with the position of the last one, or `None`
    /// when the stream has fewer than `n` events. It is only called when an
    /// idempotent re-send is possible.
    pub fn decide<F>(
        &self,
        stream: &StreamName,
        expected: ExpectedVersion,
        ids: &[Uuid],
        tail_ids: F,
    ) -> Result<AppendDecision>
    where
        F: FnOnce(usize) -> Result<Option<(Vec<Uuid>, u64)>>,
    {
        if self.tombstoned {
            return Err(Error::StreamDeleted { stream: stream.clone() });
        }
        let n = ids.len() as u64;
        if let Some(last) = self.last_version
            && n > 0
            && last + 1 >= n
            && let Some((tail, position)) = tail_ids(ids.len())?
            && tail == ids
        {
            return Ok(AppendDecision::AlreadyWritten(AppendResult { next_version: last + 1, position }));
        }
        let actual = self.visible_version();
        if !expected.matches(actual) {
            return Err(Error::WrongExpectedVersion { stream: stream.clone(), expected, actual });
        }
        Ok(AppendDecision::Write { first_version: self.next_version() })
    }

    /// The versions a stream read visits, in order and at most
    /// `request.limit` of them, after checking the stream is readable
    /// (tombstoned → [`Error::StreamDeleted`]; never written or soft-deleted →
    /// [`Error::StreamNotFound`]). Versions below `truncate_before` are never
    /// visited. Backends map each version to their own storage.
    pub fn versions_to_read(
        &self,
        stream: &StreamName,
        request: &ReadStream,
    ) -> Result<Box<dyn Iterator<Item = u64> + Send>> {
        if self.tombstoned {
            return Err(Error::StreamDeleted { stream: stream.clone() });
        }
        if !self.exists() {
            return Err(Error::StreamNotFound { stream: stream.clone() });
        }
        let first = self.truncate_before;
        let count = self.next_version();
        let versions: Box<dyn Iterator<Item = u64> + Send> = match request.direction {
            Direction::Forward => {
                let start = match request.from {
                    ReadFrom::Start => first,
                    ReadFrom::End => count,
                    ReadFrom::At(v) => v.max(first),
                };
                Box::new(start..count)
            }
            Direction::Backward => {
                let start = match request.from {
                    ReadFrom::Start | ReadFrom::End => count.checked_sub(1),
                    ReadFrom::At(v) => count.checked_sub(1).map(|last| v.min(last)),
                };
                match start {
                    Some(s) if s >= first => Box::new((first..=s).rev()),
                    _ => Box::new(std::iter::empty()),
                }
            }
        };
        Ok(Box::new(versions.take(request.limit)))
    }

    /// Checks a delete request against this state.
    pub fn check_delete(&self, stream: &StreamName, expected: ExpectedVersion, hard: bool) -> Result<()> {
        if self.tombstoned {
            return Err(Error::StreamDeleted { stream: stream.clone() });
        }
        let actual = self.visible_version();
        if !expected.matches(actual) {
            return Err(Error::WrongExpectedVersion { stream: stream.clone(), expected, actual });
        }
        if !hard && actual.is_none() {
            return Err(Error::StreamNotFound { stream: stream.clone() });
        }
        Ok(())
    }
}
