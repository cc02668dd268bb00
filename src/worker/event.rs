//! The one message type of the control loop's channel (a leaf of the worker: lanes, helpers
//! and the signal thread send it, the control loop alone decides on it).

use nix::sys::signal::Signal;

use crate::kinds::RestartReason;
use crate::watch::Touched;

/// Everything other threads tell the control loop, on one channel: the loop owns every
/// decision, the others only report.
pub(super) enum Event {
    /// A handled signal arrived (the signal thread).
    Signal(Signal),
    /// Something changed on disk, or the watch itself failed (the watch thread).
    Touched(Touched),
    /// A lane reached a recycling limit.
    Recycle(RestartReason),
    /// A job waits for this function, which this generation lacks and a deploy may bring
    /// (`jobs_dir` offers it, or a new binary is judged).
    Awaited(String),
    /// A lane thread ended (`true`: by a panic).
    LaneDone(bool),
    /// An essential helper thread died by a panic (its name).
    ThreadDied(String),
}
