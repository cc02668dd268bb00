//! Whether a candidate binary's refusal is its own fault or that of the files its pre-flight
//! read, so that one refused while config.toml was being edited is judged again once the file
//! is back (`candidate.rs`).

/// Whether a candidate's refusal may be the fault of config.toml or `jobs_dir` (its pre-flight,
/// `check`, read them) rather than its own. File events cannot tell: the config's directory
/// reports every file in it (a log written there, say), so the looks at the files count.
#[derive(Default)]
pub(super) struct Verdicts {
    /// Looks at the files that found them not as the running generation has them.
    moved: u64,
    /// The pre-flight under way, when first seen: `moved` then, and whether the files were
    /// refused then.
    since: Option<(u64, bool)>,
    /// A refusal whose verdict waits for the look at the files an event asked for: `moved`
    /// when its pre-flight was first seen.
    waiting: Option<u64>,
    /// The last refusal may be the files' fault: judged again once they are as the
    /// generation runs them.
    pub(super) stale: bool,
}

impl Verdicts {
    /// After a look at the binary's path: `deciding`, a pre-flight is under way; `refused`, one
    /// ended refused; `files_refused`, the files are refused now; `look_due`, an event asked for
    /// a look at them that has not happened yet.
    pub(super) fn looked(
        &mut self,
        deciding: bool,
        refused: bool,
        files_refused: bool,
        look_due: bool,
    ) {
        if let Some((at, was)) = self.since.filter(|_| refused) {
            self.stale = was || files_refused || (!look_due && at != self.moved);
            self.waiting = (!self.stale && look_due).then_some(at);
        }
        if deciding {
            self.since.get_or_insert((self.moved, files_refused));
        } else {
            self.since = None;
        }
    }

    /// After a look at the files: `moved`, not as the running generation has them.
    pub(super) fn files_looked(&mut self, moved: bool) {
        self.moved += u64::from(moved);
        if let Some(at) = self.waiting.take() {
            self.stale |= at != self.moved;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Verdicts;

    #[test]
    fn a_refusal_is_stale_only_when_the_files_moved_under_its_pre_flight() {
        // Settled throughout: the binary's own fault, whether a look was due (a log line in
        // the config's directory) or not.
        let mut v = Verdicts::default();
        v.looked(true, false, false, false);
        v.looked(false, true, false, false);
        assert!(!v.stale);
        v.looked(true, false, false, false);
        v.looked(false, true, false, true);
        v.files_looked(false);
        assert!(!v.stale);
        // Broken after it began, the refusal seen before the look: that look decides.
        v.looked(true, false, false, false);
        v.looked(false, true, false, true);
        assert!(!v.stale);
        v.files_looked(true);
        assert!(v.stale);
        // Broken and put back while it ran, both looked at before its verdict.
        let mut v = Verdicts::default();
        v.looked(true, false, false, false);
        v.files_looked(true);
        v.files_looked(false);
        v.looked(false, true, false, false);
        assert!(v.stale);
        // Begun, or ended, while the files were refused.
        let mut v = Verdicts::default();
        v.looked(true, false, true, false);
        v.looked(false, true, false, false);
        assert!(v.stale);
        let mut v = Verdicts::default();
        v.looked(true, false, false, false);
        v.looked(false, true, true, false);
        assert!(v.stale);
        // A later refusal from a settled pre-flight is the binary's again.
        v.looked(true, false, false, false);
        v.looked(false, true, false, false);
        assert!(!v.stale);
        // A refusal with no pre-flight (not executable, say) says nothing of the files.
        v.files_looked(true);
        v.looked(false, true, true, false);
        assert!(!v.stale);
    }
}
