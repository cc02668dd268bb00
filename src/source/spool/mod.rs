//! The embedded durable queue: a maildir-style directory.
//!
//! ```text
//! dir/tmp/     files being written (never read by the worker)
//! dir/new/     queued jobs, named by id; ids sort by submit time (order.rs)
//! dir/cur/     jobs a worker has claimed (by rename from new/)
//! dir/done/    result records of succeeded jobs
//! dir/failed/  result records of failed jobs
//! dir/.lock    flock held by the one worker consuming this spool
//! dir/.epoch   how many boots have submitted here (ids sort by it, then by boot time)
//! ```
//!
//! A job is written to `tmp/`, fsynced and renamed into `new/` (then `new/` is fsynced), so a
//! submit that returned is on disk. A worker claims a job by renaming it into `cur/`; its result
//! record is written to `tmp/`, fsynced and renamed into `done/` or `failed/` before the job
//! leaves `cur/`. A job found in `cur/` when a worker starts was interrupted (the worker was
//! killed): it goes back to `new/` with one more attempt counted, or to `failed/` once
//! `max_attempts` runs were interrupted. Nothing is ever lost, whatever is killed when.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nix::unistd::{geteuid, Gid, Uid};

use crate::clock::now_ms;
use crate::config::SpoolConfig;
use crate::error::{Error, IoContext, Result};
use crate::ops::privilege::Target;
use crate::ops::safefs::{Dir, Open};
use crate::text::ShowPath;

mod carry;
mod commit;
mod direct;
mod format;
mod ingest;
mod journal;
mod lane;
mod listing;
mod lock;
mod order;
pub(crate) mod recover;
mod replay;
mod results;
mod room;
mod source;
mod wait;

pub use direct::Feed;
use format::*;
pub use ingest::BatchWriter;
pub use source::SpoolSource;

/// Room for a job file's header beyond its payload.
pub(super) const HEADER_ROOM: u64 = 64 * 1024;
/// The largest file any worker writes in the spool (a record of the largest payload or result
/// `max_payload_bytes` allows): nothing larger is read.
pub(super) const MAX_ENTRY: u64 = crate::config::MAX_PAYLOAD + HEADER_ROOM;
/// Unlocked files in `tmp/` older than this were abandoned by a killed writer.
pub(super) const TMP_ABANDONED: Duration = Duration::from_secs(5);
/// Queued ids a generation hands to the next (see `SpoolSource::hand_over`).
pub(super) const HANDOVER_HEAD: usize = 1024;
/// Fewer queued ids than this left of a hand-over: the rest of `new/` is listed (a helper).
pub(super) const HANDOVER_LOW: usize = 512;
/// No sweep of old results in a generation's first second (its first claims come first).
pub(super) const PRUNE_SETTLE: Duration = Duration::from_secs(1);
/// The spool's file whose mtime says when old results were last looked for.
pub(super) const PRUNED: &str = ".pruned";
/// How often the worker looks for abandoned files in `tmp/` (and for results to prune).
pub(super) const HOUSEKEEPING: Duration = Duration::from_secs(5);
/// A re-exec'd generation's first housekeeping: soon, but after its first claims (only
/// restarts more often than this for as long as they last put it off).
pub(super) const RESUMED_HOUSEKEEPING: Duration = Duration::from_millis(250);

/// The spool's subdirectories (`rejected/` holds entries set aside as unusable, `results/` the
/// outcomes of jobs that never had a file: `results.rs`).
pub(super) const SUBDIRS: [&str; 8] = [
    "tmp", "new", "cur", "done", "failed", "rejected", "journal", "results",
];

/// The spool's directories. Cheap to open; used by submitters, `result`, and the worker.
pub struct Spool {
    pub(super) root: PathBuf,
    pub(super) fsync: bool,
    /// Run as root in a spool another user owns (the worker's): what we create is given to
    /// that user, through its descriptor, so the worker can read it.
    pub(super) give_to: Option<(Uid, Gid)>,
    /// The subdirectories, opened once (in [`SUBDIRS`] order, shared by [`Spool::share`]): files
    /// are created and moved relative to them, so a link planted in place of one is never followed.
    pub(super) dirs: Arc<[Dir]>,
    /// The spool directory itself (for `.epoch`).
    pub(super) top: Arc<Dir>,
    /// This boot's epoch, once a submit has needed it.
    pub(super) epoch: std::sync::OnceLock<u32>,
    /// Where this handle appends the outcomes of jobs without a file (`results.rs`).
    results: results::Log,
    /// Room kept for results: no new job is taken while less is free (`room.rs`).
    min_free: crate::config::MinFree,
}

/// Whether a job succeeded or failed, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The function returned a result.
    Done,
    /// The function failed (or timed out); [`Record::error`] says why.
    Failed,
}

