//! The interface between a lane thread and a job source: a claimed job, and the per-thread
//! claim / progress / finish calls. A leaf module, so the sources (`spool`, `gearman`) and
//! the `source` module that opens them do not import each other.

use crate::shutdown::Shutdown;

use crate::error::Result;
use crate::jobs::functions::{JobResult, Progress};

/// A claimed job.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// Spool id or Gearman job handle.
    pub id: String,
    pub function: String,
    /// The client's unique id (Gearman); empty for the spool.
    pub unique: String,
    pub payload: Vec<u8>,
    /// Which run this is (1 for the first).
    pub attempt: u32,
    /// When the job was submitted (unix ms), when known.
    pub submitted_ms: u64,
    /// Why the job is failed without running, if it is: its payload was too large to be read
    /// (`payload` is then empty), or its message could not be read.
    pub unrun: Option<String>,
}

/// One worker thread's connection to a source.
pub trait Lane: Send {
    /// Blocks until a job is claimed, or returns None once `stop` is set (the source's
    /// `interrupt` wakes a blocked lane for that).
    fn next(&mut self, stop: &Shutdown) -> Result<Option<Claimed>>;
    /// Where the running job's progress goes.
    fn progress(&mut self) -> &mut dyn Progress;
    /// Reports the outcome. When this returns Ok the outcome is durable (spool) or has been
    /// handed to the server (Gearman).
    fn finish(&mut self, job: &Claimed, outcome: &JobResult) -> Result<()>;
    /// Called between jobs before the lane is dropped for a restart or stop.
    fn close(&mut self) -> Result<()>;
    /// Gives back a claimed job that was never run (the worker is stopping while it cannot
    /// start it), without counting an attempt. Sources that cannot return a job say false,
    /// and the lane keeps trying to run it.
    fn release(&mut self, _job: &Claimed) -> bool {
        false
    }
}
