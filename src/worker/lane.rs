//! Lanes: one thread per unit of concurrency, claiming, running and reporting jobs (asking for a
//! recycle at the generation's limits); storage and resource health shared by a generation's
//! lanes.

use crate::metrics::Outcome;
use crate::shutdown::Shutdown;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::event::Event;

use crossbeam_channel::Sender;

use crate::clock::now_ms;
use crate::error::Tier;
use crate::jobs::executable::{self, Children};
use crate::jobs::functions::{Job, JobError, JobResult, Runner, Table};
use crate::kinds::RestartReason;
use crate::source::{Claimed, Lane};
use crate::status::State;

use super::limits::resident_bytes;
pub(super) use super::limits::Limits;

pub(super) struct DoneGuard(pub(super) Sender<Event>);

impl Drop for DoneGuard {
    fn drop(&mut self) {
        let _ = self.0.send(Event::LaneDone(std::thread::panicking()));
    }
}

/// What a lane thread needs to run jobs.
pub(super) struct LaneContext {
    pub(super) index: usize,
    pub(super) table: Table,
    pub(super) state: Arc<State>,
    pub(super) stop: Shutdown,
    pub(super) children: Children,
    pub(super) max_payload: usize,
    pub(super) limits: Arc<Limits>,
    pub(super) events: Sender<Event>,
    pub(super) health: Arc<Health>,
    /// Where a function this generation lacks may have been added (see `Table::unknown`),
    /// shared by the generation's lanes.
    pub(super) jobs_dir: Arc<crate::watch::Offers>,
}

/// Storage and resource health, shared by the lanes of a generation.
#[derive(Default)]
pub(super) struct Health {
    /// Lanes holding an outcome they could not store yet.
    pub(super) holding: std::sync::atomic::AtomicUsize,
    /// A fault is recorded in `status` (spares the lock on every job when all is well).
    pub(super) degraded: AtomicBool,
    /// When the last fault was met (ms on the monotonic clock: a step of the wall clock held
    /// the recovery for as long as it stepped back): the fault is cleared only after a quiet
    /// second, so a condition that comes and goes is said once, not once per job.
    last_failure_ms: std::sync::atomic::AtomicU64,
    /// When the first fault of this spell was met (monotonic ms), for the recovery's line.
    first_failure_ms: std::sync::atomic::AtomicU64,
    /// How long after the last fault no other may come before it is cleared: a quiet second
    /// after the failed step was due to be tried again (a lane backing off 5 s is quiet for 5 s
    /// without anything working again; that was once said to be a recovery).
    quiet_ms: std::sync::atomic::AtomicU64,
    /// The kinds of fault said since the worker was last healthy ([`Fault::bit`]): each is
    /// said once (a start fault after a storage fault too), and the recovery names them.
    said: std::sync::atomic::AtomicU8,
}

/// What a fault stopped: storing (outcomes, claims) or starting job processes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Fault {
    Storage,
    Starts,
}

impl Fault {
    fn bit(self) -> u8 {
        match self {
            Fault::Storage => 1,
            Fault::Starts => 2,
        }
    }
}

/// How long a job waits for its executable to be closed by whoever writes it (ETXTBSY).
const BUSY_LIMIT: Duration = Duration::from_secs(10);

/// The monotonic clock in ms.
fn mono_ms() -> u64 {
    crate::clock::monotonic_us() / 1000
}

/// How long no fault must be met before the worker says it works again.
const HEALTHY_AFTER_MS: u64 = 1000;

impl Health {
    /// Records a storage or resource fault ([`Tier::Transient`]), to be tried again after
    /// `retry`: the worker is degraded, says so once in the log, and shows it in `status`.
    pub(super) fn failed(&self, state: &State, message: &str, fault: Fault, retry: Duration) {
        if let Ok(mut i) = state.inner.lock() {
            let quiet = HEALTHY_AFTER_MS.saturating_add(retry.as_millis() as u64);
            self.quiet_ms.store(quiet, Ordering::Release);
            // The time first: `recovered` reads `degraded` first, and must then see this
            // failure's time, not an older one (it once declared recovery 0.0 s after a fault).
            self.last_failure_ms.store(mono_ms(), Ordering::Release);
            self.degraded.store(true, Ordering::Release);
            if self.said.fetch_or(fault.bit(), Ordering::AcqRel) & fault.bit() == 0 {
                match fault {
                    Fault::Storage => log::error!(
                        "degraded: {message}; claiming no new jobs, keeping what is held and retrying until it works"
                    ),
                    Fault::Starts => log::error!(
                        "degraded: {message}; starting jobs one at a time, each tried again as others end, until it works"
                    ),
                }
            }
            // `status` shows the first fault.
            if i.storage.is_none() {
                i.storage = Some((message.to_string(), now_ms()));
                self.first_failure_ms.store(mono_ms(), Ordering::Release);
            }
        }
    }

