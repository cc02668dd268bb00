//! The status socket's server. A client writes one request line (`status`, `metrics` or
//! `counts`) and reads the answer: the JSON status document, the Prometheus text, or the
//! counters as JSON (for `top`). A client that writes
//! nothing gets the status after [`REQUEST_WAIT`] (older clients).
//!
//! Nothing a client does can hold the worker: the accept thread waits on the socket and on a
//! pipe only we hold (never on the socket's path, which the worker's user, and so every job,
//! can remove or replace), each client is answered on its own thread within [`CLIENT_BUDGET`]
//! in all, at most [`MAX_CLIENTS`] at once, and stopping waits for those answers at most that
//! long.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::State;
use crate::error::{Error, Result};

/// How long the server waits for a request line before answering with the status.
pub const REQUEST_WAIT: Duration = Duration::from_millis(100);
/// Everything one client gets: its request and our whole answer.
const CLIENT_BUDGET: Duration = Duration::from_secs(1);
/// Clients answered at once; more wait in the listen backlog.
const MAX_CLIENTS: usize = 8;

/// The status socket's accept loop.
pub struct Server {
    /// Bound once per worker and handed across every exec (a query sent while the worker
    /// restarts waits in its backlog for the next generation).
    listener: Arc<UnixListener>,
    /// The socket file's identity when it was bound: a next generation adopts the socket only
    /// while the path still names it (a job may remove or replace the file).
    ident: (u64, u64),
    /// Writing a byte here (or closing it) ends the accept loop.
    wake: Option<OwnedFd>,
    /// The read end, until the loop starts ([`Server::prepare`] makes the pair, [`Server::start`]
    /// uses it: a restarted generation takes every descriptor before its lanes start).
    woken: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
    answering: Arc<InFlight>,
}

impl Server {
    /// Takes everything the server needs, without its thread: the listening socket handed over
    /// (`carried`: its descriptor and the file's identity) while `path` still names it, else
    /// `path` bound anew (a leftover socket file is replaced: we hold the pidfile lock, so no
    /// live worker owns it; anything else in the way, a directory a job made, is moved aside,
    /// and said so); and the wake-up pipe.
    pub fn prepare(path: &Path, carried: Option<(i32, (u64, u64))>) -> Result<Server> {
        let adopted = carried.and_then(|(fd, ident)| {
            let owned = crate::ops::handover::adopt(Some(fd), |what| {
                what.to_string_lossy().starts_with("socket:")
            })?;
            let listener = UnixListener::from(owned);
            let same_path = listener
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p == path))
                .unwrap_or(false);
            Some((
                listener,
                ident,
                same_path && socket_ident(path) == Some(ident),
            ))
        });
        let (listener, ident) = match adopted {
            Some((listener, ident, true)) => (listener, ident),
            // Its directory removed (see `layout::prepare`): the socket handed over, which no
            // path reaches now, rather than no status server and so no generation at all.
            Some((listener, ident, false)) if path.parent().is_some_and(|d| !d.exists()) => {
                (listener, ident)
            }
            _ => bind(path)?,
        };
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io_path("status socket", path, e))?;
        let (woken, wake) = wake_pipe()?;
        Ok(Server {
            listener: Arc::new(listener),
            ident,
            wake: Some(wake),
            woken: Some(woken),
            thread: None,
            answering: Arc::new(InFlight::default()),
        })
    }

    /// Serves `state` (and `answers`) on a thread, from a [`Server::prepare`] or after a
    /// [`Server::stop`] (an execve that failed: a new wake-up pipe).
    pub fn start(&mut self, state: Arc<State>, answers: Answers) -> Result<()> {
        let woken = match self.woken.take() {
            Some(w) => w,
            None => {
                let (woken, wake) = wake_pipe()?;
                self.wake = Some(wake);
                woken
            }
        };
        let (listener, busy) = (Arc::clone(&self.listener), Arc::clone(&self.answering));
        let thread = crate::ops::signals::spawn_essential("status", move || {
            accept_loop(&listener, &woken, &busy, &state, &answers)
        })
        .map_err(|e| Error::io("spawning status thread", e))?;
        self.thread = Some(thread);
        Ok(())
    }

    /// The listening socket and the file's identity, for the hand-over.
    pub fn handed(&self) -> (BorrowedFd<'_>, (u64, u64)) {
        (self.listener.as_fd(), self.ident)
    }

    /// Stops taking connections: the accept thread ends on its own while the caller goes on
    /// ([`Server::stop`] then waits for it).
    pub fn close(&mut self) {
        // Closing the write end makes the read end readable (EOF): the loop wakes.
        drop(self.wake.take());
    }

    /// Stops answering and joins the accept thread; answers under way get at most
    /// [`CLIENT_BUDGET`] to finish (before execve, so no reply is cut short by it). The socket
    /// stays open: connections wait in its backlog.
    pub fn stop(&mut self) {
        self.close();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        // Woken by the last answer's end, not by polling: a restart waits no longer than the
        // answers under way take.
        let Ok(count) = self.answering.count.lock() else {
            return;
        };
        let _ = self
            .answering
            .idle
            .wait_timeout_while(count, CLIENT_BUDGET, |n| *n > 0);
    }
}

/// The accept loop's wake-up pipe: (read end, write end).
fn wake_pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::io("status socket wake-up pipe", e.into()))
}

/// Binds `path` (see [`Server::prepare`]): the socket and the file's identity.
fn bind(path: &Path) -> Result<(UnixListener, (u64, u64))> {
    clear_the_way(path);
    let listener =
        UnixListener::bind(path).map_err(|e| Error::io_path("binding status socket", path, e))?;
    // The worker's group may query (connecting needs write permission on the socket), others
    // may not even reach it (its directory is 0750).
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o770));
    }
    let ident = socket_ident(path).unwrap_or_default();
    Ok((listener, ident))
}

