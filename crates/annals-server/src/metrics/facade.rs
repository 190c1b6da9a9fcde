//! A recorder for the [`metrics`] facade, rendered by `/metrics` next to
//! the server's own registry.
//!
//! The event-sourcing layer (`annals`: projections, persistent
//! subscriptions, the bus) and the embedded log (`annals_log_fsync_seconds`)
//! report through the facade, which has one process-wide recorder. The
//! binary installs a [`FacadeRecorder`] with [`FacadeRecorder::install`] and
//! attaches it to its [`crate::AppState`]; servers without one attached
//! (most tests) render only their own registry, so their numbers still never
//! mix.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};

/// Upper bounds of the histogram buckets, seconds-friendly: 50 µs × 2^k.
const BUCKETS: [f64; 18] = {
    let mut b = [0.0; 18];
    let mut i = 0;
    let mut v = 0.000_05;
    while i < 18 {
        b[i] = v;
        v *= 2.0;
        i += 1;
    }
    b
};

#[derive(Debug, Default)]
struct CounterCell(AtomicU64);

impl metrics::CounterFn for CounterCell {
    fn increment(&self, value: u64) {
        self.0.fetch_add(value, Ordering::Relaxed);
    }
    fn absolute(&self, value: u64) {
        self.0.fetch_max(value, Ordering::Relaxed);
    }
}

/// An `f64` in an atomic, as its bits.
#[derive(Debug, Default)]
struct GaugeCell(AtomicU64);

impl GaugeCell {
    fn update(&self, f: impl Fn(f64) -> f64) {
        let _ = self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
            Some(f(f64::from_bits(bits)).to_bits())
        });
    }
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

impl metrics::GaugeFn for GaugeCell {
    fn increment(&self, value: f64) {
        self.update(|v| v + value);
    }
    fn decrement(&self, value: f64) {
        self.update(|v| v - value);
    }
    fn set(&self, value: f64) {
        self.0.store(value.to_bits(), Ordering::Relaxed);
    }
}

#[derive(Debug, Default)]
struct HistogramCell {
    /// Per-bucket counts (not cumulative); the last slot is `+Inf`.
    buckets: [AtomicU64; BUCKETS.len() + 1],
    count: AtomicU64,
    sum: GaugeCell,
}

impl metrics::HistogramFn for HistogramCell {
    fn record(&self, value: f64) {
        let i = BUCKETS.iter().position(|b| value <= *b).unwrap_or(BUCKETS.len());
        if let Some(b) = self.buckets.get(i) {
            b.fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum.update(|s| s + value);
    }
}

#[derive(Debug, Clone)]
enum Cell {
    Counter(Arc<CounterCell>),
    Gauge(Arc<GaugeCell>),
    Histogram(Arc<HistogramCell>),
}

#[derive(Debug, Default)]
struct Inner {
    cells: RwLock<HashMap<Key, Cell>>,
    help: RwLock<HashMap<String, String>>,
}

/// The facade recorder: counters, gauges and histograms by name and
/// labels, in memory, rendered in the OpenMetrics text format. Cheap to
/// clone (a shared handle).
#[derive(Debug, Clone, Default)]
pub struct FacadeRecorder {
    inner: Arc<Inner>,
}

impl FacadeRecorder {
    /// An empty recorder, not installed anywhere (tests can drive it with
    /// `metrics::with_local_recorder`).
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs a new recorder as the process-wide `metrics` recorder and
    /// returns a handle to it; `None` if another recorder was installed
    /// first.
    pub fn install() -> Option<Self> {
        let recorder = Self::new();
        metrics::set_global_recorder(recorder.clone()).ok().map(|()| recorder)
    }

    fn cell(&self, key: &Key, make: impl FnOnce() -> Cell) -> Cell {
        if let Some(c) = self.inner.cells.read().ok().and_then(|m| m.get(key).cloned()) {
            return c;
        }
        match self.inner.cells.write() {
            Ok(mut m) => m.entry(key.clone()).or_insert_with(make).clone(),
            Err(_) => make(),
        }
    }

    fn describe(&self, key: KeyName, description: SharedString) {
        if let Ok(mut h) = self.inner.help.write() {
            h.insert(key.as_str().to_owned(), description.to_string());
        }
    }

