//! Opening files where another user may have planted something, without being fooled.
//!
//! Started as root with `[worker] user`, gearshift hands the spool and a subdirectory of
//! `state_dir` to that user, and every job runs as it. Whatever a job can write, root must not
//! follow: a symbolic link planted as `state/gearshift.pid` would make root truncate and chown
//! its target. So every root-side file operation goes through [`Dir`]:
//!
//! - A path is walked one component at a time from `/` with `O_NOFOLLOW`. A symbolic link is
//!   followed only where it stands in a *trusted* directory: one owned by root (or by us) that
//!   nobody else can write. A link in anyone else's directory is refused with its path.
//! - Files are opened relative to the directory's descriptor with `O_NOFOLLOW | O_NONBLOCK`
//!   (a FIFO cannot block the opener), then checked with `fstat`: a regular file, one link, and,
//!   in a directory someone else can write, owned by that directory's owner or by us.
//! - Ownership and modes change only through descriptors (`fchown`, `fchmod`), never by path.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{geteuid, Gid, Uid};

use crate::error::{Error, Result};
use crate::text::ShowPath;

mod entries;
pub use entries::{chown_file, open_regular, read_bounded, Open};

/// How many symbolic links one walk may follow (the kernel's own limit).
const MAX_LINKS: usize = 40;

/// An open directory, with what `fstat` said of it when it was opened.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
    st: FileStat,
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful open(2)-family call in this module, and
    // nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn kind(st: &FileStat) -> &'static str {
    kind_of(st.st_mode)
}

/// What a file of `mode` (an `st_mode`, type bits included) is, in words.
pub fn kind_of(mode: u32) -> &'static str {
    match SFlag::from_bits_truncate(mode) & SFlag::S_IFMT {
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFLNK => "a symbolic link",
        SFlag::S_IFIFO => "a FIFO",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFCHR => "a character device",
        SFlag::S_IFBLK => "a block device",
        SFlag::S_IFREG => "a regular file",
        _ => "of an unknown type",
    }
}

/// Whether `st` (say from [`Dir::entries`]) is a regular file's.
pub fn is_file(st: &FileStat) -> bool {
    is(st, SFlag::S_IFREG)
}

fn is(st: &FileStat, t: SFlag) -> bool {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == t
}

impl Dir {
    /// Opens the directory at `path` (made absolute against the working directory).
    pub fn open(path: &Path) -> Result<Dir> {
        Dir::walk(path, None)
    }

    /// Opens the directory at `path`, creating what is missing with `mode` (like mkdir -p).
    pub fn create(path: &Path, mode: u32) -> Result<Dir> {
        Dir::walk(path, Some(mode))
    }

    fn walk(path: &Path, create: Option<u32>) -> Result<Dir> {
        let abs = std::path::absolute(path).map_err(|e| Error::io_path("resolving", path, e))?;
        let root = Path::new("/");
        let slash = || -> Result<Dir> {
            let fd = open_dir(None, OsStr::new("/"))
                .map_err(|e| Error::io_path("opening directory", root, e.into()))?;
            Dir::from_fd(fd, root)
        };
        let mut cur = slash()?;
        let mut todo: VecDeque<OsString> = components(&abs);
        let mut links = 0;
        while let Some(name) = todo.pop_front() {
            if name == ".." {
                let up = cur.path.parent().unwrap_or(root).to_path_buf();
                let fd = open_dir(Some(cur.fd.as_raw_fd()), &name)
                    .map_err(|e| Error::io_path("opening directory", &up, e.into()))?;
                cur = Dir::from_fd(fd, &up)?;
                continue;
            }
            let here = cur.path.join(&name);
            match open_dir(Some(cur.fd.as_raw_fd()), &name) {
                Ok(fd) => cur = Dir::from_fd(fd, &here)?,
                Err(Errno::ELOOP) | Err(Errno::ENOTDIR) if cur.is_link(&name) => {
                    if !cur.trusted() {
                        return Err(Error::Unsafe(format!(
                            "\"{}\" is a symbolic link in \"{}\", a directory that a user other than root can write: not following it (use the real path, or remove the link)",
                            here.shown(),
                            cur.path.shown()
                        )));
                    }
                    links += 1;
                    if links > MAX_LINKS {
                        return Err(Error::io_path(
                            "resolving",
                            path,
                            std::io::Error::from_raw_os_error(libc::ELOOP),
                        ));
                    }
                    let target = nix::fcntl::readlinkat(Some(cur.fd.as_raw_fd()), name.as_os_str())
                        .map_err(|e| Error::io_path("reading link", &here, e.into()))?;
                    let target = Path::new(&target);
                    for c in components(target).into_iter().rev() {
                        todo.push_front(c);
                    }
                    if target.is_absolute() {
                        cur = slash()?;
                    }
                }
                Err(Errno::ENOENT) if create.is_some() => {
                    let mode = Mode::from_bits_truncate(create.unwrap_or(0o755));
                    match mkdirat(Some(cur.fd.as_raw_fd()), name.as_os_str(), mode) {
                        Ok(()) | Err(Errno::EEXIST) => todo.push_front(name),
                        Err(e) => {
                            return Err(Error::io_path("creating directory", &here, e.into()))
                        }
                    }
                }
                Err(e) => {
                    return Err(Error::io_path("opening directory", &here, e.into()));
                }
            }
        }
        Ok(cur)
    }

