//! PostgreSQL-specific scenarios: commit ordering under concurrency, two
//! stores on one schema, reconnecting subscriptions, exactly-once
//! checkpoints, migrations, and typed connection errors.

mod common;

use std::{collections::HashSet, time::Duration};

use annals_core::{
    AllReader, Appender, CheckpointStore, DeleteMode, Error, EventData, EventStream, ExpectedVersion, Filter,
    ListStreams, ReadAll, ReadStream, RecordedEvent, SnapshotStore, StreamAppend, StreamDeleter, StreamName,
    StreamReader, SubscribeFrom, Subscriber, SubscriptionRequest,
};
use annals_postgres::{PgError, PgStore};
use futures::StreamExt;
use serde_json::json;

const PATIENCE: Duration = Duration::from_secs(60);

fn stream(name: &str) -> StreamName {
    StreamName::new(name).unwrap()
}

fn event(n: u64) -> EventData {
    EventData::json("E", &json!({ "n": n })).unwrap()
}

async fn take(sub: &mut EventStream, n: usize) -> Vec<RecordedEvent> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match tokio::time::timeout(PATIENCE, sub.next()).await {
            Ok(Some(Ok(e))) => out.push(e),
            Ok(Some(Err(e))) => panic!("subscription failed after {} events: {e}", out.len()),
            Ok(None) => panic!("subscription ended after {} of {n} events", out.len()),
            Err(_) => panic!("timed out waiting for event {} of {n}", out.len() + 1),
        }
    }
    out
}

async fn assert_quiet(sub: &mut EventStream) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(300), sub.next()).await {
        panic!("expected no further events, got {:?}", item.map(|r| r.map(|e| e.position)));
    }
}

/// The ordering guarantee: 16 concurrent writers, a live `$all` subscriber
/// in this process, one in a second store (another "process"), and a
/// polling `$all` reader. Each sees every event exactly once, in position
/// order, with no gap ever observed while commits are in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_writers_and_live_all_subscribers_see_every_event_once_in_order() {
    const WRITERS: u64 = 16;
    const PER_WRITER: u64 = 250;
    const TOTAL: usize = (WRITERS * PER_WRITER) as usize;
    let Some((store, guard)) = common::open_with(|b| b.max_connections(16)).await else { return };
    let other = common::reopen(&guard.schema).await;

    let check = |mut sub: EventStream| {
        tokio::spawn(async move {
            let got = take(&mut sub, TOTAL).await;
            for (i, e) in got.iter().enumerate() {
                assert_eq!(e.position, i as u64, "subscriber saw position {} at index {i}", e.position);
            }
            assert_eq!(got.iter().map(|e| e.id).collect::<HashSet<_>>().len(), TOTAL);
            assert_quiet(&mut sub).await;
            got.into_iter().map(|e| e.id).collect::<HashSet<_>>()
        })
    };
    let local = check(store.subscribe(SubscriptionRequest::all(Filter::all(), SubscribeFrom::Start)));
    let remote = check(other.subscribe(SubscriptionRequest::all(Filter::all(), SubscribeFrom::Start)));

    // A reader that pages `$all` while commits are in flight: every page
    // must continue exactly where the previous one ended.
    let reader = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut cursor = 0u64;
            while cursor < TOTAL as u64 {
                let page = store.read_all(ReadAll::forward(300).from_position(cursor)).await.unwrap();
                for e in &page.events {
                    assert_eq!(e.position, cursor, "a reader passed over position {cursor}");
                    cursor += 1;
                }
                assert_eq!(page.next, Some(cursor));
                if page.events.is_empty() {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        })
    };

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let s = stream(&format!("order-{w}"));
                let mut ids = Vec::new();
                for i in 0..PER_WRITER {
                    let e = event(i);
                    ids.push(e.id);
                    let r = store.append(&s, ExpectedVersion::Any, vec![e]).await.unwrap();
                    assert_eq!(r.next_version, i + 1);
                }
                ids
            })
        })
        .collect();
    let mut written = HashSet::new();
    for w in writers {
        written.extend(w.await.unwrap());
    }
    assert_eq!(written.len(), TOTAL);
    assert_eq!(local.await.unwrap(), written);
    assert_eq!(remote.await.unwrap(), written);
    reader.await.unwrap();
    assert_eq!(store.next_position().await.unwrap(), TOTAL as u64);
}

/// Two stores on one schema see each other's appends, live, and their
/// racing appends to one stream resolve to exactly one winner per version.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_share_one_log_and_race_to_one_winner() {
    let Some((a, guard)) = common::open().await else { return };
    // No fallback poll within the test's lifetime: b can only learn of a's
    // appends through NOTIFY.
    let b = PgStore::builder(common::url())
        .schema(&guard.schema)
        .max_connections(4)
        .poll_interval(Duration::from_secs(3600))
        .open()
        .await
        .unwrap();
    let s = stream("shared-1");

    let mut sub_b = b.subscribe(SubscriptionRequest::stream(s.clone(), SubscribeFrom::Start));
    a.append(&s, ExpectedVersion::NoStream, vec![event(0)]).await.unwrap();
    let got = take(&mut sub_b, 1).await;
    assert_eq!((got[0].version, got[0].position), (0, 0));
    assert_eq!(b.stream_info(&s).await.unwrap().last_version, Some(0));

    // Both try to write version 1 at the same time, many rounds.
    for round in 1..=20u64 {
        let (ra, rb) = tokio::join!(
            a.append(&s, ExpectedVersion::Exact(round - 1), vec![event(round)]),
            b.append(&s, ExpectedVersion::Exact(round - 1), vec![event(round)]),
        );
        let (win, lose) = match (ra, rb) {
            (Ok(w), Err(l)) | (Err(l), Ok(w)) => (w, l),
            other => panic!("round {round}: expected one winner, got {other:?}"),
        };
        assert_eq!(win.next_version, round + 1);
        assert!(
            matches!(lose, Error::WrongExpectedVersion { actual: Some(v), .. } if v == round),
            "round {round}: {lose:?}"
        );
    }
    let got = take(&mut sub_b, 20).await;
    assert_eq!(got.iter().map(|e| e.version).collect::<Vec<_>>(), (1..=20).collect::<Vec<_>>());
    assert!(b.notifications_received() > 0);
    assert_eq!(a.next_position().await.unwrap(), 21);
    assert_eq!(b.next_position().await.unwrap(), 21);
}

/// A subscription whose reads fail in a way waiting cannot fix (here its
/// schema was dropped: SQLSTATE 42P01, as for a revoked grant) ends with
/// that error at once, instead of retrying it silently for its whole retry
/// window as it does a lost connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_ends_at_once_on_an_error_that_waiting_cannot_fix() {
    let Some((store, guard)) = common::open_with(|b| b.subscription_retry(Duration::from_secs(60))).await
    else {
        return;
    };
    store.append(&stream("doomed-1"), ExpectedVersion::Any, vec![event(0)]).await.unwrap();
    admin_client().await.batch_execute(&format!("DROP SCHEMA \"{}\" CASCADE", guard.schema)).await.unwrap();
    let start = std::time::Instant::now();
    let mut sub = store.subscribe(SubscriptionRequest::all(Filter::all(), SubscribeFrom::Start));
    let next = tokio::time::timeout(Duration::from_secs(20), sub.next())
        .await
        .expect("the subscription went on retrying an error that waiting cannot fix");
    let err = next.expect("an item").expect_err("an error, not an event");
    assert!(err.to_string().contains("42P01"), "{err}");
    assert!(start.elapsed() < Duration::from_secs(10), "ended after {:?}", start.elapsed());
}

/// A forward stream read racing another process that soft-deletes the
/// stream and writes it again returns one generation, never events of two
/// (the stream's state and its runs are read in two statements; without a
/// bound the read once returned versions 68 and 69 when 68 had been deleted
/// before 69 was written).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_read_racing_a_soft_delete_and_rewrite_returns_one_generation() {
    let Some((a, guard)) = common::open().await else { return };
    let b = common::reopen(&guard.schema).await;
    let s = stream("generations-1");
    a.append(&s, ExpectedVersion::NoStream, vec![event(0)]).await.unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rewriter = {
        let (s, stop) = (s.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 1;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                b.delete_stream(&s, ExpectedVersion::Any, DeleteMode::Soft).await.unwrap();
                b.append(&s, ExpectedVersion::NoStream, vec![event(n)]).await.unwrap();
                n += 1;
            }
            n
        })
    };
    let started = std::time::Instant::now();
    let mut reads = 0;
    while started.elapsed() < Duration::from_secs(5) {
        match a.read_stream(&s, ReadStream::forward()).await {
            Ok(events) => {
                let versions: Vec<_> = events.iter().map(|e| e.version).collect();
                assert!(versions.len() <= 1, "read {reads}: versions {versions:?} of two generations");
            }
            Err(Error::StreamNotFound { .. }) => {}
            Err(e) => panic!("{e}"),
        }
        reads += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let generations = rewriter.await.unwrap();
    assert!(generations > 20, "only {generations} generations in {reads} reads: the race was barely run");
}

/// Killing the listener connection (and the pool's connections) in the
/// middle of a subscription: it reconnects and resumes after the last
/// delivered event, without loss or duplication.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscription_survives_terminated_connections() {
    let Some((store, guard)) = common::open_with(|b| b.poll_interval(Duration::from_millis(200))).await
    else {
        return;
    };
    let writer = common::reopen(&guard.schema).await;
    let s = stream("resilient-1");
    let mut sub = store.subscribe(SubscriptionRequest::all(Filter::all(), SubscribeFrom::Start));
    writer.append(&s, ExpectedVersion::Any, (0..10).map(event).collect()).await.unwrap();
    let first = take(&mut sub, 10).await;

    let admin = admin_client().await;
    let killed = |app: String| {
        let admin = &admin;
        async move {
            admin
                .query(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                     WHERE application_name = $1 AND pid <> pg_backend_pid()",
                    &[&app],
                )
                .await
                .unwrap()
                .len()
        }
    };
    let listeners = killed(format!("annals-listen {}", guard.schema)).await;
    assert_eq!(listeners, 2, "both stores' listener connections were terminated");
    // The subscriber's pooled connections too (the writer's die as well;
    // its next append simply gets a new connection or fails transiently).
    assert!(killed(format!("annals {}", guard.schema)).await >= 1);

    // Appends while the subscriber's connections are gone.
    for i in 10..20 {
        loop {
            match writer.append(&s, ExpectedVersion::Exact(i - 1), vec![event(i)]).await {
                Ok(_) => break,
                Err(e) if e.is_transient() => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => panic!("append {i}: {e}"),
            }
        }
    }
    let rest = take(&mut sub, 10).await;
    let positions: Vec<u64> = first.iter().chain(&rest).map(|e| e.position).collect();
    assert_eq!(positions, (0..20).collect::<Vec<_>>());
    assert_quiet(&mut sub).await;

    // The listener came back and wakes the subscriber again.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while store.listener_reconnects() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "listener never reconnected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    writer.append(&s, ExpectedVersion::Exact(19), vec![event(20)]).await.unwrap();
    assert_eq!(take(&mut sub, 1).await[0].position, 20);
}

/// The connection of an append in flight is terminated (as by a failover or
/// a DBA) while the append waits for the head: the store reads back that
/// nothing was written, runs the append again on a fresh connection, and
/// the caller gets its success: the event is in the stream exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_whose_connection_dies_before_committing_runs_again_once() {
    let Some((store, guard)) = common::open().await else { return };
    let s = stream("cut-1");
    store.append(&s, ExpectedVersion::NoStream, vec![event(0)]).await.unwrap();

    // Hold the head so the next append waits on it, on a known backend.
    let blocker = holding_the_head(&guard.schema).await;
    let pending = event(1);
    let appending = {
        let (store, s, pending) = (store.clone(), s.clone(), pending.clone());
        tokio::spawn(async move { store.append(&s, ExpectedVersion::Exact(0), vec![pending]).await })
    };
    let waiting = waiting_backend(&guard.schema).await;
    let admin = admin_client().await;
    admin.execute("SELECT pg_terminate_backend($1)", &[&waiting]).await.unwrap();
    // Settling the outcome waits for the head too (a transaction of the
    // broken attempt could still hold it): release it.
    tokio::time::sleep(Duration::from_millis(100)).await;
    blocker.batch_execute("ROLLBACK").await.unwrap();
    let written = tokio::time::timeout(PATIENCE, appending).await.unwrap().unwrap().unwrap();
    assert_eq!(written.next_version, 2);

    // A re-send is recognised as one.
    let again = store.append(&s, ExpectedVersion::Exact(0), vec![pending.clone()]).await.unwrap();
    assert_eq!(written, again);
    store.append(&s, ExpectedVersion::Exact(1), vec![event(2)]).await.unwrap();
    let read = store.read_stream(&s, ReadStream::forward()).await.unwrap();
    assert_eq!(read.iter().map(|e| e.version).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(read[1].id, pending.id);
    assert_eq!(read[1].position, written.position);
}

/// A store connected through `proxy` to the schema of `guard`.
/// A proxy hook: `store` appends each event to its stream (`Any`), as
/// another process would between a lost answer and the store's look.
fn appends_meanwhile(store: &PgStore, appends: &[(&StreamName, &EventData)]) -> common::proxy::Hook {
    let store = store.clone();
    let appends: Vec<(StreamName, EventData)> =
        appends.iter().map(|(s, e)| ((*s).clone(), (*e).clone())).collect();
    Box::new(move || {
        Box::pin(async move {
            for (s, e) in appends {
                store.append(&s, ExpectedVersion::Any, vec![e]).await.unwrap();
            }
        })
    })
}

async fn through(proxy: &common::proxy::Proxy, schema: &str) -> PgStore {
    PgStore::builder(&proxy.url)
        .schema(schema)
        .max_connections(2)
        .open()
        .await
        .expect("open through the proxy")
}

/// The commit of an append succeeds on the server but its answer is lost
/// (the connection is cut right after), and before the store can look,
/// another process appends to the same stream. The caller still gets the
/// true outcome, read back from the log: written once, at the position the
/// log holds. (Before, the caller got a transient error and had to re-send;
/// a re-send with `Any` after the other process's append wrote the event a
/// second time.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_whose_answer_is_lost_is_answered_from_the_log() {
    let Some((direct, guard)) = common::open().await else { return };
    let proxy = common::proxy::Proxy::start().await;
    let store = through(&proxy, &guard.schema).await;
    let s = stream("lost-1");
    store.append(&s, ExpectedVersion::NoStream, vec![event(0)]).await.unwrap();

    let (lost, other) = (event(1), event(2));
    proxy.lose_answer_to(lost.id.as_bytes(), appends_meanwhile(&direct, &[(&s, &other)]));
    let written = store.append(&s, ExpectedVersion::Any, vec![lost.clone()]).await.unwrap();
    assert!(proxy.fired(), "the answer was never lost: the test did not test anything");
    assert_eq!(written.next_version, 2);

    let read = direct.read_stream(&s, ReadStream::forward()).await.unwrap();
    let ids: Vec<_> = read.iter().map(|e| e.id).collect();
    assert_eq!(ids, [read[0].id, lost.id, other.id], "each event once");
    assert_eq!(read[1].position, written.position);
    // The store carries on.
    let next = store.append(&s, ExpectedVersion::Exact(2), vec![event(3)]).await.unwrap();
    assert_eq!(next.next_version, 4);
}

/// A request that appends to two streams, one part an idempotent re-send
/// (it writes nothing) and one new, commits and loses its answer; another
/// process appends to the new part's stream before the store looks. The
/// request committed (its new part is in the log), so the re-sent part is
/// answered from its stream's tail before the round, and nothing is run
/// again. (It was counted unwritten, because the re-sent events are older
/// than the attempt, and run again: the new part's event was written a
/// second time behind the other process's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_request_with_a_re_sent_part_whose_answer_is_lost_is_written_once() {
    let Some((direct, guard)) = common::open().await else { return };
    let proxy = common::proxy::Proxy::start().await;
    let store = through(&proxy, &guard.schema).await;
    let (a, b) = (stream("mixed-a"), stream("mixed-b"));
    let a0 = event(0);
    store.append(&a, ExpectedVersion::NoStream, vec![a0.clone()]).await.unwrap();
    store.append(&b, ExpectedVersion::NoStream, vec![event(0)]).await.unwrap();
    // The head held, so the request's fast-path call is sent and declines
    // (a re-send) before the marker is armed: the answer lost is the exact
    // path's, whose statement carries the new event's id.
    let blocker = holding_the_head(&guard.schema).await;
    let (b1, other) = (event(1), event(2));
    let task = {
        let (store, a, b, a0, b1) = (store.clone(), a.clone(), b.clone(), a0.clone(), b1.clone());
        tokio::spawn(async move {
            store
                .append_multi(vec![
                    StreamAppend::new(a, ExpectedVersion::Any, vec![a0]),
                    StreamAppend::new(b, ExpectedVersion::Any, vec![b1]),
                ])
                .await
        })
    };
    waiting_backend(&guard.schema).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    proxy.lose_answer_to(b1.id.as_bytes(), appends_meanwhile(&direct, &[(&b, &other)]));
    blocker.batch_execute("ROLLBACK").await.unwrap();
    let results = task.await.unwrap().unwrap();
    assert!(proxy.fired(), "the answer was never lost: the test did not test anything");

    let read = direct.read_stream(&b, ReadStream::forward()).await.unwrap();
    let ids: Vec<_> = read.iter().map(|e| e.id).collect();
    assert_eq!(ids, [read[0].id, b1.id, other.id], "each event once");
    // a: the re-send, answered as at the time; b: where b1 landed.
    assert_eq!(results[0], annals_core::AppendResult { next_version: 1, position: 0 });
    assert_eq!(results[1], annals_core::AppendResult { next_version: 2, position: read[1].position });
}

