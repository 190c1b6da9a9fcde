//! The derived indexes, held in memory and checkpointed to `index.bin`.
//!
//! Everything here can be rebuilt from the log; see `docs/adr/01-log-index.md`
//! for why it is in-memory maps plus a checkpoint file rather than an
//! embedded key-value engine.

use std::{
    collections::HashMap,
    io::{self, Write},
    path::Path,
    sync::Arc,
};

use annals_core::{StreamName, StreamState, Uuid, category_of};

use crate::{
    error::LogError,
    format::{HASH_LEN, Hash, u64_at},
    io::{Io, IoFile, read_full},
};

/// File name of the index checkpoint.
pub const INDEX_FILE: &str = "index.bin";
const INDEX_MAGIC: [u8; 8] = *b"ANNALSIX";
const INDEX_VERSION: u32 = 1;

/// What the log looked like at the last applied record: where to continue
/// scanning and what to chain from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LogTail {
    /// Segment holding the end of the log.
    pub segment: u64,
    /// Offset just past the last record in that segment.
    pub end: u64,
    /// Next global position.
    pub next_position: u64,
    /// Hash of the last record (zeros when empty).
    pub last_hash: Hash,
    /// Location of the last record, if any.
    pub last_record: Option<u64>,
    /// Latest recorded_at seen (keeps timestamps monotonic across reopen).
    pub last_ts: i64,
}

/// One stream's bookkeeping.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamEntry {
    /// Decision state.
    pub state: StreamState,
    /// Position of each version (index = version).
    pub positions: Vec<u64>,
    /// Id of the last event (cheap idempotency pre-check).
    pub last_id: Uuid,
}

/// The derived indexes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Index {
    /// Position → packed location.
    pub locs: Vec<u64>,
    /// Stream → entry.
    pub streams: HashMap<StreamName, StreamEntry>,
    /// Event type → positions (ascending).
    pub types: HashMap<String, Vec<u64>>,
    /// Category → positions (ascending).
    pub categories: HashMap<String, Vec<u64>>,
    /// Hash of correlation id → positions (ascending). Collisions are
    /// harmless: reads re-check the filter on every candidate.
    pub correlations: HashMap<u64, Vec<u64>>,
    /// Where the indexed log ends.
    pub tail: LogTail,
}

/// The 64-bit key a correlation id is indexed under.
pub fn correlation_key(id: &str) -> u64 {
    let h = blake3::hash(id.as_bytes());
    u64_at(h.as_bytes(), 0)
}

impl Index {
    /// Records one event.
    #[expect(clippy::too_many_arguments, reason = "one call per record source; all fields are needed")]
    pub fn apply_event(
        &mut self,
        stream_name: &StreamName,
        version: u64,
        position: u64,
        loc: u64,
        event_type: &str,
        correlation: &str,
        id: Uuid,
    ) -> Result<(), String> {
        if position != self.locs.len() as u64 {
            return Err(format!("event position {position} out of sequence (expected {})", self.locs.len()));
        }
        let stream = stream_name.as_str();
        let entry = match self.streams.get_mut(stream_name) {
            Some(e) => e,
            None => self.streams.entry(stream_name.clone()).or_default(),
        };
        if version != entry.positions.len() as u64 {
            return Err(format!(
                "stream '{stream}' version {version} out of sequence (expected {})",
                entry.positions.len()
            ));
        }
        entry.positions.push(position);
        entry.state.last_version = Some(version);
        entry.state.last_position = Some(position);
        entry.last_id = id;
        self.locs.push(loc);
        push_key(&mut self.types, event_type, position);
        push_key(&mut self.categories, category_of(stream), position);
        if !correlation.is_empty() {
            self.correlations.entry(correlation_key(correlation)).or_default().push(position);
        }
        Ok(())
    }

    /// Records a soft delete (`truncate_before`) or a tombstone.
    pub fn apply_delete(
        &mut self,
        stream: &StreamName,
        hard: bool,
        truncate_before: u64,
    ) -> Result<(), String> {
        let entry = self.streams.entry(stream.clone()).or_default();
        if hard {
            entry.state.tombstoned = true;
        } else {
            entry.state.truncate_before = truncate_before;
        }
        Ok(())
    }

    /// Next global position.
    pub fn next_position(&self) -> u64 {
        self.locs.len() as u64
    }
}

