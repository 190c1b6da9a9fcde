//! The behaviours. Each takes a fresh, empty store and panics on a
//! violation. Grouped: appends and concurrency control, idempotency, reads,
//! filters, deletes, multi-stream appends, limits and payloads, concurrency,
//! subscriptions, snapshots and checkpoints.

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
    time::Duration,
};

use annals_core::{
    Bytes, ContentType, DeleteMode, DeletionState, Direction, Error, EventData, ExpectedVersion, Filter,
    Leases, LimitKind, ListStreams, ReadAll, ReadFrom, ReadStream, Snapshot, Store, StreamAppend, StreamName,
    SubscribeFrom, SubscriptionRequest, Timestamp, TypeMatch,
};
use futures::StreamExt;
use serde_json::json;

use crate::support::*;

/// Bound every behaviour's store type must satisfy.
pub trait TestStore: Store + Leases + Clone + 'static {}
impl<T: Store + Leases + Clone + 'static> TestStore for T {}

// ---------------------------------------------------------------- appends

pub async fn append_to_new_stream_starts_at_version_zero<S: TestStore>(store: S) {
    let s = stream("account-1");
    store.append(&s, ExpectedVersion::NoStream, events("Opened", 1)).await.unwrap();
    let read = store.read_stream(&s, ReadStream::forward()).await.unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].version, 0);
    assert_eq!(read[0].position, 0);
    assert_eq!(read[0].stream, s);
    assert_eq!(read[0].event_type, "Opened");
}

pub async fn append_result_reports_next_version_and_last_position<S: TestStore>(store: S) {
    let a = stream("a-1");
    let r = store.append(&a, ExpectedVersion::Any, events("E", 3)).await.unwrap();
    assert_eq!(r.next_version, 3);
    assert_eq!(r.position, 2);
    assert_eq!(r.expected(), ExpectedVersion::Exact(2));
    let r = store.append(&stream("b-1"), ExpectedVersion::Any, events("E", 2)).await.unwrap();
    assert_eq!((r.next_version, r.position), (2, 4));
}

pub async fn versions_are_gapless_across_appends<S: TestStore>(store: S) {
    let s = stream("order-7");
    for i in 0..5u64 {
        let r = store.append(&s, ExpectedVersion::Any, events("E", i + 1)).await.unwrap();
        assert_eq!(r.next_version, (1..=i + 1).sum::<u64>());
    }
    let versions = read_versions(&store, &s).await;
    assert_eq!(versions, (0..15).collect::<Vec<_>>());
}

pub async fn positions_are_gapless_across_streams<S: TestStore>(store: S) {
    for i in 0..10u64 {
        store.append(&stream(&format!("s-{}", i % 3)), ExpectedVersion::Any, events("E", 2)).await.unwrap();
    }
    let all = store.read_all(ReadAll::forward(1000)).await.unwrap();
    let positions: Vec<u64> = all.events.iter().map(|e| e.position).collect();
    assert_eq!(positions, (0..20).collect::<Vec<_>>());
}

pub async fn expected_no_stream_fails_when_stream_exists<S: TestStore>(store: S) {
    let s = stream("x-1");
    store.append(&s, ExpectedVersion::NoStream, events("E", 2)).await.unwrap();
    let err = store.append(&s, ExpectedVersion::NoStream, events("E", 1)).await.unwrap_err();
    match err {
        Error::WrongExpectedVersion { stream: st, expected, actual } => {
            assert_eq!(st, s);
            assert_eq!(expected, ExpectedVersion::NoStream);
            assert_eq!(actual, Some(1));
        }
        other => panic!("expected WrongExpectedVersion, got {other:?}"),
    }
}

pub async fn expected_exact_succeeds_when_matching<S: TestStore>(store: S) {
    let s = stream("x-1");
    let r = store.append(&s, ExpectedVersion::NoStream, events("E", 1)).await.unwrap();
    let r = store.append(&s, r.expected(), events("E", 2)).await.unwrap();
    assert_eq!(r.expected(), ExpectedVersion::Exact(2));
    let r = store.append(&s, ExpectedVersion::Exact(2), events("E", 1)).await.unwrap();
    assert_eq!(r.next_version, 4);
}

pub async fn expected_exact_fails_with_actual_version<S: TestStore>(store: S) {
    let s = stream("x-1");
    store.append(&s, ExpectedVersion::Any, events("E", 3)).await.unwrap();
    let err = store.append(&s, ExpectedVersion::Exact(1), events("E", 1)).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::WrongExpectedVersion { expected: ExpectedVersion::Exact(1), actual: Some(2), .. }
        ),
        "{err:?}"
    );
}

pub async fn expected_exact_on_missing_stream_reports_no_stream<S: TestStore>(store: S) {
    let err = store.append(&stream("ghost-1"), ExpectedVersion::Exact(0), events("E", 1)).await.unwrap_err();
    assert!(matches!(err, Error::WrongExpectedVersion { actual: None, .. }), "{err:?}");
}

pub async fn expected_stream_exists_fails_on_missing_stream<S: TestStore>(store: S) {
    let s = stream("ghost-1");
    let err = store.append(&s, ExpectedVersion::StreamExists, events("E", 1)).await.unwrap_err();
    assert!(matches!(err, Error::WrongExpectedVersion { actual: None, .. }), "{err:?}");
    store.append(&s, ExpectedVersion::Any, events("E", 1)).await.unwrap();
    store.append(&s, ExpectedVersion::StreamExists, events("E", 1)).await.unwrap();
    assert_eq!(read_versions(&store, &s).await, vec![0, 1]);
}

pub async fn expected_any_always_appends<S: TestStore>(store: S) {
    let s = stream("any-1");
    for _ in 0..3 {
        store.append(&s, ExpectedVersion::Any, events("E", 1)).await.unwrap();
    }
    assert_eq!(read_versions(&store, &s).await, vec![0, 1, 2]);
}

pub async fn failed_append_writes_nothing<S: TestStore>(store: S) {
    let s = stream("x-1");
    store.append(&s, ExpectedVersion::Any, events("E", 2)).await.unwrap();
    let before = store.next_position().await.unwrap();
    store.append(&s, ExpectedVersion::Exact(7), events("E", 5)).await.unwrap_err();
    store.append(&s, ExpectedVersion::NoStream, events("E", 5)).await.unwrap_err();
    assert_eq!(store.next_position().await.unwrap(), before);
    assert_eq!(read_versions(&store, &s).await, vec![0, 1]);
    // A batch with one invalid event is refused whole.
    let mut batch = events("E", 3);
    batch.push(EventData::raw("Bad", b"{not json".to_vec(), ContentType::Json));
    assert!(matches!(
        store.append(&s, ExpectedVersion::Any, batch).await.unwrap_err(),
        Error::InvalidInput { .. }
    ));
    assert_eq!(store.next_position().await.unwrap(), before);
}

// ------------------------------------------------------------ idempotency

pub async fn idempotent_resend_returns_original_result<S: TestStore>(store: S) {
    let s = stream("pay-1");
    let batch = events("Paid", 1);
    let first = store.append(&s, ExpectedVersion::NoStream, batch.clone()).await.unwrap();
    // The same request again (as after a lost acknowledgement).
    let again = store.append(&s, ExpectedVersion::NoStream, batch.clone()).await.unwrap();
    assert_eq!(first, again);
    let again = store.append(&s, ExpectedVersion::Any, batch).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(read_versions(&store, &s).await, vec![0]);
    assert_eq!(store.next_position().await.unwrap(), 1);
}

pub async fn idempotent_resend_of_batch_writes_nothing<S: TestStore>(store: S) {
    let s = stream("pay-1");
    store.append(&s, ExpectedVersion::Any, events("Pre", 2)).await.unwrap();
    let batch = events("Paid", 3);
    let first = store.append(&s, ExpectedVersion::Exact(1), batch.clone()).await.unwrap();
    let again = store.append(&s, ExpectedVersion::Exact(1), batch).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(first.next_version, 5);
    assert_eq!(store.next_position().await.unwrap(), 5);
}

pub async fn stale_resend_after_later_writes_conflicts<S: TestStore>(store: S) {
    let s = stream("pay-1");
    let batch = events("Paid", 1);
    store.append(&s, ExpectedVersion::NoStream, batch.clone()).await.unwrap();
    store.append(&s, ExpectedVersion::Exact(0), events("Later", 1)).await.unwrap();
    // No longer the last events: the expectation decides, and nothing is
    // written twice.
    let err = store.append(&s, ExpectedVersion::NoStream, batch).await.unwrap_err();
    assert!(matches!(err, Error::WrongExpectedVersion { actual: Some(1), .. }), "{err:?}");
    assert_eq!(read_versions(&store, &s).await, vec![0, 1]);
}

pub async fn duplicate_ids_in_one_append_are_rejected<S: TestStore>(store: S) {
    let e = event("E", 0);
    let err = store.append(&stream("d-1"), ExpectedVersion::Any, vec![e.clone(), e]).await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
    assert_eq!(store.next_position().await.unwrap(), 0);
}

pub async fn empty_append_is_rejected<S: TestStore>(store: S) {
    let err = store.append(&stream("d-1"), ExpectedVersion::Any, vec![]).await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
}

// ------------------------------------------------------------------ reads

async fn seeded<S: TestStore>(store: &S, name: &str, n: u64) -> StreamName {
    let s = stream(name);
    store.append(&s, ExpectedVersion::Any, events("E", n)).await.unwrap();
    s
}

pub async fn read_stream_forward_with_limit<S: TestStore>(store: S) {
    let s = seeded(&store, "r-1", 10).await;
    let page = store.read_stream(&s, ReadStream::forward().limit(4)).await.unwrap();
    assert_eq!(page.iter().map(|e| e.version).collect::<Vec<_>>(), vec![0, 1, 2, 3]);
    assert_eq!(page[2].decode::<serde_json::Value>().unwrap(), json!({ "n": 2 }));
}

