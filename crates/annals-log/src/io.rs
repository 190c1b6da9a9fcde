//! All file I/O goes through [`Io`] and [`IoFile`], so tests can swap the real
//! file system for [`FaultIo`], which fails a chosen write or fsync and can
//! simulate a crash that keeps only synced bytes.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    fs::{File, OpenOptions},
    io,
    os::unix::fs::FileExt,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use crate::error::LogError;

/// One open file.
///
/// # Atomicity
/// A `write_at` may be torn by a crash: any prefix of it (and, on real
/// hardware after power loss, any subset of its pages) may survive. Only
/// bytes covered by a successful `sync_data`/`sync_all` are durable.
#[expect(clippy::len_without_is_empty, reason = "a file length, not a collection")]
pub trait IoFile: Send + Sync {
    /// Reads at `offset`; returns how many bytes were read (0 at EOF).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`, growing the file if needed.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes written data durable (fdatasync).
    fn sync_data(&self) -> io::Result<()>;
    /// Makes data and metadata (size) durable (fsync).
    fn sync_all(&self) -> io::Result<()>;
    /// Current length.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends (with zeros).
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Whether the file has been removed from its directory while open
    /// (no name links to it any more): its bytes then vanish when it is
    /// closed, so nothing written to it may be acknowledged. Default: never.
    fn is_unlinked(&self) -> io::Result<bool> {
        Ok(false)
    }
}

/// A file system: opening files and the few directory operations the log
/// needs.
pub trait Io: Send + Sync {
    /// Opens a file for reading and writing, creating it when `create`.
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn IoFile>>;
    /// Opens an existing file for reading only (`verify`, which must work
    /// on read-only media). The default is `open(path, false)`.
    fn open_read(&self, path: &Path) -> io::Result<Arc<dyn IoFile>> {
        self.open(path, false)
    }
    /// Names of the files in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<String>>;
    /// Whether `path` exists.
    fn exists(&self, path: &Path) -> bool;
    /// Deletes a file.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// Atomically renames a file.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Creates a directory and its parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// Makes directory entries (created, renamed files) durable.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Takes the exclusive lock on `dir`; released when the guard drops.
    fn lock(&self, dir: &Path) -> Result<Box<dyn Send + Sync>, LogError>;
    /// Length in bytes of the file at `path`, `0` for something that is
    /// not a regular file. The default opens the file; file systems that
    /// can read the size without opening override it.
    fn file_size(&self, path: &Path) -> io::Result<u64> {
        self.open(path, false)?.len()
    }
}

/// Reads until `buf` is full or EOF; returns the bytes read.
pub fn read_full(file: &dyn IoFile, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        let Some(rest) = buf.get_mut(done..) else { break };
        match file.read_at(rest, offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

// ------------------------------------------------------------------ real

/// The operating system's file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealIo;

struct RealFile(File);

impl IoFile for RealFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        self.0.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_all_at(buf, offset)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn sync_all(&self) -> io::Result<()> {
        self.0.sync_all()
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
    fn is_unlinked(&self) -> io::Result<bool> {
        use std::os::unix::fs::MetadataExt as _;
        Ok(self.0.metadata()?.nlink() == 0)
    }
}

impl Io for RealIo {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn IoFile>> {
        let f = OpenOptions::new().read(true).write(true).create(create).truncate(false).open(path)?;
        Ok(Arc::new(RealFile(f)))
    }
    fn open_read(&self, path: &Path) -> io::Result<Arc<dyn IoFile>> {
        Ok(Arc::new(RealFile(File::open(path)?)))
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            if let Some(name) = entry?.file_name().to_str() {
                out.push(name.to_owned());
            }
        }
        Ok(out)
    }
    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }
    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        std::fs::rename(from, to)
    }
    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dir)
    }
    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        File::open(dir)?.sync_all()
    }
    fn file_size(&self, path: &Path) -> io::Result<u64> {
        // Not following links: a link in the directory is not store data.
        let meta = std::fs::symlink_metadata(path)?;
        Ok(if meta.is_file() { meta.len() } else { 0 })
    }
    fn lock(&self, dir: &Path) -> Result<Box<dyn Send + Sync>, LogError> {
        let f =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.join("LOCK"))?;
        match f.try_lock() {
            Ok(()) => Ok(Box::new(f)),
            Err(std::fs::TryLockError::WouldBlock) => Err(LogError::Locked { dir: dir.to_path_buf() }),
            Err(std::fs::TryLockError::Error(e)) => Err(LogError::Io(e)),
        }
    }
}

// ----------------------------------------------------------------- fault

/// An in-memory file system for tests that keeps, per file, the bytes
/// written ("live") and the bytes made durable by the last sync. It can fail
/// the Nth write (leaving half of that write in the live bytes, like a torn
/// write) or the Nth sync, and [`FaultIo::crash`] returns the file system a
/// restart would see: only durable bytes. File creation, rename and removal
/// are treated as immediately durable.
#[derive(Clone, Default)]
pub struct FaultIo {
    shared: Arc<FaultShared>,
}

