//! Deploys: a new binary dropped over the running one is pre-flighted and switched to between
//! jobs; bad candidates are refused and serving goes on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use common::*;

/// A second build of gearshift whose version says "deploy-test".
fn second_build() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| build_variant("deploy-test", ("GEARSHIFT_UNUSED", "")))
        .clone()
}

/// A build whose `check` passes but whose `run` dies during start-up (GEARSHIFT_CRASH_ON_RUN).
fn crashing_build() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| build_variant("deploy-crash", ("GEARSHIFT_CRASH_ON_RUN", "1")))
        .clone()
}

/// `status --json` of the sandbox's worker (null when it does not answer).
fn status(sb: &Sandbox) -> serde_json::Value {
    serde_json::from_slice(&sb.run(&["status", "--json"]).stdout).unwrap_or_default()
}

/// Whether `text` says that `bad` was rolled back to `good` (a digest), as the log and `start`
/// say it.
fn rolled_back(text: &str, bad: &Path, good: &str) -> bool {
    text.contains(&format!(
        "rolled back from {} to {}",
        &sha(bad)[..12],
        &good[..12]
    ))
}

fn sha(path: &Path) -> String {
    sha256_hex(&fs::read(path).unwrap())
}

/// Drops `content` at `dest` the recommended way: temp file in the same directory, then rename.
fn drop_by_rename(content: &Path, dest: &Path, mode: u32) {
    let tmp = dest.with_extension("new");
    fs::copy(content, &tmp).unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(mode)).unwrap();
    fs::rename(&tmp, dest).unwrap();
}

/// A sandbox whose worker runs from its own copy of the binary (so the test can replace it).
fn sandbox(name: &str) -> Sandbox {
    let mut sb = Sandbox::new(name);
    fs::create_dir_all(sb.path("bin")).unwrap();
    let bin = sb.path("bin/gearshift");
    copy_binary(Path::new(BIN), &bin);
    sb.bin = bin;
    sb
}

