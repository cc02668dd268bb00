//! The spool's write-ahead journal: many jobs or results made durable by one `fdatasync`.
//!
//! One file per job costs a file sync and a directory sync each (about 2k jobs/s on this disk);
//! an append-only log reaches about 78k records/s at 16 records per sync. So a writer (the
//! worker's committer, a batch submit) appends a batch of records to its own segment
//! `journal/NAME.wal`, holding an flock on it, syncs it once, and only then *materializes* each
//! record as the file it stands for (`new/ID`, `done/ID`, `failed/ID`, through `tmp/` and a
//! rename, as always, so a reader never sees half a file), without syncing those; the outcome of
//! a job that never had a file goes to a results log instead (`results.rs`). A sealed
//! segment, all of it materialized, is renamed to `NAME.done`.
//!
//! The worker's checkpoint (every few seconds, in a helper thread: no commit waits for it)
//! makes every materialized file durable with one `syncfs(2)` and deletes the sealed segments.
//! A fresh start replays every segment left, before anything else looks at the spool; replay
//! is idempotent (a record whose file is there and sound is skipped). A segment whose writer
//! died (`.wal`, its flock free) is replayed by the checkpoint too.
//!
//! A record: its length (u32, little endian, of what follows), the kind (`J` a job for `new/`,
//! `D` a result for `done/`, `F` one for `failed/`), the id's length (u8), the id, the body (the
//! file's bytes), and the first 8 bytes of the sha256 of kind, id and body. A torn or corrupt
//! record ends a segment's replay there: nothing after it was acknowledged.

use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;

use sha2::{Digest, Sha256};

use super::direct::Hold;
use super::format::JobFile;
use super::*;

/// A segment is sealed once this old (so a fresh start replays at most a few seconds), and
/// the checkpoint runs this often.
pub(super) const SEGMENT_AGE: std::time::Duration = std::time::Duration::from_secs(2);
/// A segment is sealed and a new one begun past this size.
pub(super) const SEGMENT_BYTES: u64 = 8 << 20;
/// The largest record replay accepts (a payload limit of 1 GiB and its header).
const MAX_RECORD: u32 = (1 << 30) + (1 << 20);

/// What a record stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A queued job: `new/ID`.
    Job,
    /// A result: `done/ID`.
    Done,
    /// A failure: `failed/ID`.
    Failed,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Job => b'J',
            Kind::Done => b'D',
            Kind::Failed => b'F',
        }
    }

    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            b'J' => Some(Kind::Job),
            b'D' => Some(Kind::Done),
            b'F' => Some(Kind::Failed),
            _ => None,
        }
    }

    pub(super) fn sub(self) -> &'static str {
        match self {
            Kind::Job => "new",
            Kind::Done => "done",
            Kind::Failed => "failed",
        }
    }
}

/// One record: a file to be, by its id.
#[derive(Debug)]
pub(super) struct Entry {
    pub(super) kind: Kind,
    pub(super) id: String,
    pub(super) body: Vec<u8>,
    /// A job that came to the lanes without a file (`direct.rs`): its journal segment, held
    /// until this outcome is in place.
    pub(super) hold: Option<Hold>,
}

impl Entry {
    pub(super) fn new(kind: Kind, id: String, body: Vec<u8>) -> Entry {
        Entry {
            kind,
            id,
            body,
            hold: None,
        }
    }
}

/// A copy holds nothing: only the original releases its segment.
impl Clone for Entry {
    fn clone(&self) -> Entry {
        Entry::new(self.kind, self.id.clone(), self.body.clone())
    }
}

fn checksum(kind: u8, id: &[u8], body: &[u8]) -> [u8; 8] {
    let mut h = Sha256::new();
    h.update([kind]);
    h.update(id);
    h.update(body);
    let d = h.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&d[..8]);
    out
}