    /// Clears the fault once whatever failed works again (and no lane still holds a result).
    pub(super) fn recovered(&self, state: &State) {
        if !self.degraded.load(Ordering::Acquire)
            || self.holding.load(Ordering::Acquire) > 0
            || mono_ms().saturating_sub(self.last_failure_ms.load(Ordering::Acquire))
                < self.quiet_ms.load(Ordering::Acquire).max(HEALTHY_AFTER_MS)
        {
            return;
        }
        self.degraded.store(false, Ordering::Release);
        if let Ok(mut i) = state.inner.lock() {
            let said = self.said.swap(0, Ordering::AcqRel);
            if let Some((error, _)) = i.storage.take() {
                let what = match said {
                    2 => "job starts work",
                    3 => "storage and job starts work",
                    _ => "storage works",
                };
                log::info!(
                    "{what} again after {:.1}s (it was: {error}); serving",
                    mono_ms().saturating_sub(self.first_failure_ms.load(Ordering::Acquire)) as f64
                        / 1000.0
                );
            }
        }
    }
}

impl LaneContext {
    /// Between jobs: asks for a recycle when this generation has run `max_jobs` jobs or the
    /// process has grown over `max_rss_mb` (read at most every 200 ms per lane).
    fn check_limits(&self, last_rss_check: &mut Instant) {
        let done = self.state.generation_jobs.fetch_add(1, Ordering::Relaxed) + 1;
        let mut reason = None;
        if self.limits.max_jobs > 0 && done >= self.limits.max_jobs {
            reason = Some(RestartReason::MaxJobs);
        }
        if self.limits.max_rss_bytes > 0 && last_rss_check.elapsed() >= Duration::from_millis(200) {
            *last_rss_check = Instant::now();
            if resident_bytes().is_some_and(|rss| rss > self.limits.max_rss_bytes) {
                reason = Some(RestartReason::MaxRss);
            }
        }
        // Only the control loop decides; lanes ask once, and claim nothing until it has
        // (the control loop validates before it drains; lanes would run past the limit
        // meanwhile).
        if let Some(reason) = reason {
            if !self.limits.refused.load(Ordering::Acquire)
                && !self.limits.asked.swap(true, Ordering::AcqRel)
            {
                let _ = self.events.try_send(Event::Recycle(reason));
            }
        }
    }

