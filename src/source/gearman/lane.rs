//! A Gearman lane taking jobs from any of its servers (GRAB_JOB_UNIQ / PRE_SLEEP / NOOP), one at
//! a time, progress and the outcome on the job's connection. Its state is in `servers.rs`; the
//! connections it parks for a re-exec, or takes up after one, wait in `handover.rs`.

use crate::shutdown::Shutdown;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Instant;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::connection::{Conn, OwnedPacket};
use super::protocol::{self as p, Packet};
use super::servers::{register, GearmanLane, Phase, BACKOFF_MIN, IDLE_CHECK, STOP_GRACE};
use crate::error::{Error, Result};
use crate::jobs::functions::{JobResult, Progress};
use crate::kinds::ConnState;
use crate::source::lane::{Claimed, Lane};

impl GearmanLane {
    /// Queues a GRAB on the next awake server (round robin, `first` preferred).
    pub(super) fn grab_next(&mut self, first: Option<usize>) -> bool {
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
    pub(super) fn on_packet(
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
                self.view(s, crate::kinds::ConnState::Connected, None);
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
                let job = pkt.into_assignment(&mut self.handle)?;
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
            (_, kind) => note_async(&s.addr, &mut s.rejected, kind, &pkt.data).map(|()| None),
        }
    }