/// A finished job's stored outcome.
#[derive(Debug, Clone)]
pub struct Record {
    /// The job's id, as [`Spool::submit`] returned it.
    pub id: String,
    /// Done or failed.
    pub outcome: Outcome,
    /// The function that was asked for.
    pub function: String,
    /// How many runs were started (interrupted runs included).
    pub attempts: u32,
    /// When the job was submitted (milliseconds since the Unix epoch).
    pub submitted_ms: u64,
    /// When its last run started (milliseconds since the Unix epoch).
    pub started_ms: u64,
    /// When it ended (milliseconds since the Unix epoch).
    pub finished_ms: u64,
    /// Why it failed.
    pub error: Option<String>,
    /// The result bytes (empty for a failure).
    pub result: Vec<u8>,
}

/// Where a job is now.
#[derive(Debug)]
pub enum Lookup {
    /// It ended; here is its stored outcome.
    Finished(Record),
    /// Waiting for a worker.
    Queued,
    /// A worker is running it.
    Running,
    /// No such job (never submitted, or its result was pruned).
    Unknown,
}

/// How a [`Spool`] writes.
#[derive(Debug, Clone, Copy)]
pub struct SpoolOptions {
    /// fsync every job and result file and the directory it is renamed into, so a submit that
    /// returned survives a crash or a power cut (the default, and what the worker's config
    /// says unless `[source] fsync = false`). Off only for a benchmark or a throwaway queue.
    pub fsync: bool,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions { fsync: true }
    }
}

impl Spool {
    /// Opens the spool at `dir` as [`SpoolOptions`] say (`SpoolOptions::default()`: durable).
    pub fn open_with(dir: &Path, options: &SpoolOptions) -> Result<Spool> {
        Spool::open(dir, options.fsync)
    }

    /// Opens the spool at `dir`, creating its directories when missing. `fsync`: see
    /// [`SpoolOptions::fsync`] (prefer [`Spool::open_with`], which names it).
    /// Each subdirectory must be a real directory: a link or anything else planted in its
    /// place is refused with its path.
    pub fn open(dir: &Path, fsync: bool) -> Result<Spool> {
        let root = Dir::create(dir, 0o750)?;
        let (uid, gid) = root.owner();
        let give_to = (geteuid().is_root() && !uid.is_root()).then_some((uid, gid));
        let mut dirs = Vec::with_capacity(SUBDIRS.len());
        for sub in SUBDIRS {
            let d = root.sub(sub, Some(0o750)).map_err(|e| not_ours(e, &root))?;
            if let Some((uid, gid)) = give_to.filter(|_| d.owner().0.is_root()) {
                d.chown(uid, gid)?;
            }
            dirs.push(d);
        }
        Ok(Spool {
            root: dir.to_path_buf(),
            fsync,
            give_to,
            dirs: dirs.into(),
            top: Arc::new(root),
            epoch: std::sync::OnceLock::new(),
            results: results::Log::default(),
            min_free: crate::config::MinFree::default(),
        })
    }

    /// Another handle on the same opened directories (no system call: the group commit's, in
    /// the restart pause), with its own results log and epoch.
    pub(super) fn share(&self) -> Spool {
        Spool {
            root: self.root.clone(),
            fsync: self.fsync,
            give_to: self.give_to,
            dirs: Arc::clone(&self.dirs),
            top: Arc::clone(&self.top),
            epoch: std::sync::OnceLock::new(),
            results: results::Log::default(),
            min_free: self.min_free,
        }
    }

    pub(crate) fn from_config(cfg: &SpoolConfig) -> Result<Spool> {
        let mut spool = Spool::open(&cfg.dir, cfg.fsync)?;
        spool.set_min_free(cfg.min_free);
        Ok(spool)
    }

    fn dir(&self, sub: &str) -> PathBuf {
        self.root.join(sub)
    }

    /// Enqueues a job durably and returns its id.
    pub fn submit(&self, function: &str, payload: &[u8]) -> Result<String> {
        crate::config::check_function_name(function).map_err(Error::Msg)?;
        self.room_for_jobs(payload.len() as u64)?;
        let id = self.new_id().map_err(|e| self.not_ours(e))?;
        let job = JobFile {
            function: function.to_string(),
            submitted_ms: now_ms(),
            attempts: 0,
            payload: payload.to_vec(),
        };
        self.publish(&encode_job(&job), &id, "new")
            .map_err(|e| self.not_ours(e))?;
        Ok(id)
    }

    /// [`not_ours`] for this spool (a member of the worker's group may read it, not write).
    pub(super) fn not_ours(&self, e: Error) -> Error {
        not_ours(e, &self.top)
    }

    /// Writes `bytes` to tmp/, fsyncs, renames to `sub/id` and fsyncs `sub/`.
    fn publish(&self, bytes: &[u8], id: &str, sub: &str) -> Result<()> {
        self.publish_with(bytes, id, sub, self.fsync)
    }

