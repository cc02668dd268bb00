//! The engine's doors: accepting clients (at `max_connections`, closing the connection longest
//! in its handshake for a newcomer, or else the newcomer at once; pausing the listening
//! sockets while accepts fail for want of descriptors), and ending the handshakes that take
//! too long.

use std::collections::HashMap;
use std::io::{ErrorKind, Write};
use std::time::{Duration, Instant};

use nix::sys::epoll::{EpollEvent, EpollFlags};

use super::engine::{Conn, Engine, Received, FIRST_PAUSE, LISTENERS};
use super::sockets::{door_fd, Door, Stream};
use super::zmtp::{self, Peer};
use crate::kinds::CloseReason;

/// How long a client has for its greeting and READY.
const HANDSHAKE: Duration = Duration::from_secs(10);

/// The longest pause of the listening sockets while accepts fail.
const LONGEST_PAUSE: Duration = Duration::from_secs(5);
/// Clients accepted (or closed over the cap) per wake-up at most: a flood of connects must not
/// keep the ingress from the messages (epoll says again that more wait).
const ACCEPTS: usize = 64;

impl Engine {
    /// Accepts the clients waiting on door `i` (up to [`ACCEPTS`]): closes those over the cap,
    /// pauses the doors when out of descriptors.
    pub(super) fn accept(&mut self, i: usize) {
        for _ in 0..ACCEPTS {
            let accepted = match self.doors.get(i) {
                Some(Door::Tcp(d)) => d.accept().map(|(s, _)| {
                    let _ = s.set_nodelay(true);
                    // A client whose host goes (no FIN) would hold its place for good.
                    let _ = crate::source::detect_dead_peer(&s, self.dead_peer);
                    Stream::Tcp(s)
                }),
                Some(Door::Unix(d)) => d.accept().map(|(s, _)| Stream::Unix(s)),
                None => return,
            };
            let stream = match accepted {
                Ok(s) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                    ) =>
                {
                    self.pause_doors(&e);
                    return;
                }
                // The client went before it was accepted, or a signal: the next one.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO)
                    ) =>
                {
                    continue
                }
                Err(e) => {
                    log::warn!("zeromq: accepting a client: {e}");
                    return;
                }
            };
            self.cannot_accept.worked();
            self.pause = FIRST_PAUSE;
            if self.conns.len() as u64 >= self.max_peers {
                let connected = self.conns.len() + 1;
                let room = self.make_room();
                self.over.failed(&format_args!(
                    "{connected} connected, max_connections is {}{}",
                    self.max_peers,
                    if room {
                        " (the one longest in its handshake, for a newcomer)"
                    } else {
                        ""
                    }
                ));
                if !room {
                    self.count_closed(CloseReason::MaxConnections);
                    continue;
                }
            } else {
                self.over.worked();
            }
            self.admit(stream);
        }
    }

    fn admit(&mut self, stream: Stream) {
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        // Our greeting and READY go at once; the client's are checked as they come.
        let mut hello = zmtp::greeting().to_vec();
        hello.extend_from_slice(&zmtp::ready(b"ROUTER"));
        let id = self.next;
        self.next += 1;
        let mut conn = Conn {
            peer: Peer::new(self.limits),
            input: Vec::new(),
            out: Vec::new(),
            interest: EpollFlags::EPOLLIN,
            gone: false,
            dead: false,
            dirty: false,
            held: 0,
            stream,
        };
        match conn.stream.write(&hello) {
            Ok(n) => conn.out.extend_from_slice(&hello[n..]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => conn.out.extend_from_slice(&hello),
            Err(_) => return,
        }
        if !conn.out.is_empty() {
            conn.interest |= EpollFlags::EPOLLOUT;
        }
        if self
            .epoll
            .add(conn.stream.fd(), EpollEvent::new(conn.interest, id))
            .is_err()
        {
            return;
        }
        self.conns.insert(id, conn);
        self.handshakes.push_back((Instant::now() + HANDSHAKE, id));
        // A fault-injection build (tests only): the ingress not scheduled right after an
        // accept (the worker stopped, a VM paused).
        #[cfg(gearshift_faults)]
        crate::ops::faults::stall_while(
            "GEARSHIFT_FAULT_STALL_ACCEPTED",
            "stalling after accepting a client",
        );
        // A connection closed before its deadline leaves its entry until then: a churn of
        // short connections would keep one for every connect of the last 10 s. Past twice the
        // connections alive, the entries of those gone or done are dropped (amortized: the
        // list then holds at most the connections alive).
        if self.handshakes.len() > 2 * (self.conns.len() + ACCEPTS) {
            let conns = &self.conns;
            self.handshakes.retain(|&(_, id)| handshaking(conns, id));
        }
    }

    /// At the cap: closes the connection longest in its handshake (one that has not sent its
    /// greeting and READY: a slowloris, a port scanner's), so that a newcomer takes its place;
    /// false when every connection has finished its handshake (the newcomer is closed then).
    /// Connections that never greet, held at the cap and opened again every [`HANDSHAKE`],
    /// kept every new client out while each newcomer was the one closed. A client that
    /// finished its handshake is never closed for room.
    fn make_room(&mut self) -> bool {
        while let Some((_, id)) = self.handshakes.pop_front() {
            if handshaking(&self.conns, id) {
                return self.close_for(id, CloseReason::MaxConnections);
            }
        }
        false
    }

    fn pause_doors(&mut self, e: &std::io::Error) {
        self.cannot_accept.failed(e);
        for d in &self.doors {
            let _ = self.epoll.delete(door_fd(d));
        }
        self.paused_until = Some(Instant::now() + self.pause);
        self.pause = (self.pause * 2).min(LONGEST_PAUSE);
    }

    /// Serves `fd` as door `i` in place of the one there (an `ipc://` socket bound again at
    /// its path, `listen::renew`): clients already waiting on the old one are taken first.
    pub(super) fn replace_door(&mut self, i: usize, fd: std::os::fd::OwnedFd) {
        let door = Door::Unix(std::os::unix::net::UnixListener::from(fd));
        if let Door::Unix(d) = &door {
            let _ = d.set_nonblocking(true);
        }
        self.accept(i);
        let Some(old) = self.doors.get_mut(i) else {
            return;
        };
        let _ = self.epoll.delete(door_fd(old));
        *old = door;
        if self.paused_until.is_none() {
            let ev = EpollEvent::new(EpollFlags::EPOLLIN, LISTENERS + i as u64);
            let _ = self.epoll.add(door_fd(old), ev);
        }
    }

    /// Ends a pause of the doors whose time has come.
    pub(super) fn reopen_doors(&mut self) {
        if self.paused_until.is_some_and(|at| at <= Instant::now()) {
            self.paused_until = None;
            for (i, d) in self.doors.iter().enumerate() {
                let ev = EpollEvent::new(EpollFlags::EPOLLIN, LISTENERS + i as u64);
                let _ = self.epoll.add(door_fd(d), ev);
            }
        }
    }

    /// Closes the clients whose handshake time has run out, judged on everything they sent by
    /// now: what waits on a late one's socket is taken first (into `batch`, as
    /// [`Engine::take`] does), so a client that greeted while this thread was not running
    /// (the worker stopped, a VM paused) is not closed with its greeting unread.
    pub(super) fn end_late_handshakes(
        &mut self,
        batch: &mut Vec<Received>,
        max: usize,
        bytes: &mut usize,
        max_bytes: usize,
    ) {
        let now = Instant::now();
        while let Some(&(at, id)) = self.handshakes.front() {
            if at > now {
                break;
            }
            if handshaking(&self.conns, id) {
                if !self.pending.contains(&id) {
                    self.take(id, batch, max, bytes, max_bytes);
                    self.recount(id);
                }
                if self.pending.contains(&id) {
                    break; // the batch is full: judged once the rest is read
                }
            }
            self.handshakes.pop_front();
            if handshaking(&self.conns, id) {
                log::debug!(
                    "zeromq: a client did not finish its handshake in {} s: closed",
                    HANDSHAKE.as_secs()
                );
                self.close_for(id, CloseReason::HandshakeTimeout);
            }
        }
    }
}

/// Whether connection `id` is still open and has not finished its handshake.
fn handshaking(conns: &HashMap<u64, Conn>, id: u64) -> bool {
    conns.get(&id).is_some_and(|c| !c.peer.ready())
}
