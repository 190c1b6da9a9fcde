//! Walking the log: recovery on open, verification, index rebuild.

use std::{path::Path, sync::Arc};

use crate::{
    core::{parse_segment_name, segment_file_name},
    error::LogError,
    format::{
        self, DecodeError, FLAG_GROUP_END, HASH_LEN, Hash, KIND_EVENT, KIND_SOFT_DELETE, KIND_TOMBSTONE,
        MIN_RECORD_LEN, RawRecord, SEGMENT_HEADER_LEN, SegmentHeader, pack_loc, unpack_loc,
    },
    index::LogTail,
    io::{Io, IoFile, read_full},
};

/// Bytes read per step while scanning.
const SCAN_CHUNK: usize = 4 << 20;
/// See [`Cursor::intact_event_in`]: how far past a bad frame recovery looks
/// for an intact record before calling the frame a torn tail, and how many
/// zero bytes in a row end the search (the zero-filled space ahead of the
/// data).
const INTACT_SEARCH_LIMIT: u64 = 64 << 20;
const INTACT_SEARCH_ZEROS: u64 = 1 << 20;
/// See [`Cursor::rest_of_one_group`]: how far past a bad point recovery
/// looks for intact records (a group holds at most one append, up to
/// 64 MiB by default, plus 8 MiB of others).
const GROUP_SEARCH_LIMIT: u64 = 256 << 20;

/// An intact record found by searching past a bad point.
struct Found {
    at: u64,
    len: u64,
    /// `Some(first position of its group)` when it ends a group.
    group_end: Option<(Option<u64>, u16)>,
}

/// What to do about a bad record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Opening: truncate a torn tail; refuse (or, with `repair`, truncate)
    /// on corruption before it.
    Open {
        /// Truncate at the first bad record wherever it is.
        repair: bool,
    },
    /// Read-only walk: report the first bad record and stop.
    Verify,
}

/// The first record that failed a check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRecord {
    /// Segment index.
    pub segment: u64,
    /// Offset inside the segment file.
    pub offset: u64,
    /// Position the next event would have had.
    pub position: u64,
    /// Which check failed.
    pub reason: String,
    /// Whether it looks like a torn tail (the rest of the last group, being
    /// written when the machine stopped), which opening the store cuts
    /// rather than refuses.
    pub torn_tail: bool,
    /// Where a cut (of a torn tail, or by `repair`) goes back to: the start
    /// of the record's group. Every event from this position on is removed.
    pub cut_position: u64,
}

/// Result of a walk.
pub(crate) struct Scan {
    pub tail: LogTail,
    pub records: u64,
    pub events: u64,
    pub bytes: u64,
    pub bad: Option<BadRecord>,
    pub truncated: Option<BadRecord>,
    /// Records of a group were handed to `on_record` before the group
    /// failed: whatever `on_record` built must be rebuilt after a cut.
    pub reapply: bool,
    pub files: Vec<Arc<dyn IoFile>>,
    pub last_len: u64,
}

/// Segment indexes present in `dir`, checked to be contiguous from 0.
pub(crate) fn list_segments(io: &dyn Io, dir: &Path) -> Result<Vec<u64>, LogError> {
    let mut segs: Vec<u64> = io.list(dir)?.iter().filter_map(|n| parse_segment_name(n)).collect();
    segs.sort_unstable();
    for (i, s) in segs.iter().enumerate() {
        if *s != i as u64 {
            return Err(LogError::corrupt(
                i as u64,
                0,
                None,
                format!("segment {i} is missing (found {s} instead)"),
            ));
        }
    }
    Ok(segs)
}

struct Cursor {
    file: Arc<dyn IoFile>,
    len: u64,
    buf: Vec<u8>,
    start: u64,
}

impl Cursor {
    /// Bytes from `off`, at least `min` of them when the file has them.
    fn at(&mut self, off: u64, min: usize) -> Result<&[u8], LogError> {
        let have = off >= self.start && off + min as u64 <= self.start + self.buf.len() as u64;
        let reaches_eof = off >= self.start && self.start + self.buf.len() as u64 >= self.len;
        if !(have || reaches_eof) {
            let want =
                usize::try_from(self.len.saturating_sub(off)).unwrap_or(usize::MAX).min(min.max(SCAN_CHUNK));
            self.buf.resize(want, 0);
            let n = read_full(&*self.file, &mut self.buf, off)?;
            self.buf.truncate(n);
            self.start = off;
        }
        let rel = usize::try_from(off - self.start).unwrap_or(usize::MAX);
        Ok(self.buf.get(rel..).unwrap_or_default())
    }

