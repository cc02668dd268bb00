//! The spool's file formats: job files (`GSJ2`) and result records (`GSR2`) with the body's
//! length and sha256, and the older v1 forms (read only).

use sha2::{Digest, Sha256};

use super::*;

/// The file formats: version 2 carries the body's length and sha256 (truncation and corruption
/// are detected); version 1 files (no length, no checksum) are still read.
pub(super) const JOB_MAGIC: &str = "GSJ2";
pub(super) const RECORD_MAGIC: &str = "GSR2";
pub(super) const JOB_MAGIC_V1: &str = "GSJ1";
pub(super) const RECORD_MAGIC_V1: &str = "GSR1";

/// A queued job file's contents.
pub(super) struct JobFile {
    pub(super) function: String,
    pub(super) submitted_ms: u64,
    pub(super) attempts: u32,
    pub(super) payload: Vec<u8>,
}

pub(super) fn encode_job(job: &JobFile) -> Vec<u8> {
    let mut out = format!(
        "{JOB_MAGIC}\nfunction={}\nsubmitted={}\nattempts={}\nlength={}\nsha256={}\n\n",
        job.function,
        job.submitted_ms,
        job.attempts,
        job.payload.len(),
        crate::text::hex(&Sha256::digest(&job.payload))
    )
    .into_bytes();
    out.extend_from_slice(&job.payload);
    out
}

pub(super) fn decode_job(bytes: &[u8]) -> std::result::Result<JobFile, String> {
    let (fields, payload) = split_header(bytes, &[JOB_MAGIC, JOB_MAGIC_V1])?;
    Ok(JobFile {
        function: field(&fields, "function")?.to_string(),
        submitted_ms: number(&fields, "submitted")?,
        attempts: number(&fields, "attempts")? as u32,
        payload: payload.to_vec(),
    })
}

pub(super) fn encode_record(r: &Record) -> Vec<u8> {
    let outcome = match r.outcome {
        Outcome::Done => "done",
        Outcome::Failed => "failed",
    };
    let mut out = format!(
        "{RECORD_MAGIC}\noutcome={outcome}\nfunction={}\nattempts={}\nsubmitted={}\nstarted={}\nfinished={}\nlength={}\nsha256={}\n",
        r.function,
        r.attempts,
        r.submitted_ms,
        r.started_ms,
        r.finished_ms,
        r.result.len(),
        crate::text::hex(&Sha256::digest(&r.result))
    );
    if let Some(e) = &r.error {
        out.push_str("error=");
        out.push_str(&escape(e));
        out.push('\n');
    }
    out.push('\n');
    let mut out = out.into_bytes();
    out.extend_from_slice(&r.result);
    out
}

pub(super) fn decode_record(id: &str, bytes: &[u8]) -> std::result::Result<Record, String> {
    let (fields, body) = split_header(bytes, &[RECORD_MAGIC, RECORD_MAGIC_V1])?;
    let outcome = match field(&fields, "outcome")? {
        "done" => Outcome::Done,
        "failed" => Outcome::Failed,
        other => return Err(format!("unknown outcome {other:?}")),
    };
    Ok(Record {
        id: id.to_string(),
        outcome,
        function: field(&fields, "function")?.to_string(),
        attempts: number(&fields, "attempts")? as u32,
        submitted_ms: number(&fields, "submitted")?,
        started_ms: number(&fields, "started")?,
        finished_ms: number(&fields, "finished")?,
        error: field(&fields, "error").ok().map(unescape),
        result: body.to_vec(),
    })
}

/// A file's header fields and its body.
pub(super) type Parts<'a> = (Vec<(&'a str, &'a str)>, &'a [u8]);

/// Splits `MAGIC\nkey=value\n...\n\nbody` into its fields and body. `magics[0]` is the
/// current format, whose `length` and `sha256` fields are checked against the body; the others
/// are older formats without them.
pub(super) fn split_header<'a>(
    bytes: &'a [u8],
    magics: &[&str],
) -> std::result::Result<Parts<'a>, String> {
    let head_len = bytes.len().min(HEADER_ROOM as usize);
    let end = bytes[..head_len]
        .windows(2)
        .position(|w| w == b"\n\n")
        .ok_or("no end of header (truncated or not a job file)")?;
    let head = std::str::from_utf8(&bytes[..end]).map_err(|_| "header is not UTF-8")?;
    let mut lines = head.lines();
    let magic = lines.next().unwrap_or_default();
    if !magics.contains(&magic) {
        return Err(format!("not a {} file", magics.join(" or ")));
    }
    let fields = lines
        .map(|l| {
            l.split_once('=')
                .ok_or_else(|| format!("bad header line {l:?}"))
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let body = &bytes[end + 2..];
    if Some(&magic) == magics.first() {
        let length = number(&fields, "length")?;
        if (body.len() as u64) < length {
            return Err(format!("truncated: {} of {length} bytes", body.len()));
        }
        if body.len() as u64 > length {
            return Err(format!(
                "{} bytes where its header says {length}",
                body.len()
            ));
        }
        if crate::text::hex(&Sha256::digest(body)) != field(&fields, "sha256")? {
            return Err("checksum mismatch: the content is corrupt".into());
        }
    }
    Ok((fields, body))
}

pub(super) fn field<'a>(
    fields: &[(&str, &'a str)],
    key: &str,
) -> std::result::Result<&'a str, String> {
    fields
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, v)| *v)
        .ok_or_else(|| format!("missing {key}"))
}

pub(super) fn number(fields: &[(&str, &str)], key: &str) -> std::result::Result<u64, String> {
    field(fields, key)?
        .parse()
        .map_err(|_| format!("{key} is not a number"))
}

pub(super) fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('\r', "\\r")
}

pub(super) fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}
/// Opens a spool entry (or journal segment) that others may have planted: never through a
/// link, never blocking on a FIFO, only a regular file (as fstat sees it on the descriptor).
pub(super) fn open_entry(path: &Path) -> io::Result<(std::fs::File, std::fs::Metadata)> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => io::Error::other("a symbolic link, not a spool file"),
            _ => e,
        })?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        let what = if meta.is_dir() {
            "a directory"
        } else {
            "a FIFO, socket or device"
        };
        return Err(io::Error::other(format!("not a regular file ({what})")));
    }
    Ok((f, meta))
}

/// Reads a spool entry ([`open_entry`]) of at most `max` bytes (checked with fstat before
/// reading, and bounded while reading).
pub(super) fn read_entry(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let (f, meta) = open_entry(path)?;
    if meta.len() > max {
        return Err(io::Error::other(format!(
            "{} bytes, over max_payload_bytes plus {HEADER_ROOM} bytes of header",
            meta.len()
        )));
    }
    crate::ops::safefs::read_bounded(f, max)?
        .ok_or_else(|| io::Error::other("grew over max_payload_bytes while being read"))
}
