//! File events from the control loop: the debounce, a config still open for writing, and the
//! watch lost (the files polled instead).

use std::time::{Duration, Instant};

use super::control::{Control, Loop, Phase, DEBOUNCE, POLL_FALLBACK};
use crate::kinds::RestartReason;
use crate::text::ShowPath;
use crate::watch::Touched;

/// A look at the files that failed for want of a resource is tried again this soon.
const LOOK_AGAIN: Duration = Duration::from_secs(1);
/// How long a config open for writing (a slow write in place) is waited for, from the first
/// event, before it is judged as it is.
const WRITE_WAIT: Duration = Duration::from_secs(10);

impl Loop {
    /// A writer has config.toml open, and it has not been waited for [`WRITE_WAIT`] yet: what
    /// the file holds now may be a prefix that parses.
    pub(super) fn config_being_written(&self) -> bool {
        self.writer.open && self.first_touch.is_some_and(|t| t.elapsed() < WRITE_WAIT)
    }
}

impl Control {
    pub(super) fn on_touched(&mut self, touched: Touched, lp: &mut Loop) {
        // What was validated for a restart under way may be stale now: look again before it.
        self.prepared = None;
        match touched {
            Touched::Binary => {
                // Perhaps a new binary: a job for a function this generation lacks waits
                // until the look below says.
                if self.deploy.is_some() {
                    crate::jobs::functions::set_candidate_pending(true);
                }
                lp.binary_at
                    .get_or_insert_with(|| Instant::now() + Duration::from_millis(20));
            }
            Touched::Lost(why) => {
                if !self.poll_fallback {
                    self.watch_lost(&why);
                }
            }
            other => {
                if let Touched::Config { writing } = other {
                    lp.writer.open = writing;
                }
                let now = Instant::now();
                let first = *lp.first_touch.get_or_insert(now);
                // Debounce, but never postpone by more than a second under a stream of events.
                lp.check_at = Some((now + DEBOUNCE).min(first + Duration::from_secs(1)));
            }
        }
    }

    /// Which watched state differs from the running one and is valid (`changed_on_disk`),
    /// noted for the verdicts on candidates (a refusal while the files moved may be theirs).
    pub(super) fn look_at_files_now(&mut self) -> Option<RestartReason> {
        let reason = self.changed_on_disk();
        let moved = reason.is_some() || self.refused_digest.is_some() || self.look_failing;
        self.verdicts.files_looked(moved);
        reason
    }

    /// The debounced look at config.toml and `jobs_dir` after file events.
    pub(super) fn look_at_files(&mut self, lp: &mut Loop) {
        // Written in place and not closed yet: a prefix that may parse is not judged (its
        // writer's close is an event of its own), for at most WRITE_WAIT.
        if lp.writer.open && lp.first_touch.is_some() {
            if lp.config_being_written() {
                if !std::mem::replace(&mut lp.writer.said, true) {
                    log::info!(
                        "{} is open for writing: judged once its writer closes it (at most {} s)",
                        self.plan.config.path.shown(),
                        WRITE_WAIT.as_secs()
                    );
                }
                lp.check_at = Some(Instant::now() + DEBOUNCE);
                return;
            }
            log::warn!(
                "{} has been open for writing for {} s: judged as it is",
                self.plan.config.path.shown(),
                WRITE_WAIT.as_secs()
            );
        }
        lp.writer.said = false;
        lp.check_at = None;
        lp.first_touch = None;
        if std::mem::take(&mut lp.writer.hup) {
            // The operator's reload, with whatever the file now holds (never splayed).
            self.request_restart(&mut lp.phase, RestartReason::Sighup);
        }
        if matches!(lp.phase, Phase::Running) && lp.splayed.is_none() {
            if let Some(reason) = self.look_at_files_now() {
                self.restart_or_splay(&mut lp.phase, &mut lp.splayed, reason);
            }
            if self.look_failing {
                lp.check_at = Some(Instant::now() + LOOK_AGAIN);
            }
            self.judge_again_if_stale(lp);
        }
    }

    /// Every lane has ended for a restart (or did earlier, `lp.awaiting`): true while
    /// config.toml is still being written in place, for at most [`WRITE_WAIT`] from its first
    /// event. The exec then reads it once its writer has closed it (the plan validated when the
    /// restart was asked for may be of a prefix). A stop asked meanwhile does not wait.
    pub(super) fn await_config_writer(&mut self, lp: &mut Loop) -> bool {
        let Phase::Draining { reason, .. } = lp.phase else {
            return false;
        };
        if !lp.config_being_written() {
            lp.writer.said_restart = false;
            return false;
        }
        self.prepared = None;
        if !std::mem::replace(&mut lp.writer.said_restart, true) {
            log::info!(
                "{reason}: {} is open for writing: the restart reads it once its writer closes it (at most {} s)",
                self.plan.config.path.shown(),
                WRITE_WAIT.as_secs()
            );
        }
        // Looked at again after every event: the close is one, and the look at the files
        // comes every DEBOUNCE until then.
        lp.awaiting.get_or_insert_with(Instant::now);
        true
    }

    /// A SIGHUP while config.toml is being written: the reload is asked for at the look after
    /// its writer's close (or [`WRITE_WAIT`]), which reads the whole file.
    pub(super) fn hup_awaits_writer(&mut self, lp: &mut Loop) {
        if !std::mem::replace(&mut lp.writer.hup, true) {
            log::info!(
                "SIGHUP: {} is open for writing: the reload waits for its writer to close it (at most {} s)",
                self.plan.config.path.shown(),
                WRITE_WAIT.as_secs()
            );
        }
    }

    /// The file watch failed: poll the files every [`POLL_FALLBACK`] and the queue every second
    /// from now on, and say so in the log and in `status`.
    pub(super) fn watch_lost(&mut self, why: &str) {
        log::error!(
            "{why}; checking files every {}s and the queue every second instead",
            POLL_FALLBACK.as_secs()
        );
        self.poll_fallback = true;
        if let Err(e) = super::lane::poll_queue(&self.source) {
            log::error!("{e}");
        }
        if let Ok(mut i) = self.state.inner.lock() {
            i.watch = Some(format!("polling: {why}"));
        }
    }
}
