//! gearshift: a job worker for Gearman-style queues that restarts itself in place, between
//! jobs, without dropping or interrupting a job.
//!
//! Layout (a directory per part of the architecture, a file per concept):
//! - [`cli`]: the command line; a user's own binary calls [`cli::main`] (or
//!   [`cli::main_as`]) with its own [`Functions`].
//! - [`worker`]: one generation: start-up, the control loop that owns every decision, the lane
//!   threads that run jobs, the validated [`worker::Plan`].
//! - [`source`]: where jobs come from: the [`source::lane`] interface, the embedded durable
//!   [`source::spool`], or Gearman servers ([`source::gearman`]).
//! - [`jobs`]: Rust job functions, job executables, and keeping their processes in check.
//! - [`restart`]: re-exec in place: the state carried across execve, the descriptors handed
//!   over, the exec, deploys of a new binary.
//! - [`ops`]: the daemon's operating parts: `start`, the supervisor, the pidfile, privileges
//!   and the files root trusts, signals, logging, systemd notify.
//! - [`watch`]: file changes (config, `jobs_dir`, the binary, the queue) over one inotify.
//! - [`status`], [`config`], [`clock`], [`error`]: the status document, `config.toml` (with
//!   `file:line:col` errors), time, errors.
//!
//! ```no_run
//! use gearshift::{Functions, Job, JobResult};
//!
//! fn shout(job: &mut Job<'_>) -> JobResult {
//!     Ok(job.payload().to_ascii_uppercase())
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     let mut functions = Functions::with_builtins();
//!     functions.register("shout", shout);
//!     gearshift::cli::main(functions)
//! }
//! ```

pub mod cli;
pub mod clock;
pub mod config;
pub mod error;
pub mod jobs;
pub mod ops;
pub mod restart;
pub mod source;
pub mod status;
pub mod watch;
pub mod worker;

pub use error::{Error, Result};
pub use jobs::functions::{Functions, Job, JobError, JobFunction, JobResult, Progress};

/// The crate version, with the git revision it was built from when known.
pub const VERSION: &str = env!("GEARSHIFT_VERSION");

static IDENTITY: std::sync::OnceLock<(&'static str, &'static str)> = std::sync::OnceLock::new();

/// Sets the program name and version a user's own binary reports (see [`cli::main_as`]).
pub fn set_identity(name: &'static str, version: &'static str) {
    let _ = IDENTITY.set((name, version));
}

/// The program's name and version: `gearshift` and [`VERSION`] unless a binary set its own.
pub fn identity() -> (&'static str, &'static str) {
    IDENTITY.get().copied().unwrap_or(("gearshift", VERSION))
}
