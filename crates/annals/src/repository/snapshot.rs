//! Snapshot policy, the snapshot envelope, and background snapshot writes.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use annals_core::{Snapshot, Store, StreamName, Timestamp};
use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

/// When to snapshot an aggregate and how many snapshots to keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotPolicy {
    /// Snapshot whenever the stream's event count crosses a multiple of
    /// this (0 = never snapshot, and never read snapshots).
    pub every: u64,
    /// Keep this many newest snapshots per stream; older ones are pruned
    /// after each write (at least 1).
    pub keep_last: usize,
    /// Where snapshot writes run.
    pub writes: SnapshotWrites,
}

/// Where snapshot writes run. Either way a failed snapshot write is logged
/// (`tracing::warn!`) and never fails or undoes the command that triggered it:
/// a snapshot is only a cache of what the events already say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SnapshotWrites {
    /// Spawned on the current tokio runtime, so `execute` returns without
    /// waiting for it (the default). Writes still in flight when the last
    /// clone of the repository is dropped are aborted; await
    /// [`Repository::flush_snapshots`](crate::Repository::flush_snapshots)
    /// to wait for them. Outside a tokio runtime writes run inline.
    #[default]
    Background,
    /// Awaited inside `execute` after the append (errors still swallowed).
    Inline,
}

impl Default for SnapshotPolicy {
    fn default() -> Self {
        SnapshotPolicy::never()
    }
}

impl SnapshotPolicy {
    /// No snapshots: every load replays the whole stream.
    pub fn never() -> Self {
        SnapshotPolicy { every: 0, keep_last: 1, writes: SnapshotWrites::Background }
    }

    /// A snapshot every `n` events, keeping the last 2.
    pub fn every(n: u64) -> Self {
        SnapshotPolicy { every: n, keep_last: 2, writes: SnapshotWrites::Background }
    }

    /// Keep the newest `k` snapshots (at least 1).
    pub fn keep_last(mut self, k: usize) -> Self {
        self.keep_last = k.max(1);
        self
    }

    /// Write snapshots inside `execute` instead of in the background.
    pub fn inline(mut self) -> Self {
        self.writes = SnapshotWrites::Inline;
        self
    }

    /// Whether snapshots are used at all.
    pub fn enabled(&self) -> bool {
        self.every > 0
    }

    /// Whether going from `old_count` to `new_count` events crosses a
    /// snapshot boundary.
    pub(crate) fn due(&self, old_count: u64, new_count: u64) -> bool {
        self.enabled() && old_count / self.every != new_count / self.every
    }
}

/// One command's events in a stream: a contiguous run of versions (one
/// append).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct CommandSpan {
    pub(crate) command_id: String,
    pub(crate) first_version: u64,
    pub(crate) count: u64,
}

/// The ids of the last commands that wrote events to a stream, oldest
/// first. Rebuilt while folding events and carried in snapshots, so
/// duplicate detection costs no extra read.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub(crate) struct CommandWindow {
    spans: VecDeque<CommandSpan>,
}

impl CommandWindow {
    pub(crate) fn record(&mut self, command_id: Option<String>, version: u64, capacity: usize) {
        let Some(command_id) = command_id else { return };
        if let Some(last) = self.spans.back_mut()
            && last.command_id == command_id
            && last.first_version + last.count == version
        {
            last.count += 1;
            return;
        }
        self.spans.push_back(CommandSpan { command_id, first_version: version, count: 1 });
        while self.spans.len() > capacity {
            self.spans.pop_front();
        }
    }

    pub(crate) fn find(&self, command_id: &str) -> Option<&CommandSpan> {
        self.spans.iter().rev().find(|s| s.command_id == command_id)
    }
}

/// What a snapshot stores: the state and the command window.
#[derive(Serialize)]
pub(crate) struct EnvelopeRef<'a, A> {
    pub(crate) state: &'a A,
    pub(crate) commands: &'a CommandWindow,
}

/// See [`EnvelopeRef`].
#[derive(Deserialize)]
pub(crate) struct Envelope<A> {
    pub(crate) state: A,
    pub(crate) commands: CommandWindow,
}

/// Owns the snapshot writes in flight.
#[derive(Default)]
pub(crate) struct SnapshotWriter {
    pending: Mutex<JoinSet<()>>,
}

impl SnapshotWriter {
    /// Writes `data` as the snapshot of `stream` at `version`, then prunes.
    /// Never returns an error: failures are logged.
    pub(crate) async fn write(
        &self,
        store: Arc<dyn Store>,
        policy: SnapshotPolicy,
        snapshot: (StreamName, u64, u32, Vec<u8>),
    ) {
        let (stream, version, schema_version, data) = snapshot;
        let job = async move {
            let snapshot =
                Snapshot { stream, version, schema_version, data: data.into(), created_at: Timestamp::now() };
            let stream = snapshot.stream.clone();
            if let Err(error) = store.save_snapshot(snapshot).await {
                tracing::warn!(%stream, version, %error, "snapshot write failed; loads replay more events until the next one");
                return;
            }
            // At least 1 also for a policy built as a struct literal: 0
            // would delete the snapshot just written.
            if let Err(error) = store.prune_snapshots(&stream, policy.keep_last.max(1)).await {
                tracing::warn!(%stream, %error, "pruning old snapshots failed; they stay until the next prune");
            }
        };
        match (policy.writes, tokio::runtime::Handle::try_current()) {
            (SnapshotWrites::Background, Ok(handle)) => {
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                // Reap finished writes so the set does not grow without bound.
                while pending.try_join_next().is_some() {}
                pending.spawn_on(job, &handle);
            }
            _ => job.await,
        }
    }

    /// Waits for every write started before this call.
    pub(crate) async fn flush(&self) {
        let mut pending = {
            let mut guard = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            std::mem::take(&mut *guard)
        };
        while pending.join_next().await.is_some() {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_fires_on_crossing_multiples() {
        let p = SnapshotPolicy::every(3);
        assert!(!p.due(0, 2));
        assert!(p.due(2, 3));
        assert!(p.due(1, 7));
        assert!(!p.due(3, 5));
        assert!(!SnapshotPolicy::never().due(0, 100));
    }

    #[test]
    fn window_merges_runs_and_forgets_the_oldest() {
        let mut w = CommandWindow::default();
        w.record(Some("a".into()), 0, 2);
        w.record(Some("a".into()), 1, 2);
        w.record(None, 2, 2);
        w.record(Some("b".into()), 3, 2);
        assert_eq!(w.find("a").map(|s| (s.first_version, s.count)), Some((0, 2)));
        w.record(Some("c".into()), 4, 2);
        assert!(w.find("a").is_none());
        assert_eq!(w.find("c").map(|s| s.first_version), Some(4));
    }
}
