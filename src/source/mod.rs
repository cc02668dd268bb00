//! Where jobs come from. A source hands each worker thread a [`Lane`]: the thread claims a job,
//! runs it, reports the outcome, and only then asks for the next one. Between those calls a
//! lane holds no job, which is what makes a restart between jobs safe.
//!
//! A source is a folder behind one seam, [`JobSource`]: the worker, the control loop, status
//! and metrics know only that trait. Adding a source is its folder, an impl of the trait, and
//! one arm in [`open`] (with its `[source] kind` in the config).

pub mod gearman;
pub mod lane;
pub mod spool;

use std::os::fd::{OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, Source as SourceConfig};
use crate::error::Result;
use crate::metrics::QueueStats;
pub use crate::source::lane::{Claimed, Lane};

/// What every job source offers the worker.
pub trait JobSource: Send + Sync {
    /// A lane for worker thread `index`, serving `functions` (name and timeout). A network
    /// source connects lazily, in the lane, so a worker starts even when servers are down.
    fn lane(&self, index: usize, functions: &[(String, Option<Duration>)])
        -> Result<Box<dyn Lane>>;
    /// Wakes every idle lane: to look for new jobs, or to notice its stop flag.
    fn wake(&self);
    /// State worth handing to the next generation, as a descriptor (the spool's sorted queue).
    fn hand_over(&self) -> Option<OwnedFd> {
        None
    }
    /// Takes what the previous generation handed over.
    fn take_over(&self, _fd: RawFd) {}
    /// Every lane has ended, before an exec or (`exiting`) the end of the process: make
    /// durable and tidy what the source still holds.
    fn settle(&self, _exiting: bool) {}
    /// The queue this source keeps itself, if it keeps one (a network server keeps its own).
    fn queue_stats(&self) -> Option<QueueStats> {
        None
    }
    /// Directories whose events mean new jobs may be waiting (none for network sources).
    fn watch_dirs(&self) -> Vec<PathBuf> {
        Vec::new()
    }
}

/// An opened job source.
pub type Source = dyn JobSource;

/// Opens the configured source for `generation`: the one place that knows every kind.
/// `resumed`: this process is a re-exec of a worker that left its source in order.
pub fn open(
    config: &Config,
    generation: u64,
    resumed: bool,
    views: crate::status::ServerViews,
) -> Result<Arc<Source>> {
    Ok(match &config.source {
        SourceConfig::Spool(cfg) => Arc::new(Arc::new(spool::SpoolSource::open(
            cfg,
            config.worker.max_payload_bytes,
            resumed,
        )?)),
        SourceConfig::Gearman(cfg) => {
            Arc::new(gearman::GearmanSource::open(cfg, generation, views)?)
        }
    })
}
