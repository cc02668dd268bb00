//! A generation's start-up, step by step (what `run_with` calls in order): who we are, the
//! plan, a rollback, the root side and the privilege drop, the live state, the source, the
//! first log line. The helper threads beside the lanes are `helpers`'.

use crate::kinds::RestartReason;
use crate::restart::carried::Inherited;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::clock::now_ms;
use crate::error::Result;
use crate::jobs::functions::Functions;
use crate::ops::pidfile::Pidfile;
use crate::ops::signals;
use crate::restart::reexec::{self, Boot};
use crate::restart::rollback::spare_if_not_its_fault;
use crate::status::{self, Inner, State};

use super::{Plan, RunOptions};

/// First thing in every image of the worker, fresh or re-exec'd, before any thread: what the
/// process inherits through exec that it must not keep (see each).
pub(super) fn settle_process() {
    crate::ops::privilege::refuse_tracing();
    crate::ops::sigstate::restore_ignored();
    crate::ops::sigstate::survive_file_size_limit();
    // A fault-injection build (tests only): a new image stalls before it blocks its signals.
    #[cfg(gearshift_faults)]
    super::plan::stall_while(
        "GEARSHIFT_FAULT_STALL_FIRST",
        "stalling before blocking signals",
    );
}

/// Who we are: a fresh start or a re-exec'd generation (with what it carried), signals
/// blocked, inherited descriptors closed, and (re-exec'd) the log file from the first line.
pub(super) fn detect_boot(opts: &mut RunOptions) -> Result<Boot> {
    // Signals stay blocked in this thread until the handlers are in place (`start_helpers`):
    // what arrives meanwhile, during a re-exec too, stays pending and reaches them then. Every
    // other thread is spawned with them blocked: only this thread ever takes one.
    crate::ops::sigstate::block()?;
    // Descriptors inherited from whatever started us must not leak into job processes.
    crate::ops::handover::close_inherited();
    let mut boot = Boot::detect();
    if let Some(i) = &boot.inherited {
        crate::ops::privilege::know_user(i.worker_user.clone());
        crate::status::records::gone_said_before(i.supervisor_gone_said);
    }
    if boot.inherited.is_none() {
        // A fault-injection build (tests only): a fresh start stalls here.
        #[cfg(gearshift_faults)]
        super::plan::stall_while("GEARSHIFT_FAULT_STALL_START", "stalling at start-up");
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
        signals::arm_serve_alarm();
        if let Some(file) = &opts.log_file {
            let carried = boot.inherited.as_ref().and_then(|i| i.log_fd);
            let _ = crate::ops::logging::resume(file, carried);
        }
        // A fault-injection build (tests only): a re-exec'd generation stalls here.
        #[cfg(gearshift_faults)]
        super::plan::stall_while("GEARSHIFT_FAULT_STALL_RESUMED", "stalling at start-up");
    }
    Ok(boot)
}

/// The plan this generation serves: a re-exec'd image runs exactly the config text and the
/// `jobs_dir` its predecessor validated (changes on disk since then are looked at once
/// serving, validated like any other); a fresh start reads and checks them.
pub(super) fn prepare_plan(boot: &Boot, config_path: &Path, functions: &Functions) -> Result<Plan> {
    // A re-exec'd image runs exactly the config text its predecessor validated; changes on disk
    // since then are picked up by the check right after start-up, validated like any other.
    let inherited_text = boot.inherited.as_ref().and_then(|i| i.config_text.clone());
    // And the jobs_dir it validated: files being written there meanwhile are looked at once
    // serving, never a reason for this generation to fail at start-up.
    let handed_jobs = (boot.parts.jobs.as_deref())
        .and_then(|data| serde_json::from_slice::<crate::watch::Jobs>(data).ok());
    let plan = Plan::prepare_from(
        config_path,
        functions,
        inherited_text.as_deref(),
        handed_jobs,
    )?;
    crate::ops::logging::set_level(plan.config.log.level);
    crate::ops::logging::set_format(plan.config.log.json, plan.config.log.jobs);
    Ok(plan)
}

