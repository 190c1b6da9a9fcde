//! The read side shared by every handle, the writer and subscriptions: the
//! open segment files, the published index, and the poison flag.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use annals_core::{
    AllReader, AllSlice, ContentType, Direction, Error, Filter, Limits, Metadata, ReadAll, ReadFrom,
    ReadStream, RecordedEvent, Result, StreamInfo, StreamName, StreamReader, Timestamp, TypeMatch, Uuid,
    async_trait,
};
use bytes::Bytes;

use crate::{
    error::LogError,
    format::{self, DecodeError, KIND_EVENT, SEGMENT_HEADER_LEN, unpack_loc},
    index::{Index, correlation_key},
    io::{Io, IoFile, read_full},
};

/// Positions handled per index lock while scanning `$all`.
const SCAN_BATCH: usize = 4096;
/// Read window for sequential scans.
const SCAN_WINDOW: usize = 256 * 1024;
/// Read window for scattered reads (one stream, index candidates).
const POINT_WINDOW: usize = 4096;

/// File name of segment `index`.
pub fn segment_file_name(index: u64) -> String {
    format!("{index:020}.seg")
}

/// Parses a segment file name.
pub fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Shared read state.
pub struct Core {
    pub(crate) dir: PathBuf,
    pub(crate) io: Arc<dyn Io>,
    pub(crate) limits: Limits,
    index: RwLock<Index>,
    segments: RwLock<Vec<Arc<dyn IoFile>>>,
    poison: Mutex<Option<String>>,
}

fn lock_err() -> Error {
    Error::Poisoned { reason: "an internal lock was poisoned by a panic".into() }
}

impl Core {
    pub(crate) fn new(
        dir: &Path,
        io: Arc<dyn Io>,
        limits: Limits,
        index: Index,
        segments: Vec<Arc<dyn IoFile>>,
    ) -> Self {
        Core {
            dir: dir.to_path_buf(),
            io,
            limits,
            index: RwLock::new(index),
            segments: RwLock::new(segments),
            poison: Mutex::new(None),
        }
    }

