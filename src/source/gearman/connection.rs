//! One TCP connection to a Gearman server: buffered packet reads and writes with bounded sizes.
//!
//! Two modes. The client (`submit`) uses it blocking, with socket timeouts. Worker lanes use
//! it non-blocking: [`Conn::start`] begins a connect without waiting, [`Conn::flush_some`]
//! writes what the socket takes, [`Conn::read_some`] reads what is there, and
//! [`Conn::next_owned`] hands out complete packets; the lane's poll loop puts a deadline on
//! every exchange, so a slow server costs only its own connection. A job assignment becomes
//! the lane's job here ([`OwnedPacket::into_assignment`]), its payload moved, not copied.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Duration;

use super::protocol::{self, DecodeError, Packet};
use super::tls::{TlsTarget, Transport};
use crate::source::lane::Claimed;

/// How long a server may take to answer a request before the connection is given up.
pub const IO_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a connection failed; every case ends with the connection being dropped.
#[derive(Debug)]
pub enum ConnError {
    Io(io::Error),
    Closed,
    Protocol(DecodeError),
    Unexpected(String),
}

impl std::fmt::Display for ConnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnError::Io(e) => write!(f, "{e}"),
            ConnError::Closed => f.write_str("connection closed by the server"),
            ConnError::Protocol(e) => write!(f, "protocol error: {e}"),
            ConnError::Unexpected(s) => f.write_str(s),
        }
    }
}

impl From<io::Error> for ConnError {
    fn from(e: io::Error) -> Self {
        ConnError::Io(e)
    }
}

pub struct Conn {
    stream: Transport,
    /// Read buffer, allocated once; `rbuf[consumed..filled]` holds bytes not yet handed out.
    rbuf: Vec<u8>,
    consumed: usize,
    filled: usize,
    pub wbuf: Vec<u8>,
    /// Bytes of `wbuf` already written (non-blocking mode).
    wpos: usize,
    magic: [u8; 4],
    max: usize,
    /// A job over `max` being read past: its first bytes are kept, the rest discarded.
    skip: Option<Skip>,
}

/// A packet that owns its data (a large payload is moved out of the read buffer, not copied).
pub struct OwnedPacket {
    pub kind: u32,
    pub data: Vec<u8>,
    /// Set for a job assignment over `max_packet_bytes`: its full data length. `data` then
    /// holds only its first bytes (the handle, function and unique id, without the payload),
    /// so the job can be failed by its handle without the payload ever being held.
    pub oversized: Option<usize>,
}

impl OwnedPacket {
    /// Parses JOB_ASSIGN_UNIQ (handle, function, unique, payload), moving the payload out.
    pub fn into_assignment(self, handle: &mut Vec<u8>) -> Result<Claimed, String> {
        let oversized = self.oversized;
        let mut data = self.data;
        let mut fields = Vec::with_capacity(3);
        let mut at = 0;
        for _ in 0..3 {
            let nul = data[at..]
                .iter()
                .position(|b| *b == 0)
                .ok_or("JOB_ASSIGN_UNIQ with too few arguments")?;
            fields.push((at, at + nul));
            at += nul + 1;
        }
        let text = |(a, b): (usize, usize)| String::from_utf8_lossy(&data[a..b]).into_owned();
        handle.clear();
        handle.extend_from_slice(&data[fields[0].0..fields[0].1]);
        let (id, function, unique) = (text(fields[0]), text(fields[1]), text(fields[2]));
        // The payload is the rest: shift it down in place (no second copy of a large payload).
        data.drain(..at);
        if oversized.is_some() {
            data = Vec::new();
        }
        Ok(Claimed {
            id,
            function,
            unique,
            payload: data,
            attempt: 1,
            submitted_ms: 0,
            unrun: oversized.map(|len| {
                format!(
                    "payload is {} bytes, over max_packet_bytes: read past and discarded unrun",
                    len.saturating_sub(at)
                )
            }),
        })
    }
}

