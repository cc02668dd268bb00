//! Where gearshift keeps its own files, and who may write each.
//!
//! ```text
//! state_dir/                   root's (or, without a privilege drop, the worker's): 0755
//!   gearshift.pid              pidfile + flock; root writes it, the worker keeps the locked fd
//!   supervisor.pid             the same for a `start --supervise` supervisor (its own lock)
//!   gearshift.log              the daemon's default log (given to the worker, so it can reopen it)
//!   last-good                  the binary to roll back to; written only by whoever owns state_dir
//!   worker/                    the worker's own: 0750, owned by [worker] user
//!     gearshift.sock           status socket (bound at a fresh start, handed across every exec)
//!     deploy-pending.json      deploy marker (data only: root reads one field, never a path)
//!     served-sha256            the binary that served after a fresh start found it new (data)
//! ```
//!
//! Architecture invariant: nothing the worker's user can write decides what root opens, chowns,
//! signals or executes. The pidfile and `last-good` sit where only root can write; what the
//! worker writes lives in `worker/` (and the spool), and root reads it only as bounded data
//! through [`crate::ops::safefs`].

use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use nix::unistd::{geteuid, Gid, Uid};

use crate::error::{Error, Result};
use crate::ops::safefs::Dir;
use crate::text::ShowPath;

/// The worker's own subdirectory of `state_dir`.
pub const WORKER_DIR: &str = "worker";
pub const PIDFILE: &str = "gearshift.pid";
/// A supervisor's own pidfile and lock: found while no worker runs (it waits to start one
/// again after a crash).
pub const SUPERVISOR_PIDFILE: &str = "supervisor.pid";
pub const SOCKET: &str = "gearshift.sock";
pub const DEFAULT_LOG: &str = "gearshift.log";
pub const LAST_GOOD: &str = "last-good";
pub const MARKER: &str = "deploy-pending.json";
/// The binary that last served after a fresh start found it new (the worker's data).
pub const SERVED: &str = "served-sha256";

/// The user (and group) the worker drops to: who owns `state_dir/worker/` and the spool.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

/// `state_dir`, opened and checked (its worker subdirectory made and given away).
pub struct State {
    pub dir: Dir,
}

/// The worker subdirectory of `state_dir`.
pub fn worker_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(WORKER_DIR)
}

