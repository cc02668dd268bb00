//! A Gearman lane's state and its servers: one non-blocking connection to each, its phase,
//! deadlines and backoff, and what `status` shows of it. Taking jobs is in `lane.rs`.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::connection::Conn;
use super::protocol as p;
use super::tls::TlsTarget;
use crate::kinds::ConnState;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

pub(super) const BACKOFF_MIN: Duration = Duration::from_millis(100);

/// A connection silent for this long gets an ECHO round trip to prove it is alive.
pub(super) const IDLE_CHECK: Duration = Duration::from_secs(60);

/// After a stop is asked, how long an unanswered GRAB may still hold the lane.
pub(super) const STOP_GRACE: Duration = Duration::from_secs(1);

/// Each server's connection state, per lane, for `status` (written by the lanes).
pub use crate::status::ServerViews as Views;

/// The CAN_DO_TIMEOUT to advertise for a local timeout: later than the local kill, so the
/// worker's WORK_FAIL reaches gearmand before gearmand's own timer could requeue the job (which
/// would run it again). None: too long for gearmand's millisecond field; plain CAN_DO.
pub fn server_timeout_ms(local: Duration) -> Option<u64> {
    let margin = (local / 2).max(Duration::from_secs(5));
    let ms = (local + margin).as_millis().max(1000);
    u64::try_from(ms).ok().filter(|ms| *ms <= i32::MAX as u64)
}

/// Queues our name and a CAN_DO (or CAN_DO_TIMEOUT) for each function.
pub(super) fn register(conn: &mut Conn, client_id: &str, functions: &[(String, Option<Duration>)]) {
    conn.queue(p::SET_CLIENT_ID, &[client_id.as_bytes()]);
    for (name, timeout) in functions {
        match timeout.and_then(server_timeout_ms) {
            // gearmand (>= 1.1.19) takes milliseconds, with a floor of 1000.
            Some(ms) => {
                let ms = ms.to_string();
                conn.queue(p::CAN_DO_TIMEOUT, &[name.as_bytes(), ms.as_bytes()]);
            }
            None => conn.queue(p::CAN_DO, &[name.as_bytes()]),
        }
    }
}

/// Where one connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// No connection; the next attempt is at `retry_at`.
    Down,
    /// A non-blocking connect is under way.
    Connecting,
    /// Registered (SET_CLIENT_ID, CAN_DO...); waiting for the ECHO that proves it healthy.
    Handshake,
    /// Healthy, nothing outstanding. `awake`: it may have work (after a NOOP, or new); else a
    /// PRE_SLEEP was sent and a NOOP is awaited.
    Idle { awake: bool },
    /// A GRAB_JOB_UNIQ is outstanding.
    Grabbing,
}

pub(super) struct Server {
    /// As configured (`tls://` kept): the name in status and the log.
    pub(super) addr: String,
    /// `host:port` to connect to.
    pub(super) target: String,
    pub(super) tls: Option<TlsTarget>,
    pub(super) conn: Option<Conn>,
    /// Its name being looked up (while `Down`), beside the lane.
    pub(super) lookup: Option<crate::source::resolve::Lookup>,
    pub(super) phase: Phase,
    /// When the exchange under way must be answered (connect, handshake, GRAB, ECHO, write).
    pub(super) deadline: Option<Instant>,
    pub(super) backoff: Duration,
    pub(super) retry_at: Instant,
    pub(super) last_io: Instant,
    /// An idle-check ECHO is outstanding.
    pub(super) echo_out: bool,
    /// Connection failures in a row.
    pub(super) failures: u64,
    /// The last failure logged: the same failure again is only counted (it is in `status`).
    pub(super) logged: String,
    /// Results it rejected (`ERROR JOB_NOT_FOUND`): said once a minute at most, however many
    /// packets say it.
    pub(super) rejected: crate::ops::logging::Recurring,
}

pub(super) struct GearmanLane {
    /// Runs that ended the worker, the limit, and the key of the job in hand.
    pub(super) attempts: Arc<std::sync::Mutex<crate::source::attempts::Attempts>>,
    pub(super) max_attempts: u32,
    pub(super) run_key: Option<String>,
    pub(super) servers: Vec<Server>,
    pub(super) functions: Vec<(String, Option<Duration>)>,
    pub(super) client_id: String,
    pub(super) exceptions: bool,
    pub(super) max_packet: usize,
    pub(super) io_timeout: Duration,
    pub(super) reconnect_max: Duration,
    pub(super) dead_peer: Duration,
    pub(super) wake: Arc<OwnedFd>,
    /// Busy-polling for a GRAB's answer (`[source] busy_poll`).
    pub(super) spin: crate::source::spin::Spin,
    /// Server of the job in hand (or whose result is queued), if any.
    pub(super) job_server: Option<usize>,
    /// Handle of the job in hand, for progress packets.
    pub(super) handle: Vec<u8>,
    pub(super) next_server: usize,
    pub(super) index: usize,
    pub(super) views: Views,
    /// Connections kept across a re-exec (`handover.rs`).
    pub(super) handover: Arc<super::handover::Handover>,
}

