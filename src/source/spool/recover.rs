//! Keeping the spool sound: recovery of jobs a killed worker left in `cur/` (retried while the
//! disk is full), quarantine of entries that are no jobs (`rejected/`), abandoned temp files,
//! and pruning results past `retain_results`.

use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::text::ShowPath;

use super::format::*;
use super::source::SpoolSource;
use super::*;

impl SpoolSource {
    /// Puts jobs left in `cur/` by a killed worker back in the queue, or fails them for good once
    /// `max_attempts` runs were interrupted. One bad entry never stops the recovery: it is set
    /// aside in `rejected/`; a job that cannot be moved now (say, the disk is full) stays in
    /// `cur/` and is tried again with every housekeeping until it moves.
    /// Jobs in `carried` finished in the previous generation: their outcomes are committed now.
    pub(super) fn recover(&self, carried: &std::collections::HashSet<String>) -> Result<()> {
        let cur = self.spool.dir("cur");
        let mut left = Vec::new();
        for name in list_raw(&cur)? {
            let Some(id) = name.to_str().filter(|n| valid_id(n)).map(str::to_string) else {
                self.spool.reject_raw("cur", &name, "not a job id");
                continue;
            };
            if carried.contains(&id) {
                continue;
            }
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
    pub(super) fn retry_recovery(&self) {
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

    pub(super) fn recover_one(&self, id: &str) -> Result<()> {
        let path = self.spool.dir("cur").join(id);
        let finished = self.spool.read_finished(id);
        // A fault-injection build (tests only): the result cannot be read for want of
        // descriptors while the file GEARSHIFT_FAULT_READ_RESULT names exists.
        #[cfg(gearshift_faults)]
        let finished = crate::ops::faults::fail_while("GEARSHIFT_FAULT_READ_RESULT", finished);
        match finished {
            Ok(Some(_)) => {
                // Killed after storing the outcome but before leaving cur/: it is done.
                return remove(&path);
            }
            Ok(None) => {}
            // Not the record's fault (no descriptor, no memory, an I/O error: as for the job's
            // own file, `read_job`): it may hold an outcome, so the job is not run again on its
            // account; looked at again later.
            Err(e) if e.tier() == crate::error::Tier::Transient => return Err(e),
            Err(e) => {
                // A damaged result record: set it aside and run the job again.
                for sub in ["done", "failed"] {
                    self.spool
                        .reject_raw(sub, std::ffi::OsStr::new(id), &e.to_string());
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
    pub(super) fn read_job(
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
    pub(super) fn clean_tmp(&self) {
        let tmp = self.spool.dir("tmp");
        let Ok(names) = list_raw(&tmp) else { return };
        let cutoff = SystemTime::now() - TMP_ABANDONED;
        for name in names {
            let path = tmp.join(&name);
            let opened = open_entry(&path);
            // A fault-injection build (tests only): no descriptor to open it with while the
            // file GEARSHIFT_FAULT_OPEN_TMP names exists.
            #[cfg(gearshift_faults)]
            let opened = crate::ops::faults::emfile_while(
                "GEARSHIFT_FAULT_OPEN_TMP",
                "opening a file in tmp/",
                opened,
            );
            let (f, meta) = match opened {
                Ok(opened) => opened,
                // Renamed into place by its writer meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                // Root's `submit` creates its file and only then gives it to the worker's user:
                // one it cannot read yet, written within the last seconds, is such a file in
                // the making (it was set aside, and that submit failed). Older, it is not.
                Err(e)
                    if e.kind() == io::ErrorKind::PermissionDenied
                        && fs::symlink_metadata(&path)
                            .and_then(|m| m.modified())
                            .is_ok_and(|t| t > cutoff) =>
                {
                    continue
                }
                // No descriptor or memory now, or the disk fails: it may be a submit in the
                // making; looked at again at the next housekeeping.
                Err(e)
                    if e.raw_os_error()
                        .is_some_and(crate::error::is_transient_errno) =>
                {
                    continue
                }
                Err(e) => {
                    self.spool.reject_raw("tmp", &name, &e.to_string());
                    continue;
                }
            };
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
    pub(super) fn housekeeping(&self) {
        let Ok(mut next) = self.next_housekeeping.lock() else {
            return;
        };
        if Instant::now() < *next {
            return;
        }
        *next = Instant::now() + HOUSEKEEPING;
        drop(next);
        if let Some(gone) = self.spool.replaced() {
            // A worker that dropped its privileges may be unable to open (or make) the spool
            // at its path: its restart would die there. It serves on meanwhile (taking nothing
            // new), says why, and restarts once it can.
            if let Err(why) = self.spool.reopenable() {
                let said = format!(
                    "the spool directory \"{}\" is no longer the one this worker opened (removed or replaced while it ran), and this worker's user cannot open it again: {why}; no job is taken until it can (`gearshift restart`, or a `gearshift submit` by root, makes the spool for that user)",
                    gone.shown()
                );
                if !self.unopenable.swap(true, Ordering::AcqRel) {
                    log::error!("{said}");
                }
                crate::status::short_of_room(Some(said));
                return;
            }
            if !self.replaced.swap(true, Ordering::AcqRel) {
                log::error!(
                    "the spool directory \"{}\" is no longer the one this worker opened (removed or replaced while it ran): restarting to open it again",
                    gone.shown()
                );
                ON_REPLACED.call(());
            }
            return;
        }
        self.clean_tmp();
        self.retry_recovery();
        self.look_at_room();
    }

    /// Whether the spool takes new jobs (`room.rs`), said in the log and `status` while not.
    fn look_at_room(&self) {
        let room = self.spool.room_for_jobs(0);
        crate::status::short_of_room(
            room.as_ref()
                .err()
                .map(|e| format!("new jobs are refused: {e}")),
        );
        if let Ok(mut said) = self.short_of_room.lock() {
            match &room {
                Err(e) => said.failed(e),
                Ok(()) => said.worked(),
            }
        }
    }

    /// Deletes results past `retain_results`: at start and every tenth of the period, in a
    /// helper thread, so no claim ever waits for a sweep of every stored result.
    pub(super) fn prune(self: &Arc<Self>) {
        let Ok(mut next) = self.next_prune.lock() else {
            return;
        };
        if Instant::now() < *next || self.pruning.swap(true, Ordering::AcqRel) {
            return;
        }
        *next = Instant::now() + self.prune_every();
        drop(next);
        // Marked when it starts: a sweep cut short by a re-exec is not started again by every
        // generation of a restart storm, but one period later.
        self.mark_pruned();
        let dirs = ["done", "failed", "results"].map(|d| self.spool.dir(d));
        let (retain, running) = (self.retain, Arc::clone(&self.pruning));
        let spawned = crate::ops::signals::spawn_helper("spool-prune", move || {
            let cutoff = SystemTime::now().checked_sub(retain).unwrap_or(UNIX_EPOCH);
            let pruned: usize = dirs.iter().map(|d| prune_older(d, cutoff)).sum();
            running.store(false, Ordering::Release);
            if pruned > 0 {
                log::info!(
                    "pruned {pruned} result(s) older than retain_results ({}s): `gearshift result` no longer knows them",
                    retain.as_secs()
                );
            }
        });
        if spawned.is_err() {
            self.pruning.store(false, Ordering::Release);
        }
        self.helper_started("the sweep of old results", spawned.map(drop));
    }

    /// How often old results are looked for: a tenth of `retain_results`, 1 min .. 1 h.
    pub(super) fn prune_every(&self) -> Duration {
        (self.retain / 10).clamp(Duration::from_secs(60), Duration::from_secs(3600))
    }

    /// When the next sweep is due: a period after the last one (the mtime of `.pruned`, so
    /// restarts do not sweep again), and never in a generation's first [`PRUNE_SETTLE`].
    pub(super) fn first_prune(spool: &Spool, every: Duration) -> Instant {
        let now = Instant::now();
        let last = spool
            .top
            .file(PRUNED, crate::ops::safefs::Open::READ)
            .ok()
            .and_then(|o| o.file.metadata().ok())
            .and_then(|m| m.modified().ok());
        let wait = last
            .and_then(|t| (t + every).duration_since(SystemTime::now()).ok())
            .map_or(Duration::ZERO, |d| d.min(every));
        now + wait.max(PRUNE_SETTLE)
    }

    /// Records that a sweep started now.
    fn mark_pruned(&self) {
        let how = crate::ops::safefs::Open {
            write: true,
            append: false,
            create: Some(0o640),
        };
        let marked = self.spool.top.file(PRUNED, how).and_then(|o| {
            o.file
                .set_modified(SystemTime::now())
                .map_err(|e| Error::io("marking the sweep of old results", e))
        });
        if let Err(e) = marked {
            log::debug!("{PRUNED}: {e}");
        }
    }

    /// Sets aside `cur/ID`, which cannot be used as a job at all, in `rejected/`.
    pub(super) fn reject(&self, id: &str, why: &str) {
        self.spool.reject_raw("cur", std::ffi::OsStr::new(id), why);
    }
}

/// Told when the spool's directories are found removed or replaced (see `housekeeping`).
static ON_REPLACED: crate::ops::hook::Hook<()> = crate::ops::hook::Hook::new();

/// Calls `then` when the housekeeping finds the spool at its path no longer the one this
/// worker opened (the worker then restarts to open it again).
pub fn on_replaced(then: impl Fn() + Send + 'static) {
    ON_REPLACED.set(move |()| then());
}

impl Spool {
    /// The first of the spool's directories that is no longer the one at its path (an
    /// operator's `rm -rf`, a directory put in its place, a remount), if any: this handle then
    /// reads and writes where nobody else looks.
    pub(super) fn replaced(&self) -> Option<PathBuf> {
        if !self.top.still_at(&self.root) {
            return Some(self.root.clone());
        }
        let mut subs = SUBDIRS.iter().zip(self.dirs.iter());
        subs.find(|(sub, d)| !d.still_at(&self.dir(sub)))
            .map(|(sub, _)| self.dir(sub))
    }

    /// Whether this process can open the spool at its path again, once it was found
    /// [`Spool::replaced`]: as root always; else each of its directories there must be this
    /// user's, and the first one missing one this user could make (`safefs::could_create`;
    /// the new generation makes it and what goes under it). Err: why not.
    pub(super) fn reopenable(&self) -> std::result::Result<(), String> {
        let me = nix::unistd::geteuid();
        if me.is_root() {
            return Ok(());
        }
        let paths = std::iter::once(self.root.clone()).chain(SUBDIRS.iter().map(|s| self.dir(s)));
        for (n, path) in paths.enumerate() {
            // The spool's own path may lead through a link; its subdirectories may not.
            let meta = match n {
                0 => fs::metadata(&path),
                _ => fs::symlink_metadata(&path),
            };
            match meta {
                Ok(m) if m.is_dir() && m.uid() == me.as_raw() => {}
                Ok(m) if m.is_dir() => {
                    return Err(format!(
                        "\"{}\" belongs to uid {}, not to this worker's user (uid {me})",
                        path.shown(),
                        m.uid()
                    ))
                }
                Ok(_) => return Err(format!("\"{}\" is no directory", path.shown())),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    return crate::ops::safefs::could_create(&path).map_err(|e| {
                        format!(
                            "\"{}\" is missing, and this worker's user (uid {me}) cannot make it ({e})",
                            path.shown()
                        )
                    });
                }
                Err(e) => return Err(format!("\"{}\": {e}", path.shown())),
            }
        }
        Ok(())
    }

    /// Moves the entry `sub/name` (whatever it is) into `rejected/`, with the reason in the log
    /// and the count in `status`. Never fails the caller: at worst it says it could not.
    pub(super) fn reject_raw(&self, sub: &str, name: &std::ffi::OsStr, why: &str) {
        let from = self.dir(sub).join(name);
        let rejected = self.dir("rejected");
        let mut to = rejected.join(name);
        let mut moved = set_aside(&from, &to);
        // Taken: a name of its own, never one an earlier generation gave (the pid is the same
        // across an exec, the count starts again), and never over what is there.
        for _ in 0..8 {
            if !matches!(&moved, Err(e) if e.kind() == io::ErrorKind::AlreadyExists) {
                break;
            }
            let suffix = format!("{:x}-{}", order::boottime_ns(), order::unique());
            to = rejected.join(suffixed(name, &suffix));
            moved = set_aside(&from, &to);
        }
        match moved {
            Ok(()) => {
                crate::status::REJECTED.fetch_add(1, Ordering::Relaxed);
                log::error!(
                    "{sub}/{}: {why}; rejected: set aside as \"{}\"",
                    name.to_string_lossy(),
                    to.shown()
                );
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            // Met again at every listing: said once (for the first UNMOVABLE_SAID entries).
            Err(e) if !first_time(&from) => log::debug!("{sub}/{:?}: {e}", name),
            Err(e) => log::error!(
                "{sub}/{}: {why}; and it cannot be set aside ({e}): remove it",
                name.to_string_lossy()
            ),
        }
    }
}

/// Renames `from` to `to` unless something is at `to` (AlreadyExists). A file system without
/// `RENAME_NOREPLACE` gets a look first (a race with whoever plants there is then possible).
fn set_aside(from: &std::path::Path, to: &std::path::Path) -> io::Result<()> {
    use nix::fcntl::{renameat2, RenameFlags};
    match renameat2(None, from, None, to, RenameFlags::RENAME_NOREPLACE) {
        Err(nix::errno::Errno::EINVAL) if fs::symlink_metadata(to).is_ok() => {
            Err(io::ErrorKind::AlreadyExists.into())
        }
        Err(nix::errno::Errno::EINVAL) => fs::rename(from, to),
        done => done.map_err(io::Error::from),
    }
}

/// How many entries that could not be set aside are remembered, so that each is said once.
const UNMOVABLE_SAID: usize = 1024;

/// Whether the entry at `path` that cannot be set aside is met for the first time.
fn first_time(path: &std::path::Path) -> bool {
    static SAID: std::sync::Mutex<std::collections::BTreeSet<PathBuf>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let mut said = SAID.lock().unwrap_or_else(|p| p.into_inner());
    said.len() < UNMOVABLE_SAID && said.insert(path.to_path_buf())
}

/// `name.SUFFIX`, `name` cut first so that the whole is a file name (at most 255 bytes).
fn suffixed(name: &std::ffi::OsStr, suffix: &str) -> std::ffi::OsString {
    use std::os::unix::ffi::{OsStrExt, OsStringExt};
    const NAME_MAX: usize = 255;
    let bytes = name.as_bytes();
    let keep = bytes.len().min(NAME_MAX.saturating_sub(suffix.len() + 1));
    let mut out = bytes[..keep].to_vec();
    out.push(b'.');
    out.extend_from_slice(suffix.as_bytes());
    std::ffi::OsString::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_cut_to_make_room_for_its_suffix() {
        let long = "x".repeat(250);
        let named = suffixed(std::ffi::OsStr::new(&long), "1a2b-3");
        assert_eq!(named.len(), 255);
        assert!(named.to_string_lossy().ends_with("x.1a2b-3"));
        let short = suffixed(std::ffi::OsStr::new("job"), "1a2b-3");
        assert_eq!(short, "job.1a2b-3");
    }

    #[test]
    fn an_entry_that_cannot_be_set_aside_is_said_once() {
        let path = std::path::Path::new("/nonexistent/said-once-unit");
        assert!(first_time(path));
        assert!(!first_time(path));
    }
}