/// The (device, inode) of the socket file at `path`, if a socket is there.
fn socket_ident(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::symlink_metadata(path).ok()?;
    m.file_type().is_socket().then(|| (m.dev(), m.ino()))
}

/// Removes a stale socket at `path`, or moves aside whatever else is there.
fn clear_the_way(path: &Path) {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if !meta.is_dir() {
        let _ = std::fs::remove_file(path);
        return;
    }
    let aside = path.with_extension(format!("in-the-way.{}", crate::clock::now_ms()));
    match std::fs::rename(path, &aside) {
        Ok(()) => log::warn!(
            "status socket: a directory was in its place; moved to \"{}\"",
            aside.display()
        ),
        Err(e) => log::error!(
            "status socket: cannot move \"{}\" aside: {e}",
            path.display()
        ),
    }
}

/// What the socket answers besides the status document: the exposition (`metrics`) and the
/// counters as JSON (`counts`), each rendered when asked.
#[derive(Clone)]
pub struct Answers {
    pub metrics: crate::metrics::http::Render,
    pub counts: crate::metrics::http::Render,
}

fn accept_loop(
    listener: &UnixListener,
    wake: &OwnedFd,
    answering: &Arc<InFlight>,
    state: &Arc<State>,
    answers: &Answers,
) {
    let mut accepting = crate::ops::logging::Recurring::new(
        "status socket: cannot accept a client, trying again",
        "status socket: accepting clients again",
    );
    let mut spawning = crate::ops::logging::Recurring::new(
        "status socket: cannot spawn a thread for a client (closed unanswered)",
        "status socket: answering clients again",
    );
    loop {
        let room = answering.count.lock().is_ok_and(|n| *n < MAX_CLIENTS);
        let mut fds = vec![PollFd::new(wake.as_fd(), PollFlags::POLLIN)];
        if room {
            fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN));
        }
        // Full: look again soon (an answer ends within its budget).
        let timeout = if room {
            PollTimeout::NONE
        } else {
            PollTimeout::from(10u8)
        };
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                log::error!("status socket: poll: {e}; no more status answers in this generation");
                return;
            }
        }
        if fds[0].any().unwrap_or(true) {
            return;
        }
        if !room {
            continue;
        }
        let conn = match listener.accept() {
            Ok((c, _)) => {
                accepting.worked();
                c
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of descriptors, say: the client waits in the backlog; back off rather
                // than spin, and say it once, not every time.
                accepting.failed(&e);
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let guard = Answering::begin(answering);
        let (state, answers) = (Arc::clone(state), answers.clone());
        let spawned = crate::ops::signals::spawn_helper("status-client", move || {
            let _guard = guard;
            answer(conn, &state, &answers);
        });
        match spawned {
            Ok(_) => spawning.worked(),
            // The closure (and the guard in it) is dropped: the count goes back down. Said
            // once while it lasts: a client (a job of the worker's user, say) may connect
            // again and again while its user's processes are used up.
            Err(e) => spawning.failed(&e),
        }
    }
}

/// The clients being answered, and a condition signalled when there are none.
#[derive(Default)]
struct InFlight {
    count: Mutex<usize>,
    idle: Condvar,
}

/// Counts a client being answered; uncounts it however the answer ends.
struct Answering(Arc<InFlight>);

impl Answering {
    fn begin(answers: &Arc<InFlight>) -> Answering {
        if let Ok(mut n) = answers.count.lock() {
            *n += 1;
        }
        Answering(Arc::clone(answers))
    }
}

impl Drop for Answering {
    fn drop(&mut self) {
        if let Ok(mut n) = self.0.count.lock() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.0.idle.notify_all();
            }
        }
    }
}

fn answer(mut c: UnixStream, state: &State, answers: &Answers) {
    let deadline = Instant::now() + CLIENT_BUDGET;
    if c.set_nonblocking(false).is_err() {
        return;
    }
    let body = match read_request(&mut c) {
        Request::Metrics => (answers.metrics)(),
        Request::Counts => (answers.counts)(),
        Request::Status => {
            let mut b = serde_json::to_string(&state.doc()).unwrap_or_default();
            b.push('\n');
            b
        }
    };
    let _ = write_by(&mut c, body.as_bytes(), deadline);
}

/// Writes `data` unless `deadline` passes first (a client that does not read).
fn write_by(c: &mut UnixStream, mut data: &[u8], deadline: Instant) -> std::io::Result<()> {
    while !data.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        c.set_write_timeout(Some(left))?;
        match c.write(data) {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

enum Request {
    Status,
    Metrics,
    /// The counters as JSON (`metrics::carry::Counts`), for `top`.
    Counts,
}

/// The client's request line (at most 16 bytes); none within [`REQUEST_WAIT`] in all: status.
fn read_request(c: &mut UnixStream) -> Request {
    let deadline = Instant::now() + REQUEST_WAIT;
    let mut buf = [0u8; 16];
    let mut n = 0;
    while n < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || c.set_read_timeout(Some(left)).is_err() {
            break;
        }
        match c.read(&mut buf[n..]) {
            Ok(0) | Err(_) => break,
            Ok(k) => {
                n += k;
                if buf[..n].contains(&b'\n') {
                    break;
                }
            }
        }
    }
    match buf[..n].split(|b| *b == b'\n').next() {
        Some(b"metrics") => Request::Metrics,
        Some(b"counts") => Request::Counts,
        _ => Request::Status,
    }
}
