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
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{fcntl, openat, FcntlArg, OFlag};
use nix::sys::stat::{fstat, mkdirat, FileStat, Mode, SFlag};
use nix::unistd::{fchown, geteuid, Gid, Uid};

use crate::error::{Error, Result};

/// How many symbolic links one walk may follow (the kernel's own limit).
const MAX_LINKS: usize = 40;

/// An open directory, with what `fstat` said of it when it was opened.
#[derive(Debug)]
pub struct Dir {
    fd: OwnedFd,
    path: PathBuf,
    st: FileStat,
}

/// How to open a file in a [`Dir`].
#[derive(Debug, Clone, Copy)]
pub struct Open {
    /// Open for writing (appending when `append`), else read-only.
    pub write: bool,
    pub append: bool,
    /// Create the file with this mode when it does not exist.
    pub create: Option<u32>,
}

impl Open {
    /// Read an existing file.
    pub const READ: Open = Open {
        write: false,
        append: false,
        create: None,
    };
}

/// An opened file, and whether this open created it.
pub struct Opened {
    pub file: File,
    pub created: bool,
}

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful open(2)-family call in this module, and
    // nothing else owns it.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn kind(st: &FileStat) -> &'static str {
    match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
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
                            here.display(),
                            cur.path.display()
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

    fn is_link(&self, name: &OsStr) -> bool {
        nix::sys::stat::fstatat(
            Some(self.fd.as_raw_fd()),
            name,
            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
        )
        .is_ok_and(|st| is(&st, SFlag::S_IFLNK))
    }

    /// The directory's path, as walked.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The owner's uid and gid when the directory was opened.
    pub fn owner(&self) -> (Uid, Gid) {
        (Uid::from_raw(self.st.st_uid), Gid::from_raw(self.st.st_gid))
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
                    let what = nix::sys::stat::fstatat(
                        Some(self.fd.as_raw_fd()),
                        name,
                        nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                    )
                    .map(|st| kind(&st))
                    .unwrap_or("not a directory");
                    return Err(Error::Unsafe(format!(
                        "\"{}\" is {what}, not a directory: refusing it (remove it)",
                        here.display()
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
                here.display(),
                kind(&st)
            )));
        }
        if ![self.st.st_uid, 0, geteuid().as_raw()].contains(&st.st_uid) {
            return Err(Error::Unsafe(format!(
                "\"{}\" is owned by uid {}, not by the owner of its directory: ignoring it",
                here.display(),
                st.st_uid
            )));
        }
        Ok(fd)
    }

    /// Opens the file `name` here: never through a link, never blocking on a FIFO; only a
    /// regular file with one link, and in a directory others can write, only one owned by the
    /// directory's owner or by us.
    pub fn file(&self, name: &str, how: Open) -> Result<Opened> {
        let path = self.path.join(name);
        let mut flags = OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
        flags |= match (how.write, how.append) {
            (false, _) => OFlag::O_RDONLY,
            (true, false) => OFlag::O_RDWR,
            (true, true) => OFlag::O_WRONLY | OFlag::O_APPEND,
        };
        let dirfd = Some(self.fd.as_raw_fd());
        let mut created = false;
        let fd = match how.create {
            Some(mode) => match openat(
                dirfd,
                name,
                flags | OFlag::O_CREAT | OFlag::O_EXCL,
                Mode::from_bits_truncate(mode),
            ) {
                Ok(fd) => {
                    created = true;
                    Ok(fd)
                }
                Err(Errno::EEXIST) => openat(dirfd, name, flags, Mode::empty()),
                Err(e) => Err(e),
            },
            None => openat(dirfd, name, flags, Mode::empty()),
        };
        let fd = match fd {
            Ok(fd) => owned(fd),
            Err(Errno::ELOOP) => {
                return Err(Error::Unsafe(format!(
                    "\"{}\" is a symbolic link: refusing to follow it (remove it)",
                    path.display()
                )))
            }
            Err(e) => {
                // A FIFO opened for writing with nobody reading says ENXIO: say what it is.
                let st =
                    nix::sys::stat::fstatat(dirfd, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW);
                if let Some(st) = st.ok().filter(|st| !is(st, SFlag::S_IFREG)) {
                    return Err(Error::Unsafe(format!(
                        "\"{}\" is not a regular file (it is {}): refusing it (remove it)",
                        path.display(),
                        kind(&st)
                    )));
                }
                return Err(Error::io_path("opening", &path, e.into()));
            }
        };
        let st = fstat(fd.as_raw_fd()).map_err(|e| Error::io_path("checking", &path, e.into()))?;
        if !is(&st, SFlag::S_IFREG) {
            return Err(Error::Unsafe(format!(
                "\"{}\" is not a regular file (it is {}): refusing it (remove it)",
                path.display(),
                kind(&st)
            )));
        }
        if !created {
            if st.st_nlink != 1 {
                return Err(Error::Unsafe(format!(
                    "\"{}\" has {} hard links: refusing it (remove it)",
                    path.display(),
                    st.st_nlink
                )));
            }
            let ok_owner = st.st_uid == geteuid().as_raw() || st.st_uid == self.st.st_uid;
            if !self.trusted() && !ok_owner {
                return Err(Error::Unsafe(format!(
                    "\"{}\" is owned by uid {}, in a directory owned by uid {}: refusing it (remove it)",
                    path.display(),
                    st.st_uid,
                    self.st.st_uid
                )));
            }
        }
        // Back to blocking I/O for the caller (the open itself could not block).
        let _ = fcntl(
            fd.as_raw_fd(),
            FcntlArg::F_SETFL(flags & !OFlag::O_NONBLOCK),
        );
        Ok(Opened {
            file: File::from(fd),
            created,
        })
    }

    /// Reads the regular file `name` if it exists, refusing one larger than `max` bytes.
    pub fn read_small(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let f = match self.file(name, Open::READ) {
            Ok(o) => o.file,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        match read_bounded(f, max)
            .map_err(|e| Error::io_path("reading", &self.path.join(name), e))?
        {
            Some(buf) => Ok(Some(buf)),
            None => Err(Error::Invalid(format!(
                "\"{}\" is over {max} bytes: refusing it",
                self.path.join(name).display()
            ))),
        }
    }

    /// Creates the new file `name` for writing (failing if anything is there, a link included).
    pub fn create_new(&self, name: &str, mode: u32) -> Result<File> {
        let flags = OFlag::O_CLOEXEC
            | OFlag::O_NOFOLLOW
            | OFlag::O_WRONLY
            | OFlag::O_CREAT
            | OFlag::O_EXCL
            | OFlag::O_NOCTTY;
        openat(
            Some(self.fd.as_raw_fd()),
            name,
            flags,
            Mode::from_bits_truncate(mode),
        )
        .map(|fd| File::from(owned(fd)))
        .map_err(|e| Error::io_path("creating", &self.path.join(name), e.into()))
    }

    /// Moves the entry `from` here to `to` in `dest` (an atomic rename(2), never following links).
    pub fn rename_into(&self, from: &str, dest: &Dir, to: &str) -> std::io::Result<()> {
        nix::fcntl::renameat(
            Some(self.fd.as_raw_fd()),
            from,
            Some(dest.fd.as_raw_fd()),
            to,
        )
        .map_err(std::io::Error::from)
    }

    /// fsync(2) of the directory itself (its entries are then durable).
    pub fn sync(&self) -> Result<()> {
        nix::unistd::fsync(self.fd.as_raw_fd())
            .map_err(|e| Error::io_path("syncing", &self.path, e.into()))
    }

    /// Removes the entry `name` (a file), if it is there.
    pub fn remove(&self, name: &str) -> Result<()> {
        match nix::unistd::unlinkat(
            Some(self.fd.as_raw_fd()),
            name,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        ) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(Error::io_path("removing", &self.path.join(name), e.into())),
        }
    }

    /// Renames `from` to `to`, both in this directory.
    pub fn rename(&self, from: &str, to: &str) -> Result<()> {
        let fd = Some(self.fd.as_raw_fd());
        nix::fcntl::renameat(fd, from, fd, to)
            .map_err(|e| Error::io_path("renaming", &self.path.join(from), e.into()))
    }

    /// Changes the directory's owner, through its descriptor.
    pub fn chown(&self, uid: Uid, gid: Gid) -> Result<()> {
        fchown(self.fd.as_raw_fd(), Some(uid), Some(gid))
            .map_err(|e| Error::io_path("changing the owner of", &self.path, e.into()))
    }

    /// Changes the directory's mode, through its descriptor.
    pub fn chmod(&self, mode: u32) -> Result<()> {
        nix::sys::stat::fchmod(self.fd.as_raw_fd(), Mode::from_bits_truncate(mode))
            .map_err(|e| Error::io_path("changing the mode of", &self.path, e.into()))
    }
}

