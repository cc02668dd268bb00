//! What `status` reports that other layers produce: a refused reload, a refused deploy, a
//! rollback, the supervisor's facts. Plain data, carried across exec and shown.

use serde::{Deserialize, Serialize};

/// A reload (or deploy) that was refused, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Refusal {
    pub at_ms: u64,
    pub reason: String,
    pub error: String,
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
