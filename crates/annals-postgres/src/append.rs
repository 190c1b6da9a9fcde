//! Appends, with in-process group commit.
//!
//! Every append goes through a queue to the store's committer task. It
//! takes whatever is queued (up to a cap) and writes it in one transaction:
//! take the head lock, read and decide the streams, write all events and
//! stream rows, commit. Appends from many concurrent callers therefore
//! share one head acquisition and one WAL flush, which is what makes the
//! head-row ordering design (ADR 02) scale with concurrency. Each request
//! still succeeds or fails on its own: a request whose expectation fails
//! writes nothing and is answered with its error while the others in the
//! batch commit.
//!
//! Every writer of stream rows (both paths here, and deletes) takes the
//! head lock before touching them, so under the head the stream rows can
//! be read without locking them (migration 0003, ADR 02).
//!
//! A caller that stops waiting (its future dropped) does not withdraw its
//! append: it may still commit, exactly as when an acknowledgement is lost.
//! Re-send it with the same event ids to learn the outcome (idempotency).
//!
//! When the connection breaks under a round, the round may have committed
//! with its answer lost, so it is not simply run again: the committer takes
//! the head on a new connection (which waits out any transaction of the
//! broken attempt still on the server) and looks the round's event ids up
//! among the events committed since the attempt began; what is found is
//! answered from the log, the rest runs again (`settle_round`).
//!
//! The common case takes one request: a function selected in an implicit
//! transaction (migration 0006), `append_part` for a round of one part (a
//! lone writer's every append) and `append_head_first` for several (0003:
//! head, check, insert and stream upsert, notify). The functions only
//! write when every part is a plain write; anything the rules must decide
//! (a possible idempotent re-send, a tombstone, a failed expectation) makes
//! it step aside, and the round runs on the exact path: two pipelined round
//! trips (`BEGIN` with the head and stream statements, the write with
//! `COMMIT`; a failed write turns that `COMMIT` into a rollback), decided in
//! Rust by `StreamState::decide`. Where the sessions default to another
//! isolation than READ COMMITTED, the function call is wrapped in an
//! explicit READ COMMITTED transaction, still one round trip
//! (`ExplicitReadCommitted`).

use std::{collections::HashMap, collections::HashSet, sync::Arc, time::Duration};

use annals_core::{
    AppendDecision, AppendResult, Error, EventData, ExpectedVersion, Result, StreamAppend, StreamName,
    StreamState, category_of,
};
use deadpool_postgres::Pool;
use tokio::sync::{Mutex, mpsc, oneshot, watch};
use tokio_postgres::{error::SqlState, types::ToSql};
use uuid::Uuid;

use crate::{
    ExplicitReadCommitted, Inner, PgError,
    error::{breaks_connection, db, describe, is_retryable_state},
    listener::bump,
    pooled::{Answer, NoAnswer, Pooled},
    row::{to_i64, to_u64},
    sql::Statements,
    timestamp::PgTimestamp,
};

/// How often a transaction is re-run after a deadlock, serialization
/// failure or unique violation before the error is returned.
const MAX_ATTEMPTS: u32 = 5;
/// At most this many requests share one transaction.
const MAX_BATCH_REQUESTS: usize = 256;
/// A request is added to a batch only while the batch stays under this
/// many events (the first request is always taken).
const MAX_BATCH_EVENTS: usize = 10_000;
/// Committer tasks per store: one. Every round holds the head from its
/// first statement to its commit (migration 0003), so rounds of one store
/// cannot overlap on the server anyway; a second committer only halved the
/// batches (each took about half of the waiting appends). Measured with
/// `pg_bench`, same run: 32 writers 0.52 -> 0.86 of the raw baseline,
/// 8 writers 0.40 -> 0.45.
pub(crate) const COMMITTERS: usize = 1;
/// How many times a committer that found fewer appends queued than it
/// answered in its previous round yields to the runtime, to let those
/// callers queue their next append, before it starts the round anyway.
/// A yield costs microseconds; a round holds the head for a commit flush.
/// Without it, the callers answered by a round trickled back one by one
/// and rounds alternated between one append and the rest. Measured with
/// `pg_bench`, single-event appends vs the raw baseline, two back-to-back
/// pairs of runs: 8 writers 0.56/0.76 -> 1.20/1.39, 32 writers
/// 0.68/0.77 -> 1.58/1.29.
const LINGER_YIELDS: u32 = 2;

/// One caller's append waiting for a committer.
pub(crate) struct Request {
    parts: Vec<StreamAppend>,
    reply: oneshot::Sender<Result<Vec<AppendResult>>>,
}

impl Request {
    /// Bytes of data and metadata, as [`annals_core::Limits`] counts an append.
    fn bytes(&self) -> usize {
        self.parts.iter().flat_map(|p| &p.events).map(|e| e.data.len() + e.metadata.len()).sum()
    }
}

/// What a committer needs from the store.
pub(crate) struct Committer {
    pub pool: Pool,
    /// The schema name (metric label of discarded connections).
    pub schema: Arc<str>,
    pub sql: Arc<Statements>,
    pub head: Arc<watch::Sender<u64>>,
    pub queue: Arc<Mutex<mpsc::Receiver<Request>>>,
    /// The fast path's call goes inside an explicit READ COMMITTED
    /// transaction (the sessions default to another isolation).
    pub explicit_rc: ExplicitReadCommitted,
    /// Rounds that ran on the exact path (see [`crate::PgStore::exact_append_rounds`]).
    pub exact_rounds: Arc<std::sync::atomic::AtomicU64>,
    /// Each attempt's answer deadline (see [`crate::pooled`]).
    pub answer: Answer,
    /// The server sessions of the connections appends were sent on.
    pub sessions: Arc<Sessions>,
    /// Whether `pg_terminate_backend` can wait for the session to end
    /// (PostgreSQL 14 and later).
    pub terminate_waits: bool,
    /// How long a new connection may take (a pool that cannot make one in
    /// time is a database that does not answer).
    pub connect_timeout: Duration,
    /// A request joins a batch only if the batch's events then hold at most
    /// this many bytes of data and metadata: the store's
    /// [`annals_core::Limits::max_append_size`] (the first request is always
    /// taken, and holds at most that). A round is one statement, so one round
    /// is then never larger than the largest append the store takes, which
    /// PostgreSQL can receive ([`crate::MAX_APPEND_SIZE`]) and which the
    /// answer timeout must allow for anyway. (Without a bound, seventeen
    /// appends of 63 MiB, each within the default limits, made one round of
    /// 1.1 GB: PostgreSQL broke the connection of every attempt, and each of
    /// them was answered "outcome unknown" after five.)
    pub max_batch_bytes: usize,
}

