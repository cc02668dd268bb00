//! The Gearman worker side: each lane keeps one connection per server and takes jobs from any.
//!
//! Safe points (where a lane holds no job and nothing is outstanding) are exactly: after a
//! result was written and before the next GRAB_JOB_UNIQ, and while asleep after PRE_SLEEP. The
//! lane checks its stop flag only there. A GRAB is always answered (NO_JOB or JOB_ASSIGN_UNIQ)
//! before the lane looks at the flag again, so no GRAB is ever left outstanding, and CANT_DO /
//! RESET_ABILITIES are never sent (gearmand would requeue a held job). Before a lane is
//! dropped, an ECHO round trip proves every result it wrote has been processed by the server.
//!
//! The result of a job is queued, and written together with the next GRAB_JOB_UNIQ in one
//! write: one syscall and one round trip per job.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::connection::{Conn, ConnError};
use super::protocol::{self as p, Packet};
use crate::config::GearmanConfig;
use crate::error::{Error, Result};
use crate::functions::{JobResult, Progress};
use crate::source::{Claimed, Lane};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A connection silent for this long gets an ECHO round trip to prove it is alive.
const IDLE_CHECK: Duration = Duration::from_secs(60);

/// The configured Gearman servers, shared by this generation's lanes.
pub struct GearmanSource {
    cfg: GearmanConfig,
    generation: u64,
    wakers: Mutex<Vec<Weak<OwnedFd>>>,
}

impl GearmanSource {
    pub fn new(cfg: &GearmanConfig, generation: u64) -> GearmanSource {
        GearmanSource {
            cfg: cfg.clone(),
            generation,
            wakers: Mutex::new(Vec::new()),
        }
    }

    /// A lane for worker thread `index`, registering `functions` (name, timeout) on each server.
    pub fn lane(
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
            .map(|addr| Server {
                addr: addr.clone(),
                conn: None,
                backoff: BACKOFF_MIN,
                retry_at: Instant::now(),
                last_io: Instant::now(),
            })
            .collect();
        Ok(Box::new(GearmanLane {
            servers,
            functions: functions.to_vec(),
            client_id,
            exceptions: self.cfg.exceptions,
            max_packet: self.cfg.max_packet_bytes,
            wake,
            job_server: None,
            handle: Vec::new(),
            next_server: index,
        }))
    }

    /// Wakes every sleeping lane.
    pub fn wake(&self) {
        if let Ok(w) = self.wakers.lock() {
            for fd in w.iter().filter_map(Weak::upgrade) {
                let one = 1u64.to_ne_bytes();
                let _ = nix::unistd::write(fd.as_fd(), &one);
            }
        }
    }
}

struct Server {
    addr: String,
    conn: Option<Conn>,
    backoff: Duration,
    retry_at: Instant,
    last_io: Instant,
}

impl Server {
    /// Drops the connection and schedules a reconnect with exponential backoff and jitter.
    fn fail(&mut self, why: &ConnError) {
        if self.conn.take().is_some() {
            log::warn!("gearman {}: {why}; reconnecting", self.addr);
        }
        let jitter = 0.75 + 0.5 * (jitter_seed() as f64 / u64::MAX as f64);
        self.retry_at = Instant::now() + self.backoff.mul_f64(jitter);
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }
}

struct GearmanLane {
    servers: Vec<Server>,
    functions: Vec<(String, Option<Duration>)>,
    client_id: String,
    exceptions: bool,
    max_packet: usize,
    wake: Arc<OwnedFd>,
    /// Server of the job in hand (or whose result is queued), if any.
    job_server: Option<usize>,
    /// Handle of the job in hand, for progress packets.
    handle: Vec<u8>,
    next_server: usize,
}

/// What a GRAB got.
enum Grab {
    Job(Claimed),
    NoJob,
}

impl GearmanLane {
    /// (Re)connects servers whose retry time has come: SET_CLIENT_ID, CAN_DO or CAN_DO_TIMEOUT for
    /// every function, OPTION_REQ exceptions when configured.
    fn connect_due(&mut self) {
        let now = Instant::now();
        for s in self
            .servers
            .iter_mut()
            .filter(|s| s.conn.is_none() && s.retry_at <= now)
        {
            let mut conn = match Conn::connect(&s.addr, CONNECT_TIMEOUT, p::RES, self.max_packet) {
                Ok(c) => c,
                Err(e) => {
                    let first = s.backoff == BACKOFF_MIN;
                    s.fail(&ConnError::Io(e));
                    if first {
                        log::warn!("gearman {}: cannot connect; retrying with backoff", s.addr);
                    }
                    continue;
                }
            };
            conn.queue(p::SET_CLIENT_ID, &[self.client_id.as_bytes()]);
            for (name, timeout) in &self.functions {
                match timeout {
                    // gearmand (>= 1.1.19) takes milliseconds, with a floor of 1000.
                    Some(t) => {
                        let ms = t.as_millis().max(1000).to_string();
                        conn.queue(p::CAN_DO_TIMEOUT, &[name.as_bytes(), ms.as_bytes()]);
                    }
                    None => conn.queue(p::CAN_DO, &[name.as_bytes()]),
                }
            }
            if self.exceptions {
                conn.queue(p::OPTION_REQ, &[b"exceptions"]);
            }
            match conn.flush() {
                Ok(()) => {
                    log::info!("gearman {}: connected as {}", s.addr, self.client_id);
                    s.conn = Some(conn);
                    s.backoff = BACKOFF_MIN;
                    s.last_io = Instant::now();
                }
                Err(e) => s.fail(&e),
            }
        }
    }