impl AsRawFd for Dir {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Changes a file's owner through its descriptor.
pub fn chown_file(file: &File, path: &Path, uid: Uid, gid: Gid) -> Result<()> {
    fchown(file.as_raw_fd(), Some(uid), Some(gid))
        .map_err(|e| Error::io_path("changing the owner of", path, e.into()))
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

/// Reads everything `r` yields if it is at most `max` bytes; None if there is more (the one
/// bounded reader: a file or descriptor from outside is never read unbounded).
pub fn read_bounded(r: impl Read, max: u64) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    r.take(max.saturating_add(1)).read_to_end(&mut buf)?;
    Ok((buf.len() as u64 <= max).then_some(buf))
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

    #[test]
    fn files_must_be_regular_unlinked_and_not_links() {
        let d = crate::testutil::tempdir("safefs", "files");
        let dir = Dir::create(&d.join("a/b"), 0o755).unwrap();
        let o = dir
            .file(
                "f",
                Open {
                    write: true,
                    append: true,
                    create: Some(0o640),
                },
            )
            .unwrap();
        assert!(o.created);
        std::os::unix::fs::symlink("f", d.join("a/b/link")).unwrap();
        let e = dir.file("link", Open::READ).err().unwrap().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        std::fs::hard_link(d.join("a/b/f"), d.join("a/b/hard")).unwrap();
        let e = dir.file("hard", Open::READ).err().unwrap().to_string();
        assert!(e.contains("hard links"), "{e}");
        nix::unistd::mkfifo(&d.join("a/b/fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        let e = dir.file("fifo", Open::READ).err().unwrap().to_string();
        assert!(e.contains("a FIFO"), "{e}");
        let e = dir.sub("f", None).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        assert_eq!(dir.read_small("missing", 10).unwrap(), None);
        std::fs::write(d.join("a/b/big"), [0u8; 11]).unwrap();
        assert!(dir.read_small("big", 10).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
