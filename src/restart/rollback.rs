//! Rollback: the deploy marker (`state_dir/worker/deploy-pending.json`, the worker's data, read
//! as untrusted) and `state_dir/last-good` (root's, exec'd through its checked descriptor).

use std::fs::File;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::digest::{hash_file, hash_reader};
use crate::ops::layout;
use crate::ops::safefs::Dir;
use crate::status::records::Rollback;
use crate::text::ShowPath;

/// Written (by the worker, into its own `state_dir/worker/`) before switching to a new
/// binary (or by `restart`, see [`mark_died`]), removed once a generation serves, unless that
/// generation rolled back from the binary it names. Found by a fresh start whose own image is
/// `to_sha`, it means that binary died during start-up: roll back. It is data from the worker's
/// user: it names no path, and root compares it with its own digest only.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Marker {
    pub from_sha: String,
    pub to_sha: String,
    pub at_ms: u64,
}

/// Largest deploy marker root agrees to read.
const MAX_MARKER: u64 = 4096;

pub fn write_marker(state_dir: &Path, marker: &Marker) -> std::io::Result<()> {
    let json = serde_json::to_vec(marker).map_err(std::io::Error::other)?;
    let dir = layout::worker_dir(state_dir);
    let tmp = dir.join(format!("{}.tmp", layout::MARKER));
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, dir.join(layout::MARKER))
}

/// Reads the marker as untrusted data: never through a link, at most 4 KiB.
pub fn read_marker(state_dir: &Path) -> Option<Marker> {
    let dir = Dir::open(&layout::worker_dir(state_dir)).ok()?;
    let bytes = dir.read_small(layout::MARKER, MAX_MARKER).ok()??;
    serde_json::from_slice(&bytes).ok()
}

fn clear_marker(state_dir: &Path) {
    let _ = std::fs::remove_file(layout::worker_dir(state_dir).join(layout::MARKER));
}

/// [`clear_marker`], unless the marker names `keep`, the binary a rollback left: it is still
/// at the path, and a supervisor (or systemd) starting the path after a later crash of the
/// rolled-back worker must roll back again.
pub fn clear_marker_unless(state_dir: &Path, keep: Option<&str>) {
    if keep.is_some_and(|sha| read_marker(state_dir).is_some_and(|m| m.to_sha == sha)) {
        return;
    }
    clear_marker(state_dir);
}

/// A start of this image that failed for no fault of the binary, which any binary would meet
/// the same way: a full disk (or a quota), the worker's user out of processes, no descriptors or
/// memory left, a failing disk, or a stop asked while it started (a thread waited for is given up
/// then). The marker naming this image (its fresh start's, or the deploy's that switched to it)
/// is removed, so that the next start tries it again instead of rolling it back: with the disk
/// full, every deploy was rolled back ("died before it was serving") once the supervisor or an
/// operator started the worker again, and so was one stopped while it waited for a thread.
pub fn spare_if_not_its_fault(state_dir: &Path, e: &crate::Error) {
    let errno = match e {
        crate::Error::Io { source, .. } => source.raw_os_error(),
        _ => None,
    };
    let met = match errno {
        Some(libc::ENOSPC | libc::EDQUOT) => "a full disk",
        Some(libc::EAGAIN) => "the worker's user out of processes",
        Some(libc::EMFILE | libc::ENFILE) => "no descriptors left",
        Some(libc::ENOMEM) => "no memory left",
        Some(n) if crate::error::is_transient_errno(n) => "a failing disk",
        _ if crate::ops::signals::stop_asked() => "a stop asked while it started",
        _ => return,
    };
    let mine = own_sha().ok();
    if read_marker(state_dir).is_some_and(|m| Some(&m.to_sha) == mine.as_ref()) {
        clear_marker(state_dir);
        log::warn!("this start met {met}: no fault of this binary, so it is not rolled back at the next start");
    }
}

