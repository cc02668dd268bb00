//! `gearshift restart`: `check`, `stop`, `start`, never leaving no worker that could run.

use std::path::Path;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::jobs::functions::Functions;
use crate::worker::Plan;

use super::{exit, locate, START_WAIT};

/// Stops the running worker and starts it again (with its supervisor, if it had one). What
/// the new worker would refuse is said first, and the running one left as it is; a new binary
/// that dies during start-up is rolled back to the last good one.
pub(super) fn restart(path: &Path, functions: Functions, timeout: Duration) -> Result<u8> {
    let refused = |e: &dyn std::fmt::Display| {
        Error::Msg(format!(
            "{e}\nnot restarted: the running worker, if any, is left as it is (`check` \
             says the same; fix it and restart again)"
        ))
    };
    let plan = Plan::prepare(path, &functions).map_err(|e| refused(&e))?;
    // A directory the new worker could not make would fail its start after the stop.
    let unmakeable = plan.unmakeable();
    if !unmakeable.is_empty() {
        return Err(refused(&unmakeable.join("\n")));
    }
    let state_dir = &plan.config.worker.state_dir;
    let running = locate::running(path).ok();
    // A systemd service's worker stopped from here would be started again outside its unit.
    let unit = running
        .as_ref()
        .and_then(|(pid, _, _)| crate::ops::service::systemd_unit(*pid).map(|u| (*pid, u)));
    if let Some((pid, unit)) = unit {
        let unit = crate::text::escape(&unit);
        return Err(Error::Msg(format!(
            "not restarted: pid {pid} is the main process of systemd unit {unit}, and a restart from here would start the new worker outside it (no Restart=, its log not in the journal, ended with this session); `systemctl restart {unit}` restarts the unit, `gearshift reload` (or `systemctl reload {unit}`) restarts the worker in place"
        )));
    }
    // When this restart switches binaries, the running one, kept for a rollback if the new one
    // (this image) dies as it starts.
    let kept = running.as_ref().and_then(|(pid, _, _)| {
        crate::restart::rollback::keep_running(state_dir, *pid)
            .map_err(|e| {
                eprintln!("gearshift: warning: the running binary is not kept as last-good: {e}")
            })
            .ok()
            .flatten()
    });
    // A worker started with --supervise is started again with its supervisor.
    let supervised = running.and_then(|(pid, socket, _)| {
        // Stopped by SIGSTOP, it would not answer, and the new worker would lose its
        // supervisor: continued first (the TERM that follows ends it all the same).
        locate::continue_stopped(pid);
        crate::status::query_patiently(&socket, Some(pid), Duration::from_secs(2))
            .ok()
            .and_then(|s| s.supervisor.map(|sv| sv.max_restarts))
    });
    // No worker, but a supervisor about to start it again (after a crash): stopped (below) and
    // started again the same way.
    let supervised =
        supervised.or_else(|| locate::waiting_supervisor(path).map(|w| w.max_restarts));
    let stopped = super::stop::stop(path, timeout, false)?;
    if stopped == exit::NOT_YET {
        eprintln!(
            "not restarted: the worker stops once its running jobs finish, and nothing starts after it; start it then with `gearshift start` (`gearshift status` says when it has stopped): another `stop` or `restart` now would end its jobs at once"
        );
    }
    if stopped != exit::OK {
        return Ok(stopped);
    }
    let started = crate::daemon::start_with(path, functions.clone(), supervised, START_WAIT)?;
    let Some(kept) = kept.filter(|_| started.died) else {
        return Ok(started.code);
    };
    // This binary (the daemon is a fork of it) died before it served: the stopped worker's is
    // `last-good` again (the start may have kept itself there). A deploy marker for this binary
    // makes the next fresh start of it roll back, as after a deploy that died; under a
    // supervisor, each start of the path does the same.
    let marked = crate::restart::rollback::put_back(state_dir, &kept)
        .and_then(|()| crate::restart::rollback::mark_died(state_dir));
    match marked {
        Ok(Some(last_good)) => {
            eprintln!(
                "gearshift: the binary at this path died during start-up; starting again, which rolls back to the last good binary (sha256 {})",
                crate::restart::deploy::short(&last_good)
            );
            crate::daemon::start(path, functions, supervised, START_WAIT)
        }
        Ok(None) => Ok(started.code),
        Err(e) => {
            eprintln!("gearshift: no rollback: {e}");
            Ok(started.code)
        }
    }
}