    /// [`Spool::publish`], syncing only with `sync` (not when the journal holds the bytes).
    pub(super) fn publish_with(&self, bytes: &[u8], id: &str, sub: &str, sync: bool) -> Result<()> {
        let name = format!("{id}.{}", order::unique());
        let tmp = self.dir("tmp").join(&name);
        let tmp_dir = self.opened("tmp")?;
        let mut f = tmp_dir.create_new(&name, 0o640)?;
        // Held until the file is renamed away: the worker's clean-up of abandoned files in
        // tmp/ never touches one whose writer is alive. Not needed when the journal holds the
        // bytes (`!sync`): the file lives microseconds, and were it cleaned up, the rename
        // fails and the write is done again from memory.
        if sync {
            crate::ops::safefs::flock(f.as_raw_fd(), libc::LOCK_EX)
                .map_err(|e| Error::io_path("locking", &tmp, e.into()))?;
        }
        let written = (|| {
            if let Some((uid, gid)) = self.give_to {
                crate::ops::safefs::chown_file(&f, &tmp, uid, gid)?;
            }
            f.write_all(bytes).at("writing", &tmp)?;
            if sync {
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
                format!("renaming \"{}\" to \"{}\"", tmp.shown(), dest.shown()),
                e,
            ));
        }
        if sync {
            dest_dir.sync()?;
        }
        Ok(())
    }

    /// A new job id, after every id made before it here (see `order.rs`).
    fn new_id(&self) -> Result<String> {
        if let Some(e) = self.epoch.get() {
            return Ok(order::job_id(*e));
        }
        let e = order::advance(&self.top, self.fsync, |f, name| match self.give_to {
            Some((uid, gid)) => crate::ops::safefs::chown_file(f, &self.root.join(name), uid, gid),
            None => Ok(()),
        })?;
        Ok(order::job_id(*self.epoch.get_or_init(|| e)))
    }

    /// The opened subdirectory `sub`.
    fn opened(&self, sub: &str) -> Result<&Dir> {
        SUBDIRS
            .iter()
            .position(|s| *s == sub)
            .and_then(|i| self.dirs.get(i))
            .ok_or_else(|| Error::Internal(format!("no spool directory \"{sub}\"")))
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
        if self.opened("new")?.has(id) {
            return Ok(Lookup::Queued);
        }
        if self.opened("cur")?.has(id) {
            return Ok(Lookup::Running);
        }
        if let Some(r) = self.read_finished(id)? {
            return Ok(Lookup::Finished(r));
        }
        // A job that never had a file (`results.rs`); only looked for once it is nowhere else.
        if let Some(bytes) = results::find(self, id) {
            return decode_record(id, &bytes)
                .map(Lookup::Finished)
                .map_err(|why| {
                    Error::Invalid(format!("corrupt result record of {id} in results/: {why}"))
                });
        }
        // Accepted and answered, its file not written yet (a full disk): looked at before
        // new/, where placing it would put it.
        Ok(
            if ingest::journaled(self, id) || self.opened("new")?.has(id) {
                Lookup::Queued
            } else {
                Lookup::Unknown
            },
        )
    }

    fn read_finished(&self, id: &str) -> Result<Option<Record>> {
        // Through the directories' descriptors, bounded: root reads here for `result`.
        for sub in ["done", "failed"] {
            if let Some(bytes) = self.opened(sub)?.read_small(id, MAX_ENTRY)? {
                return decode_record(id, &bytes).map(Some).map_err(|why| {
                    Error::Invalid(format!(
                        "corrupt result record \"{}\": {why}",
                        self.dir(sub).join(id).shown()
                    ))
                });
            }
        }
        Ok(None)
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
        return Err(Error::Unsafe(format!(
            "spool \"{}\" is owned by uid {} (mode {:o}), neither root nor user \"{}\"; fix: chown -R {} \"{}\"",
            cfg.dir.shown(),
            root.owner().0,
            root.mode(),
            t.name,
            t.name,
            cfg.dir.shown()
        )));
    }
    if let Some(name) = foreign_entry(&root)? {
        return Err(Error::Unsafe(format!(
            "spool \"{}\" holds \"{}\", which is not a spool's: giving the directory to user \"{}\" would let every job rename what is in it; point [source] dir at a directory of its own",
            cfg.dir.shown(),
            crate::text::escape(&name.to_string_lossy()),
            t.name
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
                    crate::ops::safefs::chown_file(&o.file, &d.path().join(&name), t.uid, t.gid)?;
                }
            }
        }
        d.chown(t.uid, t.gid)?;
    }
    if let Ok(o) = root.file(".lock", Open::READ) {
        crate::ops::safefs::chown_file(&o.file, &cfg.dir.join(".lock"), t.uid, t.gid)?;
    }
    root.chown(t.uid, t.gid)
}

/// The first entry of a spool directory root is about to give away that no spool has there
/// (its subdirectories, `.lock`, `.epoch` and its temporary files; `lost+found` of a spool on
/// a filesystem of its own).
fn foreign_entry(dir: &Dir) -> Result<Option<std::ffi::OsString>> {
    let ours = |n: &str| {
        SUBDIRS.contains(&n)
            || [".lock", ".epoch", "lost+found"].contains(&n)
            || (n.starts_with(".epoch.") && n.ends_with(".tmp"))
    };
    dir.first_name_not(ours)
}