    pub(crate) fn index(&self) -> Result<RwLockReadGuard<'_, Index>> {
        self.index.read().map_err(|_| lock_err())
    }

    pub(crate) fn index_mut(&self) -> Result<RwLockWriteGuard<'_, Index>> {
        self.index.write().map_err(|_| lock_err())
    }

    pub(crate) fn segment(&self, index: u64) -> Result<Arc<dyn IoFile>> {
        let segs = self.segments.read().map_err(|_| lock_err())?;
        usize::try_from(index)
            .ok()
            .and_then(|i| segs.get(i))
            .cloned()
            .ok_or_else(|| Error::Corrupt { details: format!("segment {index} is referenced but not open") })
    }

    pub(crate) fn push_segment(&self, file: Arc<dyn IoFile>) -> Result<()> {
        self.segments.write().map_err(|_| lock_err())?.push(file);
        Ok(())
    }

    pub(crate) fn pop_segment(&self) -> Result<()> {
        self.segments.write().map_err(|_| lock_err())?.pop();
        Ok(())
    }

    /// Syncs the last segment: makes every event readers can see durable
    /// (earlier segments are synced before the next one is created, and
    /// events are published only after their bytes are written). kv.log
    /// calls it before syncing its own records under `Interval`, so a
    /// checkpoint is never durable ahead of the events it counts.
    pub(crate) fn sync_log(&self) -> std::io::Result<()> {
        let last =
            self.segments.read().map_err(|_| std::io::Error::other("segment lock poisoned"))?.last().cloned();
        match last {
            Some(file) => file.sync_data(),
            None => Ok(()),
        }
    }

    pub(crate) fn segment_count(&self) -> usize {
        self.segments.read().map(|s| s.len()).unwrap_or(0)
    }

    /// The reason the store is poisoned, if it is.
    pub(crate) fn poisoned(&self) -> Option<String> {
        self.poison.lock().map(|p| p.clone()).unwrap_or_else(|_| Some("poison lock poisoned".into()))
    }

    pub(crate) fn set_poisoned(&self, reason: String) {
        tracing::error!(%reason, "annals-log: write failed; store poisoned until reopen");
        if let Ok(mut p) = self.poison.lock()
            && p.is_none()
        {
            *p = Some(reason);
        }
    }

    pub(crate) fn check_poison(&self) -> Result<()> {
        match self.poisoned() {
            Some(reason) => Err(Error::Poisoned { reason }),
            None => Ok(()),
        }
    }

    /// Reads the id of the event at `loc` (used for idempotency checks).
    pub(crate) fn event_id(&self, position: u64, loc: u64) -> Result<Uuid> {
        let mut r = RecordReader::new(self, POINT_WINDOW);
        Ok(r.event(position, loc, false)?.id)
    }

    fn read_stream_sync(&self, stream: &StreamName, request: ReadStream) -> Result<Vec<RecordedEvent>> {
        let wanted: Vec<(u64, u64)> = {
            let idx = self.index()?;
            let Some(entry) = idx.streams.get(stream) else {
                return Err(Error::StreamNotFound { stream: stream.clone() });
            };
            let versions = entry.state.versions_to_read(stream, &request)?;
            versions
                .filter_map(|v| usize::try_from(v).ok().and_then(|v| entry.positions.get(v)))
                .filter_map(|&p| usize::try_from(p).ok().and_then(|i| idx.locs.get(i)).map(|&l| (p, l)))
                .collect()
        };
        let mut reader = RecordReader::new(self, POINT_WINDOW);
        let backward = request.direction == Direction::Backward;
        wanted.into_iter().map(|(p, l)| reader.event(p, l, backward)).collect()
    }

    fn read_all_sync(&self, request: &ReadAll) -> Result<AllSlice> {
        let end = self.index()?.next_position();
        let forward = request.direction == Direction::Forward;
        let start = if forward {
            match request.from {
                ReadFrom::Start => 0,
                ReadFrom::End => end,
                ReadFrom::At(p) => p.min(end),
            }
        } else {
            if end == 0 {
                return Ok(AllSlice { events: Vec::new(), next: None });
            }
            match request.from {
                ReadFrom::Start | ReadFrom::End => end - 1,
                ReadFrom::At(p) => p.min(end - 1),
            }
        };
        if request.limit == 0 {
            return Ok(AllSlice { events: Vec::new(), next: Some(start) });
        }
        let indexed = {
            let idx = self.index()?;
            candidate_lists(&idx, &request.filter).is_some()
        };
        if indexed {
            self.read_all_indexed(request, start, end, forward)
        } else {
            self.read_all_scan(request, start, end, forward)
        }
    }

    fn read_all_scan(&self, request: &ReadAll, start: u64, end: u64, forward: bool) -> Result<AllSlice> {
        let mut events = Vec::new();
        let mut reader = RecordReader::new(self, SCAN_WINDOW);
        // Read after `end`, so it covers every record below it.
        reader.written = {
            let idx = self.index()?;
            Some((idx.tail.segment, idx.tail.end))
        };
        let filter = &request.filter;
        if forward {
            let mut pos = start;
            while pos < end {
                let batch_end = end.min(pos + SCAN_BATCH as u64);
                let locs = self.locs(pos, batch_end)?;
                for (i, loc) in locs.into_iter().enumerate() {
                    let p = pos + i as u64;
                    let e = reader.event(p, loc, false)?;
                    if filter.matches(&e) {
                        events.push(e);
                        if events.len() >= request.limit {
                            return Ok(AllSlice { events, next: Some(p + 1) });
                        }
                    }
                }
                pos = batch_end;
            }
            Ok(AllSlice { events, next: Some(pos) })
        } else {
            // `top` is the highest position not yet scanned, inclusive.
            let mut top = Some(start);
            while let Some(t) = top {
                let low = (t + 1).saturating_sub(SCAN_BATCH as u64);
                let locs = self.locs(low, t + 1)?;
                for (i, loc) in locs.into_iter().enumerate().rev() {
                    let p = low + i as u64;
                    let e = reader.event(p, loc, true)?;
                    if filter.matches(&e) {
                        events.push(e);
                        if events.len() >= request.limit {
                            return Ok(AllSlice { events, next: p.checked_sub(1) });
                        }
                    }
                }
                top = low.checked_sub(1);
            }
            Ok(AllSlice { events, next: None })
        }
    }

    fn read_all_indexed(&self, request: &ReadAll, start: u64, end: u64, forward: bool) -> Result<AllSlice> {
        let mut events = Vec::new();
        let mut reader = RecordReader::new(self, POINT_WINDOW);
        let batch = request.limit.clamp(64, SCAN_BATCH);
        let mut cursor = Some(start);
        while let Some(from) = cursor {
            let (cands, resume) = {
                let idx = self.index()?;
                let lists = candidate_lists(&idx, &request.filter).unwrap_or_default();
                let (positions, resume) = candidate_batch(&lists, from, end, forward, batch);
                let with_locs: Vec<(u64, u64)> = positions
                    .into_iter()
                    .filter_map(|p| usize::try_from(p).ok().and_then(|i| idx.locs.get(i)).map(|&l| (p, l)))
                    .collect();
                (with_locs, resume)
            };
            for (p, loc) in cands {
                let e = reader.event(p, loc, !forward)?;
                if request.filter.matches(&e) {
                    events.push(e);
                    if events.len() >= request.limit {
                        let next = if forward { Some(p + 1) } else { p.checked_sub(1) };
                        return Ok(AllSlice { events, next });
                    }
                }
            }
            cursor = resume;
        }
        Ok(AllSlice { events, next: if forward { Some(end) } else { None } })
    }

    fn locs(&self, from: u64, to: u64) -> Result<Vec<u64>> {
        let idx = self.index()?;
        let (Ok(a), Ok(b)) = (usize::try_from(from), usize::try_from(to)) else { return Ok(Vec::new()) };
        Ok(idx.locs.get(a..b).map(<[u64]>::to_vec).unwrap_or_default())
    }
}

