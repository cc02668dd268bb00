//! The embedded durable queue: a maildir-style directory.
//!
//! ```text
//! dir/tmp/     files being written (never read by the worker)
//! dir/new/     queued jobs, named by id; ids sort by submit time
//! dir/cur/     jobs a worker has claimed (by rename from new/)
//! dir/done/    result records of succeeded jobs
//! dir/failed/  result records of failed jobs
//! dir/.lock    flock held by the one worker consuming this spool
//! ```
//!
//! A job is written to `tmp/`, fsynced and renamed into `new/` (then `new/` is fsynced), so a
//! submit that returned is on disk. A worker claims a job by renaming it into `cur/`; its result
//! record is written to `tmp/`, fsynced and renamed into `done/` or `failed/` before the job
//! leaves `cur/`. A job found in `cur/` when a worker starts was interrupted (the worker was
//! killed): it goes back to `new/` with one more attempt counted, or to `failed/` once
//! `max_attempts` runs were interrupted. Nothing is ever lost, whatever is killed when.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use nix::unistd::{geteuid, Gid, Uid};

use crate::clock::now_ms;
use crate::config::SpoolConfig;
use crate::error::{Error, IoContext, Result};
use crate::functions::{JobResult, Progress};
use crate::lane::{Claimed, Lane};
use crate::privilege::Target;
use crate::safefs::{Dir, Open};
use sha2::{Digest, Sha256};

/// The file formats: version 2 carries the body's length and sha256 (truncation and corruption
/// are detected); version 1 files (no length, no checksum) are still read.
const JOB_MAGIC: &str = "GSJ2";
const RECORD_MAGIC: &str = "GSR2";
const JOB_MAGIC_V1: &str = "GSJ1";
const RECORD_MAGIC_V1: &str = "GSR1";
/// Room for a job file's header beyond its payload.
const HEADER_ROOM: u64 = 64 * 1024;
/// Unlocked files in `tmp/` older than this were abandoned by a killed writer.
const TMP_ABANDONED: Duration = Duration::from_secs(5);
/// How often the worker looks for abandoned files in `tmp/` (and for results to prune).
const HOUSEKEEPING: Duration = Duration::from_secs(5);

/// The spool's subdirectories (`rejected/` holds entries set aside as unusable).
const SUBDIRS: [&str; 6] = ["tmp", "new", "cur", "done", "failed", "rejected"];

/// The spool's directories. Cheap to open; used by submitters, `result`, and the worker.
pub struct Spool {
    root: PathBuf,
    fsync: bool,
    /// Run as root in a spool another user owns (the worker's): what we create is given to
    /// that user, through its descriptor, so the worker can read it.
    give_to: Option<(Uid, Gid)>,
    /// The subdirectories, opened once (in [`SUBDIRS`] order): files are created and moved
    /// relative to these descriptors, so a link planted in place of one is never followed.
    dirs: Vec<Dir>,
}

/// Whether a job succeeded or failed, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Failed,
}

/// A finished job's stored outcome.
#[derive(Debug, Clone)]
pub struct Record {
    pub id: String,
    pub outcome: Outcome,
    pub function: String,
    /// How many runs were started (interrupted runs included).
    pub attempts: u32,
    pub submitted_ms: u64,
    pub started_ms: u64,
    pub finished_ms: u64,
    pub error: Option<String>,
    /// The result bytes (empty for a failure).
    pub result: Vec<u8>,
}

/// Where a job is now.
#[derive(Debug)]
pub enum Lookup {
    Finished(Record),
    Queued,
    Running,
    Unknown,
}

/// A queued job file's contents.
struct JobFile {
    function: String,
    submitted_ms: u64,
    attempts: u32,
    payload: Vec<u8>,
}

impl Spool {
    /// Opens the spool at `dir`, creating its directories when missing.
    /// Each subdirectory must be a real directory: a link or anything else planted in its
    /// place is refused with its path.
    pub fn open(dir: &Path, fsync: bool) -> Result<Spool> {
        let root = Dir::create(dir, 0o750)?;
        let (uid, gid) = root.owner();
        let give_to = (geteuid().is_root() && !uid.is_root()).then_some((uid, gid));
        let mut dirs = Vec::with_capacity(SUBDIRS.len());
        for sub in SUBDIRS {
            let d = root.sub(sub, Some(0o750))?;
            if let Some((uid, gid)) = give_to.filter(|_| d.owner().0.is_root()) {
                d.chown(uid, gid)?;
            }
            dirs.push(d);
        }
        Ok(Spool {
            root: dir.to_path_buf(),
            fsync,
            give_to,
            dirs,
        })
    }

    pub fn from_config(cfg: &SpoolConfig) -> Result<Spool> {
        Spool::open(&cfg.dir, cfg.fsync)
    }

    fn dir(&self, sub: &str) -> PathBuf {
        self.root.join(sub)
    }

    /// Enqueues a job durably and returns its id.
    pub fn submit(&self, function: &str, payload: &[u8]) -> Result<String> {
        crate::config::check_function_name(function).map_err(Error::Msg)?;
        let id = new_id();
        let job = JobFile {
            function: function.to_string(),
            submitted_ms: now_ms(),
            attempts: 0,
            payload: payload.to_vec(),
        };
        self.publish(&encode_job(&job), &id, "new")?;
        Ok(id)
    }

