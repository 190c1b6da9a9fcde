//! A store wrapper that injects faults: lost acknowledgements and failing
//! snapshot writes.

#![allow(dead_code)]

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use annals_core::{
    AllReader, AllSlice, AppendResult, Appender, CheckpointStore, DeleteMode, EventData, EventStream,
    ExpectedVersion, MemoryStore, ReadAll, ReadStream, RecordedEvent, Result, Snapshot, SnapshotStore,
    StreamAppend, StreamDeleter, StreamInfo, StreamName, StreamReader, Subscriber, SubscriptionRequest,
    async_trait,
};

/// Delegates to a [`MemoryStore`], except where a fault is armed.
#[derive(Clone, Default)]
pub struct FaultyStore {
    pub inner: MemoryStore,
    /// The next append is committed, then reported as failed.
    pub lose_next_ack: Arc<AtomicBool>,
    /// Every snapshot write fails.
    pub fail_snapshots: Arc<AtomicBool>,
    /// Every append loses the concurrency race (and writes nothing).
    pub always_conflict: Arc<AtomicBool>,
    /// Run to completion just before the next append reaches the store:
    /// another writer that gets in between a load and its append.
    pub before_next_append: Arc<Mutex<Option<Interloper>>>,
}

/// See [`FaultyStore::before_next_append`].
pub type Interloper = Pin<Box<dyn Future<Output = ()> + Send>>;

impl FaultyStore {
    /// Arms [`FaultyStore::before_next_append`].
    pub fn before_next_append(&self, writer: impl Future<Output = ()> + Send + 'static) {
        *self.before_next_append.lock().unwrap() = Some(Box::pin(writer));
    }

    async fn run_interloper(&self) {
        let writer = self.before_next_append.lock().unwrap().take();
        if let Some(writer) = writer {
            writer.await;
        }
    }
}

fn lost() -> annals_core::Error {
    annals_core::Error::Backend { message: "connection reset after commit".into(), source: None }
}

#[async_trait]
impl Appender for FaultyStore {
    async fn append(&self, s: &StreamName, e: ExpectedVersion, ev: Vec<EventData>) -> Result<AppendResult> {
        self.run_interloper().await;
        if self.always_conflict.load(Ordering::SeqCst) {
            return Err(annals_core::Error::WrongExpectedVersion {
                stream: s.clone(),
                expected: e,
                actual: None,
            });
        }
        let result = self.inner.append(s, e, ev).await?;
        if self.lose_next_ack.swap(false, Ordering::SeqCst) {
            return Err(lost());
        }
        Ok(result)
    }

    async fn append_multi(&self, parts: Vec<StreamAppend>) -> Result<Vec<AppendResult>> {
        self.run_interloper().await;
        let result = self.inner.append_multi(parts).await?;
        if self.lose_next_ack.swap(false, Ordering::SeqCst) {
            return Err(lost());
        }
        Ok(result)
    }
}

#[async_trait]
impl StreamReader for FaultyStore {
    async fn read_stream(&self, s: &StreamName, r: ReadStream) -> Result<Vec<RecordedEvent>> {
        self.inner.read_stream(s, r).await
    }

    async fn stream_info(&self, s: &StreamName) -> Result<StreamInfo> {
        self.inner.stream_info(s).await
    }
}

#[async_trait]
impl AllReader for FaultyStore {
    async fn read_all(&self, r: ReadAll) -> Result<AllSlice> {
        self.inner.read_all(r).await
    }

    async fn next_position(&self) -> Result<u64> {
        self.inner.next_position().await
    }
}

impl Subscriber for FaultyStore {
    fn subscribe(&self, r: SubscriptionRequest) -> EventStream {
        self.inner.subscribe(r)
    }
}

#[async_trait]
impl StreamDeleter for FaultyStore {
    async fn delete_stream(&self, s: &StreamName, e: ExpectedVersion, m: DeleteMode) -> Result<()> {
        self.inner.delete_stream(s, e, m).await
    }
}

#[async_trait]
impl SnapshotStore for FaultyStore {
    async fn save_snapshot(&self, snapshot: Snapshot) -> Result<()> {
        if self.fail_snapshots.load(Ordering::SeqCst) {
            return Err(annals_core::Error::Backend {
                message: "snapshot table is full".into(),
                source: None,
            });
        }
        self.inner.save_snapshot(snapshot).await
    }

    async fn load_snapshot(&self, s: &StreamName, at: Option<u64>) -> Result<Option<Snapshot>> {
        self.inner.load_snapshot(s, at).await
    }

    async fn prune_snapshots(&self, s: &StreamName, keep: usize) -> Result<usize> {
        self.inner.prune_snapshots(s, keep).await
    }
}

#[async_trait]
impl CheckpointStore for FaultyStore {
    async fn load_checkpoint(&self, name: &str) -> Result<Option<u64>> {
        self.inner.load_checkpoint(name).await
    }

    async fn save_checkpoint(&self, name: &str, position: u64) -> Result<()> {
        self.inner.save_checkpoint(name, position).await
    }
}
