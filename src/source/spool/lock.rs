//! The consumer lock: one worker consumes a spool. It is an flock on `dir/.lock` and one on
//! the spool's directory itself (a `.lock` removed under a worker, a clean-up of lock files,
//! must not let a second one in, whose start-up recovery would queue again the jobs in `cur/`
//! the first one runs). Both descriptors cross each exec held, to an image that takes them up
//! (this one, or a deployed build whose pre-flight said so: the restart notes them in the
//! carried state), and the next generation takes them up, so the spool is never free between
//! two generations for a second worker waiting for it.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::errno::Errno;

use super::Spool;
use crate::error::{Error, Result};
use crate::text::ShowPath;

/// The keys the descriptors cross an exec by.
const FILE_KEY: &str = "spool-lock";
const DIR_KEY: &str = "spool-dir-lock";

/// How long a start waits for a worker that is exiting to let go of the spool.
const WAIT: Duration = Duration::from_secs(2);

/// The spool's consumer lock, held while this lives.
pub(super) struct ConsumerLock {
    file: OwnedFd,
    dir: OwnedFd,
}

impl ConsumerLock {
    /// Takes `spool`'s lock, with the descriptors the previous generation `carried` (by key)
    /// where they are still this spool's (else they are closed); waits up to 2 s for a worker
    /// that is exiting with it held.
    pub(super) fn take(spool: &Spool, carried: Vec<(String, OwnedFd)>) -> Result<ConsumerLock> {
        let lock_path = spool.root.join(".lock");
        // Read-only is enough for flock, and works on a .lock another user (say, root before a
        // switch to `[worker] user`) created.
        let fresh = nix::fcntl::open(
            &lock_path,
            nix::fcntl::OFlag::O_RDONLY
                | nix::fcntl::OFlag::O_CREAT
                | nix::fcntl::OFlag::O_CLOEXEC
                | nix::fcntl::OFlag::O_NOFOLLOW
                | nix::fcntl::OFlag::O_NONBLOCK,
            nix::sys::stat::Mode::from_bits_truncate(0o640),
        )
        .map_err(|e| Error::io_path("opening", &lock_path, e.into()))?;
        // SAFETY: `fresh` was just returned by open(2) and nothing else owns it.
        let fresh = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fresh) };
        let mut file = None;
        let mut dir = None;
        for (key, fd) in carried {
            match key.as_str() {
                FILE_KEY if same_file(&fd, &fresh) => file = Some(fd),
                DIR_KEY if same_file(&fd, &*spool.top) => dir = Some(fd),
                // Another spool's, or a file replaced since: dropped, its lock with it.
                _ => {}
            }
        }
        let file = file.unwrap_or(fresh);
        let dir = match dir {
            Some(d) => d,
            None => spool
                .top
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| Error::io_path("locking", &spool.root, e))?,
        };
        // Taken up from the previous generation, both are held already (a lock belongs to the
        // open file, which crossed the exec); taken afresh, a worker that just released the
        // pidfile may still be exiting with them held.
        let deadline = Instant::now() + WAIT;
        for fd in [&file, &dir] {
            loop {
                match crate::ops::safefs::flock(fd.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) {
                    Ok(()) => break,
                    Err(Errno::EWOULDBLOCK) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(Errno::EWOULDBLOCK) => {
                        // Who holds it, as the kernel says (none named: a holder in another
                        // pid namespace, or gone since).
                        let by = crate::ops::pidfile::lock_holder(fd)
                            .map_or_else(String::new, |pid| format!(", by pid {pid}"));
                        return Err(Error::Msg(format!(
                            "spool \"{}\" is in use by another worker (its .lock is held{by})",
                            spool.root.shown()
                        )));
                    }
                    Err(errno) => return Err(Error::io_path("locking", &lock_path, errno.into())),
                }
            }
        }
        Ok(ConsumerLock { file, dir })
    }

    /// The descriptors to hand to the next generation of this image, by key (open until the
    /// exec or its failure).
    pub(super) fn handed(&self) -> Vec<(String, RawFd)> {
        vec![
            (FILE_KEY.to_string(), self.file.as_raw_fd()),
            (DIR_KEY.to_string(), self.dir.as_raw_fd()),
        ]
    }
}

/// Whether two descriptors name the same file (device and inode).
fn same_file(a: &impl AsRawFd, b: &impl AsRawFd) -> bool {
    match (
        nix::sys::stat::fstat(a.as_raw_fd()),
        nix::sys::stat::fstat(b.as_raw_fd()),
    ) {
        (Ok(a), Ok(b)) => (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino),
        _ => false,
    }
}
