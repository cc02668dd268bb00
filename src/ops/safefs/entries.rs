//! Files in a [`Dir`]: opened, read (bounded), listed, created, moved and removed relative to
//! its descriptor, never through a link.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{fcntl, openat, FcntlArg, OFlag};
use nix::sys::stat::{fstat, FileStat, Mode, SFlag};
use nix::unistd::{fchown, geteuid, Gid, Uid};

use super::{is, kind, owned, Dir};
use crate::error::{Error, Result};
use crate::text::ShowPath;

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

impl Dir {
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
                    path.shown()
                )))
            }
            Err(e) => {
                // A FIFO opened for writing with nobody reading says ENXIO: say what it is.
                let st = self.lstat(OsStr::new(name));
                if let Some(st) = st.ok().filter(|st| !is(st, SFlag::S_IFREG)) {
                    return Err(Error::Unsafe(format!(
                        "\"{}\" is not a regular file (it is {}): refusing it (remove it)",
                        path.shown(),
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
                path.shown(),
                kind(&st)
            )));
        }
        if !created {
            if st.st_nlink != 1 {
                return Err(Error::Unsafe(format!(
                    "\"{}\" has {} hard links: refusing it (remove it)",
                    path.shown(),
                    st.st_nlink
                )));
            }
            let ok_owner = st.st_uid == geteuid().as_raw() || st.st_uid == self.st.st_uid;
            if !self.trusted() && !ok_owner {
                return Err(Error::Unsafe(format!(
                    "\"{}\" is owned by uid {}, in a directory owned by uid {}: refusing it (remove it)",
                    path.shown(),
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

    /// Reads the regular file `name` if it exists, refusing one larger than `max` bytes (by
    /// its size before reading anything, and by what it yields if it grows meanwhile).
    pub fn read_small(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>> {
        let f = match self.file(name, Open::READ) {
            Ok(o) => o.file,
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        };
        let size = f
            .metadata()
            .map_err(|e| Error::io_path("checking", &self.path.join(name), e))?
            .len();
        if size > max {
            return Err(Error::Invalid(format!(
                "\"{}\" is {size} bytes, over {max}: refusing it",
                self.path.join(name).shown()
            )));
        }
        match read_bounded(f, max)
            .map_err(|e| Error::io_path("reading", &self.path.join(name), e))?
        {
            Some(buf) => Ok(Some(buf)),
            None => Err(Error::Invalid(format!(
                "\"{}\" is over {max} bytes: refusing it",
                self.path.join(name).shown()
            ))),
        }
    }

    /// Whether anything (a link included, never followed) is named `name` here.
    pub fn has(&self, name: &str) -> bool {
        self.lstat(OsStr::new(name)).is_ok()
    }

    /// Every name here (dot files too, but `.` and `..`), read through this descriptor.
    pub fn names(&self) -> Result<Vec<OsString>> {
        let err = |e: Errno| Error::io_path("listing", &self.path, e.into());
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW;
        let mut list = nix::dir::Dir::openat(Some(self.fd.as_raw_fd()), ".", flags, Mode::empty())
            .map_err(err)?;
        let mut out = Vec::new();
        for entry in list.iter() {
            let name = entry.map_err(err)?.file_name().to_owned();
            let name = OsString::from_vec(name.into_bytes());
            if name != "." && name != ".." {
                out.push(name);
            }
        }
        Ok(out)
    }

    /// The first name here (dot files too) that `ours` does not claim: what a directory root is
    /// about to give away or open up holds that nobody made for it.
    pub fn first_name_not(&self, ours: impl Fn(&str) -> bool) -> Result<Option<OsString>> {
        Ok(self
            .names()?
            .into_iter()
            .find(|n| !n.to_str().is_some_and(&ours)))
    }

    /// The names here, but dot files, each with its entry's type and modification time (not
    /// through links), read through this descriptor: whatever is renamed over the path
    /// meanwhile is not what is listed.
    pub fn entries(&self) -> Result<Vec<(OsString, FileStat)>> {
        let err = |e: Errno| Error::io_path("listing", &self.path, e.into());
        let mut out = Vec::new();
        for name in self.names()? {
            if name.as_encoded_bytes().starts_with(b".") {
                continue;
            }
            match self.lstat(&name) {
                Ok(st) => out.push((name, st)),
                Err(Errno::ENOENT) => {} // gone since listed
                Err(e) => return Err(err(e)),
            }
        }
        Ok(out)
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

/// Changes a file's owner through its descriptor.
pub fn chown_file(file: &File, path: &Path, uid: Uid, gid: Gid) -> Result<()> {
    fchown(file.as_raw_fd(), Some(uid), Some(gid))
        .map_err(|e| Error::io_path("changing the owner of", path, e.into()))
}
/// Opens the file at `path` for reading, following links (a config or a job may point into a
/// versioned directory) but never blocking: only a regular file, as fstat sees it on the open
/// descriptor. A FIFO (whose open for reading waits for a writer for ever) or a device in its
/// place is refused (`Error::Unsafe`); an I/O error is `Error::Io`, opening `what`.
pub fn open_regular(path: &Path, what: &str) -> Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| Error::io_path(what, path, e))?;
    let st = fstat(file.as_raw_fd()).map_err(|e| Error::io_path(what, path, e.into()))?;
    if !is(&st, SFlag::S_IFREG) {
        return Err(Error::Unsafe(format!(
            "\"{}\" is not a regular file (it is {}): refusing it",
            path.shown(),
            kind(&st)
        )));
    }
    // Back to blocking reads (a regular file's never wait anyway).
    let _ = fcntl(file.as_raw_fd(), FcntlArg::F_SETFL(OFlag::empty()));
    Ok(file)
}

/// Reads everything `r` yields if it is at most `max` bytes; None if there is more (the one
/// bounded reader: a file or descriptor from outside is never read unbounded).
pub fn read_bounded(r: impl Read, max: u64) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    r.take(max.saturating_add(1)).read_to_end(&mut buf)?;
    Ok((buf.len() as u64 <= max).then_some(buf))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
        let e = dir.read_small("big", 10).unwrap_err().to_string();
        assert!(e.contains("is 11 bytes, over 10"), "{e}");
        // Listed through the descriptor, links not followed; `has` sees a link as an entry.
        std::fs::write(d.join("a/b/.hidden"), b"").unwrap();
        let mut names: Vec<_> = dir
            .entries()
            .unwrap()
            .into_iter()
            .map(|(n, st)| (n.into_string().unwrap(), super::super::is_file(&st)))
            .collect();
        names.sort();
        let want = [
            ("big", true),
            ("f", true),
            ("fifo", false),
            ("hard", true),
            ("link", false),
        ];
        assert_eq!(names, want.map(|(n, f)| (n.to_string(), f)));
        assert!(dir.has("link") && dir.has("f") && !dir.has("missing"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A path-opened file (a config, a job): links followed, but only a regular file, and a
    /// FIFO nobody writes refused at once instead of waited on.
    #[test]
    fn open_regular_follows_links_and_never_waits_on_a_fifo() {
        let d = crate::testutil::tempdir("safefs", "regular");
        std::fs::write(d.join("real"), "x").unwrap();
        std::os::unix::fs::symlink(d.join("real"), d.join("link")).unwrap();
        assert!(open_regular(&d.join("link"), "reading").is_ok());
        nix::unistd::mkfifo(&d.join("fifo"), Mode::from_bits_truncate(0o600)).unwrap();
        let e = open_regular(&d.join("fifo"), "reading").err().unwrap();
        assert!(
            matches!(&e, Error::Unsafe(m) if m.contains("a FIFO")),
            "{e}"
        );
        let e = open_regular(Path::new("/dev/null"), "reading")
            .err()
            .unwrap();
        assert!(e.to_string().contains("a character device"), "{e}");
        let e = open_regular(&d.join("missing"), "reading").err().unwrap();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
