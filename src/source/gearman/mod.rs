//! The Gearman source: real gearmand servers over the binary protocol.
//!
//! - [`protocol`]: packet framing, the hardened decoder.
//! - [`connection`]: one buffered TCP connection.
//! - [`worker`]: the lanes that take jobs (the worker side).
//! - [`client`]: submitting jobs (the `submit` command and the load generator).

pub mod client;
pub mod connection;
pub mod protocol;
pub mod worker;

pub use worker::GearmanSource;
