//! The pidfile and its lock: the one source of truth for "is a worker running here".
//!
//! The lock is an flock on the pidfile, held for the worker's whole life. It belongs to the open
//! file description, so it survives our own execve when the descriptor is inherited: the re-exec
//! clears FD_CLOEXEC on that one descriptor, passes its number in the environment, and the new
//! image checks it still refers to the pidfile's inode and sets FD_CLOEXEC again (so job
//! processes never inherit it). No second instance can slip in during a reload. `status` and
//! `stop` test the lock, never `kill(pid, 0)`: PIDs are reused, locks die with their holder. And
//! they signal only the lock's owner as the kernel reports it in `/proc/locks`, never a pid read
//! from the file alone. The pidfile lives in root's `state_dir` (see [`crate::ops::layout`]).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;

use nix::unistd::geteuid;

use crate::error::{Error, IoContext, Result};
use crate::ops::layout::PIDFILE;
use crate::ops::safefs::{flock, Dir, Open};
use crate::text::ShowPath;

/// How often a serving worker looks at its pidfile's path (one `stat`).
pub const LOOK_EVERY: Duration = Duration::from_secs(5);

/// A held pidfile lock.
pub struct Pidfile {
    file: File,
}

/// What the lock says about a pidfile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Locked: a worker runs, with the pid written in the file (if readable).
    Running(Option<i32>),
    NotRunning,
}

impl Pidfile {
    /// Takes the lock and writes our pid. A stale pidfile (its holder died) is simply taken over;
    /// one that is not ours (left by an older version, when `state_dir` was the worker's) is
    /// replaced, so nobody else holds a descriptor to the file we lock.
    pub fn acquire(state: &Dir) -> Result<Pidfile> {
        Pidfile::acquire_named(state, PIDFILE)
    }

    /// [`Pidfile::acquire`] of the pidfile `name` in `state` (a supervisor's own).
    pub fn acquire_named(state: &Dir, name: &str) -> Result<Pidfile> {
        let path = state.path().join(name);
        let how = Open {
            write: true,
            append: false,
            create: Some(0o600),
        };
        let mut replaced = false;
        let mut file = loop {
            let opened = state.file(name, how)?;
            let owner = opened
                .file
                .metadata()
                .map_err(|e| Error::io_path("checking", &path, e))?
                .uid();
            if opened.created || owner == geteuid().as_raw() || replaced {
                break opened.file;
            }
            if flock(opened.file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB).is_err() {
                break opened.file;
            }
            log::warn!(
                "replacing \"{}\", owned by uid {owner}, not us",
                path.shown()
            );
            state.remove(name)?;
            replaced = true;
        };
        // The lock is taken on a read-only descriptor of the same file, the one the worker keeps
        // for its whole life: a descriptor a job could take from it (see
        // `privilege::refuse_tracing`, and the moment of every exec) cannot write root's file.
        let locked = state.file(name, Open::READ)?.file;
        let same = |a: &File, b: &File| match (a.metadata(), b.metadata()) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if !same(&locked, &file) {
            return Err(Error::Unsafe(format!(
                "\"{}\" was replaced while it was being opened: is another worker starting?",
                path.shown()
            )));
        }
        // A `status` probing the lock holds it for microseconds: retry briefly before deciding
        // that another worker runs.
        let deadline = Instant::now() + Duration::from_millis(300);
        loop {
            match flock(locked.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) {
                Ok(()) => break,
                Err(Errno::EWOULDBLOCK) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(Errno::EWOULDBLOCK) => {
                    let pid = lock_holder(&file).or_else(|| read_pid(&mut file));
                    return Err(Error::Locked { what: path, pid });
                }
                Err(e) => return Err(Error::io_path("locking pidfile", &path, e.into())),
            }
        }
        // Nobody else may open it: a reader could flock it too, and a lock held by another
        // user would pass for a running worker (then `stop` signals whatever gets that pid).
        // Whatever the umask, and also for a file an older version left readable.
        {
            use std::os::unix::fs::PermissionsExt;
            file.set_permissions(std::fs::Permissions::from_mode(0o600))
                .at("restricting pidfile", &path)?;
        }
        // Truncate only while holding the lock.
        file.set_len(0).at("truncating pidfile", &path)?;
        file.seek(SeekFrom::Start(0)).at("writing pidfile", &path)?;
        writeln!(file, "{}", std::process::id()).at("writing pidfile", &path)?;
        Ok(Pidfile { file: locked })
    }

