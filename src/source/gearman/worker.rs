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
//! that connection is dropped (gearmand requeues whatever it may have assigned). CANT_DO /
//! RESET_ABILITIES are never sent (gearmand would requeue a held job). Before a lane is
//! dropped, an ECHO round trip (bounded) proves every result it wrote has been processed.
//!
//! The result of a job is queued, and written together with the next GRAB_JOB_UNIQ in one
//! write: one syscall and one round trip per job.

use crate::shutdown::Shutdown;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::connection::{Conn, OwnedPacket};
use super::protocol::{self as p, Packet};
use super::tls::TlsTarget;
use crate::config::GearmanConfig;
use crate::error::{Error, Result};
use crate::jobs::functions::{JobResult, Progress};
use crate::source::lane::{Claimed, Lane};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// A connection silent for this long gets an ECHO round trip to prove it is alive.
const IDLE_CHECK: Duration = Duration::from_secs(60);
/// After a stop is asked, how long an unanswered GRAB may still hold the lane.
const STOP_GRACE: Duration = Duration::from_secs(1);

/// Each server's connection state, per lane, for `status` (written by the lanes).
pub use crate::status::ServerViews as Views;

/// The configured Gearman servers, shared by this generation's lanes.
pub struct GearmanSource {
    cfg: GearmanConfig,
    /// Per configured server: where to connect, and TLS for a `tls://` one.
    targets: Vec<(String, Option<TlsTarget>)>,
    generation: u64,
    wakers: Mutex<Vec<Weak<OwnedFd>>>,
    views: Views,
}

impl GearmanSource {
    /// The configured servers (reading `[source.tls]` files once); lanes connect lazily.
    pub fn open(cfg: &GearmanConfig, generation: u64, views: Views) -> Result<GearmanSource> {
        Ok(GearmanSource {
            targets: super::tls::targets(&cfg.servers, cfg.tls.as_ref())?,
            cfg: cfg.clone(),
            generation,
            wakers: Mutex::new(Vec::new()),
            views,
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
                phase: Phase::Down,
                deadline: None,
                backoff: BACKOFF_MIN,
                retry_at: Instant::now(),
                last_io: Instant::now(),
                echo_out: false,
                failures: 0,
                logged: String::new(),
            })
            .collect();
        let lane = GearmanLane {
            servers,
            functions: functions.to_vec(),
            client_id,
            exceptions: self.cfg.exceptions,
            max_packet: self.cfg.max_packet_bytes,
            io_timeout: self.cfg.io_timeout,
            reconnect_max: self.cfg.reconnect_max,
            dead_peer: self.cfg.dead_peer_timeout,
            wake,
            job_server: None,
            handle: Vec::new(),
            next_server: index,
            index,
            views: Arc::clone(&self.views),
        };
        for s in &lane.servers {
            lane.view(s, "connecting", None);
        }
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

/// Gearman as the worker sees every source: the servers keep the queue, nothing is watched or
/// handed over.
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
}

/// Where one connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
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

struct Server {
    /// As configured (`tls://` kept): the name in status and the log.
    addr: String,
    /// `host:port` to connect to.
    target: String,
    tls: Option<TlsTarget>,
    conn: Option<Conn>,
    phase: Phase,
    /// When the exchange under way must be answered (connect, handshake, GRAB, ECHO, write).
    deadline: Option<Instant>,
    backoff: Duration,
    retry_at: Instant,
    last_io: Instant,
    /// An idle-check ECHO is outstanding.
    echo_out: bool,
    /// Connection failures in a row.
    failures: u64,
    /// The last failure logged: the same failure again is only counted (it is in `status`).
    logged: String,
}

struct GearmanLane {
    servers: Vec<Server>,
    functions: Vec<(String, Option<Duration>)>,
    client_id: String,
    exceptions: bool,
    max_packet: usize,
    io_timeout: Duration,
    reconnect_max: Duration,
    dead_peer: Duration,
    wake: Arc<OwnedFd>,
    /// Server of the job in hand (or whose result is queued), if any.
    job_server: Option<usize>,
    /// Handle of the job in hand, for progress packets.
    handle: Vec<u8>,
    next_server: usize,
    index: usize,
    views: Views,
}

/// The CAN_DO_TIMEOUT to advertise for a local timeout: later than the local kill, so the
/// worker's WORK_FAIL reaches gearmand before gearmand's own timer could requeue the job (which
/// would run it again). None: too long for gearmand's millisecond field; plain CAN_DO.
pub fn server_timeout_ms(local: Duration) -> Option<u64> {
    let margin = (local / 2).max(Duration::from_secs(5));
    let ms = (local + margin).as_millis().max(1000);
    u64::try_from(ms).ok().filter(|ms| *ms <= i32::MAX as u64)
}

impl GearmanLane {
    fn view(&self, s: &Server, state: &'static str, error: Option<String>) {
        let Ok(mut views) = self.views.lock() else {
            return;
        };
        let v = views
            .entry(s.addr.clone())
            .or_default()
            .entry(self.index)
            .or_default();
        if v.state != state {
            v.state = state;
            v.since_ms = crate::clock::now_ms();
        }
        if let Some(e) = error {
            v.last_error = Some(e);
            v.last_error_ms = crate::clock::now_ms();
        }
    }