    /// Whether an intact event record (the right position, consistent
    /// field lengths, a good checksum) starts somewhere in `from..until`
    /// (searched up to [`INTACT_SEARCH_LIMIT`] bytes, stopping at a run of
    /// [`INTACT_SEARCH_ZEROS`] zero bytes). A bad frame followed by one is
    /// damage to acknowledged data, not a torn last write: in a torn write
    /// nothing intact follows the first bad frame within its claimed
    /// length, as its own bytes fill that range.
    fn intact_event_in(&mut self, from: u64, until: u64, positions: [u64; 2]) -> Result<bool, LogError> {
        let until = until.min(self.len).min(from.saturating_add(INTACT_SEARCH_LIMIT));
        let file_len = self.len;
        let mut p = from;
        let mut zeros = 0u64;
        while p + MIN_RECORD_LEN as u64 <= until {
            let candidate = {
                let chunk = self.at(p, MIN_RECORD_LEN)?;
                let mut found = None;
                let mut i = 0usize;
                while i + MIN_RECORD_LEN <= chunk.len() && p + (i as u64) + MIN_RECORD_LEN as u64 <= until {
                    let b = chunk.get(i..).unwrap_or_default();
                    // (A record's length may well start with a zero byte:
                    // zeros are counted, not skipped.)
                    if b.first().copied().unwrap_or(0) == 0 {
                        zeros += 1;
                        if zeros >= INTACT_SEARCH_ZEROS {
                            return Ok(false);
                        }
                    } else {
                        zeros = 0;
                    }
                    let len = format::u32_at(b, 0) as u64;
                    let lengths = format::u16_at(b, 10) as u64
                        + format::u16_at(b, 12) as u64
                        + format::u32_at(b, 56) as u64
                        + format::u32_at(b, 60) as u64
                        + format::u32_at(b, 64) as u64;
                    if b.get(8).copied() == Some(KIND_EVENT)
                        && positions.contains(&format::u64_at(b, 16))
                        && len == MIN_RECORD_LEN as u64 + lengths
                        && p + i as u64 + len <= file_len
                    {
                        found = Some((p + i as u64, len));
                        break;
                    }
                    i += 1;
                }
                match found {
                    Some(c) => Ok(c),
                    None => Err(p + (i.max(1) as u64)),
                }
            };
            match candidate {
                Ok((at, len)) => {
                    let frame = self.at(at, usize::try_from(len).unwrap_or(usize::MAX))?;
                    if format::decode(frame).is_ok() {
                        return Ok(true);
                    }
                    p = at + 1;
                }
                Err(next) => p = next,
            }
        }
        Ok(false)
    }

    /// The first intact record (any kind, consistent field lengths, a good
    /// checksum) starting in `from..until`, if any. With `after = Some((off,
    /// np))`, a record there must also carry a position that records written
    /// after `off`, where the next position was `np`, can have: from `np`
    /// up to one more per smallest record between; another is a frame
    /// inside some event's data, not a record of the log.
    fn next_intact(
        &mut self,
        from: u64,
        until: u64,
        after: Option<(u64, u64)>,
    ) -> Result<Option<Found>, LogError> {
        let until = until.min(self.len);
        let file_len = self.len;
        let header = MIN_RECORD_LEN as u64;
        let mut p = from;
        while p + header <= until {
            let (candidate, next) = {
                let chunk = self.at(p, MIN_RECORD_LEN)?;
                if chunk.len() < MIN_RECORD_LEN {
                    return Ok(None);
                }
                let mut i = 0usize;
                let mut candidate = None;
                while i + MIN_RECORD_LEN <= chunk.len() && p + i as u64 + header <= until {
                    let b = chunk.get(i..).unwrap_or_default();
                    if format::u32_at(b, 0) == 0 {
                        // A length field holds a non-zero byte within its
                        // four: skip to three bytes before the next one.
                        match b.iter().position(|&x| x != 0) {
                            Some(nz) => i += nz.saturating_sub(3).max(1),
                            None => i = chunk.len(),
                        }
                        continue;
                    }
                    let len = u64::from(format::u32_at(b, 0));
                    let lengths = u64::from(format::u16_at(b, 10))
                        + u64::from(format::u16_at(b, 12))
                        + u64::from(format::u32_at(b, 56))
                        + u64::from(format::u32_at(b, 60))
                        + u64::from(format::u32_at(b, 64));
                    let kind = b.get(8).copied().unwrap_or(0);
                    if matches!(kind, KIND_EVENT | KIND_SOFT_DELETE | KIND_TOMBSTONE)
                        && len == header + lengths
                        && p + i as u64 + len <= file_len
                    {
                        candidate = Some((p + i as u64, len));
                        break;
                    }
                    i += 1;
                }
                (candidate, p + i.max(1) as u64)
            };
            match candidate {
                Some((at, len)) => {
                    let frame = self.at(at, usize::try_from(len).unwrap_or(usize::MAX))?;
                    let decoded = format::decode(frame.get(..len as usize).unwrap_or_default());
                    let placed = |position: u64| {
                        after.is_none_or(|(off, np)| {
                            (np..=np + (at - off) / MIN_RECORD_LEN as u64 + 1).contains(&position)
                        })
                    };
                    if let Ok(raw) = decoded
                        && placed(raw.position)
                    {
                        let group_end = (raw.flags & FLAG_GROUP_END != 0)
                            .then(|| (format::group_first_position(&raw), raw.group_tag));
                        return Ok(Some(Found { at, len, group_end }));
                    }
                    p = at + 1;
                }
                None => p = next,
            }
        }
        Ok(None)
    }

