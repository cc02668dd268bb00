//! The pidfile and its lock: the one source of truth for "is a worker running here".
//!
//! The lock is an flock on the pidfile, held for the worker's whole life. It belongs to the open
//! file description, so it survives our own execve when the descriptor is inherited: the re-exec
//! clears FD_CLOEXEC on that one descriptor, passes its number in the environment, and the new
//! image checks it still refers to the pidfile's inode and sets FD_CLOEXEC again (so job
//! processes never inherit it). No second instance can slip in during a reload. `status` and
//! `stop` test the lock, never `kill(pid, 0)`: PIDs are reused, locks die with their holder.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, FdFlag};

use crate::error::{Error, IoContext, Result};

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
    /// Takes the lock and writes our pid. A stale pidfile (its holder died) is simply taken over.
    pub fn acquire(path: &Path) -> Result<Pidfile> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .at("opening pidfile", path)?;
        // A `status` probing the lock holds it for microseconds: retry briefly before deciding
        // that another worker runs.
        let deadline = Instant::now() + Duration::from_millis(300);
        loop {
            match flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) {
                Ok(()) => break,
                Err(Errno::EWOULDBLOCK) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(Errno::EWOULDBLOCK) => {
                    return Err(Error::Locked {
                        what: path.to_path_buf(),
                        pid: read_pid(&mut file),
                    })
                }
                Err(e) => return Err(Error::io_path("locking pidfile", path, e.into())),
            }
        }
        // Truncate only while holding the lock.
        file.set_len(0).at("truncating pidfile", path)?;
        file.seek(SeekFrom::Start(0)).at("writing pidfile", path)?;
        writeln!(file, "{}", std::process::id()).at("writing pidfile", path)?;
        Ok(Pidfile { file })
    }

    /// Takes back the lock inherited across execve as descriptor `fd`, if it still is the
    /// pidfile at `path`; None means it is not (the caller then acquires afresh).
    pub fn adopt(fd: RawFd, path: &Path) -> Option<Pidfile> {
        // Only adopt a descriptor that is open; from_raw_fd on a closed number would later close
        // someone else's descriptor.
        fcntl(fd, FcntlArg::F_GETFD).ok()?;
        // SAFETY: the previous image of this process handed us `fd` (checked open just above)
        // through the environment and nothing else in this image owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        let same = match (file.metadata(), std::fs::metadata(path)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        };
        if !same || flock(fd, libc::LOCK_EX | libc::LOCK_NB).is_err() {
            return None;
        }
        let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
        Some(Pidfile { file })
    }

    /// Empties the file, keeping the lock (just before a clean exit).
    pub fn clear(&self) {
        let _ = self.file.set_len(0);
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// Lets the descriptor survive execve (just before it).
    pub fn keep_across_exec(&self) -> Result<()> {
        fcntl(self.fd(), FcntlArg::F_SETFD(FdFlag::empty()))
            .map(drop)
            .map_err(|e| Error::io("clearing FD_CLOEXEC on the pidfile", e.into()))
    }

    /// Undoes [`Pidfile::keep_across_exec`] (execve failed).
    pub fn close_on_exec(&self) {
        let _ = fcntl(self.fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        // Empty the file before the lock goes (with the descriptor): a reader then never sees a
        // stale pid next to a free lock for long.
        let _ = self.file.set_len(0);
    }
}

/// Tests the lock on `path` without keeping it.
pub fn probe(path: &Path) -> Result<Probe> {
    let mut file = match OpenOptions::new().read(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Probe::NotRunning),
        Err(e) => return Err(Error::io_path("opening pidfile", path, e)),
    };
    match flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) {
        Ok(()) => Ok(Probe::NotRunning),
        Err(Errno::EWOULDBLOCK) => Ok(Probe::Running(read_pid(&mut file))),
        Err(e) => Err(Error::io_path("testing the pidfile lock", path, e.into())),
    }
}

fn read_pid(file: &mut File) -> Option<i32> {
    let mut s = String::new();
    file.seek(SeekFrom::Start(0)).ok()?;
    file.read_to_string(&mut s).ok()?;
    s.trim().parse().ok()
}

/// flock(2) on a descriptor we keep. nix's `Flock` wrapper owns the file and unlocks on drop,
/// which is not what a lock handed across execve needs.
fn flock(fd: RawFd, op: i32) -> std::result::Result<(), Errno> {
    // SAFETY: flock takes a descriptor and an operation and touches no memory of ours; an
    // invalid descriptor is reported as EBADF.
    let r = unsafe { libc::flock(fd, op) };
    if r == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}