    fn count_reconnect(&self, s: &Server) {
        if let Ok(mut views) = self.views.lock() {
            views
                .entry(s.addr.clone())
                .or_default()
                .entry(self.index)
                .or_default()
                .reconnects += 1;
        }
    }

    /// Drops server `i`'s connection and schedules a reconnect with exponential backoff and
    /// jitter. The backoff resets only after a healthy exchange on a new connection.
    fn fail(&mut self, i: usize, why: &str) {
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
        let jitter = 0.75 + 0.5 * (jitter_seed() as f64 / u64::MAX as f64);
        s.retry_at = Instant::now() + s.backoff.mul_f64(jitter);
        s.backoff = (s.backoff * 2).min(self.reconnect_max);
        if self.job_server == Some(i) {
            self.job_server = None;
        }
        let s = &self.servers[i];
        self.view(s, "backing off", Some(why.to_string()));
    }

    /// Starts connects for servers whose retry time has come.
    fn connect_due(&mut self) {
        let now = Instant::now();
        for i in 0..self.servers.len() {
            let s = &self.servers[i];
            if s.phase != Phase::Down || s.retry_at > now {
                continue;
            }
            if s.failures > 0 {
                self.count_reconnect(s);
            }
            let started = Conn::start(&s.target, p::RES, self.max_packet, s.tls.as_ref())
                .and_then(|c| c.detect_dead_peer(self.dead_peer).map(|()| c));
            match started {
                Ok(conn) => {
                    let io = self.io_timeout;
                    let s = &mut self.servers[i];
                    s.conn = Some(conn);
                    s.phase = Phase::Connecting;
                    s.deadline = Some(now + io);
                    let s = &self.servers[i];
                    self.view(s, "connecting", None);
                }
                Err(e) => self.fail(i, &format!("cannot connect: {e}")),
            }
        }
    }

    /// The connect finished: register and ask for the ECHO that proves the server healthy.
    fn handshake(&mut self, i: usize) {
        let io = self.io_timeout;
        let s = &mut self.servers[i];
        let Some(conn) = s.conn.as_mut() else { return };
        if let Err(e) = conn.connected() {
            return self.fail(i, &format!("cannot connect: {e}"));
        }
        conn.queue(p::SET_CLIENT_ID, &[self.client_id.as_bytes()]);
        for (name, timeout) in &self.functions {
            match timeout.and_then(server_timeout_ms) {
                // gearmand (>= 1.1.19) takes milliseconds, with a floor of 1000.
                Some(ms) => {
                    let ms = ms.to_string();
                    conn.queue(p::CAN_DO_TIMEOUT, &[name.as_bytes(), ms.as_bytes()]);
                }
                None => conn.queue(p::CAN_DO, &[name.as_bytes()]),
            }
        }
        if self.exceptions {
            conn.queue(p::OPTION_REQ, &[b"exceptions"]);
        }
        conn.queue(p::ECHO_REQ, &[b"gearshift-hello"]);
        s.phase = Phase::Handshake;
        s.deadline = Some(Instant::now() + io);
        self.flush(i);
    }

