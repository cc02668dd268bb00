//! The restart state machine's decisions: is there a valid change, restart now or after a
//! splay, refuse, and the restart itself (hand over, then exec).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use sha2::Digest;

use super::control::{Control, Phase};
use super::plan::Plan;
use crate::clock::now_ms;
use crate::error::{Error, Tier};
use crate::kinds::{RestartReason, WorkerPhase};
use crate::ops::signals;
use crate::restart::carried::Inherited;
use crate::restart::parcel::Parts;
use crate::restart::reexec;
use crate::status;
use crate::status::records::Refusal;
use crate::text::ShowPath;
use crate::watch;

impl Control {
    /// The plan for the files as they are now; refused if it moves `state_dir`, which moves
    /// only at a fresh start (its pidfile, status socket and log are made there; a HUP once
    /// moved the pidfile alone, and the CLI looked for the worker where it was not), or if the
    /// next generation could not open `state_dir` (removed under a worker no longer root).
    pub(super) fn prepare(&self) -> crate::Result<Plan> {
        let plan = Plan::prepare(&self.config_path, &self.functions)?;
        let (now, next) = (
            &self.plan.config.worker.state_dir,
            &plan.config.worker.state_dir,
        );
        if now != next {
            return Err(Error::Config(format!(
                "{}: [worker] state_dir changed from \"{}\" to \"{}\": a state_dir moves only at a fresh start (`gearshift restart`); this worker runs on in \"{}\"",
                self.config_path.shown(),
                now.shown(),
                next.shown(),
                now.shown()
            )));
        }
        crate::ops::layout::reachable_after_exec(now)?;
        Ok(plan)
    }