    /// One round of the poll loop: waits (until the nearest deadline or timer, or `until`),
    /// then handles what happened. Returns a job if one was assigned.
    pub(super) fn turn(&mut self, until: Option<Instant>) -> Option<Claimed> {
        let now = Instant::now();
        let mut wake_at = until;
        let mut earliest = |t: Instant| wake_at = Some(wake_at.map_or(t, |w: Instant| w.min(t)));
        for s in &self.servers {
            match s.phase {
                // A lookup under way wakes the lane itself when it is done.
                Phase::Down if s.lookup.is_some() => {}
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
            // A GRAB out: its answer comes within a round trip; poll briefly before sleeping.
            let grabbing = self.servers.iter().any(|s| s.phase == Phase::Grabbing);
            let _waiting = grabbing.then(crate::source::spin::Waiting::enter);
            let spun = grabbing && self.spin.wait(&mut fds);
            match if spun { Ok(1) } else { poll(&mut fds, timeout) } {
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
    pub(super) fn read_from(&mut self, i: usize) -> Option<Claimed> {
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

    pub(super) fn read_once(&mut self, i: usize) -> Option<Claimed> {
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
}

/// Handles a packet that may arrive at any time. ERROR JOB_NOT_FOUND (a late result after a
/// CAN_DO_TIMEOUT requeue, or a result on a connection that no longer owns the job) is logged and
/// the connection kept: the server rejected one result, nothing else is wrong. Any other ERROR
/// drops the connection, which is then opened again with backoff.
fn note_async(
    addr: &str,
    rejected: &mut crate::ops::logging::Recurring,
    kind: u32,
    data: &[u8],
) -> std::result::Result<(), String> {
    match kind {
        p::NOOP | p::ECHO_RES | p::OPTION_RES => Ok(()),
        p::ERROR => {
            let pkt = Packet { kind, data };
            let [code, text] = pkt.args::<2>().unwrap_or([data, b""]);
            let (code, text) = (String::from_utf8_lossy(code), String::from_utf8_lossy(text));
            if code.contains("JOB_NOT_FOUND") {
                rejected.failed(&format_args!("{addr}: {code}: {text}"));
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
        let mut looked_last = false;
        loop {
            let stopping = stop.is_set();
            if stopping {
                let since = *stop_seen.get_or_insert_with(Instant::now);
                // A fault-injection build (tests only): the lane not scheduled at a stop (the
                // worker stopped, a VM paused).
                #[cfg(gearshift_faults)]
                crate::ops::faults::stall_while(
                    "GEARSHIFT_FAULT_STALL_STOPPING",
                    "stalling a lane at a stop",
                );
                let grabbing: Vec<usize> = (0..self.servers.len())
                    .filter(|&i| self.servers[i].phase == Phase::Grabbing)
                    .collect();
                if grabbing.is_empty() {
                    return Ok(None);
                }
                if since.elapsed() >= STOP_GRACE {
                    if !std::mem::replace(&mut looked_last, true) {
                        // One more look without waiting first: the answer may have come while
                        // this lane was not running.
                        match self.turn(Some(Instant::now())) {
                            Some(job) => return Ok(Some(self.marked(job))),
                            None => continue,
                        }
                    }
                    for i in grabbing {
                        self.fail(i, "no answer to GRAB_JOB within a second of a stop");
                    }
                    return Ok(None);
                }
                if let Some(job) = self.turn(Some(since + STOP_GRACE)) {
                    return Ok(Some(self.marked(job)));
                }
                continue;
            }
            self.connect_due();
            let grabbing = self.servers.iter().any(|s| s.phase == Phase::Grabbing);
            if !grabbing {
                self.grab_next(first.take());
            }
            if let Some(job) = self.turn(None) {
                return Ok(Some(self.marked(job)));
            }
        }
    }

    fn progress(&mut self) -> &mut dyn Progress {
        self
    }

    fn finish(&mut self, _job: &Claimed, outcome: &JobResult) -> Result<()> {
        self.run_ended();
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
        // For a re-exec, the next generation takes the connections over (`handover.rs`).
        self.park();
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

/// Connections kept across a re-exec (`handover.rs`).
impl GearmanLane {
    /// Stopping for a re-exec: parks every connection at a safe point for the next
    /// generation. What cannot be parked is left to the bye in `close`.
    pub(super) fn park(&mut self) {
        if !self.handover.restarting() {
            return;
        }
        for i in 0..self.servers.len() {
            let key = super::handover::key(self.index, self.exceptions, &self.servers[i].addr);
            let s = &mut self.servers[i];
            if !matches!(s.phase, Phase::Idle { .. }) {
                continue;
            }
            // The last result must be written whole (a full socket keeps the bye path), and
            // TLS never parks (`detachable`).
            let ready = s
                .conn
                .as_mut()
                .is_some_and(|c| matches!(c.flush_some(), Ok(true)) && c.detachable());
            if let Some(fd) = s.conn.take_if(|_| ready).and_then(Conn::into_fd) {
                s.phase = Phase::Down;
                self.handover.park(key, fd);
            }
        }
    }

    /// Takes up the connections the previous generation parked for this lane and registers
    /// them afresh, with the first GRAB in the same write: sent now, from the thread creating
    /// the lane, so gearmand answers while the lane's thread starts (`next` waits for that
    /// answer like any GRAB's, a stop included).
    pub(super) fn take_up(&mut self) {
        let mut taken = Vec::new();
        for i in 0..self.servers.len() {
            let s = &self.servers[i];
            if s.tls.is_some() {
                continue;
            }
            let key = super::handover::key(self.index, self.exceptions, &s.addr);
            let Some(fd) = self.handover.take(&key) else {
                continue;
            };
            // The dead-peer settings again: the reload may have changed them.
            let adopted = Conn::adopt(fd, p::RES, self.max_packet)
                .and_then(|c| c.detect_dead_peer(self.dead_peer).map(|()| c));
            let conn = match adopted {
                Ok(c) => c,
                Err(e) => {
                    log::warn!(
                        "gearman {}: the handed-over connection is unusable ({e}); connecting anew",
                        s.addr
                    );
                    continue;
                }
            };
            let s = &mut self.servers[i];
            let conn = s.conn.insert(conn);
            conn.queue(p::RESET_ABILITIES, &[]);
            register(conn, &self.client_id, &self.functions);
            s.phase = Phase::Idle { awake: true };
            s.backoff = BACKOFF_MIN;
            s.last_io = Instant::now();
            let s = &self.servers[i];
            log::debug!(
                "gearman {}: connection taken over from the previous generation",
                s.addr
            );
            self.view(s, ConnState::Connected, None);
            taken.push(i);
        }
        if let Some(&first) = taken.first() {
            self.grab_next(Some(first));
        }
        for i in taken.into_iter().skip(1) {
            self.flush(i);
        }
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