/// The same for a round of several appends committed together (the
/// committer batches callers that queue while a round holds the head): its
/// answer is lost, another process appends to two of its streams, and
/// every caller gets the true outcome. Before, the round was re-run request
/// by request: the `Any` append was written a second time, and the `Exact`
/// one failed with a conflict although it had been written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_round_whose_answer_is_lost_is_answered_from_the_log() {
    let Some((direct, guard)) = common::open().await else { return };
    let proxy = common::proxy::Proxy::start().await;
    let store = through(&proxy, &guard.schema).await;
    let (a, b, c) = (stream("round-a"), stream("round-b"), stream("round-c"));
    for s in [&a, &b, &c] {
        store.append(s, ExpectedVersion::NoStream, vec![event(0)]).await.unwrap();
    }

    // Hold the head: the first append waits on it, and the next two queue
    // behind it, to be committed together when it is released.
    let blocker = holding_the_head(&guard.schema).await;
    let first = {
        let (store, a) = (store.clone(), a.clone());
        tokio::spawn(async move { store.append(&a, ExpectedVersion::Any, vec![event(1)]).await })
    };
    waiting_backend(&guard.schema).await;
    let (on_b, on_c) = (event(1), event(1));
    let (other_b, other_c) = (event(2), event(2));
    proxy.lose_answer_to(on_b.id.as_bytes(), appends_meanwhile(&direct, &[(&b, &other_b), (&c, &other_c)]));
    let second = {
        let (store, b, on_b) = (store.clone(), b.clone(), on_b.clone());
        tokio::spawn(async move { store.append(&b, ExpectedVersion::Any, vec![on_b]).await })
    };
    let third = {
        let (store, c, on_c) = (store.clone(), c.clone(), on_c.clone());
        tokio::spawn(async move { store.append(&c, ExpectedVersion::Exact(0), vec![on_c]).await })
    };
    // Let both reach the committer's queue.
    tokio::time::sleep(Duration::from_millis(300)).await;
    blocker.batch_execute("ROLLBACK").await.unwrap();

    assert_eq!(first.await.unwrap().unwrap().next_version, 2);
    let on_b_written = second.await.unwrap().unwrap();
    let on_c_written = third.await.unwrap().unwrap();
    assert!(proxy.fired(), "the answer was never lost: the test did not test anything");
    assert_eq!((on_b_written.next_version, on_c_written.next_version), (2, 2));
    for (s, mine, other, written) in
        [(&b, &on_b, &other_b, on_b_written), (&c, &on_c, &other_c, on_c_written)]
    {
        let read = direct.read_stream(s, ReadStream::forward()).await.unwrap();
        let ids: Vec<_> = read.iter().map(|e| e.id).collect();
        assert_eq!(ids, [read[0].id, mine.id, other.id], "{s}: each event once");
        assert_eq!(read[1].position, written.position, "{s}");
    }
}

/// The same for reads: a read whose backend is terminated runs again on a
/// new connection (reads change nothing) and the caller gets its answer;
/// the dead connection does not go back to the pool to fail the next read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_connection_dies_runs_again_on_a_new_connection() {
    let Some((store, guard)) = common::open_with(|b| b.max_connections(1)).await else { return };
    let s = stream("cut-read-1");
    store.append(&s, ExpectedVersion::NoStream, vec![event(0)]).await.unwrap();

    // The race it guards against (error seen before the close) is lost
    // about half the time without the discard: several rounds.
    for _ in 0..5 {
        let blocker = admin_client().await;
        blocker
            .batch_execute(&format!(
                "BEGIN; LOCK TABLE \"{}\".streams IN ACCESS EXCLUSIVE MODE",
                guard.schema
            ))
            .await
            .unwrap();
        let reading = {
            let (store, s) = (store.clone(), s.clone());
            tokio::spawn(async move { store.stream_info(&s).await })
        };
        let pid = waiting_backend(&guard.schema).await;
        admin_client().await.execute("SELECT pg_terminate_backend($1)", &[&pid]).await.unwrap();
        // The read runs again and waits for the lock on a new backend.
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while waiting_backend(&guard.schema).await == pid {
            assert!(tokio::time::Instant::now() < deadline, "the read never ran again");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        blocker.batch_execute("ROLLBACK").await.unwrap();
        let info = tokio::time::timeout(PATIENCE, reading).await.unwrap().unwrap().unwrap();
        assert_eq!(info.last_version, Some(0));
        // One pooled connection: the next read gets a live one.
        let info = store.stream_info(&s).await.unwrap();
        assert_eq!(info.last_version, Some(0));
    }
}

/// An application that gives a connection of `PgStore::pool()` back inside
/// a transaction (a bare `BEGIN`, then an early return) cannot make the
/// store's appends run in it: they commit and are seen by everyone. The
/// next borrower gets a connection outside any transaction, whether the
/// one given back was in an open or an aborted transaction; the open
/// transaction's writes are rolled back, not committed by somebody else.
/// (The store's appends once ran on the same pool: with one connection, an
/// append was answered as written from inside the application's
/// transaction, and nobody else ever saw it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_given_back_inside_a_transaction_reaches_neither_the_store_nor_the_next_borrower() {
    let Some((store, guard)) = common::open_with(|b| b.max_connections(1)).await else { return };
    let admin = admin_client().await;
    let table = format!("\"{}\".app_rows", guard.schema);
    admin.batch_execute(&format!("CREATE TABLE {table} (n int)")).await.unwrap();
    let committed = async |admin: &tokio_postgres::Client| -> Vec<i32> {
        let sql = format!("SELECT coalesce(array_agg(n ORDER BY n), '{{}}') FROM {table}");
        admin.query_one(&sql, &[]).await.unwrap().get(0)
    };
    let s = stream("app-tx");

    // Open, with a write in it.
    {
        let conn = store.pool().get().await.unwrap();
        conn.batch_execute(&format!("BEGIN; INSERT INTO {table} VALUES (1)")).await.unwrap();
    }
    let written = tokio::time::timeout(PATIENCE, store.append(&s, ExpectedVersion::NoStream, vec![event(0)]))
        .await
        .expect("the append hung")
        .unwrap();
    assert_eq!(written.next_version, 1);
    let other = common::reopen(&guard.schema).await;
    assert_eq!(
        other.read_stream(&s, ReadStream::forward()).await.unwrap().len(),
        1,
        "the append was not committed"
    );
    {
        let conn = store.pool().get().await.unwrap();
        conn.batch_execute(&format!("INSERT INTO {table} VALUES (2)")).await.unwrap();
    }
    assert_eq!(
        committed(&admin).await,
        [2],
        "the next borrower wrote inside the open transaction, or that transaction was committed"
    );

    // Aborted.
    {
        let conn = store.pool().get().await.unwrap();
        conn.batch_execute("BEGIN").await.unwrap();
        conn.batch_execute("SELECT 1 / 0").await.unwrap_err();
    }
    let conn = store.pool().get().await.unwrap();
    conn.batch_execute(&format!("INSERT INTO {table} VALUES (3)")).await.unwrap();
    drop(conn);
    assert_eq!(committed(&admin).await, [2, 3], "the next borrower met the aborted transaction");
    store.append(&s, ExpectedVersion::Exact(0), vec![event(1)]).await.unwrap();
    assert_eq!(other.read_stream(&s, ReadStream::forward()).await.unwrap().len(), 2);
}

/// After a failover the pool may hold connections to the old primary, now
/// read-only. An append that meets one does not fail: the connection is
/// dropped and the append runs again on a new one (nothing was written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_on_a_read_only_connection_moves_to_a_new_one() {
    let Some((store, _guard)) = common::open_with(|b| b.max_connections(1)).await else { return };
    let s = stream("ro-1");
    store.append(&s, ExpectedVersion::NoStream, vec![event(0)]).await.unwrap();
    for round in 1..=3u64 {
        // The pool's one connection turns read-only, as a demoted primary's
        // sessions do.
        {
            let conn = store.store_pool().get().await.unwrap();
            conn.batch_execute("SET default_transaction_read_only = on").await.unwrap();
        }
        let written = store.append(&s, ExpectedVersion::Exact(round - 1), vec![event(round)]).await.unwrap();
        assert_eq!(written.next_version, round + 1);
        let conn = store.store_pool().get().await.unwrap();
        let ro: String = conn.query_one("SHOW default_transaction_read_only", &[]).await.unwrap().get(0);
        assert_eq!(ro, "off", "the read-only connection went back to the pool");
    }
    let versions: Vec<u64> =
        store.read_stream(&s, ReadStream::forward()).await.unwrap().iter().map(|e| e.version).collect();
    assert_eq!(versions, [0, 1, 2, 3]);
}

/// Chaos: while writers append and a live `$all` subscriber follows, every
/// pooled and listener connection of the store is terminated again and
/// again. Writers treat a transient error as "outcome unknown" and re-send
/// the same event (same id, same expectation), as the API asks. In the
/// end every stream holds each event exactly once and in order, and the
/// subscriber saw every event exactly once, in position order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_and_a_subscriber_come_through_repeated_connection_kills_exactly_once() {
    const WRITERS: u64 = 4;
    const PER_WRITER: u64 = 250;
    const TOTAL: usize = (WRITERS * PER_WRITER) as usize;
    let Some((store, guard)) = common::open_url_with(common::plain_url(), |b| {
        b.max_connections(4).poll_interval(Duration::from_millis(100)).subscription_retry(PATIENCE)
    })
    .await
    else {
        return;
    };
    let mut sub = store.subscribe(SubscriptionRequest::all(Filter::all(), SubscribeFrom::Start));
    let follower = tokio::spawn(async move {
        let got = take(&mut sub, TOTAL).await;
        assert_quiet(&mut sub).await;
        got
    });

    let stop = tokio_util::sync::CancellationToken::new();
    let killer = {
        let (stop, schema) = (stop.clone(), guard.schema.clone());
        tokio::spawn(async move {
            let admin = admin_client().await;
            let mut kills = 0usize;
            while !stop.is_cancelled() {
                kills += admin
                    .query(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                         WHERE application_name IN ($1, $2)",
                        &[&format!("annals {schema}"), &format!("annals-listen {schema}")],
                    )
                    .await
                    .unwrap()
                    .len();
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            kills
        })
    };

    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let s = stream(&format!("chaos-{w}"));
                let (mut ids, mut resends) = (Vec::new(), 0u32);
                for i in 0..PER_WRITER {
                    let e = event(i);
                    ids.push(e.id);
                    let expected =
                        if i == 0 { ExpectedVersion::NoStream } else { ExpectedVersion::Exact(i - 1) };
                    let deadline = tokio::time::Instant::now() + PATIENCE;
                    loop {
                        match store.append(&s, expected, vec![e.clone()]).await {
                            Ok(r) => {
                                assert_eq!(r.next_version, i + 1);
                                break;
                            }
                            Err(err) if err.is_transient() && tokio::time::Instant::now() < deadline => {
                                resends += 1;
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            Err(err) => panic!("writer {w}, event {i}: {err}"),
                        }
                    }
                }
                (s, ids, resends)
            })
        })
        .collect();
    let mut done = Vec::new();
    for w in writers {
        done.push(w.await.unwrap());
    }
    stop.cancel();
    let kills = killer.await.unwrap();
    let mut all_ids = HashSet::new();
    let mut resends = 0;
    for (s, ids, r) in done {
        resends += r;
        let read = store.read_stream(&s, ReadStream::forward()).await;
        let read = match read {
            Ok(read) => read,
            // At most one read can meet a connection killed just before.
            Err(e) if e.is_transient() => store.read_stream(&s, ReadStream::forward()).await.unwrap(),
            Err(e) => panic!("{s}: {e}"),
        };
        assert_eq!(read.iter().map(|e| e.id).collect::<Vec<_>>(), ids, "{s}: each event once, in order");
        all_ids.extend(ids);
    }
    let got = follower.await.unwrap();
    assert_eq!(got.iter().map(|e| e.position).collect::<Vec<_>>(), (0..TOTAL as u64).collect::<Vec<_>>());
    assert_eq!(got.iter().map(|e| e.id).collect::<HashSet<_>>(), all_ids);
    assert!(kills > 0, "the chaos never hit a connection");
    eprintln!("chaos: {kills} backends terminated, {resends} re-sends");
}

/// A session holding an old snapshot (as a long report or `pg_dump`
/// would) until `COMMIT` is sent on it.
async fn old_snapshot() -> tokio_postgres::Client {
    let holder = admin_client().await;
    holder
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM pg_class")
        .await
        .unwrap();
    holder
}

/// While another session holds an old snapshot (a long report, pg_dump),
/// no row version that appends leave behind can be pruned. Appends take the
/// head row's lock without updating it (migration 0008), so however many
/// appends run meanwhile, the head table stays one page and positions stay
/// gapless and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_under_an_old_snapshot_leave_the_head_row_alone() {
    let Some((store, guard)) = common::open().await else { return };
    let holder = old_snapshot().await;
    for i in 0..1500u64 {
        let s = stream(&format!("snap-{}", i % 50));
        let r = store.append(&s, ExpectedVersion::Any, vec![event(i)]).await.unwrap();
        assert_eq!(r.position, i);
    }
    let admin = admin_client().await;
    let size: i64 = admin
        .query_one(&format!("SELECT pg_relation_size('\"{}\".head_row')", guard.schema), &[])
        .await
        .unwrap()
        .get(0);
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(size, 8192, "the head table grew: appends updated its row");
    assert_eq!(store.next_position().await.unwrap(), 1500);
    let page = store.read_all(ReadAll::forward(2000)).await.unwrap();
    assert_eq!(page.events.iter().map(|e| e.position).collect::<Vec<_>>(), (0..1500).collect::<Vec<_>>());
    assert_eq!(page.next, Some(1500));
}

/// The same for stream rows (migration 0011): appends to one hot stream
/// under an old snapshot create no row version of its stream row, whose
/// last version, position and event id are read from its last run. The
/// row is written when the stream is created and by deletes only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_to_a_hot_stream_under_an_old_snapshot_leave_its_row_alone() {
    let Some((store, guard)) = common::open().await else { return };
    let q = format!("\"{}\"", guard.schema);
    let s = stream("hot-1");
    let first = store.append(&s, ExpectedVersion::NoStream, vec![event(0)]).await.unwrap();
    assert_eq!((first.next_version, first.position), (1, 0));
    let admin = admin_client().await;
    let row_version = format!("SELECT xmin::text, ctid::text FROM {q}.stream_rows WHERE name = 'hot-1'");
    let created: (String, String) =
        admin.query_one(&row_version, &[]).await.map(|r| (r.get(0), r.get(1))).unwrap();
    let holder = old_snapshot().await;
    let mut last = None;
    for i in 1..1500u64 {
        // Every expectation the fast path decides, and a batch now and then.
        let expected = match i % 3 {
            0 => ExpectedVersion::Any,
            1 => ExpectedVersion::Exact(i - 1),
            _ => ExpectedVersion::StreamExists,
        };
        let r = store.append(&s, expected, vec![event(i)]).await.unwrap();
        assert_eq!((r.next_version, r.position), (i + 1, i));
        last = Some(r);
    }
    let after: (String, String) =
        admin.query_one(&row_version, &[]).await.map(|r| (r.get(0), r.get(1))).unwrap();
    let size: i64 =
        admin.query_one(&format!("SELECT pg_relation_size('{q}.stream_rows')"), &[]).await.unwrap().get(0);
    holder.batch_execute("COMMIT").await.unwrap();
    assert_eq!(after, created, "an append wrote the stream row");
    assert_eq!(size, 8192, "the stream rows table grew");
    let info = store.stream_info(&s).await.unwrap();
    assert_eq!((info.last_version, info.last_position), (Some(1499), Some(1499)));
    // The state read from the last run decides expectations and re-sends.
    let stale = store.append(&s, ExpectedVersion::Exact(1000), vec![event(1)]).await.unwrap_err();
    assert!(matches!(stale, Error::WrongExpectedVersion { .. }), "{stale:?}");
    assert!(matches!(
        store.append(&s, ExpectedVersion::NoStream, vec![event(1)]).await,
        Err(Error::WrongExpectedVersion { .. })
    ));
    let resent = store.read_stream(&s, ReadStream::backward().limit(1)).await.unwrap();
    let again = store
        .append(&s, ExpectedVersion::Any, vec![EventData { id: resent[0].id, ..event(1499) }])
        .await
        .unwrap();
    assert_eq!(Some(again), last, "the re-send of the last append was not recognised");
    // A delete still writes the row; the next append continues after it.
    store.delete_stream(&s, ExpectedVersion::Exact(1499), DeleteMode::Soft).await.unwrap();
    let next = store.append(&s, ExpectedVersion::NoStream, vec![event(1500)]).await.unwrap();
    assert_eq!((next.next_version, next.position), (1501, 1500));
    let streams = store.list_streams(ListStreams::new(10)).await.unwrap();
    assert_eq!(
        streams.iter().map(|i| (i.stream.as_str(), i.last_version)).collect::<Vec<_>>(),
        [("hot-1", Some(1500))]
    );
}

/// Checkpoints under an old snapshot (migration 0012): every save inserts
/// a row and deletes the previous one, nothing is updated, so however many
/// saves an old snapshot keeps from being vacuumed, finding the latest one
/// reads the same few pages. (With a row updated per save, the lookup
/// walked every version the snapshot kept: 2,588 -> 1,217 saves/s in 25 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_saves_under_an_old_snapshot_find_the_latest_in_a_few_pages() {
    let Some((store, guard)) = common::open().await else { return };
    let q = format!("\"{}\"", guard.schema);
    let admin = admin_client().await;
    let holder = old_snapshot().await;
    for i in 0..1500u64 {
        if i % 5 == 0 {
            let tx = store.begin_checkpoint_tx("proj").await.unwrap();
            assert_eq!(tx.checkpoint(), i.checked_sub(1));
            tx.commit(i).await.unwrap();
        } else {
            store.save_checkpoint("proj", i).await.unwrap();
        }
        store.save_checkpoint(&format!("other-{}", i % 3), i).await.unwrap();
    }
    // The simple protocol: EXPLAIN's json comes back as text.
    let explained = admin
        .simple_query(&format!(
            "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)
             SELECT position FROM {q}.checkpoint_saves WHERE name = 'proj' ORDER BY seq DESC LIMIT 1"
        ))
        .await
        .unwrap();
    let plan: serde_json::Value = explained
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(row) => {
                row.get(0).map(|t| serde_json::from_str(t).unwrap())
            }
            _ => None,
        })
        .unwrap();
    holder.batch_execute("COMMIT").await.unwrap();
    let top = &plan[0]["Plan"];
    let pages = top["Shared Hit Blocks"].as_i64().unwrap() + top["Shared Read Blocks"].as_i64().unwrap();
    assert!(pages <= 6, "finding the latest save read {pages} pages: {plan}");
    assert_eq!(store.load_checkpoint("proj").await.unwrap(), Some(1499));
    assert_eq!(store.load_checkpoint("other-2").await.unwrap(), Some(1499));
    let live: i64 =
        admin.query_one(&format!("SELECT count(*) FROM {q}.checkpoint_saves"), &[]).await.unwrap().get(0);
    assert_eq!(live, 4, "one save per name");
}