/// Appends `e`, encoded, to `out`.
fn encode(e: &Entry, out: &mut Vec<u8>) {
    let id = e.id.as_bytes();
    let len = 1 + 1 + id.len() + e.body.len() + 8;
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.push(e.kind.byte());
    out.push(id.len() as u8);
    out.extend_from_slice(id);
    out.extend_from_slice(&e.body);
    out.extend_from_slice(&checksum(e.kind.byte(), id, &e.body));
}

/// `entries` as records, to cross an exec (see [`decode_all`]).
pub(super) fn encode_all(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.iter().map(|e| e.body.len() + 96).sum());
    for e in entries {
        encode(e, &mut out);
    }
    out
}

/// The records in `data` (bytes from outside this image: each is bounded and checksummed),
/// up to the first torn or corrupt one.
pub(super) fn decode_all(data: &[u8]) -> Vec<Entry> {
    let mut r = data;
    std::iter::from_fn(|| next_record(&mut r)).collect()
}

/// Reads the next record, None at the end or at a torn or corrupt one (the rest of the
/// segment was never acknowledged).
pub(super) fn next_record(r: &mut impl Read) -> Option<Entry> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).ok()?;
    let len = u32::from_le_bytes(len);
    if !(11..=MAX_RECORD).contains(&len) {
        return None;
    }
    let mut buf = Vec::new();
    r.take(u64::from(len)).read_to_end(&mut buf).ok()?;
    if buf.len() != len as usize {
        return None;
    }
    let (kind, id_len) = (buf[0], buf[1] as usize);
    let body_end = buf.len().checked_sub(8)?;
    if 2 + id_len > body_end {
        return None;
    }
    let id = std::str::from_utf8(&buf[2..2 + id_len]).ok()?;
    let body = &buf[2 + id_len..body_end];
    if checksum(kind, id.as_bytes(), body) != buf[body_end..] || !valid_id(id) {
        return None;
    }
    Some(Entry::new(
        Kind::from_byte(kind)?,
        id.to_string(),
        body.to_vec(),
    ))
}

/// Zeros written ahead of the records of a long-lived writer's segment (see
/// [`Segment::create_long`]).
const ZERO_AHEAD: usize = 256 << 10;
/// Free space below which a segment gets no zeros ahead.
const ROOMY: u64 = 64 << 20;

/// A writer's open segment.
pub(super) struct Segment {
    file: File,
    name: String,
    /// Where the records end (the next append goes there).
    pub(super) size: u64,
    /// How far the file is written (records, then zeros ahead of them), and how many zeros a
    /// crossing append writes ahead (0: none).
    end: u64,
    ahead: usize,
}

impl Segment {
    /// Begins a new segment, `role` naming its writer (`w` the worker, `s` a submit).
    pub(super) fn create(spool: &Spool, role: &str) -> Result<Segment> {
        // Ordered by boot time; the boot's tag says whether the page cache that holds its
        // files could have been lost since (a reboot).
        let name = format!(
            "{role}-{:016x}-{}-{}",
            order::boottime_ns(),
            order::boot_tag(),
            order::unique()
        );
        let dir = spool.opened("journal")?;
        let wal = format!("{name}.wal");
        let file = dir.create_new(&wal, 0o640)?;
        let path = spool.dir("journal").join(&wal);
        // Held while this writer lives: a `.wal` whose lock is free lost its writer.
        crate::ops::safefs::flock(file.as_raw_fd(), libc::LOCK_EX)
            .map_err(|e| Error::io_path("locking", &path, e.into()))?;
        if let Some((uid, gid)) = spool.give_to {
            crate::ops::safefs::chown_file(&file, &path, uid, gid)?;
        }
        Ok(Segment {
            file,
            name,
            size: 0,
            end: 0,
            ahead: 0,
        })
    }

