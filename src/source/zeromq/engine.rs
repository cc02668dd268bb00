//! The ZeroMQ source's sockets, served by the ingress thread itself: our listening sockets
//! (duplicates of those that cross every exec), the clients' connections, one epoll. ZMTP is
//! `zmtp.rs`'s; here are the bounds: a peer whose answers are not read stops being read (at
//! [`OUT_LIMIT`]); what all connections hold together is bounded (`held.rs`); and (`doors.rs`)
//! connections over `max_connections` are closed at once, one that has not finished its
//! handshake within 10 s is closed, and while accepts fail for want of descriptors the
//! listening sockets rest (0.25 s doubling to 5 s; clients wait in the kernel's backlog).
//!
//! Why not libzmq (which served this source first, and `gearshift submit` too): its I/O thread
//! cost 11-17 µs of CPU a message and a hand-off to ours each way; this one reads and answers
//! in the thread that stores (a transport alone measured at 6 µs a message against the PHP
//! loop's 15: docs/measurements.md, "The ZeroMQ source").

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};

use super::listen::Listener;
use super::sockets::{door_fd, Door, Stream};
use super::zmtp::{self, Event, Limits, Peer};
use crate::config::Endpoint;
use crate::error::{Error, Result};
use crate::kinds::CloseReason;
use crate::ops::logging::Recurring;

/// Bytes of answers waiting for a client at most before it is no longer read.
pub(super) const OUT_LIMIT: usize = 1 << 20;
/// Bytes read from one connection at a time.
const READ_CHUNK: usize = 64 * 1024;
/// The first pause of the listening sockets when accepts fail (it doubles while they do).
pub(super) const FIRST_PAUSE: Duration = Duration::from_millis(250);
/// Events taken from epoll at once.
const EVENTS: usize = 256;
/// Tokens above the connections': the wake-up eventfd, then the listening sockets.
const WAKE: u64 = u64::MAX;
pub(super) const LISTENERS: u64 = u64::MAX - 1024;

pub(super) struct Conn {
    pub(super) stream: Stream,
    pub(super) peer: Peer,
    pub(super) input: Vec<u8>,
    pub(super) out: Vec<u8>,
    /// What epoll is asked for it now.
    pub(super) interest: EpollFlags,
    /// The socket said end-of-file or an error: closed once what it sent is taken.
    pub(super) gone: bool,
    /// That error was the kernel giving up on the client's host (keepalive probes or data
    /// unacknowledged past `dead_peer_timeout`: `ETIMEDOUT`, or the ICMP error a router sent
    /// meanwhile, which Linux reports instead): counted as closed by us.
    pub(super) dead: bool,
    /// Listed in the engine's `dirty` (answers queued since the last flush).
    pub(super) dirty: bool,
    /// Bytes it holds (its message in progress, its buffers while they hold bytes), as last
    /// counted (`held.rs`).
    pub(super) held: usize,
}

impl Conn {
    /// Its socket failed with `e`: it is gone.
    fn fail(&mut self, e: &std::io::Error) {
        self.gone = true;
        self.dead |= host_gone(e);
    }
}

/// Whether a socket's error says its peer's host is gone: the kernel gave up on it after
/// `dead_peer_timeout` (`ETIMEDOUT`, or, where a router answered the probes with an ICMP
/// error, that error: Linux then reports the last one instead), not the client's own close.
fn host_gone(e: &std::io::Error) -> bool {
    use nix::libc::{EHOSTDOWN, EHOSTUNREACH, ENETUNREACH, ETIMEDOUT};
    matches!(
        e.raw_os_error(),
        Some(ETIMEDOUT | EHOSTUNREACH | ENETUNREACH | EHOSTDOWN)
    )
}

/// A message and the connection it came on (answered there, if it is still connected).
pub(super) type Received = (u64, Vec<Vec<u8>>);

/// The sockets of the ingress.
pub(super) struct Engine {
    pub(super) epoll: Epoll,
    pub(super) wake: std::sync::Arc<OwnedFd>,
    pub(super) doors: Vec<Door>,
    pub(super) conns: HashMap<u64, Conn>,
    pub(super) next: u64,
    pub(super) limits: Limits,
    pub(super) max_peers: u64,
    /// TCP clients are closed within about this once their host stops answering.
    pub(super) dead_peer: Duration,
    /// Connections that hold bytes not decoded yet (a batch filled up first).
    pub(super) pending: Vec<u64>,
    /// Connections with answers queued since the last flush.
    pub(super) dirty: Vec<u64>,
    /// Connections in accept order, with when their handshake must be done.
    pub(super) handshakes: VecDeque<(Instant, u64)>,
    pub(super) paused_until: Option<Instant>,
    pub(super) pause: Duration,
    pub(super) cannot_accept: Recurring,
    pub(super) over: Recurring,
    /// What all connections hold (the sum of their `held`), and the most they may (`held.rs`).
    pub(super) held: usize,
    pub(super) budget: usize,
    pub(super) crowded: Recurring,
    /// Clients closed by the engine since the ingress last took the counts, by reason.
    pub(super) closed: [u64; crate::kinds::CLOSE_REASONS],
    pub(super) events: Vec<EpollEvent>,
    pub(super) chunk: Vec<u8>,
}

