//! Runs of jobs that ended the worker, and the limit on them (`[source] max_attempts`), for the
//! sources whose server gives a job back when the worker dies (AMQP, Gearman). A job that kills
//! the worker (an in-process function that aborts, overflows its stack or is killed for its
//! memory) came back after every restart and killed the worker again, for ever: a classic
//! queue has no delivery limit, and gearmand's `-j` is 0 (none) by default (a quorum queue's
//! `delivery-limit` and gearmand's `-j N` are the servers' own answers; this one works with
//! both, and counts only runs that ended the worker).
//!
//! Each lane writes the key of the job it runs into its slot of
//! `state_dir/worker/attempts-running` (64 bytes at its index) and clears it when the run ends
//! or the job is given back unrun. The file is mapped shared, so a slot is a store to memory
//! that the page cache keeps when the process dies (it must survive the process, not the
//! machine): a `pwrite` at each start and end cost the 4-lane AMQP drain about 10 µs of CPU a
//! job (its rate 1.02x-1.04x the PHP consumer's against 1.18x-1.24x). A slot still filled when
//! a generation opens the source is a run the worker did not live through: its key's count goes
//! up in `attempts-interrupted` (written only then). A job whose count has reached
//! `max_attempts` is failed unrun (AMQP: dead-lettered; Gearman: WORK_FAIL, which gearmand
//! never retries); a run of it that ends forgets it. (A process of the worker's user that
//! truncates the file under the mapping ends the worker with SIGBUS, which it could do with a
//! signal anyway.)

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::ops::logging::Recurring;
use crate::text::ShowPath;

/// The lanes' slots.
pub const RUNNING: &str = "attempts-running";
/// The counts: `KEY COUNT` lines.
pub const COUNTS: &str = "attempts-interrupted";
/// One slot: a key (32 hex digits) and a newline, padded with zeros.
const SLOT: usize = 64;
/// Slots: one for each lane (at most 1,024), the most read.
const MAX_SLOTS: usize = 1024;
/// The most keys kept (the oldest are not told apart: any is dropped past it).
const MAX_KEYS: usize = 4096;

/// A job's key: the first 16 bytes of the sha256 of `parts` (each length-prefixed), which
/// name the job as its server does (AMQP: `message_id` and body; Gearman: server and handle).
pub fn key(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part);
    }
    crate::text::hex(&h.finalize()[..16])
}

