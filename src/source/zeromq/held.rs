//! What the clients' connections hold, in all. Each may hold one message in progress up to
//! `max_payload_bytes` (and one read beyond it) and 1 MiB of answers it has not read, and there
//! may be `max_connections` of them: bounded each, that is thousands of times 16 MiB by
//! default. So the engine counts what every connection holds (its buffers while they hold
//! bytes, and the frames of its message so far) against one budget ([`Engine::budget_for`]);
//! past it, the connections holding the most are closed, largest first, until the total is an
//! eighth under it (their clients resend, or reconnect; a connection holding nothing is never
//! closed for it). A large frame is read into a buffer of its size (`engine.rs`), not one
//! doubled as it grew; a buffer is given back once a large message or answer has left it, so
//! an idle client that once sent 16 MiB does not keep them.

use super::engine::{Conn, Engine};
use crate::kinds::CloseReason;

/// Bytes held for unfinished messages in all at least (a batch's complete messages are
/// bounded apart: `ingress.rs`).
const FLOOR: usize = 64 << 20;

/// An emptied buffer larger than this is given back; smaller ones are kept for the next
/// message and not counted (at most this much a connection, as the kernel's own socket
/// buffers are: `max_connections` bounds them).
const KEEP: usize = 8 << 10;

/// What connection `c` holds now: its buffers while they hold bytes (their whole capacity),
/// and its message in progress.
fn holding(c: &mut Conn) -> usize {
    let mut held = c.peer.partial();
    for buf in [&mut c.input, &mut c.out] {
        if !buf.is_empty() {
            held += buf.capacity();
        } else if buf.capacity() > KEEP {
            *buf = Vec::new();
        }
    }
    held
}

impl Engine {
    /// What all connections may hold: 64 MiB, or four messages of the largest size if more.
    pub(super) fn budget_for(message_bytes: usize) -> usize {
        message_bytes.saturating_mul(4).max(FLOOR)
    }