/// An oversized job assignment being read past.
struct Skip {
    kind: u32,
    len: usize,
    left: usize,
    head: Vec<u8>,
}

/// How much of an oversized job is kept: enough for handle, function and unique id.
const SKIP_HEAD: usize = 4096;

/// The read buffer's resting size; it grows for a larger packet and shrinks back after it.
const RBUF: usize = 64 * 1024;

/// A non-blocking, close-on-exec TCP socket whose connect to `sa` has begun (EINPROGRESS);
/// poll it for writability, then look at `SO_ERROR`.
pub fn start_connect(sa: std::net::SocketAddr) -> io::Result<std::os::fd::OwnedFd> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, SockaddrStorage};
    let family = if sa.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    match connect(fd.as_raw_fd(), &SockaddrStorage::from(sa)) {
        Ok(()) | Err(nix::errno::Errno::EINPROGRESS) => Ok(fd),
        Err(e) => Err(e.into()),
    }
}

impl Conn {
    /// Connects (bounded by `timeout`) with TCP_NODELAY: without it a lock-step worker manages
    /// about 23 jobs/s (Nagle plus delayed ACK).
    pub fn connect(
        addr: &str,
        timeout: Duration,
        magic: [u8; 4],
        max: usize,
        tls: Option<&TlsTarget>,
    ) -> io::Result<Conn> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{addr}: no address"));
        let by = std::time::Instant::now() + timeout;
        for sa in crate::source::resolve::addresses_by(addr, by)? {
            match TcpStream::connect_timeout(&sa, timeout) {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    stream.set_read_timeout(Some(IO_TIMEOUT))?;
                    stream.set_write_timeout(Some(IO_TIMEOUT))?;
                    return Conn::over(stream, magic, max, tls);
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn over(
        stream: TcpStream,
        magic: [u8; 4],
        max: usize,
        tls: Option<&TlsTarget>,
    ) -> io::Result<Conn> {
        let stream = match tls {
            None => Transport::Plain(stream),
            Some((config, name)) => Transport::tls(stream, config, name.clone())?,
        };
        Ok(Conn {
            stream,
            rbuf: vec![0; RBUF],
            consumed: 0,
            filled: 0,
            wbuf: Vec::with_capacity(4096),
            wpos: 0,
            magic,
            max,
            skip: None,
        })
    }

    /// Whether the socket can be handed to the next generation across exec: plain TCP (a TLS
    /// session's state lives in this image) and at a boundary (everything queued written,
    /// nothing read and not yet handed out, no oversized job being read past).
    pub fn detachable(&self) -> bool {
        matches!(self.stream, Transport::Plain(_))
            && !self.pending()
            && self.consumed == self.filled
            && self.skip.is_none()
    }

    /// The socket, for [`Conn::detachable`] connections (None for TLS).
    pub fn into_fd(self) -> Option<std::os::fd::OwnedFd> {
        match self.stream {
            Transport::Plain(stream) => Some(stream.into()),
            Transport::Tls { .. } => None,
        }
    }

    /// A connection over a socket a previous generation handed over ([`Conn::into_fd`]): non-blocking,
    /// already connected and registered.
    pub fn adopt(fd: std::os::fd::OwnedFd, magic: [u8; 4], max: usize) -> io::Result<Conn> {
        let stream = TcpStream::from(fd);
        stream.set_nonblocking(true)?;
        stream.peer_addr()?;
        Conn::over(stream, magic, max, None)
    }

    /// Begins a non-blocking connect to `sa` (looked up beforehand: see
    /// [`crate::source::resolve`]). Poll the descriptor for writability, then call
    /// [`Conn::connected`].
    pub fn start(
        sa: std::net::SocketAddr,
        magic: [u8; 4],
        max: usize,
        tls: Option<&TlsTarget>,
    ) -> io::Result<Conn> {
        let fd = start_connect(sa)?;
        let stream = TcpStream::from(fd);
        stream.set_nodelay(true)?;
        Conn::over(stream, magic, max, tls)
    }

    /// Notices a peer that stopped answering within about `within`
    /// ([`crate::source::detect_dead_peer`]). Without it a lane asleep on a half-open
    /// connection (a host or link gone: no FIN, no RST) would wait for a NOOP forever.
    pub fn detect_dead_peer(&self, within: Duration) -> io::Result<()> {
        crate::source::detect_dead_peer(self.stream.tcp(), within)
    }

    /// After a non-blocking connect became writable: Ok if it succeeded.
    pub fn connected(&self) -> io::Result<()> {
        match self.stream.tcp().take_error()? {
            Some(e) => Err(e),
            None => self.stream.tcp().peer_addr().map(drop),
        }
    }

    /// Bytes queued and not yet written (non-blocking mode), TLS records included.
    pub fn pending(&self) -> bool {
        self.wpos < self.wbuf.len() || self.stream.wants_write()
    }

    /// Bytes received and decrypted but not yet read: read again without waiting for poll.
    pub fn buffered(&mut self) -> bool {
        self.stream.buffered()
    }

    /// Writes what the socket takes now; true once everything queued is written.
    pub fn flush_some(&mut self) -> Result<bool, ConnError> {
        while self.wpos < self.wbuf.len() {
            match self.stream.write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err(ConnError::Closed),
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.wbuf.clear();
        self.wpos = 0;
        if self.wbuf.capacity() > RBUF * 16 {
            // A large result went out: do not keep its buffer.
            self.wbuf = Vec::with_capacity(4096);
        }
        Ok(self.stream.flush_tls()?)
    }

    /// Reads what is there without blocking (non-blocking mode).
    pub fn read_some(&mut self) -> Result<(), ConnError> {
        match self.fill() {
            Err(ConnError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            other => other,
        }
    }

    /// The next complete packet already read, owning its data. A packet over 1 MiB takes the
    /// read buffer with it (no copy) and a fresh small buffer replaces it.
    pub fn next_owned(&mut self) -> Result<Option<OwnedPacket>, ConnError> {
        if self.skip.is_some() {
            return Ok(self.skip_some());
        }
        let (kind, len) =
            match protocol::decode(&self.rbuf[self.consumed..self.filled], self.magic, self.max) {
                Ok(Some((p, used))) => (p.kind, used),
                Ok(None) => return Ok(None),
                // A job too large for us is read past, not buffered, so that it can be failed
                // once and the connection kept; any other oversized packet ends it.
                Err(DecodeError::TooLarge { len, .. })
                    if self.magic == protocol::RES
                        && self.packet_kind() == Some(protocol::JOB_ASSIGN_UNIQ) =>
                {
                    self.consumed += protocol::HEADER;
                    self.skip = Some(Skip {
                        kind: protocol::JOB_ASSIGN_UNIQ,
                        len,
                        left: len,
                        head: Vec::new(),
                    });
                    return Ok(self.skip_some());
                }
                Err(e) => return Err(ConnError::Protocol(e)),
            };
        let start = self.consumed + protocol::HEADER;
        let end = self.consumed + len;
        if len > 1 << 20 {
            let mut fresh = vec![0; RBUF.max(self.filled - end)];
            let rest = self.filled - end;
            fresh[..rest].copy_from_slice(&self.rbuf[end..self.filled]);
            let mut data = std::mem::replace(&mut self.rbuf, fresh);
            data.truncate(end);
            data.drain(..start);
            self.consumed = 0;
            self.filled = rest;
            return Ok(Some(OwnedPacket {
                kind,
                data,
                oversized: None,
            }));
        }
        let data = self.rbuf[start..end].to_vec();
        self.consumed = end;
        if self.consumed == self.filled && self.rbuf.len() > RBUF {
            self.rbuf = vec![0; RBUF];
            self.consumed = 0;
            self.filled = 0;
        }
        Ok(Some(OwnedPacket {
            kind,
            data,
            oversized: None,
        }))
    }

    /// The type of the packet whose header is at the read position, once its header is here.
    fn packet_kind(&self) -> Option<u32> {
        let b = self.rbuf.get(self.consumed + 4..self.consumed + 8)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// Discards what has arrived of an oversized packet, keeping its first [`SKIP_HEAD`] bytes;
    /// the packet (head only) once all of it has been read past.
    fn skip_some(&mut self) -> Option<OwnedPacket> {
        let skip = self.skip.as_mut()?;
        let take = (self.filled - self.consumed).min(skip.left);
        let keep = take.min(SKIP_HEAD.saturating_sub(skip.head.len()));
        skip.head
            .extend_from_slice(&self.rbuf[self.consumed..self.consumed + keep]);
        self.consumed += take;
        skip.left -= take;
        if self.consumed == self.filled {
            self.consumed = 0;
            self.filled = 0;
        }
        if skip.left > 0 {
            return None;
        }
        let done = self.skip.take()?;
        Some(OwnedPacket {
            kind: done.kind,
            data: done.head,
            oversized: Some(done.len),
        })
    }

    /// Blocking mode: how long a read may wait.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        self.stream.tcp().set_read_timeout(t)
    }

    /// Queues a request; it is sent by the next [`Conn::flush`].
    pub fn queue(&mut self, kind: u32, args: &[&[u8]]) {
        let magic = if self.magic == protocol::RES {
            protocol::REQ
        } else {
            protocol::RES
        };
        protocol::encode(&mut self.wbuf, magic, kind, args);
    }

    pub fn flush(&mut self) -> Result<(), ConnError> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf)?;
            self.wbuf.clear();
        }
        self.stream.flush()?;
        Ok(())
    }

    /// Returns the next packet, reading (blocking, up to [`IO_TIMEOUT`]) as needed. The packet
    /// borrows the read buffer until the next call.
    pub fn recv(&mut self) -> Result<Packet<'_>, ConnError> {
        loop {
            let found =
                protocol::decode(&self.rbuf[self.consumed..self.filled], self.magic, self.max)
                    .map(|o| o.map(|(_, used)| used));
            match found {
                Ok(Some(used)) => {
                    let start = self.consumed;
                    self.consumed += used;
                    // Decode again from the stable buffer to hand out a borrow of it.
                    return match protocol::decode(
                        &self.rbuf[start..start + used],
                        self.magic,
                        self.max,
                    ) {
                        Ok(Some((p, _))) => Ok(p),
                        _ => Err(ConnError::Unexpected(
                            "packet vanished from the buffer".into(),
                        )),
                    };
                }
                Ok(None) => self.fill()?,
                Err(e) => return Err(ConnError::Protocol(e)),
            }
        }
    }

    /// Reads more bytes into the buffer (one read call). The buffer only grows when a single
    /// packet is larger than it (bounded by `max`), and is never zeroed again.
    fn fill(&mut self) -> Result<(), ConnError> {
        if self.consumed == self.filled {
            self.consumed = 0;
            self.filled = 0;
        } else if self.consumed > 0 && self.filled == self.rbuf.len() {
            self.rbuf.copy_within(self.consumed..self.filled, 0);
            self.filled -= self.consumed;
            self.consumed = 0;
        }
        if self.filled == self.rbuf.len() {
            let grown = (self.rbuf.len() * 2)
                .min(self.max + protocol::HEADER)
                .max(self.rbuf.len() + 1);
            self.rbuf.resize(grown, 0);
        }
        let n = loop {
            match self.stream.read(&mut self.rbuf[self.filled..]) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        };
        if n == 0 {
            return Err(ConnError::Closed);
        }
        self.filled += n;
        Ok(())
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.tcp().as_fd()
    }
}