/// Checkpoints need READ COMMITTED (the latest save is read after the
/// lock): with a database whose default isolation is SERIALIZABLE, saves
/// run in an explicit READ COMMITTED transaction instead, checkpoint
/// transactions begin in one, and they still take turns on a name, see
/// each other's saves and leave one save per name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_are_exact_whatever_the_default_isolation() {
    let url = common::url_with_options("-c%20default_transaction_isolation%3Dserializable");
    let Some((store, guard)) = common::open_url_with(url, |b| b).await else { return };
    let isolation = show(&store, "transaction_isolation").await;
    assert_eq!(isolation, "serializable", "the URL's options did not apply");
    for i in 0..5 {
        store.save_checkpoint("p", i).await.unwrap();
    }
    assert_eq!(store.load_checkpoint("p").await.unwrap(), Some(4));
    let first = store.begin_checkpoint_tx("p").await.unwrap();
    assert_eq!(first.checkpoint(), Some(4));
    let second = {
        let store = store.clone();
        tokio::spawn(async move {
            let tx = store.begin_checkpoint_tx("p").await.unwrap();
            let seen = tx.checkpoint();
            tx.commit(9).await.unwrap();
            seen
        })
    };
    let saving = {
        let store = store.clone();
        tokio::spawn(async move { store.save_checkpoint("p", 8).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!second.is_finished() && !saving.is_finished(), "they must wait for the lock");
    first.commit(7).await.unwrap();
    let seen = second.await.unwrap();
    saving.await.unwrap().unwrap();
    // The transaction and the save ran one after the other, in either order.
    let last = store.load_checkpoint("p").await.unwrap();
    assert!(matches!((seen, last), (Some(7), Some(8)) | (Some(8), Some(9))), "{seen:?} then {last:?}");
    let rows: i64 = store
        .pool()
        .get()
        .await
        .unwrap()
        .query_one(&format!("SELECT count(*) FROM \"{}\".checkpoint_saves", guard.schema), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 1, "every save replaced the one before");
}

/// A database whose default isolation is changed while a store runs
/// changes nothing for the store: its sessions ask for READ COMMITTED at
/// connection start, which takes precedence over the database's setting, so
/// appends on connections made afterwards still take the one-call fast
/// path. (A scratch database of its own, so no other test sees the
/// setting.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_isolation_set_on_the_database_while_running_changes_nothing() {
    let Some((_store, _guard)) = common::open().await else { return };
    let admin = admin_client().await;
    let db = format!("annals_t_db_{}", uuid::Uuid::new_v4().simple());
    admin.batch_execute(&format!("CREATE DATABASE {db}")).await.unwrap();
    let _dropped = DatabaseGuard(db.clone());
    let mut config: tokio_postgres::Config = common::url().parse().unwrap();
    config.dbname(&db);
    let url = common::url();
    let (before, after) = url.split_once('?').map_or((url.as_str(), ""), |(b, a)| (b, a));
    let base = before.rsplit_once('/').map_or(before, |(host, _)| host);
    let url = if after.is_empty() { format!("{base}/{db}") } else { format!("{base}/{db}?{after}") };
    let store = PgStore::builder(url).max_connections(2).open().await.unwrap();
    let s = stream("iso-late");
    store.append(&s, ExpectedVersion::NoStream, vec![event(0)]).await.unwrap();

    admin
        .batch_execute(&format!("ALTER DATABASE {db} SET default_transaction_isolation = 'serializable'"))
        .await
        .unwrap();
    // The pool's idle connections go; the next ones start with the new
    // database default.
    store.store_pool().retain(|_, _| false);
    let isolation = show(&store, "transaction_isolation").await;
    assert_eq!(isolation, "read committed", "the database's default reached the store's session");
    // A session without the store's options does get it.
    let mut plain = config.clone();
    plain.options("");
    let (other, conn) = plain.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let theirs: String = other.query_one("SHOW transaction_isolation", &[]).await.unwrap().get(0);
    assert_eq!(theirs, "serializable");

    for n in 1..10 {
        store.append(&s, ExpectedVersion::Exact(n - 1), vec![event(n)]).await.unwrap();
    }
    assert_eq!(store.exact_append_rounds(), 0, "appends went to the exact path");
    assert_eq!(store.read_stream(&s, ReadStream::forward()).await.unwrap().len(), 10);
}

/// Drops its database when dropped (with the sessions still on it).
struct DatabaseGuard(String);

impl Drop for DatabaseGuard {
    fn drop(&mut self) {
        let db = self.0.clone();
        common::blocking_admin(move |client| async move {
            let sql = format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)");
            let _ = tokio::time::timeout(Duration::from_secs(30), client.batch_execute(&sql)).await;
        });
    }
}

/// The append functions need READ COMMITTED too. With a database whose
/// default isolation is SERIALIZABLE, plain appends (one stream, several
/// streams, concurrent callers sharing rounds) still take the fast path, in
/// an explicit READ COMMITTED transaction, instead of being declined by the
/// function and run again on the exact path every time; the exact path
/// still decides what it must (a failed expectation, an idempotent
/// re-send).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_take_the_fast_path_whatever_the_default_isolation() {
    let url = common::url_with_options("-c%20default_transaction_isolation%3Dserializable");
    let Some((store, _guard)) = common::open_url_with(url, |b| b).await else { return };
    let isolation = show(&store, "transaction_isolation").await;
    assert_eq!(isolation, "serializable", "the URL's options did not apply");

    let a = stream("iso-a");
    let b = stream("iso-b");
    for n in 0..10 {
        let expected = if n == 0 { ExpectedVersion::NoStream } else { ExpectedVersion::Exact(n - 1) };
        store.append(&a, expected, vec![event(n)]).await.unwrap();
    }
    store
        .append_multi(vec![
            StreamAppend::new(a.clone(), ExpectedVersion::Exact(9), vec![event(10)]),
            StreamAppend::new(b.clone(), ExpectedVersion::Any, vec![event(0), event(1)]),
        ])
        .await
        .unwrap();
    let writers: Vec<_> = (0..8)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let s = stream(&format!("iso-w{w}"));
                for n in 0..20 {
                    store.append(&s, ExpectedVersion::Any, vec![event(n)]).await.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    assert_eq!(store.exact_append_rounds(), 0, "plain appends went to the exact path");

    // What only the exact path decides is still decided there.
    let err = store.append(&a, ExpectedVersion::Exact(3), vec![event(99)]).await.unwrap_err();
    assert!(matches!(err, Error::WrongExpectedVersion { .. }), "{err:?}");
    let again = EventData::json("E", &json!({ "n": 11 })).unwrap();
    let first = store.append(&a, ExpectedVersion::Exact(10), vec![again.clone()]).await.unwrap();
    let resent = store.append(&a, ExpectedVersion::Exact(10), vec![again]).await.unwrap();
    assert_eq!(first, resent, "an idempotent re-send is answered with the first outcome");
    assert_eq!(store.exact_append_rounds(), 2);

    let read = store.read_stream(&a, ReadStream::forward()).await.unwrap();
    let ns: Vec<u64> =
        read.iter().map(|e| e.decode::<serde_json::Value>().unwrap()["n"].as_u64().unwrap()).collect();
    assert_eq!(ns, (0..12).collect::<Vec<_>>());
    let all = store.read_all(ReadAll::forward(1000)).await.unwrap();
    assert_eq!(all.events.len(), 11 + 1 + 2 + 8 * 20);
    assert!(all.events.windows(2).all(|w| w[1].position == w[0].position + 1), "gapless");
}

/// Migration 0009 stores events in runs and removes what processes of
/// earlier versions write through (see its header: they must be stopped
/// first). Should one still run, its writes fail and write nothing, and
/// its reads (through the `events` view) stay correct. These are its
/// statements, verbatim in effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_of_earlier_versions_cannot_write_after_the_runs_migration() {
    let Some((store, guard)) = common::open().await else { return };
    let s = stream("old-1");
    store.append(&s, ExpectedVersion::NoStream, (0..5).map(event).collect()).await.unwrap();
    let q = format!("\"{}\"", guard.schema);
    let old = admin_client().await;

    // Its fast path (0008's append_part) is gone.
    let err = old
        .query_one(
            &format!(
                "SELECT first_position, first_version FROM {q}.append_part(
                     'old-1', 'old', 0::int2, 0::int8, ARRAY[gen_random_uuid()], ARRAY['E'], ARRAY[0::int2],
                     ARRAY['\\x7b7d'::bytea], ARRAY['{{}}'], ARRAY[NULL::text], 'ch')"
            ),
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("42883"), "{err}");
    // Its exact path locks the head, moves it (a no-op since 0008), and
    // inserts into `events`, now a view: refused, and rolled back.
    old.batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED").await.unwrap();
    old.query_one(&format!("SELECT next_position FROM {q}.head FOR NO KEY UPDATE"), &[]).await.unwrap();
    let err = old
        .execute(
            &format!(
                "INSERT INTO {q}.events (position, stream, version, id, event_type, category, content_type, data,
                                         metadata, correlation_id, recorded_at)
                 VALUES (5, 'old-1', 5, gen_random_uuid(), 'E', 'old', 0, '\\x7b7d', '{{}}', NULL, now())"
            ),
            &[],
        )
        .await
        .unwrap_err();
    assert!(err.code().is_some(), "{err}");
    old.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(store.next_position().await.unwrap(), 5, "nothing was written");

    // Its reads see every event, one row each, in order.
    let rows = old
        .query(
            &format!(
                "SELECT e.position, e.version, e.id FROM {q}.events e
                 WHERE e.position >= $1 ORDER BY e.position LIMIT $2"
            ),
            &[&1_i64, &10_i64],
        )
        .await
        .unwrap();
    let read = store.read_stream(&s, ReadStream::forward()).await.unwrap();
    let got: Vec<(i64, i64, uuid::Uuid)> = rows.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect();
    let want: Vec<(i64, i64, uuid::Uuid)> =
        read[1..].iter().map(|e| (e.position as i64, e.version as i64, e.id)).collect();
    assert_eq!(got, want);
    let head: i64 = old.query_one(&format!("SELECT next_position FROM {q}.head"), &[]).await.unwrap().get(0);
    assert_eq!(head, 5);
}

/// Migration 0011 turns `streams` into a view over `stream_rows` and the
/// streams' last runs (see its header). A process of version 10 still
/// running meanwhile: its fast path calls the replaced functions and
/// stays right; its reads of `streams` see the computed state; its exact
/// path and deletes write `streams` and fail, writing nothing. These are
/// its statements, verbatim in effect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processes_of_the_previous_version_stay_correct_after_the_stream_rows_migration() {
    let Some((store, guard)) = common::open().await else { return };
    let s = stream("prev-1");
    store.append(&s, ExpectedVersion::NoStream, (0..3).map(event).collect()).await.unwrap();
    let q = format!("\"{}\"", guard.schema);
    let old = admin_client().await;

    // Its fast path: the same call, now the new function.
    let call = format!(
        "SELECT first_position, first_version FROM {q}.append_part(
             $1, 'prev', 0::int2, 0::int8, ARRAY[1], ARRAY[1], ARRAY['E'], ARRAY[NULL::text],
             ARRAY[gen_random_uuid()], ARRAY[0::int2], ARRAY['\\x7b7d'::bytea], ARRAY['{{}}'], 'ch')"
    );
    let row = old.query_one(&call, &[&"prev-1"]).await.unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (3, 3));
    let row = old.query_one(&call, &[&"prev-2"]).await.unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (4, 0));

    // Its reads of the stream state.
    let state = format!(
        "SELECT last_version, last_position, truncate_before, tombstoned, last_event_id FROM {q}.streams
         WHERE name = $1"
    );
    let last = store.read_stream(&s, ReadStream::backward().limit(1)).await.unwrap();
    let row = old.query_one(&state, &[&"prev-1"]).await.unwrap();
    let got: (Option<i64>, Option<i64>, i64, bool, Option<uuid::Uuid>) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!(got, (Some(3), Some(3), 0, false, Some(last[0].id)));

    // Its exact path: head, then the stream rows through `streams`.
    old.batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED").await.unwrap();
    old.query_one(&format!("SELECT 1 FROM {q}.head_row FOR NO KEY UPDATE"), &[]).await.unwrap();
    let err = old
        .query(
            &format!(
                "INSERT INTO {q}.streams AS st (name, category)
                 SELECT * FROM unnest($1::text[], $2::text[])
                 ON CONFLICT (name) DO UPDATE SET name = excluded.name
                 RETURNING st.name, st.last_version, st.last_position, st.truncate_before, st.tombstoned,
                           st.last_event_id"
            ),
            &[&vec!["prev-1", "prev-3"], &vec!["prev", "prev"]],
        )
        .await
        .unwrap_err();
    // "cannot insert into / update view".
    assert_eq!(err.code().map(|c| c.code()), Some("55000"), "{err}");
    old.batch_execute("ROLLBACK").await.unwrap();
    // Its deletes.
    for delete in [
        format!("UPDATE {q}.streams SET truncate_before = 4 WHERE name = 'prev-1'"),
        format!("UPDATE {q}.streams SET tombstoned = true WHERE name = 'prev-1'"),
    ] {
        let err = old.batch_execute(&delete).await.unwrap_err();
        // "cannot insert into / update view".
        assert_eq!(err.code().map(|c| c.code()), Some("55000"), "{err}");
    }
    let info = store.stream_info(&s).await.unwrap();
    assert!(info.exists && info.last_version == Some(3), "{info:?}");
    assert_eq!(store.next_position().await.unwrap(), 5, "nothing else was written");
}

/// The same, for a process of version 10 that is running while the first
/// process of this version opens the schema (migrations 0011 and 0012):
/// the statements it prepared before the migration are planned again by
/// name, against the views and the replaced functions, so its appends and
/// reads stay right and its writes of stream rows and checkpoints fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_prepared_by_the_previous_version_are_planned_again_after_upgrading() {
    let Some((_probe, _probe_guard)) = common::open().await else { return };
    let (guard, old, q) = schema_at_version(10).await;
    let schema = guard.schema.clone();
    // Version 10's statements, prepared and run once (plans cached).
    let append = old
        .prepare(&format!(
            "SELECT first_position, first_version FROM {q}.append_part(
                 $1, 'roll', 0::int2, 0::int8, ARRAY[1], ARRAY[1], ARRAY['E'], ARRAY[NULL::text],
                 ARRAY[gen_random_uuid()], ARRAY[0::int2], ARRAY['\\x7b7d'::bytea], ARRAY['{{}}'], 'ch')"
        ))
        .await
        .unwrap();
    let state = old
        .prepare(&format!(
            "SELECT last_version, last_position, truncate_before, tombstoned FROM {q}.streams WHERE name = $1"
        ))
        .await
        .unwrap();
    let lock_streams = old
        .prepare(&format!(
            "INSERT INTO {q}.streams AS st (name, category)
             SELECT * FROM unnest($1::text[], $2::text[])
             ON CONFLICT (name) DO UPDATE SET name = excluded.name
             RETURNING st.name, st.last_version, st.last_position, st.truncate_before, st.tombstoned,
                       st.last_event_id"
        ))
        .await
        .unwrap();
    let soft_delete =
        old.prepare(&format!("UPDATE {q}.streams SET truncate_before = $2 WHERE name = $1")).await.unwrap();
    // Its checkpoint statements (unchanged from version 1 to 11).
    let load_checkpoint =
        old.prepare(&format!("SELECT position FROM {q}.checkpoints WHERE name = $1")).await.unwrap();
    let save_checkpoint = old
        .prepare(&format!(
            "INSERT INTO {q}.checkpoints (name, position, updated_at) VALUES ($1, $2, now())
             ON CONFLICT (name) DO UPDATE SET position = excluded.position, updated_at = now()"
        ))
        .await
        .unwrap();
    let lock_checkpoint = old
        .prepare(&format!(
            "INSERT INTO {q}.checkpoints AS c (name) VALUES ($1)
             ON CONFLICT (name) DO UPDATE SET name = excluded.name
             RETURNING c.position"
        ))
        .await
        .unwrap();
    old.execute(&save_checkpoint, &[&"proj", &1i64]).await.unwrap();
    let row = old.query_one(&load_checkpoint, &[&"proj"]).await.unwrap();
    assert_eq!(row.get::<_, Option<i64>>(0), Some(1));
    old.batch_execute("BEGIN").await.unwrap();
    old.query_one(&lock_checkpoint, &[&"proj"]).await.unwrap();
    old.batch_execute("ROLLBACK").await.unwrap();
    for v in 0..2i64 {
        let row = old.query_one(&append, &[&"roll-1"]).await.unwrap();
        assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (v, v));
    }
    let row = old.query_one(&state, &[&"roll-1"]).await.unwrap();
    assert_eq!((row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1)), (Some(1), Some(1)));
    old.batch_execute("BEGIN").await.unwrap();
    old.query(&lock_streams, &[&vec!["roll-2"], &vec!["roll"]]).await.unwrap();
    old.batch_execute("ROLLBACK").await.unwrap();

    // A process of this version opens the schema: migration 11.
    let store = common::reopen(&schema).await;
    let r = store.append(&stream("roll-1"), ExpectedVersion::Exact(1), vec![event(2)]).await.unwrap();
    assert_eq!((r.next_version, r.position), (3, 2));

    // The old process's prepared statements, again.
    let row = old.query_one(&append, &[&"roll-1"]).await.unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (3, 3));
    let row = old.query_one(&state, &[&"roll-1"]).await.unwrap();
    assert_eq!((row.get::<_, Option<i64>>(0), row.get::<_, Option<i64>>(1)), (Some(3), Some(3)));
    old.batch_execute("BEGIN").await.unwrap();
    let err = old.query(&lock_streams, &[&vec!["roll-1"], &vec!["roll"]]).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("55000"), "{err}");
    old.batch_execute("ROLLBACK").await.unwrap();
    let err = old.execute(&soft_delete, &[&"roll-1", &4i64]).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("55000"), "{err}");
    // Checkpoints (migration 0012): the saved one carried over; the old
    // process reads the latest save, and its writes fail.
    assert_eq!(store.load_checkpoint("proj").await.unwrap(), Some(1));
    store.save_checkpoint("proj", 2).await.unwrap();
    let row = old.query_one(&load_checkpoint, &[&"proj"]).await.unwrap();
    assert_eq!(row.get::<_, Option<i64>>(0), Some(2));
    let err = old.execute(&save_checkpoint, &[&"proj", &3i64]).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("55000"), "{err}");
    old.batch_execute("BEGIN").await.unwrap();
    let err = old.query_one(&lock_checkpoint, &[&"proj"]).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("55000"), "{err}");
    old.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(store.load_checkpoint("proj").await.unwrap(), Some(2));

    let read = store.read_stream(&stream("roll-1"), ReadStream::forward()).await.unwrap();
    assert_eq!(
        read.iter().map(|e| (e.version, e.position)).collect::<Vec<_>>(),
        [(0, 0), (1, 1), (2, 2), (3, 3)]
    );
    let info = store.stream_info(&stream("roll-1")).await.unwrap();
    assert!(info.exists && info.last_version == Some(3), "{info:?}");
    drop(store);
    drop(guard);
}

