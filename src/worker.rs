//! The worker: a control loop on the main thread and `concurrency` lane threads.
//!
//! Lane threads claim a job, run it, report its outcome, and look at the shared stop flag only
//! between jobs. The main thread owns every decision: it receives signals, file-watch events and
//! lane exits over channels, and when a restart is due it validates the new state, sets the stop
//! flag, waits for every lane to finish its job and exit, validates again, and re-execs.
//!
//! Architecture invariant: a reload never interrupts a job. The only ways a running job ends
//! early are its own timeout and a second SIGTERM/SIGINT (an operator's "now").

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{after, bounded, never, select, Receiver, Sender};
use nix::sys::signal::Signal;

use crate::carried::{Inherited, Refusal, RestartReason};
use crate::clock::now_ms;
use crate::config::Config;
use crate::deploy::{Deploy, Step};
use crate::error::{Error, Result};
use crate::executable::{self, Children};
use crate::functions::{Functions, Job, JobError, JobResult, Runner, Table};
use crate::inotify::Inotify;
use crate::notify::Notifier;
use crate::pidfile::Pidfile;
use crate::reexec::{self, Boot};
use crate::signals::{self, Signals};
use crate::source::{Claimed, Lane, Source};
use crate::status::{self, Inner, State};
use crate::watch::{self, Touched};

/// How long file events must be quiet before the change is looked at.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// How often digests are checked when a directory cannot be watched.
const POLL_FALLBACK: Duration = Duration::from_secs(2);

/// Everything one generation needs, built and checked before it is used: a config that fails
/// here never replaces the running one.
pub struct Plan {
    pub config: Config,
    pub table: Table,
    pub jobs_sha256: String,
    /// Non-fatal findings, e.g. a `[functions.x]` section for a function that does not exist.
    pub warnings: Vec<String>,
}

impl Plan {
    /// Reads and validates the config at `path` and the executables of its `jobs_dir`.
    pub fn prepare(path: &Path, functions: &Functions) -> Result<Plan> {
        Plan::prepare_from(path, functions, None)
    }

    /// Like [`Plan::prepare`], from config text already read (`None`: read the file).
    pub fn prepare_from(path: &Path, functions: &Functions, text: Option<&str>) -> Result<Plan> {
        let config = match text {
            Some(t) => Config::parse(&crate::config::absolute(path)?, t.as_bytes())?,
            None => Config::load(path)?,
        };
        if config.text.trim().is_empty() {
            // An editor or `>` truncates before it writes: an empty file is far more likely a
            // half-written config than a wish for every default.
            return Err(Error::Config(format!(
                "{}: the file is empty (half-written?); refusing it",
                config.path.display()
            )));
        }
        // Who we would run as is part of the config's validity: refuse before exec what the
        // new image could not run with.
        crate::privilege::check_policy(&config)?;
        let jobs_dir = &config.worker.jobs_dir;
        if !jobs_dir.is_dir() {
            return Err(Error::Config(format!(
                "{}: jobs_dir \"{}\" is not a directory (create it, or set [worker] jobs_dir)",
                config.path.display(),
                jobs_dir.display()
            )));
        }
        let scanned = watch::scan_jobs(jobs_dir)?;
        let (exes, jobs_sha256) = (scanned.functions, scanned.digest);
        if config.worker.strict_modes {
            let owner = crate::privilege::owner_uid(&config)?;
            crate::privilege::check_file(&config.path, "config", owner)?;
            crate::privilege::check_file(jobs_dir, "jobs_dir", owner)?;
            for exe in exes.values() {
                crate::privilege::check_file(exe, "job executable", owner)?;
            }
        }
        if let Some(t) = crate::privilege::dropping_to(&config)? {
            // Root can read everything; the user it drops to must too, or every reload fails.
            use crate::privilege::{check_access, Need};
            check_access(&config.path, "config", &t, Need::Read)?;
            check_access(jobs_dir, "jobs_dir", &t, Need::ReadExec)?;
            for exe in exes.values() {
                check_access(exe, "job executable", &t, Need::ReadExec)?;
            }
            if let Ok(bin) = std::env::current_exe() {
                check_access(
                    &bin,
                    "the gearshift binary (it re-execs itself)",
                    &t,
                    Need::Exec,
                )?;
            }
        }
        let mut table = Table::default();
        for name in functions.names() {
            if let Some(f) = functions.get(name) {
                table.insert(
                    name.to_string(),
                    Runner::Rust(Arc::clone(f)),
                    config.timeout(name),
                );
            }
        }
        for (name, path) in exes {
            if table.contains(&name) {
                return Err(Error::Config(format!(
                    "\"{}\" would define function \"{name}\", which is already a built-in or Rust function (rename the file)",
                    path.display()
                )));
            }
            let timeout = config.timeout(&name);
            table.insert(name, Runner::Executable(path), timeout);
        }
        let mut warnings: Vec<String> = config
            .functions
            .keys()
            .filter(|name| !table.contains(name))
            .map(|name| {
                format!(
                    "{}: [functions.{name}] names no known function",
                    config.path.display()
                )
            })
            .collect();
        warnings.extend(scanned.warnings);
        Ok(Plan {
            config,
            table,
            jobs_sha256,
            warnings,
        })
    }
}

/// What the control loop is doing.
enum Phase {
    Running,
    /// Waiting for lanes to finish their jobs before re-exec.
    Draining {
        reason: RestartReason,
        requested_mono_us: u64,
    },
    /// Waiting for lanes to finish their jobs before exit.
    Stopping,
}

/// How [`run_with`] was reached, for a daemon started by `gearshift start`.
#[derive(Default)]
pub struct RunOptions {
    /// Gets one line `ready PID` once the worker holds the pidfile and serves.
    pub ready: Option<std::fs::File>,
    /// The executable, resolved before the daemon changed directory.
    pub exe: Option<PathBuf>,
    /// The argv for the next generation (a daemon re-execs as `run`, never as `start`).
    pub argv: Option<Vec<std::ffi::OsString>>,
    /// Log to this file (overrides `[log] file`).
    pub log_file: Option<PathBuf>,
}

/// Runs the worker in the foreground until it is stopped. Re-execs in place on SIGHUP and on
/// changes to the config or `jobs_dir`. Returns only with a start-up error: a stop ends the
/// process (exit 0 when graceful), so that the pidfile lock is the last thing released.
pub fn run(config_path: &Path, functions: Functions) -> Result<i32> {
    run_with(config_path, functions, RunOptions::default())
}

