//! Operations: systemd notify, log files and their rotation.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::os::unix::net::UnixDatagram;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;

/// Reads notify datagrams until one contains `want` (bounded); returns everything read.
fn read_until(sock: &UnixDatagram, want: &str, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        sock.set_read_timeout(Some(
            deadline
                .saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .unwrap();
        let Ok(n) = sock.recv(&mut buf) else { break };
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        let done = msg.lines().any(|l| l == want);
        seen.push(msg);
        if done {
            return seen;
        }
    }
    panic!("no {want:?} within {limit:?}; got {seen:?}");
}

#[test]
fn sd_notify_messages_in_order_across_a_reload() {
    let sb = Sandbox::new("notify");
    let path = sb.path("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let mut w = sb.start_env(&[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    let first = read_until(&sock, "READY=1", Duration::from_secs(10));
    assert!(first[0].contains("STATUS=generation 1,"), "{first:?}");

    w.signal(Signal::SIGHUP);
    let msgs = read_until(&sock, "READY=1", Duration::from_secs(10));
    let reloading = &msgs[0];
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{msgs:?}"
    );
    let usec: u64 = reloading.lines().nth(1).unwrap()["MONOTONIC_USEC=".len()..]
        .parse()
        .unwrap();
    assert!(usec > 0);
    assert!(
        msgs.last().unwrap().contains("STATUS=generation 2,"),
        "READY=1 from the new image: {msgs:?}"
    );

    w.signal(Signal::SIGTERM);
    let msgs = read_until(&sock, "STOPPING=1", Duration::from_secs(10));
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert_eq!(w.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

/// The service manager's clock (CLOCK_MONOTONIC, as systemd stamps the reload it asks for).
fn monotonic_us() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
    t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000
}

/// What systemd (>= 253) needs to end a `systemctl reload` of a Type=notify-reload unit: after
/// its SIGHUP (stamped `since`), a `RELOADING=1` whose `MONOTONIC_USEC` is not older (an older
/// one it ignores), then `READY=1` in a later datagram. Every line of every datagram is one of
/// the protocol's assignments (nothing from outside forges another). Returns the READY=1
/// datagram.
fn reload_completed(sock: &UnixDatagram, since: u64, limit: Duration) -> String {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    let mut reloading = false;
    while Instant::now() < deadline {
        let left = deadline.saturating_duration_since(Instant::now());
        for msg in read_until(sock, "READY=1", left.max(Duration::from_millis(1))) {
            for line in msg.lines() {
                assert!(
                    [
                        "RELOADING=",
                        "MONOTONIC_USEC=",
                        "READY=",
                        "STATUS=",
                        "WATCHDOG=",
                        "EXTEND_TIMEOUT_USEC=",
                    ]
                    .iter()
                    .any(|k| line.starts_with(k)),
                    "a line that is no sd_notify assignment of ours: {line:?} in {msg:?}"
                );
            }
            if msg.starts_with("RELOADING=1") {
                let usec: u64 = msg.lines().nth(1).unwrap()["MONOTONIC_USEC=".len()..]
                    .parse()
                    .unwrap();
                reloading |= usec >= since;
            }
            let ready = msg.lines().any(|l| l == "READY=1");
            seen.push(msg.clone());
            if ready && reloading {
                return msg;
            }
        }
    }
    panic!("no RELOADING=1 stamped after {since} followed by READY=1 within {limit:?}: {seen:?}");
}

/// `systemctl reload` of a Type=notify-reload unit sends SIGHUP and waits for RELOADING=1 (stamped
/// after the signal) and READY=1. A reload the worker refused (an invalid config) sent neither,
/// and a HUP that arrived while a restart was already under way (folded into it) found only the
/// RELOADING=1 sent before it, which systemd ignores as older than its request: either way
/// `systemctl reload` waited out TimeoutStartSec (90 s by default) and then said the reload
/// failed by timing out, while the worker ran on.
#[test]
fn every_hup_gets_its_reloading_and_ready_even_refused_or_folded() {
    let sb = Sandbox::new("notify-refused");
    let path = sb.path("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let mut w = sb.start_env(&[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    read_until(&sock, "READY=1", Duration::from_secs(10));

    // Refused: the config no longer valid.
    let good = std::fs::read_to_string(sb.config()).unwrap();
    std::fs::write(sb.config(), format!("{good}\n[log]\nlevel = \"loud\"\n")).unwrap();
    let since = monotonic_us();
    w.signal(Signal::SIGHUP);
    let ready = reload_completed(&sock, since, Duration::from_secs(5));
    assert!(
        ready.contains("STATUS=generation 1, ")
            && ready.contains("; reload refused: ")
            && ready.contains("loud"),
        "the STATUS says the reload was refused and why: {ready:?}"
    );
    assert_eq!(w.status()["generation"], 1);

    // Folded: a HUP while a restart waits for a running job.
    std::fs::write(sb.config(), &good).unwrap();
    sb.submit("sleep", "1500");
    w.wait_for(Duration::from_secs(10), "the job to run", |s| {
        s["in_flight"] == 1
    });
    w.signal(Signal::SIGHUP);
    read_until(&sock, "RELOADING=1", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(100));
    let since = monotonic_us();
    w.signal(Signal::SIGHUP);
    let ready = reload_completed(&sock, since, Duration::from_secs(10));
    assert!(ready.contains("STATUS=generation 2,"), "{ready:?}");
    w.signal(Signal::SIGTERM);
    assert_eq!(w.wait_exit(Duration::from_secs(10)).code(), Some(0));
}

/// Datagrams read until `limit` passes (each read bounded by what is left).
fn read_for(sock: &UnixDatagram, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match sock.recv(&mut buf) {
            Ok(n) => seen.push(String::from_utf8_lossy(&buf[..n]).into_owned()),
            Err(_) => break,
        }
    }
    seen
}

/// The microseconds of an `EXTEND_TIMEOUT_USEC=` line, if `msg` has one.
fn extension(msg: &str) -> Option<u64> {
    msg.lines()
        .find_map(|l| l.strip_prefix("EXTEND_TIMEOUT_USEC="))
        .map(|v| v.parse().unwrap())
}

/// systemd times a Type=notify-reload unit's reload with TimeoutStartSec (90 s by default): a
/// restart that waited longer for a running job (an image, a report: minutes are common) made
/// `systemctl reload` fail with a timeout while the worker went on to restart as asked. While a
/// restart waits for jobs that are within their own timeouts the worker now extends systemd's
/// (`EXTEND_TIMEOUT_USEC=`, again every few seconds); a job held past its timeout (a Rust
/// function that ignores its deadline) gets no extension, and systemd's timeout decides.
#[test]
fn a_restart_that_waits_for_long_jobs_extends_the_service_managers_timeout() {
    let mut sb = Sandbox::new("notify-extend");
    sb.bin = example("custom_worker");
    // A Rust function held past its timeout is not waited for here (see the test below).
    sb.write_stubborn_config("", "none");
    let path = sb.path("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let mut w = sb.start_env(&[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    read_until(&sock, "READY=1", Duration::from_secs(10));

    // Within its timeout (none): extended until the job ends and the next image is ready.
    sb.submit("sleep", "7000");
    w.wait_for(Duration::from_secs(10), "the job to run", |s| {
        s["in_flight"] == 1
    });
    w.signal(Signal::SIGHUP);
    let msgs = read_until(&sock, "READY=1", Duration::from_secs(15));
    let reloading = msgs
        .iter()
        .position(|m| m.starts_with("RELOADING=1"))
        .unwrap_or_else(|| panic!("{msgs:?}"));
    let extended: Vec<u64> = msgs[reloading..]
        .iter()
        .filter_map(|m| extension(m))
        .collect();
    assert!(
        extended.len() >= 2 && extended.iter().all(|&us| us >= 10_000_000),
        "extended with RELOADING=1 and again while the 7 s job ran: {msgs:?}"
    );
    assert!(
        msgs.last().unwrap().contains("STATUS=generation 2,"),
        "{msgs:?}"
    );

    // Past its timeout (and the kill's wait after it): no extension.
    sb.submit("slow", "30000");
    w.wait_for(Duration::from_secs(20), "the job past its timeout", |s| {
        s["running_jobs"][0]["running_ms"].as_u64() >= Some(7500)
    });
    w.signal(Signal::SIGHUP);
    let msgs = read_for(&sock, Duration::from_secs(6));
    assert!(
        msgs.iter().any(|m| m.starts_with("RELOADING=1"))
            && !msgs.iter().any(|m| extension(m).is_some()),
        "{msgs:?}"
    );
    // The second TERM (its own: two sent at once can arrive as one) ends it now.
    w.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    w.signal(Signal::SIGTERM);
    w.wait_exit(Duration::from_secs(10));
}

/// With `abandon_after` (60 s by default) a reload held by a Rust function past its timeout
/// ends at the abandon, a bounded wait: the service manager's timeout is extended until then
/// (past the 6 s after which a held job's wait is not extended), and the next image is ready.
#[test]
fn a_reload_held_by_a_rust_function_is_extended_until_its_abandon() {
    let mut sb = Sandbox::new("notify-abandon");
    sb.bin = example("custom_worker");
    sb.write_stubborn_config("", "12s");
    let path = sb.path("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let w = sb.start_env(&[("NOTIFY_SOCKET", path.to_str().unwrap())]);
    read_until(&sock, "READY=1", Duration::from_secs(10));
    sb.submit("slow", "60000");
    w.wait_for(
        Duration::from_secs(20),
        "the job 8 s past its timeout",
        |s| s["running_jobs"][0]["running_ms"].as_u64() >= Some(9000),
    );
    w.signal(Signal::SIGHUP);
    let msgs = read_until(&sock, "READY=1", Duration::from_secs(20));
    let reloading = msgs
        .iter()
        .position(|m| m.starts_with("RELOADING=1"))
        .unwrap_or_else(|| panic!("{msgs:?}"));
    assert!(
        extension(&msgs[reloading]).is_some(),
        "extended while the abandon is due: {msgs:?}"
    );
    assert!(
        msgs.last().unwrap().contains("STATUS=generation 2,"),
        "{msgs:?}"
    );
}

#[test]
fn watchdog_pings_continue_during_a_long_job() {
    let sb = Sandbox::new("watchdog");
    let path = sb.path("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let w = sb.start_env(&[
        ("NOTIFY_SOCKET", path.to_str().unwrap()),
        ("WATCHDOG_USEC", "200000"),
    ]);
    read_until(&sock, "READY=1", Duration::from_secs(10));
    sb.submit("sleep", "1500");
    w.wait_for(Duration::from_secs(10), "the job to run", |s| {
        s["in_flight"] == 1
    });
    let started = Instant::now();
    let mut pings = 0;
    while started.elapsed() < Duration::from_millis(1000) {
        let msgs = read_until(&sock, "WATCHDOG=1", Duration::from_secs(2));
        pings += msgs.iter().filter(|m| m.starts_with("WATCHDOG=1")).count();
    }
    assert!(w.status()["in_flight"] == 1, "the job was still running");
    assert!(
        pings >= 5,
        "WATCHDOG=1 every 100 ms while the job runs, got {pings} in 1 s"
    );

    // WATCHDOG_PID naming another process: no pings for us.
    drop(w);
    let sb2 = Sandbox::new("watchdog-other");
    let path2 = sb2.path("notify.sock");
    let sock2 = UnixDatagram::bind(&path2).unwrap();
    let _w2 = sb2.start_env(&[
        ("NOTIFY_SOCKET", path2.to_str().unwrap()),
        ("WATCHDOG_USEC", "100000"),
        ("WATCHDOG_PID", "1"),
    ]);
    read_until(&sock2, "READY=1", Duration::from_secs(10));
    sock2
        .set_read_timeout(Some(Duration::from_millis(400)))
        .unwrap();
    let mut buf = [0u8; 512];
    assert!(sock2.recv(&mut buf).is_err(), "no datagram expected");
}

/// A watchdog shorter than the worker can keep (`WATCHDOG_USEC=1`, a typo's `WatchdogSec=1us`):
/// pinged every half of it, which was no time at all, so the control thread sent `WATCHDOG=1`
/// 1.4 million times in 3 s and held a CPU. Now at most every 10 ms, and said (at each start).
#[test]
fn a_watchdog_shorter_than_the_worker_can_keep_is_said_and_never_spins() {
    let sb = Sandbox::new("watchdog-tiny");
    let path = sb.path("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let w = sb.start_env(&[
        ("NOTIFY_SOCKET", path.to_str().unwrap()),
        ("WATCHDOG_USEC", "1"),
    ]);
    read_until(&sock, "READY=1", Duration::from_secs(10));
    let started = Instant::now();
    let mut pings = 0;
    let mut buf = [0u8; 512];
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    while started.elapsed() < Duration::from_secs(1) {
        if let Ok(n) = sock.recv(&mut buf) {
            pings += usize::from(buf[..n].starts_with(b"WATCHDOG=1"));
        }
    }
    let secs = started.elapsed().as_secs_f64();
    assert!(
        pings >= 10 && pings as f64 <= 110.0 * secs,
        "{pings} pings in {secs:.2} s"
    );
    let log = w.log_text();
    assert!(
        log.contains("WATCHDOG_USEC=1 asks for a ping every 500ns, more often than the worker pings (every 10ms)"),
        "{log}"
    );
}

/// A job inherited the service manager's variables: `NOTIFY_SOCKET` (a job program that speaks
/// sd_notify itself, or one that means harm, could tell systemd `STOPPING=1`, or, under
/// `NotifyAccess=all`, `MAINPID=` another process, for the worker's whole service), the
/// watchdog's and socket activation's. sd_notify(3) asks a service to keep them from its
/// children; the worker keeps them for itself (its next image needs them) and no job sees them.
#[test]
fn the_service_managers_variables_never_reach_a_job() {
    let sb = Sandbox::new("notify-env");
    let path = sb.path("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    sb.job("env", "#!/bin/sh\nenv\n");
    let mut w = sb.start_env(&[
        ("NOTIFY_SOCKET", path.to_str().unwrap()),
        ("WATCHDOG_USEC", "60000000"),
        ("LISTEN_FDS", "0"),
        ("LISTEN_PID", "1"),
        ("LISTEN_FDNAMES", "none"),
        ("GEARSHIFT_TEST_KEPT", "yes"),
    ]);
    read_until(&sock, "READY=1", Duration::from_secs(10));
    let out = sb.run(&["submit", "--wait", "env", "x"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let env = text(&out.stdout);
    assert!(env.contains("GEARSHIFT_TEST_KEPT=yes"), "{env}");
    for var in [
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
    ] {
        assert!(
            !env.contains(&format!("{var}=")),
            "{var} reached the job:\n{env}"
        );
    }
    // The worker itself still speaks to the service manager, after a reload too.
    w.signal(Signal::SIGHUP);
    let msgs = read_until(&sock, "READY=1", Duration::from_secs(10));
    assert!(
        msgs.last().unwrap().contains("STATUS=generation 2,"),
        "{msgs:?}"
    );
    let out = sb.run(&["submit", "--wait", "env", "x"]);
    assert!(
        !text(&out.stdout).contains("NOTIFY_SOCKET="),
        "{}",
        text(&out.stdout)
    );
    w.signal(Signal::SIGTERM);
    assert!(w.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn usr1_reopens_a_log_file_that_was_moved() {
    let sb = Sandbox::new("logrotate");
    sb.write_config("[log]\nfile = \"gearshift.log\"\n");
    let w = sb.start();
    let log = sb.path("gearshift.log");
    eventually(Duration::from_secs(5), "the log file", || {
        std::fs::read_to_string(&log).is_ok_and(|s| s.contains("started (pid"))
    });
    let rotated = sb.path("gearshift.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    w.signal(Signal::SIGUSR1);
    eventually(Duration::from_secs(5), "a new log file", || {
        std::fs::read_to_string(&log).is_ok_and(|s| s.contains("SIGUSR1: reopened log file"))
    });
    // Later lines (a failing job logs a warning) go to the new file only.
    sb.run(&["submit", "--wait", "no_such_function", "x"]);
    eventually(Duration::from_secs(5), "the job line", || {
        std::fs::read_to_string(&log).is_ok_and(|s| s.contains("unknown function"))
    });
    assert!(!std::fs::read_to_string(&rotated)
        .unwrap()
        .contains("unknown function"));
    // Timestamp, level and generation on every line.
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("unknown function"))
        .unwrap();
    assert!(line.contains(" WARN  g1 job "), "{line}");
}

/// `run --log-file NAME` with a bare file name (relative to where `run` was typed): it failed
/// at start with `resolving "": cannot make an empty path absolute` (the name's parent is
/// empty), where `./NAME` worked. The file takes every generation's lines and is reopened in
/// its place on SIGUSR1.
#[test]
fn run_log_file_takes_a_bare_relative_name() {
    let sb = Sandbox::new("log-file-bare");
    let log = sb.path("run.log");
    let child = spawn(
        sb.cmd(&["run", "--log-file", "run.log"])
            .current_dir(sb.path(""))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped()),
    );
    let mut w = Worker {
        child,
        socket: sb.path("state/worker/gearshift.sock"),
        log: log.clone(),
    };
    eventually(Duration::from_secs(10), "the log file", || {
        if let Ok(Some(status)) = w.child.try_wait() {
            let mut err = String::new();
            let _ = w
                .child
                .stderr
                .take()
                .map(|mut e| e.read_to_string(&mut err));
            panic!("run exited with {status}: {err}");
        }
        std::fs::read_to_string(&log).is_ok_and(|s| s.contains("started (pid"))
    });
    w.signal(Signal::SIGHUP);
    w.wait_generation(2);
    eventually(
        Duration::from_secs(5),
        "the second generation's lines",
        || std::fs::read_to_string(&log).is_ok_and(|s| s.contains(" g2 ")),
    );
    std::fs::rename(&log, sb.path("run.log.1")).unwrap();
    w.signal(Signal::SIGUSR1);
    eventually(
        Duration::from_secs(5),
        "the log reopened in its place",
        || std::fs::read_to_string(&log).is_ok_and(|s| s.contains("SIGUSR1: reopened log file")),
    );
    w.signal(Signal::SIGTERM);
    assert!(w.wait_exit(Duration::from_secs(10)).success());
}

/// The shipped logrotate postrotate line works for a `gearshift start` daemon (no systemd): the
/// CLI finds the worker by its lock and asks it to reopen; with no worker the line succeeds.
#[test]
fn the_shipped_postrotate_line_reopens_a_start_daemons_log() {
    let sb = Sandbox::new("postrotate");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let snippet = std::fs::read_to_string(repo.join("scripts/gearshift.logrotate")).unwrap();
    let line = snippet
        .lines()
        .skip_while(|l| l.trim() != "postrotate")
        .nth(1)
        .unwrap()
        .trim()
        .replace("/usr/local/bin/gearshift", &sb.bin.display().to_string())
        .replace(
            "/etc/gearshift/config.toml",
            &sb.config().display().to_string(),
        );
    let postrotate = || {
        std::process::Command::new("sh")
            .args(["-c", &line])
            .status()
            .unwrap()
    };
    assert!(
        postrotate().success(),
        "no worker: nothing to reopen, and no error"
    );
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let log = sb.path("state/gearshift.log");
    eventually(Duration::from_secs(5), "the log", || log.exists());
    std::fs::rename(&log, sb.path("state/gearshift.log.1")).unwrap();
    assert!(postrotate().success(), "{line}");
    eventually(Duration::from_secs(5), "a new log file", || {
        std::fs::read_to_string(&log).is_ok_and(|s| s.contains("reopened log file"))
    });
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// A service manager that reads nothing (hung, stopped, or a `NOTIFY_SOCKET` nobody serves)
/// while the worker sends `WATCHDOG=1` every 10 ms: once its queue was full, the control
/// thread waited in the send for ever, so a reload never came and the first TERM was not acted
/// on (reproduced: `reload` timed out, and only a second TERM, after 1.2 s, ended the worker,
/// its jobs interrupted). Now a message the socket cannot take at once is dropped and said.
#[test]
fn a_notify_socket_nobody_reads_holds_neither_a_reload_nor_a_stop() {
    let sb = Sandbox::new("notify-deaf");
    let path = sb.path("notify.sock");
    let _deaf = UnixDatagram::bind(&path).unwrap();
    let mut w = sb.start_env(&[
        ("NOTIFY_SOCKET", path.to_str().unwrap()),
        ("WATCHDOG_USEC", "20000"),
    ]);
    // About 100 pings a second: the socket's queue is full within seconds.
    std::thread::sleep(Duration::from_secs(8));
    let reload = sb.run(&["reload", "--timeout", "10s"]);
    assert_eq!(
        reload.status.code(),
        Some(0),
        "{}\n{}",
        text(&reload.stderr),
        w.log_text()
    );
    w.signal(Signal::SIGTERM);
    assert_eq!(
        w.wait_exit(Duration::from_secs(10)).code(),
        Some(0),
        "one TERM stops it gracefully: {}",
        w.log_text()
    );
    let log = w.log_text();
    let said = log
        .lines()
        .filter(|l| l.contains("sd_notify") && l.contains("could not"))
        .count();
    assert!((1..=4).contains(&said), "said {said} times:\n{log}");
}
