//! Accepting batches of jobs for a long-lived writer (the ZeroMQ ingress): each
//! [`BatchWriter::accept`] appends a batch to the writer's open journal segment and syncs once;
//! [`BatchWriter::place`] then puts the jobs where the lanes find them, so an answer can go out
//! between the two. Without a [`Feed`] each job becomes its file in `new/`; with one, jobs go
//! straight to the lanes (`direct.rs`) and only those the lanes cannot take soon become files.
//!
//! Every job placed from a segment holds it until the job is safe elsewhere (its file written,
//! or its outcome stored); a segment is closed once old or large, and sealed once nothing holds
//! it. Jobs still queued a while after their segment closed are written to `new/`, so a segment
//! never waits on a queue, only on the jobs running.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::direct::{DirectJob, Feed, Hold, SPILL_AFTER};
use super::format::JobFile;
use super::journal::{job_entry, materialize, Entry, Kind, Segment, SEGMENT_AGE, SEGMENT_BYTES};
use super::*;
use crate::ops::logging::Recurring;

/// Whether job `id` was accepted but is not placed yet: its record is in a journal segment not
/// sealed yet (on a full disk a batch stays there, durable and answered, until its files can
/// be written). Read only for an id found nowhere else.
pub(super) fn journaled(spool: &Spool, id: &str) -> bool {
    let Ok(dir) = spool.opened("journal") else {
        return false;
    };
    dir.entries().is_ok_and(|names| {
        names
            .iter()
            .filter_map(|(n, st)| n.to_str().filter(|_| crate::ops::safefs::is_file(st)))
            .filter(|n| n.ends_with(".wal"))
            .any(|n| super::results::records(dir, n).any(|e| e.kind == Kind::Job && e.id == id))
    })
}

/// A fed writer closes its segment this often: what an exec leaves unsealed (the jobs whose
/// outcomes cross it) is replayed by the next generation, so it is kept small.
const FED_SEGMENT_AGE: Duration = Duration::from_millis(250);

/// Room a [`BatchWriter::ready`] probe writes ahead in the open segment (a batch of a few
/// small jobs).
const PROBE_BYTES: u64 = 4096;

/// A segment and the jobs holding it.
struct Open {
    segment: Segment,
    opened: Instant,
    held: Arc<AtomicUsize>,
    closed: Option<Instant>,
}

/// An accepted job not yet placed.
struct Unplaced {
    /// Its record (holding its segment, if it has one).
    entry: Entry,
    /// The job itself, for a fed writer.
    job: Option<JobFile>,
}

/// Accepts batches of jobs durably, one sync each (see the module's header).
pub struct BatchWriter {
    spool: Spool,
    open: Option<Open>,
    /// Closed segments that jobs still hold.
    closed: Vec<Open>,
    unplaced: Vec<Unplaced>,
    feed: Option<Feed>,
    /// Queued jobs cannot be written to `new/` (a full disk): said once while it lasts, not
    /// at every turn of the ingress.
    spilling: Recurring,
}

impl Spool {
    /// A writer that keeps one journal segment open across batches (see `BatchWriter`).
    pub fn batch_writer(self) -> BatchWriter {
        BatchWriter {
            spool: self,
            open: None,
            closed: Vec::new(),
            unplaced: Vec::new(),
            feed: None,
            spilling: Recurring::new(
                "zeromq: queued jobs not written to new/ yet (their journal records keep them), trying again",
                "zeromq: queued jobs written to new/ again",
            ),
        }
    }

    /// The spool for root's `submit`: every file it writes into a spool still root's belongs to
    /// `user` (the config's `[worker] user`) from its creation. The worker's first start hands
    /// the spool over to that user; a file root made after the hand-over looked at `new/`
    /// would stay root's, unreadable by the worker, and be set aside.
    pub(crate) fn for_submit(cfg: &SpoolConfig, user: Option<&Target>) -> Result<Spool> {
        let mut spool = Spool::from_config(cfg)?;
        if spool.give_to.is_none() && geteuid().is_root() {
            let user = user.filter(|t| !t.uid.is_root());
            // A spool still root's is given to the worker's user at once, as a fresh start
            // gives it: a worker that dropped its privileges can open it now (one whose spool
            // was removed under it waits for that), where it stayed root's until the next
            // fresh start. Best effort: what refuses it (a directory holding what is no
            // spool's) is said by the worker's start, which refuses it the same way.
            if let Some(t) = user {
                match super::hand_to(cfg, t) {
                    Ok(()) => spool = Spool::from_config(cfg)?,
                    Err(e) => log::debug!("the spool is not given to user \"{}\": {e}", t.name),
                }
            }
            if spool.give_to.is_none() {
                spool.give_to = user.map(|t| (t.uid, t.gid));
            }
        }
        Ok(spool)
    }
}

