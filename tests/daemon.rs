//! `start` / `stop` / `restart`: the daemon, its readiness, its pidfile.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::process::Stdio;
use std::time::Duration;

use common::*;

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
    // Not "restarts 0, last - (-)".
    assert!(
        text(&out.stdout).contains(", no restart yet\n"),
        "{}",
        text(&out.stdout)
    );
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
        text(&out.stderr).contains("spool\": Not a directory"),
        "{}",
        text(&out.stderr)
    );
    let out = sb.run(&["status"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
}

/// A `start` that says the daemon failed returns only once that daemon is gone: `status` run
/// the moment `start` printed the error finds no worker. Until then root's record of the
/// worker that started (kept for a worker whose `state_dir` is removed under it) named a live
/// process, and `status` said "unknown" (exit 4, "was state_dir removed under it?"), as CI saw
/// once. strace makes the scheduler's worst case certain: the daemon's `chdir("/")` (no other
/// process of `start` makes one) waits 2 s and every exit waits 1 s, so the daemon exits a
/// second after it reported its error.
#[test]
fn a_failed_start_returns_once_its_daemon_is_gone() {
    use std::io::{BufRead, BufReader};
    let sb = Sandbox::new("start-fail-gone");
    sb.write_config("");
    fs::write(sb.path("spool"), "not a directory").unwrap();
    let cmd = sb.cmd(&["start"]);
    let mut start = std::process::Command::new("strace")
        .args([
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            "-e",
            "trace=chdir,exit_group",
        ])
        .args(["-e", "inject=chdir:delay_enter=2000000"])
        .args(["-e", "inject=exit_group:delay_enter=1000000"])
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .env_remove("GEARSHIFT_LOG")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("strace (scripts/deps installs it)");
    let mut said = String::new();
    for line in BufReader::new(start.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        said.push_str(&line);
        if line.contains("spool\": Not a directory") {
            break;
        }
    }
    let out = sb.run(&["status"]);
    let _ = start.wait();
    assert!(said.contains("Not a directory"), "{said}");
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
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
            .is_ok_and(|l| matches!(l, gearshift::client::spool::Lookup::Running))
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
            .is_ok_and(|l| matches!(l, gearshift::client::spool::Lookup::Running))
    });
    let out = sb.run(&["stop", "--timeout", "500ms", "--force"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains(&format!("these jobs will run again: {id} (long)")),
        "{}",
        text(&out.stdout)
    );
    // Ended by its own forced stop (a second TERM: a death that systemd and a supervisor take
    // for the stop it is), not by a SIGKILL, which they take for a crash.
    assert!(
        text(&out.stdout).contains("by a second TERM"),
        "{}",
        text(&out.stdout)
    );
    let log = fs::read_to_string(sb.path("state/gearshift.log")).unwrap();
    assert!(log.contains("SIGTERM again: exiting now"), "{log}");
    assert!(outcome(&open_spool(&sb), &id).is_none());
    no_process_runs(&sb.path("jobs/long.sh"));
}

