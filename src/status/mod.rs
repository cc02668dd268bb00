//! The running worker's status: counters updated by worker threads (atomics, no I/O on the job
//! path), the status document built from them, and a unix socket in `state_dir/worker/`
//! ([`server`]) that `gearshift status`, `reload`, `stop`, `metrics` and `top` ask through
//! [`client`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::clock::rfc3339_ms;
use crate::kinds::{ConnState, WorkerPhase};

use crate::status::records::Refusal;

pub mod client;
pub mod doc;
pub mod records;
pub mod server;
pub mod views;

pub use client::{
    query, query_counts, query_metrics, query_patiently, refuse_beside_unlocked, unlocked_words,
    unlocked_worker,
};
pub use doc::{
    Doc, IngressDoc, PendingDoc, RefusalDoc, RefusedDeployDoc, RollbackDoc, RunningJob, ServerDoc,
    StorageDoc,
};
pub use server::Server;
pub use views::{count_reconnect, show_configured, show_server, ServerViews};

/// Warnings listed in the status document; more are counted, not listed, so the document stays
/// far below what a client reads (a jobs_dir of 12,000 stray files would otherwise pass 1 MiB).
const MAX_LISTED_WARNINGS: usize = 100;

/// At most [`MAX_LISTED_WARNINGS`] of `all` (each at most 4 KiB), and a last line saying how
/// many more there are.
fn summarised(all: &[String]) -> Vec<String> {
    let each = |w: &String| crate::text::cut(w, 4096).into_owned();
    if all.len() <= MAX_LISTED_WARNINGS {
        return all.iter().map(each).collect();
    }
    let mut list: Vec<String> = all[..MAX_LISTED_WARNINGS - 1].iter().map(each).collect();
    list.push(format!(
        "... and {} more warnings (see the log, or `check`)",
        all.len() - list.len()
    ));
    list
}

/// The worker's `state` in `status`: its phase, or while it runs, what keeps it from serving.
fn worker_state(
    phase: WorkerPhase,
    storage_fails: bool,
    servers: &[ServerSummary],
) -> &'static str {
    let any = |state| servers.iter().any(|v| v.best == state);
    // Every server tried and failed, and not reached since (a try again under way included; a
    // failover broker on standby is yet to be tried).
    let unreachable =
        !servers.is_empty() && (servers.iter()).all(|v| v.down == Some(ConnState::BackingOff));
    // A broker answered and refused, and none serves (AMQP: no such queue, a login refused).
    let refused = servers.iter().any(|v| v.down == Some(ConnState::Refused))
        && (servers.iter()).all(|v| v.down.is_some() || v.best == ConnState::Standby);
    // The connection in use is blocked (the others are on standby).
    let blocked = any(ConnState::Blocked) && !any(ConnState::Connected);
    match phase {
        WorkerPhase::Running if storage_fails => "degraded",
        WorkerPhase::Running if unreachable => "no server reachable",
        WorkerPhase::Running if refused => "not consuming",
        WorkerPhase::Running if blocked => "publishing blocked",
        _ => phase.as_str(),
    }
}

/// Each server as `status` shows it.
fn servers_doc(summaries: Vec<ServerSummary>) -> Vec<ServerDoc> {
    summaries
        .into_iter()
        .map(|s| ServerDoc {
            address: s.address,
            state: s.best.as_str().to_string(),
            since: rfc3339_ms(s.since_ms),
            lanes_connected: ConnState::up(&s.lanes) as usize,
            last_error_at: s.last_error.as_ref().map(|(_, at)| rfc3339_ms(*at)),
            last_error: s.last_error.map(|(e, _)| e),
            reconnects: s.reconnects,
        })
        .collect()
}