/// The migration files up to version 10, in order, as released.
const MIGRATIONS_TO_12: [&str; 12] = [
    include_str!("../sql/0001_initial.sql"),
    include_str!("../sql/0002_append_function.sql"),
    include_str!("../sql/0003_head_first.sql"),
    include_str!("../sql/0004_append_commit.sql"),
    include_str!("../sql/0005_streams_by_name.sql"),
    include_str!("../sql/0006_append_part.sql"),
    include_str!("../sql/0007_lease_holders.sql"),
    include_str!("../sql/0008_head_lock_only.sql"),
    include_str!("../sql/0009_runs.sql"),
    include_str!("../sql/0010_runs_lz4.sql"),
    include_str!("../sql/0011_stream_rows.sql"),
    include_str!("../sql/0012_checkpoint_saves.sql"),
];

/// A fresh schema migrated by hand to `version` (as a process of that
/// version would have left it), with the admin connection that did it and
/// the quoted schema name.
async fn schema_at_version(version: usize) -> (common::SchemaGuard, tokio_postgres::Client, String) {
    let guard = common::SchemaGuard { schema: common::fresh_schema() };
    let q = format!("\"{}\"", guard.schema);
    let admin = admin_client().await;
    admin
        .batch_execute(&format!(
            "SET client_min_messages = warning;
             CREATE SCHEMA {q};
             CREATE TABLE {q}.schema_migrations (version integer PRIMARY KEY, name text NOT NULL,
                                                  applied_at timestamptz NOT NULL DEFAULT now());"
        ))
        .await
        .unwrap();
    for (i, sql) in MIGRATIONS_TO_12[..version].iter().enumerate() {
        admin.batch_execute(&sql.replace("{schema}", &q)).await.unwrap();
        admin
            .execute(
                &format!("INSERT INTO {q}.schema_migrations (version, name) VALUES ($1, 'old')"),
                &[&(i as i32 + 1)],
            )
            .await
            .unwrap();
    }
    (guard, admin, q)
}

/// An expected event: (stream, version, position, id, type).
type Expected = (String, u64, u64, uuid::Uuid, String);

fn summary(events: &[RecordedEvent]) -> Vec<Expected> {
    events.iter().map(|e| (e.stream.to_string(), e.version, e.position, e.id, e.event_type.clone())).collect()
}

/// `$all` pages over runs of user and system streams (system streams are
/// left out by default, which the page's first, position-range read cannot
/// know in advance): from every position, forward and backward, with and
/// without system streams, each page holds exactly the events a
/// row-per-event log would, and `next` continues without a gap or repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_pages_over_system_runs_lose_and_repeat_nothing() {
    let Some((store, _guard)) = common::open().await else { return };
    let sys = StreamName::system("$sys-1").unwrap();
    let (u1, u2) = (stream("u-1"), stream("u-2"));
    let appends: Vec<(&StreamName, usize)> =
        vec![(&u1, 3), (&sys, 4), (&u1, 1), (&sys, 150), (&u2, 120), (&sys, 1), (&u1, 1), (&sys, 2)];
    // (position, system?, id) of every event, in log order.
    let mut log: Vec<(u64, bool, uuid::Uuid)> = Vec::new();
    for (s, n) in appends {
        let batch: Vec<EventData> = (0..n).map(|i| event(i as u64)).collect();
        store.append(s, ExpectedVersion::Any, batch.clone()).await.unwrap();
        for e in batch {
            log.push((log.len() as u64, s.as_str().starts_with('$'), e.id));
        }
    }
    let head = log.len() as u64;
    for include_system in [false, true] {
        let filter = Filter { include_system, ..Filter::all() };
        let visible: Vec<(u64, uuid::Uuid)> = log
            .iter()
            .filter(|(_, system, _)| include_system || !system)
            .map(|(p, _, id)| (*p, *id))
            .collect();
        for limit in [1usize, 3, 200] {
            for from in 0..=head {
                let page = store
                    .read_all(ReadAll::forward(limit).from_position(from).filter(filter.clone()))
                    .await
                    .unwrap();
                let want: Vec<(u64, uuid::Uuid)> =
                    visible.iter().filter(|(p, _)| *p >= from).take(limit).copied().collect();
                let got: Vec<(u64, uuid::Uuid)> = page.events.iter().map(|e| (e.position, e.id)).collect();
                assert_eq!(got, want, "forward from {from}, limit {limit}, system {include_system}");
                let next = if want.len() == limit { want[limit - 1].0 + 1 } else { head };
                assert_eq!(page.next, Some(next), "forward next from {from}, limit {limit}");

                let page = store
                    .read_all(ReadAll::backward(limit).from_position(from).filter(filter.clone()))
                    .await
                    .unwrap();
                let want: Vec<(u64, uuid::Uuid)> =
                    visible.iter().rev().filter(|(p, _)| *p <= from).take(limit).copied().collect();
                let got: Vec<(u64, uuid::Uuid)> = page.events.iter().map(|e| (e.position, e.id)).collect();
                assert_eq!(got, want, "backward from {from}, limit {limit}, system {include_system}");
            }
        }
    }
}

/// Runs (migration 0009): one append is cut into rows at every change of
/// type or correlation id, at 100 events and at 64 KiB of data, and every
/// read that starts inside a run (stream forward and backward, `$all`
/// forward and backward, filtered by type, with a truncated stream) returns
/// exactly the events a row-per-event log would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_split_where_they_must_and_reads_start_anywhere_in_them() {
    let Some((store, guard)) = common::open().await else { return };
    let s = stream("runs-1");
    let other = stream("other-1");
    store.append(&other, ExpectedVersion::NoStream, vec![event(0)]).await.unwrap();
    // 130 of A (runs of 100 + 30), 1 of B, 5 of A under correlation id c1,
    // 5 more of A without, then 3 of A of 30 KiB each (the run is cut by
    // bytes before the third).
    let mut batch: Vec<EventData> =
        (0..130).map(|i| EventData::json("A", &json!({ "i": i })).unwrap()).collect();
    batch.push(EventData::json("B", &json!({ "b": 1 })).unwrap());
    for i in 0..5 {
        let meta = annals_core::Metadata::from_value(json!({ "correlation_id": "c1" })).unwrap();
        batch.push(EventData::json("A", &json!({ "c": i })).unwrap().with_metadata(meta));
    }
    batch.extend((0..5).map(|i| EventData::json("A", &json!({ "d": i })).unwrap()));
    batch.extend(
        (0..3).map(|i| EventData::raw("A", vec![b'x'; 30 * 1024 + i], annals_core::ContentType::Binary)),
    );
    let total = batch.len() as u64;
    let written = store.append(&s, ExpectedVersion::NoStream, batch.clone()).await.unwrap();
    assert_eq!((written.next_version, written.position), (total, total));
    store.append(&other, ExpectedVersion::Exact(0), vec![event(1)]).await.unwrap();

    let admin = admin_client().await;
    let runs: Vec<(i64, i32, String, Option<String>)> = admin
        .query(
            &format!(
                "SELECT first_version, n, event_type, correlation_id FROM \"{}\".runs
                 WHERE stream = 'runs-1' ORDER BY first_version",
                guard.schema
            ),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    let c1 = Some("c1".to_owned());
    assert_eq!(
        runs,
        vec![
            (0, 100, "A".into(), None),
            (100, 30, "A".into(), None),
            (130, 1, "B".into(), None),
            (131, 5, "A".into(), c1),
            // The five plain ones and two 30 KiB ones; the third would
            // pass 64 KiB.
            (136, 7, "A".into(), None),
            (143, 1, "A".into(), None),
        ]
    );

    // Runs over the TOAST threshold are compressed with lz4 (migration
    // 0010) where the server has it.
    if admin.batch_execute("SET default_toast_compression = lz4").await.is_ok() {
        let method: Option<String> = admin
            .query_one(
                &format!(
                    "SELECT pg_column_compression(data) FROM \"{}\".runs
                     WHERE stream = 'runs-1' AND first_version = 0",
                    guard.schema
                ),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(method.as_deref(), Some("lz4"));
    }

    // The log as a row per event would hold it.
    let mut log: Vec<Expected> = vec![("other-1".into(), 0, 0, uuid::Uuid::nil(), "E".into())];
    for (i, e) in batch.iter().enumerate() {
        log.push(("runs-1".into(), i as u64, 1 + i as u64, e.id, e.event_type.clone()));
    }
    log.push(("other-1".into(), 1, total + 1, uuid::Uuid::nil(), "E".into()));
    let all = store.read_all(ReadAll::forward(1000)).await.unwrap();
    log[0].3 = all.events[0].id;
    let last = log.len() - 1;
    log[last].3 = all.events[all.events.len() - 1].id;
    assert_eq!(summary(&all.events), log);
    let mine: Vec<Expected> = log.iter().filter(|e| e.0 == "runs-1").cloned().collect();

    for from in 0..total {
        let f = from as usize;
        let page = store.read_stream(&s, ReadStream::forward().from_version(from).limit(3)).await.unwrap();
        assert_eq!(summary(&page), mine[f..(f + 3).min(mine.len())], "stream forward from {from}");
        let page = store.read_stream(&s, ReadStream::backward().from_version(from).limit(3)).await.unwrap();
        let want: Vec<Expected> = mine[f.saturating_sub(2)..=f].iter().rev().cloned().collect();
        assert_eq!(summary(&page), want, "stream backward from {from}");
    }
    for from in 0..log.len() as u64 {
        let f = from as usize;
        let page = store.read_all(ReadAll::forward(2).from_position(from)).await.unwrap();
        assert_eq!(summary(&page.events), log[f..(f + 2).min(log.len())], "$all forward from {from}");
        let page = store.read_all(ReadAll::backward(2).from_position(from)).await.unwrap();
        let want: Vec<Expected> = log[f.saturating_sub(1)..=f].iter().rev().cloned().collect();
        assert_eq!(summary(&page.events), want, "$all backward from {from}");
    }
    // Filtered by type: every B and the A after it, from inside the runs.
    let only_b = Filter { event_types: vec![annals_core::TypeMatch::Exact("B".into())], ..Filter::all() };
    for from in [0, 50, 131] {
        let page =
            store.read_all(ReadAll::forward(10).from_position(from).filter(only_b.clone())).await.unwrap();
        assert_eq!(page.events.iter().map(|e| e.position).collect::<Vec<_>>(), [131], "type B from {from}");
    }
    let page = store.read_all(ReadAll::forward(10).from_position(132).filter(only_b)).await.unwrap();
    assert!(page.events.is_empty());
    // Correlation id: the five, from anywhere before or inside them.
    for from in [0, 133] {
        let by = Filter { correlation_id: Some("c1".into()), ..Filter::all() };
        let page = store.read_all(ReadAll::forward(10).from_position(from).filter(by)).await.unwrap();
        let want: Vec<u64> = (132.max(from)..137).collect();
        assert_eq!(page.events.iter().map(|e| e.position).collect::<Vec<_>>(), want, "c1 from {from}");
    }

    // A re-send of the whole batch, or of its last events, is recognised.
    let again = store.append(&s, ExpectedVersion::NoStream, batch.clone()).await.unwrap();
    assert_eq!(again, written);
    let tail = batch[batch.len() - 3..].to_vec();
    let again = store.append(&s, ExpectedVersion::Exact(total - 4), tail).await.unwrap();
    assert_eq!(again, written);

    // Truncated inside a run: reads start at the first visible version.
    store.delete_stream(&s, ExpectedVersion::Exact(total - 1), DeleteMode::Soft).await.unwrap();
    let more: Vec<EventData> = (0..150).map(|i| EventData::json("A", &json!({ "m": i })).unwrap()).collect();
    store.append(&s, ExpectedVersion::NoStream, more.clone()).await.unwrap();
    let read = store.read_stream(&s, ReadStream::forward()).await.unwrap();
    assert_eq!(read.iter().map(|e| e.id).collect::<Vec<_>>(), more.iter().map(|e| e.id).collect::<Vec<_>>());
    assert_eq!(read[0].version, total);
    let back = store.read_stream(&s, ReadStream::backward()).await.unwrap();
    assert_eq!(back.len(), 150);
    assert_eq!(back.last().map(|e| e.version), Some(total));
    let stats = store.store_stats().await.unwrap();
    let counts = stats.events_by_type.unwrap();
    assert_eq!(counts.get("A").copied(), Some(total - 1 + 150));
    assert_eq!(counts.get("B").copied(), Some(1));
}

/// The pid of this schema's pooled connection that waits for a lock.
async fn waiting_backend(schema: &str) -> i32 {
    let admin = admin_client().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let rows = admin
            .query(
                "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
                &[&format!("annals {schema}")],
            )
            .await
            .unwrap();
        if let Some(row) = rows.first() {
            return row.get::<_, i32>(0);
        }
        assert!(tokio::time::Instant::now() < deadline, "nothing of {schema} ever waited for a lock");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// An admin session inside a transaction that holds `schema`'s head lock,
/// so every append of the schema waits (on a backend the test can find
/// with [`waiting_backend`]) until it ends with `ROLLBACK`.
async fn holding_the_head(schema: &str) -> tokio_postgres::Client {
    let blocker = admin_client().await;
    blocker.batch_execute(&format!("BEGIN; SELECT * FROM \"{schema}\".head_row FOR UPDATE")).await.unwrap();
    blocker
}

/// A setting as the store's own sessions see it.
async fn show(store: &PgStore, setting: &str) -> String {
    let client = store.store_pool().get().await.unwrap();
    client.query_one(&format!("SHOW {setting}"), &[]).await.unwrap().get(0)
}

async fn admin_client() -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(&common::url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// The server ends the store's sessions that sit idle inside a transaction
/// (a stopped client holding the head would otherwise stop every append),
/// but not a checkpoint transaction, which waits on the projection's code
/// between its statements. (The limit is lowered through the URL here; the
/// store's default is a minute.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_transactions_end_except_checkpoint_transactions() {
    let url = common::url_with_options("-c%20idle_in_transaction_session_timeout%3D300");
    let Some((store, _guard)) = common::open_url_with(url, |b| b).await else { return };
    let idle = Duration::from_millis(1000);

    let tx = store.begin_checkpoint_tx("slow-projection").await.unwrap();
    tokio::time::sleep(idle).await;
    assert_eq!(tx.query_one("SELECT 1::int4", &[]).await.unwrap().get::<_, i32>(0), 1);
    tokio::time::sleep(idle).await;
    tx.commit(7).await.unwrap();
    assert_eq!(store.load_checkpoint("slow-projection").await.unwrap(), Some(7));

    let client = store.store_pool().get().await.unwrap();
    client.batch_execute("BEGIN").await.unwrap();
    tokio::time::sleep(idle).await;
    let ended = client.query_one("SELECT 1", &[]).await.unwrap_err();
    assert!(
        ended.is_closed()
            || ended.code() == Some(&tokio_postgres::error::SqlState::IDLE_IN_TRANSACTION_SESSION_TIMEOUT),
        "{ended:?}"
    );
}

/// A projection's writes and its checkpoint commit together or not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_transaction_is_exactly_once() {
    let Some((store, guard)) = common::open().await else { return };
    let admin = admin_client().await;
    let table = format!("\"{}\".balances", guard.schema);
    admin
        .batch_execute(&format!("CREATE TABLE {table} (account text PRIMARY KEY, amount bigint NOT NULL)"))
        .await
        .unwrap();
    for i in 0..6u64 {
        store
            .append(&stream(&format!("acct-{}", i % 2)), ExpectedVersion::Any, vec![event(i)])
            .await
            .unwrap();
    }
    let upsert = format!(
        "INSERT INTO {table} VALUES ($1, $2)
         ON CONFLICT (account) DO UPDATE SET amount = {table}.amount + excluded.amount"
    );

    // Apply events 0..=2 and commit checkpoint 2.
    let tx = store.begin_checkpoint_tx("balances").await.unwrap();
    assert_eq!(tx.checkpoint(), None);
    let page = store.read_all(ReadAll::forward(3)).await.unwrap();
    for e in &page.events {
        tx.execute(&upsert, &[&e.stream.as_str(), &(e.position as i64 + 1)]).await.unwrap();
    }
    tx.commit(2).await.unwrap();
    assert_eq!(store.load_checkpoint("balances").await.unwrap(), Some(2));

    // A crash mid-batch (the transaction is dropped): nothing of it stays.
    let tx = store.begin_checkpoint_tx("balances").await.unwrap();
    assert_eq!(tx.checkpoint(), Some(2));
    tx.execute(&upsert, &[&"acct-1", &1000_i64]).await.unwrap();
    drop(tx);
    // A failing statement: the transaction is unusable and rolls back.
    let tx = store.begin_checkpoint_tx("balances").await.unwrap();
    tx.execute(&upsert, &[&"acct-0", &1000_i64]).await.unwrap();
    assert!(tx.execute("SELECT * FROM no_such_table", &[]).await.is_err());
    assert!(tx.commit(99).await.is_err());
    assert_eq!(store.load_checkpoint("balances").await.unwrap(), Some(2));
    // A position no bigint holds: refused (not clamped), all rolled back.
    let tx = store.begin_checkpoint_tx("balances").await.unwrap();
    tx.execute(&upsert, &[&"acct-0", &1000_i64]).await.unwrap();
    let err = tx.commit(u64::MAX).await.unwrap_err();
    assert!(matches!(err, annals_core::Error::InvalidInput { .. }), "{err:?}");
    assert_eq!(store.load_checkpoint("balances").await.unwrap(), Some(2));

    // Resume after the checkpoint: every event applied exactly once.
    let tx = store.begin_checkpoint_tx("balances").await.unwrap();
    let from = tx.checkpoint().map_or(0, |p| p + 1);
    let page = store.read_all(ReadAll::forward(100).from_position(from)).await.unwrap();
    for e in &page.events {
        tx.execute(&upsert, &[&e.stream.as_str(), &(e.position as i64 + 1)]).await.unwrap();
    }
    tx.commit(5).await.unwrap();
    let rows =
        admin.query(&format!("SELECT account, amount FROM {table} ORDER BY account"), &[]).await.unwrap();
    let got: Vec<(String, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    // acct-0 got positions 0, 2, 4 (+1 each): 1+3+5; acct-1: 2+4+6.
    assert_eq!(got, vec![("acct-0".to_owned(), 9), ("acct-1".to_owned(), 12)]);
    assert_eq!(store.load_checkpoint("balances").await.unwrap(), Some(5));
}

/// A second transaction on the same checkpoint waits for the first and
/// then sees its committed value, so two projection instances never apply
/// the same events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoint_transactions_on_one_name_serialize() {
    let Some((store, _guard)) = common::open().await else { return };
    let first = store.begin_checkpoint_tx("p").await.unwrap();
    let second = {
        let store = store.clone();
        tokio::spawn(async move { store.begin_checkpoint_tx("p").await.unwrap().checkpoint() })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!second.is_finished(), "the second transaction must wait for the lock");
    first.commit(7).await.unwrap();
    assert_eq!(second.await.unwrap(), Some(7));
}

/// Advisory locks belong to the database, not to a schema: checkpoints of
/// one name in two schemas (a tenant per schema running the same
/// projections) must not wait for each other. (Before migration 13 the
/// second schema's save waited for the first schema's transaction, until
/// its answer timeout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_of_one_name_in_two_schemas_do_not_wait_for_each_other() {
    let Some((a, _guard_a)) = common::open().await else { return };
    let Some((b, _guard_b)) = common::open().await else { return };
    let held = a.begin_checkpoint_tx("balances").await.unwrap();
    let soon = Duration::from_secs(5);
    tokio::time::timeout(soon, b.save_checkpoint("balances", 1))
        .await
        .expect("the save waits for another schema's transaction")
        .unwrap();
    let other = tokio::time::timeout(soon, b.begin_checkpoint_tx("balances"))
        .await
        .expect("the transaction waits for another schema's transaction")
        .unwrap();
    assert_eq!(other.checkpoint(), Some(1));
    other.commit(2).await.unwrap();
    held.commit(7).await.unwrap();
    assert_eq!(a.load_checkpoint("balances").await.unwrap(), Some(7));
    assert_eq!(b.load_checkpoint("balances").await.unwrap(), Some(2));
}

