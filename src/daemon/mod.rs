//! `gearshift start`: the classic daemon, done right.
//!
//! In order: validate the config and test the pidfile lock (in the caller's terminal, so
//! mistakes are reported there); resolve every path to absolute; fork, setsid, fork again
//! (the daemon can never reacquire a terminal); umask; chdir /; stdin and stdout to /dev/null,
//! stderr to the log file; then run the worker. The first process waits on a readiness pipe
//! and exits 0 only when the daemon says it holds the pidfile and serves, or prints the
//! daemon's own error and exits 1: never a `start` that succeeded for a daemon that died a
//! moment later. All of this happens before any thread exists (fork in a threaded process is
//! unsafe); the daemon never forks again, and re-execs as `run`.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::stat::Mode;
use nix::sys::wait::waitpid;
use nix::unistd::{dup2, fork, setsid, ForkResult};

use crate::error::{Error, Result};
use crate::jobs::functions::Functions;
use crate::ops::pidfile::{self, Probe};
use crate::text::ShowPath;
use crate::worker::{self, Plan, RunOptions};

mod child;
pub mod supervisor;

/// Starts the worker as a daemon; returns the exit code for the `start` command.
/// With `supervise = Some(max_restarts)`, the daemon is a supervisor running the worker as its
/// child (see [`crate::daemon::supervisor`]).
pub fn start(
    config_path: &Path,
    functions: Functions,
    supervise: Option<usize>,
    wait: Duration,
) -> Result<u8> {
    start_with(config_path, functions, supervise, wait).map(|o| o.code)
}

/// How a start ended.
pub struct Started {
    /// The exit code for the `start` command.
    pub code: u8,
    /// The daemon died before it served, with no error of its own (a crash at start-up).
    pub died: bool,
}

/// [`start`], saying whether the daemon died during start-up (`restart` then rolls back).
pub fn start_with(
    config_path: &Path,
    functions: Functions,
    supervise: Option<usize>,
    wait: Duration,
) -> Result<Started> {
    let config_path = crate::config::absolute(config_path)?;
    let plan = Plan::prepare(&config_path, &functions)?;
    let cfg = &plan.config;
    // The daemon, its supervisor and every worker they start write the configured format from
    // their first line.
    crate::ops::logging::set_format(cfg.log.json, cfg.log.jobs);
    let target = crate::ops::privilege::dropping_to(cfg)?;
    crate::ops::layout::prepare(&cfg.worker.state_dir, target.as_ref())?;
    if let Probe::Running(pid) = pidfile::probe(&cfg.pidfile())? {
        return Err(Error::Locked {
            what: cfg.pidfile(),
            pid,
        });
    }
    // A worker whose pidfile was removed still answers on its socket: never a second beside it.
    crate::status::refuse_beside_unlocked(&cfg.worker.state_dir)?;
    if let crate::config::Source::Gearman(g) = &cfg.source {
        if let Err(errors) = crate::source::gearman::client::probe(&g.servers) {
            eprintln!(
                "gearshift: warning: no gearman server is reachable ({errors}); starting anyway, the worker keeps trying (see `gearshift status`)"
            );
        }
    }
    let exe = crate::restart::reexec::first_start_exe(std::env::args_os().next().as_deref());
    let log_file = cfg
        .log
        .file
        .clone()
        .unwrap_or_else(|| cfg.worker.state_dir.join(crate::ops::layout::DEFAULT_LOG));
    let log = crate::ops::logging::open_log(&log_file, target.as_ref().map(|t| (t.uid, t.gid)))?;
    let argv: Vec<OsString> = vec![
        exe.clone().into_os_string(),
        "-c".into(),
        config_path.clone().into_os_string(),
        "run".into(),
        "--log-file".into(),
        log_file.clone().into_os_string(),
    ];
    let umask = cfg.worker.umask;
    let (ready_r, ready_w) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(|e| Error::io("creating a pipe", e.into()))?;

    // SAFETY: no thread has been started in this process yet (the CLI parses arguments, reads
    // the config and tests a lock, all on the main thread), so the child may do anything.
    match unsafe { fork() }.map_err(|e| Error::io("fork", e.into()))? {
        ForkResult::Parent { child } => {
            drop(ready_w);
            let _ = waitpid(child, None);
            Ok(wait_ready(ready_r, &log_file, &config_path, wait))
        }
        ForkResult::Child => {
            drop(ready_r);
            let code = match daemonize(umask, &log) {
                Ok(()) if supervise.is_some() => {
                    let max = supervise.unwrap_or(5);
                    let settings =
                        crate::daemon::supervisor::settings(&exe, &plan.config, &log_file, max);
                    crate::daemon::supervisor::exec_image(&settings, ready_w)
                }
                Ok(()) => {
                    let opts = RunOptions {
                        ready: Some(File::from(ready_w)),
                        exe: Some(exe),
                        argv: Some(argv),
                        log_file: Some(log_file),
                    };
                    run_daemon(&config_path, functions, opts)
                }
                Err(e) => {
                    let _ = writeln!(File::from(ready_w), "error {e}");
                    1
                }
            };
            std::process::exit(code)
        }
    }
}