    /// Appends every metric, one family per name, in the OpenMetrics text
    /// format (without the final `# EOF`).
    pub fn render_into(&self, out: &mut String) {
        let Ok(cells) = self.inner.cells.read() else { return };
        let help = self.inner.help.read().ok();
        let mut families: BTreeMap<&str, Vec<(&Key, &Cell)>> = BTreeMap::new();
        for (key, cell) in cells.iter() {
            families.entry(key.name()).or_default().push((key, cell));
        }
        for (name, mut series) in families {
            series.sort_by_cached_key(|(k, _)| labels(k, None));
            let Some((_, first)) = series.first() else { continue };
            let (kind, base) = match first {
                Cell::Counter(_) => ("counter", name.strip_suffix("_total").unwrap_or(name)),
                Cell::Gauge(_) => ("gauge", name),
                Cell::Histogram(_) => ("histogram", name),
            };
            let _ = writeln!(out, "# TYPE {base} {kind}");
            if let Some(text) = help.as_ref().and_then(|h| h.get(name)) {
                let _ = writeln!(out, "# HELP {base} {}", text.replace('\\', "\\\\").replace('\n', "\\n"));
            }
            for (key, cell) in series {
                match cell {
                    Cell::Counter(c) => {
                        let _ = writeln!(
                            out,
                            "{base}_total{} {}",
                            labels(key, None),
                            c.0.load(Ordering::Relaxed)
                        );
                    }
                    Cell::Gauge(g) => {
                        let _ = writeln!(out, "{base}{} {}", labels(key, None), g.get());
                    }
                    Cell::Histogram(h) => {
                        let mut cumulative = 0u64;
                        for (i, count) in h.buckets.iter().enumerate() {
                            cumulative += count.load(Ordering::Relaxed);
                            let le = BUCKETS.get(i).map_or_else(|| "+Inf".to_owned(), |b| b.to_string());
                            let _ = writeln!(out, "{base}_bucket{} {cumulative}", labels(key, Some(&le)));
                        }
                        let _ = writeln!(out, "{base}_sum{} {}", labels(key, None), h.sum.get());
                        let _ = writeln!(
                            out,
                            "{base}_count{} {}",
                            labels(key, None),
                            h.count.load(Ordering::Relaxed)
                        );
                    }
                }
            }
        }
    }
}

/// `{a="1",b="2"}` (empty when there are none), values escaped.
fn labels(key: &Key, le: Option<&str>) -> String {
    let mut parts: Vec<String> =
        key.labels().map(|l| format!("{}=\"{}\"", l.key(), escape(l.value()))).collect();
    if let Some(le) = le {
        parts.push(format!("le=\"{le}\""));
    }
    if parts.is_empty() { String::new() } else { format!("{{{}}}", parts.join(",")) }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

impl Recorder for FacadeRecorder {
    fn describe_counter(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        self.describe(key, description);
    }

    fn describe_gauge(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        self.describe(key, description);
    }

    fn describe_histogram(&self, key: KeyName, _unit: Option<Unit>, description: SharedString) {
        self.describe(key, description);
    }

    fn register_counter(&self, key: &Key, _metadata: &Metadata<'_>) -> Counter {
        match self.cell(key, || Cell::Counter(Arc::default())) {
            Cell::Counter(c) => Counter::from_arc(c),
            // The same name used as two kinds: keep the first, drop the rest.
            _ => Counter::noop(),
        }
    }

    fn register_gauge(&self, key: &Key, _metadata: &Metadata<'_>) -> Gauge {
        match self.cell(key, || Cell::Gauge(Arc::default())) {
            Cell::Gauge(g) => Gauge::from_arc(g),
            _ => Gauge::noop(),
        }
    }

    fn register_histogram(&self, key: &Key, _metadata: &Metadata<'_>) -> Histogram {
        match self.cell(key, || Cell::Histogram(Arc::default())) {
            Cell::Histogram(h) => Histogram::from_arc(h),
            _ => Histogram::noop(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::FacadeRecorder;

    #[test]
    fn renders_counters_gauges_and_histograms() {
        let r = FacadeRecorder::new();
        metrics::with_local_recorder(&r, || {
            metrics::counter!("annals_projection_events_total", "projection" => "p\"1").increment(3);
            metrics::gauge!("annals_projection_lag", "projection" => "p1").set(7.0);
            metrics::gauge!("annals_projection_lag", "projection" => "p1").decrement(2.0);
            metrics::histogram!("annals_log_fsync_seconds").record(0.000_07);
            metrics::histogram!("annals_log_fsync_seconds").record(5000.0);
        });
        let mut out = String::new();
        r.render_into(&mut out);
        assert!(out.contains("# TYPE annals_projection_events counter\n"), "{out}");
        assert!(out.contains("annals_projection_events_total{projection=\"p\\\"1\"} 3\n"), "{out}");
        assert!(out.contains("annals_projection_lag{projection=\"p1\"} 5\n"), "{out}");
        assert!(out.contains("annals_log_fsync_seconds_bucket{le=\"0.00005\"} 0\n"), "{out}");
        assert!(out.contains("annals_log_fsync_seconds_bucket{le=\"0.0001\"} 1\n"), "{out}");
        assert!(out.contains("annals_log_fsync_seconds_bucket{le=\"+Inf\"} 2\n"), "{out}");
        assert!(out.contains("annals_log_fsync_seconds_count 2\n"), "{out}");
    }
}
