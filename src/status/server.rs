//! The status socket's server. A client writes one request line (`status`, `metrics` or
//! `counts`) and reads the answer: the JSON status document, the Prometheus text, or the
//! counters as JSON (for `top`). A client that writes
//! nothing gets the status after [`REQUEST_WAIT`] (older clients).
//!
//! Nothing a client does can hold the worker: the server's thread waits on the socket and on a
//! pipe only we hold (never on the socket's path, which the worker's user, and so every job,
//! can remove or replace), answers each client within [`CLIENT_BUDGET`] in all, at most
//! [`MAX_CLIENTS`] held at once, and stopping waits for those answers at most that long. A
//! crowd of clients that say nothing (a job of the worker's user can make thousands) holds
//! nobody else up: each makes way for the next, and a client that sends its request at once,
//! as the CLI does, is answered when it is accepted (`ops::serve`).

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::State;
use crate::error::{Error, Result};
use crate::text::ShowPath;

/// How long the server waits for a request line before answering with the status.
pub const REQUEST_WAIT: Duration = Duration::from_millis(100);
/// Everything one client gets: its request and our whole answer.
const CLIENT_BUDGET: Duration = Duration::from_secs(1);
/// Clients held at once (descriptors: the worker keeps 96 for itself, see
/// `source::zeromq`); more wait in the listen backlog, or make way (`ops::serve`).
const MAX_CLIENTS: usize = 16;

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
    /// The socket's path, and what the thread serves (kept to serve a socket bound again:
    /// [`Server::renew`]).
    path: PathBuf,
    serving: Option<(Arc<State>, Answers)>,
    /// A thread serving a socket no path reached any more, ending on its own.
    retired: Option<JoinHandle<()>>,
    /// Binding it again failed, and was said.
    renew_said: bool,
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
                .is_ok_and(|a| crate::ops::serve::bound_at(&a, path));
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
            path: path.to_path_buf(),
            serving: None,
            retired: None,
            renew_said: false,
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
        self.serving = Some((Arc::clone(&state), answers.clone()));
        let listener = Arc::clone(&self.listener);
        let thread = crate::ops::signals::spawn_essential("status", move || {
            let mut accepting = crate::ops::logging::Recurring::new(
                "status socket: cannot accept a client, trying again",
                "status socket: accepting clients again",
            );
            let limits = crate::ops::serve::Limits {
                what: "status socket",
                clients: MAX_CLIENTS,
                request_bytes: 16,
                request_wait: REQUEST_WAIT,
                budget: CLIENT_BUDGET,
                drain: CLIENT_BUDGET,
            };
            let requests = Requests {
                state: &state,
                answers: &answers,
            };
            crate::ops::serve::serve(
                &*listener,
                woken.as_fd(),
                &limits,
                &requests,
                &mut accepting,
            )
        })
        .map_err(|e| Error::io("spawning status thread", e))?;
        self.thread = Some(thread);
        Ok(())
    }

    /// The listening socket and the file's identity, for the hand-over.
    pub fn handed(&self) -> (BorrowedFd<'_>, (u64, u64)) {
        (self.listener.as_fd(), self.ident)
    }

    /// Stops taking connections: the server's thread answers the clients it holds and ends
    /// on its own while the caller goes on ([`Server::stop`] then waits for it).
    pub fn close(&mut self) {
        // Closing the write end makes the read end readable (EOF): the loop wakes.
        drop(self.wake.take());
    }

    /// Stops answering and joins the server's thread; answers under way get at most
    /// [`CLIENT_BUDGET`] to finish (before execve, so no reply is cut short by it). The socket
    /// stays open: connections wait in its backlog.
    pub fn stop(&mut self) {
        self.close();
        for t in [self.thread.take(), self.retired.take()]
            .into_iter()
            .flatten()
        {
            let _ = t.join();
        }
    }

    /// The socket file removed or replaced while the worker serves (a job can: the worker's
    /// user owns `worker/`; a clean-up of "stale" sockets): `status`, `metrics`, `top` and
    /// `reload` could not reach the worker until its next restart. Looked at with the pidfile
    /// (every 5 s): bound again at its path and served there; the thread on the old socket
    /// answers the clients it holds and ends. A directory removed is left as it is (see
    /// `layout::prepare`: a worker no longer root cannot make it again).
    pub fn renew(&mut self) {
        if socket_ident(&self.path) == Some(self.ident)
            || self.path.parent().is_some_and(|d| !d.exists())
        {
            return;
        }
        let Some((state, answers)) = self.serving.clone() else {
            return;
        };
        let bound = bind(&self.path).and_then(|(l, ident)| {
            l.set_nonblocking(true)
                .map_err(|e| Error::io_path("status socket", &self.path, e))?;
            Ok((l, ident))
        });
        let (listener, ident) = match bound {
            Ok(b) => b,
            Err(e) => {
                if !std::mem::replace(&mut self.renew_said, true) {
                    log::warn!("status socket: removed or replaced, and cannot be bound again: {e}; `gearshift status` cannot reach the worker until it can (looked at every 5 s)");
                }
                return;
            }
        };
        self.renew_said = false;
        self.close();
        if let Some(old) = self.thread.take() {
            if let Some(done) = self.retired.replace(old) {
                let _ = done.join();
            }
        }
        self.listener = Arc::new(listener);
        self.ident = ident;
        match self.start(state, answers) {
            Ok(()) => log::warn!(
                "status socket \"{}\" was removed or replaced: bound again",
                self.path.shown()
            ),
            Err(e) => log::error!("status socket: bound again, but not served: {e}"),
        }
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
    let listener = crate::ops::serve::bind_unix(path)
        .map_err(|e| Error::io_path("binding status socket", path, e))?;
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
            aside.shown()
        ),
        Err(e) => log::error!("status socket: cannot move \"{}\" aside: {e}", path.shown()),
    }
}

/// What the socket answers besides the status document: the exposition (`metrics`) and the
/// counters as JSON (`counts`), each rendered when asked.
#[derive(Clone)]
pub struct Answers {
    pub metrics: crate::metrics::http::Render,
    pub counts: crate::metrics::http::Render,
}

/// The status socket's requests: a line (`status`, `metrics` or `counts`), or nothing within
/// [`REQUEST_WAIT`] (older clients), which asks for the status.
struct Requests<'a> {
    state: &'a State,
    answers: &'a Answers,
}

impl crate::ops::serve::Protocol for Requests<'_> {
    fn answer(&self, got: &[u8], ended: bool) -> Option<Vec<u8>> {
        let line = match got.iter().position(|b| *b == b'\n') {
            Some(n) => &got[..n],
            None if ended => got,
            None => return None,
        };
        let body = match line {
            b"metrics" => (self.answers.metrics)(),
            b"counts" => (self.answers.counts)(),
            _ => {
                let mut b = serde_json::to_string(&self.state.doc()).unwrap_or_else(|e| {
                    // Never an empty answer that reads as a broken worker: say why.
                    log::error!("encoding the status document: {e}");
                    serde_json::json!({ "error": format!("encoding the status document: {e}") })
                        .to_string()
                });
                b.push('\n');
                b
            }
        };
        Some(body.into_bytes())
    }
}
