//! Where a lone writer's single-event append spends its time, in one run:
//! interleaved blocks of
//! - `raw`: the raw single-row `INSERT` of `pg_bench`;
//! - `call-quiet`: a direct call of `append_part` with a NOTIFY channel
//!   nobody listens on;
//! - `call-notify`: the same on the store's channel (its `LISTEN`
//!   connection is woken by every commit);
//! - `store`: `PgStore::append`;
//! - `pipe-quiet`: the same work as pipelined statements instead of the
//!   function (`BEGIN`, head lock, one `INSERT … SELECT`, `COMMIT`), to
//!   see what plpgsql costs;
//! - `single-quiet`: that statement with the head lock inside it
//!   (`FOR NO KEY UPDATE` on the head in its `FROM`), sent alone in
//!   autocommit on a session with `plan_cache_mode = force_generic_plan`:
//!   the whole append as one statement and one round trip, no plpgsql;
//! - `cached-quiet`: an upper bound, not a design: the head locked and the
//!   run inserted with the position, version and `recorded_at` the client
//!   remembers from its own previous insert, so no head, stream or run is
//!   read (correct only while nobody else writes: a stale position or
//!   version would hit a unique constraint). What an append could cost if
//!   every look-up were free.
//!
//! ```text
//! cargo run --release -p annals-postgres --example pg_breakdown -- [block] [rounds]
//! ```
//!
//! Prints the median milliseconds per append over the rounds. Add
//! `?options=-c%20synchronous_commit%3Doff` to `ANNALS_POSTGRES_URL` to see
//! the CPU alone (the commit flush is the noisiest part on a shared disk).
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used, missing_docs)]
use annals_core::StreamName;
use std::time::Instant;

