//! Operators (issue 19): the CLI never lies: where the config cannot tell, one exit code per
//! meaning, and what a stop will cost.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// The record root keeps of a config's state_dir (see `layout::record_state_dir`).
fn record_of(sb: &Sandbox) -> std::path::PathBuf {
    record_of_path(&fs::canonicalize(sb.config()).unwrap())
}

/// The record root keeps of the state_dir of the config at `config` (an absolute path).
fn record_of_path(config: &std::path::Path) -> std::path::PathBuf {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(config.as_os_str().as_encoded_bytes());
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    std::path::Path::new("/run/gearshift/state-dirs").join(hex)
}

/// A config whose syntax broke while the worker runs elsewhere than the default state_dir:
/// `status` finds it through root's record, and without the record says "unknown" (4), never
/// "not running" (a script would start a second worker).
#[test]
fn status_with_a_broken_config_finds_the_worker_or_says_unknown() {
    let sb = Sandbox::new("op-broken");
    let cfg = sb
        .config_text("")
        .replace("state_dir = \"state\"", "state_dir = \"elsewhere\"");
    fs::write(sb.config(), &cfg).unwrap();
    let child = spawn(
        sb.cmd(&["run"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null()),
    );
    let mut w = Worker {
        child,
        socket: sb.path("elsewhere/worker/gearshift.sock"),
        log: sb.path("worker.log"),
    };
    w.wait_for(Duration::from_secs(10), "running", |s| {
        s["state"] == "running"
    });
    fs::write(
        sb.config(),
        cfg.replace("[worker]", "[worker")
            .replace("\"elsewhere\"", "'elsewhere'"),
    )
    .unwrap();

    let out = sb.run(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert!(text(&out.stdout).contains("running"), "{}", text_of(&out));
    assert!(
        text(&out.stderr).contains("recorded at the worker's start"),
        "{}",
        text_of(&out)
    );

    fs::remove_file(record_of(&sb)).unwrap();
    for cmd in [&["status"][..], &["stop"], &["reload"]] {
        let out = sb.run(cmd);
        assert_eq!(out.status.code(), Some(4), "{cmd:?}: {}", text_of(&out));
        assert!(
            text(&out.stderr).contains("cannot say for certain"),
            "{}",
            text_of(&out)
        );
    }
    // A config that is no regular file (a FIFO, a directory) says nothing of its state_dir
    // either: the default one was taken "from the file", for certain (and, with root's record
    // of the worker's pid, it asked whether state_dir was removed under the worker).
    fs::remove_file(sb.config()).unwrap();
    nix::unistd::mkfifo(
        &sb.config(),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    for cmd in [&["status"][..], &["reload"]] {
        let out = sb.run(cmd);
        assert_eq!(
            out.status.code(),
            Some(4),
            "FIFO {cmd:?}: {}",
            text_of(&out)
        );
        let err = text(&out.stderr);
        assert!(
            err.contains("(a guess: the file cannot be read as TOML)")
                && err.contains("cannot say for certain"),
            "FIFO {cmd:?}: {}",
            text_of(&out)
        );
    }
    assert!(
        w.child.try_wait().unwrap().is_none(),
        "still running, untouched"
    );
    w.signal(nix::sys::signal::Signal::SIGTERM);
    w.wait_exit(Duration::from_secs(10));
}

/// The config removed (or made unreadable) while the worker runs on its last good one: `status`,
/// `reload` and `stop` said only "reading config: No such file" (exit 6), and nothing but a
/// `kill` could stop the worker. They find it through root's record of where it started, as for
/// a config that does not validate; without the record they still cannot.
#[test]
fn a_removed_config_still_lets_status_reload_and_stop_find_the_worker() {
    let name = "a_removed_config_still_lets_status_reload_and_stop_find_the_worker";
    if !nix::unistd::geteuid().is_root() {
        return skip(name, "root (only root's record of a state_dir is trusted)");
    }
    let sb = Sandbox::new("op-removed");
    let mut w = sb.start();
    let kept = sb.path("config.toml.kept");
    fs::rename(sb.config(), &kept).unwrap();
    let out = sb.run(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert!(
        text(&out.stdout).contains("is running")
            && text(&out.stderr).contains("No such file")
            && text(&out.stderr).contains("recorded at the worker's start"),
        "{}",
        text_of(&out)
    );
    // The worker cannot read it either: the reload is refused, and it serves on.
    let out = sb.run(&["reload", "--timeout", "10s"]);
    assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
    assert!(
        text(&out.stderr).contains("No such file"),
        "{}",
        text_of(&out)
    );
    assert_eq!(w.generation(), 1);
    // Without root's record it cannot be found: said, and nothing is touched.
    let record = fs::read(record_of_path(&sb.config())).unwrap();
    fs::remove_file(record_of_path(&sb.config())).unwrap();
    let out = sb.run(&["stop"]);
    assert_eq!(out.status.code(), Some(6), "{}", text_of(&out));
    assert!(w.child.try_wait().unwrap().is_none(), "still running");
    fs::write(record_of_path(&sb.config()), record).unwrap();
    let out = sb.run(&["stop", "--timeout", "10s"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert!(w.wait_exit(Duration::from_secs(10)).success());
}

/// The whole state_dir removed under a running worker (its pidfile and status socket with it; a
/// careless clean-up): `status` said "not running" (3), and a script's `status || start` started
/// a second worker on the same source, while `stop` could not reach it. Root's record of the
/// worker's pid, with its start time (a pid reused later is not it), makes that "unknown" (4),
/// naming the pid; `start` refuses, and `stop` stops it.
#[test]
fn a_state_dir_removed_under_the_worker_never_reads_as_not_running() {
    let name = "a_state_dir_removed_under_the_worker_never_reads_as_not_running";
    if !nix::unistd::geteuid().is_root() {
        return skip(name, "root (only root's record of a worker is trusted)");
    }
    let sb = Sandbox::new("op-state-gone");
    let mut w = sb.start();
    let pid = w.pid();
    fs::remove_dir_all(sb.path("state")).unwrap();
    for cmd in [&["status"][..], &["reload"], &["start"]] {
        let out = sb.run(cmd);
        let code = if cmd == ["start"] { 1 } else { 4 };
        assert_eq!(out.status.code(), Some(code), "{cmd:?}: {}", text_of(&out));
        assert!(
            text(&out.stderr).contains(&format!("pid {pid}"))
                && text(&out.stderr).contains("gearshift stop"),
            "{cmd:?}: {}",
            text_of(&out)
        );
    }
    assert!(
        w.child.try_wait().unwrap().is_none(),
        "still running, untouched"
    );
    let out = sb.run(&["stop", "--timeout", "10s"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert!(
        text(&out.stdout).contains(&format!("stopped (pid {pid})")),
        "{}",
        text_of(&out)
    );
    assert!(w.wait_exit(Duration::from_secs(10)).success());
    assert_eq!(sb.run(&["status"]).status.code(), Some(3));
}

/// The same for a worker its own user runs, without root: the record is kept in that user's
/// `$XDG_RUNTIME_DIR` (as systemd's `/run/user/UID`), where only root's was kept before, and
/// `status` said "not running" (3) of the worker, `start` started a second one beside it.
#[test]
fn a_state_dir_removed_under_a_users_own_worker_never_reads_as_not_running() {
    let name = "a_state_dir_removed_under_a_users_own_worker_never_reads_as_not_running";
    if !nix::unistd::geteuid().is_root() {
        return skip(name, "root (to run the worker and the CLI as nobody)");
    }
    use std::os::unix::fs::PermissionsExt;
    let mut sb = Sandbox::new("op-state-gone-user");
    // A copy nobody may run wherever the checkout is (a CI clone's directory is 0700).
    sb.own_binary();
    let run = sb.path("run");
    fs::create_dir(&run).unwrap();
    fs::set_permissions(&run, fs::Permissions::from_mode(0o700)).unwrap();
    let [uid, gid] = sb.give_to_nobody();
    let xdg = format!("XDG_RUNTIME_DIR={}", run.display());
    let user = ["setpriv", &uid, &gid, "--clear-groups", "env", &xdg];
    let mut w = sb.start_under(&user, "true");
    eventually(Duration::from_secs(20), "the worker to serve", || {
        w.try_status().is_some()
    });
    let pid = w.pid();
    fs::remove_dir_all(sb.path("state")).unwrap();
    for cmd in [&["status"][..], &["reload"], &["start"]] {
        let out = sb.run_under(&user, cmd);
        let code = if cmd == ["start"] { 1 } else { 4 };
        assert_eq!(out.status.code(), Some(code), "{cmd:?}: {}", text_of(&out));
        assert!(
            text(&out.stderr).contains(&format!("pid {pid}")),
            "{cmd:?}: {}",
            text_of(&out)
        );
    }
    let out = sb.run_under(&user, &["stop", "--timeout", "10s"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert!(w.wait_exit(Duration::from_secs(10)).success());
    assert_eq!(sb.run_under(&user, &["status"]).status.code(), Some(3));
}

/// `check` run by a user who cannot switch to the config's `[worker] user` (a build machine's
/// CI user linting a production config) names the line of `user`, as every config error does,
/// and the option that checks the file alone.
#[test]
fn check_by_another_user_names_the_user_line_and_the_config_only_check() {
    let name = "check_by_another_user_names_the_user_line_and_the_config_only_check";
    if !nix::unistd::geteuid().is_root() {
        return skip(name, "root (to run the CLI as nobody)");
    }
    let mut sb = Sandbox::new("op-check-other-user");
    sb.own_binary();
    fs::write(
        sb.config(),
        "[worker]\njobs_dir = \"jobs\"\nstate_dir = \"state\"\nuser = \"daemon\"\n",
    )
    .unwrap();
    let [uid, gid] = sb.give_to_nobody();
    let user = ["setpriv", &uid, &gid, "--clear-groups"];
    let out = sb.run_under(&user, &["check"]);
    let said = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
    assert!(
        said.contains("config.toml:4:8: cannot switch to user \"daemon\": not started as root"),
        "{said}"
    );
    assert!(said.contains("check --config-only"), "{said}");
    let out = sb.run_under(&user, &["check", "--config-only"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
}

/// A server whose host takes no connection (its SYNs dropped: a firewall, a full accept queue,
/// a host gone) fails each connect only at `io_timeout`, and the next try begins soon after:
/// `status` said "running" while a try was under way, most of the time, and "no server
/// reachable" only between tries. A server that has failed and is being tried again is still
/// unreachable until it answers.
#[test]
fn a_server_tried_again_after_failing_is_still_unreachable() {
    use std::os::fd::AsRawFd;
    let sb = Sandbox::new("op-syn-dropped");
    // A listener with an accept queue of one, filled and never accepted: the kernel drops
    // every SYN after it.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: listen(2) on a socket this test owns, to shorten its queue.
    assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
    let addr = listener.local_addr().unwrap();
    let _filler = std::net::TcpStream::connect(addr).unwrap();
    sb.gearman_config(
        &[addr.to_string()],
        "io_timeout = \"1s\"\nreconnect_max = \"200ms\"\n",
    );
    let w = sb.start();
    // Once every lane's first try has failed (each lane connects on its own)...
    w.wait_for(
        Duration::from_secs(10),
        "every lane's first try failed",
        |s| s["state"] == "no server reachable",
    );
    let mut said = Vec::new();
    for _ in 0..20 {
        said.push(w.status()["state"].as_str().unwrap_or("").to_string());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(said.iter().all(|s| s == "no server reachable"), "{said:?}");
}

/// One meaning per exit code, for every command (the table is in README and every --help).
#[test]
fn exit_codes_have_one_meaning_each() {
    let sb = Sandbox::new("op-codes");
    // 3: not running.
    assert_eq!(sb.run(&["status"]).status.code(), Some(3));
    assert_eq!(sb.run(&["reload"]).status.code(), Some(3));
    // 2: unknown id; 5: not finished yet.
    assert_eq!(sb.run(&["result", "0123abcd"]).status.code(), Some(2));
    let id = sb.submit("echo", "x");
    assert_eq!(sb.run(&["result", &id]).status.code(), Some(5));
    let mut w = sb.start();
    all_outcomes(&sb, std::slice::from_ref(&id), Duration::from_secs(10));
    assert_eq!(sb.run(&["result", &id]).status.code(), Some(0));
    // 1: a refused reload (a job runs meanwhile).
    sb.submit("sleep", "5000");
    w.wait_for(Duration::from_secs(10), "the job", |s| s["in_flight"] == 1);
    let good = fs::read_to_string(sb.config()).unwrap();
    fs::write(sb.config(), "[worker]\nconcurrency = 0\n").unwrap();
    let out = sb.run(&["reload", "--timeout", "10s"]);
    assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
    fs::write(sb.config(), good).unwrap();
    // 5: no new generation within reload's timeout; still running after stop's.
    let out = sb.run(&["reload", "--timeout", "300ms"]);
    assert_eq!(out.status.code(), Some(5), "{}", text_of(&out));
    let out = sb.run(&["stop", "--timeout", "300ms"]);
    assert_eq!(out.status.code(), Some(5), "{}", text_of(&out));
    // 6: could not act (the config cannot be read at all).
    let out = std::process::Command::new(BIN)
        .args(["-c", "/nonexistent/config.toml", "stop"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(6), "{}", text_of(&out));
    // 2: bad arguments (clap's, and a function name no gearshift worker can serve).
    assert_eq!(
        sb.run(&["stop", "--timeout", "soon"]).status.code(),
        Some(2)
    );
    // Numbers a load run could not mean (a typo's 2^64 copies filled the disk until stopped).
    for args in [
        &["submit", "--count", "0", "echo", "x"][..],
        &["submit", "--count", "18446744073709551615", "echo", "x"],
        &[
            "submit",
            "--count",
            "1000",
            "--concurrency",
            "100000",
            "echo",
            "x",
        ],
    ] {
        let out = sb.run(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text_of(&out));
    }
    for name in ["", "a b", "../x"] {
        let out = sb.run(&["submit", name, "x"]);
        assert_eq!(out.status.code(), Some(2), "{name:?}: {}", text_of(&out));
        assert!(
            text(&out.stderr).contains("invalid function name"),
            "{}",
            text_of(&out)
        );
    }
    for cmd in [
        "stop", "status", "submit", "result", "reload", "top", "check",
    ] {
        let out = sb.run(&[cmd, "--help"]);
        assert!(
            text(&out.stdout).contains("Exit codes: 0 done; 1 refused or failed"),
            "{cmd} --help: {}",
            text(&out.stdout)
        );
    }
    w.signal(nix::sys::signal::Signal::SIGTERM);
    w.signal(nix::sys::signal::Signal::SIGTERM);
    w.wait_exit(Duration::from_secs(10));
}

/// `status` says what is wrong in its state: every gearmand unreachable is "running, no server
/// reachable" (exit 0: it runs; documented), and the human form shows what JSON shows: running
/// jobs, a pending restart, the program's own name.
#[test]
fn status_says_no_server_reachable_and_shows_jobs_and_a_pending_restart() {
    let sb = Sandbox::new("op-unreachable");
    let port = free_port();
    sb.gearman_config(
        &[format!("127.0.0.1:{port}")],
        "reconnect_max = \"200ms\"\n",
    );
    let w = sb.start();
    w.wait_for(Duration::from_secs(10), "unreachable", |s| {
        s["state"] == "no server reachable"
    });
    let out = sb.run(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert!(
        text(&out.stdout).starts_with("gearshift is running, no server reachable (pid"),
        "{}",
        text_of(&out)
    );
    drop(w);

    let mut sb = Sandbox::new("op-human");
    sb.bin = example("custom_worker");
    sb.write_worker_config("restart_splay = \"1h\"");
    let w = sb.start();
    let id = sb.submit("sleep", "3000");
    w.wait_for(Duration::from_secs(10), "the job", |s| s["in_flight"] == 1);
    let cfg = fs::read_to_string(sb.config()).unwrap();
    fs::write(sb.config(), format!("{cfg}\n# touched\n")).unwrap();
    w.wait_for(Duration::from_secs(10), "pending", |s| {
        s["restart_pending"].is_object()
    });
    let out = sb.run(&["status"]);
    let said = text(&out.stdout);
    assert!(said.starts_with("custom-worker is running"), "{said}");
    assert!(
        said.contains(&format!("lane 0: {id} (sleep)"))
            || said.contains(&format!("lane 1: {id} (sleep)")),
        "{said}"
    );
    assert!(said.contains("restart pending (config changed)"), "{said}");
}

/// A second plain `stop` (while a first one waits for the running job) means "exit now": it
/// names the jobs that will run again, as `--force` does.
#[test]
fn a_second_stop_names_the_jobs_that_will_run_again() {
    let sb = Sandbox::new("op-second-stop");
    let mut w = sb.start();
    let id = sb.submit("sleep", "30000");
    w.wait_for(Duration::from_secs(10), "the job", |s| s["in_flight"] == 1);
    let mut first = spawn(
        sb.cmd(&["stop"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped()),
    );
    w.wait_for(Duration::from_secs(10), "stopping", |s| {
        s["state"] == "stopping"
    });
    let out = sb.run(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let said = text(&out.stdout);
    assert!(
        said.contains("will run again") && said.contains(&id),
        "{said}"
    );
    w.wait_exit(Duration::from_secs(5));
    wait_child(&mut first, Duration::from_secs(10)).expect("the first stop returns");
}

/// `submit --count` (Gearman load mode) honours `--timeout`, `--priority` and `--unique`; and a
/// foreground `--timeout` says what the server knows of the job (running on a worker, or
/// queued with nobody to take it), not a guess.
#[test]
fn gearman_submit_options_hold_in_load_mode_and_timeouts_say_what_is_known() {
    let sb = Sandbox::new("op-load");
    let gm = Gearmand::start(&sb.dir, &[]);
    sb.gearman_config(&[gm.addr()], "");
    let started = std::time::Instant::now();
    let out = sb.run(&[
        "submit",
        "--count",
        "3",
        "--timeout",
        "1s",
        "nobody_does_this",
        "x",
    ]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(out.status.code(), Some(5), "{}", text_of(&out));
    assert!(
        text(&out.stdout).contains("3 not finished within --timeout"),
        "{}",
        text_of(&out)
    );

    let out = sb.run(&[
        "submit",
        "--count",
        "2",
        "--background",
        "--priority",
        "high",
        "--unique",
        "abc",
        "queued_only",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let port = gm.port.to_string();
    let admin = |arg: &str| {
        text(
            &std::process::Command::new("gearadmin")
                .args(["-p", &port, arg])
                .output()
                .unwrap()
                .stdout,
        )
    };
    assert!(
        admin("--priority-status").contains("queued_only\t2\t0\t0"),
        "{}",
        admin("--priority-status")
    );
    let uniques = admin("--show-unique-jobs");
    assert!(
        uniques.contains("abc-0-0") && uniques.contains("abc-0-1"),
        "{uniques}"
    );

    let out = sb.run(&["submit", "--timeout", "1s", "nobody_does_this", "x"]);
    assert_eq!(out.status.code(), Some(5), "{}", text_of(&out));
    assert!(
        text(&out.stderr).contains("no worker took it"),
        "{}",
        text_of(&out)
    );
    let _w = sb.start();
    let out = sb.run(&["submit", "--timeout", "1s", "sleep", "3000"]);
    assert_eq!(out.status.code(), Some(5), "{}", text_of(&out));
    assert!(
        text(&out.stderr).contains("is running on a worker"),
        "{}",
        text_of(&out)
    );
}

/// `check` finds everything `start` would reject, naming the key.
#[test]
fn check_finds_what_start_would_reject() {
    let sb = Sandbox::new("op-check");
    let base = sb.config_text("");
    let gearman = |servers: &str, extra: &str| {
        format!(
            "[worker]\nallow_root = true\n\n[source]\nkind = \"gearman\"\nservers = [{servers}]\n{extra}"
        )
    };
    let cases: Vec<(String, &str)> = vec![
        (
            base.replace("state_dir = \"state\"", "state_dir = \"/proc/gearshift\""),
            "[worker] state_dir \"/proc/gearshift\" is on a pseudo file system",
        ),
        (
            base.replace("dir = \"spool\"", "dir = \"/sys/gearshift-spool\""),
            "[source] dir \"/sys/gearshift-spool\" is on a pseudo file system",
        ),
        (
            format!("{base}[log]\nfile = \"/nonexistent/dir/gearshift.log\"\n"),
            "[log] file \"/nonexistent/dir/gearshift.log\": its directory",
        ),
        (
            gearman("\"http://127.0.0.1:4730\"", ""),
            "is no scheme gearshift speaks",
        ),
        (
            gearman("\"tsl://127.0.0.1:4730\"", ""),
            "\"tsl://\" is no scheme",
        ),
        (
            gearman("\"127.0.0.1:4730\", \"127.0.0.1:4730\"", ""),
            "is listed twice",
        ),
        (
            gearman("\"127.0.0.1:4730\"", "client_id = \"my worker\"\n"),
            ":7:13: [source] client_id \"my worker\" must be",
        ),
        // Root as the user to drop to, or root's group for every job: no privilege drop
        // (`run` refused the first only after it had started; `check` said ok to both).
        (
            base.replace("allow_root = true", "user = \"root\""),
            ":5:8: [worker] user \"root\" is uid 0",
        ),
        (
            base.replace("allow_root = true", "user = \"nobody\"\ngroup = \"root\""),
            ":6:9: [worker] group \"root\" is gid 0",
        ),
    ];
    for (config, want) in cases {
        fs::write(sb.config(), &config).unwrap();
        let out = sb.run(&["check"]);
        assert_eq!(out.status.code(), Some(1), "{config}\n{}", text_of(&out));
        assert!(
            text(&out.stderr).contains(want),
            "{want:?} not in {}",
            text_of(&out)
        );
        let out = sb.run(&["start"]);
        assert_eq!(
            out.status.code(),
            Some(1),
            "start: {config}\n{}",
            text_of(&out)
        );
        assert!(
            text(&out.stderr).contains(want),
            "start: {want:?} not in {}",
            text_of(&out)
        );
    }
}

/// A `[functions.NAME]` table for a function nobody serves is a warning (a typo's timeout
/// would never apply), with the name it was most likely meant to be; many are said at once.
#[test]
fn a_timeout_for_no_known_function_says_which_was_meant() {
    let sb = Sandbox::new("op-unknown-timeout");
    sb.job("resize.sh", "#!/bin/sh\ncat\n");
    sb.write_config("[functions.reverze]\ntimeout = \"1s\"\n");
    let out = sb.run(&["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert!(
        text(&out.stderr).contains(
            "[functions.reverze] names no known function (did you mean [functions.reverse]?)"
        ),
        "{}",
        text_of(&out)
    );
    sb.write_config("[functions.resise]\ntimeout = \"1s\"\n[functions.zzz]\ntimeout = \"2s\"\n");
    let out = sb.run(&["check"]);
    assert!(
        text(&out.stderr).contains(
            "[functions.resise] (did you mean [functions.resize]?), [functions.zzz] name no known function"
        ),
        "{}",
        text_of(&out)
    );
}

/// The paper cuts of the first week (issue 19, item 12): each message says what to do.
#[test]
fn messages_say_what_is_wrong_and_where() {
    let sb = Sandbox::new("op-msgs");
    // GEARSHIFT_LOG with no level in it.
    let out = sb
        .cmd(&["status"])
        .env("GEARSHIFT_LOG", "bogus")
        .output()
        .unwrap();
    assert!(
        text(&out.stderr).contains("GEARSHIFT_LOG: \"bogus\" is not a level"),
        "{}",
        text_of(&out)
    );
    // Types in TOML words; positions for umask and group.
    let cases = [
        (
            "max_jobs = \"2\"",
            "expected a whole number (written without quotes)",
        ),
        ("umask = \"999\"", ":6:9: [worker] umask \"999\""),
        // The owner's own bits masked: the worker could not use the spool it makes (it failed
        // at start with "opening directory .../spool/tmp: Permission denied").
        (
            "umask = \"777\"",
            ":6:9: [worker] umask \"777\" takes the worker's own permissions",
        ),
        (
            "umask = \"0200\"",
            ":6:9: [worker] umask \"0200\" takes the worker's own permissions",
        ),
        // A YAML habit, and a line that is no key at all: what TOML wants, not only what the
        // parser expected next.
        (
            "max_jobs: 2",
            ":6:9: expected `.`, `=` (`key: value` is YAML; TOML writes `key = value`)",
        ),
        (
            "max jobs = 2",
            ":6:5: expected `.`, `=` (TOML writes a key and its value as `key = value`, one to a line)",
        ),
        // A value TOML cannot read: the parser said "invalid string; expected `\"`, `'`" for
        // each of these, which names none of the mistakes.
        (
            "jobs_dir = jobs",
            ":6:12: `jobs` is no TOML value: a string is written in quotes (\"jobs\"); numbers, true and false without",
        ),
        (
            "max_jobs == 2",
            ":6:11: one `=` between a key and its value (`key = value`)",
        ),
        (
            "max_jobs =\nmax_age = \"1h\"",
            ":6:11: a value is missing after `=`",
        ),
        (
            "max_jobs = # later",
            ":6:12: a value is missing after `=`",
        ),
        (
            "jobs_dir = \"jobs",
            ":6:17: the string's closing `\"` is missing (a string ends on its line; `\"\"\"` begins one over several lines)",
        ),
        (
            "jobs_dir = 'jobs",
            ":6:17: the string's closing `'` is missing (a string ends on its line; `'''` begins one over several lines)",
        ),
        // A list's mistakes: the parser said "invalid array; expected `]`" for each, and
        // "expected newline, `#`" for a second value or a key after a table header.
        (
            "bind = [a, \"b\"]",
            ":6:9: `a` is no TOML value: a string is written in quotes (\"a\")",
        ),
        (
            "bind = [\"a\" \"b\"]",
            ":6:13: a comma is missing between a list's items: [\"a\", \"b\"]",
        ),
        (
            "bind = [\"a\"\nmax_age = \"1h\"",
            ":7:1: the list's closing `]` is missing before this line",
        ),
        (
            "max_jobs = 2 3",
            ":6:14: one value to a key, then the line ends (or a `#` comment begins); several values are a list in brackets: [2, 3]",
        ),
        (
            "[extra] a = 1",
            ":6:9: a table header stands alone on its line: what follows it goes on the next",
        ),
    ];
    for (line, want) in cases {
        fs::write(
            sb.config(),
            sb.config_text("")
                .replace("allow_root = true", &format!("allow_root = true\n{line}")),
        )
        .unwrap();
        let out = sb.run(&["check"]);
        assert!(
            text(&out.stderr).contains(want),
            "{want:?}: {}",
            text_of(&out)
        );
    }
    fs::write(
        sb.config(),
        sb.config_text("").replace(
            "allow_root = true",
            "user = \"nobody\"\ngroup = \"no_such_group_here\"",
        ),
    )
    .unwrap();
    let out = sb.run(&["check"]);
    assert!(
        text(&out.stderr).contains(":6:9: [worker] group \"no_such_group_here\" does not exist"),
        "{}",
        text_of(&out)
    );

    // state_dir made by `run` is 0755 whatever the umask; JSON durations carry no float noise.
    sb.write_config("[log]\nformat = \"json\"\njobs = true\n");
    let w = sb.start();
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(sb.path("state")).unwrap().permissions().mode() & 0o7777,
        0o755
    );
    let id = sb.submit("echo", "x");
    all_outcomes(&sb, std::slice::from_ref(&id), Duration::from_secs(10));
    eventually(Duration::from_secs(5), "the job line", || {
        w.log_text().contains(&id)
    });
    let line = w
        .log_text()
        .lines()
        .find(|l| l.contains(&id) && l.contains("duration_ms"))
        .unwrap()
        .to_string();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    let ms = v["duration_ms"].to_string();
    assert!(ms.split('.').nth(1).is_none_or(|d| d.len() <= 3), "{ms}");

    // A refused reload is forgotten once the file is back as it runs.
    let good = fs::read_to_string(sb.config()).unwrap();
    fs::write(sb.config(), "[worker]\nconcurrency = 0\n").unwrap();
    w.wait_for(Duration::from_secs(10), "the refusal", |s| {
        s["last_refused_reload"].is_object()
    });
    fs::write(sb.config(), &good).unwrap();
    w.wait_for(Duration::from_secs(10), "the refusal forgotten", |s| {
        s["last_refused_reload"].is_null()
    });

    // A HUP folded into a restart under way says so.
    sb.submit("sleep", "1000");
    w.wait_for(Duration::from_secs(10), "the job", |s| s["in_flight"] == 1);
    w.signal(nix::sys::signal::Signal::SIGHUP);
    w.wait_for(Duration::from_secs(10), "draining", |s| {
        s["state"] == "draining"
    });
    w.signal(nix::sys::signal::Signal::SIGHUP);
    eventually(Duration::from_secs(5), "the folded HUP", || {
        w.log_text().contains("folded into it")
    });

    // An unknown id may be an expired one: say both.
    let out = sb.run(&["result", "0123abcd-1-1"]);
    assert!(
        text(&out.stderr)
            .contains("or its result expired (results are kept for retain_results = 7d"),
        "{}",
        text_of(&out)
    );
}

/// A server taken out of the config leaves no metric series behind after the reload.
/// A payload read from standard input is read only up to `max_payload_bytes`: an endless or
/// huge input (`yes | gearshift submit f`, a wrong file piped in) is refused at once, with the
/// limit, instead of being read into memory until the input ends or memory runs out (it ran
/// until killed, growing). Nothing is queued.
#[test]
fn an_endless_payload_on_stdin_is_refused_at_the_limit() {
    let sb = Sandbox::new("op-stdin");
    sb.write_worker_config("max_payload_bytes = 1000");
    let mut yes = spawn(Command::new("yes").stdout(Stdio::piped()));
    let mut child = spawn(
        sb.cmd(&["submit", "echo"])
            .stdin(Stdio::from(yes.stdout.take().unwrap()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let status = wait_child(&mut child, Duration::from_secs(20));
    let _ = child.kill();
    let _ = yes.kill();
    let _ = yes.wait();
    let out = child.wait_with_output().unwrap();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{}", text_of(&out));
    assert!(
        text(&out.stderr).contains("over max_payload_bytes (1000)"),
        "{}",
        text_of(&out)
    );
    let queued = fs::read_dir(sb.path("spool/new")).map_or(0, |d| d.count());
    assert_eq!(queued, 0);
}

/// Every lane keeps a connection to every gearmand: `check` (and the start's log and `status`)
/// warns when lanes x servers connections cannot fit the descriptor limit beside what the lanes'
/// jobs need. Before, such a config was "ok" and the lanes then failed their connects with
/// EMFILE, one by one, in the log.
#[test]
fn check_warns_when_the_lanes_connections_cannot_fit_the_descriptor_limit() {
    let sb = Sandbox::new("op-fds");
    let check = |servers: usize, lanes: usize| {
        let list: Vec<String> = (0..servers)
            .map(|i| format!("\"127.0.0.1:{}\"", 20_000 + i))
            .collect();
        fs::write(
            sb.config(),
            format!(
                "[worker]\nallow_root = true\nconcurrency = {lanes}\n\n[source]\nkind = \"gearman\"\nservers = [{}]\n",
                list.join(", ")
            ),
        )
        .unwrap();
        let script = format!(
            "ulimit -n 1024 && exec \"{}\" -c \"{}\" check",
            sb.bin.display(),
            sb.config().display()
        );
        Command::new("sh").args(["-c", &script]).output().unwrap()
    };
    let out = check(100, 16);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert!(
        text(&out.stderr).contains("100 server(s) x 16 lane(s) = 1600 connections"),
        "{}",
        text_of(&out)
    );
    let out = check(2, 4);
    assert!(
        !text(&out.stderr).contains("connections"),
        "{}",
        text_of(&out)
    );
}

#[test]
fn a_removed_server_leaves_no_metric_series() {
    let sb = Sandbox::new("op-series");
    let gm = Gearmand::start(&sb.dir, &[]);
    let dead = format!("127.0.0.1:{}", free_port());
    sb.gearman_config(&[gm.addr(), dead.clone()], "reconnect_max = \"200ms\"\n");
    let w = sb.start();
    w.wait_for(Duration::from_secs(10), "both tried", |s| {
        s["servers"].as_array().is_some_and(|v| v.len() == 2)
    });
    eventually(Duration::from_secs(10), "a reconnect counted", || {
        text(&sb.run(&["metrics"]).stdout).contains(&format!(
            "gearshift_gearman_reconnects_total{{server=\"{dead}\"}}"
        ))
    });
    sb.gearman_config(&[gm.addr()], "reconnect_max = \"200ms\"\n");
    w.wait_generation(2);
    let metrics = text(&sb.run(&["metrics"]).stdout);
    assert!(!metrics.contains(&dead), "{metrics}");
    // Gearman's connections by the states a Gearman server can be in (AMQP's alarm, refusal
    // and failover states are not written for it).
    let states: Vec<&str> = (metrics.lines())
        .filter(|l| l.starts_with("gearshift_gearman_connections{"))
        .filter_map(|l| l.split("state=\"").nth(1)?.split('"').next())
        .collect();
    assert_eq!(
        states,
        ["connected", "connecting", "backing_off"],
        "{metrics}"
    );
}

/// A worker stopped by SIGSTOP (Ctrl-Z at the terminal of a `run`, a debugger, a `kill -STOP`
/// meant for another pid) acts on no signal: `stop` sent TERM and then waited out its whole
/// `--timeout` (10 minutes by default) without a word, `reload` waited out its own and blamed
/// running jobs, and `status` said only that the socket gave no answer. Now `stop` continues
/// it after the TERM, as systemd does, and says so; `reload` and `status` say at once that it
/// is stopped and how to continue it, so do `metrics` and `reopen-logs`, and a `submit --wait`
/// says so after 2 s.
#[test]
fn a_stopped_worker_is_said_and_stop_still_ends_it() {
    let sb = Sandbox::new("sigstop");
    sb.write_config("");
    let mut w = sb.start();
    w.wait_for(Duration::from_secs(20), "serving", |s| {
        s["state"] == "running"
    });
    w.signal(nix::sys::signal::Signal::SIGSTOP);
    eventually(Duration::from_secs(5), "the worker stopped", || {
        fs::read_to_string(format!("/proc/{}/stat", w.pid())).is_ok_and(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('T'))
        })
    });
    let out = sb.run(&["status"]);
    let text =
        String::from_utf8_lossy(&out.stderr).to_string() + &String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("is stopped") && text.contains("kill -CONT"),
        "{text}"
    );
    // `status --json` says it too, as JSON (it printed nothing on stdout, exit 0: a monitor
    // reading it had no document to read).
    let out = sb.run(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    assert_eq!(
        (&doc["running"], &doc["state"], &doc["pid"]),
        (&true.into(), &"stopped".into(), &w.pid().into()),
        "{}",
        text_of(&out)
    );
    assert!(
        doc["why"]
            .as_str()
            .is_some_and(|w| w.contains("kill -CONT")),
        "{doc}"
    );
    // `metrics` says so at once (it waited 3 s and said "gave no answer", exit 6), and
    // `reopen-logs` that the reopening waits until it is continued (it said "asked", no more).
    let out = sb.run(&["metrics"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert!(
        err.contains("is stopped") && err.contains("kill -CONT"),
        "{err}"
    );
    let out = sb.run(&["reopen-logs"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        err.contains("is stopped") && err.contains("kill -CONT"),
        "{err}"
    );
    // A `submit --wait` meanwhile says why its job does not run (it waited without a word).
    let out = sb.run(&["submit", "--wait", "--timeout", "4s", "echo", "x"]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is stopped") && err.contains("kill -CONT"),
        "{err}"
    );
    let started = std::time::Instant::now();
    let out = sb.run(&["reload", "--timeout", "60s"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{out:?}");
    assert!(
        err.contains("is stopped") && err.contains("kill -CONT"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "reload took {:?}",
        started.elapsed()
    );
    let started = std::time::Instant::now();
    let out = sb.run(&["stop", "--timeout", "60s"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("was stopped"),
        "{out:?}"
    );
    // Within the bound a second TERM has: `stop` first spent 3 s asking the stopped worker's
    // socket whether it was already stopping, a question it cannot answer until continued.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "stop took {:?}",
        started.elapsed()
    );
    assert!(
        w.wait_exit(Duration::from_secs(10)).success(),
        "{}",
        w.log_text()
    );
}

/// A Rust function that runs past its timeout (it ignores `job.deadline()`; the worker cannot
/// end a function on its thread): `status` said only "lane 1: ID (slow) for 6.0s", and a
/// `reload` or `stop` held by it "no new generation after 3s (jobs still running?)". Now both
/// name the job, say how far past its timeout it is and what can end the wait.
#[test]
fn a_rust_function_past_its_timeout_is_said_with_what_ends_the_wait() {
    let mut sb = Sandbox::new("overdue");
    sb.bin = example("custom_worker");
    sb.write_config("[functions.slow]\ntimeout = \"1s\"\n");
    let w = sb.start();
    let id = sb.submit("slow", "30000");
    w.wait_for(Duration::from_secs(10), "the job running", |s| {
        s["running_jobs"][0]["running_ms"].as_u64() >= Some(2500)
    });
    let status = sb.run(&["status"]);
    let said = text(&status.stdout);
    assert!(
        said.contains(&id)
            && said.contains("past its 1s timeout")
            && said.contains("job.deadline()"),
        "{said}"
    );
    assert_eq!(w.status()["running_jobs"][0]["timeout_ms"], 1000);
    let reload = sb.run(&["reload", "--timeout", "1s"]);
    assert_eq!(reload.status.code(), Some(5));
    let said = text(&reload.stderr);
    assert!(
        said.contains(&id) && said.contains("slow") && said.contains("past its 1s timeout"),
        "{said}"
    );
    let stop = sb.run(&["stop", "--timeout", "2s"]);
    assert_eq!(stop.status.code(), Some(5));
    let said = format!("{}{}", text(&stop.stdout), text(&stop.stderr));
    assert!(
        said.contains(&id)
            && said.contains("past its 1s timeout")
            && said.contains("second `stop`"),
        "{said}"
    );
    // The second stop ends it now (the job runs again after a start).
    assert_eq!(sb.run(&["stop", "--timeout", "10s"]).status.code(), Some(0));
}

/// A worker of `sb` sent a TERM while a job of `ms` runs: stopping once that job ends.
fn stopping_worker(sb: &Sandbox, ms: u32) -> Worker {
    let w = sb.start();
    sb.submit("sleep", &ms.to_string());
    w.wait_for(Duration::from_secs(10), "the job running", |s| {
        s["in_flight"] == 1
    });
    w.signal(nix::sys::signal::Signal::SIGTERM);
    w.wait_for(Duration::from_secs(10), "stopping", |s| {
        s["state"] == "stopping"
    });
    w
}

/// A `reload` while the worker stops (a TERM sent, its running jobs finishing): the HUP was
/// taken without a word, and `reload` waited for a new generation that could not come until
/// the worker exited (the whole drain: a deploy script held as long), then said "exited before
/// a new generation served". Now it says at once that the worker is stopping, and exits 1.
#[test]
fn a_reload_while_the_worker_stops_says_so_at_once() {
    let sb = Sandbox::new("reload-stopping");
    let mut w = stopping_worker(&sb, 6000);
    let started = std::time::Instant::now();
    let out = sb.run(&["reload", "--timeout", "30s"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
    assert!(err.contains("stopping"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "reload took {:?}",
        started.elapsed()
    );
    assert!(w.wait_exit(Duration::from_secs(20)).success());
}

/// `submit --wait` while the worker stops (its running jobs finishing, claiming nothing new):
/// it waited the whole drain, then 2 s more, before it said that no worker runs. Now it says
/// at once (after the same 2 s of patience) that the worker is stopping and the job runs when
/// one starts, and exits 3; the job stays queued and runs after the next start.
#[test]
fn submit_wait_while_the_worker_stops_says_so_at_once() {
    let sb = Sandbox::new("submit-stopping");
    let mut w = stopping_worker(&sb, 8000);
    let started = std::time::Instant::now();
    let out = sb.run(&["submit", "--wait", "echo", "later"]);
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{}", text_of(&out));
    assert!(err.contains("is stopping"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "submit --wait took {:?}",
        started.elapsed()
    );
    let id = err.lines().next().unwrap().trim().to_string();
    assert!(w.wait_exit(Duration::from_secs(20)).success());
    let _again = sb.start();
    let out = all_outcomes(&sb, &[id], Duration::from_secs(10));
    assert_eq!(out[0], (true, "later".to_string(), 1));
}

/// `restart` with a config the new worker would refuse (a typo being edited in, a deploy's
/// half-written file): the running worker was stopped first, and then nothing could start, so
/// one command left no worker at all (reproduced: "stopped (pid N)", then the parse error, and
/// `status` said "not running"). Now the config and `jobs_dir` are checked first, as `check`
/// does, and the running worker is left as it is.
fn status_json(sb: &Sandbox) -> serde_json::Value {
    let out = sb.run(&["status", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

#[test]
fn a_restart_with_an_invalid_config_leaves_the_worker_running() {
    let sb = started("restart-invalid");
    let pid = status_json(&sb)["pid"].as_i64().unwrap();
    let good = fs::read_to_string(sb.config()).unwrap();
    let bad = format!("{good}\n[worker]\nconcurrency = \"two\"\n");
    restart_refuses(&sb, &bad, "config.toml:");
    let out = sb.run(&["restart"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert_ne!(status_json(&sb)["pid"].as_i64(), Some(pid));
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// A sandbox with its config written and a worker started in it by `gearshift start`.
fn started(name: &str) -> Sandbox {
    let sb = Sandbox::new(name);
    sb.write_config("");
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    sb
}

/// Writes `bad` over the running worker's config: `restart` refuses it, saying `said`, and
/// leaves that worker running. The config is written back as it was.
fn restart_refuses(sb: &Sandbox, bad: &str, said: &str) {
    let pid = status_json(sb)["pid"].as_i64().unwrap();
    let good = fs::read_to_string(sb.config()).unwrap();
    fs::write(sb.config(), bad).unwrap();
    let out = sb.run(&["restart"]);
    assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
    let err = text(&out.stderr);
    assert!(err.contains(said) && err.contains("not restarted"), "{err}");
    assert_eq!(
        status_json(sb)["pid"].as_i64(),
        Some(pid),
        "the worker still runs"
    );
    fs::write(sb.config(), good).unwrap();
}

/// The wall clock stepped forward an hour while a job ran (an NTP step after a VM was paused,
/// an operator's `date -s`): `status` said the job had run an hour and was far past its
/// timeout (a Rust function "nothing ends"), and a restart waiting for it would get no
/// extension from systemd. A job's running time is now the monotonic clock's.
#[test]
fn a_wall_clock_step_does_not_age_a_running_job() {
    let sb = Sandbox::new("clock-step");
    sb.write_config("[functions.sleep]\ntimeout = \"30s\"\n");
    let (w, shift) = start_with_shifted_clock(&sb);
    sb.submit("sleep", "4000");
    w.wait_for(Duration::from_secs(10), "the job running", |s| {
        s["in_flight"] == 1
    });
    fs::write(&shift, "3600").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let s = w.status();
    let ms = s["running_jobs"][0]["running_ms"].as_u64().unwrap();
    assert!(
        ms < 10_000,
        "running for {ms} ms after a step of the wall clock: {s}"
    );
    let said = text(&sb.run(&["status"]).stdout);
    assert!(!said.contains("past its"), "{said}");
}

/// `restart --timeout` shorter than a running job: the TERM is sent, the worker stops once the
/// job finishes, and nothing starts after it. `restart` said only what `stop` says ("--force
/// kills it"), and nothing of the worker it did not start; running `restart` again (the obvious
/// next step) sends a second TERM, which ends the job at once. Now it says it did not restart,
/// that nothing starts after the stop, and that another stop or restart would end the jobs.
#[test]
fn a_restart_whose_stop_times_out_says_nothing_starts_after_it() {
    let sb = started("restart-slow-stop");
    let id = sb.submit("sleep", "4000");
    eventually(Duration::from_secs(10), "the job running", || {
        status_json(&sb)["in_flight"] == 1
    });
    let out = sb.run(&["restart", "--timeout", "1s"]);
    assert_eq!(out.status.code(), Some(5), "{}", text_of(&out));
    let said = text(&out.stderr);
    assert!(
        said.contains("not restarted")
            && said.contains("nothing starts after it")
            && said.contains("gearshift start"),
        "{said}"
    );
    // The job is not interrupted; the worker stops after it, and stays stopped.
    let spool = open_spool(&sb);
    eventually(Duration::from_secs(15), "the job done", || {
        outcome(&spool, &id).is_some()
    });
    assert_eq!(outcome(&spool, &id).unwrap().2, 1);
    eventually(Duration::from_secs(10), "the worker gone", || {
        sb.run(&["status"]).status.code() == Some(3)
    });
}

/// `[worker] state_dir` edited while the worker runs: `status`, `reload` and `stop` looked in
/// the new directory and said "not running" of a worker that ran (a second `start` would have
/// made two), and a HUP moved the running worker's pidfile there while its logs and socket
/// stayed behind. Now the CLI finds the worker where it started (root's record) and says so, a
/// reload that moves `state_dir` is refused (it moves at a fresh start), and `restart` moves it.
#[test]
fn a_state_dir_edited_under_a_running_worker_is_found_and_moved_by_restart_only() {
    if !nix::unistd::geteuid().is_root() {
        return skip(
            "a_state_dir_edited_under_a_running_worker_is_found_and_moved_by_restart_only",
            "root (the state_dir record)",
        );
    }
    let sb = started("state-moved");
    let pid = status_json(&sb)["pid"].as_i64().unwrap();
    let text_before = fs::read_to_string(sb.config()).unwrap();
    fs::write(
        sb.config(),
        text_before.replace("state_dir = \"state\"", "state_dir = \"state2\""),
    )
    .unwrap();
    let out = sb.run(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert!(
        text(&out.stdout).contains(&format!("pid {pid}"))
            && text(&out.stderr).contains("state2")
            && text(&out.stderr).contains("restart"),
        "{}",
        text_of(&out)
    );
    let out = sb.run(&["reload", "--timeout", "10s"]);
    assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
    assert!(text(&out.stderr).contains("state_dir"), "{}", text_of(&out));
    assert!(!sb.path("state2/gearshift.pid").exists());
    // No second worker beside it.
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
    assert!(
        text(&out.stderr).contains(&format!("already running (pid {pid})")),
        "{}",
        text_of(&out)
    );
    let out = sb.run(&["restart"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let moved = status_json(&sb);
    assert_ne!(moved["pid"].as_i64(), Some(pid));
    assert!(sb.path("state2/gearshift.pid").exists());
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// A worker in a pid namespace of its own (a container whose state_dir is a volume the host
/// sees; `unshare --pid`): its pidfile holds its pid there (1), the kernel's lock names its pid
/// here. The CLI outside said "says pid 1, but the lock is held by pid N: not signalling either
/// (fix the pidfile, ...)" for `status`, `reload` and `stop`, though nothing was wrong. A lock
/// holder whose pid in its own namespace is the pidfile's is the worker.
#[test]
fn a_worker_in_a_pid_namespace_of_its_own_is_served_from_outside() {
    let name = "a_worker_in_a_pid_namespace_of_its_own_is_served_from_outside";
    if !nix::unistd::geteuid().is_root() {
        return skip(name, "needs root (a pid namespace)");
    }
    let sb = Sandbox::new("pidns");
    let mut w = sb.start_under(
        &["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"],
        "true",
    );
    eventually(Duration::from_secs(20), "the worker to serve", || {
        w.try_status().is_some()
    });
    assert_eq!(
        fs::read_to_string(sb.path("state/gearshift.pid"))
            .unwrap()
            .trim(),
        "1",
        "its pid in its own namespace"
    );
    let status = sb.run(&["status"]);
    assert_eq!(status.status.code(), Some(0), "{}", text_of(&status));
    let shown = text(&status.stdout);
    assert!(
        shown.contains(&format!("(pid {})", forked_by(w.child.id())))
            && shown.contains("pid 1 in its own pid namespace"),
        "{shown}"
    );
    let out = sb.run(&["submit", "--wait", "echo", "from outside"]);
    assert_eq!(text(&out.stdout), "from outside", "{}", text_of(&out));
    // Its pidfile removed (a cleaner of old files): the worker answering on its socket is
    // named by its pid here, and no second worker starts beside it (it was "not running": the
    // pid it gives, 1, is not the socket's server as this namespace sees it).
    let host_pid = forked_by(w.child.id());
    fs::remove_file(sb.path("state/gearshift.pid")).unwrap();
    let out = sb.run(&["status"]);
    assert!(
        text(&out.stderr).contains(&format!("pid {host_pid} answers on its status socket")),
        "{}",
        text_of(&out)
    );
    assert_eq!(sb.run(&["start"]).status.code(), Some(1));
    eventually(Duration::from_secs(15), "the pidfile made again", || {
        sb.path("state/gearshift.pid").exists()
    });
    let out = sb.run(&["reload"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert!(
        text(&out.stdout).contains("generation 2"),
        "{}",
        text_of(&out)
    );
    let out = sb.run(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert!(w.wait_exit(Duration::from_secs(10)).success());
}

/// The pid of the process `unshare` forked (the worker), as this pid namespace sees it.
fn forked_by(unshare: u32) -> i32 {
    fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// A config (and so `state_dir`) under a directory whose name is not UTF-8 (Latin-1 from an
/// old system, a tarball's bytes): the worker ran, but its status document could not be
/// encoded, so `status` said "its status is unavailable", and `reload` failed before it sent
/// its HUP ("unreadable status ... EOF while parsing"). Paths are shown with the bytes that
/// are not UTF-8 escaped.
#[test]
fn a_worker_under_a_directory_whose_name_is_not_utf8_answers_and_reloads() {
    use std::os::unix::ffi::OsStrExt;
    let base = Sandbox::new("not-utf8");
    let dir = base.dir.join(std::ffi::OsStr::from_bytes(b"caf\xe9"));
    fs::create_dir_all(dir.join("jobs")).unwrap();
    let sb = Sandbox {
        dir,
        bin: base.bin.clone(),
    };
    sb.write_config("");
    let mut w = sb.start();
    let out = sb.run(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let shown = text(&out.stdout);
    assert!(
        shown.contains("is running") && shown.contains("caf\\xe9"),
        "{}",
        text_of(&out)
    );
    let out = sb.run(&["status", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        doc["config"]
            .as_str()
            .unwrap()
            .ends_with("caf\\xe9/config.toml"),
        "{doc}"
    );
    let out = sb.run(&["submit", "--wait", "echo", "still here"]);
    assert_eq!(text(&out.stdout), "still here", "{}", text_of(&out));
    let out = sb.run(&["reload"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert!(
        text(&out.stdout).contains("generation 2"),
        "{}",
        text_of(&out)
    );
    // With the config's syntax broken, root's record of where the worker started finds it
    // (it could not be read back, and the CLI guessed).
    if nix::unistd::geteuid().is_root() {
        let good = fs::read_to_string(sb.config()).unwrap();
        fs::write(sb.config(), format!("{good}\ngarbage [[[\n")).unwrap();
        let out = sb.run(&["status"]);
        assert!(
            text(&out.stderr).contains("recorded at the worker's start"),
            "{}",
            text_of(&out)
        );
        fs::write(sb.config(), good).unwrap();
    }
    w.acts_at_once(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(10));
}

/// The other way round: the CLI in a pid namespace of its own (a container that mounts the
/// host's state_dir) cannot see the worker that holds the lock, and /proc/locks there lists
/// no holder. It said only "locked, but /proc/locks names no holder"; it says where the holder
/// is, and where to ask.
#[test]
fn a_cli_in_a_pid_namespace_of_its_own_says_the_worker_is_outside_it() {
    let name = "a_cli_in_a_pid_namespace_of_its_own_says_the_worker_is_outside_it";
    if !nix::unistd::geteuid().is_root() {
        return skip(name, "needs root (a pid namespace)");
    }
    let sb = Sandbox::new("pidns-cli");
    let mut w = sb.start();
    let out = sb.run_under(&["unshare", "--pid", "--fork", "--mount-proc"], &["status"]);
    assert_eq!(out.status.code(), Some(4), "{}", text_of(&out));
    assert!(
        text(&out.stderr).contains("outside this pid namespace"),
        "{}",
        text_of(&out)
    );
    w.acts_at_once(nix::sys::signal::Signal::SIGTERM, Duration::from_secs(10));
}

/// A command run without `-c` where there is no config.toml (an operator in the wrong
/// directory, `stop` from a home directory) says where it looked and how to name the worker's
/// config, for every command; with `-c` naming a missing file, it says that file.
#[test]
fn a_command_run_away_from_its_config_says_how_to_name_it() {
    let sb = Sandbox::new("no-config-here");
    let away = sb.path("elsewhere");
    fs::create_dir_all(&away).unwrap();
    for args in [
        &["status"][..],
        &["stop"],
        &["reload"],
        &["run"],
        &["submit", "echo", "x"],
    ] {
        let out = Command::new(&sb.bin)
            .args(args)
            .current_dir(&away)
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert!(!out.status.success(), "{args:?}: {err}");
        assert!(
            err.contains(&format!("no config.toml in {}", away.display()))
                && err.contains("-c PATH"),
            "{args:?}: {err}"
        );
    }
    let named = sb.path("gone.toml");
    let out = Command::new(&sb.bin)
        .arg("-c")
        .arg(&named)
        .arg("status")
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert!(
        err.contains(&named.display().to_string()) && err.contains("No such file"),
        "{err}"
    );
    assert!(!err.contains("-c PATH"), "it was named: {err}");
    // Where the worker's config was, removed under it (a deploy): the worker is found through
    // root's record and the reload refused for the missing file, which is the story; the hint
    // to run gearshift "where the worker's config is" (this is where) is not said.
    let _w = sb.start();
    fs::rename(sb.config(), sb.path("config.bak")).unwrap();
    let out = Command::new(&sb.bin)
        .args(["reload", "--timeout", "5s"])
        .current_dir(&sb.dir)
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("reading config") && err.contains("No such file"),
        "{err}"
    );
    assert!(!err.contains("-c PATH"), "the worker was found: {err}");
}

/// `reload --timeout 0` and `stop --timeout 0` (send the signal, wait for nothing) said "no new
/// generation after 0ns (jobs still running?)" and "pid N still running after 0ns (jobs still
/// running?)": a Rust `Debug` duration, and a guess where the worker can tell. Now they say
/// that nothing was waited for, and what the worker is doing: the job it runs, or its state.
#[test]
fn a_zero_timeout_says_it_waited_for_nothing_and_what_the_worker_does() {
    let sb = Sandbox::new("timeout-zero");
    let mut w = sb.start();
    // Idle: the reload either served already or is said as under way, never guessed at.
    let out = sb.run(&["reload", "--timeout", "0"]);
    let said = text_of(&out);
    assert!(matches!(out.status.code(), Some(0 | 5)), "{said}");
    assert!(
        !said.contains("0ns") && !said.contains("jobs still running?"),
        "{said}"
    );
    w.wait_generation(2);
    let id = sb.submit("sleep", "5000");
    w.wait_for(Duration::from_secs(10), "the job running", |s| {
        s["in_flight"] == 1
    });
    for args in [&["reload", "--timeout", "0"], &["stop", "--timeout", "0"]] {
        let out = sb.run(args);
        let said = text_of(&out);
        assert_eq!(out.status.code(), Some(5), "{said}");
        assert!(
            said.contains("--timeout 0") && said.contains(&id) && !said.contains("0ns"),
            "{said}"
        );
    }
    assert!(
        w.wait_exit(Duration::from_secs(20)).success(),
        "{}",
        w.log_text()
    );
    // `--force` with no wait: the second TERM comes only once the worker has acted on the
    // first (two sent at once arrive as one, a graceful stop, and it was killed 3 s later).
    let w = sb.start();
    let id = sb.submit("sleep", "30000");
    w.wait_for(Duration::from_secs(10), "the job running", |s| {
        s["in_flight"] == 1
    });
    let out = sb.run(&["stop", "--timeout", "0", "--force"]);
    let said = text_of(&out);
    assert_eq!(out.status.code(), Some(0), "{said}");
    assert!(
        said.contains("by a second TERM") && said.contains(&id) && !said.contains("killed"),
        "{said}"
    );
}

/// A config whose value is megabytes long (a server name of 2 MB, or 900 KB now that a config
/// is at most 1 MiB: a template that pasted a file into it) was quoted whole: `check` printed a 2 MB line, the log one per look, and the
/// refused reload's error went into the status document, over the 1 MiB a client reads, so
/// `status` and `reload` could no longer ask the worker. Now every message keeps the value's
/// beginning, its end and the hint, and says how much it cut.
#[test]
fn a_megabyte_value_makes_a_short_message_and_status_still_answers() {
    let sb = Sandbox::new("huge-value");
    let w = sb.start();
    let huge = "h".repeat(900_000);
    let config = format!(
        "[worker]\nallow_root = true\n\n[source]\nkind = \"gearman\"\nservers = [\"{huge}\"]\n"
    );
    fs::write(sb.config(), &config).unwrap();
    let out = sb.run(&["check"]);
    let said = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        &said[..said.len().min(300)]
    );
    assert!(
        said.len() < 4096 && said.contains("bytes cut") && said.contains("is not host:port"),
        "{}",
        &said[..said.len().min(300)]
    );
    let s = w.wait_for(Duration::from_secs(20), "the change refused", |s| {
        s["reload_refusals"].as_u64() >= Some(1)
    });
    let error = s["last_refused_reload"]["error"]
        .as_str()
        .unwrap_or_default();
    assert!(error.len() < 8192, "{}", error.len());
    let out = sb.run(&["status"]);
    assert_eq!(out.status.code(), Some(0), "{}", &text_of(&out)[..300]);
    assert!(w.log_text().len() < 64 << 10, "{}", w.log_text().len());
}

/// Found by switching a deploy's `current` link under a worker started with `-c
/// /srv/app/current/config.toml` and the stock relative `state_dir` and spool `dir`: both were
/// inside the release, so the switch moved them away from the running worker (its queued jobs
/// left in the old release), and its restart, as the user it dropped to, could not make the
/// new release's `state_dir` and died. The layout is said at `check` and every start, with the
/// way out; directories beside the release (shared) are not.
#[test]
fn a_state_dir_inside_a_switched_release_is_said() {
    let sb = Sandbox::new("release-state");
    let release = sb.path("app/releases/1");
    fs::create_dir_all(release.join("jobs")).unwrap();
    fs::create_dir_all(release.join("log")).unwrap();
    std::os::unix::fs::symlink("releases/1", sb.path("app/current")).unwrap();
    let config = sb.path("app/current/config.toml");
    let log = "[log]\nfile = \"log/gearshift.log\"\n";
    fs::write(&config, sb.config_text(log)).unwrap();
    let check = |config: &std::path::Path| {
        let out = std::process::Command::new(&sb.bin)
            .arg("-c")
            .arg(config)
            .arg("check")
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text_of(&out));
        text(&out.stderr)
    };
    let said = check(&config);
    for what in ["state_dir", "[source] dir", "[log] file"] {
        assert!(
            said.contains(&format!("{what} \"{}", sb.path("app/current").display()))
                && said.contains(&format!(
                    "through the link \"{}\"",
                    sb.path("app/current").display()
                )),
            "{what}: {said}"
        );
    }
    assert!(said.contains("outside the release"), "{said}");
    // Shared directories beside the releases: nothing to say.
    let shared = sb.path("app/shared");
    fs::create_dir_all(shared.join("log")).unwrap();
    let text = sb
        .config_text(&log.replace("log/", &format!("{}/log/", shared.display())))
        .replace(
            "state_dir = \"state\"",
            &format!("state_dir = \"{}/state\"", shared.display()),
        )
        .replace(
            "dir = \"spool\"",
            &format!("dir = \"{}/spool\"", shared.display()),
        );
    fs::write(&config, text).unwrap();
    let said = check(&config);
    assert!(!said.contains("through the link"), "{said}");
}

/// `restart` with a spool `dir` that cannot be made (a path on a read-only filesystem, a
/// mount not there yet): `check` passed it, the running worker was stopped, and the start then
/// failed (`creating directory ".../spool": Read-only file system`): one command left no
/// worker at all. Now `check`, and `restart` before it stops anything, look at whether each
/// directory the new worker makes could be made, and `restart` leaves the running worker as it
/// is.
#[test]
fn a_restart_into_a_directory_that_cannot_be_made_leaves_the_worker_running() {
    let sb = started("restart-ro");
    let _ro = common::tmpfs::Tmpfs::mount(&sb.path("ro"), "1m");
    let remount = Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(sb.path("ro"))
        .status()
        .unwrap();
    assert!(remount.success());
    let good = fs::read_to_string(sb.config()).unwrap();
    let bad = good.replace("dir = \"spool\"", "dir = \"ro/jobs/spool\"");
    fs::write(sb.config(), &bad).unwrap();
    let out = sb.run(&["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
    assert!(
        text(&out.stderr).contains("[source] dir: creating directory")
            && text(&out.stderr).contains("Read-only file system"),
        "{}",
        text_of(&out)
    );
    fs::write(sb.config(), &good).unwrap();
    restart_refuses(&sb, &bad, "ro/jobs/spool");
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// `status` says how many jobs wait in the spool and for how long the oldest has waited, the
/// first thing asked of a queue; only `top` and the metrics said it. `--json` has it as
/// `queue`.
#[test]
fn status_says_how_many_jobs_wait_and_for_how_long() {
    let sb = Sandbox::new("status-queue");
    let w = sb.start();
    let out = sb.run(&["status"]);
    assert!(
        text(&out.stdout).contains("\n  queue: empty\n"),
        "{}",
        text_of(&out)
    );
    for _ in 0..2 {
        sb.submit("sleep", "30000");
    }
    w.wait_for(Duration::from_secs(10), "both lanes busy", |s| {
        s["in_flight"] == 2
    });
    for n in 0..3 {
        sb.submit("echo", &n.to_string());
    }
    std::thread::sleep(Duration::from_millis(300));
    let out = sb.run(&["status"]);
    let said = text(&out.stdout);
    assert!(
        said.contains("\n  queue: 3 waiting, the oldest for "),
        "{said}"
    );
    let out = sb.run(&["status", "--json"]);
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["queue"]["depth"], 3, "{doc}");
    let oldest = doc["queue"]["oldest_age_seconds"].as_f64().unwrap();
    assert!((0.2..30.0).contains(&oldest), "{doc}");
}

/// `status` names the binary that runs, its version and digest: after a deploy, the first
/// question. Only `--json` said it.
#[test]
fn status_names_the_running_binary_its_version_and_digest() {
    let sb = Sandbox::new("status-binary");
    let w = sb.start();
    w.wait_hashed();
    let doc = w.status();
    let sha = doc["binary_sha256"].as_str().unwrap();
    assert_eq!(sha, sha256_hex(&fs::read(&sb.bin).unwrap()));
    let out = sb.run(&["status"]);
    let version = doc["version"].as_str().unwrap();
    assert!(version.starts_with(env!("CARGO_PKG_VERSION")), "{doc}");
    let line = format!(
        "\n  binary {}: version {version}, sha256 {}\n",
        doc["binary"].as_str().unwrap(),
        &sha[..12]
    );
    assert!(
        text(&out.stdout).contains(&line),
        "{line}\n{}",
        text_of(&out)
    );
}
