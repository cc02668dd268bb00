//! Room for new jobs: the spool keeps `[source] min_free` of its file system for the results of
//! the jobs it holds. A queue that grew until the disk was full left no room for one result:
//! every job run then failed to store its outcome, none finished, nothing freed a byte, and
//! the worker stayed degraded for good. Results, retries and recovery may use the room kept;
//! new jobs (`submit`, a batch, the ZeroMQ ingress) may not.

use super::*;
use crate::config::bytes;

impl Spool {
    /// Keeps `min_free` for this spool's new jobs (a spool opened without a config keeps the
    /// default: 5% of its file system, at most 256 MiB).
    pub fn set_min_free(&mut self, min_free: crate::config::MinFree) {
        self.min_free = min_free;
    }

    /// Whether new jobs of `bytes_new` bytes may be taken: refused, as a full disk is (`ENOSPC`,
    /// saying why), while the spool's file system would keep less than `min_free` free after
    /// them. A file system that cannot be asked takes them (its writes say what is wrong).
    pub(super) fn room_for_jobs(&self, bytes_new: u64) -> Result<()> {
        let Ok(v) = nix::sys::statvfs::fstatvfs(self.top.as_ref()) else {
            return Ok(());
        };
        let unit = v.fragment_size();
        let free = v.blocks_available().saturating_mul(unit);
        let keep = self.min_free.of(v.blocks().saturating_mul(unit));
        // Nothing kept (`min_free = 0`): the writes themselves say when the disk is full.
        if keep == 0 || free >= keep.saturating_add(bytes_new) {
            return Ok(());
        }
        Err(Error::io(
            format!(
                "the spool \"{}\" has {} free and keeps [source] min_free = {} ({}) for the results of the jobs it holds: no new job is taken until there is room",
                self.root.shown(),
                bytes(free),
                self.min_free,
                bytes(keep)
            ),
            io::Error::from_raw_os_error(libc::ENOSPC),
        ))
    }
}