/// [`run`] with options.
pub fn run_with(config_path: &Path, functions: Functions, mut opts: RunOptions) -> Result<i32> {
    // Signals stay blocked in this thread until the handlers are in place and every helper
    // thread is spawned, so helpers inherit a blocked mask: a signal is then only ever taken by
    // this thread or a lane thread, and none is in flight to a helper when we exec.
    signals::block()?;
    // Descriptors inherited from whatever started us must not leak into job processes.
    crate::handover::close_inherited();
    let mut boot = Boot::detect();
    if boot.inherited.is_none() {
        if let Some(exe) = opts.exe.take() {
            boot.exe = exe;
        }
        if let Some(argv) = opts.argv.take() {
            boot.argv = argv;
        }
    }
    // A re-exec'd generation (already its user) logs to `--log-file` from its first line, so
    // an error in its start-up reaches the file, not only a stderr nobody reads.
    if boot.inherited.is_some() {
        if let Some(file) = &opts.log_file {
            let _ = crate::logging::set_file(file, None);
        }
    }
    let (sig_tx, sig_rx) = bounded::<Signal>(1024);
    let signal_thread = Signals::install(sig_tx)?;

    let inherited = boot.inherited.clone().unwrap_or_default();
    let generation = inherited.generation + 1;
    crate::logging::set_generation(generation);
    let config_path = crate::config::absolute(config_path)?;
    // A re-exec'd image runs exactly the config text its predecessor validated; changes on disk
    // since then are picked up by the check right after start-up, validated like any other.
    let inherited_text = boot.inherited.as_ref().and_then(|i| i.config_text.clone());
    let plan = Plan::prepare_from(&config_path, &functions, inherited_text.as_deref())?;
    if boot.inherited.is_none() {
        // A fresh start of a binary that a deploy switched to, whose marker is still there:
        // that binary died before serving (and a supervisor or systemd started it again).
        if let Some((last_good, rb)) = crate::deploy::rollback_needed(&plan.config.worker.state_dir)
        {
            log::error!(
                "rolled back from {} to {}: {}",
                crate::deploy::short(&rb.from_sha),
                crate::deploy::short(&rb.to_sha),
                rb.reason
            );
            crate::deploy::clear_marker(&plan.config.worker.state_dir);
            log::logger().flush();
            // The descriptor stays open until the exec, so the file checked is the file run.
            use std::os::fd::AsRawFd;
            let path = PathBuf::from(format!("/proc/self/fd/{}", last_good.as_raw_fd()));
            return Err(reexec::exec_rollback(&path, &boot.argv, &rb));
        }
    }
    #[cfg(gearshift_crash_on_run)]
    {
        log::error!("built with GEARSHIFT_CRASH_ON_RUN: dying during start-up (rollback test)");
        log::logger().flush();
        std::process::abort();
    }
    let last_rollback = reexec::rollback_from_env().or_else(|| inherited.last_rollback.clone());
    crate::logging::set_level(plan.config.log.level);
    // Every file this process creates from here on, in every mode (not only under `start`).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(
        plan.config.worker.umask,
    ));
    // As root with a user to drop to: what that user will need is prepared through
    // descriptors, never by path (see `safefs` and `layout`), then privileges are dropped
    // before anything else is opened.
    let target = crate::privilege::dropping_to(&plan.config)?;
    let owner = target.as_ref().map(|t| (t.uid, t.gid));
    if let Some(file) = opts.log_file.as_ref().or(plan.config.log.file.as_ref()) {
        crate::logging::set_file(file, owner)?;
    }
    for w in &plan.warnings {
        log::warn!("{w}");
    }
    let state_dir = &plan.config.worker.state_dir;
    let layout = crate::layout::prepare(state_dir, target.as_ref())?;
    let pidfile = match boot
        .inherited
        .as_ref()
        .and_then(|i| Pidfile::adopt(i.pidfile_fd, &plan.config.pidfile()))
    {
        Some(p) => p,
        None => Pidfile::acquire(&layout.dir)?,
    };
    if target.is_some() && plan.config.worker.watch_binary {
        // The dropped worker cannot write state_dir: root keeps the binary it trusts now, for
        // a rollback after a deploy the worker switches to.
        if let Err(e) = crate::deploy::save_last_good(state_dir) {
            log::warn!("could not keep this binary as last-good ({e}): a failed deploy cannot be rolled back");
        }
    }
    if let (crate::config::Source::Spool(spool), Some(t)) = (&plan.config.source, &target) {
        crate::spool::hand_to(spool, t)?;
    }
    drop(layout);
    crate::privilege::settle(&plan.config)?;
    crate::reaper::become_subreaper();
    if boot.inherited.is_none() {
        // We hold the pidfile lock: whatever still carries our mark was left by a killed
        // predecessor, and must not run next to the jobs we are about to recover.
        crate::reaper::kill_leftovers(&plan.config.worker.state_dir);
    }
    crate::status::REJECTED.store(inherited.rejected, Ordering::Relaxed);
    let views = crate::status::ServerViews::default();
    let source = Arc::new(Source::open(&plan.config, generation, Arc::clone(&views))?);
    if let Some(fd) = boot
        .inherited
        .as_ref()
        .and_then(|i| crate::handover::carried(i.source_fd))
    {
        source.take_over(fd);
    }

    let now = now_ms();
    let state = Arc::new(State {
        pid: std::process::id(),
        generation,
        started_at_ms: if inherited.started_at_ms == 0 {
            now
        } else {
            inherited.started_at_ms
        },
        restarted_at_ms: inherited.restarted_at_ms,
        last_restart_reason: inherited.reason.clone(),
        restarts: inherited.restarts,
        binary: boot.exe.clone(),
        completed: inherited.completed.into(),
        failed: inherited.failed.into(),
        in_flight: 0.into(),
        restart_pause_us: 0.into(),
        first_claim_mono_us: 0.into(),
        generation_jobs: 0.into(),
        file_checks: 0.into(),
        running: std::sync::Mutex::new(vec![
            (false, String::new(), String::new());
            plan.config.worker.concurrency
        ]),
        inner: std::sync::Mutex::new(Inner {
            phase: "running",
            refusals: inherited.refusals,
            last_refused: inherited.last_refused.clone(),
            functions: plan.table.names(),
            config_path: plan.config.path.clone(),
            config_sha256: plan.config.sha256.clone(),
            source: plan.config.source.kind(),
            binary_sha256: inherited.binary.as_ref().map(|k| k.sha256.clone()),
            last_refused_deploy: inherited.last_refused_deploy.clone(),
            last_rollback: None,
            storage: None,
            warnings: plan.warnings.clone(),
            watch: None,
        }),
        servers: views,
    });
    let status_server = status::Server::start(&plan.config.status_socket(), Arc::clone(&state))?;
    let reaper = crate::reaper::Reaper::start(Arc::clone(&state))?;
    let plan_state_dir = plan.config.worker.state_dir.clone();

    let (touch_tx, touch_rx) = bounded::<Touched>(64);
    let inotify = boot
        .inherited
        .as_ref()
        .and_then(|i| Inotify::adopt(i.inotify_fd))
        .map(Ok)
        .unwrap_or_else(Inotify::new)
        .map(Arc::new);
    let mut poll_fallback = false;
    match &inotify {
        Ok(ino) => {
            let w = &plan.config.worker;
            let targets = watch::Targets {
                config: w.watch_config.then_some(plan.config.path.as_path()),
                jobs_dir: w.watch_jobs.then_some(w.jobs_dir.as_path()),
                queue: source.queue_dirs(),
                binary_dir: w.watch_binary.then(|| boot.exe.parent()).flatten(),
            };
            let waker = Arc::clone(&source);
            let unwatched = watch::start(ino, &targets, touch_tx, move || waker.wake())?;
            for e in [&unwatched.config, &unwatched.jobs].into_iter().flatten() {
                log::warn!(
                    "{e}; checking for changes every {}s instead",
                    POLL_FALLBACK.as_secs()
                );
                poll_fallback = true;
                if let Ok(mut i) = state.inner.lock() {
                    i.watch = Some(format!("polling: {e}"));
                }
            }
            if let Some(e) = unwatched.queue {
                log::warn!("{e}; checking for new jobs every second instead");
                poll_queue(&source)?;
            }
        }
        Err(e) => {
            log::warn!(
                "no inotify ({e}); checking files every {}s and the queue every second",
                POLL_FALLBACK.as_secs()
            );
            poll_fallback = true;
            if let Ok(mut i) = state.inner.lock() {
                i.watch = Some(format!("polling: no inotify ({e})"));
            }
            poll_queue(&source)?;
        }
    }
    // Spawns the hashing thread on a first start: before the mask is cleared, like every helper.
    let deploy = plan.config.worker.watch_binary.then(|| {
        let state = Arc::clone(&state);
        let worker_uid = crate::privilege::target(&plan.config)
            .ok()
            .flatten()
            .map(|t| t.uid.as_raw());
        Deploy::new(
            &boot.exe,
            &plan.config.path,
            inherited.binary.clone(),
            inherited.last_refused_deploy.clone(),
            worker_uid,
            move |sha| {
                if let Ok(mut i) = state.inner.lock() {
                    i.binary_sha256 = Some(sha.to_string());
                }
            },
        )
    });
    signals::clear_mask()?;

    let (recycle_tx, recycle_rx) = bounded::<RestartReason>(16);
    let mut deploy = deploy;
    if let (Some(d), Some(rb)) = (deploy.as_mut(), &last_rollback) {
        d.mark_bad(&rb.from_sha);
    }
    if let Ok(mut i) = state.inner.lock() {
        i.last_rollback = last_rollback.clone();
    }
    let mut ctl = Control {
        health: Arc::new(Health::default()),
        deploy,
        last_rollback,
        limits: Arc::new(Limits::new(&plan.config.worker)),
        recycle_tx,
        recycle_rx,
        started: Instant::now(),
        boot,
        functions,
        config_path,
        plan,
        source,
        state,
        children: Children::new(&plan_state_dir, Some(reaper.handle())),
        stop: Arc::new(AtomicBool::new(false)),
        lanes: Vec::new(),
        requested_mono_us: inherited.requested_mono_us,
        refused_digest: None,
        pidfile,
        status_server: Some(status_server),
        _signals: signal_thread,
        inotify: inotify.ok(),
        poll_fallback,
        notifier: Notifier::from_env(),
        ready: opts.ready.take(),
    };
    if generation == 1 {
        log::info!(
            "{} {} started (pid {}), {} lane(s) on {}: {}",
            crate::identity().0,
            crate::identity().1,
            std::process::id(),
            ctl.plan.config.worker.concurrency,
            ctl.plan.config.source.kind(),
            ctl.plan.table.names().join(", ")
        );
    } else {
        log::info!(
            "generation {generation} serving ({}): {}",
            inherited.reason,
            ctl.plan.table.names().join(", ")
        );
    }
    ctl.control_loop(&sig_rx, &touch_rx)
}

