//! Commands that find the running worker by its pidfile lock and act on it: `status`,
//! `metrics`, `reload`, `stop`.

use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::error::{Error, Result};
use crate::ops::pidfile::{self, Probe};
use crate::text::ShowPath;

use super::exit;
use super::locate::{continue_stopped, running, stopped};

pub(super) fn metrics(path: &Path) -> Result<u8> {
    let (pid, socket) = match running(path) {
        Ok((pid, socket, _)) => (pid, socket),
        Err(Error::NotRunning) => {
            eprintln!("gearshift is not running");
            return Ok(exit::NOT_RUNNING);
        }
        Err(e) => {
            eprintln!("gearshift: {}", crate::text::escape_lines(&e.to_string()));
            return Ok(exit::UNKNOWN);
        }
    };
    if let Some(why) = stopped(pid) {
        eprintln!("gearshift is running, but {why}");
        return Ok(exit::UNKNOWN);
    }
    let text = crate::status::query_metrics(&socket, Some(pid))?;
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Error::io("writing metrics", e))?;
    Ok(0)
}

pub(super) fn status(path: &Path, json: bool) -> Result<u8> {
    let (pid, socket) = match running(path) {
        Ok((pid, socket, _)) => (pid, socket),
        Err(Error::NotRunning) => {
            if json {
                println!("{}", serde_json::json!({"running": false}));
            } else {
                println!("gearshift is not running");
            }
            return Ok(exit::NOT_RUNNING);
        }
        Err(e) => {
            eprintln!("gearshift: {}", crate::text::escape_lines(&e.to_string()));
            return Ok(exit::UNKNOWN);
        }
    };
    // Running without a status document: said on stderr, and as a short document for `--json`
    // (a monitor reading stdout had nothing to read).
    let without_doc = |state: &str, why: &str| {
        if json {
            let doc = serde_json::json!({"running": true, "pid": pid, "state": state, "why": why});
            println!("{doc}");
        }
    };
    if let Some(why) = stopped(pid) {
        eprintln!("gearshift is running, but {why}");
        without_doc("stopped", &why);
        return Ok(0);
    }
    let s = match crate::status::query_patiently(&socket, Some(pid), Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) => {
            let why = crate::text::escape_lines(&e.to_string()).into_owned();
            eprintln!("gearshift is running (pid {pid}) but its status is unavailable: {why}");
            without_doc("unavailable", &why);
            return Ok(0);
        }
    };
    // The pid to signal from here (a worker in a pid namespace of its own knows another).
    let here = u32::try_from(pid).unwrap_or(s.pid);
    let own = (here != s.pid).then_some(s.pid);
    let s = crate::status::Doc { pid: here, ..s };
    if json {
        println!(
            "{}",
            serde_json::to_string(&s).map_err(|e| Error::Msg(format!("encoding status: {e}")))?
        );
        return Ok(0);
    }
    print_status(&s.for_terminal());
    if let Some(own) = own {
        println!("  pid {own} in its own pid namespace");
    }
    // Whose to restart and stop: systemd's (`restart` from here is refused for it).
    if let Some(unit) = super::locate::systemd_unit(pid) {
        let unit = crate::text::escape(&unit);
        println!("  the main process of systemd unit {unit} (systemctl restart/stop {unit})");
    }
    Ok(0)
}

/// The human `status`'s ZeroMQ line, for a ZeroMQ source.
fn print_zeromq(s: &crate::status::Doc) {
    if let Some(z) = &s.zeromq {
        println!(
            "  zeromq on {}: {} accepted, {} rejected, {} client(s) connected (at most {})",
            z.bound.join(", "),
            z.accepted,
            z.rejected,
            z.peers,
            z.max_connections
        );
        let closed: Vec<String> = crate::kinds::CloseReason::ALL
            .iter()
            .zip(z.closed.counts())
            .filter(|&(_, n)| n > 0)
            .map(|(why, n)| format!("{n} {}", why.label()))
            .collect();
        if !closed.is_empty() {
            println!("    clients closed: {}", closed.join(", "));
        }
    }
}

