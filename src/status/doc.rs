//! The status document: one typed schema for the worker that serves it and the CLI and
//! supervisor that read it (so a renamed field cannot silently break a reader), and its form
//! for a terminal (outside text escaped).

use serde::{Deserialize, Serialize};

use std::path::PathBuf;

/// The status document: served by the worker's socket, read by the CLI and the supervisor.
/// One type for both sides, so a renamed field cannot silently break a reader. Every field is
/// described in README ("Status").
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Doc {
    pub pid: u32,
    pub state: String,
    pub storage: Option<StorageDoc>,
    pub rejected: u64,
    pub generation: u64,
    pub started_at: String,
    pub restarted_at: Option<String>,
    pub restarts: u64,
    pub last_restart_reason: Option<String>,
    pub last_restart_pause_us: Option<u64>,
    pub first_claim_monotonic_us: u64,
    pub generation_jobs: u64,
    pub file_checks: u64,
    pub last_refused_reload: Option<RefusalDoc>,
    pub reload_refusals: u64,
    #[serde(serialize_with = "path_text")]
    pub config: PathBuf,
    pub config_sha256: String,
    #[serde(serialize_with = "path_text")]
    pub binary: PathBuf,
    pub binary_sha256: Option<String>,
    pub last_rollback: Option<RollbackDoc>,
    pub last_refused_deploy: Option<RefusedDeployDoc>,
    pub name: String,
    pub version: String,
    pub warnings: Vec<String>,
    pub watch: String,
    /// Where `/metrics` is served (the bound address), if anywhere.
    #[serde(default)]
    pub metrics: Option<String>,
    /// A restart delayed by `[worker] restart_splay`.
    #[serde(default)]
    pub restart_pending: Option<PendingDoc>,
    pub source: String,
    pub jobs_completed: u64,
    pub jobs_failed: u64,
    pub in_flight: u64,
    pub functions: Vec<String>,
    pub supervisor: Option<crate::status::records::Info>,
    pub servers: Vec<ServerDoc>,
    pub running_jobs: Vec<RunningJob>,
    /// Lanes of the running generation.
    #[serde(default)]
    pub lanes: usize,
    /// A ZeroMQ source's endpoints and counts.
    #[serde(default)]
    pub zeromq: Option<IngressDoc>,
}

/// `status.zeromq`: where jobs are accepted and what came of the messages (counted since the
/// first start; `largest_batch` in this generation).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct IngressDoc {
    pub bound: Vec<String>,
    pub accepted: u64,
    pub rejected: u64,
    pub batches: u64,
    pub largest_batch: u64,
    /// Clients connected now.
    #[serde(default)]
    pub peers: u64,
    /// Clients connected at once at most (`max_connections`, or what `ulimit -n` leaves).
    #[serde(default)]
    pub max_connections: u64,
    /// Clients the worker closed itself, by reason (counted since the first start).
    #[serde(default)]
    pub closed: ClosedDoc,
}

/// `status.zeromq.closed`: one count per `kinds::CloseReason`, named by its label.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct ClosedDoc {
    pub protocol: u64,
    pub handshake_timeout: u64,
    pub max_connections: u64,
    pub memory_budget: u64,
    /// (A worker before it did not count these.)
    #[serde(default)]
    pub dead_peer: u64,
}

impl ClosedDoc {
    pub fn from_counts(n: [u64; crate::kinds::CLOSE_REASONS]) -> ClosedDoc {
        ClosedDoc {
            protocol: n[0],
            handshake_timeout: n[1],
            max_connections: n[2],
            memory_budget: n[3],
            dead_peer: n[4],
        }
    }

    /// The counts in `CloseReason::ALL`'s order.
    pub fn counts(&self) -> [u64; crate::kinds::CLOSE_REASONS] {
        [
            self.protocol,
            self.handshake_timeout,
            self.max_connections,
            self.memory_budget,
            self.dead_peer,
        ]
    }
}

