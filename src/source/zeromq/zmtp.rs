//! ZMTP 3 (the ZeroMQ wire protocol, RFC 23 and 37) with the NULL mechanism: the 64-byte
//! greeting, the READY handshake, frames, and PING answered with PONG; as the worker's ROUTER
//! speaks it to REQ and DEALER clients (`engine.rs`), and as `gearshift submit`'s REQ client
//! speaks it to the worker (`cli/zeromq.rs`). Pure: bytes in, messages and bytes out. Every
//! length from a peer is checked against a bound before anything is kept.

/// Our greeting: signature (0xFF, padding, 0x7F), version 3.0, mechanism NULL, not as-server.
pub fn greeting() -> [u8; 64] {
    let mut g = [0u8; 64];
    g[0] = 0xff;
    g[8] = 1;
    g[9] = 0x7f;
    g[10] = 3;
    g[12..16].copy_from_slice(b"NULL");
    g
}

/// Our READY command, announcing our socket type (`ROUTER`, `REQ`).
pub fn ready(kind: &[u8]) -> Vec<u8> {
    let mut body = command_name(b"READY");
    property(&mut body, b"Socket-Type", kind);
    let mut out = Vec::with_capacity(body.len() + 2);
    frame_header(&mut out, 0x04, body.len());
    out.extend_from_slice(&body);
    out
}

fn command_name(name: &[u8]) -> Vec<u8> {
    let mut body = vec![name.len() as u8];
    body.extend_from_slice(name);
    body
}

fn property(body: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    body.push(name.len() as u8);
    body.extend_from_slice(name);
    body.extend_from_slice(&(value.len() as u32).to_be_bytes());
    body.extend_from_slice(value);
}

/// A frame's flags and size, short (one size byte) when it fits.
fn frame_header(out: &mut Vec<u8>, flags: u8, size: usize) {
    if size <= 255 {
        out.push(flags);
        out.push(size as u8);
    } else {
        out.push(flags | 0x02);
        out.extend_from_slice(&(size as u64).to_be_bytes());
    }
}

/// Appends a message (its frames in order) to `out`.
pub fn put_message(out: &mut Vec<u8>, frames: &[&[u8]]) {
    for (i, f) in frames.iter().enumerate() {
        let more = if i + 1 < frames.len() { 0x01 } else { 0 };
        frame_header(out, more, f.len());
        out.extend_from_slice(f);
    }
}

/// Bounds on what one peer may send.
#[derive(Clone, Copy)]
pub struct Limits {
    /// Bytes of one message's frames together; a larger one ends the connection (as libzmq's
    /// `ZMQ_MAXMSGSIZE` does).
    pub message_bytes: usize,
    /// Frames of one message.
    pub frames: usize,
    /// The socket types a peer may announce: `REQ` and `DEALER` to a ROUTER, `ROUTER` (or
    /// `REP`) to a REQ client.
    pub peers: &'static [&'static [u8]],
}

/// What the worker's ROUTER serves.
pub const CLIENTS: &[&[u8]] = &[b"REQ", b"DEALER"];
/// What a REQ client may talk to.
pub const SERVERS: &[&[u8]] = &[b"ROUTER", b"REP"];

/// Why a peer is closed.
#[derive(Debug, PartialEq, Eq)]
pub enum Violation {
    NotZmtp,
    Version(u8),
    Mechanism(String),
    SocketType(String),
    Handshake(&'static str),
    TooLarge(u64),
    TooManyFrames,
    PeerError,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::NotZmtp => write!(f, "not a ZeroMQ peer (no ZMTP signature)"),
            Violation::Version(v) => write!(f, "ZMTP {v}.x (3 or later is spoken here)"),
            Violation::Mechanism(m) => write!(
                f,
                "security mechanism {} (only NULL is spoken here)",
                crate::text::escape(m)
            ),
            Violation::SocketType(t) => {
                write!(
                    f,
                    "a {} socket, which cannot talk to this one",
                    crate::text::escape(t)
                )
            }
            Violation::Handshake(why) => write!(f, "handshake: {why}"),
            Violation::TooLarge(n) => write!(f, "a message of {n}+ bytes"),
            Violation::TooManyFrames => write!(f, "a message of too many frames"),
            Violation::PeerError => write!(f, "the peer sent ERROR"),
        }
    }
}

/// What a peer's bytes amount to, as far as they go.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    /// A whole message, its frames in order.
    Message(Vec<Vec<u8>>),
    /// Bytes to send back (a PONG).
    Reply(Vec<u8>),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stage {
    Greeting,
    Ready,
    Traffic,
}

