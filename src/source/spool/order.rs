//! Job ids that sort in submission order, and ages, whatever the wall clock does.
//!
//! A wall-clock step (NTP, an operator's `date -s`, a VM resumed) must neither reorder the queue
//! nor make a job that waited two seconds look an hour old. So an id carries no wall-clock
//! time: it is `f`, the spool's boot epoch (7 hex digits), `CLOCK_BOOTTIME` in nanoseconds (16
//! hex digits, never stepped, counts suspend), then `-pid-seq` for uniqueness. The epoch is how
//! many boots have submitted to this spool: the first submitter after a boot advances it in
//! `dir/.epoch` (durably, before its job is written), so every id of a later boot sorts after
//! every id of an earlier one. Racing first submitters write the same value.
//!
//! The leading `f` sorts these ids after the older wall-clock ids (16 hex digits of Unix
//! nanoseconds, `1...` until the 2100s), so a spool upgraded with jobs queued keeps its order.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Once;

use crate::error::{Error, Result};
use crate::ops::safefs::Dir;

/// Where the spool's boot epoch is kept: `EPOCH BOOT_ID`.
const EPOCH_FILE: &str = ".epoch";
/// The largest epoch (7 hex digits); past it, ids of later boots keep this one.
const MAX_EPOCH: u32 = 0x0fff_ffff;

/// This boot's identity (random per boot, from the kernel).
fn boot_id() -> Result<String> {
    let id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map_err(|e| Error::io("reading /proc/sys/kernel/random/boot_id", e))?;
    Ok(id.trim().to_string())
}

/// This boot's identity in 8 hex digits (cached), or "0" if the kernel cannot say.
pub(super) fn boot_tag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        boot_id()
            .ok()
            .map(|id| {
                id.chars()
                    .filter(|c| c.is_ascii_hexdigit())
                    .take(8)
                    .collect()
            })
            .filter(|t: &String| t.len() == 8)
            .unwrap_or_else(|| "0".into())
    })
}

/// `CLOCK_BOOTTIME` in nanoseconds: monotonic, counting suspend, reset only by a boot.
pub(super) fn boottime_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME).map_or(0, |t| {
        (t.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(t.tv_nsec() as u64)
    })
}

/// The epoch `dir/.epoch` records, and whether it was recorded during this boot.
fn recorded(root: &Dir) -> Result<Option<(u32, bool)>> {
    let Some(bytes) = root.read_small(EPOCH_FILE, 128)? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&bytes);
    let mut parts = text.split_whitespace();
    let epoch = parts
        .next()
        .and_then(|n| u32::from_str_radix(n, 16).ok())
        .filter(|n| *n <= MAX_EPOCH);
    Ok(epoch.map(|n| {
        (
            n,
            parts.next() == Some(boot_id().ok().as_deref().unwrap_or("")),
        )
    }))
}

/// The spool's epoch for this boot, for readers (ages): None if nothing was submitted since
/// the boot.
pub(super) fn this_boot(root: &Dir) -> Option<u32> {
    recorded(root)
        .ok()
        .flatten()
        .filter(|(_, now)| *now)
        .map(|(n, _)| n)
}

/// The spool's epoch for this boot, advancing `dir/.epoch` on the first use after a boot.
/// `prepare` gets the new file before it is renamed into place (to give it to the spool's
/// owner); with `fsync` the file and the directory are synced, so a power cut cannot hand the
/// same epoch to two boots.
pub(super) fn advance(
    root: &Dir,
    fsync: bool,
    prepare: impl Fn(&std::fs::File, &str) -> Result<()>,
) -> Result<u32> {
    let boot = boot_id()?;
    let next = match recorded(root)? {
        Some((n, true)) => return Ok(n),
        Some((n, false)) => (n + 1).min(MAX_EPOCH),
        None => 1,
    };
    let tmp = format!("{EPOCH_FILE}.{}.tmp", unique());
    let written = (|| {
        let mut f = root.create_new(&tmp, 0o640)?;
        prepare(&f, &tmp)?;
        std::io::Write::write_all(&mut f, format!("{next:x} {boot}\n").as_bytes())
            .map_err(|e| Error::io("writing the spool's .epoch", e))?;
        if fsync {
            f.sync_all()
                .map_err(|e| Error::io("syncing the spool's .epoch", e))?;
        }
        root.rename(&tmp, EPOCH_FILE)?;
        if fsync {
            root.sync()?;
        }
        Ok(())
    })();
    if written.is_err() {
        let _ = root.remove(&tmp);
    }
    written.map(|()| next)
}

/// A new job id of `epoch`, sorting after every id made before it in this spool.
pub(super) fn job_id(epoch: u32) -> String {
    format!("f{epoch:07x}{:016x}-{}", boottime_ns(), unique())
}

/// `pid-seq`: unique among the ids this host makes at once (temp file names, set-aside names).
pub(super) fn unique() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("{:x}-{seq:x}", pid())
}

