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

/// The most ids handed to the next generation: a deep queue's listing (about 0.5 s at a million
/// queued here) must end before the head runs out, or the lanes run dry after each restart.
const HANDOVER_MAX: usize = 12288;
/// A head of one id in this many queued ([`HANDOVER_HEAD`] at least): lasting about as long as
/// listing the rest takes.
const HEAD_PER_QUEUED: usize = 64;
/// The bytes of the hand-over's part (`restart::parcel`) the head may take, carried outcomes
/// first.
const HEAD_BYTES: usize = 768 << 10;

/// The most ids a listing keeps (the oldest; about 19 MiB of them): a queue of ten million
/// held 700 MiB of the worker's memory in its listing. A deeper queue is listed again each time
/// fewer than [`REFRESH_TRUNCATED`] of them are left.
#[cfg(not(test))]
pub(super) const LIST_MAX: usize = 262_144;
#[cfg(test)]
pub(super) const LIST_MAX: usize = 4096;
/// Fewer listed ids than this left of a listing that left some out: list again.
#[cfg(not(test))]
const REFRESH_TRUNCATED: usize = 32_768;
#[cfg(test)]
const REFRESH_TRUNCATED: usize = 1024;

/// Keeps the oldest [`LIST_MAX`] of `ids` (in no order); returns the newest of them.
fn keep_oldest(ids: &mut Vec<String>) -> &str {
    ids.select_nth_unstable(LIST_MAX - 1);
    ids.truncate(LIST_MAX);
    ids.last().map_or("", String::as_str)
}

/// The valid job ids of a hand-over's lines (one id a line).
fn id_lines(bytes: &[u8]) -> impl Iterator<Item = &str> {
    bytes
        .split(|b| *b == b'\n')
        .filter_map(|l| std::str::from_utf8(l).ok())
        .filter(|l| valid_id(l))
}

/// Clears "a listing runs" however the helper ends, and wakes the lanes that wait for it.
struct Running(Arc<AtomicBool>, Arc<super::direct::Waker>);

impl Drop for Running {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
        self.1.bump();
    }
}

impl SpoolSource {
    /// The head of the sorted ids queued, for the next generation: one in [`HEAD_PER_QUEUED`]
    /// of the queue (from [`HANDOVER_HEAD`] up to [`HANDOVER_MAX`] ids, within what the hand-over
    /// leaves after `carried` bytes), then `+DEPTH` if there are more. The next generation claims
    /// from its first [`HANDOVER_HEAD`] at once (reading them costs the same at any depth), puts
    /// the rest behind them and lists `new/` in a helper. Only a hint: an id gone by then is
    /// skipped at claim, and jobs queued later are found by the next listing, in order.
    pub(super) fn head(&self, carried: usize) -> Vec<u8> {
        let Ok(pending) = self.pending.lock() else {
            return Vec::new();
        };
        let rest = self.head_rest.lock().map(|r| r.clone()).unwrap_or_default();
        let depth = self.depth.load(Ordering::Acquire).max(pending.len());
        let most = (depth / HEAD_PER_QUEUED).clamp(HANDOVER_HEAD, HANDOVER_MAX);
        let room = HEAD_BYTES.saturating_sub(carried);
        let mut text = Vec::with_capacity((most * 33).min(room));
        let ids = pending.iter().map(|id| id.as_bytes());
        let all = ids.chain(id_lines(&rest).map(str::as_bytes));
        for (n, id) in all.enumerate() {
            if n == most || text.len() + id.len() + 1 > room {
                text.extend_from_slice(format!("+{depth}\n").as_bytes());
                return text;
            }
            text.extend_from_slice(id);
            text.push(b'\n');
        }
        // More in `new/` than this head: a head not listed yet, or a listing that kept only
        // the oldest ids (the next generation lists `new/` before the head runs out).
        if self.more.load(Ordering::Acquire) || self.truncated.load(Ordering::Acquire) {
            text.extend_from_slice(format!("+{depth}\n").as_bytes());
        }
        text
    }

