//! The docs work as written: README's manual steps run verbatim, and the shipped systemd units
//! pass `systemd-analyze verify` on this machine's systemd.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;

const README: &str = include_str!("../README.md");

/// The indented block after "Manually" in README.
fn manual_steps() -> Vec<String> {
    let start = README.find("Manually (bash").expect("the Manually section");
    README[start..]
        .lines()
        .skip_while(|l| !l.starts_with("    "))
        .take_while(|l| l.starts_with("    "))
        .map(|l| l.trim().to_string())
        .collect()
}

#[test]
fn the_readme_manual_steps_work_as_written() {
    let sb = Sandbox::new("docs-manual");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    fs::copy(repo.join("config.toml"), sb.path("config.toml")).unwrap();
    for e in fs::read_dir(repo.join("jobs")).unwrap().flatten() {
        fs::copy(e.path(), sb.path("jobs").join(e.file_name())).unwrap();
    }
    // The binary where the steps expect it (a copy the dropped user can reach).
    fs::create_dir_all(sb.path("target/release")).unwrap();
    copy_binary(Path::new(BIN), &sb.path("target/release/gearshift"));
    let steps = manual_steps();
    assert!(steps.len() >= 5, "{steps:?}");
    let script: String = steps
        .iter()
        .filter(|l| !l.starts_with("cargo build"))
        .map(|l| format!("{l}\n"))
        .collect();
    // A step failing leaves `run &` behind holding our stdout: killed, so the test fails
    // instead of waiting forever.
    let guard = "trap 'kill -9 $(jobs -p) 2>/dev/null || true' EXIT";
    let out = Command::new("bash")
        .args(["-c", &format!("set -e\n{guard}\n{script}")])
        .current_dir(&sb.dir)
        .env_remove("GEARSHIFT_LOG")
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "{script}\n{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(stdout.contains("olleh"), "{stdout}");
    // `kill -1` does not wait for the restart (`reload` does): `status` right after it finds
    // the worker serving, or still restarting (about one run in ten here), or still draining
    // (the HUP taken, the old generation not yet gone: 2 runs in 20 one day).
    assert!(
        ["running", "restarting", "draining"]
            .iter()
            .any(|state| stdout.contains(&format!("gearshift is {state}"))),
        "{stdout}"
    );
    assert!(stdout.contains("stopped"), "{stdout}");
}

#[test]
fn submit_wait_says_when_no_worker_runs() {
    let sb = Sandbox::new("docs-noworker");
    // Also with a --timeout shorter than the 2 s it waits for a worker to appear (it said
    // "queued, not finished yet", exit 5).
    for timeout in [None, Some("1s"), Some("100ms")] {
        let mut args = vec!["submit", "--wait", "reverse", "x"];
        args.extend(timeout.iter().flat_map(|t| ["--timeout", *t]));
        let out = sb.run(&args);
        assert_eq!(
            out.status.code(),
            Some(3),
            "{args:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains("no worker is running"),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
}

/// `systemd-analyze verify` exits 0 even when it ignores a line it cannot parse: its output
/// must be clean too. The ExecStart binary must exist, so it points at the built one.
fn verify(unit: &str) -> (bool, String) {
    let sb = Sandbox::new("docs-unit");
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let body = fs::read_to_string(repo.join("scripts").join(unit))
        .unwrap()
        .replace("/usr/local/bin/gearshift", BIN);
    let path = sb.path("gearshift.service");
    fs::write(&path, body).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
        .unwrap();
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    (out.status.success() && all.trim().is_empty(), all)
}

fn systemd_version() -> Option<u32> {
    let out = Command::new("systemctl").arg("--version").output().ok()?;
    text(&out.stdout)
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
}

#[test]
fn the_shipped_units_pass_systemd_analyze_verify() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        skip(
            "docs::the_shipped_units_pass_systemd_analyze_verify",
            "systemd-analyze is not installed (Debian's systemd)",
        );
        return;
    }
    let (ok, out) = verify("gearshift.service");
    assert!(ok, "scripts/gearshift.service: {out}");
    if systemd_version().is_some_and(|v| v >= 253) {
        let (ok, out) = verify("gearshift-notify-reload.service");
        assert!(ok, "scripts/gearshift-notify-reload.service: {out}");
    }
    // The production config parses and its paths match the unit and the logrotate file.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let cfg = fs::read_to_string(repo.join("scripts/config.production.toml")).unwrap();
    let unit = fs::read_to_string(repo.join("scripts/gearshift.service")).unwrap();
    let rotate = fs::read_to_string(repo.join("scripts/gearshift.logrotate")).unwrap();
    assert!(
        cfg.contains("state_dir = \"/var/lib/gearshift\"")
            && unit.contains("StateDirectory=gearshift")
    );
    assert!(
        cfg.contains("file = \"/var/log/gearshift/gearshift.log\"")
            && unit.contains("LogsDirectory=gearshift")
    );
    assert!(rotate.contains("/var/log/gearshift/*.log"));
    assert!(unit.contains("/etc/gearshift/config.toml"));
    let out = Command::new(env!("CARGO_BIN_EXE_gearshift"))
        .args([
            "-c",
            "scripts/config.production.toml",
            "check",
            "--config-only",
        ])
        .current_dir(repo)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
}

