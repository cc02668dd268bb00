//! The worker: a control loop on the main thread and `concurrency` lane threads. This file is
//! the start-up of a generation (`run_with`); `control.rs` is the control loop, `lane.rs` the
//! lanes (with recycling limits and storage health), `plan.rs` one validated generation.
//!
//! Lane threads claim a job, run it, report its outcome, and look at the shared stop flag only
//! between jobs. The main thread owns every decision: it receives signals, file-watch events and
//! lane exits over channels, and when a restart is due it validates the new state, sets the stop
//! flag, waits for every lane to finish its job and exit, validates again, and re-execs.
//!
//! Architecture invariant: a reload never interrupts a job. The only ways a running job ends
//! early are its own timeout and a second SIGTERM/SIGINT (an operator's "now").

use crate::kinds::RestartReason;
use crate::restart::carried::Inherited;
use crate::shutdown::Switch;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::bounded;

use crate::clock::now_ms;
use crate::error::Result;
use crate::jobs::executable::Children;
use crate::jobs::functions::Functions;
use crate::ops::notify::Notifier;
use crate::ops::pidfile::Pidfile;
use crate::ops::signals::{self, Signals};
use crate::restart::deploy::Deploy;
use crate::restart::reexec::{self, Boot};
use crate::status::{self, Inner, State};
use crate::watch::inotify::Inotify;
use crate::watch::{self, Touched};

mod control;
mod event;
mod lane;
mod plan;
mod restart;