    /// Takes back the lock inherited across execve as descriptor `fd`, whether or not the
    /// pidfile's path still names it ([`Pidfile::keep_named`] looks at that); None: no lock of
    /// ours came (the caller then acquires afresh).
    pub fn adopt(fd: Option<RawFd>) -> Option<Pidfile> {
        let file = File::from(crate::ops::handover::adopt(fd, |_| true)?);
        if flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB).is_err() {
            return None;
        }
        Some(Pidfile { file })
    }

    /// [`Pidfile::keep_named`] while serving, every [`LOOK_EVERY`]: another worker's pidfile
    /// there is said (log, `status`), and there is nothing else to do about it.
    pub fn look(&mut self, state_dir: &Path) {
        let _ = self.keep_named(state_dir);
    }

    /// Whether `path` names the file this lock is held on.
    pub fn names(&self, path: &Path) -> bool {
        match (std::fs::symlink_metadata(path), self.file.metadata()) {
            (Ok(at), Ok(ours)) => at.dev() == ours.dev() && at.ino() == ours.ino(),
            _ => false,
        }
    }

    /// Makes `state_dir`'s pidfile name this worker again if it no longer does (removed by an
    /// operator who took it for a stale one, or by a cleaner): `status` and `stop` find a
    /// worker only by it. A worker that may not write there (one that dropped its privileges
    /// to a user other than `state_dir`'s owner) cannot: it says so in its log and `status`
    /// ([`astray`]), and the CLI finds it by its status socket meanwhile. Another worker's lock
    /// on a new pidfile there is said the same way, and returned for the caller to judge.
    pub fn keep_named(&mut self, state_dir: &Path) -> Result<()> {
        let path = state_dir.join(PIDFILE);
        if self.names(&path) {
            return Ok(());
        }
        match Dir::open(state_dir).and_then(|d| Pidfile::acquire(&d)) {
            Ok(made) => {
                *self = made;
                log::warn!(
                    "the pidfile \"{}\" had been removed or replaced: made it again",
                    path.shown()
                );
                set_astray(None);
                Ok(())
            }
            Err(e) => {
                let clash = matches!(e, Error::Locked { .. });
                let said = if clash {
                    format!("the pidfile \"{}\" was replaced by another worker's ({e}): two workers may run on this state_dir; stop one (`kill -TERM {}` stops this one)", path.shown(), std::process::id())
                } else {
                    format!("the pidfile \"{}\" was removed or replaced and this worker cannot make it again ({e}): `gearshift status` and `stop` find it by its status socket (while that is there), but cannot signal it; `kill -TERM {}` stops it, and its next fresh start makes the pidfile", path.shown(), std::process::id())
                };
                if astray().as_ref() != Some(&said) {
                    log::warn!("{said}");
                }
                set_astray(Some(said));
                if clash {
                    Err(e)
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Empties the file, keeping the lock (just before a clean exit): through a descriptor
    /// opened for it, which the kernel grants only if this process may write the file (root's
    /// pidfile stays as it is under a dropped worker; the pid in it then names a process that
    /// holds no lock, as after a crash, and the next start writes its own).
    pub fn clear(&self) {
        let own = format!("/proc/self/fd/{}", self.file.as_raw_fd());
        if let Ok(f) = std::fs::OpenOptions::new().write(true).open(own) {
            let _ = f.set_len(0);
        }
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Lets the descriptor survive execve (just before it).
    pub fn keep_across_exec(&self) -> Result<()> {
        crate::ops::handover::keep(self.file.as_fd())
            .map_err(|e| Error::io("clearing FD_CLOEXEC on the pidfile", e))
    }

    /// Undoes [`Pidfile::keep_across_exec`] (execve failed).
    pub fn close_on_exec(&self) {
        crate::ops::handover::release(self.file.as_fd());
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        // Empty the file before the lock goes (with the descriptor): a reader then never sees a
        // stale pid next to a free lock for long.
        self.clear();
    }
}

/// Why the pidfile does not name this worker, while it does not (for `status`).
static ASTRAY: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn set_astray(said: Option<String>) {
    if let Ok(mut a) = ASTRAY.lock() {
        *a = said;
    }
}

/// While the pidfile's path does not name this worker's lock: why, and what to do.
pub fn astray() -> Option<String> {
    ASTRAY.lock().ok()?.clone()
}

/// The uid `[worker] user` names (0: none or not known), as the CLI read it from the config: a
/// lock it holds is the worker's, also while `state_dir/worker/`, whose owner says so
/// otherwise, is gone (removed under a worker that cannot make it again).
static CONFIGURED_USER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// A supervisor's own pidfile lock (`state_dir/supervisor.pid`; `status_socket` is
/// `state_dir/worker/gearshift.sock`), held for its life and never inherited by its worker
/// (close-on-exec): while it waits to start the worker again after a crash no worker holds the
/// pidfile, and `stop` said "not running" and left it to start one seconds later; the CLI
/// finds it by this lock now.
pub fn supervisor_lock(status_socket: &Path) -> Result<Pidfile> {
    let state_dir = (status_socket.parent().and_then(Path::parent))
        .ok_or_else(|| Error::Msg(format!("no state_dir above {}", status_socket.shown())))?;
    Pidfile::acquire_named(
        &Dir::open(state_dir)?,
        crate::ops::layout::SUPERVISOR_PIDFILE,
    )
}

/// Tells [`probe`] the uid `[worker] user` names.
pub fn configured_user(uid: u32) {
    CONFIGURED_USER.store(uid, std::sync::atomic::Ordering::Relaxed);
}

/// Tests the lock on `path` without keeping it. A worker runs if the file is locked; its pid
/// is the lock's owner as the kernel reports it (`/proc/locks`) for the inode we opened, and
/// the pid written in the file must agree: a pid read from a file alone is never signalled.
pub fn probe(path: &Path) -> Result<Probe> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Err(Error::Msg(format!("bad pidfile path \"{}\"", path.shown())));
    };
    let not_found = |e: &Error| matches!(e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound);
    let dir = match Dir::open(dir) {
        Ok(d) => d,
        Err(e) if not_found(&e) => return Ok(Probe::NotRunning),
        Err(e) => return Err(e),
    };
    let mut file = match dir.file(name, Open::READ) {
        Ok(o) => o.file,
        Err(e) if not_found(&e) => return Ok(Probe::NotRunning),
        Err(e) => return Err(e),
    };
    match flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) {
        Ok(()) => return Ok(Probe::NotRunning),
        Err(Errno::EWOULDBLOCK) => {}
        Err(e) => return Err(Error::io_path("testing the pidfile lock", path, e.into())),
    }
    let written = read_pid(&mut file);
    let holder = lock_holder(&file);
    if let Some(h) = holder {
        // Only root or the worker's user can be the worker: the file's owner (root, or the user
        // who runs their own worker) or the owner of `state_dir/worker/` (the user it drops to).
        let file_owner = file.metadata().map(|m| m.uid()).ok();
        let worker_user = dir
            .sub(crate::ops::layout::WORKER_DIR, None)
            .ok()
            .map(|d| d.owner().0.as_raw());
        let configured = CONFIGURED_USER.load(std::sync::atomic::Ordering::Relaxed);
        match crate::ops::procfs::euid(h) {
            Some(uid)
                if uid == 0
                    || Some(uid) == file_owner
                    || Some(uid) == worker_user
                    || (uid == configured && configured != 0) => {}
            Some(uid) => {
                return Err(Error::Unknown(format!(
                    "\"{}\" is locked by pid {h} of uid {uid}, which is neither root nor the worker's user: not a gearshift worker of this state_dir; not signalling it (find out what it is)",
                    path.shown()
                )))
            }
            // Gone meanwhile (or /proc hides it): the checks below decide.
            None => {}
        }
    }
    match (holder, written) {
        // Empty: the worker is starting or exiting; the kernel's word is enough.
        (Some(holder), None) => Ok(Probe::Running(Some(holder))),
        (Some(holder), Some(pid)) if holder == pid => Ok(Probe::Running(Some(pid))),
        // A worker in a pid namespace of its own (a container whose state_dir this one sees)
        // wrote its pid there; the lock names it as this namespace sees it.
        (Some(holder), Some(pid)) if crate::ops::procfs::innermost_pid(holder) == Some(pid) => {
            Ok(Probe::Running(Some(holder)))
        }
        (Some(holder), Some(pid)) => Err(Error::Unknown(format!(
            "\"{}\" says pid {pid}, but the lock is held by pid {holder}: not signalling either (fix the pidfile, or stop pid {holder} yourself)",
            path.shown()
        ))),
        // The holder let go between our test and the look at /proc/locks.
        (None, _) if flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB).is_ok() => {
            Ok(Probe::NotRunning)
        }
        (None, _) => Err(Error::Unknown(format!(
            "\"{}\" is locked, but /proc/locks names no holder for it{}",
            path.shown(),
            if crate::ops::procfs::in_nested_pid_namespace() {
                ": the holder runs outside this pid namespace (this command runs in a container, the worker on the host or in another one): ask where the worker runs"
            } else {
                ""
            }
        ))),
    }
}

