//! One thread that answers short requests on a listening socket, whatever its clients do: what
//! the status socket and the `/metrics` endpoint share.
//!
//! Every client is held in one poll loop with deadlines (no thread per client), at most
//! [`Limits::clients`] at once. A client is answered as soon as its request is whole, often in
//! the round it is accepted; when the room is full, the clients that have waited longest for a
//! request of their own are closed to make room for the newest (after a last look at those: a
//! request sent just after its connect is in by then). So idle or trickling clients, however many and
//! however often they come back, cost a slot each for a moment, and a client that sends its
//! request at once (the CLI, a Prometheus scrape) is answered behind none of them. A client that
//! waited in the backlog while others were served had time to send its request: it is
//! answered on accept.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// What a server allows each client.
pub struct Limits {
    /// The server's name in the log.
    pub what: &'static str,
    /// Clients held at once.
    pub clients: usize,
    /// The longest request read.
    pub request_bytes: usize,
    /// From accept until the request is whole.
    pub request_wait: Duration,
    /// From accept until the answer is written.
    pub budget: Duration,
    /// After the stop: how long the clients already accepted get to be answered.
    pub drain: Duration,
}

/// What a server answers.
pub trait Protocol {
    /// The answer to the request `got` (everything the client sent), or None while more may
    /// come. `ended`: no more will (the client closed its side, its time is up, or it sent
    /// [`Limits::request_bytes`]). An empty answer closes the connection unanswered.
    fn answer(&self, got: &[u8], ended: bool) -> Option<Vec<u8>>;
}

/// A listening socket whose connections are streams.
pub trait Listen: AsFd {
    type Stream: Read + Write + AsFd;
    /// Accepts one waiting connection, non-blocking.
    fn take(&self) -> std::io::Result<Self::Stream>;
}

impl Listen for std::net::TcpListener {
    type Stream = std::net::TcpStream;
    fn take(&self) -> std::io::Result<Self::Stream> {
        let (s, _) = self.accept()?;
        s.set_nonblocking(true)?;
        Ok(s)
    }
}

impl Listen for std::os::unix::net::UnixListener {
    type Stream = std::os::unix::net::UnixStream;
    fn take(&self) -> std::io::Result<Self::Stream> {
        let (s, _) = self.accept()?;
        s.set_nonblocking(true)?;
        Ok(s)
    }
}

/// The longest path a unix socket address holds (`sun_path`, less its terminating NUL).
const SOCKET_PATH_MAX: usize = 107;

/// Binds a unix stream socket at `path`. A path longer than an address holds (a `state_dir`
/// a few directories deep) is bound through its directory's descriptor, as
/// `/proc/self/fd/N/NAME`; clients connect the same way (`status::client`).
pub fn bind_unix(path: &std::path::Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::net::UnixListener;
    if path.as_os_str().len() <= SOCKET_PATH_MAX {
        return UnixListener::bind(path);
    }
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return UnixListener::bind(path);
    };
    use nix::fcntl::OFlag;
    let flags = OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC;
    let dir = nix::fcntl::open(dir, flags, nix::sys::stat::Mode::empty())?;
    // SAFETY: open(2) just returned this descriptor and nothing else owns it.
    let dir = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dir) };
    let mut through = std::path::PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    through.push(name);
    UnixListener::bind(through)
}

/// Whether a listener's address `local` is what [`bind_unix`] binds for `path`: the path
/// itself, or, for a path too long for an address, its name under a directory's descriptor.
pub fn bound_at(local: &std::os::unix::net::SocketAddr, path: &std::path::Path) -> bool {
    let Some(bound) = local.as_pathname() else {
        return false;
    };
    if path.as_os_str().len() <= SOCKET_PATH_MAX {
        return bound == path;
    }
    bound.file_name() == path.file_name()
        && bound.parent().is_some_and(|d| {
            d.strip_prefix("/proc/self/fd")
                .is_ok_and(|n| n.to_str().is_some_and(|n| n.parse::<u32>().is_ok()))
        })
}

/// Connections accepted in one round at most (the others wait in the backlog for the next):
/// a server holds at most [`Limits::clients`] and this many descriptors for a moment.
const ACCEPT_ROUND: usize = 16;
/// How long accepting rests after it failed (out of descriptors, say).
const ACCEPT_REST: Duration = Duration::from_millis(50);

struct Client<S> {
    stream: S,
    accepted: Instant,
    got: Vec<u8>,
    /// The answer, once the request is whole, and how much of it is written.
    out: Option<(Vec<u8>, usize)>,
}

enum Next {
    Keep,
    Close,
}

impl<S: Read + Write + AsFd> Client<S> {
    fn reading(&self) -> bool {
        self.out.is_none()
    }

