//! The control loop: the main thread receives signals, file events, recycling requests and
//! lane exits, and owns every decision (restart, stop, deploy); lanes only run jobs.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{after, never, select, Receiver, Sender};
use nix::sys::signal::Signal;

use crate::error::{Error, Result};
use crate::jobs::executable::Children;
use crate::jobs::functions::Functions;
use crate::kinds::{RestartReason, WorkerPhase};
use crate::ops::notify::Notifier;
use crate::ops::pidfile::Pidfile;
use crate::ops::signals::{self, Signals};
use crate::restart::deploy::Deploy;
use crate::restart::reexec::Boot;
use crate::shutdown::Switch;
use crate::source::Source;
use crate::status::{self, State};
use crate::watch::inotify::Inotify;

use super::event::Event;
use super::lane::{Health, Limits};
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

/// The control loop's own state between events.
pub(super) struct Loop {
    pub(super) phase: Phase,
    /// Lanes still running.
    pub(super) live: usize,
    /// TERM/INT/QUIT received: the second one exits at once.
    terms: u32,
    /// When to look at config.toml and `jobs_dir` (debounced file events).
    pub(super) check_at: Option<Instant>,
    pub(super) first_touch: Option<Instant>,
    pub(super) writer: Writer,
    /// When to look at the binary's path.
    pub(super) binary_at: Option<Instant>,
    /// Every lane has ended for a restart, which waits since then for the verdict on a new
    /// binary at the path (`candidate.rs`).
    pub(super) awaiting: Option<Instant>,
    /// A change-triggered restart waiting out `restart_splay`.
    pub(super) splayed: Option<(Instant, RestartReason)>,
    /// While a restart waits for running jobs under a service manager: when to extend its
    /// timeout again (`manager.rs`).
    extend_at: Option<Instant>,
    /// While a restart waits for running jobs: when to look for Rust functions held past
    /// `abandon_after` (`lanes.rs`).
    pub(super) held_look: Option<Instant>,
}

/// What the watch last said of config.toml's writers (`touched.rs`).
#[derive(Default)]
pub(super) struct Writer {
    /// Modified and not closed yet (the watch's last word).
    pub(super) open: bool,
    /// The look's wait for the close was said in the log.
    pub(super) said: bool,
    /// The restart's wait for it was said.
    pub(super) said_restart: bool,
    /// A SIGHUP came while it was being written: the restart is asked for once it is closed.
    pub(super) hup: bool,
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
    /// The last look at the files failed for want of a resource: looked at again shortly.
    pub(super) look_failing: bool,
    /// The plan validated when the restart under way was asked for, while no file event has
    /// come since: the exec needs no second look at the files (`restart`).
    pub(super) prepared: Option<Plan>,
    pub(super) pidfile: Pidfile,
    pub(super) status_server: Option<status::Server>,
    pub(super) metrics_server: Option<crate::metrics::http::Server>,
    /// The metrics text, for the status socket and `/metrics`.
    pub(super) render: crate::metrics::http::Render,
    /// The counters as JSON, for the status socket's `counts` (`top`).
    pub(super) counts: crate::metrics::http::Render,
    /// The signal thread (from the helpers' start).
    pub(super) signals: Option<Signals>,
    pub(super) inotify: Option<Arc<Inotify>>,
    pub(super) poll_fallback: bool,
    pub(super) notifier: Option<Notifier>,
    pub(super) ready: Option<std::fs::File>,
    /// A thread died and no new generation could be made: exit 1 once the lanes are done.
    pub(super) exit_for_supervisor: bool,
    /// Lanes this restart abandoned (held by a Rust function past `abandon_after`): their
    /// threads end with the image, so the restart must happen.
    pub(super) abandoned: usize,
    /// Why held Rust functions are not abandoned now (an invalid config), said once.
    pub(super) abandon_held_by: Option<String>,
    /// Whether a candidate's refusal may be the files' fault (`candidate.rs`).
    pub(super) verdicts: super::verdicts::Verdicts,
}