    /// Writes `bytes` to tmp/, fsyncs, renames to `sub/id` and fsyncs `sub/`.
    fn publish(&self, bytes: &[u8], id: &str, sub: &str) -> Result<()> {
        let name = format!("{id}.{}", new_id());
        let tmp = self.dir("tmp").join(&name);
        let tmp_dir = self.opened("tmp")?;
        let mut f = tmp_dir.create_new(&name, 0o640)?;
        // Held until the file is renamed away: the worker's clean-up of abandoned files in
        // tmp/ never touches one whose writer is alive.
        // SAFETY: flock takes a descriptor we own and an operation; it touches no memory.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        let written = (|| {
            if let Some((uid, gid)) = self.give_to {
                crate::safefs::chown_file(&f, &tmp, uid, gid)?;
            }
            f.write_all(bytes).at("writing", &tmp)?;
            if self.fsync {
                f.sync_all().at("syncing", &tmp)?;
            }
            Ok(())
        })();
        drop(f);
        if let Err(e) = written {
            // A failed write or fsync (a full disk, EIO) leaves nothing behind; a retry writes
            // the bytes again, from memory, into a new file (never trusting a repeated fsync).
            let _ = tmp_dir.remove(&name);
            return Err(e);
        }
        let dest_dir = self.opened(sub)?;
        if let Err(e) = tmp_dir.rename_into(&name, dest_dir, id) {
            let _ = tmp_dir.remove(&name);
            let dest = self.dir(sub).join(id);
            return Err(Error::io(
                format!("renaming \"{}\" to \"{}\"", tmp.display(), dest.display()),
                e,
            ));
        }
        if self.fsync {
            dest_dir.sync()?;
        }
        Ok(())
    }

    /// The opened subdirectory `sub`.
    fn opened(&self, sub: &str) -> Result<&Dir> {
        SUBDIRS
            .iter()
            .position(|s| *s == sub)
            .and_then(|i| self.dirs.get(i))
            .ok_or_else(|| Error::Msg(format!("no spool directory \"{sub}\"")))
    }

    /// Where job `id` is now.
    pub fn lookup(&self, id: &str) -> Result<Lookup> {
        if !valid_id(id) {
            return Ok(Lookup::Unknown);
        }
        // A job only moves forward, new -> cur -> done|failed, and is always in at least one of
        // them (a rename moves it; `finish` stores the record before it leaves cur/). Looking in
        // that same order cannot miss one that moves while we look: wherever it was not, it had
        // already left. (Looking backwards could: new/ checked just after the claim, cur/ just
        // before it.) The last look at new/ covers start-up recovery moving cur/ back to new/.
        if self.dir("new").join(id).exists() {
            return Ok(Lookup::Queued);
        }
        if self.dir("cur").join(id).exists() {
            return Ok(Lookup::Running);
        }
        if let Some(r) = self.read_finished(id)? {
            return Ok(Lookup::Finished(r));
        }
        Ok(if self.dir("new").join(id).exists() {
            Lookup::Queued
        } else {
            Lookup::Unknown
        })
    }

    fn read_finished(&self, id: &str) -> Result<Option<Record>> {
        for sub in ["done", "failed"] {
            let path = self.dir(sub).join(id);
            match read_entry(&path, u64::MAX) {
                Ok(bytes) => {
                    return decode_record(id, &bytes).map(Some).map_err(|why| {
                        Error::Msg(format!(
                            "corrupt result record \"{}\": {why}",
                            path.display()
                        ))
                    })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io_path("reading", &path, e)),
            }
        }
        Ok(None)
    }

    /// Blocks until job `id` has finished (or `timeout` passed), woken by inotify on done/ and
    /// failed/.
    pub fn wait(&self, id: &str, timeout: Option<Duration>) -> Result<Lookup> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let watch = crate::inotify::Inotify::new().and_then(|ino| {
            ino.add(&self.dir("done"))?;
            ino.add(&self.dir("failed"))?;
            Ok(ino)
        });
        if let Err(e) = &watch {
            log::debug!("no inotify for waiting ({e}); checking every 100 ms");
        }
        let recheck = if watch.is_ok() {
            Duration::from_secs(2)
        } else {
            Duration::from_millis(100)
        };
        let mut buf = vec![0u8; 4096];
        loop {
            // The result record lands in done/ or failed/ a moment before the job leaves cur/:
            // look for it first, so the answer comes with the event, not with a recheck.
            if let Some(r) = self.read_finished(id)? {
                return Ok(Lookup::Finished(r));
            }
            match self.lookup(id)? {
                Lookup::Unknown => return Ok(Lookup::Unknown),
                l @ Lookup::Finished(_) => return Ok(l),
                pending => {
                    let wait = match deadline {
                        Some(d) if Instant::now() >= d => return Ok(pending),
                        Some(d) => d.saturating_duration_since(Instant::now()).min(recheck),
                        None => recheck,
                    };
                    match &watch {
                        Ok(ino) => drop(ino.wait(Some(wait), &mut buf)),
                        Err(_) => std::thread::sleep(wait),
                    }
                }
            }
        }
    }
}

/// Started as root with `[worker] user`: gives the spool to that user before the drop. A spool
/// the user already owns is left alone (root touches nothing the worker can write). A spool
/// root owns (say, `submit` ran first) is root's own ground: its known entries are handed over
/// through descriptors, then the directory itself.
pub fn hand_to(cfg: &SpoolConfig, t: &Target) -> Result<()> {
    let root = Dir::create(&cfg.dir, 0o750)?;
    if root.owner().0 == t.uid {
        return Ok(());
    }
    if !root.trusted() {
        return Err(Error::Msg(format!(
            "spool \"{}\" is owned by uid {} (mode {:o}), neither root nor user \"{}\"; fix: chown -R {} \"{}\"",
            cfg.dir.display(),
            root.owner().0,
            root.mode(),
            t.name,
            t.name,
            cfg.dir.display()
        )));
    }
    for sub in SUBDIRS {
        let d = root.sub(sub, Some(0o750))?;
        if let Ok(entries) = fs::read_dir(d.path()) {
            for name in entries
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
            {
                if let Ok(o) = d.file(&name, Open::READ) {
                    crate::safefs::chown_file(&o.file, &d.path().join(&name), t.uid, t.gid)?;
                }
            }
        }
        d.chown(t.uid, t.gid)?;
    }
    if let Ok(o) = root.file(".lock", Open::READ) {
        crate::safefs::chown_file(&o.file, &cfg.dir.join(".lock"), t.uid, t.gid)?;
    }
    root.chown(t.uid, t.gid)
}