fn push_key(map: &mut HashMap<String, Vec<u64>>, key: &str, position: u64) {
    match map.get_mut(key) {
        Some(v) => v.push(position),
        None => {
            map.insert(key.to_owned(), vec![position]);
        }
    }
}

// ----------------------------------------------------------- persistence

/// Streams bytes to a writer while keeping a running CRC32C.
struct CrcWriter<W: Write> {
    inner: W,
    crc: u32,
}

impl<W: Write> CrcWriter<W> {
    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.crc = crc32c::crc32c_append(self.crc, b);
        self.inner.write_all(b)
    }
    fn u64(&mut self, v: u64) -> io::Result<()> {
        self.put(&v.to_le_bytes())
    }
    fn bytes(&mut self, b: &[u8]) -> io::Result<()> {
        self.u64(b.len() as u64)?;
        self.put(b)
    }
    fn list(&mut self, v: &[u64]) -> io::Result<()> {
        self.u64(v.len() as u64)?;
        // Chunked so the encode stays allocation-free and fast.
        let mut buf = [0u8; 8 * 512];
        for chunk in v.chunks(512) {
            let mut n = 0;
            for (slot, x) in buf.chunks_exact_mut(8).zip(chunk) {
                slot.copy_from_slice(&x.to_le_bytes());
                n += 8;
            }
            self.put(buf.get(..n).unwrap_or_default())?;
        }
        Ok(())
    }
}

/// Adapts an [`IoFile`] to `Write` (sequential, from offset 0).
struct FileWriter {
    file: Arc<dyn IoFile>,
    at: u64,
    buf: Vec<u8>,
}

impl Write for FileWriter {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(b);
        if self.buf.len() >= 1 << 20 {
            self.flush()?;
        }
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.file.write_at(&self.buf, self.at)?;
            self.at += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }
}

/// Writes the index checkpoint atomically (temp file, fsync, rename).
pub fn save(io: &dyn Io, dir: &Path, index: &Index) -> Result<(), LogError> {
    let tmp = dir.join("index.bin.tmp");
    let file = io.open(&tmp, true)?;
    file.set_len(0)?;
    let mut w = CrcWriter { inner: FileWriter { file: file.clone(), at: 0, buf: Vec::new() }, crc: 0 };
    w.put(&INDEX_MAGIC)?;
    w.put(&INDEX_VERSION.to_le_bytes())?;
    let t = &index.tail;
    w.u64(t.segment)?;
    w.u64(t.end)?;
    w.u64(t.next_position)?;
    w.put(&t.last_hash)?;
    w.u64(t.last_record.map_or(u64::MAX, |l| l))?;
    w.u64(t.last_ts as u64)?;
    w.list(&index.locs)?;
    // Keys are written sorted so equal indexes give identical files (the
    // rebuild test compares them byte for byte).
    let mut streams: Vec<_> = index.streams.iter().collect();
    streams.sort_unstable_by(|a, b| a.0.cmp(b.0));
    w.u64(streams.len() as u64)?;
    for (name, e) in streams {
        w.bytes(name.as_str().as_bytes())?;
        w.u64(e.state.last_version.unwrap_or(u64::MAX))?;
        w.u64(e.state.last_position.unwrap_or(u64::MAX))?;
        w.u64(e.state.truncate_before)?;
        w.put(&[u8::from(e.state.tombstoned)])?;
        w.put(e.last_id.as_bytes())?;
        w.list(&e.positions)?;
    }
    for map in [&index.types, &index.categories] {
        let mut entries: Vec<_> = map.iter().collect();
        entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
        w.u64(entries.len() as u64)?;
        for (k, v) in entries {
            w.bytes(k.as_bytes())?;
            w.list(v)?;
        }
    }
    let mut correlations: Vec<_> = index.correlations.iter().collect();
    correlations.sort_unstable_by_key(|e| *e.0);
    w.u64(correlations.len() as u64)?;
    for (k, v) in correlations {
        w.u64(*k)?;
        w.list(v)?;
    }
    let crc = w.crc;
    let mut inner = w.inner;
    inner.write_all(&crc.to_le_bytes())?;
    inner.flush()?;
    file.sync_all()?;
    io.rename(&tmp, &dir.join(INDEX_FILE))?;
    io.sync_dir(dir)?;
    Ok(())
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let s = self
            .b
            .get(self.at..self.at.checked_add(n).ok_or("length overflow")?)
            .ok_or("index file cut short")?;
        self.at += n;
        Ok(s)
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64_at(self.take(8)?, 0))
    }
    fn len(&mut self) -> Result<usize, String> {
        let n = usize::try_from(self.u64()?).map_err(|_| "length overflow")?;
        // A length can never exceed the bytes left; this also bounds allocations.
        if n > self.b.len().saturating_sub(self.at) {
            return Err("index length field out of range".into());
        }
        Ok(n)
    }
    fn str(&mut self) -> Result<&'a str, String> {
        let n = self.len()?;
        std::str::from_utf8(self.take(n)?).map_err(|_| "index string is not UTF-8".into())
    }
    fn list(&mut self) -> Result<Vec<u64>, String> {
        let n = self.len()?;
        let raw = self.take(n.checked_mul(8).ok_or("length overflow")?)?;
        Ok(raw.chunks_exact(8).map(|c| u64_at(c, 0)).collect())
    }
}

