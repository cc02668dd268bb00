//! A binary's sha256, read through a descriptor opened only as a regular file (a deploy's
//! candidate, the running image, `last-good`), and the short form log lines show.

use std::fs::File;
use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::text::hex;

/// First 12 hex digits, for log lines.
pub fn short(sha: &str) -> &str {
    // By characters: a digest read from a worker's answer is text from outside, never a panic.
    sha.char_indices().nth(12).map_or(sha, |(i, _)| &sha[..i])
}

pub fn hash_file(path: &Path) -> std::io::Result<String> {
    hash_reader(&mut open_binary(path)?)
}

/// A binary to hash or run, opened only as a regular file and never blocking (a FIFO put in
/// its place would hold the thread for ever).
pub(super) fn open_binary(path: &Path) -> std::io::Result<File> {
    crate::ops::safefs::open_regular(path, "opening").map_err(|e| match e {
        crate::Error::Io { source, .. } => source,
        other => std::io::Error::other(other.to_string()),
    })
}

/// The hex sha256 of everything `f` yields.
pub(super) fn hash_reader(f: &mut impl Read) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}
