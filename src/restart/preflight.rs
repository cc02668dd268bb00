//! A deploy's pre-flight: `CANDIDATE -c CONFIG check`, run with a timeout and a clean
//! environment, its output read while it runs (the tail kept), in a process group of its own
//! that dies with the worker; the look before it at who could have written the file; and the
//! judging of a settled candidate on its helper thread (`judge`: its digest, compared with
//! what is known, then its pre-flight, which also says whether it takes up the spool's lock).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::restart::carried::Ident;
use crate::text::ShowPath;

/// Set in a pre-flight's environment: the candidate's `check` then says, as its last line,
/// [`TAKES_LOCKS`] if it takes up the source's lock descriptors an exec hands it
/// (`Inherited::lock_fds`). An older build says nothing, and is handed none: it would keep
/// them open, and find its own spool locked by them.
pub const PREFLIGHT_ENV: &str = "GEARSHIFT_PREFLIGHT";

/// What a candidate that takes up the handed lock descriptors says at its pre-flight.
pub const TAKES_LOCKS: &str = "pre-flight: this build takes up the spool's lock across the exec";

/// How long a pre-flight may take.
pub const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(10);

/// The process group of the pre-flight under way (0: none), killed when the worker exits or
/// re-execs: a hanging pre-flight and whatever it started never outlive the worker.
static PREFLIGHT_GROUP: AtomicI32 = AtomicI32::new(0);

/// How much of a pre-flight's output is kept (its tail) for the log and `status`.
const KEEP_OUTPUT: usize = 1000;

/// SIGKILLs the pre-flight under way, if any, with its whole process group.
pub fn kill_preflight() {
    let pgid = PREFLIGHT_GROUP.swap(0, Ordering::AcqRel);
    if pgid > 0 {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}

/// Why a pre-flight did not pass.
pub(super) enum NotPassed {
    /// The file is still open for writing somewhere (ETXTBSY): not whole yet, look again.
    Busy,
    /// It ran and said no (or could not run): the reason, with the tail of its output.
    Failed(String),
    /// It could not be started for want of a resource (processes, descriptors, memory): no
    /// verdict on the binary; tried again.
    Later(String),
}

/// Runs `candidate -c config check` with a timeout; Ok if it exits 0 (with whether it said
/// [`TAKES_LOCKS`]), else the tail of its output. Its stdout and stderr share one pipe, read while it runs (a pre-flight that prints
/// more than a pipe holds is not mistaken for a hanging one). It runs in a process group of its
/// own and dies with the thread that started it (`PR_SET_PDEATHSIG`), so neither it nor its
/// children outlive the worker.
pub(super) fn run(candidate: &Path, config: &Path) -> Result<bool, NotPassed> {
    let no_pipe = |e: &dyn std::fmt::Display| {
        NotPassed::Later(format!("cannot create a pipe for the candidate: {e}"))
    };
    let (read, write) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK).map_err(|e| no_pipe(&e))?;
    let write2 = write.try_clone().map_err(|e| no_pipe(&e))?;
    // The candidate's end must block like any stdout.
    let _ = nix::fcntl::fcntl(
        write.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()),
    );
    let mut cmd = Command::new(candidate);
    cmd.arg("-c")
        .arg(config)
        .arg("check")
        .env_clear()
        .envs(
            std::env::vars_os()
                .filter(|(k, _)| !crate::jobs::executable::withheld_from_children(k)),
        )
        .env(PREFLIGHT_ENV, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::from(write2))
        .process_group(0);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and only calls prctl, getppid,
    // getpid and kill, which are async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            Ok(())
        });
    }
    let spawned = crate::jobs::exact::exactly(&mut cmd, crate::jobs::exact::Env::Cleared)
        .and_then(|()| crate::jobs::reaper::spawn(&mut cmd));
    // A fault-injection build (tests only): the fork fails with EAGAIN (the user out of
    // processes) while the file GEARSHIFT_FAULT_PREFLIGHT_EAGAIN names exists.
    #[cfg(gearshift_faults)]
    let spawned = match std::env::var_os("GEARSHIFT_FAULT_PREFLIGHT_EAGAIN") {
        Some(p) if Path::new(&p).exists() => {
            if let Ok(mut c) = spawned {
                let _ = c.kill();
                let _ = c.wait();
            }
            Err(std::io::Error::from_raw_os_error(libc::EAGAIN))
        }
        _ => spawned,
    };
    // Our copies of the write end go with the command: EOF comes when the candidate's close.
    drop(cmd);
    let mut child = spawned.map_err(|e| match e.raw_os_error() {
        Some(libc::ETXTBSY) => NotPassed::Busy,
        Some(libc::EAGAIN | libc::ENOMEM | libc::EMFILE | libc::ENFILE) => {
            NotPassed::Later(format!("cannot start the candidate now: {e}"))
        }
        _ => NotPassed::Failed(format!(
            "cannot run the candidate: {}",
            crate::jobs::shebang::why_not_started(candidate, &e).unwrap_or_else(|| e.to_string())
        )),
    })?;
    let pid = child.id();
    PREFLIGHT_GROUP.store(pid as i32, Ordering::Release);
    let result = wait_preflight(&mut child, read);
    let _ = PREFLIGHT_GROUP.compare_exchange(pid as i32, 0, Ordering::AcqRel, Ordering::Acquire);
    crate::jobs::reaper::forget(pid);
    result.map_err(NotPassed::Failed)
}

