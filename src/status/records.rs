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
    /// The supervisor is no longer this worker's parent (killed, or ended by the OOM killer):
    /// nobody restarts a crash. Set when shown, never by the supervisor.
    #[serde(default)]
    pub gone: bool,
}

/// The variable a supervisor sets for its worker (an [`Info`] as JSON).
pub const SUPERVISOR_ENV: &str = "GEARSHIFT_SUPERVISOR";

/// What the running worker shows in `status` about its supervisor, if it was started by one:
/// `gone` once that is no longer its parent.
pub fn from_env() -> Option<Info> {
    let info: Info = serde_json::from_str(&std::env::var(SUPERVISOR_ENV).ok()?).ok()?;
    let gone = nix::unistd::getppid().as_raw() != info.pid as i32;
    Some(Info { gone, ..info })
}

/// Whether this worker has said that its supervisor is gone (carried across exec, so each
/// generation does not say it again).
static GONE_SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Says once that the supervisor the worker was started by is gone: it runs on, and a crash is
/// no longer restarted. (`status` said it was supervised by a pid that was gone.)
pub fn look_for_supervisor() {
    if let Some(i) = from_env().filter(|i| i.gone) {
        if !GONE_SAID.swap(true, std::sync::atomic::Ordering::Relaxed) {
            log::warn!("{}", gone_words(i.pid));
        }
    }
}

/// Whether the gone supervisor was said (by this generation or one before it).
pub fn gone_said() -> bool {
    GONE_SAID.load(std::sync::atomic::Ordering::Relaxed)
}

/// A generation before this one said that the supervisor is gone: not said again.
pub fn gone_said_before(said: bool) {
    if said {
        GONE_SAID.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The end of the line a worker exiting with status 1 for a fresh start says: who starts it
/// again, as far as it can tell (its supervisor, while that is its parent; systemd, whose
/// service's main process it is, by its `Restart=`), or that nobody does. It said "for the
/// supervisor to start the worker afresh" of a worker `start` ran without one, which then
/// stayed down; and "for systemd" of any worker with systemd's `INVOCATION_ID` in its
/// environment, such as one a deploy agent's service started, which systemd never restarts.
pub fn who_starts_it_again() -> String {
    let own = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    match from_env() {
        Some(i) if !i.gone => format!("for its supervisor (pid {}) to start it afresh", i.pid),
        _ => match crate::ops::service::systemd_unit(own) {
            Some(unit) => format!(
                "for systemd to start it afresh (as {}'s Restart= says)",
                crate::text::escape(&unit)
            ),
            None => "and nothing starts it again (no supervisor, no systemd service): `gearshift start` does (`start --supervise` would have)".into(),
        },
    }
}

/// What is said of a supervisor that is gone.
pub fn gone_words(pid: u32) -> String {
    format!("the supervisor (pid {pid}) is gone: this worker runs on unsupervised, and a crash is not restarted; `gearshift restart` starts it supervised again")
}