/// The index lists that can answer `filter`, most selective first, or
/// `None` when only a scan can (no category, type or correlation criterion).
fn candidate_lists<'a>(idx: &'a Index, filter: &Filter) -> Option<Vec<&'a [u64]>> {
    if let Some(cid) = &filter.correlation_id {
        return Some(
            idx.correlations.get(&correlation_key(cid)).map(|v| vec![v.as_slice()]).unwrap_or_default(),
        );
    }
    if !filter.event_types.is_empty() {
        let mut lists = Vec::new();
        for t in &filter.event_types {
            match t {
                TypeMatch::Exact(name) => lists.extend(idx.types.get(name).map(Vec::as_slice)),
                TypeMatch::Prefix(p) => lists.extend(
                    idx.types.iter().filter(|(k, _)| k.starts_with(p.as_str())).map(|(_, v)| v.as_slice()),
                ),
            }
        }
        return Some(lists);
    }
    if let Some(cat) = &filter.category {
        return Some(idx.categories.get(cat).map(|v| vec![v.as_slice()]).unwrap_or_default());
    }
    None
}

/// Up to about `max` candidate positions from the union of `lists`, starting
/// at `from` (inclusive) in the given direction and bounded by `end`
/// (exclusive, forward). Returns them in direction order and where to resume,
/// or `None` when every list is exhausted.
fn candidate_batch(
    lists: &[&[u64]],
    from: u64,
    end: u64,
    forward: bool,
    max: usize,
) -> (Vec<u64>, Option<u64>) {
    let mut merged = Vec::new();
    let mut boundary: Option<u64> = None;
    for list in lists {
        if forward {
            let i = list.partition_point(|&x| x < from);
            let j = list.partition_point(|&x| x < end);
            let slice = list.get(i..j).unwrap_or_default();
            let taken = slice.get(..max.min(slice.len())).unwrap_or_default();
            if taken.len() < slice.len()
                && let Some(&last) = taken.last()
            {
                boundary = Some(boundary.map_or(last, |b| b.min(last)));
            }
            merged.extend_from_slice(taken);
        } else {
            let j = list.partition_point(|&x| x <= from);
            let slice = list.get(..j).unwrap_or_default();
            let taken = slice.get(slice.len().saturating_sub(max)..).unwrap_or_default();
            if taken.len() < slice.len()
                && let Some(&first) = taken.first()
            {
                boundary = Some(boundary.map_or(first, |b| b.max(first)));
            }
            merged.extend_from_slice(taken);
        }
    }
    merged.sort_unstable();
    merged.dedup();
    if forward {
        if let Some(b) = boundary {
            merged.retain(|&p| p <= b);
        }
        (merged, boundary.map(|b| b + 1))
    } else {
        if let Some(b) = boundary {
            merged.retain(|&p| p >= b);
        }
        merged.reverse();
        (merged, boundary.and_then(|b| b.checked_sub(1)))
    }
}