/// One server, aggregated over the lanes' views (see [`State::server_summaries`]).
struct ServerSummary {
    address: String,
    best: ConnState,
    /// Every lane's last try failed (and none has succeeded since): how (`BackingOff` or
    /// `Refused`).
    down: Option<ConnState>,
    since_ms: u64,
    /// Lanes in each state.
    lanes: crate::kinds::StateCounts,
    /// The latest error, and when.
    last_error: Option<(String, u64)>,
    reconnects: u64,
}

/// Spool entries set aside in `rejected/` since the first start (carried across re-exec).
pub static REJECTED: AtomicU64 = AtomicU64::new(0);

/// Why the spool takes no new job now (less than `[source] min_free` free), as the spool's
/// housekeeping last found; a warning in `status` while it lasts.
static SHORT_OF_ROOM: Mutex<Option<String>> = Mutex::new(None);

/// Sets (or, with None, clears) the warning that the spool takes no new job.
pub fn short_of_room(why: Option<String>) {
    if let Ok(mut s) = SHORT_OF_ROOM.lock() {
        *s = why;
    }
}

/// Live state of this worker, shared by the control loop, worker threads and the status server.
pub struct State {
    pub pid: u32,
    pub generation: u64,
    pub started_at_ms: u64,
    pub restarted_at_ms: u64,
    pub last_restart_reason: String,
    pub restarts: u64,
    pub binary: PathBuf,
    pub in_flight: AtomicU64,
    /// The last restart's pause in µs: from its request until this generation's lanes claim.
    pub restart_pause_us: AtomicU64,
    /// CLOCK_MONOTONIC (µs) when this generation claimed its first job (0: not yet).
    pub first_claim_mono_us: AtomicU64,
    /// Jobs finished by this generation (for `max_jobs`).
    pub generation_jobs: AtomicU64,
    /// Times this generation looked at config.toml and jobs_dir for a change (tests wait for
    /// it to grow: "seen and judged", instead of sleeping).
    pub file_checks: AtomicU64,
    /// The job each lane is running (id, function), for `status` and `stop --force`.
    /// Per lane: (running?, id, function); the strings are reused, so no allocation per job.
    pub running: Mutex<Vec<LaneSlot>>,
    pub inner: Mutex<Inner>,
    /// Gearman connections (empty for the spool).
    pub servers: ServerViews,
    /// A ZeroMQ source's endpoints and counts (no endpoints for the others).
    pub ingress: Arc<crate::kinds::Ingress>,
    /// Counters and histograms for `/metrics` (carried across exec).
    pub metrics: crate::metrics::Metrics,
}

/// What one lane runs (the strings are reused: no allocation per job).
#[derive(Debug, Clone, Default)]
pub struct LaneSlot {
    pub busy: bool,
    pub id: String,
    pub function: String,
    pub since_ms: u64,
    /// When it started on the monotonic clock (µs): how long it has run, whatever the wall
    /// clock does meanwhile (a step of it made a job look an hour old).
    pub started_us: u64,
    /// The job's timeout (0: none), and whether its function is a Rust one.
    pub timeout_ms: u64,
    pub rust: bool,
}

impl LaneSlot {
    /// How long its job has run at `now_us` (the monotonic clock, µs), in ms.
    pub fn running_ms(&self, now_us: u64) -> u64 {
        now_us.saturating_sub(self.started_us) / 1000
    }

    /// Whether its job has a timeout and has run more than `by_ms` past it at `now_us`.
    pub fn past_timeout(&self, now_us: u64, by_ms: u64) -> bool {
        self.busy
            && self.timeout_ms > 0
            && self.running_ms(now_us) > self.timeout_ms.saturating_add(by_ms)
    }
}

/// What a lane starts running, for `status`.
pub struct Started<'a> {
    pub id: &'a str,
    pub function: &'a str,
    pub timeout: Option<std::time::Duration>,
    /// A Rust function (nothing can end it before it returns), not an executable.
    pub rust: bool,
}