    /// Writes what the socket takes; a pending write gets a deadline.
    fn flush(&mut self, i: usize) {
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

    /// Queues a GRAB on the next awake server (round robin, `first` preferred).
    fn grab_next(&mut self, first: Option<usize>) -> bool {
        let n = self.servers.len();
        let start = first.unwrap_or(self.next_server % n.max(1));
        for k in 0..n {
            let i = (start + k) % n;
            if self.servers[i].phase == (Phase::Idle { awake: true }) {
                let io = self.io_timeout;
                let s = &mut self.servers[i];
                if let Some(conn) = s.conn.as_mut() {
                    conn.queue(p::GRAB_JOB_UNIQ, &[]);
                    s.phase = Phase::Grabbing;
                    s.deadline = Some(Instant::now() + io);
                    self.next_server = i.wrapping_add(1);
                    self.flush(i);
                    return true;
                }
            }
        }
        false
    }

    /// Handles one packet from server `i`; Some(job) when a job was assigned.
    fn on_packet(
        &mut self,
        i: usize,
        pkt: OwnedPacket,
    ) -> std::result::Result<Option<Claimed>, String> {
        let s = &mut self.servers[i];
        s.last_io = Instant::now();
        match (s.phase, pkt.kind) {
            (Phase::Handshake, p::ECHO_RES) => {
                s.phase = Phase::Idle { awake: true };
                s.deadline = None;
                s.backoff = BACKOFF_MIN;
                s.failures = 0;
                log::info!("gearman {}: connected as {}", s.addr, self.client_id);
                let s = &self.servers[i];
                self.view(s, "connected", None);
                Ok(None)
            }
            (Phase::Grabbing, p::NO_JOB) => {
                s.deadline = None;
                s.phase = Phase::Idle { awake: false };
                if let Some(conn) = s.conn.as_mut() {
                    conn.queue(p::PRE_SLEEP, &[]);
                }
                self.flush(i);
                Ok(None)
            }
            (Phase::Grabbing, p::JOB_ASSIGN_UNIQ) => {
                s.deadline = None;
                s.phase = Phase::Idle { awake: true };
                let job = assignment(pkt, &mut self.handle)?;
                self.job_server = Some(i);
                Ok(Some(job))
            }
            (Phase::Idle { .. }, p::NOOP) => {
                s.phase = Phase::Idle { awake: true };
                Ok(None)
            }
            (_, p::NOOP) | (_, p::OPTION_RES) => Ok(None),
            (_, p::ECHO_RES) => {
                s.echo_out = false;
                if s.phase == (Phase::Idle { awake: false }) {
                    // The ECHO may have crossed a NOOP; sleeping again re-arms the server.
                    if let Some(conn) = s.conn.as_mut() {
                        conn.queue(p::PRE_SLEEP, &[]);
                    }
                    self.flush(i);
                }
                Ok(None)
            }
            (_, kind) => note_async(&s.addr, kind, &pkt.data).map(|()| None),
        }
    }

    /// One round of the poll loop: waits (until the nearest deadline or timer, or `until`),
    /// then handles what happened. Returns a job if one was assigned.
    fn turn(&mut self, until: Option<Instant>) -> Option<Claimed> {
        let now = Instant::now();
        let mut wake_at = until;
        let mut earliest = |t: Instant| wake_at = Some(wake_at.map_or(t, |w: Instant| w.min(t)));
        for s in &self.servers {
            match s.phase {
                Phase::Down => earliest(s.retry_at),
                _ => {
                    if let Some(d) = s.deadline {
                        earliest(d);
                    }
                    if matches!(s.phase, Phase::Idle { .. }) && !s.echo_out {
                        earliest(s.last_io + IDLE_CHECK);
                    }
                }
            }
        }
        let timeout = match wake_at {
            None => PollTimeout::NONE,
            Some(t) => {
                let ms = t.saturating_duration_since(now).as_millis().min(60_000) as i32;
                PollTimeout::try_from(ms.max(1)).unwrap_or(PollTimeout::MAX)
            }
        };
        let open: Vec<usize> = (0..self.servers.len())
            .filter(|&i| self.servers[i].conn.is_some())
            .collect();
        let revents: Vec<PollFlags> = {
            let mut fds = vec![PollFd::new(self.wake.as_fd(), PollFlags::POLLIN)];
            for &i in &open {
                let s = &self.servers[i];
                if let Some(c) = &s.conn {
                    let mut ev = PollFlags::POLLIN;
                    if s.phase == Phase::Connecting || c.pending() {
                        ev |= PollFlags::POLLOUT;
                    }
                    fds.push(PollFd::new(c.as_fd(), ev));
                }
            }
            match poll(&mut fds, timeout) {
                Ok(_) => fds
                    .iter()
                    .map(|f| f.revents().unwrap_or(PollFlags::empty()))
                    .collect(),
                Err(_) => vec![PollFlags::empty(); fds.len()],
            }
        };
        if revents.first().is_some_and(|r| !r.is_empty()) {
            let mut buf = [0u8; 8];
            let _ = nix::unistd::read(self.wake.as_raw_fd(), &mut buf);
        }
        let mut job = None;
        for (k, &i) in open.iter().enumerate() {
            let ev = revents.get(k + 1).copied().unwrap_or(PollFlags::empty());
            if ev.is_empty() || self.servers[i].conn.is_none() {
                continue;
            }
            if self.servers[i].phase == Phase::Connecting {
                self.handshake(i);
                continue;
            }
            if ev.contains(PollFlags::POLLOUT) {
                self.flush(i);
                if let Some(s) = self.servers.get_mut(i) {
                    let writing = s.conn.as_ref().is_some_and(Conn::pending);
                    if !writing
                        && !matches!(s.phase, Phase::Handshake | Phase::Grabbing)
                        && !s.echo_out
                    {
                        s.deadline = None;
                    }
                }
            }
            if ev.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
                if let Some(j) = self.read_from(i) {
                    job = Some(j);
                }
            }
        }
        self.check_timers();
        job
    }

