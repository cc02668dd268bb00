//! Reading a connection: frames taken from the socket as they come, assembled into deliveries
//! (their bodies bounded), confirms, the broker's own methods, the wake-up and deadlines.

use std::io::{self, Read};
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags};

use super::net::{wait_fd, Ready};
use super::{gone, peer, Conn, Delivery, Event, Partial};
use crate::error::{Error, Result};
use crate::source::amqp::wire::{self, Reader};

impl Conn {
    /// Reads until something happens: what the broker sends, the wake-up, or `deadline`. A
    /// broker silent for two heartbeats is gone. (Deliveries kept in `pending` are the caller's
    /// to look at first.)
    pub fn next(&mut self, deadline: Option<Instant>) -> Result<Event> {
        // Counted from now at the earliest: while a job ran nobody read (the broker's
        // heartbeats wait in the socket).
        let since = Instant::now();
        loop {
            while let Some(ev) = self.next_frame()? {
                if let Some(ev) = ev {
                    return Ok(ev);
                }
            }
            let beat_by = (!self.heartbeat.is_zero())
                .then(|| self.last_recv.max(since) + self.heartbeat * 2 + Duration::from_secs(1));
            let until = match (deadline, beat_by) {
                (Some(d), Some(b)) => Some(d.min(b)),
                (d, b) => d.or(b),
            };
            match self.fill(until)? {
                Ready::Yes => {}
                Ready::Woken => return Ok(Event::Woken),
                Ready::TimedOut if beat_by.is_some_and(|b| Instant::now() >= b) => {
                    return Err(Error::Gone(format!(
                        "no heartbeat from the broker for {:?}",
                        self.last_recv.elapsed()
                    )))
                }
                Ready::TimedOut => return Ok(Event::TimedOut),
            }
        }
    }

    /// Reads what the socket has; waits for it (without the lock) when it has nothing.
    fn fill(&mut self, until: Option<Instant>) -> Result<Ready> {
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        } else if self.rstart > self.rbuf.len() / 2 {
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
        let need = self.frame_max + wire::FRAME_OVERHEAD;
        if self.rbuf.len() - self.rend < 4096 || self.rbuf.len() < need {
            let len = (self.rend + 64 * 1024).max(need);
            self.rbuf.resize(len, 0);
        }
        // Plain TCP: poll first (a read would mostly say EAGAIN). TLS: rustls may hold
        // decrypted bytes poll cannot see.
        let mut first = self.tls;
        loop {
            if !first {
                // SAFETY: `self.fd` is the socket `self.io` owns, open as long as `self` is.
                let fd = unsafe { BorrowedFd::borrow_raw(self.fd) };
                let _waiting = crate::source::spin::Waiting::enter();
                if !self.spin.wait(&mut [PollFd::new(fd, PollFlags::POLLIN)]) {
                    match wait_fd(fd, PollFlags::POLLIN, until, self.wake.as_ref())? {
                        Ready::Yes => {}
                        other => return Ok(other),
                    }
                }
            }
            first = false;
            let mut io = self.io.lock().unwrap_or_else(|p| p.into_inner());
            match io.stream.read(&mut self.rbuf[self.rend..]) {
                Ok(0) => {
                    io.broken = true;
                    return Err(Error::Gone("the broker closed the connection".into()));
                }
                Ok(n) => {
                    self.rend += n;
                    self.last_recv = Instant::now();
                    return Ok(Ready::Yes);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    io.broken = true;
                    return Err(gone(e));
                }
            }
        }
    }

    /// Takes one frame from the buffer: Some(Some(event)), Some(None) (taken, nothing to tell
    /// yet), or None (no whole frame there).
    fn next_frame(&mut self) -> Result<Option<Option<Event>>> {
        let Some((kind, channel, payload, used)) =
            wire::parse_frame(&self.rbuf[self.rstart..self.rend], self.frame_max).map_err(peer)?
        else {
            return Ok(None);
        };
        let at = self.rstart + (used - payload.len() - 1);
        let range = at..at + payload.len();
        self.rstart += used;
        // The payload is read where it lies: the buffer is lent out for the frame's handling
        // (a body is copied once, into its delivery).
        let rbuf = std::mem::take(&mut self.rbuf);
        let payload = &rbuf[range];
        let handled = match kind {
            wire::FRAME_METHOD => self.method(channel, payload),
            wire::FRAME_HEADER => self.header(payload),
            wire::FRAME_BODY => self.body(payload),
            _ => Ok(None),
        };
        self.rbuf = rbuf;
        handled.map(Some)
    }

