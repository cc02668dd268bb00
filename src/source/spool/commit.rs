//! Group commit: lanes hand their outcomes here and go on to claim the next job; one thread
//! appends whatever has gathered (from every lane) to the journal with one sync, then writes
//! each result file and takes its job out of `cur/`. A result is never visible in `done/` or
//! `failed/` before its record is durable, and a job leaves `cur/` only after that: a crash at
//! any point reruns the job or replays its result, never loses it.
//!
//! While the journal cannot be written (a full disk, EIO), the batch is kept in memory and
//! tried again with backoff; [`Committer::failing`] says why, and the lanes claim nothing
//! meanwhile (the worker shows `degraded`).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long the control thread waits for the seal before an exec or exit: it must stay able to
/// act on a second TERM. An unsealed segment is replayed by the next checkpoint.
pub(super) const SETTLE_WAIT: Duration = Duration::from_millis(500);

use super::journal::{self, Entry, Segment, SEGMENT_AGE};
use super::*;

/// Records appended with one sync at most (a larger gathering is split).
const MAX_BATCH: usize = 16;
/// Outcomes waiting for their sync at most (besides the batch being synced): a lane that would
/// exceed it waits. It bounds how many finished jobs a failing disk leaves held in `cur/`.
const MAX_QUEUED: usize = 16;
/// Syncs start at least this far apart while outcomes keep coming (an idle committer syncs at
/// once): the disk's syncs (a few thousand a second here) are shared with the ZeroMQ ingress,
/// whose clients wait for theirs; a lane waits only once [`MAX_QUEUED`] are queued.
const SYNC_GAP: Duration = Duration::from_millis(1);
/// How much lower the commit thread's CPU priority is than the rest of the worker's (nice
/// steps). Its work is in the background: no lane waits for it until [`MAX_QUEUED`] outcomes
/// are queued, while the ZeroMQ ingress's clients wait for each answer. On two busy cores it
/// took turns from the ingress; at +5, 8 ZeroMQ clients' durable rate was 17.8k/s against
/// 15.9k/s (means of 6 alternating pairs), the spool's restart pause and throughput unchanged.
const NICER: i32 = 5;

#[derive(Default)]
struct State {
    queue: Vec<Entry>,
    /// Entries ever queued, and how many of them are durable and in place (in queue order).
    queued: u64,
    done: u64,
    /// Why the journal cannot be written now: the message and the errno, if any.
    failing: Option<(String, Option<i32>)>,
    /// Seals asked for and done.
    seal_asked: u64,
    sealed: u64,
    /// A hand-over to the next generation is asked: the thread parks between batches (see
    /// [`Committer::park`]), and says so.
    park: bool,
    parked: bool,
    /// The lanes are stopping for an exec: their outcomes cross it, so none waits for room.
    handing_over: bool,
    /// The thread is gone (a panic): nothing queued will be stored.
    dead: bool,
    stop: bool,
    /// Batch sizes, for status: how many syncs, how many records.
    syncs: u64,
    records: u64,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a change, at most `left`.
    fn wait_for<'a>(&self, s: MutexGuard<'a, State>, left: Duration) -> MutexGuard<'a, State> {
        self.changed
            .wait_timeout(s, left)
            .map(|(g, _)| g)
            .unwrap_or_else(|p| p.into_inner().0)
    }

    /// Waits until `ready` holds, the thread is dead, or `deadline` (if any) passed.
    fn wait_until<'a>(
        &self,
        mut s: MutexGuard<'a, State>,
        ready: impl Fn(&State) -> bool,
        deadline: Option<Instant>,
    ) -> MutexGuard<'a, State> {
        while !ready(&s) && !s.dead && deadline.is_none_or(|d| Instant::now() < d) {
            s = self.wait_for(s, Duration::from_millis(100));
        }
        s
    }
}

/// The worker's committer (one per spool source, with `fsync` on).
pub(super) struct Committer {
    shared: Arc<Shared>,
}

/// Marks the committer dead if its thread unwinds.
struct DeathNotice(Arc<Shared>);

