//! The `/metrics` endpoint: a minimal HTTP/1.1 responder on its own threads.
//!
//! The listening socket is bound once, at the first start, and handed across every re-exec
//! (like the pidfile lock): connections that arrive while the process execs wait in the
//! kernel's accept queue and are answered by the next image, so a scrape never meets a
//! refused connection during a reload. Before exec the accept thread stops and the answers
//! under way are given up to [`DRAIN`] to finish.
//!
//! Bounded: at most [`MAX_CONNECTIONS`] connections held at once, all on one thread
//! (`ops::serve`), a request head of at most 8 KiB read within 2 s, a response written within
//! 5 s more. A slowloris, however many connections it opens and however often it comes back,
//! holds no scrape up: a connection that has not sent its whole head makes way for a new one,
//! and a scrape that sends its request at once is answered when it is accepted.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Error, Result};

/// Connections held at once (descriptors: the worker keeps 96 for itself, see
/// `source::zeromq`).
pub const MAX_CONNECTIONS: usize = 16;
/// How long answers under way may take to finish when the endpoint stops (before an exec).
pub const DRAIN: Duration = Duration::from_millis(500);
const MAX_HEAD: usize = 8 * 1024;
/// How long a client has to send its whole request head.
const HEAD_WAIT: Duration = Duration::from_secs(2);
/// How long writing the response may take after that.
const WRITE_WAIT: Duration = Duration::from_secs(5);

/// What produces the exposition text.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The listening socket for `addr`: the one the previous image handed over when it is still
/// a listening TCP socket on that address, else a new one (an address changed by a reload is
/// bound anew and the old socket closed).
pub fn listener(addr: SocketAddr, carried: Option<RawFd>) -> Result<TcpListener> {
    let mut was = None;
    if let Some(fd) = crate::ops::handover::adopt(carried, |what| {
        what.to_string_lossy().starts_with("socket:")
    }) {
        let l = TcpListener::from(fd);
        let listening = nix::sys::socket::getsockopt(&l, nix::sys::socket::sockopt::AcceptConn)
            .unwrap_or(false);
        // Port 0 asks for any free port: the one bound at the first start is kept.
        let same = l
            .local_addr()
            .is_ok_and(|a| a == addr || (addr.port() == 0 && a.ip() == addr.ip()));
        if listening && same {
            defer_accept(&l);
            return Ok(l);
        }
        was = l.local_addr().ok();
    }
    let bound = TcpListener::bind(addr).map_err(|e| {
        Error::Msg(format!(
            "[metrics] listen = \"{addr}\": cannot listen there: {e}{}",
            if e.kind() == std::io::ErrorKind::AddrInUse {
                " (another process has that port; choose another)"
            } else {
                ""
            }
        ))
    })?;
    if let Some(was) = was {
        log::info!("metrics: listening on {addr} now (was {was})");
    }
    defer_accept(&bound);
    Ok(bound)
}