/// A fresh start of a binary that a deploy switched to, whose marker is still there: that
/// binary died before serving (and a supervisor or systemd started it again). Execs
/// `last-good` (Err is what the exec returned); Ok when there is nothing to roll back.
pub(super) fn roll_back_if_needed(
    plan: &Plan,
    boot: &Boot,
    ready: Option<&std::fs::File>,
) -> Result<()> {
    if boot.inherited.is_some() {
        return Ok(());
    }
    {
        // A fresh start of a binary that a deploy switched to, whose marker is still there:
        // that binary died before serving (and a supervisor or systemd started it again).
        if let Some((last_good, rb)) =
            crate::restart::rollback::rollback_needed(&plan.config.worker.state_dir)
        {
            log::error!(
                "{}",
                crate::restart::rollback::words(&rb.from_sha, &rb.to_sha, &rb.reason)
            );
            // The marker stays while that binary is at the path: every fresh start of it (a
            // supervisor's after a later crash) rolls back again (see `announce`).
            log::logger().flush();
            // The descriptor stays open until the exec, so the file checked is the file run.
            use std::os::fd::{AsFd, AsRawFd};
            let path = PathBuf::from(format!("/proc/self/fd/{}", last_good.as_raw_fd()));
            let ready = ready.map(|f| f.as_fd());
            return Err(reexec::exec_rollback(&path, &boot.argv, &rb, ready));
        }
    }
    Ok(())
}

/// A rollback-test build (`GEARSHIFT_CRASH_ON_RUN`, `build.rs`) dies here: after the root
/// side (which keeps `last-good` under a privilege drop), before serving.
pub(super) fn crash_if_built_to() {
    #[cfg(gearshift_crash_on_run)]
    {
        log::error!("built with GEARSHIFT_CRASH_ON_RUN: dying during start-up (rollback test)");
        log::logger().flush();
        std::process::abort();
    }
}

/// Everything done while still root (or whoever started us): umask, log file, `state_dir`,
/// the pidfile lock, the `/metrics` socket (a port under 1024 needs root), `last-good`, the
/// spool given to the worker's user; then privileges are dropped. Returns the pidfile, the
/// metrics listener and warnings for `status`. A full disk (or a shortage) that refuses it is
/// no fault of this binary (see `rollback::spare_if_not_its_fault`).
pub(super) fn settle_as_root(
    plan: &Plan,
    boot: &Boot,
    log_file: Option<&Path>,
    config_path: &Path,
) -> Result<(Pidfile, Option<std::net::TcpListener>, Vec<String>)> {
    settle(plan, boot, log_file, config_path)
        .inspect_err(|e| spare_if_not_its_fault(&plan.config.worker.state_dir, e))
}