fn is_key(s: &str) -> bool {
    s.len() == 32 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `attempts-running`, mapped shared: a slot of `SLOT` bytes for each lane.
struct Slots {
    base: std::ptr::NonNull<u8>,
    len: usize,
    _file: File,
}

// SAFETY: the mapping is owned by this value (unmapped only in its drop) and only written
// through `&mut self` (the owning `Attempts` sits behind a mutex): moving it to another thread
// cannot race.
unsafe impl Send for Slots {}

impl Slots {
    /// Maps `file` with room for `lanes` slots. Its bytes are written (zeros) first, so a store
    /// into the mapping never needs a block the file system does not have: a store into a hole
    /// of a full file system is a SIGBUS (the test suite's full 1 MiB `worker/` found it).
    fn map(file: File, lanes: usize) -> std::io::Result<Slots> {
        let len = (lanes.clamp(1, MAX_SLOTS) * SLOT).next_multiple_of(4096);
        if file.metadata()?.len() > len as u64 {
            file.set_len(len as u64)?;
        }
        std::os::unix::fs::FileExt::write_all_at(&file, &vec![0u8; len], 0)?;
        // SAFETY: a new shared mapping of `len` bytes of a regular file we hold open and just
        // wrote `len` bytes of; the kernel picks the address; nothing else in this process maps
        // it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&file),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let base = std::ptr::NonNull::new(p.cast::<u8>())
            .ok_or_else(|| std::io::Error::other("mmap returned a null address"))?;
        Ok(Slots {
            base,
            len,
            _file: file,
        })
    }

    fn write(&mut self, lane: usize, slot: &[u8; SLOT]) {
        let at = lane.min(self.len / SLOT - 1) * SLOT;
        // SAFETY: `at + SLOT <= self.len`, the mapping's length (a multiple of SLOT, at least
        // one); `&mut self` is the only writer, and `slot` is our own memory, not the mapping.
        unsafe { std::ptr::copy_nonoverlapping(slot.as_ptr(), self.base.as_ptr().add(at), SLOT) }
    }
}

impl Drop for Slots {
    fn drop(&mut self) {
        // SAFETY: the mapping `map` made, of that length, unmapped once.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

/// The slots and the counts of one generation.
pub struct Attempts {
    dir: PathBuf,
    running: Option<Slots>,
    counts: HashMap<String, u32>,
    failing: Recurring,
}

impl Attempts {
    /// Opens the files in the worker's directory `dir`, counting every run the last generation
    /// did not live through (a worker that cannot read or write them runs without the limit,
    /// and says so).
    pub fn open(dir: &Path, lanes: usize) -> Attempts {
        let mut a = Attempts {
            dir: dir.to_path_buf(),
            running: None,
            counts: read(&dir.join(COUNTS), MAX_KEYS * 48)
                .lines()
                .filter_map(|l| {
                    let (k, n) = l.split_once(' ')?;
                    Some((k.to_string(), n.parse().ok()?)).filter(|(k, _)| is_key(k))
                })
                .take(MAX_KEYS)
                .collect(),
            failing: Recurring::new(
                "runs of jobs cannot be recorded (max_attempts does not hold meanwhile)",
                "runs of jobs are recorded again",
            ),
        };
        // One open for the last generation's slots and the new mapping (this is on the way to
        // a new generation's first job).
        let file = regular(
            OpenOptions::new().read(true).write(true).create(true),
            &dir.join(RUNNING),
        );
        let slots = match &file {
            Ok(f) => read_from(f, MAX_SLOTS * SLOT).unwrap_or_else(|e| {
                log::warn!(
                    "cannot read \"{RUNNING}\" ({e}): runs before this start are not counted"
                );
                String::new()
            }),
            Err(_) => String::new(),
        };
        let cut: Vec<String> = slots
            .as_bytes()
            .chunks(SLOT)
            .filter_map(|s| std::str::from_utf8(s.get(..32)?).ok())
            .filter(|k| is_key(k))
            .map(str::to_string)
            .collect();
        for k in &cut {
            *a.counts.entry(k.clone()).or_default() += 1;
        }
        if !cut.is_empty() {
            log::warn!(
                "{} job(s) were being run when the worker ended: counted against max_attempts",
                cut.len()
            );
            a.save();
        }
        match file.and_then(|f| Slots::map(f, lanes)) {
            Ok(slots) => a.running = Some(slots),
            Err(e) => a
                .failing
                .failed(&format_args!("mapping \"{RUNNING}\": {e}")),
        }
        a
    }

    /// How many runs of the job with `key` the worker did not live through.
    pub fn interrupted(&self, key: &str) -> u32 {
        self.counts.get(key).copied().unwrap_or(0)
    }

    /// Lane `lane` runs the job with `key` (None: no longer runs one).
    pub fn running(&mut self, lane: usize, key: Option<&str>) {
        let Some(slots) = self.running.as_mut() else {
            return;
        };
        let mut slot = [0u8; SLOT];
        if let Some(k) = key {
            let n = k.len().min(SLOT - 1);
            slot[..n].copy_from_slice(&k.as_bytes()[..n]);
            slot[n] = b'\n';
        }
        slots.write(lane, &slot);
    }

    /// A run of the job with `key` ended: it is forgotten.
    pub fn ended(&mut self, key: &str) {
        if self.counts.remove(key).is_some() {
            self.save();
        }
    }

    /// Writes the counts (a new file renamed over the old).
    fn save(&mut self) {
        let path = self.dir.join(COUNTS);
        let tmp = self.dir.join(format!("{COUNTS}.tmp"));
        let text: String = self
            .counts
            .iter()
            .take(MAX_KEYS)
            .map(|(k, n)| format!("{k} {n}\n"))
            .collect();
        let saved = regular(
            OpenOptions::new().write(true).create(true).truncate(true),
            &tmp,
        )
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .and_then(|()| std::fs::rename(&tmp, &path));
        match saved {
            Ok(()) => self.failing.worked(),
            Err(e) => self
                .failing
                .failed(&format_args!("writing \"{COUNTS}\": {e}")),
        }
    }
}

/// Up to `limit` bytes of `path` as text; empty if it cannot be read (said, unless missing).
fn read(path: &Path, limit: usize) -> String {
    let opened = regular(OpenOptions::new().read(true), path);
    match opened.and_then(|f| read_from(&f, limit)) {
        Ok(text) => text,
        Err(e) => {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!(
                    "cannot read \"{}\" ({e}): runs before this start are not counted",
                    path.shown()
                );
            }
            String::new()
        }
    }
}

/// Up to `limit` bytes of `file` from its start, as text: room for its size made first, so
/// that it is one read (and one that finds the end), not a read for every doubling.
fn read_from(file: &File, limit: usize) -> std::io::Result<String> {
    use std::io::Read;
    let size = usize::try_from(file.metadata()?.len()).unwrap_or(limit);
    let mut bytes = Vec::with_capacity(size.min(limit) + 1);
    file.take(limit as u64).read_to_end(&mut bytes)?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Opens `path` as `how` says, never through a link nor blocking on a FIFO, and only if it is a
/// regular file (the worker's directory is the worker's user's, and so every job's).
pub(crate) fn regular(how: &mut OpenOptions, path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = how
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            // What a FIFO with no reader answers.
            Some(libc::ENXIO) => std::io::Error::other("not a regular file (a FIFO)"),
            _ => e,
        })?;
    if !f.metadata()?.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok(f)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn runs_left_in_their_slots_are_counted_and_a_run_that_ends_is_forgotten() {
        let dir = std::env::temp_dir().join(format!("gs-attempts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (a, b) = (key(&[b"m1", b"x"]), key(&[b"", b"m1x"]));
        assert_ne!(a, b, "the id and the body are told apart");
        let mut g1 = Attempts::open(&dir, 4);
        g1.running(0, Some(&a));
        g1.running(3, Some(&b));
        g1.running(3, None);
        // g1 dies: lane 0's run of `a` was cut.
        let mut g2 = Attempts::open(&dir, 4);
        assert_eq!((g2.interrupted(&a), g2.interrupted(&b)), (1, 0));
        g2.running(1, Some(&a));
        let g3 = Attempts::open(&dir, 4);
        assert_eq!(g3.interrupted(&a), 2);
        let mut g4 = Attempts::open(&dir, 4);
        g4.ended(&a);
        assert_eq!(Attempts::open(&dir, 4).interrupted(&a), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
