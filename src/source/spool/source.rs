//! The consuming side of the spool: claiming, finishing (recovery, quarantine and housekeeping
//! are in `recover.rs`),
//! the lanes and their waker.

use std::collections::VecDeque;
use std::fs;
use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::clock::now_ms;
use crate::config::SpoolConfig;
use crate::error::{Error, Result};
use crate::jobs::functions::JobResult;
use crate::source::lane::{Claimed, Lane};

use super::direct::Waker;
use super::format::*;
use super::*;

/// The consuming side: held by the one worker that runs this spool's jobs. Idle lanes sleep
/// until [`SpoolSource::wake`], which the worker's inotify thread calls on events in `new/`.
pub struct SpoolSource {
    pub(super) spool: Spool,
    pub(super) max_attempts: u32,
    pub(super) retain: Duration,
    pub(super) pending: Mutex<VecDeque<String>>,
    /// How many times a lane listed `new/` itself: a listing made in the background meanwhile
    /// is older than the lane's and is dropped.
    pub(super) listed: AtomicU64,
    /// `new/` holds more than `pending` (a hand-over's head): listed once the head runs low.
    pub(super) more: AtomicBool,
    /// The last id of the handed-over head (see `list_in_background`).
    pub(super) head_last: Mutex<Option<String>>,
    /// The handed-over head past its first [`HANDOVER_HEAD`] ids, unparsed (one id a line):
    /// put behind them by the background listing's helper, not before the first claim.
    pub(super) head_rest: Mutex<Vec<u8>>,
    /// How many jobs the last listing of `new/` found (or the previous generation said): the
    /// size of the head handed to the next generation follows it (`listing.rs`).
    pub(super) depth: std::sync::atomic::AtomicUsize,
    /// The last listing kept only the oldest ids of a deeper queue (`listing.rs`).
    pub(super) truncated: AtomicBool,
    /// Something arrived in `new/` since it was last listed; a listing runs in the background
    /// (`listing.rs`).
    pub(super) arrived: AtomicBool,
    pub(super) listing: Arc<AtomicBool>,
    /// A sweep of old results is running (in its own thread, never on a lane).
    pub(super) pruning: Arc<AtomicBool>,
    /// The group commit of outcomes (with `fsync`; without, they are written directly).
    pub(super) committer: Option<super::commit::Committer>,
    /// The lanes stop for a re-exec: outcomes not yet durable cross it (`carry.rs`).
    pub(super) handing_over: AtomicBool,
    pub(super) carried: Mutex<Option<Vec<u8>>>,
    /// Without the group commit: outcomes a storage fault kept out of place while the lanes
    /// stopped for an exec, or carried in and not placed yet (`carry.rs`).
    pub(super) unplaced: Mutex<Vec<super::journal::Entry>>,
    /// The jobs whose outcomes crossed the exec into this generation: until an outcome is in
    /// place, the checkpoint does not queue its job again from the journal.
    pub(super) carried_ids: Mutex<std::collections::HashSet<String>>,
    /// A checkpoint of the journal is running, and when the next is due.
    pub(super) checkpointing: Arc<AtomicBool>,
    /// A checkpoint that keeps failing is said once (then once a minute), not every time.
    checkpoint_failing: Mutex<crate::ops::logging::Recurring>,
    /// Helper threads (the background listing, the checkpoint, the sweep) that cannot start
    /// (the worker's user out of processes): said once while it lasts, not at every claim.
    helpers_failing: Mutex<crate::ops::logging::Recurring>,
    pub(super) next_checkpoint: Mutex<Instant>,
    pub(super) waker: Arc<Waker>,
    /// Jobs the ZeroMQ ingress hands over without a file (`direct.rs`).
    pub(super) direct: Arc<super::direct::Direct>,
    pub(super) next_prune: Mutex<Instant>,
    pub(super) next_housekeeping: Mutex<Instant>,
    /// The spool's directories were found removed or replaced (said once; see `housekeeping`).
    pub(super) replaced: AtomicBool,
    /// ... and this worker's user cannot open it again (said once; see `housekeeping`).
    pub(super) unopenable: AtomicBool,
    /// Less than `min_free` is free, so no new job is taken (`room.rs`): logged once while it
    /// lasts and shown in `status`, as the housekeeping finds it.
    pub(super) short_of_room: Mutex<crate::ops::logging::Recurring>,
    /// Interrupted jobs the start-up recovery could not move (say, on a full disk): retried
    /// with the housekeeping until they are.
    pub(super) unrecovered: Mutex<Vec<String>>,
    /// The largest entry accepted as a job: max_payload_bytes plus header room.
    pub(super) max_entry: u64,
    /// The consumer lock, held while this is open.
    pub(super) lock: super::lock::ConsumerLock,
}

