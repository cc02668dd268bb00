//! Outcomes that cross an exec: a restart does not wait for the group commit.
//!
//! The lanes of a generation being replaced stop without waiting for their outcomes' sync; the
//! commit thread finishes the sync under way and parks (what it has not placed yet goes back to
//! its queue; its segment is sealed); the outcomes not yet in place (their jobs still in `cur/`)
//! travel in the restart parcel, ahead of the queue's head. The next generation commits
//! them first thing, and its start-up recovery leaves their jobs in `cur/` alone. If the exec
//! fails, the commit thread goes on with them. A generation whose successor serves another
//! spool stores them itself instead (`worker::restart`). If they never arrive (a crash during
//! the exec, an older image that does not read them), their jobs are still in
//! `cur/` and run again: at least once, as after a kill. Nothing is reported stored before its
//! sync, in either generation.
//!
//! Without the group commit (`fsync = false`) each lane places its own outcome, and one that
//! a storage fault (a full disk) keeps out of place is held by its lane, which tries again;
//! while the lanes stop for an exec it is kept here instead (`unplaced`, within the same
//! budget) and crosses the exec the same way, so a disk full for good does not hold a reload.
//! The next generation places such outcomes before its lanes claim anything, and is degraded
//! until it can.

use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::Ordering;

use super::journal::{self, Entry};
use super::source::SpoolSource;
use crate::error::{Error, Result, Tier};

/// Outcomes carried at most (bytes of records); more are stored before the exec instead.
const CARRY_BUDGET: usize = 768 << 10;
/// The first line of a hand-over that carries outcomes: the tag, the records' length and the
/// spool's root (hex), then the records, then the queue's head as before.
const TAG: &[u8] = b"#outcomes ";

/// What a previous generation handed over, split.
pub(super) struct Handed<'a> {
    /// Outcomes to commit first (for this spool only).
    pub(super) outcomes: Vec<Entry>,
    /// The queue's head listing.
    pub(super) listing: &'a [u8],
}

impl SpoolSource {
    /// The lanes are being stopped for a re-exec (`true`) or for good: with a re-exec they
    /// leave their outcomes to [`SpoolSource::carry_outcomes`] instead of waiting for them.
    pub(super) fn set_handing_over(&self, yes: bool) {
        self.handing_over.store(yes, Ordering::Release);
        if let Some(c) = &self.committer {
            c.set_handing_over(yes);
        }
    }

    pub(super) fn handing_over(&self) -> bool {
        self.handing_over.load(Ordering::Acquire)
    }

    /// Before an exec: parks the commit thread and keeps the outcomes still waiting for the
    /// hand-over. False if that cannot be done (not asked, too many bytes, the thread did not
    /// park in time): then the caller stores them here as before.
    pub(super) fn carry_outcomes(&self) -> bool {
        if !self.handing_over() {
            return false;
        }
        let (count, records) = match &self.committer {
            Some(c) => match c.park(super::commit::SETTLE_WAIT) {
                Some(entries) => (entries.len(), journal::encode_all(&entries)),
                None => return false,
            },
            // Kept in `unplaced` too, should the exec fail.
            None => match self.unplaced_list() {
                Ok(kept) if !kept.is_empty() => (kept.len(), journal::encode_all(&kept)),
                _ => return false,
            },
        };
        if records.len() > CARRY_BUDGET {
            if let Some(c) = &self.committer {
                c.unpark();
            }
            return false;
        }
        let mut head = TAG.to_vec();
        head.extend_from_slice(format!("{} {}\n", records.len(), hex(&self.spool.root)).as_bytes());
        head.extend_from_slice(&records);
        match self.carried.lock() {
            Ok(mut slot) => {
                log::debug!("{count} outcome(s) cross the exec");
                *slot = Some(head);
                true
            }
            Err(_) => {
                if let Some(c) = &self.committer {
                    c.unpark();
                }
                false
            }
        }
    }

