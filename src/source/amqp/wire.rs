//! AMQP 0-9-1 on the wire: frames, the methods gearshift sends and reads, field tables and
//! content properties. Writing appends whole frames to a buffer; reading checks every length
//! against what is left of its frame, so a hostile peer gets an error, never a panic or an
//! allocation it chose.

/// What a client sends first.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
pub const FRAME_METHOD: u8 = 1;
pub const FRAME_HEADER: u8 = 2;
pub const FRAME_BODY: u8 = 3;
pub const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;
/// Type, channel and size before a frame's payload, and the end octet after it.
pub const FRAME_OVERHEAD: usize = 8;
/// The class of `basic.*` methods and of message content.
const BASIC: u16 = 60;

/// A method's class and method ids.
pub type Id = (u16, u16);
pub const CONNECTION_START: Id = (10, 10);
pub const CONNECTION_START_OK: Id = (10, 11);
pub const CONNECTION_SECURE: Id = (10, 20);
pub const CONNECTION_TUNE: Id = (10, 30);
pub const CONNECTION_TUNE_OK: Id = (10, 31);
pub const CONNECTION_OPEN: Id = (10, 40);
pub const CONNECTION_OPEN_OK: Id = (10, 41);
pub const CONNECTION_CLOSE: Id = (10, 50);
pub const CONNECTION_CLOSE_OK: Id = (10, 51);
pub const CONNECTION_BLOCKED: Id = (10, 60);
pub const CONNECTION_UNBLOCKED: Id = (10, 61);
pub const CHANNEL_OPEN: Id = (20, 10);
pub const CHANNEL_OPEN_OK: Id = (20, 11);
pub const CHANNEL_CLOSE: Id = (20, 40);
pub const CHANNEL_CLOSE_OK: Id = (20, 41);
pub const EXCHANGE_DECLARE: Id = (40, 10);
pub const EXCHANGE_DECLARE_OK: Id = (40, 11);
pub const QUEUE_DECLARE: Id = (50, 10);
pub const QUEUE_DECLARE_OK: Id = (50, 11);
pub const QUEUE_BIND: Id = (50, 20);
pub const QUEUE_BIND_OK: Id = (50, 21);
pub const BASIC_QOS: Id = (BASIC, 10);
pub const BASIC_QOS_OK: Id = (BASIC, 11);
pub const BASIC_CONSUME: Id = (BASIC, 20);
pub const BASIC_CONSUME_OK: Id = (BASIC, 21);
pub const BASIC_CANCEL: Id = (BASIC, 30);
pub const BASIC_CANCEL_OK: Id = (BASIC, 31);
pub const BASIC_PUBLISH: Id = (BASIC, 40);
pub const BASIC_RETURN: Id = (BASIC, 50);
pub const BASIC_DELIVER: Id = (BASIC, 60);
pub const BASIC_ACK: Id = (BASIC, 80);
pub const BASIC_NACK: Id = (BASIC, 120);
pub const CONFIRM_SELECT: Id = (85, 10);
pub const CONFIRM_SELECT_OK: Id = (85, 11);

/// A value in a field table we send.
pub enum Value<'a> {
    Str(&'a [u8]),
    Bool(bool),
    Table(Vec<(&'a str, Value<'a>)>),
}

/// Arguments of a method being written.
pub struct Args<'a>(&'a mut Vec<u8>);

