//! Prometheus metrics: the counters and histograms the lanes and the control loop update
//! (atomics; a job costs a map lookup under a read lock and four atomic adds), carried across
//! every re-exec so they only go up for the life of the process, and their text exposition.
//!
//! - [`http`]: the `/metrics` endpoint, whose listening socket is handed across exec.
//! - [`process`]: the standard `process_*` metrics, read from `/proc/self`.
//!
//! Written by hand rather than with prometheus-client: its `Histogram` can only be observed,
//! not restored, and carrying the buckets across execve is the point here (ARCHITECTURE.md).

pub mod carry;
pub mod http;
pub mod process;
mod render;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use carry::{FunctionCounts, HistogramCounts, MetricsCarried};

/// Bounds of the job duration histogram (µs): 1 ms to 1 h.
const JOB_BOUNDS_US: &[u64] = &[
    1_000,
    5_000,
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    30_000_000,
    60_000_000,
    300_000_000,
    900_000_000,
    3_600_000_000,
];

/// Bounds of the restart pause histogram (µs): 0.5 ms to 10 s.
const PAUSE_BOUNDS_US: &[u64] = &[
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 10_000_000,
];

/// Label for jobs that asked for a function this worker does not have: their names come from
/// whoever submits, so they never become label values.
pub const UNKNOWN_FUNCTION: &str = "(unknown)";

/// At most this many function label values; the rest are counted together.
const MAX_FUNCTIONS: usize = 10_000;
const OTHER_FUNCTIONS: &str = "(other)";
/// At most this many functions are shown at 0 before their first job (see `Metrics::declare`).
const DECLARED: usize = 256;

/// A histogram with fixed bounds.
pub struct Histogram {
    bounds_us: &'static [u64],
    counts: Box<[AtomicU64]>,
    sum_us: AtomicU64,
}

impl Histogram {
    fn new(bounds_us: &'static [u64]) -> Histogram {
        Histogram {
            bounds_us,
            counts: (0..=bounds_us.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
        }
    }

    /// Records one observation.
    pub fn observe(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = self
            .bounds_us
            .iter()
            .position(|b| us <= *b)
            .unwrap_or(self.bounds_us.len());
        if let Some(c) = self.counts.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn counts(&self) -> HistogramCounts {
        HistogramCounts {
            bounds_us: self.bounds_us.to_vec(),
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }

    /// Adds carried counts; refused (false) when the bounds differ (another build's layout).
    fn restore(&self, h: &HistogramCounts) -> bool {
        if h.bounds_us != self.bounds_us || h.counts.len() != self.counts.len() {
            return h.counts.iter().all(|c| *c == 0);
        }
        for (c, n) in self.counts.iter().zip(&h.counts) {
            c.fetch_add(*n, Ordering::Relaxed);
        }
        self.sum_us.fetch_add(h.sum_us, Ordering::Relaxed);
        true
    }
}

/// One function's counters.
pub struct FunctionStats {
    done: AtomicU64,
    failed: AtomicU64,
    timed_out: AtomicU64,
    duration: Histogram,
}

/// How a job ended, for `gearshift_jobs_total{outcome}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    Failed,
    TimedOut,
}

impl Outcome {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Done => "done",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed_out",
        }
    }
}

impl FunctionStats {
    fn new() -> FunctionStats {
        FunctionStats {
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
            duration: Histogram::new(JOB_BOUNDS_US),
        }
    }

    /// Records a finished job.
    pub fn record(&self, outcome: Outcome, took: Duration) {
        let c = match outcome {
            Outcome::Done => &self.done,
            Outcome::Failed => &self.failed,
            Outcome::TimedOut => &self.timed_out,
        };
        c.fetch_add(1, Ordering::Relaxed);
        self.duration.observe(took);
    }
}

/// AMQP replies lost: refused by the broker every time it was sent (the job settled all the
/// same; its requester waits in vain). A process-wide count, carried across exec.
pub static REPLIES_LOST: AtomicU64 = AtomicU64::new(0);

/// Every counter and histogram of this process.
pub struct Metrics {
    functions: RwLock<BTreeMap<String, Arc<FunctionStats>>>,
    restart_pause: Histogram,
    /// Rare events (restarts, deploys) and the reconnects of earlier generations.
    rare: Mutex<Rare>,
}