pub async fn read_stream_forward_from_version<S: TestStore>(store: S) {
    let s = seeded(&store, "r-1", 10).await;
    let page = store.read_stream(&s, ReadStream::forward().from_version(7)).await.unwrap();
    assert_eq!(page.iter().map(|e| e.version).collect::<Vec<_>>(), vec![7, 8, 9]);
}

pub async fn read_stream_backward_from_end<S: TestStore>(store: S) {
    let s = seeded(&store, "r-1", 10).await;
    let page = store.read_stream(&s, ReadStream::backward().limit(3)).await.unwrap();
    assert_eq!(page.iter().map(|e| e.version).collect::<Vec<_>>(), vec![9, 8, 7]);
}

pub async fn read_stream_backward_from_version<S: TestStore>(store: S) {
    let s = seeded(&store, "r-1", 10).await;
    let page = store.read_stream(&s, ReadStream::backward().from_version(2)).await.unwrap();
    assert_eq!(page.iter().map(|e| e.version).collect::<Vec<_>>(), vec![2, 1, 0]);
    let page = store.read_stream(&s, ReadStream::backward().from_version(500).limit(2)).await.unwrap();
    assert_eq!(page.iter().map(|e| e.version).collect::<Vec<_>>(), vec![9, 8]);
}

pub async fn read_missing_stream_is_not_found<S: TestStore>(store: S) {
    seeded(&store, "other-1", 1).await;
    let err = store.read_stream(&stream("missing-1"), ReadStream::forward()).await.unwrap_err();
    assert!(matches!(err, Error::StreamNotFound { .. }), "{err:?}");
}

pub async fn read_forward_past_end_is_empty<S: TestStore>(store: S) {
    let s = seeded(&store, "r-1", 3).await;
    assert!(store.read_stream(&s, ReadStream::forward().from_version(3)).await.unwrap().is_empty());
    assert!(store.read_stream(&s, ReadStream::forward().from_version(u64::MAX)).await.unwrap().is_empty());
    assert!(store.read_stream(&s, ReadStream::forward().limit(0)).await.unwrap().is_empty());
}

pub async fn read_all_forward_in_position_order<S: TestStore>(store: S) {
    for i in 0..6u64 {
        seeded(&store, &format!("s{}-x", i % 2), 1).await;
    }
    let slice = store.read_all(ReadAll::forward(100)).await.unwrap();
    assert_eq!(slice.events.len(), 6);
    assert!(slice.events.windows(2).all(|w| w[0].position + 1 == w[1].position));
    assert_eq!(slice.next, Some(6));
    let from3 = store.read_all(ReadAll::forward(100).from_position(3)).await.unwrap();
    assert_eq!(from3.events.first().map(|e| e.position), Some(3));
}

pub async fn read_all_backward<S: TestStore>(store: S) {
    seeded(&store, "a-1", 5).await;
    let slice = store.read_all(ReadAll::backward(3)).await.unwrap();
    assert_eq!(slice.events.iter().map(|e| e.position).collect::<Vec<_>>(), vec![4, 3, 2]);
    assert_eq!(slice.next, Some(1));
    let rest = store.read_all(ReadAll::backward(10).from_position(1)).await.unwrap();
    assert_eq!(rest.events.iter().map(|e| e.position).collect::<Vec<_>>(), vec![1, 0]);
    assert_eq!(rest.next, None);
    let empty_store_like = store.read_all(ReadAll::backward(10).from_position(0)).await.unwrap();
    assert_eq!(empty_store_like.events.len(), 1);
}

pub async fn read_all_pages_with_next<S: TestStore>(store: S) {
    seeded(&store, "a-1", 25).await;
    let mut from = 0;
    let mut seen = Vec::new();
    loop {
        let slice = store.read_all(ReadAll::forward(10).from_position(from)).await.unwrap();
        let next = slice.next.expect("forward reads always say where to continue");
        seen.extend(slice.events.iter().map(|e| e.position));
        if slice.events.is_empty() {
            break;
        }
        from = next;
    }
    assert_eq!(seen, (0..25).collect::<Vec<_>>());
}

/// A read of no events answers at once, with nothing, and says where the
/// scan stands: a forward one continues where it started.
pub async fn reads_with_limit_zero_return_nothing<S: TestStore>(store: S) {
    let s = seeded(&store, "zero-1", 3).await;
    assert!(store.read_stream(&s, ReadStream::forward().limit(0)).await.unwrap().is_empty());
    assert!(store.read_stream(&s, ReadStream::backward().limit(0)).await.unwrap().is_empty());
    let page = store.read_all(ReadAll::forward(0).from_position(1)).await.unwrap();
    assert!(page.events.is_empty());
    assert_eq!(page.next, Some(1));
    let page = store.read_all(ReadAll::backward(0)).await.unwrap();
    assert!(page.events.is_empty());
    let page = store.read_all(ReadAll::forward(0).filter(Filter::category("zero"))).await.unwrap();
    assert!(page.events.is_empty());
}

// ---------------------------------------------------------------- filters

async fn filter_positions<S: TestStore>(store: &S, filter: Filter) -> Vec<(String, String)> {
    store
        .read_all(ReadAll::forward(1000).filter(filter))
        .await
        .unwrap()
        .events
        .into_iter()
        .map(|e| (e.stream.to_string(), e.event_type))
        .collect()
}

async fn seed_mixed<S: TestStore>(store: &S) {
    store.append(&stream("account-1"), ExpectedVersion::Any, vec![event("AccountOpened", 0)]).await.unwrap();
    store
        .append(&stream("accounting-1"), ExpectedVersion::Any, vec![event("LedgerPosted", 0)])
        .await
        .unwrap();
    store.append(&stream("order-1"), ExpectedVersion::Any, vec![event("OrderPlaced", 0)]).await.unwrap();
    store.append(&stream("account-2"), ExpectedVersion::Any, vec![event("AccountClosed", 0)]).await.unwrap();
}

pub async fn filter_by_category<S: TestStore>(store: S) {
    seed_mixed(&store).await;
    let got = filter_positions(&store, Filter::category("account")).await;
    assert_eq!(
        got,
        vec![("account-1".into(), "AccountOpened".into()), ("account-2".into(), "AccountClosed".into())]
    );
    // The category is what comes before the first '-', empty included;
    // a name without one is its own category.
    for name in ["-lead", "--double", "account", "\u{e9}t\u{e9}-1", "\u{e9}t\u{e9}"] {
        store.append(&stream(name), ExpectedVersion::Any, vec![event("Edge", 0)]).await.unwrap();
    }
    let names = |got: Vec<(String, String)>| got.into_iter().map(|(s, _)| s).collect::<Vec<_>>();
    assert_eq!(names(filter_positions(&store, Filter::category("")).await), ["-lead", "--double"]);
    assert_eq!(
        names(filter_positions(&store, Filter::category("account")).await),
        ["account-1", "account-2", "account"]
    );
    assert_eq!(
        names(filter_positions(&store, Filter::category("\u{e9}t\u{e9}")).await),
        ["\u{e9}t\u{e9}-1", "\u{e9}t\u{e9}"]
    );
    assert!(filter_positions(&store, Filter::category("-lead")).await.is_empty());
}

pub async fn filter_by_stream_prefix<S: TestStore>(store: S) {
    seed_mixed(&store).await;
    let got = filter_positions(&store, Filter::stream_prefix("account")).await;
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|(s, _)| s.starts_with("account")));
    // A filter that matches nothing still tells where to continue.
    let slice = store.read_all(ReadAll::forward(10).filter(Filter::stream_prefix("zzz"))).await.unwrap();
    assert!(slice.events.is_empty());
    assert_eq!(slice.next, Some(4));
}

pub async fn filter_by_event_type_exact_and_prefix<S: TestStore>(store: S) {
    seed_mixed(&store).await;
    let got = filter_positions(&store, Filter::event_type("OrderPlaced")).await;
    assert_eq!(got, vec![("order-1".into(), "OrderPlaced".into())]);
    let got = filter_positions(&store, Filter::event_type_prefix("Account")).await;
    assert_eq!(got.len(), 2);
    let either = Filter {
        event_types: vec![TypeMatch::Exact("LedgerPosted".into()), TypeMatch::Prefix("Order".into())],
        ..Filter::default()
    };
    assert_eq!(filter_positions(&store, either).await.len(), 2);
    let combined = Filter { category: Some("account".into()), ..Filter::event_type("AccountClosed") };
    assert_eq!(filter_positions(&store, combined).await, vec![("account-2".into(), "AccountClosed".into())]);
}

pub async fn filter_by_correlation_id<S: TestStore>(store: S) {
    let s = stream("flow-1");
    store
        .append(
            &s,
            ExpectedVersion::Any,
            vec![
                with_correlation(event("A", 0), "c-1"),
                event("B", 1),
                with_correlation(event("C", 2), "c-2"),
            ],
        )
        .await
        .unwrap();
    store
        .append(&stream("flow-2"), ExpectedVersion::Any, vec![with_correlation(event("D", 0), "c-1")])
        .await
        .unwrap();
    let got = filter_positions(&store, Filter::correlation_id("c-1")).await;
    assert_eq!(got, vec![("flow-1".into(), "A".into()), ("flow-2".into(), "D".into())]);
}