impl Control {
    /// Runs until the process ends. `failed`: the helpers of a generation whose lanes already
    /// serve could not start; it stops after their jobs, for the supervisor (exit 1).
    pub(super) fn control_loop(
        &mut self,
        events: &Receiver<Event>,
        failed: Option<Error>,
    ) -> Result<i32> {
        // A fault-injection build (tests only): the loop stalls before its first look.
        #[cfg(gearshift_faults)]
        super::plan::stall_while("GEARSHIFT_FAULT_STALL_LOOP", "stalling before the loop");
        let mut lp = Loop {
            // The binary's sha is computed in the background: look once it may be known, and
            // for a candidate dropped while we were starting.
            binary_at: self
                .deploy
                .as_ref()
                .map(|_| Instant::now() + Duration::from_millis(200)),
            phase: Phase::Running,
            // Look once: the files may have changed between our exec and the watch. Not at
            // once: a debounce lets the watch's reports come first (one of a writer holding
            // config.toml open, whose half-written text must not be judged).
            check_at: Some(Instant::now() + DEBOUNCE),
            first_touch: None,
            writer: Writer::default(),
            live: self.lanes.len(),
            terms: 0,
            splayed: None,
            awaiting: None,
            extend_at: None,
            held_look: None,
        };
        let mut age = match self.limits.max_age {
            Some(a) => after(a.saturating_sub(self.started.elapsed())),
            None => never(),
        };
        match failed {
            None => self.announce(),
            Some(e) => {
                // A stop asked while it waited for a thread: it stops as asked, exit 0.
                if crate::ops::signals::stop_asked() {
                    log::warn!("{e}: a stop is asked; stopping after the running jobs finish");
                } else {
                    log::error!("{e}; stopping after the running jobs finish");
                    self.exit_for_supervisor = true;
                }
                self.spare(e);
                self.stop_after_jobs(&mut lp.phase);
            }
        }
        // The pidfile (how `status` and `stop` find this worker), made again if removed.
        let pidfile_look = crossbeam_channel::tick(crate::ops::pidfile::LOOK_EVERY);
        let watchdog = match self.notifier.as_ref().and_then(Notifier::watchdog_interval) {
            Some(every) => crossbeam_channel::tick(every),
            None => never(),
        };
        loop {
            let at = |t: Option<Instant>| match t {
                Some(t) => after(t.saturating_duration_since(Instant::now())),
                None => never(),
            };
            let binary_timer = at(lp.binary_at);
            let timer = match (lp.check_at, self.poll_fallback) {
                (None, true) => after(POLL_FALLBACK),
                (t, _) => at(t),
            };
            let splay_timer = at(lp.splayed.map(|(t, _)| t));
            lp.extend_at = self.extend_at(matches!(lp.phase, Phase::Draining { .. }), lp.extend_at);
            let extend_timer = at(lp.extend_at);
            let held_timer = at(self.held_look_at(&mut lp));
            // A fault clears only after a quiet second, maybe when no job is left to notice.
            let health_timer = if self.health.degraded.load(Ordering::Acquire) {
                after(Duration::from_millis(250))
            } else {
                never()
            };
            select! {
                recv(health_timer) -> _ => self.health.recovered(&self.state),
                recv(splay_timer) -> _ => self.splay_over(&mut lp),
                recv(watchdog) -> _ => self.notify("WATCHDOG=1"),
                recv(extend_timer) -> _ => {
                    lp.extend_at = None;
                    self.extend_drain();
                }
                recv(pidfile_look) -> _ => self.look_at_paths(),
                recv(age) -> _ => {
                    age = never();
                    self.request_restart(&mut lp.phase, RestartReason::MaxAge);
                }
                recv(events) -> event => match event {
                    Ok(event) => self.on_event(event, &mut lp)?,
                    // Never: the loop holds a sender itself.
                    Err(_) => return Err(Error::Internal("the control loop's channel closed".into())),
                },
                recv(timer) -> _ => self.look_at_files(&mut lp),
                recv(binary_timer) -> _ => self.look_at_binary(&mut lp),
                recv(held_timer) -> _ => self.abandon_held(&mut lp)?,
            }
            if lp.awaiting.is_some() {
                self.lanes_done(&mut lp)?;
            }
        }
    }

    /// Stops after the running jobs (nothing more if a stop is under way already).
    pub(super) fn stop_after_jobs(&mut self, phase: &mut Phase) {
        if matches!(phase, Phase::Stopping) {
            return;
        }
        *phase = Phase::Stopping;
        self.state.set_phase(WorkerPhase::Stopping);
        self.source.stopping(false);
        self.halt_lanes();
    }

    /// A start-up failure `e`, whose deploy marker is removed when it is no fault of this
    /// binary (`rollback::spare_if_not_its_fault`).
    pub(super) fn spare(&self, e: Error) -> Error {
        crate::restart::rollback::spare_if_not_its_fault(&self.plan.config.worker.state_dir, &e);
        e
    }