impl BatchWriter {
    /// Hands accepted jobs to the lanes of the worker `feed` belongs to, without a file each.
    pub fn feed(&mut self, feed: Feed) {
        feed.direct.set_open(true);
        self.feed = Some(feed);
    }

    /// Makes `jobs` durable (one sync with `fsync`) and returns their ids; they are placed
    /// with [`BatchWriter::place`].
    pub fn accept(&mut self, jobs: &[(&str, &[u8])]) -> Result<Vec<String>> {
        let jobs = self.spool.new_jobs(jobs)?;
        let mut entries: Vec<Entry> = jobs
            .iter()
            .map(|(id, job)| job_entry(id.clone(), job))
            .collect();
        // Without fsync and without a feed, the files themselves are the record.
        if self.journaled() {
            self.open_segment()?;
            if let Some(open) = self.open.as_mut() {
                if let Err(e) = open.segment.append_with(&entries, self.spool.fsync) {
                    // A torn tail is never appended to: what came before is kept (sealed once
                    // nothing holds it); nothing of this batch was acknowledged.
                    self.close_open();
                    return Err(e);
                }
                for e in &mut entries {
                    e.hold = Some(Hold::take(&open.held));
                }
            }
        }
        let ids = jobs.iter().map(|(id, _)| id.clone()).collect();
        let fed = self.feed.is_some();
        self.unplaced.extend(
            entries
                .into_iter()
                .zip(jobs)
                .map(|(entry, (_, job))| Unplaced {
                    entry,
                    job: fed.then_some(job),
                }),
        );
        Ok(ids)
    }

    /// Whether accepted jobs go to the journal (without fsync and without a feed, the files
    /// themselves are the record).
    fn journaled(&self) -> bool {
        self.spool.fsync || self.feed.is_some()
    }

    /// Opens a segment for the next batch if none is open.
    fn open_segment(&mut self) -> Result<()> {
        if self.open.is_none() {
            self.open = Some(Open {
                // Zeros ahead speed up syncs only: none without fsync.
                segment: if self.spool.fsync {
                    Segment::create_long(&self.spool, "z")?
                } else {
                    Segment::create(&self.spool, "z")?
                },
                opened: Instant::now(),
                held: Arc::new(AtomicUsize::new(0)),
                closed: None,
            });
        }
        Ok(())
    }

    /// Whether a batch could be made durable now, found by doing what one does without a job:
    /// the spool's epoch for this boot (written with its first job), and [`PROBE_BYTES`] of
    /// room in the open journal segment (opened for it if none is, and kept for the next
    /// batch), synced with `fsync`. For a writer whose batches were refused (a full disk)
    /// while no message comes: a larger batch may still find too little room.
    pub fn ready(&mut self) -> Result<()> {
        self.spool.room_for_jobs(PROBE_BYTES)?;
        self.spool.new_id()?;
        if !self.journaled() {
            return Ok(());
        }
        self.open_segment()?;
        match self.open.as_mut() {
            Some(open) => open.segment.reserve(PROBE_BYTES, self.spool.fsync),
            None => Ok(()),
        }
    }

    /// Places what was accepted (to the lanes, or as files); what fails now is tried again
    /// with the next call (the journal holds it meanwhile). Closes the segment once old or
    /// large, writes out jobs left queued too long, and seals what nothing holds.
    pub fn place(&mut self) -> Result<()> {
        let mut offered = false;
        let mut failure = None;
        let mut items = std::mem::take(&mut self.unplaced).into_iter();
        while let Some(mut u) = items.next() {
            if let (Some(feed), Some(job)) = (&self.feed, u.job.take()) {
                if let Some(hold) = u.entry.hold.take() {
                    let id = u.entry.id.clone();
                    match feed.direct.offer(DirectJob { id, job, hold }) {
                        Ok(()) => {
                            offered = true;
                            continue;
                        }
                        Err(back) => u.entry.hold = Some(back.hold),
                    }
                }
            }
            if let Err(e) = materialize(&self.spool, &u.entry) {
                failure = Some(e);
                self.unplaced.push(u);
                self.unplaced.extend(items);
                break;
            }
            if let Some(hold) = u.entry.hold.take() {
                hold.release();
            }
        }
        if let (true, Some(feed)) = (offered, &self.feed) {
            feed.waker.bump();
        }
        self.tidy();
        failure.map_or(Ok(()), Err)
    }

    /// Whether [`BatchWriter::place`] has work: jobs not placed yet, or segments to close
    /// or seal.
    pub fn pending(&self) -> bool {
        !self.unplaced.is_empty() || self.open.is_some() || !self.closed.is_empty()
    }

    /// Closes the open segment (no more appends to it).
    fn close_open(&mut self) {
        if let Some(mut open) = self.open.take() {
            open.closed = Some(Instant::now());
            self.closed.push(open);
        }
    }