/// A test that cannot run for a missing tool is listed (scripts/test prints the list at the end
/// of the run), and under CI it fails instead.
#[test]
fn a_skip_is_listed_and_a_failure_under_ci() {
    let sb = Sandbox::new("skips");
    let list = sb.path("skipped.txt");
    skip_to(&list, "some::test", "no frobnicator", false);
    assert_eq!(
        std::fs::read_to_string(&list).unwrap(),
        "some::test: no frobnicator\n"
    );
    let under_ci =
        std::panic::catch_unwind(|| skip_to(&list, "some::test", "no frobnicator", true));
    assert!(under_ci.is_err(), "under CI a skip is a failure");
    // scripts/test prints the list.
    let script =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/test"))
            .unwrap();
    assert!(script.contains("skipped-tests.txt"), "{script}");
}

/// On a machine without the tools, scripts/deps (run by scripts/test) names the packages and
/// stops when it cannot install them (not root).
#[test]
fn the_test_setup_names_missing_packages_when_it_cannot_install() {
    let empty = Sandbox::new("deps");
    // A copy where nobody can read it (the checkout may be in a directory only root can enter).
    let deps = empty.path("deps");
    fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/deps"),
        &deps,
    )
    .unwrap();
    fs::create_dir(empty.path("bin")).unwrap();
    let out = Command::new("/usr/bin/setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg("/bin/bash")
        .arg(&deps)
        .env_clear()
        .env("PATH", empty.path("bin"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    for pkg in [
        "gearman-tools",
        "stunnel4",
        "faketime",
        "tmux",
        "prometheus",
        "php-zmq",
        "php-amqp",
    ] {
        assert!(err.contains(pkg), "{pkg} not named: {err}");
    }
}

/// What a library user must know is said where they read (README "Job functions"), and the
/// names in it exist in the code.
#[test]
fn library_users_are_told_the_rules_and_the_limits() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = fs::read_to_string(repo.join("README.md")).unwrap();
    for said in [
        "try_register",
        "Keep `panic = \"unwind\"`",
        "[profile.dev.package.sha2]",
        "is part of the result for libgearman clients",
        "Rollback needs `cli::main` to be reached",
        "SpoolOptions",
    ] {
        assert!(readme.contains(said), "README does not say {said:?}");
    }
    let cargo = fs::read_to_string(repo.join("Cargo.toml")).unwrap();
    assert!(cargo.contains("[profile.dev.package.sha2]"));
    let _ = gearshift::client::spool::SpoolOptions::default();
    let _ = gearshift::client::gearman::LoadOptions::default();
}

/// The demo cleans up after itself: its scratch directory is removed on exit (KEEP=1 keeps it).
/// (A text check: running the demo needs a release build, too slow for the suite.)
#[test]
fn the_demo_removes_its_scratch_directory() {
    let demo =
        fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/demo")).unwrap();
    assert!(demo.contains("trap cleanup EXIT"), "{demo}");
    assert!(demo.contains("rm -rf \"$work\""), "{demo}");
}

/// README's contents line links every section, in order, with the anchor GitHub makes of it.
#[test]
fn the_readme_contents_link_every_section() {
    let heads: Vec<&str> = README
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .collect();
    let start = README.find("Contents: ").expect("a contents line");
    let contents = README[start..]
        .split("\n\n")
        .next()
        .unwrap()
        .replace('\n', " ");
    let links: Vec<String> = heads
        .iter()
        .map(|h| {
            let anchor: String = h
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == '-' || *c == ' ' || *c == '_')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect();
            format!("[{h}](#{anchor})")
        })
        .collect();
    assert_eq!(
        contents,
        format!("Contents: {}.", links.join(", ")),
        "README's contents line is out of date"
    );
}

/// Every test the docs name as holding a behaviour (a backquoted snake_case name of five words
/// or more, such as `a_removed_pidfile_is_made_again_and_never_reads_as_not_running`) is a
/// function in `tests/` or `src/`: a renamed or removed test is not cited as if it still ran.
#[test]
fn every_test_the_docs_name_exists() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut code = String::new();
    let mut dirs = vec![repo.join("tests"), repo.join("src")];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                code.push_str(&fs::read_to_string(&path).unwrap());
            }
        }
    }
    let mut docs = vec![repo.join("README.md"), repo.join("ARCHITECTURE.md")];
    for entry in fs::read_dir(repo.join("docs")).unwrap() {
        docs.push(entry.unwrap().path());
    }
    let mut missing = Vec::new();
    let mut named = 0;
    for doc in &docs {
        let text = fs::read_to_string(doc).unwrap();
        for name in text.split('`').skip(1).step_by(2) {
            let test_like = name.split('_').count() >= 5
                && !name.starts_with("gearshift_")
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
            if !test_like {
                continue;
            }
            named += 1;
            if !code.contains(&format!("fn {name}(")) {
                missing.push(format!("{}: {name}", doc.display()));
            }
        }
    }
    assert!(named > 100, "only {named} test names found in the docs");
    assert!(
        missing.is_empty(),
        "the docs name tests that do not exist: {missing:#?}"
    );
}