struct Control {
    health: Arc<Health>,
    deploy: Option<Deploy>,
    last_rollback: Option<crate::carried::Rollback>,
    limits: Arc<Limits>,
    recycle_tx: Sender<RestartReason>,
    recycle_rx: Receiver<RestartReason>,
    started: Instant,
    boot: Boot,
    functions: Functions,
    config_path: PathBuf,
    plan: Plan,
    source: Arc<Source>,
    state: Arc<State>,
    children: Children,
    stop: Arc<AtomicBool>,
    lanes: Vec<JoinHandle<()>>,
    requested_mono_us: u64,
    /// Digest of a config or jobs state already refused, so the same bad file is reported once.
    refused_digest: Option<String>,
    pidfile: Pidfile,
    status_server: Option<status::Server>,
    _signals: Signals,
    inotify: Option<Arc<Inotify>>,
    poll_fallback: bool,
    notifier: Option<Notifier>,
    ready: Option<std::fs::File>,
}

impl Control {
    fn control_loop(
        &mut self,
        sig_rx: &Receiver<Signal>,
        touch_rx: &Receiver<Touched>,
    ) -> Result<i32> {
        let (done_tx, done_rx) = bounded::<()>(1024);
        let recycle = self.recycle_rx.clone();
        // The binary's sha is computed in the background: look once it may be known, and for a
        // candidate dropped while we were starting.
        let mut binary_at: Option<Instant> = self
            .deploy
            .as_ref()
            .map(|_| Instant::now() + Duration::from_millis(200));
        let mut age = match self.limits.max_age {
            Some(a) => after(a.saturating_sub(self.started.elapsed())),
            None => never(),
        };
        self.spawn_lanes(&done_tx)?;
        self.notify("READY=1");
        // Serving: a deploy that switched to this binary has succeeded.
        crate::deploy::clear_marker(&self.plan.config.worker.state_dir);
        if let Some(mut f) = self.ready.take() {
            use std::io::Write;
            let _ = writeln!(f, "ready {}", std::process::id());
        }
        let watchdog = match self.notifier.as_ref().and_then(Notifier::watchdog_interval) {
            Some(every) => crossbeam_channel::tick(every),
            None => never(),
        };
        let mut phase = Phase::Running;
        let mut touch = touch_rx.clone();
        // Look once right away: the files may have changed between our exec and the watch.
        let mut check_at: Option<Instant> = Some(Instant::now());
        let mut first_touch: Option<Instant> = None;
        let mut live = self.lanes.len();
        let mut terms = 0;

        loop {
            let binary_timer = match binary_at {
                Some(t) => after(t.saturating_duration_since(Instant::now())),
                None => never(),
            };
            let timer = match (check_at, self.poll_fallback) {
                (Some(t), _) => after(t.saturating_duration_since(Instant::now())),
                (None, true) => after(POLL_FALLBACK),
                (None, false) => never(),
            };
            // A fault clears only after a quiet second, maybe when no job is left to notice.
            let health_timer = if self.health.degraded.load(Ordering::Acquire) {
                after(Duration::from_millis(250))
            } else {
                never()
            };
            select! {
                recv(health_timer) -> _ => self.health.recovered(&self.state),
                recv(watchdog) -> _ => self.notify("WATCHDOG=1"),
                recv(age) -> _ => {
                    age = never();
                    self.request_restart(&mut phase, RestartReason::MaxAge);
                }
                recv(recycle) -> reason => {
                    if let Ok(reason) = reason {
                        if !self.request_restart(&mut phase, reason) {
                            self.limits.refused.store(true, Ordering::Release);
                        }
                        self.limits.asked.store(false, Ordering::Release);
                    }
                }
                recv(sig_rx) -> sig => {
                    let Ok(sig) = sig else { return Err(Error::Msg("signal thread ended".into())) };
                    match sig {
                        Signal::SIGHUP => {
                            self.request_restart(&mut phase, RestartReason::Sighup);
                        }
                        Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT => {
                            terms += 1;
                            if terms > 1 {
                                let running = self.state.in_flight.load(Ordering::Relaxed);
                                log::warn!("{} again: exiting now; {running} interrupted job(s) will run again", sig.as_str());
                                self.children.kill_all();
                                log::logger().flush();
                                std::process::exit(1);
                            }
                            log::info!(
                                "{}: stopping after {} running job(s) finish (send it again to stop now)",
                                sig.as_str(),
                                self.state.in_flight.load(Ordering::Relaxed)
                            );
                            phase = Phase::Stopping;
                            self.state.set_phase("stopping");
                            self.notify("STOPPING=1");
                            self.halt_lanes();
                        }
                        Signal::SIGUSR1 => match crate::logging::reopen() {
                            Ok(Some(path)) => log::info!("SIGUSR1: reopened log file {}", path.display()),
                            Ok(None) => log::info!("SIGUSR1: logging to stderr, nothing to reopen"),
                            Err(e) => log::error!("SIGUSR1: {e}; still writing to the old file"),
                        },
                        other => log::info!("{}: ignored", other.as_str()),
                    }
                }
                recv(binary_timer) -> _ => {
                    binary_at = None;
                    let mut approved = false;
                    if let Some(d) = self.deploy.as_mut() {
                        match d.check() {
                            Step::Nothing => {}
                            Step::CheckIn(after) => binary_at = Some(Instant::now() + after),
                            Step::Approved => approved = true,
                        }
                        if let Ok(mut i) = self.state.inner.lock() {
                            i.last_refused_deploy = d.last_refused.clone();
                            i.binary_sha256 = d.running_sha();
                        }
                    }
                    if approved {
                        self.request_restart(&mut phase, RestartReason::BinaryChanged);
                    }
                }
                recv(touch) -> touched => {
                    let lost = match touched {
                        Ok(Touched::Binary) => {
                            binary_at.get_or_insert_with(|| Instant::now() + Duration::from_millis(20));
                            continue;
                        }
                        Ok(Touched::Lost(why)) => Some(why),
                        Err(_) => {
                            // Closed: it would be ready at once, forever.
                            touch = never();
                            Some("the watch thread ended".to_string())
                        }
                        Ok(_) => None,
                    };
                    if let Some(why) = lost {
                        if !self.poll_fallback {
                            self.watch_lost(&why);
                        }
                        continue;
                    }
                    let now = Instant::now();
                    let first = *first_touch.get_or_insert(now);
                    // Debounce, but never postpone by more than a second under a stream of events.
                    check_at = Some((now + DEBOUNCE).min(first + Duration::from_secs(1)));
                }
                recv(timer) -> _ => {
                    check_at = None;
                    first_touch = None;
                    if matches!(phase, Phase::Running) {
                        if let Some(reason) = self.changed_on_disk() {
                            self.request_restart(&mut phase, reason);
                        }
                    }
                }
                recv(done_rx) -> _ => {
                    live -= 1;
                    if live > 0 {
                        continue;
                    }
                    for t in self.lanes.drain(..) {
                        let _ = t.join();
                    }
                    match std::mem::replace(&mut phase, Phase::Running) {
                        Phase::Stopping => {
                            log::info!("stopped");
                            // Keep the pidfile lock until the process is gone (the spool lock
                            // and job processes go with it): `stop` returns when the lock is
                            // free, and a `start` right after must find nothing of ours left.
                            self.pidfile.clear();
                            log::logger().flush();
                            std::process::exit(0);
                        }
                        Phase::Draining { reason, requested_mono_us } => {
                            self.restart(reason, requested_mono_us);
                            // Still here: the restart was refused or execve failed.
                            self.notify("READY=1");
                        }
                        Phase::Running => log::error!("all lanes ended unexpectedly; starting them again"),
                    }
                    self.state.set_phase("running");
                    self.stop.store(false, Ordering::Release);
                    self.spawn_lanes(&done_tx)?;
                    live = self.lanes.len();
                }
            }
        }
    }