/// Opens `state_dir` (creating it), makes sure nobody but its owner can change its entries,
/// and gives `worker/` to the user we will drop to. As root, a `state_dir` left to the worker's
/// user by an older version is taken back (through its descriptor).
pub fn prepare(state_dir: &Path, target: Option<&Target>) -> Result<State> {
    let existed = state_dir.exists();
    let dir = Dir::create(state_dir, 0o755)?;
    // Whether the checks below change its mode or owner (then what fstat said is stale).
    let mut changed = !existed;
    if !existed {
        // Made just now, under the worker's umask (027 by default): 0755 as documented, so the
        // dropped user (and the worker's group, for `status`) can reach worker/ inside it.
        dir.chmod(0o755)?;
    }
    let (owner, _) = dir.owner();
    let me = geteuid();
    if me.is_root() && !owner.is_root() && target.is_none_or(|t| t.uid != owner) {
        // Not the worker's user of an older version: someone else's directory.
        return Err(Error::Unsafe(format!(
            "state_dir \"{}\" is owned by uid {owner}, neither root nor the worker's user: it is not gearshift's to take; point state_dir at a directory of its own (or chown root it if it is meant)",
            state_dir.shown()
        )));
    } else if me.is_root() && !owner.is_root() {
        log::warn!(
            "state_dir \"{}\" belonged to uid {owner}: taking it back for root (the worker's user keeps only \"{WORKER_DIR}/\")",
            state_dir.shown()
        );
        dir.chown(Uid::from_raw(0), Gid::from_raw(0))?;
        dir.chmod(dir.mode() & !0o022)?;
        changed = true;
    } else if !me.is_root() && owner != me && !owner.is_root() {
        return Err(Error::Unsafe(format!(
            "state_dir \"{}\" is owned by uid {owner}, neither root nor us (uid {me})",
            state_dir.shown()
        )));
    } else if dir.mode() & 0o022 != 0 {
        return Err(Error::Unsafe(format!(
            "state_dir \"{}\" is writable by group or others (mode {:o}); fix: chmod go-w \"{}\"",
            state_dir.shown(),
            dir.mode(),
            state_dir.shown()
        )));
    }
    if let Some(t) = target.filter(|_| me.is_root()) {
        // The dropped user must be able to pass through state_dir to reach worker/ (say after
        // a switch from allow_root, whose umask made it 0750).
        let (_, gid) = dir.owner();
        let searchable = dir.mode() & 0o001 != 0 || (gid == t.gid && dir.mode() & 0o010 != 0);
        if !searchable && existed {
            if let Some(name) = foreign_entry(&dir)? {
                return Err(Error::Unsafe(format!(
                    "state_dir \"{}\" (mode {:o}) does not let user {} pass and holds \"{}\", which is not gearshift's: it is not opened up for the worker (o+x); point state_dir at a directory of its own (or chmod o+x it if it is meant)",
                    state_dir.shown(),
                    dir.mode(),
                    t.name,
                    crate::text::escape(&name.to_string_lossy())
                )));
            }
        }
        if !searchable {
            log::info!(
                "state_dir \"{}\": letting user {} pass through it (o+x)",
                state_dir.shown(),
                t.name
            );
            dir.chmod(dir.mode() | 0o001)?;
            changed = true;
        }
    }
    // Re-open when the checks above changed what fstat says (not in a restart's pause).
    let dir = if changed { Dir::open(dir.path())? } else { dir };
    if owner == me || me.is_root() {
        let w = dir.sub(WORKER_DIR, Some(0o750))?;
        if let Some(t) = target.filter(|_| me.is_root()) {
            if w.owner().0 != t.uid {
                refuse_foreign_worker_dir(&w, t)?;
            }
            w.chown(t.uid, t.gid)?;
        }
    } else {
        // A generation that already dropped its privileges: root made worker/ for us. Removed
        // since (a clean-up of "stale" sockets), we cannot make it again in root's directory:
        // this generation serves on, on the status socket it was handed, which no path reaches
        // until a fresh start makes the directory again.
        match dir.sub(WORKER_DIR, None) {
            Ok(_) => {}
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                log::warn!(
                    "\"{}\" was removed and this worker, no longer root, cannot make it again: `gearshift status` cannot reach it (the next fresh start makes the directory again; `gearshift stop` still stops it)",
                    worker_dir(dir.path()).shown()
                );
            }
            Err(e) => return Err(e),
        }
    }
    Ok(State { dir })
}

/// Whether a re-exec'd generation of this process can open `state_dir` ([`prepare`] makes a
/// missing one): a worker that dropped its privileges cannot make it again where only root may
/// write, and its next generation would end there. Err: why, for a refused restart (the
/// worker serves on as it is).
pub fn reachable_after_exec(state_dir: &Path) -> Result<()> {
    if geteuid().is_root() || state_dir.exists() {
        return Ok(());
    }
    crate::ops::safefs::could_create(state_dir).map_err(|e| {
        Error::Msg(format!(
            "state_dir \"{}\" was removed, and this worker, no longer root, cannot make it again ({e}): its next generation would end there, so it serves on as it is (`gearshift restart` makes state_dir again and starts the worker afresh)",
            state_dir.shown()
        ))
    })
}

/// The first entry of `state_dir` that gearshift does not keep there (its pidfile, its log and
/// the log's rotations, `last-good` and its temporary file, `worker/`; `lost+found`).
fn foreign_entry(dir: &Dir) -> Result<Option<std::ffi::OsString>> {
    let ours = |n: &str| {
        n.starts_with("gearshift.")
            || n.starts_with(LAST_GOOD)
            || [WORKER_DIR, "lost+found"].contains(&n)
    };
    dir.first_name_not(ours)
}