    /// Whether the bad bytes at `from` and everything after them can be
    /// the rest of one group that was being written when the machine
    /// stopped, the group whose first event has `group_position`. Its pages
    /// reach the disk in any order, so some of its later records may be
    /// intact after a hole; but nothing intact may follow the group's end
    /// mark (a later group is only written after this one was synced, so
    /// finding one means this group was acknowledged: the bad bytes are
    /// damage), and a found end mark must close this group, not a later one
    /// (its event count and its tag lead back to where this group starts).
    fn rest_of_one_group(
        &mut self,
        from: u64,
        np: u64,
        group_position: u64,
        tag: u16,
    ) -> Result<bool, LogError> {
        let until = from.saturating_add(GROUP_SEARCH_LIMIT);
        let mut q = from + 1;
        let mut ended = false;
        while let Some(found) = self.next_intact(q, until, Some((from, np)))? {
            if ended {
                return Ok(false);
            }
            if let Some((first, found_tag)) = found.group_end {
                if first != Some(group_position) || found_tag != tag {
                    return Ok(false);
                }
                ended = true;
            }
            q = found.at + found.len;
        }
        Ok(until >= self.len || self.all_zero(until)?)
    }

    fn all_zero(&mut self, from: u64) -> Result<bool, LogError> {
        let mut off = from;
        while off < self.len {
            let chunk = self.at(off, 1)?;
            if chunk.is_empty() {
                break;
            }
            if chunk.iter().any(|&b| b != 0) {
                return Ok(false);
            }
            off += chunk.len() as u64;
        }
        Ok(true)
    }
}

/// Where a walk starts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Start {
    pub tail: LogTail,
    /// Whether `tail.segment`'s header still has to be read (a walk from
    /// the beginning).
    pub from_header: bool,
    /// (segment, offset) below which everything is known to have been
    /// synced (covered by an index checkpoint): damage there is corruption,
    /// never a torn tail.
    pub durable: (u64, u64),
}

impl Start {
    pub fn beginning() -> Self {
        Start { tail: LogTail::default(), from_header: true, durable: (0, 0) }
    }
}

/// A record of a group whose end has not been walked yet: applied (handed
/// to `on_record`) only once the group's end mark is found intact.
struct Held {
    segment: u64,
    offset: u64,
    len: usize,
    kind: u8,
    content_type: u8,
    position: u64,
    version: u64,
    recorded_at: i64,
    id: [u8; 16],
    stream: String,
    event_type: String,
    correlation: String,
    hash: Hash,
}

impl Held {
    fn new(segment: u64, offset: u64, raw: &RawRecord<'_>) -> Self {
        Held {
            segment,
            offset,
            len: raw.len,
            kind: raw.kind,
            content_type: raw.content_type,
            position: raw.position,
            version: raw.version,
            recorded_at: raw.recorded_at,
            id: raw.id,
            stream: raw.stream.to_owned(),
            event_type: raw.event_type.to_owned(),
            correlation: raw.correlation.to_owned(),
            hash: raw.hash,
        }
    }

