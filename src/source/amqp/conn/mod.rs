//! One connection to a broker with one channel, read and written by the thread that uses it (a
//! lane, or `gearshift submit`): no I/O thread, no hand-over of each frame between threads. The
//! lane waits for a delivery in poll(2) on its socket and its wake-up eventfd; a job's ack is
//! one write. The socket is non-blocking and every wait has a deadline.
//!
//! The writing half sits behind a lock shared with the source's heartbeat thread
//! ([`super::beat`]), which sends the heartbeats while the lane runs a job and reads nothing
//! (what the broker sends meanwhile waits in the socket). Only whole frames are ever queued, so a
//! heartbeat can go between any two.

mod net;
mod read;
mod write;

pub use net::sleep_until;
pub use write::{Io, Writer};

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use net::connect;

use super::wire::{self, Id, Props, Reader};
use crate::config::AmqpUrl;
use crate::error::{Error, Result};
use crate::source::gearman::tls::{TlsTarget, Transport};
use crate::source::spin::Spin;

/// The channel every connection uses.
pub const CHANNEL: u16 = 1;
/// The largest frame read before the broker has said its own limit (connection.start).
const FIRST_FRAME_MAX: usize = 128 * 1024;

/// What a connection is opened with.
pub struct Options<'a> {
    pub name: &'a str,
    /// The heartbeat asked for (0: none).
    pub heartbeat: Duration,
    /// The largest frame asked for (the broker may want smaller ones).
    pub frame_max: usize,
    /// A delivery's body larger than this is not kept (only its size).
    pub max_body: usize,
    pub io_timeout: Duration,
    /// Deliveries kept aside (arrived while something else was awaited) at most: more than
    /// the prefetch allows is a broker misbehaving, not a reason to grow without end.
    pub max_pending: usize,
    /// How long a wait for input first polls without sleeping (`spin`; zero: never).
    pub busy_poll: Duration,
}

/// A message delivered to this connection's consumer.
pub struct Delivery {
    pub tag: u64,
    pub redelivered: bool,
    pub props: Props,
    pub body: Vec<u8>,
    /// The body's size, when it is larger than allowed (the body is then dropped as it comes).
    pub oversized: Option<usize>,
    /// Why the message's content header could not be read (a publisher's headers are outside
    /// input): the message is then failed unrun, dead-lettered once, not a broken connection
    /// that would bring it back for ever.
    pub unreadable: Option<String>,
}

/// What reading brought.
pub enum Event {
    Delivery(Delivery),
    /// The broker's confirm of a publish (`multiple`: of every one up to `tag`).
    Confirm {
        tag: u64,
        multiple: bool,
        ack: bool,
    },
    /// Any other method, with its arguments.
    Method(Id, Vec<u8>),
    /// The broker cancelled the consumer.
    Cancelled,
    /// A message published `mandatory` had no queue to go to (`basic.return`).
    Returned,
    /// The wake-up eventfd was written.
    Woken,
    /// The deadline passed.
    TimedOut,
}

/// A partly received delivery.
struct Partial {
    tag: u64,
    redelivered: bool,
    /// A `basic.return`: read and dropped.
    returned: bool,
    header: Option<(u64, Props)>,
    /// Why the content header could not be read (its body is then read past, not kept).
    unreadable: Option<String>,
    body: Vec<u8>,
    got: u64,
}

/// One connection and its channel.
pub struct Conn {
    io: Arc<Mutex<Io>>,
    fd: i32,
    tls: bool,
    wake: Option<Arc<OwnedFd>>,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    frame_max: usize,
    max_body: usize,
    io_timeout: Duration,
    partial: Option<Partial>,
    /// Deliveries that arrived while something else was awaited (see [`Conn::keep`]).
    pub pending: VecDeque<Delivery>,
    max_pending: usize,
    /// `connection.blocked` and its reason (escaped): the broker reads nothing we publish
    /// until it is lifted.
    pub blocked: Option<String>,
    last_recv: Instant,
    heartbeat: Duration,
    /// The sequence number of the last publish (publisher confirms).
    pub published: u64,
    /// Busy-polling before a wait sleeps (`[source] busy_poll`).
    spin: Spin,
}