    /// Reads what arrived and answers once the request is whole; writes what the socket takes.
    fn step(&mut self, proto: &impl Protocol, limits: &Limits, now: Instant) -> Next {
        if self.reading() {
            // What arrived is read even when the time is up: a request that came with the
            // deadline is answered as asked.
            let mut ended = false;
            let mut chunk = [0u8; 1024];
            while !ended && self.got.len() < limits.request_bytes {
                let room = (limits.request_bytes - self.got.len()).min(chunk.len());
                match self.stream.read(&mut chunk[..room]) {
                    Ok(0) => ended = true,
                    Ok(n) => self.got.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => return Next::Close,
                }
            }
            ended |= now >= self.accepted + limits.request_wait
                || self.got.len() >= limits.request_bytes;
            match proto.answer(&self.got, ended) {
                Some(answer) if answer.is_empty() => return Next::Close,
                Some(answer) => self.out = Some((answer, 0)),
                None if ended => return Next::Close,
                None => return Next::Keep,
            }
        }
        let Some((answer, written)) = self.out.as_mut() else {
            return Next::Keep;
        };
        while *written < answer.len() {
            match self.stream.write(&answer[*written..]) {
                Ok(0) => return Next::Close,
                Ok(n) => *written += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    return if now >= self.accepted + limits.budget {
                        Next::Close
                    } else {
                        Next::Keep
                    };
                }
                Err(_) => return Next::Close,
            }
        }
        // All written: the end of the answer, said before the close so a request the client
        // sent beyond what was read cannot turn the close into a reset that loses it.
        let _ = nix::sys::socket::shutdown(
            self.stream.as_fd().as_raw_fd(),
            nix::sys::socket::Shutdown::Write,
        );
        Next::Close
    }

    /// When this client next needs a look without a poll event.
    fn deadline(&self, limits: &Limits) -> Instant {
        self.accepted
            + if self.reading() {
                limits.request_wait
            } else {
                limits.budget
            }
    }
}

/// Answers clients of `listener` with `proto` until `wake` is readable, then answers the
/// clients already accepted for at most [`Limits::drain`] more and returns: the connections
/// still in the backlog wait there for whoever accepts next (the next generation). `refused`
/// is told of each failure to accept (and of each success, to say when accepting works again).
pub fn serve<L: Listen>(
    listener: &L,
    wake: BorrowedFd<'_>,
    limits: &Limits,
    proto: &impl Protocol,
    accepting: &mut crate::ops::logging::Recurring,
) {
    let mut clients: VecDeque<Client<L::Stream>> = VecDeque::new();
    let mut stopping: Option<Instant> = None;
    let mut rest_until: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if let Some(until) = stopping {
            if clients.is_empty() || now >= until {
                return;
            }
        }
        let listening = stopping.is_none() && rest_until.is_none_or(|t| now >= t);
        let mut fds = Vec::with_capacity(clients.len() + 2);
        fds.push(PollFd::new(wake, PollFlags::POLLIN));
        fds.push(PollFd::new(
            listener.as_fd(),
            if listening {
                PollFlags::POLLIN
            } else {
                PollFlags::empty()
            },
        ));
        let mut next = stopping.or(rest_until);
        for c in &clients {
            let flags = if c.reading() {
                PollFlags::POLLIN
            } else {
                PollFlags::POLLOUT
            };
            fds.push(PollFd::new(c.stream.as_fd(), flags));
            let d = c.deadline(limits);
            next = Some(next.map_or(d, |n| n.min(d)));
        }
        let timeout = next.map_or(PollTimeout::NONE, |d| {
            let ms = d.saturating_duration_since(now).as_millis() + 1;
            PollTimeout::try_from(ms.min(60_000) as i32).unwrap_or(PollTimeout::NONE)
        });
        match poll(&mut fds, timeout) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                log::error!(
                    "{}: poll: {e}; no more answers in this generation",
                    limits.what
                );
                return;
            }
        }
        let woken = fds[0].any().unwrap_or(true);
        let acceptable = listening && fds[1].any().unwrap_or(false);
        let ready: Vec<bool> = fds[2..].iter().map(|f| f.any().unwrap_or(true)).collect();
        drop(fds);
        let now = Instant::now();
        let mut i = 0;
        clients.retain_mut(|c| {
            let look = ready.get(i).copied().unwrap_or(false) || now >= c.deadline(limits);
            i += 1;
            !look || matches!(c.step(proto, limits, now), Next::Keep)
        });
        if woken && stopping.is_none() {
            stopping = Some(now + limits.drain);
            continue;
        }
        if rest_until.is_some_and(|t| now >= t) {
            rest_until = None;
        }
        if acceptable {
            rest_until = accept_round(listener, &mut clients, limits, proto, accepting);
        }
    }
}

