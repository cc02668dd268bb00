//! Outcomes of jobs that never had a file (`direct.rs`: the ZeroMQ ingress's jobs, answered
//! `TRUE`), kept in append-only logs in `results/` instead of a file each in `done/` or
//! `failed/`.
//!
//! A file per outcome costs an inode: a create in `tmp/` and a rename, most of a lane's time
//! when such jobs arrive by the ten thousand a second (and on an ext4 without a journal, whose
//! inode allocation walks past every inode freed in the last minute, a millisecond each after
//! many deletions). Nobody waits for these outcomes by id (the client was answered `TRUE`, not
//! an id), so they need no file of their own: each writer (the lanes without `fsync`, the group
//! commit with it) appends journal-format records (length, kind, id, body, checksum) to a log
//! of its own, begun lazily and again past [`LOG_BYTES`] or [`LOG_AGE`]. Durability is the
//! journal's, as for a materialized file: with `fsync` the record is in a synced journal
//! segment before it is appended here, and the checkpoint's `syncfs` covers the log before that
//! segment goes.
//!
//! Readers: `gearshift result ID` (after `done/` and `failed/`, the logs newest first), the
//! journal's replay (a job record whose outcome is logged is not queued again), the tests and
//! tools ([`Spool::logged_outcomes`]). Old outcomes go by whole logs: a log is deleted once its
//! last write is past `retain_results`, by the same sweep as the result files.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::format::{decode_job, decode_record};
use super::journal::{encode_all, next_record, Entry, Kind};
use super::*;

/// A log is left for a new one past this size...
const LOG_BYTES: u64 = 16 << 20;
/// ...or this age, so that old outcomes go by whole files, soon after `retain_results`.
const LOG_AGE: Duration = Duration::from_secs(600);
/// A log unwritten this long is checked before the next append: the sweep may have deleted it
/// (an idle worker's log, its last write past `retain_results`).
const RECHECK_IDLE: Duration = Duration::from_secs(1);
/// A log written this long before a replayed job was submitted is not searched for its outcome
/// (slack for the wall clock's steps).
const CLOCK_SLACK: Duration = Duration::from_secs(10);

/// One writer's log (the writer's own: a log is never appended to by two).
#[derive(Default)]
pub(super) struct Log(Mutex<Option<Open>>);

struct Open {
    file: File,
    size: u64,
    begun: Instant,
    last: Instant,
}

impl Log {
    /// Appends the outcomes `entries` with one write (not synced: see the module's note).
    pub(super) fn append(&self, spool: &Spool, entries: &[Entry]) -> Result<()> {
        let mut open = self
            .0
            .lock()
            .map_err(|_| Error::Internal("the results log's lock is poisoned".into()))?;
        if open.as_ref().is_some_and(Open::spent) {
            *open = None;
        }
        let o = match open.take() {
            Some(o) => o,
            None => Open::create(spool)?,
        };
        let buf = encode_all(entries);
        if let Err(err) = o.file.write_all_at(&buf, o.size) {
            // What was written goes, so that its room is free again (on a full disk, a torn
            // tail kept what room each try found until the log was pruned); if it cannot go,
            // the log is left torn (its reading ends there) and the next outcome begins another.
            if o.file.set_len(o.size).is_ok() {
                *open = Some(o);
            }
            return Err(Error::io("appending to a results log", err));
        }
        *open = Some(Open {
            size: o.size + buf.len() as u64,
            last: Instant::now(),
            ..o
        });
        Ok(())
    }
}

impl Open {
    fn create(spool: &Spool) -> Result<Open> {
        let name = format!(
            "r-{:016x}-{}-{}.log",
            order::boottime_ns(),
            order::boot_tag(),
            order::unique()
        );
        let file = spool.opened("results")?.create_new(&name, 0o640)?;
        if let Some((uid, gid)) = spool.give_to {
            let path = spool.dir("results").join(&name);
            crate::ops::safefs::chown_file(&file, &path, uid, gid)?;
        }
        let now = Instant::now();
        Ok(Open {
            file,
            size: 0,
            begun: now,
            last: now,
        })
    }