    pub(super) fn serve(&self, mut lane: Box<dyn Lane>) {
        let mut last_rss_check = Instant::now() - Duration::from_secs(1);
        let mut backoff = Duration::from_millis(100);
        loop {
            // A recycle was asked for: wait for the control loop's decision.
            while self.limits.asked.load(Ordering::Acquire) && !self.stop.is_set() {
                std::thread::sleep(Duration::from_millis(2));
            }
            // Storage fails and another lane holds a result it cannot store yet: claim
            // nothing more until that result is stored.
            while self.health.holding.load(Ordering::Acquire) > 0 && !self.stop.is_set() {
                self.pause(Duration::from_millis(100));
            }
            let mut job = match lane.next(&self.stop) {
                Ok(Some(job)) => job,
                Ok(None) => break,
                Err(e) => {
                    if e.tier() == Tier::Transient {
                        self.health
                            .failed(&self.state, &e.to_string(), Fault::Storage, backoff);
                    } else {
                        log::error!("{e}; retrying in {} ms", backoff.as_millis());
                    }
                    self.pause(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            if self.state.first_claim_mono_us.load(Ordering::Relaxed) == 0 {
                // When this generation's first job was claimed (for measuring from outside).
                let now = crate::clock::monotonic_us();
                let _ = self.state.first_claim_mono_us.compare_exchange(
                    0,
                    now,
                    Ordering::Release,
                    Ordering::Relaxed,
                );
            }
            self.state.in_flight.fetch_add(1, Ordering::Relaxed);
            let entry = self.table.get(&job.function);
            let known = entry.is_some();
            self.state.set_running(
                self.index,
                Some(crate::status::Started {
                    id: &job.id,
                    function: &job.function,
                    timeout: entry.and_then(|e| e.1),
                    rust: matches!(entry, Some((crate::jobs::functions::Runner::Rust(_), _))),
                }),
            );
            let started = Instant::now();
            let Some(outcome) = self.run_job(&job, lane.as_mut()) else {
                // Given back unrun (stopping while it could not be started).
                self.state.set_running(self.index, None);
                self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
                continue;
            };
            if self.children.abandoned() {
                // A second TERM killed the job and the worker exits now: the job was
                // interrupted, not failed. Nothing is reported (no failure stored, no nack):
                // it runs again, as the exit's log line says.
                return;
            }
            // The payload is no longer needed: free it before the result is encoded, so a
            // lane holds at most about twice a large payload (result + its packet).
            job.payload = Vec::new();
            let took = started.elapsed();
            let kind = match &outcome {
                Ok(_) => Outcome::Done,
                Err(e) if e.is_timeout() => Outcome::TimedOut,
                Err(_) => Outcome::Failed,
            };
            // Whole microseconds, in ms: no float noise in a JSON log line.
            let ms = took.as_micros() as f64 / 1000.0;
            let (id, function, result) = (job.id.as_str(), job.function.as_str(), kind.as_str());
            match &outcome {
                Ok(_) => log::log!(
                    if crate::ops::logging::job_lines() { log::Level::Info } else { log::Level::Debug },
                    job = id, function = function, duration_ms = ms, outcome = result;
                    "job {id} {function}: done in {took:?}"
                ),
                Err(e) => log::warn!(
                    job = id, function = function, duration_ms = ms, outcome = result;
                    "job {id} {function}: failed in {took:?}: {e}"
                ),
            }
            self.store_outcome(&job, &outcome, lane.as_mut());
            // Names from whoever submits never become label values: only this worker's own.
            let key = if known {
                function
            } else {
                crate::metrics::UNKNOWN_FUNCTION
            };
            if let Some(stats) = self.state.metrics.function(key) {
                stats.record(kind, took);
            }
            self.state.set_running(self.index, None);
            self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
            self.check_limits(&mut last_rss_check);
            // A fault-injection build (tests only): a lane, or the reaper, dies by a panic
            // after a job whose result says so.
            #[cfg(gearshift_faults)]
            match &outcome {
                Ok(r) if r == b"fault:panic-lane" => panic!("injected lane panic"),
                Ok(r) if r == b"fault:panic-helper" => {
                    crate::jobs::reaper::PANIC_NEXT_SWEEP.store(true, Ordering::Release)
                }
                _ => {}
            }
        }
        if let Err(e) = lane.close() {
            log::warn!("closing lane: {e}");
        }
    }

    /// Runs the job; a start that fails for want of a resource (descriptors, processes) is
    /// retried after a pause, not failed. None: the job was given back unrun, because the
    /// worker stops meanwhile.
    fn run_job(&self, job: &Claimed, lane: &mut dyn Lane) -> Option<JobResult> {
        let mut backoff = Duration::from_millis(50);
        let mut busy_until: Option<Instant> = None;
        let mut tries = 0u32;
        loop {
            let ended = self.children.starts().ended();
            let outcome = self.execute(job, lane.progress());
            match &outcome {
                // The executable is being written or is not there (a deploy in progress): once
                // it is closed or back it runs; longer than BUSY_LIMIT fails the job.
                Err(e) if e.is_busy() && busy_until.is_none_or(|t| Instant::now() < t) => {
                    // Waiting for a function jobs_dir has: a restart waiting out its splay
                    // goes now (asked every 0.5 s: the change may not be judged yet).
                    tries += 1;
                    if tries % 25 == 1 && self.table.get(&job.function).is_none() {
                        let _ = self.events.try_send(Event::Awaited(job.function.clone()));
                    }
                    if busy_until.is_none() {
                        log::info!(
                            "job {} {}: {}; trying again shortly",
                            job.id,
                            job.function,
                            e.message
                        );
                    }
                    busy_until.get_or_insert_with(|| Instant::now() + BUSY_LIMIT);
                    if self.stop.is_set() && lane.release(job) {
                        return None;
                    }
                    self.pause_always(Duration::from_millis(20));
                }
                Err(e) if e.is_transient() => {
                    self.health
                        .failed(&self.state, &e.message, Fault::Starts, backoff);
                    if self.stop.is_set() && lane.release(job) {
                        return None;
                    }
                    // Tried again once a job ends and gives back what it held, or after
                    // the backoff (`jobs::starts`).
                    self.children.starts().wait_for_room(ended, backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                _ => {
                    self.health.recovered(&self.state);
                    return Some(outcome);
                }
            }
        }
    }

    /// Stores the outcome. A result that cannot be stored for a storage fault (a full disk, no
    /// descriptors, an I/O error) is never thrown away: it is kept and written again, from
    /// memory into a new file, with backoff, while the other lanes claim nothing; the fault is
    /// shown in `status` and said once in the log. A second TERM still exits at once (the job
    /// then runs again at the next start).
    fn store_outcome(&self, job: &Claimed, outcome: &JobResult, lane: &mut dyn Lane) {
        let mut backoff = Duration::from_millis(100);
        let mut holding = false;
        loop {
            match lane.finish(job, outcome) {
                Ok(()) => break,
                Err(e) => {
                    // Counted as held before the fault is reported: no other lane may call
                    // storage healthy in between.
                    if !holding {
                        holding = true;
                        self.health.holding.fetch_add(1, Ordering::AcqRel);
                    }
                    match e.tier() {
                        Tier::Transient => {
                            self.health
                                .failed(&self.state, &e.to_string(), Fault::Storage, backoff)
                        }
                        Tier::Gone => {
                            log::warn!(
                                "job {} {}: outcome not reported: {e}",
                                job.id,
                                job.function
                            );
                            break;
                        }
                        Tier::Permanent => {
                            log::error!(
                                "job {} {}: could not report its outcome: {e}",
                                job.id,
                                job.function
                            );
                            break;
                        }
                    }
                    self.pause_holding(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        if holding {
            self.health.holding.fetch_sub(1, Ordering::AcqRel);
        }
        self.health.recovered(&self.state);
    }

    /// Sleeps `d` whatever the stop flag says (a result waiting to be stored is not dropped).
    fn pause_always(&self, d: Duration) {
        std::thread::sleep(d);
    }

    /// Sleeps `d` while holding an outcome, but wakes once when the lane is asked to stop: a
    /// source may then take the outcome across a restart (`spool::carry`).
    fn pause_holding(&self, d: Duration) {
        let stopped = self.stop.is_set();
        let until = Instant::now() + d;
        while Instant::now() < until && (stopped || !self.stop.is_set()) {
            std::thread::sleep(
                Duration::from_millis(20).min(until.saturating_duration_since(Instant::now())),
            );
        }
    }

    /// Sleeps up to `d`, returning early when the lane is asked to stop.
    fn pause(&self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until && !self.stop.is_set() {
            std::thread::sleep(
                Duration::from_millis(20).min(until.saturating_duration_since(Instant::now())),
            );
        }
    }

    fn execute(
        &self,
        claimed: &Claimed,
        progress: &mut dyn crate::jobs::functions::Progress,
    ) -> JobResult {
        if let Some(why) = &claimed.unrun {
            return Err(JobError::new(why.clone()));
        }
        if claimed.payload.len() > self.max_payload {
            return Err(JobError::new(format!(
                "payload is {} bytes, over max_payload_bytes ({})",
                claimed.payload.len(),
                self.max_payload
            )));
        }
        // A fault-injection build (tests only): a job that ends the worker, as an in-process
        // function that aborts or overflows its stack would.
        #[cfg(gearshift_faults)]
        if claimed.payload.starts_with(b"fault:abort") {
            std::process::abort();
        }
        let Some((runner, timeout)) = self.table.get(&claimed.function) else {
            return Err(self.table.unknown(&self.jobs_dir, &claimed.function));
        };
        let mut job = Job {
            id: &claimed.id,
            function: &claimed.function,
            unique: &claimed.unique,
            payload: &claimed.payload,
            deadline: timeout.map(|t| Instant::now() + t),
            progress,
        };
        match runner {
            Runner::Rust(f) => match catch_unwind(AssertUnwindSafe(|| f.call(&mut job))) {
                Ok(r) => r,
                Err(panic) => {
                    let msg = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    Err(JobError::new(format!("function panicked: {msg}")))
                }
            },
            Runner::Executable(path) => {
                executable::run(path, &mut job, *timeout, self.max_payload, &self.children)
            }
        }
    }
}

/// Wakes idle lanes every second, for a queue that cannot be watched.
pub(super) fn poll_queue(source: &Arc<crate::source::Source>) -> crate::error::Result<()> {
    let weak = Arc::downgrade(source);
    crate::ops::signals::spawn_essential("queue-poll", move || {
        while let Some(s) = weak.upgrade() {
            s.wake();
            drop(s);
            std::thread::sleep(Duration::from_secs(1));
        }
    })
    .map(drop)
    .map_err(|e| crate::error::Error::io("spawning the queue poll thread", e))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::collections::BTreeMap;
    use std::path::Path;

    /// A property test over hostile numbers: whatever `Config::parse` accepts, the time and
    /// size arithmetic a generation does with it (splayed limits, deadlines, the age timer)
    /// must not panic. Values are drawn from edge cases and a seeded generator.
    #[test]
    fn accepted_numbers_never_break_the_arithmetic() {
        let edges = [
            "0",
            "1",
            "-1",
            "0.5",
            "1e19",
            "1.8e19",
            "1e300",
            "nan",
            "inf",
            "-inf",
            "18446744073709551615",
            "9223372036854775807",
            "4294967295",
            "\"0s\"",
            "\"1ms\"",
            "\"3650d\"",
            "\"3651d\"",
            "\"200000000000000d\"",
            "\"1e19s\"",
            "\"0.0001ms\"",
        ];
        let keys = [
            ("worker", "max_jobs"),
            ("worker", "max_rss_mb"),
            ("worker", "max_age"),
            ("worker", "recycle_splay"),
            ("worker", "max_payload_bytes"),
            ("source", "retain_results"),
            ("source", "max_attempts"),
            ("functions.f", "timeout"),
        ];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut accepted = 0;
        for round in 0..2000 {
            let mut sections: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for (section, key) in keys {
                if next() % 3 != 0 {
                    continue;
                }
                let value = if round % 2 == 0 {
                    edges[(next() % edges.len() as u64) as usize].to_string()
                } else {
                    match next() % 5 {
                        0 => (1 + next() % 10_000).to_string(),
                        1 => (next() >> (next() % 64)).to_string(),
                        2 => format!("{:.3}", (next() % 2000) as f64 / 1000.0),
                        3 => format!("{:e}", f64::from_bits(next() >> 2)),
                        _ => format!("\"{}s\"", 1 + next() % 400_000_000),
                    }
                };
                sections
                    .entry(section)
                    .or_default()
                    .push(format!("{key} = {value}"));
            }
            let text: String = sections
                .iter()
                .map(|(s, lines)| format!("[{s}]\n{}\n", lines.join("\n")))
                .collect();
            let Ok(cfg) = Config::parse(Path::new("/gs/config.toml"), text.as_bytes()) else {
                continue;
            };
            accepted += 1;
            let limits = Limits::new(&cfg.worker);
            if let Some(a) = limits.max_age {
                let _ = crossbeam_channel::after(a.saturating_sub(Duration::from_millis(1)));
            }
            for f in cfg.functions.values() {
                if let Some(t) = f.timeout {
                    let _ = Instant::now() + t;
                }
            }
            let _ = limits.max_rss_bytes.saturating_add(limits.max_jobs);
        }
        assert!(
            accepted > 100,
            "the generator should produce valid configs too ({accepted})"
        );
    }
}
