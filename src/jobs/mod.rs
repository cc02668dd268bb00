//! Job functions: Rust functions and the built-ins (`functions`), job executables
//! (`executable`, what their `#!` lines say in `shebang`), and keeping their processes from
//! outliving them (`reaper`).

pub mod executable;
pub mod functions;
pub mod pipes;
pub mod reaper;
pub mod shebang;
pub mod starts;