impl SpoolSource {
    /// [`SpoolSource::open_holding`] with no lock handed over.
    #[cfg(test)]
    pub fn open(
        cfg: &SpoolConfig,
        max_payload: usize,
        resumed: bool,
        handed: Option<&[u8]>,
    ) -> Result<SpoolSource> {
        SpoolSource::open_holding(cfg, max_payload, resumed, handed, Vec::new())
    }

    /// Takes the spool's consumer lock (with the descriptors of it, by key, the previous
    /// generation handed over: `lock.rs`), replays the journal (unless `resumed`: a re-exec of
    /// a worker that left everything in place), recovers interrupted jobs, starts the group
    /// commit, and takes what the previous generation `handed` over: its waiting outcomes
    /// (committed first; their jobs are not interrupted ones) and the queue's head.
    pub fn open_holding(
        cfg: &SpoolConfig,
        max_payload: usize,
        resumed: bool,
        handed: Option<&[u8]>,
        locks: Vec<(String, OwnedFd)>,
    ) -> Result<SpoolSource> {
        let spool = Spool::from_config(cfg)?;
        let lock = super::lock::ConsumerLock::take(&spool, locks)?;
        if !resumed {
            // Before anything looks at cur/: a job whose result is only in the journal is done.
            let (segments, written) = super::replay::checkpoint(&spool, true)?;
            if written > 0 {
                log::info!(
                    "journal: {written} file(s) written again from {segments} segment(s) a crash left behind"
                );
            }
        }
        let committer = if cfg.fsync {
            Some(super::commit::Committer::start(spool.share())?)
        } else {
            None
        };
        let waker = Arc::new(Waker::default());
        let source = SpoolSource {
            spool,
            max_attempts: cfg.max_attempts,
            retain: cfg.retain_results,
            pending: Mutex::new(VecDeque::new()),
            listed: AtomicU64::new(0),
            more: AtomicBool::new(false),
            arrived: AtomicBool::new(false),
            listing: Arc::new(AtomicBool::new(false)),
            head_last: Mutex::new(None),
            head_rest: Mutex::new(Vec::new()),
            depth: std::sync::atomic::AtomicUsize::new(0),
            truncated: AtomicBool::new(false),
            pruning: Arc::new(AtomicBool::new(false)),
            committer,
            handing_over: AtomicBool::new(false),
            carried: Mutex::new(None),
            unplaced: Mutex::new(Vec::new()),
            carried_ids: Mutex::default(),
            checkpointing: Arc::new(AtomicBool::new(false)),
            checkpoint_failing: Mutex::new(crate::ops::logging::Recurring::new(
                "journal checkpoint failed, trying again later",
                "journal checkpoint works again",
            )),
            helpers_failing: Mutex::new(crate::ops::logging::Recurring::new(
                "spool: cannot start a helper thread (the lanes list new/ themselves; the checkpoint and the sweep are tried again later)",
                "spool: helper threads start again",
            )),
            next_checkpoint: Mutex::new(Instant::now() + super::journal::SEGMENT_AGE),
            waker,
            direct: Arc::default(),
            next_prune: Mutex::new(Instant::now()),
            next_housekeeping: Mutex::new(
                Instant::now()
                    + if resumed {
                        RESUMED_HOUSEKEEPING
                    } else {
                        HOUSEKEEPING
                    },
            ),
            replaced: AtomicBool::new(false),
            unopenable: AtomicBool::new(false),
            short_of_room: Mutex::new(crate::ops::logging::Recurring::new(
                "spool: new jobs are refused",
                "spool: new jobs are taken again",
            )),
            unrecovered: Mutex::new(Vec::new()),
            max_entry: max_payload as u64 + HEADER_ROOM,
            lock,
        };
        if let Ok(mut next) = source.next_prune.lock() {
            *next = SpoolSource::first_prune(&source.spool, source.prune_every());
        }
        source.start_from(handed.unwrap_or_default())?;
        if !resumed {
            // A re-exec leaves it to the first housekeeping (a quarter second in): listing
            // `tmp/` while a submitter writes there took 0.1-0.4 ms of the restart pause.
            source.clean_tmp();
        }
        Ok(source)
    }