    /// Takes the head a previous generation handed over: its first [`HANDOVER_HEAD`] ids now,
    /// the rest behind them once a helper has read them, and `new/` listed when those run low.
    pub(super) fn take_over(&self, data: &[u8]) {
        // HANDOVER_MAX ids of at most 64 bytes, each on a line, and the `+DEPTH` line.
        if data.len() > HANDOVER_MAX * 65 + 24 {
            return;
        }
        let Ok(mut pending) = self.pending.lock() else {
            return;
        };
        if !pending.is_empty() {
            return;
        }
        // The ids, then `+DEPTH` if there are more (`+` alone from an older build).
        let (ids, plus) = match data.iter().rposition(|b| *b == b'+') {
            Some(at) => (&data[..at], Some(&data[at + 1..])),
            None => (data, None),
        };
        if let Some(depth) = plus {
            let depth = std::str::from_utf8(depth).ok().map(str::trim);
            let depth = depth.and_then(|d| d.parse().ok()).unwrap_or(0);
            self.depth.store(depth, Ordering::Release);
        }
        // The first HANDOVER_HEAD ids now, the rest by the listing's helper.
        let cut = ids
            .iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(HANDOVER_HEAD - 1)
            .map_or(ids.len(), |(at, _)| at + 1);
        let (first, rest) = ids.split_at(cut);
        pending.extend(id_lines(first).map(String::from));
        // Read from the end: the rest is not read through before the first claim.
        let newest = rest
            .rsplit(|b| *b == b'\n')
            .filter_map(|l| std::str::from_utf8(l).ok())
            .find(|l| valid_id(l))
            .map(String::from);
        let more = plus.is_some() || newest.is_some();
        let last = match newest {
            Some(id) => {
                if let Ok(mut r) = self.head_rest.lock() {
                    *r = rest.to_vec();
                }
                Some(id)
            }
            None => pending.back().cloned(),
        };
        if more {
            // Listed when the first ids run low (a restart storm lists nothing).
            if let Ok(mut l) = self.head_last.lock() {
                *l = last;
            }
            self.more.store(true, Ordering::Release);
        }
    }

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
        let truncated = self.truncated.load(Ordering::Acquire);
        let low = if truncated {
            REFRESH_TRUNCATED
        } else {
            REFRESH_LOW
        };
        if pending.is_empty()
            || pending.len() >= low
            || !(truncated || self.arrived.load(Ordering::Acquire))
            || self.listing.load(Ordering::Acquire)
        {
            return;
        }
        self.arrived.store(false, Ordering::Release);
        if let Some(last) = pending.back() {
            self.list_in_background(pending, last.clone());
        }
    }

    /// The oldest [`LIST_MAX`] job ids in `new/`, sorted; how many there are in all goes to
    /// `depth`, and whether some were left out to `truncated` (listed again, then, before the
    /// lanes run out). Entries that are no job ids are set aside in `rejected/` when `reject` (a
    /// lane's own listing), else left to the lanes.
    pub(super) fn queued_ids(&self, reject: bool) -> Result<Vec<String>> {
        let mut ids: Vec<String> = Vec::new();
        // Past 2 x LIST_MAX ids, the oldest LIST_MAX are kept and the newest of them is the
        // cutoff: a newer id is not even copied (a heap of the oldest listed 70% slower).
        let mut cutoff: Option<String> = None;
        let mut count = 0;
        let new = self.spool.dir("new");
        // Streamed, not collected first: a million names held 40 MiB more.
        for entry in fs::read_dir(&new).at("listing", &new)? {
            let name = entry.at("listing", &new)?.file_name();
            if name.as_encoded_bytes().starts_with(b".") {
                continue;
            }
            let Some(id) = name.to_str().filter(|n| valid_id(n)) else {
                if reject {
                    self.spool.reject_raw("new", &name, "not a job id");
                }
                continue;
            };
            count += 1;
            if cutoff.as_deref().is_some_and(|c| id > c) {
                continue;
            }
            ids.push(id.to_string());
            if ids.len() == 2 * LIST_MAX {
                cutoff = Some(keep_oldest(&mut ids).to_string());
            }
        }
        if ids.len() > LIST_MAX {
            keep_oldest(&mut ids);
        }
        ids.sort_unstable();
        self.depth.store(count, Ordering::Release);
        self.truncated.store(count > ids.len(), Ordering::Release);
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
        let running = Running(Arc::clone(&self.listing), Arc::clone(&self.waker));
        let spawned = crate::ops::signals::spawn_helper("spool-list", move || {
            let _running = running;
            let Some(src) = weak.upgrade() else { return };
            src.put_rest_behind(listed);
            let Ok(mut ids) = src.queued_ids(false) else {
                return;
            };
            // Filtered against the front as it is now, outside the queue's lock (a million ids
            // held the lanes, and a restart's hand-over, for 100 ms): ids claimed from here to
            // the install are skipped at claim (their files are gone from new/).
            let Some(front) = src.pending.lock().ok().map(|p| p.front().cloned()) else {
                return;
            };
            ids.retain(|id| {
                front_then.as_ref().is_some_and(|then| id < then)
                    || match &front {
                        Some(front) => id >= front,
                        None => *id > head_last,
                    }
            });
            let Ok(mut pending) = src.pending.lock() else {
                return;
            };
            if src.listed.load(Ordering::Acquire) != listed {
                return;
            }
            let mut old = std::mem::replace(&mut *pending, ids.into());
            // Given back meanwhile (below that front): kept in front, in order.
            let below = old
                .iter()
                .take_while(|id| front.as_ref().is_some_and(|f| *id < f))
                .count();
            for id in old.drain(..below).rev() {
                pending.push_front(id);
            }
            src.more.store(false, Ordering::Release);
            drop(pending);
            drop(old);
        });
        // On an error the closure (and its `Running`) is dropped: the flag is clear again.
        self.helper_started("the listing of new/", spawned.map(drop));
    }

    /// Puts the rest of a handed-over head behind what is left of its first ids (unless a lane
    /// listed `new/` itself since `listed`), and wakes lanes that ran dry.
    fn put_rest_behind(&self, listed: u64) {
        let rest = match self.head_rest.lock() {
            Ok(mut r) if !r.is_empty() => std::mem::take(&mut *r),
            _ => return,
        };
        let ids: Vec<String> = id_lines(&rest).map(String::from).collect();
        if let Ok(mut pending) = self.pending.lock() {
            if self.listed.load(Ordering::Acquire) == listed {
                pending.extend(ids);
            }
        }
        self.waker.bump();
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
            min_free: crate::config::MinFree::Bytes(0),
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
