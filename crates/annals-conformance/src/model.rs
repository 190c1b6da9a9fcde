//! Pieces shared by the backends' model tests (`tests/model.rs`): random
//! sequences of operations run against a backend and against
//! `MemoryStore`, whose answers must agree. Each backend keeps its own
//! operation mix; what an expectation, an event as seen, and an answer
//! compared mean is written here once.

use annals_core::{
    AllReader, AllSlice, Error, ExpectedVersion, Filter, ReadAll, ReadFrom, ReadStream, RecordedEvent,
    Result, StreamName, StreamReader, Uuid,
};
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

/// Reads stream `s` from `model` and `store` (backward or forward, from
/// version `from` or the end, at most `limit` events) and requires the same
/// events, and the same stream info.
pub async fn same_stream_read(
    model: &dyn StreamReader,
    store: &dyn StreamReader,
    s: &StreamName,
    backward: bool,
    from: Option<u64>,
    limit: usize,
) {
    let mut req = if backward { ReadStream::backward() } else { ReadStream::forward() };
    if let Some(v) = from {
        req.from = ReadFrom::At(v);
    }
    req.limit = limit;
    let events = |v: Vec<RecordedEvent>| v.iter().map(seen).collect::<Vec<_>>();
    let x = norm(model.read_stream(s, req).await, events);
    let y = norm(store.read_stream(s, req).await, events);
    assert_eq!(x, y, "read_stream");
    let x = norm(model.stream_info(s).await, |i| i);
    let y = norm(store.stream_info(s).await, |i| i);
    assert_eq!(x, y, "stream_info");
}

/// Reads a page of `$all` from `model` and `store` (backward or forward,
/// from position `from` or the end, at most `limit` events, filter number
/// `filter`: all, category `s1`, type `B`, correlation id `c-1`, or type
/// prefix `A`) and requires the same page.
pub async fn same_all_read(
    model: &dyn AllReader,
    store: &dyn AllReader,
    backward: bool,
    from: Option<u64>,
    limit: usize,
    filter: u8,
) {
    let mut req = if backward { ReadAll::backward(limit) } else { ReadAll::forward(limit) };
    if let Some(p) = from {
        req.from = ReadFrom::At(p);
    }
    req.filter = match filter {
        0 => Filter::all(),
        1 => Filter::category("s1"),
        2 => Filter::event_type("B"),
        3 => Filter::correlation_id("c-1"),
        _ => Filter::event_type_prefix("A"),
    };
    let x = norm(model.read_all(req.clone()).await, slice);
    let y = norm(store.read_all(req).await, slice);
    assert_eq!(x, y, "read_all");
}