/// Accepts what waits (at most [`ACCEPT_ROUND`]), answering each at once when its request is
/// there, and makes room as the module says. Some(until) when accepting must rest.
fn accept_round<L: Listen>(
    listener: &L,
    clients: &mut VecDeque<Client<L::Stream>>,
    limits: &Limits,
    proto: &impl Protocol,
    accepting: &mut crate::ops::logging::Recurring,
) -> Option<Instant> {
    let mut rest = None;
    let held = clients.len();
    for _ in 0..ACCEPT_ROUND {
        let stream = match listener.take() {
            Ok(s) => {
                accepting.worked();
                s
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => {
                // Out of descriptors, say: the client waits in the backlog; rest rather than
                // spin, and say it once, not every time.
                accepting.failed(&e);
                rest = Some(Instant::now() + ACCEPT_REST);
                break;
            }
        };
        let now = Instant::now();
        let mut client = Client {
            stream,
            accepted: now,
            got: Vec::new(),
            out: None,
        };
        if let Next::Keep = client.step(proto, limits, now) {
            clients.push_back(client);
        }
    }
    if clients.len() > limits.clients {
        // A last look at this round's newcomers before any is closed.
        let (now, mut i) = (Instant::now(), 0);
        clients.retain_mut(|c| {
            i += 1;
            i <= held || !c.reading() || matches!(c.step(proto, limits, now), Next::Keep)
        });
    }
    // The oldest first: the front of the queue. An answer under way is finished, over the room
    // for a moment if it must.
    while clients.len() > limits.clients {
        match clients.iter().position(|c| c.reading()) {
            Some(oldest) => drop(clients.remove(oldest)),
            None => break,
        }
    }
    rest
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::net::{UnixListener, UnixStream};

    /// Answers a line with its length; an empty line closes unanswered.
    struct Lines;

    impl Protocol for Lines {
        fn answer(&self, got: &[u8], ended: bool) -> Option<Vec<u8>> {
            match got.iter().position(|b| *b == b'\n') {
                Some(0) => Some(Vec::new()),
                Some(n) => Some(format!("{n}\n").into_bytes()),
                None if ended => Some(b"none\n".to_vec()),
                None => None,
            }
        }
    }

    fn limits() -> Limits {
        Limits {
            what: "test",
            clients: 4,
            request_bytes: 16,
            request_wait: Duration::from_millis(100),
            budget: Duration::from_secs(1),
            drain: Duration::from_millis(300),
        }
    }

    fn ask(path: &std::path::Path, request: &[u8]) -> String {
        let mut c = UnixStream::connect(path).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        c.write_all(request).unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    }

    #[test]
    fn idle_clients_make_room_and_requests_are_answered() {
        let dir = std::env::temp_dir().join(format!("gs-serve-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let (woken, wake) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
        let server = std::thread::spawn(move || {
            let mut r = crate::ops::logging::Recurring::new("test: accept", "test: again");
            serve(&listener, woken.as_fd(), &limits(), &Lines, &mut r);
        });
        // Far more idle clients than the room: each makes way for the next.
        let idle: Vec<UnixStream> = (0..200)
            .map(|_| UnixStream::connect(&path).unwrap())
            .collect();
        assert_eq!(ask(&path, b"abc\n"), "3\n");
        // Silence is answered after the request's time; an empty line closes unanswered.
        let started = Instant::now();
        assert_eq!(ask(&path, b""), "none\n");
        assert!(started.elapsed() >= Duration::from_millis(100));
        assert_eq!(ask(&path, b"\n"), "");
        assert_eq!(ask(&path, b"a request far too long\n"), "none\n");
        // The stop answers a client already accepted, then returns.
        let mut late = UnixStream::connect(&path).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        drop(wake);
        late.write_all(b"xy\n").unwrap();
        let mut out = String::new();
        late.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = late.read_to_string(&mut out);
        server.join().unwrap();
        assert_eq!(out, "2\n");
        drop(idle);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_path_longer_than_an_address_is_bound_and_known_again() {
        let base = std::env::temp_dir().join(format!("gs-serve-long-{}", std::process::id()));
        let dir = base.join("d".repeat(120));
        std::fs::create_dir_all(&dir).unwrap();
        let (path, short) = (dir.join("s.sock"), base.join("s.sock"));
        let listener = bind_unix(&path).unwrap();
        let local = listener.local_addr().unwrap();
        assert!(bound_at(&local, &path), "{local:?}");
        assert!(!bound_at(&local, &dir.join("t.sock")));
        let near = bind_unix(&short).unwrap().local_addr().unwrap();
        assert!(bound_at(&near, &short) && !bound_at(&near, &path));
        // A client reaches it through the file's descriptor, as `status::client` does.
        let file = std::fs::File::open(&dir).unwrap();
        let via = format!("/proc/self/fd/{}/s.sock", file.as_raw_fd());
        drop(UnixStream::connect(via).unwrap());
        let _ = std::fs::remove_dir_all(&base);
    }
}
