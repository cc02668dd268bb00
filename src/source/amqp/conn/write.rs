//! The writing half of a connection: the socket and what waits to be written, behind the lock
//! the reader, the lanes writing (acks, replies) and the heartbeat thread share.

use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::poll::PollFlags;

use super::gone;
use super::net::{wait_fd, Ready};
use crate::error::{Error, Result};
use crate::source::amqp::wire;
use crate::source::gearman::tls::Transport;

/// The writing half (shared with the heartbeat thread) and the socket itself.
pub struct Io {
    pub(super) stream: Transport,
    pub(super) wbuf: Vec<u8>,
    pub(super) wpos: usize,
    pub(in crate::source::amqp) last_sent: Instant,
    /// The heartbeat agreed (zero: none).
    pub(in crate::source::amqp) heartbeat: Duration,
    pub(in crate::source::amqp) broken: bool,
    /// Publishes made through [`Writer::publish`] (their confirms' sequence numbers).
    pub(super) published: u64,
}

impl Io {
    /// Writes what the socket takes now; true once everything queued is written.
    fn write_some(&mut self) -> io::Result<bool> {
        while self.wpos < self.wbuf.len() {
            match self.stream.write(&self.wbuf[self.wpos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.wpos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.wbuf.clear();
        self.wpos = 0;
        if self.wbuf.capacity() > 1 << 20 {
            self.wbuf = Vec::new();
        }
        let done = self.stream.flush_tls()?;
        if done {
            self.last_sent = Instant::now();
        }
        Ok(done)
    }

    /// A heartbeat, sent now if the socket takes it (the heartbeat thread; never waits).
    pub(in crate::source::amqp) fn beat(&mut self) {
        if self.broken {
            return;
        }
        if self.wpos == self.wbuf.len() {
            wire::heartbeat(&mut self.wbuf);
        }
        if self.write_some().is_err() {
            self.broken = true;
        }
    }
}

/// A connection's writing half (see [`Conn::writer`]).
#[derive(Clone)]
pub struct Writer {
    pub(super) io: Arc<Mutex<Io>>,
    pub(super) io_timeout: Duration,
    pub(super) frame_max: usize,
}

impl Writer {
    fn lock(&self) -> MutexGuard<'_, Io> {
        self.io.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the frames `build` appends and writes them, waiting at most `io_timeout` for a
    /// socket the broker does not read.
    pub fn send(&self, build: impl FnOnce(&mut Vec<u8>)) -> Result<()> {
        let mut io = self.lock();
        if io.broken {
            return Err(Error::Gone("the connection is broken".into()));
        }
        build(&mut io.wbuf);
        self.flush(&mut io)
    }

    /// [`Writer::send`] of one publish on a channel in confirm mode: `build` is given the
    /// publish's sequence number, taken under the writing lock so that the numbers follow the
    /// order on the wire (the broker confirms by that number), and returns it.
    pub fn publish(&self, build: impl FnOnce(&mut Vec<u8>, u64)) -> Result<u64> {
        let mut io = self.lock();
        if io.broken {
            return Err(Error::Gone("the connection is broken".into()));
        }
        io.published += 1;
        let seq = io.published;
        build(&mut io.wbuf, seq);
        self.flush(&mut io).map(|()| seq)
    }

    /// Writes what is queued, waiting at most `io_timeout` for a socket the broker does not
    /// read (the connection is broken after).
    fn flush(&self, io: &mut Io) -> Result<()> {
        let deadline = Instant::now() + self.io_timeout;
        loop {
            match io.write_some() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    io.broken = true;
                    return Err(gone(e));
                }
            }
            let fd = io.stream.tcp().as_fd();
            if let Ready::TimedOut = wait_fd(fd, PollFlags::POLLOUT, Some(deadline), None)? {
                io.broken = true;
                return Err(Error::TimedOut(format!(
                    "writing: the broker read nothing for {:?}",
                    self.io_timeout
                )));
            }
        }
    }

    /// The agreed frame size (a publish's body is cut to fit).
    pub fn frame_max(&self) -> usize {
        self.frame_max
    }

    /// Cuts the connection at once (the broker then requeues what it delivered): it is given
    /// up, though a writer may still hold it.
    pub fn cut(&self) {
        let mut io = self.lock();
        io.broken = true;
        let _ = nix::sys::socket::shutdown(
            io.stream.tcp().as_raw_fd(),
            nix::sys::socket::Shutdown::Both,
        );
    }
}