/// The human `status`.
fn print_status(s: &crate::status::Doc) {
    let name = Some(s.name.as_str())
        .filter(|n| !n.is_empty())
        .unwrap_or("gearshift");
    let state = match s.state.as_str() {
        // Running all the same: the word says what is wrong.
        "no server reachable" => "running, no server reachable".to_string(),
        other => other.to_string(),
    };
    println!(
        "{name} is {state} (pid {}), generation {}, {} source",
        s.pid, s.generation, s.source
    );
    let restarts = match s.restarts {
        0 => "no restart yet".to_string(),
        n => format!(
            "restarts {n}, last {} ({})",
            s.restarted_at.as_deref().unwrap_or("-"),
            s.last_restart_reason.as_deref().unwrap_or("-")
        ),
    };
    println!("  started {}, {restarts}", s.started_at);
    println!(
        "  jobs: {} completed, {} failed, {} running",
        s.jobs_completed, s.jobs_failed, s.in_flight
    );
    for j in &s.running_jobs {
        println!("    {}", j.describe());
    }
    if let Some(p) = &s.restart_pending {
        println!("  restart pending ({}) at {}", p.reason, p.at);
    }
    if let Some(r) = &s.last_rollback {
        println!(
            "  rolled back at {} from {} to {}: {}",
            r.at,
            crate::restart::deploy::short(&r.from_sha256),
            crate::restart::deploy::short(&r.to_sha256),
            r.reason
        );
    }
    let none = s.functions.is_empty().then_some("none");
    println!("  functions: {}", none.unwrap_or(&s.functions.join(", ")));
    println!("  config {} (sha256 {})", s.config.shown(), s.config_sha256);
    if !s.servers.is_empty() {
        println!("  servers:");
        for v in &s.servers {
            println!(
                "    {} {} since {} ({} lane(s) connected, {} reconnects){}",
                v.address,
                v.state,
                v.since,
                v.lanes_connected,
                v.reconnects,
                v.last_error
                    .as_ref()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            );
        }
    }
    print_zeromq(s);
    if let Some(st) = &s.storage {
        println!("  storage failing since {}: {}", st.since, st.error);
    }
    if s.rejected > 0 {
        println!(
            "  spool entries rejected (set aside in rejected/): {}",
            s.rejected
        );
    }
    if let Some(m) = &s.metrics {
        println!("  metrics: http://{m}/metrics");
    }
    if s.watch != "inotify" {
        println!("  file watch: {}", s.watch);
    }
    if let Some(sv) = &s.supervisor {
        println!(
            "  supervisor pid {}, {} crash(es){}",
            sv.pid,
            sv.crashes,
            sv.last_exit
                .as_ref()
                .map(|e| format!(", last: {e}"))
                .unwrap_or_default()
        );
    }
    for w in &s.warnings {
        println!("  warning: {w}");
    }
    if let Some(r) = &s.last_refused_deploy {
        println!(
            "  last refused deploy at {} (sha256 {}): {}",
            r.at,
            crate::restart::deploy::short(&r.sha256),
            r.error
        );
    }
    if let Some(r) = &s.last_refused_reload {
        println!(
            "  last refused reload at {} ({}): {}",
            r.at, r.reason, r.error
        );
    }
}

