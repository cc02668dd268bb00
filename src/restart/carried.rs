//! What crosses an execve or a process boundary as plain data: the state one generation hands
//! the next (`GEARSHIFT_INHERIT_*`), what a supervisor tells its worker, the deploy facts both
//! carry. A leaf module: it depends on nothing else in the crate, so the modules that produce and
//! consume this data (restart, deploy, status, supervisor) need not know each other.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Prefix of the environment variables that carry state across exec; stripped from jobs.
pub const ENV_PREFIX: &str = "GEARSHIFT_INHERIT";

/// State carried from one generation to the next.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Inherited {
    pub generation: u64,
    /// The pidfile, its lock held.
    #[serde(default, with = "fd_or_none")]
    pub pidfile_fd: Option<i32>,
    /// The inotify instance handed over.
    #[serde(default, with = "fd_or_none")]
    pub inotify_fd: Option<i32>,
    /// The source's state handed over (the spool's queue listing).
    #[serde(default, with = "fd_or_none")]
    pub source_fd: Option<i32>,
    pub started_at_ms: u64,
    pub restarted_at_ms: u64,
    pub reason: String,
    pub completed: u64,
    pub failed: u64,
    /// Spool entries rejected so far.
    #[serde(default)]
    pub rejected: u64,
    pub restarts: u64,
    pub refusals: u64,
    pub last_refused: Option<Refusal>,
    /// CLOCK_MONOTONIC (µs) when the restart was requested: the new image measures its pause.
    pub requested_mono_us: u64,
    /// The config text the old image validated (None: too large, read the file).
    #[serde(default)]
    pub config_text: Option<String>,
    /// The binary the old image exec'd (None: unknown, hash it).
    #[serde(default)]
    pub binary: Option<Known>,
    #[serde(default)]
    pub last_refused_deploy: Option<Refused>,
    #[serde(default)]
    pub last_rollback: Option<Rollback>,
    /// The metrics' counters and histograms, as JSON in a memfd (they can outgrow an
    /// environment variable).
    #[serde(default, with = "fd_or_none")]
    pub metrics_fd: Option<i32>,
    /// The `/metrics` listening socket.
    #[serde(default, with = "fd_or_none")]
    pub metrics_listen_fd: Option<i32>,
    /// `jobs_dir` as the old image validated it just before the exec, as JSON in a memfd.
    #[serde(default, with = "fd_or_none")]
    pub jobs_fd: Option<i32>,
}

/// A histogram's counts: observations per bucket (the last one: above every bound), their sum.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistogramCounts {
    /// Upper bounds of the buckets, in microseconds.
    pub bounds_us: Vec<u64>,
    /// Per bucket, not cumulative; one more than `bounds_us`.
    pub counts: Vec<u64>,
    pub sum_us: u64,
}

/// One function's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCounts {
    pub done: u64,
    pub failed: u64,
    pub timed_out: u64,
    pub duration: HistogramCounts,
}

/// The metrics' counters, carried across execve so that they only go up for the life of the
/// process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsCarried {
    pub functions: std::collections::BTreeMap<String, FunctionCounts>,
    pub restarts: std::collections::BTreeMap<String, u64>,
    pub restart_pause: HistogramCounts,
    pub deploys: std::collections::BTreeMap<String, u64>,
    /// Gearman reconnects per server address.
    pub reconnects: std::collections::BTreeMap<String, u64>,
}

/// A carried descriptor number on the wire: -1 for none, as every earlier image wrote and reads
/// it (a rollback execs an older binary with what we carry).
mod fd_or_none {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(fd: &Option<i32>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i32(fd.unwrap_or(-1))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i32>, D::Error> {
        Ok(Some(i32::deserialize(d)?).filter(|fd| *fd >= 0))
    }
}

/// A reload (or deploy) that was refused, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Refusal {
    pub at_ms: u64,
    pub reason: String,
    pub error: String,
}

/// A file's identity: any write, rename or chmod changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ident {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    pub mode: u32,
}

