//! Where jobs come from. A source hands each worker thread a [`Lane`]: the thread claims a job,
//! runs it, reports the outcome, and only then asks for the next one. Between those calls a
//! lane holds no job, which is what makes a restart between jobs safe.
//!
//! A source is a folder behind one seam, [`JobSource`]: the worker, the control loop, status
//! and metrics know only that trait. Adding a source is its folder, an impl of the trait, and
//! one arm in [`open`] (with its `[source] kind` in the config).

pub mod amqp;
pub(crate) mod attempts;
pub mod gearman;
pub mod lane;
pub(crate) mod resolve;
pub(crate) mod spin;
pub mod spool;
pub mod zeromq;

use std::os::fd::{AsFd, OwnedFd, RawFd};
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
    /// State worth handing to the next generation (the spool's sorted queue); it crosses the
    /// exec in the restart parcel, bounded to 1 MiB.
    fn hand_over(&self) -> Option<Vec<u8>> {
        None
    }
    /// The lanes are about to be stopped: for a re-exec (`for_restart`), or for good. A source
    /// may then leave to `settle(false)` what it would make durable as each lane closes.
    fn stopping(&self, _for_restart: bool) {}
    /// Every lane has ended, before an exec or (`exiting`) the end of the process: make
    /// durable and tidy what the source still holds (or, before an exec, keep it for
    /// [`JobSource::hand_over`]).
    fn settle(&self, _exiting: bool) {}
    /// The restart did not happen (refused after the drain, or the exec after `settle(false)`
    /// failed): serve on with what the source holds, as before `stopping(true)`.
    fn unsettle(&self) {}
    /// Sockets to hand to the next generation, by key: listening sockets (by endpoint), and
    /// connections parked at a safe point (Gearman). The source keeps them open until the
    /// exec, or its failure (`unsettle`).
    fn listeners(&self) -> Vec<(String, RawFd)> {
        Vec::new()
    }
    /// Descriptors whose locks cross an exec held (to an image that takes them up), by key:
    /// the spool's consumer lock (`spool/lock.rs`). Open until the exec, or its failure.
    fn locks(&self) -> Vec<(String, RawFd)> {
        Vec::new()
    }
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
/// What a generation starts a source with.
pub struct Opening<'a> {
    pub generation: u64,
    /// This process is a re-exec of a worker that left its source in order.
    pub resumed: bool,
    /// Sockets the previous generation handed over, by key (listening sockets by endpoint,
    /// Gearman connections by lane and server), already checked to be sockets and
    /// close-on-exec again. The source takes what it can use; the rest is closed.
    pub listeners: Vec<(String, OwnedFd)>,
    /// The descriptors of [`JobSource::locks`] the previous generation handed over, by key,
    /// close-on-exec again (the source checks what they are).
    pub locks: Vec<(String, OwnedFd)>,
    /// What the previous generation's [`JobSource::hand_over`] gave (bytes from outside this
    /// image: check).
    pub handed: Option<&'a [u8]>,
    /// Where Gearman lanes show their connections.
    pub views: crate::status::ServerViews,
    /// Where an ingesting source counts its messages.
    pub ingress: Arc<crate::kinds::Ingress>,
}

/// Opens the configured source for a generation.
pub fn open(config: &Config, o: Opening<'_>) -> Result<Arc<Source>> {
    let Opening {
        generation,
        resumed,
        listeners,
        locks,
        handed,
        views,
        ingress,
    } = o;
    Ok(match &config.source {
        SourceConfig::Spool(cfg) => Arc::new(Arc::new(spool::SpoolSource::open_holding(
            cfg,
            config.worker.max_payload_bytes,
            resumed,
            handed,
            locks,
        )?)),
        SourceConfig::Zeromq(cfg) => Arc::new(zeromq::ZeromqSource::open(
            cfg,
            &config.worker,
            resumed,
            (handed, locks),
            listeners,
            ingress,
        )?),
        SourceConfig::Gearman(cfg) => Arc::new(gearman::GearmanSource::open(
            cfg,
            &config.worker.state_dir,
            generation,
            views,
            config.worker.concurrency,
            listeners,
        )?),
        SourceConfig::Amqp(cfg) => Arc::new(amqp::AmqpSource::open(
            cfg,
            &config.worker.state_dir,
            config.worker.max_payload_bytes,
            generation,
            views,
            config.worker.concurrency,
        )?),
    })
}

/// Makes a TCP connection notice a peer that stopped answering within about `within` (a host
/// or link gone: no FIN, no RST): keepalive probes after a third of it idle, a ninth apart,
/// and TCP_USER_TIMEOUT at two thirds, which on Linux also ends unanswered keepalive probes (so
/// an idle connection is given up after 1/3 + 2/3 of `within`, one with data unacknowledged
/// after 2/3). A live peer's kernel answers the probes, however long it stays quiet.
pub(crate) fn detect_dead_peer(tcp: &impl AsFd, within: Duration) -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    let secs = within.as_secs().max(2);
    let idle = u32::try_from(secs.div_ceil(3)).unwrap_or(u32::MAX);
    let interval = u32::try_from((secs / 9).max(1)).unwrap_or(u32::MAX);
    let ms = u32::try_from(within.as_millis() * 2 / 3).unwrap_or(u32::MAX);
    setsockopt(tcp, sockopt::KeepAlive, &true)?;
    setsockopt(tcp, sockopt::TcpKeepIdle, &idle)?;
    setsockopt(tcp, sockopt::TcpKeepInterval, &interval)?;
    setsockopt(tcp, sockopt::TcpKeepCount, &3)?;
    setsockopt(tcp, sockopt::TcpUserTimeout, &ms)?;
    Ok(())
}
