//! Asking a running worker through its status socket: what `status`, `reload`, `stop`,
//! `metrics`, `top` and the supervisor use.
//!
//! The socket lives in `state_dir/worker/`, where the worker's user (and so every job) writes.
//! So the client opens the socket file without following a link and only if the directory's
//! owner owns it, connects through that descriptor (nothing renamed over the path meanwhile
//! is reached), never waits for a connection the server does not accept, takes the answer only
//! from the worker's own pid (SO_PEERCRED), and bounds the whole exchange in time and size.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, UnixAddr};

use super::Doc;
use crate::error::{Error, Result};
use crate::text::ShowPath;

/// Largest status document a client reads.
const MAX_STATUS: u64 = 1 << 20;
/// Largest metrics text a client reads.
const MAX_METRICS: u64 = 64 << 20;
/// The longest a connect waits for the server to accept.
const CONNECT_WAIT: Duration = Duration::from_secs(2);
/// The longest a whole answer takes to arrive.
const ANSWER_WAIT: Duration = Duration::from_secs(3);

/// Connects to the socket at `path` as described above, within [`CONNECT_WAIT`].
fn connect(path: &Path) -> Result<UnixStream> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Err(Error::Invalid(format!(
            "bad status socket path \"{}\"",
            path.shown()
        )));
    };
    let target = crate::ops::safefs::Dir::open(dir)?.socket(name)?;
    let addr = UnixAddr::new(format!("/proc/self/fd/{}", target.as_raw_fd()).as_str())
        .map_err(|e| Error::io("status socket address", e.into()))?;
    let fd = socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| Error::io("status socket", e.into()))?;
    let deadline = Instant::now() + CONNECT_WAIT;
    loop {
        match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => break,
            // The server's backlog is full: it is busy, or it is no server at all.
            Err(Errno::EAGAIN) | Err(Errno::EINTR) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(Errno::EAGAIN) => {
                return Err(Error::Peer(format!(
                    "\"{}\" accepted no connection within {}",
                    path.shown(),
                    crate::clock::human(CONNECT_WAIT)
                )))
            }
            Err(e) => {
                return Err(Error::io_path(
                    "connecting to status socket",
                    path,
                    e.into(),
                ))
            }
        }
    }
    drop(target);
    let stream = UnixStream::from(fd);
    stream
        .set_nonblocking(false)
        .map_err(|e| Error::io("status socket", e))?;
    Ok(stream)
}

/// Connects to the worker's socket, checking who serves it (see [`query`]), and asks `request`.
fn ask(path: &Path, pid: Option<i32>, request: &str, limit: u64) -> Result<String> {
    let mut c = connect(path)?;
    if let Some(pid) = pid {
        let peer = socket::getsockopt(&c, socket::sockopt::PeerCredentials)
            .map_err(|e| Error::io_path("checking status socket", path, e.into()))?;
        if peer.pid() != pid {
            return Err(Error::Unsafe(format!(
                "\"{}\" is served by pid {}, not the worker (pid {pid}): ignoring it",
                path.shown(),
                peer.pid()
            )));
        }
    }
    let deadline = Instant::now() + ANSWER_WAIT;
    c.set_write_timeout(Some(ANSWER_WAIT))
        .map_err(|e| Error::io("status socket", e))?;
    // A worker too old to read requests answers with its status all the same, and closes
    // with our request unread: the kernel then resets the connection after its answer.
    let _ = c.write_all(format!("{request}\n").as_bytes());
    let mut body = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Peer(if body.is_empty() {
                // Waiting in the backlog: a worker that cannot accept (its log says why, e.g.
                // out of descriptors), or one too busy to.
                format!(
                    "\"{}\" gave no answer within {} (the worker's log may say why)",
                    path.shown(),
                    crate::clock::human(ANSWER_WAIT)
                )
            } else {
                format!(
                    "\"{}\" did not finish its answer within {}",
                    path.shown(),
                    crate::clock::human(ANSWER_WAIT)
                )
            }));
        }
        c.set_read_timeout(Some(left))
            .map_err(|e| Error::io("status socket", e))?;
        match c.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) if (body.len() + n) as u64 > limit => {
                return Err(Error::Peer(format!(
                    "\"{}\" answered with more than {limit} bytes: ignoring it",
                    path.shown()
                )))
            }
            Ok(n) => body.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // The time is up: said above.
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !body.is_empty() => break,
            Err(e) => return Err(Error::io_path("reading status socket", path, e)),
        }
    }
    String::from_utf8(body)
        .map_err(|_| Error::Peer(format!("\"{}\" answered with non-UTF-8", path.shown())))
}

