//! Stamps the version string with the git revision (when built from a checkout) and an optional
//! `GEARSHIFT_VERSION_SUFFIX`, so `gearshift --version` says which build is running.

use std::process::Command;

fn main() {
    let mut version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let rev = Command::new("git")
        .args(["rev-parse", "--short=10", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty());
    if let Some(rev) = rev {
        version.push_str(&format!(" ({rev})"));
    }
    if let Ok(suffix) = std::env::var("GEARSHIFT_VERSION_SUFFIX") {
        if !suffix.is_empty() {
            version.push_str(&format!(" {suffix}"));
        }
    }
    println!("cargo:rustc-env=GEARSHIFT_VERSION={version}");
    // Fault injection for the rollback test only: a build whose `run` dies during start-up
    // (after the point where a rollback is decided), while `check` passes.
    println!("cargo::rustc-check-cfg=cfg(gearshift_crash_on_run)");
    println!("cargo:rerun-if-env-changed=GEARSHIFT_CRASH_ON_RUN");
    if std::env::var_os("GEARSHIFT_CRASH_ON_RUN").is_some() {
        println!("cargo:rustc-cfg=gearshift_crash_on_run");
    }
    // Fault injection for tests only: the watch thread's first read after a file event fails,
    // as a failing inotify read would; a lane or the reaper panics after a job whose result is
    // `fault:panic-lane` or `fault:panic-helper`.
    println!("cargo::rustc-check-cfg=cfg(gearshift_faults)");
    println!("cargo:rerun-if-env-changed=GEARSHIFT_FAULTS");
    if std::env::var_os("GEARSHIFT_FAULTS").is_some() {
        println!("cargo:rustc-cfg=gearshift_faults");
    }
    println!("cargo:rerun-if-env-changed=GEARSHIFT_VERSION_SUFFIX");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
}