fn settle(
    plan: &Plan,
    boot: &Boot,
    log_file: Option<&Path>,
    config_path: &Path,
) -> Result<(Pidfile, Option<std::net::TcpListener>, Vec<String>)> {
    // Every file this process creates from here on, in every mode (not only under `start`).
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(
        plan.config.worker.umask,
    ));
    // As root with a user to drop to: what that user will need is prepared through
    // descriptors, never by path (see `safefs` and `layout`), then privileges are dropped
    // before anything else is opened.
    let target = crate::ops::privilege::dropping_to(&plan.config)?;
    let owner = target.as_ref().map(|t| (t.uid, t.gid));
    if let Some(file) = log_file.or(plan.config.log.file.as_deref()) {
        match &boot.inherited {
            // Already the worker's user: the path, or the file the last generation wrote.
            Some(i) => crate::ops::logging::resume(file, i.log_fd)?,
            None => crate::ops::logging::set_file(file, owner)?,
        }
    }
    for w in &plan.warnings {
        log::warn!("{w}");
    }
    let state_dir = &plan.config.worker.state_dir;
    let layout = crate::ops::layout::prepare(state_dir, target.as_ref())?;
    if boot.inherited.is_none() {
        crate::ops::layout::record_state_dir(config_path, state_dir);
    }
    let pidfile = match boot
        .inherited
        .as_ref()
        .and_then(|i| Pidfile::adopt(i.pidfile_fd))
    {
        Some(mut p) => {
            // Removed meanwhile: made again if we may; another worker's lock there (a
            // `state_dir` changed to one in use) ends this start.
            p.keep_named(state_dir)?;
            p
        }
        None => {
            let p = Pidfile::acquire(&layout.dir)?;
            // A worker whose pidfile was removed still answers on its socket: never a second.
            crate::status::refuse_beside_unlocked(state_dir)?;
            crate::ops::layout::record_worker(config_path);
            p
        }
    };
    // Bound before privileges drop (a port under 1024 needs root), and once: the socket is
    // handed across every re-exec.
    let mut start_warnings = Vec::new();
    let metrics_listener = metrics_listener(plan, boot.inherited.as_ref(), &mut start_warnings)?;
    // A fresh start of a binary that is not last-good marks itself (see `note_attempt`).
    let attempt = match (&boot.inherited, reexec::rollback_from_env()) {
        (None, None) => crate::restart::rollback::note_attempt(state_dir),
        _ => crate::restart::rollback::Attempt::Known,
    };
    use crate::restart::rollback::Attempt;
    if target.is_some()
        && plan.config.worker.watch_binary
        && matches!(attempt, Attempt::First | Attempt::Promoted)
    {
        // The dropped worker cannot write state_dir: root keeps the binary it trusts now, for
        // a rollback after a deploy the worker switches to (a binary that has served since
        // replaces it at a later fresh start: `note_attempt`).
        if let Err(e) = crate::restart::rollback::save_last_good(state_dir) {
            let older = state_dir.join(crate::ops::layout::LAST_GOOD).is_file();
            log::warn!(
                "could not keep this binary as last-good ({e}): {}",
                if older {
                    "a failed deploy would roll back to the older last-good, kept at an earlier start"
                } else {
                    "a failed deploy cannot be rolled back"
                }
            );
        }
    }
    if let (Some(spool), Some(t)) = (plan.config.source.spool(), &target) {
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
    Ok((pidfile, metrics_listener, start_warnings))
}

/// This generation's live state, from what its predecessor carried.
pub(super) fn new_state(
    plan: &Plan,
    boot: &Boot,
    inherited: &Inherited,
    metrics_listener: Option<&std::net::TcpListener>,
    views: crate::status::ServerViews,
    ingress: Arc<crate::kinds::Ingress>,
) -> Arc<State> {
    let now = now_ms();
    Arc::new(State {
        pid: std::process::id(),
        generation: inherited.generation + 1,
        started_at_ms: if inherited.started_at_ms == 0 {
            now
        } else {
            inherited.started_at_ms
        },
        restarted_at_ms: inherited.restarted_at_ms,
        last_restart_reason: inherited.reason.clone(),
        restarts: inherited.restarts,
        binary: boot.exe.clone(),
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
            phase: crate::kinds::WorkerPhase::Running,
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
                .and_then(|l| l.local_addr().ok())
                .map(|a| a.to_string()),
        }),
        servers: views,
        ingress,
        metrics: crate::metrics::Metrics::default(),
    })
}

/// Opens the source, with what the previous generation handed over (listening sockets, the
/// queue listing) and the shared views status shows (Gearman servers, the ZeroMQ ingress). A
/// full disk (or a shortage) that refuses it (a journal's replay) is no fault of this binary.
pub(super) fn open_source(
    plan: &Plan,
    boot: &Boot,
    inherited: &Inherited,
    generation: u64,
) -> Result<Opened> {
    open(plan, boot, inherited, generation)
        .inspect_err(|e| spare_if_not_its_fault(&plan.config.worker.state_dir, e))
}

