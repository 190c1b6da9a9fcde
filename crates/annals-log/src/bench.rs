//! The benchmark behind `annals bench` and `examples/log_bench.rs`: every
//! figure issue 3 asks for, each beside a baseline measured in the same run.
//!
//! Run it on a quiet machine; fsync rates drop about tenfold while anything
//! compiles.

use std::{
    fs::OpenOptions,
    io::Write,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use annals_core::{
    AllReader, Appender, ContentType, EventData, ExpectedVersion, ReadAll, ReadStream, StreamAppend,
    StreamName, StreamReader,
};

use crate::{Durability, LogError, LogStore};

/// What to measure and how long.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct BenchConfig {
    /// Directory on the disk under test; each phase uses a fresh
    /// subdirectory, removed afterwards.
    pub dir: PathBuf,
    /// Seconds for each raw 4 KiB write + fdatasync baseline (default 5).
    pub raw_seconds: f64,
    /// Seconds for each durable-append phase (default 5).
    pub append_seconds: f64,
    /// Concurrent single-event writers per phase (default 1, 8, 64, 256).
    pub writers: Vec<usize>,
    /// Events per append in the batch phase (default 100).
    pub batch_size: usize,
    /// Bytes of each event's JSON payload (default 256).
    pub event_size: usize,
    /// Events in the large store used for reads, open and rebuild
    /// (default 10,000,000).
    pub store_events: u64,
    /// Events per stream in the large store (default 100).
    pub events_per_stream: u64,
    /// One-stream reads to sample for the latency percentiles (default 2,000).
    pub stream_reads: usize,
}

impl BenchConfig {
    /// The full-size configuration for `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        BenchConfig {
            dir: dir.into(),
            raw_seconds: 5.0,
            append_seconds: 5.0,
            writers: vec![1, 8, 64, 256],
            batch_size: 100,
            event_size: 256,
            store_events: 10_000_000,
            events_per_stream: 100,
            stream_reads: 2_000,
        }
    }

    /// A quick configuration for smoke tests: 100,000 events, short phases.
    pub fn small(dir: impl Into<PathBuf>) -> Self {
        BenchConfig {
            raw_seconds: 0.5,
            append_seconds: 0.5,
            writers: vec![1, 8],
            store_events: 100_000,
            stream_reads: 200,
            ..Self::new(dir)
        }
    }
}

/// Durable appends with one configuration.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct AppendFigure {
    /// Concurrent writers.
    pub writers: usize,
    /// Events per append.
    pub batch: usize,
    /// Appends acknowledged per second.
    pub appends_per_sec: f64,
    /// Events acknowledged per second.
    pub events_per_sec: f64,
    /// Median append latency, microseconds.
    pub p50_us: f64,
    /// 99th percentile append latency, microseconds.
    pub p99_us: f64,
    /// Appends per second divided by the raw pre-allocated fdatasync rate.
    pub ratio_to_raw_fsync: f64,
}

/// Every figure, with its baseline.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct BenchReport {
    /// Baseline: 4 KiB write + fdatasync per second, appending to a growing file.
    pub raw_fsync_growing_per_sec: f64,
    /// Baseline: 4 KiB write + fdatasync per second, overwriting a
    /// pre-allocated, zero-filled file (what the log does).
    pub raw_fsync_prealloc_per_sec: f64,
    /// Durable appends, one row per configuration.
    pub appends: Vec<AppendFigure>,
    /// Events in the large store.
    pub store_events: u64,
    /// Seconds to write the large store (`Durability::Never`).
    pub store_build_seconds: f64,
    /// Bytes of records in the large store (without the zero-filled tail).
    pub store_bytes: u64,
    /// `verify` walk of the large store, events per second.
    pub verify_events_per_sec: f64,
    /// `$all` forward read rate from the page cache, events per second.
    pub all_read_events_per_sec: f64,
    /// Baseline: raw sequential read of the same segment files, bytes per second.
    pub raw_read_bytes_per_sec: f64,
    /// `$all` read rate in bytes of log per second (compare with the baseline).
    pub all_read_bytes_per_sec: f64,
    /// Reading one whole stream (`events_per_stream` events): median, microseconds.
    pub stream_read_p50_us: f64,
    /// Reading one whole stream: 99th percentile, microseconds.
    pub stream_read_p99_us: f64,
    /// Baseline: one 4 KiB positioned read at a random offset, p99 microseconds.
    pub raw_pread_p99_us: f64,
    /// Opening the cleanly closed large store, seconds.
    pub open_seconds: f64,
    /// Baseline: reading the index checkpoint file raw, seconds.
    pub raw_index_read_seconds: f64,
    /// Full index rebuild from the log, events per second.
    pub rebuild_events_per_sec: f64,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i.min(sorted.len() - 1)).map_or(0.0, |d| d.as_secs_f64() * 1e6)
}