    /// Without the group commit, a lane places its outcome itself. One that a storage fault
    /// keeps out of place is the lane's to try again (with its job's share of its segment),
    /// unless the lanes stop for an exec: then it crosses the exec instead of holding it up.
    pub(super) fn place_own(&self, mut entry: Entry) -> Result<()> {
        match self.spool.place(&entry) {
            Ok(()) => {
                if let Some(hold) = entry.hold.take() {
                    hold.release();
                }
                Ok(())
            }
            Err(e) if self.handing_over() && e.tier() == Tier::Transient => {
                self.keep_unplaced(entry, e)
            }
            Err(e) => {
                self.give_back(entry);
                Err(e)
            }
        }
    }

    /// The outcome `entry` could not be placed and stays with its lane, to be tried again: a
    /// job that came without a file keeps its share of its segment (`Direct::unfinish`).
    pub(super) fn give_back(&self, entry: Entry) {
        if let Some(hold) = entry.hold {
            self.direct.unfinish(entry.id, hold);
        }
    }

    fn unplaced_list(&self) -> Result<std::sync::MutexGuard<'_, Vec<Entry>>> {
        self.unplaced
            .lock()
            .map_err(|_| Error::Msg("spool: the unplaced outcomes' lock is poisoned".into()))
    }

    /// Keeps an outcome a lane could not place (`fault`) while the lanes stop for an exec, to
    /// cross it; past the budget the fault is given back, and the lane goes on trying.
    pub(super) fn keep_unplaced(&self, entry: Entry, fault: Error) -> Result<()> {
        let size = |e: &Entry| journal::encode_all(std::slice::from_ref(e)).len();
        let mut kept = match self.unplaced_list() {
            Ok(kept) if kept.iter().map(size).sum::<usize>() + size(&entry) <= CARRY_BUDGET => kept,
            _ => {
                self.give_back(entry);
                return Err(fault);
            }
        };
        log::info!(
            "job {}: its outcome cannot be stored now ({fault}); it crosses the restart",
            entry.id
        );
        kept.push(entry);
        Ok(())
    }

    /// Places the outcomes kept unplaced, oldest first; before a lane claims. A storage fault
    /// is returned (the lane claims nothing and tries again with backoff: degraded); an
    /// outcome that fails otherwise is given up, and its job runs again at the next start.
    pub(super) fn place_unplaced(&self) -> Result<()> {
        let mut kept = self.unplaced_list()?;
        while let Some(e) = kept.first_mut() {
            match self.spool.place(e) {
                Ok(()) => {
                    if let Some(hold) = e.hold.take() {
                        hold.release();
                    }
                    log::info!("job {}: its outcome is stored", e.id);
                }
                Err(fault) if fault.tier() == Tier::Transient => return Err(fault),
                Err(fault) => log::error!(
                    "job {}: could not store its outcome ({fault}); it runs again at the next start",
                    e.id
                ),
            }
            kept.remove(0);
        }
        Ok(())
    }

    /// The process ends with outcomes still unplaced: each is tried once more; what still
    /// fails is said, with the ids of those jobs (still in `cur/` or in the journal, they run
    /// again at the next start).
    pub(super) fn leave_unplaced(&self) {
        let Err(e) = self.place_unplaced() else {
            return;
        };
        if let Ok(kept) = self.unplaced_list() {
            let mut ids: Vec<&str> = kept.iter().take(20).map(|k| k.id.as_str()).collect();
            ids.sort_unstable();
            let more = match kept.len() - ids.len() {
                0 => String::new(),
                n => format!(" and {n} more"),
            };
            log::warn!(
                "{} outcome(s) could not be stored ({e}); their jobs run again at the next start: {}{more}",
                kept.len(),
                ids.join(", ")
            );
        }
    }

    /// The exec failed (or the restart was called off): the commit thread goes on with what
    /// it holds, and lanes wait for their outcomes again when they stop.
    pub(super) fn keep_outcomes(&self) {
        self.set_handing_over(false);
        if let Ok(mut slot) = self.carried.lock() {
            *slot = None;
        }
        if let Some(c) = &self.committer {
            c.unpark();
        }
    }

    /// The carried outcomes, as the hand-over's first part.
    pub(super) fn carried_part(&self) -> Option<Vec<u8>> {
        self.carried.lock().ok().and_then(|slot| slot.clone())
    }

    /// Recovers the jobs a killed worker left in `cur/` but those whose outcomes were `handed`
    /// over, commits those outcomes first thing, and takes the queue's head.
    pub(super) fn start_from(&self, handed: &[u8]) -> Result<()> {
        let handed = split(&self.spool.root, handed);
        let finished: HashSet<String> = handed.outcomes.iter().map(|e| e.id.clone()).collect();
        self.recover(&finished)?;
        if let Ok(mut ids) = self.carried_ids.lock() {
            ids.clone_from(&finished);
        }
        self.recommit(handed.outcomes)?;
        self.take_over(handed.listing);
        Ok(())
    }

    /// Commits outcomes a previous generation handed over: with the group commit, or placed
    /// by the lanes before they claim without `fsync`. Their jobs stay in `cur/` until then.
    fn recommit(&self, outcomes: Vec<Entry>) -> Result<()> {
        match &self.committer {
            Some(c) => c.submit_all(outcomes),
            // Placed by the lanes before they claim (`place_unplaced`).
            None => {
                self.unplaced_list()?.extend(outcomes);
                Ok(())
            }
        }
    }
}