impl Args<'_> {
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    /// A short string: at most 255 bytes (longer is cut; names are checked before).
    pub fn short(&mut self, v: &[u8]) -> &mut Self {
        let v = &v[..v.len().min(255)];
        self.0.push(v.len() as u8);
        self.0.extend_from_slice(v);
        self
    }
    pub fn long(&mut self, v: &[u8]) -> &mut Self {
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(v);
        self
    }
    /// Consecutive bit fields, packed into one octet (at most 8).
    pub fn bits(&mut self, v: &[bool]) -> &mut Self {
        let octet = v
            .iter()
            .enumerate()
            .fold(0u8, |o, (i, &b)| o | (u8::from(b) << i));
        self.u8(octet)
    }
    pub fn table(&mut self, fields: &[(&str, Value<'_>)]) -> &mut Self {
        let at = self.0.len();
        self.u32(0);
        for (name, value) in fields {
            self.short(name.as_bytes());
            match value {
                Value::Str(s) => {
                    self.u8(b'S').long(s);
                }
                Value::Bool(b) => {
                    self.u8(b't').u8(u8::from(*b));
                }
                Value::Table(t) => {
                    self.u8(b'F').table(t);
                }
            }
        }
        let len = u32::try_from(self.0.len() - at - 4).unwrap_or(u32::MAX);
        self.0[at..at + 4].copy_from_slice(&len.to_be_bytes());
        self
    }
}

/// Appends a frame of `kind` on `channel` whose payload `body` writes.
fn frame(buf: &mut Vec<u8>, kind: u8, channel: u16, body: impl FnOnce(&mut Args<'_>)) {
    let at = buf.len();
    buf.push(kind);
    buf.extend_from_slice(&channel.to_be_bytes());
    buf.extend_from_slice(&[0; 4]);
    body(&mut Args(buf));
    let len = u32::try_from(buf.len() - at - 7).unwrap_or(u32::MAX);
    buf[at + 3..at + 7].copy_from_slice(&len.to_be_bytes());
    buf.push(FRAME_END);
}

/// Appends a method frame.
pub fn method(buf: &mut Vec<u8>, channel: u16, id: Id, args: impl FnOnce(&mut Args<'_>)) {
    frame(buf, FRAME_METHOD, channel, |a| {
        a.u16(id.0).u16(id.1);
        args(a);
    });
}

pub fn heartbeat(buf: &mut Vec<u8>) {
    frame(buf, FRAME_HEARTBEAT, 0, |_| {});
}

/// The content properties gearshift reads and sends.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Props {
    pub headers: Option<Vec<u8>>,
    pub delivery_mode: Option<u8>,
    pub correlation_id: Option<Vec<u8>>,
    pub reply_to: Option<Vec<u8>>,
    pub message_id: Option<Vec<u8>>,
    pub timestamp: Option<u64>,
    pub kind: Option<Vec<u8>>,
}

// Property flags, from the highest bit: content-type, content-encoding, headers, delivery-mode,
// priority, correlation-id, reply-to, expiration, message-id, timestamp, type, user-id, app-id,
// cluster-id.
const P_CONTENT_TYPE: u16 = 1 << 15;
const P_CONTENT_ENCODING: u16 = 1 << 14;
const P_HEADERS: u16 = 1 << 13;
const P_DELIVERY_MODE: u16 = 1 << 12;
const P_PRIORITY: u16 = 1 << 11;
const P_CORRELATION_ID: u16 = 1 << 10;
const P_REPLY_TO: u16 = 1 << 9;
const P_EXPIRATION: u16 = 1 << 8;
const P_MESSAGE_ID: u16 = 1 << 7;
const P_TIMESTAMP: u16 = 1 << 6;
const P_TYPE: u16 = 1 << 5;
const P_USER_ID: u16 = 1 << 4;
const P_APP_ID: u16 = 1 << 3;
const P_CLUSTER_ID: u16 = 1 << 2;

/// Appends a message: its content header and as many body frames as `frame_max` needs.
pub fn content(buf: &mut Vec<u8>, channel: u16, props: &Props, body: &[u8], frame_max: usize) {
    frame(buf, FRAME_HEADER, channel, |a| {
        a.u16(BASIC).u16(0).u64(body.len() as u64);
        let flags = [
            (props.headers.is_some(), P_HEADERS),
            (props.delivery_mode.is_some(), P_DELIVERY_MODE),
            (props.correlation_id.is_some(), P_CORRELATION_ID),
            (props.reply_to.is_some(), P_REPLY_TO),
            (props.message_id.is_some(), P_MESSAGE_ID),
            (props.timestamp.is_some(), P_TIMESTAMP),
            (props.kind.is_some(), P_TYPE),
        ]
        .iter()
        .filter(|(set, _)| *set)
        .fold(0u16, |f, (_, bit)| f | bit);
        a.u16(flags);
        if let Some(h) = &props.headers {
            a.0.extend_from_slice(h);
        }
        if let Some(m) = props.delivery_mode {
            a.u8(m);
        }
        for s in [&props.correlation_id, &props.reply_to, &props.message_id]
            .into_iter()
            .flatten()
        {
            a.short(s);
        }
        if let Some(t) = props.timestamp {
            a.u64(t);
        }
        if let Some(k) = &props.kind {
            a.short(k);
        }
    });
    let most = frame_max.saturating_sub(FRAME_OVERHEAD).max(1);
    for chunk in body.chunks(most) {
        frame(buf, FRAME_BODY, channel, |a| {
            a.0.extend_from_slice(chunk);
        });
    }
}

/// A field table holding the given string fields, encoded (for `Props::headers`).
pub fn table_bytes(fields: &[(&str, Value<'_>)]) -> Vec<u8> {
    let mut v = Vec::new();
    Args(&mut v).table(fields);
    v
}

/// What is wrong with bytes read.
pub type WireResult<T> = std::result::Result<T, String>;

/// Reading a frame's payload, every length checked.
pub struct Reader<'a> {
    b: &'a [u8],
}

impl<'a> Reader<'a> {
    pub fn new(b: &'a [u8]) -> Reader<'a> {
        Reader { b }
    }

    fn take(&mut self, n: usize) -> WireResult<&'a [u8]> {
        if n > self.b.len() {
            return Err(format!(
                "a field of {n} bytes where {} are left",
                self.b.len()
            ));
        }
        let (head, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(head)
    }
    pub fn u8(&mut self) -> WireResult<u8> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> WireResult<u16> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    pub fn u32(&mut self) -> WireResult<u32> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    pub fn u64(&mut self) -> WireResult<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
    pub fn short(&mut self) -> WireResult<&'a [u8]> {
        let n = self.u8()?;
        self.take(usize::from(n))
    }
    pub fn long(&mut self) -> WireResult<&'a [u8]> {
        let n = self.u32()?;
        self.take(n as usize)
    }
    /// A field table, as its encoded bytes (length prefix included).
    pub fn table(&mut self) -> WireResult<&'a [u8]> {
        let whole = self.b;
        let n = self.u32()? as usize;
        self.take(n)?;
        Ok(&whole[..4 + n])
    }
    pub fn rest(&self) -> &'a [u8] {
        self.b
    }
}

