//! `gearshift stop`: a TERM to the proven holder of the pidfile lock (through its supervisor,
//! if it has one), a wait for its running jobs, and with `--force` a second TERM, then SIGKILL.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::clock::human;
use crate::error::{Error, Result};
use crate::ops::pidfile::{self, Probe};

use super::control::what_holds_it;
use super::exit;
use super::locate::{continue_stopped, stopped};

pub(super) fn stop(path: &Path, timeout: Duration, force: bool) -> Result<u8> {
    let (pid, socket, pidfile, by_record) = match super::locate::find(path, true) {
        Err(Error::NotRunning) => {
            if let Some(w) = super::locate::waiting_supervisor(path) {
                return stop_supervisor(&w, timeout);
            }
            println!("gearshift is not running");
            return Ok(0);
        }
        other => other?,
    };
    // Its end is told by the pidfile lock; for a worker found by root's record alone (its
    // state_dir removed under it), by the record: that pid with that start time gone. The
    // record is asked after the lock too: the lock goes as the process closes its files, a
    // moment before it is gone, and `status` asked then would find it by the record.
    let recorded = || super::locate::recorded_worker(path) == Some(pid);
    let alive = || -> Result<bool> {
        Ok(match by_record {
            true => recorded(),
            false => pidfile::probe(&pidfile)? != Probe::NotRunning || recorded(),
        })
    };
    if by_record {
        eprintln!("gearshift: no pidfile lock or status socket in its state_dir (removed?): stopping pid {pid}, which root recorded as the worker started with this config");
    }
    let target = Pid::from_raw(pid);
    // A worker already stopping (an earlier `stop` waits for its jobs) takes this TERM as "exit
    // now": the jobs it runs are interrupted and run again. Say which. A worker stopped by
    // SIGSTOP answers nothing until continued: not asked (3 s for no answer).
    let was_stopped = stopped(pid);
    let interrupted: Option<Vec<String>> = was_stopped
        .is_none()
        .then(|| crate::status::query(&socket, Some(pid)).ok())
        .flatten()
        .filter(|s| s.state == "stopping")
        .map(|s| running_job_names(&s));
    // A supervised worker is stopped through its supervisor, which forwards the TERM and
    // takes what follows for a stop: a worker that then dies of `--force`, or exits 1 at a
    // second `stop`, was started again as after a crash.
    let via = super::locate::supervisor_of(pid, path).map_or(target, Pid::from_raw);
    kill(via, Signal::SIGTERM).map_err(|e| Error::io(format!("signalling pid {via}"), e.into()))?;
    // A stopped worker acts on no TERM: continue it, as systemd does after every TERM.
    if was_stopped.is_some() {
        continue_stopped(pid);
    }
    // Its exit now is bounded (2 s in every state): waited for whatever the timeout.
    let timeout = match interrupted {
        Some(_) => timeout.max(SECOND_TERM_WAIT),
        None => timeout,
    };
    let started = Instant::now();
    let mut said = false;
    while alive()? {
        if !said && started.elapsed() > Duration::from_secs(1) {
            if let Ok(s) = crate::status::query(&socket, Some(pid)) {
                println!("waiting for {} running job(s) to finish", s.in_flight);
                for j in &s.running_jobs {
                    println!("  {}", j.describe());
                }
            }
            said = true;
        }
        if started.elapsed() >= timeout {
            if !force {
                let what = what_holds_it(&socket, pid);
                match timeout.is_zero() {
                    true => eprintln!("pid {pid} is stopping, not waited for (--timeout 0; --force stops it now){what}"),
                    false => eprintln!("pid {pid} still running after {} (--force stops it now){what}", human(timeout)),
                }
                return Ok(exit::NOT_YET);
            }
            let code = forced(pid, via, &socket, &alive, timeout)?;
            its_supervisor_gone(&pidfile, via, target);
            return Ok(code);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    its_supervisor_gone(&pidfile, via, target);
    match interrupted {
        Some(jobs) if !jobs.is_empty() => println!(
            "stopped (pid {pid}) at once: it was already stopping, and a second TERM interrupts; these jobs will run again: {}",
            jobs.join(", ")
        ),
        _ => println!("stopped (pid {pid})"),
    }
    Ok(0)
}

/// No worker runs, but its supervisor does, about to start it again after a crash (or
/// starting it): a TERM ends the supervisor, and a worker it is starting with it (forwarded).
/// `stop` said "not running" and left it, and the worker was back seconds later.
fn stop_supervisor(w: &super::locate::Waiting, timeout: Duration) -> Result<u8> {
    let sup = w.pid;
    let doing = super::locate::supervisor_doing(sup);
    kill(Pid::from_raw(sup), Signal::SIGTERM)
        .map_err(|e| Error::io(format!("signalling pid {sup}"), e.into()))?;
    if supervisor_gone_within(&w.pidfile, sup, timeout) {
        println!("stopped its supervisor (pid {sup}), which was {doing}");
        return Ok(exit::OK);
    }
    eprintln!(
        "its supervisor (pid {sup}) still runs after {}: the worker it was starting finishes its start-up first",
        human(timeout)
    );
    Ok(exit::NOT_YET)
}

/// A stopped worker's supervisor (`via`, when that is not the worker itself) exits right after
/// it: waited for (briefly), so that a `start` or `restart` that follows is not taken for a
/// second start beside a supervisor still there.
fn its_supervisor_gone(pidfile: &Path, via: Pid, worker: Pid) {
    if via != worker {
        let _ = supervisor_gone_within(pidfile, via.as_raw(), SECOND_TERM_WAIT);
    }
}

/// Whether supervisor `sup` let go of its lock (beside `pidfile`) within `wait`.
fn supervisor_gone_within(pidfile: &Path, sup: i32, wait: Duration) -> bool {
    let there = || Ok(super::locate::supervisor_beside(pidfile) == Some(sup));
    gone_within(&there, wait).unwrap_or(false)
}

/// How long `stop --force` gives the worker's forced stop (a second TERM), which it promises
/// within 2 s, before it kills.
const SECOND_TERM_WAIT: Duration = Duration::from_secs(3);

/// Whether the worker is gone within `wait` (`alive` says it is not: its pidfile lock free).
fn gone_within(alive: &impl Fn() -> Result<bool>, wait: Duration) -> Result<bool> {
    let since = Instant::now();
    while alive()? {
        if since.elapsed() >= wait {
            return Ok(false);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(true)
}

/// `ID (function)` of each job the worker runs, escaped for a terminal.
fn running_job_names(s: &crate::status::Doc) -> Vec<String> {
    s.running_jobs
        .iter()
        .map(|j| {
            format!(
                "{} ({})",
                crate::text::escape(&j.id),
                crate::text::escape(&j.function)
            )
        })
        .collect()
}

/// The process groups led by children of `pid` (its running job executables).
fn job_groups(pid: i32) -> Vec<i32> {
    crate::ops::procfs::children_of(pid)
        .into_iter()
        .filter(|(child, stat)| stat.pgrp == *child)
        .map(|(child, _)| child)
        .collect()
}

/// `stop --force` once the timeout passed: the worker's own forced stop (a second TERM), and
/// SIGKILL for it and its jobs' process groups if that has not ended it.
fn forced(
    pid: i32,
    via: Pid,
    socket: &Path,
    alive: &impl Fn() -> Result<bool>,
    timeout: Duration,
) -> Result<u8> {
    let target = Pid::from_raw(pid);
    let after = match timeout.is_zero() {
        true => "at once (--timeout 0)".to_string(),
        false => format!("after {}", human(timeout)),
    };
    let jobs = match acted_on_the_term(socket, pid).map(|s| running_job_names(&s)) {
        Ok(jobs) if jobs.is_empty() => "no job was running".to_string(),
        Ok(jobs) => format!("these jobs will run again: {}", jobs.join(", ")),
        Err(_) => "the jobs it ran (it did not say which) will run again".to_string(),
    };
    // First the worker's own forced stop, which it promises within 2 s in every state:
    // its job processes killed and its death by SIGTERM, which a supervisor and
    // systemd take for the stop it is. A SIGKILL is a crash to them (systemd's
    // Restart=on-failure started the worker again, to run the killed jobs at once).
    let _ = kill(via, Signal::SIGTERM);
    if gone_within(alive, SECOND_TERM_WAIT)? {
        println!("stopped (pid {pid}) {after} by a second TERM; {jobs}");
        return Ok(0);
    }
    // Still there (held by a debugger, or in the kernel): killed. A service's main
    // process killed is a crash to systemd: its Restart= starts it again (a supervisor
    // of ours, which had the TERM, takes it for the stop it is).
    if via == target {
        if let Some(unit) = crate::ops::service::systemd_unit(pid) {
            let unit = crate::text::escape(&unit);
            eprintln!(
                "note: pid {pid} is the main process of systemd unit {unit}, which takes a SIGKILL for a crash: Restart=on-failure (as in scripts/gearshift.service) starts it again; `systemctl stop {unit}` stops the unit"
            );
        }
    }
    // Job processes run in their own process groups: the worker's death does not end
    // them, and a spool job would otherwise run twice at once. Find them while they
    // are still the worker's children, then kill the worker, then them.
    let groups = job_groups(pid);
    kill(target, Signal::SIGKILL).map_err(|e| Error::io(format!("killing pid {pid}"), e.into()))?;
    for g in groups {
        let _ = nix::sys::signal::killpg(Pid::from_raw(g), Signal::SIGKILL);
    }
    // The lock goes with the process, which one in an uninterruptible wait (its disk
    // or NFS server hung, a frozen cgroup) leaves only once that wait ends.
    let wait = crate::jobs::pipes::KILL_WAIT;
    if !gone_within(alive, wait)? {
        let state = crate::ops::procfs::Stat::of(Some(pid)).map_or('?', |s| s.state);
        eprintln!("killed pid {pid} {after}, but it is still there {} later, in state {state}: a process in an uninterruptible wait (a hung disk or NFS server, a frozen cgroup) dies only once that wait ends, and holds the pidfile lock until then", human(wait));
        return Ok(exit::NOT_YET);
    }
    println!(
        "killed (pid {pid}) {after}: a second TERM did not end it within {}; {jobs}",
        human(SECOND_TERM_WAIT)
    );
    Ok(0)
}

/// The worker's status once it has acted on the first TERM (its state "stopping"), waited
/// for up to a second: a second TERM sent before that arrives with the first as one signal
/// (a pending signal is not queued twice), and the stop it asked for would be the graceful one.
fn acted_on_the_term(socket: &Path, pid: i32) -> Result<crate::status::Doc> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let doc = crate::status::query(socket, Some(pid));
        match doc {
            Ok(d) if d.state == "stopping" => return Ok(d),
            other if Instant::now() >= deadline => return other,
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