/// Refuses to give `worker/` (not the worker's user's yet) away if it holds anything but
/// gearshift's files: one made just now is empty, an older install's (root's after an
/// `allow_root` run, or a previous `user`'s) holds only its socket, deploy marker and the
/// sources' files, but a
/// `state_dir` pointed by a slip at, say, `/home` may find a real user's home there, every entry
/// of which the worker's jobs could then rename or remove.
fn refuse_foreign_worker_dir(w: &Dir, t: &Target) -> Result<()> {
    // The sources' files too (`amqp-done-ids`, `attempts-running`, `attempts-interrupted`).
    let ours = |n: &str| {
        [SOCKET, MARKER, SERVED, "amqp-", "attempts-"]
            .iter()
            .any(|p| n.starts_with(p))
    };
    match w.first_name_not(ours)? {
        None => Ok(()),
        Some(name) => Err(Error::Unsafe(format!(
            "\"{}\" holds \"{}\", which is not gearshift's: it is not given to user {} (every job could change what is in it); point state_dir at a directory of its own",
            w.path().shown(),
            crate::text::escape(&name.to_string_lossy()),
            t.name
        ))),
    }
}

/// Where root records, per config file, the `state_dir` a worker started with: so `status`,
/// `stop` and `reload` find the worker while the config cannot say (its syntax is broken).
/// Only root writes here, and only root's records are trusted by root's CLI.
const RECORDS: &str = "/run/gearshift/state-dirs";

/// Where a user without root keeps the same records of the workers it runs itself, below
/// `$XDG_RUNTIME_DIR`, only where that directory is the user's and nobody else can write in
/// it (as systemd's `/run/user/UID`); none elsewhere (a worker started by cron).
fn user_records() -> Option<PathBuf> {
    let euid = geteuid();
    if euid.is_root() {
        return None;
    }
    let base = PathBuf::from(std::env::var_os("XDG_RUNTIME_DIR")?);
    if !base.is_absolute() {
        return None;
    }
    let dir = Dir::open(&base).ok()?;
    (dir.trusted() && dir.owner().0 == euid).then(|| base.join("gearshift").join("state-dirs"))
}

/// The records this process reads, each with who must own it: a user's own first (its own
/// workers), then root's (a worker root started, perhaps dropping to this user).
fn record_dirs() -> Vec<(PathBuf, Uid)> {
    let mut dirs: Vec<(PathBuf, Uid)> =
        user_records().map(|d| (d, geteuid())).into_iter().collect();
    dirs.push((PathBuf::from(RECORDS), Uid::from_raw(0)));
    dirs
}

/// The records directories this process trusts ([`record_dirs`]), in that order.
fn trusted_record_dirs() -> Vec<Dir> {
    record_dirs()
        .into_iter()
        .filter_map(|(path, owner)| {
            let dir = Dir::open(&path).ok()?;
            (dir.trusted() && dir.owner().0 == owner).then_some(dir)
        })
        .collect()
}

/// The record's name for a config path: the first 32 hex digits of its sha256.
fn record_name(config: &Path) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(config.as_os_str().as_encoded_bytes());
    crate::text::hex(&digest[..16])
}

/// Records `state_dir` for `config` (both absolute), at a worker's fresh start (root's record,
/// or a user's own, [`user_records`]). Best effort: without the record the CLI still finds a
/// worker whose config parses.
pub fn record_state_dir(config: &Path, state_dir: &Path) {
    write_record(
        &record_name(config),
        state_dir.as_os_str().as_encoded_bytes(),
    );
}

/// Records this process, by pid and start time, as the worker of `config` (absolute), once
/// its fresh start holds the pidfile lock: a worker whose `state_dir` was removed under
/// it (pidfile and status socket with it) is then still known to run (see
/// [`recorded_worker`]). A file beside the `state_dir` record, which older CLIs do not read.
pub fn record_worker(config: &Path) {
    if let Some(stat) = crate::ops::procfs::Stat::of(None) {
        let line = format!("{} {}\n", std::process::id(), stat.starttime);
        write_record(&format!("{}.pid", record_name(config)), line.as_bytes());
    }
}

/// Writes record `name` (root's, or a user's own; best effort: the records only help the CLI).
fn write_record(name: &str, bytes: &[u8]) {
    let (records, mode) = match user_records() {
        Some(own) => (own, 0o700),
        None if geteuid().is_root() => (PathBuf::from(RECORDS), 0o755),
        None => return,
    };
    let written = (|| -> Result<()> {
        let dir = Dir::create(&records, mode)?;
        let tmp = format!("{name}.{}.tmp", std::process::id());
        let _ = dir.remove(&tmp);
        let mut f = dir.create_new(&tmp, 0o644)?;
        std::io::Write::write_all(&mut f, bytes)
            .map_err(|e| Error::io("writing a record for `status`", e))?;
        dir.rename(&tmp, name)
    })();
    if let Err(e) = written {
        log::debug!("cannot write the record {name} for `status` ({e})");
    }
}