    /// The record as `on_record` sees it (metadata and data not kept).
    fn raw(&self) -> RawRecord<'_> {
        RawRecord {
            len: self.len,
            kind: self.kind,
            flags: 0,
            group_events: 0,
            group_tag: 0,
            content_type: self.content_type,
            position: self.position,
            version: self.version,
            recorded_at: self.recorded_at,
            id: self.id,
            stream: &self.stream,
            event_type: &self.event_type,
            correlation: &self.correlation,
            metadata: (0, 0),
            data: (0, 0),
            hash: self.hash,
        }
    }
}

/// The walk's state at the end of the last whole group: where a torn or
/// unfinished group is cut back to.
#[derive(Clone, Copy)]
struct Mark {
    tail: LogTail,
    records: u64,
    events: u64,
    bytes: u64,
}

impl Mark {
    fn of(out: &Scan) -> Self {
        Mark { tail: out.tail, records: out.records, events: out.events, bytes: out.bytes }
    }

    fn restore(&self, out: &mut Scan) {
        out.tail = self.tail;
        out.records = self.records;
        out.events = self.events;
        out.bytes = self.bytes;
    }

    fn at(&self) -> (u64, u64) {
        (self.tail.segment, self.tail.end)
    }
}

/// Walks the log from `start`, calling `on_record` for every good record of
/// every whole group, and handles the first bad one according to `mode`.
pub(crate) fn scan(
    io: &dyn Io,
    dir: &Path,
    start: Start,
    mode: Mode,
    on_record: &mut dyn FnMut(u64, u64, &RawRecord<'_>) -> Result<(), String>,
) -> Result<Scan, LogError> {
    let segs = list_segments(io, dir)?;
    let mut files = Vec::with_capacity(segs.len());
    for s in &segs {
        let path = dir.join(segment_file_name(*s));
        // Verifying only reads: it must work on read-only media too.
        files.push(if mode == Mode::Verify { io.open_read(&path)? } else { io.open(&path, false)? });
    }
    let mut out = Scan {
        tail: start.tail,
        records: 0,
        events: 0,
        bytes: 0,
        bad: None,
        truncated: None,
        reapply: false,
        files: Vec::new(),
        last_len: 0,
    };
    let last_seg = files.len().checked_sub(1).map(|l| l as u64);
    let mut seg = start.tail.segment;
    let mut from_header = start.from_header;
    let mut off = start.tail.end;
    // The end of the last whole group, and the records walked since.
    let mut mark = Mark::of(&out);
    let mut held: Vec<Held> = Vec::new();
    // Whether the current segment's records carry group-end marks.
    let mut marks = from_header || read_header(io, dir, seg).is_none_or(|h| h.marks_groups());
    // Whether the walk is at a known group boundary: it is at the log's
    // start or at a checkpoint's end, but a walk from the head of a later
    // segment may start inside a group begun in the segment before (below
    // the checkpoint, so already durable): until the first end mark its
    // records are taken one by one.
    let mut seen_marks = false;
    let mut aligned = !from_header || start.tail.next_position == 0 && start.tail.segment == 0;
    'segments: while let Some(file) = usize::try_from(seg).ok().and_then(|i| files.get(i)).cloned() {
        let is_last = Some(seg) == last_seg;
        let len = file.len()?;
        let mut cur = Cursor { file: file.clone(), len, buf: Vec::new(), start: 0 };
        if from_header {
            let head = cur
                .at(0, SEGMENT_HEADER_LEN)?
                .get(..SEGMENT_HEADER_LEN.min(len as usize))
                .unwrap_or_default()
                .to_vec();
            let header = match SegmentHeader::decode(&head) {
                Ok(h) => h,
                Err(reason) => {
                    // A crash while creating a segment leaves a short or
                    // zero header; nothing in it was ever acknowledged.
                    // Records are only written after the header is synced,
                    // so a bad header followed by nothing but zeros is one.
                    let torn = is_last
                        && (seg, 0) >= start.durable
                        && (head.len() < SEGMENT_HEADER_LEN || cur.all_zero(SEGMENT_HEADER_LEN as u64)?);
                    if torn && matches!(mode, Mode::Open { .. }) {
                        tracing::warn!(
                            segment = seg,
                            "annals-log: removing a segment whose creation was interrupted"
                        );
                        io.remove(&dir.join(segment_file_name(seg)))?;
                        io.sync_dir(dir)?;
                        files.pop();
                        break 'segments;
                    }
                    let bad = BadRecord {
                        segment: seg,
                        offset: 0,
                        position: out.tail.next_position,
                        reason,
                        torn_tail: torn,
                        cut_position: mark.tail.next_position,
                    };
                    return finish_bad(io, dir, mode, &mut files, &mut out, bad, mark);
                }
            };
            let problem = if header.index != seg {
                Some(format!("segment header says index {} but the file is segment {seg}", header.index))
            } else if header.first_position != out.tail.next_position {
                Some(format!(
                    "segment starts at position {} but the previous one ended at {}",
                    header.first_position, out.tail.next_position
                ))
            } else if header.prev_hash != out.tail.last_hash {
                Some("hash chain broken at the segment boundary".to_owned())
            } else if seen_marks && !header.marks_groups() {
                Some(format!("segment of format version {} after a newer one", header.version))
            } else {
                None
            };
            if let Some(reason) = problem {
                let bad = BadRecord {
                    segment: seg,
                    offset: 0,
                    position: out.tail.next_position,
                    reason,
                    torn_tail: false,
                    cut_position: mark.tail.next_position,
                };
                return finish_bad(io, dir, mode, &mut files, &mut out, bad, mark);
            }
            marks = header.marks_groups();
            seen_marks |= marks;
            off = SEGMENT_HEADER_LEN as u64;
            out.tail.segment = seg;
            out.tail.end = off;
            aligned |= (seg, off) == start.durable;
            if held.is_empty() {
                mark = Mark::of(&out);
            }
        }
        loop {
            let mut b = cur.at(off, MIN_RECORD_LEN)?;
            let mut decoded = format::decode(b);
            if let Err(DecodeError::Incomplete { needed }) = decoded
                && needed > 0
                && off + needed as u64 <= len
            {
                b = cur.at(off, needed)?;
                decoded = format::decode(b);
            }
            let decodable = decoded.is_ok();
            let reason = match decoded {
                Ok(raw) => {
                    let body = format::hashed_body(b.get(..raw.len).unwrap_or_default());
                    // In a segment without marks every record is a group.
                    let boundary = !marks || raw.flags & FLAG_GROUP_END != 0;
                    let ends = boundary || !aligned;
                    let reason = if format::chain_hash(&out.tail.last_hash, body) != raw.hash {
                        Some("hash chain broken: record does not follow the previous one".to_owned())
                    } else if raw.kind == KIND_EVENT && raw.position != out.tail.next_position {
                        Some(format!(
                            "event position {} out of sequence (expected {})",
                            raw.position, out.tail.next_position
                        ))
                    } else if marks && raw.kind != KIND_EVENT && raw.position != out.tail.next_position {
                        Some(format!(
                            "delete record carries position {} (expected {})",
                            raw.position, out.tail.next_position
                        ))
                    } else if marks
                        && aligned
                        && boundary
                        && raw.group_tag != format::group_tag(&mark.tail.last_hash)
                    {
                        Some("group end mark does not name the record its group follows".to_owned())
                    } else if marks
                        && aligned
                        && boundary
                        && format::group_first_position(&raw) != Some(mark.tail.next_position)
                    {
                        Some(format!(
                            "group end mark counts {} events, the group holds {}",
                            raw.group_events,
                            out.tail.next_position - mark.tail.next_position
                                + u64::from(raw.kind == KIND_EVENT)
                        ))
                    } else if !ends {
                        held.push(Held::new(seg, off, &raw));
                        None
                    } else {
                        // The group is whole: hand it over, held records first.
                        let mut failed = None;
                        let had_held = !held.is_empty();
                        for h in held.drain(..) {
                            if let Err(e) = on_record(h.segment, h.offset, &h.raw()) {
                                failed = Some(e);
                                break;
                            }
                        }
                        if failed.is_some() {
                            // Part of the group reached `on_record`: a cut
                            // must rebuild from scratch.
                            out.reapply = true;
                            failed
                        } else {
                            let r = on_record(seg, off, &raw).err();
                            // The held records reached `on_record` already.
                            out.reapply |= r.is_some() && had_held;
                            r
                        }
                    };
                    match reason {
                        None => {
                            out.tail.last_hash = raw.hash;
                            out.tail.last_record = Some(pack_loc(seg, off));
                            out.tail.last_ts = out.tail.last_ts.max(raw.recorded_at);
                            off += raw.len as u64;
                            out.tail.end = off;
                            out.records += 1;
                            out.bytes += raw.len as u64;
                            if raw.kind == KIND_EVENT {
                                out.tail.next_position += 1;
                                out.events += 1;
                            }
                            if ends {
                                mark = Mark::of(&out);
                            }
                            if boundary || (seg, off) == start.durable {
                                aligned = true;
                            }
                            continue;
                        }
                        Some(r) => r,
                    }
                }
                Err(DecodeError::End) => {
                    if cur.all_zero(off)? {
                        if is_last {
                            break 'segments;
                        }
                        seg += 1;
                        from_header = true;
                        continue 'segments;
                    }
                    "zero length field followed by non-zero bytes".to_owned()
                }
                Err(e) => e.reason(),
            };
            let np = out.tail.next_position;
            // A frame that decodes but fails a check (hash chain, position,
            // group count) was written whole: never a torn write.
            let torn = !decodable
                && is_last
                && mark.at() >= start.durable
                && if marks {
                    // The bad bytes and everything after them can be the
                    // rest of the group being written when the machine
                    // stopped (its pages reach the disk in any order).
                    cur.rest_of_one_group(
                        off,
                        np,
                        mark.tail.next_position,
                        format::group_tag(&mark.tail.last_hash),
                    )?
                } else {
                    // Format version 1: nothing but zeros follows where the
                    // bad frame claims to end, and nothing intact starts
                    // inside that range (a damaged length field of an
                    // acknowledged record claims past the records after it).
                    let claimed = u64::from(format::u32_at(cur.at(off, 4)?, 0));
                    let end = if claimed as usize >= MIN_RECORD_LEN {
                        (off + claimed).min(len)
                    } else {
                        (off + 4).min(len)
                    };
                    cur.all_zero(end)?
                        && !cur.intact_event_in(off + MIN_RECORD_LEN as u64, end, [np, np + 1])?
                };
            let bad = BadRecord {
                segment: seg,
                offset: off,
                position: np,
                reason,
                torn_tail: torn,
                cut_position: mark.tail.next_position,
            };
            return finish_bad(io, dir, mode, &mut files, &mut out, bad, mark);
        }
    }
    if let Some(first) = held.first() {
        // The log ends inside a group: its end mark was never written (a
        // crash before the group's write completed, or between the sync of
        // a full segment and the next segment's first write).
        let bad = BadRecord {
            segment: first.segment,
            offset: first.offset,
            position: first.position,
            reason: format!("the last group ({} records) has no end mark", held.len()),
            torn_tail: mark.at() >= start.durable,
            cut_position: mark.tail.next_position,
        };
        return finish_bad(io, dir, mode, &mut files, &mut out, bad, mark);
    }
    if (out.tail.segment, out.tail.end) < start.durable {
        // An index checkpoint only covers synced records: a log that ends
        // before it lost acknowledged ones (segments removed, or the last
        // one cut short). Never start over from what is left.
        let bad = BadRecord {
            segment: out.tail.segment,
            offset: out.tail.end,
            position: out.tail.next_position,
            reason: format!(
                "the log ends before the index checkpoint's end (segment {}, offset {}): segments were \
                 removed or cut short",
                start.durable.0, start.durable.1
            ),
            torn_tail: false,
            cut_position: mark.tail.next_position,
        };
        return finish_bad(io, dir, mode, &mut files, &mut out, bad, mark);
    }
    out.last_len = match files.last() {
        Some(f) => f.len()?,
        None => 0,
    };
    out.files = files;
    Ok(out)
}

