//! Helpers shared by the tests that model damaged or torn logs byte by byte.
#![allow(dead_code, clippy::unwrap_used, clippy::indexing_slicing)]
use std::path::{Path, PathBuf};

use annals_core::{EventData, StreamName};
use annals_log::format::{self, SEGMENT_HEADER_LEN};
use serde_json::json;

pub fn stream(name: &str) -> StreamName {
    StreamName::new(name).unwrap()
}

/// A small JSON event numbered `n`.
pub fn ev(n: u64) -> EventData {
    EventData::json("E", &json!({ "n": n, "pad": "x".repeat(40) })).unwrap()
}

/// The path of segment `i` in `dir`.
pub fn seg(dir: &Path, i: u64) -> PathBuf {
    dir.join(format!("{i:020}.seg"))
}

/// Offsets of the records of a segment's bytes, up to the first that does
/// not decode.
pub fn record_offsets(bytes: &[u8]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut off = SEGMENT_HEADER_LEN;
    while let Ok(r) = format::decode(&bytes[off..]) {
        out.push(off as u64);
        off += r.len;
    }
    out
}

/// A closed store's state after a crash that lost its index checkpoint:
/// removes `index.bin` and returns segment 0's path, bytes and record
/// offsets.
pub fn without_checkpoint(dir: &Path) -> (PathBuf, Vec<u8>, Vec<u64>) {
    std::fs::remove_file(dir.join("index.bin")).unwrap();
    let path = seg(dir, 0);
    let bytes = std::fs::read(&path).unwrap();
    let offs = record_offsets(&bytes);
    (path, bytes, offs)
}

/// Copies the files of one directory into another.
pub fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}
