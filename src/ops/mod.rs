//! The system helpers a Unix daemon stands on: the `pidfile` lock, `privilege` drop and the
//! files it trusts (`layout`, `safefs`), descriptors handed across exec (`handover`), `signals`
//! (and the process's signal state, `sigstate`), `logging` and the systemd `notify` protocol.
//! The process managers that use them (`start` and its supervisor) are in `crate::daemon`, a
//! layer above the worker.

#[cfg(gearshift_faults)]
pub mod faults;
pub mod fileid;
pub mod handover;
pub mod hook;
pub mod layout;
pub mod logging;
mod logjson;
pub mod notify;
pub mod pidfile;
pub mod privilege;
pub mod procfs;
pub mod recurring;
pub mod safefs;
pub mod serve;
pub mod service;
pub mod signals;
pub mod sigstate;
pub mod stderr;
