//! Descriptors handed from one generation to the next across execve, on purpose: the pidfile
//! (its lock), the inotify instance (its queued events), the status socket and the `/metrics`
//! listening socket (their accept queues), a source's sockets (ZeroMQ's listening sockets,
//! Gearman connections parked at a safe point), the spool's consumer lock (to an image that
//! takes it up), and data too large for the environment in
//! memfds ([`memfd`]: the spool's queue listing, the metrics' counters).
//!
//! Every other descriptor is close-on-exec. These have FD_CLOEXEC cleared just before
//! execve ([`keep`]), their numbers carried in the environment, and are adopted by the new
//! image ([`adopt`]) only after checking what they are (so a stale or reused number is never
//! taken for ours), which sets FD_CLOEXEC again: job processes never inherit them. If execve
//! fails, [`release`] undoes [`keep`].

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;

use nix::fcntl::{fcntl, FcntlArg, FdFlag};

/// Prefix of the environment variables that carry state across exec; stripped from jobs.
pub const ENV_PREFIX: &str = "GEARSHIFT_INHERIT";

/// Lets `fd` survive the coming execve.
pub fn keep(fd: BorrowedFd<'_>) -> std::io::Result<()> {
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::empty()))
        .map(drop)
        .map_err(std::io::Error::from)
}

/// Undoes [`keep`] (execve failed and we carry on).
pub fn release(fd: BorrowedFd<'_>) {
    let _ = fcntl(fd.as_raw_fd(), FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
}

/// Takes ownership of descriptor `fd` handed over by the previous image, if it is open and
/// `is_ours` accepts what `/proc/self/fd/N` says it is; sets FD_CLOEXEC again. None: leave it
/// alone (not ours to close).
pub fn adopt(fd: Option<RawFd>, is_ours: impl FnOnce(&PathBuf) -> bool) -> Option<OwnedFd> {
    let fd = fd?;
    fcntl(fd, FcntlArg::F_GETFD).ok()?;
    let what = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    if !is_ours(&what) {
        return None;
    }
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC)).ok()?;
    // SAFETY: the previous image of this process handed us `fd` through the environment; it is
    // open (F_GETFD above), it is what we expect (checked above), and nothing else in this image
    // owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The sockets (by key) the previous image handed over, each checked to be a socket and made
/// close-on-exec again; a number that is not one of ours is left alone.
pub fn adopt_sockets(carried: &[(String, RawFd)]) -> Vec<(String, OwnedFd)> {
    adopt_keyed(carried, |what| what.starts_with("socket:"))
}

/// The files (by key) the previous image handed over with their locks held, each checked to
/// be a file or directory (a path, not a socket, pipe or memfd) and made close-on-exec again;
/// the source checks which file.
pub fn adopt_files(carried: &[(String, RawFd)]) -> Vec<(String, OwnedFd)> {
    adopt_keyed(carried, |what| {
        what.starts_with('/') && !what.starts_with("/memfd:")
    })
}

/// [`adopt`] of each descriptor carried by key that `is_ours` accepts (what
/// `/proc/self/fd/N` names, as text).
fn adopt_keyed(
    carried: &[(String, RawFd)],
    is_ours: impl Fn(&str) -> bool,
) -> Vec<(String, OwnedFd)> {
    carried
        .iter()
        .filter_map(|(key, fd)| {
            let owned = adopt(Some(*fd), |what| is_ours(&what.to_string_lossy()))?;
            Some((key.clone(), owned))
        })
        .collect()
}

/// A memfd named `gearshift-<name>` holding `data`, to hand over with [`keep`]; None if the
/// kernel refuses one (the data is then not handed over).
pub fn memfd(name: &str, data: &[u8]) -> Option<OwnedFd> {
    use std::io::Write;
    let cname = std::ffi::CString::new(format!("gearshift-{name}")).ok()?;
    let fd = nix::sys::memfd::memfd_create(
        cname.as_c_str(),
        nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC,
    )
    .ok()?;
    let mut file = std::fs::File::from(fd);
    file.write_all(data).ok()?;
    Some(OwnedFd::from(file))
}

/// Adopts a memfd made by [`memfd`] with the same `name` and reads it, up to `limit` bytes.
pub fn read_memfd(fd: Option<RawFd>, name: &str, limit: u64) -> Option<Vec<u8>> {
    use std::io::Seek;
    let expect = format!("/memfd:gearshift-{name} ");
    let fd = adopt(fd, |what| {
        // The kernel shows "/memfd:NAME (deleted)".
        format!("{} ", what.to_string_lossy()).starts_with(&expect)
    })?;
    let mut file = std::fs::File::from(fd);
    file.seek(std::io::SeekFrom::Start(0)).ok()?;
    // Over the limit is no hand-over of ours: start without it. Its size known, it is read
    // whole in one call (growing a buffer from nothing took a dozen, in the restart pause).
    let len = file.metadata().ok()?.len();
    if len > limit {
        return None;
    }
    let mut data = vec![0; usize::try_from(len).ok()?];
    std::io::Read::read_exact(&mut file, &mut data).ok()?;
    Some(data)
}

/// Marks every descriptor above stderr close-on-exec: whatever our launcher leaked to us (a
/// jobserver pipe, a terminal) then reaches neither job processes nor the next generation. Ours
/// are all opened close-on-exec already; the pidfile's is cleared on purpose just before exec.
pub fn close_inherited() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<i32> = entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, IntoRawFd};

    #[test]
    fn adoption_checks_what_the_descriptor_is() {
        assert!(adopt(None, |_| true).is_none(), "none carried");
        let file = std::fs::File::open("/proc/self/exe").unwrap();
        keep(file.as_fd()).unwrap();
        let flags = fcntl(file.as_raw_fd(), FcntlArg::F_GETFD).unwrap();
        assert_eq!(flags & FdFlag::FD_CLOEXEC.bits(), 0, "kept across exec");
        let raw = file.into_raw_fd();
        assert!(adopt(Some(raw), |p| p.ends_with("no-such-thing")).is_none());
        let owned = adopt(Some(raw), |_| true).unwrap();
        let flags = fcntl(owned.as_raw_fd(), FcntlArg::F_GETFD).unwrap();
        assert_ne!(
            flags & FdFlag::FD_CLOEXEC.bits(),
            0,
            "close-on-exec again once adopted"
        );
    }
}
