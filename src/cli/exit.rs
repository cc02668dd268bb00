//! The CLI's exit codes: one table, one meaning per code, for every command (README "Commands",
//! and each command's `--help`).

/// What was asked happened: started, stopped (or was not running, for `stop`), reloaded, the job
/// is done, the config is valid, the worker runs (for `status`, whatever its state says).
pub const OK: u8 = 0;
/// Refused or failed: the job failed, the reload was refused, the config or `jobs_dir` is
/// invalid (`check`, `run`, `start`), the worker could not start or is already running.
pub const FAILED: u8 = 1;
/// Bad arguments (clap's own usage errors), or an unknown job id.
pub const USAGE: u8 = 2;
/// No worker is running (LSB "program is not running").
pub const NOT_RUNNING: u8 = 3;
/// The worker's state cannot be told (LSB "status unknown"): the config cannot say where it
/// is, or the pidfile's lock holder cannot be proven to be it.
pub const UNKNOWN: u8 = 4;
/// Not done yet: still running after `stop --timeout`, no new generation within `reload
/// --timeout`, or the job has not finished (`result`, `submit --wait --timeout`).
pub const NOT_YET: u8 = 5;
/// The command could not act: the config cannot be read, an I/O or system error.
pub const ERROR: u8 = 6;

/// The table, as `--help` shows it after every command's own lines.
pub const TABLE: &str = "Exit codes: 0 done; 1 refused or failed (a failed job, a refused \
reload, an invalid config); 2 bad arguments or unknown job id; 3 not running; 4 unknown (the \
worker's state cannot be told); 5 not done yet (timed out, or the job has not finished); \
6 could not act (config unreadable, I/O or system error).";