#[derive(Default)]
struct Rare {
    restarts: BTreeMap<String, u64>,
    deploys: BTreeMap<String, u64>,
    reconnects: BTreeMap<String, u64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            functions: RwLock::new(BTreeMap::new()),
            restart_pause: Histogram::new(PAUSE_BOUNDS_US),
            rare: Mutex::new(Rare::default()),
        }
    }
}

impl Metrics {
    /// The counters of `function` (created on first use; bounded in number).
    pub fn function(&self, function: &str) -> Option<Arc<FunctionStats>> {
        if let Some(s) = self.functions.read().ok()?.get(function) {
            return Some(Arc::clone(s));
        }
        let mut map = self.functions.write().ok()?;
        let key = if map.len() >= MAX_FUNCTIONS && !map.contains_key(function) {
            OTHER_FUNCTIONS
        } else {
            function
        };
        Some(Arc::clone(
            map.entry(key.to_string())
                .or_insert_with(|| Arc::new(FunctionStats::new())),
        ))
    }

    /// Jobs ended for the life of the process: (done, failed or timed out). The one count of
    /// jobs: `status` shows these, the exposition their per-function parts.
    pub fn totals(&self) -> (u64, u64) {
        self.functions
            .read()
            .map(|m| {
                m.values().fold((0, 0), |(d, f), s| {
                    (
                        d + s.done.load(Ordering::Relaxed),
                        f + s.failed.load(Ordering::Relaxed) + s.timed_out.load(Ordering::Relaxed),
                    )
                })
            })
            .unwrap_or_default()
    }

    /// Makes the functions of a generation show up (at 0) before their first job: the first
    /// [`DECLARED`] of them; any other shows up once it runs (each is 23 series, 4 KB a scrape:
    /// 4,096 functions declared made every scrape 16 MB).
    pub fn declare(&self, functions: impl IntoIterator<Item = impl AsRef<str>>) {
        for f in functions.into_iter().take(DECLARED) {
            let _ = self.function(f.as_ref());
        }
    }

    /// A restart that happened (counted by the new generation).
    pub fn restarted(&self, reason: &str) {
        if let Ok(mut r) = self.rare.lock() {
            *r.restarts.entry(reason.to_string()).or_default() += 1;
        }
    }

    /// The time from a restart's request until the new generation serves.
    pub fn restart_pause(&self, d: Duration) {
        self.restart_pause.observe(d);
    }

    /// A deploy that switched, was refused or was rolled back.
    pub fn deploy(&self, result: crate::kinds::DeployResult) {
        if let Ok(mut r) = self.rare.lock() {
            *r.deploys.entry(result.as_str().to_string()).or_default() += 1;
        }
    }