    /// Which watched state differs from the running one and is valid, if any.
    pub(super) fn changed_on_disk(&mut self) -> Option<RestartReason> {
        self.state.file_checks.fetch_add(1, Ordering::Release);
        let was_failing = std::mem::take(&mut self.look_failing);
        let cfg = match crate::config::read_file(&self.config_path) {
            Ok(b) => Some(crate::text::hex(&sha2::Sha256::digest(&b))),
            // No config at all in its place (a FIFO, a device, a huge file): a change, refused
            // below with why.
            Err(e @ Error::Config(_)) => Some(format!("invalid: {e}")),
            Err(_) => None,
        };
        // A jobs_dir that does not scan (two files for one name, a file without #!) is a
        // change too: it is refused below, visibly, rather than ignored.
        let jobs = match watch::scan_jobs(&self.plan.config.worker.jobs_dir) {
            Ok(j) => j.digest,
            Err(e) if e.tier() == Tier::Transient => return self.look_failed(&e, was_failing),
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
        match self.prepare() {
            Ok(_) => Some(reason),
            Err(e) if e.tier() == Tier::Transient => self.look_failed(&e, was_failing),
            Err(e) => {
                self.refused_digest = Some(digest);
                self.refuse(reason, &e.to_string());
                None
            }
        }
    }

    /// The files could not be looked at for want of descriptors or memory, or for an I/O
    /// error: that says nothing about what they hold, so it is no refusal; they are looked at
    /// again shortly (`look_at_files`), and the log says so once.
    fn look_failed(&mut self, e: &Error, was_failing: bool) -> Option<RestartReason> {
        if !was_failing {
            log::warn!(
                "cannot look at config.toml and jobs_dir now ({e}); looking again until it works"
            );
        }
        self.look_failing = true;
        None
    }

    /// A restart caused by a change that may have reached every host at once: delayed by a
    /// random fraction of `restart_splay` when set (the worker serves on meanwhile).
    pub(super) fn restart_or_splay(
        &mut self,
        phase: &mut Phase,
        splayed: &mut Option<(Instant, RestartReason)>,
        reason: RestartReason,
    ) {
        let Some(max) = self.plan.config.worker.restart_splay else {
            self.request_restart(phase, reason);
            return;
        };
        let delay = max.mul_f64(crate::clock::random_fraction());
        log::info!(
            "{reason}: restarting in {} ms (restart_splay {} ms)",
            delay.as_millis(),
            max.as_millis()
        );
        *splayed = Some((Instant::now() + delay, reason));
        self.set_pending(Some((reason, now_ms() + delay.as_millis() as u64)));
    }

    pub(super) fn set_pending(&self, pending: Option<(RestartReason, u64)>) {
        if let Ok(mut i) = self.state.inner.lock() {
            i.restart_pending = pending.map(|(r, at)| (r.to_string(), at));
        }
    }

    /// Starts a restart unless the new state is invalid (then refused: false).
    /// A thread of this generation died: re-exec once the running jobs finish; if the restart
    /// is refused (the config on disk is invalid now), stop after them and exit 1, so the
    /// supervisor (or systemd) starts the worker afresh.
    pub(super) fn replace_generation(&mut self, phase: &mut Phase) {
        if !self.request_restart(phase, RestartReason::ThreadDied)
            && matches!(phase, Phase::Running)
        {
            self.stop_for_supervisor(phase);
        }
    }

    /// Stops after the running jobs, then exits 1 for the supervisor (or systemd) to start
    /// the worker afresh.
    fn stop_for_supervisor(&mut self, phase: &mut Phase) {
        self.exit_for_supervisor = true;
        self.stop_after_jobs(phase);
    }

    /// The soft CPU time limit is reached (SIGXCPU, again every second of CPU after it): no
    /// reload resets it, so stop after the running jobs and exit for the supervisor, before
    /// the hard limit kills the worker with them (see `limits::cpu_time_warning`).
    pub(super) fn cpu_time_spent(&mut self, phase: &mut Phase) {
        if self.exit_for_supervisor {
            return;
        }
        log::error!(
            "the CPU time limit (ulimit -t, LimitCPU=) is reached: it counts the worker's CPU time since its first start, which no reload resets; stopping after {} running job(s) finish",
            self.state.in_flight.load(Ordering::Relaxed)
        );
        self.stop_for_supervisor(phase);
    }

    pub(super) fn request_restart(&mut self, phase: &mut Phase, reason: RestartReason) -> bool {
        match phase {
            Phase::Running => {}
            Phase::Draining {
                reason: under_way, ..
            } => {
                log::info!("{reason}: a restart ({under_way}) is already under way; this one is folded into it");
                if reason == RestartReason::Sighup {
                    // systemd ignores a RELOADING=1 stamped before its SIGHUP: this reload
                    // would wait for one until its timeout, though the next image's READY=1
                    // ends it too.
                    self.notify_reloading();
                }
                return true;
            }
            Phase::Stopping => {
                log::info!("{reason}: the worker is stopping; no restart");
                return true;
            }
        }
        let requested = crate::clock::monotonic_us();
        match self.prepare() {
            // Kept for the exec while the files are watched and stay untouched.
            Ok(plan) => self.prepared = Some(plan).filter(|_| !self.poll_fallback),
            Err(e) => {
                self.refuse(reason, &e.to_string());
                if reason == RestartReason::Sighup {
                    self.notify_refused(&e.to_string());
                }
                return false;
            }
        }
        log::info!(
            "{reason}: restarting after {} running job(s) finish",
            self.state.in_flight.load(Ordering::Relaxed)
        );
        *phase = Phase::Draining {
            reason,
            requested_mono_us: requested,
        };
        self.state.set_phase(WorkerPhase::Draining);
        self.source.stopping(true);
        self.hurry_candidate(reason);
        self.notify_reloading();
        self.halt_lanes();
        true
    }

    pub(super) fn refuse(&self, reason: impl std::fmt::Display, error: &str) {
        log::error!(
            "{reason}: reload refused, keeping generation {}: {error}",
            self.state.generation
        );
        // No restart is coming: a job for a function an approved binary would bring fails as
        // unknown instead of waiting for one (a candidate still judged is said again at its
        // next look).
        crate::jobs::functions::set_candidate_pending(false);
        if let Ok(mut i) = self.state.inner.lock() {
            i.refusals += 1;
            i.last_refused = Some(Refusal {
                at_ms: now_ms(),
                reason: reason.to_string(),
                error: crate::text::cut(error, 4096).into_owned(),
            });
        }
    }

    /// Every lane has ended for a restart: a stop asked meanwhile (its TERM still waiting in
    /// the queue behind the lanes' ends) makes it a stop, with no exec of a generation that
    /// would only stop.
    pub(super) fn stop_instead(&self, phase: &mut Phase) {
        if let Phase::Draining { reason, .. } = *phase {
            #[cfg(gearshift_faults)]
            super::plan::stall_while("GEARSHIFT_FAULT_STALL_DRAINED", "stalling once drained");
            if signals::stop_asked() {
                log::info!("{reason}: a stop was asked meanwhile; stopping instead");
                *phase = Phase::Stopping;
                self.state.set_phase(WorkerPhase::Stopping);
            }
        }
    }

    /// Every lane has exited: validate once more (unless no file was touched since the
    /// restart was asked for) and re-exec. Returns only if that failed.
    pub(super) fn restart(&mut self, reason: RestartReason, requested_mono_us: u64) {
        // Not looked at again: a change whose event had not reached us by now is seen by the
        // next generation's first look at the files (the inotify queue crosses the exec).
        let plan = match self.prepared.take() {
            Some(p) => p,
            None => match self.prepare() {
                Ok(p) => p,
                Err(e) => return self.refuse(reason, &e.to_string()),
            },
        };
        self.state.set_phase(WorkerPhase::Restarting);
        let mut next = self.carried(&plan, reason, requested_mono_us);
        let (exe, known) = self.exec_target(&plan, reason);
        next.binary = known;
        log::info!(
            "{reason}: re-exec \"{}\" as generation {}",
            exe.shown(),
            self.state.generation + 1
        );
        log::logger().flush();
        // The status thread ends while the source settles (the spool's commit thread finishing
        // its sync under way); joined after.
        if let Some(s) = self.status_server.as_mut() {
            s.close();
        }
        // A next generation that serves another spool (or none) would drop the outcomes
        // handed to it, and their jobs, done, would run again: they are stored here.
        let spool_dir = |p: &Plan| p.config.source.spool().map(|s| s.dir.clone());
        if spool_dir(&plan) != spool_dir(&self.plan) {
            self.source.stopping(false);
            let (old, queued) = (spool_dir(&self.plan), self.source.queue_stats());
            if let (Some(old), Some(q)) = (old, queued.filter(|q| q.depth > 0)) {
                log::warn!(
                    "{reason}: the next generation serves {}: {} job(s) queued in the spool \"{}\" stay there until a worker serves it again",
                    spool_dir(&plan).map_or_else(
                        || format!("a {} source", plan.config.source.kind()),
                        |d| format!("the spool \"{}\"", d.shown())
                    ),
                    q.depth,
                    old.shown()
                );
            }
        }
        // Every lane has ended: what the source holds is made durable before the exec, or
        // kept for the hand-over.
        self.source.settle(false);
        next.ingress_counts = self.state.ingress.counts();
        next.set_ingress_closed(self.state.ingress.closed_counts());
        let takes_locks = self.takes_locks(&exe, next.binary.as_ref());
        let parts = self.hand_over(&mut next, &plan, takes_locks);
        if let Some(s) = self.status_server.as_mut() {
            s.stop();
        }
        drop(plan);
        crate::restart::preflight::kill_preflight();
        let inherit_inotify = || match &self.inotify {
            Some(i) => i
                .keep_across_exec()
                .map_err(|e| Error::io("keeping inotify across exec", e)),
            None => Ok(()),
        };
        #[cfg(gearshift_faults)]
        super::plan::stall_while("GEARSHIFT_FAULT_STALL_EXEC", "stalling before the exec");
        let err = match crate::ops::sigstate::block()
            .map(|()| signals::carry_unacted())
            .and_then(|()| self.pidfile.keep_across_exec())
            .and_then(|()| inherit_inotify())
        {
            Ok(()) => reexec::exec(&exe, &self.boot.exe, &self.boot.argv, &next, &parts),
            Err(e) => e,
        };
        // execve failed: carry on as we were (the source too: the caller unsettles it).
        self.pidfile.close_on_exec();
        crate::ops::logging::not_handed();
        for (_, fd) in next.listen_fds.iter().chain(&next.lock_fds) {
            // SAFETY: the source owns `fd` and keeps it open.
            crate::ops::handover::release(unsafe { std::os::fd::BorrowedFd::borrow_raw(*fd) });
        }
        if let Some(s) = &self.status_server {
            crate::ops::handover::release(s.handed().0);
        }
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

    /// What this generation hands the next in the environment.
    fn carried(&self, plan: &Plan, reason: RestartReason, requested_mono_us: u64) -> Inherited {
        let refusals = self
            .state
            .inner
            .lock()
            .map(|i| i.refusals)
            .unwrap_or_default();
        let (completed, failed) = self.state.metrics.totals();
        Inherited {
            generation: self.state.generation,
            pidfile_fd: Some(self.pidfile.fd()),
            log_fd: None,
            worker_user: crate::ops::privilege::known_user(),
            supervisor_gone_said: crate::status::records::gone_said(),
            inotify_fd: self.inotify.as_ref().map(|i| i.fd()),
            source_fd: None,
            started_at_ms: self.state.started_at_ms,
            restarted_at_ms: now_ms(),
            reason: reason.to_string(),
            // Read by older images only (a rollback): the counts travel with the metrics.
            completed,
            failed,
            rejected: crate::status::REJECTED.load(Ordering::Relaxed),
            restarts: self.state.restarts + 1,
            refusals,
            // This restart succeeds: an older refusal is history (the count keeps it).
            last_refused: None,
            requested_mono_us,
            config_text: Some(plan.config.text.clone()),
            binary: None,
            last_refused_deploy: self.deploy.as_ref().and_then(|d| d.last_refused.clone()),
            last_rollback: self.last_rollback.clone(),
            metrics_fd: None,
            metrics_listen_fd: None,
            jobs_fd: None,
            status_listen_fd: None,
            status_socket: None,
            listen_fds: Vec::new(),
            ingress_counts: [0; 3], // taken after the settle: the ingress answers until then
            ..Inherited::default()  // the clients closed: taken after the settle, as above
        }
    }

    /// Hands over the source's state, the validated `jobs_dir` and the metrics' counts (as
    /// the parcel's parts), and, as open descriptors noted in `next`, the listening sockets and
    /// the `/metrics` socket (paused), and to an image that `takes_locks` the source's locks.
    fn hand_over(&mut self, next: &mut Inherited, plan: &Plan, takes_locks: bool) -> Parts {
        let parts = Parts {
            source: self.source.hand_over(),
            // What was just validated is what the next generation serves on.
            jobs: serde_json::to_vec(&plan.jobs).ok(),
            // Every lane has ended: the counters are final for this generation.
            metrics: serde_json::to_vec(&self.state.metrics.carry(&self.state.reconnects())).ok(),
        };
        // A network source's listening sockets (connects wait in their accept queues), and for
        // an image that takes them up the source's locks (the spool's: no second worker takes it
        // meanwhile).
        let locks = if takes_locks {
            self.source.locks()
        } else {
            Vec::new()
        };
        for (list, fds) in [
            (&mut next.listen_fds, self.source.listeners()),
            (&mut next.lock_fds, locks),
        ] {
            for (key, fd) in fds {
                // SAFETY: the source owns `fd` and keeps it open until the exec (or its failure).
                let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                if crate::ops::handover::keep(borrowed).is_ok() {
                    list.push((key, fd));
                }
            }
        }
        if let Some(s) = &self.status_server {
            // Queries from now on wait in its backlog for the next image.
            let (fd, ident) = s.handed();
            if crate::ops::handover::keep(fd).is_ok() {
                next.status_listen_fd = Some(std::os::fd::AsRawFd::as_raw_fd(&fd));
                next.status_socket = Some(ident);
            }
        }
        // The next image writes on to it if it cannot open the log's path.
        next.log_fd = crate::ops::logging::handed();
        if let Some(m) = self.metrics_server.as_mut() {
            // Scrapes from now on wait in the accept queue for the next image.
            m.pause();
            if crate::ops::handover::keep(m.socket()).is_ok() {
                next.metrics_listen_fd = Some(m.fd());
            }
        }
        parts
    }

    /// Brings back the status server and signal thread after a failed execve.
    pub(super) fn resume_helpers(&mut self) {
        let answers = status::server::Answers {
            metrics: Arc::clone(&self.render),
            counts: Arc::clone(&self.counts),
        };
        if let Some(s) = self.status_server.as_mut() {
            if let Err(e) = s.start(Arc::clone(&self.state), answers) {
                log::error!("status socket: {e}");
            }
        }
        if let Err(e) = crate::ops::sigstate::clear_mask() {
            log::error!("{e}");
        }
    }
}