/// Asserts that no process runs `path` (a job's processes were killed with the worker).
fn no_process_runs(path: &std::path::Path) {
    let leftover = std::process::Command::new("pgrep")
        .args(["-f", &path.display().to_string()])
        .output()
        .unwrap();
    assert!(leftover.stdout.is_empty(), "{}", text(&leftover.stdout));
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

fn uid_line(pid: i32, key: &str) -> Vec<String> {
    proc_field(pid, key)
        .split_whitespace()
        .map(String::from)
        .collect()
}

#[test]
fn root_drops_privileges_to_the_configured_user() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "CI runs as root; this test checks the root path"
    );
    let mut sb = Sandbox::new("privdrop");
    // The unprivileged worker re-execs its own binary: use a copy it can reach wherever this
    // checkout lives (a clone in a 0700 directory would refuse every reload).
    let bin = sb.path("gearshift");
    copy_binary(std::path::Path::new(BIN), &bin);
    sb.bin = bin;
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let text_cfg = sb
        .config_text("")
        .replace("allow_root = true", "user = \"nobody\"");
    fs::write(sb.config(), text_cfg).unwrap();
    sb.job(
        "whoami.sh",
        "#!/bin/sh\nprintf '%s:%s' \"$(id -u)\" \"$(id -g)\"\n",
    );
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let pid = pid_of(&sb);
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let (uid, gid) = (nobody.uid.to_string(), nobody.gid.to_string());
    assert_eq!(
        uid_line(pid, "Uid:"),
        [uid.as_str(); 4],
        "real, effective, saved, fs uid"
    );
    assert_eq!(uid_line(pid, "Gid:"), [gid.as_str(); 4]);
    assert_eq!(
        uid_line(pid, "Groups:"),
        [gid.as_str()],
        "root's supplementary groups are gone"
    );
    let out = sb.run(&["submit", "--wait", "whoami", ""]);
    assert_eq!(
        text(&out.stdout),
        format!("{uid}:{gid}"),
        "{}",
        text(&out.stderr)
    );
    // The re-exec'd image is already unprivileged and keeps serving.
    let out = sb.run(&["reload"]);
    assert!(
        out.status.success(),
        "{} {}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert_eq!(uid_line(pid, "Uid:"), [uid.as_str(); 4]);
    let out = sb.run(&["submit", "--wait", "reverse", "abc"]);
    assert_eq!(text(&out.stdout), "cba");
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

#[test]
fn root_without_user_is_refused() {
    let sb = Sandbox::new("noroot");
    let cfg = sb.config_text("").replace("allow_root = true\n", "");
    fs::write(sb.config(), cfg).unwrap();
    for cmd in [&["run"][..], &["start"][..]] {
        let out = sb.run(cmd);
        assert_eq!(out.status.code(), Some(1), "{cmd:?}");
        assert!(
            text(&out.stderr).contains("refusing to run as root: set [worker] user"),
            "{}",
            text(&out.stderr)
        );
    }
}

#[test]
fn strict_modes_refuse_loose_files() {
    use std::os::unix::fs::PermissionsExt;
    let sb = Sandbox::new("strict");
    let chmod = |p: &std::path::Path, mode: u32| {
        fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap()
    };
    chmod(&sb.config(), 0o666);
    let out = sb.run(&["check"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("is writable by group or others (mode 666); fix: chmod go-w"),
        "{}",
        text(&out.stderr)
    );
    chmod(&sb.config(), 0o644);

    // Every loose executable is named at once (`check` named the first it met, so a deploy
    // of several took a round of fixing each).
    let job = sb.job("loose.sh", "#!/bin/sh\ncat\n");
    chmod(&job, 0o777);
    let other = sb.job("also-loose.sh", "#!/bin/sh\ncat\n");
    chmod(&other, 0o775);
    let out = sb.run(&["check"]);
    let said = text(&out.stderr);
    assert!(
        said.contains("2 job executables cannot be used")
            && said.contains("loose.sh\" is writable by group or others (mode 777)")
            && said.contains("also-loose.sh\" is writable by group or others (mode 775)"),
        "{said}"
    );
    fs::remove_file(&other).unwrap();
    chmod(&job, 0o755);
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    nix::unistd::chown(&job, Some(nobody.uid), None).unwrap();
    let out = sb.run(&["check"]);
    assert!(
        text(&out.stderr).contains(&format!("is owned by uid {}", nobody.uid)),
        "{}",
        text(&out.stderr)
    );
    nix::unistd::chown(&job, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
    assert_eq!(sb.run(&["check"]).status.code(), Some(0));

    // A running worker refuses the reload that would load a loose file, and keeps serving.
    let w = sb.start();
    chmod(&job, 0o775);
    let s = w.wait_for(Duration::from_secs(10), "the refusal", |s| {
        !s["last_refused_reload"].is_null()
    });
    assert!(
        s["last_refused_reload"]["error"]
            .as_str()
            .unwrap()
            .contains("writable by group or others"),
        "{s}"
    );
    assert_eq!(s["generation"], 1);
    let out = sb.run(&["submit", "--wait", "loose", "still served"]);
    assert_eq!(
        text(&out.stdout),
        "still served",
        "{}\n{}",
        text(&out.stderr),
        w.log_text()
    );
}

#[test]
fn pidfile_lock_is_held_through_100_reexecs() {
    let sb = Sandbox::new("lock-race");
    let w = sb.start();
    let pidfile = sb.path("state/gearshift.pid");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // One thread tests the lock as fast as it can, another keeps trying `start`.
    let prober = {
        let (stop, pidfile) = (stop.clone(), pidfile.clone());
        std::thread::spawn(move || {
            let mut probes = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                // The lock is free exactly when we could take it (and then it is ours).
                let file = fs::File::open(&pidfile).unwrap();
                let taken =
                    nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock);
                assert!(taken.is_err(), "lock free after {probes} probes");
                probes += 1;
            }
            probes
        })
    };
    let starter = {
        let stop = stop.clone();
        let (bin, config) = (sb.bin.clone(), sb.config());
        std::thread::spawn(move || {
            let mut tries = 0;
            while !stop.load(std::sync::atomic::Ordering::Acquire) {
                let out = std::process::Command::new(&bin)
                    .arg("-c")
                    .arg(&config)
                    .arg("start")
                    .output()
                    .unwrap();
                assert_eq!(
                    out.status.code(),
                    Some(1),
                    "a start won during the re-execs: {}",
                    text(&out.stdout)
                );
                tries += 1;
            }
            tries
        })
    };
    for g in 2..=101 {
        w.signal(nix::sys::signal::Signal::SIGHUP);
        w.wait_generation(g);
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    let probes = prober.join().unwrap();
    let tries = starter.join().unwrap();
    assert!(probes > 100 && tries > 3, "{probes} probes, {tries} starts");
    assert_eq!(w.status()["pid"], w.pid());
}

/// Waits until a worker other than `old` holds the pidfile and serves.
fn serving_instead_of(sb: &Sandbox, old: i32, limit: Duration) {
    eventually(limit, "a new worker serving", || {
        fs::read_to_string(sb.path("state/gearshift.pid"))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .is_some_and(|p| p != old)
            && sb.run(&["status"]).status.code() == Some(0)
    });
}

fn supervisor_of(worker: i32) -> i32 {
    proc_field(worker, "PPid:").parse().unwrap()
}

#[test]
fn supervisor_restarts_a_killed_worker_forwards_signals_and_gives_up() {
    let sb = Sandbox::new("supervise");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let out = sb.run(&["start", "--supervise", "--max-restarts", "2"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let first = pid_of(&sb);
    let sup = supervisor_of(first);
    assert_ne!(sup, 1, "the worker is the supervisor's child");

    // HUP to the supervisor reaches the worker, which restarts in place.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sup),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    eventually(Duration::from_secs(10), "generation 2", || {
        sb.run(&["status"])
            .stdout
            .windows(12)
            .any(|w| w == b"generation 2")
    });

    // kill -1 <worker pid> works as without a supervisor; the PID (the supervisor's child) stays.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    eventually(Duration::from_secs(10), "generation 3", || {
        sb.run(&["status"])
            .stdout
            .windows(12)
            .any(|w| w == b"generation 3")
    });
    assert_eq!((pid_of(&sb), supervisor_of(first)), (first, sup));

    let mut last = first;
    for crash in 1..=2u64 {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(last),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        serving_instead_of(&sb, last, Duration::from_secs(20));
        last = pid_of(&sb);
        assert_eq!(supervisor_of(last), sup);
        let s: serde_json::Value =
            serde_json::from_slice(&sb.run(&["status", "--json"]).stdout).unwrap();
        assert_eq!(s["supervisor"]["crashes"], crash, "{s}");
        assert_eq!(s["supervisor"]["last_exit"], "was killed by SIGKILL");
    }
    // A third crash within the minute is over the limit of 2: the supervisor gives up.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(last),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually(Duration::from_secs(10), "the supervisor to give up", || {
        !process_alive(sup)
    });
    assert_eq!(sb.run(&["status"]).status.code(), Some(3));
    let log = fs::read_to_string(sb.path("state/gearshift.log")).unwrap();
    assert!(
        log.contains("3 crashes within a minute, over the limit of 2: giving up"),
        "{log}"
    );
}