impl GearmanLane {
    pub(super) fn view(&self, s: &Server, state: ConnState, error: Option<String>) {
        crate::status::show_server(&self.views, &s.addr, self.index, state, error);
    }

    pub(super) fn count_reconnect(&self, s: &Server) {
        crate::status::count_reconnect(&self.views, &s.addr, self.index);
    }

    /// Drops server `i`'s connection and schedules a reconnect with exponential backoff and
    /// jitter. The backoff resets only after a healthy exchange on a new connection.
    pub(super) fn fail(&mut self, i: usize, why: &str) {
        let s = &mut self.servers[i];
        let was_up = matches!(s.phase, Phase::Idle { .. } | Phase::Grabbing);
        s.conn = None;
        s.phase = Phase::Down;
        s.deadline = None;
        s.echo_out = false;
        s.failures += 1;
        if was_up {
            log::warn!("gearman {}: {why}; reconnecting", s.addr);
        } else if s.logged != why {
            log::warn!(
                "gearman {}: {why}; retrying with backoff (up to {:?})",
                s.addr,
                self.reconnect_max
            );
        }
        s.logged.clear();
        s.logged.push_str(why);
        let jitter = 0.75 + 0.5 * crate::clock::random_fraction();
        s.retry_at = Instant::now() + s.backoff.mul_f64(jitter);
        s.backoff = (s.backoff * 2).min(self.reconnect_max);
        if self.job_server == Some(i) {
            self.job_server = None;
        }
        let s = &self.servers[i];
        self.view(s, ConnState::BackingOff, Some(why.to_string()));
    }

    /// Starts connects for servers whose retry time has come.
    pub(super) fn connect_due(&mut self) {
        let now = Instant::now();
        for i in 0..self.servers.len() {
            let s = &self.servers[i];
            if s.phase != Phase::Down || s.retry_at > now {
                continue;
            }
            // An attempt begins (and is counted, once) with its lookup, or its connect.
            if s.failures > 0 && s.lookup.is_none() {
                self.count_reconnect(s);
            }
            let sa = match self.address_of(i) {
                None => continue,
                Some(Ok(sa)) => sa,
                Some(Err(e)) => {
                    self.fail(i, &format!("cannot connect: {e}"));
                    continue;
                }
            };
            let s = &self.servers[i];
            let started = Conn::start(sa, p::RES, self.max_packet, s.tls.as_ref())
                .and_then(|c| c.detect_dead_peer(self.dead_peer).map(|()| c));
            match started {
                Ok(conn) => {
                    let io = self.io_timeout;
                    let s = &mut self.servers[i];
                    s.conn = Some(conn);
                    s.phase = Phase::Connecting;
                    s.deadline = Some(now + io);
                    let s = &self.servers[i];
                    self.view(s, ConnState::Connecting, None);
                }
                Err(e) => self.fail(i, &format!("cannot connect: {e}")),
            }
        }
    }

    /// Server `i`'s address: at once if it is written as one, else from a lookup beside the
    /// lane (None while it runs; one is started if none is), which wakes the lane when done.
    fn address_of(&mut self, i: usize) -> Option<std::io::Result<std::net::SocketAddr>> {
        use crate::source::resolve::{literal, Lookup};
        let s = &mut self.servers[i];
        if let Some(sa) = literal(&s.target) {
            return Some(Ok(sa));
        }
        match &s.lookup {
            Some(l) => {
                let answer = l.answer()?;
                s.lookup = None;
                Some(answer)
            }
            None => match Lookup::start(&s.target, Arc::clone(&self.wake)) {
                Ok(l) => {
                    s.lookup = Some(l);
                    None
                }
                Err(e) => Some(Err(e)),
            },
        }
    }

    /// The connect finished: register and ask for the ECHO that proves the server healthy.
    pub(super) fn handshake(&mut self, i: usize) {
        let io = self.io_timeout;
        let s = &mut self.servers[i];
        let Some(conn) = s.conn.as_mut() else { return };
        if let Err(e) = conn.connected() {
            return self.fail(i, &format!("cannot connect: {e}"));
        }
        register(conn, &self.client_id, &self.functions);
        if self.exceptions {
            conn.queue(p::OPTION_REQ, &[b"exceptions"]);
        }
        conn.queue(p::ECHO_REQ, &[b"gearshift-hello"]);
        s.phase = Phase::Handshake;
        s.deadline = Some(Instant::now() + io);
        self.flush(i);
    }