    /// A segment for a writer that appends many batches (the group commit, the ZeroMQ
    /// ingress): each append that reaches past what the file holds also writes zeros ahead of
    /// it, so the appends after it overwrite zeros instead of growing the file, and their
    /// `fdatasync` has no size change to commit to the filesystem's journal (measured here:
    /// 150 µs and 41-57 µs of CPU against 210-270 µs and 57-111 µs per sync). Replay stops at
    /// the zeros: a record's length is never 0.
    ///
    /// Only on a filesystem with room to spare ([`ROOMY`] free): on a nearly full one the zeros
    /// would hold space the outcomes' files need (a full-disk test found the worker waiting
    /// for ever on a 2 MiB filesystem, its zeros in the way of its last result files).
    pub(super) fn create_long(spool: &Spool, role: &str) -> Result<Segment> {
        let mut segment = Segment::create(spool, role)?;
        let free = nix::sys::statvfs::fstatvfs(&segment.file)
            .map(|v| v.blocks_available().saturating_mul(v.fragment_size()))
            .unwrap_or(0);
        if free >= ROOMY {
            segment.ahead = ZERO_AHEAD;
        }
        Ok(segment)
    }

    /// Appends `entries` and syncs once: when this returns Ok, every one of them survives a
    /// crash. On an error the segment must not be appended to again (its tail may be torn):
    /// seal it and begin another.
    pub(super) fn append(&mut self, entries: &[Entry]) -> Result<()> {
        self.append_with(entries, true)
    }

    /// [`Segment::append`], syncing only with `sync` (without, the records survive the
    /// process, as the files of an unsynced spool do, not the machine).
    pub(super) fn append_with(&mut self, entries: &[Entry], sync: bool) -> Result<()> {
        let buf = encode_all(entries);
        std::os::unix::fs::FileExt::write_all_at(&self.file, &buf, self.size)
            .map_err(|e| Error::io(format!("appending to {}", self.what()), e))?;
        let written = self.size + buf.len() as u64;
        let crossed = written > self.end;
        self.end = self.end.max(written);
        if crossed && self.ahead > 0 {
            // The zeros are only a help: on a disk too full for them the records still go in
            // (a short run of zeros is as good; the next crossing append tries again).
            let _ = self.zeros_to(written + self.ahead as u64);
        }
        self.sync_if(sync)?;
        self.size = written;
        Ok(())
    }

    /// Room for `bytes` of records after those appended (zeros written unless the file reaches
    /// that far), synced with `sync`: a probe of the disk (an append of that size would find
    /// its room). A failure leaves the records as they were.
    pub(super) fn reserve(&mut self, bytes: u64, sync: bool) -> Result<()> {
        self.zeros_to(self.size + bytes)
            .map_err(|e| Error::io(format!("writing ahead in {}", self.what()), e))?;
        self.sync_if(sync)
    }

    /// Writes zeros from where the file is written up to `to`, if it is not that far yet.
    fn zeros_to(&mut self, to: u64) -> std::io::Result<()> {
        if self.end < to {
            let zeros = vec![0u8; (to - self.end) as usize];
            std::os::unix::fs::FileExt::write_all_at(&self.file, &zeros, self.end)?;
            self.end = to;
        }
        Ok(())
    }

    fn sync_if(&self, sync: bool) -> Result<()> {
        if sync {
            (self.file.sync_data())
                .map_err(|e| Error::io(format!("syncing {}", self.what()), e))?;
        }
        Ok(())
    }

    fn what(&self) -> String {
        format!("journal segment \"{}.wal\"", self.name)
    }

    /// Deletes the segment: nothing in it was acknowledged.
    pub(super) fn discard(self, spool: &Spool) {
        if let Ok(dir) = spool.opened("journal") {
            let _ = dir.remove(&format!("{}.wal", self.name));
        }
    }

    /// Seals the segment (everything in it was materialized): `NAME.wal` becomes `NAME.done`.
    /// Not synced: a rename lost in a crash leaves a `.wal` the next start replays anyway.
    pub(super) fn seal(self, spool: &Spool) {
        if let Ok(dir) = spool.opened("journal") {
            let (from, to) = (format!("{}.wal", self.name), format!("{}.done", self.name));
            if let Err(e) = dir.rename(&from, &to) {
                log::warn!("sealing journal segment {from}: {e}");
            }
        }
    }
}