/// The consuming side: held by the one worker that runs this spool's jobs. Idle lanes sleep
/// until [`SpoolSource::wake`], which the worker's inotify thread calls on events in `new/`.
pub struct SpoolSource {
    spool: Spool,
    max_attempts: u32,
    retain: Duration,
    pending: Mutex<VecDeque<String>>,
    waker: Arc<Waker>,
    next_prune: Mutex<Instant>,
    next_housekeeping: Mutex<Instant>,
    /// The largest entry accepted as a job: max_payload_bytes plus header room.
    max_entry: u64,
    _lock: Flock<File>,
}

impl SpoolSource {
    /// Takes the spool's consumer lock, recovers interrupted jobs, and starts watching `new/`.
    pub fn open(cfg: &SpoolConfig, max_payload: usize) -> Result<SpoolSource> {
        let spool = Spool::from_config(cfg)?;
        let lock_path = spool.root.join(".lock");
        // Read-only is enough for flock, and works on a .lock another user (say, root before a
        // switch to `[worker] user`) created.
        let fd = nix::fcntl::open(
            &lock_path,
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_CREAT
                | nix::fcntl::OFlag::O_CLOEXEC
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_NONBLOCK,
            nix::sys::stat::Mode::from_bits_truncate(0o640),
        )
        .map_err(|e| Error::io_path("opening", &lock_path, e.into()))?;
        // SAFETY: `fd` was just returned by open(2) and nothing else owns it.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        // A worker that just released the pidfile may still be exiting with this lock held:
        // wait a little before calling the spool busy.
        let deadline = Instant::now() + Duration::from_secs(2);
        let mut file = file;
        let lock = loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(lock) => break lock,
                Err((f, nix::errno::Errno::EWOULDBLOCK)) if Instant::now() < deadline => {
                    file = f;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((_, nix::errno::Errno::EWOULDBLOCK)) => {
                    return Err(Error::Msg(format!(
                        "spool \"{}\" is in use by another worker (its .lock is held)",
                        spool.root.display()
                    )))
                }
                Err((_, errno)) => return Err(Error::io_path("locking", &lock_path, errno.into())),
            }
        };
        let waker = Arc::new(Waker::default());
        let source = SpoolSource {
            spool,
            max_attempts: cfg.max_attempts,
            retain: cfg.retain_results,
            pending: Mutex::new(VecDeque::new()),
            waker,
            next_prune: Mutex::new(Instant::now()),
            next_housekeeping: Mutex::new(Instant::now() + HOUSEKEEPING),
            max_entry: max_payload as u64 + HEADER_ROOM,
            _lock: lock,
        };
        source.recover()?;
        source.clean_tmp();
        Ok(source)
    }

    /// Puts jobs left in `cur/` by a killed worker back in the queue, or fails them for good once
    /// `max_attempts` runs were interrupted. One bad entry never stops the recovery: it is set
    /// aside in `rejected/`; a job that cannot be moved now (say, the disk is full) stays in
    /// `cur/` for the next start.
    fn recover(&self) -> Result<()> {
        let cur = self.spool.dir("cur");
        for name in list_raw(&cur)? {
            let Some(id) = name.to_str().filter(|n| valid_id(n)).map(str::to_string) else {
                self.reject_raw("cur", &name, "not a job id");
                continue;
            };
            if let Err(e) = self.recover_one(&id) {
                log::error!(
                    "job {id}: cannot recover it now ({e}); it stays in cur/ for the next start"
                );
            }
        }
        Ok(())
    }

    fn recover_one(&self, id: &str) -> Result<()> {
        let path = self.spool.dir("cur").join(id);
        match self.spool.read_finished(id) {
            Ok(Some(_)) => {
                // Killed after storing the outcome but before leaving cur/: it is done.
                return remove(&path);
            }
            Ok(None) => {}
            Err(e) => {
                // A damaged result record: set it aside and run the job again.
                for sub in ["done", "failed"] {
                    self.reject_raw(sub, std::ffi::OsStr::new(id), &e.to_string());
                }
            }
        }
        let mut job = match self.read_job(id) {
            Ok(job) => job,
            Err(Ok(why)) => {
                self.reject(id, &why);
                return Ok(());
            }
            Err(Err(e)) => return Err(e),
        };
        job.attempts = job.attempts.saturating_add(1);
        if job.attempts >= self.max_attempts {
            log::warn!(
                "job {id}: interrupted {} times; failing it (max_attempts = {})",
                job.attempts,
                self.max_attempts
            );
            let record = Record {
                id: id.to_string(),
                outcome: Outcome::Failed,
                function: job.function,
                attempts: job.attempts,
                submitted_ms: job.submitted_ms,
                started_ms: 0,
                finished_ms: now_ms(),
                error: Some(format!(
                    "interrupted {} times (the worker stopped while running it); max_attempts = {}",
                    job.attempts, self.max_attempts
                )),
                result: Vec::new(),
            };
            self.spool.publish(&encode_record(&record), id, "failed")?;
        } else {
            log::info!(
                "job {id}: requeued after an interrupted run (attempt {} of {})",
                job.attempts.saturating_add(1),
                self.max_attempts
            );
            self.spool.publish(&encode_job(&job), id, "new")?;
        }
        remove(&path)
    }

    /// Reads and decodes `cur/ID`: never through a link, never blocking, within the size bound.
    /// `Err(Ok(why))`: the entry is no job; `Err(Err(e))`: storage or resources fail now (the
    /// entry may be fine).
    fn read_job(
        &self,
        id: &str,
    ) -> std::result::Result<JobFile, std::result::Result<String, Error>> {
        let path = self.spool.dir("cur").join(id);
        let bytes = read_entry(&path, self.max_entry).map_err(|e| match e.raw_os_error() {
            Some(errno) if crate::error::is_transient_errno(errno) => {
                Err(Error::io_path("reading", &path, e))
            }
            _ => Ok(e.to_string()),
        })?;
        decode_job(&bytes).map_err(Ok)
    }

    /// Removes files in `tmp/` abandoned by killed writers: unlocked (a live writer holds an
    /// flock on its file until the rename) and older than [`TMP_ABANDONED`] (the moment between
    /// a writer's create and its flock). Anything that is not a regular file goes to
    /// `rejected/`.
    fn clean_tmp(&self) {
        let tmp = self.spool.dir("tmp");
        let Ok(names) = list_raw(&tmp) else { return };
        let cutoff = SystemTime::now() - TMP_ABANDONED;
        for name in names {
            let path = tmp.join(&name);
            let Ok(f) = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                .open(&path)
            else {
                self.reject_raw("tmp", &name, "not a regular file");
                continue;
            };
            let Ok(meta) = f.metadata() else { continue };
            if !meta.is_file() {
                drop(f);
                self.reject_raw("tmp", &name, "not a regular file");
                continue;
            }
            if meta.modified().is_ok_and(|t| t > cutoff) {
                continue;
            }
            // SAFETY: flock on a descriptor we own; it touches no memory.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                log::info!(
                    "removing {:?} from tmp/: abandoned by its writer ({} bytes)",
                    name,
                    meta.size()
                );
                let _ = fs::remove_file(&path);
            }
        }
    }

    /// Every [`HOUSEKEEPING`]: abandoned temp files.
    fn housekeeping(&self) {
        let Ok(mut next) = self.next_housekeeping.lock() else {
            return;
        };
        if Instant::now() < *next {
            return;
        }
        *next = Instant::now() + HOUSEKEEPING;
        drop(next);
        self.clean_tmp();
    }

    fn prune(&self) {
        let Ok(mut next) = self.next_prune.lock() else {
            return;
        };
        if Instant::now() < *next {
            return;
        }
        *next = Instant::now()
            + (self.retain / 10).clamp(Duration::from_secs(60), Duration::from_secs(3600));
        drop(next);
        let cutoff = SystemTime::now()
            .checked_sub(self.retain)
            .unwrap_or(UNIX_EPOCH);
        for sub in ["done", "failed"] {
            prune_older(&self.spool.dir(sub), cutoff);
        }
    }

    /// Sets aside `cur/ID`, which cannot be used as a job at all, in `rejected/`.
    fn reject(&self, id: &str, why: &str) {
        self.reject_raw("cur", std::ffi::OsStr::new(id), why);
    }

    /// Moves the entry `sub/name` (whatever it is) into `rejected/`, with the reason in the log
    /// and the count in `status`. Never fails the caller: at worst it says it could not.
    fn reject_raw(&self, sub: &str, name: &std::ffi::OsStr, why: &str) {
        let from = self.spool.dir(sub).join(name);
        let mut to = self.spool.dir("rejected").join(name);
        if fs::symlink_metadata(&to).is_ok() {
            let mut renamed = name.to_os_string();
            renamed.push(format!(".{}", new_id()));
            to = self.spool.dir("rejected").join(renamed);
        }
        match fs::rename(&from, &to) {
            Ok(()) => {
                crate::status::REJECTED.fetch_add(1, Ordering::Relaxed);
                log::error!(
                    "{sub}/{}: {why}; rejected: set aside as \"{}\"",
                    name.to_string_lossy(),
                    to.display()
                );
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => log::error!(
                "{sub}/{}: {why}; and it cannot be set aside ({e}): remove it",
                name.to_string_lossy()
            ),
        }
    }

    /// Claims the oldest queued job, or returns None when the queue is empty. An entry that
    /// is not a job (a bad name, a link, a FIFO, a directory, too large, truncated, corrupt) is
    /// set aside in `rejected/` and the next one is tried.
    fn claim(&self) -> Result<Option<Claimed>> {
        loop {
            let id = {
                let mut pending = self
                    .pending
                    .lock()
                    .map_err(|_| Error::Msg("spool queue lock poisoned".into()))?;
                loop {
                    if pending.is_empty() {
                        let mut ids = Vec::new();
                        for name in list_raw(&self.spool.dir("new"))? {
                            match name.to_str().filter(|n| valid_id(n)) {
                                Some(id) => ids.push(id.to_string()),
                                None => self.reject_raw("new", &name, "not a job id"),
                            }
                        }
                        ids.sort_unstable();
                        pending.extend(ids);
                    }
                    let Some(id) = pending.pop_front() else {
                        return Ok(None);
                    };
                    let from = self.spool.dir("new").join(&id);
                    match fs::rename(&from, self.spool.dir("cur").join(&id)) {
                        Ok(()) => break id,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(Error::io_path("claiming", &from, e)),
                    }
                }
            };
            match self.read_job(&id) {
                Ok(job) => {
                    return Ok(Some(Claimed {
                        id,
                        function: job.function,
                        unique: String::new(),
                        payload: job.payload,
                        attempt: job.attempts.saturating_add(1),
                        submitted_ms: job.submitted_ms,
                    }))
                }
                Err(Ok(why)) => self.reject(&id, &why),
                Err(Err(e)) => {
                    // Not the entry's fault: give it back, unclaimed, and let the lane back off.
                    let cur = self.spool.dir("cur").join(&id);
                    let _ = fs::rename(&cur, self.spool.dir("new").join(&id));
                    if let Ok(mut pending) = self.pending.lock() {
                        pending.push_front(id);
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Stores a job's outcome durably, then releases it from `cur/`.
    fn finish(&self, job: &Claimed, outcome: &JobResult, started_ms: u64) -> Result<()> {
        let (kind, sub, error, result) = match outcome {
            Ok(r) => (Outcome::Done, "done", None, r.clone()),
            Err(e) => (
                Outcome::Failed,
                "failed",
                Some(e.message.clone()),
                Vec::new(),
            ),
        };
        let record = Record {
            id: job.id.clone(),
            outcome: kind,
            function: job.function.clone(),
            attempts: job.attempt,
            submitted_ms: job.submitted_ms,
            started_ms,
            finished_ms: now_ms(),
            error,
            result,
        };
        self.spool.publish(&encode_record(&record), &job.id, sub)?;
        remove(&self.spool.dir("cur").join(&job.id))
    }

    /// A lane (one per worker thread) over this spool.
    pub fn lane(self: &Arc<Self>) -> Box<dyn Lane> {
        Box::new(SpoolLane {
            source: Arc::clone(self),
            started_ms: 0,
            job: String::new(),
            progress_lines: 0,
        })
    }

    /// Wakes every idle lane: to look for new jobs, or to notice the stop flag.
    pub fn wake(&self) {
        self.waker.bump();
    }

    /// Writes the sorted list of queued ids this worker already knows into a memfd for the next
    /// generation, which then claims at once instead of listing `new/` (about 1 µs per queued
    /// job). Only a hint: an id that is gone by then is skipped at claim, and jobs queued later
    /// are found by the next listing, in order.
    pub fn hand_over(&self) -> Option<std::os::fd::OwnedFd> {
        let pending = self.pending.lock().ok()?;
        if pending.is_empty() {
            return None;
        }
        let name = c"gearshift-pending";
        let fd = nix::sys::memfd::memfd_create(name, nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .ok()?;
        let mut file = File::from(fd);
        let mut text = String::with_capacity(pending.len() * 32);
        for id in pending.iter() {
            text.push_str(id);
            text.push('\n');
        }
        file.write_all(text.as_bytes()).ok()?;
        Some(std::os::fd::OwnedFd::from(file))
    }

    /// Takes the list a previous generation handed over (see [`SpoolSource::hand_over`]).
    pub fn take_over(&self, fd: std::os::fd::RawFd) {
        let Some(fd) = crate::handover::adopt(fd, |what| {
            what.to_string_lossy()
                .starts_with("/memfd:gearshift-pending")
        }) else {
            return;
        };
        let mut file = File::from(fd);
        let mut text = String::new();
        use std::io::{Read, Seek};
        if file.seek(std::io::SeekFrom::Start(0)).is_err()
            || file.read_to_string(&mut text).is_err()
        {
            return;
        }
        if let Ok(mut pending) = self.pending.lock() {
            if pending.is_empty() {
                pending.extend(text.lines().filter(|l| valid_id(l)).map(String::from));
            }
        }
    }

    /// The directory whose events mean "new jobs" (the worker watches it).
    pub fn queue_dir(&self) -> PathBuf {
        self.spool.dir("new")
    }
}

struct SpoolLane {
    source: Arc<SpoolSource>,
    started_ms: u64,
    /// The current job's id and progress lines logged so far (a job may write millions).
    job: String,
    progress_lines: u64,
}

/// Progress lines of one job that reach the log; the rest are counted and summarised.
const PROGRESS_LOG_LINES: u64 = 10;

impl Lane for SpoolLane {
    fn next(&mut self, stop: &AtomicBool) -> Result<Option<Claimed>> {
        loop {
            if stop.load(Ordering::Acquire) {
                return Ok(None);
            }
            let seen = self.source.waker.current();
            // Results past retention go at start and every tenth of the period; abandoned
            // temp files every few seconds.
            self.source.prune();
            self.source.housekeeping();
            if let Some(job) = self.source.claim()? {
                self.started_ms = now_ms();
                self.job.clone_from(&job.id);
                self.progress_lines = 0;
                return Ok(Some(job));
            }
            if stop.load(Ordering::Acquire) {
                return Ok(None);
            }
            self.source.waker.wait_past(seen, HOUSEKEEPING);
        }
    }

    fn progress(&mut self) -> &mut dyn Progress {
        self
    }

    fn finish(&mut self, job: &Claimed, outcome: &JobResult) -> Result<()> {
        if self.progress_lines > PROGRESS_LOG_LINES {
            log::info!(
                "job {}: {} more progress lines not logged",
                job.id,
                self.progress_lines - PROGRESS_LOG_LINES
            );
        }
        self.progress_lines = 0;
        self.source.finish(job, outcome, self.started_ms)
    }

    fn close(&mut self) -> Result<()> {
        Ok(())
    }

    fn release(&mut self, job: &Claimed) -> bool {
        let from = self.source.spool.dir("cur").join(&job.id);
        let to = self.source.spool.dir("new").join(&job.id);
        match fs::rename(&from, &to) {
            Ok(()) => true,
            Err(e) => {
                log::error!(
                    "job {}: cannot give it back ({e}); it runs again at the next start",
                    job.id
                );
                false
            }
        }
    }
}

impl SpoolLane {
    /// Whether one more progress line of this job may be logged.
    fn may_log(&mut self) -> bool {
        self.progress_lines += 1;
        self.progress_lines <= PROGRESS_LOG_LINES
    }
}

impl Progress for SpoolLane {
    fn status(&mut self, n: u64, d: u64) {
        if self.may_log() {
            log::debug!("job {}: progress {n}/{d}", self.job);
        }
    }
    fn data(&mut self, data: &[u8]) {
        if self.may_log() {
            log::debug!("job {}: data {:?}", self.job, lossy_prefix(data));
        }
    }
    fn warning(&mut self, data: &[u8]) {
        if self.may_log() {
            log::warn!("job {}: job warning: {}", self.job, lossy_prefix(data));
        }
    }
}

/// At most 1 KiB of `data` as text, for a log line.
fn lossy_prefix(data: &[u8]) -> String {
    let cut = &data[..data.len().min(1024)];
    let mut s = String::from_utf8_lossy(cut).into_owned();
    if data.len() > cut.len() {
        s.push_str(&format!("... ({} bytes)", data.len()));
    }
    s
}

/// A sequence number with a condition variable: idle lanes sleep until it moves past what they
/// saw, so a wake-up between "queue looked empty" and "go to sleep" is never lost.
#[derive(Default)]
pub struct Waker {
    seq: Mutex<u64>,
    cv: Condvar,
}

impl Waker {
    pub fn bump(&self) {
        if let Ok(mut s) = self.seq.lock() {
            *s += 1;
            self.cv.notify_all();
        }
    }
    pub fn current(&self) -> u64 {
        self.seq.lock().map_or(0, |s| *s)
    }
    /// Sleeps until the sequence moves past `seen`, or `limit` passes (housekeeping).
    pub fn wait_past(&self, seen: u64, limit: Duration) {
        let Ok(guard) = self.seq.lock() else { return };
        drop(self.cv.wait_timeout_while(guard, limit, |s| *s == seen));
    }
}

fn new_id() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{nanos:016x}-{:x}-{seq:x}", std::process::id())
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// Every entry of `dir` but dot files, names as they are (not necessarily UTF-8).
fn list_raw(dir: &Path) -> Result<Vec<std::ffi::OsString>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).at("listing", dir)? {
        let name = entry.at("listing", dir)?.file_name();
        if !name.as_encoded_bytes().starts_with(b".") {
            out.push(name);
        }
    }
    Ok(out)
}

fn remove(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io_path("removing", path, e)),
        _ => Ok(()),
    }
}

fn prune_older(dir: &Path, cutoff: SystemTime) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t < cutoff);
        if old {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Reads a spool entry: never through a link, never blocking on a FIFO, only a regular file of
/// at most `max` bytes (checked with fstat before reading, and bounded while reading).
fn read_entry(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::other("a symbolic link, not a job file")
            } else {
                e
            }
        })?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other(format!(
            "not a regular file ({})",
            if meta.is_dir() {
                "a directory"
            } else {
                "a FIFO, socket or device"
            }
        )));
    }
    if meta.len() > max {
        return Err(io::Error::other(format!(
            "{} bytes, over max_payload_bytes plus {HEADER_ROOM} bytes of header",
            meta.len()
        )));
    }
    let mut buf = Vec::with_capacity(meta.len() as usize);
    f.take(max.saturating_add(1)).read_to_end(&mut buf)?;
    if buf.len() as u64 > max {
        return Err(io::Error::other(
            "grew over max_payload_bytes while being read",
        ));
    }
    Ok(buf)
}