/// Handles the first bad record: reports it (verify), refuses (corruption),
/// or cuts the log back to `mark`, the end of the last whole group before it
/// (a torn tail, or `repair`).
fn finish_bad(
    io: &dyn Io,
    dir: &Path,
    mode: Mode,
    files: &mut Vec<Arc<dyn IoFile>>,
    out: &mut Scan,
    bad: BadRecord,
    mark: Mark,
) -> Result<Scan, LogError> {
    match mode {
        Mode::Verify => {
            out.bad = Some(bad);
        }
        Mode::Open { repair } => {
            if !(bad.torn_tail || repair) {
                return Err(LogError::Corrupt {
                    segment: bad.segment,
                    offset: bad.offset,
                    position: Some(bad.position),
                    reason: bad.reason,
                });
            }
            let (cut_seg, cut_off) = mark.at();
            mark.restore(out);
            for s in ((cut_seg + 1)..files.len() as u64).rev() {
                io.remove(&dir.join(segment_file_name(s)))?;
                files.pop();
            }
            if cut_off == 0 {
                // The segment itself is unusable: drop it too.
                if usize::try_from(cut_seg).is_ok_and(|i| i < files.len()) {
                    io.remove(&dir.join(segment_file_name(cut_seg)))?;
                    files.pop();
                }
            } else if let Some(file) = usize::try_from(cut_seg).ok().and_then(|i| files.get(i)) {
                file.set_len(cut_off)?;
                file.sync_all()?;
            }
            if !bad.torn_tail {
                // The checkpoint may describe records that are gone now.
                let checkpoint = dir.join(crate::index::INDEX_FILE);
                if io.exists(&checkpoint) {
                    io.remove(&checkpoint)?;
                }
            }
            io.sync_dir(dir)?;
            if bad.torn_tail {
                tracing::warn!(
                    segment = bad.segment,
                    offset = bad.offset,
                    position = bad.position,
                    reason = %bad.reason,
                    cut_segment = cut_seg,
                    cut_offset = cut_off,
                    "annals-log: truncated a torn tail (an unacknowledged group)"
                );
            } else {
                tracing::warn!(
                    segment = bad.segment,
                    offset = bad.offset,
                    position = bad.position,
                    reason = %bad.reason,
                    cut_segment = cut_seg,
                    cut_offset = cut_off,
                    "annals-log: repair truncated the log at the group of a corrupt record; everything from there on is gone"
                );
            }
            out.truncated = Some(bad);
        }
    }
    out.last_len = match files.last() {
        Some(f) => f.len()?,
        None => 0,
    };
    out.files = std::mem::take(files);
    Ok(Scan {
        tail: out.tail,
        records: out.records,
        events: out.events,
        bytes: out.bytes,
        bad: out.bad.take(),
        truncated: out.truncated.take(),
        reapply: out.reapply,
        files: std::mem::take(&mut out.files),
        last_len: out.last_len,
    })
}

