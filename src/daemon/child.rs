//! The supervisor's worker, its child: started as `run` with the signals it handles blocked, its
//! exit reported by a thread. The first one (a `start --supervise` waits for it) gets a ready
//! pipe of its own, as a daemon under `start` gets `start`'s: a worker that fails as it starts
//! writes its error there, and the supervisor says the worker's own words to `start` (it said
//! only "the worker exited with status 1 during start-up; see LOG", for a spool another worker
//! held or a port already bound, which `start` without a supervisor names).

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::error::{Error, Result};
use crate::status::records::{Info, SUPERVISOR_ENV};

/// How long [`Child::end_unserved`] waits after each signal.
const END_PATIENCE: Duration = Duration::from_secs(5);

/// The most of a worker's report read: its error, cut where the CLI cuts an error it prints.
const MAX_REPORT: usize = 16 << 10;

/// A worker the supervisor started.
pub(super) struct Child {
    pub(super) pid: u32,
    /// Its exit status, once it has exited.
    pub(super) exited: Receiver<ExitStatus>,
    /// The read end of its ready pipe (non-blocking), if it was given one.
    report: Option<File>,
}

impl Child {
    /// Starts the worker, `exe args` (`run`), with a ready pipe of its own if `report`.
    pub(super) fn spawn(
        (exe, args): (&Path, [OsString; 5]),
        info: &Info,
        report: bool,
    ) -> Result<Child> {
        let json = serde_json::to_string(info).map_err(|e| Error::Msg(e.to_string()))?;
        let mut cmd = Command::new(exe);
        if crate::ops::logging::is_json() {
            // JSON from the worker's first line, a start-up error included.
            cmd.env(crate::ops::logging::ENV_FORMAT, "json");
        }
        let pipe = report.then(ready_pipe).transpose()?;
        let keep = pipe.as_ref().map(|(_, w)| w.as_raw_fd());
        if let Some(fd) = keep {
            cmd.env(crate::restart::reexec::ENV_READY, fd.to_string());
        }
        // The worker starts with the signals it handles blocked (the mask crosses exec): what
        // this supervisor forwards in its first moments waits for its handlers, where a HUP or
        // USR1 took the default action before it could block them, and ended it.
        let handled = crate::ops::sigstate::handled_set();
        // SAFETY: the closure runs in the forked child before exec and only calls
        // pthread_sigmask and fcntl, which are async-signal-safe, on a set built and a
        // descriptor opened before the fork (its close-on-exec cleared in the child alone).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                nix::sys::signal::pthread_sigmask(
                    nix::sys::signal::SigmaskHow::SIG_BLOCK,
                    Some(&handled),
                    None,
                )
                .map_err(std::io::Error::from)?;
                if let Some(fd) = keep {
                    if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        cmd.args(args)
            .env(SUPERVISOR_ENV, json)
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let mut child = crate::jobs::exact::exactly(&mut cmd, crate::jobs::exact::Env::Inherited)
            .and_then(|()| cmd.spawn())
            .map_err(|e| Error::io_path("starting", exe, e))?;
        // The write end is the worker's alone now: a worker gone is an end of file.
        let report = pipe.map(|(r, _)| File::from(r));
        let pid = child.id();
        let (tx, exited) = bounded(1);
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || {
                if let Ok(status) = child.wait() {
                    let _ = tx.send(status);
                }
            })
            .map_err(|e| Error::io("spawning the reaper thread", e))?;
        Ok(Child {
            pid,
            exited,
            report,
        })
    }

    /// The error the worker wrote on its ready pipe before it exited (`error MESSAGE`), if it
    /// did: the first line, at most [`MAX_REPORT`] bytes, read without waiting (a descendant
    /// that kept the pipe cannot hold the supervisor). Text from the worker's user: the caller
    /// escapes it where it is shown.
    pub(super) fn reported_error(&self) -> Option<String> {
        let mut bytes = Vec::new();
        let _ = (self.report.as_ref()?)
            .take(MAX_REPORT as u64)
            .read_to_end(&mut bytes);
        let text = String::from_utf8_lossy(&bytes);
        let line = text.lines().next()?;
        line.strip_prefix("error ").map(str::to_string)
    }

    /// The worker serves: what it writes on its ready pipe from now on is read by nobody (a
    /// write finds the pipe closed, where it would have filled it).
    pub(super) fn served(&mut self) {
        self.report = None;
    }

    /// Ends a worker the supervisor gave up waiting for: TERM (it stops once its handlers
    /// run), then KILL after [`END_PATIENCE`] (a start-up stalled with its signals still
    /// blocked).
    pub(super) fn end_unserved(&self) {
        let worker = Pid::from_raw(self.pid as i32);
        if self.exited.try_recv().is_ok() {
            return;
        }
        let _ = kill(worker, Signal::SIGTERM);
        if self.exited.recv_timeout(END_PATIENCE).is_err() {
            let _ = kill(worker, Signal::SIGKILL);
            let _ = self.exited.recv_timeout(END_PATIENCE);
        }
    }
}

/// (read end, non-blocking; write end), both close-on-exec.
fn ready_pipe() -> Result<(OwnedFd, OwnedFd)> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| Error::io("creating the worker's ready pipe", e.into()))?;
    fcntl(r.as_raw_fd(), FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
        .map_err(|e| Error::io("creating the worker's ready pipe", e.into()))?;
    Ok((r, w))
}

/// Ended by a stop signal, which a worker handles: a forced stop (`signals::die_by`), or one
/// before its handlers were in place. Someone asked it to stop; it is not started again.
pub(super) fn stopped(status: ExitStatus) -> bool {
    status
        .signal()
        .and_then(|n| Signal::try_from(n).ok())
        .is_some_and(crate::ops::signals::is_stop)
}

pub(super) fn describe(status: Option<ExitStatus>) -> String {
    match status {
        None => "vanished".into(),
        Some(s) => match (s.code(), s.signal()) {
            (Some(c), _) => format!("exited with status {c}"),
            (None, Some(sig)) => {
                let name = Signal::try_from(sig)
                    .map_or_else(|_| sig.to_string(), |s| s.as_str().to_string());
                format!("was killed by {name}")
            }
            _ => format!("ended ({s})"),
        },
    }
}