/// A spool another user owns, opened or written by a user who may not (`submit` or `result`
/// run as neither root nor the worker's user; `submit` by a member of its group): says whose
/// it is and who may, instead of only `Permission denied` on one of its files.
fn not_ours(e: Error, root: &Dir) -> Error {
    let denied =
        matches!(&e, Error::Io { source, .. } if source.raw_os_error() == Some(libc::EACCES));
    let (owner, me) = (root.owner().0, geteuid());
    if !denied || me.is_root() || me == owner {
        return e;
    }
    let who = |uid: Uid| match nix::unistd::User::from_uid(uid) {
        Ok(Some(u)) => format!("user \"{}\" (uid {uid})", u.name),
        _ => format!("uid {uid}"),
    };
    Error::Msg(format!(
        "the spool \"{}\" belongs to {} (mode {:o}) and this runs as {}: run this as root or as that user ({e})",
        root.path().shown(),
        who(owner),
        root.mode(),
        who(me)
    ))
}

/// Whether `id` can be a job id (hex digits and dashes, at most 64): anything else is no file of
/// the spool's, whatever it holds.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

/// Every entry of `dir` but dot files, names as they are (not necessarily UTF-8).
pub(super) fn list_raw(dir: &Path) -> Result<Vec<std::ffi::OsString>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).at("listing", dir)? {
        let name = entry.at("listing", dir)?.file_name();
        if !name.as_encoded_bytes().starts_with(b".") {
            out.push(name);
        }
    }
    Ok(out)
}

pub(super) fn remove(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(Error::io_path("removing", path, e)),
        _ => Ok(()),
    }
}

pub(super) fn prune_older(dir: &Path, cutoff: SystemTime) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut pruned = 0;
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t < cutoff);
        if old && fs::remove_file(entry.path()).is_ok() {
            pruned += 1;
        }
    }
    pruned
}

#[cfg(test)]
mod tests {
    use super::format::*;
    use super::*;
    use crate::shutdown::{Shutdown, Switch};
    use crate::source::JobSource;
    use std::sync::Arc;
    use std::time::Instant;

