//! Job functions: Rust functions and the built-ins (`functions`), job executables
//! (`executable`), and keeping their processes from outliving them (`reaper`).

pub mod executable;
pub mod functions;
pub mod pipes;
pub mod reaper;
pub mod starts;