use control::{poll_queue, Control, POLL_FALLBACK};
use event::Event;
use lane::{Health, Limits};
pub use plan::{describe, Plan};

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
pub fn run_with(config_path: &Path, functions: Functions, mut opts: RunOptions) -> Result<i32> {
    // Signals stay blocked in this thread until the handlers are in place and every helper
    // thread is spawned, so helpers inherit a blocked mask: a signal is then only ever taken by
    // this thread or a lane thread, and none is in flight to a helper when we exec.
    signals::block()?;
    // Descriptors inherited from whatever started us must not leak into job processes.
    crate::ops::handover::close_inherited();
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
            let _ = crate::ops::logging::set_file(file, None);
        }
    }
    // One channel into the control loop for everything other threads report.
    let (events_tx, events_rx) = bounded::<Event>(1024);
    {
        // A helper thread that dies is noticed (the control loop replaces the generation).
        let tx = events_tx.clone();
        signals::on_thread_death(move |name| {
            let _ = tx.try_send(Event::ThreadDied(name.to_string()));
        });
    }
    let signal_thread = {
        let tx = events_tx.clone();
        Signals::install(move |sig| tx.send(Event::Signal(sig)).is_ok())?
    };

    let inherited = boot.inherited.clone().unwrap_or_default();
    let generation = inherited.generation + 1;
    crate::ops::logging::set_generation(generation);
    let config_path = crate::config::absolute(config_path)?;
    // A re-exec'd image runs exactly the config text its predecessor validated; changes on disk
    // since then are picked up by the check right after start-up, validated like any other.
    let inherited_text = boot.inherited.as_ref().and_then(|i| i.config_text.clone());
    // And the jobs_dir it validated: files being written there meanwhile are looked at once
    // serving, never a reason for this generation to fail at start-up.
    let handed_jobs = crate::ops::handover::read_memfd(inherited.jobs_fd, "jobs", 64 << 20)
        .and_then(|data| serde_json::from_slice::<crate::watch::Jobs>(&data).ok());
    let plan = Plan::prepare_from(
        &config_path,
        &functions,
        inherited_text.as_deref(),
        handed_jobs,
    )?;
    crate::ops::logging::set_level(plan.config.log.level);
    crate::ops::logging::set_format(plan.config.log.json, plan.config.log.jobs);
    if boot.inherited.is_none() {
        // A fresh start of a binary that a deploy switched to, whose marker is still there:
        // that binary died before serving (and a supervisor or systemd started it again).
        if let Some((last_good, rb)) =
            crate::restart::rollback::rollback_needed(&plan.config.worker.state_dir)
        {
            log::error!(
                "rolled back from {} to {}: {}",
                crate::restart::deploy::short(&rb.from_sha),
                crate::restart::deploy::short(&rb.to_sha),
                rb.reason
            );
            crate::restart::rollback::clear_marker(&plan.config.worker.state_dir);
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
    let fresh_rollback = reexec::rollback_from_env();
    let last_rollback = fresh_rollback
        .clone()
        .or_else(|| inherited.last_rollback.clone());
    // Every file this process creates from here on, in every mode (not only under `start`).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(
        plan.config.worker.umask,
    ));
    // As root with a user to drop to: what that user will need is prepared through
    // descriptors, never by path (see `safefs` and `layout`), then privileges are dropped
    // before anything else is opened.
    let target = crate::ops::privilege::dropping_to(&plan.config)?;
    let owner = target.as_ref().map(|t| (t.uid, t.gid));
    if let Some(file) = opts.log_file.as_ref().or(plan.config.log.file.as_ref()) {
        crate::ops::logging::set_file(file, owner)?;
    }
    for w in &plan.warnings {
        log::warn!("{w}");
    }
    let state_dir = &plan.config.worker.state_dir;
    let layout = crate::ops::layout::prepare(state_dir, target.as_ref())?;
    if boot.inherited.is_none() {
        crate::ops::layout::record_state_dir(&config_path, state_dir);
    }
    let pidfile = match boot
        .inherited
        .as_ref()
        .and_then(|i| Pidfile::adopt(i.pidfile_fd, &plan.config.pidfile()))
    {
        Some(p) => p,
        None => Pidfile::acquire(&layout.dir)?,
    };
    // Bound before privileges drop (a port under 1024 needs root), and once: the socket is
    // handed across every re-exec.
    let mut start_warnings = Vec::new();
    let metrics_listener = metrics_listener(&plan, boot.inherited.as_ref(), &mut start_warnings)?;
    if target.is_some() && plan.config.worker.watch_binary {
        // The dropped worker cannot write state_dir: root keeps the binary it trusts now, for
        // a rollback after a deploy the worker switches to.
        if let Err(e) = crate::restart::rollback::save_last_good(state_dir) {
            log::warn!("could not keep this binary as last-good ({e}): a failed deploy cannot be rolled back");
        }
    }
    if let (crate::config::Source::Spool(spool), Some(t)) = (&plan.config.source, &target) {
        crate::source::spool::hand_to(spool, t)?;
    }
    drop(layout);
    crate::ops::privilege::settle(&plan.config)?;
    crate::jobs::reaper::become_subreaper();
    if boot.inherited.is_none() {
        // We hold the pidfile lock: whatever still carries our mark was left by a killed
        // predecessor, and must not run next to the jobs we are about to recover.
        crate::jobs::reaper::kill_leftovers(&plan.config.worker.state_dir);
    }
    crate::status::REJECTED.store(inherited.rejected, Ordering::Relaxed);
    let views = crate::status::ServerViews::default();
    let source = crate::source::open(&plan.config, generation, Arc::clone(&views))?;
    if let Some(fd) = boot.inherited.as_ref().and_then(|i| i.source_fd) {
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
            status::LaneSlot::default();
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
            restart_pending: None,
            metrics: metrics_listener
                .as_ref()
                .and_then(|l| l.local_addr().ok())
                .map(|a| a.to_string()),
        }),
        servers: views,
        metrics: crate::metrics::Metrics::default(),
    });
    count_start(
        &state,
        &plan,
        boot.inherited.as_ref(),
        fresh_rollback.is_some(),
    );
    if let Ok(mut i) = state.inner.lock() {
        i.warnings.extend(start_warnings);
    }
    let reaper = {
        let state = Arc::clone(&state);
        crate::jobs::reaper::Reaper::start(move || state.running_ids())?
    };
    let plan_state_dir = plan.config.worker.state_dir.clone();

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
                queue: source.watch_dirs(),
                binary_dir: w.watch_binary.then(|| boot.exe.parent()).flatten(),
            };
            let waker = Arc::clone(&source);
            let tx = events_tx.clone();
            let report = move |t: Touched| {
                // A lost event would be a change unseen: wait for room rather than drop one.
                let _ = tx.send(Event::Touched(t));
            };
            let unwatched = watch::start(ino, &targets, report, move || waker.wake())?;
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
    // Serves status once what it reports is known (how files are watched among it).
    let render: crate::metrics::http::Render = {
        let (state, source) = (Arc::clone(&state), Arc::clone(&source));
        Arc::new(move || state.metrics_text(source.queue_stats()))
    };
    let status_server = status::Server::start(
        &plan.config.status_socket(),
        Arc::clone(&state),
        Arc::clone(&render),
    )?;
    let metrics_server = match metrics_listener {
        Some(l) => Some(crate::metrics::http::Server::start(l, Arc::clone(&render))?),
        None => None,
    };
    // Spawns the hashing thread on a first start: before the mask is cleared, like every helper.
    let deploy = plan.config.worker.watch_binary.then(|| {
        let state = Arc::clone(&state);
        let worker_uid = crate::ops::privilege::target(&plan.config)
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
        events: events_tx.clone(),
        started: Instant::now(),
        boot,
        functions,
        config_path,
        plan,
        source,
        state,
        children: Children::new(&plan_state_dir, Some(reaper.handle())),
        stop: Switch::default(),
        lanes: Vec::new(),
        requested_mono_us: inherited.requested_mono_us,
        refused_digest: None,
        pidfile,
        status_server: Some(status_server),
        metrics_server,
        render,
        _signals: signal_thread,
        inotify: inotify.ok(),
        poll_fallback,
        notifier: Notifier::from_env(),
        ready: opts.ready.take(),
        exit_for_supervisor: false,
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
    ctl.control_loop(&events_rx)
}

/// The `/metrics` listening socket: the one handed over, or a new one. A reload that switches
/// metrics off closes it; one whose address cannot be bound runs without (a first start fails).
fn metrics_listener(
    plan: &Plan,
    inherited: Option<&Inherited>,
    warnings: &mut Vec<String>,
) -> Result<Option<std::net::TcpListener>> {
    let carried = inherited.and_then(|i| i.metrics_listen_fd);
    let Some(m) = &plan.config.metrics else {
        drop(crate::ops::handover::adopt(carried, |what| {
            what.to_string_lossy().starts_with("socket:")
        }));
        return Ok(None);
    };
    match crate::metrics::http::listener(m.listen, carried) {
        Ok(l) => Ok(Some(l)),
        Err(e) if inherited.is_none() => Err(e),
        Err(e) => {
            log::error!("{e}; no metrics in this generation");
            warnings.push(format!("{e}; no metrics in this generation"));
            Ok(None)
        }
    }
}

/// Takes over the counters the previous generation carried, and counts this start: a restart
/// by its reason, a deploy that switched or was rolled back.
fn count_start(state: &State, plan: &Plan, inherited: Option<&Inherited>, rolled_back: bool) {
    let metrics = &state.metrics;
    if let Some(i) = inherited {
        let carried = crate::ops::handover::read_memfd(i.metrics_fd, "metrics", 256 << 20)
            .and_then(|data| serde_json::from_slice(&data).ok());
        if let Some(c) = carried {
            metrics.restore(&c);
        }
        metrics.restarted(&i.reason);
        if i.reason == RestartReason::BinaryChanged.as_str() {
            metrics.deploy("switched");
        }
    }
    if rolled_back {
        metrics.deploy("rolled_back");
    }
    metrics.declare(plan.table.names());
}
