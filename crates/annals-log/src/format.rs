//! The on-disk format of segments and records (version 2; version 1 is
//! still read). See
//! `docs/log-format.md` for the byte diagrams and invariants; this module is
//! the single place that knows the byte layout.

use crate::error::LogError;

/// Magic bytes opening every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"ANNALSEG";
/// The format version this build writes.
pub const FORMAT_VERSION: u32 = 2;
/// The oldest segment format version this build reads. Version 1 segments
/// have no group-end marks: each of their records counts as a group of its
/// own.
pub const OLDEST_READ_VERSION: u32 = 1;
/// Length of a segment header.
pub const SEGMENT_HEADER_LEN: usize = 72;
/// Length of a record header (fixed fields before the variable parts).
pub const RECORD_HEADER_LEN: usize = 72;
/// Length of the chained hash that closes every record.
pub const HASH_LEN: usize = 32;
/// The smallest possible record.
pub const MIN_RECORD_LEN: usize = RECORD_HEADER_LEN + HASH_LEN;

/// A chained record hash.
pub type Hash = [u8; HASH_LEN];

/// Record kinds.
pub const KIND_EVENT: u8 = 1;
/// A soft delete of a stream (`version` field holds truncate-before).
pub const KIND_SOFT_DELETE: u8 = 2;
/// A hard delete (tombstone) of a stream.
pub const KIND_TOMBSTONE: u8 = 3;

/// Record flag (format version 2): the last record of a group commit (one
/// write and one sync). Recovery keeps a group only when its end is intact,
/// so an atomic append is never cut in half.
pub const FLAG_GROUP_END: u16 = 1;

/// The tag a group's last record carries in flag bits 1–15: the low 15 bits
/// of the hash of the record before the group (its first two bytes, little
/// endian). It ties the mark to where its group starts, which the event
/// count alone cannot when groups hold no events (deletes only).
pub fn group_tag(before_group: &Hash) -> u16 {
    u16::from_le_bytes([before_group[0], before_group[1]]) & 0x7fff
}

/// The flags of a group's last record whose group follows `before_group`.
fn end_flags(tag: u16) -> u16 {
    FLAG_GROUP_END | (tag << 1)
}

/// Bits of a location used for the offset inside a segment.
const OFFSET_BITS: u32 = 40;
/// Largest offset a location can hold (1 TiB).
pub const MAX_OFFSET: u64 = (1 << OFFSET_BITS) - 1;
/// Largest segment index a location can hold.
pub const MAX_SEGMENT: u64 = (1 << (64 - OFFSET_BITS)) - 1;

/// Packs (segment, offset) into one `u64`, the unit the indexes store.
pub fn pack_loc(segment: u64, offset: u64) -> u64 {
    (segment << OFFSET_BITS) | (offset & MAX_OFFSET)
}

/// Inverse of [`pack_loc`].
pub fn unpack_loc(loc: u64) -> (u64, u64) {
    (loc >> OFFSET_BITS, loc & MAX_OFFSET)
}

/// The header at offset 0 of every segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Format version of the segment's records ([`FORMAT_VERSION`] for new
    /// segments).
    pub version: u32,
    /// The segment's index (0-based, contiguous).
    pub index: u64,
    /// Global position of the first event the segment may hold.
    pub first_position: u64,
    /// Hash of the last record of the previous segment (zeros for segment 0).
    pub prev_hash: Hash,
}

impl SegmentHeader {
    /// The header of a new segment, in this build's format version.
    pub fn new(index: u64, first_position: u64, prev_hash: Hash) -> Self {
        SegmentHeader { version: FORMAT_VERSION, index, first_position, prev_hash }
    }

