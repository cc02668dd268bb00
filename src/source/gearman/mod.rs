//! The Gearman source: real gearmand servers over the binary protocol.
//!
//! - [`protocol`]: packet framing, the hardened decoder.
//! - [`connection`]: one buffered TCP connection.
//! - [`tls`]: `tls://` servers: certificates, and TLS over the same non-blocking socket.
//! - [`worker`]: the worker side: the source, its design (safe points, deadlines).
//! - [`lane`]: a lane taking jobs from any server; [`servers`]: its connections, backoff;
//!   `handover`: its connections kept across a re-exec.
//! - [`client`]: submitting jobs (the `submit` command).
//! - [`load`]: the pipelined load generator (`submit --count`).

pub mod client;
pub mod connection;
mod handover;
pub mod lane;
pub mod load;
pub mod protocol;
pub mod servers;
pub mod tls;
pub mod worker;

pub use worker::GearmanSource;