fn opt(v: u64) -> Option<u64> {
    (v != u64::MAX).then_some(v)
}

/// Loads the index checkpoint; `Ok(None)` when there is none, `Err` with a
/// reason when it is unusable (the caller then rebuilds from the log).
pub fn load(io: &dyn Io, dir: &Path) -> Result<Option<Index>, String> {
    let path = dir.join(INDEX_FILE);
    if !io.exists(&path) {
        return Ok(None);
    }
    let file = io.open_read(&path).map_err(|e| e.to_string())?;
    let len = usize::try_from(file.len().map_err(|e| e.to_string())?).map_err(|_| "index too large")?;
    let mut b = vec![0u8; len];
    let n = read_full(&*file, &mut b, 0).map_err(|e| e.to_string())?;
    if n != len || len < 12 {
        return Err("index file cut short".into());
    }
    let (body, crc) = b.split_at(len - 4);
    if crc32c::crc32c(body) != crate::format::u32_at(crc, 0) {
        return Err("index checksum mismatch".into());
    }
    let mut r = Reader { b: body, at: 0 };
    if r.take(8)? != INDEX_MAGIC {
        return Err("not an index file".into());
    }
    let version = crate::format::u32_at(r.take(4)?, 0);
    if version != INDEX_VERSION {
        return Err(format!("index version {version} not supported"));
    }
    let segment = r.u64()?;
    let end = r.u64()?;
    let next_position = r.u64()?;
    let mut last_hash = [0u8; HASH_LEN];
    last_hash.copy_from_slice(r.take(HASH_LEN)?);
    let last_record = opt(r.u64()?);
    let last_ts = r.u64()? as i64;
    let tail = LogTail { segment, end, next_position, last_hash, last_record, last_ts };
    let locs = r.list()?;
    let n_streams = r.len()?;
    let mut streams = HashMap::with_capacity(n_streams);
    for _ in 0..n_streams {
        let name = StreamName::any(r.str()?).map_err(|e| e.to_string())?;
        let last_version = opt(r.u64()?);
        let last_position = opt(r.u64()?);
        let truncate_before = r.u64()?;
        let tombstoned = r.take(1)? != [0];
        let last_id = Uuid::from_slice(r.take(16)?).map_err(|e| e.to_string())?;
        let positions = r.list()?;
        let state = StreamState { last_version, last_position, truncate_before, tombstoned };
        streams.insert(name, StreamEntry { state, positions, last_id });
    }
    let mut maps = Vec::with_capacity(2);
    for _ in 0..2 {
        let n = r.len()?;
        let mut map = HashMap::with_capacity(n);
        for _ in 0..n {
            let k = r.str()?.to_owned();
            map.insert(k, r.list()?);
        }
        maps.push(map);
    }
    let categories = maps.pop().unwrap_or_default();
    let types = maps.pop().unwrap_or_default();
    let n = r.len()?;
    let mut correlations = HashMap::with_capacity(n);
    for _ in 0..n {
        let k = r.u64()?;
        correlations.insert(k, r.list()?);
    }
    if locs.len() as u64 != next_position {
        return Err("index tail disagrees with its position table".into());
    }
    Ok(Some(Index { locs, streams, types, categories, correlations, tail }))
}
