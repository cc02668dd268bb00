//! Restarting in place: the state carried across execve (`carried`), the descriptors handed
//! over (`handover`), the exec itself (`reexec`), and deploys of a new binary (`deploy`).

pub mod carried;
pub mod deploy;
pub mod reexec;
