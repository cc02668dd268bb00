//! A restart and a new binary at the path: the binary watch's looks, and a restart that waits
//! for the verdict on a candidate found when it was asked for (a release link swapped, then
//! `reload`), so that one restart runs the new release instead of the old image.

use std::time::{Duration, Instant};

use super::control::{Control, Loop, Phase};
use crate::kinds::{DeployResult, RestartReason};
use crate::restart::deploy::Step;
use crate::text::ShowPath;

/// The longest a restart whose lanes have ended waits for a candidate's verdict: its
/// pre-flight's own bound, and time to hash it. Then the running image is exec'd, as for a
/// candidate found later.
const VERDICT_WAIT: Duration =
    crate::restart::preflight::PREFLIGHT_TIMEOUT.saturating_add(Duration::from_secs(5));

impl Control {
    /// A look at the binary's path: a candidate, its pre-flight, its approval.
    pub(super) fn look_at_binary(&mut self, lp: &mut Loop) {
        lp.binary_at = None;
        let mut approved = false;
        if let Some(d) = self.deploy.as_mut() {
            match d.check() {
                Step::Nothing => {}
                Step::CheckIn(after) => lp.binary_at = Some(Instant::now() + after),
                Step::Approved => approved = true,
            }
            crate::jobs::functions::set_candidate_pending(d.pending());
            crate::jobs::functions::binary_looked_at(&d.path);
            let refusals = d.take_refusals();
            for _ in 0..refusals {
                self.state.metrics.deploy(DeployResult::Refused);
            }
            let due = lp.first_touch.is_some() || lp.check_at.is_some();
            let files_refused = self.refused_digest.is_some();
            self.verdicts
                .looked(d.deciding(), refusals > 0, files_refused, due);
            if let Ok(mut i) = self.state.inner.lock() {
                i.last_refused_deploy = d.last_refused.clone();
                i.binary_sha256 = d.running_sha();
            }
        }
        // A restart under way execs the approved binary by itself.
        if approved && lp.splayed.is_none() && matches!(lp.phase, Phase::Running) {
            self.restart_or_splay(&mut lp.phase, &mut lp.splayed, RestartReason::BinaryChanged);
        }
        self.judge_again_if_stale(lp);
    }

    /// A candidate refused while config.toml or `jobs_dir` was not as this generation runs it
    /// (its pre-flight, `check`, read them: a half-edited config fails it) is judged again
    /// once they are, which no other event would bring about.
    pub(super) fn judge_again_if_stale(&mut self, lp: &mut Loop) {
        let settled = self.refused_digest.is_none()
            && !self.look_failing
            && lp.first_touch.is_none()
            && lp.check_at.is_none();
        if !settled || !matches!(lp.phase, Phase::Running) || !self.verdicts.stale {
            return;
        }
        let Some(d) = self.deploy.as_mut() else {
            return;
        };
        if d.deciding() {
            return;
        }
        self.verdicts.stale = false;
        log::info!(
            "deploy: \"{}\" was refused while config.toml or jobs_dir was changing; judging it again",
            d.path.shown()
        );
        d.hurry(true);
        crate::jobs::functions::set_candidate_pending(d.pending());
        let soon = Instant::now() + Duration::from_millis(50);
        lp.binary_at = Some(lp.binary_at.map_or(soon, |t| t.min(soon)));
    }

    /// A restart is asked for: a new file at the binary's path is judged now; one refused
    /// before is judged again when the operator asked (SIGHUP), the config changed, or its
    /// refusal may be the files' fault (`verdicts.rs`).
    pub(super) fn hurry_candidate(&mut self, reason: RestartReason) {
        if let Some(d) = self.deploy.as_mut() {
            // A refusal its pre-flight owed to files being edited is judged again too: the
            // next generation would refuse those bytes unseen.
            d.hurry(again(reason) || std::mem::take(&mut self.verdicts.stale));
            crate::jobs::functions::set_candidate_pending(d.pending());
        }
    }

    /// Every lane has ended for a restart (or did earlier, `lp.awaiting`): true while the
    /// restart waits for a candidate's verdict, bounded by [`VERDICT_WAIT`]. A stop asked
    /// meanwhile does not wait.
    pub(super) fn await_candidate(&mut self, lp: &mut Loop) -> bool {
        let (Phase::Draining { reason, .. }, Some(d)) = (&lp.phase, self.deploy.as_mut()) else {
            lp.awaiting = None;
            return false;
        };
        let reason = *reason;
        let since = match lp.awaiting {
            Some(since) => since,
            None => {
                // A file dropped while the jobs finished is judged now too (one judged again
                // when the restart was asked for is not judged a third time).
                d.hurry(false);
                if !d.deciding() {
                    return false;
                }
                log::info!("{reason}: waiting for the pre-flight of the new binary at the path");
                *lp.awaiting.insert(Instant::now())
            }
        };
        if !d.deciding() {
            lp.awaiting = None;
            return false;
        }
        if since.elapsed() >= VERDICT_WAIT {
            log::warn!(
                "{reason}: the new binary's pre-flight has not ended in {} s; restarting into the running image (the candidate is judged on)",
                VERDICT_WAIT.as_secs()
            );
            lp.awaiting = None;
            return false;
        }
        let soon = Instant::now() + Duration::from_millis(20);
        lp.binary_at = Some(lp.binary_at.map_or(soon, |t| t.min(soon)));
        true
    }
}

/// Whether a restart for `reason` judges a refused binary again.
fn again(reason: RestartReason) -> bool {
    matches!(reason, RestartReason::Sighup | RestartReason::ConfigChanged)
}
