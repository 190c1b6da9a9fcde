//! Arbitrary bytes through the record and segment-header decoders: they
//! must never panic, and whatever decodes must be self-consistent.
#![no_main]

use annals_log::format::{self, SegmentHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = format::decode(data) {
        assert!(r.len >= format::MIN_RECORD_LEN && r.len <= data.len());
        let (mo, ml) = r.metadata;
        let (d_o, dl) = r.data;
        assert!(mo + ml <= r.len && d_o + dl <= r.len);
        let frame = &data[..r.len];
        // Re-hashing the body is what the chain check does; it must not panic.
        let _ = format::chain_hash(&[0u8; 32], format::hashed_body(frame));
    }
    if let Ok(h) = SegmentHeader::decode(data) {
        assert_eq!(SegmentHeader::decode(&h.encode()), Ok(h));
    }
});