/// Reads and decodes event records through a small cached window, so
/// neighbouring records cost one read and payloads are sliced, not copied.
pub(crate) struct RecordReader<'c> {
    core: &'c Core,
    window: Option<(u64, u64, Bytes)>,
    size: usize,
    last_stream: Option<StreamName>,
    /// The active segment and the offset past its last record, when known:
    /// windows stop there. The active segment is preallocated (zeros), so a
    /// window past its end reads (and page-faults in) bytes it throws away:
    /// a live subscriber reading the newest event read 256 KiB for it.
    written: Option<(u64, u64)>,
}

impl<'c> RecordReader<'c> {
    pub(crate) fn new(core: &'c Core, size: usize) -> Self {
        RecordReader { core, window: None, size, last_stream: None, written: None }
    }

    fn fill(&mut self, segment: u64, start: u64, len: usize) -> Result<()> {
        let file = self.core.segment(segment)?;
        let mut buf = vec![0u8; len];
        let n = read_full(&*file, &mut buf, start)?;
        buf.truncate(n);
        self.window = Some((segment, start, Bytes::from(buf)));
        Ok(())
    }

    /// The bytes of the frame at `(segment, offset)` if the window holds all
    /// of it (framing only; the caller decodes and checks the CRC).
    fn window_frame(&self, segment: u64, offset: u64) -> Option<Bytes> {
        let (seg, start, bytes) = self.window.as_ref()?;
        if *seg != segment || offset < *start {
            return None;
        }
        let rel = usize::try_from(offset - *start).ok()?;
        let len = format::u32_at(bytes.get(rel..)?, 0) as usize;
        if len < format::MIN_RECORD_LEN || rel + len > bytes.len() {
            return None;
        }
        Some(bytes.slice(rel..rel + len))
    }

    /// The frame at `loc`, from the window or a fresh read.
    fn frame(&mut self, position: u64, loc: u64, backward: bool) -> Result<(Bytes, u64, u64)> {
        let (segment, offset) = unpack_loc(loc);
        if let Some(hit) = self.window_frame(segment, offset) {
            return Ok((hit, segment, offset));
        }
        let start = if backward {
            // Backward scans read the window that ends at this record.
            offset
                .saturating_sub((self.size.saturating_sub(POINT_WINDOW)) as u64)
                .max(SEGMENT_HEADER_LEN as u64)
                .min(offset)
        } else {
            offset
        };
        let mut len = self.size.max(POINT_WINDOW) + usize::try_from(offset - start).unwrap_or(0);
        if let Some((active, end)) = self.written
            && active == segment
            && end > offset
        {
            len = len.min(usize::try_from(end - start).unwrap_or(len));
        }
        self.fill(segment, start, len)?;
        if let Some(hit) = self.window_frame(segment, offset) {
            return Ok((hit, segment, offset));
        }
        let needed = match &self.window {
            Some((_, start, bytes)) => {
                let rel = usize::try_from(offset - start).unwrap_or(usize::MAX);
                match format::decode(bytes.get(rel..).unwrap_or_default()) {
                    Err(DecodeError::Incomplete { needed }) if needed > 0 => needed,
                    Err(e) => return Err(corrupt(segment, offset, position, &e.reason())),
                    Ok(_) => 0,
                }
            }
            None => 0,
        };
        if needed > 0 {
            // The length field sizes the buffer: one that claims past the
            // end of the segment (a damaged field) must not allocate it.
            let file_len = self.core.segment(segment)?.len()?;
            if offset.saturating_add(needed as u64) > file_len {
                return Err(corrupt(
                    segment,
                    offset,
                    position,
                    &format!("record claims {needed} bytes, past the end of the segment ({file_len} bytes)"),
                ));
            }
            self.fill(segment, offset, needed)?;
            if let Some(hit) = self.window_frame(segment, offset) {
                return Ok((hit, segment, offset));
            }
        }
        Err(corrupt(segment, offset, position, "record cut short by the end of the segment"))
    }