    fn cfg(dir: &Path, max_attempts: u32) -> SpoolConfig {
        SpoolConfig {
            min_free: crate::config::MinFree::Bytes(0),
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
        let dir = crate::testutil::tempdir("spool", "flow");
        let src = Arc::new(SpoolSource::open(&cfg(&dir, 3), 1 << 20, false, None).expect("open"));
        let spool = Spool::open(&dir, false).expect("open");
        let a = spool.submit("echo", b"one").expect("submit");
        let b = spool.submit("echo", b"two").expect("submit");
        assert!(matches!(spool.lookup(&a), Ok(Lookup::Queued)));
        assert!(matches!(spool.lookup("ffff-1-1"), Ok(Lookup::Unknown)));
        assert!(matches!(spool.lookup("../etc/passwd"), Ok(Lookup::Unknown)));

        let mut lane = src.lane();
        let stop = Switch::default();
        let job = lane.next(&stop.handle()).expect("next").expect("a job");
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
        let job = lane.next(&stop.handle()).expect("next").expect("b");
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
        stop.trigger();
        assert!(lane.next(&stop.handle()).expect("next").is_none());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn interrupted_jobs_are_requeued_then_failed() {
        let dir = crate::testutil::tempdir("spool", "recover");
        let spool = Spool::open(&dir, false).expect("open");
        let id = spool.submit("echo", b"x").expect("submit");
        let stop = Switch::default();
        for round in 1..=3 {
            let src =
                Arc::new(SpoolSource::open(&cfg(&dir, 3), 1 << 20, false, None).expect("open"));
            let job = src.lane().next(&stop.handle()).expect("next").expect("job");
            assert_eq!(job.attempt, round);
            // Dropping the source without finishing is what a kill -9 leaves behind.
        }
        let src = Arc::new(SpoolSource::open(&cfg(&dir, 3), 1 << 20, false, None).expect("open"));
        assert!(src
            .lane()
            .next(&Shutdown::fixed(true))
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
    fn old_results_are_pruned_after_start_once_per_period_across_restarts() {
        let dir = crate::testutil::tempdir("spool", "retain");
        let mut c = cfg(&dir, 3);
        let spool = Spool::open(&dir, false).expect("open");
        let id = spool.submit("echo", b"x").expect("submit");
        {
            let src = Arc::new(SpoolSource::open(&c, 1 << 20, false, None).expect("open"));
            let mut lane = src.lane();
            let job = lane
                .next(&Shutdown::fixed(false))
                .expect("next")
                .expect("job");
            lane.finish(&job, &Ok(b"x".to_vec())).expect("finish");
        }
        assert!(matches!(spool.lookup(&id), Ok(Lookup::Finished(_))));
        // Within the retention period: kept.
        let src = Arc::new(SpoolSource::open(&c, 1 << 20, false, None).expect("open"));
        assert!(src
            .lane()
            .next(&Shutdown::fixed(true))
            .expect("next")
            .is_none());
        assert!(matches!(spool.lookup(&id), Ok(Lookup::Finished(_))));
        drop(src);
        std::thread::sleep(Duration::from_millis(20));
        c.retain_results = Duration::from_millis(10);
        let src = Arc::new(SpoolSource::open(&c, 1 << 20, false, None).expect("open"));
        // A lane starts the sweep (in its own thread) once the generation's first second is
        // over: run one on an empty queue.
        let stop = Switch::default();
        let lane = {
            let (src, stop) = (Arc::clone(&src), stop.handle());
            std::thread::spawn(move || src.lane().next(&stop).map(|j| j.is_none()))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !matches!(spool.lookup(&id), Ok(Lookup::Unknown)) {
            assert!(Instant::now() < deadline, "not pruned soon after the start");
            std::thread::sleep(Duration::from_millis(5));
        }
        stop.trigger();
        src.wake();
        assert!(
            lane.join().expect("lane").expect("next"),
            "stopped with no job"
        );
        // The sweep is remembered: the next generation does not sweep again for a period.
        let next = SpoolSource::first_prune(&src.spool, src.prune_every());
        assert!(next > Instant::now() + Duration::from_secs(50));
        let _ = fs::remove_dir_all(&dir);
    }

    /// Lookups racing a consumer never lose sight of a job (they once did: looking at cur/ then
    /// new/ could fall between the claim's rename and miss it, and `submit --wait` answered
    /// "unknown id").
    #[test]
    fn lookups_racing_the_consumer_always_find_the_job() {
        let dir = crate::testutil::tempdir("spool", "race");
        let spool = Spool::open(&dir, false).expect("open");
        let src = Arc::new(SpoolSource::open(&cfg(&dir, 3), 1 << 20, false, None).expect("open"));
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
                let stop = Switch::default();
                for _ in 0..1000 {
                    let job = lane.next(&stop.handle()).expect("next").expect("job");
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
        let dir = crate::testutil::tempdir("spool", "handover");
        let spool = Spool::open(&dir, false).expect("open");
        let ids: Vec<String> = (0..5)
            .map(|i| spool.submit("echo", &[i]).expect("submit"))
            .collect();
        let stop = Switch::default();
        let handed = {
            let src =
                Arc::new(SpoolSource::open(&cfg(&dir, 3), 1 << 20, false, None).expect("open"));
            let mut lane = src.lane();
            let first = lane.next(&stop.handle()).expect("next").expect("job");
            lane.finish(&first, &Ok(Vec::new())).expect("finish");
            src.hand_over().expect("a listing to hand over")
        };
        // A job claimed meanwhile by someone else is skipped, not an error.
        fs::remove_file(dir.join("new").join(&ids[2])).expect("rm");
        let src = Arc::new(SpoolSource::open(&cfg(&dir, 3), 1 << 20, false, None).expect("open"));
        src.take_over(&handed);
        let mut lane = src.lane();
        let mut got = Vec::new();
        while let Some(job) = {
            let stop_now = Shutdown::fixed(src.pending.lock().expect("lock").is_empty());
            lane.next(&stop_now).expect("next")
        } {
            got.push(job.id.clone());
            lane.finish(&job, &Ok(Vec::new())).expect("finish");
        }
        assert_eq!(got, [ids[1].clone(), ids[3].clone(), ids[4].clone()]);
        let _ = fs::remove_dir_all(&dir);
    }

    /// A deep queue: only its head crosses the exec (reading it costs the same at any depth),
    /// the rest is listed in the background, and every job is claimed once, in order.
    #[test]
    fn a_deep_queue_hands_over_its_head_and_the_rest_is_listed_behind_it() {
        let dir = crate::testutil::tempdir("spool", "deep");
        let spool = Spool::open(&dir, false).expect("open");
        let n = HANDOVER_HEAD + 300;
        let mut ids: Vec<String> = (0..n)
            .map(|i| {
                spool
                    .submit("echo", i.to_string().as_bytes())
                    .expect("submit")
            })
            .collect();
        ids.sort();
        let stop = Switch::default();
        let handed = {
            let src =
                Arc::new(SpoolSource::open(&cfg(&dir, 3), 1 << 20, false, None).expect("open"));
            let mut lane = src.lane();
            let first = lane.next(&stop.handle()).expect("next").expect("job");
            lane.finish(&first, &Ok(Vec::new())).expect("finish");
            src.hand_over().expect("a listing to hand over")
        };
        let text = String::from_utf8(handed.clone()).expect("text");
        assert_eq!(
            text.lines().count(),
            HANDOVER_HEAD + 1,
            "{} bytes",
            handed.len()
        );
        assert_eq!(
            text.lines().last(),
            Some(format!("+{n}").as_str()),
            "the depth listed"
        );
        let src = Arc::new(SpoolSource::open(&cfg(&dir, 3), 1 << 20, false, None).expect("open"));
        src.take_over(&handed);
        assert!(src.pending.lock().expect("lock").len() <= HANDOVER_HEAD);
        assert_eq!(claim_all(&src, &dir), ids[1..], "every job once, in order");
        assert_eq!(fs::read_dir(dir.join("new")).expect("new").count(), 0);
        let _ = fs::remove_dir_all(&dir);
    }

    /// Submits `n` jobs; their ids, sorted (the order they are claimed in).
    fn submitted(spool: &Spool, n: usize) -> Vec<String> {
        let mut ids: Vec<String> = (0..n)
            .map(|i| spool.submit("echo", &i.to_le_bytes()).expect("submit"))
            .collect();
        ids.sort();
        ids
    }

    /// Claims and finishes one job; its id.
    fn claim_one(src: &Arc<SpoolSource>) -> String {
        let mut lane = src.lane();
        let job = lane
            .next(&Shutdown::fixed(false))
            .expect("next")
            .expect("job");
        lane.finish(&job, &Ok(Vec::new())).expect("finish");
        job.id
    }

    /// Claims and finishes every queued job on one lane, in the order claimed; stops (instead
    /// of waiting for more) once nothing is queued.
    fn claim_all(src: &Arc<SpoolSource>, dir: &Path) -> Vec<String> {
        let mut lane = src.lane();
        let mut got = Vec::new();
        loop {
            let empty = fs::read_dir(dir.join("new")).expect("new").count() == 0;
            let Some(job) = lane.next(&Shutdown::fixed(empty)).expect("next") else {
                return got;
            };
            got.push(job.id.clone());
            lane.finish(&job, &Ok(Vec::new())).expect("finish");
        }
    }

    /// A queue deep enough for a longer head: its first ids are taken at once, the rest of the
    /// head is put behind them by the listing's helper, and every job is claimed once, in order.
    #[test]
    fn a_longer_head_of_a_deeper_queue_is_taken_in_two_steps() {
        let dir = crate::testutil::tempdir("spool", "deeper");
        let spool = Spool::open(&dir, false).expect("open");
        let n = 3 * HANDOVER_HEAD;
        let ids = submitted(&spool, n);
        let handed = {
            let src =
                Arc::new(SpoolSource::open(&cfg(&dir, 3), 1 << 20, false, None).expect("open"));
            claim_one(&src);
            // As if the last listing had found a deeper queue: a head of 2 x HANDOVER_HEAD.
            src.depth
                .store(128 * HANDOVER_HEAD, std::sync::atomic::Ordering::Release);
            src.hand_over().expect("a listing to hand over")
        };
        let text = String::from_utf8(handed.clone()).expect("text");
        assert_eq!(text.lines().count(), 2 * HANDOVER_HEAD + 1);
        let src = Arc::new(SpoolSource::open(&cfg(&dir, 3), 1 << 20, false, None).expect("open"));
        src.take_over(&handed);
        assert_eq!(src.pending.lock().expect("lock").len(), HANDOVER_HEAD);
        assert!(!src.head_rest.lock().expect("lock").is_empty());
        assert_eq!(
            src.depth.load(std::sync::atomic::Ordering::Acquire),
            128 * HANDOVER_HEAD
        );
        assert_eq!(claim_all(&src, &dir), ids[1..], "every job once, in order");
        assert!(src.head_rest.lock().expect("lock").is_empty());
        let _ = fs::remove_dir_all(&dir);
    }

    /// A queue deeper than a listing keeps: the listing holds its oldest ids only (the
    /// worker's memory stays bounded), is made again before the lanes run out, and every job is
    /// claimed once, in order.
    #[test]
    fn a_queue_deeper_than_a_listing_keeps_is_listed_again_in_order() {
        let dir = crate::testutil::tempdir("spool", "truncated");
        let spool = Spool::open(&dir, false).expect("open");
        let n = listing::LIST_MAX + 700;
        let ids = submitted(&spool, n);
        let src = Arc::new(SpoolSource::open(&cfg(&dir, 3), 1 << 20, false, None).expect("open"));
        assert_eq!(claim_one(&src), ids[0]);
        assert_eq!(
            src.pending.lock().expect("lock").len(),
            listing::LIST_MAX - 1
        );
        assert!(src.truncated.load(std::sync::atomic::Ordering::Acquire));
        assert_eq!(src.depth.load(std::sync::atomic::Ordering::Acquire), n);
        assert_eq!(claim_all(&src, &dir), ids[1..], "every job once, in order");
        let _ = fs::remove_dir_all(&dir);
    }

    /// What is left of a listing that kept only the oldest ids is handed over saying there is
    /// more (without it the next generation listed `new/` only once the head ran dry, on a lane).
    #[test]
    fn a_head_from_a_truncated_listing_says_there_is_more() {
        let dir = crate::testutil::tempdir("spool", "truncated-head");
        let spool = Spool::open(&dir, false).expect("open");
        let ids = submitted(&spool, listing::LIST_MAX + 10);
        let handed = {
            let src =
                Arc::new(SpoolSource::open(&cfg(&dir, 3), 1 << 20, false, None).expect("open"));
            claim_one(&src);
            // What is left of the listing: fewer than a head holds.
            src.pending.lock().expect("lock").truncate(5);
            src.hand_over().expect("a listing to hand over")
        };
        let text = String::from_utf8(handed.clone()).expect("text");
        assert_eq!(text.lines().count(), 6, "{text}");
        assert!(text.ends_with(&format!("+{}\n", ids.len())), "{text}");
        let src = Arc::new(SpoolSource::open(&cfg(&dir, 3), 1 << 20, false, None).expect("open"));
        src.take_over(&handed);
        assert!(src.more.load(std::sync::atomic::Ordering::Acquire));
        assert_eq!(claim_all(&src, &dir), ids[1..], "every job once, in order");
        let _ = fs::remove_dir_all(&dir);
    }

    fn durable(dir: &Path) -> SpoolConfig {
        SpoolConfig {
            fsync: true,
            ..cfg(dir, 3)
        }
    }

    fn segments(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir.join("journal"))
            .expect("journal")
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        names
    }

    /// With fsync, outcomes go through the group commit: every result lands, each job leaves
    /// cur/, the journal is sealed at settle and emptied by the checkpoint at exit.
    #[test]
    fn outcomes_are_group_committed_and_the_journal_is_emptied_at_exit() {
        use crate::source::JobSource;
        let dir = crate::testutil::tempdir("spool", "group");
        let spool = Spool::open(&dir, true).expect("open");
        let payloads: Vec<Vec<u8>> = (0..300).map(|i| format!("p{i}").into_bytes()).collect();
        let jobs: Vec<(&str, &[u8])> = payloads.iter().map(|p| ("echo", &p[..])).collect();
        let ids = spool.submit_batch(&jobs).expect("batch");
        assert_eq!(ids.len(), 300);
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, sorted, "ids in submission order");
        assert!(
            segments(&dir).iter().all(|n| n.ends_with(".done")),
            "{:?}",
            segments(&dir)
        );
        let src = Arc::new(SpoolSource::open(&durable(&dir), 1 << 20, false, None).expect("open"));
        assert!(
            segments(&dir).is_empty(),
            "a fresh start checkpoints what it finds"
        );
        let stop = Switch::default();
        let mut lanes: Vec<_> = (0..2)
            .map(|_| {
                let (src, stop) = (Arc::clone(&src), stop.handle());
                std::thread::spawn(move || {
                    let mut lane = src.lane();
                    while let Some(job) = lane.next(&stop).expect("next") {
                        let out = job.payload.clone();
                        lane.finish(&job, &Ok(out)).expect("finish");
                    }
                    lane.close().expect("close");
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        while fs::read_dir(dir.join("done")).expect("done").count() < 300 {
            assert!(Instant::now() < deadline, "not every result landed");
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.trigger();
        src.wake();
        for t in lanes.drain(..) {
            t.join().expect("lane");
        }
        for (id, p) in ids.iter().zip(&payloads) {
            match spool.lookup(id).expect("lookup") {
                Lookup::Finished(r) => assert_eq!(&r.result, p),
                other => panic!("{id}: {other:?}"),
            }
        }
        assert_eq!(fs::read_dir(dir.join("cur")).expect("cur").count(), 0);
        let (syncs, records) = src.committer.as_ref().expect("committer").batches();
        assert_eq!(records, 300);
        assert!(syncs <= 300, "{syncs}");
        src.settle(true);
        assert!(segments(&dir).is_empty(), "{:?}", segments(&dir));
        let _ = fs::remove_dir_all(&dir);
    }

    /// A crash after the journal sync but before the files were in place: a fresh start
    /// writes them from the journal, and a job whose result is only there is not run again.
    #[test]
    fn a_fresh_start_replays_what_the_journal_holds() {
        let dir = crate::testutil::tempdir("spool", "replay");
        let spool = Spool::open(&dir, true).expect("open");
        let ids = spool
            .submit_batch(&[("echo", b"a"), ("echo", b"b"), ("echo", b"c")])
            .expect("batch");
        // Job 0 was claimed and finished, but only its journal record survived: its file in
        // cur/ is still there and done/ has nothing. Job 1's file in new/ was torn.
        fs::rename(dir.join("new").join(&ids[0]), dir.join("cur").join(&ids[0])).expect("claim");
        fs::write(dir.join("new").join(&ids[1]), b"GSJ2\nfunc").expect("tear");
        let record = Record {
            id: ids[0].clone(),
            outcome: Outcome::Done,
            function: "echo".into(),
            attempts: 1,
            submitted_ms: 0,
            started_ms: 0,
            finished_ms: 0,
            error: None,
            result: b"A".to_vec(),
        };
        let mut seg = journal::Segment::create(&spool, "w").expect("segment");
        seg.append(&[journal::Entry::new(
            journal::Kind::Done,
            ids[0].clone(),
            encode_record(&record),
        )])
        .expect("append");
        drop(seg); // the writer died: its flock is free, the segment unsealed
                   // A reboot lost the page cache since the batch: its segment is one of an earlier boot
                   // (and job 1's file was torn).
        for name in segments(&dir) {
            let mut parts: Vec<&str> = name.split('-').collect();
            if name.ends_with(".done") {
                let other = if order::boot_tag() == "ffffffff" {
                    "eeeeeeee"
                } else {
                    "ffffffff"
                };
                parts[2] = other;
                let journal = dir.join("journal");
                fs::rename(journal.join(&name), journal.join(parts.join("-"))).expect("rename");
            }
        }
        let src = Arc::new(SpoolSource::open(&durable(&dir), 1 << 20, false, None).expect("open"));
        assert!(segments(&dir).is_empty(), "{:?}", segments(&dir));
        match spool.lookup(&ids[0]).expect("lookup") {
            Lookup::Finished(r) => assert_eq!(r.result, b"A"),
            other => panic!("{other:?}"),
        }
        let mut lane = src.lane();
        let mut got = Vec::new();
        while let Some(job) = lane
            .next(&Shutdown::fixed(
                fs::read_dir(dir.join("new")).expect("new").count() == 0,
            ))
            .expect("next")
        {
            got.push((job.id.clone(), job.payload.clone()));
            lane.finish(&job, &Ok(Vec::new())).expect("finish");
        }
        assert_eq!(
            got,
            [
                (ids[1].clone(), b"b".to_vec()),
                (ids[2].clone(), b"c".to_vec())
            ],
            "job 0 not run again, job 1 whole again"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    /// A second consumer of `dir` is refused, the spool in use.
    fn a_second_open_is_refused(dir: &Path) {
        let err = SpoolSource::open(&cfg(dir, 3), 1 << 20, false, None)
            .err()
            .expect("refused")
            .to_string();
        let by = format!(
            "in use by another worker (its .lock is held, by pid {})",
            std::process::id()
        );
        assert!(err.contains(&by), "{err}");
    }

    #[test]
    fn second_consumer_is_refused() {
        let dir = crate::testutil::tempdir("spool", "lock");
        let _a = SpoolSource::open(&cfg(&dir, 3), 1 << 20, false, None).expect("open");
        a_second_open_is_refused(&dir);
        let _ = fs::remove_dir_all(&dir);
    }

    /// `.lock` removed under the worker (a clean-up of lock files): a second worker on the same
    /// spool is still refused (the directory itself is locked too). It took the spool, and its
    /// start-up recovery would have queued again the jobs the first one runs.
    #[test]
    fn a_second_consumer_is_refused_when_the_lock_file_was_removed() {
        let dir = crate::testutil::tempdir("spool", "lock-removed");
        let _a = SpoolSource::open(&cfg(&dir, 3), 1 << 20, false, None).expect("open");
        fs::remove_file(dir.join(".lock")).expect("rm .lock");
        a_second_open_is_refused(&dir);
        let _ = fs::remove_dir_all(&dir);
    }

    /// Copies of an open spool's lock descriptors, as a restart hands them to the next
    /// generation (the lock belongs to the open file, which the copies share).
    fn handed_locks(src: &SpoolSource) -> Vec<(String, std::os::fd::OwnedFd)> {
        src.lock
            .handed()
            .into_iter()
            .map(|(key, fd)| {
                // SAFETY: `src` owns `fd` and is alive while it is copied.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                (key, fd.try_clone_to_owned().expect("dup"))
            })
            .collect()
    }

    /// The lock's descriptors a generation hands over are taken up by the next one where they
    /// are still its spool's (held all along: another open is refused), and closed where the
    /// next one serves another spool (that spool's lock let go with them).
    #[test]
    fn handed_lock_descriptors_are_taken_up_only_for_their_own_spool() {
        let a = crate::testutil::tempdir("spool", "lock-handed-a");
        let b = crate::testutil::tempdir("spool", "lock-handed-b");
        let first = SpoolSource::open(&cfg(&a, 3), 1 << 20, false, None).expect("open");
        let handed = handed_locks(&first);
        drop(first);
        a_second_open_is_refused(&a);
        let next =
            SpoolSource::open_holding(&cfg(&a, 3), 1 << 20, true, None, handed).expect("taken up");
        a_second_open_is_refused(&a);
        let handed = handed_locks(&next);
        drop(next);
        let elsewhere = SpoolSource::open_holding(&cfg(&b, 3), 1 << 20, false, None, handed)
            .expect("another spool");
        let again = SpoolSource::open(&cfg(&a, 3), 1 << 20, false, None).expect("let go");
        drop((elsewhere, again));
        let _ = (fs::remove_dir_all(&a), fs::remove_dir_all(&b));
    }
}