/// What the background check of a stable candidate found.
pub(super) enum Outcome {
    /// The same bytes as the running image (a touch, or a copy of the same build).
    Same(String),
    /// The bytes an earlier generation refused (`last_refused_deploy`): refused again
    /// without a word.
    Refused,
    Unreadable(String),
    /// Its digest, the pre-flight's verdict (`Ok(true)`: it takes up the lock descriptors an
    /// exec hands it), and the file that was hashed (kept open: what is exec'd is this
    /// descriptor, never the path again).
    Checked(String, Result<bool, NotPassed>, Option<std::fs::File>),
}

/// The digests a candidate is compared with before its pre-flight: the running image's, the
/// one an earlier generation refused, and one rolled back from.
pub(super) struct Digests {
    pub running: Option<String>,
    pub refused: Option<String>,
    pub bad: Option<String>,
}

/// Judges the candidate at `path`, which settled as `ident` (on a helper thread: hashing and a
/// pre-flight take a while): hashed through one descriptor, which must be the file that
/// settled (that descriptor is what a switch execs), compared with `known`, then pre-flighted
/// (said in the log when `say`).
pub(super) fn judge(
    path: &Path,
    config: &Path,
    ident: Ident,
    known: &Digests,
    say: bool,
) -> Outcome {
    use super::digest::{hash_reader, open_binary, short};
    let Digests {
        running,
        refused,
        bad,
    } = known;
    let opened = open_binary(path).and_then(|f| {
        if Ident::of_file(&f) == Some(ident) {
            Ok(f)
        } else {
            Err(std::io::Error::other(
                "the file changed while it was opened",
            ))
        }
    });
    match opened.and_then(|mut f| hash_reader(&mut f).map(|sha| (sha, f))) {
        Err(e) => Outcome::Unreadable(format!("cannot read \"{}\": {e}", path.shown())),
        Ok((sha, _)) if Some(&sha) == running.as_ref() => Outcome::Same(sha),
        Ok((sha, _)) if Some(&sha) == refused.as_ref() => Outcome::Refused,
        Ok((sha, _)) if Some(&sha) == bad.as_ref() => Outcome::Checked(
            sha,
            Err(NotPassed::Failed(
                "this binary was rolled back: it died during start-up".into(),
            )),
            None,
        ),
        Ok((sha, file)) => {
            if say {
                log::info!(
                    "deploy: candidate \"{}\" (sha256 {}); running its pre-flight",
                    path.shown(),
                    short(&sha)
                );
            }
            match run(path, config) {
                Err(NotPassed::Later(e)) => Outcome::Unreadable(format!(
                    "cannot judge \"{}\" now: {e}; trying again",
                    path.shown()
                )),
                result => Outcome::Checked(sha, result, Some(file)),
            }
        }
    }
}

/// Reads the pre-flight's output while waiting for it (bounded by [`PREFLIGHT_TIMEOUT`]) and
/// judges it. Its group is killed once the leader has exited (while the leader is still a
/// zombie, so the group id cannot have been reused) or at the deadline.
fn wait_preflight(child: &mut std::process::Child, out: OwnedFd) -> Result<bool, String> {
    let deadline = Instant::now() + PREFLIGHT_TIMEOUT;
    let pid = Pid::from_raw(child.id() as i32);
    let mut tail = Vec::new();
    let mut eof = false;
    let timed_out = loop {
        eof = eof || drain(&out, &mut tail);
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        match waitid(Id::Pid(pid), flags) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(_) => break false,
            Err(e) => return Err(format!("waiting for the candidate: {e}")),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break true;
        }
        let nap = left.min(Duration::from_millis(20));
        if eof {
            std::thread::sleep(nap);
        } else {
            let mut fds = [PollFd::new(out.as_fd(), PollFlags::POLLIN)];
            let ms = u16::try_from(nap.as_millis()).unwrap_or(20);
            let _ = poll(&mut fds, PollTimeout::from(ms));
        }
    };
    let _ = killpg(pid, Signal::SIGKILL);
    let status = child.wait();
    if !eof {
        drain(&out, &mut tail);
    }
    let said = String::from_utf8_lossy(&tail);
    let said = said.trim();
    if timed_out {
        return Err(format!(
            "`check` did not finish within {}s: {said}",
            PREFLIGHT_TIMEOUT.as_secs()
        ));
    }
    match status {
        Ok(s) if s.success() => Ok(said.lines().any(|l| l.trim() == TAKES_LOCKS)),
        Ok(s) => Err(format!("`check` failed ({s}): {said}")),
        Err(e) => Err(format!("waiting for the candidate: {e}")),
    }
}

/// Reads what `fd` (non-blocking) holds now, keeping the last [`KEEP_OUTPUT`] bytes in `tail`.
/// True at end of file.
fn drain(fd: &OwnedFd, tail: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
            Ok(0) => return true,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 2 * KEEP_OUTPUT {
                    tail.drain(..tail.len() - KEEP_OUTPUT);
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => {
                // EAGAIN (nothing more for now) or an error that reading again will not fix.
                if tail.len() > KEEP_OUTPUT {
                    tail.drain(..tail.len() - KEEP_OUTPUT);
                }
                return false;
            }
        }
    }
}

/// Why the worker's user (`uid`) could have written the binary at `path` or replaced it in its
/// directory, if it could.
pub(super) fn writable_by(path: &Path, uid: u32) -> Option<String> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    for (p, what) in [(path, "the binary"), (dir, "its directory")] {
        let Ok(m) = std::fs::metadata(p) else {
            return Some(format!("cannot check \"{}\"", p.shown()));
        };
        if (m.uid() == uid && uid != 0) || m.mode() & 0o022 != 0 {
            return Some(format!(
                "{what} \"{}\" is writable by the worker's user or by others (owner uid {}, mode {:o}): root would run it at the next fresh start; fix: chown root and chmod go-w",
                p.shown(),
                m.uid(),
                m.mode() & 0o7777
            ));
        }
    }
    None
}