pub async fn filter_by_time_range<S: TestStore>(store: S) {
    seeded(&store, "t-1", 2).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let middle = Timestamp::now();
    tokio::time::sleep(Duration::from_millis(20)).await;
    seeded(&store, "t-2", 3).await;
    let after = Filter { recorded_after: Some(middle), ..Filter::default() };
    let got = filter_positions(&store, after).await;
    assert_eq!(got.len(), 3);
    assert!(got.iter().all(|(s, _)| s == "t-2"));
    let before = Filter { recorded_before: Some(middle), ..Filter::default() };
    assert_eq!(filter_positions(&store, before).await.len(), 2);
    // Bounds far outside any clock (PostgreSQL's timestamps end at 4714 BC)
    // select all or nothing, never fail.
    for far in [i64::MIN, i64::MIN + 1, -(1 << 62), i64::MAX] {
        let t = Timestamp::from_micros(far);
        let (after, before) = if far < 0 { (5, 0) } else { (0, 5) };
        let f = Filter { recorded_after: Some(t), ..Filter::default() };
        assert_eq!(filter_positions(&store, f).await.len(), after, "after {far}");
        let f = Filter { recorded_before: Some(t), ..Filter::default() };
        assert_eq!(filter_positions(&store, f).await.len(), before, "before {far}");
    }
}

pub async fn system_streams_hidden_unless_asked<S: TestStore>(store: S) {
    let sys = StreamName::system("$internal").unwrap();
    store.append(&sys, ExpectedVersion::Any, events("Sys", 1)).await.unwrap();
    seeded(&store, "user-1", 1).await;
    assert_eq!(filter_positions(&store, Filter::all()).await.len(), 1);
    assert_eq!(filter_positions(&store, Filter::all().with_system()).await.len(), 2);
}

// ---------------------------------------------------------------- deletes

pub async fn stream_info_reports_lifecycle<S: TestStore>(store: S) {
    let s = stream("life-1");
    let info = store.stream_info(&s).await.unwrap();
    assert!(!info.exists);
    assert_eq!(info.last_version, None);
    assert_eq!(info.deletion, DeletionState::Live);
    store.append(&s, ExpectedVersion::Any, events("E", 2)).await.unwrap();
    let info = store.stream_info(&s).await.unwrap();
    assert!(info.exists);
    assert_eq!((info.last_version, info.last_position), (Some(1), Some(1)));
    store.delete_stream(&s, ExpectedVersion::Exact(1), DeleteMode::Soft).await.unwrap();
    let info = store.stream_info(&s).await.unwrap();
    assert!(!info.exists);
    assert_eq!(info.deletion, DeletionState::Deleted);
    assert_eq!(info.truncate_before, 2);
    store.delete_stream(&s, ExpectedVersion::Any, DeleteMode::Hard).await.unwrap();
    assert_eq!(store.stream_info(&s).await.unwrap().deletion, DeletionState::Tombstoned);
}

pub async fn list_streams_pages_by_name_with_prefix<S: TestStore>(store: S) {
    // Written out of name order, interleaved, plus a system stream and
    // names outside the prefix.
    for (name, n) in [("ls-c", 1), ("other-a", 1), ("ls-a", 2), ("ls-b", 1), ("ls-a", 1), ("ls", 1)] {
        store.append(&stream(name), ExpectedVersion::Any, events("E", n)).await.unwrap();
    }
    store.save_checkpoint("ls-checkpoint", 1).await.unwrap();
    let names = |infos: &[annals_core::StreamInfo]| -> Vec<String> {
        infos.iter().map(|i| i.stream.as_str().to_owned()).collect()
    };
    let all = store.list_streams(ListStreams::new(100)).await.unwrap();
    assert_eq!(names(&all), ["ls", "ls-a", "ls-b", "ls-c", "other-a"]);
    assert!(all.iter().all(|i| !i.stream.is_system()));
    let a = all.iter().find(|i| i.stream.as_str() == "ls-a").unwrap();
    assert!(a.exists);
    // ls-a got versions 0,1 then 2; its last event is the 6th overall.
    assert_eq!((a.last_version, a.last_position), (Some(2), Some(5)));
    let page1 = store.list_streams(ListStreams::new(2).prefix("ls-")).await.unwrap();
    assert_eq!(names(&page1), ["ls-a", "ls-b"]);
    let page2 = store.list_streams(ListStreams::new(2).prefix("ls-").after("ls-b")).await.unwrap();
    assert_eq!(names(&page2), ["ls-c"]);
    let page3 = store.list_streams(ListStreams::new(2).prefix("ls-").after("ls-c")).await.unwrap();
    assert!(page3.is_empty());
    assert!(store.list_streams(ListStreams::new(0)).await.unwrap().is_empty());
    assert!(store.list_streams(ListStreams::new(10).prefix("nope")).await.unwrap().is_empty());
}

pub async fn soft_deleted_stream_reads_as_not_found<S: TestStore>(store: S) {
    let s = seeded(&store, "soft-1", 3).await;
    store.delete_stream(&s, ExpectedVersion::Any, DeleteMode::Soft).await.unwrap();
    let err = store.read_stream(&s, ReadStream::forward()).await.unwrap_err();
    assert!(matches!(err, Error::StreamNotFound { .. }), "{err:?}");
    // $all still holds the events until scavenged.
    assert_eq!(store.read_all(ReadAll::forward(10)).await.unwrap().events.len(), 3);
}

pub async fn soft_deleted_stream_recreated_continues_versions<S: TestStore>(store: S) {
    let s = seeded(&store, "soft-1", 3).await;
    store.delete_stream(&s, ExpectedVersion::Exact(2), DeleteMode::Soft).await.unwrap();
    let err = store.append(&s, ExpectedVersion::Exact(2), events("E", 1)).await.unwrap_err();
    assert!(matches!(err, Error::WrongExpectedVersion { actual: None, .. }), "{err:?}");
    let r = store.append(&s, ExpectedVersion::NoStream, events("Again", 2)).await.unwrap();
    assert_eq!(r.next_version, 5);
    let read = store.read_stream(&s, ReadStream::forward()).await.unwrap();
    assert_eq!(read.iter().map(|e| e.version).collect::<Vec<_>>(), vec![3, 4]);
    assert!(read.iter().all(|e| e.event_type == "Again"));
    let back = store.read_stream(&s, ReadStream::backward()).await.unwrap();
    assert_eq!(back.iter().map(|e| e.version).collect::<Vec<_>>(), vec![4, 3]);
    let early = store.read_stream(&s, ReadStream::forward().from_version(0)).await.unwrap();
    assert_eq!(early.first().map(|e| e.version), Some(3));
}

pub async fn soft_delete_checks_expected_version<S: TestStore>(store: S) {
    let s = seeded(&store, "soft-1", 3).await;
    let err = store.delete_stream(&s, ExpectedVersion::Exact(0), DeleteMode::Soft).await.unwrap_err();
    assert!(matches!(err, Error::WrongExpectedVersion { actual: Some(2), .. }), "{err:?}");
    assert!(store.stream_info(&s).await.unwrap().exists);
}

pub async fn soft_delete_of_missing_stream_is_not_found<S: TestStore>(store: S) {
    let err =
        store.delete_stream(&stream("nope-1"), ExpectedVersion::Any, DeleteMode::Soft).await.unwrap_err();
    assert!(matches!(err, Error::StreamNotFound { .. }), "{err:?}");
}

pub async fn tombstone_rejects_appends_forever<S: TestStore>(store: S) {
    let s = seeded(&store, "hard-1", 2).await;
    store.delete_stream(&s, ExpectedVersion::Any, DeleteMode::Hard).await.unwrap();
    for expected in [ExpectedVersion::Any, ExpectedVersion::NoStream, ExpectedVersion::Exact(1)] {
        let err = store.append(&s, expected, events("E", 1)).await.unwrap_err();
        assert!(matches!(err, Error::StreamDeleted { .. }), "{err:?}");
    }
    let err = store.delete_stream(&s, ExpectedVersion::Any, DeleteMode::Hard).await.unwrap_err();
    assert!(matches!(err, Error::StreamDeleted { .. }), "{err:?}");
    let err = store.delete_stream(&s, ExpectedVersion::Any, DeleteMode::Soft).await.unwrap_err();
    assert!(matches!(err, Error::StreamDeleted { .. }), "{err:?}");
}

/// The rules' order (tombstone, idempotency, expected version) holds
/// for re-sends too: a tombstone refuses even the exact re-send of the
/// stream's last events; after a soft delete the re-send of the hidden
/// last events is answered as written, and writes nothing.
pub async fn resends_after_deletes_follow_the_rules_order<S: TestStore>(store: S) {
    let batch = events("E", 2);
    let soft = stream("resend-soft-1");
    let first = store.append(&soft, ExpectedVersion::NoStream, batch.clone()).await.unwrap();
    store.delete_stream(&soft, ExpectedVersion::Exact(1), DeleteMode::Soft).await.unwrap();
    let again = store.append(&soft, ExpectedVersion::NoStream, batch.clone()).await.unwrap();
    assert_eq!(again, first);
    assert_eq!(store.next_position().await.unwrap(), 2);
    assert!(matches!(
        store.read_stream(&soft, ReadStream::forward()).await,
        Err(Error::StreamNotFound { .. })
    ));

    let hard = stream("resend-hard-1");
    let batch = events("E", 2);
    store.append(&hard, ExpectedVersion::NoStream, batch.clone()).await.unwrap();
    store.delete_stream(&hard, ExpectedVersion::Exact(1), DeleteMode::Hard).await.unwrap();
    let err = store.append(&hard, ExpectedVersion::NoStream, batch).await.unwrap_err();
    assert!(matches!(err, Error::StreamDeleted { .. }), "{err:?}");
    assert_eq!(store.next_position().await.unwrap(), 4);
}