    /// Closes the open segment once old or large; spills jobs queued from a segment closed a
    /// while ago; seals the closed segments nothing holds.
    fn tidy(&mut self) {
        let age = if self.feed.is_some() {
            FED_SEGMENT_AGE
        } else {
            SEGMENT_AGE
        };
        if self
            .open
            .as_ref()
            .is_some_and(|o| o.segment.size >= SEGMENT_BYTES || o.opened.elapsed() >= age)
        {
            self.close_open();
        }
        if let Some(feed) = &self.feed {
            for c in &self.closed {
                let waited = c.closed.is_some_and(|t| t.elapsed() >= SPILL_AFTER);
                if waited && c.held.load(Ordering::Acquire) > 0 {
                    let jobs = feed.direct.spill(|j| j.hold.of(&c.held));
                    let some = !jobs.is_empty();
                    match spill(&self.spool, feed, jobs) {
                        Ok(()) if some => self.spilling.worked(),
                        Ok(()) => {}
                        Err(e) => self.spilling.failed(&e),
                    }
                }
            }
        }
        // On every batch's path: nothing to rebuild unless a segment is free.
        if !self
            .closed
            .iter()
            .any(|c| c.held.load(Ordering::Acquire) == 0)
        {
            return;
        }
        let (free, held): (Vec<Open>, Vec<Open>) = std::mem::take(&mut self.closed)
            .into_iter()
            .partition(|c| c.held.load(Ordering::Acquire) == 0);
        self.closed = held;
        for c in free {
            c.segment.seal(&self.spool);
        }
    }
}

/// Writes queued jobs to `new/` (releasing their segment); what cannot be written now goes
/// back to the queue.
fn spill(spool: &Spool, feed: &Feed, jobs: Vec<DirectJob>) -> Result<()> {
    let mut jobs = jobs.into_iter();
    while let Some(j) = jobs.next() {
        if let Err(e) = materialize(spool, &job_entry(j.id.clone(), &j.job)) {
            feed.direct
                .restore(std::iter::once(j).chain(jobs).collect());
            return Err(e);
        }
        j.hold.release();
    }
    Ok(())
}