fn encode_job(job: &JobFile) -> Vec<u8> {
    let mut out = format!(
        "{JOB_MAGIC}\nfunction={}\nsubmitted={}\nattempts={}\nlength={}\nsha256={}\n\n",
        job.function,
        job.submitted_ms,
        job.attempts,
        job.payload.len(),
        crate::config::hex(&Sha256::digest(&job.payload))
    )
    .into_bytes();
    out.extend_from_slice(&job.payload);
    out
}

fn decode_job(bytes: &[u8]) -> std::result::Result<JobFile, String> {
    let (fields, payload) = split_header(bytes, &[JOB_MAGIC, JOB_MAGIC_V1])?;
    Ok(JobFile {
        function: field(&fields, "function")?.to_string(),
        submitted_ms: number(&fields, "submitted")?,
        attempts: number(&fields, "attempts")? as u32,
        payload: payload.to_vec(),
    })
}

fn encode_record(r: &Record) -> Vec<u8> {
    let outcome = match r.outcome {
        Outcome::Done => "done",
        Outcome::Failed => "failed",
    };
    let mut out = format!(
        "{RECORD_MAGIC}\noutcome={outcome}\nfunction={}\nattempts={}\nsubmitted={}\nstarted={}\nfinished={}\nlength={}\nsha256={}\n",
        r.function,
        r.attempts,
        r.submitted_ms,
        r.started_ms,
        r.finished_ms,
        r.result.len(),
        crate::config::hex(&Sha256::digest(&r.result))
    );
    if let Some(e) = &r.error {
        out.push_str("error=");
        out.push_str(&escape(e));
        out.push('\n');
    }
    out.push('\n');
    let mut out = out.into_bytes();
    out.extend_from_slice(&r.result);
    out
}

