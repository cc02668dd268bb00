//! The control loop: the main thread receives signals, file events, recycling requests and
//! lane exits, and owns every decision (restart, stop, deploy); lanes only run jobs.

use crate::shutdown::Switch;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{after, never, select, Receiver, Sender};
use nix::sys::signal::Signal;

use crate::clock::now_ms;
use crate::error::{Error, Result};
use crate::jobs::executable::Children;
use crate::jobs::functions::Functions;
use crate::kinds::RestartReason;
use crate::ops::notify::Notifier;
use crate::ops::pidfile::Pidfile;
use crate::ops::signals::{self, Signals};
use crate::restart::carried::Inherited;
use crate::restart::deploy::{Deploy, Step};
use crate::restart::reexec::{self, Boot};
use crate::source::Source;
use crate::status::records::Refusal;
use crate::status::{self, State};
use crate::watch::inotify::Inotify;
use crate::watch::{self, Touched};

use super::event::Event;
use super::lane::{DoneGuard, Health, LaneContext, Limits};
use super::plan::Plan;

/// How long file events must be quiet before the change is looked at.
pub(super) const DEBOUNCE: Duration = Duration::from_millis(100);
/// How often digests are checked when a directory cannot be watched.
pub(super) const POLL_FALLBACK: Duration = Duration::from_secs(2);

/// What the control loop is doing.
pub(super) enum Phase {
    Running,
    /// Waiting for lanes to finish their jobs before re-exec.
    Draining {
        reason: RestartReason,
        requested_mono_us: u64,
    },
    /// Waiting for lanes to finish their jobs before exit.
    Stopping,
}

pub(super) struct Control {
    pub(super) health: Arc<Health>,
    pub(super) deploy: Option<Deploy>,
    pub(super) last_rollback: Option<crate::status::records::Rollback>,
    pub(super) limits: Arc<Limits>,
    /// For lanes: their recycling requests and their ends reach the loop on this.
    pub(super) events: Sender<Event>,
    pub(super) started: Instant,
    pub(super) boot: Boot,
    pub(super) functions: Functions,
    pub(super) config_path: PathBuf,
    pub(super) plan: Plan,
    pub(super) source: Arc<Source>,
    pub(super) state: Arc<State>,
    pub(super) children: Children,
    pub(super) stop: Switch,
    pub(super) lanes: Vec<JoinHandle<()>>,
    pub(super) requested_mono_us: u64,
    /// Digest of a config or jobs state already refused, so the same bad file is reported once.
    pub(super) refused_digest: Option<String>,
    pub(super) pidfile: Pidfile,
    pub(super) status_server: Option<status::Server>,
    pub(super) metrics_server: Option<crate::metrics::http::Server>,
    /// The metrics text, for the status socket and `/metrics`.
    pub(super) render: crate::metrics::http::Render,
    pub(super) _signals: Signals,
    pub(super) inotify: Option<Arc<Inotify>>,
    pub(super) poll_fallback: bool,
    pub(super) notifier: Option<Notifier>,
    pub(super) ready: Option<std::fs::File>,
    /// A thread died and no new generation could be made: exit 1 once the lanes are done.
    pub(super) exit_for_supervisor: bool,
}

