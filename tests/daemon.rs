//! `start` / `stop` / `restart`: the daemon, its readiness, its pidfile.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::time::Duration;

use common::*;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Kills whatever daemon the sandbox's pidfile names when the test ends, pass or fail.
struct Reaper(std::path::PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        if let Some(pid) = fs::read_to_string(&self.0)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn pid_of(sb: &Sandbox) -> i32 {
    fs::read_to_string(sb.path("state/gearshift.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn proc_field(pid: i32, key: &str) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap()
        .trim()
        .to_string()
}

#[test]
fn start_status_stop() {
    let sb = Sandbox::new("daemon");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let pid = pid_of(&sb);
    assert!(
        text(&out.stdout).starts_with(&format!("started (pid {pid})")),
        "{}",
        text(&out.stdout)
    );
    // A real daemon: reparented, no controlling terminal's session, cwd /, serving.
    assert_ne!(proc_field(pid, "PPid:"), std::process::id().to_string());
    assert_eq!(
        fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        std::path::Path::new("/")
    );
    let out = sb.run(&["status"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains(&format!("(pid {pid})")));
    let out = sb.run(&["submit", "--wait", "reverse", "daemon"]);
    assert_eq!(text(&out.stdout), "nomead");
    // Logs go to state_dir/gearshift.log by default.
    assert!(fs::read_to_string(sb.path("state/gearshift.log"))
        .unwrap()
        .contains(&format!("started (pid {pid})")));

    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(1), "second start");
    assert!(
        text(&out.stderr).contains(&format!("already running (pid {pid})")),
        "{}",
        text(&out.stderr)
    );

    let out = sb.run(&["stop"]);
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(0), format!("stopped (pid {pid})\n"))
    );
    assert_eq!(sb.run(&["status"]).status.code(), Some(3));
    assert_eq!(
        sb.run(&["stop"]).status.code(),
        Some(0),
        "stopping a stopped worker is fine"
    );
}

#[test]
fn stale_pidfile_after_kill_9_is_taken_over() {
    let sb = Sandbox::new("stale");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    assert_eq!(sb.run(&["start"]).status.code(), Some(0));
    let old = pid_of(&sb);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually(Duration::from_secs(5), "the old daemon to die", || {
        sb.run(&["status"]).status.code() == Some(3)
    });
    assert_eq!(
        fs::read_to_string(sb.path("state/gearshift.pid"))
            .unwrap()
            .trim(),
        old.to_string(),
        "stale pid left"
    );
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_ne!(pid_of(&sb), old);
    sb.run(&["stop"]);
}

#[test]
fn start_failures_are_reported_by_start() {
    let sb = Sandbox::new("start-fail");
    fs::write(sb.config(), "[worker]\nconcurency = 2\n").unwrap();
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("config.toml:2:1: unknown key \"concurency\""),
        "{}",
        text(&out.stderr)
    );

    // Valid config, but the daemon itself cannot start: the spool directory is a file. The
    // error happens after the fork; `start` must still print it and exit 1.
    sb.write_config("");
    fs::write(sb.path("spool"), "not a directory").unwrap();
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("creating spool directory"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(sb.run(&["status"]).status.code(), Some(3));
}

#[test]
fn stop_waits_for_the_running_job_and_force_kills_after_timeout() {
    let sb = Sandbox::new("stop-job");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    assert_eq!(sb.run(&["start"]).status.code(), Some(0));
    let id = sb.submit("sleep", "1200");
    eventually(Duration::from_secs(10), "the job to run", || {
        open_spool(&sb)
            .lookup(&id)
            .is_ok_and(|l| matches!(l, gearshift::spool::Lookup::Running))
    });
    let out = sb.run(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(
        outcome(&open_spool(&sb), &id),
        Some((true, "1200".into(), 1)),
        "finished before the stop"
    );

    // A job longer than the stop timeout: --force kills, names it, and it runs again later.
    sb.job("long.sh", "#!/bin/sh\nsleep 30\necho done\n");
    assert_eq!(sb.run(&["start"]).status.code(), Some(0));
    let id = sb.submit("long", "");
    eventually(Duration::from_secs(10), "the job to run", || {
        open_spool(&sb)
            .lookup(&id)
            .is_ok_and(|l| matches!(l, gearshift::spool::Lookup::Running))
    });
    let out = sb.run(&["stop", "--timeout", "500ms", "--force"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("these jobs will run again: {id} (long)")),
        "{}",
        text(&out.stdout)
    );
    assert!(outcome(&open_spool(&sb), &id).is_none());
    let leftover = std::process::Command::new("pgrep")
        .args(["-f", &sb.path("jobs/long.sh").display().to_string()])
        .output()
        .unwrap();
    assert!(
        leftover.stdout.is_empty(),
        "the job's processes were killed too"
    );
}

#[test]
fn restart_gives_a_new_daemon() {
    let sb = Sandbox::new("restart");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    assert_eq!(sb.run(&["start"]).status.code(), Some(0));
    let first = pid_of(&sb);
    let out = sb.run(&["restart"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("stopped (pid {first})")));
    assert_ne!(pid_of(&sb), first);
    sb.run(&["stop"]);
}
