//! The `/metrics` endpoint: a minimal HTTP/1.1 responder on its own threads.
//!
//! The listening socket is bound once, at the first start, and handed across every re-exec
//! (like the pidfile lock): connections that arrive while the process execs wait in the
//! kernel's accept queue and are answered by the next image, so a scrape never meets a
//! refused connection during a reload. Before exec the accept thread stops and the answers
//! under way are given up to [`DRAIN`] to finish.
//!
//! Bounded: at most [`MAX_CONNECTIONS`] connections at once (more are closed at once), a
//! request head of at most 8 KiB read within 2 s, a response written within 5 s.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::error::{Error, Result};

/// Connections answered at once.
pub const MAX_CONNECTIONS: usize = 8;
/// How long answers under way may take to finish when the endpoint stops (before an exec).
pub const DRAIN: Duration = Duration::from_millis(500);
const MAX_HEAD: usize = 8 * 1024;
/// How long a client has to send its whole request head.
const HEAD_WAIT: Duration = Duration::from_secs(2);

/// What produces the exposition text.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The listening socket for `addr`: the one the previous image handed over when it is still
/// a listening TCP socket on that address, else a new one (an address changed by a reload is
/// bound anew and the old socket closed).
pub fn listener(addr: SocketAddr, carried: Option<RawFd>) -> Result<TcpListener> {
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
            return Ok(l);
        }
        log::info!(
            "metrics: now listening on {addr} (was {:?})",
            l.local_addr().ok()
        );
    }
    TcpListener::bind(addr).map_err(|e| {
        Error::Msg(format!(
            "[metrics] listen = \"{addr}\": cannot listen there: {e}{}",
            if e.kind() == std::io::ErrorKind::AddrInUse {
                " (another process has that port; choose another)"
            } else {
                ""
            }
        ))
    })
}

/// The running endpoint.
pub struct Server {
    listener: Arc<TcpListener>,
    stop: Arc<AtomicBool>,
    wake: Option<OwnedFd>,
    /// The wake-up pipe's read end, made with the server, until its loop starts.
    woken: Option<OwnedFd>,
    active: Arc<AtomicUsize>,
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
            stop: Arc::new(AtomicBool::new(false)),
            wake: Some(wake),
            woken: Some(woken),
            active: Arc::new(AtomicUsize::new(0)),
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
        self.stop.store(false, Ordering::Release);
        let (listener, stop, active) = (
            Arc::clone(&self.listener),
            Arc::clone(&self.stop),
            Arc::clone(&self.active),
        );
        let thread = crate::ops::signals::spawn_essential("metrics", move || {
            accept_loop(&listener, &wake_r, &stop, &active, &render)
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
        self.stop.store(true, Ordering::Release);
        if let Some(w) = self.wake.take() {
            let _ = nix::unistd::write(&w, b"x");
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let deadline = Instant::now() + DRAIN;
        while self.active.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
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

fn accept_loop(
    listener: &TcpListener,
    wake: &OwnedFd,
    stop: &AtomicBool,
    active: &Arc<AtomicUsize>,
    render: &Render,
) {
    let mut accepting = crate::ops::logging::Recurring::new(
        "metrics: cannot accept a connection, trying again",
        "metrics: accepting connections again",
    );
    loop {
        let mut fds = [
            PollFd::new(listener.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake.as_fd(), PollFlags::POLLIN),
        ];
        if let Err(e) = poll(&mut fds, PollTimeout::NONE) {
            if e != nix::errno::Errno::EINTR {
                log::error!("metrics: poll: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if stop.load(Ordering::Acquire) {
            return;
        }
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    accepting.worked();
                    if active.load(Ordering::Acquire) >= MAX_CONNECTIONS {
                        continue; // dropped: closed at once
                    }
                    active.fetch_add(1, Ordering::AcqRel);
                    let (mine, render) = (Arc::clone(active), Arc::clone(render));
                    let spawned = crate::ops::signals::spawn_helper("metrics-conn", move || {
                        answer(stream, &render);
                        mine.fetch_sub(1, Ordering::AcqRel);
                    });
                    if spawned.is_err() {
                        active.fetch_sub(1, Ordering::AcqRel);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // EMFILE and the like: the connection stays queued; try again shortly
                    // (and say so once, not every time).
                    accepting.failed(&e);
                    std::thread::sleep(Duration::from_millis(100));
                    break;
                }
            }
        }
    }
}

/// Reads one request head and answers it; the connection is then closed.
fn answer(mut stream: TcpStream, render: &Render) {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
    let Some(head) = read_head(&mut stream, Instant::now() + HEAD_WAIT) else {
        return;
    };
    let (status, body, head_only) = route(&head, render);
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        if status.starts_with("200") {
            "text/plain; version=0.0.4; charset=utf-8"
        } else {
            "text/plain; charset=utf-8"
        },
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes());
    if !head_only {
        let _ = stream.write_all(body.as_bytes());
    }
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// The request head, up to the blank line; None when it is too long, cut short, or not all
/// there by `deadline` (one deadline for the whole head: a client trickling a byte at a time
/// cannot hold a slot longer than that).
fn read_head(stream: &mut TcpStream, deadline: Instant) -> Option<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        stream.set_read_timeout(Some(left)).ok()?;
        let n = stream.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return String::from_utf8(buf).ok();
        }
        if buf.len() > MAX_HEAD {
            return None;
        }
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
