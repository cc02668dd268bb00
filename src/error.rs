//! The crate's error type: every variant says which file, server or job it is about, so a
//! message can be acted on without reading the source.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use crate::text::ShowPath;

/// Everything that can go wrong outside a job (a failing job is a [`crate::JobError`], not this).
#[derive(Debug)]
pub enum Error {
    /// The configuration is malformed or invalid; the message carries `file:line:col`.
    Config(String),
    /// An I/O operation failed; `about` says on what, e.g. `creating spool directory "/x"`.
    Io {
        /// What we were doing.
        about: String,
        /// The error the system returned.
        source: io::Error,
    },
    /// Another instance holds the lock (pidfile or spool).
    Locked {
        /// The locked file.
        what: PathBuf,
        /// The holder, when known.
        pid: Option<i32>,
    },
    /// The worker is not running (for `status`, `reload`, `stop`).
    NotRunning,
    /// Waiting for something took longer than allowed (the CLI's exit code 5, "not done yet").
    TimedOut(String),
    /// The worker's state cannot be told: the config cannot say where it is, or the pidfile's
    /// lock holder cannot be proven to be it (the CLI's exit code 4, "unknown").
    Unknown(String),
    /// The peer or the job is gone (a connection lost, a job the server took back): nothing to
    /// retry and nothing wrong here; the caller moves on.
    Gone(String),
    /// A file, directory or socket refused because it is not what it must be or someone else
    /// could change it (a link, a foreign owner, a group-writable directory): fix it, then retry.
    Unsafe(String),
    /// Data that cannot be used as it is: a corrupt record, a file that cannot be a job, a
    /// certificate that does not parse. Retrying the same data fails the same way.
    Invalid(String),
    /// A peer broke its protocol or answered with an error (a Gearman server, a ZeroMQ peer,
    /// the worker's status socket).
    Peer(String),
    /// An internal failure: a lock poisoned, a thread that died. Logged; the caller restarts or
    /// stops what it was doing.
    Internal(String),
    /// Anything else that has a complete, user-facing message.
    Msg(String),
}

/// How a caller takes an error, decided by its type (never by whether an errno is present).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    /// Storage or resources fail now and may come back (a full disk, no descriptors): retry
    /// later, keep what is held.
    Transient,
    /// This operation cannot succeed (bad data, a refused request): fail it, report it.
    Permanent,
    /// The peer or the job is gone: nothing to retry, move on.
    Gone,
}

impl Error {
    /// Wraps an I/O error with what we were doing.
    pub fn io(about: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            about: about.into(),
            source,
        }
    }

    /// Wraps an I/O error about a path: `"{verb} \"{path}\""`.
    pub fn io_path(verb: &str, path: &Path, source: io::Error) -> Error {
        Error::Io {
            about: format!("{verb} \"{}\"", path.shown()),
            source,
        }
    }
}

impl Error {
    /// The error's tier: how a caller takes it (retry, fail, move on).
    pub fn tier(&self) -> Tier {
        match self {
            Error::Gone(_) => Tier::Gone,
            Error::Io { source, .. } if source.raw_os_error().is_some_and(is_transient_errno) => {
                Tier::Transient
            }
            _ => Tier::Permanent,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Config(msg)
            | Error::Msg(msg)
            | Error::Unsafe(msg)
            | Error::Invalid(msg)
            | Error::Peer(msg)
            | Error::Internal(msg)
            | Error::TimedOut(msg)
            | Error::Gone(msg)
            | Error::Unknown(msg) => f.write_str(msg),
            Error::Io { about, source } => {
                write!(f, "{about}: {source}")?;
                match source.raw_os_error() {
                    Some(libc::ENOSPC) => {
                        f.write_str(" (the file system is full: free some space)")
                    }
                    Some(libc::EDQUOT) => f.write_str(" (over the disk quota)"),
                    Some(libc::EMFILE) => {
                        f.write_str(" (out of file descriptors: raise ulimit -n)")
                    }
                    _ => Ok(()),
                }
            }
            Error::Locked {
                what,
                pid: Some(pid),
            } => {
                write!(
                    f,
                    "already running (pid {pid}): \"{}\" is locked",
                    what.shown()
                )
            }
            Error::Locked { what, pid: None } => {
                write!(f, "already running: \"{}\" is locked", what.shown())
            }
            Error::NotRunning => f.write_str("not running"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The OS errors that mean "storage or resources fail now, and may come back": a full disk or
/// quota, a file size limit (a rotated log or a new segment is small again), an I/O error, a
/// read-only remount, no descriptors, no memory. An operation that meets one is retried later;
/// it says nothing about the file or job at hand.
pub fn is_transient_errno(errno: i32) -> bool {
    [
        libc::ENOSPC,
        libc::EFBIG,
        libc::EDQUOT,
        libc::EIO,
        libc::EROFS,
        libc::EMFILE,
        libc::ENFILE,
        libc::ENOMEM,
        libc::EAGAIN,
    ]
    .contains(&errno)
}

/// Shorthand for results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds "while doing what" to `io::Result`s.
pub trait IoContext<T> {
    fn at(self, verb: &str, path: &Path) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn at(self, verb: &str, path: &Path) -> Result<T> {
        self.map_err(|source| Error::io_path(verb, path, source))
    }
}