    /// The file watch failed: poll the files every [`POLL_FALLBACK`] and the queue every second
    /// from now on, and say so in the log and in `status`.
    fn watch_lost(&mut self, why: &str) {
        log::error!(
            "{why}; checking files every {}s and the queue every second instead",
            POLL_FALLBACK.as_secs()
        );
        self.poll_fallback = true;
        if let Err(e) = poll_queue(&self.source) {
            log::error!("{e}");
        }
        if let Ok(mut i) = self.state.inner.lock() {
            i.watch = Some(format!("polling: {why}"));
        }
    }

    /// Which watched state differs from the running one and is valid, if any.
    fn changed_on_disk(&mut self) -> Option<RestartReason> {
        self.state.file_checks.fetch_add(1, Ordering::Release);
        let cfg = std::fs::read(&self.config_path)
            .ok()
            .map(|b| crate::config::hex(&sha2::Sha256::digest(&b)));
        // A jobs_dir that does not scan (two files for one name, a file without #!) is a
        // change too: it is refused below, visibly, rather than ignored.
        let jobs = match watch::scan_jobs(&self.plan.config.worker.jobs_dir) {
            Ok(j) => j.digest,
            Err(e) => format!("invalid: {e}"),
        };
        let config_changed = cfg.as_ref().is_some_and(|d| *d != self.plan.config.sha256);
        let jobs_changed = jobs != self.plan.jobs_sha256;
        let reason = match (config_changed, jobs_changed) {
            (true, _) => RestartReason::ConfigChanged,
            (false, true) => RestartReason::JobsChanged,
            (false, false) => return None,
        };
        let digest = format!("{}/{jobs}", cfg.unwrap_or_default());
        if self.refused_digest.as_deref() == Some(digest.as_str()) {
            return None;
        }
        match Plan::prepare(&self.config_path, &self.functions) {
            Ok(_) => Some(reason),
            Err(e) => {
                self.refused_digest = Some(digest);
                self.refuse(reason, &e.to_string());
                None
            }
        }
    }

