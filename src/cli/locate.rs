//! Where the running worker keeps its state, as the CLI finds it: from the config, or from
//! root's record of where the worker started when the config cannot say (it does not validate
//! now) or says otherwise (its `state_dir` was edited since: that moves only at a fresh start);
//! and whether a worker runs there, and is stopped by SIGSTOP.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::ops::pidfile::{self, Probe};
use crate::text::ShowPath;

/// The running worker's pid and status socket, decided by the pidfile lock. When the config
/// cannot tell for certain where the worker is, finding none there is "unknown", not "not
/// running" (a script would start a second worker).
pub(super) fn running(path: &Path) -> Result<(i32, PathBuf, PathBuf)> {
    find(path, false).map(|(pid, socket, pidfile, _)| (pid, socket, pidfile))
}

/// [`running`], and with `recorded` (for `stop`) also a worker that neither holds the pidfile
/// lock nor answers on its status socket but runs as root recorded it (its `state_dir` removed
/// under it): true in the result's last place, for the caller to tell its end by the record.
pub(super) fn find(path: &Path, recorded: bool) -> Result<(i32, PathBuf, PathBuf, bool)> {
    let (state_dir, certain) = super::locate::state_dir_of(path)?;
    let pidfile = state_dir.join(crate::ops::layout::PIDFILE);
    let socket = crate::ops::layout::worker_dir(&state_dir).join(crate::ops::layout::SOCKET);
    let probed = match pidfile::probe(&pidfile) {
        Err(Error::Io { source, .. })
            if source.kind() == std::io::ErrorKind::PermissionDenied
                && !nix::unistd::geteuid().is_root() =>
        {
            // A member of the worker's group: the pidfile is root's alone, the status socket
            // is the group's. Whoever answers on it is the worker (it holds the lock while it
            // binds there); nobody answering is "not running". Read-only: such a caller can
            // query, not signal.
            return match crate::status::query_patiently(&socket, None, Duration::from_secs(2)) {
                Ok(doc) => Ok((doc.pid as i32, socket, pidfile, false)),
                Err(Error::Io { source, .. })
                    if matches!(
                        source.kind(),
                        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                    ) =>
                {
                    Err(Error::NotRunning)
                }
                Err(e) => Err(Error::Unknown(format!(
                    "the pidfile is root's, and the status socket does not answer: {e}"
                ))),
            };
        }
        other => other?,
    };
    match probed {
        Probe::Running(Some(pid)) => Ok((pid, socket, pidfile, false)),
        Probe::Running(None) => Err(Error::Unknown(format!(
            "\"{}\" is locked but holds no pid",
            pidfile.shown()
        ))),
        Probe::NotRunning if certain => match crate::status::unlocked_worker(&socket) {
            Some(pid) => Err(Error::Unknown(crate::status::unlocked_words(&pidfile, pid))),
            None => match recorded_worker(path) {
                Some(pid) if recorded => Ok((pid, socket, pidfile, true)),
                Some(pid) => Err(Error::Unknown(recorded_words(&state_dir, pid))),
                None => Err(Error::NotRunning),
            },
        },
        Probe::NotRunning => Err(Error::Unknown(format!(
            "no worker runs in state_dir \"{}\", but the invalid config cannot say for certain that this is its state_dir; fix the config and ask again",
            state_dir.shown()
        ))),
    }
}

/// What to say when `pid` is stopped (by SIGSTOP, or Ctrl-Z at the terminal of a `run`): it
/// then acts on no signal (but SIGKILL) until continued, and its status socket answers nothing.
pub(super) fn stopped(pid: i32) -> Option<String> {
    match crate::ops::procfs::Stat::of(Some(pid))?.state {
        'T' => Some(format!("pid {pid} is stopped (SIGSTOP, or Ctrl-Z at its terminal): it acts on no signal until it is continued: kill -CONT {pid}")),
        't' => Some(format!("pid {pid} is held by a debugger or tracer (TracerPid in /proc/{pid}/status): it acts on no signal but SIGKILL until that lets it go")),
        _ => None,
    }
}

/// The supervisor of worker `pid` (`start --supervise`), if it has one: the worker's parent
/// (the kernel's word: the worker's own status never chooses whom the CLI signals), owned by
/// the caller, and running as `supervise` for this very config.
pub(super) fn supervisor_of(pid: i32, config: &Path) -> Option<i32> {
    let ppid = crate::ops::procfs::Stat::of(Some(pid))?.ppid;
    if ppid <= 1 {
        return None;
    }
    supervising(ppid, &crate::config::absolute(config).ok()?).map(|_| ppid)
}

/// A supervisor that runs while no worker does (see [`waiting_supervisor`]).
pub(super) struct Waiting {
    pub(super) pid: i32,
    pub(super) max_restarts: usize,
    /// The worker's pidfile, beside the supervisor's ([`supervisor_beside`] looks again).
    pub(super) pidfile: PathBuf,
}