fn gone(e: io::Error) -> Error {
    Error::Gone(crate::text::escape(&e.to_string()).into_owned())
}

fn peer(why: String) -> Error {
    Error::Peer(format!(
        "the server does not speak AMQP 0-9-1 as a broker should: {why}"
    ))
}

impl Conn {
    /// Connects to `url`, speaks the handshake (PLAIN), agrees frame size and heartbeat, and
    /// opens the channel; each exchange bounded by `io_timeout`, all of it given up when `wake`
    /// is written.
    pub fn open(
        url: &AmqpUrl,
        tls: Option<&TlsTarget>,
        opts: &Options<'_>,
        wake: Option<Arc<OwnedFd>>,
    ) -> Result<Conn> {
        let deadline = Instant::now() + opts.io_timeout;
        let sock = connect(url, deadline, wake.as_ref())?;
        let fd = sock.as_raw_fd();
        let stream = match tls {
            None => Transport::Plain(sock),
            Some((config, name)) => Transport::tls(sock, config, name.clone()).map_err(gone)?,
        };
        let now = Instant::now();
        let mut conn = Conn {
            io: Arc::new(Mutex::new(Io {
                stream,
                wbuf: Vec::with_capacity(4096),
                wpos: 0,
                last_sent: now,
                heartbeat: Duration::ZERO,
                broken: false,
                published: 0,
            })),
            fd,
            tls: tls.is_some(),
            wake,
            rbuf: vec![0; 64 * 1024],
            rstart: 0,
            rend: 0,
            frame_max: FIRST_FRAME_MAX,
            max_body: opts.max_body,
            io_timeout: opts.io_timeout,
            partial: None,
            pending: VecDeque::new(),
            max_pending: opts.max_pending,
            blocked: None,
            last_recv: now,
            heartbeat: Duration::ZERO,
            published: 0,
            spin: Spin::new(opts.busy_poll),
        };
        conn.handshake(url, opts)?;
        Ok(conn)
    }

