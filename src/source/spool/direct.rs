//! Jobs handed straight from the ZeroMQ ingress to the lanes, with no file per job.
//!
//! One file per job costs a create, a write and a rename at ingest, a rename at the claim and
//! an unlink at the end: most of the worker's time when jobs arrive faster than a few thousand
//! a second. So the ingress appends a batch of jobs to its journal segment (synced with
//! `fsync`), answers, and offers the jobs here instead of writing `new/ID` for each (a
//! [`super::BatchWriter`] with a [`Feed`]). A lane claims the oldest job, here or in `new/`
//! (ids sort by submission), and stores its outcome through the group commit as for any job,
//! but in a results log instead of a file in `done/` or `failed/` (`results.rs`); such a job
//! never has a `cur/` file.
//!
//! Until its outcome is in place, the journal record is the job's only durable copy: each job
//! holds its segment ([`Hold`]), and the writer seals a segment (a checkpoint then deletes it)
//! only once every job it holds is released: its outcome stored, or the job written to `new/`
//! after all (*spilled*: a job left waiting past [`SPILL_AFTER`], one given back by a lane, or
//! what is queued here when the ingress stops). A crash or an exec leaves the segments that
//! still hold jobs unsealed, and the next checkpoint or start replays them: a job that has no
//! outcome yet and is in neither `new/` nor `cur/` is queued again. So a job runs at least once,
//! as any spool job; an outcome carried across an exec is committed by the next generation
//! before its first checkpoint, so the replay finds it (on a disk too slow for that, such a job
//! can run twice).
//!
//! Jobs queued here are invisible to `gearshift result` until they finish: the ingress feeds
//! only a source that answers `TRUE` (no id to look up).
//!
//! The [`Waker`] idle lanes sleep on lives here too: the ingress wakes them through it.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::format::JobFile;

/// Jobs queued here at most; more go to `new/` as files (the lanes are behind). It also bounds
/// what a restart writes out before its exec (about 15 µs a job).
const MAX_JOBS: usize = 256;
/// Payload bytes queued here at most.
const MAX_BYTES: usize = 16 << 20;
/// A job still queued this long after its segment was closed is spilled to `new/`, so the
/// segment can be sealed.
pub(super) const SPILL_AFTER: Duration = Duration::from_secs(2);
/// While jobs are queued here the lanes list `new/` (for jobs submitted otherwise) when told
/// something arrived there, or at least this often.
const LIST_EVERY: Duration = Duration::from_secs(1);

/// One job's share of its journal segment: the segment is sealed once no share is left.
#[derive(Debug)]
pub(super) struct Hold(Arc<AtomicUsize>);

impl Hold {
    /// A share of the segment counted by `count`.
    pub(super) fn take(count: &Arc<AtomicUsize>) -> Hold {
        count.fetch_add(1, Ordering::AcqRel);
        Hold(Arc::clone(count))
    }

    /// The job is safe without the segment (its outcome or its file is in place).
    pub(super) fn release(self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }

    /// Whether this is a share of the segment counted by `count`.
    pub(super) fn of(&self, count: &Arc<AtomicUsize>) -> bool {
        Arc::ptr_eq(&self.0, count)
    }
}

/// A job queued here.
pub(super) struct DirectJob {
    pub(super) id: String,
    pub(super) job: JobFile,
    pub(super) hold: Hold,
}

struct State {
    queue: VecDeque<DirectJob>,
    bytes: usize,
    /// Jobs claimed by a lane, by id, until their outcome is handed on.
    running: HashMap<String, Hold>,
    /// Offers are taken (not while the worker stops).
    open: bool,
    listed_at: Instant,
    /// The last listing of `new/` found jobs there (or none was made yet).
    new_had_jobs: bool,
}

/// The queue between the ingress and the lanes (one per spool source).
pub(crate) struct Direct {
    state: Mutex<State>,
    /// Something arrived in `new/` since the lanes last listed it.
    dirty: AtomicBool,
    /// Any job ever came this way (the lanes' finish skips the lookup otherwise).
    used: AtomicBool,
}