/// A supervisor of this config's worker that runs while no worker does (it waits to start one
/// again after a crash, or is starting it): the holder of `state_dir/supervisor.pid`'s lock
/// as the kernel reports it, owned by the caller and running `supervise` for this config.
pub(super) fn waiting_supervisor(path: &Path) -> Option<Waiting> {
    let config = crate::config::absolute(path).ok()?;
    let state_dir = match Config::load(path) {
        Ok(c) => running_elsewhere(&config, &c.worker.state_dir).unwrap_or(c.worker.state_dir),
        Err(_) => crate::ops::layout::recorded_state_dir(&config)?,
    };
    let pidfile = state_dir.join(crate::ops::layout::PIDFILE);
    let pid = supervisor_beside(&pidfile)?;
    let max_restarts = supervising(pid, &config)?;
    Some(Waiting {
        pid,
        max_restarts,
        pidfile,
    })
}

/// The holder of the supervisor's lock beside the worker's `pidfile`, as the kernel reports it:
/// enough to wait on; whom to signal is [`waiting_supervisor`]'s to say.
pub(super) fn supervisor_beside(pidfile: &Path) -> Option<i32> {
    let lock = pidfile.with_file_name(crate::ops::layout::SUPERVISOR_PIDFILE);
    match pidfile::probe(&lock) {
        Ok(Probe::Running(Some(pid))) => Some(pid),
        _ => None,
    }
}

/// Whether process `pid` is owned by the caller and runs `supervise` for `config` (absolute):
/// its `--max-restarts`, if so.
fn supervising(pid: i32, config: &Path) -> Option<usize> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(format!("/proc/{pid}")).ok()?.uid();
    if owner != nix::unistd::geteuid().as_raw() {
        return None;
    }
    let cmdline = crate::ops::procfs::read_bounded(format!("/proc/{pid}/cmdline"), 1 << 16)?;
    let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
    let after = |flag: &[u8]| args.windows(2).find(|w| w[0] == flag).map(|w| w[1]);
    if !args.contains(&b"supervise".as_slice())
        || after(b"-c") != Some(config.as_os_str().as_bytes())
    {
        return None;
    }
    let max = after(b"--max-restarts").and_then(|m| std::str::from_utf8(m).ok()?.parse().ok());
    Some(max.unwrap_or(super::DEFAULT_MAX_RESTARTS))
}

/// Continues worker `pid` if SIGSTOP (or Ctrl-Z) stopped it, and says so; one a debugger holds
/// is said (a SIGCONT does not free it).
pub(super) fn continue_stopped(pid: i32) {
    match crate::ops::procfs::Stat::of(Some(pid)).map(|s| s.state) {
        Some('T') => {
            let _ = kill(Pid::from_raw(pid), Signal::SIGCONT);
            println!("pid {pid} was stopped (SIGSTOP, or Ctrl-Z at its terminal): continued, so that it can act on the TERM");
        }
        Some('t') => println!(
            "pid {pid} is held by a debugger or tracer: it acts on the TERM once that lets it go"
        ),
        _ => {}
    }
}

/// Set once a command found the worker's state through root's record because config.toml was
/// not there: the command was run where the config was (and is gone), so the hint for one run
/// away from its config is not said.
pub(super) static FOUND_WITHOUT_CONFIG: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Where the worker keeps its state, even when config.toml does not validate right now or cannot
/// be read (the worker serves on its last good config meanwhile), and whether that is certain:
/// the valid config; or, with a warning, the `state_dir` root recorded at the worker's start; or
/// `[worker] state_dir` read leniently from the file (certain only if its TOML syntax holds).
pub(super) fn state_dir_of(path: &Path) -> Result<(PathBuf, bool)> {
    match Config::load(path) {
        Ok(c) => {
            if let Ok(Some(t)) = crate::ops::privilege::target(&c) {
                pidfile::configured_user(t.uid.as_raw());
            }
            let config = crate::config::absolute(path).unwrap_or_default();
            match running_elsewhere(&config, &c.worker.state_dir) {
                Some(dir) => {
                    eprintln!("gearshift: warning: config.toml names state_dir \"{}\", but the worker started with it runs in \"{}\" (a state_dir moves only at a fresh start: `gearshift restart`)", c.worker.state_dir.shown(), dir.shown());
                    Ok((dir, true))
                }
                None => Ok((c.worker.state_dir, true)),
            }
        }
        Err(Error::Config(msg)) => {
            eprintln!(
                "gearshift: warning: the config file is invalid: {}",
                crate::text::escape_lines(&msg)
            );
            let recorded = crate::config::absolute(path)
                .ok()
                .and_then(|p| crate::ops::layout::recorded_state_dir(&p));
            let (dir, certain, how) = match recorded {
                Some(dir) => (dir, true, "recorded at the worker's start"),
                None => {
                    let (dir, certain) = crate::config::lenient_state_dir(path)?;
                    let how = if certain {
                        "from the file"
                    } else {
                        "a guess: the file cannot be read as TOML"
                    };
                    (dir, certain, how)
                }
            };
            eprintln!(
                "gearshift: warning: looking for the running worker in state_dir \"{}\" ({how})",
                dir.shown()
            );
            Ok((dir, certain))
        }
        // Not there or not readable (removed by a deploy while the worker serves on its last
        // good config): root's record alone can tell where the worker runs.
        Err(e @ Error::Io { .. }) => {
            let recorded = crate::config::absolute(path)
                .ok()
                .and_then(|p| crate::ops::layout::recorded_state_dir(&p));
            let Some(dir) = recorded else {
                return Err(e);
            };
            eprintln!(
                "gearshift: warning: {}; looking for the running worker in state_dir \"{}\" (recorded at the worker's start)",
                crate::text::escape_lines(&e.to_string()),
                dir.shown()
            );
            FOUND_WITHOUT_CONFIG.store(true, std::sync::atomic::Ordering::Relaxed);
            Ok((dir, true))
        }
        Err(e) => Err(e),
    }
}