    /// Whether the next outcome goes to a new log: this one is full, old, or was deleted.
    fn spent(&self) -> bool {
        self.size >= LOG_BYTES
            || self.begun.elapsed() >= LOG_AGE
            || (self.last.elapsed() >= RECHECK_IDLE
                && self.file.metadata().map(|m| m.nlink() == 0).unwrap_or(true))
    }
}

/// The names of the logs in `dir` (`results/`), newest write first; only those written since
/// `since`.
fn logs(dir: &Dir, since: Option<SystemTime>) -> Vec<String> {
    let Ok(entries) = dir.entries() else {
        return Vec::new();
    };
    let mut found: Vec<((i64, i64), String)> = entries
        .into_iter()
        .filter(|(_, st)| crate::ops::safefs::is_file(st))
        .filter_map(|(name, st)| Some(((st.st_mtime, st.st_mtime_nsec), name.into_string().ok()?)))
        .filter(|(_, n)| n.ends_with(".log"))
        .filter(|(t, _)| since.is_none_or(|s| since_epoch(*t) >= s))
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    found.into_iter().map(|(_, n)| n).collect()
}

fn since_epoch((secs, nanos): (i64, i64)) -> SystemTime {
    let at = Duration::new(
        secs.max(0).unsigned_abs(),
        nanos.clamp(0, 999_999_999) as u32,
    );
    UNIX_EPOCH + at
}

/// Calls `each` with every outcome record in the logs written since `since` (all: None), the
/// newest logs first, until it returns false; a log's reading ends at its first torn or corrupt
/// record. Never through a link, never a FIFO.
fn each_logged(spool: &Spool, since: Option<SystemTime>, mut each: impl FnMut(Entry) -> bool) {
    let Ok(dir) = spool.opened("results") else {
        return;
    };
    for name in logs(dir, since) {
        for e in records(dir, &name) {
            if e.kind != Kind::Job && !each(e) {
                return;
            }
        }
    }
}

/// The records of the log or journal segment `name` in `dir`, up to the first torn or corrupt
/// one; none if it is no regular file of the directory's owner (never through a link: the
/// worker's user writes there, and root reads here for `result`).
pub(super) fn records(dir: &Dir, name: &str) -> impl Iterator<Item = Entry> {
    let file = dir
        .file(name, crate::ops::safefs::Open::READ)
        .ok()
        .map(|o| o.file);
    let mut r = file.map(io::BufReader::new);
    std::iter::from_fn(move || next_record(r.as_mut()?))
}

/// The stored bytes of job `id`'s outcome, if a log holds it (the newest logs first).
pub(super) fn find(spool: &Spool, id: &str) -> Option<Vec<u8>> {
    let mut found = None;
    each_logged(spool, None, |e| {
        if e.id == id {
            found = Some(e.body);
        }
        found.is_none()
    });
    found
}

impl Spool {
    /// Puts an outcome where it is kept: the outcome of a job that came without a file (it
    /// holds its journal segment) in this handle's results log, any other as its file.
    pub(super) fn place(&self, e: &Entry) -> Result<()> {
        self.place_run(std::slice::from_ref(e)).map(drop)
    }

    /// Places the first of `entries`, and with it every outcome after it that goes to the
    /// results log too (one write for all of them); how many were placed.
    pub(super) fn place_run(&self, entries: &[Entry]) -> Result<usize> {
        let logged = |e: &Entry| e.kind != Kind::Job && e.hold.is_some();
        match entries.iter().take_while(|e| logged(e)).count() {
            0 => match entries.first() {
                Some(e) => super::journal::materialize(self, e).map(|()| 1),
                None => Ok(0),
            },
            run => self.results.append(self, &entries[..run]).map(|()| run),
        }
    }