impl Inner {
    /// Appends `parts` atomically (see [`annals_core::Appender`]).
    pub(crate) async fn append_parts(&self, parts: Vec<StreamAppend>) -> Result<Vec<AppendResult>> {
        self.limits.check_parts(&parts)?;
        let (reply, answer) = oneshot::channel();
        self.queue.send(Request { parts, reply }).await.map_err(|_| Error::Closed)?;
        answer.await.map_err(|_| Error::Closed)?
    }
}

/// Why one transaction attempt failed.
enum Failure {
    /// Run the whole transaction again (the database said so by SQLSTATE:
    /// nothing was written).
    Retry(tokio_postgres::Error),
    /// The connection broke or did not answer in time: the attempt may or
    /// may not have committed (the commit can succeed on the server while
    /// its answer is lost). Settled from the log before anything runs again.
    Unknown(Lost),
    /// Final: nothing was written.
    Fail(Error),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        if e.code().is_some_and(is_retryable_state) {
            Failure::Retry(e)
        } else if breaks_connection(&e) {
            Failure::Unknown(Lost::Broke(e, Sent::Never))
        } else {
            Failure::Fail(db(e))
        }
    }
}

impl From<NoAnswer> for Failure {
    /// Before anything of the round was sent (see [`Failure::sent_on`]).
    fn from(e: NoAnswer) -> Self {
        Failure::Unknown(Lost::NoAnswer(e, Sent::Never))
    }
}

impl Failure {
    /// The round was sent on the session `on` (`None`: one whose name the
    /// store could not learn): a lost answer may come from it.
    fn sent_on(self, on: Option<&Session>) -> Self {
        let sent = || on.map_or(Sent::Unnamed, |s| Sent::On(s.clone()));
        match self {
            Failure::Unknown(Lost::NoAnswer(e, Sent::Never)) => Failure::Unknown(Lost::NoAnswer(e, sent())),
            Failure::Unknown(Lost::Broke(e, Sent::Never)) => Failure::Unknown(Lost::Broke(e, sent())),
            other => other,
        }
    }
}

/// How an attempt's answer was lost.
enum Lost {
    /// The connection broke. Its server session may live on (the break
    /// can be a reset between client and server, or a pooler's): it is
    /// ended before the log is searched, like one that did not answer.
    Broke(tokio_postgres::Error, Sent),
    /// PostgreSQL did not answer within the answer timeout; the connection
    /// was closed and the statement cancelled.
    NoAnswer(NoAnswer, Sent),
}

/// Where a round whose answer was lost was sent.
enum Sent {
    /// Nowhere: the connection did not answer before it.
    Never,
    /// To this server session, which may still run it (or, behind a proxy
    /// that holds the bytes, receive it later).
    On(Session),
    /// To a session the store could not name (see `Committer::session_of`):
    /// it cannot be ended, so what the log does not show is unknown.
    Unnamed,
}

/// A server session of a pooled connection: backend pid and start time
/// (together they name it even after the pid is reused). The start time is
/// kept as the instant, not as text: each session renders a `timestamptz`
/// in its own `TimeZone` and `DateStyle`, which an application may set on
/// a pooled connection ([`crate::PgStore::pool`]), so the text one session
/// read need not match the text of the session that ends it.
#[derive(Clone, Debug)]
pub(crate) struct Session {
    pid: i32,
    started: PgTimestamp,
}

/// The sessions of the committer's connections, learnt once per connection
/// (one round trip on its first append), so that a round that gets no
/// answer can have its session ended before the log is searched for it.
#[derive(Default)]
/// `None` for a connection whose session could not be learnt: asked once
/// too, not before every round.
pub(crate) struct Sessions(std::sync::Mutex<HashMap<deadpool_postgres::ObjectId, Option<Session>>>);

/// Sessions remembered at most (connection ids are never reused, so the map
/// is cleared past this rather than kept in step with the pool).
const MAX_SESSIONS: usize = 1024;

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lost::Broke(e, _) => write!(f, "the connection broke: {}", describe(e)),
            Lost::NoAnswer(e, _) => write!(f, "{}", PgError::from(*e)),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Fail(e)
    }
}

impl From<deadpool_postgres::PoolError> for Failure {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        Failure::Fail(PgError::from(e).into())
    }
}

/// The transaction is over: the connection may go back to the pool, unless
/// one of `results` says it broke (then dropping it discards it).
fn keep_unless_broken(conn: &Pooled, results: &[Option<&tokio_postgres::Error>]) {
    if !results.iter().flatten().any(|e| breaks_connection(e)) {
        conn.keep();
    }
}

/// A stream as read under the head lock: its row and its last run.
struct Read {
    state: StreamState,
    last_event_id: Option<Uuid>,
}

impl Committer {
    /// Runs until the store's queue closes.
    pub(crate) async fn run(self) {
        // Appends answered by the previous round: callers that are likely
        // to send their next one right away.
        let mut answered = 0;
        // A request taken from the queue that did not fit the previous
        // batch: the first of the next.
        let mut carried: Option<Request> = None;
        loop {
            let batch = {
                let mut queue = self.queue.lock().await;
                let first = match carried.take() {
                    Some(first) => first,
                    None => {
                        let Some(first) = queue.recv().await else { return };
                        first
                    }
                };
                let mut events: usize = first.parts.iter().map(|p| p.events.len()).sum();
                let mut bytes = first.bytes();
                let mut batch = vec![first];
                let mut idle_yields = 0;
                while batch.len() < MAX_BATCH_REQUESTS && events < MAX_BATCH_EVENTS {
                    match queue.try_recv() {
                        Ok(next) => {
                            let size = next.bytes();
                            if bytes.saturating_add(size) > self.max_batch_bytes {
                                carried = Some(next);
                                break;
                            }
                            events += next.parts.iter().map(|p| p.events.len()).sum::<usize>();
                            bytes += size;
                            batch.push(next);
                            idle_yields = 0;
                        }
                        // Adaptive linger: only while appends are known to
                        // be on their way (never for a lone writer).
                        Err(_) if batch.len() < answered && idle_yields < LINGER_YIELDS => {
                            idle_yields += 1;
                            tokio::task::yield_now().await;
                        }
                        Err(_) => break,
                    }
                }
                batch
            };
            answered = batch.len();
            let mut pending = batch;
            while !pending.is_empty() {
                let (round, rest) = split_round(pending);
                pending = rest;
                if let Some(no_answer) = self.run_round(round).await {
                    // The carried request was queued behind these: refused
                    // with them, not sent to wait out a timeout of its own.
                    let mut waiting = std::mem::take(&mut pending);
                    waiting.extend(carried.take());
                    self.refuse_waiting(waiting, no_answer).await;
                }
            }
        }
    }