/// Migration 13 changes the checkpoints' lock key while processes of
/// version 12 may be inside a checkpoint transaction: one begun under the
/// old key before the migration must still be waited for by a transaction
/// under the new key, which then sees its save; and its own save, which now
/// runs the new function body, must not deadlock with that waiter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_transaction_begun_before_migration_13_is_waited_for() {
    let (guard, admin, q) = schema_at_version(12).await;
    // A process of version 12: its checkpoint transaction, under the old key.
    admin.batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED").await.unwrap();
    admin.query_one(&format!("SELECT last_position FROM {q}.lock_checkpoint('p')"), &[]).await.unwrap();

    // A process of this version opens the schema (migrating it) meanwhile.
    let store = common::reopen(&guard.schema).await;
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move {
            let tx = store.begin_checkpoint_tx("p").await.unwrap();
            let seen = tx.checkpoint();
            tx.commit(9).await.unwrap();
            seen
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiter.is_finished(), "the new transaction must wait for the old one");
    // The old transaction saves (through the replaced function) and commits.
    tokio::time::timeout(
        Duration::from_secs(10),
        admin.query_one(&format!("SELECT {q}.save_checkpoint('p', 5)"), &[]),
    )
    .await
    .expect("the old transaction's save waits for the new one: a deadlock")
    .unwrap();
    admin.batch_execute("COMMIT").await.unwrap();
    assert_eq!(
        tokio::time::timeout(PATIENCE, waiter).await.expect("the new transaction never ran").unwrap(),
        Some(5)
    );
    assert_eq!(store.load_checkpoint("p").await.unwrap(), Some(9));
}

/// A caller that gives up on `begin_checkpoint_tx` while its `BEGIN` is on
/// the way (a timeout, a `select!`) must not leave the connection in the
/// pool inside the transaction the server still opens: the next append on
/// it would be answered as written, never commit, and hold the head
/// against every other append. A proxy holds the `BEGIN` past the caller's
/// timeout and then lets it through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_transaction_given_up_while_beginning_leaves_no_open_transaction_behind() {
    let Some((writer, guard)) = common::open().await else { return };
    let proxy = common::proxy::Proxy::start().await;
    let store = PgStore::builder(&proxy.url)
        .schema(&guard.schema)
        .max_connections(1)
        .answer_timeout(Duration::from_secs(5))
        .open()
        .await
        .unwrap();
    // The one pooled connection exists and is idle.
    assert_eq!(store.next_position().await.unwrap(), 0);
    proxy.hold(format!("annals {}", guard.schema).as_bytes());
    let begun = tokio::time::timeout(Duration::from_millis(300), store.begin_checkpoint_tx("balances")).await;
    assert!(begun.is_err(), "the held BEGIN cannot have been answered");
    // The proxy recovers: the server runs the BEGIN after all.
    proxy.resume().await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let s = stream("after-a-given-up-checkpoint-1");
    let written = tokio::time::timeout(PATIENCE, store.append(&s, ExpectedVersion::NoStream, vec![event(0)]))
        .await
        .expect("the append hung")
        .unwrap();
    assert_eq!(written.position, 0);
    let read = writer.read_stream(&s, ReadStream::forward()).await;
    assert!(
        matches!(&read, Ok(events) if events.len() == 1),
        "the append was answered as written; another store reads {read:?}"
    );
    // And the head is free: another store appends at once.
    tokio::time::timeout(
        Duration::from_secs(10),
        writer.append(&stream("other-1"), ExpectedVersion::Any, vec![event(1)]),
    )
    .await
    .expect("another store's append waits for the head")
    .unwrap();
}

/// The same when the URL makes every session SERIALIZABLE (migrations run
/// READ COMMITTED whatever the default: under a transaction snapshot the
/// second opener read the applied version from before the first one's
/// commit and failed with "relation already exists", every time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_safe_concurrently_whatever_the_default_isolation() {
    let Some((_probe, _probe_guard)) = common::open().await else { return };
    let url = common::url_with_options("-c%20default_transaction_isolation%3Dserializable");
    for round in 0..3 {
        let guard = common::SchemaGuard { schema: common::fresh_schema() };
        let open = || PgStore::builder(url.clone()).schema(&guard.schema).max_connections(2).open();
        let (a, b) = tokio::join!(open(), open());
        for opened in [a, b] {
            opened.unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
    }
}

/// Opening twice at once on a fresh schema, and again later, is safe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrations_are_idempotent_and_safe_concurrently() {
    let Some((_probe, _probe_guard)) = common::open().await else { return };
    let schema = common::fresh_schema();
    let guard = common::SchemaGuard { schema: schema.clone() };
    let (a, b) = tokio::join!(common::try_reopen(&schema), common::try_reopen(&schema));
    let (a, b) = (a.unwrap(), b.unwrap());
    a.append(&stream("m-1"), ExpectedVersion::NoStream, vec![event(0)]).await.unwrap();
    let c = common::reopen(&schema).await;
    assert_eq!(c.next_position().await.unwrap(), 1);
    assert_eq!(b.next_position().await.unwrap(), 1);
    let admin = admin_client().await;
    let applied: i64 = admin
        .query_one(&format!("SELECT count(*) FROM \"{}\".schema_migrations", guard.schema), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(applied, i64::from(annals_postgres::latest_migration()));
}

/// A schema written by the previous version (migrations 1 to 8, events
/// one row each, with soft-deleted and system streams, metadata and
/// correlation ids) is upgraded on open to runs (0009): every event reads
/// back as it was, the head and stream states carry over, and appends
/// continue the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_of_the_previous_version_upgrades_to_runs_with_every_event() {
    let Some((_probe, _probe_guard)) = common::open().await else { return };
    let (guard, admin, q) = schema_at_version(8).await;
    let schema = guard.schema.clone();
    // Events written the previous version's way: its append_part, one call
    // per append (a few events each), then a soft delete.
    let call = format!(
        "SELECT first_position FROM {q}.append_part($1, $2, 0::int2, 0::int8, $3::uuid[], $4::text[],
             $5::int2[], $6::bytea[], $7::text[], $8::text[], 'ch')"
    );
    let mut written: Vec<(String, uuid::Uuid, String, Vec<u8>, String)> = Vec::new();
    for (i, name) in ["acct-1", "acct-2", "$sys-1", "acct-1", "acct-1"].iter().enumerate() {
        let ids: Vec<uuid::Uuid> = (0..3).map(|_| uuid::Uuid::now_v7()).collect();
        let types: Vec<String> = (0..3).map(|j| format!("T{}", (i + j) % 2)).collect();
        let data: Vec<Vec<u8>> = (0..3).map(|j| format!("{{\"i\":{i},\"j\":{j}}}").into_bytes()).collect();
        let metadata: Vec<String> =
            (0..3).map(|j| format!("{{\"correlation_id\":\"c{}\"}}", (i + j) % 3)).collect();
        let correlation: Vec<Option<String>> = (0..3).map(|j| Some(format!("c{}", (i + j) % 3))).collect();
        let content: Vec<i16> = vec![0; 3];
        let category = name.split('-').next().unwrap().to_owned();
        admin
            .query_one(&call, &[name, &category, &ids, &types, &content, &data, &metadata, &correlation])
            .await
            .unwrap();
        for j in 0..3 {
            written.push((name.to_string(), ids[j], types[j].clone(), data[j].clone(), metadata[j].clone()));
        }
    }
    admin
        .batch_execute(&format!("UPDATE {q}.streams SET truncate_before = 3 WHERE name = 'acct-2'"))
        .await
        .unwrap();

    admin
        .batch_execute(&format!(
            "INSERT INTO {q}.checkpoints (name, position) VALUES ('proj', 14), ('unset', NULL)"
        ))
        .await
        .unwrap();

    let store = common::reopen(&schema).await;
    assert_eq!(store.load_checkpoint("proj").await.unwrap(), Some(14));
    assert_eq!(store.load_checkpoint("unset").await.unwrap(), None);
    let applied: i32 = admin
        .query_one(&format!("SELECT max(version) FROM {q}.schema_migrations"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(applied, annals_postgres::latest_migration());
    let all = store
        .read_all(ReadAll::forward(100).filter(Filter { include_system: true, ..Filter::all() }))
        .await
        .unwrap();
    let got: Vec<(String, uuid::Uuid, String, Vec<u8>, String)> = all
        .events
        .iter()
        .map(|e| {
            let meta = String::from_utf8(e.metadata.as_bytes().to_vec()).unwrap();
            (e.stream.to_string(), e.id, e.event_type.clone(), e.data.to_vec(), meta)
        })
        .collect();
    assert_eq!(got, written);
    assert_eq!(all.events.iter().map(|e| e.position).collect::<Vec<_>>(), (0..15).collect::<Vec<_>>());
    assert_eq!(all.next, Some(15));
    let by_correlation = Filter { correlation_id: Some("c1".into()), include_system: true, ..Filter::all() };
    let c1 = store.read_all(ReadAll::forward(100).filter(by_correlation)).await.unwrap();
    assert_eq!(c1.events.len(), written.iter().filter(|w| w.4.contains("\"c1\"")).count());
    let acct1 = store.read_stream(&stream("acct-1"), ReadStream::forward()).await.unwrap();
    assert_eq!(acct1.iter().map(|e| e.version).collect::<Vec<_>>(), (0..9).collect::<Vec<_>>());
    // Stream states come from the last runs since 0011.
    let info = store.stream_info(&stream("acct-1")).await.unwrap();
    assert_eq!((info.exists, info.last_version, info.last_position), (true, Some(8), Some(14)));
    let info = store.stream_info(&stream("acct-2")).await.unwrap();
    assert_eq!((info.exists, info.last_version, info.last_position), (false, Some(2), Some(5)));
    // The soft delete carried over; the stream continues its numbering.
    assert!(matches!(
        store.read_stream(&stream("acct-2"), ReadStream::forward()).await,
        Err(Error::StreamNotFound { .. })
    ));
    let next = store.append(&stream("acct-2"), ExpectedVersion::NoStream, vec![event(9)]).await.unwrap();
    assert_eq!((next.next_version, next.position), (4, 15));
    let next = store.append(&stream("acct-1"), ExpectedVersion::Exact(8), vec![event(10)]).await.unwrap();
    assert_eq!((next.next_version, next.position), (10, 16));
    drop(guard);
}

/// Concurrent appends share transactions (group commit) but are decided
/// one by one: failures do not take others down, and a request sent twice
/// at once (a client retry racing its original) is written once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grouped_appends_are_decided_independently() {
    let Some((store, _guard)) = common::open().await else { return };
    let resent = vec![event(0), event(1)];
    let mut tasks = Vec::new();
    for w in 0..24u64 {
        let store = store.clone();
        let resent = resent.clone();
        tasks.push(tokio::spawn(async move {
            match w % 3 {
                0 => {
                    store.append(&stream(&format!("ok-{w}")), ExpectedVersion::NoStream, vec![event(w)]).await
                }
                1 => {
                    store
                        .append(&stream(&format!("bad-{w}")), ExpectedVersion::Exact(5), vec![event(w)])
                        .await
                }
                _ => store.append(&stream("twice-1"), ExpectedVersion::NoStream, resent).await,
            }
        }));
    }
    let mut resend_results = Vec::new();
    for (w, t) in tasks.into_iter().enumerate() {
        let r = t.await.unwrap();
        match w % 3 {
            0 => assert_eq!(r.unwrap().next_version, 1),
            1 => assert!(matches!(r, Err(Error::WrongExpectedVersion { actual: None, .. })), "{r:?}"),
            _ => resend_results.push(r.unwrap()),
        }
    }
    assert!(resend_results.windows(2).all(|w| w[0] == w[1]), "{resend_results:?}");
    assert_eq!(resend_results[0].next_version, 2);
    assert_eq!(store.next_position().await.unwrap(), 8 + 2);
    for w in (1..24).step_by(3) {
        assert!(!store.stream_info(&stream(&format!("bad-{w}"))).await.unwrap().exists);
    }
}

/// Drops its role when dropped (after the schemas it owns are gone).
struct RoleGuard(String);

impl Drop for RoleGuard {
    fn drop(&mut self) {
        let role = self.0.clone();
        common::blocking_admin(move |client| async move {
            let sql =
                format!("SET lock_timeout = '10s'; DROP OWNED BY \"{role}\"; DROP ROLE IF EXISTS \"{role}\"");
            let _ = tokio::time::timeout(Duration::from_secs(30), client.batch_execute(&sql)).await;
        });
    }
}

/// A role that owns the store's schema (created for it by an
/// administrator, the usual least-privilege setup) but may not create
/// schemas in the database opens the store, migrating its schema, and
/// opens it again once migrated. Before, every open ran `CREATE SCHEMA IF
/// NOT EXISTS`, which PostgreSQL checks the database's CREATE privilege for
/// before it looks whether the schema exists: "permission denied for
/// database", every time, although nothing needed creating.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_owning_its_schema_opens_the_store_without_creating_schemas() {
    let Some((_probe, _probe_guard)) = common::open().await else { return };
    let role = format!("annals_r_{}", uuid::Uuid::new_v4().simple());
    let _role = RoleGuard(role.clone());
    let guard = common::SchemaGuard { schema: common::fresh_schema() };
    let admin = admin_client().await;
    admin
        .batch_execute(&format!(
            "CREATE ROLE \"{role}\" LOGIN NOSUPERUSER NOCREATEDB; CREATE SCHEMA \"{}\" AUTHORIZATION \"{role}\"",
            guard.schema
        ))
        .await
        .unwrap();
    let url = common::plain_url();
    let as_role = format!("{url}&user={role}");
    let open = || PgStore::builder(as_role.clone()).schema(&guard.schema).max_connections(2).open();
    let store = open().await.unwrap_or_else(|e| panic!("first open, migrating: {e}"));
    let s = stream("owned-1");
    store.append(&s, ExpectedVersion::NoStream, vec![event(0)]).await.unwrap();
    drop(store);
    let store = open().await.unwrap_or_else(|e| panic!("second open, migrated: {e}"));
    assert_eq!(store.read_stream(&s, ReadStream::forward()).await.unwrap().len(), 1);
    let owner: String = admin
        .query_one(
            "SELECT tableowner::text FROM pg_tables WHERE schemaname = $1 AND tablename = 'runs'",
            &[&guard.schema],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, role);
}

/// A database migrated by a newer build is refused, not silently used.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_from_a_newer_version_is_refused() {
    let Some((_store, guard)) = common::open().await else { return };
    let admin = admin_client().await;
    admin
        .execute(
            &format!(
                "INSERT INTO \"{}\".schema_migrations (version, name) VALUES (9999, 'future')",
                guard.schema
            ),
            &[],
        )
        .await
        .unwrap();
    let err = common::try_reopen(&guard.schema).await.unwrap_err();
    assert!(matches!(err, PgError::SchemaTooNew { found: 9999, .. }), "{err:?}");
}

#[tokio::test]
async fn bad_url_is_a_typed_error() {
    let err = PgStore::connect("this is not a url ://").await.unwrap_err();
    assert!(matches!(err, PgError::InvalidUrl { .. }), "{err:?}");
    let err = PgStore::connect("postgres://u@h:notaport/db").await.unwrap_err();
    assert!(matches!(err, PgError::InvalidUrl { .. }), "{err:?}");
    let core: Error = err.into();
    assert!(matches!(core, Error::InvalidInput { .. }), "{core:?}");
}

#[test]
fn opening_outside_a_tokio_runtime_is_a_typed_error() {
    let err = futures::executor::block_on(PgStore::connect(common::url())).unwrap_err();
    assert!(matches!(err, PgError::NoRuntime), "{err:?}");
}

#[tokio::test]
async fn bad_schema_name_is_a_typed_error() {
    // `pg_` names the system's schemas: PostgreSQL refuses to create one
    // (SQLSTATE 42939) or to create tables in pg_catalog, which came back as
    // a database error from the migrations rather than as a bad name.
    for bad in ["", "Upper", "1digit", "semi;colon", &"x".repeat(57), "pg_annals", "pg_catalog", "pg_toast"] {
        let err = PgStore::builder(common::url()).schema(bad).open().await.unwrap_err();
        assert!(matches!(err, PgError::InvalidSchemaName { .. }), "{bad:?}: {err:?}");
    }
}