    /// Whether records of this segment carry group-end marks (version 2 on).
    pub fn marks_groups(&self) -> bool {
        self.version >= 2
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        put(&mut b, 0, &SEGMENT_MAGIC);
        put(&mut b, 8, &self.version.to_le_bytes());
        put(&mut b, 12, &(SEGMENT_HEADER_LEN as u32).to_le_bytes());
        put(&mut b, 16, &self.index.to_le_bytes());
        put(&mut b, 24, &self.first_position.to_le_bytes());
        put(&mut b, 32, &self.prev_hash);
        let crc = crc32c::crc32c(b.get(..68).unwrap_or_default());
        put(&mut b, 68, &crc.to_le_bytes());
        b
    }

    /// Decodes and checks a header; the error says what is wrong.
    pub fn decode(b: &[u8]) -> Result<Self, String> {
        if b.len() < SEGMENT_HEADER_LEN {
            return Err(format!("segment header is {} bytes, expected {SEGMENT_HEADER_LEN}", b.len()));
        }
        if b.get(..8) != Some(&SEGMENT_MAGIC[..]) {
            return Err("not an Annals segment (bad magic)".into());
        }
        let crc = u32_at(b, 68);
        if crc32c::crc32c(b.get(..68).unwrap_or_default()) != crc {
            return Err("segment header checksum mismatch".into());
        }
        let version = u32_at(b, 8);
        if !(OLDEST_READ_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(format!(
                "segment format version {version} is not supported (this build reads \
                 {OLDEST_READ_VERSION} to {FORMAT_VERSION})"
            ));
        }
        let mut prev_hash = [0u8; HASH_LEN];
        prev_hash.copy_from_slice(b.get(32..64).unwrap_or(&[0u8; HASH_LEN]));
        Ok(SegmentHeader { version, index: u64_at(b, 16), first_position: u64_at(b, 24), prev_hash })
    }
}

/// The fixed fields of one record, borrowed from the bytes it was decoded
/// from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRecord<'a> {
    /// Total frame length.
    pub len: usize,
    /// Record kind (`KIND_*`).
    pub kind: u8,
    /// Flags (`FLAG_*`; always 0 in format version 1).
    pub flags: u16,
    /// In a group's last record: how many event records the group holds
    /// (0 elsewhere, and in format version 1).
    pub group_events: u32,
    /// In a group's last record: its [`group_tag`] (0 elsewhere).
    pub group_tag: u16,
    /// Content type code of the event data.
    pub content_type: u8,
    /// Global position (events); for deletes in format version 2, the
    /// position the next event takes (0 in version 1).
    pub position: u64,
    /// Stream version (events) or truncate-before (soft delete).
    pub version: u64,
    /// Commit time, microseconds since the epoch.
    pub recorded_at: i64,
    /// Event id bytes.
    pub id: [u8; 16],
    /// Stream name, UTF-8 checked.
    pub stream: &'a str,
    /// Event type, UTF-8 checked.
    pub event_type: &'a str,
    /// Correlation id copied out of the metadata at write time (may be empty).
    pub correlation: &'a str,
    /// Offset of the metadata bytes within the frame.
    pub metadata: (usize, usize),
    /// Offset and length of the data bytes within the frame.
    pub data: (usize, usize),
    /// The stored chained hash.
    pub hash: Hash,
}

/// Why bytes at a record boundary do not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// A zero length field: the written part of the segment ends here.
    End,
    /// The frame claims more bytes than are available (`needed` total).
    Incomplete {
        /// Total frame length the header claims (0 when even the length is cut).
        needed: usize,
    },
    /// The bytes are not a valid record.
    Invalid(String),
}

impl DecodeError {
    /// Human-readable reason.
    pub fn reason(&self) -> String {
        match self {
            DecodeError::End => "end of data".into(),
            DecodeError::Incomplete { needed } => format!("record cut short (frame claims {needed} bytes)"),
            DecodeError::Invalid(r) => r.clone(),
        }
    }
}