/// Asks the kernel to hand over a connection only once its request has begun to arrive (or
/// [`HEAD_WAIT`] has passed): `TCP_DEFER_ACCEPT`. A flood of connections that send nothing
/// then waits in the kernel, not in the sixteen slots, and a scrape slow to send its request
/// after its connect (a scraper descheduled on a busy host) is not pushed out by the flood
/// before it does. The kernel holds as many such connections as the backlog (past it, SYN
/// cookies make them whole without waiting), so the backlog is raised from std's 128 to
/// `SOMAXCONN` (`listen` again on a listening socket only sets it). Done on a carried
/// listener too (a binary before this one handed it over). Without either (an error, which
/// Linux does not give a TCP listener) the slots still hold.
fn defer_accept(l: &TcpListener) {
    if let Err(e) = nix::sys::socket::listen(l, nix::sys::socket::Backlog::MAXCONN) {
        log::debug!("metrics: listen backlog: {e}");
    }
    let secs = HEAD_WAIT.as_secs() as libc::c_int;
    // SAFETY: the descriptor is the listening socket `l` owns for the whole call; the value is
    // a c_int on this stack frame, passed with its size, which setsockopt only reads.
    let rc = unsafe {
        libc::setsockopt(
            l.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&secs as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        log::debug!(
            "metrics: TCP_DEFER_ACCEPT: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// The running endpoint.
pub struct Server {
    listener: Arc<TcpListener>,
    wake: Option<OwnedFd>,
    /// The wake-up pipe's read end, made with the server, until its loop starts.
    woken: Option<OwnedFd>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    /// Takes every descriptor the server needs (the wake-up pipe), without its thread yet.
    pub fn prepare(listener: TcpListener) -> Result<Server> {
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("metrics socket", e))?;
        let (woken, wake) = wake_pipe()?;
        Ok(Server {
            listener: Arc::new(listener),
            wake: Some(wake),
            woken: Some(woken),
            thread: None,
        })
    }

    /// Starts accepting: after [`Server::prepare`], or again after [`Server::pause`] (an
    /// execve that failed).
    pub fn resume(&mut self, render: Render) -> Result<()> {
        let wake_r = match self.woken.take() {
            Some(r) => r,
            None => {
                let (r, w) = wake_pipe()?;
                self.wake = Some(w);
                r
            }
        };
        let listener = Arc::clone(&self.listener);
        let thread = crate::ops::signals::spawn_essential("metrics", move || {
            let mut accepting = crate::ops::logging::Recurring::new(
                "metrics: cannot accept a connection, trying again",
                "metrics: accepting connections again",
            );
            let limits = crate::ops::serve::Limits {
                what: "metrics",
                clients: MAX_CONNECTIONS,
                request_bytes: MAX_HEAD,
                request_wait: HEAD_WAIT,
                budget: HEAD_WAIT + WRITE_WAIT,
                drain: DRAIN,
            };
            let requests = Requests(&render);
            crate::ops::serve::serve(
                &*listener,
                wake_r.as_fd(),
                &limits,
                &requests,
                &mut accepting,
            )
        })
        .map_err(|e| Error::io("spawning metrics thread", e))?;
        self.thread = Some(thread);
        Ok(())
    }

    /// The listening socket's descriptor (to hand across exec).
    pub fn fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }

    /// Stops accepting (connections queue in the kernel meanwhile) and waits up to [`DRAIN`]
    /// for the answers under way. The socket stays open.
    pub fn pause(&mut self) {
        // Closing the write end makes the read end readable (EOF): the loop wakes, answers
        // what it holds for at most DRAIN, and ends.
        drop(self.wake.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Borrows the listening socket (to keep it across exec).
    pub fn socket(&self) -> std::os::fd::BorrowedFd<'_> {
        self.listener.as_fd()
    }
}

fn wake_pipe() -> Result<(OwnedFd, OwnedFd)> {
    nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| Error::io("metrics wake pipe", e.into()))
}

/// HTTP requests: a head (up to the blank line) answered with the exposition; a head too
/// long, cut short or not all there within [`HEAD_WAIT`] (one deadline for the whole head: a
/// client trickling a byte at a time holds its slot no longer) closes unanswered.
struct Requests<'a>(&'a Render);

impl crate::ops::serve::Protocol for Requests<'_> {
    fn answer(&self, got: &[u8], ended: bool) -> Option<Vec<u8>> {
        let whole =
            got.windows(4).any(|w| w == b"\r\n\r\n") || got.windows(2).any(|w| w == b"\n\n");
        if !whole {
            return ended.then(Vec::new);
        }
        let Ok(head) = std::str::from_utf8(got) else {
            return Some(Vec::new());
        };
        let (status, body, head_only) = route(head, self.0);
        let mut reply = format!(
            "HTTP/1.1 {status}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            if status.starts_with("200") {
                "text/plain; version=0.0.4; charset=utf-8"
            } else {
                "text/plain; charset=utf-8"
            },
            body.len()
        )
        .into_bytes();
        if !head_only {
            reply.extend_from_slice(body.as_bytes());
        }
        Some(reply)
    }
}

/// (status line, body, HEAD?) for a request head.
fn route(head: &str, render: &Render) -> (&'static str, String, bool) {
    let mut parts = head.lines().next().unwrap_or_default().split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET" | "HEAD", "/metrics") => ("200 OK", render(), method == "HEAD"),
        ("GET" | "HEAD", _) => (
            "404 Not Found",
            "gearshift serves /metrics only\n".into(),
            method == "HEAD",
        ),
        _ => ("405 Method Not Allowed", "GET /metrics\n".into(), false),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream;

    fn get(addr: SocketAddr, request: &[u8]) -> String {
        let mut c = TcpStream::connect(addr).unwrap();
        c.write_all(request).unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn answers_get_head_and_refuses_the_rest() {
        let l = listener("127.0.0.1:0".parse().unwrap(), None).unwrap();
        let addr = l.local_addr().unwrap();
        let mut server = Server::prepare(l).unwrap();
        server.resume(Arc::new(|| "up 1\n".to_string())).unwrap();
        let ok = get(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(ok.contains("Content-Length: 5\r\n") && ok.ends_with("\r\n\r\nup 1\n"));
        let head = get(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n");
        assert!(head.ends_with("\r\n\r\n"), "{head}");
        assert!(get(addr, b"GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
        assert!(get(addr, b"POST /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 405"));
        // An endless head is cut off, not buffered.
        let mut c = TcpStream::connect(addr).unwrap();
        let junk = vec![b'a'; 64 * 1024];
        let _ = c.write_all(&junk);
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        assert!(out.is_empty());
        // Paused: connections wait in the queue and are answered by whoever accepts next.
        server.pause();
        let waiting = std::thread::spawn(move || get(addr, b"GET /metrics HTTP/1.1\r\n\r\n"));
        std::thread::sleep(Duration::from_millis(50));
        let fd = server.socket().try_clone_to_owned().unwrap();
        let again = listener(addr, Some(std::os::fd::IntoRawFd::into_raw_fd(fd))).unwrap();
        let mut server2 = Server::prepare(again).unwrap();
        server2.resume(Arc::new(|| "up 2\n".to_string())).unwrap();
        assert!(waiting.join().unwrap().ends_with("up 2\n"));
    }
}