/// Writes `e` as the file it stands for (not synced: the journal holds it). A result also takes
/// the job out of `cur/`, after its record is in place.
pub(super) fn materialize(spool: &Spool, e: &Entry) -> Result<()> {
    spool.publish_with(&e.body, &e.id, e.kind.sub(), false)?;
    // A job that came without a file has none in cur/.
    if e.kind != Kind::Job && e.hold.is_none() {
        remove(&spool.dir("cur").join(&e.id))?;
    }
    Ok(())
}

/// The batch API: many jobs durable with one sync.
impl Spool {
    /// Enqueues several jobs, durable together with one sync (through the journal, see
    /// `journal.rs`), and returns their ids in order: at least ten times the rate of one
    /// [`Spool::submit`] each. Without fsync, the jobs are simply written.
    pub fn submit_batch(&self, jobs: &[(&str, &[u8])]) -> Result<Vec<String>> {
        let entries = self.job_entries(jobs).map_err(|e| self.not_ours(e))?;
        self.commit(&entries, "s").map_err(|e| self.not_ours(e))?;
        Ok(entries.into_iter().map(|e| e.id).collect())
    }

    /// New jobs (checked, with their ids), in order.
    pub(super) fn new_jobs(&self, jobs: &[(&str, &[u8])]) -> Result<Vec<(String, JobFile)>> {
        self.room_for_jobs(jobs.iter().map(|(_, p)| p.len() as u64).sum())?;
        let mut out = Vec::with_capacity(jobs.len());
        for (function, payload) in jobs {
            crate::config::check_function_name(function).map_err(Error::Msg)?;
            let job = JobFile {
                function: function.to_string(),
                submitted_ms: crate::clock::now_ms(),
                attempts: 0,
                payload: payload.to_vec(),
            };
            out.push((self.new_id()?, job));
        }
        Ok(out)
    }

    /// Journal records for new jobs, with their ids.
    fn job_entries(&self, jobs: &[(&str, &[u8])]) -> Result<Vec<Entry>> {
        Ok(self
            .new_jobs(jobs)?
            .into_iter()
            .map(|(id, job)| job_entry(id, &job))
            .collect())
    }

    /// Makes `entries` durable with one sync in a new journal segment of `role`, materializes
    /// them, and seals the segment. Without fsync: materializes them only.
    fn commit(&self, entries: &[Entry], role: &str) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        if !self.fsync {
            return entries.iter().try_for_each(|e| materialize(self, e));
        }
        let mut segment = Segment::create(self, role)?;
        if let Err(e) = segment.append(entries) {
            // Nothing in it was acknowledged: it must never be replayed.
            segment.discard(self);
            return Err(e);
        }
        // Durable from here on: a file that cannot be written now is written by the worker's
        // next checkpoint, which replays a segment left unsealed.
        match entries
            .iter()
            .try_for_each(|e| materialize(self, e))
        {
            Ok(()) => segment.seal(self),
            Err(e) => log::warn!("accepted, but not all in place yet ({e}): the worker's next checkpoint writes the rest"),
        }
        Ok(())
    }
}

