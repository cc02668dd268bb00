//! The `message_id`s of the last N jobs that succeeded (`[source] dedupe_ids`), so a message
//! carrying one of them is acknowledged without running it again: a redelivery (the broker
//! redelivers what was not acknowledged when a worker died or a connection broke) or a
//! publisher's retry (a confirm lost, the message sent again).
//!
//! The window: the last N succeeded ids, across restarts and a killed worker (each id is
//! appended to `state_dir/worker/amqp-done-ids` before its ack, without fsync: it survives the
//! process, not the machine). An id is recorded after the reply was published, so a crash
//! between the reply and the record still runs the job again (and replies twice).

use std::collections::{HashSet, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::ops::logging::Recurring;
use crate::source::attempts::regular;
use crate::text::ShowPath;

/// The file's name, in the worker's directory.
pub const FILE: &str = "amqp-done-ids";
/// The most of the file read at start (a longer file is cut to its tail by the next rewrite).
const READ_LIMIT: u64 = 64 << 20;

/// Remembered ids, oldest first.
pub struct Dedupe {
    cap: usize,
    order: VecDeque<String>,
    set: HashSet<String>,
    path: PathBuf,
    file: Option<File>,
    /// Lines in the file (rewritten to the last `cap` when it reaches twice that).
    lines: usize,
    /// The file cannot be written (a full disk): said once while it lasts, not once a job.
    failing: Recurring,
    /// An append failed: the file may end in part of an id, which the next append ends first.
    torn: bool,
}

impl Dedupe {
    /// The last `cap` ids recorded in `path` (none if it cannot be read: logged).
    pub fn open(path: &Path, cap: usize) -> Dedupe {
        let mut d = Dedupe {
            cap,
            order: VecDeque::with_capacity(cap.min(1 << 16)),
            set: HashSet::new(),
            path: path.to_path_buf(),
            file: None,
            lines: 0,
            failing: Recurring::new(
                "amqp: done ids not recorded (each is remembered until the worker stops)",
                "amqp: done ids recorded again",
            ),
            torn: false,
        };
        if cap == 0 {
            return d;
        }
        match read_tail(path) {
            Ok(text) => {
                for line in text.lines().filter(|l| is_hex_id(l)) {
                    d.lines += 1;
                    d.remember(line.to_string());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!(
                "amqp: cannot read \"{}\" ({e}): no redelivery is recognised as done before this start",
                path.shown()
            ),
        }
        d
    }

    /// Whether the job with this `message_id` succeeded within the window.
    pub fn seen(&self, message_id: &[u8]) -> bool {
        self.cap > 0 && self.set.contains(&crate::text::hex(message_id))
    }

    /// Records a succeeded job's `message_id` (before its ack).
    pub fn record(&mut self, message_id: &[u8]) {
        if self.cap == 0 {
            return;
        }
        let id = crate::text::hex(message_id);
        if self.set.contains(&id) {
            return;
        }
        self.remember(id.clone());
        if self.lines >= self.cap.saturating_mul(2) {
            self.rewrite();
        }
        match self.append(&id) {
            Ok(()) => self.failing.worked(),
            Err(e) => self
                .failing
                .failed(&format_args!("appending to \"{}\": {e}", self.path.shown())),
        }
    }

    fn remember(&mut self, id: String) {
        if self.set.insert(id.clone()) {
            self.order.push_back(id);
        }
        while self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }

    fn append(&mut self, id: &str) -> std::io::Result<()> {
        if self.file.is_none() {
            self.file = Some(regular(
                OpenOptions::new().append(true).create(true),
                &self.path,
            )?);
        }
        if let Some(f) = self.file.as_mut() {
            // An empty line is no id: after a torn append, the newline ends the part left.
            let line = if self.torn {
                format!("\n{id}\n")
            } else {
                format!("{id}\n")
            };
            if let Err(e) = f.write_all(line.as_bytes()) {
                self.torn = true;
                return Err(e);
            }
            self.torn = false;
            self.lines += 1;
        }
        Ok(())
    }

    /// Replaces the file by the remembered ids (tmp + rename).
    fn rewrite(&mut self) {
        let tmp = self.path.with_extension("tmp");
        let mut text = String::with_capacity(self.order.len() * 33);
        for id in &self.order {
            text.push_str(id);
            text.push('\n');
        }
        let written = regular(
            OpenOptions::new().write(true).create(true).truncate(true),
            &tmp,
        )
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .and_then(|()| std::fs::rename(&tmp, &self.path));
        match written {
            Ok(()) => {
                self.file = None;
                self.lines = self.order.len();
                self.torn = false;
            }
            Err(e) => self
                .failing
                .failed(&format_args!("rewriting \"{}\": {e}", self.path.shown())),
        }
    }
}

fn is_hex_id(line: &str) -> bool {
    !line.is_empty() && line.len() <= 510 && line.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The file's last [`READ_LIMIT`] bytes, from a whole line on.
fn read_tail(path: &Path) -> std::io::Result<String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    let start = meta.len().saturating_sub(READ_LIMIT);
    f.seek(SeekFrom::Start(start))?;
    let mut bytes = Vec::new();
    f.take(READ_LIMIT).read_to_end(&mut bytes)?;
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    if start > 0 {
        let cut = text.find('\n').map_or(text.len(), |i| i + 1);
        text.drain(..cut);
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An append that failed part way (a full disk) leaves part of an id at the end of the
    /// file; the next id must not be glued to it.
    #[test]
    fn an_id_after_a_torn_append_is_read_back_whole() {
        let dir = crate::testutil::tempdir("amqp", "dedupe-torn");
        let path = dir.join(FILE);
        let mut d = Dedupe::open(&path, 10);
        d.record(b"a");
        // As a write cut short by ENOSPC leaves it: part of the next id, no newline; and the
        // append itself failing (here through a read-only handle).
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(b"6"))
            .expect("tear");
        d.file = Some(File::open(&path).expect("read-only"));
        d.record(b"b");
        d.file = None;
        d.record(b"c");
        let again = Dedupe::open(&path, 10);
        assert!(again.seen(b"a") && again.seen(b"c"), "{:?}", again.order);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_window_holds_the_last_ids_across_a_reopen() {
        let dir = crate::testutil::tempdir("amqp", "dedupe");
        let path = dir.join(FILE);
        let mut d = Dedupe::open(&path, 3);
        for id in [b"a".as_slice(), b"b", b"c", b"d", b"\n\x1b"] {
            d.record(id);
        }
        assert!(!d.seen(b"a") && !d.seen(b"b"), "outside the window");
        assert!(d.seen(b"c") && d.seen(b"d") && d.seen(b"\n\x1b"));
        // Rewritten at twice the window: the file stays bounded.
        for i in 0..20u8 {
            d.record(&[i]);
        }
        let lines = std::fs::read_to_string(&path)
            .expect("read")
            .lines()
            .count();
        assert!(lines <= 6, "{lines} lines");
        let again = Dedupe::open(&path, 3);
        assert!(again.seen(&[19]) && again.seen(&[17]) && !again.seen(&[16]));
        // Off: nothing is remembered or written.
        let off = Dedupe::open(&dir.join("off"), 0);
        assert!(!off.seen(b"c"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
