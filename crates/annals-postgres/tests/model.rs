//! Property test: random sequences of appends (every kind of expectation,
//! idempotent re-sends, multi-stream, batches that fill and split runs,
//! events large enough to split runs by size), soft and hard deletes, and
//! reads from anywhere (inside runs, filtered, backward) give the same
//! answers from PostgreSQL as from the in-memory reference backend. Half of
//! the operations go through a second store instance on the same schema, as
//! another process would.
//!
//! The append rules exist twice in this backend (the SQL fast path declines
//! what it cannot decide, and Rust decides it on the exact path), and
//! events are stored in runs that reads unpack: this is where the two
//! could drift from the reference. Each case gets its own schema; the
//! number of cases is `PROPTEST_CASES` (default 24).

mod common;

use annals_conformance::model::{Exp, exp, name, norm, same_all_read, same_stream_read};
use annals_core::{
    AllReader, Appender, DeleteMode, EventData, MemoryStore, Metadata, StreamAppend, StreamDeleter, Uuid,
};
use annals_postgres::PgStore;
use proptest::prelude::*;

/// How an append's events look.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// 1–3 small events, mixed types and correlation ids.
    Few(u8),
    /// 95–130 events of one type: more than one run holds.
    Many(u8),
    /// Three events of 30 KB each: runs split by size.
    Large,
}

#[derive(Debug, Clone)]
enum Op {
    Append { stream: u8, expected: Exp, shape: Shape, resend: bool, other: bool },
    Multi { a: u8, b: u8, ea: Exp, eb: Exp, other: bool },
    Delete { stream: u8, expected: Exp, hard: bool, other: bool },
    ReadStream { stream: u8, backward: bool, from: Option<u8>, limit: u8, other: bool },
    ReadAll { backward: bool, from: Option<u16>, limit: u8, filter: u8, other: bool },
}

fn shape() -> impl Strategy<Value = Shape> {
    prop_oneof![
        8 => (1u8..4).prop_map(Shape::Few),
        1 => (95u8..131).prop_map(Shape::Many),
        1 => Just(Shape::Large),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u8..4, exp(), shape(), any::<bool>(), any::<bool>())
            .prop_map(|(stream, expected, shape, resend, other)| Op::Append { stream, expected, shape, resend, other }),
        2 => (0u8..4, 0u8..4, exp(), exp(), any::<bool>())
            .prop_map(|(a, b, ea, eb, other)| Op::Multi { a, b, ea, eb, other }),
        2 => (0u8..4, exp(), any::<bool>(), any::<bool>())
            .prop_map(|(stream, expected, hard, other)| Op::Delete { stream, expected, hard, other }),
        2 => (0u8..4, any::<bool>(), proptest::option::of(0u8..140), 0u8..120, any::<bool>())
            .prop_map(|(stream, backward, from, limit, other)| Op::ReadStream { stream, backward, from, limit, other }),
        3 => (any::<bool>(), proptest::option::of(0u16..400), 0u8..150, 0u8..5, any::<bool>())
            .prop_map(|(backward, from, limit, filter, other)| Op::ReadAll { backward, from, limit, filter, other }),
    ]
}

struct Run {
    stores: [PgStore; 2],
    model: MemoryStore,
    next_id: u128,
    last_batch: Vec<EventData>,
}

impl Run {
    fn store(&self, other: bool) -> &PgStore {
        &self.stores[usize::from(other)]
    }

    fn event(&mut self, ty: &str, data: serde_json::Value, correlated: bool) -> EventData {
        self.next_id += 1;
        let mut e = EventData::json(ty, &data).unwrap().with_id(Uuid::from_u128(self.next_id));
        if correlated {
            e = e.with_metadata(Metadata::new().with("correlation_id", format!("c-{}", self.next_id % 3)));
        }
        e
    }

    fn events(&mut self, shape: Shape) -> Vec<EventData> {
        match shape {
            Shape::Few(count) => (0..count)
                .map(|i| {
                    let n = self.next_id + 1;
                    let ty = if (n + u128::from(i)).is_multiple_of(3) { "B" } else { "A" };
                    self.event(ty, serde_json::json!({ "n": n as u64 }), n.is_multiple_of(2))
                })
                .collect(),
            Shape::Many(count) => {
                (0..count).map(|i| self.event("A", serde_json::json!({ "i": i }), false)).collect()
            }
            Shape::Large => (0..3)
                .map(|i| self.event("L", serde_json::json!({ "i": i, "pad": "x".repeat(30_000) }), true))
                .collect(),
        }
    }

    async fn step(&mut self, op: Op) {
        match op {
            Op::Append { stream, expected, shape, resend, other } => {
                let batch = if resend && !self.last_batch.is_empty() {
                    self.last_batch.clone()
                } else {
                    self.events(shape)
                };
                self.last_batch = batch.clone();
                let s = name(stream);
                let a = norm(self.model.append(&s, expected.get(), batch.clone()).await, |r| r);
                let b = norm(self.store(other).append(&s, expected.get(), batch).await, |r| r);
                assert_eq!(a, b, "append");
            }
            Op::Multi { a, b, ea, eb, other } => {
                let parts = vec![
                    StreamAppend::new(name(a), ea.get(), self.events(Shape::Few(1))),
                    StreamAppend::new(name(b), eb.get(), self.events(Shape::Few(2))),
                ];
                let x = norm(self.model.append_multi(parts.clone()).await, |r| r);
                let y = norm(self.store(other).append_multi(parts).await, |r| r);
                assert_eq!(x, y, "multi-append");
            }
            Op::Delete { stream, expected, hard, other } => {
                let mode = if hard { DeleteMode::Hard } else { DeleteMode::Soft };
                let s = name(stream);
                let x = norm(self.model.delete_stream(&s, expected.get(), mode).await, |r| r);
                let y = norm(self.store(other).delete_stream(&s, expected.get(), mode).await, |r| r);
                assert_eq!(x, y, "delete");
            }
            Op::ReadStream { stream, backward, from, limit, other } => {
                same_stream_read(
                    &self.model,
                    self.store(other),
                    &name(stream),
                    backward,
                    from.map(u64::from),
                    usize::from(limit),
                )
                .await;
            }
            Op::ReadAll { backward, from, limit, filter, other } => {
                same_all_read(
                    &self.model,
                    self.store(other),
                    backward,
                    from.map(u64::from),
                    usize::from(limit),
                    filter,
                )
                .await;
            }
        }
        let model = self.model.next_position().await.unwrap();
        assert_eq!(model, self.stores[0].next_position().await.unwrap(), "next position");
        assert_eq!(model, self.stores[1].next_position().await.unwrap(), "next position, other instance");
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(24)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn postgres_store_behaves_like_the_memory_store(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async {
            let Some((first, guard)) = common::open().await else { return };
            let second = common::reopen(&guard.schema).await;
            let mut run = Run { stores: [first, second], model: MemoryStore::new(), next_id: 0, last_batch: Vec::new() };
            for op in ops {
                run.step(op).await;
            }
            run.step(Op::ReadAll { backward: false, from: None, limit: 255, filter: 0, other: true }).await;
            drop(run);
            drop(guard);
        });
    }
}