impl Control {
    pub(super) fn control_loop(&mut self, events: &Receiver<Event>) -> Result<i32> {
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
        // From the request (a HUP, a change, a limit) until this generation serves.
        let requested = self.requested_mono_us;
        self.spawn_lanes()?;
        if requested != 0 {
            let us = crate::clock::monotonic_us().saturating_sub(requested);
            self.state.metrics.restart_pause(Duration::from_micros(us));
        }
        self.notify("READY=1");
        // Serving: a deploy that switched to this binary has succeeded.
        crate::restart::rollback::clear_marker(&self.plan.config.worker.state_dir);
        if let Some(mut f) = self.ready.take() {
            use std::io::Write;
            let _ = writeln!(f, "ready {}", std::process::id());
        }
        let watchdog = match self.notifier.as_ref().and_then(Notifier::watchdog_interval) {
            Some(every) => crossbeam_channel::tick(every),
            None => never(),
        };
        let mut phase = Phase::Running;
        // Look once right away: the files may have changed between our exec and the watch.
        let mut check_at: Option<Instant> = Some(Instant::now());
        let mut first_touch: Option<Instant> = None;
        let mut live = self.lanes.len();
        let mut terms = 0;
        // A change-triggered restart waiting out `restart_splay`.
        let mut splayed: Option<(Instant, RestartReason)> = None;

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
            let splay_timer = match splayed {
                Some((t, _)) => after(t.saturating_duration_since(Instant::now())),
                None => never(),
            };
            let health_timer = if self.health.degraded.load(Ordering::Acquire) {
                after(Duration::from_millis(250))
            } else {
                never()
            };
            select! {
                recv(health_timer) -> _ => self.health.recovered(&self.state),
                recv(splay_timer) -> _ => {
                    if let Some((_, reason)) = splayed.take() {
                        self.set_pending(None);
                        // A config or jobs change may have been undone meanwhile.
                        let still = match reason {
                            RestartReason::BinaryChanged => Some(reason),
                            _ => self.changed_on_disk(),
                        };
                        if let Some(reason) = still.filter(|_| matches!(phase, Phase::Running)) {
                            self.request_restart(&mut phase, reason);
                        }
                    }
                }
                recv(watchdog) -> _ => self.notify("WATCHDOG=1"),
                recv(age) -> _ => {
                    age = never();
                    self.request_restart(&mut phase, RestartReason::MaxAge);
                }
                recv(events) -> event => match event {
                    Ok(Event::Recycle(reason)) => {
                        if !self.request_restart(&mut phase, reason) {
                            self.limits.refused.store(true, Ordering::Release);
                        }
                        self.limits.asked.store(false, Ordering::Release);
                    }
                    Ok(Event::Signal(sig)) => {
                        match sig {
                            Signal::SIGHUP => {
                                // Asked for by hand: never splayed, and it takes a pending one along.
                                if let Some((_, pending)) = splayed.take() {
                                    log::info!("SIGHUP: restarting now; the pending restart ({pending}) is taken along");
                                    self.set_pending(None);
                                }
                                self.request_restart(&mut phase, RestartReason::Sighup);
                            }
                            Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT => {
                                terms += 1;
                                if terms > 1 {
                                    let running = self.state.in_flight.load(Ordering::Relaxed);
                                    log::warn!("{} again: exiting now; {running} interrupted job(s) will run again", sig.as_str());
                                    self.children.kill_all();
                                    crate::restart::preflight::kill_preflight();
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
                            Signal::SIGUSR1 => match crate::ops::logging::reopen() {
                                Ok(Some(path)) => log::info!("SIGUSR1: reopened log file {}", path.display()),
                                Ok(None) => log::info!("SIGUSR1: logging to stderr, nothing to reopen"),
                                Err(e) => log::error!("SIGUSR1: {e}; still writing to the old file"),
                            },
                            other => log::info!("{}: ignored", other.as_str()),
                        }
                    }
                    Ok(Event::Touched(touched)) => {
                        let lost = match touched {
                            Touched::Binary => {
                                binary_at.get_or_insert_with(|| Instant::now() + Duration::from_millis(20));
                                continue;
                            }
                            Touched::Lost(why) => Some(why),
                            _ => None,
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
                    Ok(Event::ThreadDied(name)) => {
                        log::error!("the {name} thread died; replacing this generation");
                        self.replace_generation(&mut phase);
                    }
                    Ok(Event::LaneDone(panicked)) => {
                        live -= 1;
                        if panicked {
                            log::error!("a lane died (a panic); replacing this generation after the other lanes' jobs finish");
                            self.replace_generation(&mut phase);
                        }
                        if live > 0 {
                            continue;
                        }
                        for t in self.lanes.drain(..) {
                            let _ = t.join();
                        }
                        match std::mem::replace(&mut phase, Phase::Running) {
                            Phase::Stopping if self.exit_for_supervisor => {
                                log::error!("exiting (status 1) for the supervisor to start the worker afresh");
                                self.pidfile.clear();
                                crate::restart::preflight::kill_preflight();
                                log::logger().flush();
                                std::process::exit(1);
                            }
                            Phase::Stopping => {
                                log::info!("stopped");
                                // Keep the pidfile lock until the process is gone (the spool lock
                                // and job processes go with it): `stop` returns when the lock is
                                // free, and a `start` right after must find nothing of ours left.
                                self.pidfile.clear();
                                crate::restart::preflight::kill_preflight();
                                log::logger().flush();
                                std::process::exit(0);
                            }
                            Phase::Draining { reason, requested_mono_us } => {
                                self.restart(reason, requested_mono_us);
                                // Still here: the restart was refused or execve failed.
                                if reason == RestartReason::ThreadDied {
                                    // Serving on without that thread is not an option.
                                    log::error!("exiting (status 1) for the supervisor to start the worker afresh");
                                    self.pidfile.clear();
                                    log::logger().flush();
                                    std::process::exit(1);
                                }
                                self.notify("READY=1");
                            }
                            Phase::Running => log::error!("all lanes ended unexpectedly; starting them again"),
                        }
                        self.state.set_phase("running");
                        self.stop.reset();
                        self.spawn_lanes()?;
                        live = self.lanes.len();
                    }
                    // Never: the loop holds a sender itself.
                    Err(_) => return Err(Error::Msg("the control loop's channel closed".into())),
                },
                recv(timer) -> _ => {
                    check_at = None;
                    first_touch = None;
                    if matches!(phase, Phase::Running) && splayed.is_none() {
                        if let Some(reason) = self.changed_on_disk() {
                            self.restart_or_splay(&mut phase, &mut splayed, reason);
                        }
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
                            if d.last_refused.is_some()
                                && d.last_refused.as_ref().map(|r| r.at_ms)
                                    != i.last_refused_deploy.as_ref().map(|r| r.at_ms)
                            {
                                self.state.metrics.deploy("refused");
                            }
                            i.last_refused_deploy = d.last_refused.clone();
                            i.binary_sha256 = d.running_sha();
                        }
                    }
                    if approved && splayed.is_none() {
                        self.restart_or_splay(&mut phase, &mut splayed, RestartReason::BinaryChanged);
                    }
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
            .map(|b| crate::text::hex(&sha2::Sha256::digest(&b)));
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
            (false, false) => {
                // Put back as it runs: a refusal of what is no longer there is history.
                if self.refused_digest.take().is_some() {
                    if let Ok(mut i) = self.state.inner.lock() {
                        if i.last_refused.take().is_some() {
                            log::info!("config.toml and jobs_dir are back to what this generation runs: the last refusal no longer applies");
                        }
                    }
                }
                return None;
            }
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

    /// A restart caused by a change that may have reached every host at once: delayed by a
    /// random fraction of `restart_splay` when set (the worker serves on meanwhile).
    fn restart_or_splay(
        &mut self,
        phase: &mut Phase,
        splayed: &mut Option<(Instant, RestartReason)>,
        reason: RestartReason,
    ) {
        let Some(max) = self.plan.config.worker.restart_splay else {
            self.request_restart(phase, reason);
            return;
        };
        let delay = max.mul_f64(super::lane::random_fraction());
        log::info!(
            "{reason}: restarting in {} ms (restart_splay {} ms)",
            delay.as_millis(),
            max.as_millis()
        );
        *splayed = Some((Instant::now() + delay, reason));
        self.set_pending(Some((reason, now_ms() + delay.as_millis() as u64)));
    }

    fn set_pending(&self, pending: Option<(RestartReason, u64)>) {
        if let Ok(mut i) = self.state.inner.lock() {
            i.restart_pending = pending.map(|(r, at)| (r.to_string(), at));
        }
    }

    /// Starts a restart unless the new state is invalid (then refused: false).
    /// A thread of this generation died: re-exec once the running jobs finish; if the restart
    /// is refused (the config on disk is invalid now), stop after them and exit 1, so the
    /// supervisor (or systemd) starts the worker afresh.
    fn replace_generation(&mut self, phase: &mut Phase) {
        if !self.request_restart(phase, RestartReason::ThreadDied)
            && matches!(phase, Phase::Running)
        {
            self.exit_for_supervisor = true;
            *phase = Phase::Stopping;
            self.state.set_phase("stopping");
            self.halt_lanes();
        }
    }

    fn request_restart(&mut self, phase: &mut Phase, reason: RestartReason) -> bool {
        match phase {
            Phase::Running => {}
            Phase::Draining {
                reason: under_way, ..
            } => {
                log::info!("{reason}: a restart ({under_way}) is already under way; this one is folded into it");
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
        self.stop.trigger();
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
            pidfile_fd: Some(self.pidfile.fd()),
            inotify_fd: self.inotify.as_ref().map(|i| i.fd()),
            source_fd: None,
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
            metrics_fd: None,
            metrics_listen_fd: None,
            jobs_fd: None,
        };
        let mut next = next;
        // Exec the path only if it holds a validated binary; else this very image again.
        let exe = match &self.deploy {
            Some(d) => {
                let (exe, known) = d.exec_target();
                let switching = known.as_ref().map(|k| &k.sha256) != d.running_sha().as_ref();
                if switching {
                    let state_dir = &plan.config.worker.state_dir;
                    match (crate::restart::rollback::save_last_good(state_dir), d.running_sha(), &known) {
                        (Ok(Some(last_good)), Some(from_sha), Some(to)) => {
                            log::info!("deploy: the running binary is kept as {}", last_good.display());
                            let marker = crate::restart::rollback::Marker {
                                from_sha,
                                to_sha: to.sha256.clone(),
                                at_ms: now_ms(),
                            };
                            if let Err(e) = crate::restart::rollback::write_marker(state_dir, &marker) {
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
            // Without the binary watch nothing has checked what is at the path now: exec the
            // running image itself (the kernel's link to its inode), never the path.
            None => {
                log::info!(
                    "{reason}: re-exec the running image (watch_binary is off: \"{}\" is not looked at)",
                    self.boot.exe.display()
                );
                PathBuf::from("/proc/self/exe")
            }
        };
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
        // Handed over as open descriptors (closed again here if the exec fails).
        use std::os::fd::{AsFd, AsRawFd};
        let handed = self.source.hand_over();
        if let Some(fd) = &handed {
            if crate::ops::handover::keep(fd.as_fd()).is_ok() {
                next.source_fd = Some(fd.as_raw_fd());
            }
        }
        // What was just validated is what the next generation serves on.
        let jobs = serde_json::to_vec(&plan.jobs)
            .ok()
            .and_then(|data| crate::ops::handover::memfd("jobs", &data));
        drop(plan);
        if let Some(fd) = &jobs {
            if crate::ops::handover::keep(fd.as_fd()).is_ok() {
                next.jobs_fd = Some(fd.as_raw_fd());
            }
        }
        // Every lane has ended: the counters are final for this generation.
        let counters = serde_json::to_vec(&self.state.metrics.carry(&self.state.reconnects()))
            .ok()
            .and_then(|data| crate::ops::handover::memfd("metrics", &data));
        if let Some(fd) = &counters {
            if crate::ops::handover::keep(fd.as_fd()).is_ok() {
                next.metrics_fd = Some(fd.as_raw_fd());
            }
        }
        if let Some(m) = self.metrics_server.as_mut() {
            // Scrapes from now on wait in the accept queue for the next image.
            m.pause();
            if crate::ops::handover::keep(m.socket()).is_ok() {
                next.metrics_listen_fd = Some(m.fd());
            }
        }
        crate::restart::preflight::kill_preflight();
        let err = match signals::block()
            .and_then(|()| self.pidfile.keep_across_exec())
            .and_then(|()| inherit_inotify())
        {
            Ok(()) => reexec::exec(&exe, &self.boot.exe, &self.boot.argv, &next),
            Err(e) => e,
        };
        // execve failed: carry on as we were.
        self.pidfile.close_on_exec();
        if let Some(m) = self.metrics_server.as_mut() {
            crate::ops::handover::release(m.socket());
            if let Err(e) = m.resume(Arc::clone(&self.render)) {
                log::error!("metrics: {e}");
            }
        }
        if let Some(i) = &self.inotify {
            i.close_on_exec();
        }
        self.refuse(reason, &err.to_string());
        self.resume_helpers();
    }

    /// Brings back the status server and signal thread after a failed execve.
    fn resume_helpers(&mut self) {
        match status::Server::start(
            &self.plan.config.status_socket(),
            Arc::clone(&self.state),
            Arc::clone(&self.render),
        ) {
            Ok(s) => self.status_server = Some(s),
            Err(e) => log::error!("status socket: {e}"),
        }
        if let Err(e) = signals::clear_mask() {
            log::error!("{e}");
        }
    }

    fn spawn_lanes(&mut self) -> Result<()> {
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
                stop: self.stop.handle(),
                children: self.children.clone(),
                max_payload: self.plan.config.worker.max_payload_bytes,
                requested_mono_us: self.requested_mono_us,
                limits: Arc::clone(&self.limits),
                events: self.events.clone(),
                health: Arc::clone(&self.health),
            };
            let done = self.events.clone();
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

use sha2::Digest as _;

/// Wakes idle lanes every second, for a queue that cannot be watched.
pub(super) fn poll_queue(source: &Arc<Source>) -> Result<()> {
    let weak = Arc::downgrade(source);
    crate::ops::signals::spawn_essential("queue-poll", move || {
        while let Some(s) = weak.upgrade() {
            s.wake();
            drop(s);
            std::thread::sleep(Duration::from_secs(1));
        }
    })
    .map(drop)
    .map_err(|e| Error::io("spawning the queue poll thread", e))
}
