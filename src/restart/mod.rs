//! Restarting in place: the state carried across execve (`carried`, in one versioned memfd:
//! `parcel`), the exec itself (`reexec`), deploys of a new binary (`deploy`: candidates; `preflight`: their `check`;
//! `rollback`: the marker and `last-good`).

pub mod carried;
pub mod deploy;
mod digest;
pub mod parcel;
pub mod preflight;
pub mod reexec;
pub mod rollback;