/// The parts of [`State`] that change rarely.
pub struct Inner {
    /// running, draining, stopping, restarting.
    pub phase: crate::kinds::WorkerPhase,
    pub refusals: u64,
    pub last_refused: Option<Refusal>,
    pub functions: Vec<String>,
    pub config_path: PathBuf,
    pub config_sha256: String,
    pub source: &'static str,
    pub binary_sha256: Option<String>,
    pub last_refused_deploy: Option<crate::status::records::Refused>,
    pub last_rollback: Option<crate::status::records::Rollback>,
    /// Storage that fails (a full disk, no descriptors): the OS error and since when (unix
    /// ms). While set, lanes claim nothing new and the state is `degraded`.
    pub storage: Option<(String, u64)>,
    /// This generation's non-fatal findings (files in jobs_dir that are no function, ...).
    pub warnings: Vec<String>,
    /// None while inotify reports changes; else how changes are found instead, and why.
    pub watch: Option<String>,
    /// The address `/metrics` is served on.
    pub metrics: Option<String>,
    /// A restart delayed by `restart_splay`: why, and when (unix ms).
    pub restart_pending: Option<(String, u64)>,
}

impl State {
    pub fn set_phase(&self, phase: crate::kinds::WorkerPhase) {
        if let Ok(mut i) = self.inner.lock() {
            i.phase = phase;
        }
    }

    /// Records what lane `lane` runs now (None: nothing).
    pub fn set_running(&self, lane: usize, job: Option<Started<'_>>) {
        if let Ok(mut r) = self.running.lock() {
            if let Some(slot) = r.get_mut(lane) {
                slot.busy = job.is_some();
                if let Some(job) = job {
                    slot.id.clear();
                    slot.id.push_str(job.id);
                    slot.function.clear();
                    slot.function.push_str(job.function);
                    slot.since_ms = crate::clock::now_ms();
                    slot.started_us = crate::clock::monotonic_us();
                    slot.timeout_ms = job.timeout.map_or(0, |t| t.as_millis() as u64);
                    slot.rust = job.rust;
                }
            }
        }
    }

    /// Each server, aggregated once over its lanes' views: what both `status` and the metrics
    /// show of it.
    fn server_summaries(&self) -> Vec<ServerSummary> {
        let Ok(views) = self.servers.lock() else {
            return Vec::new();
        };
        views
            .iter()
            .map(|(addr, lanes)| {
                let count = |s: ConnState| lanes.values().filter(|v| v.state == s).count() as u64;
                // The best state over the lanes (connected > connecting > backing off).
                let best = lanes
                    .values()
                    .map(|v| v.state)
                    .min()
                    .unwrap_or(ConnState::Connecting);
                let err = lanes
                    .values()
                    .filter(|v| v.last_error.is_some())
                    .max_by_key(|v| v.last_error_ms);
                // Every lane's last try failed (refused, if any was): down, even while a lane
                // tries again.
                let failing = lanes.values().map(|v| v.failing);
                let down = failing
                    .clone()
                    .all(|f| f.is_some())
                    .then(|| failing.flatten().max().unwrap_or(ConnState::BackingOff));
                ServerSummary {
                    address: addr.clone(),
                    best,
                    down: down.filter(|_| !lanes.is_empty()),
                    since_ms: lanes
                        .values()
                        .filter(|v| v.state == best)
                        .map(|v| v.since_ms)
                        .min()
                        .unwrap_or(0),
                    lanes: ConnState::ALL.map(count),
                    last_error: err
                        .and_then(|v| v.last_error.clone().map(|e| (e, v.last_error_ms))),
                    reconnects: lanes.values().map(|v| v.reconnects).sum(),
                }
            })
            .collect()
    }

    /// The ids of the jobs running now.
    pub fn running_ids(&self) -> Vec<String> {
        self.running
            .lock()
            .map(|r| r.iter().filter(|s| s.busy).map(|s| s.id.clone()).collect())
            .unwrap_or_default()
    }