/// The supervisor's wait before a restart comes back down after a worker that ran a while: a
/// crash long after the last one waits the shortest time again. Before, the doublings of every
/// earlier crash stayed (a week of one crash a day waited the 30 s maximum). The fault build
/// counts 3 s as a while, where the product counts a minute.
#[test]
fn a_crash_after_a_stable_run_restarts_after_the_shortest_wait() {
    let mut sb = Sandbox::new("supervise-backoff");
    sb.bin = build_variant("faults", ("GEARSHIFT_FAULTS", "1"));
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let mut cmd = sb.cmd(&["start", "--supervise", "--max-restarts", "9"]);
    cmd.env("GEARSHIFT_FAULT_STABLE_MS", "3000");
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let waits = |sb: &Sandbox| -> Vec<String> {
        let log = fs::read_to_string(sb.path("state/gearshift.log")).unwrap();
        log.lines()
            .filter_map(|l| l.split("restarting in ").nth(1))
            .map(str::to_string)
            .collect()
    };
    // Two crashes in a row: the wait doubles.
    crash(&sb);
    crash(&sb);
    assert_eq!(waits(&sb), ["500 ms", "1000 ms"]);
    // A worker that served longer than the fault build's "while": its crash waits 0.5 s again.
    std::thread::sleep(Duration::from_millis(3500));
    crash(&sb);
    assert_eq!(waits(&sb), ["500 ms", "1000 ms", "500 ms"]);
    // And a crash right after it doubles from there.
    crash(&sb);
    assert_eq!(waits(&sb), ["500 ms", "1000 ms", "500 ms", "1000 ms"]);
}

/// Kills the supervised worker (SIGKILL) and waits for its supervisor's next one to serve.
fn crash(sb: &Sandbox) {
    let last = pid_of(sb);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(last),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    serving_instead_of(sb, last, Duration::from_secs(20));
}

/// A worker that cannot start for a reason found only as it starts (here its spool held by
/// another worker, whose `state_dir` is another) is refused with that reason by `start
/// --supervise`, as by `start`. Before, the supervised start said only "the worker exited
/// with status 1 during start-up; see LOG".
#[test]
fn a_supervised_start_that_fails_says_the_workers_own_error() {
    let owner = Sandbox::new("spool-owner");
    let w = owner.start();
    let sb = Sandbox::new("supervise-refused");
    let spool = owner.path("spool");
    let text = sb
        .config_text("")
        .replace("dir = \"spool\"", &format!("dir = \"{}\"", spool.display()));
    fs::write(sb.config(), text).unwrap();
    for args in [&["start"][..], &["start", "--supervise"]] {
        let out = sb.run(args);
        let err = text_of(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains(&format!(
                "is in use by another worker (its .lock is held, by pid {})",
                w.pid()
            )),
            "{args:?}: {err}"
        );
        assert!(!err.contains("exited with status"), "{args:?}: {err}");
        assert_eq!(sb.run(&["status"]).status.code(), Some(3), "{args:?}");
    }
}

