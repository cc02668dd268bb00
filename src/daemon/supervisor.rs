//! `start --supervise`: a small supervisor process that keeps the worker running without
//! systemd (the seed's restart-on-death shell loop, done right).
//!
//! The supervisor runs the worker as its child (`run`), forwards HUP, TERM, INT, QUIT and USR1 to
//! it, and restarts it when it dies abnormally (a signal or a non-zero exit), never after a clean
//! stop or a death by a stop signal (a forced stop). Restarts back off exponentially; more than
//! `max_restarts` within a minute and it gives up loudly. The worker holds the pidfile, so
//! `status`, `stop` and `kill -1 <worker pid>` work as without a supervisor; it learns of its
//! supervisor (pid, crashes, last exit) from `GEARSHIFT_SUPERVISOR`, shown in `status`.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::child::{describe, stopped, Child};
use crate::error::Error;
use crate::status::records::Info;
use crate::text::ShowPath;
use crossbeam_channel::{after, bounded, select};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How the supervisor runs the worker.
pub struct Settings {
    pub exe: PathBuf,
    pub config: PathBuf,
    pub log_file: PathBuf,
    pub status_socket: PathBuf,
    pub max_restarts: usize,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// How long a worker runs before its death is no longer one of a series: the next start
    /// waits `backoff_min` again.
    pub stable: Duration,
}

/// Runs the supervisor until the worker stops cleanly (exit 0) or it gives up (exit 1).
/// `ready` gets the line `start` waits for once the first worker serves.
pub fn run(settings: &Settings, ready: File) -> i32 {
    let mut sig_rx = match forward_signals() {
        Ok(rx) => rx,
        Err(e) => return fail(Some(ready), &format!("supervisor: {e}")),
    };
    // The mask inherited from `start` had these blocked until now.
    let _ = crate::ops::sigstate::clear_mask();

    let mut info = Info {
        pid: std::process::id(),
        crashes: 0,
        last_exit: None,
        max_restarts: settings.max_restarts,
        gone: false,
    };
    let mut ready = Some(ready);
    let mut recent: VecDeque<Instant> = VecDeque::new();
    let mut backoff = settings.backoff_min;
    let mut stopping = false;
    loop {
        if ready.is_none() {
            reopen_if_moved(&settings.log_file);
        }
        let mut child = match Child::spawn(settings.argv(), &info, ready.is_some()) {
            Ok(x) => x,
            Err(e) => {
                return fail(
                    ready.take(),
                    &format!("supervisor: starting the worker: {e}"),
                )
            }
        };
        let (pid, spawned) = (child.pid, Instant::now());
        log::info!("supervisor {}: worker pid {pid} started", info.pid);
        if let Some(mut r) = ready.take() {
            match wait_serving(settings, &child, &mut sig_rx, info.pid) {
                Ok(()) => {
                    child.served();
                    let _ = writeln!(r, "ready {pid}{}", rollback_note(settings, pid));
                }
                Err((e, how)) => {
                    // Never left running unsupervised once the supervisor gives up on it.
                    child.end_unserved();
                    return unserved(r, &e, how);
                }
            }
        }
        let status = loop {
            select! {
                recv(sig_rx) -> sig => {
                    let Ok(sig) = sig else {
                        sig_rx = signals_lost(info.pid);
                        continue;
                    };
                    if crate::ops::signals::is_stop(sig) {
                        stopping = true;
                    }
                    pass_on(settings, pid, sig);
                }
                recv(child.exited) -> status => break status.ok(),
            }
        };
        let reason = describe(status);
        if stopping || status.is_some_and(|s| s.success() || stopped(s)) {
            log::info!(
                "supervisor {}: worker pid {pid} {reason}; not restarting",
                info.pid
            );
            #[cfg(gearshift_faults)]
            crate::ops::faults::stall_while(
                "GEARSHIFT_FAULT_STALL_SUPERVISOR_EXIT",
                "holding the supervisor's exit",
            );
            return 0;
        }
        info.crashes += 1;
        info.last_exit = Some(reason.clone());
        // A worker that ran a while before dying starts again at the shortest wait: the waits
        // of crashes long past (a week of one a day reached 30 s) are no reason to wait now.
        if spawned.elapsed() >= settings.stable {
            backoff = settings.backoff_min;
        }
        if too_many(&mut recent, settings.max_restarts) {
            log::error!(
                "supervisor {}: worker pid {pid} {reason}; {} crashes within a minute, over the limit of {}: giving up",
                info.pid,
                recent.len(),
                settings.max_restarts
            );
            return 1;
        }
        log::warn!(
            "supervisor {}: worker pid {pid} {reason} (crash {}); restarting in {} ms",
            info.pid,
            info.crashes,
            backoff.as_millis()
        );
        if !wait_out(settings, backoff, &mut sig_rx, info.pid) {
            log::info!("supervisor {}: stopped while waiting to restart", info.pid);
            return 0;
        }
        backoff = (backoff * 2).min(settings.backoff_max);
    }
}

