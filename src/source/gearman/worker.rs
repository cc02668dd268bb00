//! The Gearman worker side: each lane keeps one connection per server and takes jobs from any.
//!
//! Every connection is non-blocking and driven by the lane's poll(2) loop, with a deadline on
//! each exchange (connect, handshake, GRAB, ECHO, a pending write): a server that misses one
//! (`[source] io_timeout`) is dropped and backed off, so a slow, silent or trickling server
//! costs only its own connection. A new connection is used only after a healthy exchange
//! (SET_CLIENT_ID, CAN_DO..., then an ECHO round trip), and only that resets its backoff.
//!
//! Safe points (where a lane holds no job and nothing is outstanding) are exactly: after a
//! result was written and before the next GRAB_JOB_UNIQ, and while asleep after PRE_SLEEP. The
//! lane stops only there. A GRAB is always answered (NO_JOB or JOB_ASSIGN_UNIQ) before the lane
//! stops, unless the server leaves it unanswered for a second after the stop was asked: then
//! that connection is dropped (gearmand requeues whatever it may have assigned). CANT_DO is
//! never sent, RESET_ABILITIES only on a connection taken over at a safe point (gearmand would
//! requeue a held job). A lane stopping for a re-exec parks its plain connections for the next
//! generation (`handover.rs`); before any other connection is dropped, an ECHO round trip
//! (bounded) proves every result it wrote has been processed.
//!
//! The result of a job is queued, and written together with the next GRAB_JOB_UNIQ in one
//! write: one syscall and one round trip per job.

use crate::source::attempts::Attempts;
use std::os::fd::{AsFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::handover::{self, Handover};
use super::servers::GearmanLane;
use super::servers::{Phase, Server, Views, BACKOFF_MIN};
use super::tls::TlsTarget;
use crate::config::GearmanConfig;
use crate::error::{Error, Result};
use crate::source::lane::Lane;

/// The configured Gearman servers, shared by this generation's lanes.
pub struct GearmanSource {
    cfg: GearmanConfig,
    /// Per configured server: where to connect, and TLS for a `tls://` one.
    targets: Vec<(String, Option<TlsTarget>)>,
    generation: u64,
    wakers: Mutex<Vec<Weak<OwnedFd>>>,
    views: Views,
    handover: Arc<Handover>,
    /// Runs that ended the worker (`max_attempts`).
    attempts: Arc<Mutex<Attempts>>,
}

impl GearmanSource {
    /// The configured servers (reading `[source.tls]` files once); lanes connect lazily, or
    /// take up the connections the previous generation parked for them (`carried`, by key;
    /// those no lane of `lanes` can use are closed).
    pub fn open(
        cfg: &GearmanConfig,
        state_dir: &std::path::Path,
        generation: u64,
        views: Views,
        lanes: usize,
        carried: Vec<(String, OwnedFd)>,
    ) -> Result<GearmanSource> {
        let targets = super::tls::targets(&cfg.servers, cfg.tls.as_ref())?;
        let usable: Vec<String> = (0..lanes)
            .flat_map(|i| {
                cfg.servers
                    .iter()
                    .zip(&targets)
                    .filter(|(_, (_, tls))| tls.is_none())
                    .map(move |(addr, _)| handover::key(i, cfg.exceptions, addr))
            })
            .collect();
        crate::status::show_configured(&views, cfg.servers.iter().map(String::as_str), lanes);
        Ok(GearmanSource {
            handover: Arc::new(Handover::new(carried, |k| usable.iter().any(|u| u == k))),
            targets,
            cfg: cfg.clone(),
            generation,
            wakers: Mutex::new(Vec::new()),
            views,
            attempts: Arc::new(Mutex::new(Attempts::open(
                &crate::ops::layout::worker_dir(state_dir),
                lanes,
            ))),
        })
    }

    /// A lane for worker thread `index`, registering `functions` (name, timeout) on each server.
    fn lane_for(
        &self,
        index: usize,
        functions: &[(String, Option<Duration>)],
    ) -> Result<Box<dyn Lane>> {
        let wake = Arc::new(eventfd()?);
        if let Ok(mut w) = self.wakers.lock() {
            w.retain(|x| x.strong_count() > 0);
            w.push(Arc::downgrade(&wake));
        }
        let client_id = match &self.cfg.client_id {
            Some(id) => format!("{id}:{index}"),
            None => format!(
                "{}:{}:{}:{index}",
                hostname(),
                std::process::id(),
                self.generation
            ),
        };
        let servers = self
            .cfg
            .servers
            .iter()
            .zip(&self.targets)
            .map(|(addr, (target, tls))| Server {
                addr: addr.clone(),
                target: target.clone(),
                tls: tls.clone(),
                conn: None,
                lookup: None,
                phase: Phase::Down,
                deadline: None,
                backoff: BACKOFF_MIN,
                retry_at: Instant::now(),
                last_io: Instant::now(),
                echo_out: false,
                failures: 0,
                logged: String::new(),
                // Never said to be over: Gearman acknowledges no result that it takes.
                rejected: crate::ops::logging::Recurring::new(
                    "gearman: the server rejected results (jobs it no longer knows, as after its own timeout)",
                    "",
                ),
            })
            .collect();
        let mut lane = GearmanLane {
            servers,
            functions: functions.to_vec(),
            client_id,
            exceptions: self.cfg.exceptions,
            max_packet: self.cfg.max_packet_bytes,
            io_timeout: self.cfg.io_timeout,
            reconnect_max: self.cfg.reconnect_max,
            dead_peer: self.cfg.dead_peer_timeout,
            wake,
            spin: crate::source::spin::Spin::new(self.cfg.busy_poll),
            job_server: None,
            handle: Vec::new(),
            next_server: index,
            index,
            views: Arc::clone(&self.views),
            handover: Arc::clone(&self.handover),
            attempts: Arc::clone(&self.attempts),
            max_attempts: self.cfg.max_attempts,
            run_key: None,
        };
        for s in &lane.servers {
            lane.view(s, crate::kinds::ConnState::Connecting, None);
        }
        lane.take_up();
        Ok(Box::new(lane))
    }

    /// Wakes every sleeping lane.
    fn wake_all(&self) {
        if let Ok(w) = self.wakers.lock() {
            for fd in w.iter().filter_map(Weak::upgrade) {
                let one = 1u64.to_ne_bytes();
                let _ = nix::unistd::write(fd.as_fd(), &one);
            }
        }
    }
}

/// Gearman as the worker sees every source: the servers keep the queue, nothing is watched;
/// the connections are handed over across a re-exec.
impl crate::source::JobSource for GearmanSource {
    fn lane(
        &self,
        index: usize,
        functions: &[(String, Option<Duration>)],
    ) -> Result<Box<dyn Lane>> {
        self.lane_for(index, functions)
    }

    fn wake(&self) {
        self.wake_all();
    }

    fn stopping(&self, for_restart: bool) {
        self.handover.set_restarting(for_restart);
    }

    fn unsettle(&self) {
        self.handover.set_restarting(false);
    }

    fn listeners(&self) -> Vec<(String, RawFd)> {
        self.handover.parked()
    }
}

pub(crate) fn eventfd() -> Result<OwnedFd> {
    use nix::sys::eventfd::{EfdFlags, EventFd};
    let fd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .map_err(|e| Error::io("creating an eventfd", e.into()))?;
    Ok(OwnedFd::from(fd))
}

pub(super) fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}
