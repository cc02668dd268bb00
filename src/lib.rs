#![warn(missing_docs)]
//! gearshift: a job worker for Gearman-style queues that restarts itself in place, between
//! jobs, without dropping or interrupting a job.
//!
//! What a binary of your own needs (the rest of the crate is private; ARCHITECTURE.md maps it):
//! - [`Functions`] with your [`JobFunction`]s (closures work), each given a [`Job`] and
//!   returning a [`JobResult`] or a [`JobError`];
//! - [`cli::main`] (or [`cli::main_as`], with your program's name and version): the whole
//!   gearshift command line (`run`, `start`, `stop`, `reload`, `status`, `submit`, ...) with your
//!   functions beside the built-ins and the executables in `jobs/`;
//! - [`client`]: submitting jobs from Rust, to the embedded spool or to Gearman servers;
//! - [`NoProgress`] and [`Job::new`] to unit-test a job function without a worker.
//!
//! What your binary must know (README "Job functions" says more):
//! - function names are 1 to 128 bytes of ASCII letters, digits, `_`, `-`, `.`, `:`
//!   ([`Functions::try_register`] returns the reason for a bad one, `register` panics);
//! - keep `panic = "unwind"`: with `panic = "abort"` a panicking function ends the worker
//!   instead of failing its job;
//! - copy `[profile.dev.package.sha2] opt-level = 3` into your Cargo.toml (deploys hash the
//!   binary; profiles are the final binary's);
//! - [`Job::data`] is part of the result for libgearman clients;
//! - a deploy rolls back only a binary that reaches [`cli::main`]: do your own set-up lazily,
//!   not before it (one that dies earlier is restarted, not rolled back).
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
pub mod client;
mod clock;
mod config;
mod daemon;
mod error;
mod jobs;
mod kinds;
mod metrics;
mod ops;
mod restart;
mod shutdown;
mod source;
mod status;
#[cfg(test)]
mod testutil;
mod text;
mod watch;
mod worker;

pub use error::{Error, Result};
pub use jobs::functions::{Functions, Job, JobError, JobFunction, JobResult, NoProgress, Progress};

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
