//! The ROUTER socket's listening endpoints: bound through duplicates of our listening sockets
//! (`ZMQ_USE_FD`), and paused while accepts fail for want of descriptors.
//!
//! libzmq retries an accept that failed with `EMFILE` at once, for as long as a client waits
//! in the backlog (a to-do in its source): 100% of a CPU, and as many failure events for the
//! monitor. Closing such clients through a descriptor kept in reserve was tried and lost the
//! race to libzmq's own accept. So once accepts have failed for [`FAILING_FOR`], the endpoints
//! are unbound (libzmq stops polling them; this drops the clients connected through them, which
//! reconnect) and bound again after a pause, 0.25 s doubling to 5 s while it lasts. Our own
//! listening sockets stay open all along: a client connecting meanwhile waits in the kernel's
//! backlog, as during a restart.

use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::listen::{dup_for_zmq, Listener};
use crate::error::{Error, Result};
use crate::ops::logging::Recurring;

/// How long accepts must keep failing before the endpoints are paused (a job ending frees
/// descriptors within that, as a rule).
const FAILING_FOR: Duration = Duration::from_millis(100);
/// Failures further apart than this are not one run of them (libzmq's retries come
/// microseconds apart): a failure now and another one minutes later pause nothing.
const FAILING_GAP: Duration = Duration::from_millis(20);
/// The first pause, and the longest.
const FIRST_PAUSE: Duration = Duration::from_millis(250);
const LONGEST_PAUSE: Duration = Duration::from_secs(5);

/// The listening endpoints of the ROUTER socket.
pub(super) struct Doors {
    /// Our listening sockets (duplicates, closed with this) and their configured endpoints.
    listeners: Vec<(OwnedFd, String)>,
    /// The endpoints as libzmq names them once bound (to unbind them).
    bound: Vec<String>,
    /// Accepts failing for want of descriptors, without a pause between them.
    failing: Run,
    /// Unbound until then.
    paused_until: Option<Instant>,
    pause: Duration,
    said: Recurring,
}

impl Doors {
    pub(super) fn new(listeners: &[Listener]) -> Result<Doors> {
        let listeners = listeners
            .iter()
            .map(|l| {
                l.fd.try_clone()
                    .map(|fd| (fd, l.endpoint.to_string()))
                    .map_err(|e| Error::io("duplicating a listening socket", e))
            })
            .collect::<Result<_>>()?;
        Ok(Doors {
            listeners,
            bound: Vec::new(),
            failing: Run::default(),
            paused_until: None,
            pause: FIRST_PAUSE,
            said: Recurring::new(
                "zeromq: cannot accept clients; not listening for a while (connected clients \
                 were dropped and reconnect; new ones wait)",
                "zeromq: accepting clients again",
            ),
        })
    }

    /// Binds `socket` on every listening socket, through a duplicate libzmq owns.
    pub(super) fn open(&mut self, socket: &mut zmq::Socket) -> Result<()> {
        for (fd, endpoint) in &self.listeners {
            let dup = dup_for_zmq(fd)?;
            let value: libc::c_int = dup;
            // SAFETY: the socket pointer is live (the caller owns `socket`); ZMQ_USE_FD takes
            // an int, passed by pointer with its size, read before the call returns.
            let rc = unsafe {
                zmq_sys::zmq_setsockopt(
                    socket.as_mut_ptr(),
                    zmq_sys::ZMQ_USE_FD as libc::c_int,
                    std::ptr::from_ref(&value).cast(),
                    std::mem::size_of::<libc::c_int>(),
                )
            };
            if rc != 0 {
                let _ = nix::unistd::close(dup);
                return Err(Error::Msg(format!(
                    "zeromq: ZMQ_USE_FD for {endpoint}: {}",
                    std::io::Error::last_os_error()
                )));
            }
            socket
                .bind(endpoint)
                .map_err(|e| Error::Msg(format!("zeromq: binding {endpoint}: {e}")))?;
            let last = socket.get_last_endpoint().ok().and_then(Result::ok);
            self.bound.push(last.unwrap_or_else(|| endpoint.clone()));
        }
        Ok(())
    }

    /// libzmq could not accept a client (`errno`): past [`FAILING_FOR`] of failures for want
    /// of descriptors, the endpoints are paused.
    pub(super) fn accept_failed(&mut self, socket: &zmq::Socket, errno: i32) {
        let e = Errno::from_raw(errno);
        if !matches!(
            e,
            Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM
        ) || self.paused_until.is_some()
        {
            return;
        }
        if !self.failing.lasted(Instant::now(), FAILING_FOR) {
            return;
        }
        self.said.failed(&e);
        for endpoint in std::mem::take(&mut self.bound) {
            if let Err(e) = socket.unbind(&endpoint) {
                log::warn!("zeromq: unbinding {endpoint}: {e}");
            }
        }
        self.failing = Run::default();
        self.paused_until = Some(Instant::now() + self.pause);
        self.pause = (self.pause * 2).min(LONGEST_PAUSE);
    }

    /// A client was accepted: accepts work.
    pub(super) fn accepted(&mut self) {
        self.failing = Run::default();
        self.pause = FIRST_PAUSE;
        self.said.worked();
    }

    /// Binds again once a pause is over; returns how long until then (None: not paused).
    pub(super) fn tick(&mut self, socket: &mut zmq::Socket) -> Option<Duration> {
        let until = self.paused_until?;
        let now = Instant::now();
        if now < until {
            return Some(until - now);
        }
        self.paused_until = None;
        if let Err(e) = self.open(socket) {
            // Out of descriptors still (for the duplicate): paused again.
            log::debug!("{e}");
            for endpoint in std::mem::take(&mut self.bound) {
                let _ = socket.unbind(&endpoint);
            }
            self.paused_until = Some(now + self.pause);
            self.pause = (self.pause * 2).min(LONGEST_PAUSE);
            return Some(self.pause);
        }
        None
    }
}

/// A run of events each at most [`FAILING_GAP`] after the one before.
#[derive(Default)]
struct Run {
    /// When the run began, and its last event.
    span: Option<(Instant, Instant)>,
}

impl Run {
    /// One more event at `now`: whether the run it belongs to has lasted `long`.
    fn lasted(&mut self, now: Instant, long: Duration) -> bool {
        let began = match self.span {
            Some((began, last)) if now.saturating_duration_since(last) <= FAILING_GAP => began,
            _ => now,
        };
        self.span = Some((began, now));
        now.saturating_duration_since(began) >= long
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_run_of_failures_pauses_the_endpoints() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let mut run = Run::default();
        // Every 1 ms for 100 ms: a run.
        assert!((0..100).all(|i| !run.lasted(ms(i), FAILING_FOR)));
        assert!(run.lasted(ms(100), FAILING_FOR));
        // Two failures minutes apart are no run.
        let mut run = Run::default();
        assert!(!run.lasted(ms(0), FAILING_FOR));
        assert!(!run.lasted(ms(120_000), FAILING_FOR));
        // A gap over FAILING_GAP starts a new run.
        let mut run = Run::default();
        assert!((0..60).all(|i| !run.lasted(ms(i), FAILING_FOR)));
        assert!((90..189).all(|i| !run.lasted(ms(i), FAILING_FOR)));
        assert!(run.lasted(ms(190), FAILING_FOR));
    }
}