/// On a fresh start: if this image is the binary a deploy switched to and the marker is still
/// there, that binary died before serving. Returns the rollback to perform: exec the returned
/// descriptor of `state_dir/last-good`, which only the owner of `state_dir` (root, under a
/// privilege drop) can have written. The marker decides only *whether*, never *what*.
pub fn rollback_needed(state_dir: &Path) -> Option<(File, Rollback)> {
    let marker = read_marker(state_dir)?;
    let me = own_sha().ok()?;
    if me != marker.to_sha {
        return None;
    }
    // What runs is that file, whatever the marker says it came from (after A -> B -> C under a
    // privilege drop, last-good is still the A root copied at the fresh start).
    let (last_good, to_sha) = match last_good(state_dir) {
        Ok(found) if found.1 == me => {
            // It would find the marker again, and exec itself for ever.
            log::error!("the deploy marker asks for a rollback, but last-good is this same binary");
            return None;
        }
        Ok(found) => found,
        Err(e) => {
            log::error!("the deploy marker asks for a rollback, but {e}");
            return None;
        }
    };
    let reason = match crate::status::records::from_env().and_then(|i| i.last_exit) {
        Some(exit) => format!("the new binary {exit} before it was serving"),
        None => "the new binary died before it was serving".to_string(),
    };
    let rollback = Rollback {
        from_sha: marker.to_sha.clone(),
        to_sha,
        reason,
        at_ms: crate::clock::now_ms(),
    };
    Some((last_good, rollback))
}

/// The sha256 of this process's image, hashed once (a fresh start asks for it twice: is there a
/// rollback to do, and is this binary new).
fn own_sha() -> crate::Result<String> {
    static OWN: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    if let Some(sha) = OWN.get() {
        return Ok(sha.clone());
    }
    let sha = hash_file(Path::new("/proc/self/exe"))
        .map_err(|e| crate::Error::io("reading /proc/self/exe", e))?;
    Ok(OWN.get_or_init(|| sha).clone())
}

/// How a rollback is said, the same in the log, to `start` and in `status`.
pub fn words(from_sha: &str, to_sha: &str, reason: &str) -> String {
    format!(
        "rolled back from {} to {}: {reason}",
        super::deploy::short(from_sha),
        super::deploy::short(to_sha)
    )
}

/// `state_dir/last-good`, opened for exec (see [`open_last_good`]), and its sha256.
fn last_good(state_dir: &Path) -> crate::Result<(File, String)> {
    let f = open_last_good(state_dir)?;
    let sha = hash_reader(&mut &f)
        .map_err(|e| crate::Error::io_path("reading", &state_dir.join(layout::LAST_GOOD), e))?;
    Ok((f, sha))
}