/// The worker's metrics text, through its status socket (see [`query`] for `pid`).
pub fn query_metrics(path: &Path, pid: Option<i32>) -> Result<String> {
    let body = ask(path, pid, "metrics", MAX_METRICS)?;
    if body.starts_with('{') {
        return Err(Error::Peer(
            "the running worker is too old to serve metrics: reload it to run this version".into(),
        ));
    }
    Ok(body)
}

/// Asks the worker for its counters as data (`top`): what the exposition renders, as JSON.
pub fn query_counts(path: &Path, pid: Option<i32>) -> Result<crate::metrics::carry::Counts> {
    let body = ask(path, pid, "counts", MAX_METRICS)?;
    serde_json::from_str(&body).map_err(|_| {
        Error::Peer("the running worker does not serve counts (an older version): reload it".into())
    })
}

/// Asks the worker whose socket is `path` for its status. The socket lives where the worker's
/// user writes, so with `pid` the answer is taken only from that process (the kernel's
/// SO_PEERCRED), never from whatever else a planted socket or link leads to.
pub fn query(path: &Path, pid: Option<i32>) -> Result<Doc> {
    let body = ask(path, pid, "status", MAX_STATUS)?;
    serde_json::from_str(&body)
        .map_err(|e| Error::Peer(format!("unreadable status from \"{}\": {e}", path.shown())))
}

/// A worker that answers on `socket` though no lock says one runs (its pidfile was removed):
/// its pid, as its answer gives it and the kernel confirms (the socket's server is that
/// process), never to be signalled on that word alone; None when nothing answers there (no
/// socket, or one nobody listens on).
pub fn unlocked_worker(socket: &Path) -> Option<i32> {
    let said = i32::try_from(query(socket, None).ok()?.pid).ok()?;
    // The kernel's word, as this pid namespace sees the server; a worker in a namespace of its
    // own (a container) gives its pid there.
    let server = socket::getsockopt(&connect(socket).ok()?, socket::sockopt::PeerCredentials)
        .ok()?
        .pid();
    (server > 0 && (server == said || crate::ops::procfs::innermost_pid(server) == Some(said)))
        .then_some(server)
}

/// What the CLI says of [`unlocked_worker`]'s worker.
pub fn unlocked_words(pidfile: &Path, pid: i32) -> String {
    format!(
        "no worker holds the pidfile \"{}\", but pid {pid} answers on its status socket: the pidfile was removed; the worker makes it again within seconds where it may write it (ask again), else `kill -TERM {pid}` stops it (not done here: a pid that only a socket gives is never signalled)",
        pidfile.shown()
    )
}

/// Refuses a fresh start beside a worker of `state_dir` whose pidfile was removed (it still
/// answers on its status socket): never a second worker on the same state.
pub fn refuse_beside_unlocked(state_dir: &Path) -> crate::Result<()> {
    use crate::ops::layout;
    let socket = layout::worker_dir(state_dir).join(layout::SOCKET);
    match unlocked_worker(&socket) {
        Some(pid) => Err(crate::Error::Msg(unlocked_words(
            &state_dir.join(layout::PIDFILE),
            pid,
        ))),
        None => Ok(()),
    }
}

/// Like [`query`], retrying for up to `patience` (the socket is briefly gone during a re-exec).
pub fn query_patiently(path: &Path, pid: Option<i32>, patience: Duration) -> Result<Doc> {
    let deadline = Instant::now() + patience;
    loop {
        match query(path, pid) {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}