#[path = "support/lone_writer.rs"]
mod support;

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let block: usize = std::env::args().nth(1).map_or(500, |s| s.parse().unwrap());
    let rounds: usize = std::env::args().nth(2).map_or(6, |s| s.parse().unwrap());
    let setup = support::open("annals_brk").await;
    let (schema, store, client, raw) = (&setup.schema, &setup.store, &setup.client, &setup.raw_insert);
    let call = client
        .prepare(&format!(
            "SELECT first_position, first_version FROM \"{schema}\".append_part($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        ))
        .await
        .unwrap();
    let channel = format!("{schema}_head");
    use tokio_postgres::types::Type;
    let pipe_sql = format!(
            "WITH d AS (
               SELECT greatest(h.next_position, t.next) AS first_position,
                      coalesce(l.last_version, -1) + 1 AS first_version,
                      greatest(date_trunc('microseconds', clock_timestamp()), h.recorded_at, t.recorded_at) AS recorded,
                      st.name IS NOT NULL AS known,
                      CASE WHEN st.name IS NULL THEN $3 IN (0, 1)
                           ELSE NOT st.tombstoned AND l.last_event_id IS DISTINCT FROM $7[cardinality($7)]
                                AND CASE $3 WHEN 0 THEN true
                                      WHEN 1 THEN NOT coalesce(l.last_version >= st.truncate_before, false)
                                      WHEN 2 THEN coalesce(l.last_version >= st.truncate_before, false)
                                      WHEN 3 THEN coalesce(l.last_version >= st.truncate_before AND l.last_version = $4, false)
                                      ELSE false END
                      END AS plain
                 FROM (SELECT r.next_position, r.recorded_at FROM \"{schema}\".head_row r) h,
                      (SELECT coalesce(max(e.first_position + e.n), 0) AS next, max(e.recorded_at) AS recorded_at
                         FROM (SELECT e.first_position, e.n, e.recorded_at FROM \"{schema}\".runs e ORDER BY e.first_position DESC LIMIT 1) e) t,
                      (SELECT max(e.first_version + e.n - 1) AS last_version, (array_agg(e.ids[e.n]))[1] AS last_event_id
                         FROM (SELECT e.first_version, e.n, e.ids FROM \"{schema}\".runs e WHERE e.stream = $1
                                ORDER BY e.first_version DESC LIMIT 1) e) l
                 LEFT JOIN \"{schema}\".stream_rows st ON st.name = $1
             ), ins AS (
               INSERT INTO \"{schema}\".runs (first_position, stream, first_version, n, event_type, category, correlation_id,
                                  recorded_at, ids, content_types, data, metadata)
               SELECT d.first_position, $1, d.first_version, cardinality($7), $5, $2, $6, d.recorded, $7, $8, $9, $10::json[]
                 FROM d WHERE d.plain
               RETURNING first_position, first_version, n
             ), sr AS (
               INSERT INTO \"{schema}\".stream_rows (name, category) SELECT $1, $2 FROM d WHERE d.plain AND NOT d.known
             )
             SELECT first_position, first_version, pg_notify($11, (first_position + n)::text) FROM ins"
        );
    let pipe_types = [
        Type::TEXT,
        Type::TEXT,
        Type::INT2,
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::UUID_ARRAY,
        Type::INT2_ARRAY,
        Type::BYTEA_ARRAY,
        Type::TEXT_ARRAY,
        Type::TEXT,
    ];
    let pipe = client.prepare_typed(&pipe_sql, &pipe_types).await.unwrap();
    let (single_client, conn) = tokio_postgres::connect(
        &std::env::var("ANNALS_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned()),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    single_client.batch_execute("SET jit = off; SET plan_cache_mode = force_generic_plan").await.unwrap();
    let single_sql = pipe_sql.replace(
        &format!("(SELECT r.next_position, r.recorded_at FROM \"{schema}\".head_row r) h"),
        &format!("(SELECT r.next_position, r.recorded_at FROM \"{schema}\".head_row r FOR NO KEY UPDATE) h"),
    );
    assert_ne!(single_sql, pipe_sql);
    let single = single_client.prepare_typed(&single_sql, &pipe_types).await.unwrap();
    // Positions and version from the client's own last commit, checked by
    // the unique constraints instead of read (an experiment).
    let cached = single_client
        .prepare_typed(
            &format!(
                "WITH h AS (SELECT r.id FROM \"{schema}\".head_row r FOR NO KEY UPDATE),
                 ins AS (
                   INSERT INTO \"{schema}\".runs (first_position, stream, first_version, n, event_type, category, correlation_id,
                                      recorded_at, ids, content_types, data, metadata)
                   SELECT $12, $1, $13, cardinality($7), $5, $2, $6, greatest(date_trunc('microseconds', clock_timestamp()), $14), $7, $8, $9, $10::json[]
                     FROM h
                   RETURNING first_position, first_version, n, recorded_at)
                 SELECT first_position, first_version, recorded_at, pg_notify($11, (first_position + n)::text) FROM ins"
            ),
            &[pipe_types.as_slice(), &[Type::INT8, Type::INT8, Type::TIMESTAMPTZ]].concat(),
        )
        .await
        .unwrap();
    let head_now = client
        .prepare(&format!(
            "SELECT coalesce(max(first_position + n), 0), max(recorded_at) FROM \"{schema}\".runs"
        ))
        .await
        .unwrap();
    let version_now = client
        .prepare(&format!(
            "SELECT coalesce(max(first_version + n), 0) FROM \"{schema}\".runs WHERE stream = $1"
        ))
        .await
        .unwrap();
    let lock =
        client.prepare(&format!("SELECT 1 FROM \"{schema}\".head_row FOR NO KEY UPDATE")).await.unwrap();
    let names = ["raw", "call-quiet", "call-notify", "store", "pipe-quiet", "single-quiet", "cached-quiet"];
    let mut times: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    let s = StreamName::new("brk-store").unwrap();
    let mut i = 0usize;
    for _ in 0..rounds {
        for (v, name) in names.iter().enumerate() {
            let mut state: (i64, i64, std::time::SystemTime) = (0, 0, std::time::SystemTime::UNIX_EPOCH);
            if v == 6 {
                let stream = format!("brk-{name}");
                let h = client.query_one(&head_now, &[]).await.unwrap();
                let ver: i64 = client.query_one(&version_now, &[&stream]).await.unwrap().get(0);
                if ver == 0 {
                    client.execute(&format!("INSERT INTO \"{schema}\".stream_rows (name, category) VALUES ('{stream}', 'brk')"), &[]).await.unwrap();
                }
                state = (
                    h.get(0),
                    ver,
                    h.get::<_, Option<std::time::SystemTime>>(1).unwrap_or(std::time::SystemTime::UNIX_EPOCH),
                );
            }
            let t = Instant::now();
            for _ in 0..block {
                i += 1;
                let payload = support::payload(i);
                match v {
                    0 => {
                        client
                            .execute(raw, &[&"raw-1", &(i as i64), &uuid::Uuid::new_v4(), &payload])
                            .await
                            .unwrap();
                    }
                    1 | 2 => {
                        let ch = if v == 1 { "nobody_listens" } else { channel.as_str() };
                        let stream = format!("brk-{name}");
                        let ids = vec![uuid::Uuid::new_v4()];
                        let data = vec![payload.as_slice()];
                        client
                            .query_one(
                                &call,
                                &[
                                    &stream,
                                    &"brk",
                                    &0i16,
                                    &0i64,
                                    &vec![1i32],
                                    &vec![1i32],
                                    &vec!["E"],
                                    &vec![None::<String>],
                                    &ids,
                                    &vec![0i16],
                                    &data,
                                    &vec!["{}"],
                                    &ch,
                                ],
                            )
                            .await
                            .unwrap();
                    }
                    4..=6 => {
                        let stream = format!("brk-{name}");
                        let ids = vec![uuid::Uuid::new_v4()];
                        let data = vec![payload.as_slice()];
                        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 11] = [
                            &stream,
                            &"brk",
                            &0i16,
                            &0i64,
                            &"E",
                            &None::<String>,
                            &ids,
                            &vec![0i16],
                            &data,
                            &vec!["{}"],
                            &"nobody_listens",
                        ];
                        if v == 6 {
                            let remembered: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                                [&state.0, &state.1, &state.2];
                            let all = [params.as_slice(), remembered.as_slice()].concat();
                            let row = single_client.query_one(&cached, &all).await.unwrap();
                            state = (state.0 + 1, state.1 + 1, row.get(2));
                            continue;
                        }
                        if v == 5 {
                            assert_eq!(single_client.query(&single, &params).await.unwrap().len(), 1);
                            continue;
                        }
                        let (a, b, c, d) = futures::join!(
                            client.batch_execute("BEGIN ISOLATION LEVEL READ COMMITTED; SET LOCAL plan_cache_mode = force_generic_plan"),
                            client.query_one(&lock, &[]),
                            client.query(&pipe, &params),
                            client.batch_execute("COMMIT")
                        );
                        a.unwrap();
                        b.unwrap();
                        d.unwrap();
                        assert_eq!(c.unwrap().len(), 1);
                    }
                    _ => support::append_one(store, &s, payload).await,
                }
            }
            times[v].push(t.elapsed().as_secs_f64() * 1e3 / block as f64);
        }
    }
    for (v, name) in names.iter().enumerate() {
        let mut t = times[v].clone();
        t.sort_by(f64::total_cmp);
        println!(
            "{name:>12}: median {:.3} ms/append  blocks {:?}",
            t[t.len() / 2],
            times[v].iter().map(|x| (x * 1000.0).round() / 1000.0).collect::<Vec<_>>()
        );
    }
    setup.drop_schema().await;
}