fn payload(n: u64, size: usize) -> Vec<u8> {
    let head = format!("{{\"n\":{n},\"pad\":\"");
    let pad = size.saturating_sub(head.len() + 2);
    let mut v = head.into_bytes();
    v.resize(v.len() + pad, b'x');
    v.extend_from_slice(b"\"}");
    v
}

fn event(n: u64, size: usize) -> EventData {
    EventData::raw("BenchEvent", payload(n, size), ContentType::Json)
}

/// 4 KiB write + fdatasync for `secs`; `prealloc` overwrites a zero-filled
/// file instead of growing one.
fn raw_fsync(dir: &Path, secs: f64, prealloc: bool) -> Result<f64, LogError> {
    let path = dir.join(if prealloc { "raw-prealloc" } else { "raw-growing" });
    let mut f = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path)?;
    let block = [0x5au8; 4096];
    let span = 64u64 << 20;
    if prealloc {
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..(span >> 20) {
            f.write_all(&zeros)?;
        }
        f.sync_all()?;
    }
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < secs {
        let off = (n * 4096) % span;
        f.write_all_at(&block, off)?;
        f.sync_data()?;
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(rate)
}

fn fresh(dir: &Path, name: &str) -> Result<PathBuf, LogError> {
    let d = dir.join(name);
    if d.exists() {
        std::fs::remove_dir_all(&d)?;
    }
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

async fn appends(
    dir: &Path,
    writers: usize,
    batch: usize,
    cfg: &BenchConfig,
    raw: f64,
) -> Result<AppendFigure, LogError> {
    let d = fresh(dir, &format!("append-{writers}x{batch}"))?;
    let store = LogStore::builder(&d).durability(Durability::Always).open()?;
    let deadline = Instant::now() + Duration::from_secs_f64(cfg.append_seconds);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(writers);
    for w in 0..writers {
        let store = store.clone();
        let size = cfg.event_size;
        tasks.push(tokio::spawn(async move {
            let s = StreamName::new(format!("bench-{w}"))
                .map_err(|e| LogError::Config { reason: e.to_string() })?;
            let mut lat = Vec::new();
            let mut n = 0u64;
            while Instant::now() < deadline {
                let events: Vec<EventData> = (0..batch as u64).map(|i| event(n + i, size)).collect();
                let t = Instant::now();
                store
                    .append(&s, ExpectedVersion::Any, events)
                    .await
                    .map_err(|e| LogError::Config { reason: e.to_string() })?;
                lat.push(t.elapsed());
                n += batch as u64;
            }
            Ok::<_, LogError>(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.map_err(|e| LogError::Config { reason: e.to_string() })??);
    }
    let secs = started.elapsed().as_secs_f64();
    store.close()?;
    drop(store);
    std::fs::remove_dir_all(&d)?;
    lat.sort_unstable();
    let appends_per_sec = lat.len() as f64 / secs;
    Ok(AppendFigure {
        writers,
        batch,
        appends_per_sec,
        events_per_sec: appends_per_sec * batch as f64,
        p50_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
        ratio_to_raw_fsync: if raw > 0.0 { appends_per_sec / raw } else { 0.0 },
    })
}

fn dir_bytes(dir: &Path, suffix: &str) -> Result<(u64, Vec<PathBuf>), LogError> {
    let mut total = 0;
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.extension().and_then(|x| x.to_str()) == Some(suffix) {
            total += p.metadata()?.len();
            files.push(p);
        }
    }
    files.sort();
    Ok((total, files))
}

/// Runs every measurement and returns the figures.
pub fn run(cfg: &BenchConfig) -> Result<BenchReport, LogError> {
    std::fs::create_dir_all(&cfg.dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let growing = raw_fsync(&cfg.dir, cfg.raw_seconds, false)?;
    let prealloc = raw_fsync(&cfg.dir, cfg.raw_seconds, true)?;
    let mut figures = Vec::new();
    for &w in &cfg.writers {
        figures.push(rt.block_on(appends(&cfg.dir, w, 1, cfg, prealloc))?);
    }
    figures.push(rt.block_on(appends(&cfg.dir, 1, cfg.batch_size, cfg, prealloc))?);

    // The large store: streams interleaved so each stream's events are spread
    // over the whole log (the hard case for a one-stream read).
    let d = fresh(&cfg.dir, "large")?;
    let per_stream = cfg.events_per_stream.max(1);
    let streams = (cfg.store_events / per_stream).max(1);
    let t = Instant::now();
    let store = LogStore::builder(&d).durability(Durability::Never).open()?;
    let names: Vec<StreamName> = (0..streams)
        .map(|s| StreamName::new(format!("acct-{s}")).map_err(|e| LogError::Config { reason: e.to_string() }))
        .collect::<Result<_, _>>()?;
    let mut written = 0u64;
    rt.block_on(async {
        'fill: for _round in 0..per_stream {
            for block in names.chunks(1000) {
                let parts: Vec<StreamAppend> = block
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        StreamAppend::new(
                            s.clone(),
                            ExpectedVersion::Any,
                            vec![event(written + i as u64, cfg.event_size)],
                        )
                    })
                    .collect();
                let n = parts.len() as u64;
                store.append_multi(parts).await.map_err(|e| LogError::Config { reason: e.to_string() })?;
                written += n;
                if written >= cfg.store_events {
                    break 'fill;
                }
            }
        }
        Ok::<_, LogError>(())
    })?;
    let build = t.elapsed().as_secs_f64();
    store.close()?;
    drop(store);
    let (_, segs) = dir_bytes(&d, "seg")?;
    let t = Instant::now();
    let verified = crate::verify(&d)?;
    let verify_rate = verified.events as f64 / t.elapsed().as_secs_f64();
    let store_bytes = verified.bytes;

    // Baseline: raw sequential read of the segment files (page cache).
    let t = Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    let mut read_bytes = 0u64;
    for p in &segs {
        let f = std::fs::File::open(p)?;
        let mut off = 0;
        loop {
            let n = f.read_at(&mut buf, off)?;
            if n == 0 {
                break;
            }
            off += n as u64;
            read_bytes += n as u64;
        }
    }
    let raw_read = read_bytes as f64 / t.elapsed().as_secs_f64();

    // Open time of the cleanly closed store, and its baseline.
    let t = Instant::now();
    let _ = std::fs::read(d.join(crate::index::INDEX_FILE))?;
    let raw_index_read = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let store = LogStore::open(&d)?;
    let open_seconds = t.elapsed().as_secs_f64();

    // $all from the page cache (one warm-up pass first).
    let (all_rate, stream_lat) = rt.block_on(async {
        let mut rate = 0.0;
        for _pass in 0..2 {
            let t = Instant::now();
            let mut from = 0;
            let mut n = 0u64;
            loop {
                let slice = store
                    .read_all(ReadAll::forward(10_000).from_position(from))
                    .await
                    .map_err(|e| LogError::Config { reason: e.to_string() })?;
                if slice.events.is_empty() {
                    break;
                }
                n += slice.events.len() as u64;
                from = slice.next.unwrap_or(from);
            }
            rate = n as f64 / t.elapsed().as_secs_f64();
        }
        let mut lat = Vec::with_capacity(cfg.stream_reads);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..cfg.stream_reads {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let s = names.get((seed % names.len() as u64) as usize).cloned().ok_or(LogError::Closed)?;
            let t = Instant::now();
            let events = store
                .read_stream(&s, ReadStream::forward())
                .await
                .map_err(|e| LogError::Config { reason: e.to_string() })?;
            lat.push(t.elapsed());
            std::hint::black_box(events);
        }
        lat.sort_unstable();
        Ok::<_, LogError>((rate, lat))
    })?;
    store.close()?;
    drop(store);

    // Baseline for one-stream reads: single 4 KiB preads at random offsets.
    let mut pread = Vec::new();
    if let Some(p) = segs.first() {
        let f = std::fs::File::open(p)?;
        let len = f.metadata()?.len().max(8192);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut b = [0u8; 4096];
        for _ in 0..cfg.stream_reads * 10 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let t = Instant::now();
            f.read_at(&mut b, seed % (len - 4096))?;
            pread.push(t.elapsed());
        }
    }
    pread.sort_unstable();

    let rebuild = crate::rebuild_indexes(&d)?;
    std::fs::remove_dir_all(&d)?;
    let avg_record = if written > 0 { store_bytes as f64 / written as f64 } else { 0.0 };
    Ok(BenchReport {
        raw_fsync_growing_per_sec: growing,
        raw_fsync_prealloc_per_sec: prealloc,
        appends: figures,
        store_events: written,
        store_build_seconds: build,
        store_bytes,
        verify_events_per_sec: verify_rate,
        all_read_events_per_sec: all_rate,
        raw_read_bytes_per_sec: raw_read,
        all_read_bytes_per_sec: all_rate * avg_record,
        stream_read_p50_us: percentile(&stream_lat, 0.5),
        stream_read_p99_us: percentile(&stream_lat, 0.99),
        raw_pread_p99_us: percentile(&pread, 0.99),
        open_seconds,
        raw_index_read_seconds: raw_index_read,
        rebuild_events_per_sec: rebuild.events_per_second,
    })
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{:<44} {:>14} {:>12} {:>12} {:>10}", "figure", "value", "p50 µs", "p99 µs", "vs base")?;
        writeln!(
            f,
            "{:<44} {:>14.0}",
            "raw 4K write+fdatasync/s (growing file)", self.raw_fsync_growing_per_sec
        )?;
        writeln!(
            f,
            "{:<44} {:>14.0}",
            "raw 4K write+fdatasync/s (pre-allocated) =base", self.raw_fsync_prealloc_per_sec
        )?;
        for a in &self.appends {
            writeln!(
                f,
                "{:<44} {:>14.0} {:>12.0} {:>12.0} {:>9.2}x",
                format!("durable events/s, {} writer(s) x {} event(s)", a.writers, a.batch),
                a.events_per_sec,
                a.p50_us,
                a.p99_us,
                a.ratio_to_raw_fsync
            )?;
        }
        writeln!(f, "{:<44} {:>14}", "large store events", self.store_events)?;
        writeln!(f, "{:<44} {:>14.1}", "large store MiB", self.store_bytes as f64 / (1 << 20) as f64)?;
        writeln!(f, "{:<44} {:>14.1}", "large store build s (Durability::Never)", self.store_build_seconds)?;
        writeln!(
            f,
            "{:<44} {:>14.0} {:>12} {:>12} {:>9.2}x",
            "$all read events/s (page cache)",
            self.all_read_events_per_sec,
            "",
            "",
            if self.raw_read_bytes_per_sec > 0.0 {
                self.all_read_bytes_per_sec / self.raw_read_bytes_per_sec
            } else {
                0.0
            }
        )?;
        writeln!(
            f,
            "{:<44} {:>14.0}",
            "raw sequential read MiB/s =base",
            self.raw_read_bytes_per_sec / (1 << 20) as f64
        )?;
        writeln!(
            f,
            "{:<44} {:>14} {:>12.0} {:>12.0}",
            "one-stream read (whole stream)", "", self.stream_read_p50_us, self.stream_read_p99_us
        )?;
        writeln!(
            f,
            "{:<44} {:>14} {:>12} {:>12.1}",
            "raw 4K pread at random offset =base", "", "", self.raw_pread_p99_us
        )?;
        writeln!(f, "{:<44} {:>14.3}", "open cleanly closed store, s", self.open_seconds)?;
        writeln!(f, "{:<44} {:>14.3}", "raw read of index checkpoint, s =base", self.raw_index_read_seconds)?;
        writeln!(f, "{:<44} {:>14.0}", "full index rebuild events/s", self.rebuild_events_per_sec)?;
        writeln!(f, "{:<44} {:>14.0}", "verify (CRC + hash chain) events/s", self.verify_events_per_sec)
    }
}
