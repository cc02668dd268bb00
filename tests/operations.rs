//! Operating it: the CLI never goes blind, every refusal is visible, restarts keep what they
//! should, results say what happened.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn an_invalid_config_does_not_blind_status_reload_or_stop() {
    let sb = Sandbox::new("ops-blind");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let pid = pid_of(&sb);
    let good = fs::read_to_string(sb.config()).unwrap();
    fs::write(sb.config(), format!("{good}\n[worker\nbroken")).unwrap();
    let out = sb.run(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("(pid {pid})")));
    assert!(
        text(&out.stderr).contains("the config file is invalid"),
        "{}",
        text(&out.stderr)
    );
    let out = sb.run(&["status", "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["pid"], pid);
    let out = sb.run(&["reload", "--timeout", "20s"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("reload refused"),
        "{}",
        text(&out.stderr)
    );
    let out = sb.run(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains(&format!("stopped (pid {pid})")));
}

#[test]
fn submit_wait_answers_as_soon_as_the_result_is_stored() {
    let sb = Sandbox::new("ops-wait");
    // fsync on, as in production: the result's directory is synced after its rename, before
    // the job leaves cur/, which is when a waiter used to look and find it still running.
    let cfg = std::fs::read_to_string(sb.config())
        .unwrap()
        .replace("fsync = false", "fsync = true");
    std::fs::write(sb.config(), cfg).unwrap();
    let _w = sb.start();
    // A job that takes a moment, so the waiter is already waiting when the result lands (it
    // then saw the record's rename while the job was still in cur/, and slept its 2 s recheck).
    for _ in 0..3 {
        let started = Instant::now();
        let out = sb.run(&["submit", "--wait", "sleep", "300"]);
        assert_eq!(text(&out.stdout), "300");
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "answered after {:?}",
            started.elapsed()
        );
    }
}

#[test]
fn refusals_and_skipped_files_are_visible() {
    let sb = Sandbox::new("ops-visible");
    sb.job("upper.sh", "#!/bin/sh\ntr a-z A-Z\n");
    let w = sb.start();
    // A collision added while running: refused, logged, in status.
    sb.job("upper.py", "#!/usr/bin/env python3\n");
    let s = w.wait_for(Duration::from_secs(10), "the refusal", |s| {
        s["last_refused_reload"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("defined twice"))
    });
    assert_eq!(s["generation"], 1);
    assert!(w.log_text().contains("defined twice"), "{}", w.log_text());
    let out = sb.run(&["check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("defined twice"));
    fs::remove_file(sb.path("jobs/upper.py")).unwrap();
    // A job file without the execute bit: a warning in the log, in status and in check.
    let p = sb.path("jobs/lower.sh");
    fs::write(&p, "#!/bin/sh\ntr A-Z a-z\n").unwrap();
    let s = w.wait_for(Duration::from_secs(10), "the warning", |s| {
        has_warning(s, "lower.sh")
    });
    assert!(s["generation"].as_u64().unwrap() >= 2);
    assert!(
        s["last_refused_reload"].is_null(),
        "cleared by the later success: {s}"
    );
    assert!(
        w.log_text().contains("lower.sh\" is not executable"),
        "{}",
        w.log_text()
    );
    let out = sb.run(&["check"]);
    assert!(
        text(&out.stderr).contains("lower.sh\" is not executable"),
        "{}",
        text(&out.stderr)
    );
    let human = text(&sb.run(&["status"]).stdout);
    assert!(
        human.contains("warning:") && human.contains("lower.sh"),
        "{human}"
    );
}

#[test]
fn function_names_and_shebangs_are_as_documented() {
    let sb = Sandbox::new("ops-names");
    sb.job("my.job.sh", "#!/bin/sh\necho named\n");
    let out = sb.run(&["check"]);
    assert!(
        text(&out.stdout).contains("  my.job: "),
        "{}",
        text(&out.stdout)
    );
    sb.job("bare", "echo no shebang\n");
    let out = sb.run(&["check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("no #! line"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn restart_keeps_the_supervisor_and_status_shows_it() {
    let sb = Sandbox::new("ops-supervised");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let out = sb.run(&["start", "--supervise", "--max-restarts", "7"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let human = text(&sb.run(&["status"]).stdout);
    assert!(human.contains("supervisor pid"), "{human}");
    let out = sb.run(&["restart"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let mut s = serde_json::Value::Null;
    eventually(Duration::from_secs(20), "a supervised worker again", || {
        s = serde_json::from_slice(&sb.run(&["status", "--json"]).stdout).unwrap_or_default();
        s["supervisor"]["pid"].is_number()
    });
    assert_eq!(s["supervisor"]["max_restarts"], 7, "{s}");
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

#[test]
fn result_of_a_job_interrupted_by_a_forced_stop_says_so() {
    let sb = Sandbox::new("ops-interrupted");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let id = sb.submit("sleep", "30000");
    let s = |sb: &Sandbox| -> serde_json::Value {
        serde_json::from_slice(&sb.run(&["status", "--json"]).stdout).unwrap_or_default()
    };
    eventually(Duration::from_secs(10), "the job running", || {
        s(&sb)["in_flight"] == 1
    });
    let out = sb.run(&["stop", "--timeout", "200ms", "--force"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = sb.run(&["result", &id]);
    assert_eq!(out.status.code(), Some(5));
    assert!(
        text(&out.stderr).contains("interrupted"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn switching_from_allow_root_to_a_user_keeps_the_spool() {
    let mut sb = Sandbox::new("ops-switch-user");
    sb.own_binary();
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    // First as root (allow_root): the spool, its .lock and a queued job are root's.
    let w = sb.start();
    drop(w);
    let queued = sb.submit("reverse", "queued-as-root");
    let cfg = fs::read_to_string(sb.config())
        .unwrap()
        .replace("allow_root = true", "user = \"nobody\"");
    fs::write(sb.config(), cfg).unwrap();
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = all_outcomes(&sb, std::slice::from_ref(&queued), Duration::from_secs(20));
    assert_eq!(out[0].1, "toor-sa-deueuq");
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

#[test]
fn a_fatal_start_error_reaches_the_log_file() {
    let sb = Sandbox::new("ops-fatal-log");
    sb.write_config("[log]\nfile = \"worker-file.log\"\n");
    fs::write(sb.path("spool"), "a file where the spool should be").unwrap();
    let out = sb.run(&["run"]);
    assert_eq!(out.status.code(), Some(1));
    let log = fs::read_to_string(sb.path("worker-file.log")).unwrap_or_default();
    assert!(
        log.contains("spool"),
        "the error is in the log file: {log:?}"
    );
}

#[test]
fn a_user_binary_reports_its_own_name_and_version() {
    let mut sb = Sandbox::new("ops-identity");
    sb.bin = example("custom_worker");
    let out = sb.run(&["--version"]);
    assert_eq!(text(&out.stdout).trim(), "custom-worker 1.0.0-example");
    // custom_worker's Rust `shout` collides with nothing here.
    let w = sb.start();
    let s = w.status();
    assert_eq!(
        (s["name"].as_str(), s["version"].as_str()),
        (Some("custom-worker"), Some("1.0.0-example"))
    );
    // The line is written once the helpers (the status server among them) have started: a
    // status answer can come first.
    eventually(Duration::from_secs(10), "the start logged by name", || {
        w.log_text().contains("custom-worker 1.0.0-example started")
    });
}

#[test]
fn every_subcommand_help_lists_its_exit_codes() {
    let sb = Sandbox::new("ops-help");
    for cmd in [
        "run", "start", "restart", "submit", "result", "status", "reload", "stop", "check",
    ] {
        let out = sb.run(&[cmd, "--help"]);
        assert!(
            text(&out.stdout).contains("Exit codes:"),
            "{cmd} --help: {}",
            text(&out.stdout)
        );
    }
}
