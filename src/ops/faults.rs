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

/// A duration in milliseconds the environment variable `var` sets, if it does (a wait the
/// tests shorten).
pub fn millis(var: &str) -> Option<std::time::Duration> {
    let ms = std::env::var(var).ok()?.parse().ok()?;
    Some(std::time::Duration::from_millis(ms))
}

/// The watch thread's read, as the tests ask: with `GEARSHIFT_FAULT_WATCH_READ` set, the first
/// events read become a failed read; what was read is handed on only once the file
/// `GEARSHIFT_FAULT_STALL_WATCH` names is gone (a watch thread not scheduled).
pub fn watch_read<T>(waited: std::io::Result<T>) -> std::io::Result<T> {
    if std::env::var_os("GEARSHIFT_FAULT_WATCH_READ").is_some() {
        return waited.and_then(|_| {
            Err(std::io::Error::other(
                "injected fault (gearshift_faults build)",
            ))
        });
    }
    stall_while("GEARSHIFT_FAULT_STALL_WATCH", "stalling the watch");
    waited
}

/// `result`, or EMFILE while the file the environment variable `var` names exists (a read
/// that fails for want of descriptors).
pub fn fail_while<T>(var: &str, result: crate::Result<T>) -> crate::Result<T> {
    match emfile_while(var, "reading", Ok(())) {
        Err(e) => Err(crate::Error::io(
            "reading (injected fault, gearshift_faults build)",
            e,
        )),
        Ok(()) => result,
    }
}

/// `result`, or EMFILE (said in the log, with `what`) while the file the environment variable
/// `var` names exists.
pub fn emfile_while<T>(var: &str, what: &str, result: std::io::Result<T>) -> std::io::Result<T> {
    match std::env::var_os(var) {
        Some(p) if std::path::Path::new(&p).exists() => {
            log::warn!("EMFILE for {what} (injected fault, gearshift_faults build)");
            Err(std::io::Error::from_raw_os_error(libc::EMFILE))
        }
        _ => result,
    }
}

/// EAGAIN for a thread named `name` while `GEARSHIFT_FAULT_NO_THREAD` is "NAME:PATH" and the
/// file PATH exists (the worker's user out of processes, for that thread alone).
pub fn no_thread(name: &str) -> std::io::Result<()> {
    let Some(v) = std::env::var("GEARSHIFT_FAULT_NO_THREAD").ok() else {
        return Ok(());
    };
    match v.split_once(':') {
        Some((n, p)) if n == name && std::path::Path::new(p).exists() => {
            Err(std::io::Error::from_raw_os_error(libc::EAGAIN))
        }
        _ => Ok(()),
    }
}