fn decode_record(id: &str, bytes: &[u8]) -> std::result::Result<Record, String> {
    let (fields, body) = split_header(bytes, &[RECORD_MAGIC, RECORD_MAGIC_V1])?;
    let outcome = match field(&fields, "outcome")? {
        "done" => Outcome::Done,
        "failed" => Outcome::Failed,
        other => return Err(format!("unknown outcome {other:?}")),
    };
    Ok(Record {
        id: id.to_string(),
        outcome,
        function: field(&fields, "function")?.to_string(),
        attempts: number(&fields, "attempts")? as u32,
        submitted_ms: number(&fields, "submitted")?,
        started_ms: number(&fields, "started")?,
        finished_ms: number(&fields, "finished")?,
        error: field(&fields, "error").ok().map(unescape),
        result: body.to_vec(),
    })
}

/// A file's header fields and its body.
type Parts<'a> = (Vec<(&'a str, &'a str)>, &'a [u8]);

/// Splits `MAGIC\nkey=value\n...\n\nbody` into its fields and body. `magics[0]` is the
/// current format, whose `length` and `sha256` fields are checked against the body; the others
/// are older formats without them.
fn split_header<'a>(bytes: &'a [u8], magics: &[&str]) -> std::result::Result<Parts<'a>, String> {
    let head_len = bytes.len().min(HEADER_ROOM as usize);
    let end = bytes[..head_len]
        .windows(2)
        .position(|w| w == b"\n\n")
        .ok_or("no end of header (truncated or not a job file)")?;
    let head = std::str::from_utf8(&bytes[..end]).map_err(|_| "header is not UTF-8")?;
    let mut lines = head.lines();
    let magic = lines.next().unwrap_or_default();
    if !magics.contains(&magic) {
        return Err(format!("not a {} file", magics.join(" or ")));
    }
    let fields = lines
        .map(|l| {
            l.split_once('=')
                .ok_or_else(|| format!("bad header line {l:?}"))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let body = &bytes[end + 2..];
    if Some(&magic) == magics.first() {
        let length = number(&fields, "length")?;
        if (body.len() as u64) < length {
            return Err(format!("truncated: {} of {length} bytes", body.len()));
        }
        if body.len() as u64 > length {
            return Err(format!(
                "{} bytes where its header says {length}",
                body.len()
            ));
        }
        if crate::config::hex(&Sha256::digest(body)) != field(&fields, "sha256")? {
            return Err("checksum mismatch: the content is corrupt".into());
        }
    }
    Ok((fields, body))
}

fn field<'a>(fields: &[(&str, &'a str)], key: &str) -> std::result::Result<&'a str, String> {
    fields
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| *v)
        .ok_or_else(|| format!("missing {key}"))
}

