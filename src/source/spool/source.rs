//! The consuming side of the spool: claiming, finishing, recovery, quarantine, housekeeping,
//! the lanes and their waker.

use crate::shutdown::Shutdown;
use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};

use crate::clock::now_ms;
use crate::config::SpoolConfig;
use crate::error::{Error, Result};
use crate::jobs::functions::{JobResult, Progress};
use crate::source::lane::{Claimed, Lane};

use super::format::*;
use super::*;

/// The consuming side: held by the one worker that runs this spool's jobs. Idle lanes sleep
/// until [`SpoolSource::wake`], which the worker's inotify thread calls on events in `new/`.
pub struct SpoolSource {
    pub(super) spool: Spool,
    pub(super) max_attempts: u32,
    pub(super) retain: Duration,
    pub(super) pending: Mutex<VecDeque<String>>,
    pub(super) waker: Arc<Waker>,
    pub(super) next_prune: Mutex<Instant>,
    pub(super) next_housekeeping: Mutex<Instant>,
    /// Interrupted jobs the start-up recovery could not move (say, on a full disk): retried
    /// with the housekeeping until they are.
    pub(super) unrecovered: Mutex<Vec<String>>,
    /// The largest entry accepted as a job: max_payload_bytes plus header room.
    pub(super) max_entry: u64,
    pub(super) _lock: Flock<File>,
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
            unrecovered: Mutex::new(Vec::new()),
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
    /// `cur/` and is tried again with every housekeeping until it moves.
    fn recover(&self) -> Result<()> {
        let cur = self.spool.dir("cur");
        let mut left = Vec::new();
        for name in list_raw(&cur)? {
            let Some(id) = name.to_str().filter(|n| valid_id(n)).map(str::to_string) else {
                self.reject_raw("cur", &name, "not a job id");
                continue;
            };
            if let Err(e) = self.recover_one(&id) {
                log::error!(
                    "job {id}: cannot recover it now ({e}); it stays in cur/ and is tried again every {}s",
                    HOUSEKEEPING.as_secs()
                );
                left.push(id);
            }
        }
        if let Ok(mut u) = self.unrecovered.lock() {
            *u = left;
        }
        Ok(())
    }

    /// Tries again the interrupted jobs the start-up recovery could not move. Only those: any
    /// other entry in `cur/` is a job this worker runs now.
    fn retry_recovery(&self) {
        let Ok(mut left) = self.unrecovered.lock() else {
            return;
        };
        let before = left.len();
        left.retain(|id| match self.recover_one(id) {
            Ok(()) => false,
            Err(e) => {
                log::debug!("job {id}: still cannot recover it ({e})");
                true
            }
        });
        if left.len() < before {
            log::info!(
                "recovered {} interrupted job(s) left in cur/ at start-up",
                before - left.len()
            );
            self.wake();
        }
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

    /// Every [`HOUSEKEEPING`]: abandoned temp files, interrupted jobs not yet recovered.
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
        self.retry_recovery();
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
        let pruned: usize = ["done", "failed"]
            .iter()
            .map(|sub| prune_older(&self.spool.dir(sub), cutoff))
            .sum();
        if pruned > 0 {
            log::info!(
                "pruned {pruned} result(s) older than retain_results ({}s): `gearshift result` no longer knows them",
                self.retain.as_secs()
            );
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
            renamed.push(format!(".{}", order::unique()));
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
                        oversized: None,
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
}

/// The spool as the worker sees every source.
impl crate::source::JobSource for Arc<SpoolSource> {
    fn lane(
        &self,
        _index: usize,
        _functions: &[(String, Option<Duration>)],
    ) -> Result<Box<dyn Lane>> {
        Ok(SpoolSource::lane(self))
    }

    fn wake(&self) {
        SpoolSource::wake(self);
    }

    /// Writes the sorted list of queued ids this worker already knows into a memfd for the next
    /// generation, which then claims at once instead of listing `new/` (about 1 µs per queued
    /// job). Only a hint: an id that is gone by then is skipped at claim, and jobs queued later
    /// are found by the next listing, in order.
    fn hand_over(&self) -> Option<std::os::fd::OwnedFd> {
        let pending = self.pending.lock().ok()?;
        if pending.is_empty() {
            return None;
        }
        let mut text = String::with_capacity(pending.len() * 32);
        for id in pending.iter() {
            text.push_str(id);
            text.push('\n');
        }
        crate::ops::handover::memfd("pending", text.as_bytes())
    }

    /// Takes the list a previous generation handed over.
    fn take_over(&self, fd: std::os::fd::RawFd) {
        // Ids are at most 64 bytes: a listing of a million of them fits.
        let Some(data) = crate::ops::handover::read_memfd(Some(fd), "pending", 80 << 20) else {
            return;
        };
        let text = String::from_utf8_lossy(&data);
        if let Ok(mut pending) = self.pending.lock() {
            if pending.is_empty() {
                pending.extend(text.lines().filter(|l| valid_id(l)).map(String::from));
            }
        }
    }

    fn queue_stats(&self) -> Option<crate::metrics::QueueStats> {
        Some(self.spool.queue_stats())
    }

    /// `new/`: its events mean "new jobs".
    fn watch_dirs(&self) -> Vec<PathBuf> {
        vec![self.spool.dir("new")]
    }
}

pub(super) struct SpoolLane {
    source: Arc<SpoolSource>,
    started_ms: u64,
    /// The current job's id and progress lines logged so far (a job may write millions).
    job: String,
    progress_lines: u64,
}

/// Progress lines of one job that reach the log; the rest are counted and summarised.
pub(super) const PROGRESS_LOG_LINES: u64 = 10;

impl Lane for SpoolLane {
    fn next(&mut self, stop: &Shutdown) -> Result<Option<Claimed>> {
        loop {
            if stop.is_set() {
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
            if stop.is_set() {
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
pub(super) fn lossy_prefix(data: &[u8]) -> String {
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