    fn method(&mut self, channel: u16, payload: &[u8]) -> Result<Option<Event>> {
        let mut r = Reader::new(payload);
        let id = (r.u16().map_err(peer)?, r.u16().map_err(peer)?);
        let args = r.rest();
        if self.partial.as_ref().is_some_and(|p| p.header.is_none()) {
            return Err(peer(format!(
                "method {id:?} where a content header was due"
            )));
        }
        match (channel, id) {
            (0, wire::CONNECTION_CLOSE) | (_, wire::CHANNEL_CLOSE) => {
                let mut r = Reader::new(args);
                let code = r.u16().unwrap_or(0);
                let text = crate::text::escape_bytes(r.short().unwrap_or(b""));
                let (ok, what) = if channel == 0 {
                    (wire::CONNECTION_CLOSE_OK, "connection")
                } else {
                    (wire::CHANNEL_CLOSE_OK, "channel")
                };
                let _ = self.send(|b| wire::method(b, channel, ok, |_| {}));
                self.lock().broken = true;
                let why = format!("the broker closed the {what}: {code} {text}");
                Err(if code == 320 || code == 0 {
                    Error::Gone(why)
                } else {
                    Error::Peer(why)
                })
            }
            (0, wire::CONNECTION_BLOCKED) => {
                let reason = Reader::new(args).short().unwrap_or(b"");
                self.blocked = Some(crate::text::escape_bytes(reason));
                Ok(None)
            }
            (0, wire::CONNECTION_UNBLOCKED) => {
                self.blocked = None;
                Ok(None)
            }
            (_, wire::BASIC_DELIVER) | (_, wire::BASIC_RETURN) => {
                let returned = id == wire::BASIC_RETURN;
                let parsed = (|| -> wire::WireResult<(u64, bool)> {
                    if returned {
                        return Ok((0, false));
                    }
                    r.short()?;
                    Ok((r.u64()?, r.u8()? & 1 != 0))
                })();
                let (tag, redelivered) = parsed.map_err(peer)?;
                self.partial = Some(Partial {
                    tag,
                    redelivered,
                    returned,
                    header: None,
                    unreadable: None,
                    body: Vec::new(),
                    got: 0,
                });
                Ok(None)
            }
            (_, wire::BASIC_ACK) | (_, wire::BASIC_NACK) => {
                let tag = r.u64().map_err(peer)?;
                let multiple = r.u8().map_err(peer)? & 1 != 0;
                Ok(Some(Event::Confirm {
                    tag,
                    multiple,
                    ack: id == wire::BASIC_ACK,
                }))
            }
            (_, wire::BASIC_CANCEL) => Ok(Some(Event::Cancelled)),
            _ => Ok(Some(Event::Method(id, args.to_vec()))),
        }
    }

    fn header(&mut self, payload: &[u8]) -> Result<Option<Event>> {
        let max_body = self.max_body;
        let Some(p) = self.partial.as_mut().filter(|p| p.header.is_none()) else {
            return Err(peer("a content header without a delivery".into()));
        };
        let (size, props) = match wire::read_header(payload) {
            Ok(read) => read,
            // The properties (a publisher's headers: outside input) cannot be read, but the
            // body's size can: the message is read past and failed unrun, once.
            Err(why) => {
                let size = wire::body_size(payload).map_err(peer)?;
                p.unreadable = Some(format!(
                    "message properties unreadable ({why}): discarded unrun"
                ));
                (size, wire::Props::default())
            }
        };
        if size as usize <= max_body && p.unreadable.is_none() {
            p.body.reserve_exact(size as usize);
        }
        p.header = Some((size, props));
        Ok(self.complete())
    }

    fn body(&mut self, payload: &[u8]) -> Result<Option<Event>> {
        let max_body = self.max_body as u64;
        let Some(p) = self.partial.as_mut() else {
            return Err(peer("a body frame without a delivery".into()));
        };
        let Some((size, _)) = &p.header else {
            return Err(peer("a body frame before its content header".into()));
        };
        p.got += payload.len() as u64;
        if p.got > *size {
            return Err(peer(format!("{} body bytes where {size} were said", p.got)));
        }
        if *size <= max_body && !p.returned && p.unreadable.is_none() {
            p.body.extend_from_slice(payload);
        }
        Ok(self.complete())
    }

    /// The delivery under way, once all of its body is here.
    fn complete(&mut self) -> Option<Event> {
        let done = self
            .partial
            .as_ref()
            .and_then(|p| p.header.as_ref().map(|h| h.0 == p.got))?;
        if !done {
            return None;
        }
        let p = self.partial.take()?;
        let (size, props) = p.header?;
        if p.returned {
            return Some(Event::Returned);
        }
        let oversized = (size > self.max_body as u64).then_some(size as usize);
        Some(Event::Delivery(Delivery {
            tag: p.tag,
            redelivered: p.redelivered,
            props,
            body: p.body,
            oversized,
            unreadable: p.unreadable,
        }))
    }
}
