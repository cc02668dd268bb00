//! The ZeroMQ source's connections: counted from libzmq's monitor (accepted minus
//! disconnected), and capped. A connection over `max_connections` is shut down as soon as
//! libzmq accepted it (libzmq then closes it and says DISCONNECTED), so a flood of connections
//! holds a handful of descriptors for a moment, not one each for good: it once took every
//! descriptor of the worker, no job could start, and libzmq spun on its failing accept. The
//! monitor also says when an accept fails, for `doors.rs`.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;

use nix::sys::socket::{getsockname, shutdown, Shutdown, SockaddrStorage};

use super::doors::Doors;
use super::listen::Listener;
use crate::error::{Error, Result};
use crate::kinds::Ingress as Stats;
use crate::ops::logging::Recurring;

/// Where libzmq reports the ROUTER socket's connections (accepted, disconnected).
const MONITOR: &str = "inproc://gearshift-zeromq-monitor";

/// A PAIR socket receiving the ROUTER socket's connection events.
pub(super) fn peers_monitor(ctx: &zmq::Context, socket: &zmq::Socket) -> Result<zmq::Socket> {
    let zerr = |e: zmq::Error| Error::Msg(format!("zeromq: monitoring connections: {e}"));
    let events = zmq::SocketEvent::ACCEPTED.to_raw()
        | zmq::SocketEvent::ACCEPT_FAILED.to_raw()
        | zmq::SocketEvent::DISCONNECTED.to_raw();
    socket.monitor(MONITOR, i32::from(events)).map_err(zerr)?;
    let monitor = ctx.socket(zmq::PAIR).map_err(zerr)?;
    // No event may be dropped (libzmq drops them past the pipe's high-water mark): each
    // ACCEPTED names a descriptor to close over the cap. The queue is read as fast as it fills.
    monitor.set_rcvhwm(0).map_err(zerr)?;
    monitor.connect(MONITOR).map_err(zerr)?;
    Ok(monitor)
}

/// Counts connections from the monitor's events (each: a 6-byte frame, the event first, then
/// its value: for ACCEPTED the connection's descriptor, for ACCEPT_FAILED the errno), closes
/// those over the cap, and pauses the endpoints while accepts fail (`doors.rs`).
pub(super) fn count_peers(
    monitor: &zmq::Socket,
    socket: &mut zmq::Socket,
    stats: &Stats,
    peers: &mut Peers,
) {
    while let Ok(frames) = monitor.recv_multipart(zmq::DONTWAIT) {
        let Some(event) = frames.first().filter(|f| f.len() >= 6) else {
            continue;
        };
        match zmq::SocketEvent::from_raw(u16::from_le_bytes([event[0], event[1]])) {
            zmq::SocketEvent::ACCEPTED => {
                let n = stats.peers.fetch_add(1, Ordering::Relaxed) + 1;
                let fd = i32::from_le_bytes([event[2], event[3], event[4], event[5]]);
                peers.doors.accepted();
                peers.accepted(n, fd);
            }
            zmq::SocketEvent::ACCEPT_FAILED => {
                let errno = i32::from_le_bytes([event[2], event[3], event[4], event[5]]);
                peers.doors.accept_failed(socket, errno);
            }
            zmq::SocketEvent::DISCONNECTED => {
                let _ = stats
                    .peers
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            }
            _ => {}
        }
    }
}

/// The cap on connected clients: one over it is shut down as soon as libzmq accepted it
/// (libzmq then closes it and says DISCONNECTED), so a flood of connections holds a handful of
/// descriptors for a moment, not one each for good.
pub(super) struct Peers {
    max: u64,
    /// The listening sockets' addresses: a descriptor is shut down only if it is a connection
    /// accepted on one of them (the event is read a little after it happened).
    ours: Vec<SockaddrStorage>,
    over: Recurring,
    pub(super) doors: Doors,
}

impl Peers {
    pub(super) fn new(max: u64, listeners: &[Listener]) -> Result<Peers> {
        let ours = listeners
            .iter()
            .filter_map(|l| getsockname::<SockaddrStorage>(l.fd.as_raw_fd()).ok())
            .collect();
        Ok(Peers {
            max,
            ours,
            over: Recurring::new(
                "zeromq: a client over max_connections was closed",
                "zeromq: clients within max_connections again",
            ),
            doors: Doors::new(listeners)?,
        })
    }

    /// Connection `fd` was accepted; `n` are connected with it.
    fn accepted(&mut self, n: u64, fd: RawFd) {
        if n <= self.max {
            self.over.worked();
            return;
        }
        let local = getsockname::<SockaddrStorage>(fd).ok();
        if local.is_some_and(|a| self.ours.iter().any(|o| same_listener(o, &a))) {
            let _ = shutdown(fd, Shutdown::Both);
            self.over.failed(&format_args!(
                "{n} connected, max_connections is {}",
                self.max
            ));
        }
    }
}

/// Whether `accepted` (a connection's own address) was accepted on the listener bound to
/// `bound`: the same path, or the same port (and address, unless bound to every address).
fn same_listener(bound: &SockaddrStorage, accepted: &SockaddrStorage) -> bool {
    if let (Some(b), Some(a)) = (bound.as_sockaddr_in(), accepted.as_sockaddr_in()) {
        return b.port() == a.port() && (b.ip().is_unspecified() || b.ip() == a.ip());
    }
    if let (Some(b), Some(a)) = (bound.as_sockaddr_in6(), accepted.as_sockaddr_in6()) {
        return b.port() == a.port() && (b.ip().is_unspecified() || b.ip() == a.ip());
    }
    match (bound.as_unix_addr(), accepted.as_unix_addr()) {
        (Some(b), Some(a)) => b.path().is_some() && b.path() == a.path(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connections_of_our_listeners_are_taken_for_peers() {
        let addr = |s: &str| SockaddrStorage::from(s.parse::<std::net::SocketAddr>().unwrap());
        let any = addr("0.0.0.0:5555");
        let local = addr("127.0.0.1:5555");
        assert!(same_listener(&any, &addr("10.1.2.3:5555")));
        assert!(same_listener(&local, &addr("127.0.0.1:5555")));
        assert!(!same_listener(&local, &addr("10.1.2.3:5555")));
        assert!(
            !same_listener(&any, &addr("127.0.0.1:9100")),
            "another port"
        );
        assert!(!same_listener(&addr("[::]:5555"), &local), "another family");
        // A connection accepted on a Unix listener has the listener's path; another's has not.
        let dir = crate::testutil::tempdir("zeromq", "peers");
        let name = |l: &std::os::unix::net::UnixListener| {
            getsockname::<SockaddrStorage>(l.as_raw_fd()).expect("sockname")
        };
        let ours = std::os::unix::net::UnixListener::bind(dir.join("j.sock")).expect("bind");
        let other = std::os::unix::net::UnixListener::bind(dir.join("x.sock")).expect("bind");
        let _client = std::os::unix::net::UnixStream::connect(dir.join("j.sock")).expect("connect");
        let (conn, _) = ours.accept().expect("accept");
        let accepted = getsockname::<SockaddrStorage>(conn.as_raw_fd()).expect("sockname");
        assert!(same_listener(&name(&ours), &accepted));
        assert!(!same_listener(&name(&other), &accepted));
        assert!(!same_listener(&any, &accepted));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