/// The opened source, its views for `status`, and the ZeroMQ ingress's counts.
type Opened = (
    Arc<crate::source::Source>,
    crate::status::ServerViews,
    Arc<crate::kinds::Ingress>,
);

fn open(plan: &Plan, boot: &Boot, inherited: &Inherited, generation: u64) -> Result<Opened> {
    let views = crate::status::ServerViews::default();
    let ingress = Arc::new(crate::kinds::Ingress::default());
    ingress.resume(inherited.ingress_counts, inherited.ingress_closed());
    let source = crate::source::open(
        &plan.config,
        crate::source::Opening {
            generation,
            resumed: boot.inherited.is_some(),
            listeners: crate::ops::handover::adopt_sockets(&inherited.listen_fds),
            locks: crate::ops::handover::adopt_files(&inherited.lock_fds),
            handed: boot.parts.source.as_deref(),
            views: Arc::clone(&views),
            ingress: Arc::clone(&ingress),
        },
    )?;
    Ok((source, views, ingress))
}

/// What `/metrics` and the status socket's `metrics` and `counts` requests answer.
pub(super) fn answers(
    state: &Arc<State>,
    source: &Arc<crate::source::Source>,
) -> (crate::metrics::http::Render, crate::metrics::http::Render) {
    let count = Arc::new(crate::metrics::QueueCount::default());
    let render: crate::metrics::http::Render = {
        let (state, source, count) = (Arc::clone(state), Arc::clone(source), Arc::clone(&count));
        Arc::new(move || state.metrics_text(count.get(|| source.queue_stats())))
    };
    let counts: crate::metrics::http::Render = {
        let (state, source) = (Arc::clone(state), Arc::clone(source));
        Arc::new(move || {
            let counts = crate::metrics::carry::Counts {
                metrics: state.metrics.carry(&state.reconnects()),
                queue: count.get(|| source.queue_stats()),
            };
            serde_json::to_string(&counts).unwrap_or_default()
        })
    };
    (render, counts)
}

/// The first line of a generation: what runs, on what.
pub(super) fn log_start(plan: &Plan, generation: u64, reason: &str) {
    if generation == 1 {
        log::info!(
            "{} {} started (pid {}), {} lane(s) on {}: {}",
            crate::identity().0,
            crate::identity().1,
            std::process::id(),
            plan.config.worker.concurrency,
            plan.config.source.kind(),
            functions(plan)
        );
    } else {
        log::info!(
            "generation {generation} serving ({}): {}",
            reason,
            functions(plan)
        );
    }
}

/// The functions served, for the start line: a few hundred at most (one line a log parser
/// takes whole; `status` lists them all).
fn functions(plan: &Plan) -> String {
    let names = plan.table.names();
    if names.is_empty() {
        return "no function (see the warning)".to_string();
    }
    let mut shown = crate::text::some_of(&names, 50);
    if names.len() > 50 {
        shown.push_str(" (`gearshift status` lists them all)");
    }
    shown
}

/// The `/metrics` listening socket: the one handed over, or a new one. A reload that switches
/// metrics off closes it; one whose address cannot be bound runs without (a first start fails).
pub(super) fn metrics_listener(
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
pub(super) fn count_start(
    state: &State,
    plan: &Plan,
    inherited: Option<&Inherited>,
    parts: &crate::restart::parcel::Parts,
    rolled_back: bool,
) {
    let metrics = &state.metrics;
    if let Some(i) = inherited {
        let carried = (parts.metrics.as_deref()).and_then(|data| serde_json::from_slice(data).ok());
        if let Some(c) = carried {
            metrics.restore(&c);
        }
        metrics.restarted(&i.reason);
        if i.reason == RestartReason::BinaryChanged.as_str() {
            metrics.deploy(crate::kinds::DeployResult::Switched);
        }
    }
    if rolled_back {
        metrics.deploy(crate::kinds::DeployResult::RolledBack);
    }
    metrics.declare(plan.table.names());
}
