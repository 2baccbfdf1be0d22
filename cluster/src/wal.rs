//! Per-shard write-ahead log.
//!
//! Every mutation of a shard is appended here before it is applied, so a crash loses
//! nothing that was acknowledged, and a lagging replica can be caught up by replaying
//! the log from the LSN it last saw.
//!
//! # On-disk format
//!
//! The log is a directory of segment files named `{first_lsn:020}.wal`, where
//! `first_lsn` is the LSN of the first record the file holds, or would hold if it is
//! empty. Putting it in the name is what lets a log whose records were all truncated
//! away keep counting from where it was. A segment is a plain sequence of records:
//!
//! ```text
//! | len: u32 LE | crc: u32 LE | lsn: u64 LE | payload: len bytes |
//! ```
//!
//! `len` is the payload length (at most 256 MiB); `crc` is CRC-32 (IEEE, `crc32fast`)
//! over the 8 LSN bytes followed by the payload. LSNs start at 1 and grow by exactly
//! one per record, across files. A new segment is started once the current one has
//! reached `segment_bytes`. The directory is fsynced after files are created, deleted
//! or renamed, so the set of files survives a machine crash too.
//!
//! # Recovery rule
//!
//! [`Wal::open`] verifies every record. A bad record (short header, short payload,
//! impossible length or CRC mismatch) in the LAST segment is a write torn by a crash:
//! the file is cut at the start of that record, dropping everything after it, with a
//! warning. The same in any earlier segment, an LSN out of sequence, or a gap between
//! files is real damage and fails with [`WalError::Corrupt`], because skipping it
//! would silently lose acknowledged writes.
//!
//! # Durability
//!
//! Every append is written to the OS before it returns, so killing the process never
//! loses it; only a machine crash can lose records that are not yet durable. When they
//! become durable depends on [`SyncPolicy`]. Concurrent `SyncPolicy::Always` appenders
//! share fsyncs (group commit): one thread fsyncs on behalf of every record written
//! before it started, and the others wait for it instead of queueing their own fsync.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, MutexGuard, RwLock};

/// Log sequence number: the first record is 1, each record is exactly one more.
pub type Lsn = u64;

/// Largest payload accepted by [`Wal::append`].
pub const MAX_RECORD_BYTES: usize = 256 << 20;
const HEADER_LEN: u64 = 16;
const BUFFER_BYTES: usize = 64 << 10;
const SUFFIX: &str = ".wal";
/// A segment remembers where a record starts at least every `MARK_EVERY` records and every
/// `MARK_BYTES` bytes, so a read from an LSN seeks near it instead of reading the file from
/// its start. A feed reads at the log's tail once per batch: without marks each read cost the
/// whole file (64 MiB by default), and a steady write load made the leader copy gigabytes per
/// second. The marks cost 16 bytes per mark, at most one per 64 records or 64 KiB.
const MARK_EVERY: u64 = 64;
const MARK_BYTES: u64 = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncPolicy {
    /// fsync (fdatasync) before `append` returns; concurrent appenders share one fsync (group commit)
    Always,
    /// a background thread fsyncs every interval; `append` returns after the write() to the OS
    Interval(Duration),
    /// never fsync explicitly (tests, benchmarks)
    Never,
}

#[derive(Debug, Clone)]
pub struct WalOptions {
    pub sync: SyncPolicy,
    /// Start a new file once the current one has reached this size.
    pub segment_bytes: u64,
}