fn number(fields: &[(&str, &str)], key: &str) -> std::result::Result<u64, String> {
    field(fields, key)?
        .parse()
        .map_err(|_| format!("{key} is not a number"))
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('\r', "\\r")
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("gs-spool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn cfg(dir: &Path, max_attempts: u32) -> SpoolConfig {
        SpoolConfig {
            dir: dir.to_path_buf(),
            max_attempts,
            retain_results: Duration::from_secs(3600),
            fsync: false,
        }
    }

    #[test]
    fn codecs_round_trip() {
        let job = JobFile {
            function: "f".into(),
            submitted_ms: 5,
            attempts: 2,
            payload: b"a\n\nb\0".to_vec(),
        };
        let back = decode_job(&encode_job(&job)).expect("decode");
        assert_eq!(
            (back.function.as_str(), back.submitted_ms, back.attempts),
            ("f", 5, 2)
        );
        assert_eq!(back.payload, job.payload);

        let rec = Record {
            id: "x".into(),
            outcome: Outcome::Failed,
            function: "f".into(),
            attempts: 1,
            submitted_ms: 1,
            started_ms: 2,
            finished_ms: 3,
            error: Some("line one\nline \\two".into()),
            result: Vec::new(),
        };
        let back = decode_record("x", &encode_record(&rec)).expect("decode");
        assert_eq!(back.error.as_deref(), Some("line one\nline \\two"));
        assert_eq!(back.outcome, Outcome::Failed);

        for bad in [
            &b""[..],
            b"GSJ1\nfunction=f\n",
            b"XXXX\n\n",
            b"GSJ1\nfunction=f\nsubmitted=x\nattempts=0\n\n",
        ] {
            assert!(decode_job(bad).is_err(), "{bad:?}");
        }
        // Version 1 (no length, no checksum) is still read.
        let v1 = b"GSJ1\nfunction=f\nsubmitted=1\nattempts=0\n\npay";
        assert_eq!(decode_job(v1).expect("v1").payload, b"pay");
        // Version 2 detects truncation, extra bytes and corruption.
        let whole = encode_job(&job);
        let cut = decode_job(&whole[..whole.len() - 1])
            .err()
            .unwrap_or_default();
        assert!(cut.starts_with("truncated: 4 of 5 bytes"), "{cut}");
        let mut longer = whole.clone();
        longer.push(b'!');
        assert!(decode_job(&longer).is_err());
        let mut flipped = whole.clone();
        *flipped.last_mut().unwrap_or(&mut 0) ^= 1;
        let e = decode_job(&flipped).err().unwrap_or_default();
        assert!(e.contains("checksum mismatch"), "{e}");
        let done = Record {
            outcome: Outcome::Done,
            error: None,
            result: b"xyz".to_vec(),
            ..rec
        };
        let bytes = encode_record(&done);
        assert_eq!(decode_record("x", &bytes).expect("record").result, b"xyz");
        let e = decode_record("x", &bytes[..bytes.len() - 1])
            .err()
            .unwrap_or_default();
        assert!(e.starts_with("truncated"), "{e}");
    }

    #[test]
    fn submit_claim_finish_lookup() {
        let dir = tempdir("flow");
        let src = Arc::new(SpoolSource::open(&cfg(&dir, 3), 1 << 20).expect("open"));
        let spool = Spool::open(&dir, false).expect("open");
        let a = spool.submit("echo", b"one").expect("submit");
        let b = spool.submit("echo", b"two").expect("submit");
        assert!(matches!(spool.lookup(&a), Ok(Lookup::Queued)));
        assert!(matches!(spool.lookup("ffff-1-1"), Ok(Lookup::Unknown)));
        assert!(matches!(spool.lookup("../etc/passwd"), Ok(Lookup::Unknown)));

        let mut lane = src.lane();
        let stop = AtomicBool::new(false);
        let job = lane.next(&stop).expect("next").expect("a job");
        assert_eq!(
            (job.id.as_str(), job.payload.as_slice(), job.attempt),
            (a.as_str(), &b"one"[..], 1)
        );
        assert!(matches!(spool.lookup(&a), Ok(Lookup::Running)));
        lane.finish(&job, &Ok(b"ONE".to_vec())).expect("finish");
        match spool.lookup(&a).expect("lookup") {
            Lookup::Finished(r) => assert_eq!(
                (r.outcome, r.result.as_slice()),
                (Outcome::Done, &b"ONE"[..])
            ),
            other => panic!("{other:?}"),
        }
        let job = lane.next(&stop).expect("next").expect("b");
        assert_eq!(job.id, b);
        lane.finish(&job, &Err(crate::JobError::new("nope")))
            .expect("finish");
        match spool.lookup(&b).expect("lookup") {
            Lookup::Finished(r) => assert_eq!(
                (r.outcome, r.error.as_deref()),
                (Outcome::Failed, Some("nope"))
            ),
            other => panic!("{other:?}"),
        }
        stop.store(true, Ordering::Release);
        assert!(lane.next(&stop).expect("next").is_none());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn interrupted_jobs_are_requeued_then_failed() {
        let dir = tempdir("recover");
        let spool = Spool::open(&dir, false).expect("open");
        let id = spool.submit("echo", b"x").expect("submit");
        let stop = AtomicBool::new(false);
        for round in 1..=3 {
            let src = Arc::new(SpoolSource::open(&cfg(&dir, 3), 1 << 20).expect("open"));
            let job = src.lane().next(&stop).expect("next").expect("job");
            assert_eq!(job.attempt, round);
            // Dropping the source without finishing is what a kill -9 leaves behind.
        }
        let src = Arc::new(SpoolSource::open(&cfg(&dir, 3), 1 << 20).expect("open"));
        assert!(src
            .lane()
            .next(&AtomicBool::new(true))
            .expect("next")
            .is_none());
        match spool.lookup(&id).expect("lookup") {
            Lookup::Finished(r) => {
                assert_eq!(r.outcome, Outcome::Failed);
                assert_eq!(r.attempts, 3);
                assert!(
                    r.error
                        .as_deref()
                        .is_some_and(|e| e.starts_with("interrupted 3 times")),
                    "{:?}",
                    r.error
                );
            }
            other => panic!("{other:?}"),
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn old_results_are_pruned_at_start() {
        let dir = tempdir("retain");
        let mut c = cfg(&dir, 3);
        let spool = Spool::open(&dir, false).expect("open");
        let id = spool.submit("echo", b"x").expect("submit");
        {
            let src = Arc::new(SpoolSource::open(&c, 1 << 20).expect("open"));
            let mut lane = src.lane();
            let job = lane
                .next(&AtomicBool::new(false))
                .expect("next")
                .expect("job");
            lane.finish(&job, &Ok(b"x".to_vec())).expect("finish");
        }
        assert!(matches!(spool.lookup(&id), Ok(Lookup::Finished(_))));
        // Within the retention period: kept.
        let src = Arc::new(SpoolSource::open(&c, 1 << 20).expect("open"));
        assert!(src
            .lane()
            .next(&AtomicBool::new(true))
            .expect("next")
            .is_none());
        assert!(matches!(spool.lookup(&id), Ok(Lookup::Finished(_))));
        drop(src);
        std::thread::sleep(Duration::from_millis(20));
        c.retain_results = Duration::from_millis(10);
        let src = Arc::new(SpoolSource::open(&c, 1 << 20).expect("open"));
        // A lane prunes as it starts, before it claims or sleeps: run one on an empty queue.
        let stop = Arc::new(AtomicBool::new(false));
        let lane = {
            let (src, stop) = (Arc::clone(&src), Arc::clone(&stop));
            std::thread::spawn(move || src.lane().next(&stop).map(|j| j.is_none()))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !matches!(spool.lookup(&id), Ok(Lookup::Unknown)) {
            assert!(Instant::now() < deadline, "not pruned at the lane's start");
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.store(true, Ordering::Release);
        src.wake();
        assert!(
            lane.join().expect("lane").expect("next"),
            "stopped with no job"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    /// Lookups racing a consumer never lose sight of a job (they once did: looking at cur/ then
    /// new/ could fall between the claim's rename and miss it, and `submit --wait` answered
    /// "unknown id").
    #[test]
    fn lookups_racing_the_consumer_always_find_the_job() {
        let dir = tempdir("race");
        let spool = Spool::open(&dir, false).expect("open");
        let src = Arc::new(SpoolSource::open(&cfg(&dir, 3), 1 << 20).expect("open"));
        let ids: Vec<String> = (0..1000)
            .map(|i| {
                spool
                    .submit("echo", i.to_string().as_bytes())
                    .expect("submit")
            })
            .collect();
        let consumer = {
            let src = Arc::clone(&src);
            std::thread::spawn(move || {
                let mut lane = src.lane();
                let stop = AtomicBool::new(false);
                for _ in 0..1000 {
                    let job = lane.next(&stop).expect("next").expect("job");
                    lane.finish(&job, &Ok(Vec::new())).expect("finish");
                }
            })
        };
        let mut finished = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        while finished < ids.len() {
            assert!(
                Instant::now() < deadline,
                "{finished} of {} finished in 60 s",
                ids.len()
            );
            finished = 0;
            for id in &ids {
                match spool.lookup(id).expect("lookup") {
                    Lookup::Unknown => panic!("job {id} lost sight of while it moved"),
                    Lookup::Finished(_) => finished += 1,
                    _ => {}
                }
            }
        }
        consumer.join().expect("consumer");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_queue_listing_is_handed_over() {
        use std::os::fd::IntoRawFd;
        let dir = tempdir("handover");
        let spool = Spool::open(&dir, false).expect("open");
        let ids: Vec<String> = (0..5)
            .map(|i| spool.submit("echo", &[i]).expect("submit"))
            .collect();
        let stop = AtomicBool::new(false);
        let fd = {
            let src = Arc::new(SpoolSource::open(&cfg(&dir, 3), 1 << 20).expect("open"));
            let mut lane = src.lane();
            let first = lane.next(&stop).expect("next").expect("job");
            lane.finish(&first, &Ok(Vec::new())).expect("finish");
            src.hand_over().expect("a listing to hand over")
        };
        // A job claimed meanwhile by someone else is skipped, not an error.
        fs::remove_file(dir.join("new").join(&ids[2])).expect("rm");
        let src = Arc::new(SpoolSource::open(&cfg(&dir, 3), 1 << 20).expect("open"));
        src.take_over(fd.into_raw_fd());
        let mut lane = src.lane();
        let mut got = Vec::new();
        while let Some(job) = {
            let stop_now = AtomicBool::new(src.pending.lock().expect("lock").is_empty());
            lane.next(&stop_now).expect("next")
        } {
            got.push(job.id.clone());
            lane.finish(&job, &Ok(Vec::new())).expect("finish");
        }
        assert_eq!(got, [ids[1].clone(), ids[3].clone(), ids[4].clone()]);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn second_consumer_is_refused() {
        let dir = tempdir("lock");
        let _a = SpoolSource::open(&cfg(&dir, 3), 1 << 20).expect("open");
        let err = SpoolSource::open(&cfg(&dir, 3), 1 << 20)
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("in use by another worker"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }
}
