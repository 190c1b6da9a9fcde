//! Recovery from states on disk that a crash (or a bit flip) leaves behind,
//! modelled byte by byte: torn groups must vanish whole, damage to
//! acknowledged records must be refused, never truncated away. Most of them
//! were found by review on 2026-12-02 and failed until group-end marks
//! (format version 2).
#![allow(clippy::unwrap_used, missing_docs)]
mod common;

use annals_core::{AllReader, Appender, CheckpointStore, ExpectedVersion, ReadAll, ReadStream, StreamReader};
use annals_log::LogStore;

use common::*;

/// A crash that tears a multi-event append (one `write` of the group) keeps a
/// prefix of it: the append was never acknowledged, yet half of it survives.
#[tokio::test]
async fn a_torn_group_write_vanishes_whole() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.append(&stream("acct-1"), ExpectedVersion::NoStream, (0..10).map(ev).collect()).await.unwrap();
        store.close().unwrap();
    }
    // Model the crash: no checkpoint, and only a prefix of the group's
    // single write reached the disk (cut inside the 6th record).
    std::fs::remove_file(dir.path().join("index.bin")).unwrap();
    let bytes = std::fs::read(seg(dir.path(), 0)).unwrap();
    let offs = record_offsets(&bytes);
    std::fs::write(seg(dir.path(), 0), &bytes[..offs[5] as usize + 20]).unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    let got = store.read_stream(&stream("acct-1"), ReadStream::forward()).await.unwrap_or_default();
    // The retry of the unacknowledged append now fails too.
    let retry = store.append(&stream("acct-1"), ExpectedVersion::NoStream, (0..10).map(ev).collect()).await;
    assert!(
        got.is_empty() || got.len() == 10,
        "atomic append torn: {} of 10 events survived; retry = {retry:?}",
        got.len()
    );
}

/// Same, deterministic ordering: at rollover the writer fdatasyncs the old
/// segment (holding the first part of the group) before the next segment
/// exists. A crash right there recovers part of a multi-stream transaction.
#[tokio::test]
async fn a_crash_at_rollover_keeps_no_part_of_a_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let segs;
    {
        let store = LogStore::builder(dir.path()).segment_size(4096).open().unwrap();
        for i in 0..20 {
            store.append(&stream("fill-1"), ExpectedVersion::Any, vec![ev(i)]).await.unwrap();
        }
        let before = store.stats().segments;
        // One append of 40 events: it must straddle a segment boundary.
        store.append(&stream("tx-1"), ExpectedVersion::NoStream, (0..40).map(ev).collect()).await.unwrap();
        segs = store.stats().segments;
        assert!(segs > before);
        store.close().unwrap();
    }
    // Crash state: old segment synced, the next one never created.
    std::fs::remove_file(dir.path().join("index.bin")).unwrap();
    std::fs::remove_file(seg(dir.path(), segs as u64 - 1)).unwrap();
    let store = LogStore::builder(dir.path()).segment_size(4096).open().unwrap();
    let got = store.read_stream(&stream("tx-1"), ReadStream::forward()).await.unwrap_or_default();
    assert!(
        got.is_empty() || got.len() == 40,
        "atomic append torn at rollover: {} of 40 survived",
        got.len()
    );
}

/// A closed store of 100 single-event appends whose checkpoint (index.bin)
/// is gone, as after a crash: its directory, its one segment's path, bytes
/// and record offsets.
async fn hundred_events_without_a_checkpoint() -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>, Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LogStore::open(dir.path()).unwrap();
        for i in 0..100 {
            store.append(&stream("s-1"), ExpectedVersion::Any, vec![ev(i)]).await.unwrap();
        }
        store.close().unwrap();
    }
    let (path, bytes, offs) = without_checkpoint(dir.path());
    (dir, path, bytes, offs)
}

