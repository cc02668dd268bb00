//! The socket: a non-blocking connect, and waiting in poll(2) for it or the wake-up eventfd.

use std::net::{SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::gone;
use crate::config::AmqpUrl;
use crate::error::{Error, Result};

/// A non-blocking connect to `host:port`, bounded by `deadline` and given up when `wake` is
/// written.
pub(super) fn connect(
    url: &AmqpUrl,
    deadline: Instant,
    wake: Option<&Arc<OwnedFd>>,
) -> Result<TcpStream> {
    let addr = address(url, deadline, wake)?;
    let fd = crate::source::gearman::connection::start_connect(addr).map_err(gone)?;
    match wait_fd(fd.as_fd(), PollFlags::POLLOUT, Some(deadline), wake)? {
        Ready::Yes => {}
        Ready::Woken => return Err(Error::Gone("connecting: the lane is stopping".into())),
        Ready::TimedOut => {
            return Err(Error::TimedOut(format!(
                "connecting to {}:{}: no answer",
                url.host, url.port
            )))
        }
    }
    let stream = TcpStream::from(fd);
    if let Some(e) = stream.take_error().map_err(gone)? {
        return Err(gone(e));
    }
    stream.set_nodelay(true).map_err(gone)?;
    Ok(stream)
}

/// The broker's address: at once if the URL gives one; else looked up beside this thread
/// (see [`crate::source::resolve`]), waiting for the answer, the deadline or `wake`.
fn address(url: &AmqpUrl, deadline: Instant, wake: Option<&Arc<OwnedFd>>) -> Result<SocketAddr> {
    use crate::source::resolve::{addresses_by, literal, Lookup};
    let target = crate::source::resolve::target(&url.host, url.port);
    if let Some(sa) = literal(&target) {
        return Ok(sa);
    }
    let Some(wake) = wake else {
        return addresses_by(&target, deadline)
            .and_then(|a| {
                a.into_iter()
                    .next()
                    .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))
            })
            .map_err(gone);
    };
    // A lookup an earlier attempt gave up waiting for is taken over, not started again: each
    // attempt started its own, and with a resolver slower than `io_timeout` they piled up.
    let under_way = PENDING
        .lock()
        .ok()
        .and_then(|mut p| p.take())
        .filter(|(t, ..)| *t == target);
    let (lookup, done) = match under_way {
        Some((_, lookup, done)) => (lookup, done),
        None => {
            let done = Arc::new(crate::source::gearman::worker::eventfd()?);
            (
                Lookup::start(&target, Arc::clone(&done)).map_err(gone)?,
                done,
            )
        }
    };
    let ready = wait_fd(done.as_fd(), PollFlags::POLLIN, Some(deadline), Some(wake))?;
    let failed = match ready {
        Ready::Yes => {
            return lookup
                .answer()
                .unwrap_or_else(|| Err(std::io::Error::other("no answer")))
                .map_err(gone)
        }
        Ready::Woken => Error::Gone("resolving: the lane is stopping".into()),
        Ready::TimedOut => Error::TimedOut(format!("resolving {}: no answer", url.host)),
    };
    if let Ok(mut p) = PENDING.lock() {
        *p = Some((target, lookup, done));
    }
    Err(failed)
}

/// The broker's lookup still under way when its attempt gave up: its name, the lookup and the
/// eventfd it writes when done (the connection is one per worker, so one at most).
type Pending = (String, crate::source::resolve::Lookup, Arc<OwnedFd>);
static PENDING: std::sync::Mutex<Option<Pending>> = std::sync::Mutex::new(None);

pub(super) enum Ready {
    Yes,
    Woken,
    TimedOut,
}

/// Waits for `fd` to be ready for `what`, the deadline, or the wake-up eventfd (drained).
pub(super) fn wait_fd(
    fd: BorrowedFd<'_>,
    what: PollFlags,
    deadline: Option<Instant>,
    wake: Option<&Arc<OwnedFd>>,
) -> Result<Ready> {
    loop {
        // Past the deadline (this process may have stalled: SIGSTOP, a paused VM): one look
        // without waiting, so that what came meanwhile is never taken for the peer's silence.
        let (timeout, past) = match deadline {
            None => (PollTimeout::NONE, false),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Rounded up: a wait never ends just before its deadline.
                let ms = (left.as_micros().div_ceil(1000)).min(60_000) as i32;
                (
                    PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
                    left.is_zero(),
                )
            }
        };
        // No allocation: this is on every job's path.
        let mut all = [PollFd::new(fd, what), PollFd::new(fd, PollFlags::empty())];
        let n = match wake {
            Some(w) => {
                all[1] = PollFd::new(w.as_fd(), PollFlags::POLLIN);
                2
            }
            None => 1,
        };
        let fds = &mut all[..n];
        match poll(fds, timeout) {
            Ok(0) if past => return Ok(Ready::TimedOut),
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(Error::io("poll", e.into())),
        }
        let woken = fds
            .get(1)
            .and_then(|f| f.revents())
            .is_some_and(|r| !r.is_empty());
        if fds[0].revents().is_some_and(|r| !r.is_empty()) {
            return Ok(Ready::Yes);
        }
        if woken {
            if let Some(w) = wake {
                drain(w);
            }
            return Ok(Ready::Woken);
        }
    }
}

/// Sleeps until `until` or until `wake` is written (drained): a lane backing off.
pub fn sleep_until(until: Instant, wake: &Arc<OwnedFd>) {
    // The eventfd itself is what is waited for: readable means woken.
    if let Ok(Ready::Yes) = wait_fd(wake.as_fd(), PollFlags::POLLIN, Some(until), None) {
        drain(wake);
    }
}

/// Empties the wake-up eventfd (it stays readable until read).
fn drain(wake: &OwnedFd) {
    let mut b = [0u8; 8];
    let _ = nix::unistd::read(wake.as_raw_fd(), &mut b);
}

#[cfg(test)]
mod tests {
    use super::{wait_fd, Ready};
    use nix::poll::PollFlags;
    use std::io::Write;
    use std::os::fd::AsFd;
    use std::time::{Duration, Instant};

    /// A wait whose deadline passed before it began (the worker stalled: SIGSTOP, a paused VM)
    /// looks at the socket once without waiting: what came meanwhile is read, not taken for
    /// the peer's silence. It said "timed out" without a look, and a broker's confirm sitting
    /// in the socket cost the connection and a job run twice.
    #[test]
    fn a_wait_past_its_deadline_still_sees_what_already_came() {
        let (mut a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let past = Instant::now() - Duration::from_secs(3);
        let silent = wait_fd(b.as_fd(), PollFlags::POLLIN, Some(past), None).unwrap();
        assert!(matches!(silent, Ready::TimedOut), "nothing came: timed out");
        a.write_all(b"confirm").unwrap();
        let came = wait_fd(b.as_fd(), PollFlags::POLLIN, Some(past), None).unwrap();
        assert!(matches!(came, Ready::Yes), "what came is seen");
    }
}
