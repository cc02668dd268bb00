//! gearshift: a job worker for Gearman-style queues that restarts itself in place, between
//! jobs, without dropping or interrupting a job.
//!
//! Layout (one module per concept):
//! - [`cli`]: the command line (`run`, `submit`, `result`, `status`, `reload`, `stop`, `check`);
//!   a user's own binary calls [`cli::main`] with its own [`Functions`].
//! - [`worker`]: the control loop and the lane threads that run jobs; restart decisions.
//! - [`source`], [`spool`], [`gearman`]: where jobs come from: the embedded durable queue, or
//!   Gearman servers over the binary protocol.
//! - [`functions`], [`executable`]: Rust job functions and job executables from `jobs_dir`.
//! - [`config`]: `config.toml`, with `file:line:col` errors.
//! - [`signals`], [`watch`], [`inotify`], [`reexec`], [`pidfile`], [`status`], [`logging`],
//!   [`notify`]: the daemon's parts.
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

pub mod carried;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod deploy;
pub mod error;
pub mod executable;
pub mod functions;
pub mod gearman;
pub mod handover;
pub mod inotify;
pub mod lane;
pub mod layout;
pub mod logging;
pub mod notify;
pub mod pidfile;
pub mod privilege;
pub mod reaper;
pub mod reexec;
pub mod safefs;
pub mod signals;
pub mod source;
pub mod spool;
pub mod status;
pub mod supervisor;
pub mod watch;
pub mod worker;

pub use error::{Error, Result};
pub use functions::{Functions, Job, JobError, JobFunction, JobResult, Progress};

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