impl Engine {
    /// Serves `listeners` (through duplicates, closed with the engine).
    pub(super) fn new(
        listeners: &[Listener],
        limits: Limits,
        max_peers: u64,
        dead_peer: Duration,
    ) -> Result<Engine> {
        let wake = std::sync::Arc::new(crate::source::gearman::worker::eventfd()?);
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)
            .map_err(|e| Error::io("creating an epoll instance", e.into()))?;
        let add = |fd: BorrowedFd<'_>, token: u64| {
            epoll
                .add(fd, EpollEvent::new(EpollFlags::EPOLLIN, token))
                .map_err(|e| Error::io("watching a socket", e.into()))
        };
        add(wake.as_fd(), WAKE)?;
        let mut doors = Vec::with_capacity(listeners.len());
        for l in listeners {
            let fd =
                l.fd.try_clone()
                    .map_err(|e| Error::io("duplicating a listening socket", e))?;
            let door = match l.endpoint {
                Endpoint::Tcp { .. } => Door::Tcp(TcpListener::from(fd)),
                Endpoint::Ipc(_) => Door::Unix(UnixListener::from(fd)),
            };
            let nonblocking = match &door {
                Door::Tcp(d) => d.set_nonblocking(true),
                Door::Unix(d) => d.set_nonblocking(true),
            };
            nonblocking.map_err(|e| Error::io("setting a listening socket non-blocking", e))?;
            add(door_fd(&door), LISTENERS + doors.len() as u64)?;
            doors.push(door);
        }
        Ok(Engine {
            epoll,
            wake,
            doors,
            conns: HashMap::new(),
            next: 0,
            limits,
            max_peers,
            dead_peer,
            pending: Vec::new(),
            dirty: Vec::new(),
            handshakes: VecDeque::new(),
            paused_until: None,
            pause: FIRST_PAUSE,
            cannot_accept: Recurring::new(
                "zeromq: cannot accept clients; not accepting for a while (new clients wait in \
                 the backlog)",
                "zeromq: accepting clients again",
            ),
            over: Recurring::new(
                "zeromq: a client over max_connections was closed",
                "zeromq: clients within max_connections again",
            ),
            held: 0,
            budget: Engine::budget_for(limits.message_bytes),
            crowded: Recurring::new(
                "zeromq: clients' unfinished messages over their budget",
                "zeromq: clients' unfinished messages within their budget again",
            ),
            closed: [0; crate::kinds::CLOSE_REASONS],
            events: vec![EpollEvent::empty(); EVENTS],
            chunk: vec![0; READ_CHUNK],
        })
    }

    /// Makes [`Engine::wait`] return at once when written (8 bytes, a count).
    pub(super) fn waker(&self) -> std::sync::Arc<OwnedFd> {
        std::sync::Arc::clone(&self.wake)
    }

    /// Connected clients.
    pub(super) fn peers(&self) -> usize {
        self.conns.len()
    }

    /// Whether messages may be waiting already (decoded bytes left over from the last batch).
    pub(super) fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// How long until the engine has something to do on its own (a pause or a handshake that
    /// ends), at most `cap`.
    pub(super) fn timeout(&self, cap: Duration) -> Duration {
        let now = Instant::now();
        let next = [
            self.paused_until,
            self.handshakes.front().map(|(at, _)| *at),
        ]
        .into_iter()
        .flatten()
        .min();
        next.map_or(cap, |at| at.saturating_duration_since(now).min(cap))
    }

    /// Waits for events up to `timeout` (zero: a look without sleeping), then takes what they
    /// bring: clients accepted, messages into `batch` (up to `max` messages or `max_bytes`),
    /// answers flushed. True: the wake-up eventfd was written.
    pub(super) fn wait(
        &mut self,
        timeout: Duration,
        batch: &mut Vec<Received>,
        max: usize,
        max_bytes: usize,
    ) -> bool {
        self.reopen_doors();
        let ms = if self.pending.is_empty() {
            EpollTimeout::try_from(timeout).unwrap_or(EpollTimeout::NONE)
        } else {
            EpollTimeout::ZERO
        };
        let n = match self.epoll.wait(&mut self.events, ms) {
            Ok(n) => n,
            Err(nix::errno::Errno::EINTR) => 0,
            Err(e) => {
                log::error!("zeromq: waiting for clients: {e}");
                std::thread::sleep(Duration::from_millis(100));
                0
            }
        };
        let mut woken = false;
        let mut bytes = 0;
        let mut ready = std::mem::take(&mut self.pending);
        // Taken out while `self` is used, put back after (no allocation a wait).
        let events = std::mem::take(&mut self.events);
        for (token, flags) in events[..n].iter().map(|ev| (ev.data(), ev.events())) {
            match token {
                WAKE => {
                    self.drain_wake();
                    woken = true;
                }
                t if t >= LISTENERS => self.accept((t - LISTENERS) as usize),
                t => {
                    if flags.intersects(EpollFlags::EPOLLOUT) {
                        self.flush_one(t);
                    }
                    if flags.intersects(
                        EpollFlags::EPOLLIN | EpollFlags::EPOLLHUP | EpollFlags::EPOLLERR,
                    ) && !ready.contains(&t)
                    {
                        ready.push(t);
                    }
                }
            }
        }
        self.events = events;
        for (i, id) in ready.iter().enumerate() {
            if batch.len() >= max || bytes >= max_bytes {
                self.pending.extend_from_slice(&ready[i..]);
                break;
            }
            self.take(*id, batch, max, &mut bytes, max_bytes);
            self.recount(*id);
        }
        self.end_late_handshakes(batch, max, &mut bytes, max_bytes);
        woken
    }

    /// Empties the wake-up eventfd (readable until read).
    fn drain_wake(&self) {
        let mut count = [0u8; 8];
        let _ = nix::unistd::read(self.wake.as_raw_fd(), &mut count);
    }

    /// A look at the sockets without sleeping: whether any has something (busy-polling).
    pub(super) fn poll_now(&self) -> bool {
        let mut one = [EpollEvent::empty()];
        !self.pending.is_empty() || self.epoll.wait(&mut one, EpollTimeout::ZERO).unwrap_or(0) > 0
    }

    /// Queues an answer to connection `id` (gone: dropped; the client resends).
    pub(super) fn answer(&mut self, id: u64, frames: &[&[u8]]) {
        if let Some(c) = self.conns.get_mut(&id) {
            if !c.dirty {
                c.dirty = true;
                self.dirty.push(id);
            }
            zmtp::put_message(&mut c.out, frames);
        }
    }

    /// Writes the answers queued since the last flush, as far as the sockets take them now
    /// (the rest when epoll says a socket can take more).
    pub(super) fn flush(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for id in dirty.drain(..) {
            self.flush_one(id);
        }
        self.dirty = dirty;
    }

    /// At a stop: answers queued get until `deadline` to leave; then every connection closes.
    pub(super) fn linger(&mut self, deadline: Instant) {
        // A stop seen through the flag leaves the eventfd readable: every wait below would
        // return at once.
        self.drain_wake();
        self.flush();
        while self.conns.values().any(|c| !c.out.is_empty() && !c.gone) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let ms = EpollTimeout::try_from(left.min(Duration::from_millis(50)))
                .unwrap_or(EpollTimeout::ZERO);
            let _ = self.epoll.wait(&mut self.events, ms);
            let waiting: Vec<u64> = self
                .conns
                .iter()
                .filter(|(_, c)| !c.out.is_empty())
                .map(|(id, _)| *id)
                .collect();
            for id in waiting {
                self.flush_one(id);
            }
        }
        self.conns.clear();
        self.held = 0;
    }

    /// Reads connection `id` and decodes its messages into `batch`.
    pub(super) fn take(
        &mut self,
        id: u64,
        batch: &mut Vec<Received>,
        max: usize,
        bytes: &mut usize,
        max_bytes: usize,
    ) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let mut failed = None;
        let mut at = 0;
        // A read that filled less than it was offered emptied the socket: epoll (level-
        // triggered) says when more comes, so no read is made only to be told "would block".
        let mut drained = false;
        loop {
            // Decode what is there first; read more only once it is used up.
            loop {
                if batch.len() >= max || *bytes >= max_bytes {
                    c.input.drain(..at);
                    self.pending.push(id);
                    return;
                }
                match c.peer.step(&c.input[at..]) {
                    Ok((0, _)) => break,
                    Ok((n, event)) => {
                        at += n;
                        match event {
                            Some(Event::Message(frames)) => {
                                *bytes += frames.iter().map(Vec::len).sum::<usize>();
                                batch.push((id, frames));
                            }
                            Some(Event::Reply(b)) => c.out.extend_from_slice(&b),
                            None => {}
                        }
                    }
                    Err(v) => {
                        failed = Some(v);
                        break;
                    }
                }
            }
            c.input.drain(..at);
            at = 0;
            if drained
                || failed.is_some()
                || c.gone
                || c.interest & EpollFlags::EPOLLIN != EpollFlags::EPOLLIN
            {
                break;
            }
            // A large frame gets a buffer of its size, and reads stop at its end: growing by
            // doubling would hold up to twice what it needs (and count it: `held.rs`).
            let mut room = READ_CHUNK;
            if let Some(end) = c.peer.frame_len(&c.input).filter(|&n| n > READ_CHUNK) {
                if end > c.input.len() {
                    c.input.reserve_exact(end - c.input.len());
                    room = room.min(end - c.input.len());
                }
            }
            match c.stream.read(&mut self.chunk[..room]) {
                Ok(0) => c.gone = true,
                Ok(n) => {
                    drained = n < room;
                    c.input.extend_from_slice(&self.chunk[..n]);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => c.fail(&e),
            }
        }
        if let Some(v) = failed {
            log::debug!("zeromq: a client closed: {v}");
            self.close_for(id, CloseReason::Protocol);
        } else if c.gone {
            self.close_gone(id);
        } else if !c.out.is_empty() {
            self.flush_one(id);
        }
    }

    /// Writes what connection `id` has queued, and asks epoll for what it needs next: to
    /// write the rest, and to read unless too much waits for it.
    fn flush_one(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        c.dirty = false;
        while !c.out.is_empty() {
            match c.stream.write(&c.out) {
                Ok(0) => break,
                Ok(n) => {
                    c.out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    c.fail(&e);
                    break;
                }
            }
        }
        if c.gone {
            // Its own messages taken already, or never to be answered: closed.
            self.close_gone(id);
            return;
        }
        let mut want = EpollFlags::empty();
        if c.out.len() < OUT_LIMIT {
            want |= EpollFlags::EPOLLIN;
        }
        if !c.out.is_empty() {
            want |= EpollFlags::EPOLLOUT;
        }
        if want != c.interest {
            c.interest = want;
            let mut ev = EpollEvent::new(want, id);
            let _ = self.epoll.modify(c.stream.fd(), &mut ev);
        }
        self.recount(id);
    }

    /// Closes connection `id` for `why`, and counts it; false if there was none.
    pub(super) fn close_for(&mut self, id: u64, why: CloseReason) -> bool {
        let closed = self.close(id);
        if closed {
            self.count_closed(why);
        }
        closed
    }

    /// Closes connection `id`, whose socket ended: counted only if the kernel gave up on its
    /// host (a client's own close is not ours).
    fn close_gone(&mut self, id: u64) {
        if self.conns.get(&id).is_some_and(|c| c.dead) {
            self.close_for(id, CloseReason::DeadPeer);
        } else {
            self.close(id);
        }
    }

    pub(super) fn count_closed(&mut self, why: CloseReason) {
        let n = &mut self.closed[why as usize];
        *n = n.saturating_add(1);
    }

    /// The clients closed since the last call, by reason (`CloseReason::ALL`'s order).
    pub(super) fn take_closed(&mut self) -> [u64; crate::kinds::CLOSE_REASONS] {
        std::mem::take(&mut self.closed)
    }

    /// Closes connection `id`; false if there was none.
    pub(super) fn close(&mut self, id: u64) -> bool {
        let Some(c) = self.conns.remove(&id) else {
            return false;
        };
        self.held = self.held.saturating_sub(c.held);
        let _ = self.epoll.delete(c.stream.fd());
        true
    }
}

#[cfg(test)]
mod tests {
    use nix::libc;
    use std::io::Error;

    #[test]
    fn only_a_host_gone_counts_as_a_dead_peer() {
        for gone in [
            libc::ETIMEDOUT,
            libc::EHOSTUNREACH,
            libc::ENETUNREACH,
            libc::EHOSTDOWN,
        ] {
            assert!(super::host_gone(&Error::from_raw_os_error(gone)), "{gone}");
        }
        for own in [libc::ECONNRESET, libc::EPIPE, libc::ECONNABORTED] {
            assert!(!super::host_gone(&Error::from_raw_os_error(own)), "{own}");
        }
        assert!(!super::host_gone(&Error::other("not the kernel's")));
    }
}
