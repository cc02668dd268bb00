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
    link_libstdcxx_statically();
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

/// The vendored libzmq is C++. Linked dynamically, libstdc++ cost every exec (so every
/// restart) about 0.4 ms of loading and relocation (1.33x a bare start of the binary); linked
/// statically, 1.05-1.12x. `.cargo/config.toml` sets `CXXSTDLIB=""` so the cc crate links none;
/// here the static one is linked, from where the C++ compiler that built libzmq keeps it.
fn link_libstdcxx_statically() {
    println!("cargo:rerun-if-env-changed=CXXSTDLIB");
    if std::env::var("CXXSTDLIB").map_or(true, |v| !v.is_empty()) {
        return; // the cc crate links a C++ library itself
    }
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let found = Command::new(&cxx)
        .arg("-print-file-name=libstdc++.a")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| std::path::PathBuf::from(s.trim()))
        .filter(|p| p.is_absolute() && p.exists());
    match found.as_ref().and_then(|p| p.parent()) {
        Some(dir) => {
            println!("cargo:rustc-link-search=native={}", dir.display());
            println!("cargo:rustc-link-lib=static=stdc++");
        }
        // No static library: the shared one, as the cc crate would have linked it.
        None => println!("cargo:rustc-link-lib=dylib=stdc++"),
    }
}