/// A restarted generation that hangs before it serves (a new binary's start-up deadlocked, a
/// hung mount; a stall injected in the fault build) must not wedge the worker for good: the new
/// image arms an alarm first thing and cancels it once it serves, so SIGALRM ends it and the
/// supervisor starts the worker afresh (after a deploy, the marker then rolls it back). The
/// alarm is shortened to 2 s in the fault build. Before, the generation hung for ever.
#[test]
fn a_restarted_generation_that_hangs_before_serving_is_ended_for_its_supervisor() {
    let mut sb = Sandbox::new("supervise-hang");
    sb.bin = build_variant("faults", ("GEARSHIFT_FAULTS", "1"));
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let marker = sb.path("stall");
    let out = sb
        .cmd(&["start", "--supervise"])
        .env("GEARSHIFT_FAULT_STALL_RESUMED", &marker)
        .env("GEARSHIFT_FAULT_SERVE_ALARM_S", "2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let first = pid_of(&sb);
    let sup = supervisor_of(first);
    fs::write(&marker, "").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(first),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    serving_instead_of(&sb, first, Duration::from_secs(30));
    assert_eq!(supervisor_of(pid_of(&sb)), sup);
    let s: serde_json::Value =
        serde_json::from_slice(&sb.run(&["status", "--json"]).stdout).unwrap();
    assert_eq!(s["supervisor"]["crashes"], 1, "{s}");
    assert_eq!(s["supervisor"]["last_exit"], "was killed by SIGALRM", "{s}");
    fs::remove_file(&marker).unwrap();
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// `stop`, then the supervisor `sup` exits too and nothing is started again.
fn stop_and_see_the_supervisor_go(sb: &Sandbox, sup: i32) {
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
    eventually(Duration::from_secs(10), "the supervisor to exit", || {
        !process_alive(sup)
    });
    assert_eq!(
        sb.run(&["status"]).status.code(),
        Some(3),
        "nothing was restarted"
    );
}

/// A worker started with `start --supervise` running a 30 s job: (worker, supervisor).
fn supervised_with_a_long_job(sb: &Sandbox) -> (i32, i32) {
    assert_eq!(sb.run(&["start", "--supervise"]).status.code(), Some(0));
    let worker = pid_of(sb);
    let sup = supervisor_of(worker);
    sb.submit("sleep", "30000");
    eventually(Duration::from_secs(10), "the job running", || {
        text(&sb.run(&["status"]).stdout).contains("1 running")
    });
    (worker, sup)
}

/// `stop --force` and a second `stop` end a supervised worker's running jobs at once: the
/// worker dies of the SIGKILL, or exits 1, and its supervisor, which had seen no TERM (`stop`
/// signals the worker), took that for a crash and started the worker again: `stop` said
/// "killed" and the worker was back, running the job again. `stop` now asks the supervisor,
/// which forwards the TERM and knows it is a stop.
#[test]
fn a_forced_or_second_stop_of_a_supervised_worker_is_not_undone_by_its_supervisor() {
    for second_stop in [false, true] {
        let sb = Sandbox::new("supervise-force");
        let _reaper = Reaper(sb.path("state/gearshift.pid"));
        let (_, sup) = supervised_with_a_long_job(&sb);
        let out = if second_stop {
            let first = sb.run(&["stop", "--timeout", "1s"]);
            assert_eq!(first.status.code(), Some(5), "{}", text_of(&first));
            sb.run(&["stop", "--timeout", "10s"])
        } else {
            sb.run(&["stop", "--timeout", "1s", "--force"])
        };
        assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
        eventually(Duration::from_secs(10), "the supervisor to exit", || {
            !process_alive(sup)
        });
        let st = sb.run(&["status"]);
        assert_eq!(
            st.status.code(),
            Some(3),
            "second stop {second_stop}: started again: {}",
            text_of(&st)
        );
    }
}

/// Two TERMs sent to a supervised worker by hand (`kill -TERM PID` twice, `pkill -TERM` from a
/// script, not through `stop`): the first is a graceful stop, and a worker that finishes its
/// jobs exits 0 and is not restarted; the second ends it at once, and it exited 1, which its
/// supervisor took for a crash: it started the worker again, which ran the interrupted job
/// again. Under systemd's `Restart=on-failure` the same. A forced stop now ends the worker by
/// the signal it was sent, as a shell expects (status 143), which a supervisor and systemd take
/// for the stop it is.
#[test]
fn two_terms_sent_by_hand_to_a_supervised_worker_stop_it_for_good() {
    let sb = Sandbox::new("supervise-two-terms");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let (worker, sup) = supervised_with_a_long_job(&sb);
    let pid = nix::unistd::Pid::from_raw(worker);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    eventually(Duration::from_secs(10), "the worker stopping", || {
        text(&sb.run(&["status"]).stdout).contains("stopping")
    });
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    eventually(Duration::from_secs(10), "the supervisor to exit", || {
        !process_alive(sup)
    });
    let st = sb.run(&["status"]);
    assert_eq!(st.status.code(), Some(3), "started again: {}", text_of(&st));
    let log = fs::read_to_string(sb.path("state/gearshift.log")).unwrap();
    assert!(log.contains("not restarting"), "{log}");
}

/// `reopen-logs` after logrotate moved a supervised worker's log away: the worker reopened its
/// log, its supervisor did not (it was not asked), so what the supervisor says (a crash, a
/// restart, giving up: the lines an operator looks for) went on into the moved file, and into
/// nothing once that was compressed and deleted. The supervisor is asked now, and reopens its
/// own before it passes the signal on.
#[test]
fn reopen_logs_reaches_a_supervisors_own_log_lines() {
    let sb = Sandbox::new("supervise-logrotate");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    assert_eq!(sb.run(&["start", "--supervise"]).status.code(), Some(0));
    let log = sb.path("state/gearshift.log");
    let rotated = sb.path("state/gearshift.log.1");
    fs::rename(&log, &rotated).unwrap();
    let out = sb.run(&["reopen-logs"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    eventually(Duration::from_secs(5), "the worker's new log", || {
        fs::read_to_string(&log).is_ok_and(|s| s.contains("reopened log file"))
    });
    let worker = pid_of(&sb);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually(
        Duration::from_secs(10),
        "the supervisor's line in the new log",
        || fs::read_to_string(&log).is_ok_and(|s| s.contains("(crash 1); restarting")),
    );
    assert!(
        !fs::read_to_string(&rotated)
            .unwrap()
            .contains("(crash 1); restarting"),
        "the moved file got it"
    );
    serving_instead_of(&sb, worker, Duration::from_secs(20));
    stop_and_see_the_supervisor_go(&sb, supervisor_of(pid_of(&sb)));
}

/// A logrotate while a supervisor waits to restart its crashed worker, with no `reopen-logs`
/// after it (a postrotate that failed, or a rotation by hand): the supervisor's lines from then
/// on (the next worker started, its later crashes) went into the moved file. The supervisor now
/// reopens its log before a restart when the file at the path is another (and on a USR1 during
/// the wait, which `reopen-logs` sends it: `stop_status_and_start_see_a_supervisor_about_to_restart`).
#[test]
fn a_log_rotated_while_the_supervisor_waits_to_restart_gets_its_next_lines() {
    let sb = Sandbox::new("supervise-rotate-wait");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    assert_eq!(sb.run(&["start", "--supervise"]).status.code(), Some(0));
    let log = sb.path("state/gearshift.log");
    let rotated = sb.path("state/gearshift.log.1");
    // Two crashes in a row: the second restart waits a second, time to rotate in.
    crash(&sb);
    let second = pid_of(&sb);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(second),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually(Duration::from_secs(10), "the second crash's wait", || {
        fs::read_to_string(&log).is_ok_and(|s| s.contains("(crash 2); restarting in 1000 ms"))
    });
    fs::rename(&log, &rotated).unwrap();
    serving_instead_of(&sb, second, Duration::from_secs(20));
    let third = pid_of(&sb);
    let started = format!("worker pid {third} started");
    eventually(Duration::from_secs(5), "the supervisor's line", || {
        fs::read_to_string(&log).is_ok_and(|s| s.contains(&started))
    });
    let moved = fs::read_to_string(&rotated).unwrap();
    assert!(!moved.contains(&started), "the moved file got it: {moved}");
    stop_and_see_the_supervisor_go(&sb, supervisor_of(third));
}

/// A supervisor killed (kill -9, the OOM killer) under its worker: the worker runs on, and
/// `status` went on saying "supervisor pid N, 0 crash(es)" for a pid that was gone, so nobody
/// knew that a crash would no longer be restarted. Now `status` says it is gone (`--json`:
/// `supervisor.gone`), the log says it once, and `restart` starts the worker supervised again.
#[test]
fn a_supervisor_killed_under_its_worker_is_said_gone_and_restart_brings_it_back() {
    let sb = Sandbox::new("supervise-gone");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    assert_eq!(sb.run(&["start", "--supervise"]).status.code(), Some(0));
    let worker = pid_of(&sb);
    let sup = supervisor_of(worker);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sup),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // Gone once the worker is another's child: a killed process's leader shows as a zombie
    // while its other threads still exit, and its children stay theirs until the last.
    eventually(Duration::from_secs(10), "the supervisor gone", || {
        supervisor_of(worker) != sup
    });
    let out = sb.run(&["status"]);
    let gone = format!("the supervisor (pid {sup}) is gone: this worker runs on unsupervised");
    assert!(text(&out.stdout).contains(&gone), "{}", text_of(&out));
    let s: serde_json::Value =
        serde_json::from_slice(&sb.run(&["status", "--json"]).stdout).unwrap();
    assert_eq!(s["supervisor"]["gone"], true, "{s}");
    eventually(Duration::from_secs(15), "the log to say it", || {
        fs::read_to_string(sb.path("state/gearshift.log")).is_ok_and(|l| l.contains(&gone))
    });
    // Said once for the worker: a reload's generation, whose look at the paths comes 5 s in,
    // does not say it again (each generation did).
    assert_eq!(sb.run(&["reload"]).status.code(), Some(0));
    std::thread::sleep(Duration::from_millis(5500));
    let log = fs::read_to_string(sb.path("state/gearshift.log")).unwrap();
    assert_eq!(log.matches(&gone).count(), 1, "{log}");
    let out = sb.run(&["restart"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let again = pid_of(&sb);
    assert_ne!(supervisor_of(again), 1, "supervised again");
    let s: serde_json::Value =
        serde_json::from_slice(&sb.run(&["status", "--json"]).stdout).unwrap();
    assert_eq!(s["supervisor"]["gone"], false, "{s}");
    stop_and_see_the_supervisor_go(&sb, supervisor_of(again));
}

/// A supervised worker crashed four times in a row, its supervisor now in the 4 s wait before
/// the next start (time for the commands a test runs meanwhile): the supervisor's pid.
fn supervised_and_waiting(sb: &Sandbox) -> i32 {
    assert_eq!(sb.run(&["start", "--supervise"]).status.code(), Some(0));
    let sup = supervisor_of(pid_of(sb));
    for _ in 0..3 {
        crash(sb);
    }
    let last = pid_of(sb);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(last),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let log = sb.path("state/gearshift.log");
    eventually(Duration::from_secs(10), "the fourth crash's wait", || {
        fs::read_to_string(&log).is_ok_and(|s| s.contains("(crash 4); restarting in 4000 ms"))
    });
    sup
}

/// `submit --wait` while a supervisor waits to start its crashed worker again gave up after 2 s
/// ("no worker is running (start one: gearshift start)", exit 3; and `start` is refused then):
/// it waits on now, and prints the result once the supervisor's worker has run the job.
#[test]
fn submit_wait_waits_for_a_worker_its_supervisor_is_about_to_start() {
    let sb = Sandbox::new("supervise-submit-wait");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let sup = supervised_and_waiting(&sb);
    let out = sb.run(&["submit", "--wait", "--timeout", "30s", "echo", "still here"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert_eq!(text(&out.stdout), "still here");
    stop_and_see_the_supervisor_go(&sb, sup);
}

/// `restart` while a supervisor waits to start its crashed worker again (the operator fixed
/// what made it crash): the waiting supervisor is stopped and a new one started with the
/// worker. Before, `restart` found no worker, started one without a supervisor, and the old
/// supervisor's start then failed on the pidfile lock, a crash to it.
#[test]
fn restart_while_a_supervisor_waits_replaces_it_with_a_supervised_worker() {
    let sb = Sandbox::new("supervise-restart-waiting");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let old = supervised_and_waiting(&sb);
    let out = sb.run(&["restart"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    eventually(Duration::from_secs(5), "the old supervisor's exit", || {
        !process_alive(old)
    });
    let sup = supervisor_of(pid_of(&sb));
    assert!(sup != 1 && sup != old, "supervised anew: {sup}");
    let s: serde_json::Value =
        serde_json::from_slice(&sb.run(&["status", "--json"]).stdout).unwrap();
    assert_eq!(s["supervisor"]["pid"], sup, "{s}");
    stop_and_see_the_supervisor_go(&sb, sup);
}

/// While a supervisor waits to start its crashed worker again no worker holds the pidfile, and
/// `stop` said "gearshift is not running" (exit 0) and left the supervisor, which started the
/// worker seconds later; `status` said "not running" with nothing about it, and a `start`
/// started a second worker beside the one the supervisor was about to start. The supervisor
/// holds a lock of its own now (`state_dir/supervisor.pid`): `status` and `reload` name it,
/// `start` is refused, `reopen-logs` asks it, and `stop` stops it.
#[test]
fn stop_status_and_start_see_a_supervisor_about_to_restart() {
    let sb = Sandbox::new("supervise-waiting");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let sup = supervised_and_waiting(&sb);
    let log = sb.path("state/gearshift.log");
    let about = format!("its supervisor (pid {sup}) is about to start the worker again");
    let out = sb.run(&["status"]);
    assert_eq!(out.status.code(), Some(3), "{}", text_of(&out));
    assert!(text(&out.stdout).contains(&about), "{}", text_of(&out));
    let s: serde_json::Value =
        serde_json::from_slice(&sb.run(&["status", "--json"]).stdout).unwrap();
    assert_eq!(s["supervisor"]["pid"], sup, "{s}");
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
    assert!(text(&out.stderr).contains(&about), "{}", text_of(&out));
    let out = sb.run(&["reopen-logs"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let out = sb.run(&["reload"]);
    assert_eq!(out.status.code(), Some(3), "{}", text_of(&out));
    assert!(text(&out.stderr).contains(&about), "{}", text_of(&out));
    let out = sb.run(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert!(
        text(&out.stdout).contains(&format!("stopped its supervisor (pid {sup})")),
        "{}",
        text_of(&out)
    );
    eventually(Duration::from_secs(5), "the supervisor's exit", || {
        !process_alive(sup)
    });
    // Past the wait it was in: nothing starts.
    std::thread::sleep(Duration::from_secs(5));
    let out = sb.run(&["status"]);
    assert_eq!(out.status.code(), Some(3), "{}", text_of(&out));
    assert_eq!(text(&out.stdout).trim(), "gearshift is not running");
    let log = fs::read_to_string(&log).unwrap();
    assert!(log.contains("SIGUSR1: reopened log file"), "{log}");
}

/// `restart` of a supervised worker that someone stopped with SIGSTOP: it asked the stopped
/// worker whether it had a supervisor, got no answer within 2 s, and started the new worker
/// without one. The stopped worker is continued first (the TERM that follows ends it anyway),
/// and the new worker is supervised like the old.
#[test]
fn restart_of_a_stopped_supervised_worker_keeps_its_supervisor() {
    let sb = Sandbox::new("supervise-sigstop");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    assert_eq!(sb.run(&["start", "--supervise"]).status.code(), Some(0));
    let old = pid_of(&sb);
    let old_sup = supervisor_of(old);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(old),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    eventually(Duration::from_secs(5), "the worker stopped", || {
        proc_field(old, "State:").starts_with('T')
    });
    let out = sb.run(&["restart"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let new = pid_of(&sb);
    assert_ne!(new, old);
    let s: serde_json::Value =
        serde_json::from_slice(&sb.run(&["status", "--json"]).stdout).unwrap();
    assert!(s["supervisor"].is_object(), "supervised again: {s}");
    let sup = supervisor_of(new);
    assert_ne!(sup, 1, "the new worker is a supervisor's child");
    assert!(
        !process_alive(old_sup),
        "the old supervisor went with its worker"
    );
    stop_and_see_the_supervisor_go(&sb, sup);
}

/// What `ps` shows for a supervisor: it kept the command line of the CLI it was forked from
/// (`gearshift start --supervise`, without the config; `gearshift restart` for as long as it
/// ran, which read as a restart that never ended). It now names itself and its config.
#[test]
fn a_supervisor_names_itself_and_its_config_in_ps() {
    let sb = Sandbox::new("supervise-ps");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let cmdline = |pid: i32| {
        fs::read(format!("/proc/{pid}/cmdline"))
            .unwrap()
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
    };
    let config = sb.config().display().to_string();
    let out = sb.run(&["start", "--supervise"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    for round in ["start --supervise", "restart"] {
        if round == "restart" {
            let out = sb.run(&["restart"]);
            assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
        }
        let sup = supervisor_of(pid_of(&sb));
        assert_ne!(sup, 1, "supervised after {round}");
        let args = cmdline(sup);
        assert!(
            args.iter().any(|a| a == "supervise")
                && args.iter().any(|a| a == &config)
                && !args.iter().any(|a| a == "restart" || a == "start"),
            "after {round}, the supervisor shows as {args:?}"
        );
    }
    stop_and_see_the_supervisor_go(&sb, supervisor_of(pid_of(&sb)));
}

/// A supervisor started by a launcher that ignores SIGCHLD (ignored signals survive fork and
/// exec) never saw its worker's exit status: the kernel reaped it first, so a clean stop
/// read as "vanished (crash)" and the worker was started again right after `stop` said
/// stopped. Now every gearshift process gives ignored signals their defaults back first.
#[test]
fn a_supervisor_launched_with_sigchld_ignored_still_sees_a_clean_stop() {
    let sb = Sandbox::new("supervise-sigchld");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let launcher = "import os, signal, sys\n\
                    signal.signal(signal.SIGCHLD, signal.SIG_IGN)\n\
                    os.execv(sys.argv[1], sys.argv[1:])\n";
    let out = std::process::Command::new("/usr/bin/python3")
        .args(["-c", launcher])
        .arg(&sb.bin)
        .arg("-c")
        .arg(sb.config())
        .args(["start", "--supervise"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let sup = supervisor_of(pid_of(&sb));
    stop_and_see_the_supervisor_go(&sb, sup);
}

#[test]
fn supervisor_does_not_restart_after_a_clean_stop() {
    let sb = Sandbox::new("supervise-stop");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    assert_eq!(sb.run(&["start", "--supervise"]).status.code(), Some(0));
    let sup = supervisor_of(pid_of(&sb));
    stop_and_see_the_supervisor_go(&sb, sup);
    // TERM to the supervisor itself stops both.
    assert_eq!(sb.run(&["start", "--supervise"]).status.code(), Some(0));
    let worker = pid_of(&sb);
    let sup = supervisor_of(worker);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sup),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    eventually(Duration::from_secs(10), "both to exit", || {
        !process_alive(sup) && !process_alive(worker)
    });
}

/// The pidfile removed under a running daemon (an operator taking it for a stale one, a
/// cleaner of old files): `status` said "not running" (a script's `status || start` then
/// started a second worker), and `stop` said the same and left the worker running, with
/// nothing to find it by. Now `status` and `stop` see the worker on its status socket and say
/// so (exit 4, the pid named, nothing signalled), and the worker makes its pidfile again within
/// seconds when it may write there, after which both find it as before.
#[test]
fn a_removed_pidfile_is_made_again_and_never_reads_as_not_running() {
    let sb = Sandbox::new("pidfile-removed");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    assert_eq!(sb.run(&["start"]).status.code(), Some(0));
    let pid = pid_of(&sb);
    let _killer = Reaper(sb.path("pid-copy"));
    fs::write(sb.path("pid-copy"), pid.to_string()).unwrap();
    fs::remove_file(sb.path("state/gearshift.pid")).unwrap();
    let out = sb.run(&["status"]);
    match out.status.code() {
        // Already made again.
        Some(0) => assert!(text(&out.stdout).contains(&format!("(pid {pid})"))),
        _ => {
            assert_eq!(out.status.code(), Some(4), "{}", text_of(&out));
            assert!(
                text_of(&out).contains(&format!("pid {pid}")),
                "{}",
                text_of(&out)
            );
        }
    }
    eventually(Duration::from_secs(15), "the pidfile made again", || {
        fs::read_to_string(sb.path("state/gearshift.pid"))
            .is_ok_and(|s| s.trim() == pid.to_string())
            && sb.run(&["status"]).status.code() == Some(0)
    });
    let out = sb.run(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert!(!process_alive(pid));
}

/// A `state_dir` whose status socket path is longer than a unix socket address holds (107
/// bytes: a project checked out a few directories deep, a long service name): `check` said
/// "ok", and the worker then failed to start with "binding status socket ...: path must be
/// shorter than SUN_LEN". The socket is now bound through its directory's descriptor, as the
/// clients already connect through the socket file's.
#[test]
fn a_state_dir_deeper_than_a_socket_address_holds_still_serves() {
    let sb = Sandbox::new("deep-state");
    let deep = format!("{}/state", "d".repeat(120));
    fs::write(
        sb.config(),
        sb.config_text("")
            .replace("state_dir = \"state\"", &format!("state_dir = \"{deep}\"")),
    )
    .unwrap();
    let pidfile = sb.path(&format!("{deep}/gearshift.pid"));
    let _reaper = Reaper(pidfile.clone());
    assert!(
        sb.path(&format!("{deep}/worker/gearshift.sock"))
            .as_os_str()
            .len()
            > 108
    );
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let out = sb.run(&["submit", "--wait", "reverse", "deep"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert_eq!(text(&out.stdout).trim(), "peed");
    // Handed across the exec as any status socket is (not bound again: a client waiting in
    // its backlog meanwhile is answered by the next generation).
    let socket = sb.path(&format!("{deep}/worker/gearshift.sock"));
    let inode = || std::os::unix::fs::MetadataExt::ino(&fs::metadata(&socket).unwrap());
    let before = inode();
    let out = sb.run(&["reload"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let out = sb.run(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert!(
        text(&out.stdout).contains("generation 2"),
        "{}",
        text_of(&out)
    );
    assert_eq!(
        inode(),
        before,
        "the socket was bound again, not handed over"
    );
    let out = sb.run(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert!(!pidfile.exists() || fs::read_to_string(&pidfile).unwrap().trim().is_empty());
}

/// A cgroup named like a systemd service, made for a test in the systemd hierarchy this
/// kernel mounts (cgroup v1's `name=systemd`, else the unified one), removed at the end (its
/// processes moved back to the root first).
struct ServiceCgroup(std::path::PathBuf);

impl ServiceCgroup {
    fn make(name: &str) -> Option<ServiceCgroup> {
        let root = [
            "/sys/fs/cgroup/systemd",
            "/sys/fs/cgroup/unified",
            "/sys/fs/cgroup",
        ]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|r| r.join("cgroup.procs").exists())?;
        let dir = root
            .join(format!("{name}.slice"))
            .join(format!("{name}.service"));
        fs::create_dir_all(&dir).ok()?;
        Some(ServiceCgroup(dir))
    }

    fn take(&self, pid: i32) -> bool {
        fs::write(self.0.join("cgroup.procs"), pid.to_string()).is_ok()
    }
}

impl Drop for ServiceCgroup {
    fn drop(&mut self) {
        let root = self
            .0
            .parent()
            .and_then(|p| p.parent())
            .map(|r| r.join("cgroup.procs"));
        if let (Ok(procs), Some(root)) = (fs::read_to_string(self.0.join("cgroup.procs")), root) {
            for p in procs.lines() {
                let _ = fs::write(&root, p);
            }
        }
        let _ = fs::remove_dir(&self.0);
        if let Some(slice) = self.0.parent() {
            let _ = fs::remove_dir(slice);
        }
    }
}

/// A worker started as a systemd service's would be: by `start` with the `INVOCATION_ID`
/// systemd gives its services, a child of PID 1, moved into a cgroup named like a service.
/// None (the test skipped) where the daemon's parent is a subreaper or no cgroup can be made.
fn service_worker(sb: &Sandbox, test: &str) -> Option<(i32, String, ServiceCgroup)> {
    let out = sb
        .cmd(&["start"])
        .env("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let worker = pid_of(sb);
    // What the kernel offers, not a tool CI could install: listed as skipped, under CI too.
    let unable = |why: &str| skip_to(&skip_list(), test, why, false);
    if supervisor_of(worker) != 1 {
        unable("the daemon's parent is a subreaper, not PID 1");
        return None;
    }
    // Named after the sandbox: the tests of this binary run at once.
    let name = sb.dir.file_name().unwrap().to_string_lossy().into_owned();
    let Some(cgroup) = ServiceCgroup::make(&name).filter(|c| c.take(worker)) else {
        unable("no writable systemd cgroup hierarchy");
        return None;
    };
    Some((worker, format!("{name}.service"), cgroup))
}

/// `stop --force` of a worker that is a systemd service's main process: its SIGKILL is a crash
/// to systemd, and `Restart=on-failure` (as shipped) started the worker again, which ran the
/// killed jobs again at once, while `stop` said "killed". Now the worker's own forced stop (a
/// second TERM: a death by SIGTERM, clean to systemd) ends it first, and the unit stays stopped.
/// Only a worker that does not end so (here: held by a debugger) is killed, with a note that
/// systemd starts it again and `systemctl stop` for what stops the unit.
#[test]
fn stop_force_of_a_systemd_service_ends_it_as_systemd_takes_a_stop() {
    let test = "stop_force_of_a_systemd_service_ends_it_as_systemd_takes_a_stop";
    for held in [false, true] {
        let sb = Sandbox::new(if held {
            "systemd-force-held"
        } else {
            "systemd-force"
        });
        let _reaper = Reaper(sb.path("state/gearshift.pid"));
        let Some((worker, unit, _cgroup)) = service_worker(&sb, test) else {
            return;
        };
        sb.submit("sleep", "30000");
        eventually(Duration::from_secs(10), "the job running", || {
            text(&sb.run(&["status"]).stdout).contains("1 running")
        });
        let traced = held.then(|| Traced::attach(worker));
        let out = sb.run(&["stop", "--timeout", "1s", "--force"]);
        drop(traced);
        assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
        let said = text(&out.stderr);
        let noted = said.contains(&format!("systemd unit {unit}"))
            && said.contains(&format!("systemctl stop {unit}"));
        assert_eq!(noted, held, "held by a debugger: {held}: {}", text_of(&out));
        let how = if held {
            "killed (pid"
        } else {
            "by a second TERM"
        };
        assert!(text(&out.stdout).contains(how), "{}", text_of(&out));
        eventually(Duration::from_secs(5), "the worker gone", || {
            !process_alive(worker)
        });
    }
}

/// A worker held by a debugger acts on no TERM: `stop --force` kills it (and its job
/// processes) once its second TERM has not ended it, and says so (what it ran, it cannot say:
/// held, it answers no status query).
#[test]
fn stop_force_kills_a_worker_that_its_second_term_does_not_end() {
    let sb = Sandbox::new("stop-force-held");
    if !nix::unistd::geteuid().is_root() {
        return skip(
            "stop_force_kills_a_worker_that_its_second_term_does_not_end",
            "root (ptrace)",
        );
    }
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    sb.job("long.sh", "#!/bin/sh\nsleep 30\necho done\n");
    assert_eq!(sb.run(&["start"]).status.code(), Some(0));
    let worker = pid_of(&sb);
    let id = sb.submit("long", "");
    eventually(Duration::from_secs(10), "the job to run", || {
        open_spool(&sb)
            .lookup(&id)
            .is_ok_and(|l| matches!(l, gearshift::client::spool::Lookup::Running))
    });
    let traced = Traced::attach(worker);
    let out = sb.run(&["stop", "--timeout", "500ms", "--force"]);
    drop(traced);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let said = text(&out.stdout);
    assert!(
        said.contains(&format!("killed (pid {worker})"))
            && said.contains("a second TERM did not end it")
            && said.contains("the jobs it ran (it did not say which) will run again"),
        "{}",
        text_of(&out)
    );
    eventually(Duration::from_secs(5), "the worker gone", || {
        !process_alive(worker)
    });
    no_process_runs(&sb.path("jobs/long.sh"));
}

/// `restart` of a worker that is a systemd service's main process stopped the unit's worker
/// (a clean exit: systemd leaves the unit stopped) and started the new one from the caller's
/// shell, outside the unit: no `Restart=`, its log not in the journal, ended with the session.
/// It is refused now, the worker left running, with what restarts it under systemd.
#[test]
fn restart_of_a_systemd_service_is_refused_and_says_what_restarts_it() {
    let sb = Sandbox::new("systemd-restart");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let Some((worker, unit, _cgroup)) = service_worker(
        &sb,
        "restart_of_a_systemd_service_is_refused_and_says_what_restarts_it",
    ) else {
        return;
    };
    let st = text(&sb.run(&["status"]).stdout);
    assert!(
        st.contains(&format!("main process of systemd unit {unit}")),
        "{st}"
    );
    let out = sb.run(&["restart"]);
    assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
    let said = text(&out.stderr);
    assert!(
        said.contains(&format!("systemctl restart {unit}")) && said.contains("gearshift reload"),
        "{said}"
    );
    assert_eq!(pid_of(&sb), worker, "the worker runs on");
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// A worker that a deploy agent running as a service started (`start` from inside that
/// service: a child of PID 1 with the service's `INVOCATION_ID`, in its cgroup) is not that
/// service's main process, which is the agent: its `restart` goes on as anywhere else.
#[test]
fn a_worker_beside_another_service_process_restarts_as_usual() {
    let sb = Sandbox::new("systemd-beside");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let Some((worker, _, cgroup)) = service_worker(
        &sb,
        "a_worker_beside_another_service_process_restarts_as_usual",
    ) else {
        return;
    };
    let mut agent = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    assert!(cgroup.take(agent.id() as i32));
    let st = text(&sb.run(&["status"]).stdout);
    assert!(!st.contains("systemd unit"), "{st}");
    let out = sb.run(&["restart"]);
    let _ = agent.kill();
    let _ = agent.wait();
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert_ne!(pid_of(&sb), worker, "restarted");
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// `stop --force` of a supervised worker returns once its supervisor has let go of its lock
/// too, as a graceful `stop` does, so that a `start` right after it is not refused as a second
/// start beside a supervisor "about to start the worker again". Before, `--force` returned as
/// soon as the worker was gone. The fault build holds the supervisor's exit after its worker's
/// end until the test lets it go, a second later.
#[test]
fn a_start_right_after_stop_force_of_a_supervised_worker_is_not_refused() {
    let mut sb = Sandbox::new("supervise-force-start");
    sb.bin = build_variant("faults", ("GEARSHIFT_FAULTS", "1"));
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let hold = sb.path("hold-supervisor-exit");
    fs::write(&hold, "").unwrap();
    let out = sb
        .cmd(&["start", "--supervise"])
        .env("GEARSHIFT_FAULT_STALL_SUPERVISOR_EXIT", &hold)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let worker = pid_of(&sb);
    let sup = supervisor_of(worker);
    sb.submit("sleep", "30000");
    eventually(Duration::from_secs(10), "the job running", || {
        text(&sb.run(&["status"]).stdout).contains("1 running")
    });
    let release = std::thread::spawn(move || {
        eventually(Duration::from_secs(20), "the worker gone", || {
            !process_alive(worker)
        });
        std::thread::sleep(Duration::from_secs(1));
        fs::remove_file(&hold).unwrap();
    });
    let out = sb.run(&["stop", "--timeout", "1s", "--force"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let start = sb.run(&["start"]);
    release.join().unwrap();
    assert_eq!(start.status.code(), Some(0), "{}", text_of(&start));
    eventually(Duration::from_secs(5), "the old supervisor gone", || {
        !process_alive(sup)
    });
    // The interrupted job runs again in the new worker: not waited for.
    let out = sb.run(&["stop", "--timeout", "1s", "--force"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
}

/// A `start` or `status` while a supervised worker is still starting (a second `start
/// --supervise` right after the first, a slow start-up; here the fault build holds the fresh
/// start) is refused as a second start, or said not running yet, with what the supervisor
/// does: it is starting the worker. Before, both said the supervisor was "about to start the
/// worker again (after a crash)", of a worker that had never crashed.
#[test]
fn a_start_while_a_supervised_worker_starts_says_it_is_starting_not_a_crash() {
    let mut sb = Sandbox::new("supervise-starting");
    sb.bin = build_variant("faults", ("GEARSHIFT_FAULTS", "1"));
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let hold = sb.path("hold");
    fs::write(&hold, "").unwrap();
    let mut first = spawn(
        sb.cmd(&["start", "--supervise"])
            .env("GEARSHIFT_FAULT_STALL_START", &hold)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    );
    eventually(Duration::from_secs(10), "a supervisor starting", || {
        text(&sb.run(&["status"]).stdout).contains("its supervisor (pid")
    });
    let out = sb.run(&["status"]);
    let said = text(&out.stdout);
    assert!(said.contains("is starting the worker (pid "), "{said}");
    assert!(!said.contains("after a crash"), "{said}");
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
    let err = text(&out.stderr);
    assert!(err.contains("is starting the worker (pid "), "{err}");
    assert!(!err.contains("after a crash"), "{err}");
    fs::remove_file(&hold).unwrap();
    let status = wait_child(&mut first, Duration::from_secs(30)).expect("the first start's end");
    assert!(status.success(), "{status}");
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}