    /// After a round that got no answer (`no_answer`): answers `waiting`
    /// and every request queued now, none of which was sent, with
    /// [`PgError::NotAnswering`] at once. Rounds run one at a time, so each
    /// would otherwise wait a full answer timeout (and its settling) of its
    /// own, and an outage kept the last of many queued appends waiting for
    /// minutes. The next request to arrive is sent as usual: it finds
    /// out whether the database is back.
    async fn refuse_waiting(&self, mut waiting: Vec<Request>, no_answer: NoAnswer) {
        {
            let mut queue = self.queue.lock().await;
            while let Ok(next) = queue.try_recv() {
                waiting.push(next);
            }
        }
        if waiting.is_empty() {
            return;
        }
        tracing::warn!(
            schema = %self.schema,
            appends = waiting.len(),
            "PostgreSQL stopped answering; failing the appends queued behind the one that got no answer, unsent"
        );
        metrics::counter!("annals_pg_appends_not_sent_total", "schema" => self.sql.name.clone())
            .increment(waiting.len() as u64);
        for request in waiting {
            let _ = request.reply.send(Err(PgError::NotAnswering { waited: no_answer.waited }.into()));
        }
    }

    /// Commits one round, answering every request in it. Returns the
    /// [`NoAnswer`] when the database did not answer it in time (whatever
    /// the requests were answered), `None` otherwise.
    async fn run_round(&self, mut round: Vec<Request>) -> Option<NoAnswer> {
        let mut attempt = 1;
        let mut unanswered = None;
        loop {
            // Whatever this attempt writes lands at or after the head known
            // now (positions only grow, and ours come after every commit
            // seen so far).
            let since = *self.head.borrow();
            let parts: Vec<&[StreamAppend]> = round.iter().map(|r| r.parts.as_slice()).collect();
            let tried = self.try_round(&parts).await;
            if let Err(Failure::Unknown(lost)) = tried {
                if let Lost::NoAnswer(no_answer, _) = &lost {
                    unanswered = Some(*no_answer);
                }
                // Settled before anything else runs again: re-running a
                // round that did commit would write an `Any` part twice when
                // another process appended to its stream meanwhile (the
                // idempotency check only sees the stream's tail), and would
                // fail an `Exact` part that was in fact written.
                let Some(rest) = self.settle_round(round, &lost, since, attempt).await else {
                    return unanswered;
                };
                round = rest;
                attempt += 1;
                continue;
            }
            match tried {
                Ok(outcomes) => {
                    for (request, outcome) in round.into_iter().zip(outcomes) {
                        // The caller may have gone away; nothing to do then.
                        let _ = request.reply.send(outcome);
                    }
                    return unanswered;
                }
                Err(Failure::Retry(e)) if attempt < MAX_ATTEMPTS => {
                    tracing::debug!(error = %e, attempt, "append raced another transaction; retrying");
                    let reason = e.code().map_or("other", |c| c.code()).to_owned();
                    metrics::counter!(
                        "annals_pg_append_retries_total", "schema" => self.sql.name.clone(), "sqlstate" => reason
                    )
                    .increment(1);
                    tokio::time::sleep(Duration::from_millis(u64::from(attempt) * 5)).await;
                    attempt += 1;
                }
                Err(failure) => {
                    if round.len() > 1 {
                        // Do not let one request's failure fail the others:
                        // run each on its own.
                        let mut alone = round.into_iter();
                        while let Some(request) = alone.next() {
                            if let Some(no_answer) = Box::pin(self.run_round(vec![request])).await {
                                self.refuse_waiting(alone.collect(), no_answer).await;
                                return Some(no_answer);
                            }
                        }
                        return unanswered;
                    }
                    let error = match failure {
                        Failure::Retry(e) => db(e),
                        Failure::Unknown(lost) => outcome_unknown(&lost),
                        Failure::Fail(e) => e,
                    };
                    if let Some(request) = round.into_iter().next() {
                        let _ = request.reply.send(Err(error));
                    }
                    return unanswered;
                }
            }
        }
    }