#[derive(Default)]
struct FaultShared {
    files: Mutex<HashMap<PathBuf, Arc<MemFile>>>,
    locks: Mutex<HashSet<PathBuf>>,
    counters: Arc<Counters>,
}

/// What [`FaultIo::before_every_sync`] installs.
type SyncHook = Arc<dyn Fn() + Send + Sync>;

struct Counters {
    writes: AtomicU64,
    syncs: AtomicU64,
    fail_write_at: AtomicU64,
    fail_sync_at: AtomicU64,
    before_sync: Mutex<Option<SyncHook>>,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            writes: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
            fail_write_at: AtomicU64::new(u64::MAX),
            fail_sync_at: AtomicU64::new(u64::MAX),
            before_sync: Mutex::new(None),
        }
    }
}

#[derive(Default)]
struct MemData {
    live: Vec<u8>,
    durable: Vec<u8>,
}

struct MemFile {
    data: Mutex<MemData>,
    counters: Arc<Counters>,
}

impl fmt::Debug for FaultIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultIo")
            .field("writes", &self.writes())
            .field("syncs", &self.syncs())
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not hide the state from the next check.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn injected(what: &str) -> io::Error {
    io::Error::other(format!("injected {what} failure"))
}

impl FaultIo {
    /// An empty file system.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes performed so far.
    pub fn writes(&self) -> u64 {
        self.shared.counters.writes.load(Ordering::SeqCst)
    }

    /// Syncs performed so far.
    pub fn syncs(&self) -> u64 {
        self.shared.counters.syncs.load(Ordering::SeqCst)
    }

    /// Makes the `n`th write from now (1-based) fail.
    pub fn fail_nth_write(&self, n: u64) {
        self.shared.counters.fail_write_at.store(self.writes() + n, Ordering::SeqCst);
    }

    /// Makes the `n`th sync from now (1-based) fail.
    pub fn fail_nth_sync(&self, n: u64) {
        self.shared.counters.fail_sync_at.store(self.syncs() + n, Ordering::SeqCst);
    }

    /// Calls `hook` with this file system at the start of every sync, before
    /// the file's bytes become durable: the moment a write is surely on its
    /// way to the disk, where tests take [`FaultIo::crash_torn`] snapshots.
    pub fn before_every_sync(&self, hook: impl Fn(&FaultIo) + Send + Sync + 'static) {
        let shared = Arc::downgrade(&self.shared);
        let hook: SyncHook = Arc::new(move || {
            if let Some(shared) = shared.upgrade() {
                hook(&FaultIo { shared });
            }
        });
        *lock(&self.shared.counters.before_sync) = Some(hook);
    }

    /// Disarms pending failures.
    pub fn heal(&self) {
        self.shared.counters.fail_write_at.store(u64::MAX, Ordering::SeqCst);
        self.shared.counters.fail_sync_at.store(u64::MAX, Ordering::SeqCst);
    }

    /// The file system as a restart after a crash would find it: every file
    /// holds only its durable bytes. Locks are not carried over.
    pub fn crash(&self) -> FaultIo {
        let next = FaultIo::new();
        let files = lock(&self.shared.files);
        let mut new_files = lock(&next.shared.files);
        for (path, file) in files.iter() {
            let durable = lock(&file.data).durable.clone();
            new_files.insert(
                path.clone(),
                Arc::new(MemFile {
                    data: Mutex::new(MemData { live: durable.clone(), durable }),
                    counters: next.shared.counters.clone(),
                }),
            );
        }
        drop(new_files);
        next
    }