    /// Sends GRAB_JOB_UNIQ (after any queued result) and reads the answer.
    fn grab(&mut self, i: usize) -> std::result::Result<Grab, ConnError> {
        let s = &mut self.servers[i];
        let Some(conn) = s.conn.as_mut() else {
            return Ok(Grab::NoJob);
        };
        conn.queue(p::GRAB_JOB_UNIQ, &[]);
        conn.flush()?;
        s.last_io = Instant::now();
        loop {
            let pkt = conn.recv()?;
            match pkt.kind {
                p::NO_JOB => return Ok(Grab::NoJob),
                p::JOB_ASSIGN_UNIQ => {
                    let [handle, function, unique, payload] = pkt.args::<4>().ok_or_else(|| {
                        ConnError::Unexpected("JOB_ASSIGN_UNIQ with too few arguments".into())
                    })?;
                    self.handle.clear();
                    self.handle.extend_from_slice(handle);
                    return Ok(Grab::Job(Claimed {
                        id: String::from_utf8_lossy(handle).into_owned(),
                        function: String::from_utf8_lossy(function).into_owned(),
                        unique: String::from_utf8_lossy(unique).into_owned(),
                        payload: payload.to_vec(),
                        attempt: 1,
                        submitted_ms: 0,
                    }));
                }
                other => note_async(&s.addr, other, &pkt)?,
            }
        }
    }

    /// Sends PRE_SLEEP everywhere and waits for a NOOP, the wake eventfd, or a timer
    /// (reconnect, idle check). Returns the server that sent NOOP, if any.
    fn sleep(&mut self) -> Option<usize> {
        for s in &mut self.servers {
            if let Some(conn) = s.conn.as_mut() {
                conn.queue(p::PRE_SLEEP, &[]);
                if let Err(e) = conn.flush() {
                    s.fail(&e);
                }
            }
        }
        loop {
            let now = Instant::now();
            let mut until: Option<Instant> = None;
            for s in &self.servers {
                let t = if s.conn.is_some() {
                    s.last_io + IDLE_CHECK
                } else {
                    s.retry_at
                };
                until = Some(until.map_or(t, |u: Instant| u.min(t)));
            }
            let timeout = match until {
                None => PollTimeout::NONE,
                Some(t) => {
                    let ms = t.saturating_duration_since(now).as_millis().min(60_000) as i32;
                    PollTimeout::try_from(ms.max(1)).unwrap_or(PollTimeout::MAX)
                }
            };
            let connected: Vec<usize> = (0..self.servers.len())
                .filter(|&i| self.servers[i].conn.is_some())
                .collect();
            let ready: Vec<bool> = {
                let mut fds = vec![PollFd::new(self.wake.as_fd(), PollFlags::POLLIN)];
                for &i in &connected {
                    if let Some(c) = &self.servers[i].conn {
                        fds.push(PollFd::new(c.as_fd(), PollFlags::POLLIN));
                    }
                }
                match poll(&mut fds, timeout) {
                    Ok(_) => fds
                        .iter()
                        .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                        .collect(),
                    Err(_) => vec![false; fds.len()],
                }
            };
            if ready.first().copied().unwrap_or(false) {
                let mut buf = [0u8; 8];
                let _ = nix::unistd::read(self.wake.as_raw_fd(), &mut buf);
                return None;
            }
            let mut woke = None;
            for (k, &i) in connected.iter().enumerate() {
                if !ready.get(k + 1).copied().unwrap_or(false) {
                    continue;
                }
                let s = &mut self.servers[i];
                let Some(conn) = s.conn.as_mut() else {
                    continue;
                };
                s.last_io = Instant::now();
                let r = conn.fill_nonblocking().and_then(|()| {
                    while conn.has_packet() {
                        let pkt = conn.recv()?;
                        if pkt.kind == p::NOOP {
                            woke = Some(i);
                        } else {
                            note_async(&s.addr, pkt.kind, &pkt)?;
                        }
                    }
                    Ok(())
                });
                if let Err(e) = r {
                    s.fail(&e);
                }
            }
            if woke.is_some() {
                return woke;
            }
            // Timers: reconnects are due, or a silent connection needs proof of life.
            let now = Instant::now();
            if self
                .servers
                .iter()
                .any(|s| s.conn.is_none() && s.retry_at <= now)
            {
                return None;
            }
            for s in self
                .servers
                .iter_mut()
                .filter(|s| s.conn.is_some() && s.last_io + IDLE_CHECK <= now)
            {
                if let Err(e) = echo(s) {
                    s.fail(&e);
                } else if let Some(conn) = s.conn.as_mut() {
                    // The ECHO may have crossed a NOOP; sleeping again re-arms the server.
                    conn.queue(p::PRE_SLEEP, &[]);
                    if let Err(e) = conn.flush() {
                        s.fail(&e);
                    }
                }
            }
        }
    }