    /// After attempt number `attempt` of `round` lost its answer (`lost`):
    /// answers every request the attempt wrote, from the log, and returns
    /// the others to run again (`None` when nothing is left to run, every
    /// request having been answered). After a connection that did not
    /// answer in time, what was not written is answered with
    /// [`PgError::NoAnswer`] instead of running again: a database that
    /// stopped answering once would most likely keep the caller waiting
    /// another full timeout per attempt.
    async fn settle_round(
        &self,
        round: Vec<Request>,
        lost: &Lost,
        since: u64,
        attempt: u32,
    ) -> Option<Vec<Request>> {
        let requests: Vec<&[StreamAppend]> = round.iter().map(|r| r.parts.as_slice()).collect();
        let end = match lost {
            Lost::NoAnswer(no_answer, Sent::Never) => {
                // Nothing of it reached a server.
                tracing::debug!(requests = round.len(), "appends answered as not written: nothing was sent");
                for request in round {
                    let _ = request.reply.send(Err(PgError::from(*no_answer).into()));
                }
                return None;
            }
            Lost::NoAnswer(_, Sent::On(session)) | Lost::Broke(_, Sent::On(session)) => Some(session),
            Lost::NoAnswer(_, Sent::Unnamed) | Lost::Broke(..) => None,
        };
        let settled = self.find_written(&requests, since, end).await;
        // Per request.
        let counter = |outcome: &'static str, requests: usize| {
            metrics::counter!(
                "annals_pg_append_outcomes_settled_total", "schema" => self.sql.name.clone(), "outcome" => outcome
            )
            .increment(requests as u64);
        };
        let settled = match settled {
            Ok(settled) => settled,
            Err(e) => {
                // Cannot tell: the callers must re-send (same event ids),
                // which settles it once the database is back.
                counter("unknown", round.len());
                tracing::warn!(error = %e, lost = %lost,
                    "an append lost its answer and its outcome cannot be read back; answering it as unknown");
                for request in round {
                    let _ = request.reply.send(Err(outcome_unknown(lost)));
                }
                return None;
            }
        };
        let mut rest = Vec::new();
        for (request, written) in round.into_iter().zip(settled) {
            match written {
                Some(results) => {
                    counter("written", 1);
                    let _ = request.reply.send(Ok(results));
                }
                None => rest.push(request),
            }
        }
        if rest.is_empty() {
            return None;
        }
        counter("not_written", rest.len());
        if let Lost::NoAnswer(no_answer, Sent::On(session)) = lost {
            // Its session was ended before the log was searched: what was
            // not found can never be written.
            tracing::debug!(
                requests = rest.len(),
                since,
                pid = session.pid,
                "appends answered as not written: not in the log once their session ended"
            );
            for request in rest {
                let _ = request.reply.send(Err(PgError::from(*no_answer).into()));
            }
            return None;
        }
        // Not run again on a session that could not be ended: the request
        // may still reach it and run.
        if attempt >= MAX_ATTEMPTS || matches!(lost, Lost::NoAnswer(..) | Lost::Broke(_, Sent::Unnamed)) {
            for request in rest {
                let _ = request.reply.send(Err(outcome_unknown(lost)));
            }
            return None;
        }
        tracing::debug!(lost = %lost, attempt, "an append's connection broke before it committed; running it again");
        Some(rest)
    }

    /// For each request, its results if the log holds all its events at or
    /// after position `since` (it was written), else `None` (it was not:
    /// a round is one transaction, so no request is half written).
    ///
    /// Takes the head lock first: a transaction of the lost attempt that
    /// is still alive on the server holds it (every append takes it before
    /// writing), so once it is granted that transaction has committed or
    /// rolled back, and what is read here stays true. A request the server
    /// has not read yet holds nothing: only ending its session stops it.
    ///
    /// With `end`, the session the attempt was sent on is terminated first,
    /// and the look-up is sent only once that statement has answered
    /// (waiting up to the answer timeout for the session to go, on
    /// PostgreSQL 14 and later): a request still on its way to it (held by
    /// a proxy, or in a server too busy to read it yet) can then never run,
    /// so what is not found here is never written. If it cannot be
    /// terminated (the role may not), the whole look-up fails and the
    /// requests are answered as unknown.
    ///
    /// Not pipelined with the look-up: a statement given as text is
    /// prepared first (a round trip) and sent only after that, behind
    /// whatever was pipelined with it, so the server ran the search before
    /// the termination, and an append released in between was written and
    /// answered "not written" (found by the chaos test). Awaiting it costs
    /// one round trip, on this rare path only, and does not depend on how
    /// the statement is sent.
    async fn find_written(
        &self,
        requests: &[&[StreamAppend]],
        since: u64,
        end: Option<&Session>,
    ) -> Result<Vec<Option<Vec<AppendResult>>>, Error> {
        let conn = Pooled::discarded_unless_kept(
            self.pool.get().await.map_err(PgError::from)?,
            self.schema.clone(),
            self.answer.clone(),
        );
        conn.deadline()
            .bound(async {
                let client: &deadpool_postgres::ClientWrapper = &conn;
                let ids: Vec<Uuid> = requests
                    .iter()
                    .flat_map(|r| r.iter())
                    .flat_map(|p| p.events.iter().map(|e| e.id))
                    .collect();
                let lock_head = client.prepare_cached(&self.sql.lock_head).await.map_err(db)?;
                let find = client.prepare_cached(&self.sql.find_written).await.map_err(db)?;
                let since_param = to_i64(since);
                let find_params: [&(dyn ToSql + Sync); 2] = [&since_param, &ids];
                if let Some(session) = end {
                    // Answered before anything below is sent (see above).
                    let wait_ms = i64::try_from(self.answer.within.as_millis()).unwrap_or(i64::MAX);
                    let terminated = if self.terminate_waits {
                        client.query_one(TERMINATE_WAITING, &[&session.pid, &session.started, &wait_ms]).await
                    } else {
                        client.query_one(TERMINATE, &[&session.pid, &session.started]).await
                    };
                    // Outside a transaction: the connection stays fit unless it broke.
                    keep_unless_broken(&conn, &[terminated.as_ref().err()]);
                    let ended: bool = terminated.map_err(db)?.try_get(0).map_err(db)?;
                    tracing::debug!(
                        pid = session.pid,
                        ended,
                        "ending the session of an append that lost its answer"
                    );
                    if !ended {
                        return Err(Error::Backend {
                            message: "the session of an append that lost its answer did not end in time"
                                .into(),
                            source: None,
                        });
                    }
                    conn.discard();
                }
                let (begun, headed, rows, ended) = futures::join!(
                    client.batch_execute(BEGIN),
                    client.query_one(&lock_head, &[]),
                    client.query(&find, &find_params),
                    client.batch_execute("ROLLBACK")
                );
                keep_unless_broken(
                    &conn,
                    &[begun.as_ref().err(), headed.as_ref().err(), rows.as_ref().err(), ended.as_ref().err()],
                );
                begun.map_err(db)?;
                headed.map_err(db)?;
                ended.map_err(db)?;
                let mut found: HashMap<(String, Uuid), (u64, u64)> = HashMap::new();
                for row in rows.map_err(db)? {
                    let stream: String = row.try_get(0).map_err(db)?;
                    let id: Uuid = row.try_get(1).map_err(db)?;
                    let version = to_u64(row.try_get(2).map_err(db)?, "version")?;
                    let position = to_u64(row.try_get(3).map_err(db)?, "position")?;
                    // The first occurrence from `since` on (ids may repeat across
                    // appends; a part's events are consecutive in any case).
                    found.entry((stream, id)).or_insert((version, position));
                }
                let mut next = since;
                let mut settled = Vec::with_capacity(requests.len());
                for parts in requests {
                    // Per part: its result if it was written since `since`.
                    let written: Vec<Option<AppendResult>> = parts
                        .iter()
                        .map(|part| {
                            let mut last: Option<(u64, u64)> = None;
                            for event in &part.events {
                                let &(version, position) = found.get(&(part.stream.to_string(), event.id))?;
                                // Consecutive in the stream and in the log, as one
                                // append writes them.
                                if let Some((v, p)) = last
                                    && (version != v + 1 || position != p + 1)
                                {
                                    return None;
                                }
                                last = Some((version, position));
                            }
                            let (version, position) = last?;
                            next = next.max(position + 1);
                            Some(AppendResult { next_version: version + 1, position })
                        })
                        .collect();
                    // A request is decided whole and a round commits whole: once
                    // one part is in the log, the request committed, and a part
                    // not found wrote nothing because it was an idempotent
                    // re-send, answered with the stream's tail before the round.
                    // (Counting the request unwritten ran it again, and wrote its
                    // other parts twice when another process had appended to
                    // them meanwhile.)
                    let first_written = written
                        .iter()
                        .zip(parts.iter())
                        .filter_map(|(r, part)| r.map(|r| r.position + 1 - part.events.len() as u64))
                        .min();
                    let Some(round_at_most) = first_written else {
                        settled.push(None);
                        continue;
                    };
                    let mut results = Vec::with_capacity(parts.len());
                    for (result, part) in written.into_iter().zip(parts.iter()) {
                        match result {
                            Some(r) => results.push(Some(r)),
                            None => results.push(self.resent_before(client, part, round_at_most).await?),
                        }
                    }
                    settled.push(results.into_iter().collect::<Option<Vec<_>>>());
                }
                // Committed, so readable: as after our own commit.
                bump(&self.head, next);
                Ok(settled)
            })
            .await
    }

    /// The answer to `part` of a request found committed from position
    /// `before` on without the part's events: if the stream's last events
    /// before `before` are exactly the part's, the part was an idempotent
    /// re-send and is answered as one (its stream's last version and
    /// position then); `None` otherwise. Events before `before` never
    /// change, so this needs no lock.
    async fn resent_before(
        &self,
        client: &deadpool_postgres::ClientWrapper,
        part: &StreamAppend,
        before: u64,
    ) -> Result<Option<AppendResult>, Error> {
        let stmt = client.prepare_cached(&self.sql.tail_before).await.map_err(db)?;
        let n = part.events.len() as i64;
        let rows = client.query(&stmt, &[&part.stream.as_str(), &to_i64(before), &n]).await.map_err(db)?;
        let ids: Vec<Uuid> =
            rows.iter().rev().map(|row| row.try_get(0)).collect::<Result<_, _>>().map_err(db)?;
        if ids != part.events.iter().map(|e| e.id).collect::<Vec<_>>() {
            return Ok(None);
        }
        let Some(newest) = rows.first() else { return Ok(None) };
        let version = to_u64(newest.try_get(1).map_err(db)?, "version")?;
        let position = to_u64(newest.try_get(2).map_err(db)?, "position")?;
        Ok(Some(AppendResult { next_version: version + 1, position }))
    }

    /// A connection for a round's transaction, discarded unless kept (an
    /// error or a cancelled future that leaves the transaction open must
    /// not hand it to the next borrower), and its server session.
    async fn round_connection(&self) -> Result<(Pooled, Option<Session>), Failure> {
        let object = match self.pool.get().await {
            Ok(object) => object,
            // A server that takes the TCP connection but never answers the
            // start-up (stopped, or behind a wedged proxy): nothing was sent.
            Err(deadpool_postgres::PoolError::Timeout(deadpool_postgres::TimeoutType::Create)) => {
                return Err(NoAnswer { waited: self.connect_timeout }.into());
            }
            Err(e) => return Err(e.into()),
        };
        let conn = Pooled::discarded_unless_kept(object, self.schema.clone(), self.answer.clone());
        let session = self.session_of(&conn).await?;
        Ok((conn, session))
    }

    /// The server session of `conn`, asked once per connection. `None` when
    /// the server would not say (no row for it in `pg_stat_activity`): the
    /// appends still run, and one that gets no answer is answered as
    /// unknown. Errors only when the connection itself fails.
    async fn session_of(&self, conn: &Pooled) -> Result<Option<Session>, Failure> {
        let id = deadpool_postgres::Object::id(conn);
        if let Some(known) =
            self.sessions.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(&id)
        {
            return Ok(known.clone());
        }
        let asked = conn
            .deadline()
            .bound(async {
                let row = match conn.query_opt(OWN_SESSION, &[]).await {
                    Ok(row) => row,
                    Err(e) if breaks_connection(&e) => return Err(Failure::from(e)),
                    Err(e) => {
                        tracing::warn!(error = %describe(&e), "cannot learn the session of a connection");
                        None
                    }
                };
                Ok(row.and_then(|row| {
                    Some(Session { pid: row.try_get(0).ok()?, started: row.try_get(1).ok()? })
                }))
            })
            .await?;
        let mut known = self.sessions.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if known.len() >= MAX_SESSIONS {
            known.clear();
        }
        known.insert(id, asked.clone());
        Ok(asked)
    }

    /// One transaction over `requests`, whose streams are disjoint.
    /// Returns each request's outcome; `Err` only when the transaction as a
    /// whole failed.
    async fn try_round(
        &self,
        requests: &[&[StreamAppend]],
    ) -> Result<Vec<Result<Vec<AppendResult>>>, Failure> {
        if let Some(outcomes) = self.try_fast(requests).await? {
            return Ok(outcomes);
        }
        self.exact_rounds.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        metrics::counter!("annals_pg_append_exact_rounds_total", "schema" => self.sql.name.clone())
            .increment(1);
        let (conn, session) = self.round_connection().await?;
        conn.deadline()
            .bound(async {
                let client: &deadpool_postgres::ClientWrapper = &conn;
                let lock_head = client.prepare_cached(&self.sql.lock_head).await?;
                let ensure = client.prepare_cached(&self.sql.ensure_streams).await?;
                let read = client.prepare_cached(&self.sql.read_streams).await?;
                let write = client.prepare_cached(&self.sql.write).await?;

                // The head first, like every writer of runs and stream rows (ADR
                // 02): from here until the commit no other append or delete of the
                // schema can run, so the streams read below stay as read. This holds
                // the head for two round trips, but only on this rare path. Streams
                // without a row get one (rolled back if nothing is written).
                let mut names: Vec<&str> =
                    requests.iter().flat_map(|r| r.iter()).map(|p| p.stream.as_str()).collect();
                names.sort_unstable();
                let categories: Vec<&str> = names.iter().map(|n| category_of(n)).collect();
                let ensure_params: [&(dyn ToSql + Sync); 2] = [&names, &categories];
                let read_params: [&(dyn ToSql + Sync); 1] = [&names];
                let (begun, headed, ensured, rows) = futures::join!(
                    client.batch_execute(BEGIN),
                    client.query_one(&lock_head, &[]),
                    client.execute(&ensure, &ensure_params),
                    client.query(&read, &read_params)
                );
                begun?;
                headed?;
                ensured?;
                let mut read_states = HashMap::with_capacity(names.len());
                for row in rows? {
                    let name: String = row.try_get(0)?;
                    let last_version: Option<i64> = row.try_get(1)?;
                    let last_position: Option<i64> = row.try_get(2)?;
                    let truncate_before: i64 = row.try_get(3)?;
                    let state = StreamState {
                        last_version: last_version.map(|v| to_u64(v, "last_version")).transpose()?,
                        last_position: last_position.map(|v| to_u64(v, "last_position")).transpose()?,
                        truncate_before: to_u64(truncate_before, "truncate_before")?,
                        tombstoned: row.try_get(4)?,
                    };
                    read_states.insert(name, Read { state, last_event_id: row.try_get(5)? });
                }

                // Decide each request; a failed decision fails only its request.
                let mut decided: Vec<Result<Vec<AppendDecision>>> = Vec::with_capacity(requests.len());
                for parts in requests {
                    let mut decisions = Vec::with_capacity(parts.len());
                    let mut failed = None;
                    for part in *parts {
                        let Some(Read { state, last_event_id }) = read_states.get(part.stream.as_str())
                        else {
                            return Err(Failure::Fail(Error::Backend {
                                message: format!("stream row '{}' was not read", part.stream),
                                source: None,
                            }));
                        };
                        let ids: Vec<Uuid> = part.events.iter().map(|e| e.id).collect();
                        let tail =
                            resend_tail(client, &self.sql, &part.stream, state, *last_event_id, &ids).await?;
                        match state.decide(&part.stream, part.expected, &ids, |_| Ok(tail)) {
                            Ok(d) => decisions.push(d),
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        }
                    }
                    decided.push(failed.map_or(Ok(decisions), Err));
                }

                let mut batch = Batch::default();
                for (parts, decisions) in requests.iter().zip(&decided) {
                    if let Ok(decisions) = decisions {
                        for (part, decision) in parts.iter().zip(decisions) {
                            if let AppendDecision::Write { first_version } = decision {
                                batch.add(part, *first_version)?;
                            }
                        }
                    }
                }
                if batch.total == 0 {
                    // Nothing to write (failures and idempotent re-sends only).
                    client.batch_execute("ROLLBACK").await?;
                    conn.keep();
                    return Ok(decided
                        .into_iter()
                        .map(|d| d.map(|ds| ds.iter().map(already_written).collect()))
                        .collect());
                }

                let write_params: [&(dyn ToSql + Sync); 13] = [
                    &batch.total,
                    &batch.run_streams,
                    &batch.run_versions,
                    &batch.run_offsets,
                    &batch.run_counts,
                    &batch.run_types,
                    &batch.run_categories,
                    &batch.run_correlation_ids,
                    &batch.ids,
                    &batch.content_types,
                    &batch.data,
                    &batch.metadata,
                    &self.sql.channel,
                ];
                let (written, committed) =
                    futures::join!(client.query_one(&write, &write_params), client.batch_execute("COMMIT"));
                // Either way the transaction is over (a failed write turns the
                // COMMIT into a rollback; a failed COMMIT ends it too).
                keep_unless_broken(&conn, &[written.as_ref().err(), committed.as_ref().err()]);
                let row = written?;
                committed?;
                let first = to_u64(row.try_get(0)?, "position")?;
                let next = first + to_u64(batch.total, "total")?;
                // Published only after commit: the events are readable now.
                bump(&self.head, next);

                let mut offsets = batch.part_offsets.into_iter();
                Ok(decided
                    .into_iter()
                    .map(|d| {
                        d.map(|decisions| {
                            decisions
                                .iter()
                                .map(|decision| match decision {
                                    AppendDecision::AlreadyWritten(r) => *r,
                                    AppendDecision::Write { .. } => {
                                        let (next_version, last_offset) = offsets.next().unwrap_or_default();
                                        AppendResult { next_version, position: first + last_offset }
                                    }
                                })
                                .collect()
                        })
                    })
                    .collect())
            })
            .await
            .map_err(|f| f.sent_on(session.as_ref()))
    }
}

