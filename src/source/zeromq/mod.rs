//! The ZeroMQ source: jobs arrive as messages from ZeroMQ clients (the PHP daemons' REQ
//! sockets, served as a ROUTER would; ZMTP spoken here: `zmtp.rs`, `engine.rs`), are made durable in the embedded spool before they are answered, and
//! run on the lanes like any spool job. The listening sockets are ours and cross every exec
//! (`listen.rs`); the ingress thread (`ingress.rs`) stops before an exec and starts again in
//! the new image.

mod doors;
mod engine;
mod held;
pub mod ingress;
pub mod listen;
pub mod sockets;
pub mod zmtp;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use crate::config::{ZeromqConfig, ZeromqReply};
use crate::error::Result;
use crate::kinds::Ingress as Stats;
use crate::metrics::QueueStats;
use crate::source::lane::Lane;
use crate::source::spool::{Spool, SpoolSource};
use crate::source::JobSource;

/// A spool fed by a ZeroMQ ingress.
pub struct ZeromqSource {
    spool: Arc<SpoolSource>,
    cfg: ZeromqConfig,
    max_payload: usize,
    /// Shared with the ingress, which binds an `ipc://` socket file removed again.
    listeners: Arc<Mutex<Vec<listen::Listener>>>,
    /// The ingress, started with the first lane (once the served functions are known).
    ingress: Mutex<Option<ingress::Ingress>>,
    served: Arc<RwLock<Vec<String>>>,
    jobs_dir: std::path::PathBuf,
    /// Its counts, and the cap on connected clients ([`peer_cap`]) as `max_peers`.
    stats: Arc<Stats>,
}

/// Descriptors kept for all but the clients: what the idle worker holds (about 50 here) and
/// room to spare.
pub(crate) const RESERVED_FDS: u64 = 96;
/// Descriptors kept for each lane's job (a start takes about ten at once, keeps five).
pub(crate) const FDS_PER_LANE: u64 = 16;
/// The fewest clients a derived cap allows.
const MIN_PEERS: u64 = 16;

/// `max_connections`, or what the descriptor limit leaves once the worker and its lanes have
/// what they need: each connection holds a descriptor, and a flood of them once took every
/// one (no job could start, and libzmq, which served this source then, spun on its accept).
/// A cap set above that is warned about: out of descriptors, clients cannot be accepted, and the
/// listening sockets are paused (`doors.rs`).
pub fn peer_cap(configured: Option<u64>, concurrency: usize) -> u64 {
    let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
        .map_or(1024, |(soft, _)| soft);
    let room = soft
        .saturating_sub(RESERVED_FDS + FDS_PER_LANE * concurrency as u64)
        .max(MIN_PEERS);
    match configured {
        Some(n) if n > room => {
            log::warn!(
                "zeromq: max_connections = {n} leaves too few descriptors under ulimit -n {soft} \
                 (at most {room} with {concurrency} lane(s)): raise the limit or lower it"
            );
            n
        }
        Some(n) => n,
        None => room,
    }
}

impl ZeromqSource {
    /// Opens the spool (with what the previous generation `handed` over: its part of the
    /// parcel, its consumer lock) and the listening sockets (`carried` by the previous
    /// generation, or new); the ingress starts with the first lane.
    pub fn open(
        cfg: &ZeromqConfig,
        worker: &crate::config::Worker,
        resumed: bool,
        (handed, locks): (Option<&[u8]>, Vec<(String, OwnedFd)>),
        carried: Vec<(String, OwnedFd)>,
        stats: Arc<Stats>,
    ) -> Result<ZeromqSource> {
        let (max_payload, concurrency) = (worker.max_payload_bytes, worker.concurrency);
        let spool = SpoolSource::open_holding(&cfg.spool, max_payload, resumed, handed, locks)?;
        let spool = Arc::new(spool);
        let listeners = listen::open(&cfg.bind, carried)?;
        if let Ok(mut bound) = stats.bound.lock() {
            *bound = cfg.bind.iter().map(|e| e.to_string()).collect();
        }
        stats.max_peers.store(
            peer_cap(cfg.max_connections, concurrency),
            std::sync::atomic::Ordering::Relaxed,
        );
        Ok(ZeromqSource {
            spool,
            cfg: cfg.clone(),
            max_payload,
            listeners: Arc::new(Mutex::new(listeners)),
            ingress: Mutex::new(None),
            served: Arc::new(RwLock::new(Vec::new())),
            jobs_dir: worker.jobs_dir.clone(),
            stats,
        })
    }