/// How deep field arrays may nest in what gearshift reads (a publisher's headers are outside
/// input: a frame of 128 KiB holds 26,000 levels, too many to skip recursively on a thread's
/// stack).
const MAX_NESTING: usize = 64;

/// Skips one field value of type `tag` (the types RabbitMQ sends), `depth` arrays deep.
fn skip_value(r: &mut Reader<'_>, tag: u8, depth: usize) -> WireResult<()> {
    let fixed = match tag {
        b't' | b'b' | b'B' => 1,
        b's' | b'u' => 2,
        b'I' | b'i' | b'f' => 4,
        b'l' | b'L' | b'd' | b'T' => 8,
        b'D' => 5,
        b'V' => 0,
        b'S' | b'x' => {
            r.long()?;
            return Ok(());
        }
        b'A' if depth >= MAX_NESTING => {
            return Err(format!("field arrays nested more than {MAX_NESTING} deep"))
        }
        b'A' => {
            let mut items = Reader::new(r.long()?);
            while !items.b.is_empty() {
                let t = items.u8()?;
                skip_value(&mut items, t, depth + 1)?;
            }
            return Ok(());
        }
        b'F' => {
            r.table()?;
            return Ok(());
        }
        other => return Err(format!("a field of unknown type 0x{other:02x}")),
    };
    r.take(fixed).map(drop)
}