impl Default for WalOptions {
    fn default() -> Self {
        Self { sync: SyncPolicy::Always, segment_bytes: 64 << 20 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WalError {
    #[error("wal io error at {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("wal corrupt in {path} at offset {offset}: {reason}")]
    Corrupt { path: PathBuf, offset: u64, reason: String },
    #[error("record of {0} bytes exceeds the wal limit")]
    TooLarge(usize),
    /// Also returned after a failed fsync or a failed truncation: the state on disk is
    /// unknown then, and the log must be reopened (which rescans it) before more writes.
    #[error("wal is closed")]
    Closed,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> WalError {
    move |source| WalError::Io { path: path.to_path_buf(), source }
}

fn corrupt(path: &Path, offset: u64, reason: String) -> WalError {
    WalError::Corrupt { path: path.to_path_buf(), offset, reason }
}

fn segment_path(dir: &Path, first_lsn: Lsn) -> PathBuf {
    dir.join(format!("{first_lsn:020}{SUFFIX}"))
}

fn parse_segment_name(name: &str) -> Option<Lsn> {
    let digits = name.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|&lsn| lsn > 0)
}

fn record_crc(lsn: Lsn, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&lsn.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

fn open_append(path: &Path) -> Result<File, WalError> {
    OpenOptions::new().append(true).open(path).map_err(io_err(path))
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// How a segment scan ended.
struct Scan {
    /// The LSN after the last good record read.
    next: Lsn,
    /// Where the last good record read ends, i.e. where a cut would go.
    offset: u64,
    /// Why the record at `offset` is unreadable, if it is.
    bad: Option<String>,
}

/// Where a record starts: (its LSN, its offset in the segment file).
type Mark = (Lsn, u64);

/// Records `at` in `marks` when the last mark is far enough behind (see [`MARK_EVERY`]).
fn mark(marks: &mut Vec<Mark>, at: Mark) {
    if marks.last().is_none_or(|&(lsn, offset)| at.0 >= lsn + MARK_EVERY || at.1 >= offset + MARK_BYTES) {
        marks.push(at);
    }
}

/// The mark to start reading at for `from`: the last one at or below it, else the file's
/// start.
fn start_for(marks: &[Mark], first: Lsn, from: Lsn) -> Mark {
    let i = marks.partition_point(|&(lsn, _)| lsn <= from);
    if i == 0 { (first, 0) } else { marks[i - 1] }
}

/// Reads the records of a segment from `start` (a record boundary: the file's start, or a
/// mark), up to lsn `to`, checking the LSN sequence, and hands those >= `from` to `f` until it
/// returns false; with `marks`, records the marks of every record read. Payloads below `from`
/// are skipped unread and unchecked: they were verified at open or written by us. Reads are
/// bounded by the file length seen at the start, so a garbage length in a torn tail is
/// reported rather than turned into a huge allocation.
fn scan(
    path: &Path,
    start: Mark,
    from: Lsn,
    to: Lsn,
    mut marks: Option<&mut Vec<Mark>>,
    mut f: impl FnMut(Lsn, &[u8]) -> bool,
) -> Result<Scan, WalError> {
    let mut file = File::open(path).map_err(io_err(path))?;
    let file_len = file.metadata().map_err(io_err(path))?.len();
    if start.1 > 0 {
        file.seek(SeekFrom::Start(start.1)).map_err(io_err(path))?;
    }
    let mut reader = BufReader::with_capacity(BUFFER_BYTES, file);
    let mut scan = Scan { next: start.0, offset: start.1, bad: None };
    let mut payload = Vec::new();
    while scan.next <= to && scan.offset < file_len {
        let left = file_len - scan.offset;
        if left < HEADER_LEN {
            scan.bad = Some(format!("torn header: {left} of {HEADER_LEN} bytes"));
            break;
        }
        let mut header = [0u8; HEADER_LEN as usize];
        reader.read_exact(&mut header).map_err(io_err(path))?;
        let len = u64::from(u32::from_le_bytes(header[0..4].try_into().unwrap()));
        let crc = u32::from_le_bytes(header[4..8].try_into().unwrap());
        let lsn = u64::from_le_bytes(header[8..16].try_into().unwrap());
        if len > MAX_RECORD_BYTES as u64 || len > left - HEADER_LEN {
            scan.bad = Some(format!("torn record: length {len}, {} bytes left", left - HEADER_LEN));
            break;
        }
        let wanted = scan.next >= from;
        if wanted {
            payload.resize(len as usize, 0);
            reader.read_exact(&mut payload).map_err(io_err(path))?;
            let actual = record_crc(lsn, &payload);
            if actual != crc {
                scan.bad = Some(format!("crc mismatch for lsn {lsn}: stored {crc:#010x}, computed {actual:#010x}"));
                break;
            }
        } else {
            reader.seek_relative(len as i64).map_err(io_err(path))?;
        }
        if lsn != scan.next {
            return Err(corrupt(path, scan.offset, format!("expected lsn {}, found {lsn}", scan.next)));
        }
        if let Some(m) = marks.as_deref_mut() {
            mark(m, (lsn, scan.offset));
        }
        scan.offset += HEADER_LEN + len;
        scan.next += 1;
        if wanted && !f(lsn, &payload) {
            break;
        }
    }
    Ok(scan)
}

struct Segment {
    first_lsn: Lsn,
    path: PathBuf,
    bytes: u64,
    /// Ascending; see [`MARK_EVERY`].
    marks: Vec<Mark>,
}

struct Inner {
    /// Oldest first; the last one is the file being appended to.
    segments: Vec<Segment>,
    /// The last segment, opened O_APPEND. Shared with the writer so a group-commit
    /// leader can fsync it without holding this lock while the fsync runs.
    file: Arc<File>,
    writer: BufWriter<Arc<File>>,
    last_lsn: Lsn,
}

struct SyncState {
    durable: Lsn,
    /// A group-commit leader is fsyncing; everyone else waits on `Shared::synced`.
    syncing: bool,
}

struct Shared {
    dir: PathBuf,
    opts: WalOptions,
    inner: Mutex<Inner>,
    /// Shared by readers, exclusive for truncations, so files never vanish or shrink
    /// under a reader. Appends don't take it. Lock order: files, inner, sync.
    files: RwLock<()>,
    sync: Mutex<SyncState>,
    synced: Condvar,
    /// Mirror of `Inner::last_lsn` for lock-free reads.
    last_lsn: AtomicU64,
    /// Bumped by `truncate_after`: an fsync that started before it says nothing about
    /// records that now carry the same LSNs.
    epoch: AtomicU64,
    sync_count: AtomicU64,
    /// Test hook: fsync takes at least this long, as on a real disk, so group commit is
    /// observable even where fsync is free (tmpfs).
    #[cfg(test)]
    fsync_delay_us: AtomicU64,
    closed: AtomicBool,
    stop: Mutex<bool>,
    stop_cv: Condvar,
}

impl Shared {
    fn syncs(&self) -> bool {
        self.opts.sync != SyncPolicy::Never
    }

    fn check_open(&self) -> Result<(), WalError> {
        if self.closed.load(Ordering::SeqCst) { Err(WalError::Closed) } else { Ok(()) }
    }

    /// Closes the log on failures after which nothing more may be acknowledged: disk and
    /// memory may disagree, or (after a failed fsync) the kernel may have dropped the dirty
    /// pages, so that a retry "succeeds" without the data ever reaching disk.
    fn fatal<T>(&self, result: Result<T, WalError>) -> Result<T, WalError> {
        if let Err(e) = &result {
            self.closed.store(true, Ordering::SeqCst);
            tracing::error!(dir = %self.dir.display(), error = %e, "wal closed after failure");
        }
        result
    }

    fn fsync(&self, file: &File, path: &Path, metadata: bool) -> Result<(), WalError> {
        self.sync_count.fetch_add(1, Ordering::Relaxed);
        #[cfg(test)]
        std::thread::sleep(Duration::from_micros(self.fsync_delay_us.load(Ordering::Relaxed)));
        let mut result = if metadata { file.sync_all() } else { file.sync_data() };
        if crate::failpoint::fired("wal::fsync").is_some() {
            result = Err(std::io::Error::other("injected fsync failure (failpoint wal::fsync)"));
        }
        self.fatal(result.map_err(io_err(path)))
    }

    fn sync_to(&self, lsn: Lsn) -> Result<Lsn, WalError> {
        if !self.syncs() {
            self.check_open()?;
            return Ok(self.last_lsn.load(Ordering::Acquire));
        }
        let mut st = self.sync.lock();
        loop {
            // An LSN never written (or cut by truncate_after) can't become durable.
            let want = lsn.min(self.last_lsn.load(Ordering::Acquire));
            if st.durable >= want {
                return Ok(st.durable);
            }
            self.check_open()?;
            if st.syncing {
                self.synced.wait(&mut st);
                continue;
            }
            st.syncing = true;
            let result = MutexGuard::unlocked(&mut st, || {
                let (epoch, target, file, path) = {
                    let inner = self.inner.lock();
                    let path = inner.segments.last().unwrap().path.clone();
                    (self.epoch.load(Ordering::SeqCst), inner.last_lsn, inner.file.clone(), path)
                };
                self.fsync(&file, &path, false).map(|()| (epoch, target))
            });
            st.syncing = false;
            self.synced.notify_all();
            let (epoch, target) = result?;
            if epoch == self.epoch.load(Ordering::SeqCst) {
                st.durable = st.durable.max(target);
            }
        }
    }

    fn rotate(&self, inner: &mut Inner) -> Result<(), WalError> {
        if self.syncs() {
            // Group commit only ever fsyncs the newest file, so this is the last
            // chance for the records in this one.
            let path = inner.segments.last().unwrap().path.clone();
            self.fsync(&inner.file, &path, false)?;
            let mut st = self.sync.lock();
            st.durable = st.durable.max(inner.last_lsn);
            self.synced.notify_all();
        }
        let first_lsn = inner.last_lsn + 1;
        let path = segment_path(&self.dir, first_lsn);
        let file = OpenOptions::new().append(true).create_new(true).open(&path);
        let file = Arc::new(file.map_err(io_err(&path))?);
        // The old writer is empty (every append flushes), so dropping it writes nothing.
        inner.writer = BufWriter::with_capacity(BUFFER_BYTES, Arc::clone(&file));
        inner.file = file;
        inner.segments.push(Segment { first_lsn, path, bytes: 0, marks: Vec::new() });
        // Without the directory entry, fsyncing the file later would not make it durable.
        if self.syncs() { self.fatal(sync_dir(&self.dir)) } else { Ok(()) }
    }

    /// Drops the remains of a failed write so the next record doesn't land after garbage.
    fn discard_partial(&self, inner: &mut Inner) {
        let fresh = BufWriter::with_capacity(BUFFER_BYTES, Arc::clone(&inner.file));
        // into_parts, because dropping a BufWriter would flush the rest of the broken record.
        let _ = std::mem::replace(&mut inner.writer, fresh).into_parts();
        let seg = inner.segments.last().unwrap();
        let _ = self.fatal(inner.file.set_len(seg.bytes).map_err(io_err(&seg.path)));
    }

    fn cut_suffix(&self, inner: &mut Inner, lsn: Lsn) -> Result<(), WalError> {
        let mut dir_changed = false;
        // Newest first, so a crash part-way leaves a contiguous log.
        while inner.segments.len() > 1 && inner.segments.last().unwrap().first_lsn >= lsn {
            let seg = inner.segments.pop().unwrap();
            fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
            dir_changed = true;
        }
        let seg = inner.segments.last_mut().unwrap();
        let cut = if seg.first_lsn >= lsn {
            0
        } else {
            let start = start_for(&seg.marks, seg.first_lsn, lsn - 1);
            let upto = scan(&seg.path, start, Lsn::MAX, lsn - 1, None, |_, _| true)?;
            if let Some(reason) = upto.bad {
                return Err(corrupt(&seg.path, upto.offset, reason));
            }
            upto.offset
        };
        let file = Arc::new(open_append(&seg.path)?);
        file.set_len(cut).map_err(io_err(&seg.path))?;
        if self.syncs() {
            self.fsync(&file, &seg.path, true)?;
        }
        seg.bytes = cut;
        seg.marks.retain(|&(m, _)| m < lsn);
        if seg.first_lsn > lsn {
            // Everything stored is gone and the name must now say where counting resumes.
            // Emptied before the rename: a file never carries a name its records contradict.
            let renamed = segment_path(&self.dir, lsn);
            fs::rename(&seg.path, &renamed).map_err(io_err(&seg.path))?;
            seg.path = renamed;
            seg.first_lsn = lsn;
            dir_changed = true;
        }
        if dir_changed && self.syncs() {
            sync_dir(&self.dir)?;
        }
        inner.writer = BufWriter::with_capacity(BUFFER_BYTES, Arc::clone(&file));
        inner.file = file;
        Ok(())
    }
}

/// A write-ahead log; `Send + Sync`, meant to be shared as `Arc<Wal>`.
pub struct Wal {
    shared: Arc<Shared>,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

impl Wal {
    /// Opens (creating if needed) the log in `dir`, applying the recovery rule from the
    /// module docs. Unless the policy is `Never`, every file is fsynced first, so that
    /// `durable_lsn() == last_lsn()` after open is true even after a process crash.
    pub fn open(dir: &Path, opts: WalOptions) -> Result<Wal, WalError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let syncs = opts.sync != SyncPolicy::Never;
        let mut firsts = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_err(dir))? {
            let name = entry.map_err(io_err(dir))?.file_name();
            firsts.extend(name.to_str().and_then(parse_segment_name));
        }
        firsts.sort_unstable();
        if firsts.is_empty() {
            let path = segment_path(dir, 1);
            OpenOptions::new().append(true).create_new(true).open(&path).map_err(io_err(&path))?;
            if syncs {
                sync_dir(dir)?;
            }
            firsts.push(1);
        }

        let mut segments = Vec::with_capacity(firsts.len());
        let mut next = firsts[0];
        for (i, &first) in firsts.iter().enumerate() {
            let path = segment_path(dir, first);
            if first != next {
                let reason = format!("file starts at lsn {first}, expected lsn {next}");
                return Err(corrupt(&path, 0, reason));
            }
            let mut marks = Vec::new();
            let found = scan(&path, (first, 0), 0, Lsn::MAX, Some(&mut marks), |_, _| true)?;
            next = found.next;
            if let Some(reason) = found.bad {
                if i + 1 < firsts.len() {
                    return Err(corrupt(&path, found.offset, reason));
                }
                tracing::warn!(path = %path.display(), offset = found.offset, %reason,
                    "wal: cutting torn tail, lsn {next} onwards is discarded");
                let file = OpenOptions::new().write(true).open(&path).map_err(io_err(&path))?;
                file.set_len(found.offset).map_err(io_err(&path))?;
            }
            if syncs {
                // A read-only fd is enough: fsync flushes the inode, whoever dirtied it.
                File::open(&path).and_then(|f| f.sync_all()).map_err(io_err(&path))?;
            }
            segments.push(Segment { first_lsn: first, path, bytes: found.offset, marks });
        }

        let last_lsn = next - 1;
        let file = Arc::new(open_append(&segments.last().unwrap().path)?);
        let writer = BufWriter::with_capacity(BUFFER_BYTES, Arc::clone(&file));
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            opts,
            inner: Mutex::new(Inner { segments, file, writer, last_lsn }),
            files: RwLock::new(()),
            sync: Mutex::new(SyncState { durable: last_lsn, syncing: false }),
            synced: Condvar::new(),
            last_lsn: AtomicU64::new(last_lsn),
            epoch: AtomicU64::new(0),
            sync_count: AtomicU64::new(0),
            #[cfg(test)]
            fsync_delay_us: AtomicU64::new(0),
            closed: AtomicBool::new(false),
            stop: Mutex::new(false),
            stop_cv: Condvar::new(),
        });
        let flusher = match shared.opts.sync {
            SyncPolicy::Interval(every) => Some(spawn_flusher(Arc::clone(&shared), every)?),
            _ => None,
        };
        Ok(Wal { shared, flusher: Mutex::new(flusher) })
    }

    /// Appends one record and returns its LSN, durable on return under `SyncPolicy::Always`.
    pub fn append(&self, payload: &[u8]) -> Result<Lsn, WalError> {
        let lsn = self.append_nosync(payload)?;
        if self.shared.opts.sync == SyncPolicy::Always {
            self.shared.sync_to(lsn)?;
        }
        Ok(lsn)
    }

    /// Appends without waiting for durability (the record is in the OS when this
    /// returns); pair with [`Wal::sync_to`] to wait after releasing your own locks.
    pub fn append_nosync(&self, payload: &[u8]) -> Result<Lsn, WalError> {
        if payload.len() > MAX_RECORD_BYTES {
            return Err(WalError::TooLarge(payload.len()));
        }
        let s = &*self.shared;
        let mut inner = s.inner.lock();
        s.check_open()?;
        let current = inner.segments.last().unwrap().bytes;
        if current > 0 && current >= s.opts.segment_bytes {
            s.rotate(&mut inner)?;
        }
        let lsn = inner.last_lsn + 1;
        let mut header = [0u8; HEADER_LEN as usize];
        header[0..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        header[4..8].copy_from_slice(&record_crc(lsn, payload).to_le_bytes());
        header[8..16].copy_from_slice(&lsn.to_le_bytes());
        let w = &mut inner.writer;
        let written = w.write_all(&header).and_then(|()| w.write_all(payload)).and_then(|()| w.flush());
        if let Err(source) = written {
            s.discard_partial(&mut inner);
            return Err(WalError::Io { path: inner.segments.last().unwrap().path.clone(), source });
        }
        let seg = inner.segments.last_mut().unwrap();
        mark(&mut seg.marks, (lsn, seg.bytes));
        seg.bytes += HEADER_LEN + payload.len() as u64;
        inner.last_lsn = lsn;
        s.last_lsn.store(lsn, Ordering::Release);
        Ok(lsn)
    }

    /// Blocks until every record with lsn <= `lsn` is durable, sharing the fsync with
    /// concurrent callers, and returns the durable LSN. An `lsn` past `last_lsn()` is
    /// clamped to it (so the result can then be below `lsn`). Under `Never` it returns
    /// `last_lsn()` at once.
    pub fn sync_to(&self, lsn: Lsn) -> Result<Lsn, WalError> {
        self.shared.sync_to(lsn)
    }

    /// Highest LSN written (0 if nothing ever was).
    pub fn last_lsn(&self) -> Lsn {
        self.shared.last_lsn.load(Ordering::Acquire)
    }

    /// Highest LSN known durable; under `Never` that is `last_lsn()`, as nothing better exists.
    pub fn durable_lsn(&self) -> Lsn {
        if self.shared.syncs() { self.shared.sync.lock().durable } else { self.last_lsn() }
    }

    /// First LSN still stored, or `last_lsn() + 1` if nothing is stored.
    pub fn first_lsn(&self) -> Lsn {
        // Only the newest file can be empty, so the oldest name is exact.
        self.shared.inner.lock().segments[0].first_lsn
    }

    /// Calls `f(lsn, payload)` for each record with lsn >= `from`, in order, up to the
    /// `last_lsn()` seen when the call started; stops early when `f` returns false.
    /// Appends proceed concurrently; truncations wait until it returns, so `f` must not
    /// call `truncate_before`/`truncate_after`. Records already removed by
    /// `truncate_before` are silently absent: compare `from` with `first_lsn()`.
    pub fn read_from(&self, from: Lsn, mut f: impl FnMut(Lsn, &[u8]) -> bool) -> Result<(), WalError> {
        let s = &*self.shared;
        let _files = s.files.read_recursive();
        let (segments, resume, last) = {
            let inner = s.inner.lock();
            let start = inner.segments.partition_point(|g| g.first_lsn <= from).saturating_sub(1);
            let segs: Vec<_> = inner.segments[start..].iter().map(|g| (g.first_lsn, g.path.clone())).collect();
            let g = &inner.segments[start];
            (segs, start_for(&g.marks, g.first_lsn, from), inner.last_lsn)
        };
        if from > last {
            return Ok(());
        }
        let mut next = segments[0].0;
        let mut stopped = false;
        for (i, (first, path)) in segments.iter().enumerate() {
            if next > last {
                break;
            }
            if *first != next {
                return Err(corrupt(path, 0, format!("file starts at lsn {first}, expected lsn {next}")));
            }
            let at = if i == 0 { resume } else { (*first, 0) };
            let found = scan(path, at, from, last, None, |lsn, p| {
                stopped = !f(lsn, p);
                !stopped
            })?;
            if let Some(reason) = found.bad {
                return Err(corrupt(path, found.offset, reason));
            }
            if stopped {
                return Ok(());
            }
            next = found.next;
        }
        if next <= last {
            let path = &segments.last().unwrap().1;
            return Err(corrupt(path, 0, format!("log ends before lsn {next}, last is {last}")));
        }
        Ok(())
    }

    /// Deletes the oldest files whose records all have lsn < `lsn`, never the file being
    /// written, and returns how many were removed.
    pub fn truncate_before(&self, lsn: Lsn) -> Result<usize, WalError> {
        let s = &*self.shared;
        let _files = s.files.write();
        let mut inner = s.inner.lock();
        s.check_open()?;
        let mut removed = 0;
        while inner.segments.len() > 1 && inner.segments[1].first_lsn <= lsn {
            let path = inner.segments[0].path.clone();
            fs::remove_file(&path).map_err(io_err(&path))?;
            inner.segments.remove(0);
            removed += 1;
        }
        if removed > 0 && s.syncs() {
            sync_dir(&s.dir)?;
        }
        Ok(removed)
    }

    /// Removes every record with lsn >= `lsn`; afterwards `last_lsn() == lsn - 1` and the
    /// next append gets `lsn`. `lsn` 0 is treated as 1 (remove everything); an `lsn` past
    /// `last_lsn()` is a no-op. The cut is fsynced unless the policy is `Never`. On
    /// failure the log closes itself, since disk and memory may then disagree.
    pub fn truncate_after(&self, lsn: Lsn) -> Result<(), WalError> {
        let s = &*self.shared;
        let lsn = lsn.max(1);
        let _files = s.files.write();
        let mut inner = s.inner.lock();
        s.check_open()?;
        if lsn > inner.last_lsn {
            return Ok(());
        }
        s.epoch.fetch_add(1, Ordering::SeqCst);
        s.fatal(s.cut_suffix(&mut inner, lsn))?;
        inner.last_lsn = lsn - 1;
        s.last_lsn.store(lsn - 1, Ordering::Release);
        // Older files were fsynced when they were rotated and the current one just was.
        let mut st = s.sync.lock();
        st.durable = lsn - 1;
        s.synced.notify_all();
        Ok(())
    }

    /// Total bytes of all files on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.shared.inner.lock().segments.iter().map(|g| g.bytes).sum()
    }

    /// Number of data fsyncs issued since open (group commit makes it less than appends).
    pub fn sync_count(&self) -> u64 {
        self.shared.sync_count.load(Ordering::Relaxed)
    }

    /// Makes everything written durable (unless `Never`) and rejects further writes with
    /// [`WalError::Closed`]; reads still work. Idempotent; also done on drop.
    pub fn close(&self) -> Result<(), WalError> {
        let s = &*self.shared;
        let result = {
            let inner = s.inner.lock();
            if s.closed.swap(true, Ordering::SeqCst) {
                Ok(())
            } else if s.syncs() {
                let path = &inner.segments.last().unwrap().path;
                s.fsync(&inner.file, path, false).map(|()| {
                    let mut st = s.sync.lock();
                    st.durable = st.durable.max(inner.last_lsn);
                })
            } else {
                Ok(())
            }
        };
        // Waiters covered by the final fsync return Ok, the rest see Closed.
        drop(s.sync.lock());
        s.synced.notify_all();
        *s.stop.lock() = true;
        s.stop_cv.notify_all();
        if let Some(handle) = self.flusher.lock().take() {
            let _ = handle.join();
        }
        result
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::warn!(dir = %self.shared.dir.display(), error = %e, "wal close on drop failed");
        }
    }
}

fn spawn_flusher(shared: Arc<Shared>, every: Duration) -> Result<JoinHandle<()>, WalError> {
    // A zero interval would spin on the condvar.
    let every = every.max(Duration::from_millis(1));
    let dir = shared.dir.clone();
    let body = move || loop {
        {
            let mut stop = shared.stop.lock();
            if !*stop {
                shared.stop_cv.wait_for(&mut stop, every);
            }
            if *stop {
                return;
            }
        }
        if let Err(e) = shared.sync_to(shared.last_lsn.load(Ordering::Acquire)) {
            tracing::warn!(dir = %shared.dir.display(), error = %e, "wal background fsync stopped");
            return;
        }
    };
    std::thread::Builder::new().name("wal-flusher".into()).spawn(body).map_err(io_err(&dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn never(segment_bytes: u64) -> WalOptions {
        WalOptions { sync: SyncPolicy::Never, segment_bytes }
    }

    fn read_all(wal: &Wal, from: Lsn) -> Vec<(Lsn, Vec<u8>)> {
        let mut out = Vec::new();
        wal.read_from(from, |lsn, p| {
            out.push((lsn, p.to_vec()));
            true
        })
        .unwrap();
        out
    }

    fn payload(i: u64) -> Vec<u8> {
        format!("record-{i}-").repeat(1 + (i % 7) as usize).into_bytes()
    }

    fn wal_files(dir: &Path) -> Vec<PathBuf> {
        let mut files: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        files
    }

    /// 16-byte payloads make 32-byte records; 96-byte segments hold lsns 1-3, 4-6, ...
    fn fixed_log(dir: &Path, n: u64) -> Wal {
        let wal = Wal::open(dir, never(96)).unwrap();
        for i in 1..=n {
            assert_eq!(wal.append(format!("{i:016}").as_bytes()).unwrap(), i);
        }
        wal
    }

    #[test]
    fn round_trip_across_files_and_reopen() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Wal>();
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), never(512)).unwrap();
        assert_eq!((wal.first_lsn(), wal.last_lsn()), (1, 0));
        for i in 1..=300 {
            assert_eq!(wal.append(&payload(i)).unwrap(), i);
        }
        assert!(wal_files(dir.path()).len() > 5);
        let expected: Vec<_> = (1..=300).map(|i| (i, payload(i))).collect();
        assert_eq!(read_all(&wal, 1), expected);
        assert_eq!(read_all(&wal, 123), expected[122..]);
        assert!(read_all(&wal, 301).is_empty());
        let mut seen = Vec::new();
        wal.read_from(10, |lsn, _| {
            seen.push(lsn);
            lsn < 12
        })
        .unwrap();
        assert_eq!(seen, [10, 11, 12]);
        let bytes = wal.disk_bytes();
        let on_disk: u64 = wal_files(dir.path()).iter().map(|p| fs::metadata(p).unwrap().len()).sum();
        assert_eq!(bytes, on_disk);
        drop(wal);

        let wal = Wal::open(dir.path(), never(512)).unwrap();
        assert_eq!((wal.first_lsn(), wal.last_lsn(), wal.disk_bytes()), (1, 300, bytes));
        assert_eq!(wal.append(b"next").unwrap(), 301);
        assert_eq!(read_all(&wal, 300)[1], (301, b"next".to_vec()));
        assert!(matches!(wal.append(&vec![0; MAX_RECORD_BYTES + 1]), Err(WalError::TooLarge(_))));
    }

