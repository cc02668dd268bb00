//! The journal's checkpoint and replay (see `journal.rs` for the segments and their records):
//! what the closed segments hold is made durable in the files with one `syncfs`, replaying
//! the segments whose writer died (and, at a fresh start, those of an earlier boot), and the
//! segments are deleted.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use super::format::{decode_job, decode_record};
use super::journal::{materialize, next_record, Entry, Kind};
use super::*;

use crate::text::ShowPath;

/// Whether the file `sub/id` is there and sound.
fn sound(spool: &Spool, sub: &str, id: &str) -> bool {
    let Ok(bytes) = read_entry(&spool.dir(sub).join(id), MAX_ENTRY) else {
        return false;
    };
    match sub {
        "new" | "cur" => decode_job(&bytes).is_ok(),
        _ => decode_record(id, &bytes).is_ok(),
    }
}

/// What replaying a record did.
enum Replayed {
    Nothing,
    Written,
    /// A job whose outcome waits to be placed by this generation: left for a later checkpoint.
    Waiting,
}

/// Replays one record: writes its file unless it is there and sound (or, for a job, unless it
/// moved on: claimed or finished, or its outcome is `waiting` to be placed).
fn replay_one(spool: &Spool, e: &Entry, waiting: &dyn Fn(&str) -> bool) -> Result<Replayed> {
    let finished = || sound(spool, "done", &e.id) || sound(spool, "failed", &e.id);
    match e.kind {
        Kind::Job => {
            // Looked for in the order a job moves (new, cur, then its outcome), as `lookup`
            // does: a job a lane claims and finishes meanwhile is found in one of them.
            if sound(spool, "new", &e.id) || sound(spool, "cur", &e.id) || finished() {
                return Ok(Replayed::Nothing);
            }
            // It ran; its outcome crossed the exec and is not in place yet (a full disk).
            if waiting(&e.id) {
                return Ok(Replayed::Waiting);
            }
            // A torn copy in cur/ (its claim survived, its bytes did not) goes; the job is
            // queued again whole.
            remove(&spool.dir("cur").join(&e.id))?;
            materialize(spool, e).map(|()| Replayed::Written)
        }
        Kind::Done | Kind::Failed => {
            if finished() {
                for sub in ["cur", "new"] {
                    remove(&spool.dir(sub).join(&e.id))?;
                }
                return Ok(Replayed::Nothing);
            }
            // A claim (new/ -> cur/) lost with the page cache leaves the job in new/.
            materialize(spool, e)?;
            remove(&spool.dir("new").join(&e.id))?;
            Ok(Replayed::Written)
        }
    }
}

/// Replays the segment `file`; returns how many files it wrote, and whether it must be kept
/// (a job in it waits for its outcome).
fn replay(spool: &Spool, file: File, waiting: &dyn Fn(&str) -> bool) -> Result<(usize, bool)> {
    let mut r = io::BufReader::new(file);
    let entries: Vec<Entry> = std::iter::from_fn(|| next_record(&mut r)).collect();
    // A job whose outcome is in a results log is finished, though it has no file anywhere.
    let logged = spool.logged_among(&entries);
    let (mut written, mut kept) = (0, false);
    for e in entries.iter().filter(|e| !logged.contains(&e.id)) {
        match replay_one(spool, e, waiting)? {
            Replayed::Written => written += 1,
            Replayed::Waiting => kept = true,
            Replayed::Nothing => {}
        }
    }
    Ok((written, kept))
}

/// The segment `name`, opened as any spool file others may have planted ([`open_entry`]),
/// whoever wrote it (a `submit` of another user allowed to write the spool too). None if it is
/// gone; an entry that is no segment at all is set aside in `rejected/`.
fn segment(spool: &Spool, name: &str) -> Result<Option<File>> {
    let path = spool.dir("journal").join(name);
    match open_entry(&path) {
        Ok((f, _)) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::Other => {
            let why = format!("{e}, not a journal segment");
            spool.reject_raw("journal", std::ffi::OsStr::new(name), &why);
            Ok(None)
        }
        Err(e) => Err(Error::io_path("opening", &path, e)),
    }
}

/// Whether the writer of the segment open as `file` is gone (its flock is free; taken now, it
/// is held while `file` is open).
fn abandoned(file: &File) -> bool {
    crate::ops::safefs::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB).is_ok()
}

/// Makes what the closed segments hold durable in the files and deletes them: replays every
/// segment whose writer died, and with `all` (a fresh start) the sealed ones of an earlier
/// boot too (their files were in place, but only in a page cache a reboot lost; a sealed
/// segment of this boot had its files written, and a crash of a process does not undo that);
/// then one `syncfs`; then the deletes. A live writer's segment is left alone. Returns
/// (segments deleted, files written by replay).
pub(super) fn checkpoint(spool: &Spool, all: bool) -> Result<(usize, usize)> {
    checkpoint_waiting(spool, all, &|_| false)
}

/// [`checkpoint`], leaving alone the segments of jobs that ran and whose outcomes are
/// `waiting` to be placed (they crossed an exec: `carry.rs`): replayed now, such a job would be
/// queued again and run twice.
pub(super) fn checkpoint_waiting(
    spool: &Spool,
    all: bool,
    waiting: &dyn Fn(&str) -> bool,
) -> Result<(usize, usize)> {
    let dir = spool.dir("journal");
    let mut names: Vec<String> = list_raw(&dir)?
        .into_iter()
        .filter_map(|n| n.into_string().ok())
        .collect();
    // Replayed in the order written (a segment's name begins with its boot-time stamp).
    names.sort_by(|a, b| a.get(2..).cmp(&b.get(2..)));
    let mut closed: Vec<PathBuf> = Vec::new();
    let mut written = 0;
    for name in names {
        let path = dir.join(&name);
        let sealed = name.ends_with(".done");
        if !sealed && !name.ends_with(".wal") {
            continue;
        }
        // Anything but a regular file under a segment's name was planted (the worker's user
        // can write here): set aside, never opened (a FIFO would block the open for ever).
        if !fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
            spool.reject_raw(
                "journal",
                std::ffi::OsStr::new(&name),
                "not a regular file, not a journal segment",
            );
            continue;
        }
        // A sealed segment is replayed only at a fresh start, and only of an earlier boot.
        let replay_sealed = all && name.split('-').nth(2) != Some(order::boot_tag());
        if sealed && !replay_sealed {
            closed.push(path);
            continue;
        }
        let Some(file) = segment(spool, &name)? else {
            continue;
        };
        if sealed || abandoned(&file) {
            let (wrote, kept) = replay(spool, file, waiting)?;
            written += wrote;
            if !kept {
                closed.push(path);
            }
        }
    }
    if closed.is_empty() {
        return Ok((0, written));
    }
    // Without fsync nothing promises more than surviving the process (the ZeroMQ ingress's
    // unsynced segments): no sync of the whole filesystem for them, unless a replay wrote
    // files (a segment may have been written with fsync on).
    if spool.fsync || written > 0 {
        let root = spool.opened("journal")?;
        nix::unistd::syncfs(root.as_raw_fd())
            .map_err(|e| Error::io_path("syncing the filesystem of", &dir, e.into()))?;
    }
    for path in &closed {
        if let Err(e) = fs::remove_file(path) {
            if e.kind() != io::ErrorKind::NotFound {
                log::warn!("removing journal segment \"{}\": {e}", path.shown());
            }
        }
    }
    Ok((closed.len(), written))
}