    /// Claims the oldest queued job, or returns None when the queue is empty. An entry that
    /// is not a job (a bad name, a link, a FIFO, a directory, too large, truncated, corrupt) is
    /// set aside in `rejected/` and the next one is tried.
    pub(super) fn claim(self: &Arc<Self>) -> Result<Option<Claimed>> {
        loop {
            let id = match self.take_next()? {
                None => return Ok(None),
                Some(Taken::Direct(id, job)) => return Ok(Some(claimed(id, job))),
                Some(Taken::File(id)) => id,
            };
            match self.read_job(&id) {
                Ok(job) => return Ok(Some(claimed(id, job))),
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

    /// Takes the oldest job: one handed over without a file (`direct.rs`), or the next queued
    /// id, moved from `new/` to `cur/` (listing `new/` when the known queue is empty; in the
    /// background before it runs dry, `listing.rs`); None: nothing queued.
    fn take_next(self: &Arc<Self>) -> Result<Option<Taken>> {
        let mut pending = self
            .pending
            .lock()
            .map_err(|_| Error::Internal("spool queue lock poisoned".into()))?;
        loop {
            self.list_ahead(&pending);
            // While a listing runs in the background the lane waits for it (woken when it is
            // installed): listing a deep queue again here took as long, and held a restart.
            if pending.is_empty()
                && self.direct.should_list()
                && !self.listing.load(Ordering::Acquire)
            {
                self.listed.fetch_add(1, Ordering::AcqRel);
                self.more.store(false, Ordering::Release);
                self.arrived.store(false, Ordering::Release);
                match self.queued_ids(true) {
                    Ok(ids) => pending.extend(ids),
                    Err(e) => {
                        // Not listed: the lane's next try (after its backoff) lists again.
                        self.arrived.store(true, Ordering::Release);
                        self.direct.mark_dirty();
                        return Err(e);
                    }
                }
                self.direct.listed(!pending.is_empty());
            }
            if let Some((id, job)) = self.direct.take(pending.front().map(String::as_str)) {
                return Ok(Some(Taken::Direct(id, job)));
            }
            let Some(id) = pending.pop_front() else {
                return Ok(None);
            };
            let from = self.spool.dir("new").join(&id);
            match fs::rename(&from, self.spool.dir("cur").join(&id)) {
                Ok(()) => return Ok(Some(Taken::File(id))),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::io_path("claiming", &from, e)),
            }
        }
    }

    /// Stores a job's outcome durably, then releases it from `cur/`.
    pub(super) fn finish(&self, job: &Claimed, outcome: &JobResult, started_ms: u64) -> Result<()> {
        let (kind, error, result) = match outcome {
            Ok(r) => (Outcome::Done, None, r.clone()),
            Err(e) => (Outcome::Failed, Some(e.message.clone()), Vec::new()),
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
        let mut entry = super::journal::Entry::new(
            match kind {
                Outcome::Done => super::journal::Kind::Done,
                Outcome::Failed => super::journal::Kind::Failed,
            },
            job.id.clone(),
            encode_record(&record),
        );
        entry.hold = self.direct.finished(&job.id);
        match &self.committer {
            // The lanes stop for an exec: the outcome crosses it, no room to wait for.
            Some(c) if self.handing_over() => c.submit_all(vec![entry]),
            // Durable with the next group commit; the lane goes on meanwhile.
            Some(c) => c.submit(entry).map_err(|(e, entry)| {
                self.give_back(entry);
                e
            }),
            None => self.place_own(entry),
        }
    }

    /// Every [`super::journal::SEGMENT_AGE`]: makes what the sealed journal segments hold
    /// durable in the files (one syncfs) and deletes them, in a helper thread.
    pub(super) fn checkpoint(self: &Arc<Self>) {
        let Ok(mut next) = self.next_checkpoint.lock() else {
            return;
        };
        if Instant::now() < *next || self.checkpointing.swap(true, Ordering::AcqRel) {
            return;
        }
        *next = Instant::now() + super::journal::SEGMENT_AGE;
        drop(next);
        let (weak, running) = (Arc::downgrade(self), Arc::clone(&self.checkpointing));
        let spawned = crate::ops::signals::spawn_helper("spool-checkpoint", move || {
            if let Some(src) = weak.upgrade() {
                let done = super::replay::checkpoint_waiting(&src.spool, false, &|id| {
                    src.carried_ids.lock().is_ok_and(|c| c.contains(id))
                });
                if let Ok(mut said) = src.checkpoint_failing.lock() {
                    match done {
                        Ok(_) => said.worked(),
                        Err(e) => said.failed(&e),
                    }
                }
            }
            running.store(false, Ordering::Release);
        });
        if spawned.is_err() {
            self.checkpointing.store(false, Ordering::Release);
        }
        self.helper_started("the journal checkpoint", spawned.map(drop));
    }

    /// Says, once while it lasts, that a helper thread could not start (and when they start
    /// again).
    pub(super) fn helper_started(&self, what: &str, spawned: std::io::Result<()>) {
        if let Ok(mut said) = self.helpers_failing.lock() {
            match spawned {
                Ok(()) => said.worked(),
                Err(e) => said.failed(&format_args!("{what}: {e}")),
            }
        }
    }

    /// Wakes every idle lane: to look for new jobs, or to notice the stop flag.
    pub fn wake(&self) {
        self.arrived.store(true, Ordering::Release);
        self.direct.mark_dirty();
        self.waker.bump();
    }

    /// What the ZeroMQ ingress needs to hand jobs to this source's lanes without files.
    pub fn feed(&self) -> super::Feed {
        super::Feed {
            direct: Arc::clone(&self.direct),
            waker: Arc::clone(&self.waker),
        }
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

    /// Writes the outcomes not yet durable (see `carry.rs`), then the head of the sorted list of
    /// queued ids this worker knows, for the next generation (`SpoolSource::head`).
    fn hand_over(&self) -> Option<Vec<u8>> {
        let carried = self.carried_part();
        let head = self.head(carried.as_ref().map_or(0, Vec::len));
        if head.is_empty() {
            return carried;
        }
        let mut out = carried.unwrap_or_default();
        out.extend_from_slice(&head);
        Some(out)
    }

    fn stopping(&self, for_restart: bool) {
        self.set_handing_over(for_restart);
        // The lanes claim no more: jobs accepted from now on go to new/ (the ingress writes
        // out what is queued when it stops).
        self.direct.set_open(false);
    }

    fn queue_stats(&self) -> Option<crate::metrics::QueueStats> {
        Some(self.spool.queue_stats(self.direct.counts()))
    }

    fn locks(&self) -> Vec<(String, RawFd)> {
        self.lock.handed()
    }

    /// Before an exec, the outcomes still waiting are carried across it if they can be (see
    /// `carry.rs`); else, and before an exit, the journal is sealed once they are in place; at
    /// an exit also checkpointed (so the next start has nothing to replay).
    fn settle(&self, exiting: bool) {
        if !exiting && self.carry_outcomes() {
            return;
        }
        self.settle_here(exiting);
    }

    fn unsettle(&self) {
        self.keep_outcomes();
        self.direct.set_open(true);
    }

    /// `new/`: its events mean "new jobs".
    fn watch_dirs(&self) -> Vec<PathBuf> {
        vec![self.spool.dir("new")]
    }
}

impl SpoolSource {
    /// Seals the journal once what is queued is in place; when the process ends, also
    /// checkpoints it.
    fn settle_here(self: &Arc<Self>, exiting: bool) {
        self.leave_unplaced();
        if let Some(c) = &self.committer {
            if let Err(e) = c.seal() {
                log::error!("{e}");
            }
            let (syncs, records) = c.batches();
            log::debug!("group commit: {records} outcome(s) in {syncs} sync(s)");
        }
        if exiting {
            // In a helper, waited for a little: a slow syncfs must not hold up the exit (or a
            // second TERM); what is left is checkpointed at the next start.
            let (done_tx, done_rx) = crossbeam_channel::bounded(1);
            let src = Arc::clone(self);
            let spawned = crate::ops::signals::spawn_helper("spool-checkpoint", move || {
                if let Err(e) = super::replay::checkpoint(&src.spool, false) {
                    log::warn!("journal checkpoint at exit: {e}; the next start does it");
                }
                let _ = done_tx.send(());
            });
            if spawned.is_ok() && done_rx.recv_timeout(super::commit::SETTLE_WAIT).is_err() {
                log::info!("journal checkpoint at exit unfinished; the next start does it");
            }
        }
    }
}

/// A job taken by [`SpoolSource::take_next`].
enum Taken {
    /// Handed over without a file.
    Direct(String, JobFile),
    /// Moved to `cur/`, to be read.
    File(String),
}

/// A lane's view of a job.
fn claimed(id: String, job: JobFile) -> Claimed {
    Claimed {
        id,
        function: job.function,
        unique: String::new(),
        payload: job.payload,
        attempt: job.attempts.saturating_add(1),
        submitted_ms: job.submitted_ms,
        unrun: None,
    }
}
