//! What the worker tells its service manager (sd_notify, `crate::ops::notify`): each message
//! with a STATUS line, and the reload protocol of a Type=notify-reload unit, where systemd
//! waits after its SIGHUP for a `RELOADING=1` stamped after the signal (an older one it
//! ignores), then for `READY=1`.

use std::sync::atomic::Ordering;

use super::control::Control;

impl Control {
    /// Tells the service manager (if any) `message`, with a STATUS line.
    pub(super) fn notify(&self, message: &str) {
        self.notify_with(message, "");
    }

    /// [`Self::notify`], the STATUS line ending with `more` (one line: escaped by the caller).
    pub(super) fn notify_with(&self, message: &str, more: &str) {
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

    /// `RELOADING=1`, stamped now.
    pub(super) fn notify_reloading(&self) {
        self.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}",
            crate::clock::monotonic_us()
        ));
    }

    /// A reload asked by SIGHUP was refused: the service manager's reload ends now, not at its
    /// timeout, begun and over, the STATUS saying why nothing changed (systemd has no word for
    /// a failed reload).
    pub(super) fn notify_refused(&self, error: &str) {
        self.notify_reloading();
        self.notify_with("READY=1", &refused_status(error));
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
