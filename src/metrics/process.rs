//! The standard `process_*` metrics (as the official client libraries name them), read from
//! `/proc/self` at scrape time. The process is the same across every re-exec, so its CPU time
//! and start time carry on by themselves.

use std::fmt::Write;

/// Appends the process metrics; any that cannot be read is left out.
pub fn render(w: &mut String) {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .filter(|t| *t > 0)
        .unwrap_or(100) as f64;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .filter(|p| *p > 0)
        .unwrap_or(4096) as u64;
    if let Some(stat) = crate::ops::procfs::Stat::of(None) {
        let cpu = (stat.utime + stat.stime) as f64 / ticks;
        metric(
            w,
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            &format!("{cpu}"),
        );
        metric(
            w,
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            &stat.vsize.to_string(),
        );
        metric(
            w,
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            &(stat.rss_pages * page).to_string(),
        );
        if let Some(boot) = boot_time() {
            let start = boot as f64 + stat.starttime as f64 / ticks;
            metric(
                w,
                "process_start_time_seconds",
                "gauge",
                "Start time of the process since unix epoch in seconds.",
                &format!("{start}"),
            );
        }
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        // The directory's own descriptor is among the entries.
        let n = dir.count().saturating_sub(1);
        metric(
            w,
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            &n.to_string(),
        );
    }
    if let Ok((soft, _)) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
    {
        metric(
            w,
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            &soft.to_string(),
        );
    }
}

fn metric(w: &mut String, name: &str, kind: &str, help: &str, value: &str) {
    let _ = writeln!(
        w,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// Boot time (seconds since the epoch), from `/proc/stat`'s `btime`.
fn boot_time() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn stat_survives_a_hostile_command_name() {
        let line = "42 (a) b) (c) S 1 2 3 4 5 6 7 8 9 10 110 20 0 0 20 0 3 0 5000 123456 77 18446744073709551615 0 0";
        let s = crate::ops::procfs::Stat::parse(line).unwrap();
        assert_eq!((s.utime, s.stime), (110, 20));
        assert_eq!((s.starttime, s.vsize, s.rss_pages), (5000, 123456, 77));
    }

    #[test]
    fn own_process_is_readable() {
        let mut w = String::new();
        render(&mut w);
        for name in [
            "process_cpu_seconds_total ",
            "process_resident_memory_bytes ",
            "process_start_time_seconds ",
            "process_open_fds ",
            "process_max_fds ",
        ] {
            assert!(w.contains(name), "{name} missing in {w}");
        }
    }
}