impl Committer {
    /// The common case in one request, selected in an implicit
    /// transaction: `append_part` (migration 0006) for a round of one part,
    /// `append_head_first` (0003, 0006) for several. The functions write
    /// only when every part is a plain write that `StreamState::decide`
    /// would accept at the stream's next version; otherwise they raise
    /// [`DECLINED`], the transaction rolls back, and `Ok(None)` sends the
    /// round to the exact path. The rules therefore stay written once.
    async fn try_fast(
        &self,
        requests: &[&[StreamAppend]],
    ) -> Result<Option<Vec<Result<Vec<AppendResult>>>>, Failure> {
        let Some(args) = FastArgs::new(requests) else { return Ok(None) };
        let one_part = args.part_streams.len() == 1;
        let (conn, session) = self.round_connection().await?;
        conn.deadline()
            .bound(async {
                let client: &deadpool_postgres::ClientWrapper = &conn;
                // No BEGIN: the implicit transaction commits at the Sync that ends
                // the request, and `query_one` reads up to the ReadyForQuery after
                // it, so a row and no error means committed, and an error means
                // nothing was (or, if the connection broke, may have been: a re-run
                // then finds an idempotent re-send).
                let (sql, leading): (&str, Vec<&(dyn ToSql + Sync)>) = if one_part {
                    let stream: [&(dyn ToSql + Sync); 8] = [
                        &args.part_streams[0],
                        &args.part_categories[0],
                        &args.part_kinds[0],
                        &args.part_versions[0],
                        &args.run_offsets,
                        &args.run_counts,
                        &args.run_types,
                        &args.run_correlation_ids,
                    ];
                    (&self.sql.append_part, stream.into())
                } else {
                    let parts: [&(dyn ToSql + Sync); 13] = [
                        &args.part_streams,
                        &args.part_categories,
                        &args.part_kinds,
                        &args.part_versions,
                        &args.part_counts,
                        &args.part_last_offsets,
                        &args.part_last_ids,
                        &args.run_parts,
                        &args.run_offsets,
                        &args.run_version_offsets,
                        &args.run_counts,
                        &args.run_types,
                        &args.run_correlation_ids,
                    ];
                    (&self.sql.append_fast, parts.into())
                };
                let params: Vec<&(dyn ToSql + Sync)> =
                    leading.into_iter().chain(args.event_params()).chain([&self.sql.channel as _]).collect();
                let statement = client.prepare_cached(sql).await?;
                let row = if self.explicit_rc.get() {
                    // The sessions default to another isolation, under which the
                    // function would decline every call: the same call inside an
                    // explicit READ COMMITTED transaction, pipelined (one round
                    // trip). A failed call turns the COMMIT into a rollback; a row
                    // and a completed COMMIT mean committed.
                    let (begun, called, committed) = futures::join!(
                        client.batch_execute(BEGIN),
                        client.query_one(&statement, &params),
                        client.batch_execute("COMMIT")
                    );
                    keep_unless_broken(
                        &conn,
                        &[begun.as_ref().err(), called.as_ref().err(), committed.as_ref().err()],
                    );
                    begun?;
                    let row = match called {
                        Ok(row) => row,
                        Err(e) if e.code().map(SqlState::code) == Some(DECLINED) => return Ok(None),
                        Err(e) => return Err(e.into()),
                    };
                    committed?;
                    row
                } else {
                    let called = client.query_one(&statement, &params).await;
                    // No transaction is left open either way.
                    keep_unless_broken(&conn, &[called.as_ref().err()]);
                    match called {
                        Ok(row) => row,
                        Err(e) if e.code().map(SqlState::code) == Some(DECLINED) => return Ok(None),
                        Err(e) => return Err(e.into()),
                    }
                };
                let first = to_u64(row.try_get(0)?, "position")?;
                let first_versions: Vec<i64> = if one_part { vec![row.try_get(1)?] } else { row.try_get(1)? };
                if first_versions.len() != args.part_counts.len() {
                    return Err(Failure::Fail(Error::Backend {
                        message: "the append function returned a version per part of a different count"
                            .into(),
                        source: None,
                    }));
                }
                // Published only after commit: the events are readable now.
                bump(&self.head, first + args.ev_ids.len() as u64);

                let mut part = 0;
                let mut outcomes = Vec::with_capacity(requests.len());
                for parts in requests {
                    let mut results = Vec::with_capacity(parts.len());
                    for _ in *parts {
                        let first_version = to_u64(first_versions[part], "version")?;
                        let count = args.part_counts[part] as u64;
                        let last_offset = args.part_last_offsets[part] as u64;
                        results.push(AppendResult {
                            next_version: first_version + count,
                            position: first + last_offset,
                        });
                        part += 1;
                    }
                    outcomes.push(Ok(results));
                }
                Ok(Some(outcomes))
            })
            .await
            .map_err(|f| f.sent_on(session.as_ref()))
    }
}