impl Default for Direct {
    fn default() -> Direct {
        Direct {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                bytes: 0,
                running: HashMap::new(),
                open: true,
                listed_at: Instant::now(),
                new_had_jobs: true,
            }),
            dirty: AtomicBool::new(true),
            used: AtomicBool::new(false),
        }
    }
}

/// What a writer needs to feed the lanes: the queue and the lanes' waker.
pub struct Feed {
    pub(super) direct: Arc<Direct>,
    pub(super) waker: Arc<Waker>,
}

impl Direct {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `job` if there is room (and the worker is not stopping); else gives it back.
    pub(super) fn offer(&self, job: DirectJob) -> Result<(), DirectJob> {
        let mut s = self.lock();
        let len = job.job.payload.len();
        if !s.open || s.queue.len() >= MAX_JOBS || s.bytes + len > MAX_BYTES {
            return Err(job);
        }
        self.used.store(true, Ordering::Relaxed);
        s.bytes += len;
        s.queue.push_back(job);
        Ok(())
    }

    /// Puts spilled jobs that could not be written back at the front, in order.
    pub(super) fn restore(&self, jobs: Vec<DirectJob>) {
        let mut s = self.lock();
        for job in jobs.into_iter().rev() {
            s.bytes += job.job.payload.len();
            s.queue.push_front(job);
        }
    }

    /// Takes the oldest job if it is older than `before` (the oldest queued in `new/`, if
    /// any), and remembers it as running.
    pub(super) fn take(&self, before: Option<&str>) -> Option<(String, JobFile)> {
        let mut s = self.lock();
        let older = s
            .queue
            .front()
            .is_some_and(|j| before.is_none_or(|b| j.id.as_str() < b));
        if !older {
            return None;
        }
        let job = s.queue.pop_front()?;
        s.bytes -= job.job.payload.len();
        s.running.insert(job.id.clone(), job.hold);
        Some((job.id, job.job))
    }

    /// Whether a lane with nothing listed should list `new/`: when something arrived there or
    /// a while passed; and when nothing is queued here, unless an ingress feeds this queue and
    /// the last listing found `new/` empty (arrivals there wake the lanes and mark it dirty,
    /// through the file watch or the poller: listing an empty `new/` each time a lane ran out of
    /// fed jobs took two fifths of the lanes' time under a busy ingress).
    pub(super) fn should_list(&self) -> bool {
        let mut s = self.lock();
        let fed = self.used.load(Ordering::Relaxed);
        // Taken whatever else decides: any listing made now covers it.
        let dirty = self.dirty.swap(false, Ordering::AcqRel);
        let due = dirty
            || s.listed_at.elapsed() >= LIST_EVERY
            || (s.queue.is_empty() && (!fed || s.new_had_jobs));
        if due {
            s.listed_at = Instant::now();
        }
        due
    }

    /// What the listing [`Direct::should_list`] asked for found in `new/`.
    pub(super) fn listed(&self, found_jobs: bool) {
        self.lock().new_had_jobs = found_jobs;
    }

    /// Something arrived in `new/` (or might have).
    pub(super) fn mark_dirty(&self) {
        self.dirty.store(true, Ordering::Release);
    }

    /// The hold of job `id` if it came this way and is running: its outcome is being stored.
    pub(super) fn finished(&self, id: &str) -> Option<Hold> {
        if !self.used.load(Ordering::Relaxed) {
            return None;
        }
        self.lock().running.remove(id)
    }

    /// Job `id`'s outcome could not be handed on: it is running again until it can.
    pub(super) fn unfinish(&self, id: String, hold: Hold) {
        self.lock().running.insert(id, hold);
    }