    /// Writes what the socket takes; a pending write gets a deadline.
    pub(super) fn flush(&mut self, i: usize) {
        let io = self.io_timeout;
        let s = &mut self.servers[i];
        let Some(conn) = s.conn.as_mut() else { return };
        match conn.flush_some() {
            Ok(true) => {}
            Ok(false) => {
                s.deadline.get_or_insert(Instant::now() + io);
            }
            Err(e) => self.fail(i, &e.to_string()),
        }
    }

    /// Missed deadlines drop their connection; silent idle connections get an ECHO.
    pub(super) fn check_timers(&mut self) {
        let now = Instant::now();
        for i in 0..self.servers.len() {
            let s = &self.servers[i];
            if s.phase == Phase::Down {
                continue;
            }
            if let Some(d) = s.deadline.filter(|d| *d <= now) {
                let what = match s.phase {
                    Phase::Connecting => "connecting",
                    Phase::Handshake => "the handshake",
                    Phase::Grabbing => "an answer to GRAB_JOB",
                    _ if s.echo_out => "an answer to ECHO",
                    _ => "the server to read what we sent",
                };
                let waited = self.io_timeout + now.saturating_duration_since(d);
                self.fail(
                    i,
                    &format!(
                        "timed out after {:.1}s waiting for {what} (io_timeout)",
                        waited.as_secs_f64()
                    ),
                );
                continue;
            }
            if matches!(s.phase, Phase::Idle { .. }) && !s.echo_out && s.last_io + IDLE_CHECK <= now
            {
                let io = self.io_timeout;
                let s = &mut self.servers[i];
                if let Some(conn) = s.conn.as_mut() {
                    conn.queue(p::ECHO_REQ, &[b"gearshift"]);
                    s.echo_out = true;
                    s.deadline = Some(now + io);
                    s.last_io = now;
                }
                self.flush(i);
            }
        }
    }

    /// Writes a packet for the job in hand on its server's connection, now (bounded by
    /// io_timeout: a server that does not read drops its connection, not the job).
    pub(super) fn send_now(&mut self, kind: u32, args: &[&[u8]]) {
        let Some(i) = self.job_server else { return };
        let io = self.io_timeout;
        let s = &mut self.servers[i];
        let Some(conn) = s.conn.as_mut() else { return };
        let mut full: Vec<&[u8]> = Vec::with_capacity(args.len() + 1);
        full.push(&self.handle);
        full.extend_from_slice(args);
        conn.queue(kind, &full);
        let deadline = Instant::now() + io;
        loop {
            let Some(conn) = self.servers[i].conn.as_mut() else {
                return;
            };
            match conn.flush_some() {
                Ok(true) => return,
                Ok(false) if Instant::now() < deadline => {
                    let mut fds = [PollFd::new(conn.as_fd(), PollFlags::POLLOUT)];
                    let _ = poll(&mut fds, PollTimeout::from(100u8));
                }
                Ok(false) => return self.fail(i, "timed out writing progress (io_timeout)"),
                Err(e) => return self.fail(i, &e.to_string()),
            }
        }
    }
}

impl GearmanLane {
    /// A job as it is run: marked as running (see [`crate::source::attempts`]), or failed unrun
    /// if its runs have ended the worker `max_attempts` times (gearmand gives a job back each
    /// time its worker dies, for ever unless it runs with `-j`).
    pub(super) fn marked(
        &mut self,
        mut job: crate::source::lane::Claimed,
    ) -> crate::source::lane::Claimed {
        let server = self
            .job_server
            .map_or("", |i| self.servers[i].addr.as_str());
        let key = crate::source::attempts::key(&[server.as_bytes(), &self.handle]);
        if let Ok(mut attempts) = self.attempts.lock() {
            let cut = attempts.interrupted(&key);
            if job.unrun.is_none() && cut >= self.max_attempts {
                job.unrun = Some(format!(
                    "its last {cut} run(s) ended the worker (max_attempts = {}): failed unrun",
                    self.max_attempts
                ));
            }
            if job.unrun.is_none() {
                attempts.running(self.index, Some(&key));
            }
        }
        self.run_key = Some(key);
        job
    }

    /// The job in hand ended, and the worker lived through it.
    pub(super) fn run_ended(&mut self) {
        if let (Some(key), Ok(mut attempts)) = (self.run_key.take(), self.attempts.lock()) {
            attempts.running(self.index, None);
            attempts.ended(&key);
        }
    }
}
