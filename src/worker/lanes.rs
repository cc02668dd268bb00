//! The lanes: spawning them, halting them, and what a restart or a stop does about a lane it
//! cannot wait for. A Rust function cannot be ended before it returns; one that ignores
//! `job.deadline()` held every restart and every stop for as long as it ran (for ever, if it
//! never returned). A restart or a stop that waits only for such functions, each
//! `abandon_after` past its timeout, abandons them: the exec (or the exit) goes on and their
//! threads end with the image. What they held is given back as after a kill:
//! the spool's next generation finds the job in `cur/` and queues it again (an interrupted run,
//! counted against `max_attempts`); a Gearman lane's connection is not handed over, so
//! gearmand takes the job back when the exec closes it; an AMQP session ends at every exec,
//! and the broker redelivers what was not acknowledged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::control::{Control, Loop, Phase};
use super::lane::{DoneGuard, LaneContext};
use crate::error::{Error, Result};

/// How often a restart or a stop that waits for running jobs looks for Rust functions held
/// past `abandon_after`.
const HELD_LOOK: Duration = Duration::from_secs(1);

impl Control {
    pub(super) fn halt_lanes(&self) {
        self.stop.trigger();
        self.source.wake();
    }

    pub(super) fn spawn_lanes(&mut self) -> Result<()> {
        let names: Vec<(String, Option<Duration>)> = self
            .plan
            .table
            .iter()
            .map(|(name, (_, timeout))| (name.clone(), *timeout))
            .collect();
        let jobs_dir = Arc::new(crate::watch::Offers::new(
            self.plan.config.worker.jobs_dir.clone(),
        ));
        for index in 0..self.plan.config.worker.concurrency {
            let lane = self.source.lane(index, &names)?;
            let ctx = LaneContext {
                index,
                table: self.plan.table.clone(),
                state: Arc::clone(&self.state),
                stop: self.stop.handle(),
                children: self.children.clone(),
                max_payload: self.plan.config.worker.max_payload_bytes,
                limits: Arc::clone(&self.limits),
                events: self.events.clone(),
                health: Arc::clone(&self.health),
                jobs_dir: Arc::clone(&jobs_dir),
            };
            let done = self.events.clone();
            // Signals blocked, as in every thread but this one: whenever lanes start (before
            // or after this thread takes signals), none is delivered to a lane.
            let spawned =
                crate::ops::signals::spawn_starting(&format!("lane-{index}"), move || {
                    // Reports the exit even if the lane panics, so a drain never waits forever.
                    let _done = DoneGuard(done);
                    ctx.serve(lane);
                });
            match spawned {
                Ok(t) => self.lanes.push(t),
                Err(e) if self.lanes.is_empty() => {
                    return Err(Error::io("spawning a lane thread", e));
                }
                // Those that run go on serving (a stop asked meanwhile lets their jobs finish).
                Err(e) => {
                    log::error!(
                        "spawning a lane thread: {e}; serving with {} lane(s) until the next restart",
                        self.lanes.len()
                    );
                    break;
                }
            }
        }
        // Only the first claim after a re-exec measures the restart pause.
        self.requested_mono_us = 0;
        Ok(())
    }

    /// When to look for held Rust functions next: while a restart or a stop waits for running
    /// jobs and `abandon_after` is set, once a second.
    pub(super) fn held_look_at(&self, lp: &mut Loop) -> Option<Instant> {
        let waiting = matches!(lp.phase, Phase::Draining { .. } | Phase::Stopping) && lp.live > 0;
        if !waiting || self.plan.config.worker.abandon_after.is_none() {
            lp.held_look = None;
        } else if lp.held_look.is_none() {
            lp.held_look = Some(Instant::now() + HELD_LOOK);
        }
        lp.held_look
    }

    /// Abandons the lanes a restart or a stop waits for if every one of them runs a Rust
    /// function held `abandon_after` past its timeout (while any runs something else, that ends
    /// by itself, it waits on), and goes on with the restart or the stop.
    pub(super) fn abandon_held(&mut self, lp: &mut Loop) -> Result<()> {
        lp.held_look = None;
        let Some(grace) = self.plan.config.worker.abandon_after else {
            return Ok(());
        };
        let now_us = crate::clock::monotonic_us();
        let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
        let held: Vec<(usize, String, String, u64, u64)> = match self.state.running.lock() {
            Ok(running) => running
                .iter()
                .enumerate()
                .filter(|(_, s)| s.rust && s.past_timeout(now_us, grace_ms))
                .map(|(lane, s)| {
                    let ran = s.running_ms(now_us);
                    (lane, s.id.clone(), s.function.clone(), ran, s.timeout_ms)
                })
                .collect(),
            Err(_) => return Ok(()),
        };
        if held.is_empty() || held.len() != lp.live {
            return Ok(());
        }
        // Only for a restart that will happen: a refused one after the abandon would leave
        // the worker beside a thread it gave up, so it would have to exit. It waits instead
        // (a change to the files clears `prepared`: looked at again at the next look).
        let stopping = matches!(lp.phase, Phase::Stopping);
        if !stopping && self.prepared.is_none() {
            match self.prepare() {
                Ok(plan) => self.prepared = Some(plan),
                Err(e) => {
                    let said = e.to_string();
                    if self.abandon_held_by.as_deref() != Some(said.as_str()) {
                        log::warn!(
                            "not abandoning the Rust function(s) held past their timeouts: the restart would be refused ({}); waiting until the files are valid again, or the jobs end",
                            crate::text::escape_lines(&said)
                        );
                        self.abandon_held_by = Some(said);
                    }
                    return Ok(());
                }
            }
        }
        let ms = |ms: u64| crate::clock::human(Duration::from_millis(ms));
        let (what, when) = if stopping {
            ("stop", "at the next start ")
        } else {
            ("restart", "")
        };
        for (lane, id, function, ran, timeout) in &held {
            log::warn!(
                "abandoning job {} ({}) on lane {lane}: the Rust function has run {}, {} past its {} timeout and abandon_after ({}); the {what} goes on, its thread ends with this image, and the job runs again {when}(an interrupted run)",
                crate::text::escape(id),
                crate::text::escape(function),
                ms(*ran),
                ms(ran.saturating_sub(*timeout)),
                ms(*timeout),
                ms(grace_ms)
            );
        }
        self.abandoned = held.len();
        lp.live = 0;
        self.lanes_done(lp)
    }
}