    /// Takes the queued jobs `pick` chooses, to be written to `new/`.
    pub(super) fn spill(&self, pick: impl Fn(&DirectJob) -> bool) -> Vec<DirectJob> {
        let mut s = self.lock();
        let (out, keep): (Vec<_>, Vec<_>) = s.queue.drain(..).partition(|j| pick(j));
        s.queue = keep.into();
        s.bytes = s.queue.iter().map(|j| j.job.payload.len()).sum();
        out
    }

    /// Takes offers (`true`) or not (the worker stops; what is queued is spilled).
    pub(super) fn set_open(&self, open: bool) {
        self.lock().open = open;
    }

    /// Jobs queued here, jobs running from here, and the oldest queued id.
    pub(super) fn counts(&self) -> (u64, u64, Option<String>) {
        let s = self.lock();
        (
            s.queue.len() as u64,
            s.running.len() as u64,
            s.queue.front().map(|j| j.id.clone()),
        )
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: &str, count: &Arc<AtomicUsize>, len: usize) -> DirectJob {
        DirectJob {
            id: id.into(),
            job: JobFile {
                function: "echo".into(),
                submitted_ms: 0,
                attempts: 0,
                payload: vec![0; len],
            },
            hold: Hold::take(count),
        }
    }

    #[test]
    fn jobs_are_taken_in_id_order_against_new_and_hold_their_segment() {
        let d = Direct::default();
        let seg = Arc::new(AtomicUsize::new(0));
        for id in ["f1-1-2", "f1-1-4"] {
            assert!(d.offer(job(id, &seg, 3)).is_ok());
        }
        assert_eq!(seg.load(Ordering::Acquire), 2);
        // A file job older than the first is taken from new/ first.
        assert!(d.take(Some("f1-1-1")).is_none());
        let (id, _) = d.take(Some("f1-1-3")).expect("older than new/'s");
        assert_eq!(id, "f1-1-2");
        assert_eq!(d.counts(), (1, 1, Some("f1-1-4".into())));
        // Finishing hands the hold on; releasing it frees the segment's share.
        d.finished(&id).expect("running").release();
        assert!(d.finished(&id).is_none());
        assert_eq!(seg.load(Ordering::Acquire), 1);
        // Spilled: out of the queue with its hold.
        let out = d.spill(|j| j.hold.of(&seg));
        assert_eq!(out.len(), 1);
        assert_eq!(d.counts(), (0, 0, None));
        d.restore(out);
        assert_eq!(d.counts().0, 1);
    }

    #[test]
    fn offers_are_bounded_and_refused_while_stopping() {
        let d = Direct::default();
        let seg = Arc::new(AtomicUsize::new(0));
        assert!(d.offer(job("f1-1-1", &seg, MAX_BYTES)).is_ok());
        assert!(d.offer(job("f1-1-2", &seg, 1)).is_err(), "over the bytes");
        d.spill(|_| true);
        for i in 0..MAX_JOBS {
            assert!(d.offer(job(&format!("f1-1-{i:05}"), &seg, 0)).is_ok());
        }
        assert!(d.offer(job("f1-2-1", &seg, 0)).is_err(), "over the count");
        d.spill(|_| true);
        d.set_open(false);
        assert!(d.offer(job("f1-2-2", &seg, 0)).is_err(), "closed");
    }

    #[test]
    fn the_lanes_list_new_when_told_or_after_a_while() {
        let d = Direct::default();
        assert!(d.should_list(), "nothing queued here, and dirty at first");
        let seg = Arc::new(AtomicUsize::new(0));
        assert!(d.offer(job("f1-1-1", &seg, 0)).is_ok());
        assert!(
            !d.should_list(),
            "jobs queued here, nothing arrived in new/"
        );
        d.mark_dirty();
        assert!(d.should_list());
        // Fed and run dry: an empty new/ is not listed again until something arrives there.
        d.listed(false);
        assert!(d.take(None).is_some());
        assert!(!d.should_list());
        d.listed(true);
        assert!(
            d.should_list(),
            "the last listing found jobs: there may be more"
        );
        d.listed(false);
        d.mark_dirty();
        assert!(d.should_list());
    }
}