/// The fields needed to encode an event record.
pub struct EventFields<'a> {
    /// Global position.
    pub position: u64,
    /// Version in its stream.
    pub version: u64,
    /// Commit time.
    pub recorded_at: i64,
    /// Event id.
    pub id: [u8; 16],
    /// Content type code.
    pub content_type: u8,
    /// Stream name.
    pub stream: &'a str,
    /// Event type.
    pub event_type: &'a str,
    /// Correlation id (may be empty).
    pub correlation: &'a str,
    /// Metadata JSON bytes.
    pub metadata: &'a [u8],
    /// Data bytes.
    pub data: &'a [u8],
    /// `Some((event records in the group, its [`group_tag`]))` when this
    /// record ends its group (see [`mark_group_end`], which marks an encoded
    /// record afterwards).
    pub group_end: Option<(u32, u16)>,
}

/// Length of the frame an event record would take.
pub fn event_frame_len(f: &EventFields<'_>) -> usize {
    MIN_RECORD_LEN
        + f.stream.len()
        + f.event_type.len()
        + f.correlation.len()
        + f.metadata.len()
        + f.data.len()
}

/// Appends an encoded record to `out` and returns its hash. Fails only when
/// a field does not fit its length field.
pub fn encode_event(out: &mut Vec<u8>, prev: &Hash, f: &EventFields<'_>) -> Result<Hash, LogError> {
    let total = event_frame_len(f);
    let total32 = u32::try_from(total).map_err(|_| LogError::too_big("record", total))?;
    let stream_len =
        u16::try_from(f.stream.len()).map_err(|_| LogError::too_big("stream name", f.stream.len()))?;
    let type_len =
        u16::try_from(f.event_type.len()).map_err(|_| LogError::too_big("event type", f.event_type.len()))?;
    let meta_len =
        u32::try_from(f.metadata.len()).map_err(|_| LogError::too_big("metadata", f.metadata.len()))?;
    let data_len = u32::try_from(f.data.len()).map_err(|_| LogError::too_big("data", f.data.len()))?;
    let corr_len = u32::try_from(f.correlation.len())
        .map_err(|_| LogError::too_big("correlation id", f.correlation.len()))?;
    let start = out.len();
    out.reserve(total);
    out.extend_from_slice(&total32.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]); // crc, filled below
    out.push(KIND_EVENT);
    out.push(f.content_type);
    out.extend_from_slice(&stream_len.to_le_bytes());
    out.extend_from_slice(&type_len.to_le_bytes());
    let flags = f.group_end.map_or(0, |(_, tag)| end_flags(tag));
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&f.position.to_le_bytes());
    out.extend_from_slice(&f.version.to_le_bytes());
    out.extend_from_slice(&f.recorded_at.to_le_bytes());
    out.extend_from_slice(&f.id);
    out.extend_from_slice(&meta_len.to_le_bytes());
    out.extend_from_slice(&data_len.to_le_bytes());
    out.extend_from_slice(&corr_len.to_le_bytes());
    out.extend_from_slice(&f.group_end.map_or(0, |(events, _)| events).to_le_bytes());
    out.extend_from_slice(f.stream.as_bytes());
    out.extend_from_slice(f.event_type.as_bytes());
    out.extend_from_slice(f.correlation.as_bytes());
    out.extend_from_slice(f.metadata);
    out.extend_from_slice(f.data);
    Ok(seal(out, start, prev))
}