    /// Counts again what connection `id` holds (after bytes were read from it or written to
    /// it), and sheds the largest holders when the total is over the budget.
    pub(super) fn recount(&mut self, id: u64) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let now = holding(c);
        self.held = self.held.saturating_sub(c.held) + now;
        c.held = now;
        if self.held > self.budget {
            self.shed();
        }
        if self.held <= self.budget / 2 {
            self.crowded.worked();
        }
    }

    /// Closes the connections holding the most, largest first, until the total is an eighth
    /// under the budget: one look at every connection per eighth of the budget taken back, so
    /// a peer topping the total up a little at a time cannot make each read such a look.
    fn shed(&mut self) {
        let total = self.held;
        let target = self.budget - self.budget / 8;
        let mut holders: Vec<(usize, u64)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.held > 0)
            .map(|(&id, c)| (c.held, id))
            .collect();
        holders.sort_unstable_by(|a, b| b.cmp(a));
        let largest = holders.first().map_or(0, |&(size, _)| size);
        let mut closed = 0usize;
        for (_, id) in holders {
            if self.held <= target {
                break;
            }
            if self.close_for(id, CloseReason::MemoryBudget) {
                closed += 1;
            }
        }
        self.crowded.failed(&format_args!(
            "{} MiB held for clients (unfinished messages, unread answers), over the {} MiB \
             they may hold; the {closed} connection(s) holding the most (the largest {} KiB) \
             were closed",
            total >> 20,
            self.budget >> 20,
            largest >> 10
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Endpoint;
    use crate::source::zeromq::engine::OUT_LIMIT;
    use crate::source::zeromq::listen::Listener;
    use crate::source::zeromq::zmtp::{self, Limits};
    use std::io::{ErrorKind, Read, Write};
    use std::os::fd::OwnedFd;
    use std::os::unix::net::{UnixListener, UnixStream};
    use std::time::Duration;

    /// The socket's path; its directory is removed when the test ends.
    struct Sock(std::path::PathBuf);

    impl std::ops::Deref for Sock {
        type Target = std::path::Path;
        fn deref(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl AsRef<std::path::Path> for Sock {
        fn as_ref(&self) -> &std::path::Path {
            &self.0
        }
    }

    impl Drop for Sock {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    /// An engine on a Unix socket taking messages up to `message_bytes`, and its path.
    fn engine(name: &str, message_bytes: usize) -> (Engine, Sock) {
        let dir = crate::testutil::tempdir("zeromq", name);
        let path = Sock(dir.join("j.sock"));
        let listener = Listener {
            endpoint: Endpoint::Ipc(path.to_path_buf()),
            fd: OwnedFd::from(UnixListener::bind(&path).expect("bind")),
            file: None,
        };
        let limits = Limits {
            message_bytes,
            frames: 8,
            peers: zmtp::CLIENTS,
        };
        let engine = Engine::new(&[listener], limits, 16, std::time::Duration::from_secs(15));
        (engine.expect("engine"), path)
    }

    /// A DEALER connected to `path`, its handshake sent, non-blocking.
    fn dealer(path: &std::path::Path) -> UnixStream {
        let mut c = UnixStream::connect(path).expect("connect");
        let mut hello = zmtp::greeting().to_vec();
        hello.extend_from_slice(&[0x04, 28, 5]);
        hello.extend_from_slice(b"READY");
        hello.push(11);
        hello.extend_from_slice(b"Socket-Type");
        hello.extend_from_slice(&6u32.to_be_bytes());
        hello.extend_from_slice(b"DEALER");
        c.write_all(&hello).expect("hello");
        c.set_nonblocking(true).expect("nonblocking");
        c
    }

    /// Writes as much of `bytes` as the socket takes now; returns what is left.
    fn push<'a>(c: &mut UnixStream, mut bytes: &'a [u8]) -> &'a [u8] {
        while !bytes.is_empty() {
            match c.write(bytes) {
                Ok(n) => bytes = &bytes[n..],
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => return &[],
            }
        }
        bytes
    }

    fn serve(engine: &mut Engine, batch: &mut Vec<(u64, Vec<Vec<u8>>)>) {
        engine.wait(Duration::from_millis(5), batch, 256, usize::MAX);
        engine.flush();
    }

    /// A large message's buffer is given back once the message is taken: an idle connection
    /// holds nothing counted, and no more than a few KiB.
    #[test]
    fn a_buffer_is_given_back_once_its_message_left() {
        let (mut engine, path) = engine("held-back", 1 << 20);
        let mut client = dealer(&path);
        let mut message = Vec::new();
        zmtp::put_message(&mut message, &[&vec![b'x'; 600 << 10]]);
        let mut left: &[u8] = &message;
        let mut batch = Vec::new();
        for _ in 0..2000 {
            left = push(&mut client, left);
            serve(&mut engine, &mut batch);
            if !batch.is_empty() {
                break;
            }
        }
        assert_eq!(batch.len(), 1, "the message taken");
        assert_eq!(engine.held, 0);
        let c = engine.conns.values().next().expect("still connected");
        assert!(c.input.capacity() <= KEEP, "{} kept", c.input.capacity());
    }

    /// A large frame's buffer is sized to the frame, not doubled as it grows: what is counted
    /// for it is about what it holds.
    #[test]
    fn a_large_frame_is_held_in_a_buffer_of_its_size() {
        let (mut engine, path) = engine("held-exact", 1 << 20);
        let mut client = dealer(&path);
        let mut head = vec![0x02];
        head.extend_from_slice(&(900u64 << 10).to_be_bytes());
        head.extend_from_slice(&vec![b'x'; 800 << 10]);
        let mut left: &[u8] = &head;
        let mut batch = Vec::new();
        for _ in 0..2000 {
            left = push(&mut client, left);
            serve(&mut engine, &mut batch);
            if left.is_empty() && engine.held >= 800 << 10 {
                break;
            }
        }
        let c = engine.conns.values().next().expect("connected");
        assert_eq!(c.input.len(), head.len(), "all of it read");
        assert!(
            c.input.capacity() <= (900 << 10) + 9,
            "{} bytes of buffer for a frame of 900 KiB",
            c.input.capacity()
        );
    }

    /// Over the budget the connection holding the most (an unfinished message) is closed; the
    /// others are served on, and the total stays within the budget.
    #[test]
    fn the_largest_holder_is_closed_over_the_budget() {
        let (mut engine, path) = engine("held-over", 1 << 20);
        engine.budget = 512 << 10;
        let mut hog = dealer(&path);
        let mut head = vec![0x02];
        head.extend_from_slice(&(900u64 << 10).to_be_bytes());
        head.extend_from_slice(&vec![b'x'; 800 << 10]);
        let mut left: &[u8] = &head;
        let mut small = dealer(&path);
        let mut request = Vec::new();
        zmtp::put_message(&mut request, &[b"echo", b"hi"]);
        let mut batch = Vec::new();
        let mut closed = false;
        let mut sink = [0u8; 4096];
        for _ in 0..2000 {
            left = push(&mut hog, left);
            serve(&mut engine, &mut batch);
            assert!(engine.held <= engine.budget, "{} held", engine.held);
            closed = loop {
                match hog.read(&mut sink) {
                    Ok(0) => break true,
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break false,
                    Err(_) => break true,
                }
            };
            if closed {
                break;
            }
        }
        assert!(closed, "the hog was never closed");
        assert!(push(&mut small, &request).is_empty());
        for _ in 0..200 {
            serve(&mut engine, &mut batch);
            if !batch.is_empty() {
                break;
            }
        }
        assert_eq!(batch.len(), 1, "the small client served");
        assert_eq!(engine.conns.len(), 1);
    }

    /// Over the budget, the connections holding the most are closed until the total is an
    /// eighth under it, in one pass: a peer topping the total up a little at a time must not
    /// make every read a look at every connection.
    #[test]
    fn over_the_budget_the_largest_are_closed_to_an_eighth_under_it() {
        let (mut engine, path) = engine("held-shed", 1024);
        engine.budget = 512 << 10;
        let clients: Vec<UnixStream> = (0..12).map(|_| dealer(&path)).collect();
        let mut batch = Vec::new();
        for _ in 0..50 {
            serve(&mut engine, &mut batch);
            if engine.conns.len() == clients.len() {
                break;
            }
        }
        assert_eq!(engine.conns.len(), clients.len());
        // Each connection counted as holding 64 KiB, the total 768 KiB; the one counted again
        // holds nothing: 704 KiB, over the 512 allowed.
        for c in engine.conns.values_mut() {
            c.held = 64 << 10;
        }
        engine.held = 12 * (64 << 10);
        let first = *engine.conns.keys().min().expect("a connection");
        engine.recount(first);
        assert!(engine.held <= 448 << 10, "{} KiB held", engine.held >> 10);
        assert_eq!(engine.conns.len(), 12 - 4, "the four largest closed");
        assert!(
            engine.conns.contains_key(&first),
            "the one holding nothing kept"
        );
        assert_eq!(engine.take_closed()[CloseReason::MemoryBudget as usize], 4);
    }

    /// A churn of clients that connect and leave before their handshake leaves no entry behind
    /// in the handshake deadlines for long: they are bounded by the connections alive, not by
    /// the connects of the last 10 s (thousands a second from one flooding peer).
    #[test]
    fn connections_gone_leave_no_handshake_deadlines_behind() {
        let (mut engine, path) = engine("held-churn", 1024);
        let mut batch = Vec::new();
        for round in 0..40 {
            let clients: Vec<UnixStream> = (0..50)
                .map(|_| UnixStream::connect(&path).expect("connect"))
                .collect();
            for _ in 0..2 {
                serve(&mut engine, &mut batch);
            }
            drop(clients);
            for _ in 0..2 {
                serve(&mut engine, &mut batch);
            }
            // At most 50 connections alive at once, against 2,000 connects in all.
            assert!(
                engine.handshakes.len() <= 2 * (50 + 64),
                "round {round}: {} deadlines for {} connections",
                engine.handshakes.len(),
                engine.conns.len()
            );
        }
    }

    /// A client that sends and never reads its answers: once [`OUT_LIMIT`] of them wait, it is
    /// no longer read (so it cannot make the worker hold more), and once it reads, it is served
    /// again.
    #[test]
    fn a_client_that_reads_no_answers_is_no_longer_read() {
        let (mut engine, path) = engine("engine-slow", 1024);
        let mut client = dealer(&path);
        let mut request = Vec::new();
        zmtp::put_message(&mut request, &[b"echo", b"x"]);
        let answer = vec![b'a'; 4096];
        let mut received = 0usize;
        let mut serve = |engine: &mut Engine, rounds: usize| {
            for _ in 0..rounds {
                let mut batch = Vec::new();
                engine.wait(Duration::from_millis(5), &mut batch, 256, usize::MAX);
                for (id, _) in &batch {
                    engine.answer(*id, &[&answer]);
                }
                engine.flush();
                received += batch.len();
            }
            received
        };
        // The client sends as long as its socket takes it; the engine answers and never
        // reads it past the limit, so sending stops.
        let mut sent = 0usize;
        for _ in 0..400 {
            while client.write_all(&request).is_ok() {
                sent += 1;
            }
            serve(&mut engine, 1);
        }
        let stalled = serve(&mut engine, 20);
        assert!(
            stalled < sent,
            "every request read ({sent}): nothing held it back"
        );
        let held: usize = engine.conns.values().map(|c| c.out.len()).sum();
        assert!(
            held <= OUT_LIMIT + answer.len() * 256 + 64,
            "{held} bytes of answers held"
        );
        // It reads: the rest is served.
        let mut sink = vec![0u8; 1 << 16];
        for _ in 0..2000 {
            while client.read(&mut sink).is_ok_and(|n| n > 0) {}
            if serve(&mut engine, 1) >= sent {
                break;
            }
        }
        assert_eq!(serve(&mut engine, 1), sent, "served again once it read");
    }
}