/// When the ingress stops: no more offers, everything accepted placed as files (the queue
/// too), and the segments nothing holds sealed. A segment still held (an outcome crossing an
/// exec, a file that could not be written) stays unsealed: the next checkpoint replays it.
impl Drop for BatchWriter {
    fn drop(&mut self) {
        if let Some(feed) = &self.feed {
            feed.direct.set_open(false);
        }
        if let Err(e) = self.place() {
            log::warn!("accepted jobs not in place ({e}): the next checkpoint writes them");
        }
        if let Some(feed) = &self.feed {
            if let Err(e) = spill(&self.spool, feed, feed.direct.spill(|_| true)) {
                log::warn!("queued jobs not written to new/ ({e}): the next checkpoint does");
            }
        }
        self.close_open();
        self.tidy();
        if !self.closed.is_empty() {
            log::debug!(
                "{} journal segment(s) left unsealed for the next checkpoint",
                self.closed.len()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SpoolConfig;
    use crate::shutdown::Switch;
    use crate::source::JobSource;
    use std::fs;

    fn names(dir: &std::path::Path, sub: &str) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir.join(sub))
            .expect("dir")
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        v.sort();
        v
    }

    /// A spool source and a batch writer feeding it.
    fn fed(name: &str, fsync: bool) -> (std::path::PathBuf, Arc<SpoolSource>, BatchWriter) {
        let dir = crate::testutil::tempdir("spool", name);
        let cfg = SpoolConfig {
            min_free: crate::config::MinFree::Bytes(0),
            dir: dir.clone(),
            max_attempts: 3,
            retain_results: Duration::from_secs(3600),
            fsync,
        };
        let src = Arc::new(SpoolSource::open(&cfg, 1 << 20, false, None).expect("open"));
        let mut w = Spool::from_config(&cfg).expect("spool").batch_writer();
        w.feed(src.feed());
        (dir, src, w)
    }

    /// A lane that runs out of fed jobs lists an empty new/ once, not each time; a job that
    /// arrives there (the file watch wakes the lanes) is still found at once.
    #[test]
    fn an_empty_new_is_listed_once_not_for_every_fed_batch() {
        let (dir, src, mut w) = fed("fed-list", false);
        for _ in 0..5 {
            assert!(src.claim().expect("claim").is_none(), "nothing queued");
            w.accept(&[("echo", b"a")]).expect("accept");
            w.place().expect("place");
            let job = src.claim().expect("claim").expect("a fed job");
            src.finish(&job, &Ok(Vec::new()), 0).expect("finish");
        }
        assert_eq!(src.listed.load(std::sync::atomic::Ordering::Acquire), 1);
        let file_id = Spool::open(&dir, false)
            .expect("spool")
            .submit("echo", b"f")
            .expect("submit");
        src.wake();
        let job = src.claim().expect("claim").expect("the file job");
        assert_eq!(job.id, file_id);
        drop(w);
        let _ = fs::remove_dir_all(&dir);
    }

    /// Fed jobs reach the lanes without a file in new/ or cur/, in id order with jobs
    /// submitted as files; one given back is written to new/; what is queued when the writer
    /// stops is written to new/; each segment is sealed once nothing holds it.
    #[test]
    fn fed_jobs_skip_the_files_and_their_segments_are_sealed_once_released() {
        let (dir, src, mut w) = fed("fed", true);
        let ids = w.accept(&[("echo", b"a"), ("echo", b"b")]).expect("accept");
        let file_id = Spool::open(&dir, true)
            .expect("spool")
            .submit("echo", b"c")
            .expect("submit");
        w.place().expect("place");
        assert_eq!(
            names(&dir, "new"),
            std::slice::from_ref(&file_id),
            "only the file job"
        );
        let stop = Switch::default();
        let mut lane = src.lane();
        let first = lane.next(&stop.handle()).expect("next").expect("a job");
        assert_eq!(
            (first.id.as_str(), &first.payload[..]),
            (ids[0].as_str(), &b"a"[..])
        );
        assert!(names(&dir, "cur").is_empty(), "no claim file");
        lane.finish(&first, &Ok(b"A".to_vec())).expect("finish");
        let second = lane.next(&stop.handle()).expect("next").expect("a job");
        assert_eq!(second.id, ids[1], "older than the file job");
        assert!(lane.release(&second), "given back");
        assert_eq!(names(&dir, "new"), [ids[1].clone(), file_id.clone()]);
        for _ in 0..2 {
            let job = lane.next(&stop.handle()).expect("next").expect("a job");
            lane.finish(&job, &Ok(b"C".to_vec())).expect("finish");
        }
        lane.close().expect("flushed");
        // The job that never had a file has its outcome in a results log, the others in done/.
        assert_eq!(names(&dir, "done").len(), 2);
        let logged = Spool::open(&dir, true).expect("spool").lookup(&ids[0]);
        assert!(
            matches!(logged, Ok(Lookup::Finished(ref r)) if r.result == b"A"),
            "{logged:?}"
        );
        assert!(names(&dir, "cur").is_empty() && names(&dir, "new").is_empty());
        // Queued when the writer stops: written to new/.
        let more = w.accept(&[("echo", b"d")]).expect("accept");
        w.place().expect("place");
        assert!(names(&dir, "new").is_empty(), "queued in memory");
        assert_eq!(src.queue_stats().map(|q| q.depth), Some(1));
        drop(w);
        assert_eq!(names(&dir, "new"), more);
        let segments = names(&dir, "journal");
        assert!(
            segments.iter().any(|s| s.starts_with("z-"))
                && segments
                    .iter()
                    .filter(|s| s.starts_with("z-"))
                    .all(|s| s.ends_with(".done")),
            "the writer's segments sealed: {segments:?}"
        );
        src.settle(true);
        // The seal and the checkpoint at exit are bounded waits: on a busy machine they finish
        // a moment later.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !names(&dir, "journal").is_empty() {
            assert!(std::time::Instant::now() < deadline, "not checkpointed");
            std::thread::sleep(Duration::from_millis(50));
            let _ = super::super::replay::checkpoint(&src.spool, false);
        }
        let _ = fs::remove_dir_all(&dir);
    }

    /// Jobs the lanes leave queued are written to new/ a while after their segment closed,
    /// and the segment is sealed.
    #[test]
    fn jobs_left_queued_are_written_out_and_free_their_segment() {
        let (dir, src, mut w) = fed("spill", false);
        let ids = w.accept(&[("echo", b"a")]).expect("accept");
        w.place().expect("place");
        assert!(names(&dir, "new").is_empty());
        let z = |dir: &std::path::Path| -> Vec<String> {
            names(dir, "journal")
                .into_iter()
                .filter(|s| s.starts_with("z-"))
                .collect()
        };
        assert!(
            z(&dir)[0].ends_with(".wal"),
            "written, not synced: {:?}",
            z(&dir)
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while names(&dir, "new").is_empty() {
            assert!(std::time::Instant::now() < deadline, "never written out");
            std::thread::sleep(Duration::from_millis(50));
            w.place().expect("place");
        }
        assert_eq!(names(&dir, "new"), ids);
        assert!(z(&dir)[0].ends_with(".done"), "{:?}", z(&dir));
        assert_eq!(src.queue_stats().map(|q| q.depth), Some(1), "counted once");
        drop(w);
        let _ = fs::remove_dir_all(&dir);
    }
}