    #[test]
    fn torn_tail_is_cut_and_lsn_reused() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Wal::open(dir.path(), never(100)).unwrap();
        for i in 1..=5 {
            wal.append(&payload(i)).unwrap();
        }
        drop(wal);
        assert_eq!(wal_files(dir.path()).len(), 2, "records 1-3 and 4-5");
        let file = wal_files(dir.path()).pop().unwrap();
        let full = fs::read(&file).unwrap();
        let fifth_start = full.len() - (HEADER_LEN as usize + payload(5).len());

        // Cut mid-payload of record 5.
        fs::write(&file, &full[..full.len() - 3]).unwrap();
        let wal = Wal::open(dir.path(), never(100)).unwrap();
        assert_eq!(wal.last_lsn(), 4);
        assert_eq!(fs::metadata(&file).unwrap().len(), fifth_start as u64);
        assert_eq!(wal.append(b"again").unwrap(), 5);
        drop(wal);

        // Flip a payload byte of the (new) last record.
        let mut bytes = fs::read(&file).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x40;
        fs::write(&file, &bytes).unwrap();
        let wal = Wal::open(dir.path(), never(100)).unwrap();
        assert_eq!(wal.last_lsn(), 4);
        assert_eq!(wal.append(b"third").unwrap(), 5);
        drop(wal);