/// The daemon's worker: runs it, and reports a start-up error on the ready pipe too.
fn run_daemon(config_path: &Path, functions: Functions, opts: RunOptions) -> i32 {
    let mut report = opts.ready.as_ref().and_then(|r| r.try_clone().ok());
    match worker::run_with(config_path, functions, opts) {
        Ok(code) => code,
        Err(e) => {
            log::error!("{e}");
            if let Some(r) = report.as_mut() {
                let _ = writeln!(r, "error {e}");
            }
            1
        }
    }
}

/// setsid, second fork (the first child exits at once), umask, chdir /, stdio.
fn daemonize(umask: u32, log: &File) -> Result<()> {
    setsid().map_err(|e| Error::io("setsid", e.into()))?;
    // SAFETY: still single-threaded (see `start`).
    match unsafe { fork() }.map_err(|e| Error::io("second fork", e.into()))? {
        ForkResult::Parent { .. } => {
            // SAFETY: _exit ends the intermediate process without running atexit handlers or
            // flushing stdio buffers that the daemon still owns.
            unsafe { libc::_exit(0) }
        }
        ForkResult::Child => {}
    }
    nix::sys::stat::umask(Mode::from_bits_truncate(umask));
    std::env::set_current_dir("/").map_err(|e| Error::io("chdir /", e))?;
    let null = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| Error::io("opening /dev/null", e))?;
    for (from, to) in [
        (null.as_raw_fd(), 0),
        (null.as_raw_fd(), 1),
        (log.as_raw_fd(), 2),
    ] {
        dup2(from, to).map_err(|e| Error::io("redirecting stdio", e.into()))?;
    }
    Ok(())
}

/// Reads the daemon's first line: `ready PID` (and what a rollback did, when the binary at the
/// path died and the last good one serves), `error MESSAGE`, or `died MESSAGE` (a supervisor's
/// worker crashed as it started); EOF means the daemon died first.
/// Waits `wait` at most: a daemon whose start-up stalls (a hung mount) goes on starting, and
/// `start` says so (exit 5) instead of holding whatever script ran it. A daemon that failed is
/// gone before its failure is said (2 s at most).
fn wait_ready(ready: OwnedFd, log_file: &Path, config: &Path, wait: Duration) -> Started {
    let done = |code| Started { code, died: false };
    if !readable_within(&ready, wait) {
        eprintln!(
            "gearshift: the daemon did not serve within {}; it is still starting (see {}; `gearshift status` tells once it serves, `gearshift stop` stops it)",
            crate::clock::human(wait),
            log_file.shown()
        );
        // `exit::NOT_YET`: not done yet.
        return done(5);
    }
    let mut line = String::new();
    let _ = BufReader::new(File::from(ready)).read_line(&mut line);
    let line = line.trim_end();
    if !line.starts_with("ready ") {
        // The failed daemon (or the supervisor's worker that died) recorded itself once it
        // held the pidfile lock: until it has exited, `status` would take it for a worker
        // whose `state_dir` was removed under it ("unknown"), and `start` again would wait.
        let _ = crate::ops::layout::wait_recorded_gone(config, Duration::from_secs(2));
    }
    if let Some(ready) = line.strip_prefix("ready ") {
        let (pid, rollback) = ready.split_once(' ').unwrap_or((ready, ""));
        println!("started (pid {pid}), logging to {}", log_file.shown());
        if !rollback.is_empty() {
            eprintln!(
                "gearshift: warning: {}; the worker runs that last good binary, not the one at \
                 its path (`gearshift status` shows last_rollback)",
                crate::text::escape_lines(rollback)
            );
        }
        done(0)
    } else if let Some(err) = line.strip_prefix("error ") {
        eprintln!("gearshift: {}", crate::text::escape_lines(err));
        done(1)
    } else if let Some(crash) = line.strip_prefix("died ") {
        // A supervisor's worker that crashed as it started.
        eprintln!("gearshift: {}", crate::text::escape_lines(crash));
        Started {
            code: 1,
            died: true,
        }
    } else {
        eprintln!(
            "gearshift: the daemon exited during start-up; see {}",
            log_file.shown()
        );
        Started {
            code: 1,
            died: true,
        }
    }
}

/// Whether `fd` has something to read (or its writers are gone) within `wait`.
fn readable_within(fd: &OwnedFd, wait: Duration) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let deadline = std::time::Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        // At most a minute a turn (fits the u16 of milliseconds); the loop goes on past it.
        let ms = PollTimeout::from(left.as_millis().min(60_000) as u16);
        let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(n) if n > 0 => return true,
            Err(nix::errno::Errno::EINTR) => {}
            Ok(_) if left.is_zero() => return false,
            Ok(_) => {}
            Err(_) => return true,
        }
    }
}
