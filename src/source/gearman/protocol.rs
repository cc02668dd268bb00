//! The Gearman binary protocol: packet framing, encoding and a hardened decoder.
//!
//! A packet is a 4-byte magic (`\0REQ` to the server, `\0RES` from it), a 4-byte big-endian
//! type, a 4-byte big-endian data length, then the data: arguments separated by NUL bytes, the
//! last one running to the end (it may hold any bytes). The decoder never panics, never trusts a
//! length over `max` (so a hostile length cannot make us allocate), and rejects unknown magic and
//! unknown types.

use std::fmt;

pub const REQ: [u8; 4] = *b"\0REQ";
pub const RES: [u8; 4] = *b"\0RES";
pub const HEADER: usize = 12;

// Packet types (see ../shared/gearman-worker-protocol.md).
pub const CAN_DO: u32 = 1;
pub const RESET_ABILITIES: u32 = 3;
pub const PRE_SLEEP: u32 = 4;
pub const NOOP: u32 = 6;
pub const SUBMIT_JOB: u32 = 7;
pub const JOB_CREATED: u32 = 8;
pub const GRAB_JOB: u32 = 9;
pub const NO_JOB: u32 = 10;
pub const JOB_ASSIGN: u32 = 11;
pub const WORK_STATUS: u32 = 12;
pub const WORK_COMPLETE: u32 = 13;
pub const WORK_FAIL: u32 = 14;
pub const GET_STATUS: u32 = 15;
pub const ECHO_REQ: u32 = 16;
pub const ECHO_RES: u32 = 17;
pub const SUBMIT_JOB_BG: u32 = 18;
pub const ERROR: u32 = 19;
pub const STATUS_RES: u32 = 20;
pub const SUBMIT_JOB_HIGH: u32 = 21;
pub const SET_CLIENT_ID: u32 = 22;
pub const CAN_DO_TIMEOUT: u32 = 23;
pub const WORK_EXCEPTION: u32 = 25;
pub const OPTION_REQ: u32 = 26;
pub const OPTION_RES: u32 = 27;
pub const WORK_DATA: u32 = 28;
pub const WORK_WARNING: u32 = 29;
pub const GRAB_JOB_UNIQ: u32 = 30;
pub const JOB_ASSIGN_UNIQ: u32 = 31;
pub const SUBMIT_JOB_HIGH_BG: u32 = 32;
pub const SUBMIT_JOB_LOW: u32 = 33;
pub const SUBMIT_JOB_LOW_BG: u32 = 34;

/// The highest type number the protocol defines.
const MAX_TYPE: u32 = 42;

/// Why bytes from a peer are not a packet. The connection cannot be trusted afterwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    BadMagic([u8; 4]),
    UnknownType(u32),
    TooLarge { len: usize, max: usize },
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::BadMagic(m) => write!(f, "bad packet magic {m:02x?}"),
            DecodeError::UnknownType(t) => write!(f, "unknown packet type {t}"),
            DecodeError::TooLarge { len, max } => {
                write!(f, "packet of {len} bytes is over max_packet_bytes ({max})")
            }
        }
    }
}

/// A decoded packet borrowing its data from the read buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Packet<'a> {
    pub kind: u32,
    pub data: &'a [u8],
}

impl<'a> Packet<'a> {
    /// Splits the data into exactly `n` arguments (the last takes the rest), or None if there
    /// are fewer than `n - 1` separators.
    pub fn args<const N: usize>(&self) -> Option<[&'a [u8]; N]> {
        let mut out: [&[u8]; N] = [&[]; N];
        let mut rest = self.data;
        for slot in out.iter_mut().take(N.saturating_sub(1)) {
            let i = rest.iter().position(|&b| b == 0)?;
            *slot = &rest[..i];
            rest = &rest[i + 1..];
        }
        if N > 0 {
            out[N - 1] = rest;
        }
        Some(out)
    }
}

/// Decodes the packet at the start of `buf`: Ok(None) if more bytes are needed, else the packet
/// and how many bytes it used.
pub fn decode(
    buf: &[u8],
    magic: [u8; 4],
    max: usize,
) -> Result<Option<(Packet<'_>, usize)>, DecodeError> {
    if buf.len() < HEADER {
        // Reject a wrong magic as early as its bytes arrive.
        if buf[..buf.len().min(4)] != magic[..buf.len().min(4)] {
            let mut m = [0u8; 4];
            m[..buf.len().min(4)].copy_from_slice(&buf[..buf.len().min(4)]);
            return Err(DecodeError::BadMagic(m));
        }
        return Ok(None);
    }
    let m = [buf[0], buf[1], buf[2], buf[3]];
    if m != magic {
        return Err(DecodeError::BadMagic(m));
    }
    let kind = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if kind == 0 || kind > MAX_TYPE {
        return Err(DecodeError::UnknownType(kind));
    }
    let len = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
    if len > max {
        return Err(DecodeError::TooLarge { len, max });
    }
    if buf.len() < HEADER + len {
        return Ok(None);
    }
    Ok(Some((
        Packet {
            kind,
            data: &buf[HEADER..HEADER + len],
        },
        HEADER + len,
    )))
}

/// Appends a packet with `args` joined by NUL bytes.
pub fn encode(out: &mut Vec<u8>, magic: [u8; 4], kind: u32, args: &[&[u8]]) {
    let len: usize = args.iter().map(|a| a.len()).sum::<usize>() + args.len().saturating_sub(1);
    out.reserve(HEADER + len);
    out.extend_from_slice(&magic);
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(len as u32).to_be_bytes());
    for (i, a) in args.iter().enumerate() {
        if i > 0 {
            out.push(0);
        }
        out.extend_from_slice(a);
    }
}