    fn from_fd(fd: OwnedFd, path: &Path) -> Result<Dir> {
        let st = fstat(fd.as_raw_fd()).map_err(|e| Error::io_path("checking", path, e.into()))?;
        Ok(Dir {
            fd,
            path: path.to_path_buf(),
            st,
        })
    }

    /// What `name` here is, never through a link (lstat relative to this descriptor).
    fn lstat(&self, name: &OsStr) -> nix::Result<FileStat> {
        nix::sys::stat::fstatat(
            Some(self.fd.as_raw_fd()),
            name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
    }

    fn is_link(&self, name: &OsStr) -> bool {
        self.lstat(name).is_ok_and(|st| is(&st, SFlag::S_IFLNK))
    }

    /// The directory's path, as walked.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The owner's uid and gid when the directory was opened.
    pub fn owner(&self) -> (Uid, Gid) {
        (Uid::from_raw(self.st.st_uid), Gid::from_raw(self.st.st_gid))
    }

    /// Whether the directory at `path` (links followed) is still this one: false once it was
    /// removed, or replaced by another (a new directory, a remount). A look that fails for
    /// another reason (no memory, no permission for now) tells nothing: true.
    pub fn still_at(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(path) {
            Ok(m) => m.dev() == self.st.st_dev && m.ino() == self.st.st_ino,
            Err(e) => !matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)),
        }
    }

    /// Permission bits when the directory was opened.
    pub fn mode(&self) -> u32 {
        self.st.st_mode & 0o7777
    }

    /// Nobody but root or us can add, remove or replace entries here.
    pub fn trusted(&self) -> bool {
        (self.st.st_uid == 0 || self.st.st_uid == geteuid().as_raw())
            && self.st.st_mode & 0o022 == 0
    }

    /// Opens the subdirectory `name` (never through a link), creating it with `mode` if asked.
    pub fn sub(&self, name: &str, create: Option<u32>) -> Result<Dir> {
        let here = self.path.join(name);
        loop {
            match open_dir(Some(self.fd.as_raw_fd()), OsStr::new(name)) {
                Ok(fd) => return Dir::from_fd(fd, &here),
                Err(Errno::ENOENT) if create.is_some() => {
                    let mode = Mode::from_bits_truncate(create.unwrap_or(0o755));
                    match mkdirat(Some(self.fd.as_raw_fd()), name, mode) {
                        Ok(()) | Err(Errno::EEXIST) => continue,
                        Err(e) => {
                            return Err(Error::io_path("creating directory", &here, e.into()))
                        }
                    }
                }
                Err(Errno::ELOOP) | Err(Errno::ENOTDIR) => {
                    let what = self
                        .lstat(OsStr::new(name))
                        .map(|st| kind(&st))
                        .unwrap_or("not a directory");
                    return Err(Error::Unsafe(format!(
                        "\"{}\" is {what}, not a directory: refusing it (remove it)",
                        here.shown()
                    )));
                }
                Err(e) => return Err(Error::io_path("opening directory", &here, e.into())),
            }
        }
    }

    /// Opens the unix socket `name` here as an `O_PATH` descriptor, never through a link, and
    /// only if it is owned by the directory's owner, root or us: connecting through
    /// `/proc/self/fd/N` of it then reaches that socket, whatever is renamed over the path
    /// meanwhile.
    pub fn socket(&self, name: &str) -> Result<OwnedFd> {
        let here = self.path.join(name);
        let flags = OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = nix::fcntl::openat(Some(self.fd.as_raw_fd()), name, flags, Mode::empty())
            .map_err(|e| Error::io_path("opening", &here, e.into()))?;
        // SAFETY: openat just returned this descriptor and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let st = fstat(fd.as_raw_fd()).map_err(|e| Error::io_path("checking", &here, e.into()))?;
        if !is(&st, SFlag::S_IFSOCK) {
            return Err(Error::Unsafe(format!(
                "\"{}\" is {}, not a socket: ignoring it",
                here.shown(),
                kind(&st)
            )));
        }
        if ![self.st.st_uid, 0, geteuid().as_raw()].contains(&st.st_uid) {
            return Err(Error::Unsafe(format!(
                "\"{}\" is owned by uid {}, not by the owner of its directory: ignoring it",
                here.shown(),
                st.st_uid
            )));
        }
        Ok(fd)
    }
}