    /// A fresh start's helpers could not start: a stop asked meanwhile (while it waited for a
    /// thread) is a stop, exit 0; anything else fails the start.
    pub(super) fn fresh_start_failed(&self, e: Error) -> Result<i32> {
        let e = self.spare(e);
        if crate::ops::signals::stop_asked() {
            log::warn!("{e}: a stop is asked; stopping before serving");
            return Ok(0);
        }
        Err(e)
    }

    /// The lanes start; the pause since the restart's request is measured.
    pub(super) fn start_lanes(&mut self) -> Result<()> {
        // From the request (a HUP, a change, a limit) until this generation serves.
        let requested = self.requested_mono_us;
        if requested != 0 {
            // The restart pause, one definition for status and the histogram: from the request
            // until this generation's lanes claim. Stored before the lanes start, so a reader
            // that sees their first claim (published with Release) also sees the pause.
            let us = crate::clock::monotonic_us()
                .saturating_sub(requested)
                .max(1);
            self.state.restart_pause_us.store(us, Ordering::Relaxed);
            self.state.metrics.restart_pause(Duration::from_micros(us));
        }
        self.spawn_lanes()
    }

    /// The service manager, a waiting `start` and a pending deploy hear that this generation
    /// serves (its lanes and helpers run).
    fn announce(&mut self) {
        self.notify("READY=1");
        // Serving: a deploy that switched to this binary has succeeded (a marker naming the
        // binary this worker rolled back from stays: see `clear_marker_unless`).
        let from = self.last_rollback.as_ref().map(|rb| rb.from_sha.as_str());
        crate::restart::rollback::clear_marker_unless(&self.plan.config.worker.state_dir, from);
        crate::restart::rollback::record_served(&self.plan.config.worker.state_dir);
        if let Some(mut f) = self.ready.take() {
            use std::io::Write;
            // Only a fresh start holds the ready pipe, so a rollback known here is the one that
            // started this image: `start` says the binary at the path is not what runs.
            let note = self.last_rollback.as_ref().map(|rb| {
                let words = crate::restart::rollback::words(&rb.from_sha, &rb.to_sha, &rb.reason);
                format!(" {words}")
            });
            let _ = writeln!(
                f,
                "ready {}{}",
                std::process::id(),
                note.unwrap_or_default()
            );
        }
    }

    fn on_event(&mut self, event: Event, lp: &mut Loop) -> Result<()> {
        match event {
            Event::Recycle(reason) => {
                if !self.request_restart(&mut lp.phase, reason) {
                    self.limits.refused.store(true, Ordering::Release);
                }
                self.limits.asked.store(false, Ordering::Release);
            }
            Event::Awaited(function) => {
                if let Some((_, pending)) = &lp.splayed {
                    log::info!("a job waits for function \"{function}\", which this generation lacks and a deploy may bring: the pending restart ({pending}) goes now");
                    self.splay_over(lp);
                }
            }
            Event::Signal(sig) => self.on_signal(sig, lp),
            Event::Touched(touched) => self.on_touched(touched, lp),
            Event::ThreadDied(name) => {
                log::error!("the {name} thread died; replacing this generation");
                self.replace_generation(&mut lp.phase);
            }
            Event::LaneDone(panicked) => {
                // After an abandon, an abandoned lane may end before the exec: not counted.
                lp.live = lp.live.saturating_sub(1);
                if panicked {
                    log::error!("a lane died (a panic); replacing this generation after the other lanes' jobs finish");
                    self.replace_generation(&mut lp.phase);
                }
                if lp.live == 0 {
                    self.lanes_done(lp)?;
                }
            }
        }
        Ok(())
    }

    fn on_signal(&mut self, sig: Signal, lp: &mut Loop) {
        signals::acting_on(sig);
        match sig {
            Signal::SIGHUP => {
                // Asked for by hand: never splayed, and it takes a pending one along.
                if let Some((_, pending)) = lp.splayed.take() {
                    log::info!(
                        "SIGHUP: restarting now; the pending restart ({pending}) is taken along"
                    );
                    self.set_pending(None);
                }
                if lp.config_being_written() && matches!(lp.phase, Phase::Running) {
                    // Validated now, the part written so far would be refused or run.
                    self.hup_awaits_writer(lp);
                    return;
                }
                self.request_restart(&mut lp.phase, RestartReason::Sighup);
            }
            Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT => {
                lp.terms += 1;
                if lp.terms > 1 {
                    let running = self.state.in_flight.load(Ordering::Relaxed);
                    log::warn!(
                        "{} again: exiting now; {running} interrupted job(s) will run again",
                        sig.as_str()
                    );
                    self.children.kill_all();
                    self.wind_up();
                    signals::die_by(sig);
                }
                log::info!(
                    "{}: stopping after {} running job(s) finish (send it again to stop now)",
                    sig.as_str(),
                    self.state.in_flight.load(Ordering::Relaxed)
                );
                lp.phase = Phase::Stopping;
                self.state.set_phase(WorkerPhase::Stopping);
                self.notify("STOPPING=1");
                self.source.stopping(false);
                self.halt_lanes();
            }
            Signal::SIGUSR1 => crate::ops::logging::on_usr1(),
            Signal::SIGXCPU => self.cpu_time_spent(&mut lp.phase),
            other => log::info!("{}: ignored", other.as_str()),
        }
    }