    /// The carried state plus what this generation counted; `reconnects_now`: this
    /// generation's reconnects per server.
    pub fn carry(&self, reconnects_now: &BTreeMap<String, u64>) -> MetricsCarried {
        let functions = self
            .functions
            .read()
            .map(|m| {
                m.iter()
                    .map(|(name, s)| {
                        (
                            name.clone(),
                            FunctionCounts {
                                done: s.done.load(Ordering::Relaxed),
                                failed: s.failed.load(Ordering::Relaxed),
                                timed_out: s.timed_out.load(Ordering::Relaxed),
                                duration: s.duration.counts(),
                            },
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (restarts, deploys, mut reconnects) = self
            .rare
            .lock()
            .map(|r| (r.restarts.clone(), r.deploys.clone(), r.reconnects.clone()))
            .unwrap_or_default();
        for (server, n) in reconnects_now {
            *reconnects.entry(server.clone()).or_default() += n;
        }
        MetricsCarried {
            functions,
            restarts,
            restart_pause: self.restart_pause.counts(),
            deploys,
            reconnects,
            replies_lost: REPLIES_LOST.load(Ordering::Relaxed),
        }
    }

    /// Takes over what the previous generation carried. Histograms of another layout (an
    /// older or newer build) start again; that is logged.
    pub fn restore(&self, carried: &MetricsCarried) {
        let mut lost = false;
        for (name, c) in &carried.functions {
            if let Some(s) = self.function(name) {
                s.done.fetch_add(c.done, Ordering::Relaxed);
                s.failed.fetch_add(c.failed, Ordering::Relaxed);
                s.timed_out.fetch_add(c.timed_out, Ordering::Relaxed);
                lost |= !s.duration.restore(&c.duration);
            }
        }
        lost |= !self.restart_pause.restore(&carried.restart_pause);
        REPLIES_LOST.store(carried.replies_lost, Ordering::Relaxed);
        if let Ok(mut r) = self.rare.lock() {
            r.restarts = carried.restarts.clone();
            r.deploys = carried.deploys.clone();
            r.reconnects = carried.reconnects.clone();
        }
        if lost {
            log::warn!("metrics: histograms of another build's layout were not carried over");
        }
    }
}

/// The spool's queue, at the moment of a scrape.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct QueueStats {
    pub depth: u64,
    pub running: u64,
    /// Age of the oldest waiting job in µs (0: none).
    pub oldest_age_us: u64,
}

/// A count of the queue for status queries and scrapes. The spool's is a read of every entry of
/// `new/` and `cur/` (about 80 ms at 200,000 queued here, and up to a million entries): one
/// that took longer than [`Self::CHEAP`] is reused for [`Self::REUSE`] times as long as it
/// took, its oldest job aged meanwhile, so that queries, however often they come (`top`
/// every second, several scrapers), spend at most about a thirtieth of a thread on it. One
/// count at a time: a query that comes meanwhile waits for it and takes it.
#[derive(Default)]
pub struct QueueCount {
    /// When the last count ended, how long it may be reused, and what it found.
    last: Mutex<Option<(std::time::Instant, Duration, Option<QueueStats>)>>,
}

impl QueueCount {
    /// A count this quick is never reused.
    pub const CHEAP: Duration = Duration::from_millis(10);
    /// How many times its own cost a count is reused.
    pub const REUSE: u32 = 30;

    /// The last count, if it may be reused, else a new one by `count`.
    pub fn get(&self, count: impl FnOnce() -> Option<QueueStats>) -> Option<QueueStats> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, valid, stats)) = last.as_ref() {
            let age = at.elapsed();
            if age < *valid {
                return stats.clone().map(|mut q| {
                    if q.oldest_age_us > 0 {
                        q.oldest_age_us += age.as_micros() as u64;
                    }
                    q
                });
            }
        }
        let began = std::time::Instant::now();
        let stats = count();
        let took = began.elapsed();
        let valid = if took < Self::CHEAP {
            Duration::ZERO
        } else {
            took.saturating_mul(Self::REUSE)
        };
        *last = Some((std::time::Instant::now(), valid, stats.clone()));
        stats
    }
}

/// One Gearman server as the lanes see it.
#[derive(Debug, Clone, Default)]
pub struct ServerGauge {
    pub address: String,
    /// Lanes in each state.
    pub lanes: crate::kinds::StateCounts,
    /// This generation's reconnects.
    pub reconnects: u64,
}

/// The values read at scrape time from the rest of the worker.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    pub name: String,
    pub version: String,
    pub source: &'static str,
    pub generation: u64,
    pub lanes: u64,
    pub in_flight: u64,
    pub degraded: bool,
    pub refusals: u64,
    pub rejected: u64,
    pub queue: Option<QueueStats>,
    pub servers: Vec<ServerGauge>,
    /// A ZeroMQ source's counts: accepted, rejected, batches.
    pub ingress: Option<IngressGauge>,
}

/// A ZeroMQ source's counts, for the exposition.
#[derive(Debug, Clone, Default)]
pub struct IngressGauge {
    pub accepted: u64,
    pub rejected: u64,
    pub batches: u64,
    pub peers: u64,
    pub max_peers: u64,
    /// Clients closed by the worker, by reason (`kinds::CloseReason::ALL`'s order).
    pub closed: [u64; crate::kinds::CLOSE_REASONS],
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::render::{escape, seconds};
    use super::*;

    #[test]
    fn a_costly_queue_count_is_reused_for_a_while_and_a_cheap_one_never() {
        let stats = |depth| {
            Some(QueueStats {
                depth,
                running: 0,
                oldest_age_us: 1_000,
            })
        };
        let cheap = QueueCount::default();
        assert_eq!(cheap.get(|| stats(1)).map(|q| q.depth), Some(1));
        assert_eq!(
            cheap.get(|| stats(2)).map(|q| q.depth),
            Some(2),
            "not reused"
        );

        let costly = QueueCount::default();
        let slow = || {
            std::thread::sleep(QueueCount::CHEAP * 2);
            stats(1)
        };
        let began = std::time::Instant::now();
        assert_eq!(costly.get(slow).map(|q| q.depth), Some(1));
        // The count took at least 20 ms, more on a loaded machine; measured from out here it
        // took no less than the worker measured, and the reuse runs from the count's end.
        let took = began.elapsed();
        std::thread::sleep(Duration::from_millis(5));
        let again = costly.get(|| stats(2)).unwrap();
        assert_eq!(again.depth, 1, "reused");
        assert!(again.oldest_age_us >= 6_000, "aged: {again:?}");
        let reuse_ends = took * (QueueCount::REUSE + 1) + Duration::from_millis(1);
        std::thread::sleep(reuse_ends.saturating_sub(began.elapsed()));
        assert_eq!(
            costly.get(|| stats(3)).map(|q| q.depth),
            Some(3),
            "counted again"
        );
    }