        // A partial header (e.g. zeros from a crash extending the file) is cut too.
        let mut f = OpenOptions::new().append(true).open(&file).unwrap();
        f.write_all(&[0; 7]).unwrap();
        drop(f);
        let wal = Wal::open(dir.path(), never(100)).unwrap();
        assert_eq!(wal.last_lsn(), 5);
        assert_eq!(read_all(&wal, 5), [(5, b"third".to_vec())]);
        assert_eq!(read_all(&wal, 1).len(), 5);
    }

    #[test]
    fn damage_in_non_last_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        drop(fixed_log(dir.path(), 10));
        let first = wal_files(dir.path())[0].clone();
        let good = fs::read(&first).unwrap();

        let mut flipped = good.clone();
        flipped[HEADER_LEN as usize + 3] ^= 1;
        fs::write(&first, &flipped).unwrap();
        match Wal::open(dir.path(), never(96)) {
            Err(WalError::Corrupt { path, offset, .. }) => assert_eq!((path, offset), (first.clone(), 0)),
            other => panic!("expected corrupt, got {:?}", other.map(|w| w.last_lsn())),
        }

        fs::write(&first, &good[..good.len() - 5]).unwrap();
        assert!(matches!(Wal::open(dir.path(), never(96)), Err(WalError::Corrupt { .. })));

        // A missing middle file is a gap, not a torn tail.
        fs::write(&first, &good).unwrap();
        fs::remove_file(&wal_files(dir.path())[1]).unwrap();
        assert!(matches!(Wal::open(dir.path(), never(96)), Err(WalError::Corrupt { .. })));
    }

    #[test]
    fn truncate_before_removes_only_covered_files() {
        let dir = tempfile::tempdir().unwrap();
        let wal = fixed_log(dir.path(), 20);
        assert_eq!(wal_files(dir.path()).len(), 7);
        assert_eq!(wal.truncate_before(1).unwrap(), 0);
        assert_eq!(wal.truncate_before(5).unwrap(), 1);
        assert_eq!(wal.first_lsn(), 4);
        assert_eq!(wal.truncate_before(10).unwrap(), 2);
        assert_eq!(wal.first_lsn(), 10);
        assert_eq!(read_all(&wal, 1).iter().map(|r| r.0).collect::<Vec<_>>(), (10..=20).collect::<Vec<_>>());
        assert_eq!(read_all(&wal, 15)[0], (15, b"0000000000000015".to_vec()));
        assert_eq!(wal.truncate_before(1000).unwrap(), 3);
        assert_eq!((wal.first_lsn(), wal.last_lsn(), wal.disk_bytes()), (19, 20, 64));
        assert_eq!(wal_files(dir.path()).len(), 1);
        drop(wal);
        let wal = Wal::open(dir.path(), never(96)).unwrap();
        assert_eq!((wal.first_lsn(), wal.last_lsn()), (19, 20));
        assert_eq!(wal.append(b"x").unwrap(), 21);
    }

    #[test]
    fn truncate_after_drops_suffix_and_keeps_counting() {
        let dir = tempfile::tempdir().unwrap();
        let wal = fixed_log(dir.path(), 20);
        wal.truncate_after(100).unwrap();
        assert_eq!(wal.last_lsn(), 20);
        wal.truncate_after(8).unwrap(); // mid-file
        assert_eq!(wal.last_lsn(), 7);
        assert_eq!(read_all(&wal, 1).len(), 7);
        assert_eq!(wal.append(b"eight").unwrap(), 8);
        wal.truncate_after(7).unwrap(); // first record of a file
        assert_eq!(wal.last_lsn(), 6);
        assert_eq!(read_all(&wal, 5).iter().map(|r| r.0).collect::<Vec<_>>(), [5, 6]);
        assert_eq!(wal.append(b"seven").unwrap(), 7);
        drop(wal);

        let wal = Wal::open(dir.path(), never(96)).unwrap();
        assert_eq!(wal.last_lsn(), 7);
        assert_eq!(read_all(&wal, 7), [(7, b"seven".to_vec())]);
        // Below everything still stored: the log is empty but remembers where to resume.
        assert_eq!(wal.truncate_before(7).unwrap(), 2);
        assert_eq!(wal.first_lsn(), 7);
        wal.truncate_after(5).unwrap();
        assert_eq!((wal.first_lsn(), wal.last_lsn(), wal.disk_bytes()), (5, 4, 0));
        drop(wal);
        let wal = Wal::open(dir.path(), never(96)).unwrap();
        assert_eq!((wal.first_lsn(), wal.last_lsn()), (5, 4));
        assert_eq!(wal.append(b"five").unwrap(), 5);
        wal.truncate_after(0).unwrap();
        assert_eq!((wal.first_lsn(), wal.last_lsn()), (1, 0));
        assert_eq!(wal.append(b"one").unwrap(), 1);
    }

    #[test]
    fn reads_start_at_a_mark_near_from() {
        let dir = tempfile::tempdir().unwrap();
        // One big file: every read below is within it.
        let opts = never(1 << 30);
        let wal = Wal::open(dir.path(), opts.clone()).unwrap();
        let mut expected: Vec<_> = (1..=1000).map(|i| (i, payload(i))).collect();
        for (i, p) in &expected {
            assert_eq!(wal.append(p).unwrap(), *i);
        }
        let check = |wal: &Wal, expected: &[(Lsn, Vec<u8>)]| {
            for from in [1, 2, 63, 64, 65, 66, 129, 500, 640, 641, 699, 700, 701, 999, 1000, 1001] {
                let want = expected.get(from as usize - 1..).unwrap_or_default();
                assert_eq!(read_all(wal, from), want, "from {from}");
            }
        };
        check(&wal, &expected);
        assert!(wal.shared.inner.lock().segments[0].marks.len() >= 1000 / MARK_EVERY as usize);
        // A cut drops the marks past it; the records written after it get their own.
        wal.truncate_after(651).unwrap();
        expected.truncate(650);
        for i in 651..=1000 {
            let p = payload(i + 7);
            assert_eq!(wal.append(&p).unwrap(), i);
            expected.push((i, p));
        }
        check(&wal, &expected);
        drop(wal);
        // Open rebuilds the marks from the file.
        let wal = Wal::open(dir.path(), opts).unwrap();
        check(&wal, &expected);
        // Damage the first record's header: a read from a late LSN seeks past it (a scan from
        // the file's start would trip over it, as a read from the start does).
        let path = wal_files(dir.path()).remove(0);
        let mut f = OpenOptions::new().write(true).open(&path).unwrap();
        f.seek(SeekFrom::Start(8)).unwrap();
        f.write_all(&[0xff; 8]).unwrap();
        drop(f);
        assert_eq!(read_all(&wal, 900), expected[899..]);
        assert!(matches!(wal.read_from(1, |_, _| true), Err(WalError::Corrupt { .. })));
    }

    #[test]
    fn group_commit_shares_fsyncs() {
        let dir = tempfile::tempdir().unwrap();
        let opts = WalOptions { sync: SyncPolicy::Always, segment_bytes: 16 << 10 };
        let wal = Arc::new(Wal::open(dir.path(), opts.clone()).unwrap());
        wal.shared.fsync_delay_us.store(500, Ordering::Relaxed);
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let wal = Arc::clone(&wal);
                std::thread::spawn(move || {
                    let mut mine = Vec::new();
                    for i in 0..200u64 {
                        let lsn = wal.append(format!("{t}:{i}").as_bytes()).unwrap();
                        assert!(wal.durable_lsn() >= lsn);
                        mine.push((lsn, format!("{t}:{i}").into_bytes()));
                    }
                    mine
                })
            })
            .collect();
        let mut all = BTreeMap::new();
        for handle in threads {
            let mine = handle.join().unwrap();
            assert!(mine.windows(2).all(|w| w[0].0 < w[1].0));
            all.extend(mine);
        }
        assert_eq!(all.keys().copied().collect::<Vec<_>>(), (1..=1600).collect::<Vec<_>>());
        let syncs = wal.sync_count();
        assert!(syncs < 1600 / 2, "{syncs} fsyncs for 1600 appends: no group commit");
        assert_eq!(wal.durable_lsn(), 1600);
        drop(wal);

        let wal = Wal::open(dir.path(), opts).unwrap();
        let read: BTreeMap<_, _> = read_all(&wal, 1).into_iter().collect();
        assert_eq!(read, all);
    }

    #[test]
    fn sync_to_and_interval_flusher() {
        let dir = tempfile::tempdir().unwrap();
        let hour = WalOptions { sync: SyncPolicy::Interval(Duration::from_secs(3600)), segment_bytes: 1 << 20 };
        let wal = Wal::open(dir.path(), hour).unwrap();
        for _ in 0..3 {
            wal.append_nosync(b"x").unwrap();
        }
        assert_eq!(wal.durable_lsn(), 0);
        assert!(wal.sync_to(2).unwrap() >= 2);
        assert_eq!(wal.sync_to(99).unwrap(), 3);
        wal.close().unwrap();
        assert!(matches!(wal.append(b"late"), Err(WalError::Closed)));
        assert_eq!(read_all(&wal, 1).len(), 3);
        drop(wal);

        let fast = WalOptions { sync: SyncPolicy::Interval(Duration::from_millis(5)), segment_bytes: 1 << 20 };
        let wal = Wal::open(dir.path(), fast).unwrap();
        assert_eq!(wal.append(b"y").unwrap(), 4);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while wal.durable_lsn() < 4 {
            assert!(std::time::Instant::now() < deadline, "background flusher never synced");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn read_from_concurrent_with_appends() {
        let dir = tempfile::tempdir().unwrap();
        let wal = Arc::new(Wal::open(dir.path(), never(4096)).unwrap());
        let writer = {
            let wal = Arc::clone(&wal);
            std::thread::spawn(move || {
                for i in 1..=3000u64 {
                    assert_eq!(wal.append(&payload(i)).unwrap(), i);
                }
            })
        };
        let mut rounds = 0;
        while !writer.is_finished() || rounds == 0 {
            let floor = wal.last_lsn();
            let from = 1 + rounds % 50;
            let mut next = from;
            wal.read_from(from, |lsn, p| {
                assert_eq!((lsn, p), (next, payload(lsn).as_slice()));
                next += 1;
                true
            })
            .unwrap();
            assert!(next > floor, "read stopped at {next}, last_lsn was {floor}");
            rounds += 1;
        }
        writer.join().unwrap();
        assert_eq!(read_all(&wal, 1).len(), 3000);
    }
}