    fn handshake(&mut self, url: &AmqpUrl, opts: &Options<'_>) -> Result<()> {
        self.send(|b| b.extend_from_slice(wire::PROTOCOL_HEADER))?;
        let start = self.expect(wire::CONNECTION_START, "connection.start")?;
        let mut r = Reader::new(&start);
        let mechanisms = (|| {
            r.u8()?;
            r.u8()?;
            r.table()?;
            r.long()
        })()
        .map_err(peer)?;
        if !mechanisms.split(|&c| c == b' ').any(|m| m == b"PLAIN") {
            return Err(Error::Peer(format!(
                "the broker offers no PLAIN login (it offers \"{}\")",
                crate::text::escape_bytes(mechanisms)
            )));
        }
        let mut login = vec![0u8];
        login.extend_from_slice(url.user.as_bytes());
        login.push(0);
        login.extend_from_slice(url.password.as_bytes());
        self.send(|b| {
            wire::method(b, 0, wire::CONNECTION_START_OK, |a| {
                use wire::Value::{Bool, Str, Table};
                a.table(&[
                    ("product", Str(b"gearshift")),
                    ("version", Str(env!("CARGO_PKG_VERSION").as_bytes())),
                    ("platform", Str(b"Rust")),
                    ("connection_name", Str(opts.name.as_bytes())),
                    (
                        "capabilities",
                        Table(vec![
                            ("publisher_confirms", Bool(true)),
                            ("consumer_cancel_notify", Bool(true)),
                            ("connection.blocked", Bool(true)),
                            ("basic.nack", Bool(true)),
                            ("authentication_failure_close", Bool(true)),
                        ]),
                    ),
                ])
                .short(b"PLAIN")
                .long(&login)
                .short(b"en_US");
            })
        })?;
        let tune = match self.expect_any("connection.tune")? {
            (wire::CONNECTION_TUNE, args) => args,
            (wire::CONNECTION_SECURE, _) => {
                return Err(Error::Peer(
                    "the broker asks for a login challenge (connection.secure), which gearshift does not answer".into(),
                ))
            }
            (id, _) => return Err(peer(format!("{id:?} where connection.tune was due"))),
        };
        let mut r = Reader::new(&tune);
        let (channel_max, frame_max, heartbeat) =
            (|| Ok::<_, String>((r.u16()?, r.u32()?, r.u16()?)))().map_err(peer)?;
        let ours = opts.frame_max.max(4096);
        self.frame_max = match frame_max as usize {
            0 => ours,
            theirs => ours.min(theirs).max(4096),
        };
        let asked = opts.heartbeat.as_secs().min(u64::from(u16::MAX)) as u16;
        let agreed = match (asked, heartbeat) {
            (0, _) => 0,
            (a, 0) => a,
            (a, b) => a.min(b),
        };
        self.heartbeat = Duration::from_secs(u64::from(agreed));
        self.lock().heartbeat = self.heartbeat;
        let frame_max = u32::try_from(self.frame_max).unwrap_or(u32::MAX);
        self.send(|b| {
            wire::method(b, 0, wire::CONNECTION_TUNE_OK, |a| {
                a.u16(channel_max.clamp(1, CHANNEL))
                    .u32(frame_max)
                    .u16(agreed);
            });
            wire::method(b, 0, wire::CONNECTION_OPEN, |a| {
                a.short(url.vhost.as_bytes()).short(b"").bits(&[false]);
            });
        })?;
        self.expect(wire::CONNECTION_OPEN_OK, "connection.open-ok")?;
        self.call(
            wire::CHANNEL_OPEN,
            |a| {
                a.short(b"");
            },
            wire::CHANNEL_OPEN_OK,
            "channel.open",
        )?;
        Ok(())
    }

    /// The writing half, for the heartbeat thread.
    pub fn io(&self) -> &Arc<Mutex<Io>> {
        &self.io
    }

    /// The agreed frame size (a publish's body is cut to fit).
    pub fn frame_max(&self) -> usize {
        self.frame_max
    }

    fn lock(&self) -> MutexGuard<'_, Io> {
        self.io.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the frames `build` appends and writes them, waiting at most `io_timeout` for a
    /// socket the broker does not read.
    pub fn send(&self, build: impl FnOnce(&mut Vec<u8>)) -> Result<()> {
        self.writer().send(build)
    }

    /// The writing half, for the threads that write while another reads (a lane's ack while
    /// another lane waits for a delivery).
    pub fn writer(&self) -> Writer {
        Writer {
            io: Arc::clone(&self.io),
            io_timeout: self.io_timeout,
            frame_max: self.frame_max,
        }
    }