    fn start_ingress(&self) -> Result<()> {
        let mut slot = self
            .ingress
            .lock()
            .map_err(|_| crate::error::Error::Internal("zeromq ingress lock poisoned".into()))?;
        if slot.is_some() {
            return Ok(());
        }
        let rules = ingress::Rules {
            function: self.cfg.function.clone(),
            reply: self.cfg.reply,
            max_payload: self.max_payload,
            busy_poll: self.cfg.busy_poll,
            served: Arc::clone(&self.served),
            jobs_dir: crate::watch::Offers::new(self.jobs_dir.clone()),
            dead_peer: self.cfg.dead_peer_timeout,
        };
        let spool = Spool::from_config(&self.cfg.spool)?;
        // Answering TRUE, a job needs no file until the lanes fall behind (there is no id to
        // look up); answering its id, the file is in place first.
        let feed = (self.cfg.reply == ZeromqReply::True).then(|| self.spool.feed());
        *slot = Some(ingress::Ingress::start(
            &self.listeners,
            spool,
            feed,
            rules,
            Arc::clone(&self.stats),
        )?);
        let bound: Vec<String> = self.cfg.bind.iter().map(|e| e.to_string()).collect();
        log::info!(
            "zeromq: accepting jobs on {} (at most {} clients at once: max_connections)",
            bound.join(", "),
            self.stats
                .max_peers
                .load(std::sync::atomic::Ordering::Relaxed)
        );
        Ok(())
    }
}

impl JobSource for ZeromqSource {
    fn lane(
        &self,
        index: usize,
        functions: &[(String, Option<Duration>)],
    ) -> Result<Box<dyn Lane>> {
        if let Ok(mut served) = self.served.write() {
            *served = functions.iter().map(|(f, _)| f.clone()).collect();
        }
        self.start_ingress()?;
        JobSource::lane(&self.spool, index, functions)
    }

    fn wake(&self) {
        JobSource::wake(&self.spool);
    }

    fn hand_over(&self) -> Option<Vec<u8>> {
        JobSource::hand_over(&self.spool)
    }

    fn stopping(&self, for_restart: bool) {
        JobSource::stopping(&self.spool, for_restart);
    }

    fn unsettle(&self) {
        JobSource::unsettle(&self.spool);
    }

    /// Stops the ingress first (answering what it holds), then settles the spool.
    fn settle(&self, exiting: bool) {
        if let Ok(mut slot) = self.ingress.lock() {
            if let Some(mut i) = slot.take() {
                i.stop();
            }
        }
        JobSource::settle(&self.spool, exiting);
    }

    fn listeners(&self) -> Vec<(String, RawFd)> {
        self.listeners.lock().map_or_else(
            |_| Vec::new(),
            |held| {
                held.iter()
                    .map(|l| (l.endpoint.to_string(), l.fd.as_raw_fd()))
                    .collect()
            },
        )
    }

    fn queue_stats(&self) -> Option<QueueStats> {
        JobSource::queue_stats(&self.spool)
    }

    fn locks(&self) -> Vec<(String, RawFd)> {
        JobSource::locks(&self.spool)
    }

    fn watch_dirs(&self) -> Vec<PathBuf> {
        JobSource::watch_dirs(&self.spool)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_the_worker_and_its_lanes_their_descriptors() {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map_or(1024, |(soft, _)| soft);
        let derived = peer_cap(None, 4);
        assert_eq!(
            derived,
            soft.saturating_sub(RESERVED_FDS + 4 * FDS_PER_LANE)
                .max(MIN_PEERS)
        );
        assert!(peer_cap(None, 64) < derived, "more lanes, fewer clients");
        assert_eq!(peer_cap(Some(5), 4), 5, "as configured");
        assert_eq!(peer_cap(Some(u64::MAX), 4), u64::MAX, "warned about, kept");
    }
}