    /// Which of the job records in `entries` (a journal segment being replayed) have an
    /// outcome in a log: those are finished and must not be queued again. Reads only the logs
    /// written since the oldest of those jobs was submitted, and none without job records.
    pub(super) fn logged_among(&self, entries: &[Entry]) -> HashSet<String> {
        let jobs: Vec<&Entry> = entries.iter().filter(|e| e.kind == Kind::Job).collect();
        let Some(oldest) = jobs
            .iter()
            .filter_map(|e| decode_job(&e.body).ok())
            .map(|j| j.submitted_ms)
            .min()
        else {
            return HashSet::new();
        };
        let wanted: HashSet<&str> = jobs.iter().map(|e| e.id.as_str()).collect();
        let since = (UNIX_EPOCH + Duration::from_millis(oldest)).checked_sub(CLOCK_SLACK);
        let mut found = HashSet::new();
        each_logged(self, Some(since.unwrap_or(UNIX_EPOCH)), |e| {
            if wanted.contains(e.id.as_str()) {
                found.insert(e.id);
            }
            true
        });
        found
    }

    /// Every outcome kept in the results logs (jobs that never had a file of their own: the
    /// ZeroMQ source's, answered `TRUE`), with its id; the newest logs first. A record that
    /// does not decode is left out (its log's checksum passed: written by another version).
    pub fn logged_outcomes(&self) -> Vec<(String, Record)> {
        let mut out = Vec::new();
        each_logged(self, None, |e| {
            if let Ok(r) = decode_record(&e.id, &e.body) {
                out.push((e.id, r));
            }
            true
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    use super::super::direct::Hold;
    use super::super::format::JobFile;
    use super::super::journal::{job_entry, Segment};
    use super::*;

    fn record(id: &str, outcome: Outcome, result: &[u8]) -> Record {
        Record {
            id: id.into(),
            outcome,
            function: "f".into(),
            attempts: 1,
            submitted_ms: 1,
            started_ms: 2,
            finished_ms: 3,
            error: (outcome == Outcome::Failed).then(|| "no".into()),
            result: result.to_vec(),
        }
    }

    /// An outcome as a lane hands it over for a job that came without a file (it holds its
    /// journal segment).
    fn held(id: &str, outcome: Outcome, result: &[u8], count: &Arc<AtomicUsize>) -> Entry {
        let kind = match outcome {
            Outcome::Done => Kind::Done,
            Outcome::Failed => Kind::Failed,
        };
        let mut e = Entry::new(kind, id.into(), encode_record(&record(id, outcome, result)));
        e.hold = Some(Hold::take(count));
        e
    }

    fn logs_in(spool: &Spool) -> Vec<std::path::PathBuf> {
        let dir = spool.opened("results").expect("results/");
        logs(dir, None).iter().map(|n| dir.path().join(n)).collect()
    }

    #[test]
    fn outcomes_without_a_file_are_logged_found_and_pruned_by_whole_logs() {
        let dir = crate::testutil::tempdir("spool", "results-log");
        let spool = Spool::open(&dir, false).expect("open");
        let count = Arc::new(AtomicUsize::new(0));
        let (a, b) = ("f1-1-a", "f1-1-b");
        for e in [
            held(a, Outcome::Done, b"ok", &count),
            held(b, Outcome::Failed, b"", &count),
        ] {
            spool.place(&e).expect("materialize");
        }
        // No file of their own, one log for both.
        for sub in ["done", "failed", "tmp"] {
            assert_eq!(
                fs::read_dir(spool.dir(sub)).expect("dir").count(),
                0,
                "{sub}"
            );
        }
        assert_eq!(logs_in(&spool).len(), 1);
        let found = |id: &str| match spool.lookup(id).expect("lookup") {
            Lookup::Finished(r) => Some((r.outcome, r.result)),
            _ => None,
        };
        assert_eq!(found(a), Some((Outcome::Done, b"ok".to_vec())));
        assert_eq!(found(b).map(|f| f.0), Some(Outcome::Failed));
        assert_eq!(found("f1-1-c"), None);
        assert_eq!(spool.logged_outcomes().len(), 2);

        // A torn tail (a crash mid-append) ends that log's reading, nothing before it; a new
        // handle (the next generation) writes a log of its own.
        let first = logs_in(&spool).remove(0);
        let mut torn = fs::OpenOptions::new()
            .append(true)
            .open(&first)
            .expect("open log");
        io::Write::write_all(&mut torn, &[40, 0, 0, 0, b'D', 6]).expect("tear");
        let next = Spool::open(&dir, false).expect("reopen");
        let c = "f1-1-c";
        next.place(&held(c, Outcome::Done, b"3", &count))
            .expect("append");
        assert_eq!(logs_in(&spool).len(), 2);
        assert_eq!(found(a), Some((Outcome::Done, b"ok".to_vec())));
        assert_eq!(found(c), Some((Outcome::Done, b"3".to_vec())));

        // The sweep deletes a log whose last write is past retention, whole.
        let old = SystemTime::now() - Duration::from_secs(7200);
        File::options()
            .write(true)
            .open(&first)
            .and_then(|f| f.set_modified(old))
            .expect("age the log");
        let cutoff = SystemTime::now() - Duration::from_secs(3600);
        assert_eq!(prune_older(&spool.dir("results"), cutoff), 1);
        assert_eq!(found(a), None);
        assert_eq!(found(c), Some((Outcome::Done, b"3".to_vec())));
        // The writer whose log was deleted under it begins another, once it has been idle a
        // moment: an outcome is never appended to a log nobody can read.
        std::thread::sleep(RECHECK_IDLE + Duration::from_millis(100));
        let d = "f1-1-d";
        spool
            .place(&held(d, Outcome::Done, b"4", &count))
            .expect("append");
        assert_eq!(found(d), Some((Outcome::Done, b"4".to_vec())));
        let _ = fs::remove_dir_all(&dir);
    }

    /// Outcomes of jobs without a file one after another go to the log in one write; the run
    /// ends at an outcome that gets a file of its own.
    #[test]
    fn a_run_of_logged_outcomes_is_placed_with_one_write() {
        let dir = crate::testutil::tempdir("spool", "results-run");
        let spool = Spool::open(&dir, false).expect("open");
        let count = Arc::new(AtomicUsize::new(0));
        let mut own = held("f1-3-d", Outcome::Done, b"own", &count);
        own.hold = None;
        let batch = [
            held("f1-3-a", Outcome::Done, b"1", &count),
            held("f1-3-b", Outcome::Failed, b"", &count),
            held("f1-3-c", Outcome::Done, b"3", &count),
            own,
        ];
        assert_eq!(spool.place_run(&batch).expect("run"), 3);
        assert_eq!(logs_in(&spool).len(), 1);
        assert_eq!(spool.logged_outcomes().len(), 3);
        assert_eq!(fs::read_dir(spool.dir("done")).expect("done").count(), 0);
        assert_eq!(spool.place_run(&batch[3..]).expect("own file"), 1);
        assert_eq!(fs::read_dir(spool.dir("done")).expect("done").count(), 1);
        assert_eq!(spool.place_run(&[]).expect("nothing"), 0);
        let _ = fs::remove_dir_all(&dir);
    }

    /// A crash leaves a journal segment whose jobs came without files; the one whose outcome
    /// is in a results log finished and is not queued again, the other is.
    #[test]
    fn a_replayed_job_whose_outcome_is_logged_is_not_queued_again() {
        let dir = crate::testutil::tempdir("spool", "results-replay");
        let spool = Spool::open(&dir, false).expect("open");
        let job = |payload: &[u8]| JobFile {
            function: "f".into(),
            submitted_ms: crate::clock::now_ms(),
            attempts: 0,
            payload: payload.to_vec(),
        };
        let (ran, queued) = ("f1-2-a", "f1-2-b");
        let mut segment = Segment::create(&spool, "z").expect("segment");
        segment
            .append_with(
                &[
                    job_entry(ran.into(), &job(b"1")),
                    job_entry(queued.into(), &job(b"2")),
                ],
                false,
            )
            .expect("append");
        let count = Arc::new(AtomicUsize::new(0));
        spool
            .place(&held(ran, Outcome::Done, b"1", &count))
            .expect("log");
        // Its writer dies: the segment is abandoned (its lock is free).
        drop(segment);
        let (segments, written) =
            super::super::replay::checkpoint(&spool, true).expect("checkpoint");
        assert_eq!((segments, written), (1, 1));
        let queued_now: Vec<String> = fs::read_dir(spool.dir("new"))
            .expect("new")
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        assert_eq!(queued_now, vec![queued.to_string()]);
        let _ = fs::remove_dir_all(&dir);
    }
}