    /// Sends a method on the channel and waits for `reply` (deliveries arriving meanwhile are
    /// kept); its arguments.
    pub fn call(
        &mut self,
        id: Id,
        args: impl FnOnce(&mut wire::Args<'_>),
        reply: Id,
        what: &str,
    ) -> Result<Vec<u8>> {
        self.send(|b| wire::method(b, CHANNEL, id, args))?;
        self.expect(reply, what)
    }

    /// Keeps a delivery that arrived while something else was awaited; more than
    /// `max_pending` of them is an error (the broker ignores the prefetch).
    pub fn keep(&mut self, d: Delivery) -> Result<()> {
        if self.pending.len() >= self.max_pending {
            self.lock().broken = true;
            return Err(peer(format!(
                "more than {} deliveries unacknowledged: the broker ignores the prefetch",
                self.max_pending
            )));
        }
        self.pending.push_back(d);
        Ok(())
    }

    /// Publisher confirms on the channel (`confirm.select`).
    pub fn confirm_select(&mut self) -> Result<()> {
        self.call(
            wire::CONFIRM_SELECT,
            |a| {
                a.bits(&[false]);
            },
            wire::CONFIRM_SELECT_OK,
            "confirm.select",
        )
        .map(drop)
    }

    fn expect(&mut self, want: Id, what: &str) -> Result<Vec<u8>> {
        match self.expect_any(what)? {
            (id, args) if id == want => Ok(args),
            (id, _) => Err(peer(format!(
                "method {id:?} where the answer to {what} was due"
            ))),
        }
    }

    /// The next method (other than a delivery or confirm), within `io_timeout`.
    fn expect_any(&mut self, what: &str) -> Result<(Id, Vec<u8>)> {
        let deadline = Instant::now() + self.io_timeout;
        loop {
            match self.next(Some(deadline))? {
                Event::Method(id, args) => return Ok((id, args)),
                Event::Delivery(d) => self.keep(d)?,
                Event::Confirm { .. } | Event::Returned => {}
                Event::Cancelled => {
                    return Err(Error::Gone(format!(
                        "{what}: the broker cancelled the consumer"
                    )))
                }
                Event::Woken => return Err(Error::Gone(format!("{what}: stopping"))),
                Event::TimedOut => {
                    return Err(Error::TimedOut(format!(
                        "{what}: no answer within {}",
                        crate::clock::human(self.io_timeout)
                    )))
                }
            }
        }
    }

    /// Closes the connection politely (`connection.close`, its answer awaited at most
    /// `limit`); the socket closes when `self` is dropped either way.
    pub fn close(mut self, limit: Duration) {
        let sent = self.send(|b| {
            wire::method(b, 0, wire::CONNECTION_CLOSE, |a| {
                a.u16(200).short(b"gearshift closing").u16(0).u16(0);
            })
        });
        if sent.is_err() {
            return;
        }
        let deadline = Instant::now() + limit;
        self.wake = None;
        while let Ok(ev) = self.next(Some(deadline)) {
            match ev {
                Event::Method(wire::CONNECTION_CLOSE_OK, _) | Event::TimedOut => return,
                _ => {}
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};

    /// A scripted broker's side: reads whole frames, answers with what `reply` builds.
    struct Peer {
        sock: TcpStream,
        buf: Vec<u8>,
    }

    impl Peer {
        /// The next method's id.
        fn method(&mut self) -> Id {
            loop {
                if let Some((kind, _, payload, used)) =
                    wire::parse_frame(&self.buf, 1 << 20).unwrap()
                {
                    let id = (
                        u16::from_be_bytes([payload[0], payload[1]]),
                        u16::from_be_bytes([payload[2], payload[3]]),
                    );
                    self.buf.drain(..used);
                    if kind == wire::FRAME_METHOD {
                        return id;
                    }
                    continue;
                }
                let mut b = [0u8; 4096];
                let n = self.sock.read(&mut b).unwrap();
                assert!(n > 0, "the client closed");
                self.buf.extend_from_slice(&b[..n]);
            }
        }

        fn send(&mut self, build: impl FnOnce(&mut Vec<u8>)) {
            let mut out = Vec::new();
            build(&mut out);
            self.sock.write_all(&out).unwrap();
        }
    }

    /// Accepts one client, speaks the handshake as RabbitMQ does, then runs `after`.
    fn broker(after: impl FnOnce(&mut Peer) + Send + 'static) -> AmqpUrl {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (sock, _) = l.accept().unwrap();
            let mut p = Peer {
                sock,
                buf: Vec::new(),
            };
            let mut header = [0u8; 8];
            p.sock.read_exact(&mut header).unwrap();
            assert_eq!(&header, wire::PROTOCOL_HEADER);
            p.send(|b| {
                wire::method(b, 0, wire::CONNECTION_START, |a| {
                    a.u8(0)
                        .u8(9)
                        .table(&[])
                        .long(b"AMQPLAIN PLAIN")
                        .long(b"en_US");
                })
            });
            assert_eq!(p.method(), wire::CONNECTION_START_OK);
            p.send(|b| {
                wire::method(b, 0, wire::CONNECTION_TUNE, |a| {
                    a.u16(2047).u32(131_072).u16(60);
                })
            });
            assert_eq!(p.method(), wire::CONNECTION_TUNE_OK);
            assert_eq!(p.method(), wire::CONNECTION_OPEN);
            p.send(|b| {
                wire::method(b, 0, wire::CONNECTION_OPEN_OK, |a| {
                    a.short(b"");
                })
            });
            assert_eq!(p.method(), wire::CHANNEL_OPEN);
            p.send(|b| {
                wire::method(b, CHANNEL, wire::CHANNEL_OPEN_OK, |a| {
                    a.long(b"");
                })
            });
            after(&mut p);
            // Held open until the client is done with it.
            let _ = p.sock.read(&mut [0u8; 1]);
        });
        crate::config::AmqpConfig::url_for_test(&format!("amqp://u:p@127.0.0.1:{port}/%2f"))
    }

    fn options(max_pending: usize) -> Options<'static> {
        Options {
            name: "test",
            heartbeat: Duration::from_secs(30),
            frame_max: 1 << 20,
            max_body: 1024,
            io_timeout: Duration::from_secs(5),
            max_pending,
            busy_poll: Duration::ZERO,
        }
    }

