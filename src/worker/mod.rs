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

use crate::shutdown::Switch;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::bounded;

use crate::error::Result;
use crate::jobs::executable::Children;
use crate::jobs::functions::Functions;
use crate::ops::notify::Notifier;
use crate::ops::signals;
use crate::restart::reexec::{self};

mod candidate;
mod control;
mod event;
mod helpers;
mod lane;
mod lanes;
mod limits;
mod manager;
mod plan;
mod restart;
mod startup;
mod touched;
mod verdicts;

use control::Control;
use event::Event;
use lane::{Health, Limits};
pub use plan::{describe, Plan};
use startup::{
    answers, count_start, detect_boot, log_start, new_state, open_source, prepare_plan,
    roll_back_if_needed, settle_as_root,
};

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
    startup::settle_process();
    let boot = detect_boot(&mut opts)?;
    // One channel into the control loop for everything other threads report.
    let (events_tx, events_rx) = bounded::<Event>(1024);
    {
        // A helper thread that dies is noticed (the control loop replaces the generation).
        let tx = events_tx.clone();
        signals::on_thread_death(move |name| {
            let _ = tx.try_send(Event::ThreadDied(name.to_string()));
        });
    }
    let inherited = boot.inherited.clone().unwrap_or_default();
    let generation = inherited.generation + 1;
    crate::ops::logging::set_generation(generation);
    let config_path = crate::config::absolute(config_path)?;
    let plan = prepare_plan(&boot, &config_path, &functions)?;
    roll_back_if_needed(&plan, &boot, opts.ready.as_ref())?;
    let fresh_rollback = reexec::rollback_from_env();
    let last_rollback = fresh_rollback
        .clone()
        .or_else(|| inherited.last_rollback.clone());
    let (pidfile, metrics_listener, start_warnings) =
        settle_as_root(&plan, &boot, opts.log_file.as_deref(), &config_path)?;
    startup::crash_if_built_to();
    crate::status::REJECTED.store(inherited.rejected, Ordering::Relaxed);
    let (source, views, ingress) = open_source(&plan, &boot, &inherited, generation)?;

    let state = new_state(
        &plan,
        &boot,
        &inherited,
        metrics_listener.as_ref(),
        views,
        ingress,
    );
    let rolled_back = fresh_rollback.is_some();
    if let Ok(mut i) = state.inner.lock() {
        i.warnings.extend(start_warnings);
        i.last_rollback = last_rollback.clone();
    }
    let plan_state_dir = plan.config.worker.state_dir.clone();
    let job_oom_score_adj = plan.config.worker.job_oom_score_adj;
    let inotify = helpers::inotify(&boot);
    let reaper = crate::jobs::reaper::Reaper::new();
    let (render, counts) = answers(&state, &source);
    let resumed = boot.inherited.is_some();
    let reason = inherited.reason.clone();
    let limits = Limits::for_generation(&plan.config.worker, &state);
    let mut ctl = Control {
        health: Arc::new(Health::default()),
        deploy: None,
        last_rollback,
        limits: Arc::new(limits),
        events: events_tx.clone(),
        started: Instant::now(),
        boot,
        functions,
        config_path,
        plan,
        source,
        state,
        children: Children::new(&plan_state_dir, job_oom_score_adj, Some(reaper.handle())),
        stop: Switch::default(),
        lanes: Vec::new(),
        requested_mono_us: inherited.requested_mono_us,
        refused_digest: None,
        look_failing: false,
        prepared: None,
        pidfile,
        status_server: None,
        metrics_server: None,
        render,
        counts,
        signals: None,
        inotify: None,
        poll_fallback: false,
        notifier: Notifier::from_env(),
        ready: opts.ready.take(),
        exit_for_supervisor: false,
        abandoned: 0,
        abandon_held_by: None,
        verdicts: Default::default(),
    };
    let mut helpers = helpers::Helpers {
        reaper,
        inotify,
        metrics_listener,
        inherited,
        signals: None,
    };
    let prepared = helpers::prepare_helpers(&mut ctl, &mut helpers);
    // A re-exec'd generation claims first and starts its helper threads while the lanes serve
    // (their descriptors are taken above: lanes short of descriptors cannot starve them).
    if resumed {
        ctl.start_lanes().map_err(|e| ctl.spare(e))?;
    }
    // Carried counts: taken over once the lanes serve (12 ms at 3,000 functions; the lanes
    // only add to them), before the status and metrics servers read them.
    count_start(
        &ctl.state,
        &ctl.plan,
        ctl.boot.inherited.as_ref(),
        &ctl.boot.parts,
        rolled_back,
    );
    let failed = match helpers::start_helpers(&mut ctl, helpers, prepared) {
        Ok(()) => None,
        Err(e) if !resumed => return ctl.fresh_start_failed(e),
        Err(e) => Some(e),
    };
    if !resumed {
        ctl.start_lanes().map_err(|e| ctl.spare(e))?;
    }
    log_start(&ctl.plan, generation, &reason);
    // Threads refused from now on are errors at once, never waits (`spawn_starting`).
    crate::ops::signals::started();
    ctl.control_loop(&events_rx, failed)
}