/// The answer to an append whose connection broke when what it did cannot
/// be read back: transient, so callers re-send it with the same event ids
/// (idempotency then settles it).
fn outcome_unknown(lost: &Lost) -> Error {
    Error::OutcomeUnknown {
        reason: format!(
            "the append lost its answer ({lost}) and whether it was written could not be read back; \
             re-send it unchanged (same event ids, same expected version)"
        ),
    }
}

/// SQLSTATE raised by the append functions when the round needs the exact
/// path.
const DECLINED: &str = "AN001";

/// Ends the session `$1` (pid) started at `$2` (`backend_start`), if it
/// is still there, waiting up to `$3` ms for it to go (PostgreSQL 14+).
/// True when there was nothing to end or it ended.
const TERMINATE_WAITING: &str = "SELECT coalesce(bool_and(pg_terminate_backend(pid, $3)), true)
       FROM pg_stat_activity WHERE pid = $1 AND backend_start = $2";
/// The same without waiting (before PostgreSQL 14): the head lock taken
/// next still waits for a transaction of the session to end.
const TERMINATE: &str = "SELECT coalesce(bool_and(pg_terminate_backend(pid)), true)
       FROM pg_stat_activity WHERE pid = $1 AND backend_start = $2";
/// The session of the connection it runs on.
const OWN_SESSION: &str = "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()";

