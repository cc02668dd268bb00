//! Where jobs come from. A source hands each worker thread a [`Lane`]: the thread claims a job,
//! runs it, reports the outcome, and only then asks for the next one. Between those calls a
//! lane holds no job, which is what makes a restart between jobs safe.

pub mod gearman;
pub mod lane;
pub mod spool;

use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, Source as SourceConfig};
use crate::error::Result;
use crate::source::gearman::GearmanSource;
pub use crate::source::lane::{Claimed, Lane};
use crate::source::spool::SpoolSource;

/// An opened job source.
pub enum Source {
    Spool(Arc<SpoolSource>),
    Gearman(Box<GearmanSource>),
}

impl Source {
    /// Opens the configured source for `generation` (a network source connects lazily, in
    /// each lane, so a worker starts even when servers are down).
    pub fn open(
        config: &Config,
        generation: u64,
        views: crate::status::ServerViews,
    ) -> Result<Source> {
        match &config.source {
            SourceConfig::Spool(cfg) => Ok(Source::Spool(Arc::new(SpoolSource::open(
                cfg,
                config.worker.max_payload_bytes,
            )?))),
            SourceConfig::Gearman(cfg) => Ok(Source::Gearman(Box::new(GearmanSource::open(
                cfg, generation, views,
            )?))),
        }
    }

    /// A lane for worker thread `index`, serving `functions` (name and timeout).
    pub fn lane(
        &self,
        index: usize,
        functions: &[(String, Option<Duration>)],
    ) -> Result<Box<dyn Lane>> {
        match self {
            Source::Spool(s) => Ok(s.lane()),
            Source::Gearman(g) => g.lane(index, functions),
        }
    }

    /// Wakes every idle lane: to look for new jobs, or to notice its stop flag.
    pub fn wake(&self) {
        match self {
            Source::Spool(s) => s.wake(),
            Source::Gearman(g) => g.wake(),
        }
    }

    /// State worth handing to the next generation (the spool's sorted queue), as a descriptor.
    pub fn hand_over(&self) -> Option<std::os::fd::OwnedFd> {
        match self {
            Source::Spool(s) => s.hand_over(),
            Source::Gearman(_) => None,
        }
    }

    /// Takes what the previous generation handed over.
    pub fn take_over(&self, fd: std::os::fd::RawFd) {
        if let Source::Spool(s) = self {
            s.take_over(fd);
        }
    }

    /// The spool's queue now (None for Gearman: the server holds its queue).
    pub fn queue_stats(&self) -> Option<crate::metrics::QueueStats> {
        match self {
            Source::Spool(s) => Some(s.queue_stats()),
            Source::Gearman(_) => None,
        }
    }

    /// Directories whose events mean new jobs may be waiting (none for network sources).
    pub fn queue_dirs(&self) -> Vec<std::path::PathBuf> {
        match self {
            Source::Spool(s) => vec![s.queue_dir()],
            Source::Gearman(_) => Vec::new(),
        }
    }
}