impl Drop for DeathNotice {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.lock().dead = true;
            self.0.changed.notify_all();
        }
    }
}

impl Committer {
    /// Starts the committing thread over its own handle on the spool.
    pub(super) fn start(spool: Spool) -> Result<Committer> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        });
        let inner = Arc::clone(&shared);
        crate::ops::signals::spawn_essential("spool-commit", move || {
            let _notice = DeathNotice(Arc::clone(&inner));
            lower_priority();
            run(&spool, &inner);
        })
        .map_err(|e| Error::io("spawning the spool's commit thread", e))?;
        Ok(Committer { shared })
    }

    /// Queues an outcome; returns at once (waits only while [`MAX_QUEUED`] are queued).
    /// While the storage fails and the queue is full, the outcome comes back with the failure:
    /// the lane keeps it, shows the fault (`degraded`) and tries again, instead of waiting
    /// unseen.
    pub(super) fn submit(&self, e: Entry) -> std::result::Result<(), (Error, Entry)> {
        let mut s = self.shared.wait_until(
            self.shared.lock(),
            |s| s.queue.len() < MAX_QUEUED || s.failing.is_some() || s.handing_over,
            None,
        );
        if s.dead {
            return Err((dead(), e));
        }
        if s.queue.len() >= MAX_QUEUED && !s.handing_over {
            // Read under the same lock as the wait's condition: it is set.
            if let Some(why) = failure(&s) {
                return Err((why, e));
            }
        }
        s.queue.push(e);
        s.queued += 1;
        self.shared.changed.notify_all();
        Ok(())
    }

    /// The lanes are stopping for an exec (`true`; their outcomes cross it, so a lane waiting
    /// for room goes on at once: the number of lanes bounds what this adds), or not any more.
    pub(super) fn set_handing_over(&self, yes: bool) {
        self.shared.lock().handing_over = yes;
        self.shared.changed.notify_all();
    }

    /// Queues outcomes at once, however many are queued: those a previous generation handed
    /// over (the first claim must not wait for a sync), and a lane's last before an exec (it
    /// crosses the exec; the lanes' number bounds what this adds).
    pub(super) fn submit_all(&self, entries: Vec<Entry>) -> Result<()> {
        let mut s = self.shared.lock();
        if s.dead {
            return Err(dead());
        }
        s.queued += entries.len() as u64;
        s.queue.extend(entries);
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Waits until everything queued so far is durable and in place (or the thread is dead).
    pub(super) fn flush(&self) -> Result<()> {
        let s = self.shared.lock();
        let target = s.queued;
        let s = self.shared.wait_until(s, |s| s.done >= target, None);
        if s.done < target {
            return Err(dead());
        }
        Ok(())
    }

    /// Seals the open segment once everything queued is in place (before an exec or an
    /// exit), waiting at most [`SETTLE_WAIT`] (the lanes have flushed already).
    pub(super) fn seal(&self) -> Result<()> {
        let deadline = Some(Instant::now() + SETTLE_WAIT);
        let mut s = self.shared.lock();
        s.seal_asked += 1;
        let target = s.seal_asked;
        self.shared.changed.notify_all();
        let s = self.shared.wait_until(s, |s| s.sealed >= target, deadline);
        if s.sealed < target {
            return Err(Error::TimedOut(format!(
                "the journal was not sealed within {} ms (a slow or failing disk); the next checkpoint replays it",
                SETTLE_WAIT.as_millis()
            )));
        }
        Ok(())
    }

    /// Before an exec: lets the sync under way finish, seals the segment, and parks the thread;
    /// returns the outcomes not yet in place (waiting for their sync, or synced but not yet
    /// written as files), for the next generation to commit. None if the thread did not park by `wait` (a slow or failing
    /// disk) or is dead: then nothing is parked.
    pub(super) fn park(&self, wait: Duration) -> Option<Vec<Entry>> {
        let deadline = Some(Instant::now() + wait);
        let mut s = self.shared.lock();
        s.park = true;
        self.shared.changed.notify_all();
        s = self.shared.wait_until(s, |s| s.parked, deadline);
        if s.parked && !s.dead {
            return Some(s.queue.clone());
        }
        s.park = false;
        self.shared.changed.notify_all();
        None
    }

    /// The exec after [`Committer::park`] failed, or the waiting outcomes are stored here after
    /// all: the thread goes on with them.
    pub(super) fn unpark(&self) {
        let mut s = self.shared.lock();
        s.park = false;
        self.shared.changed.notify_all();
    }

    /// Why outcomes cannot be stored now, if they cannot: an error of the right tier for the
    /// lanes (a full disk is transient).
    pub(super) fn failing(&self) -> Option<Error> {
        let s = self.shared.lock();
        if s.dead {
            return Some(dead());
        }
        failure(&s)
    }

    /// Syncs so far and records committed by them.
    pub(super) fn batches(&self) -> (u64, u64) {
        let s = self.shared.lock();
        (s.syncs, s.records)
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.changed.notify_all();
    }
}