/// The worker recorded for `config` ([`record_worker`]) if that very process still runs:
/// its pid, when the process with that pid started when the record says (a pid reused since
/// names a later start).
pub fn recorded_worker(config: &Path) -> Option<i32> {
    trusted_record_dirs()
        .iter()
        .find_map(|d| live_worker(d, config))
}

/// Waits, `wait` at most, until no process recorded as the worker of `config` runs (one that
/// is exiting: a failed start's, a stopped one's); the pid still running after that, if any.
pub fn wait_recorded_gone(config: &Path, wait: std::time::Duration) -> Option<i32> {
    let since = std::time::Instant::now();
    loop {
        let pid = recorded_worker(config)?;
        if since.elapsed() >= wait {
            return Some(pid);
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// The worker `dir` records for `config`, if that very process still runs.
fn live_worker(dir: &Dir, config: &Path) -> Option<i32> {
    let bytes = dir
        .read_small(&format!("{}.pid", record_name(config)), 64)
        .ok()??;
    let text = String::from_utf8(bytes).ok()?;
    let mut words = text.split_whitespace();
    let pid: i32 = words.next()?.parse().ok().filter(|p| *p > 0)?;
    let started: u64 = words.next()?.parse().ok()?;
    let stat = crate::ops::procfs::Stat::of(Some(pid))?;
    (stat.starttime == started && stat.state != 'Z').then_some(pid)
}

/// The `state_dir` recorded for `config`, if root (or, for a user without root, that user)
/// recorded one.
pub fn recorded_state_dir(config: &Path) -> Option<PathBuf> {
    state_dir_in(&trusted_record_dirs(), config)
}

/// The `state_dir` `dirs` record for `config`: that of a worker still running first (a user's
/// own record may be of an earlier run, and root's of a worker root started since, or the
/// other way round), else the first recorded.
fn state_dir_in(dirs: &[Dir], config: &Path) -> Option<PathBuf> {
    let state_dir = |dir: &Dir| {
        let bytes = dir.read_small(&record_name(config), 4096).ok()??;
        // Bytes, as written: a path need not be UTF-8.
        let path = PathBuf::from(std::ffi::OsString::from_vec(bytes));
        Some(path).filter(|p| p.is_absolute())
    };
    dirs.iter()
        .filter(|d| live_worker(d, config).is_some())
        .find_map(state_dir)
        .or_else(|| dirs.iter().find_map(state_dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two records of one config (a user's own of an earlier run, then root's of the worker
    /// running now): the running worker's `state_dir` is the answer, whichever comes first;
    /// with no worker running, the first recorded.
    #[test]
    fn the_record_of_a_running_worker_wins() {
        let base = crate::testutil::tempdir("layout", "records");
        let config = Path::new("/etc/gs/config.toml");
        let name = record_name(config);
        let write = |sub: &str, state: &str, pid: Option<(u32, u64)>| {
            let d = base.join(sub);
            std::fs::create_dir_all(&d).expect("dir");
            std::fs::write(d.join(&name), state).expect("record");
            if let Some((pid, started)) = pid {
                std::fs::write(d.join(format!("{name}.pid")), format!("{pid} {started}\n"))
                    .expect("worker record");
            }
            Dir::open(&d).expect("open")
        };
        let started = crate::ops::procfs::Stat::of(None).expect("stat").starttime;
        let stale = write(
            "old",
            "/srv/old-state",
            Some((std::process::id(), started + 1)),
        );
        let live = write("new", "/srv/state", Some((std::process::id(), started)));
        let dirs = [stale, live];
        assert_eq!(
            state_dir_in(&dirs, config),
            Some(PathBuf::from("/srv/state"))
        );
        assert_eq!(
            live_worker(&dirs[1], config),
            Some(std::process::id() as i32)
        );
        assert_eq!(live_worker(&dirs[0], config), None, "a pid started later");
        let first = write("none", "/srv/first", None);
        let second = write("none2", "/srv/second", None);
        assert_eq!(
            state_dir_in(&[first, second], config),
            Some(PathBuf::from("/srv/first"))
        );
        let _ = std::fs::remove_dir_all(&base);
    }
}