/// Whether a checkpointed tail still describes the log: the record it names
/// decodes, carries the checkpointed hash and ends where the tail says.
pub(crate) fn tail_matches(io: &dyn Io, dir: &Path, tail: &crate::index::LogTail) -> bool {
    let Some(loc) = tail.last_record else {
        return tail.next_position == 0;
    };
    let (seg, off) = unpack_loc(loc);
    if !io.exists(&dir.join(segment_file_name(tail.segment))) {
        return false;
    }
    let Ok(file) = io.open_read(&dir.join(segment_file_name(seg))) else { return false };
    let mut head = [0u8; 4];
    if read_full(&*file, &mut head, off).ok() != Some(4) {
        return false;
    }
    let len = format::u32_at(&head, 0) as usize;
    // A damaged length field must not size the buffer below.
    let fits = file.len().is_ok_and(|file_len| off.saturating_add(len as u64) <= file_len);
    if len < MIN_RECORD_LEN || !fits {
        return false;
    }
    let mut frame = vec![0u8; len];
    if read_full(&*file, &mut frame, off).ok() != Some(len) {
        return false;
    }
    let Ok(raw) = format::decode(&frame) else { return false };
    // The tail is either just past that record, or at the start of the next
    // segment when it was created before any record landed in it.
    let at_end = (seg == tail.segment && off + len as u64 == tail.end)
        || (tail.segment == seg + 1 && tail.end == SEGMENT_HEADER_LEN as u64);
    raw.hash == tail.last_hash && at_end
}

/// Zero hash used before the first record.
pub(crate) const GENESIS: Hash = [0u8; HASH_LEN];

/// The header of segment `index`, if it reads and checks.
pub(crate) fn read_header(io: &dyn Io, dir: &Path, index: u64) -> Option<SegmentHeader> {
    let file = io.open_read(&dir.join(segment_file_name(index))).ok()?;
    let mut b = [0u8; SEGMENT_HEADER_LEN];
    if read_full(&*file, &mut b, 0).ok()? != SEGMENT_HEADER_LEN {
        return None;
    }
    SegmentHeader::decode(&b).ok().filter(|h| h.index == index)
}
