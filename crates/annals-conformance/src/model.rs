//! Pieces shared by the backends' model tests (`tests/model.rs`): random
//! sequences of operations run against a backend and against
//! `MemoryStore`, whose answers must agree. Each backend keeps its own
//! operation mix; what an expectation, an event as seen, and an answer
//! compared mean is written here once.

use annals_core::{AllSlice, Error, ExpectedVersion, RecordedEvent, Result, StreamName, Uuid};
use proptest::prelude::*;

/// An expected version, small enough that conflicts are common.
#[derive(Debug, Clone, Copy)]
pub enum Exp {
    Any,
    NoStream,
    Exists,
    Exact(u8),
}

impl Exp {
    pub fn get(self) -> ExpectedVersion {
        match self {
            Exp::Any => ExpectedVersion::Any,
            Exp::NoStream => ExpectedVersion::NoStream,
            Exp::Exists => ExpectedVersion::StreamExists,
            Exp::Exact(v) => ExpectedVersion::Exact(u64::from(v)),
        }
    }
}

/// Every kind of expectation, exact ones up to version 5.
pub fn exp() -> impl Strategy<Value = Exp> {
    prop_oneof![Just(Exp::Any), Just(Exp::NoStream), Just(Exp::Exists), (0u8..6).prop_map(Exp::Exact)]
}

/// Stream `i` of a small set in two categories (`s0`, `s1`).
pub fn name(i: u8) -> StreamName {
    StreamName::new(format!("s{}-{}", i % 2, i)).unwrap()
}

/// An event as compared: everything but `recorded_at`, which differs
/// between two stores.
pub type Seen = (String, u64, u64, Uuid, String, Vec<u8>, Vec<u8>);

pub fn seen(e: &RecordedEvent) -> Seen {
    (
        e.stream.to_string(),
        e.version,
        e.position,
        e.id,
        e.event_type.clone(),
        e.data.to_vec(),
        e.metadata.as_bytes().to_vec(),
    )
}

/// An answer as compared: the value through `f`, or the error's kind and
/// details. Any other error than the rules' own fails the test.
pub fn norm<T, U: PartialEq + std::fmt::Debug>(
    r: Result<T>,
    f: impl Fn(T) -> U,
) -> std::result::Result<U, String> {
    r.map(f).map_err(|e| match e {
        Error::WrongExpectedVersion { stream, expected, actual } => {
            format!("wev {stream} {expected} {actual:?}")
        }
        Error::StreamNotFound { stream } => format!("notfound {stream}"),
        Error::StreamDeleted { stream } => format!("deleted {stream}"),
        Error::InvalidInput { .. } => "invalid".to_owned(),
        other => panic!("unexpected error {other:?}"),
    })
}

/// A page of `$all` as compared.
pub fn slice(s: AllSlice) -> (Vec<Seen>, Option<u64>) {
    (s.events.iter().map(seen).collect(), s.next)
}