/// One peer's decoder.
pub struct Peer {
    stage: Stage,
    limits: Limits,
    /// The message being received: its frames so far and their bytes.
    frames: Vec<Vec<u8>>,
    bytes: usize,
}

impl Peer {
    pub fn new(limits: Limits) -> Peer {
        Peer {
            stage: Stage::Greeting,
            limits,
            frames: Vec::new(),
            bytes: 0,
        }
    }

    /// The whole length (header and body) of the message frame `buf` begins with, once its
    /// header is there and within the bounds (so a buffer can be sized to it).
    pub fn frame_len(&self, buf: &[u8]) -> Option<usize> {
        if self.stage != Stage::Traffic {
            return None;
        }
        let (flags, header, size) = header(buf).ok()??;
        let bound = self.limits.message_bytes.saturating_sub(self.bytes);
        if flags & 0x04 != 0 || size > bound as u64 {
            return None;
        }
        Some(header + size as usize)
    }

    /// Bytes of the message in progress received so far (its frames before the last).
    pub fn partial(&self) -> usize {
        self.bytes
    }

    /// Whether the greeting and READY were exchanged.
    pub fn ready(&self) -> bool {
        self.stage == Stage::Traffic
    }

    /// Decodes what `buf` holds, one step at a time: the bytes used and what they were, or
    /// `(0, None)` when more bytes are needed.
    pub fn step(&mut self, buf: &[u8]) -> Result<(usize, Option<Event>), Violation> {
        if self.stage == Stage::Greeting {
            return self.greeting(buf).map(|used| (used, None));
        }
        let Some((flags, header, size)) = header(buf)? else {
            return Ok((0, None));
        };
        let command = flags & 0x04 != 0;
        let bound = if command {
            COMMAND_BYTES
        } else {
            self.limits.message_bytes.saturating_sub(self.bytes)
        };
        if size > bound as u64 {
            return Err(if command {
                Violation::Handshake("a command over 64 KiB")
            } else {
                Violation::TooLarge(self.bytes as u64 + size)
            });
        }
        let size = size as usize;
        if buf.len() < header + size {
            return Ok((0, None));
        }
        let body = &buf[header..header + size];
        let used = header + size;
        if command {
            return self.command(body).map(|e| (used, e));
        }
        if self.stage != Stage::Traffic {
            return Err(Violation::Handshake("a message before READY"));
        }
        if self.frames.len() >= self.limits.frames {
            return Err(Violation::TooManyFrames);
        }
        self.frames.push(body.to_vec());
        self.bytes += size;
        if flags & 0x01 != 0 {
            return Ok((used, None));
        }
        self.bytes = 0;
        Ok((used, Some(Event::Message(std::mem::take(&mut self.frames)))))
    }

    fn greeting(&mut self, buf: &[u8]) -> Result<usize, Violation> {
        // The signature alone says whether this is ZMTP at all.
        if !buf.is_empty() && buf[0] != 0xff {
            return Err(Violation::NotZmtp);
        }
        if buf.len() >= 10 && buf[9] & 0x01 == 0 {
            return Err(Violation::NotZmtp);
        }
        if buf.len() < 64 {
            return Ok(0);
        }
        if buf[10] < 3 {
            return Err(Violation::Version(buf[10]));
        }
        let mechanism = &buf[12..32];
        let name_end = mechanism.iter().position(|&b| b == 0).unwrap_or(20);
        if &mechanism[..name_end] != b"NULL" {
            return Err(Violation::Mechanism(
                String::from_utf8_lossy(&mechanism[..name_end]).into_owned(),
            ));
        }
        self.stage = Stage::Ready;
        Ok(64)
    }

    fn command(&mut self, body: &[u8]) -> Result<Option<Event>, Violation> {
        let (name, rest) = split_name(body).ok_or(Violation::Handshake("a malformed command"))?;
        match (self.stage, name) {
            (Stage::Ready, b"READY") => {
                let kind = socket_type(rest)?;
                if !self.limits.peers.contains(&kind.as_slice()) {
                    return Err(Violation::SocketType(
                        String::from_utf8_lossy(&kind).into_owned(),
                    ));
                }
                self.stage = Stage::Traffic;
                Ok(None)
            }
            (Stage::Ready, _) => Err(Violation::Handshake("a command before READY")),
            (_, b"ERROR") => Err(Violation::PeerError),
            (_, b"PING") => {
                // TTL (2 bytes), then the context the PONG carries back (at most 16 bytes).
                let context = rest.get(2..).unwrap_or_default();
                let context = &context[..context.len().min(16)];
                let mut pong = command_name(b"PONG");
                pong.extend_from_slice(context);
                let mut out = Vec::with_capacity(pong.len() + 2);
                frame_header(&mut out, 0x04, pong.len());
                out.extend_from_slice(&pong);
                Ok(Some(Event::Reply(out)))
            }
            // Anything else (a PONG, a SUBSCRIBE) means nothing to a ROUTER.
            _ => Ok(None),
        }
    }
}