/// Handled signals, forwarded to a channel by a thread of their own.
fn forward_signals() -> std::io::Result<crossbeam_channel::Receiver<Signal>> {
    let (sig_tx, sig_rx) = bounded::<Signal>(64);
    let raw: Vec<i32> = [
        Signal::SIGHUP,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
    ]
    .iter()
    .map(|s| *s as i32)
    .collect();
    let mut signals = signal_hook::iterator::Signals::new(&raw)?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for s in signals.forever() {
                // A fault-injection build (tests only): USR1 kills this thread.
                #[cfg(gearshift_faults)]
                if s == libc::SIGUSR1 {
                    panic!("injected fault: the supervisor's signal thread dies");
                }
                if let Ok(sig) = Signal::try_from(s) {
                    let _ = sig_tx.send(sig);
                }
            }
        })?;
    Ok(sig_rx)
}

/// Notes a crash now; true if more than `max` happened within the last minute.
fn too_many(recent: &mut VecDeque<Instant>, max: usize) -> bool {
    let now = Instant::now();
    recent.push_back(now);
    while recent
        .front()
        .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(60))
    {
        recent.pop_front();
    }
    recent.len() > max
}

/// Waits `backoff` before a restart; false if a TERM (or INT, QUIT) came meanwhile.
fn wait_out(
    settings: &Settings,
    backoff: Duration,
    sig_rx: &mut crossbeam_channel::Receiver<Signal>,
    me: u32,
) -> bool {
    let wake = after(backoff);
    loop {
        select! {
            recv(sig_rx) -> sig => match sig {
                Ok(Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT) => return false,
                Ok(Signal::SIGUSR1) => reopen_own_log(&settings.log_file, "SIGUSR1"),
                Ok(_) => {}
                Err(_) => *sig_rx = signals_lost(me),
            },
            recv(wake) -> _ => return true,
        }
    }
}

/// The signal thread died (its channel is closed): noticed, said, and replaced by a new one,
/// so signals are forwarded again (a closed channel would otherwise be "ready" forever: a spin,
/// and a TERM nobody acts on). If no new thread can start, TERM, INT and QUIT get their default
/// action back, so they still end the supervisor.
fn signals_lost(me: u32) -> crossbeam_channel::Receiver<Signal> {
    match forward_signals() {
        Ok(rx) => {
            log::error!("supervisor {me}: its signal thread died; a new one forwards signals");
            rx
        }
        Err(e) => {
            log::error!(
                "supervisor {me}: its signal thread died and cannot be replaced ({e}); TERM, INT and QUIT now end the supervisor at once"
            );
            for sig in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGQUIT] {
                // SAFETY: restoring the default action installs no handler; nothing runs in
                // signal context.
                let _ =
                    unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) };
            }
            crossbeam_channel::never()
        }
    }
}

/// What `start` says after the pid when the first worker rolled back as it started (the bad
/// binary still at the path): as a worker under `start` says it on its own ready line. The
/// worker's answer is text from outside: escaped, one line.
fn rollback_note(s: &Settings, pid: u32) -> String {
    let doc = crate::status::query(&s.status_socket, i32::try_from(pid).ok()).ok();
    doc.and_then(|d| d.last_rollback)
        .map_or(String::new(), |rb| {
            let note = crate::restart::rollback::words(&rb.from_sha256, &rb.to_sha256, &rb.reason);
            format!(" {}", crate::text::escape(&note))
        })
}

fn fail(ready: Option<File>, message: &str) -> i32 {
    log::error!("{message}");
    if let Some(mut r) = ready {
        let _ = writeln!(r, "error {message}");
    }
    1
}

/// Why the first worker did not serve.
enum Unserved {
    /// Killed by a signal nobody sent (a crash): `start` says `died`, and `restart` rolls back.
    Crashed,
    /// It said why on its ready pipe, and the supervisor's log line says it too.
    Refused,
    /// Another end (a stop, a start-up past the supervisor's patience, an exit unexplained).
    Failed,
}