/// An append is one statement: limits that would let one outgrow what
/// PostgreSQL takes are refused when the store opens, and an append over
/// the limit is refused before anything is sent (a 1.1 GB append used to
/// break the connection and come back as "outcome unknown, re-send it").
#[tokio::test]
async fn append_size_beyond_what_postgres_takes_is_refused() {
    let limits = annals_core::Limits {
        max_append_size: annals_postgres::MAX_APPEND_SIZE + 1,
        ..annals_core::Limits::default()
    };
    let err = PgStore::builder(common::url()).schema(common::fresh_schema()).limits(limits).open().await;
    assert!(matches!(err, Err(PgError::InvalidLimits { .. })), "{err:?}");
    let err: Error = err.unwrap_err().into();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err:?}");

    let limits = annals_core::Limits { max_append_size: 1024, ..annals_core::Limits::default() };
    let Some((store, _guard)) = common::open_with(|b| b.limits(limits)).await else { return };
    let big = EventData::raw("E", vec![0u8; 1024], annals_core::ContentType::Binary);
    let err = store.append(&stream("size-1"), ExpectedVersion::Any, vec![big]).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::LimitExceeded { what: annals_core::LimitKind::AppendSize, max: 1024, actual: 1026 }
        ),
        "{err:?}"
    );
    let fits = EventData::raw("E", vec![0u8; 1022], annals_core::ContentType::Binary);
    store.append(&stream("size-1"), ExpectedVersion::NoStream, vec![fits]).await.unwrap();
}

/// Appends that each fit the limits are written however many of them are
/// queued at once: the committer's round (one statement) stays under what
/// PostgreSQL takes. Seventeen appends of 63 MiB each, within the default
/// limits, wait behind a held head. (They went out as one round of 1.1 GB,
/// which broke the connection; the round ran again whole, broke again, and
/// after five attempts every one of them was answered "outcome unknown,
/// re-send it", which with as many writers re-sending fails the same way.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_large_appends_queued_at_once_are_all_written() {
    let Some((store, guard)) = common::open().await else { return };
    let mib = bytes::Bytes::from(vec![7u8; 1024 * 1024]);
    let blocker = holding_the_head(&guard.schema).await;
    let first = tokio::spawn({
        let store = store.clone();
        async move { store.append(&stream("big-0"), ExpectedVersion::Any, vec![event(0)]).await }
    });
    // The first round waits for the head; the others queue behind it.
    let pid = waiting_backend(&guard.schema).await;
    assert!(pid > 0);
    let appends: Vec<_> = (1..=17)
        .map(|i| {
            let store = store.clone();
            let events: Vec<EventData> = (0..63)
                .map(|_| EventData::raw("Big", mib.clone(), annals_core::ContentType::Binary))
                .collect();
            tokio::spawn(async move {
                store.append(&stream(&format!("big-{i}")), ExpectedVersion::NoStream, events).await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    blocker.batch_execute("ROLLBACK").await.unwrap();
    first.await.unwrap().unwrap();
    for (i, append) in appends.into_iter().enumerate() {
        let answered = tokio::time::timeout(Duration::from_secs(300), append).await.expect("hung").unwrap();
        assert!(answered.is_ok(), "append {} of 17: {answered:?}", i + 1);
    }
    assert_eq!(store.next_position().await.unwrap(), 1 + 17 * 63);
}

/// PostgreSQL's timestamps start in 4714 BC: an earlier snapshot time is
/// refused rather than stored as `-infinity` (and read back altered); as a
/// filter bound it selects what it would anyway (the conformance suite's
/// `filter_by_time_range`).
#[tokio::test]
async fn snapshots_dated_before_what_postgres_stores_are_refused_not_altered() {
    let Some((store, _guard)) = common::open().await else { return };
    let s = stream("old-1");
    store.append(&s, ExpectedVersion::NoStream, vec![event(0)]).await.unwrap();
    let at = |micros| annals_core::Snapshot {
        stream: s.clone(),
        version: 0,
        schema_version: 1,
        data: annals_core::Bytes::from_static(b"{}"),
        created_at: annals_core::Timestamp::from_micros(micros),
    };
    for bad in [i64::MIN, -(1 << 62)] {
        let err = store.save_snapshot(at(bad)).await.unwrap_err();
        assert!(matches!(err, Error::InvalidInput { .. }), "{bad}: {err:?}");
    }
    assert!(store.load_snapshot(&s, None).await.unwrap().is_none());
    // The first instant PostgreSQL has (4714-11-24 BC) is kept exactly.
    let first = -210_866_803_200_000_000;
    store.save_snapshot(at(first)).await.unwrap();
    assert_eq!(store.load_snapshot(&s, None).await.unwrap().unwrap().created_at.as_micros(), first);
}

/// A listener connection that goes silent (a cut that leaves it open:
/// nothing closes it, nothing comes back) is given up after the connect
/// timeout and replaced, and reconnect attempts that get no answer are
/// given up too. Meanwhile, as
/// long as the pool's connections work, the head is read through the pool,
/// so live subscriptions still see other processes' commits within a few
/// seconds; once the listener is back, its notifications take over. (The
/// poll once ran only on the listener's own connection: while that could
/// not be made again, live subscriptions saw nothing from other processes
/// at all, for as long as the outage lasted.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_connection_that_goes_silent_is_replaced() {
    let Some((writer, guard)) = common::open().await else { return };
    let proxy = common::proxy::Proxy::start().await;
    let reader = PgStore::builder(proxy.url.clone())
        .schema(&guard.schema)
        .max_connections(4)
        .connect_timeout(Duration::from_millis(500))
        .poll_interval(Duration::from_millis(100))
        .open()
        .await
        .unwrap();
    let s = stream("silent-1");
    let mut sub = reader.subscribe(SubscriptionRequest::all(Filter::all(), SubscribeFrom::Start));
    writer.append(&s, ExpectedVersion::NoStream, vec![event(0)]).await.unwrap();
    assert_eq!(take(&mut sub, 1).await[0].position, 0);
    // Caught up: from here it waits for the head to move.
    assert_quiet(&mut sub).await;

    // The listener's connection (and any new one) swallowed; the pool's
    // connections still work.
    proxy.blackhole(b"annals-listen");
    for n in 1..=2u64 {
        writer.append(&s, ExpectedVersion::Exact(n - 1), vec![event(n)]).await.unwrap();
        let next = tokio::time::timeout(Duration::from_secs(15), take(&mut sub, 1))
            .await
            .expect("an event from another process never arrived while the listener was cut off");
        assert_eq!(next[0].position, n);
    }
    assert_eq!(reader.listener_reconnects(), 0, "no attempt can have got through");
    proxy.restore();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while reader.listener_reconnects() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the listener never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    writer.append(&s, ExpectedVersion::Exact(2), vec![event(3)]).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(15), take(&mut sub, 1))
        .await
        .expect("the event from the other process never arrived after the listener came back");
    assert_eq!(next[0].position, 3);
    assert_eq!(reader.read_all(ReadAll::forward(10)).await.unwrap().events.len(), 4);
}

/// A stream hard-deleted by another process ends this process's live
/// subscription to it with `StreamDeleted` at once: the delete notifies the
/// schema's channel, and the listener wakes the subscriptions and has them
/// read their streams, with no append anywhere needed to wake them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_deleted_by_another_process_ends_its_subscriptions_here_promptly() {
    let Some((deleter, guard)) = common::open().await else { return };
    let watcher = common::reopen(&guard.schema).await;
    let s = stream("gone-1");
    let mut sub = watcher.subscribe(SubscriptionRequest::stream(s.clone(), SubscribeFrom::Start));
    deleter.append(&s, ExpectedVersion::NoStream, vec![event(0), event(1)]).await.unwrap();
    assert_eq!(take(&mut sub, 2).await.len(), 2);
    // Past the subscription's once-a-second re-read of its stream.
    assert_quiet(&mut sub).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;

    deleter.delete_stream(&s, ExpectedVersion::Exact(1), DeleteMode::Hard).await.unwrap();
    match tokio::time::timeout(Duration::from_secs(5), sub.next()).await {
        Ok(Some(Err(Error::StreamDeleted { .. }))) => {}
        other => panic!("expected StreamDeleted, got {:?}", other.map(|o| o.map(|r| r.map(|e| e.version)))),
    }
    assert!(tokio::time::timeout(Duration::from_secs(5), sub.next()).await.expect("ends").is_none());
}

/// The same when the deletion's notification is lost, the listener's
/// connection being cut off when it is sent: once the listener is back, the
/// subscription reads its stream and ends with `StreamDeleted`, as a head
/// missed meanwhile is read at once. (A reconnect covered missed heads
/// only: with nothing appended afterwards, the subscription waited for good
/// on a stream that no longer existed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_notified_while_the_listener_was_away_ends_its_subscriptions_when_it_is_back() {
    let Some((deleter, guard)) = common::open().await else { return };
    let proxy = common::proxy::Proxy::start().await;
    let watcher = PgStore::builder(proxy.url.clone())
        .schema(&guard.schema)
        .max_connections(4)
        .connect_timeout(Duration::from_millis(500))
        .poll_interval(Duration::from_millis(100))
        .open()
        .await
        .unwrap();
    let s = stream("gone-away-1");
    let mut sub = watcher.subscribe(SubscriptionRequest::stream(s.clone(), SubscribeFrom::Start));
    deleter.append(&s, ExpectedVersion::NoStream, vec![event(0)]).await.unwrap();
    assert_eq!(take(&mut sub, 1).await.len(), 1);
    // Past the subscription's once-a-second re-read of its stream.
    assert_quiet(&mut sub).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;

    proxy.blackhole(b"annals-listen");
    deleter.delete_stream(&s, ExpectedVersion::Exact(0), DeleteMode::Hard).await.unwrap();
    // Cut off until the listener has given its connection up (a connection
    // is swallowed from the first bytes it passes in the hole: the
    // notification or the next poll) and tries a new one.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let listeners =
        || proxy.startups().iter().filter(|s| s.windows(13).any(|w| w == b"annals-listen")).count();
    while listeners() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the listener never gave its connection up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.restore();
    while watcher.listener_reconnects() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the listener never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match tokio::time::timeout(PATIENCE, sub.next()).await {
        Ok(Some(Err(Error::StreamDeleted { .. }))) => {}
        other => panic!("expected StreamDeleted, got {:?}", other.map(|o| o.map(|r| r.map(|e| e.version)))),
    }
}

/// A pooled connection that stops answering without closing (a stopped
/// server, a wedged proxy: the TCP probes see nothing wrong, the peer's
/// kernel acknowledges) fails the operation on it after the answer timeout
/// instead of hanging it, and is closed rather than reused: once the path
/// is clear, the same store serves again although its swallowed
/// connections stay swallowed. An append that got no answer was not
/// written (it never reached the server) and says so; a live subscription
/// waits the outage out and delivers what was appended meanwhile, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_that_stops_answering_fails_its_operation_and_is_replaced() {
    const POOL: usize = 2;
    let Some((writer, guard)) = common::open().await else { return };
    let proxy = common::proxy::Proxy::start().await;
    let store = PgStore::builder(proxy.url.clone())
        .schema(&guard.schema)
        .max_connections(POOL)
        .connect_timeout(Duration::from_millis(500))
        .answer_timeout(Duration::from_secs(1))
        .poll_interval(Duration::from_millis(100))
        .open()
        .await
        .unwrap();
    let s = stream("mute-1");
    store.append(&s, ExpectedVersion::NoStream, vec![event(0)]).await.unwrap();
    let mut sub = store.subscribe(SubscriptionRequest::all(Filter::all(), SubscribeFrom::Start));
    assert_eq!(take(&mut sub, 1).await[0].position, 0);
    assert_quiet(&mut sub).await;

    // Every connection of the pool, open or new, goes silent; the listener's
    // does not ("annals-listen …").
    let pool_marker = format!("annals {}", guard.schema);
    proxy.blackhole(pool_marker.as_bytes());
    let hung = Duration::from_secs(20);
    let read = tokio::time::timeout(hung, store.read_all(ReadAll::forward(10))).await.expect("the read hung");
    let err = read.unwrap_err();
    assert!(err.is_transient() && err.to_string().contains("no answer from PostgreSQL"), "{err}");
    // Another process appends: the subscription is woken (the listener
    // still works) but cannot read it.
    writer.append(&stream("mute-2"), ExpectedVersion::NoStream, vec![event(2)]).await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(1500), sub.next()).await;
    assert!(
        early.is_err(),
        "delivered through a silent pool: {:?}",
        early.map(|e| e.map(|e| e.map(|e| e.position)))
    );

    // A connection that sat idle in the pool through the outage is still
    // swallowed and costs its first borrower one timeout; every one that
    // timed out was closed. Reused, one of them would fail a read again
    // (the pool hands its idle connections out in turn).
    let read_again = || async {
        let mut failed = 0;
        let mut ok = 0;
        loop {
            match tokio::time::timeout(hung, store.read_all(ReadAll::forward(10))).await.expect("hung") {
                Ok(page) if ok == 2 * POOL => break page,
                Ok(_) => ok += 1,
                Err(e) => {
                    failed += 1;
                    assert!(
                        ok == 0 && failed <= POOL,
                        "a read failed after {ok} good ones and {failed} failures: {e}"
                    );
                }
            }
        }
    };
    proxy.restore();
    // The subscription's read in the outage timed out too; it reads again.
    assert_eq!(take(&mut sub, 1).await[0].position, 1);
    assert_eq!(read_again().await.events.len(), 2);

    // Appends that get no answer fail instead of holding up the store's
    // appends: one, and several queued behind it (rounds of many requests).
    proxy.blackhole(pool_marker.as_bytes());
    let late = event(1);
    let appended =
        tokio::time::timeout(hung, store.append(&s, ExpectedVersion::Exact(0), vec![late.clone()]))
            .await
            .expect("the append hung");
    let err = appended.unwrap_err();
    assert!(err.is_transient(), "{err}");
    let queued: Vec<_> = (0..8u64)
        .map(|w| {
            let store = store.clone();
            let e = event(10 + w);
            tokio::spawn(async move {
                let s = stream(&format!("mute-q{w}"));
                let got =
                    tokio::time::timeout(hung, store.append(&s, ExpectedVersion::NoStream, vec![e.clone()]))
                        .await
                        .expect("a queued append hung");
                (s, e, got)
            })
        })
        .collect();
    let mut resend = Vec::new();
    for q in queued {
        let (s, e, got) = q.await.unwrap();
        let err = got.unwrap_err();
        assert!(err.is_transient(), "{err}");
        resend.push((s, e));
    }
    proxy.restore();
    let page = read_again().await;
    // None of them reached the server.
    let streams: Vec<(String, u64)> =
        page.events.iter().map(|e| (e.stream.to_string(), e.position)).collect();
    assert_eq!(streams, [("mute-1".to_owned(), 0), ("mute-2".to_owned(), 1)]);
    let again = store.append(&s, ExpectedVersion::Exact(0), vec![late]).await.unwrap();
    assert_eq!((again.next_version, again.position), (2, 2));
    for (s, e) in &resend {
        store.append(s, ExpectedVersion::NoStream, vec![e.clone()]).await.unwrap();
    }
    let delivered: Vec<u64> = take(&mut sub, 9).await.iter().map(|e| e.position).collect();
    assert_eq!(delivered, (2..11).collect::<Vec<_>>());
    assert_quiet(&mut sub).await;
    assert_eq!(store.read_all(ReadAll::forward(100)).await.unwrap().events.len(), 11);
}

/// The backend's own error inside a core error, if there is one.
fn pg_error(e: &Error) -> Option<&PgError> {
    match e {
        Error::Backend { source: Some(source), .. } => source.downcast_ref::<PgError>(),
        _ => None,
    }
}

/// Appends queued behind one that gets no answer are answered at once as
/// not sent, instead of each waiting out a timeout of its own: appends to
/// one stream cannot share a round, so twenty of them queued behind a
/// silent database would otherwise take twenty rounds (here at least 20 s)
/// to fail. Once the database answers again the next append goes through,
/// and none of the refused ones was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_queued_behind_one_that_got_no_answer_fail_at_once_unsent() {
    const QUEUED: u64 = 20;
    let Some((writer, guard)) = common::open().await else { return };
    let proxy = common::proxy::Proxy::start().await;
    let store = PgStore::builder(proxy.url.clone())
        .schema(&guard.schema)
        .max_connections(2)
        .connect_timeout(Duration::from_millis(500))
        .answer_timeout(Duration::from_secs(1))
        .open()
        .await
        .unwrap();
    let s = stream("queued-1");
    store.append(&s, ExpectedVersion::NoStream, vec![event(0)]).await.unwrap();

    proxy.blackhole(format!("annals {}", guard.schema).as_bytes());
    let append = |e: EventData, started: std::time::Instant| {
        let (store, s) = (store.clone(), s.clone());
        tokio::spawn(async move {
            let got = tokio::time::timeout(
                Duration::from_secs(60),
                store.append(&s, ExpectedVersion::Any, vec![e.clone()]),
            )
            .await
            .expect("an append hung");
            (e, got, started.elapsed())
        })
    };
    // Two waves: the first behind an append sent on the open connection
    // (no answer to the statement), the second behind one that needs a new
    // connection (no answer to the start-up).
    let mut refused = Vec::new();
    for wave in 0..2u64 {
        let started = std::time::Instant::now();
        let first = append(event(100 * wave + 1), started);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let queued: Vec<_> = (0..QUEUED).map(|n| append(event(100 * wave + 10 + n), started)).collect();
        let (first_event, got, _) = first.await.unwrap();
        let err = got.unwrap_err();
        if wave == 0 {
            // Sent, and the log cannot be searched (no new connection can
            // be made): it may have been written.
            assert!(matches!(err, Error::OutcomeUnknown { .. }), "{err:?}");
        } else {
            // Never sent: the new connection did not answer its start-up.
            assert!(pg_error(&err).is_some_and(|e| matches!(e, PgError::NoAnswer { .. })), "{err:?}");
        }
        refused.push(first_event);
        for q in queued {
            let (e, got, took) = q.await.unwrap();
            let err = got.unwrap_err();
            assert!(
                err.is_transient()
                    && pg_error(&err).is_some_and(|e| matches!(e, PgError::NotAnswering { .. })),
                "wave {wave}: {err:?}"
            );
            // One round (1 s) and its settling (a 500 ms connection
            // attempt), with room to spare; twenty rounds take 20 s and more.
            assert!(
                took < Duration::from_secs(10),
                "wave {wave}: a queued append failed only after {took:?}"
            );
            refused.push(e);
        }
    }

    proxy.restore();
    let ids = |events: Vec<RecordedEvent>| events.into_iter().map(|e| e.id).collect::<Vec<_>>();
    let read = ids(writer.read_stream(&s, ReadStream::forward()).await.unwrap());
    assert_eq!(read.len(), 1, "a refused append was written");
    // The store is not left refusing: once the connection that sat idle
    // through the outage has cost its borrower one timeout, re-sends land,
    // each once.
    for e in &refused {
        let mut tries = 0;
        while let Err(err) = store.append(&s, ExpectedVersion::Any, vec![e.clone()]).await {
            tries += 1;
            assert!(tries <= 2 && err.is_transient(), "re-send {tries} failed: {err}");
        }
    }
    let read = ids(writer.read_stream(&s, ReadStream::forward()).await.unwrap());
    assert_eq!(read.len(), 1 + refused.len(), "{read:?}");
    for e in &refused {
        assert_eq!(read.iter().filter(|id| **id == e.id).count(), 1);
    }
}