    /// Like [`FaultIo::crash`], but as a disk that flushes unsynced writes
    /// in any order would leave things: each 512-byte sector where the
    /// written bytes differ from the durable ones keeps either (chosen by a
    /// generator seeded with `seed`), so an unsynced write can survive with
    /// holes. A file grows only as far as its last kept sector.
    pub fn crash_torn(&self, seed: u64) -> FaultIo {
        const SECTOR: usize = 512;
        let mut state = seed | 1;
        let mut coin = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state & 1 == 1
        };
        let next = FaultIo::new();
        let files = lock(&self.shared.files);
        let mut new_files = lock(&next.shared.files);
        let mut paths: Vec<&PathBuf> = files.keys().collect();
        paths.sort();
        for path in paths {
            let Some(file) = files.get(path) else { continue };
            let d = lock(&file.data);
            let mut bytes = d.durable.clone();
            let mut len = d.durable.len();
            for start in (0..d.live.len()).step_by(SECTOR) {
                let end = (start + SECTOR).min(d.live.len());
                let live = d.live.get(start..end).unwrap_or_default();
                let old = d.durable.get(start..end.min(d.durable.len())).unwrap_or_default();
                if live != old && coin() {
                    if bytes.len() < end {
                        bytes.resize(end, 0);
                    }
                    if let Some(dst) = bytes.get_mut(start..end) {
                        dst.copy_from_slice(live);
                    }
                    len = len.max(end);
                }
            }
            bytes.truncate(len);
            new_files.insert(
                path.clone(),
                Arc::new(MemFile {
                    data: Mutex::new(MemData { live: bytes.clone(), durable: bytes }),
                    counters: next.shared.counters.clone(),
                }),
            );
        }
        drop(new_files);
        next
    }

    /// A copy of a file's live bytes (for corruption tests).
    pub fn read_file(&self, path: &Path) -> Option<Vec<u8>> {
        lock(&self.shared.files).get(path).map(|f| lock(&f.data).live.clone())
    }

    /// Replaces a file's live and durable bytes (for corruption tests).
    pub fn write_file(&self, path: &Path, bytes: Vec<u8>) {
        let mut files = lock(&self.shared.files);
        let file = files.entry(path.to_path_buf()).or_insert_with(|| {
            Arc::new(MemFile { data: Mutex::new(MemData::default()), counters: self.shared.counters.clone() })
        });
        let mut d = lock(&file.data);
        d.durable = bytes.clone();
        d.live = bytes;
    }
}

impl IoFile for MemFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let d = lock(&self.data);
        let Ok(start) = usize::try_from(offset) else { return Ok(0) };
        let Some(src) = d.live.get(start..) else { return Ok(0) };
        let n = src.len().min(buf.len());
        if let (Some(dst), Some(src)) = (buf.get_mut(..n), src.get(..n)) {
            dst.copy_from_slice(src);
        }
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let k = self.counters.writes.fetch_add(1, Ordering::SeqCst) + 1;
        let fail = k == self.counters.fail_write_at.load(Ordering::SeqCst);
        // A failed write leaves a torn prefix behind, like a real one can.
        let buf = if fail { buf.get(..buf.len() / 2).unwrap_or_default() } else { buf };
        let mut d = lock(&self.data);
        let start = usize::try_from(offset).map_err(|_| io::Error::other("offset too large"))?;
        let end = start + buf.len();
        if d.live.len() < end {
            d.live.resize(end, 0);
        }
        if let Some(dst) = d.live.get_mut(start..end) {
            dst.copy_from_slice(buf);
        }
        if fail { Err(injected("write")) } else { Ok(()) }
    }

    fn sync_data(&self) -> io::Result<()> {
        let hook = lock(&self.counters.before_sync).clone();
        if let Some(hook) = hook {
            hook();
        }
        let k = self.counters.syncs.fetch_add(1, Ordering::SeqCst) + 1;
        if k == self.counters.fail_sync_at.load(Ordering::SeqCst) {
            return Err(injected("fsync"));
        }
        let mut d = lock(&self.data);
        d.durable = d.live.clone();
        Ok(())
    }

    fn sync_all(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        Ok(lock(&self.data).live.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(|_| io::Error::other("length too large"))?;
        lock(&self.data).live.resize(len, 0);
        Ok(())
    }
}

struct MemLock {
    shared: Arc<FaultShared>,
    dir: PathBuf,
}

impl Drop for MemLock {
    fn drop(&mut self) {
        lock(&self.shared.locks).remove(&self.dir);
    }
}

impl Io for FaultIo {
    fn open(&self, path: &Path, create: bool) -> io::Result<Arc<dyn IoFile>> {
        let mut files = lock(&self.shared.files);
        if let Some(f) = files.get(path) {
            return Ok(f.clone());
        }
        if !create {
            return Err(io::Error::new(io::ErrorKind::NotFound, format!("{} not found", path.display())));
        }
        let f = Arc::new(MemFile {
            data: Mutex::new(MemData::default()),
            counters: self.shared.counters.clone(),
        });
        files.insert(path.to_path_buf(), f.clone());
        Ok(f)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<String>> {
        Ok(lock(&self.shared.files)
            .keys()
            .filter(|p| p.parent() == Some(dir))
            .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_owned))
            .collect())
    }

    fn exists(&self, path: &Path) -> bool {
        lock(&self.shared.files).contains_key(path)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        lock(&self.shared.files).remove(path);
        Ok(())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut files = lock(&self.shared.files);
        let f = files
            .remove(from)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "rename source missing"))?;
        files.insert(to.to_path_buf(), f);
        Ok(())
    }

    fn create_dir_all(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn sync_dir(&self, _dir: &Path) -> io::Result<()> {
        Ok(())
    }

    fn lock(&self, dir: &Path) -> Result<Box<dyn Send + Sync>, LogError> {
        if !lock(&self.shared.locks).insert(dir.to_path_buf()) {
            return Err(LogError::Locked { dir: dir.to_path_buf() });
        }
        Ok(Box::new(MemLock { shared: self.shared.clone(), dir: dir.to_path_buf() }))
    }
}
