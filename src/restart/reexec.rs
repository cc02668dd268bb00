//! Re-exec in place: the new image replaces this one with the same PID.
//!
//! Architecture invariant: `execve` is called only in this module, only from the main thread,
//! and only after every worker thread has been joined (no job is running).
//!
//! What crosses the exec: the pidfile descriptor (its lock) and the other handed-over
//! descriptors, and one memfd with the carried state and parts (`parcel`). The path we exec is the absolute path
//! the program was first started as, carried in the environment too: `/proc/self/exe` would
//! name the old, deleted inode after a deploy replaced the binary. The new environment is built
//! explicitly (`std::env::set_var` is unsound once threads exist), and we call execve directly
//! because `std::process::Command` would reset the signal mask we rely on.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use crate::error::Error;
use crate::ops::handover::{self, ENV_PREFIX};
use crate::restart::carried::Inherited;
use crate::restart::parcel::{self, Parts};
use crate::text::ShowPath;

const ENV_STATE: &str = "GEARSHIFT_INHERIT_STATE";
const ENV_EXE: &str = "GEARSHIFT_INHERIT_EXE";

/// How this image came to be.
pub struct Boot {
    /// Absolute path to exec for the next generation.
    pub exe: PathBuf,
    /// Our argv, passed unchanged to the next generation.
    pub argv: Vec<OsString>,
    /// Set when we were re-exec'd by a previous generation.
    pub inherited: Option<Inherited>,
    /// The parts it handed over beside the state.
    pub parts: Parts,
}

impl Boot {
    /// Reads what a previous generation left in the environment, or resolves the executable's
    /// path on a first start (before anything could change the working directory).
    pub fn detect() -> Boot {
        let argv: Vec<OsString> = std::env::args_os().collect();
        let (inherited, parts) = match carried() {
            Some((i, p)) => (Some(i), p),
            None => (None, Parts::default()),
        };
        let exe = match (&inherited, std::env::var_os(ENV_EXE)) {
            (Some(_), Some(exe)) => PathBuf::from(exe),
            _ => first_start_exe(argv.first().map(OsString::as_os_str)),
        };
        Boot {
            exe,
            argv,
            inherited,
            parts,
        }
    }
}

/// What a previous generation handed over: the parcel, else the earlier form (the state in the
/// environment, each part in its own memfd).
fn carried() -> Option<(Inherited, Parts)> {
    if let Ok(fd) = std::env::var(parcel::ENV_FD) {
        return fd.parse().ok().and_then(parcel::read);
    }
    let text = std::env::var(ENV_STATE).ok()?;
    match serde_json::from_str::<Inherited>(&text) {
        Ok(i) => {
            let parts = parcel::legacy_parts(&i);
            Some((i, parts))
        }
        Err(e) => {
            log::warn!("ignoring unreadable {ENV_STATE} ({e}); starting as generation 1");
            None
        }
    }
}

/// The absolute path this program was started as: `argv[0]` made absolute, or looked up in PATH;
/// `/proc/self/exe` only as a last resort.
pub fn first_start_exe(argv0: Option<&OsStr>) -> PathBuf {
    if let Some(a) = argv0.filter(|a| !a.is_empty()) {
        let p = Path::new(a);
        if a.as_bytes().contains(&b'/') {
            if let Ok(abs) = std::path::absolute(p) {
                return abs;
            }
        } else if let Some(path) = std::env::var_os("PATH") {
            for dir in std::env::split_paths(&path) {
                let candidate = dir.join(p);
                if candidate.is_file() {
                    if let Ok(abs) = std::path::absolute(&candidate) {
                        return abs;
                    }
                }
            }
        }
    }
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"))
}

/// Replaces this process image with `exe argv`, carrying `state` and `parts` in the parcel.
/// Returns only on failure. The caller has joined the worker threads, blocked signals and
/// cleared FD_CLOEXEC on the descriptors `state` names.
/// `carry` is the path the next generation should consider its own (and watch for deploys):
/// the first-start path, even when `exe` is `/proc/self/exe`.
pub fn exec(
    exe: &Path,
    carry: &Path,
    argv: &[OsString],
    state: &Inherited,
    parts: &Parts,
) -> Error {
    use std::os::fd::AsFd;
    // A fault-injection build (tests only): every exec fails while the file this variable
    // names exists, as an execve refused for want of memory would.
    #[cfg(gearshift_faults)]
    if std::env::var_os("GEARSHIFT_FAULT_EXEC").is_some_and(|p| Path::new(&p).exists()) {
        return Error::io(
            "execve (injected fault)",
            std::io::Error::from_raw_os_error(libc::ENOMEM),
        );
    }
    let parcel = match parcel::write(state, parts) {
        Ok(fd) => fd,
        Err(e) => return e,
    };
    if let Err(e) = crate::ops::handover::keep(parcel.as_fd()) {
        return Error::io("keeping the restart parcel across exec", e);
    }
    // For an image of the earlier form (a deploy back to it): the state alone, so it keeps the
    // pidfile lock and counts on; it re-reads what the parts held.
    let legacy = Inherited {
        config_text: state.config_text.clone().filter(|t| t.len() <= 64 * 1024),
        ..state.clone()
    };
    let json = match serde_json::to_string(&legacy) {
        Ok(j) => j,
        Err(e) => return Error::Msg(format!("cannot encode restart state: {e}")),
    };
    exec_with(
        exe,
        argv,
        &[
            (parcel::ENV_FD, parcel.as_raw_fd().to_string().into()),
            (ENV_STATE, json.into()),
            (ENV_EXE, carry.as_os_str().to_owned()),
        ],
    )
}

