//! Waiting for a job's outcome (`submit --wait`): looked for every millisecond or few in the
//! first second, then with inotify on `done/` and `failed/`. A job of less than a second gets
//! no inotify instance: closing one waits for the kernel's SRCU grace period (the fsnotify
//! group's teardown), which took up to 15 ms here, three times an instant job's whole round
//! trip (docs/measurements.md, "`submit --wait`").

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{Lookup, Spool};
use crate::error::Result;
use crate::watch::inotify::Inotify;

/// How long the outcome is looked for before inotify is set up (about 240 looks of a few
/// directory lookups each, some 3 ms of the client's CPU); the pauses between looks in
/// [`pause`].
const EAGER: Duration = Duration::from_secs(1);
const FIRST_PAUSE: Duration = Duration::from_micros(250);

/// The pause after a look, `waited` into the wait: doubling from [`FIRST_PAUSE`] to 1 ms in
/// the first 16 ms, then 2 ms to 100 ms, then 5 ms (an outcome is seen at most that late).
fn pause(last: Duration, waited: Duration) -> Duration {
    if waited < Duration::from_millis(16) {
        last.saturating_mul(2).min(Duration::from_millis(1))
    } else if waited < Duration::from_millis(100) {
        Duration::from_millis(2)
    } else {
        Duration::from_millis(5)
    }
}
/// How often the outcome is looked for again with inotify (which may miss nothing but an
/// outcome that reaches no file: a results log), and without it.
const RECHECK: Duration = Duration::from_secs(2);
const RECHECK_UNWATCHED: Duration = Duration::from_millis(100);

/// One job waited for, across calls of [`Waiting::wait`] (its watch is made once).
pub struct Waiting<'a> {
    spool: &'a Spool,
    id: &'a str,
    since: Instant,
    pause: Duration,
    watch: Option<io::Result<Inotify>>,
    buf: Vec<u8>,
}

impl Spool {
    /// Blocks until job `id` has finished or `timeout` passed.
    pub fn wait(&self, id: &str, timeout: Option<Duration>) -> Result<Lookup> {
        self.waiting(id).wait(timeout)
    }

    /// Waits for job `id` in steps (`Waiting::wait`).
    pub fn waiting<'a>(&'a self, id: &'a str) -> Waiting<'a> {
        Waiting {
            spool: self,
            id,
            since: Instant::now(),
            pause: FIRST_PAUSE,
            watch: None,
            buf: Vec::new(),
        }
    }

    /// Inotify on `done/` and `failed/`, through the directories' descriptors
    /// (`/proc/self/fd/N` names the open directory itself): a link renamed over a path since
    /// the spool was opened is never followed, by root either.
    fn watch_outcomes(&self) -> io::Result<Inotify> {
        let ino = Inotify::new()?;
        for sub in ["done", "failed"] {
            let dir = self.opened(sub).map_err(io::Error::other)?;
            ino.add_arrivals(Path::new(&format!("/proc/self/fd/{}", dir.as_raw_fd())))?;
        }
        Ok(ino)
    }
}

impl Waiting<'_> {
    /// Blocks until the job has finished or `timeout` passed (then: how it stands).
    pub fn wait(&mut self, timeout: Option<Duration>) -> Result<Lookup> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if self.watch.is_none() && self.since.elapsed() >= EAGER {
                let watch = self.spool.watch_outcomes();
                if let Err(e) = &watch {
                    log::debug!("no inotify for waiting ({e}); checking every 100 ms");
                }
                self.watch = Some(watch);
            }
            // The result record lands in done/ or failed/ a moment before the job leaves cur/:
            // look for it first, so the answer comes with the event, not with a recheck.
            if let Some(r) = self.spool.read_finished(self.id)? {
                return Ok(Lookup::Finished(r));
            }
            let pending = match self.spool.lookup(self.id)? {
                l @ (Lookup::Unknown | Lookup::Finished(_)) => return Ok(l),
                pending => pending,
            };
            let left = match deadline {
                Some(d) if Instant::now() >= d => return Ok(pending),
                Some(d) => d.saturating_duration_since(Instant::now()),
                None => Duration::MAX,
            };
            match &self.watch {
                None => {
                    std::thread::sleep(self.pause.min(left));
                    self.pause = pause(self.pause, self.since.elapsed());
                }
                Some(Ok(ino)) => {
                    self.buf.resize(4096, 0);
                    drop(ino.wait(Some(RECHECK.min(left)), &mut self.buf));
                }
                Some(Err(_)) => std::thread::sleep(RECHECK_UNWATCHED.min(left)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn looks_come_often_at_first_then_less_and_inotify_takes_over_after_a_second() {
        let ms = Duration::from_millis;
        let mut last = FIRST_PAUSE;
        let mut waited = last;
        let mut looks = 1;
        while waited < EAGER {
            last = pause(last, waited);
            waited += last;
            looks += 1;
            let most = if waited <= ms(17) {
                ms(1)
            } else if waited <= ms(102) {
                ms(2)
            } else {
                ms(5)
            };
            assert!(last <= most, "{last:?} after {waited:?}");
        }
        assert_eq!(pause(FIRST_PAUSE, ms(1)), ms(1) / 2, "doubling at first");
        assert!(
            (200..=260).contains(&looks),
            "{looks} looks in the first second"
        );
    }
}