/// How one attempt at an append ended, as the caller can tell.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Attempt {
    Written,
    NotWritten,
    Unknown,
}

/// Chaos through the proxy: while writers of one process append with `Any`
/// to streams that another process appends to as well, the proxy blackholes
/// the first process's connections or holds what they send and delivers it
/// late, again and again. The errors must say the truth: an append answered
/// with anything but `OutcomeUnknown` was not written, so re-sending it
/// unchanged (with `Any`, after other appends: no idempotency to save it)
/// must never write it twice; one answered as written is there once; an
/// unknown one is there at most once. A subscriber of the other process
/// sees the log gapless and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn under_silent_and_late_connections_every_append_error_tells_the_truth() {
    const WRITERS: u64 = 3;
    const CHAOS: Duration = Duration::from_secs(8);
    let Some((other, guard)) = common::open().await else { return };
    let proxy = std::sync::Arc::new(common::proxy::Proxy::start().await);
    let store = PgStore::builder(proxy.url.clone())
        .schema(&guard.schema)
        .max_connections(2)
        .connect_timeout(Duration::from_millis(300))
        .answer_timeout(Duration::from_millis(400))
        .open()
        .await
        .unwrap();
    let mut sub = other.subscribe(SubscriptionRequest::all(Filter::all(), SubscribeFrom::Start));
    let stop = tokio_util::sync::CancellationToken::new();
    let seed =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64 | 1;
    eprintln!("chaos seed {seed}");
    let start = std::time::Instant::now();
    // A failure is timing: `RUST_LOG=annals_postgres=debug,scenarios=info`
    // prints each attempt next to how the store settled it.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();

    let chaos = {
        let (proxy, stop, marker) = (proxy.clone(), stop.clone(), format!("annals {}", guard.schema));
        tokio::spawn(async move {
            let mut x = seed;
            let mut next = move || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            };
            let (mut holes, mut holds) = (0, 0);
            while !stop.is_cancelled() {
                let pause = Duration::from_millis(200 + next() % 700);
                // Holds twice as often as blackholes: late deliveries are
                // what could make a "not written" untrue.
                match next() % 4 {
                    0 => {
                        holes += 1;
                        proxy.blackhole(marker.as_bytes());
                        tokio::time::sleep(pause).await;
                        proxy.restore();
                    }
                    1 | 2 => {
                        holds += 1;
                        proxy.hold(marker.as_bytes());
                        tokio::time::sleep(pause).await;
                        proxy.release().await;
                    }
                    _ => tokio::time::sleep(pause).await,
                }
            }
            proxy.restore();
            proxy.release().await;
            (holes, holds)
        })
    };
    // The other process appends to the same streams throughout.
    let background = {
        let (other, stop) = (other.clone(), stop.clone());
        tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut n = 0u64;
            while !stop.is_cancelled() {
                let e = event(1_000_000 + n);
                let s = stream(&format!("truth-{}", n % WRITERS));
                other.append(&s, ExpectedVersion::Any, vec![e.clone()]).await.unwrap();
                ids.push(e.id);
                n += 1;
                tokio::time::sleep(Duration::from_millis(7)).await;
            }
            ids
        })
    };
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (store, stop) = (store.clone(), stop.clone());
            tokio::spawn(async move {
                let s = stream(&format!("truth-{w}"));
                // Each attempt with what it was answered (for the failure message).
                let mut history: Vec<(uuid::Uuid, Vec<(Attempt, String)>)> = Vec::new();
                let mut i = 0u64;
                while !stop.is_cancelled() {
                    let e = event(w * 100_000 + i);
                    let mut attempts = Vec::new();
                    loop {
                        let got = tokio::time::timeout(
                            PATIENCE,
                            store.append(&s, ExpectedVersion::Any, vec![e.clone()]),
                        )
                        .await
                        .expect("an append hung");
                        let answered = format!("{:?}: {got:?}", start.elapsed());
                        tracing::info!(writer = w, id = %e.id, "{answered}");
                        let attempt = match got {
                            Ok(_) => Attempt::Written,
                            Err(Error::OutcomeUnknown { .. }) => Attempt::Unknown,
                            Err(err) if err.is_transient() => Attempt::NotWritten,
                            Err(err) => panic!("writer {w}: {err}"),
                        };
                        attempts.push((attempt, answered));
                        // Re-sent, unchanged, only after a definite "not written".
                        if attempt != Attempt::NotWritten || stop.is_cancelled() {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    history.push((e.id, attempts));
                    i += 1;
                }
                history
            })
        })
        .collect();

    tokio::time::sleep(CHAOS).await;
    stop.cancel();
    let (holes, holds) = chaos.await.unwrap();
    let background = background.await.unwrap();
    let mut histories = Vec::new();
    for w in writers {
        histories.extend(w.await.unwrap());
    }
    // Whatever the proxy held has been delivered; give it time to land if
    // it (wrongly) could.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut count: std::collections::HashMap<uuid::Uuid, usize> = std::collections::HashMap::new();
    let mut copies: std::collections::HashMap<uuid::Uuid, Vec<(u64, u64)>> = std::collections::HashMap::new();
    for w in 0..WRITERS {
        for e in other.read_stream(&stream(&format!("truth-{w}")), ReadStream::forward()).await.unwrap() {
            *count.entry(e.id).or_default() += 1;
            copies.entry(e.id).or_default().push((e.version, e.position));
        }
    }
    for id in &background {
        assert_eq!(count.get(id), Some(&1), "the other process's event {id}");
    }
    let (mut written, mut refused, mut unknown) = (0, 0, 0);
    for (id, attempts) in &histories {
        let n = count.get(id).copied().unwrap_or(0);
        let at = copies.get(id);
        match attempts.last().map(|(a, _)| a) {
            Some(Attempt::Written) => {
                written += 1;
                assert_eq!(
                    n, 1,
                    "{id}: answered as written after {attempts:#?}, found at (version, position) {at:?}"
                );
            }
            Some(Attempt::Unknown) => {
                unknown += 1;
                assert!(n <= 1, "{id}: unknown after {attempts:#?}, found at (version, position) {at:?}");
            }
            _ => assert_eq!(n, 0, "{id}: never answered as written ({attempts:#?}), found at {at:?}"),
        }
        refused += attempts.iter().filter(|(a, _)| *a == Attempt::NotWritten).count();
    }
    let total = count.values().sum::<usize>();
    let delivered = take(&mut sub, total).await;
    assert_eq!(
        delivered.iter().map(|e| e.position).collect::<Vec<_>>(),
        (0..total as u64).collect::<Vec<_>>()
    );
    assert_quiet(&mut sub).await;
    eprintln!(
        "chaos: {holes} blackholes, {holds} holds; {} appends: {written} written, {unknown} unknown, \
         {refused} attempts answered as not written",
        histories.len()
    );
    assert!(written > 0 && refused > 0, "the chaos never hit (or nothing got through)");
}

/// Opens a store on `url` (through `proxy`, one pooled connection, a 1 s
/// answer timeout), appends once so the committer's connection is open,
/// then has the proxy hold what that connection sends and appends `late`
/// with `Any` to `s`: returns the store and the error it was answered with.
async fn append_held_past_its_answer(
    proxy: &common::proxy::Proxy,
    url: String,
    schema: &str,
    s: &StreamName,
    late: &EventData,
) -> (PgStore, Error) {
    let store = held_store(proxy, url, schema, s, Duration::from_secs(1)).await;
    let err = tokio::time::timeout(
        Duration::from_secs(20),
        store.append(s, ExpectedVersion::Any, vec![late.clone()]),
    )
    .await
    .expect("the append hung")
    .unwrap_err();
    (store, err)
}

/// An append answered with "no answer" is never written, even when its
/// request reaches the server afterwards: a proxy holds it past the answer
/// timeout and delivers it once the store has given up. Before searching
/// the log for it the store ends the server session it was sent on, so the
/// late request finds no session to run it. (Without that, it would be
/// written after the caller was told it was not, and a re-send with `Any`
/// after another append would write it twice.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_that_got_no_answer_never_lands_later() {
    let Some((writer, guard)) = common::open().await else { return };
    let proxy = common::proxy::Proxy::start().await;
    let s = stream("held-1");
    let late = event(1);
    let (store, err) = append_held_past_its_answer(&proxy, proxy.url.clone(), &guard.schema, &s, &late).await;
    assert!(err.to_string().contains("no answer from PostgreSQL"), "{err}");

    // The proxy recovers and delivers what it held.
    proxy.release().await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let ids = |events: Vec<RecordedEvent>| events.into_iter().map(|e| e.id).collect::<Vec<_>>();
    let read = ids(writer.read_stream(&s, ReadStream::forward()).await.unwrap());
    assert!(!read.contains(&late.id), "written after the caller was told it was not");

    // Another process appends; the re-send lands once.
    writer.append(&s, ExpectedVersion::Any, vec![event(2)]).await.unwrap();
    store.append(&s, ExpectedVersion::Any, vec![late.clone()]).await.unwrap();
    let read = ids(writer.read_stream(&s, ReadStream::forward()).await.unwrap());
    assert_eq!(read.iter().filter(|id| **id == late.id).count(), 1, "{read:?}");
}

/// The same when the pooled connection the append went out on has its own
/// time zone (set by the application through [`PgStore::pool`], which hands
/// out the store's connections): the store still names and ends that
/// session before searching the log. (It named sessions by the text of
/// their start time, which each session renders in its own time zone: the
/// session that looked for it, in another zone, found no such session and
/// ended nothing, so the late request was written after the caller was
/// told it was not.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_that_got_no_answer_never_lands_later_whatever_its_sessions_time_zone() {
    let Some((writer, guard)) = common::open().await else { return };
    let proxy = common::proxy::Proxy::start().await;
    let s = stream("held-tz");
    let store = PgStore::builder(proxy.url.clone())
        .schema(&guard.schema)
        .max_connections(1)
        .connect_timeout(Duration::from_millis(500))
        .answer_timeout(Duration::from_secs(1))
        .open()
        .await
        .unwrap();
    // The store's only pooled connection in another time zone (as the
    // role's settings or the URL's options could put it).
    let pooled = store.store_pool().get().await.unwrap();
    pooled.batch_execute("SET TIME ZONE 'Pacific/Kiritimati'").await.unwrap();
    drop(pooled);
    let (admin, conn) = tokio_postgres::connect(&common::url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let default_zone: String = admin.query_one("SHOW TimeZone", &[]).await.unwrap().get(0);
    assert_ne!(default_zone, "Pacific/Kiritimati", "the test needs two time zones");
    store.append(&s, ExpectedVersion::NoStream, vec![event(0)]).await.unwrap();
    proxy.hold(format!("annals {}", guard.schema).as_bytes());
    let late = event(1);
    let err = tokio::time::timeout(PATIENCE, store.append(&s, ExpectedVersion::Any, vec![late.clone()]))
        .await
        .expect("the append hung")
        .unwrap_err();
    assert!(err.to_string().contains("no answer from PostgreSQL"), "{err}");

    proxy.release().await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let read: Vec<_> =
        writer.read_stream(&s, ReadStream::forward()).await.unwrap().into_iter().map(|e| e.id).collect();
    assert!(!read.contains(&late.id), "written after the caller was told it was not");
}

/// The same when the late request reaches the server while the store
/// searches the log for it: the proxy delivers it once the search (whose
/// parameters carry the event id) has run, and holds back what the store
/// sends next on that connection until the late request has run too. The session must already be gone by
/// then. (The termination was once pipelined with the search; given as
/// text, it was prepared first and so reached the server after the search:
/// the late append was written and answered "not written", as the chaos
/// test below found about once in 30 runs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_delivered_while_the_store_searches_for_it_is_not_written() {
    let Some((writer, guard)) = common::open().await else { return };
    let proxy = common::proxy::Proxy::start().await;
    let s = stream("held-3");
    let late = event(1);
    proxy.release_when_sent(late.id.as_bytes(), Duration::from_millis(250));
    let (_store, err) =
        append_held_past_its_answer(&proxy, proxy.url.clone(), &guard.schema, &s, &late).await;
    assert!(proxy.released_when_sent(), "the store never searched for the append: nothing was tested");
    assert!(err.to_string().contains("no answer from PostgreSQL"), "{err}");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let read: Vec<_> =
        writer.read_stream(&s, ReadStream::forward()).await.unwrap().into_iter().map(|e| e.id).collect();
    assert!(!read.contains(&late.id), "written after the caller was told it was not");
}

/// An append whose connection breaks between the store and the server
/// while the server session lives on (a reset from a load balancer or a
/// pooler in between), its request still on the way: the store ends that
/// session before it searches the log and runs the append again, so the
/// late request cannot add a second copy. (Without that the re-run wrote
/// it, and the late request, delivered after another process's append,
/// wrote it again: with `Any` the stream's tail shows no copy.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_whose_connection_broke_short_of_the_server_lands_once() {
    let Some((writer, guard)) = common::open().await else { return };
    let proxy = common::proxy::Proxy::start().await;
    let s = stream("cut-1");
    let late = event(1);
    let answered =
        append_cut_short_of_the_server(&proxy, proxy.url.clone(), &writer, &guard.schema, &s, &late).await;
    answered.expect("run again on a new connection, it is written");
    let read: Vec<_> =
        writer.read_stream(&s, ReadStream::forward()).await.unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(read.iter().filter(|id| **id == late.id).count(), 1, "{read:?}");
}

/// The same on a session the store cannot name (see the test below): it
/// cannot be ended, so the store cannot tell whether the request will still
/// run, and answers `OutcomeUnknown` instead of running it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_whose_connection_broke_on_a_session_that_cannot_be_named_is_answered_unknown() {
    let Some((writer, guard)) = common::open().await else { return };
    let proxy = common::proxy::Proxy::start().await;
    let url = hide_sessions(&proxy, &guard.schema).await;
    let s = stream("cut-2");
    let late = event(1);
    let answered = append_cut_short_of_the_server(&proxy, url, &writer, &guard.schema, &s, &late).await;
    assert!(matches!(answered, Err(Error::OutcomeUnknown { .. })), "{answered:?}");
    let read: Vec<_> =
        writer.read_stream(&s, ReadStream::forward()).await.unwrap().into_iter().map(|e| e.id).collect();
    assert!(read.iter().filter(|id| **id == late.id).count() <= 1, "{read:?}");
}

/// Opens a store on `url` (through `proxy`, one pooled connection),
/// appends once, then has the proxy hold what that connection sends,
/// appends `late` with `Any` to `s` and closes the held connection towards
/// the store only. Once that is answered, `writer` appends to `s` and the
/// proxy delivers the held request to the server session it was sent to.
/// Returns the answer; the log is as it ends up a second later.
async fn append_cut_short_of_the_server(
    proxy: &common::proxy::Proxy,
    url: String,
    writer: &PgStore,
    schema: &str,
    s: &StreamName,
    late: &EventData,
) -> Result<annals_core::AppendResult, Error> {
    let store = held_store(proxy, url, schema, s, Duration::from_secs(2)).await;
    let append = tokio::spawn({
        let (store, s, late) = (store.clone(), s.clone(), late.clone());
        async move { store.append(&s, ExpectedVersion::Any, vec![late]).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.cut_held();
    let answered =
        tokio::time::timeout(Duration::from_secs(20), append).await.expect("the append hung").unwrap();
    writer.append(s, ExpectedVersion::Any, vec![event(2)]).await.unwrap();
    proxy.release().await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    answered
}

/// The tests above rely on the proxy delivering a held request on
/// release whether or not its client has closed the connection yet: a
/// store closes a connection it gave up on in the background, so the
/// release can come first. (It once delivered only what closed
/// connections had sent: the late request then never ran, and the test on
/// unnamed sessions failed about once in eight runs of the suite.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_delivers_what_a_held_connection_sent_while_it_is_still_open() {
    let Some((_store, guard)) = common::open().await else { return };
    let admin = admin_client().await;
    let table = format!("\"{}\".proxied", guard.schema);
    admin.batch_execute(&format!("CREATE TABLE {table} (n int)")).await.unwrap();
    let proxy = common::proxy::Proxy::start().await;
    let marker = format!("proxied {}", guard.schema);
    let url = format!("{}&application_name={}", proxy.url, marker.replace(' ', "%20"));
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    proxy.hold(marker.as_bytes());
    let insert = format!("INSERT INTO {table} VALUES (1)");
    let held = tokio::spawn(async move {
        let _ = client.batch_execute(&insert).await;
        client
    });
    let count = format!("SELECT count(*) FROM {table}");
    let rows = || async { admin.query_one(&count, &[]).await.unwrap().get::<_, i64>(0) };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rows().await, 0, "held, so not delivered yet");
    assert!(!held.is_finished(), "nothing comes back to a held connection");
    proxy.release().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while rows().await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "the release did not deliver the held request");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!held.is_finished(), "the connection stays held after the release");
    held.abort();
}

/// A store on `url` (through `proxy`: one pooled connection, `answer`
/// timeout) that has appended the first event of `s`, its connection now
/// held by the proxy.
async fn held_store(
    proxy: &common::proxy::Proxy,
    url: String,
    schema: &str,
    s: &StreamName,
    answer: Duration,
) -> PgStore {
    let store = PgStore::builder(url)
        .schema(schema)
        .max_connections(1)
        .connect_timeout(Duration::from_millis(500))
        .answer_timeout(answer)
        .open()
        .await
        .unwrap();
    store.append(s, ExpectedVersion::NoStream, vec![event(0)]).await.unwrap();
    proxy.hold(format!("annals {schema}").as_bytes());
    store
}

/// Hides every row of `pg_stat_activity` from sessions whose `search_path`
/// puts `schema` first, and returns a URL through `proxy` that does so: the
/// store cannot learn its sessions' names.
async fn hide_sessions(proxy: &common::proxy::Proxy, schema: &str) -> String {
    admin_client()
        .await
        .batch_execute(&format!(
            "CREATE VIEW \"{schema}\".pg_stat_activity AS SELECT * FROM pg_catalog.pg_stat_activity WHERE false"
        ))
        .await
        .unwrap();
    format!("{}&options=-c%20search_path%3D{schema}%2Cpg_catalog", proxy.url)
}