/// After a `restart` whose start died before serving (a crash, with no error of its own): if
/// `last-good` is another binary than this image (the one that died), writes the deploy marker
/// that makes this image's next fresh start roll back to it, as after a deploy that died.
/// Returns last-good's sha256; None when there is none or it is this same binary (it would die
/// the same way). Root writes into the worker's own directory through its descriptor only: a
/// new file (never through a link), given to the directory's owner, renamed into place.
pub fn mark_died(state_dir: &Path) -> crate::Result<Option<String>> {
    let (_, good) = match last_good(state_dir) {
        Ok(found) => found,
        Err(crate::Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let me = own_sha()?;
    if me == good {
        return Ok(None);
    }
    let marker = Marker {
        from_sha: good.clone(),
        to_sha: me,
        at_ms: crate::clock::now_ms(),
    };
    put_marker(state_dir, &marker)?;
    Ok(Some(good))
}

/// Writes `marker` as root may: into the worker's own directory through its descriptor only, a
/// new file (never through a link), given to the directory's owner, renamed into place.
fn put_marker(state_dir: &Path, marker: &Marker) -> crate::Result<()> {
    let json = serde_json::to_vec(marker).map_err(|e| crate::Error::Msg(e.to_string()))?;
    let path = layout::worker_dir(state_dir);
    let dir = Dir::open(&path)?;
    let tmp = format!("{}.{}.tmp", layout::MARKER, std::process::id());
    dir.remove(&tmp)?;
    let mut file = dir.create_new(&tmp, 0o640)?;
    let (uid, gid) = dir.owner();
    if nix::unistd::geteuid().is_root() && !uid.is_root() {
        crate::ops::safefs::chown_file(&file, &path.join(&tmp), uid, gid)?;
    }
    std::io::Write::write_all(&mut file, &json)
        .map_err(|e| crate::Error::io_path("writing", &path.join(&tmp), e))?;
    dir.rename(&tmp, layout::MARKER)
}

/// This image's sha256 when its fresh start found it is not `last-good` (see [`note_attempt`]):
/// the generation that serves records it as served.
static ATTEMPT: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// What a fresh start found about its own binary and `last-good`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Attempt {
    /// This binary is `last-good` (or it could not be told).
    Known,
    /// It served before (its `served` record names it): to be kept as `last-good` now.
    Promoted,
    /// It never served: the marker naming it is written (a start-up crash rolls back at the
    /// next fresh start), and `last-good` is left as it is until it has served.
    Unproven,
    /// There is no `last-good` yet.
    First,
}

/// A fresh start's look at its own binary (`systemctl restart` right after a new binary was
/// copied runs it afresh, before any deploy marker could name it). The `served` record is the
/// worker's data: it only decides whether root keeps the binary root itself runs.
pub fn note_attempt(state_dir: &Path) -> Attempt {
    // No last-good: nothing to roll back to, and root keeps this one (no digest needed).
    let Ok((_, good)) = last_good(state_dir) else {
        return Attempt::First;
    };
    let Ok(me) = own_sha() else {
        return Attempt::Known;
    };
    if good == me {
        return Attempt::Known;
    }
    if served(state_dir).as_deref() == Some(me.as_str()) {
        return Attempt::Promoted;
    }
    let _ = ATTEMPT.set(me.clone());
    let marker = Marker {
        from_sha: good,
        to_sha: me,
        at_ms: crate::clock::now_ms(),
    };
    if let Err(e) = put_marker(state_dir, &marker) {
        log::warn!("could not mark this start of a new binary ({e}): a crash as it starts would not be rolled back");
    }
    Attempt::Unproven
}

/// Once a generation of a fresh start serves: records its binary as served, if its start
/// found it new (written by the worker, into its own directory).
pub fn record_served(state_dir: &Path) {
    let Some(sha) = ATTEMPT.get() else {
        return;
    };
    let dir = layout::worker_dir(state_dir);
    let tmp = dir.join(format!("{}.tmp", layout::SERVED));
    let written =
        std::fs::write(&tmp, sha).and_then(|()| std::fs::rename(&tmp, dir.join(layout::SERVED)));
    if let Err(e) = written {
        log::warn!("could not record that this binary served ({e}): its next fresh start marks it new again");
    }
}

/// The binary the worker last recorded as served (its data: at most a digest's length).
fn served(state_dir: &Path) -> Option<String> {
    let dir = Dir::open(&layout::worker_dir(state_dir)).ok()?;
    let bytes = dir.read_small(layout::SERVED, 64).ok()??;
    String::from_utf8(bytes).ok()
}

/// Opens `state_dir/last-good` for exec, only if nobody but us (or root) could have written it.
fn open_last_good(state_dir: &Path) -> crate::Result<File> {
    let dir = Dir::open(state_dir)?;
    if !dir.trusted() {
        return Err(crate::Error::Unsafe(format!(
            "\"{}\" can be written by others: not running its last-good",
            state_dir.shown()
        )));
    }
    let file = dir
        .file(layout::LAST_GOOD, crate::ops::safefs::Open::READ)?
        .file;
    let meta = file
        .metadata()
        .map_err(|e| crate::Error::io_path("checking", &state_dir.join(layout::LAST_GOOD), e))?;
    let me = nix::unistd::geteuid().as_raw();
    if (meta.uid() != 0 && meta.uid() != me) || meta.mode() & 0o022 != 0 {
        return Err(crate::Error::Unsafe(format!(
            "\"{}\" is owned by uid {} (mode {:o}): not running it",
            state_dir.join(layout::LAST_GOOD).shown(),
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    Ok(file)
}

/// Keeps a copy of the running image as `state_dir/last-good`, if `state_dir` is ours to write
/// (under a privilege drop it is root's: root made the copy at the fresh start).
pub fn save_last_good(state_dir: &Path) -> crate::Result<Option<PathBuf>> {
    keep_as_last_good(state_dir, || {
        File::open("/proc/self/exe").map_err(|e| crate::Error::io("opening /proc/self/exe", e))
    })
}

/// Before `restart` stops worker `pid`: keeps the binary it runs as `state_dir/last-good` when
/// it is another file than this image (a new binary was put at the path), so that a new binary
/// dying at start-up has something to roll back to ([`mark_died`]). Only a binary that nobody but
/// root or us can write is kept, and only in a `state_dir` of ours. Returns the copy, held open:
/// the new binary's start may replace `last-good` with itself (root keeps it at every fresh
/// start under a privilege drop) before it dies, and [`put_back`] then restores this one.
pub fn keep_running(state_dir: &Path, pid: i32) -> crate::Result<Option<File>> {
    use std::os::unix::fs::MetadataExt;
    let theirs = format!("/proc/{pid}/exe");
    let (Ok(a), Ok(b)) = (
        std::fs::metadata(&theirs),
        std::fs::metadata("/proc/self/exe"),
    ) else {
        return Ok(None);
    };
    let me = nix::unistd::geteuid().as_raw();
    if (a.dev(), a.ino()) == (b.dev(), b.ino())
        || (a.uid() != 0 && a.uid() != me)
        || a.mode() & 0o022 != 0
        || Dir::open(state_dir)?.owner().0.as_raw() != me
    {
        return Ok(None);
    }
    keep_as_last_good(state_dir, || {
        let f = File::open(&theirs)
            .map_err(|e| crate::Error::io_path("opening", Path::new(&theirs), e))?;
        // Checked again on what was opened: the file, not the name, is what gets copied.
        let m = f
            .metadata()
            .map_err(|e| crate::Error::io_path("checking", Path::new(&theirs), e))?;
        if (m.uid() != 0 && m.uid() != me) || m.mode() & 0o022 != 0 {
            return Err(crate::Error::Unsafe(format!(
                "{theirs} can be written by others"
            )));
        }
        Ok(f)
    })?;
    Ok(Some(open_last_good(state_dir)?))
}

/// Puts `kept` (from [`keep_running`]) back as `state_dir/last-good`.
pub fn put_back(state_dir: &Path, kept: &File) -> crate::Result<()> {
    keep_as_last_good(state_dir, || {
        let mut f = kept
            .try_clone()
            .map_err(|e| crate::Error::io("duplicating the kept binary's descriptor", e))?;
        std::io::Seek::rewind(&mut f)
            .map_err(|e| crate::Error::io("rewinding the kept binary", e))?;
        Ok(f)
    })
    .map(drop)
}

/// Copies what `open` opens to `state_dir/last-good` (through a temporary file, then renamed),
/// if `state_dir` is ours to write; else names the last-good root kept, if any.
fn keep_as_last_good(
    state_dir: &Path,
    open: impl FnOnce() -> crate::Result<File>,
) -> crate::Result<Option<PathBuf>> {
    let dir = Dir::open(state_dir)?;
    if dir.owner().0 != nix::unistd::geteuid() {
        return Ok(dir
            .file(layout::LAST_GOOD, crate::ops::safefs::Open::READ)
            .ok()
            .map(|_| state_dir.join(layout::LAST_GOOD)));
    }
    let tmp = format!("{}.tmp", layout::LAST_GOOD);
    dir.remove(&tmp)?;
    let mut out = dir
        .file(
            &tmp,
            crate::ops::safefs::Open {
                write: true,
                append: false,
                create: Some(0o700),
            },
        )?
        .file;
    let path = state_dir.join(layout::LAST_GOOD);
    let copied = (|| {
        let mut exe = open()?;
        std::io::copy(&mut exe, &mut out)
            .map_err(|e| crate::Error::io_path("writing", &path, e))?;
        out.set_permissions(std::fs::Permissions::from_mode(0o755))
            .map_err(|e| crate::Error::io_path("chmod", &path, e))
    })();
    drop(out);
    if let Err(e) = copied {
        // A partial copy would keep state_dir's file system full (the log beside it then
        // gets nothing, this failure's warning included).
        let _ = dir.remove(&tmp);
        return Err(e);
    }
    dir.rename(&tmp, layout::LAST_GOOD)?;
    Ok(Some(path))
}