/// Bytes of one command at most (READY carries the peer's metadata).
const COMMAND_BYTES: usize = 64 * 1024;

/// A frame's flags, header length and size, once the header is all there.
fn header(buf: &[u8]) -> Result<Option<(u8, usize, u64)>, Violation> {
    let Some(&flags) = buf.first() else {
        return Ok(None);
    };
    if flags & 0xf8 != 0 {
        return Err(Violation::Handshake("reserved frame flags set"));
    }
    if flags & 0x02 == 0 {
        return Ok(buf.get(1).map(|&n| (flags, 2, u64::from(n))));
    }
    Ok(buf.get(1..9).map(|b| {
        let mut n = [0u8; 8];
        n.copy_from_slice(b);
        (flags, 9, u64::from_be_bytes(n))
    }))
}

fn split_name(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let n = usize::from(*body.first()?);
    Some((body.get(1..1 + n)?, body.get(1 + n..)?))
}

/// The `Socket-Type` property of a READY command's metadata.
fn socket_type(mut props: &[u8]) -> Result<Vec<u8>, Violation> {
    let bad = Violation::Handshake("malformed READY metadata");
    let mut kind = None;
    while !props.is_empty() {
        let (name, rest) =
            split_name(props).ok_or(Violation::Handshake("malformed READY metadata"))?;
        let len = rest
            .get(..4)
            .ok_or(Violation::Handshake("malformed READY metadata"))?;
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let value = rest
            .get(4..4 + len)
            .ok_or(Violation::Handshake("malformed READY metadata"))?;
        if name.eq_ignore_ascii_case(b"Socket-Type") {
            kind = Some(value.to_vec());
        }
        props = &rest[4 + len..];
    }
    kind.ok_or(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        message_bytes: 100,
        frames: 4,
        peers: CLIENTS,
    };

    fn ready_from(kind: &[u8]) -> Vec<u8> {
        let mut body = command_name(b"READY");
        property(&mut body, b"Socket-Type", kind);
        property(&mut body, b"Identity", b"");
        let mut out = Vec::new();
        frame_header(&mut out, 0x04, body.len());
        out.extend_from_slice(&body);
        out
    }

    /// Feeds `bytes` one at a time (the worst split a socket can give) and collects events.
    fn feed(peer: &mut Peer, bytes: &[u8]) -> Result<Vec<Event>, Violation> {
        let mut buf = Vec::new();
        let mut events = Vec::new();
        for &b in bytes {
            buf.push(b);
            loop {
                let (used, event) = peer.step(&buf)?;
                if used == 0 {
                    break;
                }
                buf.drain(..used);
                events.extend(event);
            }
        }
        Ok(events)
    }

    fn handshaken(kind: &[u8]) -> Peer {
        let mut peer = Peer::new(LIMITS);
        let mut hello = greeting().to_vec();
        hello.extend_from_slice(&ready_from(kind));
        assert_eq!(feed(&mut peer, &hello), Ok(vec![]));
        assert!(peer.ready());
        peer
    }

    #[test]
    fn a_req_client_handshakes_and_its_messages_come_whole_however_split() {
        let mut peer = handshaken(b"REQ");
        let mut wire = Vec::new();
        put_message(&mut wire, &[b"", b"echo", b"x"]);
        let big = vec![7u8; 90];
        put_message(&mut wire, &[&big]);
        let events = feed(&mut peer, &wire).expect("sound");
        assert_eq!(
            events,
            vec![
                Event::Message(vec![vec![], b"echo".to_vec(), b"x".to_vec()]),
                Event::Message(vec![big]),
            ]
        );
        assert!(ready(b"ROUTER").starts_with(&[0x04]));
        // A REQ client's side: the ROUTER's handshake, then its answer.
        let mut client = Peer::new(Limits {
            peers: SERVERS,
            ..LIMITS
        });
        let mut wire = greeting().to_vec();
        wire.extend_from_slice(&ready(b"ROUTER"));
        put_message(&mut wire, &[b"", b"TRUE"]);
        let events = feed(&mut client, &wire).expect("sound");
        assert_eq!(events, vec![Event::Message(vec![vec![], b"TRUE".to_vec()])]);
    }

    #[test]
    fn a_frame_over_300_bytes_uses_the_long_header() {
        let mut out = Vec::new();
        put_message(&mut out, &[&[1u8; 300]]);
        assert_eq!(&out[..9], &[0x02, 0, 0, 0, 0, 0, 0, 1, 44]);
    }

    /// A message frame's whole length is known from its header (to size a buffer), within
    /// the bounds only, and only once the handshake is done.
    #[test]
    fn a_frame_length_is_told_from_its_header_within_the_bounds() {
        assert_eq!(Peer::new(LIMITS).frame_len(&[0x00, 5]), None);
        let peer = handshaken(b"DEALER");
        assert_eq!(peer.frame_len(&[0x00, 5, b'a']), Some(7));
        let mut long = vec![0x03];
        long.extend_from_slice(&90u64.to_be_bytes());
        assert_eq!(peer.frame_len(&long), Some(99));
        assert_eq!(peer.frame_len(&long[..5]), None, "header not all there");
        long[8] = 101;
        assert_eq!(peer.frame_len(&long), None, "over the message's bound");
        assert_eq!(peer.frame_len(&[0x04, 5]), None, "a command");
    }

    #[test]
    fn hostile_or_foreign_peers_are_refused_before_anything_is_kept() {
        let refused = |bytes: &[u8]| feed(&mut Peer::new(LIMITS), bytes).err();
        assert_eq!(refused(b"GET / HTTP/1.1\r\n"), Some(Violation::NotZmtp));
        let mut old = greeting();
        old[10] = 2;
        assert_eq!(refused(&old), Some(Violation::Version(2)));
        let mut curve = greeting();
        curve[12..17].copy_from_slice(b"CURVE");
        assert_eq!(refused(&curve), Some(Violation::Mechanism("CURVE".into())));
        let mut publisher = greeting().to_vec();
        publisher.extend_from_slice(&ready_from(b"PUB"));
        assert_eq!(
            refused(&publisher),
            Some(Violation::SocketType("PUB".into()))
        );
        let mut early = greeting().to_vec();
        put_message(&mut early, &[b"x"]);
        assert!(matches!(refused(&early), Some(Violation::Handshake(_))));
        // A frame announcing 2^63 bytes is refused from its header alone.
        let mut peer = handshaken(b"DEALER");
        let mut huge = vec![0x02];
        huge.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert!(matches!(
            feed(&mut peer, &huge),
            Err(Violation::TooLarge(_))
        ));
        // The message bound counts all its frames.
        let mut peer = handshaken(b"DEALER");
        let mut wire = Vec::new();
        put_message(&mut wire, &[&[0u8; 60], &[0u8; 60]]);
        assert!(matches!(
            feed(&mut peer, &wire),
            Err(Violation::TooLarge(120))
        ));
        let mut peer = handshaken(b"DEALER");
        let mut wire = Vec::new();
        put_message(&mut wire, &[b"", b"", b"", b"", b""]);
        assert_eq!(feed(&mut peer, &wire), Err(Violation::TooManyFrames));
    }

    /// Random bytes, before and after the handshake, never panic the decoder and never make
    /// it claim more bytes than it was given (a deterministic generator: the same run each time).
    #[test]
    fn random_bytes_are_decoded_or_refused_never_a_panic() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for round in 0..20_000 {
            let len = (next() % 300) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            // Mostly plausible frame flags, so the decoder gets past the first byte.
            if let Some(first) = bytes.first_mut() {
                *first &= 0x07;
            }
            let mut peer = if round % 4 == 0 {
                Peer::new(LIMITS)
            } else {
                handshaken(b"DEALER")
            };
            let mut at = 0;
            while let Ok((used, _)) = peer.step(&bytes[at..]) {
                if used == 0 {
                    break;
                }
                at += used;
                assert!(at <= bytes.len(), "claimed {at} of {} bytes", bytes.len());
            }
        }
    }

    #[test]
    fn a_ping_is_answered_with_its_context() {
        let mut peer = handshaken(b"REQ");
        let mut body = command_name(b"PING");
        body.extend_from_slice(&[0, 10, b'c', b't', b'x']);
        let mut wire = Vec::new();
        frame_header(&mut wire, 0x04, body.len());
        wire.extend_from_slice(&body);
        let events = feed(&mut peer, &wire).expect("sound");
        assert_eq!(
            events,
            vec![Event::Reply(vec![
                0x04, 8, 4, b'P', b'O', b'N', b'G', b'c', b't', b'x'
            ])]
        );
    }
}
