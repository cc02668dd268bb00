//! Running as a proper Unix daemon: `start` (`daemon`), the optional `supervisor`, the
//! `pidfile` lock, `privilege` drop and the files it trusts (`layout`, `safefs`), `signals`,
//! `logging` and the systemd `notify` protocol.

pub mod daemon;
pub mod layout;
pub mod logging;
pub mod notify;
pub mod pidfile;
pub mod privilege;
pub mod safefs;
pub mod signals;
pub mod supervisor;