    /// This generation's reconnects per Gearman server (to carry across exec).
    pub fn reconnects(&self) -> std::collections::BTreeMap<String, u64> {
        self.server_summaries()
            .into_iter()
            .map(|s| (s.address, s.reconnects))
            .collect()
    }

    /// The Prometheus text exposition; `queue`: the spool's queue right now.
    pub fn metrics_text(&self, queue: Option<crate::metrics::QueueStats>) -> String {
        let (degraded, refusals, source) = self
            .inner
            .lock()
            .map(|i| (i.storage.is_some(), i.refusals, i.source))
            .unwrap_or((false, 0, ""));
        let degraded = degraded || self.ingress.not_stored().is_some();
        let servers = self
            .server_summaries()
            .into_iter()
            .map(|s| crate::metrics::ServerGauge {
                address: s.address,
                lanes: s.lanes,
                reconnects: s.reconnects,
            })
            .collect();
        let lanes = self.running.lock().map(|r| r.len() as u64).unwrap_or(0);
        self.metrics.render(&crate::metrics::Gauges {
            name: crate::identity().0.to_string(),
            version: crate::identity().1.to_string(),
            source,
            generation: self.generation,
            lanes,
            in_flight: self.in_flight.load(Ordering::Relaxed),
            degraded,
            refusals,
            rejected: REJECTED.load(Ordering::Relaxed),
            queue,
            servers,
            ingress: self.ingress_doc().map(|d| crate::metrics::IngressGauge {
                accepted: d.accepted,
                rejected: d.rejected,
                batches: d.batches,
                peers: d.peers,
                max_peers: d.max_connections,
                closed: d.closed.counts(),
            }),
        })
    }

    /// The ZeroMQ ingress, if there is one.
    pub fn ingress_doc(&self) -> Option<IngressDoc> {
        let bound = self
            .ingress
            .bound
            .lock()
            .map(|b| b.clone())
            .unwrap_or_default();
        (!bound.is_empty()).then(|| IngressDoc {
            bound,
            accepted: self.ingress.accepted.load(Ordering::Relaxed),
            rejected: self.ingress.rejected.load(Ordering::Relaxed),
            batches: self.ingress.batches.load(Ordering::Relaxed),
            largest_batch: self.ingress.largest_batch.load(Ordering::Relaxed),
            peers: self.ingress.peers.load(Ordering::Relaxed),
            max_connections: self.ingress.max_peers.load(Ordering::Relaxed),
            closed: doc::ClosedDoc::from_counts(self.ingress.closed_counts()),
        })
    }