    /// Reads the event at `position`, stored at `loc`; fails with `Corrupt`
    /// when the bytes there are not that event.
    pub(crate) fn event(&mut self, position: u64, loc: u64, backward: bool) -> Result<RecordedEvent> {
        let (frame, segment, offset) = self.frame(position, loc, backward)?;
        let raw = format::decode(&frame).map_err(|e| corrupt(segment, offset, position, &e.reason()))?;
        if raw.kind != KIND_EVENT || raw.position != position {
            return Err(corrupt(segment, offset, position, "the index points at a different record"));
        }
        let stream = match &self.last_stream {
            Some(s) if s.as_str() == raw.stream => s.clone(),
            _ => {
                let s = StreamName::any(raw.stream)
                    .map_err(|e| corrupt(segment, offset, position, &e.to_string()))?;
                self.last_stream = Some(s.clone());
                s
            }
        };
        let content_type = ContentType::from_code(raw.content_type)
            .ok_or_else(|| corrupt(segment, offset, position, "unknown content type"))?;
        let (mo, ml) = raw.metadata;
        let (d_o, dl) = raw.data;
        Ok(RecordedEvent {
            stream,
            version: raw.version,
            position,
            id: Uuid::from_bytes(raw.id),
            event_type: raw.event_type.to_owned(),
            data: frame.slice(d_o..d_o + dl),
            content_type,
            metadata: Metadata::from_trusted_json(frame.slice(mo..mo + ml)),
            recorded_at: Timestamp::from_micros(raw.recorded_at),
        })
    }
}

fn corrupt(segment: u64, offset: u64, position: u64, reason: &str) -> Error {
    LogError::corrupt(segment, offset, Some(position), reason).into()
}

#[async_trait]
impl StreamReader for Core {
    async fn read_stream(&self, stream: &StreamName, request: ReadStream) -> Result<Vec<RecordedEvent>> {
        self.read_stream_sync(stream, request)
    }

    async fn stream_info(&self, stream: &StreamName) -> Result<StreamInfo> {
        let idx = self.index()?;
        Ok(idx.streams.get(stream).map(|e| e.state).unwrap_or_default().info(stream))
    }
}

#[async_trait]
impl AllReader for Core {
    async fn read_all(&self, request: ReadAll) -> Result<AllSlice> {
        request.filter.validate()?;
        self.read_all_sync(&request)
    }

    async fn next_position(&self) -> Result<u64> {
        Ok(self.index()?.next_position())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn candidate_batches_merge_and_resume() {
        let a: Vec<u64> = vec![1, 4, 7, 10, 13];
        let b: Vec<u64> = vec![2, 4, 8];
        let lists = [a.as_slice(), b.as_slice()];
        let (got, resume) = candidate_batch(&lists, 0, 100, true, 2);
        assert_eq!(got, vec![1, 2, 4]);
        assert_eq!(resume, Some(5));
        let (got, resume) = candidate_batch(&lists, 5, 100, true, 10);
        assert_eq!(got, vec![7, 8, 10, 13]);
        assert_eq!(resume, None);
        let (got, resume) = candidate_batch(&lists, 9, 100, false, 1);
        assert_eq!(got, vec![8]);
        assert_eq!(resume, Some(7));
        assert_eq!(parse_segment_name(&segment_file_name(42)), Some(42));
    }
}