impl Ident {
    pub fn of(path: &Path) -> Option<Ident> {
        let m = std::fs::metadata(path).ok()?;
        Some(Ident {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() * 1_000_000_000 + m.mtime_nsec(),
            mode: m.permissions().mode(),
        })
    }
}

/// A binary we know: where its identity came from, and its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Known {
    pub ident: Option<Ident>,
    pub sha256: String,
}

/// A refused candidate, for `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Refused {
    pub at_ms: u64,
    pub sha256: String,
    pub error: String,
}

/// A rollback that happened, for `status` and the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rollback {
    pub from_sha: String,
    pub to_sha: String,
    pub reason: String,
    pub at_ms: u64,
}

/// What the worker is told about its supervisor.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Info {
    pub pid: u32,
    pub crashes: u64,
    pub last_exit: Option<String>,
    /// The `--max-restarts` it was started with (so `restart` can start it the same way).
    #[serde(default)]
    pub max_restarts: usize,
}

/// The variable a supervisor sets for its worker (an [`Info`] as JSON).
pub const SUPERVISOR_ENV: &str = "GEARSHIFT_SUPERVISOR";

/// What the running worker shows in `status` about its supervisor, if it has one.
pub fn from_env() -> Option<Info> {
    serde_json::from_str(&std::env::var(SUPERVISOR_ENV).ok()?).ok()
}

/// Why a generation restarts (carried to the next, shown in `status` and the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartReason {
    #[serde(rename = "sighup")]
    Sighup,
    #[serde(rename = "config changed")]
    ConfigChanged,
    #[serde(rename = "jobs changed")]
    JobsChanged,
    #[serde(rename = "binary changed")]
    BinaryChanged,
    #[serde(rename = "max_jobs")]
    MaxJobs,
    #[serde(rename = "max_rss")]
    MaxRss,
    #[serde(rename = "max_age")]
    MaxAge,
    /// A lane or an essential helper thread died (a panic): the generation is replaced.
    #[serde(rename = "thread died")]
    ThreadDied,
}

impl RestartReason {
    /// Every reason, for metrics that show each one from the start.
    pub const ALL: [RestartReason; 8] = [
        RestartReason::Sighup,
        RestartReason::ConfigChanged,
        RestartReason::JobsChanged,
        RestartReason::BinaryChanged,
        RestartReason::MaxJobs,
        RestartReason::MaxRss,
        RestartReason::MaxAge,
        RestartReason::ThreadDied,
    ];

    /// The name in `status` and the log (`last_restart_reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            RestartReason::Sighup => "sighup",
            RestartReason::ConfigChanged => "config changed",
            RestartReason::JobsChanged => "jobs changed",
            RestartReason::BinaryChanged => "binary changed",
            RestartReason::MaxJobs => "max_jobs",
            RestartReason::MaxRss => "max_rss",
            RestartReason::MaxAge => "max_age",
            RestartReason::ThreadDied => "thread died",
        }
    }
}

impl std::fmt::Display for RestartReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Older images write -1 for "no descriptor" and read it back so: a rollback hands them
    /// what we carry, and we adopt what they carried.
    #[test]
    fn descriptors_cross_the_wire_as_older_images_write_them() {
        let mine = Inherited {
            pidfile_fd: Some(3),
            inotify_fd: None,
            ..Inherited::default()
        };
        let json = serde_json::to_value(&mine).unwrap();
        assert_eq!(json["pidfile_fd"], 3);
        assert_eq!(json["inotify_fd"], -1);
        assert_eq!(json["source_fd"], -1);
        let old: Inherited =
            serde_json::from_str(r#"{"generation":4,"pidfile_fd":5,"inotify_fd":-1,"started_at_ms":0,"restarted_at_ms":0,"reason":"sighup","completed":0,"failed":0,"restarts":0,"refusals":0,"last_refused":null,"requested_mono_us":0}"#)
                .unwrap();
        assert_eq!(
            (old.pidfile_fd, old.inotify_fd, old.source_fd),
            (Some(5), None, None)
        );
    }
}
