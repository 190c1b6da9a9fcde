//! The shared tail of `$all` subscriptions (`subscription::Tail`): live
//! subscriptions share its reads, and what each delivers is exactly what a
//! filtered read of `$all` returns, once and in order, whether it is served
//! from the tail, falls behind it, or catches up into it.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use annals_core::{
    AllReader, AllSlice, Appender, EventData, EventStream, ExpectedVersion, Filter, MemoryStore, ReadAll,
    ReadStream, RecordedEvent, Result, StreamInfo, StreamName, StreamReader, SubscribeFrom,
    SubscriptionRequest, async_trait,
    subscription::{Tail, catch_up_with_tail},
};
use futures::StreamExt;
use tokio::sync::watch;

/// The memory store, counting the `$all` reads made on it.
struct Counting {
    store: MemoryStore,
    all_reads: AtomicUsize,
}

#[async_trait]
impl StreamReader for Counting {
    async fn read_stream(&self, stream: &StreamName, request: ReadStream) -> Result<Vec<RecordedEvent>> {
        self.store.read_stream(stream, request).await
    }

    async fn stream_info(&self, stream: &StreamName) -> Result<StreamInfo> {
        self.store.stream_info(stream).await
    }
}

#[async_trait]
impl AllReader for Counting {
    async fn read_all(&self, request: ReadAll) -> Result<AllSlice> {
        self.all_reads.fetch_add(1, Ordering::SeqCst);
        self.store.read_all(request).await
    }

    async fn next_position(&self) -> Result<u64> {
        self.store.next_position().await
    }
}

struct Fixture {
    source: Arc<Counting>,
    head: Arc<watch::Sender<u64>>,
    tail: Arc<Tail>,
}

impl Fixture {
    fn new(tail: Tail) -> Self {
        let source = Arc::new(Counting { store: MemoryStore::new(), all_reads: AtomicUsize::new(0) });
        Fixture { source, head: Arc::new(watch::channel(0).0), tail: Arc::new(tail) }
    }

    fn subscribe(&self, filter: Filter, from: SubscribeFrom) -> EventStream {
        catch_up_with_tail(
            self.source.clone(),
            self.head.subscribe(),
            self.tail.clone(),
            SubscriptionRequest::all(filter, from),
        )
    }

    /// Appends one event (stream `{category}-{n % 3}`, type `T{n % 2}`)
    /// and publishes the new head.
    async fn append(&self, category: &str, n: u64) {
        let stream = StreamName::new(format!("{category}-{}", n % 3)).unwrap();
        let event = EventData::json(format!("T{}", n % 2), &serde_json::json!({ "n": n })).unwrap();
        self.source.store.append(&stream, ExpectedVersion::Any, vec![event]).await.unwrap();
        self.head.send_replace(self.source.store.next_position().await.unwrap());
    }

    async fn expected(&self, filter: &Filter) -> Vec<u64> {
        let slice =
            self.source.store.read_all(ReadAll::forward(100_000).filter(filter.clone())).await.unwrap();
        slice.events.iter().map(|e| e.position).collect()
    }
}

async fn take(sub: &mut EventStream, n: usize) -> Vec<u64> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let next = tokio::time::timeout(Duration::from_secs(30), sub.next()).await;
        match next {
            Ok(Some(Ok(e))) => out.push(e.position),
            other => panic!(
                "after {} of {n} events: {:?}",
                out.len(),
                other.map(|o| o.map(|r| r.map(|e| e.position)))
            ),
        }
    }
    out
}

async fn assert_quiet(sub: &mut EventStream) {
    if let Ok(item) = tokio::time::timeout(Duration::from_millis(100), sub.next()).await {
        panic!("expected no further events, got {:?}", item.map(|r| r.map(|e| e.position)));
    }
}

/// Fifty caught-up subscriptions cost about one read per commit between
/// them, not one each, and each still gets exactly its events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_subscriptions_share_the_reads_of_new_events() {
    let f = Fixture::new(Tail::default());
    let filters =
        [Filter::all(), Filter::category("a"), Filter::event_type("T1"), Filter::stream_prefix("b-1")];
    let mut subs: Vec<(Filter, EventStream)> = (0..50)
        .map(|i| filters[i % 4].clone())
        .map(|flt| (flt.clone(), f.subscribe(flt, SubscribeFrom::End)))
        .collect();
    futures::future::join_all(subs.iter_mut().map(|(_, sub)| assert_quiet(sub))).await;
    let before = f.source.all_reads.load(Ordering::SeqCst);
    const COMMITS: u64 = 40;
    let mut got: Vec<Vec<u64>> = vec![Vec::new(); subs.len()];
    for n in 0..COMMITS {
        f.append(if n % 2 == 0 { "a" } else { "b" }, n).await;
        // Every subscription takes what this commit brought it before the next.
        for (i, (filter, sub)) in subs.iter_mut().enumerate() {
            let event_matches = filter.matches(
                &f.source.store.read_all(ReadAll::forward(1).from_position(n)).await.unwrap().events[0],
            );
            if event_matches {
                got[i].extend(take(sub, 1).await);
            }
        }
    }
    let reads = f.source.all_reads.load(Ordering::SeqCst) - before;
    assert!(
        reads <= 2 * COMMITS as usize,
        "{reads} reads of $all for {COMMITS} commits and 50 subscriptions"
    );
    for (i, (filter, _)) in subs.iter().enumerate() {
        assert_eq!(got[i], f.expected(filter).await, "subscription {i} ({filter:?})");
    }
    futures::future::join_all(subs.iter_mut().map(|(_, sub)| assert_quiet(sub))).await;
}

/// With a tail of 16 events: a subscription that stops taking while 200
/// events go by falls behind the tail, reads the backend, and rejoins the
/// tail; one from the start of a long log reads its way up. Both deliver
/// everything once, in order, and so do the live ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_behind_the_tail_read_their_way_back_into_it() {
    let f = Fixture::new(Tail::new(16, usize::MAX));
    for n in 0..300 {
        f.append("a", n).await;
    }
    let mut live = f.subscribe(Filter::all(), SubscribeFrom::End);
    let mut live_b = f.subscribe(Filter::category("b"), SubscribeFrom::End);
    let mut slow = f.subscribe(Filter::all(), SubscribeFrom::Start);
    let mut from_start = f.subscribe(Filter::event_type("T1"), SubscribeFrom::Start);
    assert_eq!(take(&mut slow, 10).await, (0..10).collect::<Vec<_>>());
    assert_quiet(&mut live).await;

    let writer = {
        let (source, head) = (f.source.clone(), f.head.clone());
        tokio::spawn(async move {
            let f = Fixture { source, head, tail: Arc::new(Tail::default()) };
            for n in 300..700 {
                f.append(if n % 5 == 0 { "b" } else { "a" }, n).await;
                if n % 7 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let live_got = take(&mut live, 400).await;
    writer.await.unwrap();
    assert_eq!(live_got, (300..700).collect::<Vec<_>>());
    let (start, end) = f.tail.range();
    assert_eq!(end, 700);
    assert!(start > 600, "the tail kept {start}..{end}");
    assert_eq!(take(&mut slow, 690).await, (10..700).collect::<Vec<_>>());
    let b: Vec<u64> = f.expected(&Filter::category("b")).await;
    assert_eq!(take(&mut live_b, b.len()).await, b);
    let t1 = f.expected(&Filter::event_type("T1")).await;
    assert_eq!(take(&mut from_start, t1.len()).await, t1);
    for sub in [&mut live, &mut live_b, &mut slow, &mut from_start] {
        assert_quiet(sub).await;
    }
}