/// Says to `start` why the first worker did not serve (and in the log, unless said there);
/// the supervisor's exit status.
fn unserved(mut ready: File, e: &Error, how: Unserved) -> i32 {
    match how {
        Unserved::Crashed => {
            // `start` tells a crash from an error: `restart` rolls a crash back.
            log::error!("{e}");
            let _ = writeln!(ready, "died {e}");
            1
        }
        Unserved::Refused => {
            let _ = writeln!(ready, "error {e}");
            1
        }
        Unserved::Failed => fail(Some(ready), &e.to_string()),
    }
}

/// Waits until the first worker serves (answers status: it holds the pidfile); signals meanwhile
/// are forwarded as they are once it serves (a TERM stops it as soon as its handlers are in
/// place, and this wait ends with its exit).
fn wait_serving(
    s: &Settings,
    child: &Child,
    sig_rx: &mut crossbeam_channel::Receiver<Signal>,
    me: u32,
) -> std::result::Result<(), (Error, Unserved)> {
    let pid = child.pid;
    let patience = Duration::from_secs(60);
    // A fault-injection build (tests only): a shorter wait.
    #[cfg(gearshift_faults)]
    let patience = crate::ops::faults::millis("GEARSHIFT_FAULT_SERVE_WAIT_MS").unwrap_or(patience);
    let deadline = Instant::now() + patience;
    let mut stop_sent = None;
    loop {
        // Answered by the child itself (peer credentials), not merely naming it.
        if crate::status::query(&s.status_socket, i32::try_from(pid).ok()).is_ok() {
            return Ok(());
        }
        if let Ok(status) = child.exited.try_recv() {
            let asked = stop_sent.map_or(String::new(), |sig: Signal| {
                format!(" (stopped by {} as it started)", sig.as_str())
            });
            let how = describe(Some(status));
            // Killed by a signal it did not ask for: a crash (SIGSEGV, SIGABRT), not an error.
            if stop_sent.is_none() && status.signal().is_some() && !stopped(status) {
                let log = s.log_file.shown();
                let e = format!("the worker {how} during start-up; see {log}");
                return Err((Error::Msg(e), Unserved::Crashed));
            }
            if let Some(own) = child.reported_error() {
                log::error!("supervisor {me}: the worker {how} during start-up{asked}: {own}");
                return Err((Error::Msg(own), Unserved::Refused));
            }
            let log = s.log_file.shown();
            let e = format!("the worker {how} during start-up{asked}; see {log}");
            return Err((Error::Msg(e), Unserved::Failed));
        }
        if Instant::now() >= deadline {
            let (within, log) = (crate::clock::human(patience), s.log_file.shown());
            let e = Error::Msg(format!(
                "the worker did not serve within {within}; it was stopped; see {log}"
            ));
            return Err((e, Unserved::Failed));
        }
        match sig_rx.recv_timeout(Duration::from_millis(20)) {
            Ok(sig) => {
                if crate::ops::signals::is_stop(sig) {
                    stop_sent = Some(sig);
                }
                pass_on(s, pid, sig);
            }
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => *sig_rx = signals_lost(me),
        }
    }
}

/// Forwards `sig` to worker `pid`; SIGUSR1 (`reopen-logs`, after logrotate moved the log away)
/// reopens the supervisor's own log first: its lines (a crash, a restart, giving up) went on
/// into the moved file.
fn pass_on(s: &Settings, pid: u32, sig: Signal) {
    if sig == Signal::SIGUSR1 {
        reopen_own_log(&s.log_file, "SIGUSR1");
    }
    let _ = kill(Pid::from_raw(pid as i32), sig);
}

/// Makes stderr, where the supervisor's lines go, the log file at `path` again, given to the
/// owner the old one had (the worker's user under a privilege drop, so that the worker can open
/// it too, whichever of the two makes it first), through [`crate::ops::logging::open_log`].
fn reopen_own_log(path: &Path, why: &str) {
    use std::os::fd::AsRawFd;
    let me = nix::unistd::geteuid();
    let owner = nix::sys::stat::fstat(2)
        .ok()
        .map(|st| {
            (
                nix::unistd::Uid::from_raw(st.st_uid),
                nix::unistd::Gid::from_raw(st.st_gid),
            )
        })
        .filter(|(uid, _)| *uid != me);
    match crate::ops::logging::open_log(path, owner)
        .and_then(|f| nix::unistd::dup2(f.as_raw_fd(), 2).map_err(|e| Error::io("dup2", e.into())))
    {
        Ok(_) => log::info!("supervisor: {why}: reopened log file {}", path.shown()),
        Err(e) => log::error!("supervisor: {why}: {e}; still writing to the old file"),
    }
}

