//! Host names looked up beside the thread that needs them. `getaddrinfo` blocks, and a resolver
//! that does not answer (its name server cut off) holds its caller for the whole timeout
//! (`options timeout:` times `attempts:` for each name server, 10 s by default), again at
//! every retry: a lane that looked a server up itself served none of its other servers' jobs,
//! and answered neither a reload nor a stop, meanwhile. A [`Lookup`] runs on a thread of its
//! own and wakes its lane (a write to the lane's eventfd) when it is done; a lane that ends
//! first abandons it (the thread ends with its lookup, or at the next exec).

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, TryRecvError};

/// A lookup under way.
pub(crate) struct Lookup {
    answer: Receiver<io::Result<SocketAddr>>,
}

/// `host:port` as a lookup takes it (an IPv6 address in brackets).
pub(crate) fn target(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `target` if it is written as an address (`127.0.0.1:4730`, `[::1]:4730`): no lookup.
pub(crate) fn literal(target: &str) -> Option<SocketAddr> {
    target.parse().ok()
}

/// The first address of `target` (`host:port`), looked up here (this thread waits).
pub(crate) fn first_address(target: &str) -> io::Result<SocketAddr> {
    addresses(target)?.into_iter().next().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("cannot resolve {target}: no address"),
        )
    })
}

fn addresses(target: &str) -> io::Result<Vec<SocketAddr>> {
    target
        .to_socket_addrs()
        .map(Iterator::collect)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot resolve {target}: {e}")))
}

/// Every address of `target`, waiting for the lookup until `deadline` at most: for a caller
/// with nothing else to do meanwhile (the CLI, which must keep its `--timeout`). A lookup that
/// is late is left to end on its own thread.
pub(crate) fn addresses_by(target: &str, deadline: Instant) -> io::Result<Vec<SocketAddr>> {
    if let Some(sa) = literal(target) {
        return Ok(vec![sa]);
    }
    let (tx, answer) = crossbeam_channel::bounded(1);
    let name = target.to_string();
    std::thread::Builder::new()
        .name("resolve".into())
        .spawn(move || {
            let _ = tx.send(addresses(&name));
        })?;
    match answer.recv_deadline(deadline) {
        Ok(a) => a,
        Err(RecvTimeoutError::Timeout) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("cannot resolve {target}: the name server did not answer in time"),
        )),
        Err(RecvTimeoutError::Disconnected) => Err(io::Error::other(format!(
            "cannot resolve {target}: the lookup's thread ended without an answer"
        ))),
    }
}

impl Lookup {
    /// Looks `target` up on a thread of its own, which writes to `wake` (an eventfd) once the
    /// answer is there.
    pub(crate) fn start(target: &str, wake: Arc<OwnedFd>) -> io::Result<Lookup> {
        let (tx, answer) = crossbeam_channel::bounded(1);
        let target = target.to_string();
        std::thread::Builder::new()
            .name("resolve".into())
            .spawn(move || {
                let _ = tx.send(first_address(&target));
                let _ = nix::unistd::write(wake.as_fd(), &1u64.to_ne_bytes());
            })?;
        Ok(Lookup { answer })
    }

    /// The answer once it is there; None while the lookup runs.
    pub(crate) fn answer(&self) -> Option<io::Result<SocketAddr>> {
        match self.answer.try_recv() {
            Ok(a) => Some(a),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Err(io::Error::other(
                "the lookup's thread ended without an answer",
            ))),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn addresses_need_no_lookup_and_a_lookup_wakes_its_lane() {
        assert_eq!(
            literal("127.0.0.1:4730"),
            Some(([127, 0, 0, 1], 4730).into())
        );
        assert!(literal("[::1]:4730").is_some_and(|a| a.is_ipv6()));
        assert_eq!(literal("localhost:4730"), None);
        let efd = nix::sys::eventfd::EventFd::from_flags(nix::sys::eventfd::EfdFlags::EFD_CLOEXEC);
        let wake = Arc::new(OwnedFd::from(efd.unwrap()));
        let lookup = Lookup::start("localhost:4730", Arc::clone(&wake)).unwrap();
        let mut fds = [nix::poll::PollFd::new(
            wake.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(10_000u16)).unwrap();
        assert_eq!(ready, 1, "woken");
        assert_eq!(lookup.answer().unwrap().unwrap().port(), 4730);
    }
}
