//! Property test: random sequences of appends (every kind of expectation,
//! idempotent re-sends, multi-stream), soft and hard deletes, reads and
//! reopens give the same answers from the log store as from the in-memory
//! reference backend.

use std::{path::Path, sync::Arc};

use annals_conformance::model::{Exp, exp, name, norm, same_all_read, same_stream_read};
use annals_core::{
    AllReader, Appender, DeleteMode, EventData, MemoryStore, Metadata, StreamAppend, StreamDeleter, Uuid,
};
use annals_log::{LogStore, io::FaultIo};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Append { stream: u8, expected: Exp, count: u8, resend: bool },
    Multi { a: u8, b: u8, ea: Exp, eb: Exp },
    Delete { stream: u8, expected: Exp, hard: bool },
    ReadStream { stream: u8, backward: bool, from: Option<u8>, limit: u8 },
    ReadAll { backward: bool, from: Option<u8>, limit: u8, filter: u8 },
    Reopen,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..4, exp(), 1u8..4, any::<bool>())
            .prop_map(|(stream, expected, count, resend)| Op::Append { stream, expected, count, resend }),
        2 => (0u8..4, 0u8..4, exp(), exp()).prop_map(|(a, b, ea, eb)| Op::Multi { a, b, ea, eb }),
        2 => (0u8..4, exp(), any::<bool>()).prop_map(|(stream, expected, hard)| Op::Delete { stream, expected, hard }),
        2 => (0u8..4, any::<bool>(), proptest::option::of(0u8..8), 0u8..6)
            .prop_map(|(stream, backward, from, limit)| Op::ReadStream { stream, backward, from, limit }),
        2 => (any::<bool>(), proptest::option::of(0u8..30), 0u8..12, 0u8..5)
            .prop_map(|(backward, from, limit, filter)| Op::ReadAll { backward, from, limit, filter }),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
    ]
}

struct Run {
    io: FaultIo,
    log: Option<LogStore>,
    model: MemoryStore,
    next_id: u128,
    last_batch: Vec<EventData>,
}

impl Run {
    fn open(io: &FaultIo) -> LogStore {
        LogStore::builder(Path::new("/model")).io(Arc::new(io.clone())).segment_size(4096).open().unwrap()
    }

    fn log(&self) -> &LogStore {
        self.log.as_ref().unwrap()
    }

    fn events(&mut self, count: u8) -> Vec<EventData> {
        (0..count)
            .map(|i| {
                self.next_id += 1;
                let ty = if (self.next_id + u128::from(i)).is_multiple_of(3) { "B" } else { "A" };
                let mut e = EventData::json(ty, &serde_json::json!({ "n": self.next_id as u64 }))
                    .unwrap()
                    .with_id(Uuid::from_u128(self.next_id));
                if self.next_id.is_multiple_of(2) {
                    e = e.with_metadata(
                        Metadata::new().with("correlation_id", format!("c-{}", self.next_id % 3)),
                    );
                }
                e
            })
            .collect()
    }

    async fn step(&mut self, op: Op) {
        match op {
            Op::Append { stream, expected, count, resend } => {
                let batch = if resend && !self.last_batch.is_empty() {
                    self.last_batch.clone()
                } else {
                    self.events(count)
                };
                self.last_batch = batch.clone();
                let s = name(stream);
                let a = norm(self.model.append(&s, expected.get(), batch.clone()).await, |r| r);
                let b = norm(self.log().append(&s, expected.get(), batch).await, |r| r);
                assert_eq!(a, b, "append");
            }
            Op::Multi { a, b, ea, eb } => {
                let parts = vec![
                    StreamAppend::new(name(a), ea.get(), self.events(1)),
                    StreamAppend::new(name(b), eb.get(), self.events(2)),
                ];
                let x = norm(self.model.append_multi(parts.clone()).await, |r| r);
                let y = norm(self.log().append_multi(parts).await, |r| r);
                assert_eq!(x, y, "multi-append");
            }
            Op::Delete { stream, expected, hard } => {
                let mode = if hard { DeleteMode::Hard } else { DeleteMode::Soft };
                let s = name(stream);
                let x = norm(self.model.delete_stream(&s, expected.get(), mode).await, |r| r);
                let y = norm(self.log().delete_stream(&s, expected.get(), mode).await, |r| r);
                assert_eq!(x, y, "delete");
            }
            Op::ReadStream { stream, backward, from, limit } => {
                same_stream_read(
                    &self.model,
                    self.log(),
                    &name(stream),
                    backward,
                    from.map(u64::from),
                    usize::from(limit),
                )
                .await;
            }
            Op::ReadAll { backward, from, limit, filter } => {
                same_all_read(
                    &self.model,
                    self.log(),
                    backward,
                    from.map(u64::from),
                    usize::from(limit),
                    filter,
                )
                .await;
            }
            Op::Reopen => {
                self.log.take().unwrap().close().unwrap();
                self.log = Some(Self::open(&self.io));
            }
            Op::Crash => {
                // Only synced bytes survive; with Durability::Always that is
                // everything acknowledged.
                let crashed = self.io.crash();
                drop(self.log.take());
                self.io = crashed;
                self.log = Some(Self::open(&self.io));
            }
        }
        assert_eq!(self.model.next_position().await.unwrap(), self.log().next_position().await.unwrap());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn log_store_behaves_like_the_memory_store(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let io = FaultIo::new();
            let mut run = Run { log: Some(Run::open(&io)), io, model: MemoryStore::new(), next_id: 0, last_batch: Vec::new() };
            for op in ops {
                run.step(op).await;
            }
            // A final reopen from the log alone must show the same history.
            run.step(Op::Reopen).await;
            run.step(Op::ReadAll { backward: false, from: None, limit: 255, filter: 0 }).await;
        });
    }
}