    /// Reads from server `i` and handles every complete packet.
    fn read_from(&mut self, i: usize) -> Option<Claimed> {
        let mut job = None;
        // TLS may hold decrypted bytes poll cannot see: read until none is left.
        while self.servers[i].conn.is_some() {
            if let Some(j) = self.read_once(i) {
                job = Some(j);
            }
            if !self.servers[i].conn.as_mut().is_some_and(Conn::buffered) {
                break;
            }
        }
        job
    }

    fn read_once(&mut self, i: usize) -> Option<Claimed> {
        let conn = self.servers[i].conn.as_mut()?;
        if let Err(e) = conn.read_some() {
            self.fail(i, &e.to_string());
            return None;
        }
        let mut job = None;
        while let Some(conn) = self.servers[i].conn.as_mut() {
            match conn.next_owned() {
                Ok(Some(pkt)) => match self.on_packet(i, pkt) {
                    Ok(Some(j)) => job = Some(j),
                    Ok(None) => {}
                    Err(why) => {
                        self.fail(i, &why);
                        break;
                    }
                },
                Ok(None) => break,
                Err(e) => {
                    self.fail(i, &e.to_string());
                    break;
                }
            }
        }
        job
    }

    /// Missed deadlines drop their connection; silent idle connections get an ECHO.
    fn check_timers(&mut self) {
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
    fn send_now(&mut self, kind: u32, args: &[&[u8]]) {
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

/// Parses JOB_ASSIGN_UNIQ (handle, function, unique, payload), moving the payload out.
fn assignment(pkt: OwnedPacket, handle: &mut Vec<u8>) -> std::result::Result<Claimed, String> {
    let oversized = pkt.oversized;
    let mut data = pkt.data;
    let mut fields = Vec::with_capacity(3);
    let mut at = 0;
    for _ in 0..3 {
        let nul = data[at..]
            .iter()
            .position(|b| *b == 0)
            .ok_or("JOB_ASSIGN_UNIQ with too few arguments")?;
        fields.push((at, at + nul));
        at += nul + 1;
    }
    let text = |(a, b): (usize, usize)| String::from_utf8_lossy(&data[a..b]).into_owned();
    handle.clear();
    handle.extend_from_slice(&data[fields[0].0..fields[0].1]);
    let (id, function, unique) = (text(fields[0]), text(fields[1]), text(fields[2]));
    // The payload is the rest: shift it down in place (no second copy of a large payload).
    data.drain(..at);
    if oversized.is_some() {
        data = Vec::new();
    }
    Ok(Claimed {
        id,
        function,
        unique,
        payload: data,
        attempt: 1,
        submitted_ms: 0,
        oversized: oversized.map(|len| len.saturating_sub(at)),
    })
}

/// Handles a packet that may arrive at any time. ERROR JOB_NOT_FOUND (a late result after a
/// CAN_DO_TIMEOUT requeue, or a result on a connection that no longer owns the job) is logged and
/// the connection kept: the server rejected one result, nothing else is wrong. Any other ERROR
/// drops the connection, which is then opened again with backoff.
fn note_async(addr: &str, kind: u32, data: &[u8]) -> std::result::Result<(), String> {
    match kind {
        p::NOOP | p::ECHO_RES | p::OPTION_RES => Ok(()),
        p::ERROR => {
            let pkt = Packet { kind, data };
            let [code, text] = pkt.args::<2>().unwrap_or([data, b""]);
            let (code, text) = (String::from_utf8_lossy(code), String::from_utf8_lossy(text));
            if code.contains("JOB_NOT_FOUND") {
                log::warn!("gearman {addr}: server rejected a result: {code}: {text}");
                Ok(())
            } else {
                Err(format!("server error {code}: {text}"))
            }
        }
        other => Err(format!(
            "unexpected {} (type {other}) from the server",
            p::name(other)
        )),
    }
}

impl Lane for GearmanLane {
    fn next(&mut self, stop: &Shutdown) -> Result<Option<Claimed>> {
        let mut first = self.job_server.take();
        let mut stop_seen: Option<Instant> = None;
        loop {
            let stopping = stop.is_set();
            if stopping {
                let since = *stop_seen.get_or_insert_with(Instant::now);
                let grabbing: Vec<usize> = (0..self.servers.len())
                    .filter(|&i| self.servers[i].phase == Phase::Grabbing)
                    .collect();
                if grabbing.is_empty() {
                    return Ok(None);
                }
                if since.elapsed() >= STOP_GRACE {
                    for i in grabbing {
                        self.fail(i, "no answer to GRAB_JOB within a second of a stop");
                    }
                    return Ok(None);
                }
                if let Some(job) = self.turn(Some(since + STOP_GRACE)) {
                    return Ok(Some(job));
                }
                continue;
            }
            self.connect_due();
            let grabbing = self.servers.iter().any(|s| s.phase == Phase::Grabbing);
            if !grabbing {
                self.grab_next(first.take());
            }
            if let Some(job) = self.turn(None) {
                return Ok(Some(job));
            }
        }
    }

    fn progress(&mut self) -> &mut dyn Progress {
        self
    }

    fn finish(&mut self, _job: &Claimed, outcome: &JobResult) -> Result<()> {
        let Some(i) = self.job_server else {
            return Err(Error::Gone(
                "gearman: the connection the job came from was lost while it ran; the server requeues it".into(),
            ));
        };
        let exceptions = self.exceptions;
        let s = &mut self.servers[i];
        let Some(conn) = s.conn.as_mut() else {
            return Err(Error::Gone(format!(
                "gearman {}: connection lost while the job ran; the server requeues it",
                s.addr
            )));
        };
        match outcome {
            Ok(result) => conn.queue(p::WORK_COMPLETE, &[&self.handle, result]),
            Err(e) => {
                if exceptions {
                    // The text goes out as WORK_WARNING, then WORK_FAIL ends the job for every
                    // client. Not WORK_EXCEPTION: gearmand 1.1.20 ends the job on it, sends
                    // clients that did not ask for exceptions a WORK_FAIL they do not match
                    // (the stock CLI hangs), and rejects a WORK_FAIL after it (measured; see
                    // README "The Gearman source").
                    conn.queue(p::WORK_WARNING, &[&self.handle, e.message.as_bytes()]);
                }
                conn.queue(p::WORK_FAIL, &[&self.handle]);
            }
        }
        // Written with the next GRAB_JOB_UNIQ (or at close); see the module docs.
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        // Bounded: one ECHO round trip on each healthy connection proves our results arrived.
        let deadline = Instant::now() + STOP_GRACE.min(self.io_timeout);
        for i in 0..self.servers.len() {
            let s = &mut self.servers[i];
            if matches!(s.phase, Phase::Idle { .. }) {
                if let Some(conn) = s.conn.as_mut() {
                    conn.queue(p::ECHO_REQ, &[b"gearshift-bye"]);
                    s.echo_out = true;
                    s.deadline = Some(deadline);
                }
                self.flush(i);
            }
        }
        while self.servers.iter().any(|s| s.echo_out && s.conn.is_some())
            && Instant::now() < deadline
        {
            let _ = self.turn(Some(deadline));
        }
        for s in &self.servers {
            if s.echo_out && s.conn.is_some() {
                log::warn!(
                    "gearman {}: no ECHO before closing; results may not have reached it",
                    s.addr
                );
            }
        }
        for s in &mut self.servers {
            s.conn = None;
            s.phase = Phase::Down;
        }
        Ok(())
    }
}

impl Progress for GearmanLane {
    fn status(&mut self, numerator: u64, denominator: u64) {
        let (n, d) = (numerator.to_string(), denominator.to_string());
        self.send_now(p::WORK_STATUS, &[n.as_bytes(), d.as_bytes()]);
    }
    fn data(&mut self, data: &[u8]) {
        self.send_now(p::WORK_DATA, &[data]);
    }
    fn warning(&mut self, data: &[u8]) {
        self.send_now(p::WORK_WARNING, &[data]);
    }
}

fn eventfd() -> Result<OwnedFd> {
    use nix::sys::eventfd::{EfdFlags, EventFd};
    let fd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
        .map_err(|e| Error::io("creating an eventfd", e.into()))?;
    Ok(OwnedFd::from(fd))
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// A cheap, varying number for backoff jitter (no randomness dependency needed for that).
fn jitter_seed() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0x2545_f491_4f6c_dd1d);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let mut x = STATE.fetch_add(u64::from(nanos) | 1, Ordering::Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}