/// `list_streams` reports deleted streams with their state; a tombstone
/// on a name never written has no events, so it is not listed, but
/// `stream_info` knows it.
pub async fn list_streams_reports_deletion_states<S: TestStore>(store: S) {
    let live = seeded(&store, "del-live", 1).await;
    let soft = seeded(&store, "del-soft", 2).await;
    let hard = seeded(&store, "del-hard", 1).await;
    let never = stream("del-never");
    store.delete_stream(&soft, ExpectedVersion::Any, DeleteMode::Soft).await.unwrap();
    store.delete_stream(&hard, ExpectedVersion::Any, DeleteMode::Hard).await.unwrap();
    store.delete_stream(&never, ExpectedVersion::NoStream, DeleteMode::Hard).await.unwrap();
    let listed = store.list_streams(ListStreams::new(10).prefix("del-")).await.unwrap();
    let states: Vec<_> = listed
        .iter()
        .map(|i| (i.stream.as_str().to_owned(), i.exists, i.deletion, i.last_version, i.truncate_before))
        .collect();
    assert_eq!(
        states,
        vec![
            ("del-hard".to_owned(), false, DeletionState::Tombstoned, Some(0), 0),
            ("del-live".to_owned(), true, DeletionState::Live, Some(0), 0),
            ("del-soft".to_owned(), false, DeletionState::Deleted, Some(1), 2),
        ]
    );
    for info in &listed {
        assert_eq!(info, &store.stream_info(&info.stream).await.unwrap());
    }
    let info = store.stream_info(&never).await.unwrap();
    assert_eq!((info.exists, info.deletion, info.last_version), (false, DeletionState::Tombstoned, None));
    assert!(store.stream_info(&live).await.unwrap().exists);
}

pub async fn tombstoned_stream_reads_as_deleted<S: TestStore>(store: S) {
    let s = seeded(&store, "hard-1", 2).await;
    store.delete_stream(&s, ExpectedVersion::Exact(1), DeleteMode::Hard).await.unwrap();
    let err = store.read_stream(&s, ReadStream::forward()).await.unwrap_err();
    assert!(matches!(err, Error::StreamDeleted { .. }), "{err:?}");
}

pub async fn tombstone_of_missing_stream_blocks_creation<S: TestStore>(store: S) {
    let s = stream("never-1");
    store.delete_stream(&s, ExpectedVersion::NoStream, DeleteMode::Hard).await.unwrap();
    let err = store.append(&s, ExpectedVersion::NoStream, events("E", 1)).await.unwrap_err();
    assert!(matches!(err, Error::StreamDeleted { .. }), "{err:?}");
}

// ------------------------------------------------------ multi-stream append

pub async fn multi_append_is_atomic_on_conflict<S: TestStore>(store: S) {
    let a = seeded(&store, "acc-a", 1).await;
    let b = stream("acc-b");
    let err = store
        .append_multi(vec![
            StreamAppend::new(a.clone(), ExpectedVersion::Exact(0), events("Debited", 1)),
            StreamAppend::new(b.clone(), ExpectedVersion::StreamExists, events("Credited", 1)),
        ])
        .await
        .unwrap_err();
    match err {
        Error::WrongExpectedVersion { stream, actual, .. } => {
            assert_eq!(stream, b);
            assert_eq!(actual, None);
        }
        other => panic!("expected WrongExpectedVersion, got {other:?}"),
    }
    assert_eq!(read_versions(&store, &a).await, vec![0]);
    assert!(!store.stream_info(&b).await.unwrap().exists);
    assert_eq!(store.next_position().await.unwrap(), 1);
}

pub async fn multi_append_positions_are_consecutive<S: TestStore>(store: S) {
    seeded(&store, "pre-1", 1).await;
    let results = store
        .append_multi(vec![
            StreamAppend::new(stream("acc-a"), ExpectedVersion::NoStream, events("Debited", 2)),
            StreamAppend::new(stream("acc-b"), ExpectedVersion::NoStream, events("Credited", 1)),
        ])
        .await
        .unwrap();
    assert_eq!(results[0].next_version, 2);
    assert_eq!(results[0].position, 2);
    assert_eq!(results[1].next_version, 1);
    assert_eq!(results[1].position, 3);
    let all = store.read_all(ReadAll::forward(10)).await.unwrap().events;
    let order: Vec<_> = all.iter().map(|e| (e.stream.to_string(), e.version, e.position)).collect();
    assert_eq!(
        order,
        vec![("pre-1".into(), 0, 0), ("acc-a".into(), 0, 1), ("acc-a".into(), 1, 2), ("acc-b".into(), 0, 3)]
    );
    // One commit: one timestamp.
    assert_eq!(all[1].recorded_at, all[3].recorded_at);
}