    /// Every lane has ended: stop, restart, or (refused) serve on with new lanes.
    pub(super) fn lanes_done(&mut self, lp: &mut Loop) -> Result<()> {
        for t in self.lanes.drain(..) {
            // An abandoned lane's thread runs on (until the exec): never joined.
            if self.abandoned == 0 || t.is_finished() {
                let _ = t.join();
            }
        }
        self.stop_instead(&mut lp.phase);
        if self.await_candidate(lp) || self.await_config_writer(lp) {
            return Ok(());
        }
        if matches!(lp.phase, Phase::Stopping) {
            self.source.settle(true);
        }
        match std::mem::replace(&mut lp.phase, Phase::Running) {
            Phase::Stopping if self.exit_for_supervisor => {
                log::error!(
                    "exiting (status 1) {}",
                    crate::status::records::who_starts_it_again()
                );
                self.exit(1);
            }
            Phase::Stopping if self.abandoned > 0 => {
                log::warn!(
                    "stopped, leaving {} abandoned job(s) to run again at the next start",
                    self.abandoned
                );
                self.exit(0);
            }
            Phase::Stopping => {
                log::info!("stopped");
                self.exit(0);
            }
            Phase::Draining {
                reason,
                requested_mono_us,
            } => {
                self.restart(reason, requested_mono_us);
                // Still here: the restart was refused or execve failed. The source serves on
                // as before the drain (the spool's lanes wait for their outcomes again).
                self.source.unsettle();
                if reason == RestartReason::ThreadDied || self.abandoned > 0 {
                    // Serving on without that thread (or beside an abandoned one, whose job
                    // the next start runs again) is not an option.
                    log::error!(
                        "exiting (status 1) {}",
                        crate::status::records::who_starts_it_again()
                    );
                    self.exit(1);
                }
                self.notify("READY=1");
            }
            Phase::Running => log::error!("all lanes ended unexpectedly; starting them again"),
        }
        self.state.set_phase(WorkerPhase::Running);
        self.stop.reset();
        // A lane thread refused for now (the user out of processes) is waited for, bounded
        // and ended by a stop, as at a start: it ended the worker.
        crate::ops::signals::starting_again();
        let spawned = self.spawn_lanes();
        crate::ops::signals::started();
        spawned?;
        lp.live = self.lanes.len();
        Ok(())
    }

    /// Ends the process. The pidfile lock is kept until the process is gone (the spool lock and
    /// job processes go with it): `stop` returns when the lock is free, and a `start` right
    /// after must find nothing of ours left.
    fn exit(&mut self, code: i32) -> ! {
        self.wind_up();
        std::process::exit(code)
    }

    /// What every way out of the process does first.
    fn wind_up(&mut self) {
        self.pidfile.clear();
        crate::restart::preflight::kill_preflight();
        log::logger().flush();
    }

    /// A change-triggered restart has waited out its splay.
    fn splay_over(&mut self, lp: &mut Loop) {
        if lp.config_being_written() {
            // Judged once its writer closes it (or the wait's bound): the look's own rule.
            if let Some((at, _)) = lp.splayed.as_mut() {
                *at = Instant::now() + DEBOUNCE;
            }
            return;
        }
        if let Some((_, reason)) = lp.splayed.take() {
            self.set_pending(None);
            // A config or jobs change may have been undone meanwhile.
            let still = match reason {
                RestartReason::BinaryChanged => Some(reason),
                _ => self.look_at_files_now(),
            };
            if let Some(reason) = still.filter(|_| matches!(lp.phase, Phase::Running)) {
                self.request_restart(&mut lp.phase, reason);
            }
        }
    }
}