/// The long-string value of field `name` in an encoded table (None: absent or not a string).
pub fn table_get<'a>(table: &'a [u8], name: &str) -> WireResult<Option<&'a [u8]>> {
    let mut r = Reader::new(table);
    let mut fields = Reader::new(r.long()?);
    while !fields.b.is_empty() {
        let key = fields.short()?;
        let tag = fields.u8()?;
        if key == name.as_bytes() && tag == b'S' {
            return Ok(Some(fields.long()?));
        }
        skip_value(&mut fields, tag, 0)?;
    }
    Ok(None)
}

/// The body's size a content header announces (read before its properties, which may not be).
pub fn body_size(payload: &[u8]) -> WireResult<u64> {
    let mut r = Reader::new(payload);
    r.u16()?;
    r.u16()?;
    r.u64()
}

/// A content header: the body's size and the properties gearshift uses.
pub fn read_header(payload: &[u8]) -> WireResult<(u64, Props)> {
    let mut r = Reader::new(payload);
    let _class = r.u16()?;
    let _weight = r.u16()?;
    let size = r.u64()?;
    let flags = r.u16()?;
    if flags & 1 != 0 {
        return Err("property flags beyond the 14 AMQP 0-9-1 defines".into());
    }
    let mut p = Props::default();
    let short = |r: &mut Reader<'_>, bit: u16| -> WireResult<Option<Vec<u8>>> {
        (flags & bit != 0)
            .then(|| r.short().map(<[u8]>::to_vec))
            .transpose()
    };
    short(&mut r, P_CONTENT_TYPE)?;
    short(&mut r, P_CONTENT_ENCODING)?;
    if flags & P_HEADERS != 0 {
        let t = r.table()?;
        // Checked now, so a lookup later cannot fail.
        table_get(t, "")?;
        p.headers = Some(t.to_vec());
    }
    if flags & P_DELIVERY_MODE != 0 {
        p.delivery_mode = Some(r.u8()?);
    }
    if flags & P_PRIORITY != 0 {
        r.u8()?;
    }
    p.correlation_id = short(&mut r, P_CORRELATION_ID)?;
    p.reply_to = short(&mut r, P_REPLY_TO)?;
    short(&mut r, P_EXPIRATION)?;
    p.message_id = short(&mut r, P_MESSAGE_ID)?;
    if flags & P_TIMESTAMP != 0 {
        p.timestamp = Some(r.u64()?);
    }
    p.kind = short(&mut r, P_TYPE)?;
    short(&mut r, P_USER_ID)?;
    short(&mut r, P_APP_ID)?;
    short(&mut r, P_CLUSTER_ID)?;
    Ok((size, p))
}

/// A frame read: its type, channel, payload, and its length on the wire.
pub type Frame<'a> = (u8, u16, &'a [u8], usize);

/// A whole frame at the start of `buf`: (type, channel, payload) and its length on the wire;
/// None: not all of it has arrived. A frame larger than `max` (payload) or without its end
/// octet is an error: the peer does not speak AMQP 0-9-1.
pub fn parse_frame(buf: &[u8], max: usize) -> WireResult<Option<Frame<'_>>> {
    if buf.len() < 7 {
        if let Some(&kind) = buf.first() {
            check_kind(kind, buf)?;
        }
        return Ok(None);
    }
    check_kind(buf[0], buf)?;
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
    if size > max {
        return Err(format!("a frame of {size} bytes (at most {max} agreed)"));
    }
    let Some(&end) = buf.get(7 + size) else {
        return Ok(None);
    };
    if end != FRAME_END {
        return Err(format!("a frame that does not end in 0xCE (0x{end:02x})"));
    }
    Ok(Some((buf[0], channel, &buf[7..7 + size], 8 + size)))
}

