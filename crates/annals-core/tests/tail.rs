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
    AllReader, AllSlice, Appender, DeleteMode, Error, EventData, EventStream, ExpectedVersion, Filter,
    MemoryStore, ReadAll, ReadStream, RecordedEvent, Result, StreamDeleter, StreamInfo, StreamName,
    StreamReader, SubscribeFrom, SubscriptionRequest, async_trait,
    subscription::{Tail, catch_up_with_tail},
};
use futures::StreamExt;
use tokio::sync::watch;

/// How the test backend answers reads of `$all`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reads {
    /// As the memory store does.
    Plain,
    /// With events that are slices of one 1 MiB read buffer (the log reads
    /// in windows of up to 256 KiB); the last buffer is kept in
    /// `last_window`.
    Windowed,
    /// The tail's reads (everything, system streams included) take 200 ms.
    SlowForTheTail,
}

/// The memory store, counting the reads made on it.
struct Source {
    store: MemoryStore,
    reads: Reads,
    all_reads: AtomicUsize,
    stream_reads: AtomicUsize,
    /// Reads of everything, system streams included: the tail's.
    tail_reads: AtomicUsize,
    last_window: std::sync::Mutex<Option<bytes::Bytes>>,
}

#[async_trait]
impl StreamReader for Source {
    async fn read_stream(&self, stream: &StreamName, request: ReadStream) -> Result<Vec<RecordedEvent>> {
        self.stream_reads.fetch_add(1, Ordering::SeqCst);
        self.store.read_stream(stream, request).await
    }

    async fn stream_info(&self, stream: &StreamName) -> Result<StreamInfo> {
        self.store.stream_info(stream).await
    }
}