    /// Starts a restart unless the new state is invalid (then refused: false).
    fn request_restart(&mut self, phase: &mut Phase, reason: RestartReason) -> bool {
        match phase {
            Phase::Running => {}
            Phase::Draining { .. } => {
                log::debug!("{reason}: a restart is already under way");
                return true;
            }
            Phase::Stopping => return true,
        }
        let requested = crate::clock::monotonic_us();
        if let Err(e) = Plan::prepare(&self.config_path, &self.functions) {
            self.refuse(reason, &e.to_string());
            return false;
        }
        log::info!(
            "{reason}: restarting after {} running job(s) finish",
            self.state.in_flight.load(Ordering::Relaxed)
        );
        *phase = Phase::Draining {
            reason,
            requested_mono_us: requested,
        };
        self.state.set_phase("draining");
        self.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            crate::clock::monotonic_us()
        ));
        self.halt_lanes();
        true
    }

    /// Tells the service manager (if any) `message`, with a STATUS line.
    fn notify(&self, message: &str) {
        if let Some(n) = &self.notifier {
            let s = &self.state;
            n.send(&format!(
                "{message}\nSTATUS=generation {}, {} jobs completed, {} failed, {} running",
                s.generation,
                s.completed.load(Ordering::Relaxed),
                s.failed.load(Ordering::Relaxed),
                s.in_flight.load(Ordering::Relaxed)
            ));
        }
    }

    fn refuse(&self, reason: impl std::fmt::Display, error: &str) {
        log::error!(
            "{reason}: reload refused, keeping generation {}: {error}",
            self.state.generation
        );
        if let Ok(mut i) = self.state.inner.lock() {
            i.refusals += 1;
            i.last_refused = Some(Refusal {
                at_ms: now_ms(),
                reason: reason.to_string(),
                error: error.to_string(),
            });
        }
    }

    fn halt_lanes(&self) {
        self.stop.store(true, Ordering::Release);
        self.source.wake();
    }

    /// Every lane has exited: validate once more and re-exec. Returns only if that failed.
    fn restart(&mut self, reason: RestartReason, requested_mono_us: u64) {
        let plan = match Plan::prepare(&self.config_path, &self.functions) {
            Ok(p) => p,
            Err(e) => return self.refuse(reason, &e.to_string()),
        };
        self.state.set_phase("restarting");
        let refusals = self
            .state
            .inner
            .lock()
            .map(|i| i.refusals)
            .unwrap_or_default();
        let next = Inherited {
            generation: self.state.generation,
            pidfile_fd: self.pidfile.fd(),
            inotify_fd: self.inotify.as_ref().map_or(-1, |i| i.fd()),
            source_fd: -1,
            started_at_ms: self.state.started_at_ms,
            restarted_at_ms: now_ms(),
            reason: reason.to_string(),
            completed: self.state.completed.load(Ordering::Relaxed),
            failed: self.state.failed.load(Ordering::Relaxed),
            rejected: crate::status::REJECTED.load(Ordering::Relaxed),
            restarts: self.state.restarts + 1,
            refusals,
            // This restart succeeds: an older refusal is history (the count keeps it).
            last_refused: None,
            requested_mono_us,
            // Small enough for the environment (MAX_ARG_STRLEN is 128 KiB); else re-read.
            config_text: (plan.config.text.len() <= 64 * 1024).then(|| plan.config.text.clone()),
            binary: None,
            last_refused_deploy: self.deploy.as_ref().and_then(|d| d.last_refused.clone()),
            last_rollback: self.last_rollback.clone(),
        };
        let mut next = next;
        // Exec the path only if it holds a validated binary; else this very image again.
        let exe = match &self.deploy {
            Some(d) => {
                let (exe, known) = d.exec_target();
                let switching = known.as_ref().map(|k| &k.sha256) != d.running_sha().as_ref();
                if switching {
                    let state_dir = &plan.config.worker.state_dir;
                    match (crate::deploy::save_last_good(state_dir), d.running_sha(), &known) {
                        (Ok(Some(last_good)), Some(from_sha), Some(to)) => {
                            log::info!("deploy: the running binary is kept as {}", last_good.display());
                            let marker = crate::deploy::Marker {
                                from_sha,
                                to_sha: to.sha256.clone(),
                                at_ms: now_ms(),
                            };
                            if let Err(e) = crate::deploy::write_marker(state_dir, &marker) {
                                log::warn!("deploy: no rollback marker ({e}): a crash of the new binary cannot be rolled back");
                            }
                        }
                        (Ok(None), _, _) => {
                            log::warn!("deploy: no last-good binary in state_dir: no rollback possible")
                        }
                        (Err(e), _, _) => {
                            log::warn!("deploy: could not keep the running binary as last-good ({e}): no rollback possible")
                        }
                        _ => log::warn!("deploy: the running binary's sha is not known yet: no rollback possible"),
                    }
                }
                next.binary = known;
                exe
            }
            None => self.boot.exe.clone(),
        };
        drop(plan);
        log::info!(
            "{reason}: re-exec \"{}\" as generation {}",
            exe.display(),
            self.state.generation + 1
        );
        log::logger().flush();
        if let Some(s) = self.status_server.take() {
            s.stop();
        }
        let inherit_inotify = || match &self.inotify {
            Some(i) => i
                .keep_across_exec()
                .map_err(|e| Error::io("keeping inotify across exec", e)),
            None => Ok(()),
        };
        // Handed over as an open descriptor (closed again here if the exec fails).
        let handed = self.source.hand_over();
        if let Some(fd) = &handed {
            use std::os::fd::{AsFd, AsRawFd};
            if crate::handover::keep(fd.as_fd()).is_ok() {
                next.source_fd = fd.as_raw_fd();
            }
        }
        let err = match signals::block()
            .and_then(|()| self.pidfile.keep_across_exec())
            .and_then(|()| inherit_inotify())
        {
            Ok(()) => reexec::exec(&exe, &self.boot.exe, &self.boot.argv, &next),
            Err(e) => e,
        };
        // execve failed: carry on as we were.
        self.pidfile.close_on_exec();
        if let Some(i) = &self.inotify {
            i.close_on_exec();
        }
        self.refuse(reason, &err.to_string());
        self.resume_helpers();
    }

    /// Brings back the status server and signal thread after a failed execve.
    fn resume_helpers(&mut self) {
        match status::Server::start(&self.plan.config.status_socket(), Arc::clone(&self.state)) {
            Ok(s) => self.status_server = Some(s),
            Err(e) => log::error!("status socket: {e}"),
        }
        if let Err(e) = signals::clear_mask() {
            log::error!("{e}");
        }
    }

    fn spawn_lanes(&mut self, done_tx: &Sender<()>) -> Result<()> {
        let names: Vec<(String, Option<Duration>)> = self
            .plan
            .table
            .iter()
            .map(|(name, (_, timeout))| (name.clone(), *timeout))
            .collect();
        for index in 0..self.plan.config.worker.concurrency {
            let lane = self.source.lane(index, &names)?;
            let ctx = LaneContext {
                index,
                table: self.plan.table.clone(),
                state: Arc::clone(&self.state),
                stop: Arc::clone(&self.stop),
                children: self.children.clone(),
                max_payload: self.plan.config.worker.max_payload_bytes,
                requested_mono_us: self.requested_mono_us,
                limits: Arc::clone(&self.limits),
                recycle: self.recycle_tx.clone(),
                health: Arc::clone(&self.health),
            };
            let done = done_tx.clone();
            let t = std::thread::Builder::new()
                .name(format!("lane-{index}"))
                .spawn(move || {
                    // Reports the exit even if the lane panics, so a drain never waits forever.
                    let _done = DoneGuard(done);
                    ctx.serve(lane);
                })
                .map_err(|e| Error::io("spawning a lane thread", e))?;
            self.lanes.push(t);
        }
        // Only the first claim after a re-exec measures the restart pause.
        self.requested_mono_us = 0;
        Ok(())
    }
}