fn dead() -> Error {
    Error::Internal("the spool's commit thread died: results are not being stored".into())
}

/// Why the journal cannot be written now, as an error of the right tier (a full disk is
/// transient).
fn failure(s: &State) -> Option<Error> {
    s.failing.as_ref().map(|(about, errno)| match errno {
        Some(n) => Error::Io {
            about: about.clone(),
            source: std::io::Error::from_raw_os_error(*n),
        },
        None => Error::Msg(about.clone()),
    })
}

/// Splits an error into what `failing` keeps.
fn kept(e: &Error) -> (String, Option<i32>) {
    match e {
        Error::Io { about, source } => (about.clone(), source.raw_os_error()),
        other => (other.to_string(), None),
    }
}

/// Lowers this thread's CPU priority by [`NICER`] from what it has (at most to 19, the
/// lowest); a failure leaves it as it is (it costs only speed).
fn lower_priority() {
    let tid = nix::unistd::gettid().as_raw() as libc::id_t;
    nix::errno::Errno::clear();
    // SAFETY: getpriority reads the nice value of thread `tid` (this one); it has no memory
    // arguments. -1 is a valid value, so errno tells an error apart.
    let now = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
    if now == -1 && nix::errno::Errno::last_raw() != 0 {
        return;
    }
    // SAFETY: setpriority sets the nice value of thread `tid` (this one); no memory arguments.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, (now + NICER).min(19)) } != 0 {
        log::debug!(
            "spool commit: priority not lowered: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The committing thread.
fn run(spool: &Spool, shared: &Shared) {
    let mut segment: Option<(Segment, Instant)> = None;
    let mut last_sync: Option<Instant> = None;
    loop {
        let (batch, seal) = {
            let mut s = shared.lock();
            if s.park && !s.stop {
                // Between batches: what the segment holds is in place, or back at the front of
                // the queue (synced, not yet placed: parked mid-batch). The segment is sealed
                // (never replayed in this boot); the queue is handed over, or committed here if
                // the exec fails. Lost with the process before the next generation commits
                // them, their jobs are still in cur/ and run again: at least once.
                drop(s);
                if let Some((seg, _)) = segment.take() {
                    seg.seal(spool);
                }
                s = shared.lock();
                s.parked = true;
                shared.changed.notify_all();
                while s.park && !s.stop {
                    s = shared.changed.wait(s).unwrap_or_else(|p| p.into_inner());
                }
                s.parked = false;
                continue;
            }
            while s.queue.is_empty() && s.seal_asked == s.sealed && !s.stop && !s.park {
                // An open segment is sealed once old, busy or idle: a crash then replays
                // at most a few seconds, and the checkpoint can delete it.
                let Some((_, opened)) = &segment else {
                    s = shared.changed.wait(s).unwrap_or_else(|p| p.into_inner());
                    continue;
                };
                let left = SEGMENT_AGE.saturating_sub(opened.elapsed());
                if left.is_zero() {
                    break;
                }
                s = shared.wait_for(s, left);
            }
            if s.stop && s.queue.is_empty() {
                break;
            }
            // Busy: let more outcomes gather, up to a batch, for at most the gap.
            if let Some(last) = last_sync {
                let until = last + SYNC_GAP;
                // Not past what the lanes may queue: they wait for this sync then (a MAX_BATCH
                // over MAX_QUEUED, tried once, held every sync for the whole gap: 15-37% fewer
                // ZeroMQ messages a second).
                while s.queue.len() < MAX_BATCH.min(MAX_QUEUED)
                    && !s.stop
                    && !s.park
                    && s.seal_asked == s.sealed
                {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    s = shared.wait_for(s, left);
                }
            }
            if s.park && !s.stop {
                continue;
            }
            let n = s.queue.len().min(MAX_BATCH);
            let batch: Vec<Entry> = s.queue.drain(..n).collect();
            (batch, s.seal_asked)
        };
        if !batch.is_empty() {
            last_sync = Some(Instant::now());
            let mut batch = batch;
            let Some((placed, synced)) = store(spool, shared, &mut segment, &mut batch) else {
                return; // stopping with the disk failing: the jobs stay in cur/ and run again
            };
            let mut s = shared.lock();
            s.done += placed as u64;
            if synced {
                s.syncs += 1;
                s.records += batch.len() as u64;
            }
            // Parked before all were placed (an exec is waiting): the rest (durable already,
            // or not yet, when the storage failed) goes back to the front of the queue, to be
            // handed over or placed after all.
            let rest: Vec<Entry> = batch.into_iter().skip(placed).collect();
            s.queue.splice(0..0, rest);
            shared.changed.notify_all();
        }
        let aged = segment.as_ref().is_some_and(|(seg, t)| {
            seg.size >= journal::SEGMENT_BYTES || t.elapsed() >= SEGMENT_AGE
        });
        let mut s = shared.lock();
        if (seal > s.sealed && s.queue.is_empty()) || aged {
            drop(s);
            if let Some((seg, _)) = segment.take() {
                seg.seal(spool);
            }
            s = shared.lock();
            if seal > s.sealed && s.queue.is_empty() {
                s.sealed = seal;
            }
            shared.changed.notify_all();
        }
    }
    if let Some((seg, _)) = segment.take() {
        seg.seal(spool);
    }
}

/// Appends `batch` with one sync and puts each file in place, retrying with backoff while the
/// storage fails. Returns how many were placed (all, or fewer if a park is asked: an exec
/// waits, and the rest cross it) and whether the batch was synced; None if told to stop
/// meanwhile.
fn store(
    spool: &Spool,
    shared: &Shared,
    segment: &mut Option<(Segment, Instant)>,
    batch: &mut [Entry],
) -> Option<(usize, bool)> {
    let mut backoff = Duration::from_millis(100);
    let mut appended = false;
    let mut placed = 0;
    loop {
        let step = (|| {
            if !appended {
                if segment.is_none() {
                    *segment = Some((Segment::create_long(spool, "w")?, Instant::now()));
                }
                if let Some((seg, _)) = segment.as_mut() {
                    if let Err(e) = seg.append(batch) {
                        // Its tail may be torn: never appended to again. What it held before
                        // is in place, so it is sealed.
                        if let Some((seg, _)) = segment.take() {
                            seg.seal(spool);
                        }
                        return Err(e);
                    }
                }
                appended = true;
            }
            while placed < batch.len() {
                if shared.lock().park {
                    break;
                }
                // Outcomes of jobs that came without a file, one after another, go to the
                // results log with one write.
                let run = spool.place_run(&batch[placed..])?;
                // A job that came without a file no longer needs its journal record.
                for e in &mut batch[placed..placed + run] {
                    if let Some(hold) = e.hold.take() {
                        hold.release();
                    }
                }
                placed += run;
            }
            Ok(())
        })();
        match step {
            Ok(()) => {
                let mut s = shared.lock();
                if s.failing.take().is_some() {
                    log::info!("results are being stored again");
                }
                return Some((placed, appended));
            }
            Err(e) => {
                let mut s = shared.lock();
                if s.failing.is_none() {
                    log::error!("cannot store results now ({e}); keeping them and trying again");
                }
                s.failing = Some(kept(&e));
                // The backoff ends early for a stop, and for a hand-over: an exec waits, and
                // what is not in place crosses it, for the next generation to try again. (It
                // slept the backoff out; the exec gave up on it after 500 ms and went on
                // without these outcomes, and their jobs ran again.)
                let until = Instant::now() + backoff;
                while !s.stop && !s.park {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    s = shared.wait_for(s, left);
                }
                if s.stop {
                    return None;
                }
                if s.park {
                    return Some((placed, appended));
                }
                drop(s);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The commit thread runs [`NICER`] nice steps below the thread that started it.
    #[test]
    fn the_commit_thread_runs_at_a_lower_priority() {
        let nice = |task: &str| -> Option<i32> {
            let stat = std::fs::read_to_string(format!("/proc/self/task/{task}/stat")).ok()?;
            stat.rsplit(')')
                .next()?
                .split_whitespace()
                .nth(16)?
                .parse()
                .ok()
        };
        let own = nice(&nix::unistd::gettid().to_string()).expect("own nice");
        let dir = crate::testutil::tempdir("spool", "commit-nice");
        let _committer = Committer::start(Spool::open(&dir, true).expect("open")).expect("start");
        let want = (own + NICER).min(19);
        let found = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(5));
            std::fs::read_dir("/proc/self/task")
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|t| {
                    std::fs::read_to_string(format!("/proc/self/task/{t}/comm"))
                        .is_ok_and(|c| c.trim() == "spool-commit")
                })
                .any(|t| nice(&t) == Some(want))
        });
        assert!(found, "no spool-commit thread at nice {want} (own {own})");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Outcomes meet a full queue while the journal cannot be written: the one that finds no
    /// room comes back with the failure (the lane then shows `degraded`, keeps it and tries
    /// again) instead of waiting for room that never comes.
    #[test]
    fn a_full_queue_on_a_failing_journal_gives_the_outcome_back() {
        let dir = crate::testutil::tempdir("spool", "commit-fails");
        let committer = Committer::start(Spool::open(&dir, true).expect("open")).expect("start");
        // The journal's directory goes away under the committer's open handle on it: every
        // segment it begins fails (ENOENT).
        std::fs::remove_dir(dir.join("journal")).expect("rmdir");
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            for i in 0..(MAX_BATCH + MAX_QUEUED + 8) {
                let e = Entry::new(journal::Kind::Done, format!("f1-1-{i}"), b"r".to_vec());
                if let Err((why, back)) = committer.submit(e) {
                    let _ = tx.send(Some((why.to_string(), back.id)));
                    return;
                }
            }
            let _ = tx.send(None);
        });
        let got = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("a lane waited for room for ever");
        let (why, id) = got.expect("every outcome was queued: the queue is unbounded");
        assert!(why.contains("No such file or directory"), "{why}");
        assert!(id.starts_with("f1-1-"), "the outcome came back: {id}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A lane that waits for room in the queue when the lanes are told to stop for an exec
    /// goes on at once: its outcome crosses the exec, it must not wait for a sync (or, as
    /// here, for a thread parked for the hand-over).
    #[test]
    fn a_hand_over_frees_a_lane_waiting_for_room() {
        let dir = crate::testutil::tempdir("spool", "commit-hand-over");
        let committer =
            Arc::new(Committer::start(Spool::open(&dir, true).expect("open")).expect("start"));
        assert!(committer.park(Duration::from_secs(5)).is_some(), "parked");
        for i in 0..MAX_QUEUED {
            let e = Entry::new(journal::Kind::Done, format!("f1-1-{i}"), b"r".to_vec());
            assert!(committer.submit(e).is_ok());
        }
        let (tx, rx) = crossbeam_channel::bounded(1);
        let lane = Arc::clone(&committer);
        std::thread::spawn(move || {
            let e = Entry::new(journal::Kind::Done, "f1-1-last".into(), b"r".to_vec());
            let _ = tx.send(lane.submit(e).is_ok());
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "the queue is full and the thread parked: the lane waits"
        );
        committer.set_handing_over(true);
        let queued = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the lane still waits for room after the hand-over began");
        assert!(queued, "its outcome was queued");
        committer.unpark();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