#[test]
fn a_binary_dropped_by_rename_is_switched_to_between_jobs() {
    let v2 = second_build();
    let sb = sandbox("deploy");
    let w = sb.start();
    let before = w.wait_running_sha();
    assert_eq!(before["binary_sha256"], sha(&sb.bin));
    assert!(!before["version"].as_str().unwrap().contains("deploy-test"));

    let long = sb.submit("sleep", "1500");
    w.wait_for(Duration::from_secs(10), "the job to run", |s| {
        s["in_flight"] == 1
    });
    drop_by_rename(&v2, &sb.bin, 0o755);
    let s = w.wait_generation(2);
    assert_eq!(s["last_restart_reason"], "binary changed");
    assert_eq!(s["pid"], w.pid(), "same PID");
    assert!(
        w.log_text()
            .contains("binary changed: re-exec \"/proc/self/fd/"),
        "the checked descriptor is exec'd, not the path:\n{}",
        w.log_text()
    );
    assert_eq!(s["binary_sha256"], sha(&v2));
    assert!(
        s["version"].as_str().unwrap().ends_with("deploy-test"),
        "{s}"
    );
    assert_eq!(
        all_outcomes(&sb, &[long], Duration::from_secs(10))[0],
        (true, "1500".into(), 1),
        "the running job completed once"
    );
    assert_eq!(
        sha(&sb.path("state/last-good")),
        before["binary_sha256"].as_str().unwrap(),
        "the old binary is kept"
    );
    let out = sb.run(&["--version"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("deploy-test"));
}

/// A deploy that adds a Rust function, and a client that submits a job for it at once: the
/// running generation lacks the function while the new binary settles, is pre-flighted and
/// (here) waits out a splay; the job waits for the restart that serves it instead of failing.
#[test]
fn a_job_for_a_function_a_new_binary_adds_waits_for_the_restart_that_serves_it() {
    let sb = sandbox("deploy-adds");
    sb.write_worker_config("restart_splay = \"1h\"");
    let w = sb.start();
    w.wait_running_sha();
    drop_by_rename(&example("custom_worker"), &sb.bin, 0o755);
    let id = sb.submit("shout", "hello");
    let typo = sb.submit("shuot", "x");
    let out = all_outcomes(&sb, &[id, typo], Duration::from_secs(30));
    assert_eq!(out[0], (true, "HELLO".to_string(), 1), "{}", w.log_text());
    assert!(
        !out[1].0 && out[1].1.contains("unknown function \"shuot\""),
        "{out:?}"
    );
    let s = w.status();
    assert_eq!(s["generation"], 2, "{s}");
    assert_eq!(s["last_restart_reason"], "binary changed", "{s}");
    // The splay was cut short by a job that waited (either one: the typo waits too while the
    // candidate is judged, and whichever lane looks first says so).
    let log = w.log_text();
    assert!(
        log.contains("which this generation lacks and a deploy may bring: the pending restart (binary changed) goes now"),
        "{log}"
    );
}

/// A deploy approved while its restart waits out a splay, and a config that no longer loads:
/// the job for the new binary's function cuts the splay short, the restart is refused, and the
/// job fails as unknown then, instead of waiting 10 s for a restart that is not coming.
#[test]
fn a_job_for_a_new_binarys_function_fails_as_unknown_once_its_restart_is_refused() {
    let sb = sandbox("deploy-adds-refused");
    sb.write_worker_config("restart_splay = \"1h\"");
    // The client's own copy of the config: the worker's becomes invalid below.
    let client = sb.path("client.toml");
    fs::copy(sb.config(), &client).unwrap();
    let w = sb.start();
    w.wait_running_sha();
    drop_by_rename(&example("custom_worker"), &sb.bin, 0o755);
    w.wait_for(
        Duration::from_secs(30),
        "the approved restart splayed",
        |s| s["restart_pending"]["reason"] == "binary changed",
    );
    fs::write(sb.config(), "[worker\nnot toml\n").unwrap();
    let out = std::process::Command::new(BIN)
        .arg("-c")
        .arg(&client)
        .args(["submit", "shout", "hello"])
        .output()
        .unwrap();
    let id = text(&out.stdout).trim().to_string();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = w.wait_for(Duration::from_secs(30), "the refusal", |s| {
        !s["last_refused_reload"].is_null()
    });
    assert_eq!(s["generation"], 1, "{s}");
    let outcome = all_outcomes(&sb, &[id], Duration::from_secs(30));
    assert!(
        !outcome[0].0 && outcome[0].1.starts_with("unknown function \"shout\""),
        "{outcome:?}\n{}",
        w.log_text()
    );
}

#[test]
fn bad_candidates_are_refused_and_serving_goes_on() {
    let v2 = second_build();
    let sb = sandbox("deploy-bad");
    // The custom example binary has a Rust function `shout`; this jobs_dir has an executable of
    // that name, so that binary rejects this config.
    sb.job("shout.sh", "#!/bin/sh\ntr a-z A-Z\n");
    let w = sb.start();
    w.wait_running_sha();
    let script = sb.path("fails.sh");
    fs::write(&script, "#!/bin/sh\necho 'candidate says no' >&2\nexit 1\n").unwrap();
    let truncated = sb.path("truncated");
    let bytes = fs::read(&v2).unwrap();
    // Not half: a debug binary's second half is debug info, and its first half still runs.
    fs::write(&truncated, &bytes[..bytes.len() / 64]).unwrap();
    // A build for another machine: the kernel refuses it, and it was run through a shell
    // (glibc's `execvp`), which failed on its bytes with a syntax error.
    let foreign = sb.path("foreign");
    let mut elf = bytes.clone();
    let other: u16 = if cfg!(target_arch = "aarch64") {
        62
    } else {
        183
    };
    elf[18..20].copy_from_slice(&other.to_le_bytes());
    fs::write(&foreign, &elf).unwrap();
    let cases: [(&Path, u32, &[&str]); 5] = [
        (&v2, 0o644, &["not executable"]),
        // The kernel may refuse to load it, or it may crash at start: refused either way.
        (
            &truncated,
            0o755,
            &["`check` failed", "cannot run the candidate"],
        ),
        (&script, 0o755, &["candidate says no"]),
        (
            &foreign,
            0o755,
            &["cannot run the candidate: Exec format error (os error 8): an ELF program for"],
        ),
        (
            &example("custom_worker"),
            0o755,
            &["already a built-in or Rust function"],
        ),
    ];
    let mut refusals = 0;
    for (file, mode, why) in cases {
        let before = w.status()["last_refused_deploy"].clone();
        drop_by_rename(file, &sb.bin, mode);
        let s = w.wait_for(Duration::from_secs(30), why[0], |s| {
            s["last_refused_deploy"] != before
        });
        let err = s["last_refused_deploy"]["error"].as_str().unwrap();
        assert!(
            why.iter().any(|w| err.contains(w)),
            "{why:?} not in {err:?}"
        );
        assert_eq!(s["generation"], 1, "no switch to a refused binary");
        refusals += 1;
        // The client is the stock binary: the sandbox's own is whatever the test just dropped.
        let out = std::process::Command::new(BIN)
            .arg("-c")
            .arg(sb.config())
            .args(["submit", "--wait", "shout", "still here"])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "STILL HERE",
            "serving goes on"
        );
    }
    assert_eq!(refusals, 5);
    // Each refusal counted once (the stock binary asks: the sandbox's own is the last drop).
    let out = std::process::Command::new(BIN)
        .arg("-c")
        .arg(sb.config())
        .arg("metrics")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("gearshift_deploys_total{result=\"refused\"} 5"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // A HUP now must not exec the refused file at the path: the running image is run again.
    w.signal(nix::sys::signal::Signal::SIGHUP);
    let s = w.wait_generation(2);
    assert!(!s["version"].as_str().unwrap().contains("deploy-test"));
    assert!(
        !s["functions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f == "must_be_even"),
        "not the custom binary"
    );
}

#[test]
fn a_slow_in_place_write_is_not_switched_to_before_it_is_whole() {
    let v2 = second_build();
    let sb = sandbox("deploy-slow");
    let w = sb.start();
    w.wait_running_sha();
    // The running image stays alive as a deleted inode; a new file is then written at the path
    // in two halves with a pause longer than the settle time between them.
    fs::remove_file(&sb.bin).unwrap();
    let bytes = fs::read(&v2).unwrap();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&sb.bin)
        .unwrap();
    fs::set_permissions(&sb.bin, fs::Permissions::from_mode(0o755)).unwrap();
    f.write_all(&bytes[..bytes.len() / 2]).unwrap();
    f.flush().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        w.status()["generation"],
        1,
        "no switch to a half-written binary"
    );
    f.write_all(&bytes[bytes.len() / 2..]).unwrap();
    drop(f);
    let s = w.wait_generation(2);
    assert_eq!(s["binary_sha256"], sha(&v2));
    assert!(s["version"].as_str().unwrap().ends_with("deploy-test"));
}

