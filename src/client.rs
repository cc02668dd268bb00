//! Submitting jobs from Rust: to the embedded spool queue ([`spool`]) or to Gearman servers
//! ([`gearman`]). The `gearshift submit` command is built on these.

/// The embedded durable spool queue, seen from a client: submit a job, look up or wait for its
/// result. A worker (`gearshift run`) with the same `[spool] dir` runs the jobs.
pub mod spool {
    pub use crate::config::MinFree;
    pub use crate::source::spool::{Lookup, Outcome, Record, Spool, SpoolOptions};
}

/// A Gearman client: foreground and background submissions over the binary protocol, and a
/// pipelined load generator.
pub mod gearman {
    pub use crate::source::gearman::client::{Client, Outcome, Priority, Update};
    pub use crate::source::gearman::load::{load, LoadOptions, LoadReport};
}