/// Appends an encoded stream-delete record (soft or tombstone);
/// `next_position` is the position the next event will take.
pub fn encode_delete(
    out: &mut Vec<u8>,
    prev: &Hash,
    kind: u8,
    stream: &str,
    truncate_before: u64,
    next_position: u64,
    recorded_at: i64,
) -> Result<Hash, LogError> {
    let total = MIN_RECORD_LEN + stream.len();
    let stream_len =
        u16::try_from(stream.len()).map_err(|_| LogError::too_big("stream name", stream.len()))?;
    let total32 = u32::try_from(total).map_err(|_| LogError::too_big("record", total))?;
    let start = out.len();
    out.extend_from_slice(&total32.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.push(kind);
    out.push(0);
    out.extend_from_slice(&stream_len.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    out.extend_from_slice(&next_position.to_le_bytes());
    out.extend_from_slice(&truncate_before.to_le_bytes());
    out.extend_from_slice(&recorded_at.to_le_bytes());
    out.extend_from_slice(&[0u8; 16]);
    out.extend_from_slice(&[0u8; 16]);
    out.extend_from_slice(stream.as_bytes());
    Ok(seal(out, start, prev))
}

/// Marks the encoded record `frame` (whole, hash included) as the last of
/// its group, which holds `group_events` event records and has the
/// [`group_tag`] `tag`, and seals it again: returns its new hash (`prev` is
/// the hash of the record before it).
pub fn mark_group_end(frame: &mut [u8], prev: &Hash, group_events: u32, tag: u16) -> Hash {
    let flags = end_flags(tag);
    put(frame, 14, &flags.to_le_bytes());
    put(frame, 68, &group_events.to_le_bytes());
    let hash = chain_hash(prev, hashed_body(frame));
    let at = frame.len().saturating_sub(HASH_LEN);
    put(frame, at, &hash);
    let crc = crc32c::crc32c(frame.get(8..).unwrap_or_default());
    put(frame, 4, &crc.to_le_bytes());
    hash
}

/// The position of the first event of the group that `raw`, a group's last
/// record, closes (the next event's position when the group holds none);
/// `None` when its event count cannot be right.
pub fn group_first_position(raw: &RawRecord<'_>) -> Option<u64> {
    let after = if raw.kind == KIND_EVENT { raw.position.checked_add(1)? } else { raw.position };
    after.checked_sub(u64::from(raw.group_events))
}

/// Appends the chained hash and fills in the CRC of the record that starts
/// at `start` in `out`.
fn seal(out: &mut Vec<u8>, start: usize, prev: &Hash) -> Hash {
    let hash = chain_hash(prev, out.get(start + 8..).unwrap_or_default());
    out.extend_from_slice(&hash);
    let crc = crc32c::crc32c(out.get(start + 8..).unwrap_or_default());
    if let Some(slot) = out.get_mut(start + 4..start + 8) {
        slot.copy_from_slice(&crc.to_le_bytes());
    }
    hash
}

/// The chained hash of a record: BLAKE3 over the previous record's hash and
/// this record's bytes from its kind field up to (not including) the hash.
pub fn chain_hash(prev: &Hash, body: &[u8]) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(prev);
    h.update(body);
    *h.finalize().as_bytes()
}

/// Decodes the record at the start of `b`, checking framing, CRC and field
/// sanity (not the hash chain, which needs the previous record).
pub fn decode(b: &[u8]) -> Result<RawRecord<'_>, DecodeError> {
    if b.len() < 4 {
        return if b.iter().all(|&x| x == 0) {
            Err(DecodeError::End)
        } else {
            Err(DecodeError::Incomplete { needed: 0 })
        };
    }
    let len = u32_at(b, 0) as usize;
    if len == 0 {
        return Err(DecodeError::End);
    }
    if len < MIN_RECORD_LEN {
        return Err(DecodeError::Invalid(format!(
            "record length {len} is below the minimum {MIN_RECORD_LEN}"
        )));
    }
    let Some(frame) = b.get(..len) else {
        return Err(DecodeError::Incomplete { needed: len });
    };
    let crc = u32_at(frame, 4);
    if crc32c::crc32c(frame.get(8..).unwrap_or_default()) != crc {
        return Err(DecodeError::Invalid("record checksum (CRC32C) mismatch".into()));
    }
    let kind = frame.get(8).copied().unwrap_or(0);
    if !matches!(kind, KIND_EVENT | KIND_SOFT_DELETE | KIND_TOMBSTONE) {
        return Err(DecodeError::Invalid(format!("unknown record kind {kind}")));
    }
    let content_type = frame.get(9).copied().unwrap_or(0);
    let flags = u16_at(frame, 14);
    if flags & FLAG_GROUP_END == 0 && flags != 0 {
        return Err(DecodeError::Invalid(format!("unknown record flags {flags:#06x}")));
    }
    let group_events = u32_at(frame, 68);
    if flags & FLAG_GROUP_END == 0 && group_events != 0 {
        return Err(DecodeError::Invalid("a group's event count outside its last record".into()));
    }
    let stream_len = u16_at(frame, 10) as usize;
    let type_len = u16_at(frame, 12) as usize;
    let meta_len = u32_at(frame, 56) as usize;
    let data_len = u32_at(frame, 60) as usize;
    let corr_len = u32_at(frame, 64) as usize;
    let var = stream_len + type_len + corr_len + meta_len + data_len;
    if MIN_RECORD_LEN.checked_add(var) != Some(len) {
        return Err(DecodeError::Invalid(format!(
            "record field lengths ({var} bytes) disagree with its frame length {len}"
        )));
    }
    let mut at = RECORD_HEADER_LEN;
    let mut take = |n: usize| {
        let r = (at, n);
        at += n;
        r
    };
    let s = take(stream_len);
    let t = take(type_len);
    let c = take(corr_len);
    let metadata = take(meta_len);
    let data = take(data_len);
    let text = |(o, n): (usize, usize), what: &str| {
        frame
            .get(o..o + n)
            .and_then(|x| std::str::from_utf8(x).ok())
            .ok_or_else(|| DecodeError::Invalid(format!("record {what} is not UTF-8")))
    };
    let mut id = [0u8; 16];
    id.copy_from_slice(frame.get(40..56).unwrap_or(&[0u8; 16]));
    let mut hash = [0u8; HASH_LEN];
    hash.copy_from_slice(frame.get(len - HASH_LEN..).unwrap_or(&[0u8; HASH_LEN]));
    Ok(RawRecord {
        len,
        kind,
        flags,
        group_events,
        group_tag: flags >> 1,
        content_type,
        position: u64_at(frame, 16),
        version: u64_at(frame, 24),
        recorded_at: i64::from_le_bytes(arr8(frame, 32)),
        id,
        stream: text(s, "stream name")?,
        event_type: text(t, "event type")?,
        correlation: text(c, "correlation id")?,
        metadata,
        data,
        hash,
    })
}