/// This generation's recycling limits, each raised by its own random splay.
struct Limits {
    max_jobs: u64,
    max_rss_bytes: u64,
    max_age: Option<Duration>,
    /// A lane reached a limit and asked the control loop to recycle; lanes claim nothing
    /// until it has decided (it drains, or it refused).
    asked: AtomicBool,
    /// The control loop refused a recycle in this generation (the files on disk are invalid):
    /// the limits are not asked about again until the next generation.
    refused: AtomicBool,
}

impl Limits {
    fn new(w: &crate::config::Worker) -> Limits {
        let splay = |x: f64| x * (1.0 + w.recycle_splay * random_fraction());
        Limits {
            max_jobs: if w.max_jobs == 0 {
                0
            } else {
                splay(w.max_jobs as f64).round() as u64
            },
            max_rss_bytes: if w.max_rss_mb == 0 {
                0
            } else {
                splay((w.max_rss_mb << 20) as f64) as u64
            },
            max_age: w
                .max_age
                .map(|a| a.mul_f64(1.0 + w.recycle_splay * random_fraction())),
            asked: AtomicBool::new(false),
            refused: AtomicBool::new(false),
        }
    }
}

/// A number in [0, 1) that differs between processes and calls (splay; not for secrets).
fn random_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// Resident memory of this process, from /proc/self/statm.
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok()??;
    Some(pages * u64::try_from(page).ok()?)
}

/// Wakes idle lanes every second, for a queue that cannot be watched.
fn poll_queue(source: &Arc<Source>) -> Result<()> {
    let weak = Arc::downgrade(source);
    crate::signals::spawn_helper("queue-poll", move || {
        while let Some(s) = weak.upgrade() {
            s.wake();
            drop(s);
            std::thread::sleep(Duration::from_secs(1));
        }
    })
    .map(drop)
    .map_err(|e| Error::io("spawning the queue poll thread", e))
}

struct DoneGuard(Sender<()>);

impl Drop for DoneGuard {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// What a lane thread needs to run jobs.
struct LaneContext {
    index: usize,
    table: Table,
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    children: Children,
    max_payload: usize,
    requested_mono_us: u64,
    limits: Arc<Limits>,
    recycle: Sender<RestartReason>,
    health: Arc<Health>,
}

/// Storage and resource health, shared by the lanes of a generation.
#[derive(Default)]
struct Health {
    /// Lanes holding an outcome they could not store yet.
    holding: std::sync::atomic::AtomicUsize,
    /// A fault is recorded in `status` (spares the lock on every job when all is well).
    degraded: AtomicBool,
    /// When the last fault was met (unix ms): the fault is cleared only after a quiet second,
    /// so a condition that comes and goes is said once, not once per job.
    last_failure_ms: std::sync::atomic::AtomicU64,
}

/// How long no fault must be met before the worker says it works again.
const HEALTHY_AFTER_MS: u64 = 1000;

fn error_errno(e: &Error) -> Option<i32> {
    match e {
        Error::Io { source, .. } => source.raw_os_error(),
        _ => None,
    }
}

impl Health {
    /// Records a failure: true if it is a storage or resource fault (then the worker is
    /// degraded, said once in the log, and shown in `status`), false for any other error.
    /// `errno` None: the caller already knows it is a resource fault.
    fn failed(&self, state: &State, message: &str, errno: Option<i32>) -> bool {
        if errno.is_some_and(|e| !crate::error::is_transient_errno(e)) {
            return false;
        }
        if let Ok(mut i) = state.inner.lock() {
            self.degraded.store(true, Ordering::Release);
            self.last_failure_ms.store(now_ms(), Ordering::Release);
            if i.storage.is_none() {
                log::error!(
                    "degraded: {message}; claiming no new jobs, keeping what is held and retrying until it works"
                );
                i.storage = Some((message.to_string(), now_ms()));
            }
        }
        true
    }

