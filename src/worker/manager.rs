//! What the worker tells its service manager (sd_notify, `crate::ops::notify`): each message
//! with a STATUS line, and the reload protocol of a Type=notify-reload unit, where systemd
//! waits after its SIGHUP for a `RELOADING=1` stamped after the signal (an older one it
//! ignores), then for `READY=1`, at most TimeoutStartSec (90 s by default) unless the service
//! extends it: while a restart waits for running jobs within their own timeouts, it does.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::control::Control;

/// How often a restart that waits for running jobs extends the service manager's timeout, and
/// by how much (from now) each time.
const EXTEND_EVERY: Duration = Duration::from_secs(5);
const EXTEND_BY: Duration = Duration::from_secs(15);
/// A job this long past its timeout is held (a process the SIGKILL has not ended, a Rust
/// function that ignores its deadline where `abandon_after = "none"`): the wait for it is not
/// extended.
const HELD_PAST: Duration = crate::jobs::pipes::KILL_WAIT.saturating_add(Duration::from_secs(1));

impl Control {
    /// Tells the service manager (if any) `message`, with a STATUS line.
    pub(super) fn notify(&self, message: &str) {
        self.notify_with(message, "");
    }

    /// [`Self::notify`], the STATUS line ending with `more` (one line: escaped by the caller).
    fn notify_with(&self, message: &str, more: &str) {
        if let Some(n) = &self.notifier {
            let s = &self.state;
            let (completed, failed) = s.metrics.totals();
            n.send(&format!(
                "{message}\nSTATUS=generation {}, {} jobs completed, {} failed, {} running{more}",
                s.generation,
                completed,
                failed,
                s.in_flight.load(Ordering::Relaxed)
            ));
        }
    }

    /// `RELOADING=1`, stamped now, with the first extension of the manager's timeout if the
    /// restart waits for running jobs.
    pub(super) fn notify_reloading(&self) {
        let extension = self.extension().unwrap_or_default();
        self.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}{extension}",
            crate::clock::monotonic_us()
        ));
    }

    /// A reload asked by SIGHUP was refused: the service manager's reload ends now, not at its
    /// timeout, begun and over, the STATUS saying why nothing changed (systemd has no word for
    /// a failed reload).
    pub(super) fn notify_refused(&self, error: &str) {
        self.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            crate::clock::monotonic_us()
        ));
        self.notify_with("READY=1", &refused_status(error));
    }

    /// When to extend the manager's timeout next: while `draining` (and there is a manager),
    /// `due` or [`EXTEND_EVERY`] from now.
    pub(super) fn extend_at(&self, draining: bool, due: Option<Instant>) -> Option<Instant> {
        (draining && self.notifier.is_some())
            .then(|| due.unwrap_or_else(|| Instant::now() + EXTEND_EVERY))
    }

    /// Every [`EXTEND_EVERY`] while a restart waits for running jobs: the manager's timeout
    /// extended, unless a job is held past its own.
    pub(super) fn extend_drain(&self) {
        if let Some(extension) = self.extension() {
            self.notify(extension.trim_start());
        }
    }

    /// `\nEXTEND_TIMEOUT_USEC=...` while jobs run, each within its timeout (or without one),
    /// and there is a service manager to tell.
    fn extension(&self) -> Option<String> {
        self.notifier.as_ref()?;
        let now_us = crate::clock::monotonic_us();
        // A Rust function is abandoned `abandon_after` past its timeout: the wait for it ends.
        let abandons = self.plan.config.worker.abandon_after.is_some();
        let held = |s: &crate::status::LaneSlot| {
            !(s.rust && abandons) && s.past_timeout(now_us, HELD_PAST.as_millis() as u64)
        };
        let running = self.state.running.lock().ok()?;
        let busy = running.iter().filter(|s| s.busy);
        if busy.clone().next().is_none() || busy.clone().any(held) {
            return None;
        }
        Some(format!("\nEXTEND_TIMEOUT_USEC={}", EXTEND_BY.as_micros()))
    }
}

/// The end of a STATUS line for a refused reload: the error on one line (escaped: a line break
/// in it would be another assignment to the service manager), at most 512 bytes of it.
fn refused_status(error: &str) -> String {
    let escaped = crate::text::escape(error);
    let mut end = escaped.len().min(512);
    while !escaped.is_char_boundary(end) {
        end -= 1;
    }
    format!("; reload refused: {}", &escaped[..end])
}

#[cfg(test)]
mod tests {
    use super::refused_status;

    #[test]
    fn a_refusal_is_one_bounded_line() {
        let s = refused_status("bad\nMAINPID=1");
        assert_eq!(s, "; reload refused: bad\\nMAINPID=1");
        let long = refused_status(&"é".repeat(400));
        assert!(
            long.len() <= "; reload refused: ".len() + 512,
            "{}",
            long.len()
        );
        assert!(long.ends_with('é'));
    }
}