/// The worker root recorded at its fresh start with the config at `path`, if that process
/// still runs (see `layout::record_worker`).
pub(super) fn recorded_worker(path: &Path) -> Option<i32> {
    crate::ops::layout::recorded_worker(&crate::config::absolute(path).ok()?)
}

/// What the CLI says of a worker that root's record alone knows of.
fn recorded_words(state_dir: &Path, pid: i32) -> String {
    format!(
        "no worker holds the pidfile in state_dir \"{}\" or answers on its status socket, but pid {pid}, which root recorded as the worker started with this config, still runs: was state_dir removed under it? `gearshift stop` stops it, and its next start makes state_dir again",
        state_dir.shown()
    )
}

/// Refuses a fresh start beside another worker of this config that the pidfile lock in its
/// `state_dir` does not show: one started with it in another `state_dir` (the config's was
/// edited since), or the one root recorded, still running with neither pidfile nor status
/// socket (its `state_dir` removed under it; one that is exiting, a `restart`'s stop having just
/// freed its lock, is given 2 s to go). Two workers would serve one source. A config that does
/// not load, or a lock held there, is left to the start's own checks.
pub(super) fn refuse_beside_another(path: &Path) -> Result<()> {
    let (Ok(c), Ok(config)) = (Config::load(path), crate::config::absolute(path)) else {
        return Ok(());
    };
    if let Some(dir) = running_elsewhere(&config, &c.worker.state_dir) {
        let pidfile = dir.join(crate::ops::layout::PIDFILE);
        let pid = match pidfile::probe(&pidfile) {
            Ok(Probe::Running(pid)) => pid,
            _ => None,
        };
        return Err(Error::Locked { what: pidfile, pid });
    }
    let pidfile = c.worker.state_dir.join(crate::ops::layout::PIDFILE);
    if !matches!(pidfile::probe(&pidfile), Ok(Probe::NotRunning)) {
        return Ok(());
    }
    // A supervisor about to start the worker again (its own `run` is let through).
    if let Some(sup) = waiting_supervisor(path).map(|w| w.pid) {
        if sup != nix::unistd::getppid().as_raw() {
            let about = waiting_words(sup);
            return Err(Error::Msg(format!(
                "{about}; `gearshift stop` stops the supervisor"
            )));
        }
    }
    match crate::ops::layout::wait_recorded_gone(&config, Duration::from_secs(2)) {
        Some(pid) => Err(Error::Msg(recorded_words(&c.worker.state_dir, pid))),
        None => Ok(()),
    }
}

/// What is said of a supervisor that runs while no worker serves: starting its worker (a
/// child of it is there, not serving yet: a first start, a slow start-up), or waiting to start
/// it again after a crash.
pub(super) fn waiting_words(sup: i32) -> String {
    format!("its supervisor (pid {sup}) is {}", supervisor_doing(sup))
}

/// What supervisor `sup` does while no worker serves, said after "is" or "was".
pub(super) fn supervisor_doing(sup: i32) -> String {
    match starting_child(sup) {
        Some(child) => format!("starting the worker (pid {child}), not serving yet"),
        None => "about to start the worker again (after a crash)".into(),
    }
}

/// The worker supervisor `sup` is starting: its child (`procfs::children_of`). A supervisor
/// waiting after a crash has none.
fn starting_child(sup: i32) -> Option<i32> {
    crate::ops::procfs::children_of(sup)
        .first()
        .map(|(pid, _)| *pid)
}

/// The `state_dir` a worker started with `config` runs in, when that is not `configured` (the
/// file was edited since: a `state_dir` moves only at a fresh start): root's record, while a
/// worker holds the pidfile lock there.
fn running_elsewhere(config: &Path, configured: &Path) -> Option<PathBuf> {
    let recorded = crate::ops::layout::recorded_state_dir(config).filter(|r| r != configured)?;
    let probe = crate::ops::pidfile::probe(&recorded.join(crate::ops::layout::PIDFILE)).ok()?;
    matches!(probe, crate::ops::pidfile::Probe::Running(_)).then_some(recorded)
}