/// A flipped bit in the length field of an acknowledged record in the last
/// segment (no checkpoint, e.g. after a crash) is taken for a torn tail: open
/// silently truncates every acknowledged record after it.
#[tokio::test]
async fn corrupt_length_mid_segment_silently_drops_acknowledged_records() {
    let (dir, path, mut bytes, offs) = hundred_events_without_a_checkpoint().await;
    bytes[offs[50] as usize + 3] ^= 0x40; // high byte of `len`
    std::fs::write(&path, &bytes).unwrap();
    let r = LogStore::open(dir.path());
    match r {
        Err(e) => assert!(matches!(e, annals_log::LogError::Corrupt { position: Some(50), .. }), "{e}"),
        Ok(store) => {
            let n = store.read_all(ReadAll::forward(1000)).await.unwrap().events.len();
            panic!(
                "opened, {n} of 100 acknowledged events left; truncated = {:?}",
                store.stats().truncated_on_open
            );
        }
    }
}

/// The same with a small over-claim near the end of the data: a flipped
/// bit makes the length of an acknowledged record reach just past the last
/// records into the zero-filled space; the records it covers are intact,
/// so this is damage, not a torn write.
#[tokio::test]
async fn a_small_over_claim_near_the_end_is_corruption_not_a_torn_tail() {
    let (dir, path, mut bytes, offs) = hundred_events_without_a_checkpoint().await;
    bytes[offs[95] as usize + 1] ^= 0x10; // +4096 bytes: past the last four records
    std::fs::write(&path, &bytes).unwrap();
    let err = LogStore::open(dir.path()).expect_err("opened by dropping acknowledged records");
    assert!(matches!(err, annals_log::LogError::Corrupt { position: Some(95), .. }), "{err}");
}

/// A closed store that saved checkpoint "a" (1), "b" (1), then "a" (500):
/// its directory, the path of its kv.log and the file's bytes.
async fn three_checkpoint_saves() -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.save_checkpoint("a", 1).await.unwrap();
        store.save_checkpoint("b", 1).await.unwrap();
        store.save_checkpoint("a", 500).await.unwrap();
        store.close().unwrap();
    }
    let kv = dir.path().join("kv.log");
    let bytes = std::fs::read(&kv).unwrap();
    (dir, kv, bytes)
}

/// One damaged record in kv.log silently and permanently drops every later
/// checkpoint write (compaction rewrites the file) and the checkpoint
/// regresses to an older value.
#[tokio::test]
async fn kv_mid_file_corruption_regresses_checkpoints() {
    let (dir, kv, mut bytes) = three_checkpoint_saves().await;
    // Damage the second record ("b").
    let first_len = u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize;
    bytes[first_len + 10] ^= 0x01;
    std::fs::write(&kv, &bytes).unwrap();
    let store = LogStore::open(dir.path()).expect("the record after the damaged one is intact");
    let a = store.load_checkpoint("a").await.unwrap();
    assert_eq!(a, Some(500), "checkpoint 'a' regressed to {a:?} with no error");
}

/// A damaged length field in the middle of `kv.log` leaves nothing to
/// resume from: open refuses with a typed error instead of compacting every
/// later record away.
#[tokio::test]
async fn kv_mid_file_damage_with_no_way_past_it_refuses_to_open() {
    let (dir, kv, mut bytes) = three_checkpoint_saves().await;
    let first_len = u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize;
    bytes[first_len] ^= 0x03; // the second record's length
    std::fs::write(&kv, &bytes).unwrap();
    let err = LogStore::open(dir.path()).expect_err("a damaged kv.log opened");
    assert!(matches!(err, annals_log::LogError::KvCorrupt { .. }), "{err}");
    assert_eq!(std::fs::read(&kv).unwrap(), bytes, "kv.log was rewritten");
}

/// A flipped high bit in the length field of the *first* record of
/// `kv.log` makes it claim far past the end of the file. Nothing follows
/// "where it claims to end", yet intact records sit inside the range it
/// claims: an acknowledged record damaged, not a torn last write. Open
/// must not take it for a torn tail and compact every later record away.
#[tokio::test]
async fn kv_damaged_length_claiming_past_the_file_end_is_not_a_torn_tail() {
    let (dir, kv, mut bytes) = three_checkpoint_saves().await;
    bytes[3] ^= 0x40; // high byte of the first record's length
    std::fs::write(&kv, &bytes).unwrap();
    match LogStore::open(dir.path()) {
        Err(e) => {
            assert!(matches!(e, annals_log::LogError::KvCorrupt { offset: 0, .. }), "{e}");
            assert_eq!(std::fs::read(&kv).unwrap(), bytes, "kv.log was rewritten");
        }
        Ok(store) => {
            let (a, b) =
                (store.load_checkpoint("a").await.unwrap(), store.load_checkpoint("b").await.unwrap());
            panic!("opened with checkpoints a = {a:?}, b = {b:?} (were 500 and 1)");
        }
    }
}