/// When the store cannot name a connection's server session (here a view in
/// the session's `search_path`, ahead of `pg_catalog`, hides every row of
/// `pg_stat_activity`), it cannot end that session before searching the log
/// after a lost answer, so a request still on its way may run later: such
/// an append is answered `OutcomeUnknown`, never "not written". A proxy
/// holds the request past the answer timeout and delivers it afterwards: it
/// does land, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_on_a_session_that_cannot_be_named_is_answered_unknown_not_unwritten() {
    let Some((writer, guard)) = common::open().await else { return };
    let proxy = common::proxy::Proxy::start().await;
    let url = hide_sessions(&proxy, &guard.schema).await;
    let s = stream("unnamed-1");
    let late = event(1);
    let (store, err) = append_held_past_its_answer(&proxy, url, &guard.schema, &s, &late).await;
    assert!(matches!(err, Error::OutcomeUnknown { .. }), "{err:?}");

    // The held request reaches its session after all, which is still there.
    proxy.release().await;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let read = writer.read_stream(&s, ReadStream::forward()).await.unwrap();
        let n = read.iter().filter(|e| e.id == late.id).count();
        assert!(n <= 1, "written {n} times");
        if n == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the held append never landed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The store goes on (its next connection is unnamed too).
    store.append(&s, ExpectedVersion::Exact(1), vec![event(2)]).await.unwrap();
}

/// The store sends its session settings as `SET`s after connecting, not in
/// the startup packet's `options`, which a pooler such as PgBouncer refuses
/// for settings it does not track: no connection of the store (pool,
/// listener, lease) carries `options` unless the URL gives them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_send_no_startup_options_of_their_own() {
    use annals_core::Leases;
    let Some((_store, guard)) = common::open().await else { return };
    let proxy = common::proxy::Proxy::start().await;
    let store = PgStore::builder(proxy.url.clone()).schema(&guard.schema).open().await.unwrap();
    store.append(&stream("plain-1"), ExpectedVersion::NoStream, vec![event(0)]).await.unwrap();
    let lease = store.try_lease("plain-lease").await.unwrap().expect("free");
    let startups = proxy.startups();
    assert!(startups.len() >= 3, "pool, listener and lease connections: {}", startups.len());
    for startup in &startups {
        assert!(!startup.windows(7).any(|w| w == b"options"), "{}", String::from_utf8_lossy(startup));
    }
    // The settings are in force all the same.
    let client = store.store_pool().get().await.unwrap();
    for (setting, want) in
        [("tcp_keepalives_idle", "15"), ("jit", "off"), ("transaction_isolation", "read committed")]
    {
        assert_eq!(
            client.query_one(&format!("SHOW {setting}"), &[]).await.unwrap().get::<_, String>(0),
            want
        );
    }
    drop(lease);
}

/// The server probes the store's sessions too (a session whose client
/// vanished ends within about 30 s, releasing its locks), unless the URL's
/// `options` choose otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_probed_from_the_server_unless_the_url_says_otherwise() {
    let show = |store: PgStore| async move {
        let client = store.store_pool().get().await.unwrap();
        let mut got = Vec::new();
        for setting in [
            "tcp_keepalives_idle",
            "tcp_keepalives_interval",
            "tcp_keepalives_count",
            "idle_in_transaction_session_timeout",
            "jit",
        ] {
            got.push(client.query_one(&format!("SHOW {setting}"), &[]).await.unwrap().get::<_, String>(0));
        }
        got
    };
    let Some((store, _guard)) = common::open().await else { return };
    assert_eq!(show(store).await, ["15", "5", "3", "1min", "off"]);

    let url = common::url_with_options(
        "-c%20tcp_keepalives_idle%3D600%20-c%20idle_in_transaction_session_timeout%3D0",
    );
    let Some((store, _guard)) = common::open_url_with(url, |b| b).await else { return };
    assert_eq!(show(store).await, ["600", "5", "3", "0", "off"]);
}

#[tokio::test]
async fn unreachable_database_is_a_typed_error() {
    // Port 1 on loopback: nothing listens there, the connection is refused.
    let err = PgStore::builder("postgres://postgres@127.0.0.1:1/test")
        .connect_timeout(Duration::from_secs(2))
        .open()
        .await
        .unwrap_err();
    assert!(matches!(err, PgError::Unreachable { .. }), "{err:?}");
    assert!(err.is_transient());
    let core: Error = err.into();
    assert!(matches!(core, Error::Backend { .. }) && core.is_transient(), "{core:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_database_is_unreachable() {
    let Some((_store, _guard)) = common::open().await else { return };
    let url = format!("{}_no_such_db_{}", common::url(), uuid::Uuid::new_v4().simple());
    let err = PgStore::connect(url).await.unwrap_err();
    assert!(matches!(err, PgError::Unreachable { .. }), "{err:?}");
}

/// The several-part fast path (`append_head_first`, migration 0009's
/// signature) writes a plain append, and steps aside with SQLSTATE AN001,
/// writing nothing, for anything the exact path must decide: a possible
/// re-send, a failed expectation, a session outside READ COMMITTED.
/// Through the store, all still get the exact outcomes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_function_writes_plain_appends_and_steps_aside_otherwise() {
    let Some((store, guard)) = common::open().await else { return };
    let first = event(0);
    let written = store.append(&stream("f-1"), ExpectedVersion::NoStream, vec![first.clone()]).await.unwrap();
    assert_eq!((written.next_version, written.position), (1, 0));
    // A re-send is declined by the function and answered by the exact path.
    let again = store.append(&stream("f-1"), ExpectedVersion::NoStream, vec![first]).await.unwrap();
    assert_eq!((again.next_version, again.position), (1, 0));

    let admin = admin_client().await;
    // Two parts: f-1 under the given expectation, and a new stream.
    let call = format!(
        "SELECT first_position, first_versions FROM \"{}\".append_head_first(
             ARRAY['f-1', $4], ARRAY['f', 'f'], ARRAY[$1::int2, 1::int2], ARRAY[$2::int8, 0::int8],
             ARRAY[1::int8, 1::int8], ARRAY[0::int8, 1::int8], ARRAY[$3::uuid, $5::uuid],
             ARRAY[1, 2], ARRAY[1, 2], ARRAY[0::int8, 0::int8], ARRAY[1, 1], ARRAY['E', 'E'],
             ARRAY[NULL::text, NULL::text],
             ARRAY[$3::uuid, $5::uuid], ARRAY[0::int2, 0::int2], ARRAY['\\x7b7d'::bytea, '\\x7b7d'::bytea],
             ARRAY['{{}}', '{{}}'], 'ch')",
        guard.schema
    );
    let (fresh, other) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    // Expected version 0 (kind 3) matches: written at version 1, position 1.
    let row = admin.query_one(&call, &[&3_i16, &0_i64, &fresh, &"f-2", &other]).await.unwrap();
    assert_eq!(row.get::<_, i64>(0), 1);
    assert_eq!(row.get::<_, Vec<i64>>(1), vec![1, 0]);
    let read = store.read_stream(&stream("f-2"), ReadStream::forward()).await.unwrap();
    assert_eq!(read.iter().map(|e| (e.id, e.version, e.position)).collect::<Vec<_>>(), [(other, 0, 2)]);
    // A possible re-send (same last id) and wrong expectations step aside.
    for (kind, version, id) in
        [(0_i16, 0_i64, fresh), (3, 0, uuid::Uuid::new_v4()), (1, 0, uuid::Uuid::new_v4())]
    {
        let err =
            admin.query_one(&call, &[&kind, &version, &id, &"f-3", &uuid::Uuid::new_v4()]).await.unwrap_err();
        assert_eq!(err.code().map(|c| c.code()), Some("AN001"), "{err}");
    }
    // Outside READ COMMITTED, which the head-first design relies on.
    admin.batch_execute("SET default_transaction_isolation = 'repeatable read'").await.unwrap();
    let err = admin
        .query_one(&call, &[&3_i16, &1_i64, &uuid::Uuid::new_v4(), &"f-4", &uuid::Uuid::new_v4()])
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("AN001"), "{err}");
    assert_eq!(store.next_position().await.unwrap(), 3, "declined calls wrote nothing");

    // Through the store, a failed expectation gets the exact error.
    let wrong = store.append(&stream("f-1"), ExpectedVersion::Exact(0), vec![event(2)]).await.unwrap_err();
    assert!(matches!(wrong, Error::WrongExpectedVersion { actual: Some(1), .. }), "{wrong}");
}

/// `append_part` (migrations 0006, 0009), the one-part fast path: its WHERE clause
/// is the plain-write condition, checked here case by case against what
/// the exact path (`StreamState::decide`) would do; every other case steps
/// aside with AN001 and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_part_writes_plain_appends_and_steps_aside_otherwise() {
    let Some((store, guard)) = common::open().await else { return };
    let admin = admin_client().await;
    let call = admin
        .prepare(&format!(
            "SELECT first_position, first_version FROM \"{}\".append_part(
                 $1, 'p', $2, $3, ARRAY[1], ARRAY[1], ARRAY['E'], ARRAY[NULL::text],
                 $4::uuid[], ARRAY[0::int2], ARRAY['\\x7b7d'::bytea], ARRAY['{{}}'], 'ch')",
            guard.schema
        ))
        .await
        .unwrap();
    let one = |kind: i16, version: i64, stream: &'static str, id: uuid::Uuid| {
        let (call, admin) = (call.clone(), &admin);
        async move {
            let ids = vec![id];
            admin.query_one(&call, &[&stream, &kind, &version, &ids]).await.map(|r| (r.get(0), r.get(1)))
        }
    };
    let declined = |r: Result<(i64, i64), tokio_postgres::Error>| {
        let err = r.expect_err("expected the function to step aside");
        assert_eq!(err.code().map(|c| c.code()), Some("AN001"), "{err}");
    };
    let new_id = uuid::Uuid::new_v4;

    // Plain writes: a new stream under "no stream", then each expectation
    // that holds. Results are (first position, first version).
    assert_eq!(one(1, 0, "p-1", new_id()).await.unwrap(), (0, 0));
    assert_eq!(one(3, 0, "p-1", new_id()).await.unwrap(), (1, 1));
    assert_eq!(one(2, 0, "p-1", new_id()).await.unwrap(), (2, 2));
    let last = new_id();
    assert_eq!(one(0, 0, "p-1", last).await.unwrap(), (3, 3));
    assert_eq!(one(0, 0, "p-2", new_id()).await.unwrap(), (4, 0), "a new stream under \"any\"");

    // Steps aside: failed expectations on an existing stream and on a
    // missing one, a possible re-send (the stream's last event id).
    declined(one(1, 0, "p-1", new_id()).await);
    declined(one(3, 2, "p-1", new_id()).await);
    declined(one(3, 4, "p-1", new_id()).await);
    declined(one(2, 0, "p-3", new_id()).await);
    declined(one(3, 0, "p-3", new_id()).await);
    declined(one(0, 0, "p-1", last).await);
    // No events at all.
    let empty: Vec<uuid::Uuid> = Vec::new();
    let err = admin.query_one(&call, &[&"p-1", &0_i16, &0_i64, &empty]).await.unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("AN001"), "{err}");
    // Outside READ COMMITTED.
    admin.batch_execute("SET default_transaction_isolation = 'repeatable read'").await.unwrap();
    declined(one(0, 0, "p-1", new_id()).await);
    admin.batch_execute("SET default_transaction_isolation = 'read committed'").await.unwrap();
    assert_eq!(store.next_position().await.unwrap(), 5, "declined calls wrote nothing");

    // Deleted streams: a tombstone always steps aside; a soft-deleted
    // stream accepts "no stream" and continues its numbering, and no
    // longer satisfies "stream exists".
    store.delete_stream(&stream("p-2"), ExpectedVersion::Any, DeleteMode::Hard).await.unwrap();
    declined(one(0, 0, "p-2", new_id()).await);
    store.delete_stream(&stream("p-1"), ExpectedVersion::Exact(3), DeleteMode::Soft).await.unwrap();
    declined(one(2, 0, "p-1", new_id()).await);
    declined(one(3, 3, "p-1", new_id()).await);
    assert_eq!(one(1, 0, "p-1", new_id()).await.unwrap(), (5, 4));

    // The store agrees with what the function wrote.
    let info = store.stream_info(&stream("p-1")).await.unwrap();
    assert_eq!(info.last_version, Some(4), "{info:?}");
    let written = store.append(&stream("p-1"), ExpectedVersion::Exact(4), vec![event(9)]).await.unwrap();
    assert_eq!((written.next_version, written.position), (6, 6));
    let versions: Vec<u64> = store
        .read_stream(&stream("p-1"), ReadStream::forward())
        .await
        .unwrap()
        .iter()
        .map(|e| e.version)
        .collect();
    assert_eq!(versions, vec![4, 5]);
}

/// The fast paths run in an implicit transaction that commits after the
/// function has returned its row: an error raised by that commit must
/// still fail the append (here a deferred constraint trigger raises it), on
/// the one-part and the several-part path alike, and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_at_commit_fails_the_append() {
    let Some((store, guard)) = common::open().await else { return };
    let admin = admin_client().await;
    let s = &guard.schema;
    admin
        .batch_execute(&format!(
            "CREATE FUNCTION \"{s}\".refuse() RETURNS trigger LANGUAGE plpgsql AS
                 $$BEGIN RAISE EXCEPTION 'refused at commit' USING ERRCODE = 'AN999'; END$$;
             CREATE CONSTRAINT TRIGGER refuse AFTER INSERT ON \"{s}\".runs
                 DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION \"{s}\".refuse();"
        ))
        .await
        .unwrap();
    let err = store.append(&stream("c-1"), ExpectedVersion::Any, vec![event(0)]).await.unwrap_err();
    assert!(err.to_string().contains("refused at commit"), "{err}");
    let parts = vec![
        StreamAppend::new(stream("c-1"), ExpectedVersion::Any, vec![event(1)]),
        StreamAppend::new(stream("c-2"), ExpectedVersion::Any, vec![event(2), event(3)]),
    ];
    let err = store.append_multi(parts.clone()).await.unwrap_err();
    assert!(err.to_string().contains("refused at commit"), "{err}");
    assert_eq!(store.next_position().await.unwrap(), 0);
    assert!(!store.stream_info(&stream("c-1")).await.unwrap().exists);

    admin.batch_execute(&format!("DROP TRIGGER refuse ON \"{s}\".runs")).await.unwrap();
    let written = store.append(&stream("c-1"), ExpectedVersion::NoStream, vec![event(0)]).await.unwrap();
    assert_eq!((written.next_version, written.position), (1, 0));
    let written = store.append_multi(parts).await.unwrap();
    assert_eq!(
        written.iter().map(|r| (r.next_version, r.position)).collect::<Vec<_>>(),
        vec![(2, 1), (2, 3)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_stats_count_in_the_database_and_size_the_schema() {
    let Some((store, _guard)) = common::open().await else { return };
    let empty = store.store_stats().await.unwrap();
    assert_eq!(empty.events_by_type, Some(Default::default()));
    let empty_bytes = empty.disk_bytes.unwrap();
    assert!(empty_bytes > 0, "the schema's tables and indexes take pages even when empty");
    for n in 0..200 {
        store.append(&stream(&format!("st-{}", n % 4)), ExpectedVersion::Any, vec![event(n)]).await.unwrap();
    }
    let stats = store.store_stats().await.unwrap();
    let counts = stats.events_by_type.unwrap();
    assert_eq!(counts.values().sum::<u64>(), 200);
    assert!(stats.disk_bytes.unwrap() > empty_bytes, "{:?} vs {empty_bytes}", stats.disk_bytes);
}

/// Statistics that cannot finish in `stats_timeout` (here: blocked by a
/// lock another session holds on the events table) give up: the call
/// returns in bounded time with the figures unknown, and the store's
/// connection is fine for the next call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_stats_give_up_counting_after_the_stats_timeout() {
    let Some((store, _guard)) = common::open_with(|b| b.stats_timeout(Duration::from_millis(300))).await
    else {
        return;
    };
    for n in 0..5 {
        store.append(&stream("slow-1"), ExpectedVersion::Any, vec![event(n)]).await.unwrap();
    }
    let (mut locker, conn) = tokio_postgres::connect(&common::url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let tx = locker.transaction().await.unwrap();
    tx.batch_execute(&format!("LOCK TABLE \"{}\".runs IN ACCESS EXCLUSIVE MODE", store.schema()))
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let blocked = tokio::time::timeout(Duration::from_secs(10), store.store_stats())
        .await
        .expect("store_stats must give up, not wait for the lock")
        .unwrap();
    assert_eq!(blocked.events_by_type, None);
    assert_eq!(blocked.disk_bytes, None, "sizing a locked table waits for its lock too");
    assert!(started.elapsed() < Duration::from_secs(5), "gave up after {:?}", started.elapsed());
    tx.rollback().await.unwrap();

    let counted = store.store_stats().await.unwrap();
    assert_eq!(counted.events_by_type.unwrap().values().sum::<u64>(), 5);
    assert!(counted.disk_bytes.unwrap() > 0);
    store.append(&stream("slow-1"), ExpectedVersion::Exact(4), vec![event(5)]).await.unwrap();
}

/// The same under a short answer timeout (`annals serve` defaults to 10 s,
/// with the 5 s stats timeout each of the two statistics may wait): the
/// statistics give up in time to answer "unknown" rather than be cut off
/// by the answer timeout, which failed the call with `NoAnswer` (a `503`
/// from `/stats` instead of its fallback) and discarded a connection each
/// time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_stats_give_up_counting_within_the_answer_timeout() {
    let Some((store, _guard)) = common::open_with(|b| b.answer_timeout(Duration::from_millis(1500))).await
    else {
        return;
    };
    store.append(&stream("slow-2"), ExpectedVersion::Any, vec![event(0)]).await.unwrap();
    let (mut locker, conn) = tokio_postgres::connect(&common::url(), tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(conn);
    let tx = locker.transaction().await.unwrap();
    tx.batch_execute(&format!("LOCK TABLE \"{}\".runs IN ACCESS EXCLUSIVE MODE", store.schema()))
        .await
        .unwrap();
    let blocked = tokio::time::timeout(Duration::from_secs(10), store.store_stats())
        .await
        .expect("store_stats must give up, not wait for the lock")
        .unwrap_or_else(|e| panic!("expected the figures unknown, got {e}"));
    assert_eq!(blocked.events_by_type, None);
    tx.rollback().await.unwrap();
    let counted = store.store_stats().await.unwrap();
    assert_eq!(counted.events_by_type.unwrap().values().sum::<u64>(), 1);
}