#[test]
fn a_new_binary_that_dies_at_start_up_is_rolled_back_under_the_supervisor() {
    let bad = crashing_build();
    let sb = sandbox("rollback");
    let out = sb.run(&["start", "--supervise"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pidfile = sb.path("state/gearshift.pid");
    let read = |sb: &Sandbox| -> serde_json::Value {
        serde_json::from_slice(
            &std::process::Command::new(BIN)
                .arg("-c")
                .arg(sb.config())
                .args(["status", "--json"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap_or_default()
    };
    eventually(Duration::from_secs(30), "the running sha", || {
        read(&sb)["binary_sha256"].is_string()
    });
    let good = read(&sb)["binary_sha256"].as_str().unwrap().to_string();
    let first_pid = fs::read_to_string(&pidfile).unwrap().trim().to_string();

    drop_by_rename(&bad, &sb.bin, 0o755);
    // Pre-flight passes, the worker switches, the new image dies, the supervisor starts the path
    // again, and that fresh start finds the deploy marker and execs the last-good binary.
    eventually(Duration::from_secs(60), "the rollback", || {
        let s = read(&sb);
        s["last_rollback"].is_object() && s["binary_sha256"].is_string()
    });
    let s = read(&sb);
    assert_eq!(
        s["binary_sha256"],
        good.as_str(),
        "running the last-good binary: {s}"
    );
    assert_eq!(s["last_rollback"]["from_sha256"], sha(&bad));
    assert_eq!(s["last_rollback"]["to_sha256"], good.as_str());
    assert!(
        s["last_rollback"]["reason"]
            .as_str()
            .unwrap()
            .contains("SIGABRT"),
        "{s}"
    );
    assert_eq!(s["supervisor"]["crashes"], 1);
    assert_ne!(s["pid"].to_string(), first_pid);
    let log = fs::read_to_string(sb.path("state/gearshift.log")).unwrap();
    assert!(rolled_back(&log, &bad, &good), "{log}");
    // The bad binary still sits at the path: it is refused, not switched to again.
    eventually(Duration::from_secs(30), "the refusal", || {
        read(&sb)["last_refused_deploy"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("rolled back"))
    });
    let out = std::process::Command::new(BIN)
        .arg("-c")
        .arg(sb.config())
        .args(["submit", "--wait", "reverse", "ok"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ko", "serving");
    // A later crash of the rolled-back worker (an OOM kill, say): the supervisor starts the path
    // again, where the bad binary still is. It rolls back again, as the first time (the marker
    // was removed once the rolled-back worker served, so it crashed at every start until the
    // supervisor gave up, and no worker was left).
    let pid: i32 = fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    eventually(Duration::from_secs(60), "the worker back", || {
        let s = read(&sb);
        s["pid"].as_i64().is_some_and(|p| p != pid as i64) && s["binary_sha256"] == good.as_str()
    });
    let out = std::process::Command::new(BIN)
        .arg("-c")
        .arg(sb.config())
        .arg("stop")
        .output()
        .unwrap();
    assert!(out.status.success());
    // Started again, the bad binary still at the path: the supervisor's worker rolls back, and
    // `start --supervise` says so, as `start` does (it said only "started").
    let out = sb.run(&["start", "--supervise"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let err = text(&out.stderr);
    assert!(rolled_back(&err, &bad, &good), "{err}");
    assert_eq!(read(&sb)["supervisor"]["crashes"], 0);
    let out = sb.run(&["stop"]);
    assert!(out.status.success(), "{}", text_of(&out));
}

/// `app/releases/1/gearshift` (the stock build) and `app/releases/2/gearshift` (`v2`).
fn release_binaries(sb: &Sandbox, v2: &Path) {
    for (release, from) in [("1", Path::new(BIN)), ("2", v2)] {
        fs::create_dir_all(sb.path(&format!("app/releases/{release}"))).unwrap();
        fs::copy(from, sb.path(&format!("app/releases/{release}/gearshift"))).unwrap();
    }
}

/// Points `app/current` at `app/releases/RELEASE` as deploy tools do: a new link renamed over
/// it. Beside the config's directory, not in it (the config's watch would see the swap).
fn switch_release(sb: &Sandbox, release: &str) {
    let dir = sb.path("app");
    let tmp = dir.join("current.new");
    let _ = fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("releases/{release}"), &tmp).unwrap();
    fs::rename(&tmp, dir.join("current")).unwrap();
}

/// The release switch alone, with no `reload`: the binary's path leads through `current`, a
/// link in a directory that was not watched, so the new release was found only at the next
/// look at the watched directories (every 5 s). The switch comes just after such a look (an
/// event in the binary's directory made one) and must be taken well before the next.
#[test]
fn a_release_switch_alone_is_taken_at_once() {
    let v2 = second_build();
    let mut sb = Sandbox::new("deploy-switch");
    release_binaries(&sb, &v2);
    switch_release(&sb, "1");
    sb.bin = sb.path("app/current/gearshift");
    let w = sb.start();
    w.wait_running_sha();
    fs::write(sb.path("app/releases/1/notes"), "x").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    switch_release(&sb, "2");
    let s = w.wait_for(
        Duration::from_millis(4000),
        "the new release taken at once, not at the next look 5 s on",
        |s| s["binary_sha256"] == sha(&v2) && s["state"] == "running",
    );
    assert_eq!(
        (s["generation"].as_u64(), &s["pid"]),
        (Some(2), &w.status()["pid"])
    );
    assert_eq!(s["pid"], w.pid(), "same PID");
}

/// A release deploy as deploy tools do it (Capistrano, Ansible's deploy_helper, a `current`
/// link): the new release in a directory of its own, the `current` link swapped to it, then
/// `gearshift reload`. The reload re-exec'd the old image (the file at the path had not passed
/// a pre-flight yet) and said "reloaded"; the new binary came by itself seconds later, in a
/// second restart, and a refused one only showed in `status`. Now a restart finds what is at
/// the path: it waits for that candidate's pre-flight (begun at once, beside the jobs it waits
/// for) and switches to it, and `reload` says when the candidate was refused (exit 1).
#[test]
fn a_reload_right_after_a_release_switch_runs_the_new_release() {
    let v2 = second_build();
    let mut sb = Sandbox::new("deploy-release");
    release_binaries(&sb, &v2);
    fs::create_dir_all(sb.path("app/releases/3")).unwrap();
    fs::write(
        sb.path("app/releases/3/gearshift"),
        "#!/bin/sh\necho 'release 3 says no' >&2\nexit 1\n",
    )
    .unwrap();
    fs::set_permissions(
        sb.path("app/releases/3/gearshift"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    switch_release(&sb, "1");
    sb.bin = sb.path("app/current/gearshift");
    let w = sb.start();
    w.wait_running_sha();
    // The stock binary asks (the sandbox's own is whatever `current` holds).
    let cli = |args: &[&str]| {
        std::process::Command::new(BIN)
            .arg("-c")
            .arg(sb.config())
            .args(args)
            .output()
            .unwrap()
    };
    switch_release(&sb, "2");
    let out = cli(&["reload"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let s = w.status();
    assert_eq!(s["generation"], 2, "{s}");
    assert_eq!(
        s["binary_sha256"],
        sha(&v2),
        "the reload runs the new release"
    );
    assert!(
        s["version"].as_str().unwrap().ends_with("deploy-test"),
        "{s}"
    );
    assert_eq!(s["pid"], w.pid(), "same PID");

    // A release that fails its pre-flight, while a job runs: the reload says so, and the
    // running release serves on.
    let job = sb.submit("sleep", "1000");
    w.wait_for(Duration::from_secs(10), "the job to run", |s| {
        s["in_flight"] == 1
    });
    switch_release(&sb, "3");
    let out = cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let said = text(&out.stderr);
    assert!(said.contains("release 3 says no"), "{said}");
    let s = w.status();
    assert_eq!(s["generation"], 3, "{s}");
    assert_eq!(s["binary_sha256"], sha(&v2), "{s}");
    assert_eq!(
        all_outcomes(&sb, &[job], Duration::from_secs(10))[0],
        (true, "1000".into(), 1),
        "the running job completed once"
    );
    // One restart each: the watch does not switch again once it sees the link changed, and
    // the next generation does not judge the refused release again (it did, at its start:
    // a second refusal in the log and the metrics for one file).
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(w.status()["generation"], 3, "{}", w.log_text());
    let log = w.log_text();
    assert_eq!(log.matches("release 3 says no").count(), 1, "{log}");
    let metrics = text(&cli(&["metrics"]).stdout);
    assert!(
        metrics.contains("gearshift_deploys_total{result=\"refused\"} 1"),
        "{metrics}"
    );
    // A reload by hand judges it again (what it refused may be mended: the config, a library).
    let out = cli(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert_eq!(w.log_text().matches("release 3 says no").count(), 2);
}

/// A restart waiting for a candidate's pre-flight (one that takes its time) still stops at
/// once on a TERM: no job runs, and the pre-flight goes with the worker.
#[test]
fn a_stop_while_a_restart_waits_for_a_pre_flight_is_not_held() {
    let sb = sandbox("deploy-wait-stop");
    let mut w = sb.start();
    w.wait_running_sha();
    let slow = sb.path("slow-check.sh");
    let marker = sb.path("preflight-ran");
    fs::write(
        &slow,
        format!("#!/bin/sh\ntouch {}\nexec sleep 9.4321\n", marker.display()),
    )
    .unwrap();
    drop_by_rename(&slow, &sb.bin, 0o755);
    w.signal(nix::sys::signal::Signal::SIGHUP);
    eventually(Duration::from_secs(10), "the pre-flight to run", || {
        marker.exists() && w.log_text().contains("waiting for the pre-flight")
    });
    let sent = std::time::Instant::now();
    w.signal(nix::sys::signal::Signal::SIGTERM);
    let status = w.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status:?}\n{}", w.log_text());
    assert!(
        sent.elapsed() < Duration::from_secs(2),
        "{:?}",
        sent.elapsed()
    );
    // Its process group was killed with it.
    eventually(Duration::from_secs(3), "the pre-flight to be gone", || {
        let left = std::process::Command::new("pgrep")
            .args(["-f", "sleep 9.4321"])
            .output()
            .unwrap();
        left.stdout.is_empty()
    });
}

/// Something that is no file at the binary's path (a directory unpacked over it, a FIFO): it
/// was "refused" in a warning and looked at again every second, a warning and a thread each
/// time, for as long as it stayed. It is refused once, as any candidate that cannot run.
#[test]
fn a_directory_at_the_binarys_path_is_refused_once() {
    let sb = sandbox("deploy-dir");
    let w = sb.start();
    w.wait_running_sha();
    fs::rename(&sb.bin, sb.path("bin/gearshift.old")).unwrap();
    fs::create_dir(&sb.bin).unwrap();
    let s = w.wait_for(Duration::from_secs(10), "the refusal", |s| {
        s["last_refused_deploy"].is_object()
    });
    let err = s["last_refused_deploy"]["error"].as_str().unwrap();
    assert!(err.contains("not a regular file"), "{err}");
    std::thread::sleep(Duration::from_secs(3));
    let log = w.log_text();
    assert_eq!(log.matches("not a regular file").count(), 1, "{log}");
    assert_eq!(w.status()["generation"], 1);
}

/// A binary's path that resolves to no file for good (a release link left dangling, or looping,
/// by a deploy that went wrong) was not said at all: the worker ran on its image (a restart
/// re-execs it), and the next fresh start of that path failed. It is said once it lasts 10 s,
/// and a reload still restarts in place.
#[test]
fn a_binary_path_that_resolves_to_nothing_is_said_and_reloads_run_on() {
    let sb = sandbox("deploy-dangling");
    let w = sb.start();
    w.wait_running_sha();
    fs::remove_file(&sb.bin).unwrap();
    std::os::unix::fs::symlink(sb.path("releases/42/gearshift"), &sb.bin).unwrap();
    eventually(Duration::from_secs(20), "the dangling path said", || {
        w.log_text().contains("resolves to no file")
    });
    let log = w.log_text();
    assert!(log.contains("No such file"), "{log}");
    // The CLI from the build (the sandbox's path runs nothing now).
    let out = std::process::Command::new(BIN)
        .arg("-c")
        .arg(sb.config())
        .arg("reload")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert_eq!(w.status()["generation"], 2);
    assert_eq!(
        w.log_text().matches("resolves to no file").count(),
        1,
        "{}",
        w.log_text()
    );
}

/// Without a supervisor, a new binary that dies at start-up leaves no worker; the operator's
/// next `start` (the bad binary still at the path) rolls back to the last good one. `start`
/// says what runs: the worker it started, and that it is the rolled-back binary, not the
/// binary at the path; and the worker holds its pidfile when `start` returns.
#[test]
fn start_after_a_deploy_that_died_says_it_rolled_back_and_runs() {
    let bad = crashing_build();
    let sb = sandbox("start-rollback");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    eventually(Duration::from_secs(30), "the running sha", || {
        status(&sb)["binary_sha256"].is_string()
    });
    let good = status(&sb)["binary_sha256"].as_str().unwrap().to_string();
    let pid: i32 = fs::read_to_string(sb.path("state/gearshift.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    drop_by_rename(&bad, &sb.bin, 0o755);
    // The worker switches to it, and the new image dies before serving: no worker is left.
    eventually(Duration::from_secs(60), "the worker to die", || {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_err()
    });

    let out = sb.run(&["start"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("started (pid "), "{stdout}{stderr}");
    assert!(rolled_back(&stderr, &bad, &good), "{stdout}{stderr}");
    // Serving when `start` returned: no window in which `stop` would find nothing.
    let s = status(&sb);
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(s["last_rollback"]["from_sha256"], sha(&bad), "{s}");
    // The running image's digest is computed once it serves.
    eventually(Duration::from_secs(30), "the last good sha", || {
        status(&sb)["binary_sha256"] == good.as_str()
    });
    // A reload re-execs the image that runs, not the bad binary still at the path, which it
    // says it refused (exit 1: reloaded, but the binary at the path refused).
    let out = sb.run(&["reload"]);
    assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
    assert!(
        text(&out.stdout).contains("reloaded: generation 2"),
        "{}",
        text_of(&out)
    );
    assert!(
        text(&out.stderr).contains("rolled back"),
        "{}",
        text_of(&out)
    );
    eventually(Duration::from_secs(30), "the reloaded sha", || {
        let s = status(&sb);
        s["generation"] == 2 && s["binary_sha256"] == good.as_str()
    });
    let out = sb.run(&["stop"]);
    assert!(
        text(&out.stdout).contains("stopped (pid"),
        "{}",
        text(&out.stdout)
    );
}

/// `restart` after a binary that dies at start-up was put at the path (the binary watch off,
/// or the restart quicker than it): the healthy worker was stopped, the new binary died, and
/// `restart` left no worker at all (every later `start` died the same way). Now `restart`
/// starts the last good binary (the one the stopped worker ran, `state_dir/last-good`), says
/// so, and that worker refuses the bad binary while it stays at the path.
#[test]
fn a_restart_onto_a_binary_that_dies_at_start_up_runs_the_last_good_one() {
    restart_onto_a_crashing_binary("restart-rollback", &["start"]);
}

/// The same under `start --supervise`: the supervisor said the worker crashed as it started,
/// and gave up; the start again rolls back in the supervisor's worker.
#[test]
fn a_supervised_restart_onto_a_binary_that_dies_at_start_up_runs_the_last_good_one() {
    restart_onto_a_crashing_binary("restart-rollback-sup", &["start", "--supervise"]);
}

fn restart_onto_a_crashing_binary(name: &str, start: &[&str]) {
    let bad = crashing_build();
    let sb = sandbox(name);
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    sb.write_worker_config("watch_binary = false");
    assert_eq!(sb.run(start).status.code(), Some(0));
    // With the binary watch off, `status` hashes no binary: the good one is the sandbox's.
    let good = sha(&sb.bin);
    drop_by_rename(&bad, &sb.bin, 0o755);

    let out = sb.run(&["restart"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let err = text(&out.stderr);
    assert!(err.contains("died during start-up"), "{err}");
    // Said on the ready line, by the worker or by its supervisor.
    assert!(rolled_back(&err, &bad, &good), "{err}");
    let s = status(&sb);
    assert_eq!(s["supervisor"].is_object(), start.len() == 2, "{s}");
    assert_eq!(s["state"], "running", "{s}");
    assert_eq!(s["last_rollback"]["from_sha256"], sha(&bad), "{s}");
    assert_eq!(s["last_rollback"]["to_sha256"], good.as_str(), "{s}");
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// A sandbox's worker whose config.toml is invalid (refused) when a second build is dropped at
/// the path: the candidate's pre-flight (`check`) reads that config and fails. Returns the
/// worker, the config as it was, and the build.
fn refused_while_the_config_is_invalid(sb: &Sandbox) -> (Worker, String, PathBuf) {
    let v2 = second_build();
    let w = sb.start();
    w.wait_running_sha();
    let good = sb.config_text("");
    fs::write(
        sb.config(),
        good.replacen("concurrency = ", "concurrency == ", 1),
    )
    .unwrap();
    w.wait_for(Duration::from_secs(10), "the invalid config refused", |s| {
        !s["last_refused_reload"].is_null()
    });
    drop_by_rename(&v2, &sb.bin, 0o755);
    let s = w.wait_for(Duration::from_secs(30), "the candidate refused", |s| {
        !s["last_refused_deploy"].is_null()
    });
    assert!(
        s["last_refused_deploy"]["error"]
            .as_str()
            .unwrap()
            .contains("config.toml:"),
        "refused for the config: {s}"
    );
    (w, good, v2)
}

/// A good binary dropped while config.toml is being rewritten: its pre-flight (`check`) read
/// the half-edited file and failed. Once the file is as the running generation has it again,
/// nothing else changes, so the binary must be judged again then; it was left refused for
/// good (found by the soak: the last deploy never ran).
#[test]
fn a_binary_refused_for_a_config_being_edited_is_taken_once_the_config_is_back() {
    let sb = sandbox("deploy-config-back");
    let (w, good, v2) = refused_while_the_config_is_invalid(&sb);
    fs::write(sb.config(), &good).unwrap();
    let s = w.wait_generation(2);
    assert_eq!(s["binary_sha256"], sha(&v2), "the binary at the path runs");
    assert_eq!(s["last_restart_reason"], "binary changed");
}

/// As above, but the config is put back together with a change to `jobs_dir`: the restart for
/// the jobs must judge the refused binary again, or the next generation refuses its bytes
/// unseen (a refusal crosses the exec) and runs the old binary for good.
#[test]
fn a_binary_refused_for_a_config_being_edited_is_taken_by_the_next_restart() {
    let sb = sandbox("deploy-config-back-jobs");
    let (w, good, v2) = refused_while_the_config_is_invalid(&sb);
    fs::write(sb.config(), &good).unwrap();
    sb.job("added.sh", "#!/bin/sh\ncat\n");
    let s = w.wait_for(Duration::from_secs(30), "the new binary running", |s| {
        s["binary_sha256"] == sha(&v2)
    });
    assert_eq!(s["pid"], w.pid(), "same PID");
}

/// The spool's lock crosses a deploy's exec held too, when the new binary said at its
/// pre-flight that it takes it up (every build since the lock first crossed an exec; an older
/// one is not handed it, and lets go for the moment of its exec, as every exec did before):
/// a second worker on the same spool whose start comes while the worker switches binaries is
/// refused. Before, a deploy let go of the lock at its exec. (The new binary is the fault
/// build, whose new generation stalls at start-up while a file exists: the moment widened.)
#[test]
fn a_second_worker_cannot_take_the_spool_while_a_deploy_switches_binaries() {
    let faults = build_variant("faults", ("GEARSHIFT_FAULTS", "1"));
    let sb = sandbox("deploy-lock");
    let stall = sb.path("stall");
    let w = sb.start_env(&[("GEARSHIFT_FAULT_STALL_RESUMED", stall.to_str().unwrap())]);
    w.wait_running_sha();
    fs::write(&stall, "").unwrap();
    drop_by_rename(&faults, &sb.bin, 0o755);
    eventually(
        Duration::from_secs(30),
        "the new binary's generation held",
        || w.log_text().contains("stalling at start-up"),
    );
    a_second_worker_is_refused(&sb.path("spool"), w.pid());
    fs::remove_file(&stall).unwrap();
    let s = w.wait_generation(2);
    assert_eq!(s["binary_sha256"], sha(&faults), "{s}");
    let id = sb.submit("echo", "after");
    eventually(
        Duration::from_secs(10),
        "the job done by the worker",
        || sb.run(&["result", &id]).status.success(),
    );
}