/// Splits a hand-over (bytes from outside this image) into the outcomes carried for the spool
/// at `root` and the queue's head listing. Outcomes for another spool, or a part that does not
/// parse, are dropped (their jobs run again).
fn split<'a>(root: &Path, data: &'a [u8]) -> Handed<'a> {
    let plain = Handed {
        outcomes: Vec::new(),
        listing: data,
    };
    let Some(rest) = data.strip_prefix(TAG) else {
        return plain;
    };
    let Some(eol) = rest.iter().position(|&b| b == b'\n') else {
        return plain;
    };
    let line = String::from_utf8_lossy(&rest[..eol]);
    let mut words = line.split(' ');
    let (Some(len), Some(dir)) = (
        words.next().and_then(|n| n.parse::<usize>().ok()),
        words.next(),
    ) else {
        return plain;
    };
    let body = &rest[eol + 1..];
    if len > CARRY_BUDGET || len > body.len() {
        return Handed {
            outcomes: Vec::new(),
            listing: &[],
        };
    }
    let outcomes = if dir == hex(root) {
        journal::decode_all(&body[..len])
            .into_iter()
            .filter(|e| e.kind != journal::Kind::Job)
            .collect()
    } else {
        log::warn!("outcomes handed over for another spool directory are dropped (their jobs run again there)");
        Vec::new()
    };
    Handed {
        outcomes,
        listing: &body[len..],
    }
}

fn hex(path: &Path) -> String {
    path.as_os_str()
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(id: &str) -> Entry {
        Entry::new(journal::Kind::Done, id.into(), b"GSR2 result".to_vec())
    }

    #[test]
    fn carried_outcomes_are_read_back_only_for_the_same_spool() {
        let root = Path::new("/srv/spool");
        let records =
            journal::encode_all(&[done("0000000000000001-01"), done("0000000000000002-01")]);
        let mut data = TAG.to_vec();
        data.extend_from_slice(format!("{} {}\n", records.len(), hex(root)).as_bytes());
        data.extend_from_slice(&records);
        data.extend_from_slice(b"0000000000000003-01\n+\n");
        let h = split(root, &data);
        assert_eq!(h.outcomes.len(), 2);
        assert_eq!(h.listing, b"0000000000000003-01\n+\n");
        let other = split(Path::new("/srv/other"), &data);
        assert!(other.outcomes.is_empty());
        assert_eq!(other.listing, b"0000000000000003-01\n+\n");
        // A listing from an image that carries no outcomes is read as it always was.
        assert_eq!(split(root, b"x\n").listing, b"x\n");
        // A length past the end, or over the budget: nothing is taken from it.
        let mut bad = TAG.to_vec();
        bad.extend_from_slice(format!("{} {}\n", 1 << 30, hex(root)).as_bytes());
        let h = split(root, &bad);
        assert!(h.outcomes.is_empty() && h.listing.is_empty());
    }
}