/// The journal record of a new job.
pub(super) fn job_entry(id: String, job: &JobFile) -> Entry {
    Entry::new(Kind::Job, id, super::format::encode_job(job))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: Kind, id: &str, body: &[u8]) -> Entry {
        Entry::new(kind, id.into(), body.to_vec())
    }

    #[test]
    fn records_round_trip_and_a_torn_or_corrupt_tail_ends_the_segment() {
        let mut buf = Vec::new();
        encode(&entry(Kind::Job, "f1-1-1", b"one"), &mut buf);
        encode(&entry(Kind::Done, "f1-1-2", b""), &mut buf);
        let whole = buf.len();
        encode(&entry(Kind::Failed, "f1-1-3", b"three"), &mut buf);
        let mut r = &buf[..];
        let got: Vec<_> = std::iter::from_fn(|| next_record(&mut r)).collect();
        assert_eq!(got.len(), 3);
        assert_eq!((got[0].kind, got[0].id.as_str()), (Kind::Job, "f1-1-1"));
        assert_eq!(got[2].body, b"three");
        // Torn: the last record cut short.
        let mut r = &buf[..buf.len() - 3];
        assert_eq!(std::iter::from_fn(|| next_record(&mut r)).count(), 2);
        // Corrupt: a byte of the last record's body flipped.
        let mut bad = buf.clone();
        bad[whole + 8] ^= 1;
        let mut r = &bad[..];
        assert_eq!(std::iter::from_fn(|| next_record(&mut r)).count(), 2);
        // Hostile lengths and ids.
        for junk in [&[0xff, 0xff, 0xff, 0xff][..], &[3, 0, 0, 0, b'J', 0, 0]] {
            let mut r = junk;
            assert!(next_record(&mut r).is_none());
        }
        let mut evil = Vec::new();
        encode(&entry(Kind::Job, "../../etc/passwd", b"x"), &mut evil);
        let mut r = &evil[..];
        assert!(next_record(&mut r).is_none(), "an id that is no job id");
    }

    /// A long-lived writer's segment holds zeros ahead of its records; every record appended
    /// (across the zeroed stretches) is read back, and reading stops at the zeros.
    #[test]
    fn zeros_ahead_of_the_records_end_the_segment() {
        let dir = crate::testutil::tempdir("spool", "zeros");
        let spool = Spool::open(&dir, true).expect("open");
        let mut seg = Segment::create_long(&spool, "w").expect("segment");
        let body = vec![7u8; 1000];
        let mut n = 0;
        while seg.size < 3 * ZERO_AHEAD as u64 {
            let batch: Vec<Entry> = (0..5)
                .map(|i| entry(Kind::Done, &format!("f1-1-{n}{i}"), &body))
                .collect();
            seg.append(&batch).expect("append");
            n += 1;
        }
        let path = spool.dir("journal").join(format!("{}.wal", seg.name));
        let bytes = fs::read(&path).expect("read");
        // (No zeros on a filesystem with less than ROOMY free.)
        assert!(
            seg.ahead == 0 || bytes.len() as u64 > seg.size,
            "zeros ahead"
        );
        assert!(bytes[seg.size as usize..].iter().all(|b| *b == 0));
        let records = decode_all(&bytes);
        assert_eq!(records.len(), n * 5);
        assert_eq!(
            records.last().map(|e| e.id.as_str()),
            Some(&*format!("f1-1-{}4", n - 1))
        );
        drop(seg);
        let _ = fs::remove_dir_all(&dir);
    }

    /// Room reserved by a probe is zeros past the records: the records appended after it
    /// overwrite them and read back whole, and reading stops where they end.
    #[test]
    fn room_reserved_ahead_is_overwritten_by_the_next_records() {
        let dir = crate::testutil::tempdir("spool", "reserve");
        let spool = Spool::open(&dir, true).expect("open");
        let mut seg = Segment::create(&spool, "z").expect("segment");
        seg.reserve(4096, true).expect("reserve");
        let path = spool.dir("journal").join(format!("{}.wal", seg.name));
        assert_eq!(fs::read(&path).expect("read"), vec![0u8; 4096]);
        seg.append(&[entry(Kind::Job, "f1-1-1", b"one")])
            .expect("append");
        seg.reserve(4096, false).expect("reserve after records");
        let bytes = fs::read(&path).expect("read");
        assert_eq!(bytes.len() as u64, seg.size + 4096);
        let records = decode_all(&bytes);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].body, b"one");
        drop(seg);
        let _ = fs::remove_dir_all(&dir);
    }
}
