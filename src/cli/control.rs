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
use super::locate::{running, stopped};

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
    // The worker's user is untrusted, and so is its process's answer: whatever in it could act
    // on a terminal is escaped (the exposition the worker renders has none but line breaks).
    let text = crate::status::query_metrics(&socket, Some(pid))?;
    let text = crate::text::escape_lines(&text);
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
            // Not running, but about to be: a supervisor waits to start it again.
            let sup = super::locate::waiting_supervisor(path).map(|w| w.pid);
            match (json, sup) {
                (true, None) => println!("{}", serde_json::json!({"running": false})),
                (true, Some(sup)) => println!(
                    "{}",
                    serde_json::json!({"running": false, "supervisor": {"pid": sup}})
                ),
                (false, None) => println!("gearshift is not running"),
                (false, Some(sup)) => println!(
                    "gearshift is not running: {}; `gearshift stop` stops the supervisor",
                    super::locate::waiting_words(sup)
                ),
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
    let queue = queue_of(&s, &socket, pid);
    if json {
        let mut doc =
            serde_json::to_value(&s).map_err(|e| Error::Msg(format!("encoding status: {e}")))?;
        if let (Some(q), Some(map)) = (&queue, doc.as_object_mut()) {
            let oldest = q.oldest_age_us as f64 / 1e6;
            let q = serde_json::json!({"depth": q.depth, "oldest_age_seconds": oldest});
            map.insert("queue".into(), q);
        }
        println!("{}", crate::text::json_inert(doc.to_string()));
        return Ok(0);
    }
    print_status(&s.for_terminal());
    if let Some(q) = queue {
        println!("  queue: {}", queue_words(&q));
    }
    if let Some(own) = own {
        println!("  pid {own} in its own pid namespace");
    }
    // Whose to restart and stop: systemd's (`restart` from here is refused for it).
    if let Some(unit) = crate::ops::service::systemd_unit(pid) {
        let unit = crate::text::escape(&unit);
        println!("  the main process of systemd unit {unit} (systemctl restart/stop {unit})");
    }
    Ok(0)
}

/// The spool's queue (a spool or ZeroMQ source), from a second question: a count the worker
/// keeps for a while when it was costly (`top` and the metrics use it too). None for a network
/// source, or a worker that does not answer it.
fn queue_of(s: &crate::status::Doc, socket: &Path, pid: i32) -> Option<crate::metrics::QueueStats> {
    if !matches!(s.source.as_str(), "spool" | "zeromq") {
        return None;
    }
    crate::status::query_counts(socket, Some(pid)).ok()?.queue
}

/// `3 waiting, the oldest for 12.3s`, or `empty`.
fn queue_words(q: &crate::metrics::QueueStats) -> String {
    match q.depth {
        0 => "empty".into(),
        n => format!(
            "{n} waiting, the oldest for {:.1}s",
            q.oldest_age_us as f64 / 1e6
        ),
    }
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

/// The human `status`'s servers (gearman and amqp), a line each.
fn print_servers(s: &crate::status::Doc) {
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
}

/// The human `status`.
fn print_status(s: &crate::status::Doc) {
    let name = Some(s.name.as_str())
        .filter(|n| !n.is_empty())
        .unwrap_or("gearshift");
    let state = match s.state.as_str() {
        // Running all the same: the word says what is wrong.
        "no server reachable" => "running, no server reachable".to_string(),
        "publishing blocked" => "running, publishing blocked by the broker".to_string(),
        "not consuming" => "running, not consuming: every broker refuses it".to_string(),
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
    let functions = match s.functions.len() {
        0 => "none".to_string(),
        n if n > 40 => format!(
            "{} (`status --json` lists all {n})",
            crate::text::some_of(&s.functions, 40)
        ),
        _ => s.functions.join(", "),
    };
    println!("  functions: {functions}");
    println!("  config {} (sha256 {})", s.config.shown(), s.config_sha256);
    // Which build runs (after a deploy, the first question): only `--json` said it.
    let sha = (s.binary_sha256.as_deref()).map_or(String::new(), |d| {
        format!(", sha256 {}", crate::restart::deploy::short(d))
    });
    println!("  binary {}: version {}{sha}", s.binary.shown(), s.version);
    print_servers(s);
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
    if let Some(sv) = s.supervisor.as_ref().filter(|sv| sv.gone) {
        println!("  {}", crate::status::records::gone_words(sv.pid));
    } else if let Some(sv) = &s.supervisor {
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
    let (pid, socket, pidfile) = match running(path) {
        // About to be started again by its supervisor, with the files as they are then.
        Err(Error::NotRunning) => match super::locate::waiting_supervisor(path) {
            Some(w) => {
                let about = super::locate::waiting_words(w.pid);
                eprintln!("gearshift: not running: {about}, with the config and jobs_dir as they are then");
                return Ok(exit::NOT_RUNNING);
            }
            None => return Err(Error::NotRunning),
        },
        other => other?,
    };
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
                    |r| crate::text::escape_lines(&r.error).into_owned(),
                );
                eprintln!("reload refused, still generation {g}: {why}");
                return Ok(exit::FAILED);
            }
        }
        if Instant::now() >= deadline {
            let (when, what) = (waited(timeout), what_holds_it(&socket, pid));
            eprintln!("no new generation {when}{what}");
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

/// Asks the worker to reopen its log file: SIGUSR1, only to the proven lock holder.
pub(super) fn reopen_logs(path: &Path) -> Result<u8> {
    let (pid, _, _) = match running(path) {
        Err(Error::NotRunning) => {
            // A supervisor waiting to start the worker again writes its own lines meanwhile.
            if let Some(sup) = super::locate::waiting_supervisor(path).map(|w| w.pid) {
                kill(Pid::from_raw(sup), Signal::SIGUSR1)
                    .map_err(|e| Error::io(format!("signalling pid {sup}"), e.into()))?;
                println!("asked the supervisor (pid {sup}), which is about to start the worker again, to reopen its log file");
                return Ok(exit::OK);
            }
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

/// When a wait ended unmet: `after 10m`, or, for `--timeout 0`, that none was waited for.
fn waited(timeout: Duration) -> String {
    match timeout.is_zero() {
        true => "yet (--timeout 0 waits for nothing)".into(),
        false => format!("after {}", crate::clock::human(timeout)),
    }
}

/// What holds the worker, as the end of a sentence: `: waiting for` and the jobs it runs, a
/// line each, or its state when it runs none, or that it did not answer.
pub(super) fn what_holds_it(socket: &Path, pid: i32) -> String {
    let Ok(s) = crate::status::query(socket, Some(pid)) else {
        return "; it did not answer on its status socket".into();
    };
    let mut lines: String = (s.running_jobs.iter())
        .map(|j| format!("\n  {}", j.describe()))
        .collect();
    // A broker's alarm holds every reply, and so the jobs that wait on theirs.
    for v in s.servers.iter().filter(|v| v.state == "blocked") {
        let why = (v.last_error.as_deref())
            .and_then(|e| e.strip_prefix(crate::kinds::BLOCKED_ERROR))
            .map_or_else(String::new, |reason| format!(" ({reason})"));
        lines += &format!(
            "\n  {}: the broker blocks publishing{why}; a reply waits until it lifts its alarm",
            v.address
        );
    }
    match lines.is_empty() {
        true => format!(
            "; it runs no job, and its state is \"{}\"",
            crate::text::escape(&s.state)
        ),
        false => format!(": waiting for{lines}"),
    }
}
