//! A generation's recycling limits (`max_jobs`, `max_rss_mb`, `max_age`), each raised by its
//! own random splay so that a fleet started together does not recycle together.

use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// This generation's recycling limits, each raised by its own random splay.
pub(super) struct Limits {
    pub(super) max_jobs: u64,
    pub(super) max_rss_bytes: u64,
    pub(super) max_age: Option<Duration>,
    /// A lane reached a limit and asked the control loop to recycle; lanes claim nothing
    /// until it has decided (it drains, or it refused).
    pub(super) asked: AtomicBool,
    /// The control loop refused a recycle in this generation (the files on disk are invalid):
    /// the limits are not asked about again until the next generation.
    pub(super) refused: AtomicBool,
    /// Why `max_rss_mb` is off for this generation, if it is (see [`Limits::new`]).
    pub(super) rss_warning: Option<String>,
}

impl Limits {
    /// A `max_rss_mb` this generation already exceeds as it starts is off for it, with a
    /// warning: the next generation would start as large, so recycling for it would only
    /// restart the worker after every job.
    pub(super) fn new(w: &crate::config::Worker) -> Limits {
        let splay = |x: f64| x * (1.0 + w.recycle_splay * crate::clock::random_fraction());
        let mut max_rss_bytes = if w.max_rss_mb == 0 {
            0
        } else {
            splay((w.max_rss_mb << 20) as f64) as u64
        };
        let mut rss_warning = None;
        // Read only when the limit is on: every generation's start would pay for it.
        let rss = (max_rss_bytes > 0).then(resident_bytes).flatten();
        if let Some(rss) = rss.filter(|&r| r >= max_rss_bytes) {
            rss_warning = Some(format!(
                "[worker] max_rss_mb = {} is below what a fresh generation already uses ({} MiB resident): recycling for it would restart after every job, so it is off until the limit is raised",
                w.max_rss_mb,
                rss.div_ceil(1 << 20)
            ));
            max_rss_bytes = 0;
        }
        Limits {
            max_jobs: if w.max_jobs == 0 {
                0
            } else {
                splay(w.max_jobs as f64).round() as u64
            },
            max_rss_bytes,
            rss_warning,
            max_age: w
                .max_age
                .map(|a| a.mul_f64(1.0 + w.recycle_splay * crate::clock::random_fraction())),
            asked: AtomicBool::new(false),
            refused: AtomicBool::new(false),
        }
    }

    /// [`Limits::new`], its warning and the process's own limits' (if any) logged and shown by
    /// `status`.
    pub(super) fn for_generation(
        w: &crate::config::Worker,
        state: &crate::status::State,
    ) -> Limits {
        let limits = Limits::new(w);
        let rlimits = [file_size_warning(), cpu_time_warning()];
        for warning in limits.rss_warning.iter().chain(rlimits.iter().flatten()) {
            log::warn!("{warning}");
            if let Ok(mut i) = state.inner.lock() {
                i.warnings.push(warning.clone());
            }
        }
        limits
    }
}

/// Resident memory of this process, from /proc/self/statm.
pub(super) fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE).ok()??;
    Some(pages * u64::try_from(page).ok()?)
}

/// A file size limit on the process (`ulimit -f`, systemd's `LimitFSIZE=`), said at every
/// start: every write past it fails (see `sigstate::survive_file_size_limit`), which the worker
/// then meets as a storage fault that lasts until the file is smaller.
fn file_size_warning() -> Option<String> {
    let (soft, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_FSIZE).ok()?;
    (soft != libc::RLIM_INFINITY).then(|| {
        format!(
            "a file size limit of {soft} bytes is set (ulimit -f, LimitFSIZE=): any write past it fails (the log, the spool's files, its journal segments written 256 KiB ahead), and the worker waits as for a full disk; raise or remove it"
        )
    })
}

/// A CPU time limit on the process (`ulimit -t`, systemd's `LimitCPU=`), said at every start:
/// it counts the worker's own CPU time since its first start, which no reload resets (the
/// same process). Its soft limit reached (SIGXCPU), the worker stops after its running jobs and
/// exits for its supervisor (`Control::cpu_time_spent`); its hard limit is a SIGKILL.
fn cpu_time_warning() -> Option<String> {
    let (soft, hard) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_CPU).ok()?;
    (soft != libc::RLIM_INFINITY).then(|| {
        let end = if hard == soft {
            "the kernel kills it (jobs in flight with it: the hard limit is the same)".to_string()
        } else {
            let at_hard = if hard == libc::RLIM_INFINITY {
                String::new()
            } else {
                format!(" (the kernel kills it at the hard limit, {hard} s)")
            };
            format!("it stops after its running jobs and exits (status 1) for a supervisor or systemd to start it afresh{at_hard}")
        };
        format!(
            "a CPU time limit of {soft} s is set (ulimit -t, LimitCPU=): it counts the worker's own CPU time since its first start, which no reload resets; once it is reached, {end}; raise or remove it"
        )
    })
}
