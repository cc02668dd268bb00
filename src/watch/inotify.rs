//! A minimal inotify wrapper whose one descriptor lives across re-exec.
//!
//! Why not the `notify` crate: closing an inotify instance waits for an SRCU grace period in
//! the kernel (fsnotify group teardown). With three `notify` watchers, execve spent 7-35 ms
//! closing them, most of the restart pause. Here one instance serves every watch, it is handed
//! to the next generation like the pidfile lock (FD_CLOEXEC cleared just before execve), and
//! events queued during the exec are read by the new image instead of being lost.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::Duration;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// Directory events that may mean "something in here changed".
const MASK: u32 = libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ATTRIB
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

/// An entry appeared (written in place or renamed in), or the directory itself went.
pub const ARRIVALS: u32 = libc::IN_CREATE
    | libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_TO
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

/// One inotify instance.
pub struct Inotify {
    fd: OwnedFd,
}

/// Which watch an event came from; `Overflow` means events were dropped (treat as "all").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    Watch(i32),
    Overflow,
    /// An event on an entry the caller asked to follow by name (see [`Inotify::wait_named`]),
    /// besides the `Watch` of its directory: its mask (`IN_MODIFY`, `IN_CLOSE_WRITE`, ...).
    Named {
        wd: i32,
        mask: u32,
        name: std::ffi::OsString,
    },
}

/// Which entries' events are returned by name: `(watch, name) -> bool`.
pub type Follow<'a> = &'a dyn Fn(i32, &[u8]) -> bool;

impl Inotify {
    pub fn new() -> io::Result<Inotify> {
        // SAFETY: inotify_init1 takes flags only and returns a new descriptor or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the descriptor was just created and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Inotify { fd })
    }

    /// Takes back the instance a previous generation handed over as `fd`, if that descriptor
    /// really is an inotify instance; sets FD_CLOEXEC again.
    pub fn adopt(fd: Option<RawFd>) -> Option<Inotify> {
        let fd = crate::ops::handover::adopt(fd, |what| {
            what.as_os_str().as_bytes() == b"anon_inode:inotify"
        })?;
        Some(Inotify { fd })
    }

    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Watches directory `dir` for every change (adding it again returns the same watch id).
    pub fn add(&self, dir: &Path) -> io::Result<i32> {
        self.add_masked(dir, MASK)
    }

    /// Watches directory `dir` only for entries arriving in it ([`ARRIVALS`]): a queue, where
    /// each job leaving (a claim) would otherwise wake the reader too. Replaces the mask of a
    /// watch on the same directory.
    pub fn add_arrivals(&self, dir: &Path) -> io::Result<i32> {
        self.add_masked(dir, ARRIVALS)
    }