    /// Clears the fault once whatever failed works again (and no lane still holds a result).
    fn recovered(&self, state: &State) {
        if !self.degraded.load(Ordering::Acquire)
            || self.holding.load(Ordering::Acquire) > 0
            || now_ms().saturating_sub(self.last_failure_ms.load(Ordering::Acquire))
                < HEALTHY_AFTER_MS
        {
            return;
        }
        self.degraded.store(false, Ordering::Release);
        if let Ok(mut i) = state.inner.lock() {
            if let Some((error, since)) = i.storage.take() {
                log::info!(
                    "storage works again after {:.1}s ({error}); serving",
                    now_ms().saturating_sub(since) as f64 / 1000.0
                );
            }
        }
    }
}

impl LaneContext {
    /// Between jobs: asks for a recycle when this generation has run `max_jobs` jobs or the
    /// process has grown over `max_rss_mb` (read at most every 200 ms per lane).
    fn check_limits(&self, last_rss_check: &mut Instant) {
        let done = self.state.generation_jobs.fetch_add(1, Ordering::Relaxed) + 1;
        let mut reason = None;
        if self.limits.max_jobs > 0 && done >= self.limits.max_jobs {
            reason = Some(RestartReason::MaxJobs);
        }
        if self.limits.max_rss_bytes > 0 && last_rss_check.elapsed() >= Duration::from_millis(200) {
            *last_rss_check = Instant::now();
            if resident_bytes().is_some_and(|rss| rss > self.limits.max_rss_bytes) {
                reason = Some(RestartReason::MaxRss);
            }
        }
        // Only the control loop decides; lanes ask once, and claim nothing until it has
        // (the control loop validates before it drains; lanes would run past the limit
        // meanwhile).
        if let Some(reason) = reason {
            if !self.limits.refused.load(Ordering::Acquire)
                && !self.limits.asked.swap(true, Ordering::AcqRel)
            {
                let _ = self.recycle.try_send(reason);
            }
        }
    }