/// This process's id, asked of the kernel once: glibc does not cache `getpid`, and the ZeroMQ
/// ingress makes an id for every message (a system call each). A forked child forgets it (it
/// has its own), so two processes never share one.
fn pid() -> u32 {
    static PID: AtomicU32 = AtomicU32::new(0);
    static FORGET: Once = Once::new();
    extern "C" fn forget() {
        PID.store(0, Ordering::Relaxed);
    }
    FORGET.call_once(|| {
        // SAFETY: registers, for the child side of every later fork, a handler that only
        // stores to an atomic (async-signal-safe); no memory of ours is handed over.
        unsafe { libc::pthread_atfork(None, None, Some(forget)) };
    });
    match PID.load(Ordering::Relaxed) {
        0 => {
            let pid = std::process::id();
            PID.store(pid, Ordering::Relaxed);
            pid
        }
        pid => pid,
    }
}

/// How long ago job `id` was submitted, in µs, by the clock its id carries: this boot's
/// `CLOCK_BOOTTIME` for an id of `epoch` (this boot's, if any); at least the time since boot
/// for an id of an earlier boot (a lower bound); the wall clock for an old-style id (never
/// negative).
pub(super) fn age_us(id: &str, epoch: Option<u32>, now_wall_ns: u64) -> Option<u64> {
    if let Some(rest) = id.strip_prefix('f') {
        let e = rest
            .get(..7)
            .and_then(|h| u32::from_str_radix(h, 16).ok())?;
        let ns = rest
            .get(7..23)
            .and_then(|h| u64::from_str_radix(h, 16).ok())?;
        let now = boottime_ns();
        return Some(if Some(e) == epoch {
            now.saturating_sub(ns) / 1000
        } else {
            now / 1000
        });
    }
    let ns = id.get(..16).and_then(|h| u64::from_str_radix(h, 16).ok())?;
    Some(now_wall_ns.saturating_sub(ns) / 1000)
}

/// The queue's depth and the age of its oldest job, as metrics show them.
impl super::Spool {
    /// Jobs waiting (`new/`) and running (`cur/`), and the age of the oldest waiting one (by
    /// the clock its id carries, see `order.rs`). One directory read each; at most a million
    /// entries are looked at.
    /// The queue's depth, running jobs and oldest age, with what `direct` (queued, running,
    /// oldest queued id) holds besides the files.
    pub(crate) fn queue_stats(
        &self,
        direct: (u64, u64, Option<String>),
    ) -> crate::metrics::QueueStats {
        const LIMIT: usize = 1_000_000;
        let names = |sub: &str| {
            std::fs::read_dir(self.dir(sub))
                .into_iter()
                .flatten()
                .take(LIMIT)
                .flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| super::valid_id(n))
        };
        // Ids sort by submission: the smallest is the oldest waiting job.
        let (mut depth, direct_running, mut oldest) = direct;
        for name in names("new") {
            depth += 1;
            if oldest.as_ref().is_none_or(|o| name < *o) {
                oldest = Some(name);
            }
        }
        let now_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let epoch = this_boot(&self.top);
        crate::metrics::QueueStats {
            depth,
            running: names("cur").count() as u64 + direct_running,
            oldest_age_us: oldest.and_then(|o| age_us(&o, epoch, now_ns)).unwrap_or(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pid_in_names_is_each_processs_own_after_a_fork() {
        assert_eq!(pid(), std::process::id());
        // SAFETY: the child only asks for pids and leaves with _exit (no allocation, no lock).
        match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Child) => {
                let own = pid() == std::process::id() && pid() != 0;
                // SAFETY: ends the child at once, without running the test harness's exit.
                unsafe { libc::_exit(if own { 0 } else { 1 }) }
            }
            Ok(nix::unistd::ForkResult::Parent { child }) => {
                let status = nix::sys::wait::waitpid(child, None).expect("wait");
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
            Err(e) => panic!("fork: {e}"),
        }
        assert_eq!(pid(), std::process::id());
    }

    #[test]
    fn ids_sort_by_epoch_then_boot_time_and_after_old_ids() {
        let a = job_id(1);
        let b = job_id(1);
        let c = job_id(2);
        assert!(a < b && b < c, "{a} {b} {c}");
        assert!(super::super::valid_id(&a), "{a}");
        // An old-style id of today (Unix nanoseconds) sorts first.
        assert!("18ed2c21749797d4-2e13-0" < a.as_str());
        let later = job_id(1);
        let age = age_us(&later, Some(1), 0).expect("parsed");
        assert!(age < 60_000_000, "{age}");
        assert!(age_us(&later, Some(2), 0).expect("parsed") >= age);
        assert_eq!(
            age_us("00000000000007d0-1-0", None, 1000),
            Some(0),
            "never negative"
        );
        assert_eq!(age_us("00000000000007d0-1-0", None, 4000), Some(2));
        assert_eq!(age_us("not-an-id", None, 0), None);
    }
}