/// A torn last kv.log write (its length landed, the rest of the record
/// did not) is still dropped, with every record before it kept.
#[tokio::test]
async fn kv_torn_last_record_is_dropped() {
    let (dir, kv, bytes) = three_checkpoint_saves().await;
    let first = u32::from_le_bytes(bytes[0..4].try_into().unwrap()) as usize;
    let second = u32::from_le_bytes(bytes[first..first + 4].try_into().unwrap()) as usize;
    // Only the first two records, then the start of a large snapshot record.
    let mut torn = bytes[..first + second].to_vec();
    torn.extend_from_slice(&(1u32 << 20).to_le_bytes());
    torn.extend_from_slice(&[0x5a; 300]);
    std::fs::write(&kv, &torn).unwrap();
    let store = LogStore::open(dir.path()).expect("a torn kv.log tail refused");
    assert!(store.load_checkpoint("a").await.unwrap().is_some());
    assert!(store.load_checkpoint("b").await.unwrap().is_some());
}

/// Page cache flushes are not ordered: after a crash, a later page of an
/// unacknowledged group can be on disk while an earlier one is not. Open
/// then refuses (Corrupt) instead of truncating the unacknowledged tail.
#[tokio::test]
async fn a_hole_in_an_unacknowledged_group_is_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.append(&stream("ok-1"), ExpectedVersion::NoStream, vec![ev(0)]).await.unwrap();
        store.append(&stream("acct-1"), ExpectedVersion::NoStream, (0..10).map(ev).collect()).await.unwrap();
        store.close().unwrap();
    }
    std::fs::remove_file(dir.path().join("index.bin")).unwrap();
    let mut bytes = std::fs::read(seg(dir.path(), 0)).unwrap();
    let offs = record_offsets(&bytes);
    // The second group (records 1..=10) was unacknowledged; its middle never landed.
    for b in &mut bytes[offs[3] as usize..offs[7] as usize] {
        *b = 0;
    }
    std::fs::write(seg(dir.path(), 0), &bytes).unwrap();
    let store = LogStore::open(dir.path()).expect("open refused a torn unacknowledged tail");
    let all = store.read_all(ReadAll::forward(100)).await.unwrap().events;
    assert_eq!(all.len(), 1, "only the acknowledged first append survives");
    assert_eq!(all[0].stream.as_str(), "ok-1");
    assert!(store.stats().truncated_on_open.is_some_and(|b| b.torn_tail && b.cut_position == 1));
    // The retry of the lost append writes it whole.
    store.append(&stream("acct-1"), ExpectedVersion::NoStream, (0..10).map(ev).collect()).await.unwrap();
    assert_eq!(store.read_stream(&stream("acct-1"), ReadStream::forward()).await.unwrap().len(), 10);
    store.close().unwrap();
    assert!(annals_log::verify(dir.path()).unwrap().is_ok());
}

/// A closed store holding one append of ten events (records 0..=9) and,
/// after it, one append of each size in `later`, without its checkpoint:
/// its directory, its one segment's path, bytes and record offsets.
async fn a_group_then(later: &[u64]) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>, Vec<u64>) {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = LogStore::open(dir.path()).unwrap();
        store.append(&stream("acct-1"), ExpectedVersion::NoStream, (0..10).map(ev).collect()).await.unwrap();
        for &n in later {
            store.append(&stream("s-1"), ExpectedVersion::Any, (0..n).map(ev).collect()).await.unwrap();
        }
        store.close().unwrap();
    }
    let (path, bytes, offs) = without_checkpoint(dir.path());
    (dir, path, bytes, offs)
}