#[async_trait]
impl AllReader for Source {
    async fn read_all(&self, request: ReadAll) -> Result<AllSlice> {
        self.all_reads.fetch_add(1, Ordering::SeqCst);
        if request.filter.include_system {
            self.tail_reads.fetch_add(1, Ordering::SeqCst);
            if self.reads == Reads::SlowForTheTail {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        let mut slice = self.store.read_all(request).await?;
        if self.reads == Reads::Windowed {
            let mut window = vec![0u8; 1 << 20];
            let mut at = 0;
            for e in &slice.events {
                window[at..at + e.data.len()].copy_from_slice(&e.data);
                at += e.data.len();
            }
            let window = bytes::Bytes::from(window);
            let mut at = 0;
            for e in &mut slice.events {
                let len = e.data.len();
                e.data = window.slice(at..at + len);
                at += len;
            }
            *self.last_window.lock().unwrap() = Some(window);
        }
        Ok(slice)
    }

    async fn next_position(&self) -> Result<u64> {
        self.store.next_position().await
    }
}

struct Fixture {
    source: Arc<Source>,
    head: Arc<watch::Sender<u64>>,
    tail: Arc<Tail>,
}

impl Fixture {
    fn new(tail: Tail) -> Self {
        Self::reading(tail, Reads::Plain)
    }

    fn reading(tail: Tail, reads: Reads) -> Self {
        let source = Arc::new(Source {
            store: MemoryStore::new(),
            reads,
            all_reads: AtomicUsize::new(0),
            stream_reads: AtomicUsize::new(0),
            tail_reads: AtomicUsize::new(0),
            last_window: std::sync::Mutex::new(None),
        });
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

    fn subscribe_stream(&self, stream: &str) -> EventStream {
        catch_up_with_tail(
            self.source.clone(),
            self.head.subscribe(),
            self.tail.clone(),
            SubscriptionRequest::stream(StreamName::new(stream).unwrap(), SubscribeFrom::Start),
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

/// With a tail of 16 events: a subscription that stops taking while 400
/// events go by falls behind the tail, reads the backend, and rejoins the
/// tail; one from the start of a long log reads its way up; live ones that
/// fall more than half a tail behind read for themselves until they are
/// near again. All deliver everything once, in order.
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
    // Caught up, the live one is served by the tail again.
    f.append("a", 700).await;
    assert_eq!(take(&mut live, 1).await, [700]);
    let (start, end) = f.tail.range();
    assert_eq!(end, 701);
    assert!(start > 680, "the tail kept {start}..{end}");
    assert_eq!(take(&mut slow, 691).await, (10..701).collect::<Vec<_>>());
    let b: Vec<u64> = f.expected(&Filter::category("b")).await;
    assert_eq!(take(&mut live_b, b.len()).await, b);
    let t1 = f.expected(&Filter::event_type("T1")).await;
    assert_eq!(take(&mut from_start, t1.len()).await, t1);
    for sub in [&mut live, &mut live_b, &mut slow, &mut from_start] {
        assert_quiet(sub).await;
    }
}

/// Stream subscriptions once caught up take their stream's new events
/// from the tail: forty live ones, on four streams, woken by every one of
/// 60 commits, deliver exactly their streams' events and hardly read
/// (without the tail: 2,400 reads, one per wake-up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caught_up_stream_subscriptions_are_served_from_the_tail() {
    let f = Fixture::new(Tail::default());
    // a-0 and b-0 get ten events each; the other commits go to b-1, b-2.
    let watched = ["a-0", "a-1", "a-2", "b-0"];
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let mut sub = f.subscribe_stream(watched[i % 4]);
            tokio::spawn(async move {
                let mut got = Vec::new();
                while let Ok(Some(event)) = tokio::time::timeout(Duration::from_millis(500), sub.next()).await
                {
                    got.push(event.unwrap().position);
                }
                got
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let before = f.source.stream_reads.load(Ordering::SeqCst);
    const COMMITS: u64 = 60;
    for n in 0..COMMITS {
        f.append(if n % 6 == 0 { "a" } else { "b" }, n).await;
        // Let every subscription wake for this commit.
        tokio::time::sleep(Duration::from_millis(3)).await;
    }
    let mut deliveries = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        let got = task.await.unwrap();
        let name = StreamName::new(watched[i % 4]).unwrap();
        let all = f.source.store.read_stream(&name, ReadStream::forward()).await;
        let positions: Vec<u64> = all.map(|v| v.iter().map(|e| e.position).collect()).unwrap_or_default();
        assert_eq!(got, positions, "subscription {i} on {name}");
        deliveries += got.len();
    }
    assert_eq!(deliveries, 200);
    let reads = f.source.stream_reads.load(Ordering::SeqCst) - before;
    // At most one `STREAM_RECHECK` read each (the run takes well under two).
    assert!(reads <= 40, "{reads} stream reads for {deliveries} deliveries to 40 subscriptions");
}

/// A stream subscription served by the tail still ends with the tombstone:
/// at once after a deletion through this store (the backend notes it), and
/// within `STREAM_RECHECK` of a wake-up for one it cannot know about (made
/// by another process: here, on the store behind the tail's back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_subscriptions_on_a_tail_still_see_tombstones() {
    let f = Fixture::new(Tail::default());
    f.append("a", 0).await;
    f.append("a", 1).await;
    let mut here = f.subscribe_stream("a-0");
    let mut elsewhere = f.subscribe_stream("a-1");
    assert_eq!(take(&mut here, 1).await, [0]);
    assert_eq!(take(&mut elsewhere, 1).await, [1]);
    // Caught up, and a commit elsewhere read into the tail.
    f.append("b", 2).await;
    assert_quiet(&mut here).await;
    assert_quiet(&mut elsewhere).await;

    let deleted = |s: &str| StreamName::new(s).unwrap();
    let ended = |item: Option<Option<Result<RecordedEvent>>>| {
        matches!(item, Some(Some(Err(Error::StreamDeleted { .. }))))
    };
    f.source.store.delete_stream(&deleted("a-0"), ExpectedVersion::Any, DeleteMode::Hard).await.unwrap();
    f.tail.note_deletion();
    f.append("b", 3).await;
    assert!(ended(tokio::time::timeout(Duration::from_secs(5), here.next()).await.ok()));
    // The other one read its stream at that wake-up too: still live.
    assert_quiet(&mut elsewhere).await;

    // Deleted behind the tail's back: the next wake-up is served from the
    // tail, the first one after `STREAM_RECHECK` reads and reports it.
    f.source.store.delete_stream(&deleted("a-1"), ExpectedVersion::Any, DeleteMode::Hard).await.unwrap();
    f.append("b", 4).await;
    assert_quiet(&mut elsewhere).await;
    tokio::time::sleep(annals_core::subscription::STREAM_RECHECK).await;
    f.append("b", 5).await;
    assert!(ended(tokio::time::timeout(Duration::from_secs(5), elsewhere.next()).await.ok()));
}

/// A filtered subscription far behind the head catches up with its own
/// filtered reads (which backends answer from their indexes), not through
/// the tail, which would read every event of the history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filtered_catch_up_far_behind_reads_for_itself() {
    let f = Fixture::new(Tail::default());
    let s = StreamName::new("h-1").unwrap();
    for chunk in 0..20u64 {
        let events: Vec<EventData> = (0..1000u64)
            .map(|i| {
                let ty = if i % 100 == 0 { "Rare" } else { "Common" };
                EventData::json(ty, &serde_json::json!({ "n": chunk * 1000 + i })).unwrap()
            })
            .collect();
        f.source.store.append(&s, ExpectedVersion::Any, events).await.unwrap();
    }
    f.head.send_replace(20_000);
    let mut sub = f.subscribe(Filter::event_type("Rare"), SubscribeFrom::Start);
    let got = take(&mut sub, 200).await;
    assert_eq!(got, (0..200).map(|k| k * 100).collect::<Vec<_>>());
    assert_quiet(&mut sub).await;
    assert_eq!(f.source.tail_reads.load(Ordering::SeqCst), 0, "the tail read the history");
    // Near the head it is served by the tail.
    f.append("x", 0).await;
    f.source
        .store
        .append(&s, ExpectedVersion::Any, vec![EventData::json("Rare", &1).unwrap()])
        .await
        .unwrap();
    f.head.send_replace(20_002);
    assert_eq!(take(&mut sub, 1).await, [20_001]);
    assert!(f.source.tail_reads.load(Ordering::SeqCst) > 0);
}

/// The tail keeps its own copies of what it holds: events that are slices
/// of a backend's large read buffer would otherwise keep each buffer alive
/// (up to 8,192 of them, one per read, in the worst case).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tail_does_not_keep_the_backends_read_buffers() {
    let f = Fixture::reading(Tail::default(), Reads::Windowed);
    let mut sub = f.subscribe(Filter::all(), SubscribeFrom::End);
    assert_quiet(&mut sub).await;
    let s = StreamName::new("w-1").unwrap();
    let events: Vec<EventData> =
        (0..3).map(|n| EventData::json("E", &serde_json::json!({ "n": n })).unwrap()).collect();
    f.source.store.append(&s, ExpectedVersion::Any, events).await.unwrap();
    f.head.send_replace(3);
    let got = take(&mut sub, 3).await;
    assert_eq!(got, [0, 1, 2]);
    assert_eq!(f.tail.range(), (0, 3));
    let window = f.source.last_window.lock().unwrap().take().expect("the tail read through the source");
    assert!(window.is_unique(), "the tail still holds slices of the source's 1 MiB read buffer");
}

/// The subscription that starts the tail's read may stop being polled
/// (its consumer busy, an SSE client with a full socket): the read goes on
/// without it, and the others get their events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_that_stops_polling_mid_read_holds_up_no_other() {
    let f = Fixture::reading(Tail::default(), Reads::SlowForTheTail);
    let mut stalled = f.subscribe(Filter::all(), SubscribeFrom::End);
    let mut other = f.subscribe(Filter::all(), SubscribeFrom::End);
    assert_quiet(&mut stalled).await;
    assert_quiet(&mut other).await;
    let s = StreamName::new("slow-1").unwrap();
    f.source.store.append(&s, ExpectedVersion::Any, vec![EventData::json("E", &1).unwrap()]).await.unwrap();
    f.head.send_replace(1);
    // It wakes first and starts the read, then is not polled again for now.
    assert!(tokio::time::timeout(Duration::from_millis(20), stalled.next()).await.is_err());
    assert_eq!(take(&mut other, 1).await, [0]);
    assert_eq!(take(&mut stalled, 1).await, [0]);
}

/// Publishes `next` as the head unless a larger one is out already (as the
/// backends do: a head is never lowered).
fn raise(head: &watch::Sender<u64>, next: u64) {
    head.send_if_modified(|h| {
        let raised = next > *h;
        if raised {
            *h = next;
        }
        raised
    });
}

/// Hammer: writers on four threads race subscriptions of every kind over a
/// small tail that evicts all the time; each delivers its events once, in
/// order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_writers_and_a_small_tail_lose_and_repeat_nothing() {
    for tail in [Tail::new(8, usize::MAX), Tail::new(64, 2_000), Tail::new(700, usize::MAX)] {
        let f = Arc::new(Fixture::new(tail));
        const WRITERS: u64 = 6;
        const PER: u64 = 150;
        let filters =
            [Filter::all(), Filter::category("c1"), Filter::event_type("T1"), Filter::stream_prefix("c2-1")];
        let mut subs = Vec::new();
        for (i, flt) in filters.iter().enumerate() {
            for from in [SubscribeFrom::Start, SubscribeFrom::End, SubscribeFrom::After(3)] {
                subs.push((Some(flt.clone()), None, f.subscribe(flt.clone(), from), i));
            }
        }
        for s in ["c0-0", "c1-1", "c2-1", "c3-2"] {
            subs.push((None, Some(s.to_string()), f.subscribe_stream(s), 0));
        }
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let f = f.clone();
                tokio::spawn(async move {
                    for n in 0..PER {
                        let stream = StreamName::new(format!("c{w}-{}", n % 3)).unwrap();
                        let k = 1 + (n % 3) as usize;
                        let events: Vec<EventData> = (0..k)
                            .map(|j| {
                                EventData::json(
                                    format!("T{}", (n as usize + j) % 2),
                                    &serde_json::json!({ "n": n }),
                                )
                                .unwrap()
                            })
                            .collect();
                        f.source.store.append(&stream, ExpectedVersion::Any, events).await.unwrap();
                        raise(&f.head, f.source.store.next_position().await.unwrap());
                        if n % 4 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        let total: u64 = WRITERS * (0..PER).map(|n| 1 + n % 3).sum::<u64>();
        let tasks: Vec<_> = subs
            .into_iter()
            .map(|(flt, stream, mut sub, _)| {
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    while let Ok(Some(event)) =
                        tokio::time::timeout(Duration::from_millis(1500), sub.next()).await
                    {
                        let e = event.unwrap();
                        got.push(e.position);
                    }
                    (flt, stream, got)
                })
            })
            .collect();
        for w in writers {
            w.await.unwrap();
        }
        assert_eq!(f.source.store.next_position().await.unwrap(), total);
        for t in tasks {
            let (flt, stream, got) = t.await.unwrap();
            let mut sorted = got.clone();
            sorted.sort_unstable();
            sorted.dedup();
            assert_eq!(sorted.len(), got.len(), "{flt:?} {stream:?}: duplicates or out of order: {got:?}");
            assert_eq!(sorted, got, "{flt:?} {stream:?}: out of order");
            match (flt, stream) {
                (Some(flt), _) => {
                    let all = f.expected(&flt).await;
                    // From End/After: a suffix of what matches.
                    let first = got.first().copied().unwrap_or(u64::MAX);
                    let want: Vec<u64> = all.into_iter().filter(|p| *p >= first).collect();
                    assert_eq!(got, want, "{flt:?}");
                }
                (None, Some(s)) => {
                    let name = StreamName::new(s.clone()).unwrap();
                    let want: Vec<u64> = f
                        .source
                        .store
                        .read_stream(&name, ReadStream::forward())
                        .await
                        .unwrap()
                        .iter()
                        .map(|e| e.position)
                        .collect();
                    assert_eq!(got, want, "{s}");
                }
                _ => unreachable!(),
            }
        }
    }
}
