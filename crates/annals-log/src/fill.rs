//! Zero-fills the active segment ahead of the writer, on its own thread.
//!
//! `fdatasync` on a file whose blocks are already allocated and whose size
//! does not change is markedly cheaper than on a growing file, so a helper
//! thread keeps a zero-filled (and fsynced) region ahead of the write head.
//! The two threads never write the same bytes: the writer announces the
//! range it is about to write (`reserve`) and waits only if that range
//! overlaps the one step (1 MiB) being filled at that moment; the filler
//! only ever starts above everything reserved.

use std::{
    sync::{Arc, Condvar, Mutex, MutexGuard},
    thread::JoinHandle,
};

use crate::{
    core::{Core, segment_file_name},
    format::SEGMENT_HEADER_LEN,
    io::IoFile,
};

const STEP: u64 = 1 << 20;
const MIN_AHEAD: u64 = 1 << 20;
const MAX_AHEAD: u64 = 32 << 20;
static ZEROS: [u8; 1 << 16] = [0u8; 1 << 16];

struct State {
    segment: u64,
    file: Arc<dyn IoFile>,
    limit: u64,
    /// Zero-filled and synced up to here (or the file's length).
    filled: u64,
    /// The writer has written, or is writing, up to here.
    reserved: u64,
    /// The range being filled right now.
    busy: Option<(u64, u64)>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    cv: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Handle to the filler thread (or a no-op when disabled).
pub(crate) struct Filler {
    shared: Option<Arc<Shared>>,
    handle: Option<JoinHandle<()>>,
    core: Option<Arc<Core>>,
}

/// The filler's own open file of `segment`, so that a writeback error is
/// reported to the writer's `fdatasync` too: Linux reports one to each
/// open file once, and a shared one would let the filler's fsync take the
/// report the writer needs. The writer's file when it cannot be opened.
fn own_file(core: &Core, segment: u64, writers: &Arc<dyn IoFile>) -> Arc<dyn IoFile> {
    match core.io.open(&core.dir.join(segment_file_name(segment)), false) {
        Ok(file) => file,
        Err(e) => {
            tracing::warn!(error = %e, segment, "annals-log: zero-fill shares the writer's file");
            writers.clone()
        }
    }
}

impl Filler {
    /// A filler that does nothing (files simply grow).
    pub(crate) fn disabled() -> Self {
        Filler { shared: None, handle: None, core: None }
    }

    /// Starts filling `file` (segment `segment`, currently `len` bytes long,
    /// data up to `end`) up to `limit`.
    pub(crate) fn start(
        core: Arc<Core>,
        segment: u64,
        file: Arc<dyn IoFile>,
        len: u64,
        end: u64,
        limit: u64,
    ) -> Self {
        let file = own_file(&core, segment, &file);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                segment,
                file,
                limit,
                filled: len,
                reserved: end,
                busy: None,
                stop: false,
            }),
            cv: Condvar::new(),
        });
        let s = shared.clone();
        let c = core.clone();
        let handle = std::thread::Builder::new().name("annals-log-fill".into()).spawn(move || run(&s, &c));
        match handle {
            Ok(h) => Filler { shared: Some(shared), handle: Some(h), core: Some(core) },
            Err(e) => {
                tracing::warn!(error = %e, "annals-log: no zero-fill thread; segments will grow as written");
                Filler::disabled()
            }
        }
    }

    /// Announces that the writer is about to write `[from, to)` of
    /// `segment`; waits only while that range is being zero-filled.
    pub(crate) fn reserve(&self, segment: u64, file: &Arc<dyn IoFile>, from: u64, to: u64) {
        let (Some(shared), Some(core)) = (&self.shared, &self.core) else { return };
        let mut st = shared.lock();
        if st.segment != segment {
            drop(st);
            let own = own_file(core, segment, file);
            st = shared.lock();
            while st.busy.is_some() {
                st = shared.cv.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            st.segment = segment;
            st.file = own;
            st.filled = from;
            st.reserved = from;
        }
        while st.busy.is_some_and(|(f, t)| to > f && from < t) {
            st = shared.cv.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        st.reserved = st.reserved.max(to);
        drop(st);
        shared.cv.notify_all();
    }

    /// Stops and joins the thread.
    pub(crate) fn stop(&mut self) {
        if let Some(shared) = &self.shared {
            shared.lock().stop = true;
            shared.cv.notify_all();
        }
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Filler {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(shared: &Shared, core: &Core) {
    let mut st = shared.lock();
    loop {
        if st.stop || core.poisoned().is_some() {
            return;
        }
        let written = st.reserved.saturating_sub(SEGMENT_HEADER_LEN as u64);
        let ahead = (written / 4).clamp(MIN_AHEAD, MAX_AHEAD);
        let from = st.filled.max(st.reserved);
        if from >= st.limit || st.filled >= st.reserved.saturating_add(ahead) {
            st = shared.cv.wait(st).unwrap_or_else(std::sync::PoisonError::into_inner);
            continue;
        }
        let to = (from + STEP).min(st.limit);
        let (segment, file) = (st.segment, st.file.clone());
        st.busy = Some((from, to));
        drop(st);
        let result = fill(&*file, from, to);
        st = shared.lock();
        st.busy = None;
        match result {
            Ok(()) if st.segment == segment => st.filled = to,
            Ok(()) => {}
            Err(e) => {
                core.set_poisoned(format!("zero-filling segment {segment} failed: {e}"));
                st.stop = true;
            }
        }
        shared.cv.notify_all();
    }
}

fn fill(file: &dyn IoFile, from: u64, to: u64) -> std::io::Result<()> {
    let mut at = from;
    while at < to {
        let n = usize::try_from(to - at).unwrap_or(usize::MAX).min(ZEROS.len());
        file.write_at(ZEROS.get(..n).unwrap_or_default(), at)?;
        at += n as u64;
    }
    // The size changed: a full fsync, so later fdatasyncs need no metadata.
    file.sync_all()
}