/// The pid holding an flock on `file`'s inode, as the kernel reports it in /proc/locks.
pub fn lock_holder(file: &impl AsRawFd) -> Option<i32> {
    let st = nix::sys::stat::fstat(file.as_raw_fd()).ok()?;
    let dev = st.st_dev;
    let key = format!(
        "{:02x}:{:02x}:{}",
        nix::sys::stat::major(dev),
        nix::sys::stat::minor(dev),
        st.st_ino
    );
    // /proc/locks is produced a record at a time for each read(2): a lock taken or dropped
    // elsewhere between two reads shifts the records, and ours can be skipped. So read it in
    // one call with a large buffer, and look again a few times before saying "nobody".
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..5 {
        let n = File::open("/proc/locks")
            .and_then(|mut f| f.read(&mut buf))
            .ok()?;
        if let Some(pid) = holder_in(&String::from_utf8_lossy(&buf[..n]), &key) {
            return Some(pid);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// Finds the holder of a granted FLOCK on `key` (`maj:min:inode`) in /proc/locks text.
fn holder_in(locks: &str, key: &str) -> Option<i32> {
    locks.lines().find_map(|line| {
        // "1: FLOCK  ADVISORY  WRITE 1234 fe:00:5678 0 EOF"; waiters have "->" after the number.
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.get(1) == Some(&"FLOCK") && f.get(5) == Some(&key))
            .then(|| f.get(4).and_then(|p| p.parse().ok()))
            .flatten()
            // 0: a holder this pid namespace cannot see (never a pid to signal).
            .filter(|pid: &i32| *pid > 0)
    })
}

fn read_pid(file: &mut File) -> Option<i32> {
    let mut s = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::holder_in;

    #[test]
    fn proc_locks_lines() {
        let text = "1: POSIX  ADVISORY  WRITE 10 fe:00:77 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 42 fe:00:77 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 43 fe:00:77 0 EOF\n\
                    3: FLOCK  ADVISORY  READ 44 08:01:9 0 EOF\n";
        assert_eq!(holder_in(text, "fe:00:77"), Some(42));
        assert_eq!(holder_in(text, "08:01:9"), Some(44));
        assert_eq!(holder_in(text, "fe:00:7"), None);
        // A holder in a pid namespace this one cannot see is shown as pid 0: signalling "pid
        // 0" would signal the caller's own process group.
        let hidden = "4: FLOCK  ADVISORY  WRITE 0 fe:00:78 0 EOF\n";
        assert_eq!(holder_in(hidden, "fe:00:78"), None);
    }
}
