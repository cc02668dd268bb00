//! Fault injection, in a build made for the tests alone (`GEARSHIFT_FAULTS=1`, `build.rs`):
//! stalls a test holds open at will.

/// A fault-injection build (tests only): the calling thread stalls while the file the
/// environment variable `var` names exists (a system call stalled by a slow disk, or wedged).
pub fn stall_while(var: &str, what: &str) {
    let Some(p) = std::env::var_os(var) else {
        return;
    };
    if std::path::Path::new(&p).exists() {
        log::warn!("{what} (injected fault, gearshift_faults build)");
        while std::path::Path::new(&p).exists() {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        log::warn!("going on (injected fault, gearshift_faults build)");
    }
}