/// The environment variable a rollback exec carries (the new image starts afresh otherwise).
pub const ENV_ROLLBACK: &str = "GEARSHIFT_INHERIT_ROLLBACK";

/// The environment variable naming the descriptor of a ready pipe: a waiting `gearshift
/// start`'s across a rollback exec, so the binary rolled back to tells it that it serves, or
/// a supervisor's, for its worker's start-up error.
pub(crate) const ENV_READY: &str = "GEARSHIFT_INHERIT_READY";

/// A fresh start of `exe` (no carried state) telling it about a rollback, and handing it the
/// ready pipe of the `start` that waits for this process (when there is one).
pub fn exec_rollback(
    exe: &Path,
    argv: &[OsString],
    rollback: &crate::status::records::Rollback,
    ready: Option<BorrowedFd<'_>>,
) -> Error {
    let json = match serde_json::to_string(rollback) {
        Ok(json) => json,
        Err(e) => return Error::Msg(format!("cannot encode rollback: {e}")),
    };
    let mut extra = vec![(ENV_ROLLBACK, OsString::from(json))];
    let ready = ready.filter(|fd| handover::keep(*fd).is_ok());
    if let Some(fd) = ready {
        extra.push((ENV_READY, fd.as_raw_fd().to_string().into()));
    }
    let failed = exec_with(exe, argv, &extra);
    if let Some(fd) = ready {
        handover::release(fd);
    }
    failed
}

/// The ready pipe handed over in the environment, by a rollback exec (see [`exec_rollback`]) or
/// by a supervisor to its worker: only a pipe, never stdin, stdout or stderr. Taken once, by
/// a fresh start's `run` (the variable goes no further: see [`exec_with`]).
pub fn ready_from_env() -> Option<std::fs::File> {
    let fd = std::env::var(ENV_READY)
        .ok()?
        .parse()
        .ok()
        .filter(|&fd| fd > 2)?;
    let owned = handover::adopt(Some(fd), |what| what.to_string_lossy().starts_with("pipe:"))?;
    Some(std::fs::File::from(owned))
}

/// The rollback a previous image performed, if this image was started by one.
pub fn rollback_from_env() -> Option<crate::status::records::Rollback> {
    serde_json::from_str(&std::env::var(ENV_ROLLBACK).ok()?).ok()
}

/// Replaces this process image with `exe argv` and this environment (less the variables a
/// previous image handed over) plus `extra`. Returns only on failure.
pub(crate) fn exec_with(exe: &Path, argv: &[OsString], extra: &[(&str, OsString)]) -> Error {
    let mut env: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !k.as_bytes().starts_with(ENV_PREFIX.as_bytes()))
        .collect();
    env.extend(extra.iter().map(|(k, v)| (OsString::from(k), v.clone())));
    if crate::ops::logging::is_json() {
        // JSON from the next image's first line (see `logging`).
        env.push((crate::ops::logging::ENV_FORMAT.into(), "json".into()));
    }

    let cstr = |bytes: Vec<u8>| {
        CString::new(bytes).map_err(|_| Error::Msg("NUL byte in argv or environment".into()))
    };
    let build = || -> Result<(CString, Vec<CString>, Vec<CString>), Error> {
        let path = cstr(exe.as_os_str().as_bytes().to_vec())?;
        let args = argv
            .iter()
            .map(|a| cstr(a.clone().into_vec()))
            .collect::<Result<Vec<_>, _>>()?;
        let vars = crate::jobs::exact::environment(env.iter().cloned())
            .map_err(|_| Error::Msg("NUL byte in argv or environment".into()))?;
        Ok((path, args, vars))
    };
    let (path, args, vars) = match build() {
        Ok(b) => b,
        Err(e) => return e,
    };
    match nix::unistd::execve(&path, &args, &vars) {
        Err(e) => Error::io(format!("execve \"{}\"", exe.shown()), e.into()),
        Ok(never) => match never {},
    }
}
