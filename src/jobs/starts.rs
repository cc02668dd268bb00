//! Job starts while the process runs short of what a start needs (descriptors, processes,
//! memory: `EMFILE`, `ENFILE`, `EAGAIN`, `ENOMEM`).
//!
//! A start takes about ten descriptors at once (four pipes and std's exec-error pipe) and keeps
//! five while the job runs. Lanes starting at the same time each take a few of the last ones
//! and all fail; tried again on their own timers they keep colliding: sixteen lanes with room
//! for one start took 13-23 s for 200 jobs that run in about 1 s one after another. So once
//! a start has failed for want of a resource, starts take turns for a while
//! ([`Starts::turn`]), and a lane whose start failed tries again as soon as a job ends and
//! gives its resources back ([`Starts::wait_for_room`]), not only after its backoff: the jobs
//! run one after another at the pace the resources allow.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::clock::monotonic_us;

/// Starts take turns for this long after the last one that failed for want of a resource.
const SHORT_FOR: Duration = Duration::from_secs(10);

/// Shared by a generation's lanes (see the module's header).
#[derive(Default)]
pub struct Starts {
    /// Held across a start while resources are short.
    turn: Mutex<()>,
    /// Until when (CLOCK_MONOTONIC µs) starts take turns (past: they do not).
    short_until_us: AtomicU64,
    /// Jobs ended so far, for lanes waiting for room (read on every job: no lock).
    ended: AtomicU64,
    /// Taken to change `ended` and to wait for it to change.
    room_lock: Mutex<()>,
    room: Condvar,
}

impl Starts {
    /// The turn to start a job, while resources are short (None: no need to wait for one).
    pub fn turn(&self) -> Option<MutexGuard<'_, ()>> {
        if monotonic_us() >= self.short_until_us.load(Ordering::Acquire) {
            return None;
        }
        Some(self.turn.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// A start failed for want of a resource: starts take turns from now on, for a while.
    pub fn ran_short(&self) {
        let until = monotonic_us().saturating_add(SHORT_FOR.as_micros() as u64);
        self.short_until_us.fetch_max(until, Ordering::AcqRel);
    }

    /// A job ended and gave back what it held: lanes waiting for room try again.
    pub fn job_ended(&self) {
        let _g = self.room_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.ended.fetch_add(1, Ordering::AcqRel);
        self.room.notify_all();
    }

    /// How many jobs have ended so far (read before the start that may fail).
    pub fn ended(&self) -> u64 {
        self.ended.load(Ordering::Acquire)
    }

    /// Waits until a job ends after `seen` (see [`Starts::ended`]), or `limit` passes.
    pub fn wait_for_room(&self, seen: u64, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut g = self.room_lock.lock().unwrap_or_else(|p| p.into_inner());
        while self.ended.load(Ordering::Acquire) == seen {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            g = match self.room.wait_timeout(g, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn turns_only_while_short_and_a_job_end_wakes_a_waiting_start() {
        let s = Arc::new(Starts::default());
        assert!(s.turn().is_none(), "no turns before anything ran short");
        s.ran_short();
        let held = s.turn();
        assert!(held.is_some(), "turns while short");
        drop(held);

        let seen = s.ended();
        let waiter = {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                let t = Instant::now();
                s.wait_for_room(seen, Duration::from_secs(30));
                t.elapsed()
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        s.job_ended();
        let waited = waiter.join().unwrap();
        assert!(
            waited < Duration::from_secs(20),
            "woken by the job's end: {waited:?}"
        );

        // Nothing ends: the wait is bounded.
        let t = Instant::now();
        s.wait_for_room(s.ended(), Duration::from_millis(30));
        assert!(t.elapsed() >= Duration::from_millis(30));
    }
}