/// A short name for log lines.
pub fn name(kind: u32) -> &'static str {
    match kind {
        CAN_DO => "CAN_DO",
        PRE_SLEEP => "PRE_SLEEP",
        NOOP => "NOOP",
        SUBMIT_JOB => "SUBMIT_JOB",
        JOB_CREATED => "JOB_CREATED",
        GRAB_JOB => "GRAB_JOB",
        NO_JOB => "NO_JOB",
        JOB_ASSIGN => "JOB_ASSIGN",
        WORK_STATUS => "WORK_STATUS",
        WORK_COMPLETE => "WORK_COMPLETE",
        GET_STATUS => "GET_STATUS",
        STATUS_RES => "STATUS_RES",
        WORK_FAIL => "WORK_FAIL",
        ECHO_REQ => "ECHO_REQ",
        ECHO_RES => "ECHO_RES",
        ERROR => "ERROR",
        SET_CLIENT_ID => "SET_CLIENT_ID",
        CAN_DO_TIMEOUT => "CAN_DO_TIMEOUT",
        WORK_EXCEPTION => "WORK_EXCEPTION",
        OPTION_RES => "OPTION_RES",
        WORK_DATA => "WORK_DATA",
        WORK_WARNING => "WORK_WARNING",
        JOB_ASSIGN_UNIQ => "JOB_ASSIGN_UNIQ",
        _ => "packet",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(magic: [u8; 4], kind: u32, args: &[&[u8]]) -> Vec<u8> {
        let mut v = Vec::new();
        encode(&mut v, magic, kind, args);
        v
    }

    #[test]
    fn encode_decode_table() {
        let cases: &[(u32, &[&[u8]])] = &[
            (NOOP, &[]),
            (CAN_DO, &[b"reverse"]),
            (
                JOB_ASSIGN_UNIQ,
                &[b"H:host:1", b"reverse", b"uniq", b"pay\0load\0"],
            ),
            (WORK_COMPLETE, &[b"H:host:1", b""]),
        ];
        for (kind, args) in cases {
            let bytes = packet(RES, *kind, args);
            let (p, used) = decode(&bytes, RES, 1 << 20)
                .expect("valid")
                .expect("complete");
            assert_eq!((p.kind, used), (*kind, bytes.len()));
            if args.len() == 4 {
                let [h, f, u, d] = p.args::<4>().expect("4 args");
                assert_eq!([h, f, u, d], [args[0], args[1], args[2], args[3]]);
            }
        }
    }

    #[test]
    fn decoder_rejects_and_waits() {
        let good = packet(RES, NOOP, &[]);
        assert_eq!(
            decode(&good[..5], RES, 100),
            Ok(None),
            "truncated header waits"
        );
        let big = packet(RES, JOB_ASSIGN, &[b"h", b"f", b"0123456789"]);
        assert_eq!(
            decode(&big[..big.len() - 1], RES, 100),
            Ok(None),
            "truncated data waits"
        );
        assert_eq!(
            decode(b"HTTP/1.1 200", RES, 100),
            Err(DecodeError::BadMagic(*b"HTTP"))
        );
        assert_eq!(
            decode(b"\0RQ", RES, 100),
            Err(DecodeError::BadMagic(*b"\0RQ\0")),
            "early"
        );
        assert_eq!(
            decode(&packet(REQ, NOOP, &[]), RES, 100),
            Err(DecodeError::BadMagic(REQ))
        );
        let mut unknown = packet(RES, NOOP, &[]);
        unknown[7] = 99;
        assert_eq!(
            decode(&unknown, RES, 100),
            Err(DecodeError::UnknownType(99))
        );
        let mut huge = packet(RES, NOOP, &[]);
        huge[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            decode(&huge, RES, 1000),
            Err(DecodeError::TooLarge {
                len: u32::MAX as usize,
                max: 1000
            })
        );
        assert_eq!(
            Packet {
                kind: 1,
                data: b"no separators"
            }
            .args::<2>(),
            None
        );
    }

    /// Property test of the decoder against random and mangled input: it never panics, never
    /// claims more bytes than it was given, and decodes every valid stream back exactly, however
    /// the stream is split into reads.
    #[test]
    fn decoder_property() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            // Random garbage, sometimes with a valid magic in front.
            let n = (rand() % 40) as usize;
            let mut junk: Vec<u8> = (0..n).map(|_| rand() as u8).collect();
            if rand() % 2 == 0 && junk.len() >= 4 {
                junk[..4].copy_from_slice(&RES);
            }
            if let Ok(Some((_, used))) = decode(&junk, RES, 64) {
                assert!(used <= junk.len());
            }
        }
        for _ in 0..2_000 {
            let count = 1 + rand() % 5;
            let mut stream = Vec::new();
            let mut want = Vec::new();
            for _ in 0..count {
                let kind = [NOOP, NO_JOB, JOB_ASSIGN_UNIQ, ECHO_RES][(rand() % 4) as usize];
                let data: Vec<u8> = (0..rand() % 50).map(|_| rand() as u8).collect();
                encode(&mut stream, RES, kind, &[&data]);
                want.push((kind, data));
            }
            // Feed it in random-sized reads, as a socket would.
            let mut buf = Vec::new();
            let mut got = Vec::new();
            let mut pos = 0;
            while pos < stream.len() {
                let step = 1 + (rand() % 23) as usize;
                buf.extend_from_slice(&stream[pos..(pos + step).min(stream.len())]);
                pos += step;
                while let Some((p, used)) = decode(&buf, RES, 64).expect("valid stream") {
                    got.push((p.kind, p.data.to_vec()));
                    buf.drain(..used);
                }
            }
            assert!(buf.is_empty());
            assert_eq!(got, want);
        }
    }
}