    fn add_masked(&self, dir: &Path, mask: u32) -> io::Result<i32> {
        let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))?;
        // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
        let wd = unsafe { libc::inotify_add_watch(self.fd(), c.as_ptr(), mask) };
        if wd < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(wd)
        }
    }

    /// Lets the descriptor survive execve (just before it).
    pub fn keep_across_exec(&self) -> io::Result<()> {
        crate::ops::handover::keep(self.fd.as_fd())
    }

    /// Undoes [`Inotify::keep_across_exec`] (execve failed).
    pub fn close_on_exec(&self) {
        crate::ops::handover::release(self.fd.as_fd());
    }

    /// Waits up to `timeout` (None: for ever) for events and returns them (empty on timeout).
    pub fn wait(&self, timeout: Option<Duration>, buf: &mut [u8]) -> io::Result<Vec<Event>> {
        self.wait_named(timeout, buf, &|_, _| false)
    }

    /// [`Inotify::wait`], and every event on an entry `follow` names is returned too, as
    /// [`Event::Named`] (in the order they came).
    pub fn wait_named(
        &self,
        timeout: Option<Duration>,
        buf: &mut [u8],
        follow: Follow<'_>,
    ) -> io::Result<Vec<Event>> {
        let t = match timeout {
            None => PollTimeout::NONE,
            Some(d) => PollTimeout::try_from(d.as_millis().min(i32::MAX as u128) as i32)
                .unwrap_or(PollTimeout::MAX),
        };
        let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, t) {
            Ok(0) => return Ok(Vec::new()),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        }
        self.read(buf, follow)
    }

    /// Reads whatever events are queued (non-blocking).
    fn read(&self, buf: &mut [u8], follow: Follow<'_>) -> io::Result<Vec<Event>> {
        let mut events = Vec::new();
        loop {
            // SAFETY: `buf` is valid for writes of buf.len() bytes for the duration of the call.
            let n = unsafe { libc::read(self.fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(events),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            parse(&buf[..n as usize], &mut events, follow);
            if (n as usize) < buf.len() / 2 {
                return Ok(events);
            }
        }
    }
}

/// Decodes `struct inotify_event` records: wd (i32), mask, cookie, len (u32), then `len` bytes
/// of name (NUL-padded). One `Watch` per directory; a `Named` for each event `follow` names.
fn parse(mut bytes: &[u8], out: &mut Vec<Event>, follow: Follow<'_>) {
    const HEADER: usize = 16;
    while bytes.len() >= HEADER {
        let wd = i32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let mask = u32::from_ne_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
        let len = u32::from_ne_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]) as usize;
        let event = if mask & libc::IN_Q_OVERFLOW != 0 {
            Event::Overflow
        } else {
            Event::Watch(wd)
        };
        if !out.contains(&event) {
            out.push(event);
        }
        let raw = bytes.get(HEADER..HEADER + len).unwrap_or(&[]);
        let name = raw.split(|b| *b == 0).next().unwrap_or(&[]);
        if !name.is_empty() && follow(wd, name) {
            out.push(Event::Named {
                wd,
                mask,
                name: std::ffi::OsStr::from_bytes(name).to_os_string(),
            });
        }
        bytes = bytes.get(HEADER + len..).unwrap_or(&[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_creates_renames_and_survives_adoption() {
        let dir = crate::testutil::tempdir("inotify", "adoption");
        let ino = Inotify::new().expect("inotify");
        let wd = ino.add(&dir).expect("watch");
        assert_eq!(
            ino.add(&dir).expect("watch again"),
            wd,
            "same directory, same watch"
        );
        let mut buf = vec![0u8; 4096];
        assert!(ino
            .wait(Some(Duration::from_millis(10)), &mut buf)
            .expect("wait")
            .is_empty());

        std::fs::write(dir.join("a"), b"x").expect("write");
        assert_eq!(
            ino.wait(Some(Duration::from_secs(5)), &mut buf)
                .expect("wait"),
            [Event::Watch(wd)]
        );
        std::fs::rename(dir.join("a"), dir.join("b")).expect("rename");
        assert_eq!(
            ino.wait(Some(Duration::from_secs(5)), &mut buf)
                .expect("wait"),
            [Event::Watch(wd)]
        );

        // Adoption: the same instance, through its descriptor number.
        let raw = ino.fd();
        std::mem::forget(ino);
        let ino = Inotify::adopt(Some(raw)).expect("adopt");
        std::fs::remove_file(dir.join("b")).expect("rm");
        assert_eq!(
            ino.wait(Some(Duration::from_secs(5)), &mut buf)
                .expect("wait"),
            [Event::Watch(wd)]
        );
        let file = std::fs::File::open(&dir).expect("open");
        assert!(
            Inotify::adopt(Some(file.as_raw_fd())).is_none(),
            "not an inotify descriptor"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn parses_records_with_names() {
        let mut bytes = Vec::new();
        for (wd, name) in [
            (1i32, &b"config.toml\0\0\0\0\0"[..]),
            (2, &b""[..]),
            (1, &b"x\0\0\0"[..]),
        ] {
            bytes.extend_from_slice(&wd.to_ne_bytes());
            bytes.extend_from_slice(&libc::IN_CREATE.to_ne_bytes());
            bytes.extend_from_slice(&0u32.to_ne_bytes());
            bytes.extend_from_slice(&(name.len() as u32).to_ne_bytes());
            bytes.extend_from_slice(name);
        }
        let mut out = Vec::new();
        parse(&bytes, &mut out, &|_, _| false);
        assert_eq!(out, [Event::Watch(1), Event::Watch(2)]);
        out.clear();
        parse(&bytes, &mut out, &|wd, name| {
            wd == 1 && name == b"config.toml"
        });
        let named = Event::Named {
            wd: 1,
            mask: libc::IN_CREATE,
            name: "config.toml".into(),
        };
        assert_eq!(out, [Event::Watch(1), named, Event::Watch(2)]);
    }
}