pub async fn multi_append_rejects_repeated_stream<S: TestStore>(store: S) {
    let err = store
        .append_multi(vec![
            StreamAppend::new(stream("acc-a"), ExpectedVersion::Any, events("E", 1)),
            StreamAppend::new(stream("acc-a"), ExpectedVersion::Any, events("E", 1)),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
    let err = store.append_multi(vec![]).await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
    assert_eq!(store.next_position().await.unwrap(), 0);
}

pub async fn multi_append_idempotent_resend<S: TestStore>(store: S) {
    let parts = vec![
        StreamAppend::new(stream("acc-a"), ExpectedVersion::NoStream, events("Debited", 1)),
        StreamAppend::new(stream("acc-b"), ExpectedVersion::NoStream, events("Credited", 1)),
    ];
    let first = store.append_multi(parts.clone()).await.unwrap();
    let again = store.append_multi(parts).await.unwrap();
    assert_eq!(first, again);
    assert_eq!(store.next_position().await.unwrap(), 2);
}

// ------------------------------------------------------- limits, payloads

pub async fn event_size_limit_is_enforced<S: TestStore>(store: S) {
    let too_big = binary("Big", vec![7u8; 1024 * 1024 + 1]);
    let err = store.append(&stream("big-1"), ExpectedVersion::Any, vec![too_big]).await.unwrap_err();
    match err {
        Error::LimitExceeded { what, max, actual } => {
            assert_eq!(what, LimitKind::EventSize);
            assert_eq!(max, 1024 * 1024);
            assert_eq!(actual, 1024 * 1024 + 1);
        }
        other => panic!("expected LimitExceeded, got {other:?}"),
    }
    let big_meta = event("E", 0).with_metadata(meta(json!({ "pad": "x".repeat(70 * 1024) })));
    let err = store.append(&stream("big-1"), ExpectedVersion::Any, vec![big_meta]).await.unwrap_err();
    assert!(matches!(err, Error::LimitExceeded { what: LimitKind::MetadataSize, .. }), "{err:?}");
    assert_eq!(store.next_position().await.unwrap(), 0);
}

pub async fn append_size_limit_is_enforced<S: TestStore>(store: S) {
    const MIB: usize = 1024 * 1024;
    let max = annals_core::Limits::default().max_append_size;
    assert_eq!(max, 64 * MIB);
    // One byte over, counting data and metadata ("{}" per event).
    let mut over: Vec<EventData> = (0..63).map(|i| binary("Big", vec![i as u8; MIB])).collect();
    let sized = |events: &[EventData]| events.iter().map(|e| e.data.len() + e.metadata.len()).sum::<usize>();
    over.push(binary("Big", vec![1u8; max - sized(&over) - 2 + 1]));
    let actual = sized(&over);
    assert_eq!(actual, max + 1);
    let err = store.append(&stream("size-1"), ExpectedVersion::Any, over).await.unwrap_err();
    assert!(
        matches!(err, Error::LimitExceeded { what: LimitKind::AppendSize, max: m, actual: a }
            if m == max as u64 && a == actual as u64),
        "{err:?}"
    );
    // Summed over the streams of a multi-stream append.
    let half = |name: &str| {
        StreamAppend::new(
            stream(name),
            ExpectedVersion::Any,
            (0..33).map(|i| binary("Big", vec![i; MIB])).collect(),
        )
    };
    let err = store.append_multi(vec![half("size-2"), half("size-3")]).await.unwrap_err();
    assert!(matches!(err, Error::LimitExceeded { what: LimitKind::AppendSize, .. }), "{err:?}");
    assert_eq!(store.next_position().await.unwrap(), 0);
}

pub async fn events_per_append_limit_is_enforced<S: TestStore>(store: S) {
    let err = store.append(&stream("many-1"), ExpectedVersion::Any, events("E", 10_001)).await.unwrap_err();
    assert!(
        matches!(err, Error::LimitExceeded { what: LimitKind::EventsPerAppend, max: 10_000, actual: 10_001 }),
        "{err:?}"
    );
    let r = store.append(&stream("many-1"), ExpectedVersion::Any, events("E", 10_000)).await.unwrap();
    assert_eq!(r.next_version, 10_000);
}

pub async fn invalid_json_data_is_rejected<S: TestStore>(store: S) {
    let bad = EventData::raw("E", b"{\"a\":".to_vec(), ContentType::Json);
    let err = store.append(&stream("j-1"), ExpectedVersion::Any, vec![bad]).await.unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
    // JSON is UTF-8 (RFC 8259): a string holding other bytes is not JSON,
    // even where a skimming parser would pass over it.
    for bytes in [&b"\"\xff\xfe\""[..], b"{\"a\":\"caf\xe9\"}", b"[\"\xc3\"]"] {
        let bad = EventData::raw("E", bytes.to_vec(), ContentType::Json);
        let err = store.append(&stream("j-1"), ExpectedVersion::Any, vec![bad]).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{bytes:?}: {err:?}");
    }
    assert!(matches!(
        store.read_stream(&stream("j-1"), ReadStream::forward()).await,
        Err(Error::StreamNotFound { .. })
    ));
    // The same bytes are fine as binary.
    let ok = EventData::raw("E", b"{\"a\":".to_vec(), ContentType::Binary);
    store.append(&stream("j-1"), ExpectedVersion::Any, vec![ok]).await.unwrap();
    let ok = EventData::raw("E", b"\"\xff\xfe\"".to_vec(), ContentType::Binary);
    store.append(&stream("j-1"), ExpectedVersion::Any, vec![ok]).await.unwrap();
}

pub async fn invalid_event_type_is_rejected<S: TestStore>(store: S) {
    for bad in [String::new(), "x".repeat(257), "new\nline".into()] {
        let e = EventData::raw(bad.clone(), b"{}".to_vec(), ContentType::Json);
        let err = store.append(&stream("t-1"), ExpectedVersion::Any, vec![e]).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{bad:?}: {err:?}");
    }
    let e = EventData::raw("x".repeat(256), b"{}".to_vec(), ContentType::Json);
    store.append(&stream("t-1"), ExpectedVersion::Any, vec![e]).await.unwrap();
}

pub async fn invalid_correlation_id_is_rejected<S: TestStore>(store: S) {
    let s = stream("corr-1");
    let long = "c".repeat(annals_core::MAX_CORRELATION_ID_LEN + 1);
    for bad in ["a\u{0}b", "tab\there", long.as_str()] {
        let e = with_correlation(event("E", 0), bad);
        let err = store.append(&s, ExpectedVersion::Any, vec![event("E", 1), e]).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{bad:?}: {err:?}");
    }
    assert!(matches!(store.read_stream(&s, ReadStream::forward()).await, Err(Error::StreamNotFound { .. })));
    // The longest accepted id, made of varied characters (a run of one
    // character would compress into any index), is stored and found.
    let longest: String = (0..annals_core::MAX_CORRELATION_ID_LEN / 32)
        .map(|i| {
            format!("{:032x}", u128::from(i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c834))
        })
        .collect();
    assert_eq!(longest.len(), annals_core::MAX_CORRELATION_ID_LEN);
    store
        .append(&s, ExpectedVersion::NoStream, vec![with_correlation(event("E", 2), &longest)])
        .await
        .unwrap();
    // Non-string values are not correlation ids, so not checked.
    let numeric = event("E", 3).with_metadata(meta(json!({ "correlation_id": 42 })));
    store.append(&s, ExpectedVersion::Exact(0), vec![numeric]).await.unwrap();
    let got = filter_positions(&store, Filter::correlation_id(longest)).await;
    assert_eq!(got, vec![("corr-1".into(), "E".into())]);
}

pub async fn filters_with_control_characters_are_rejected<S: TestStore>(store: S) {
    seeded(&store, "ctl-1", 2).await;
    let bad = [
        Filter::stream_prefix("ctl\u{0}"),
        Filter::category("ctl\u{7}"),
        Filter::event_type("E\u{0}"),
        Filter::event_type_prefix("\u{1b}"),
        Filter::correlation_id("c\u{0}1"),
        // An empty id counts as none (not indexed), so it cannot be asked for.
        Filter::correlation_id(""),
    ];
    for filter in bad {
        let err = store.read_all(ReadAll::forward(10).filter(filter.clone())).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{filter:?}: {err:?}");
        let err = store.read_all(ReadAll::backward(10).filter(filter.clone())).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{filter:?}: {err:?}");
        // A subscription with it ends with the same error.
        let mut sub = store.subscribe(SubscriptionRequest::all(filter.clone(), SubscribeFrom::Start));
        match tokio::time::timeout(PATIENCE, sub.next()).await {
            Ok(Some(Err(Error::InvalidInput { .. }))) => {}
            other => panic!("{filter:?}: subscription gave {other:?}"),
        }
    }
    for list in [ListStreams::new(10).prefix("c\u{0}"), ListStreams::new(10).after("ctl\n")] {
        let err = store.list_streams(list.clone()).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{list:?}: {err:?}");
    }
    // Unicode is fine, and the store still answers.
    assert!(filter_positions(&store, Filter::stream_prefix("ctl-\u{e9}")).await.is_empty());
    assert_eq!(filter_positions(&store, Filter::stream_prefix("ctl-")).await.len(), 2);
}

pub async fn numbers_beyond_the_stored_range_are_refused_not_clamped<S: TestStore>(store: S) {
    let s = seeded(&store, "n-1", 2).await;
    let top = annals_core::MAX_STORED_NUMBER;
    store.save_checkpoint("n", 7).await.unwrap();
    for bad in [top + 1, u64::MAX] {
        let err = store.save_checkpoint("n", bad).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{bad}: {err:?}");
        assert_eq!(store.load_checkpoint("n").await.unwrap(), Some(7));
        let snapshot = Snapshot {
            stream: s.clone(),
            version: bad,
            schema_version: 1,
            data: Bytes::from_static(b"{}"),
            created_at: Timestamp::now(),
        };
        let err = store.save_snapshot(snapshot).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{bad}: {err:?}");
        assert!(store.load_snapshot(&s, None).await.unwrap().is_none());
        // As read positions and expectations they are merely past the end.
        let page = store.read_all(ReadAll::forward(10).from_position(bad)).await.unwrap();
        assert!(page.events.is_empty());
        let page = store.read_all(ReadAll::backward(10).from_position(bad)).await.unwrap();
        assert_eq!(page.events.len(), 2);
        assert!(store.read_stream(&s, ReadStream::forward().from_version(bad)).await.unwrap().is_empty());
        assert_eq!(read_versions_backward_from(&store, &s, bad).await, vec![1, 0]);
        let err = store.append(&s, ExpectedVersion::Exact(bad), events("E", 1)).await.unwrap_err();
        assert!(matches!(err, Error::WrongExpectedVersion { actual: Some(1), .. }), "{bad}: {err:?}");
    }
    // The largest kept number is kept exactly.
    store.save_checkpoint("n", top).await.unwrap();
    assert_eq!(store.load_checkpoint("n").await.unwrap(), Some(top));
    let snapshot = Snapshot {
        stream: s.clone(),
        version: top,
        schema_version: u32::MAX,
        data: Bytes::from_static(b"{}"),
        created_at: Timestamp::now(),
    };
    store.save_snapshot(snapshot).await.unwrap();
    let got = store.load_snapshot(&s, None).await.unwrap().unwrap();
    assert_eq!((got.version, got.schema_version), (top, u32::MAX));
}

async fn read_versions_backward_from<S: TestStore>(store: &S, s: &StreamName, from: u64) -> Vec<u64> {
    let events = store.read_stream(s, ReadStream::backward().from_version(from)).await.unwrap();
    events.iter().map(|e| e.version).collect()
}

pub async fn metadata_round_trips<S: TestStore>(store: S) {
    let m = meta(json!({
        "correlation_id": "c-9", "causation_id": "cmd-1", "actor": "ada", "schema_version": 2,
        "nested": { "list": [1, 2, 3] }
    }));
    let e = event("E", 0).with_metadata(m.clone());
    let id = e.id;
    store.append(&stream("m-1"), ExpectedVersion::Any, vec![e]).await.unwrap();
    let read = store.read_stream(&stream("m-1"), ReadStream::forward()).await.unwrap();
    assert_eq!(read[0].id, id);
    assert_eq!(read[0].metadata.to_map(), m.to_map());
    assert_eq!(read[0].metadata.schema_version(), Some(2));
    assert_eq!(read[0].metadata.causation_id().as_deref(), Some("cmd-1"));
}

pub async fn unicode_round_trips<S: TestStore>(store: S) {
    let s = stream("コーヒー-☕-ñ");
    let payload = json!({ "text": "Grüße, 世界 🌍", "rtl": "مرحبا" });
    let e = EventData::json("Événement→", &payload).unwrap();
    store.append(&s, ExpectedVersion::NoStream, vec![e]).await.unwrap();
    let read = store.read_stream(&s, ReadStream::forward()).await.unwrap();
    assert_eq!(read[0].event_type, "Événement→");
    assert_eq!(read[0].decode::<serde_json::Value>().unwrap(), payload);
    assert_eq!(read[0].category(), "コーヒー");
    let by_cat = store.read_all(ReadAll::forward(10).filter(Filter::category("コーヒー"))).await.unwrap();
    assert_eq!(by_cat.events.len(), 1);
}

pub async fn one_mib_payload_round_trips<S: TestStore>(store: S) {
    let bytes: Vec<u8> = (0..1024 * 1024).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let e = binary("Blob", bytes.clone());
    store.append(&stream("blob-1"), ExpectedVersion::Any, vec![e]).await.unwrap();
    let text = json!({ "s": "é".repeat(200_000) });
    let e = EventData::json("Text", &text).unwrap();
    assert!(e.data.len() > 400_000);
    store.append(&stream("blob-1"), ExpectedVersion::Any, vec![e]).await.unwrap();
    let read = store.read_stream(&stream("blob-1"), ReadStream::forward()).await.unwrap();
    assert_eq!(read[0].data.as_ref(), bytes.as_slice());
    assert_eq!(read[1].decode::<serde_json::Value>().unwrap(), text);
}

pub async fn binary_content_type_round_trips<S: TestStore>(store: S) {
    let e = binary("Bin", vec![0, 159, 146, 150, 255]);
    store.append(&stream("bin-1"), ExpectedVersion::Any, vec![e]).await.unwrap();
    let read = store.read_stream(&stream("bin-1"), ReadStream::forward()).await.unwrap();
    assert_eq!(read[0].content_type, ContentType::Binary);
    assert_eq!(read[0].data.as_ref(), &[0, 159, 146, 150, 255]);
}

pub async fn recorded_at_is_now_and_ordered<S: TestStore>(store: S) {
    let before = Timestamp::now();
    for i in 0..5 {
        seeded(&store, &format!("ts-{i}"), 1).await;
    }
    let after = Timestamp::now();
    let all = store.read_all(ReadAll::forward(10)).await.unwrap().events;
    assert!(all.iter().all(|e| e.recorded_at >= before && e.recorded_at <= after));
    assert!(all.windows(2).all(|w| w[0].recorded_at <= w[1].recorded_at));
}

pub async fn next_position_counts_events<S: TestStore>(store: S) {
    assert_eq!(store.next_position().await.unwrap(), 0);
    seeded(&store, "n-1", 4).await;
    assert_eq!(store.next_position().await.unwrap(), 4);
}

/// Counts by type of a full `$all` scan with system streams: what
/// `/stats` computed before backends could answer natively.
async fn scanned_type_counts<S: TestStore>(store: &S) -> BTreeMap<String, u64> {
    let head = store.next_position().await.unwrap();
    let mut counts = BTreeMap::new();
    let mut from = 0;
    while from < head {
        let page = store
            .read_all(ReadAll::forward(7).from_position(from).filter(Filter::all().with_system()))
            .await
            .unwrap();
        for e in &page.events {
            *counts.entry(e.event_type.clone()).or_default() += 1;
        }
        let next = page.next.unwrap();
        assert!(next > from, "a forward page must move on");
        from = next;
    }
    counts
}

pub async fn store_stats_agree_with_a_full_scan_of_all<S: TestStore>(store: S) {
    // Empty store: no types (or nothing known).
    let empty = store.store_stats().await.unwrap();
    if let Some(counts) = &empty.events_by_type {
        assert!(counts.is_empty(), "{counts:?}");
    }
    let sys = StreamName::system("$stats-sys").unwrap();
    store.append(&sys, ExpectedVersion::Any, events("Sys", 2)).await.unwrap();
    store.append(&stream("stats-live"), ExpectedVersion::Any, events("A", 3)).await.unwrap();
    store.append(&stream("stats-soft"), ExpectedVersion::Any, events("A", 2)).await.unwrap();
    store.append(&stream("stats-soft"), ExpectedVersion::Any, events("B", 1)).await.unwrap();
    store.append(&stream("stats-hard"), ExpectedVersion::Any, events("C", 4)).await.unwrap();
    store
        .append_multi(vec![
            StreamAppend::new(stream("stats-tx-1"), ExpectedVersion::Any, events("B", 1)),
            StreamAppend::new(stream("stats-tx-2"), ExpectedVersion::Any, events("D", 2)),
        ])
        .await
        .unwrap();
    let check = |stats: annals_core::StoreStats, scanned: &BTreeMap<String, u64>, head: u64| {
        if let Some(counts) = stats.events_by_type {
            assert_eq!(&counts, scanned, "native counts differ from a scan of $all");
            assert_eq!(counts.values().sum::<u64>(), head, "counts must add up to next_position");
        }
    };
    let before = scanned_type_counts(&store).await;
    let expected: BTreeMap<String, u64> = [("A", 5), ("B", 2), ("C", 4), ("D", 2), ("Sys", 2)]
        .into_iter()
        .map(|(t, n)| (t.to_owned(), n))
        .collect();
    assert_eq!(before, expected);
    check(store.store_stats().await.unwrap(), &before, 15);

    // Deletes hide events from stream reads; whatever `$all` still shows,
    // the native counts must show too.
    store.delete_stream(&stream("stats-soft"), ExpectedVersion::Any, DeleteMode::Soft).await.unwrap();
    store.delete_stream(&stream("stats-hard"), ExpectedVersion::Any, DeleteMode::Hard).await.unwrap();
    store.delete_stream(&stream("stats-never"), ExpectedVersion::Any, DeleteMode::Hard).await.unwrap();
    let after = scanned_type_counts(&store).await;
    let head = store.next_position().await.unwrap();
    check(store.store_stats().await.unwrap(), &after, head);

    // A soft-deleted stream written again: its new events count too.
    store.append(&stream("stats-soft"), ExpectedVersion::NoStream, events("E", 1)).await.unwrap();
    let recreated = scanned_type_counts(&store).await;
    let head = store.next_position().await.unwrap();
    assert_eq!(recreated.get("E"), Some(&1));
    let stats = store.store_stats().await.unwrap();
    if let Some(bytes) = stats.disk_bytes {
        assert!(bytes > 0, "a store holding events takes some space");
    }
    check(stats, &recreated, head);
}

// ------------------------------------------------------------ concurrency

pub async fn concurrent_exact_appends_have_one_winner_per_version<S: TestStore>(store: S) {
    let s = stream("race-1");
    store.append(&s, ExpectedVersion::NoStream, events("Init", 1)).await.unwrap();
    // 16 writers, each trying to extend the stream 10 times with Exact.
    let mut tasks = Vec::new();
    for w in 0..16u64 {
        let store = store.clone();
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut wins = Vec::new();
            let mut conflicts = 0u32;
            while wins.len() < 10 {
                let last = store.stream_info(&s).await.unwrap().last_version.unwrap();
                match store.append(&s, ExpectedVersion::Exact(last), vec![event("W", w)]).await {
                    Ok(r) => {
                        assert_eq!(r.next_version, last + 2);
                        wins.push(last + 1);
                    }
                    Err(Error::WrongExpectedVersion { actual, .. }) => {
                        let actual = actual.expect("stream exists");
                        assert!(actual > last, "actual {actual} must be newer than the stale {last}");
                        conflicts += 1;
                    }
                    Err(other) => panic!("unexpected error {other:?}"),
                }
            }
            (wins, conflicts)
        }));
    }
    let mut all_wins = Vec::new();
    for t in tasks {
        let (wins, _) = t.await.unwrap();
        all_wins.extend(wins);
    }
    all_wins.sort_unstable();
    assert_eq!(all_wins, (1..=160).collect::<Vec<_>>(), "each version won exactly once");
    assert_eq!(read_versions(&store, &s).await, (0..=160).collect::<Vec<_>>());
}