/// Before a restart: reopens the log if the file at its path is no longer the one written to.
/// A logrotate while no worker ran (a restart's wait) asked nobody (`reopen-logs` finds no
/// worker), and the supervisor's lines from then on went into the moved file.
fn reopen_if_moved(path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(own) = nix::sys::stat::fstat(2) else {
        return;
    };
    if (own.st_mode & libc::S_IFMT) != libc::S_IFREG {
        return;
    }
    let same =
        std::fs::metadata(path).is_ok_and(|m| m.dev() == own.st_dev && m.ino() == own.st_ino);
    if !same {
        reopen_own_log(path, "the log file was moved away while no worker ran");
    }
}

/// Settings from the config and the `start` options.
pub fn settings(
    exe: &Path,
    config: &crate::config::Config,
    log_file: &Path,
    max_restarts: usize,
) -> Settings {
    Settings::new(
        exe.to_path_buf(),
        config.path.clone(),
        log_file.to_path_buf(),
        config.status_socket(),
        max_restarts,
    )
}

impl Settings {
    /// The worker's program and arguments: `EXE -c CONFIG run --log-file LOG`.
    fn argv(&self) -> (&Path, [OsString; 5]) {
        let args = [
            "-c".into(),
            self.config.clone().into(),
            "run".into(),
            "--log-file".into(),
            self.log_file.clone().into(),
        ];
        (&self.exe, args)
    }

    /// With the backoff of every supervisor: 0.5 s doubling to 30 s, back to 0.5 s after a
    /// worker that ran a minute.
    fn new(exe: PathBuf, config: PathBuf, log: PathBuf, socket: PathBuf, max: usize) -> Settings {
        let stable = Duration::from_secs(60);
        // A fault-injection build (tests only): a shorter run counts as stable.
        #[cfg(gearshift_faults)]
        let stable = crate::ops::faults::millis("GEARSHIFT_FAULT_STABLE_MS").unwrap_or(stable);
        Settings {
            exe,
            config,
            log_file: log,
            status_socket: socket,
            max_restarts: max,
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            stable,
        }
    }
}

/// Becomes the supervisor's own image (`start`'s daemonized child execs it): `ps` then names a
/// supervisor and its config, where it showed the command it was forked from for as long as it
/// ran (`gearshift restart` read as a restart that never ended). The signals it forwards stay
/// blocked across the exec, as `start` blocked them. Returns only on failure, said on `ready`.
pub fn exec_image(s: &Settings, ready: OwnedFd) -> i32 {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let fd = ready.as_raw_fd();
    if let Err(e) = fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty())) {
        return fail(Some(File::from(ready)), &format!("supervisor: {e}"));
    }
    let argv: Vec<OsString> = vec![
        s.exe.clone().into_os_string(),
        "-c".into(),
        s.config.clone().into_os_string(),
        "supervise".into(),
        "--max-restarts".into(),
        s.max_restarts.to_string().into(),
        "--log-file".into(),
        s.log_file.clone().into_os_string(),
        "--status-socket".into(),
        s.status_socket.clone().into_os_string(),
        "--ready-fd".into(),
        fd.to_string().into(),
    ];
    let e = crate::restart::reexec::exec_with(&s.exe, &argv, &[]);
    fail(Some(File::from(ready)), &format!("supervisor: {e}"))
}

/// `gearshift supervise`, the image [`exec_image`] starts: adopts the ready pipe (only a pipe,
/// never descriptors 0-2) and runs the supervisor.
pub fn main(config: &Path, log_file: PathBuf, status_socket: PathBuf, max: usize, fd: i32) -> i32 {
    let pipe = |what: &PathBuf| what.to_string_lossy().starts_with("pipe:");
    let Some(ready) = (fd > 2)
        .then(|| crate::ops::handover::adopt(Some(fd), pipe))
        .flatten()
    else {
        eprintln!(
            "gearshift: `supervise` is the supervisor `start --supervise` runs, not a command of its own"
        );
        return 2;
    };
    let _lock = match crate::ops::pidfile::supervisor_lock(&status_socket) {
        Ok(lock) => lock,
        Err(e) => return fail(Some(File::from(ready)), &format!("supervisor: {e}")),
    };
    let exe = crate::restart::reexec::first_start_exe(std::env::args_os().next().as_deref());
    let settings = Settings::new(exe, config.to_path_buf(), log_file, status_socket, max);
    run(&settings, File::from(ready))
}