    /// Writes a packet for the job in hand on its server's connection, at once.
    fn send_now(&mut self, kind: u32, args: &[&[u8]]) {
        let Some(i) = self.job_server else { return };
        let s = &mut self.servers[i];
        if let Some(conn) = s.conn.as_mut() {
            let mut full: Vec<&[u8]> = Vec::with_capacity(args.len() + 1);
            full.push(&self.handle);
            full.extend_from_slice(args);
            conn.queue(kind, &full);
            if let Err(e) = conn.flush() {
                s.fail(&e);
            }
        }
    }

    fn flush_all(&mut self) {
        for s in &mut self.servers {
            if let Some(conn) = s.conn.as_mut() {
                if let Err(e) = conn.flush() {
                    s.fail(&e);
                }
            }
        }
    }
}

/// Handles a packet that may arrive at any time. ERROR JOB_NOT_FOUND (a late result after a
/// CAN_DO_TIMEOUT requeue, or a result on a connection that no longer owns the job) is logged and
/// the connection kept: the server rejected one result, nothing else is wrong. Any other ERROR
/// drops the connection, which is then opened again with backoff.
fn note_async(addr: &str, kind: u32, pkt: &Packet<'_>) -> std::result::Result<(), ConnError> {
    match kind {
        p::NOOP | p::ECHO_RES | p::OPTION_RES => Ok(()),
        p::ERROR => {
            let [code, text] = pkt.args::<2>().unwrap_or([pkt.data, b""]);
            let (code, text) = (String::from_utf8_lossy(code), String::from_utf8_lossy(text));
            if code.contains("JOB_NOT_FOUND") {
                log::warn!("gearman {addr}: server rejected a result: {code}: {text}");
                Ok(())
            } else {
                Err(ConnError::Unexpected(format!(
                    "server error {code}: {text}"
                )))
            }
        }
        other => Err(ConnError::Unexpected(format!(
            "unexpected {} (type {other}) from the server",
            p::name(other)
        ))),
    }
}

/// An ECHO round trip: proves the server has processed everything written before it.
fn echo(s: &mut Server) -> std::result::Result<(), ConnError> {
    let Some(conn) = s.conn.as_mut() else {
        return Ok(());
    };
    conn.queue(p::ECHO_REQ, &[b"gearshift"]);
    conn.flush()?;
    loop {
        let pkt = conn.recv()?;
        if pkt.kind == p::ECHO_RES {
            s.last_io = Instant::now();
            return Ok(());
        }
        note_async(&s.addr, pkt.kind, &pkt)?;
    }
}

impl Lane for GearmanLane {
    fn next(&mut self, stop: &AtomicBool) -> Result<Option<Claimed>> {
        let mut first = self.job_server.take();
        loop {
            if stop.load(Ordering::Acquire) {
                self.flush_all();
                return Ok(None);
            }
            self.connect_due();
            let n = self.servers.len();
            let start = first.take().unwrap_or(self.next_server % n.max(1));
            for k in 0..n {
                let i = (start + k) % n;
                match self.grab(i) {
                    Ok(Grab::Job(job)) => {
                        self.job_server = Some(i);
                        return Ok(Some(job));
                    }
                    Ok(Grab::NoJob) => {}
                    Err(e) => self.servers[i].fail(&e),
                }
            }
            self.next_server = self.next_server.wrapping_add(1);
            if stop.load(Ordering::Acquire) {
                continue;
            }
            first = self.sleep();
        }
    }

    fn progress(&mut self) -> &mut dyn Progress {
        self
    }

    fn finish(&mut self, _job: &Claimed, outcome: &JobResult) -> Result<()> {
        let Some(i) = self.job_server else {
            return Err(Error::Msg("gearman: a result with no job in hand".into()));
        };
        let exceptions = self.exceptions;
        let s = &mut self.servers[i];
        let Some(conn) = s.conn.as_mut() else {
            return Err(Error::Msg(format!(
                "gearman {}: connection lost while the job ran; the server requeues it",
                s.addr
            )));
        };
        match outcome {
            Ok(result) => conn.queue(p::WORK_COMPLETE, &[&self.handle, result]),
            Err(e) if exceptions => {
                conn.queue(p::WORK_EXCEPTION, &[&self.handle, e.message.as_bytes()])
            }
            Err(_) => conn.queue(p::WORK_FAIL, &[&self.handle]),
        }
        // Written with the next GRAB_JOB_UNIQ (or at close); see the module docs.
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        for s in &mut self.servers {
            if s.conn.is_some() {
                if let Err(e) = echo(s) {
                    log::warn!(
                        "gearman {}: results may not have reached the server: {e}",
                        s.addr
                    );
                }
            }
            s.conn = None;
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