    /// Deliveries far beyond the prefetch while an answer is awaited: an error, not memory
    /// without end; a body over `max_body` is not kept; the agreed frame size and heartbeat
    /// are the smaller of the two sides'.
    #[test]
    fn a_broker_ignoring_the_prefetch_is_an_error_and_bodies_are_bounded() {
        let url = broker(|p| {
            assert_eq!(p.method(), wire::BASIC_QOS);
            for tag in 1..=50u64 {
                p.send(|b| {
                    wire::method(b, CHANNEL, wire::BASIC_DELIVER, |a| {
                        a.short(b"ctag")
                            .u64(tag)
                            .bits(&[false])
                            .short(b"")
                            .short(b"q");
                    });
                    wire::content(b, CHANNEL, &Props::default(), &[b'x'; 2000], 4096);
                });
            }
        });
        let mut c = Conn::open(&url, None, &options(5), None).unwrap();
        assert_eq!(
            (c.frame_max(), c.heartbeat),
            (131_072, Duration::from_secs(30))
        );
        let err = c
            .call(
                wire::BASIC_QOS,
                |a| {
                    a.u32(0).u16(1).bits(&[false]);
                },
                wire::BASIC_QOS_OK,
                "basic.qos",
            )
            .err()
            .unwrap();
        assert!(err.to_string().contains("ignores the prefetch"), "{err}");
        assert_eq!(c.pending.len(), 5);
        assert!(c
            .pending
            .iter()
            .all(|d| d.body.is_empty() && d.oversized == Some(2000)));
    }

    /// The broker's own close (a refused login, a missing vhost) is its words in the error.
    #[test]
    fn the_brokers_close_is_said_in_its_words() {
        let url = broker(|p| {
            assert_eq!(p.method(), wire::CONFIRM_SELECT);
            p.send(|b| {
                wire::method(b, CHANNEL, wire::CHANNEL_CLOSE, |a| {
                    a.u16(406)
                        .short(b"PRECONDITION_FAILED - \x1b[31mred")
                        .u16(85)
                        .u16(10);
                })
            });
            assert_eq!(p.method(), wire::CHANNEL_CLOSE_OK);
        });
        let mut c = Conn::open(&url, None, &options(5), None).unwrap();
        let err = c.confirm_select().err().unwrap().to_string();
        assert!(err.contains("406 PRECONDITION_FAILED"), "{err}");
        assert!(!err.contains('\x1b'), "escaped: {err}");
    }
}