impl Doc {
    /// The document with every text that came from outside (server errors, job ids and
    /// function names, file names, refusal reasons) escaped for a terminal: for `status`
    /// printed for people and for `top`. (JSON output escapes control characters itself.)
    pub fn for_terminal(mut self) -> Doc {
        fn esc(s: &mut String) {
            if let std::borrow::Cow::Owned(e) = crate::text::escape(s) {
                *s = e;
            }
        }
        esc(&mut self.state);
        esc(&mut self.version);
        self.warnings.iter_mut().for_each(esc);
        self.functions.iter_mut().for_each(esc);
        for s in &mut self.servers {
            esc(&mut s.address);
            esc(&mut s.state);
            s.last_error.as_mut().map(esc);
        }
        for j in &mut self.running_jobs {
            esc(&mut j.id);
            esc(&mut j.function);
        }
        if let Some(r) = &mut self.last_refused_reload {
            esc(&mut r.reason);
            esc(&mut r.error);
        }
        if let Some(r) = &mut self.last_refused_deploy {
            esc(&mut r.error);
        }
        if let Some(r) = &mut self.last_rollback {
            esc(&mut r.reason);
        }
        if let Some(s) = &mut self.storage {
            esc(&mut s.error);
        }
        if let Some(p) = &mut self.restart_pending {
            esc(&mut p.reason);
        }
        if let Some(sv) = &mut self.supervisor {
            sv.last_exit.as_mut().map(esc);
        }
        if let Some(z) = &mut self.zeromq {
            z.bound.iter_mut().for_each(esc);
        }
        self
    }
}

/// `status.storage`: what fails, since when.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StorageDoc {
    pub error: String,
    pub since: String,
}

/// `status.last_refused_reload`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RefusalDoc {
    pub at: String,
    pub reason: String,
    pub error: String,
}

/// `status.last_rollback`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RollbackDoc {
    pub at: String,
    pub from_sha256: String,
    pub to_sha256: String,
    pub reason: String,
}

/// `status.last_refused_deploy`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RefusedDeployDoc {
    pub at: String,
    pub sha256: String,
    pub error: String,
}

/// One of `status.servers`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerDoc {
    pub address: String,
    pub state: String,
    pub since: String,
    pub lanes_connected: usize,
    pub last_error: Option<String>,
    pub last_error_at: Option<String>,
    pub reconnects: u64,
}

/// `status.restart_pending`: a restart waiting out its splay.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PendingDoc {
    pub reason: String,
    pub at: String,
}

/// One of `status.running_jobs`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunningJob {
    pub id: String,
    pub function: String,
    /// The lane (0-based) that runs it.
    #[serde(default)]
    pub lane: usize,
    /// When it started.
    #[serde(default)]
    pub since: String,
    /// For how long it has run.
    #[serde(default)]
    pub running_ms: u64,
    /// Its timeout, if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// A Rust function (nothing can end it before it returns), not an executable.
    #[serde(default)]
    pub rust: bool,
}

impl RunningJob {
    /// "lane 1: ID (slow) for 6.8s", and, past its timeout, by how much and what ends the wait
    /// for it (for `status`, and a `reload` or `stop` that waits).
    pub fn describe(&self) -> String {
        let mut s = format!(
            "lane {}: {} ({}) for {:.1}s",
            self.lane,
            crate::text::escape(&self.id),
            crate::text::escape(&self.function),
            self.running_ms as f64 / 1000.0
        );
        if let Some(t) = self.timeout_ms.filter(|t| self.running_ms > *t) {
            let limit = crate::clock::human(std::time::Duration::from_millis(t));
            s.push_str(&format!(
                ", {:.1}s past its {limit} timeout {}",
                (self.running_ms - t) as f64 / 1000.0,
                if self.rust {
                    "(a Rust function: nothing ends it before it returns, and it must return by \
                     job.deadline(); a reload or a stop abandons it `abandon_after` past its \
                     timeout, a second `stop` ends the worker now, and either way the job runs \
                     again)"
                } else {
                    "(its processes were killed and have not all died yet)"
                }
            ));
        }
        s
    }
}

/// A path as JSON text: a path that is not UTF-8 (a directory named in Latin-1) has those
/// bytes written as `\xNN`; JSON has no room for them, and the whole document failed.
fn path_text<S: serde::Serializer>(p: &std::path::Path, s: S) -> Result<S::Ok, S::Error> {
    use std::os::unix::ffi::OsStrExt;
    s.serialize_str(&crate::text::invalid_as_hex(p.as_os_str().as_bytes()))
}