pub async fn concurrent_appends_to_different_streams_are_gapless<S: TestStore>(store: S) {
    let mut tasks = Vec::new();
    for w in 0..16u64 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let s = stream(&format!("par-{w}"));
            for i in 0..20u64 {
                store.append(&s, ExpectedVersion::Any, events("E", 1 + i % 3)).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let all = store.read_all(ReadAll::forward(usize::MAX)).await.unwrap().events;
    let per_writer: u64 = (0..20u64).map(|i| 1 + i % 3).sum();
    assert_eq!(all.len() as u64, 16 * per_writer);
    assert!(all.iter().enumerate().all(|(i, e)| e.position == i as u64), "positions gapless");
    for w in 0..16 {
        let versions = read_versions(&store, &stream(&format!("par-{w}"))).await;
        assert_eq!(versions, (0..per_writer).collect::<Vec<_>>());
    }
}

// ---------------------------------------------------------- subscriptions

pub async fn subscribe_all_delivers_history_then_live<S: TestStore>(store: S) {
    seeded(&store, "h-1", 3).await;
    let mut sub = store.subscribe(SubscriptionRequest::all(Filter::all(), SubscribeFrom::Start));
    let history = take(&mut sub, 3).await;
    assert_eq!(history.iter().map(|e| e.position).collect::<Vec<_>>(), vec![0, 1, 2]);
    seeded(&store, "h-2", 2).await;
    let live = take(&mut sub, 2).await;
    assert_eq!(live.iter().map(|e| e.position).collect::<Vec<_>>(), vec![3, 4]);
    assert_quiet(&mut sub).await;
}

pub async fn subscribe_all_during_concurrent_appends_sees_each_event_once_in_order<S: TestStore>(store: S) {
    let early = store.subscribe(SubscriptionRequest::all(Filter::all(), SubscribeFrom::Start));
    let writers: Vec<_> = (0..16u64)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..25u64 {
                    let s = stream(&format!("sub-{w}"));
                    store.append(&s, ExpectedVersion::Any, events("E", 1 + i % 2)).await.unwrap();
                    if i % 5 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let late = store.subscribe(SubscriptionRequest::all(Filter::all(), SubscribeFrom::Start));
    let per_writer: u64 = (0..25u64).map(|i| 1 + i % 2).sum();
    let total = (16 * per_writer) as usize;
    let check = |mut sub: annals_core::EventStream| {
        tokio::spawn(async move {
            let got = take(&mut sub, total).await;
            assert!(
                got.iter().enumerate().all(|(i, e)| e.position == i as u64),
                "in order, no gaps, no dups"
            );
            let ids: HashSet<_> = got.iter().map(|e| e.id).collect();
            assert_eq!(ids.len(), total);
            assert_quiet(&mut sub).await;
        })
    };
    let (a, b) = (check(early), check(late));
    for w in writers {
        w.await.unwrap();
    }
    a.await.unwrap();
    b.await.unwrap();
}

pub async fn subscribe_stream_from_start<S: TestStore>(store: S) {
    let s = seeded(&store, "one-1", 2).await;
    seeded(&store, "other-1", 2).await;
    let mut sub = store.subscribe(SubscriptionRequest::stream(s.clone(), SubscribeFrom::Start));
    let got = take(&mut sub, 2).await;
    assert!(got.iter().all(|e| e.stream == s));
    store.append(&s, ExpectedVersion::Exact(1), events("E", 1)).await.unwrap();
    seeded(&store, "other-1", 1).await;
    let got = take(&mut sub, 1).await;
    assert_eq!((got[0].stream.clone(), got[0].version), (s, 2));
    assert_quiet(&mut sub).await;
}

pub async fn subscribe_stream_after_version<S: TestStore>(store: S) {
    let s = seeded(&store, "one-1", 5).await;
    let mut sub = store.subscribe(SubscriptionRequest::stream(s, SubscribeFrom::After(2)));
    let got = take(&mut sub, 2).await;
    assert_eq!(got.iter().map(|e| e.version).collect::<Vec<_>>(), vec![3, 4]);
    let mut sub = store.subscribe(SubscriptionRequest::all(Filter::all(), SubscribeFrom::After(3)));
    let got = take(&mut sub, 1).await;
    assert_eq!(got[0].position, 4);
}

pub async fn subscribe_from_end_sees_only_new_events<S: TestStore>(store: S) {
    let s = seeded(&store, "end-1", 3).await;
    let mut all = store.subscribe(SubscriptionRequest::all(Filter::all(), SubscribeFrom::End));
    let mut one = store.subscribe(SubscriptionRequest::stream(s.clone(), SubscribeFrom::End));
    // Appended after subscribe() but before the first poll: still "new".
    store.append(&s, ExpectedVersion::Any, events("New", 2)).await.unwrap();
    let got = take(&mut all, 2).await;
    assert_eq!(got.iter().map(|e| e.position).collect::<Vec<_>>(), vec![3, 4]);
    let got = take(&mut one, 2).await;
    assert_eq!(got.iter().map(|e| e.version).collect::<Vec<_>>(), vec![3, 4]);
    assert_quiet(&mut one).await;
}

/// Appends that finish out of order must not leave the store's published
/// head behind its log: a subscription from `End` taken once every append
/// has returned starts after all of them, never with an acknowledged one.
pub async fn subscribe_from_end_after_concurrent_appends_sees_none_of_them<S: TestStore>(store: S) {
    for round in 0..150u64 {
        let writers: Vec<_> = (0..8u64)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    let s = stream(&format!("race-end-{w}"));
                    store.append(&s, ExpectedVersion::Any, events("Before", 1)).await.unwrap();
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        let mut all = store.subscribe(SubscriptionRequest::all(Filter::all(), SubscribeFrom::End));
        let marker = stream(&format!("race-marker-{round}"));
        store.append(&marker, ExpectedVersion::NoStream, events("After", 1)).await.unwrap();
        let got = take(&mut all, 1).await;
        assert_eq!(
            (got[0].stream.clone(), got[0].event_type.as_str()),
            (marker, "After"),
            "round {round}: a subscription from the end delivered an event acknowledged before it started"
        );
    }
}

pub async fn subscribe_all_with_filter<S: TestStore>(store: S) {
    let mut sub =
        store.subscribe(SubscriptionRequest::all(Filter::category("account"), SubscribeFrom::Start));
    seed_mixed(&store).await;
    for i in 0..600 {
        // Many non-matching events between matches must not stall the filter.
        seeded(&store, &format!("noise-{}", i % 7), 1).await;
    }
    store.append(&stream("account-3"), ExpectedVersion::Any, vec![event("AccountOpened", 3)]).await.unwrap();
    let got = take(&mut sub, 3).await;
    let names: Vec<_> = got.iter().map(|e| e.stream.to_string()).collect();
    assert_eq!(names, vec!["account-1", "account-2", "account-3"]);
    assert_quiet(&mut sub).await;
}

pub async fn subscribe_to_missing_stream_waits_for_it<S: TestStore>(store: S) {
    let s = stream("later-1");
    let mut sub = store.subscribe(SubscriptionRequest::stream(s.clone(), SubscribeFrom::Start));
    assert_quiet(&mut sub).await;
    seeded(&store, "unrelated-1", 1).await;
    store.append(&s, ExpectedVersion::NoStream, events("Born", 1)).await.unwrap();
    let got = take(&mut sub, 1).await;
    assert_eq!(got[0].event_type, "Born");
}

pub async fn slow_subscriber_does_not_block_writers_or_lose_events<S: TestStore>(store: S) {
    let store = Arc::new(store);
    let mut sub = store.subscribe(SubscriptionRequest::all(Filter::all(), SubscribeFrom::Start));
    let first = take(&mut sub, 0).await;
    assert!(first.is_empty());
    // The subscriber does not poll while 5,000 events are written.
    let s = stream("flood-1");
    let write = async {
        for _ in 0..50 {
            store.append(&s, ExpectedVersion::Any, events("E", 100)).await.unwrap();
        }
    };
    tokio::time::timeout(PATIENCE, write).await.expect("writers must not wait for a subscriber");
    let got = take(&mut sub, 5000).await;
    assert!(got.iter().enumerate().all(|(i, e)| e.position == i as u64));
    assert_quiet(&mut sub).await;
}

pub async fn subscription_to_tombstoned_stream_ends_with_error<S: TestStore>(store: S) {
    let s = seeded(&store, "doomed-1", 1).await;
    let mut sub = store.subscribe(SubscriptionRequest::stream(s.clone(), SubscribeFrom::Start));
    take(&mut sub, 1).await;
    store.delete_stream(&s, ExpectedVersion::Any, DeleteMode::Hard).await.unwrap();
    seeded(&store, "wake-1", 1).await;
    match tokio::time::timeout(PATIENCE, sub.next()).await {
        Ok(Some(Err(Error::StreamDeleted { .. }))) => {}
        other => panic!("expected StreamDeleted, got {:?}", other.map(|o| o.map(|r| r.map(|e| e.version)))),
    }
    let end = tokio::time::timeout(PATIENCE, sub.next()).await.expect("ends promptly");
    assert!(end.is_none(), "the subscription ends after its error");
}

/// Nothing is appended after the tombstone: a caught-up subscriber, already
/// waiting for the next event, must not wait for some later commit to
/// learn that its stream is gone.
pub async fn subscription_learns_of_tombstone_without_a_later_append<S: TestStore>(store: S) {
    let s = seeded(&store, "doomed-2", 1).await;
    let mut sub = store.subscribe(SubscriptionRequest::stream(s.clone(), SubscribeFrom::Start));
    take(&mut sub, 1).await;
    let waiting = tokio::spawn(async move {
        let next = tokio::time::timeout(PATIENCE, sub.next()).await;
        next.map(|o| o.map(|r| r.map(|e| e.version)))
    });
    // Time to find nothing more and wait (were it still reading when the
    // stream is deleted, the read would see the tombstone anyway).
    tokio::time::sleep(Duration::from_millis(200)).await;
    store.delete_stream(&s, ExpectedVersion::Any, DeleteMode::Hard).await.unwrap();
    match waiting.await.unwrap() {
        Ok(Some(Err(Error::StreamDeleted { .. }))) => {}
        other => panic!("expected StreamDeleted, got {other:?}"),
    }
}

/// A stream subscription follows a stream through a soft delete and its
/// recreation: the hidden events are never delivered to a subscription
/// that starts afterwards, and a caught-up one goes on with the new
/// versions, each once.
pub async fn stream_subscriptions_follow_a_soft_delete_and_recreation<S: TestStore>(store: S) {
    let s = seeded(&store, "phoenix-1", 3).await;
    let mut live = store.subscribe(SubscriptionRequest::stream(s.clone(), SubscribeFrom::Start));
    assert_eq!(take(&mut live, 3).await.iter().map(|e| e.version).collect::<Vec<_>>(), vec![0, 1, 2]);
    store.delete_stream(&s, ExpectedVersion::Exact(2), DeleteMode::Soft).await.unwrap();
    let mut later = store.subscribe(SubscriptionRequest::stream(s.clone(), SubscribeFrom::Start));
    assert_quiet(&mut later).await;
    store.append(&s, ExpectedVersion::NoStream, events("Again", 2)).await.unwrap();
    for sub in [&mut live, &mut later] {
        let got = take(sub, 2).await;
        assert_eq!(
            got.iter().map(|e| (e.version, e.event_type.as_str())).collect::<Vec<_>>(),
            vec![(3, "Again"), (4, "Again")]
        );
        assert_quiet(sub).await;
    }
    let mut after = store.subscribe(SubscriptionRequest::stream(s.clone(), SubscribeFrom::After(0)));
    assert_eq!(take(&mut after, 2).await.iter().map(|e| e.version).collect::<Vec<_>>(), vec![3, 4]);
}

/// Starting points past everything ever written are merely in the future:
/// nothing is delivered and nothing fails, up to `u64::MAX`.
pub async fn subscriptions_after_the_largest_numbers_wait_quietly<S: TestStore>(store: S) {
    let s = seeded(&store, "far-1", 2).await;
    for from in [annals_core::MAX_STORED_NUMBER, u64::MAX - 1, u64::MAX] {
        let mut one = store.subscribe(SubscriptionRequest::stream(s.clone(), SubscribeFrom::After(from)));
        let mut all = store.subscribe(SubscriptionRequest::all(Filter::all(), SubscribeFrom::After(from)));
        assert_quiet(&mut one).await;
        assert_quiet(&mut all).await;
    }
    store.append(&s, ExpectedVersion::Exact(1), events("E", 1)).await.unwrap();
    let mut all = store.subscribe(SubscriptionRequest::all(Filter::all(), SubscribeFrom::After(1)));
    assert_eq!(take(&mut all, 1).await[0].position, 2);
}

/// Live `$all` subscriptions leave system streams out unless their filter
/// asks for them, as reads do, whether history or live.
pub async fn live_subscriptions_leave_system_streams_out_unless_asked<S: TestStore>(store: S) {
    let sys = StreamName::system("$sys-live").unwrap();
    store.append(&sys, ExpectedVersion::Any, events("Sys", 1)).await.unwrap();
    seeded(&store, "user-live-1", 1).await;
    let mut user = store.subscribe(SubscriptionRequest::all(Filter::all(), SubscribeFrom::Start));
    let mut with =
        store.subscribe(SubscriptionRequest::all(Filter::all().with_system(), SubscribeFrom::Start));
    let mut from_end = store.subscribe(SubscriptionRequest::all(Filter::all(), SubscribeFrom::End));
    assert_eq!(take(&mut user, 1).await[0].position, 1);
    assert_eq!(take(&mut with, 2).await.iter().map(|e| e.position).collect::<Vec<_>>(), vec![0, 1]);
    store.append(&sys, ExpectedVersion::Any, events("Sys", 1)).await.unwrap();
    seeded(&store, "user-live-2", 1).await;
    assert_eq!(take(&mut user, 1).await[0].position, 3);
    assert_eq!(take(&mut from_end, 1).await[0].position, 3);
    assert_eq!(take(&mut with, 2).await.iter().map(|e| e.position).collect::<Vec<_>>(), vec![2, 3]);
    assert_quiet(&mut user).await;
    assert_quiet(&mut from_end).await;
}

/// A subscription from the end of a soft-deleted stream waits, then
/// delivers the recreated stream's events; one from the end of a
/// tombstoned stream ends with its error.
pub async fn subscriptions_from_the_end_of_deleted_streams<S: TestStore>(store: S) {
    let soft = seeded(&store, "end-soft-1", 2).await;
    store.delete_stream(&soft, ExpectedVersion::Any, DeleteMode::Soft).await.unwrap();
    let mut sub = store.subscribe(SubscriptionRequest::stream(soft.clone(), SubscribeFrom::End));
    assert_quiet(&mut sub).await;
    store.append(&soft, ExpectedVersion::NoStream, events("Again", 1)).await.unwrap();
    let got = take(&mut sub, 1).await;
    assert_eq!((got[0].version, got[0].event_type.as_str()), (2, "Again"));
    for name in ["end-hard-1", "end-hard-never"] {
        let hard = stream(name);
        if name == "end-hard-1" {
            seeded(&store, name, 2).await;
        }
        store.delete_stream(&hard, ExpectedVersion::Any, DeleteMode::Hard).await.unwrap();
        let mut sub = store.subscribe(SubscriptionRequest::stream(hard, SubscribeFrom::End));
        match tokio::time::timeout(PATIENCE, sub.next()).await {
            Ok(Some(Err(Error::StreamDeleted { .. }))) => {}
            other => panic!(
                "{name}: expected StreamDeleted, got {:?}",
                other.map(|o| o.map(|r| r.map(|e| e.version)))
            ),
        }
    }
}

// ------------------------------------------------- snapshots, checkpoints

fn snapshot(s: &StreamName, version: u64, schema: u32) -> Snapshot {
    Snapshot {
        stream: s.clone(),
        version,
        schema_version: schema,
        data: serde_json::to_vec(&json!({ "balance": version.wrapping_mul(10) })).unwrap().into(),
        created_at: Timestamp::now(),
    }
}

pub async fn snapshots_load_latest_and_by_version<S: TestStore>(store: S) {
    let s = stream("snap-1");
    assert!(store.load_snapshot(&s, None).await.unwrap().is_none());
    for v in [10, 20, 30] {
        store.save_snapshot(snapshot(&s, v, 1)).await.unwrap();
    }
    assert_eq!(store.load_snapshot(&s, None).await.unwrap().unwrap().version, 30);
    assert_eq!(store.load_snapshot(&s, Some(25)).await.unwrap().unwrap().version, 20);
    assert_eq!(store.load_snapshot(&s, Some(20)).await.unwrap().unwrap().version, 20);
    assert!(store.load_snapshot(&s, Some(9)).await.unwrap().is_none());
    // Replacing a version keeps one snapshot for it.
    store.save_snapshot(snapshot(&s, 30, 2)).await.unwrap();
    let latest = store.load_snapshot(&s, None).await.unwrap().unwrap();
    assert_eq!(latest.schema_version, 2);
    assert_eq!(latest.data, snapshot(&s, 30, 2).data);
    assert!(store.load_snapshot(&stream("snap-2"), None).await.unwrap().is_none());
}

pub async fn snapshots_prune_keeps_newest<S: TestStore>(store: S) {
    let s = stream("snap-1");
    for v in 1..=5 {
        store.save_snapshot(snapshot(&s, v * 100, 1)).await.unwrap();
    }
    assert_eq!(store.prune_snapshots(&s, 2).await.unwrap(), 3);
    assert_eq!(store.load_snapshot(&s, Some(399)).await.unwrap(), None);
    assert_eq!(store.load_snapshot(&s, Some(400)).await.unwrap().unwrap().version, 400);
    assert_eq!(store.prune_snapshots(&s, 2).await.unwrap(), 0);
    assert_eq!(store.prune_snapshots(&stream("none-1"), 2).await.unwrap(), 0);
}

/// Bounds and counts at the far ends of their types are answers, not
/// failures: a snapshot lookup at or before any version, pruning that
/// keeps more than there are, or nothing at all.
pub async fn snapshot_bounds_at_the_extremes<S: TestStore>(store: S) {
    let s = stream("snap-x");
    for v in [0, 5, annals_core::MAX_STORED_NUMBER] {
        store.save_snapshot(snapshot(&s, v, 1)).await.unwrap();
    }
    for bound in [u64::MAX, annals_core::MAX_STORED_NUMBER + 1, annals_core::MAX_STORED_NUMBER] {
        let got = store.load_snapshot(&s, Some(bound)).await.unwrap().map(|s| s.version);
        assert_eq!(got, Some(annals_core::MAX_STORED_NUMBER), "at or before {bound}");
    }
    let got = store.load_snapshot(&s, Some(annals_core::MAX_STORED_NUMBER - 1)).await.unwrap();
    assert_eq!(got.map(|s| s.version), Some(5));
    assert_eq!(store.load_snapshot(&s, Some(0)).await.unwrap().map(|s| s.version), Some(0));
    assert_eq!(store.prune_snapshots(&s, usize::MAX).await.unwrap(), 0);
    assert_eq!(store.prune_snapshots(&s, 1).await.unwrap(), 2);
    assert_eq!(store.load_snapshot(&s, Some(5)).await.unwrap(), None);
    assert_eq!(store.prune_snapshots(&s, 0).await.unwrap(), 1);
    assert_eq!(store.load_snapshot(&s, None).await.unwrap(), None);
}

pub async fn checkpoints_round_trip<S: TestStore>(store: S) {
    assert_eq!(store.load_checkpoint("proj-balance").await.unwrap(), None);
    store.save_checkpoint("proj-balance", 41).await.unwrap();
    store.save_checkpoint("proj-balance", 42).await.unwrap();
    store.save_checkpoint("other", 7).await.unwrap();
    assert_eq!(store.load_checkpoint("proj-balance").await.unwrap(), Some(42));
    assert_eq!(store.load_checkpoint("other").await.unwrap(), Some(7));
    let too_long = "x".repeat(257);
    for bad in ["", "bad\nname", "nul\0", too_long.as_str()] {
        let err = store.save_checkpoint(bad, 1).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
        let err = store.load_checkpoint(bad).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
    }
    // The longest name, in characters of several bytes, is kept.
    let longest = "\u{e9}".repeat(128);
    store.save_checkpoint(&longest, 3).await.unwrap();
    assert_eq!(store.load_checkpoint(&longest).await.unwrap(), Some(3));
    let _ = Direction::Forward;
    let _ = ReadFrom::Start;
}

// ---------------------------------------------------------------- leases

/// Takes `name`, retrying for a while: a backend may free a dropped lease a
/// moment later (PostgreSQL ends the holder's session asynchronously).
async fn lease_soon<S: TestStore>(store: &S, name: &str) -> annals_core::Lease {
    for _ in 0..400 {
        if let Some(lease) = store.try_lease(name).await.unwrap() {
            return lease;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("lease '{name}' was not free within 10 s");
}

pub async fn leases_have_one_holder_per_name_until_dropped<S: TestStore>(store: S) {
    let held = store.try_lease("consumer-groups").await.unwrap().expect("free at first");
    assert_eq!(held.name(), "consumer-groups");
    assert!(!held.is_lost());
    assert!(store.try_lease("consumer-groups").await.unwrap().is_none(), "held: not again");
    assert!(store.clone().try_lease("consumer-groups").await.unwrap().is_none(), "not through a clone");
    let other = store.try_lease("projections").await.unwrap().expect("another name is independent");
    drop(held);
    let again = lease_soon(&store, "consumer-groups").await;
    assert!(!again.is_lost());
    assert!(store.try_lease("projections").await.unwrap().is_none(), "the other one is still held");
    drop((again, other));
}

pub async fn lease_names_are_validated<S: TestStore>(store: S) {
    for bad in [String::new(), "x".repeat(annals_core::MAX_LEASE_NAME_LEN + 1)] {
        let err = store.try_lease(&bad).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
    }
    let longest = "x".repeat(annals_core::MAX_LEASE_NAME_LEN);
    assert!(store.try_lease(&longest).await.unwrap().is_some());
    for bad in ["x".repeat(annals_core::MAX_LEASE_HOLDER_LEN + 1), "two\nlines".to_owned()] {
        let err = store.try_lease_as("holder-check", &bad).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");
    }
    assert!(matches!(store.holder("").await, Err(Error::InvalidInput { .. })));
    // A refused holder took nothing.
    assert!(store.holder("holder-check").await.unwrap().is_none());
}

pub async fn lease_holders_are_published_while_held<S: TestStore>(store: S) {
    assert_eq!(store.holder("consumer-groups").await.unwrap(), None, "never taken");
    let url = "http://10.0.0.7:7070";
    let held = store.try_lease_as("consumer-groups", url).await.unwrap().expect("free at first");
    assert_eq!(store.holder("consumer-groups").await.unwrap().as_deref(), Some(url));
    assert_eq!(store.clone().holder("consumer-groups").await.unwrap().as_deref(), Some(url), "any handle");
    assert_eq!(store.holder("projections").await.unwrap(), None, "names are independent");
    // A second taker publishes nothing while the first holds the lease.
    assert!(store.try_lease_as("consumer-groups", "http://other:1").await.unwrap().is_none());
    assert_eq!(store.holder("consumer-groups").await.unwrap().as_deref(), Some(url));
    let anonymous = store.try_lease("projections").await.unwrap().expect("free");
    assert_eq!(store.holder("projections").await.unwrap().as_deref(), Some(""), "held without a description");
    drop(held);
    let mut freed = false;
    for _ in 0..400 {
        if store.holder("consumer-groups").await.unwrap().is_none() {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(freed, "a released lease must stop naming its holder within 10 s");
    let next = lease_soon(&store, "consumer-groups").await;
    assert_eq!(store.holder("consumer-groups").await.unwrap().as_deref(), Some(""), "the new holder's");
    drop((next, anonymous));
}