    fn serve(&self, mut lane: Box<dyn Lane>) {
        let mut last_rss_check = Instant::now() - Duration::from_secs(1);
        let mut backoff = Duration::from_millis(100);
        loop {
            // A recycle was asked for: wait for the control loop's decision.
            while self.limits.asked.load(Ordering::Acquire) && !self.stop.load(Ordering::Acquire) {
                std::thread::sleep(Duration::from_millis(2));
            }
            // Storage fails and another lane holds a result it cannot store yet: claim
            // nothing more until that result is stored.
            while self.health.holding.load(Ordering::Acquire) > 0
                && !self.stop.load(Ordering::Acquire)
            {
                self.pause(Duration::from_millis(100));
            }
            let mut job = match lane.next(&self.stop) {
                Ok(Some(job)) => job,
                Ok(None) => break,
                Err(e) => {
                    if !self
                        .health
                        .failed(&self.state, &e.to_string(), error_errno(&e))
                    {
                        log::error!("{e}; retrying in {} ms", backoff.as_millis());
                    }
                    self.pause(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            if self.state.first_claim_mono_us.load(Ordering::Relaxed) == 0 {
                // The pause is stored before the first claim is published, so a reader that
                // sees the claim also sees the pause.
                let now = crate::clock::monotonic_us();
                if self.requested_mono_us != 0 {
                    let pause = now.saturating_sub(self.requested_mono_us).max(1);
                    let _ = self.state.restart_pause_us.compare_exchange(
                        0,
                        pause,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                }
                let _ = self.state.first_claim_mono_us.compare_exchange(
                    0,
                    now,
                    Ordering::Release,
                    Ordering::Relaxed,
                );
            }
            self.state.in_flight.fetch_add(1, Ordering::Relaxed);
            self.state
                .set_running(self.index, Some((&job.id, &job.function)));
            let started = Instant::now();
            let Some(outcome) = self.run_job(&job, lane.as_mut()) else {
                // Given back unrun (stopping while it could not be started).
                self.state.set_running(self.index, None);
                self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
                continue;
            };
            // The payload is no longer needed: free it before the result is encoded, so a
            // lane holds at most about twice a large payload (result + its packet).
            job.payload = Vec::new();
            let took = started.elapsed();
            match &outcome {
                Ok(_) => log::debug!("job {} {}: done in {took:?}", job.id, job.function),
                Err(e) => log::warn!("job {} {}: failed in {took:?}: {e}", job.id, job.function),
            }
            self.store_outcome(&job, &outcome, lane.as_mut());
            let counter = if outcome.is_ok() {
                &self.state.completed
            } else {
                &self.state.failed
            };
            counter.fetch_add(1, Ordering::Relaxed);
            self.state.set_running(self.index, None);
            self.state.in_flight.fetch_sub(1, Ordering::Relaxed);
            self.check_limits(&mut last_rss_check);
        }
        if let Err(e) = lane.close() {
            log::warn!("closing lane: {e}");
        }
    }

    /// Runs the job; a start that fails for want of a resource (descriptors, processes) is
    /// retried after a pause, not failed. None: the job was given back unrun, because the
    /// worker stops meanwhile.
    fn run_job(&self, job: &Claimed, lane: &mut dyn Lane) -> Option<JobResult> {
        let mut backoff = Duration::from_millis(50);
        loop {
            let outcome = self.execute(job, lane.progress());
            match &outcome {
                Err(e) if e.is_transient() => {
                    self.health.failed(&self.state, &e.message, None);
                    if self.stop.load(Ordering::Acquire) && lane.release(job) {
                        return None;
                    }
                    self.pause_always(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                _ => {
                    self.health.recovered(&self.state);
                    return Some(outcome);
                }
            }
        }
    }

    /// Stores the outcome. A result that cannot be stored for a storage fault (a full disk, no
    /// descriptors, an I/O error) is never thrown away: it is kept and written again, from
    /// memory into a new file, with backoff, while the other lanes claim nothing; the fault is
    /// shown in `status` and said once in the log. A second TERM still exits at once (the job
    /// then runs again at the next start).
    fn store_outcome(&self, job: &Claimed, outcome: &JobResult, lane: &mut dyn Lane) {
        let mut backoff = Duration::from_millis(100);
        let mut holding = false;
        loop {
            match lane.finish(job, outcome) {
                Ok(()) => break,
                Err(e) => {
                    let errno = error_errno(&e);
                    if !self.health.failed(&self.state, &e.to_string(), errno) {
                        log::error!(
                            "job {} {}: could not report its outcome: {e}",
                            job.id,
                            job.function
                        );
                        break;
                    }
                    if !holding {
                        holding = true;
                        self.health.holding.fetch_add(1, Ordering::AcqRel);
                    }
                    self.pause_always(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        if holding {
            self.health.holding.fetch_sub(1, Ordering::AcqRel);
        }
        self.health.recovered(&self.state);
    }

    /// Sleeps `d` whatever the stop flag says (a result waiting to be stored is not dropped).
    fn pause_always(&self, d: Duration) {
        std::thread::sleep(d);
    }

    /// Sleeps up to `d`, returning early when the lane is asked to stop.
    fn pause(&self, d: Duration) {
        let until = Instant::now() + d;
        while Instant::now() < until && !self.stop.load(Ordering::Acquire) {
            std::thread::sleep(
                Duration::from_millis(20).min(until.saturating_duration_since(Instant::now())),
            );
        }
    }

    fn execute(
        &self,
        claimed: &Claimed,
        progress: &mut dyn crate::functions::Progress,
    ) -> JobResult {
        if claimed.payload.len() > self.max_payload {
            return Err(JobError::new(format!(
                "payload is {} bytes, over max_payload_bytes ({})",
                claimed.payload.len(),
                self.max_payload
            )));
        }
        let Some((runner, timeout)) = self.table.get(&claimed.function) else {
            return Err(JobError::new(format!(
                "unknown function \"{}\" (this worker has: {})",
                claimed.function,
                self.table.names().join(", ")
            )));
        };
        let mut job = Job {
            id: &claimed.id,
            function: &claimed.function,
            unique: &claimed.unique,
            payload: &claimed.payload,
            deadline: timeout.map(|t| Instant::now() + t),
            progress,
        };
        match runner {
            Runner::Rust(f) => match catch_unwind(AssertUnwindSafe(|| f.call(&mut job))) {
                Ok(r) => r,
                Err(panic) => {
                    let msg = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    Err(JobError::new(format!("function panicked: {msg}")))
                }
            },
            Runner::Executable(path) => {
                executable::run(path, &mut job, *timeout, self.max_payload, &self.children)
            }
        }
    }
}

/// The functions table as a map of name to description, for `check`.
pub fn describe(table: &Table) -> BTreeMap<String, String> {
    table
        .iter()
        .map(|(name, (runner, timeout))| {
            let what = match runner {
                Runner::Rust(_) => "rust".to_string(),
                Runner::Executable(p) => p.display().to_string(),
            };
            let t = timeout
                .map(|t| format!(" (timeout {t:?})"))
                .unwrap_or_default();
            (name.clone(), format!("{what}{t}"))
        })
        .collect()
}

use sha2::Digest as _;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A property test over hostile numbers: whatever `Config::parse` accepts, the time and
    /// size arithmetic a generation does with it (splayed limits, deadlines, the age timer)
    /// must not panic. Values are drawn from edge cases and a seeded generator.
    #[test]
    fn accepted_numbers_never_break_the_arithmetic() {
        let edges = [
            "0",
            "1",
            "-1",
            "0.5",
            "1e19",
            "1.8e19",
            "1e300",
            "nan",
            "inf",
            "-inf",
            "18446744073709551615",
            "9223372036854775807",
            "4294967295",
            "\"0s\"",
            "\"1ms\"",
            "\"3650d\"",
            "\"3651d\"",
            "\"200000000000000d\"",
            "\"1e19s\"",
            "\"0.0001ms\"",
        ];
        let keys = [
            ("worker", "max_jobs"),
            ("worker", "max_rss_mb"),
            ("worker", "max_age"),
            ("worker", "recycle_splay"),
            ("worker", "max_payload_bytes"),
            ("source", "retain_results"),
            ("source", "max_attempts"),
            ("functions.f", "timeout"),
        ];
        let mut seed = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut accepted = 0;
        for round in 0..2000 {
            let mut sections: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for (section, key) in keys {
                if next() % 3 != 0 {
                    continue;
                }
                let value = if round % 2 == 0 {
                    edges[(next() % edges.len() as u64) as usize].to_string()
                } else {
                    match next() % 5 {
                        0 => (1 + next() % 10_000).to_string(),
                        1 => (next() >> (next() % 64)).to_string(),
                        2 => format!("{:.3}", (next() % 2000) as f64 / 1000.0),
                        3 => format!("{:e}", f64::from_bits(next() >> 2)),
                        _ => format!("\"{}s\"", 1 + next() % 400_000_000),
                    }
                };
                sections
                    .entry(section)
                    .or_default()
                    .push(format!("{key} = {value}"));
            }
            let text: String = sections
                .iter()
                .map(|(s, lines)| format!("[{s}]\n{}\n", lines.join("\n")))
                .collect();
            let Ok(cfg) = Config::parse(Path::new("/gs/config.toml"), text.as_bytes()) else {
                continue;
            };
            accepted += 1;
            let limits = Limits::new(&cfg.worker);
            if let Some(a) = limits.max_age {
                let _ = after(a.saturating_sub(Duration::from_millis(1)));
            }
            for f in cfg.functions.values() {
                if let Some(t) = f.timeout {
                    let _ = Instant::now() + t;
                }
            }
            let _ = limits.max_rss_bytes.saturating_add(limits.max_jobs);
        }
        assert!(
            accepted > 100,
            "the generator should produce valid configs too ({accepted})"
        );
    }
}