    #[test]
    fn histograms_are_cumulative_and_exact() {
        let m = Metrics::default();
        let f = m.function("resize").unwrap();
        f.record(Outcome::Done, Duration::from_micros(800));
        f.record(Outcome::Done, Duration::from_millis(3));
        f.record(Outcome::TimedOut, Duration::from_secs(7200));
        let text = m.render(&Gauges::default());
        assert!(text.contains(
            "gearshift_job_duration_seconds_bucket{function=\"resize\",le=\"0.001\"} 1\n"
        ));
        assert!(text.contains(
            "gearshift_job_duration_seconds_bucket{function=\"resize\",le=\"0.005\"} 2\n"
        ));
        assert!(text.contains(
            "gearshift_job_duration_seconds_bucket{function=\"resize\",le=\"+Inf\"} 3\n"
        ));
        assert!(
            text.contains("gearshift_job_duration_seconds_sum{function=\"resize\"} 7200.0038\n")
        );
        assert!(
            text.contains("gearshift_jobs_total{function=\"resize\",outcome=\"timed_out\"} 1\n")
        );
    }

    #[test]
    fn carried_counters_add_up_and_foreign_layouts_are_dropped() {
        let a = Metrics::default();
        a.function("f")
            .unwrap()
            .record(Outcome::Failed, Duration::from_millis(2));
        a.restarted("sighup");
        a.deploy(crate::kinds::DeployResult::Refused);
        let mut carried = a.carry(&BTreeMap::from([("s:1".to_string(), 2)]));
        let b = Metrics::default();
        b.restore(&carried);
        b.restarted("sighup");
        let again = b.carry(&BTreeMap::from([("s:1".to_string(), 1)]));
        assert_eq!(again.functions["f"].failed, 1);
        assert_eq!(again.functions["f"].duration.counts.iter().sum::<u64>(), 1);
        assert_eq!(again.restarts["sighup"], 2);
        assert_eq!(again.deploys["refused"], 1);
        assert_eq!(again.reconnects["s:1"], 3);
        // Another build's buckets: the counters carry, the histogram starts again.
        carried.functions.get_mut("f").unwrap().duration.bounds_us = vec![1];
        carried.functions.get_mut("f").unwrap().duration.counts = vec![1, 0];
        let c = Metrics::default();
        c.restore(&carried);
        let got = c.carry(&BTreeMap::new());
        assert_eq!(got.functions["f"].failed, 1);
        assert_eq!(got.functions["f"].duration.counts.iter().sum::<u64>(), 0);
    }

    #[test]
    fn label_values_are_escaped_and_bounded() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let m = Metrics::default();
        for i in 0..MAX_FUNCTIONS + 5 {
            m.function(&format!("f{i}"));
        }
        assert_eq!(m.functions.read().unwrap().len(), MAX_FUNCTIONS + 1);
        assert!(m.functions.read().unwrap().contains_key(OTHER_FUNCTIONS));
    }

    #[test]
    fn a_few_hundred_functions_are_declared_and_the_rest_appear_when_they_run() {
        let m = Metrics::default();
        m.declare((0..4096).map(|i| format!("f{i:04}")));
        let count = |m: &Metrics| m.functions.read().map(|f| f.len()).unwrap_or(0);
        assert_eq!(count(&m), DECLARED);
        assert!(m.function("f4095").is_some());
        assert_eq!(count(&m), DECLARED + 1);
    }

    #[test]
    fn seconds_are_printed_exactly() {
        assert_eq!(seconds(2_500), "0.0025");
        assert_eq!(seconds(1_000_000), "1");
        assert_eq!(seconds(3_600_000_001), "3600.000001");
    }
}
