//! One TCP connection to a Gearman server: buffered packet reads and writes with bounded sizes.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, BorrowedFd};
use std::time::Duration;

use super::protocol::{self, DecodeError, Packet};

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
    stream: TcpStream,
    /// Read buffer, allocated once; `rbuf[consumed..filled]` holds bytes not yet handed out.
    rbuf: Vec<u8>,
    consumed: usize,
    filled: usize,
    pub wbuf: Vec<u8>,
    magic: [u8; 4],
    max: usize,
}

impl Conn {
    /// Connects (bounded by `timeout`) with TCP_NODELAY: without it a lock-step worker manages
    /// about 23 jobs/s (Nagle plus delayed ACK).
    pub fn connect(addr: &str, timeout: Duration, magic: [u8; 4], max: usize) -> io::Result<Conn> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{addr}: no address"));
        for sa in addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&sa, timeout) {
                Ok(stream) => {
                    stream.set_nodelay(true)?;
                    stream.set_read_timeout(Some(IO_TIMEOUT))?;
                    stream.set_write_timeout(Some(IO_TIMEOUT))?;
                    return Ok(Conn {
                        stream,
                        rbuf: vec![0; 64 * 1024],
                        consumed: 0,
                        filled: 0,
                        wbuf: Vec::with_capacity(4096),
                        magic,
                        max,
                    });
                }
                Err(e) => last = e,
            }
        }
        Err(last)
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
        Ok(())
    }

    /// True if a complete packet is already buffered.
    pub fn has_packet(&self) -> bool {
        matches!(
            protocol::decode(&self.rbuf[self.consumed..], self.magic, self.max),
            Ok(Some(_))
        )
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

    /// Reads whatever is available without blocking (after poll said readable).
    pub fn fill_nonblocking(&mut self) -> Result<(), ConnError> {
        self.stream.set_nonblocking(true)?;
        let r = self.fill();
        self.stream.set_nonblocking(false)?;
        match r {
            Err(ConnError::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            other => other,
        }
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}