fn check_kind(kind: u8, buf: &[u8]) -> WireResult<()> {
    match kind {
        FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT => Ok(()),
        _ if buf.starts_with(b"AMQP") => {
            Err("the server refused AMQP 0-9-1 (it answered with its own protocol header)".into())
        }
        _ => {
            let head = crate::text::escape_bytes(&buf[..buf.len().min(24)]);
            Err(format!(
                "a frame of unknown type 0x{kind:02x} (the server sent \"{head}\")"
            ))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_message_written_reads_back_with_its_properties_split_into_frames() {
        let props = Props {
            headers: Some(table_bytes(&[
                ("x", Value::Bool(true)),
                ("outcome", Value::Str(b"done")),
            ])),
            delivery_mode: Some(2),
            correlation_id: Some(b"c1".to_vec()),
            reply_to: Some(b"amq.gen-1".to_vec()),
            message_id: Some(b"m".to_vec()),
            timestamp: Some(17),
            kind: Some(b"send_mail".to_vec()),
        };
        let mut buf = Vec::new();
        content(&mut buf, 1, &props, &[7u8; 20], 16);
        let (kind, ch, payload, used) = parse_frame(&buf, 1 << 20).unwrap().unwrap();
        assert_eq!((kind, ch), (FRAME_HEADER, 1));
        let (size, back) = read_header(payload).unwrap();
        assert_eq!(size, 20);
        assert_eq!(back, props);
        let h = back.headers.unwrap();
        assert_eq!(table_get(&h, "outcome").unwrap(), Some(&b"done"[..]));
        assert_eq!(table_get(&h, "x").unwrap(), None);
        let mut rest = &buf[used..];
        let mut body = 0;
        while let Some((kind, _, p, n)) = parse_frame(rest, 8).unwrap() {
            assert_eq!(kind, FRAME_BODY);
            body += p.len();
            rest = &rest[n..];
        }
        assert_eq!((body, rest.len()), (20, 0));
    }

    #[test]
    fn hostile_bytes_are_errors_not_panics() {
        assert!(parse_frame(b"HTTP/1.1 400", 100).is_err());
        assert!(parse_frame(b"AMQP\x00\x00\x09\x01", 100).is_err());
        assert!(parse_frame(&[1, 0, 0, 0xff, 0xff, 0xff, 0xff], 1000).is_err());
        assert!(parse_frame(&[1, 0, 0, 0, 0, 0, 1, 9, 0], 10).is_err());
        assert_eq!(parse_frame(&[1, 0, 0, 0, 0, 0, 1, 9], 10), Ok(None));
        assert!(read_header(&[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5, 0x20, 0]).is_err());
        // A headers table claiming more than is there, and an unknown field type.
        assert!(table_get(&[0, 0, 0, 9, 1, b'a', b'S', 0, 0, 0, 50], "a").is_err());
        assert!(table_get(&[0, 0, 0, 3, 1, b'a', b'?'], "b").is_err());
        for n in 0..64 {
            let junk: Vec<u8> = (0..n).map(|i| (i * 37 + n) as u8).collect();
            let _ = read_header(&junk);
            let _ = table_get(&junk, "a");
            let _ = parse_frame(&junk, 16);
        }
    }

    /// A publisher's headers are outside input, and a field array may hold arrays: 26,000
    /// levels fit a frame of 128 KiB (5 bytes a level), and skipping them recursively ran a
    /// lane's reader thread out of stack (the process aborted, and the broker redelivered the
    /// message to the next worker). Now refused past a depth, as an error like any other.
    #[test]
    fn deeply_nested_header_arrays_are_an_error_not_a_stack_overflow() {
        let depth: u32 = 26_000;
        let mut fields = vec![1, b'x'];
        for level in (0..=depth).rev() {
            fields.push(b'A');
            fields.extend_from_slice(&(5 * level).to_be_bytes());
        }
        let mut table = (fields.len() as u32).to_be_bytes().to_vec();
        table.extend_from_slice(&fields);
        let got = std::thread::Builder::new()
            .stack_size(2 << 20)
            .spawn(move || table_get(&table, "y").map(|v| v.map(<[u8]>::to_vec)))
            .unwrap()
            .join()
            .unwrap();
        assert!(got.is_err_and(|e| e.contains("nested")));
        // A few levels are fine.
        let mut fields = vec![1, b'x'];
        for level in (0..=3u32).rev() {
            fields.push(b'A');
            fields.extend_from_slice(&(5 * level).to_be_bytes());
        }
        let mut table = (fields.len() as u32).to_be_bytes().to_vec();
        table.extend_from_slice(&fields);
        assert_eq!(table_get(&table, "y"), Ok(None));
    }
}