pub(super) fn reload(path: &Path, timeout: Duration) -> Result<u8> {
    let (pid, socket, pidfile) = running(path)?;
    if let Some(why) = stopped(pid) {
        kill(Pid::from_raw(pid), Signal::SIGHUP)
            .map_err(|e| Error::io(format!("signalling pid {pid}"), e.into()))?;
        eprintln!("reload pending: {why} (the HUP is sent, and acted on then)");
        return Ok(exit::NOT_YET);
    }
    let before = crate::status::query_patiently(&socket, Some(pid), Duration::from_secs(5))?;
    if before.state == "stopping" {
        eprintln!(
            "reload refused: the worker (pid {pid}) is stopping; it exits once its {} running job(s) finish",
            before.in_flight
        );
        return Ok(exit::FAILED);
    }
    let (generation, refusals) = (before.generation, before.reload_refusals);
    kill(Pid::from_raw(pid), Signal::SIGHUP)
        .map_err(|e| Error::io(format!("signalling pid {pid}"), e.into()))?;
    let deadline = Instant::now() + timeout;
    loop {
        if pidfile::probe(&pidfile).is_ok_and(|p| p == Probe::NotRunning) {
            eprintln!(
                "reload failed: the worker (pid {pid}) exited before a new generation served"
            );
            return Ok(exit::NOT_RUNNING);
        }
        if let Ok(now) = crate::status::query(&socket, Some(pid)) {
            let g = now.generation;
            if g > generation {
                println!("reloaded: generation {g} (pid {pid})");
                return Ok(deploy_refused(&before, &now));
            }
            if now.reload_refusals > refusals {
                let why = now.last_refused_reload.map_or_else(
                    || "unknown reason".to_string(),
                    |r| crate::text::escape(&r.error).into_owned(),
                );
                eprintln!("reload refused, still generation {g}: {why}");
                return Ok(exit::FAILED);
            }
        }
        if Instant::now() >= deadline {
            match waiting_for(&socket, pid) {
                Some(jobs) => eprintln!("no new generation after {timeout:?}: waiting for{jobs}"),
                None => eprintln!("no new generation after {timeout:?} (jobs still running?)"),
            }
            return Ok(exit::NOT_YET);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A restart judges a new binary at the path first (a release link swapped, then `reload`): a
/// refusal since `before` is said, with exit 1 (the deploy did not happen); else 0.
fn deploy_refused(before: &crate::status::Doc, now: &crate::status::Doc) -> u8 {
    let refused = |d: &crate::status::Doc| {
        d.last_refused_deploy
            .as_ref()
            .map(|r| (r.at.clone(), r.sha256.clone()))
    };
    match &now.last_refused_deploy {
        Some(r) if refused(now) != refused(before) => {
            eprintln!(
                "the new binary at \"{}\" was refused, so generation {} runs the binary it ran before: {}",
                crate::text::escape(&now.binary.to_string_lossy()),
                now.generation,
                crate::text::escape(&r.error)
            );
            exit::FAILED
        }
        _ => exit::OK,
    }
}

pub(super) fn stop(path: &Path, timeout: Duration, force: bool) -> Result<u8> {
    let (pid, socket, pidfile, by_record) = match super::locate::find(path, true) {
        Err(Error::NotRunning) => {
            println!("gearshift is not running");
            return Ok(0);
        }
        other => other?,
    };
    // Its end is told by the pidfile lock; for a worker found by root's record alone (its
    // state_dir removed under it), by the record: that pid with that start time gone.
    let alive = || -> Result<bool> {
        Ok(match by_record {
            true => super::locate::recorded_worker(path) == Some(pid),
            false => pidfile::probe(&pidfile)? != Probe::NotRunning,
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
                let jobs = waiting_for(&socket, pid).unwrap_or_default();
                eprintln!(
                    "pid {pid} still running after {timeout:?} (jobs still running?); --force kills it{jobs}"
                );
                return Ok(exit::NOT_YET);
            }
            let jobs = match crate::status::query(&socket, Some(pid)).map(|s| running_job_names(&s))
            {
                Ok(jobs) if jobs.is_empty() => "no job was running".to_string(),
                Ok(jobs) => format!("these jobs will run again: {}", jobs.join(", ")),
                Err(_) => "the jobs it ran (it did not say which) will run again".to_string(),
            };
            // First the worker's own forced stop, which it promises within 2 s in every state:
            // its job processes killed and its death by SIGTERM, which a supervisor and
            // systemd take for the stop it is. A SIGKILL is a crash to them (systemd's
            // Restart=on-failure started the worker again, to run the killed jobs at once).
            let _ = kill(via, Signal::SIGTERM);
            if gone_within(&alive, SECOND_TERM_WAIT)? {
                println!("stopped (pid {pid}) after {timeout:?} by a second TERM; {jobs}");
                return Ok(0);
            }
            // Still there (held by a debugger, or in the kernel): killed. A service's main
            // process killed is a crash to systemd: its Restart= starts it again (a supervisor
            // of ours, which had the TERM, takes it for the stop it is).
            if via == target {
                if let Some(unit) = super::locate::systemd_unit(pid) {
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
            kill(target, Signal::SIGKILL)
                .map_err(|e| Error::io(format!("killing pid {pid}"), e.into()))?;
            for g in groups {
                let _ = nix::sys::signal::killpg(Pid::from_raw(g), Signal::SIGKILL);
            }
            // The lock goes with the process, which one in an uninterruptible wait (its disk
            // or NFS server hung, a frozen cgroup) leaves only once that wait ends.
            let wait = crate::jobs::pipes::KILL_WAIT;
            if !gone_within(&alive, wait)? {
                let state = crate::ops::procfs::Stat::of(Some(pid)).map_or('?', |s| s.state);
                eprintln!("killed pid {pid} after {timeout:?}, but it is still there {wait:?} later, in state {state}: a process in an uninterruptible wait (a hung disk or NFS server, a frozen cgroup) dies only once that wait ends, and holds the pidfile lock until then");
                return Ok(exit::NOT_YET);
            }
            println!(
                "killed (pid {pid}) after {timeout:?}: a second TERM did not end it within {SECOND_TERM_WAIT:?}; {jobs}"
            );
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    match interrupted {
        Some(jobs) if !jobs.is_empty() => println!(
            "stopped (pid {pid}) at once: it was already stopping, and a second TERM interrupts; these jobs will run again: {}",
            jobs.join(", ")
        ),
        _ => println!("stopped (pid {pid})"),
    }
    Ok(0)
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

/// Asks the worker to reopen its log file: SIGUSR1, only to the proven lock holder.
pub(super) fn reopen_logs(path: &Path) -> Result<u8> {
    let (pid, _, _) = match running(path) {
        Err(Error::NotRunning) => {
            eprintln!("gearshift is not running");
            return Ok(exit::NOT_RUNNING);
        }
        other => other?,
    };
    // A supervisor reopens its own log and passes the signal on (asked only the worker, it
    // went on writing into the moved file).
    let via = super::locate::supervisor_of(pid, path);
    kill(Pid::from_raw(via.unwrap_or(pid)), Signal::SIGUSR1)
        .map_err(|e| Error::io(format!("signalling pid {pid}"), e.into()))?;
    match via {
        Some(sup) => {
            println!("asked pid {pid} and its supervisor (pid {sup}) to reopen their log file")
        }
        None => println!("asked pid {pid} to reopen its log file"),
    }
    if let Some(why) = stopped(pid) {
        eprintln!("it reopens it once continued: {why}");
    }
    Ok(exit::OK)
}

/// The jobs the worker runs, a line each ("\n  lane 0: ..."), if it says and runs any.
fn waiting_for(socket: &Path, pid: i32) -> Option<String> {
    let s = crate::status::query(socket, Some(pid)).ok()?;
    let lines: String = (s.running_jobs.iter())
        .map(|j| format!("\n  {}", j.describe()))
        .collect();
    (!lines.is_empty()).then_some(lines)
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