    /// The status document, as the socket serves it.
    pub fn doc(&self) -> Doc {
        let Ok(i) = self.inner.lock() else {
            return Doc {
                state: "status lock poisoned".into(),
                ..Doc::default()
            };
        };
        let opt_time = |ms: u64| (ms != 0).then(|| rfc3339_ms(ms));
        // The pause is stored before the first claim is published (Release): load the claim
        // first (Acquire) so a reader that sees the claim also sees the pause.
        let first_claim = self.first_claim_mono_us.load(Ordering::Acquire);
        let pause = self.restart_pause_us.load(Ordering::Relaxed);
        let summaries = self.server_summaries();
        // A result that cannot be stored, or (ZeroMQ) messages that cannot.
        let storage = i.storage.clone().or_else(|| self.ingress.not_stored());
        let state = worker_state(i.phase, storage.is_some(), &summaries);
        let servers = servers_doc(summaries);
        let (jobs_completed, jobs_failed) = self.metrics.totals();
        Doc {
            pid: self.pid,
            state: state.to_string(),
            storage: storage.map(|(error, since)| StorageDoc {
                error,
                since: rfc3339_ms(since),
            }),
            rejected: REJECTED.load(Ordering::Relaxed),
            generation: self.generation,
            started_at: rfc3339_ms(self.started_at_ms),
            restarted_at: opt_time(self.restarted_at_ms),
            restarts: self.restarts,
            last_restart_reason: (!self.last_restart_reason.is_empty())
                .then(|| self.last_restart_reason.clone()),
            last_restart_pause_us: (pause != 0).then_some(pause),
            first_claim_monotonic_us: first_claim,
            generation_jobs: self.generation_jobs.load(Ordering::Relaxed),
            file_checks: self.file_checks.load(Ordering::Relaxed),
            last_refused_reload: i.last_refused.as_ref().map(|r| RefusalDoc {
                at: rfc3339_ms(r.at_ms),
                reason: r.reason.clone(),
                error: r.error.clone(),
            }),
            reload_refusals: i.refusals,
            config: i.config_path.clone(),
            config_sha256: i.config_sha256.clone(),
            binary: self.binary.clone(),
            binary_sha256: i.binary_sha256.clone(),
            last_rollback: i.last_rollback.as_ref().map(|r| RollbackDoc {
                at: rfc3339_ms(r.at_ms),
                from_sha256: r.from_sha.clone(),
                to_sha256: r.to_sha.clone(),
                reason: r.reason.clone(),
            }),
            last_refused_deploy: i.last_refused_deploy.as_ref().map(|r| RefusedDeployDoc {
                at: rfc3339_ms(r.at_ms),
                sha256: r.sha256.clone(),
                error: r.error.clone(),
            }),
            name: crate::identity().0.to_string(),
            version: crate::identity().1.to_string(),
            warnings: summarised(
                &i.warnings
                    .iter()
                    .cloned()
                    .chain(SHORT_OF_ROOM.lock().ok().and_then(|s| s.clone()))
                    .chain(crate::ops::logging::failing())
                    .chain(crate::ops::stderr::failing())
                    .chain(crate::ops::logging::astray())
                    .chain(crate::ops::pidfile::astray())
                    .collect::<Vec<_>>(),
            ),
            watch: i.watch.clone().unwrap_or_else(|| "inotify".into()),
            metrics: i.metrics.clone(),
            restart_pending: i.restart_pending.as_ref().map(|(reason, at)| PendingDoc {
                reason: reason.clone(),
                at: rfc3339_ms(*at),
            }),
            source: i.source.to_string(),
            jobs_completed,
            jobs_failed,
            in_flight: self.in_flight.load(Ordering::Relaxed),
            functions: i.functions.clone(),
            supervisor: crate::status::records::from_env(),
            servers,
            running_jobs: self
                .running
                .lock()
                .map(|r| {
                    let now_us = crate::clock::monotonic_us();
                    r.iter()
                        .enumerate()
                        .filter(|(_, s)| s.busy)
                        .map(|(lane, s)| RunningJob {
                            id: s.id.clone(),
                            function: s.function.clone(),
                            lane,
                            since: rfc3339_ms(s.since_ms),
                            running_ms: s.running_ms(now_us),
                            timeout_ms: (s.timeout_ms > 0).then_some(s.timeout_ms),
                            rust: s.rust,
                        })
                        .collect()
                })
                .unwrap_or_default(),
            lanes: self.running.lock().map(|r| r.len()).unwrap_or(0),
            zeromq: self.ingress_doc(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_are_listed_short_and_counted_past_the_limit() {
        let all: Vec<String> = (0..150)
            .map(|i| format!("warning {i}: {}", "x".repeat(10_000)))
            .collect();
        let listed = summarised(&all);
        assert_eq!(listed.len(), MAX_LISTED_WARNINGS);
        assert!(listed[..MAX_LISTED_WARNINGS - 1]
            .iter()
            .all(|w| w.len() < 4200 && w.contains("bytes cut")));
        assert_eq!(
            listed[MAX_LISTED_WARNINGS - 1],
            "... and 51 more warnings (see the log, or `check`)"
        );
    }
}