impl AsRawFd for Dir {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Dir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Whether [`Dir::create`] could make what is missing of `path`, judged without making
/// anything (`restart` asks before it stops the running worker): the nearest part of the path
/// that exists must be a directory, on a filesystem mounted writable, that we may write in.
/// Said in the words the start would fail with.
pub fn could_create(path: &Path) -> Result<()> {
    let abs = std::path::absolute(path).map_err(|e| Error::io_path("resolving", path, e))?;
    let mut at = abs.as_path();
    loop {
        match std::fs::metadata(at) {
            Ok(m) if m.is_dir() => break,
            Ok(_) => {
                let e = std::io::Error::from_raw_os_error(libc::ENOTDIR);
                return Err(Error::io_path("creating directory", &abs, e));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match at.parent() {
                Some(up) => at = up,
                None => return Ok(()),
            },
            Err(e) => return Err(Error::io_path("creating directory", &abs, e)),
        }
    }
    if at == abs {
        return Ok(());
    }
    let read_only = nix::sys::statvfs::statvfs(at)
        .is_ok_and(|v| v.flags().contains(nix::sys::statvfs::FsFlags::ST_RDONLY));
    let refused = match read_only {
        true => Some(Errno::EROFS),
        false => {
            let how = nix::unistd::AccessFlags::W_OK | nix::unistd::AccessFlags::X_OK;
            nix::unistd::access(at, how).err()
        }
    };
    match refused {
        Some(e) => Err(Error::io_path("creating directory", &abs, e.into())),
        None => Ok(()),
    }
}

/// Opens `name` in `dir` as a directory, never through a link. Search permission is all a
/// walk needs, so a directory we may search but not read is opened as a path.
fn open_dir(dir: Option<RawFd>, name: &OsStr) -> std::result::Result<OwnedFd, Errno> {
    let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    match openat(dir, name, flags | OFlag::O_RDONLY, Mode::empty()) {
        Ok(fd) => Ok(owned(fd)),
        Err(Errno::EACCES) => openat(dir, name, flags | OFlag::O_PATH, Mode::empty()).map(owned),
        Err(e) => Err(e),
    }
}

fn components(path: &Path) -> VecDeque<OsString> {
    path.components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            _ => None,
        })
        .filter(|c| !c.as_bytes().is_empty())
        .collect()
}

/// flock(2) on a descriptor we keep: the one way gearshift locks a file (the pidfile, the
/// spool's consumer lock, a job file being written). The lock lives as long as the open file
/// description (nix's `Flock` wrapper unlocks on drop, which a lock handed across execve must
/// not).
pub fn flock(fd: RawFd, op: i32) -> std::result::Result<(), Errno> {
    // SAFETY: flock takes a descriptor and an operation and touches no memory of ours; an
    // invalid descriptor is reported as EBADF.
    let r = unsafe { libc::flock(fd, op) };
    if r == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn links_are_followed_only_in_trusted_directories() {
        let d = crate::testutil::tempdir("safefs", "links");
        std::fs::create_dir(d.join("real")).unwrap();
        std::os::unix::fs::symlink("real", d.join("trusted-link")).unwrap();
        let opened = Dir::open(&d.join("trusted-link")).unwrap();
        assert!(opened.path().ends_with("real"));
        // The same link in a directory others can write is refused.
        std::fs::create_dir(d.join("open")).unwrap();
        std::fs::set_permissions(d.join("open"), std::fs::Permissions::from_mode(0o777)).unwrap();
        std::os::unix::fs::symlink("../real", d.join("open/link")).unwrap();
        let err = Dir::open(&d.join("open/link")).unwrap_err().to_string();
        assert!(
            err.contains("symbolic link") && err.contains("open/link"),
            "{err}"
        );
        // `..` and absolute link targets resolve.
        std::os::unix::fs::symlink(d.join("real"), d.join("abs")).unwrap();
        assert!(Dir::open(&d.join("real/../abs"))
            .unwrap()
            .path()
            .ends_with("real"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A directory opened once is told apart from what is at its path later: itself, nothing
    /// (removed), or another directory put in its place.
    #[test]
    fn a_directory_knows_whether_it_is_still_at_its_path() {
        let d = crate::testutil::tempdir("safefs", "still");
        let path = d.join("spool");
        let dir = Dir::create(&path, 0o750).unwrap();
        assert!(dir.still_at(&path));
        std::fs::rename(&path, d.join("old")).unwrap();
        assert!(!dir.still_at(&path), "removed");
        std::fs::create_dir(&path).unwrap();
        assert!(!dir.still_at(&path), "another in its place");
        assert!(dir.still_at(&d.join("old")));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