/// Every append transaction runs in READ COMMITTED whatever the session's
/// default: the head-first design relies on each statement after the head
/// lock taking a fresh snapshot that includes the previous holder's commit.
const BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";

/// At most this many events go into one run (one row, migration 0009).
/// Bounds what a read that starts inside a run unpacks and skips.
pub(crate) const RUN_MAX_EVENTS: usize = 100;
/// A run is also cut before its events' data would pass this many bytes
/// (a run of large events is one row of many TOAST chunks, read whole).
pub(crate) const RUN_MAX_BYTES: usize = 64 * 1024;

/// Splits a part's events into runs (migration 0009): maximal sequences of
/// consecutive events with the same type and correlation id, cut at
/// [`RUN_MAX_EVENTS`] events and [`RUN_MAX_BYTES`] of data. Calls `run`
/// with each run's first index, count, type and correlation id, in order.
fn for_each_run<'a>(events: &'a [EventData], mut run: impl FnMut(usize, usize, &'a str, Option<String>)) {
    let mut start = 0;
    while start < events.len() {
        let first = &events[start];
        // "" counts as none, as in the log format (no index entry).
        let correlation_id = first.metadata.correlation_id().filter(|c| !c.is_empty());
        let mut bytes = first.data.len();
        let mut end = start + 1;
        while end < events.len() && end - start < RUN_MAX_EVENTS {
            let next = &events[end];
            if next.event_type != first.event_type
                || bytes + next.data.len() > RUN_MAX_BYTES
                || next.metadata.correlation_id().filter(|c| !c.is_empty()) != correlation_id
            {
                break;
            }
            bytes += next.data.len();
            end += 1;
        }
        run(start, end - start, &first.event_type, correlation_id);
        start = end;
    }
}

/// The parameters of `append_head_first`: the round flattened into arrays
/// (`append_part` takes its first part's scalars, the run arrays but the
/// part and version offset, and the event arrays).
struct FastArgs<'a> {
    part_streams: Vec<&'a str>,
    part_categories: Vec<&'a str>,
    part_kinds: Vec<i16>,
    part_versions: Vec<i64>,
    part_counts: Vec<i64>,
    part_last_offsets: Vec<i64>,
    part_last_ids: Vec<Uuid>,
    /// Per run: its part (1-based), first event (1-based, in the event
    /// arrays), first event's offset in its part, count, type, correlation id.
    run_parts: Vec<i32>,
    run_offsets: Vec<i32>,
    run_version_offsets: Vec<i64>,
    run_counts: Vec<i32>,
    run_types: Vec<&'a str>,
    run_correlation_ids: Vec<Option<String>>,
    ev_ids: Vec<Uuid>,
    ev_content_types: Vec<i16>,
    ev_data: Vec<&'a [u8]>,
    ev_metadata: Vec<&'a str>,
}

impl<'a> FastArgs<'a> {
    /// The event columns both functions take, in their order.
    fn event_params(&self) -> [&(dyn ToSql + Sync); 4] {
        [&self.ev_ids, &self.ev_content_types, &self.ev_data, &self.ev_metadata]
    }

