//! Job functions: Rust functions and the built-ins (`functions`), job executables
//! (`executable`, what their `#!` lines say in `shebang`, run exactly as the kernel loads them
//! by `exact`), and keeping their processes from outliving them (`reaper`).

pub mod exact;
pub mod executable;
pub mod functions;
pub mod pipes;
pub mod reaper;
pub mod shebang;
pub mod starts;