/// The bytes a record's hash covers (from its kind field to before the hash).
pub fn hashed_body(frame: &[u8]) -> &[u8] {
    frame.get(8..frame.len().saturating_sub(HASH_LEN)).unwrap_or_default()
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    if let Some(slot) = b.get_mut(at..at + v.len()) {
        slot.copy_from_slice(v);
    }
}

fn arr8(b: &[u8], at: usize) -> [u8; 8] {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    a
}

/// Little-endian `u64` at `at` (0 when out of range).
pub fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(arr8(b, at))
}

/// Little-endian `u32` at `at` (0 when out of range).
pub fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

pub(crate) fn u16_at(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    if let Some(s) = b.get(at..at + 2) {
        a.copy_from_slice(s);
    }
    u16::from_le_bytes(a)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
mod tests {
    use super::*;

    fn fields<'a>(stream: &'a str, data: &'a [u8]) -> EventFields<'a> {
        EventFields {
            position: 7,
            version: 3,
            recorded_at: 1_700_000_000_000_000,
            id: [9; 16],
            content_type: 0,
            stream,
            event_type: "Opened",
            correlation: "c-1",
            metadata: b"{\"correlation_id\":\"c-1\"}",
            data,
            group_end: None,
        }
    }

    #[test]
    fn event_round_trips_and_chains() {
        let mut out = Vec::new();
        let h1 = encode_event(&mut out, &[0; 32], &fields("account-1", b"{\"a\":1}")).unwrap();
        let r = decode(&out).unwrap();
        assert_eq!(r.len, out.len());
        assert_eq!(
            (r.position, r.version, r.stream, r.event_type, r.correlation),
            (7, 3, "account-1", "Opened", "c-1")
        );
        assert_eq!(&out[r.data.0..r.data.0 + r.data.1], b"{\"a\":1}");
        assert_eq!(r.hash, h1);
        assert_eq!(chain_hash(&[0; 32], hashed_body(&out)), h1);
        assert_ne!(chain_hash(&[1; 32], hashed_body(&out)), h1);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let mut out = Vec::new();
        encode_event(&mut out, &[0; 32], &fields("s-1", b"{}")).unwrap();
        for i in 0..out.len() {
            let mut bad = out.clone();
            bad[i] ^= 0x40;
            assert!(decode(&bad).is_err(), "flip at {i} went unnoticed");
        }
    }

    #[test]
    fn a_group_end_mark_reseals_the_record() {
        let mut out = Vec::new();
        let h1 = encode_event(&mut out, &[1; 32], &fields("s-1", b"{}")).unwrap();
        let plain = decode(&out).unwrap();
        assert_eq!((plain.flags, plain.group_events), (0, 0));
        let h2 = mark_group_end(&mut out, &[1; 32], 3, group_tag(&[0xab; 32]));
        assert_ne!(h1, h2);
        let r = decode(&out).unwrap();
        assert_eq!((r.flags & FLAG_GROUP_END, r.group_events, r.hash), (FLAG_GROUP_END, 3, h2));
        assert_eq!(r.group_tag, 0x2bab);
        assert_eq!(chain_hash(&[1; 32], hashed_body(&out)), h2);
        assert_eq!(group_first_position(&r), Some(5)); // positions 5, 6, 7
        // Marked while encoding: the same bytes.
        let mut direct = Vec::new();
        encode_event(
            &mut direct,
            &[1; 32],
            &EventFields { group_end: Some((3, 0x2bab)), ..fields("s-1", b"{}") },
        )
        .unwrap();
        assert_eq!(direct, out);
        // Flag bits without the mark, or a count without the mark, do not decode.
        let mut bad = out.clone();
        bad[14..16].copy_from_slice(&2u16.to_le_bytes());
        let crc = crc32c::crc32c(&bad[8..]);
        bad[4..8].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode(&bad), Err(DecodeError::Invalid(r)) if r.contains("flags")));
        let mut bad = out.clone();
        bad[14..16].copy_from_slice(&0u16.to_le_bytes());
        let crc = crc32c::crc32c(&bad[8..]);
        bad[4..8].copy_from_slice(&crc.to_le_bytes());
        assert!(matches!(decode(&bad), Err(DecodeError::Invalid(r)) if r.contains("count")));
    }

    #[test]
    fn truncation_and_zeros() {
        let mut out = Vec::new();
        encode_event(&mut out, &[0; 32], &fields("s-1", b"{}")).unwrap();
        assert!(matches!(decode(&out[..out.len() - 1]), Err(DecodeError::Incomplete { .. })));
        assert_eq!(decode(&[0u8; 16]), Err(DecodeError::End));
        assert_eq!(decode(&[]), Err(DecodeError::End));
    }

    #[test]
    fn header_round_trips() {
        let h = SegmentHeader::new(4, 99, [5; 32]);
        let b = h.encode();
        assert_eq!(SegmentHeader::decode(&b).unwrap(), h);
        let v1 = SegmentHeader { version: 1, ..h };
        assert_eq!(SegmentHeader::decode(&v1.encode()).unwrap(), v1);
        assert!(!v1.marks_groups() && h.marks_groups());
        let v3 = SegmentHeader { version: 3, ..h };
        assert!(SegmentHeader::decode(&v3.encode()).unwrap_err().contains("version 3"));
        let mut bad = b;
        bad[20] ^= 1;
        assert!(SegmentHeader::decode(&bad).is_err());
    }

    #[test]
    fn locations_pack() {
        assert_eq!(unpack_loc(pack_loc(12, 123_456_789)), (12, 123_456_789));
    }
}