    /// `None` when the round cannot take the fast path (metadata that is
    /// not UTF-8: the exact path reports it; more events than the run
    /// offsets can count), so the exact path handles it.
    fn new(requests: &[&'a [StreamAppend]]) -> Option<Self> {
        let parts: usize = requests.iter().map(|r| r.len()).sum();
        let events = requests.iter().flat_map(|r| r.iter()).map(|p| p.events.len()).sum();
        let mut a = FastArgs {
            part_streams: Vec::with_capacity(parts),
            part_categories: Vec::with_capacity(parts),
            part_kinds: Vec::with_capacity(parts),
            part_versions: Vec::with_capacity(parts),
            part_counts: Vec::with_capacity(parts),
            part_last_offsets: Vec::with_capacity(parts),
            part_last_ids: Vec::with_capacity(parts),
            run_parts: Vec::new(),
            run_offsets: Vec::new(),
            run_version_offsets: Vec::new(),
            run_counts: Vec::new(),
            run_types: Vec::new(),
            run_correlation_ids: Vec::new(),
            ev_ids: Vec::with_capacity(events),
            ev_content_types: Vec::with_capacity(events),
            ev_data: Vec::with_capacity(events),
            ev_metadata: Vec::with_capacity(events),
        };
        for part in requests.iter().flat_map(|r| r.iter()) {
            let stream = part.stream.as_str();
            let (kind, version) = match part.expected {
                ExpectedVersion::Any => (0, 0),
                ExpectedVersion::NoStream => (1, 0),
                ExpectedVersion::StreamExists => (2, 0),
                ExpectedVersion::Exact(v) => (3, to_i64(v)),
            };
            let index = i32::try_from(a.part_streams.len() + 1).ok()?;
            let last_id = part.events.last()?.id;
            a.part_streams.push(stream);
            a.part_categories.push(category_of(stream));
            a.part_kinds.push(kind);
            a.part_versions.push(version);
            a.part_counts.push(part.events.len() as i64);
            a.part_last_ids.push(last_id);
            let base = a.ev_ids.len();
            let mut fits = true;
            for_each_run(&part.events, |first, count, event_type, correlation_id| {
                let (Ok(offset), Ok(count)) = (i32::try_from(base + first + 1), i32::try_from(count)) else {
                    fits = false;
                    return;
                };
                a.run_parts.push(index);
                a.run_offsets.push(offset);
                a.run_version_offsets.push(first as i64);
                a.run_counts.push(count);
                a.run_types.push(event_type);
                a.run_correlation_ids.push(correlation_id);
            });
            if !fits {
                return None;
            }
            for event in &part.events {
                a.ev_metadata.push(std::str::from_utf8(event.metadata.as_bytes()).ok()?);
                a.ev_ids.push(event.id);
                a.ev_content_types.push(i16::from(event.content_type.code()));
                a.ev_data.push(&event.data);
            }
            a.part_last_offsets.push(a.ev_ids.len() as i64 - 1);
        }
        Some(a)
    }
}

/// Splits off a round of requests that touch
/// disjoint streams; a request that shares a stream with an earlier one
/// (taken or deferred) waits for the next round, so appends to one stream
/// keep their queue order.
fn split_round(requests: Vec<Request>) -> (Vec<Request>, Vec<Request>) {
    let mut taken: HashSet<StreamName> = HashSet::new();
    let mut deferred: HashSet<StreamName> = HashSet::new();
    let (mut round, mut rest) = (Vec::new(), Vec::new());
    for request in requests {
        let streams = || request.parts.iter().map(|p| p.stream.clone());
        if streams().any(|s| taken.contains(&s) || deferred.contains(&s)) {
            deferred.extend(streams());
            rest.push(request);
        } else {
            taken.extend(streams());
            round.push(request);
        }
    }
    (round, rest)
}

/// The ids and last position of the stream's tail when this append may be
/// an idempotent re-send. The stream row keeps its last event id, so the
/// tail is only read when that id matches the batch's last id (a re-send),
/// never on an ordinary append.
async fn resend_tail(
    client: &tokio_postgres::Client,
    sql: &Statements,
    stream: &StreamName,
    state: &StreamState,
    last_event_id: Option<Uuid>,
    ids: &[Uuid],
) -> Result<Option<(Vec<Uuid>, u64)>, Failure> {
    let n = ids.len() as u64;
    let Some(last) = state.last_version else { return Ok(None) };
    if state.tombstoned || last_event_id.is_none() || last_event_id != ids.last().copied() || last + 1 < n {
        return Ok(None);
    }
    let stmt = client.prepare(&sql.tail_ids).await?;
    let rows = client.query(&stmt, &[&stream.as_str(), &to_i64(last + 1 - n)]).await?;
    let mut tail = Vec::with_capacity(rows.len());
    let mut position = None;
    for row in rows {
        tail.push(row.try_get::<_, Uuid>(0)?);
        position = Some(row.try_get::<_, i64>(1)?);
    }
    match position {
        Some(p) if tail.len() == ids.len() => Ok(Some((tail, to_u64(p, "position")?))),
        _ => Ok(None),
    }
}

fn already_written(d: &AppendDecision) -> AppendResult {
    match d {
        AppendDecision::AlreadyWritten(r) => *r,
        // Not reached: only called when nothing was written.
        AppendDecision::Write { first_version } => AppendResult { next_version: *first_version, position: 0 },
    }
}

/// The events to insert: runs (migration 0009) and per-event columns, as
/// arrays for `unnest` and slicing.
#[derive(Default)]
struct Batch<'a> {
    total: i64,
    /// Per run: stream, first version, first event (1-based, in the event
    /// arrays), count, type, category, correlation id.
    run_streams: Vec<&'a str>,
    run_versions: Vec<i64>,
    run_offsets: Vec<i32>,
    run_counts: Vec<i32>,
    run_types: Vec<&'a str>,
    run_categories: Vec<&'a str>,
    run_correlation_ids: Vec<Option<String>>,
    ids: Vec<Uuid>,
    content_types: Vec<i16>,
    data: Vec<&'a [u8]>,
    metadata: Vec<&'a str>,
    /// Per written part, in order: (next version, offset of its last event).
    part_offsets: Vec<(u64, u64)>,
}

impl<'a> Batch<'a> {
    fn add(&mut self, part: &'a StreamAppend, first_version: u64) -> Result<()> {
        let stream = part.stream.as_str();
        let base = self.ids.len();
        let mut runs = Vec::new();
        for_each_run(&part.events, |first, count, event_type, correlation_id| {
            runs.push((first, count, event_type, correlation_id));
        });
        for (first, count, event_type, correlation_id) in runs {
            let (Ok(offset), Ok(count)) = (i32::try_from(base + first + 1), i32::try_from(count)) else {
                return Err(Error::invalid("too many events in one round"));
            };
            self.run_streams.push(stream);
            self.run_versions.push(to_i64(first_version + first as u64));
            self.run_offsets.push(offset);
            self.run_counts.push(count);
            self.run_types.push(event_type);
            self.run_categories.push(category_of(stream));
            self.run_correlation_ids.push(correlation_id);
        }
        for event in &part.events {
            let metadata = std::str::from_utf8(event.metadata.as_bytes())
                .map_err(|_| Error::invalid(format!("metadata of event {} is not UTF-8", event.id)))?;
            self.ids.push(event.id);
            self.content_types.push(i16::from(event.content_type.code()));
            self.data.push(&event.data);
            self.metadata.push(metadata);
        }
        let version = first_version + part.events.len() as u64;
        self.total += part.events.len() as i64;
        let last_offset = self.total - 1;
        self.part_offsets.push((version, last_offset as u64));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use annals_core::{EventData, ExpectedVersion};

    use super::*;

    fn request(streams: &[&str]) -> Request {
        let parts = streams
            .iter()
            .map(|s| {
                let e = EventData::raw("E", b"{}".to_vec(), annals_core::ContentType::Json);
                StreamAppend::new(StreamName::new(s).unwrap(), ExpectedVersion::Any, vec![e])
            })
            .collect();
        Request { parts, reply: oneshot::channel().0 }
    }

    fn names(requests: &[Request]) -> Vec<Vec<String>> {
        requests.iter().map(|r| r.parts.iter().map(|p| p.stream.to_string()).collect()).collect()
    }

    #[test]
    fn a_round_holds_disjoint_streams_and_keeps_per_stream_order() {
        let batch =
            vec![request(&["a"]), request(&["a", "b"]), request(&["c"]), request(&["b"]), request(&["d"])];
        let (round, rest) = split_round(batch);
        assert_eq!(names(&round), vec![vec!["a"], vec!["c"], vec!["d"]]);
        // "b" alone must not overtake the earlier request that also writes b.
        assert_eq!(names(&rest), vec![vec!["a", "b"], vec!["b"]]);
        let (round, rest) = split_round(rest);
        assert_eq!(names(&round), vec![vec!["a", "b"]]);
        assert_eq!(names(&rest), vec![vec!["b"]]);
    }
}
