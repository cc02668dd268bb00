//! The queue's listing, kept ahead of the lanes: `new/` is listed in a helper thread, not on a
//! lane that still has jobs to claim.
//!
//! Lanes claim from `pending`, a sorted listing of `new/`. Listing a deep queue takes about a
//! microsecond per job (getdents, the names, the sort: 10-20 ms at 40,000 here), and a lane
//! that ran dry used to list it itself: a busy worker topped up from outside stalled that long
//! each time its listing ran out (about every 2.4 s at 40,000 queued, 17k jobs/s), and a
//! restart asked during such a stall waited for it. Now, once fewer than [`REFRESH_LOW`] ids
//! are left and something arrived since the last listing, a helper lists `new/` and installs
//! the result behind what the lanes have not claimed yet; a lane lists `new/` itself only when
//! nothing is left (an idle queue that gets its first jobs, or a helper that could not keep up).
//! The same helper lists the rest of a queue whose head a previous generation handed over.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::source::SpoolSource;
use super::*;

/// Fewer listed ids than this left while more arrived: list `new/` again, in the background
/// (about a quarter of a second of claims at 17k jobs/s, longer than a listing of 40,000 takes).
const REFRESH_LOW: usize = 4096;

/// Clears "a listing runs" however the helper ends.
struct Running(Arc<AtomicBool>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl SpoolSource {
    /// Called with the queue's lock held, before a claim: starts a listing in the background
    /// when a handed-over head runs low (once: `more` is cleared when a listing is installed),
    /// or when the listed ids run low while more arrived.
    pub(super) fn list_ahead(self: &Arc<Self>, pending: &VecDeque<String>) {
        if self.more.load(Ordering::Acquire) {
            if pending.len() < HANDOVER_LOW {
                let head_last = self.head_last.lock().ok().and_then(|mut last| last.take());
                if let Some(head_last) = head_last {
                    self.list_in_background(pending, head_last);
                }
            }
            return;
        }
        if pending.is_empty()
            || pending.len() >= REFRESH_LOW
            || !self.arrived.load(Ordering::Acquire)
            || self.listing.load(Ordering::Acquire)
        {
            return;
        }
        self.arrived.store(false, Ordering::Release);
        if let Some(last) = pending.back() {
            self.list_in_background(pending, last.clone());
        }
    }

    /// The job ids in `new/`, sorted. Entries that are no job ids are set aside in
    /// `rejected/` when `reject` (a lane's own listing), else left to the lanes.
    pub(super) fn queued_ids(&self, reject: bool) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        for name in list_raw(&self.spool.dir("new"))? {
            match name.to_str().filter(|n| valid_id(n)) {
                Some(id) => ids.push(id.to_string()),
                None if reject => self.spool.reject_raw("new", &name, "not a job id"),
                None => {}
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// Lists `new/` in a helper thread and installs the sorted listing behind what is left of
    /// `pending` (called with its lock held; `head_last` is its last id, of a handed-over head
    /// or of the last listing): the lanes claim from it meanwhile. Of the ids listed, those
    /// from `pending`'s front then up to its front at the install were claimed meanwhile (or up
    /// to `head_last` if it ran out) and are left out; those below its front then were never in
    /// it (given back, a retry, a late submitter) and are kept, so a job given back is never
    /// starved by listings that keep a busy queue from running dry. If a lane ran out and
    /// listed `new/` itself meanwhile, its listing is newer and this one is dropped. If the
    /// thread cannot start or the listing fails, the lanes list when `pending` runs out.
    /// One listing runs at a time.
    pub(super) fn list_in_background(
        self: &Arc<Self>,
        pending: &VecDeque<String>,
        head_last: String,
    ) {
        if self.listing.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(self);
        let listed = self.listed.load(Ordering::Acquire);
        let front_then = pending.front().cloned();
        let running = Running(Arc::clone(&self.listing));
        let spawned = crate::ops::signals::spawn_helper("spool-list", move || {
            let _running = running;
            let Some(src) = weak.upgrade() else { return };
            let Ok(mut ids) = src.queued_ids(false) else {
                return;
            };
            let Ok(mut pending) = src.pending.lock() else {
                return;
            };
            if src.listed.load(Ordering::Acquire) != listed {
                return;
            }
            let front = pending.front();
            ids.retain(|id| {
                front_then.as_ref().is_some_and(|then| id < then)
                    || match front {
                        Some(front) => id >= front,
                        None => *id > head_last,
                    }
            });
            *pending = ids.into();
            src.more.store(false, Ordering::Release);
        });
        // On an error the closure (and its `Running`) is dropped: the flag is clear again.
        self.helper_started("the listing of new/", spawned.map(drop));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SpoolConfig;
    use crate::shutdown::Shutdown;
    use std::collections::HashSet;
    use std::time::Duration;

    /// A queue topped up while a lane claims is listed again in the background before it runs
    /// dry: the lane lists `new/` itself once (at the start), every job is claimed, and a job
    /// given back below the listing's front is claimed too, not starved.
    #[test]
    fn a_busy_queue_is_listed_again_before_it_runs_dry() {
        let dir = crate::testutil::tempdir("spool", "refresh");
        let spool = Spool::open(&dir, false).expect("open");
        let submit = |n: usize| -> Vec<String> {
            (0..n)
                .map(|i| spool.submit("echo", &i.to_le_bytes()).expect("submit"))
                .collect()
        };
        let mut all: HashSet<String> = submit(REFRESH_LOW + 100).into_iter().collect();
        let cfg = SpoolConfig {
            dir: dir.clone(),
            max_attempts: 3,
            retain_results: Duration::from_secs(3600),
            fsync: false,
        };
        let src = Arc::new(SpoolSource::open(&cfg, 1 << 20, false, None).expect("open"));
        let mut lane = src.lane();
        let go = Shutdown::fixed(false);
        let given = lane.next(&go).expect("next").expect("a job");
        let mut claimed = Vec::new();
        for _ in 0..200 {
            let job = lane.next(&go).expect("next").expect("a job");
            lane.finish(&job, &Ok(Vec::new())).expect("finish");
            claimed.push(job.id.clone());
        }
        // More arrive (the watch says so), and the first job is given back: its id is below
        // every id still listed.
        assert!(lane.release(&given), "given back");
        all.extend(submit(50));
        src.wake();
        let job = lane.next(&go).expect("next").expect("a job");
        lane.finish(&job, &Ok(Vec::new())).expect("finish");
        claimed.push(job.id.clone());
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while src.listing.load(Ordering::Acquire) {
            assert!(
                std::time::Instant::now() < deadline,
                "the background listing did not end"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        while !src.pending.lock().expect("lock").is_empty() {
            let job = lane.next(&go).expect("next").expect("a job");
            lane.finish(&job, &Ok(Vec::new())).expect("finish");
            claimed.push(job.id.clone());
        }
        assert_eq!(
            src.listed.load(Ordering::Acquire),
            1,
            "listed on a lane once"
        );
        let once: HashSet<&String> = claimed.iter().collect();
        assert_eq!(once.len(), claimed.len(), "a job claimed twice");
        assert!(once.contains(&given.id), "the job given back was starved");
        assert_eq!(once.len(), all.len(), "every job claimed");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