/// A hole in an acknowledged group with a later group after it is damage:
/// the later group was only written after this one was synced. (Both with
/// a later group of one event, whose end mark closes another group, and of
/// three, whose first record follows this group's end mark.)
#[tokio::test]
async fn a_hole_in_a_group_followed_by_a_later_one_is_corruption() {
    for later in [1, 3] {
        let (dir, path, mut bytes, offs) = a_group_then(&[later]).await;
        bytes[offs[3] as usize..offs[7] as usize].fill(0);
        std::fs::write(&path, &bytes).unwrap();
        let err = LogStore::open(dir.path()).expect_err("opened by dropping two acknowledged appends");
        assert!(matches!(err, annals_log::LogError::Corrupt { position: Some(3), .. }), "{later}: {err}");
        assert_eq!(std::fs::read(&path).unwrap(), bytes, "the segment was changed");
    }
    // Also when the later group's own end mark is damaged: its first record
    // follows this group's intact end mark.
    let (dir, path, mut bytes, offs) = a_group_then(&[3]).await;
    bytes[offs[3] as usize..offs[7] as usize].fill(0);
    bytes[offs[12] as usize + 90] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let err = LogStore::open(dir.path()).expect_err("opened by dropping two acknowledged appends");
    assert!(matches!(err, annals_log::LogError::Corrupt { position: Some(3), .. }), "{err}");
}

/// Damage to the last record of an acknowledged group (its end mark) with a
/// single-event group after it: the mark found after the damage closes a
/// later group, so the damaged one was synced.
#[tokio::test]
async fn a_damaged_end_mark_followed_by_a_later_group_is_corruption() {
    let (dir, path, mut bytes, offs) = a_group_then(&[1]).await;
    bytes[offs[9] as usize + 90] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let err = LogStore::open(dir.path()).expect_err("opened by dropping two acknowledged appends");
    assert!(matches!(err, annals_log::LogError::Corrupt { position: Some(9), .. }), "{err}");
}

/// The same damage to the last group of the log, nothing after it: that is
/// what a torn write of the group looks like, and it goes whole.
#[tokio::test]
async fn a_damaged_last_group_goes_whole() {
    let (dir, path, mut bytes, offs) = a_group_then(&[]).await;
    bytes[offs[4] as usize + 90] ^= 0x01;
    std::fs::write(&path, &bytes).unwrap();
    let store = LogStore::open(dir.path()).unwrap();
    assert_eq!(store.read_all(ReadAll::forward(100)).await.unwrap().events.len(), 0);
    assert_eq!(
        store.stats().truncated_on_open.map(|b| (b.position, b.torn_tail, b.cut_position)),
        Some((4, true, 0))
    );
}

/// A group written across a rollover whose end never reached the new
/// segment: the old segment is cut back to the group's start and the new
/// one removed.
#[tokio::test]
async fn a_group_cut_short_in_the_next_segment_is_removed_from_both() {
    let dir = tempfile::tempdir().unwrap();
    let (before, segs);
    {
        let store = LogStore::builder(dir.path()).segment_size(4096).open().unwrap();
        for i in 0..20 {
            store.append(&stream("fill-1"), ExpectedVersion::Any, vec![ev(i)]).await.unwrap();
        }
        before = store.stats().segments;
        store.append(&stream("tx-1"), ExpectedVersion::NoStream, (0..40).map(ev).collect()).await.unwrap();
        segs = store.stats().segments;
        store.close().unwrap();
    }
    assert!(segs > before);
    std::fs::remove_file(dir.path().join("index.bin")).unwrap();
    // The group's last record (its end mark) never landed.
    let last = seg(dir.path(), segs as u64 - 1);
    let mut bytes = std::fs::read(&last).unwrap();
    let offs = record_offsets(&bytes);
    let end = offs.last().copied().unwrap() as usize;
    bytes[end..].fill(0);
    std::fs::write(&last, &bytes).unwrap();
    let store = LogStore::builder(dir.path()).segment_size(4096).open().unwrap();
    let all = store.read_all(ReadAll::forward(1000)).await.unwrap().events;
    assert_eq!(all.len(), 20, "only the twenty acknowledged fill events survive");
    assert!(all.iter().all(|e| e.stream.as_str() == "fill-1"));
    assert_eq!(store.stats().segments, before, "the segments the group reached are gone");
    store.append(&stream("tx-1"), ExpectedVersion::NoStream, (0..40).map(ev).collect()).await.unwrap();
    store.close().unwrap();
    assert!(annals_log::verify(dir.path()).unwrap().is_ok());
    let store = LogStore::builder(dir.path()).segment_size(4096).open().unwrap();
    assert_eq!(store.read_stream(&stream("tx-1"), ReadStream::forward()).await.unwrap().len(), 40);
}
