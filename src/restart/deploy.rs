//! Deploys: picking up a new binary dropped over the one we run, safely.
//!
//! The directory of the binary's path is watched (a rename over it, a new hard link and an
//! in-place write all show there). A changed file is a candidate once it has been stable (same
//! inode, size, mtime and mode) for [`SETTLE`], is executable, and its sha256 differs from the
//! running image's. The candidate is then run as `CANDIDATE -c CONFIG check` (a child with a
//! timeout and a clean environment); exit 0 approves it and the worker re-execs into it at the
//! next between-jobs point. Anything else refuses it: the candidate's own output goes to the log
//! and to `status` (`last_refused_deploy`), and it is not tried again until the file changes.
//!
//! Architecture invariant: a restart never execs an unvalidated binary. The path is exec'd only
//! if it still holds the running image or the approved candidate (same identity); otherwise the
//! running image itself is exec'd through `/proc/self/exe`.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver};

use super::digest::hash_file;
pub use super::digest::short;
use super::preflight::{Digests, NotPassed, Outcome};
use crate::restart::carried::{Ident, Known};
use crate::status::records::Refused;
use crate::text::ShowPath;

/// How long a candidate must stay unchanged before it is considered whole.
pub const SETTLE: Duration = Duration::from_millis(500);
/// How long the binary's path may resolve to no file (a deploy between its steps) before that
/// is said.
const MISSING_SAID: Duration = Duration::from_secs(10);
/// What the control loop should do next about the binary.
pub enum Step {
    Nothing,
    /// Look again after this long (the file is still changing, or the pre-flight runs).
    CheckIn(Duration),
    /// The candidate passed its pre-flight: restart into it.
    Approved,
}

pub struct Deploy {
    /// The worker's binary path this watch looks at.
    pub path: PathBuf,
    config: PathBuf,
    /// The running image (sha computed in the background on a first start).
    running: Arc<Mutex<Option<Known>>>,
    /// The running image's file (`/proc/self/exe`): the file at the path is that one, no
    /// candidate, also before its digest is known (a file being run cannot be written).
    image: Option<Ident>,
    /// The running image's digest is being computed: a file at the path is judged after it
    /// (whether it holds the running bytes is not known before).
    hashing: Arc<AtomicBool>,
    last_seen: Option<(Ident, Instant)>,
    refused: Option<Ident>,
    approved: Option<Known>,
    /// The approved candidate, open: exec'd through `/proc/self/fd/N`.
    approved_file: Option<File>,
    /// The approved candidate said at its pre-flight that it takes up the lock descriptors an
    /// exec hands it (`preflight::TAKES_LOCKS`).
    approved_takes_locks: bool,
    preflight: Option<(Ident, Receiver<Outcome>)>,
    pub last_refused: Option<Refused>,
    /// Candidates refused and not yet counted (see [`Deploy::take_refusals`]).
    refusals: u64,
    /// A binary that was rolled back from: refused on sight.
    known_bad: Option<String>,
    /// The file whose reading failed, said once.
    unreadable_said: Option<Ident>,
    /// Under a privilege drop, the worker's uid: a candidate that user could have written
    /// would be run by root at the next fresh start, so it is refused.
    worker_uid: Option<u32>,
    /// Since when the path has resolved to no file, and whether that was said.
    missing: Option<(Instant, bool)>,
}

/// Clears its flag when dropped: the end of the thread that holds it, however it ends.
struct ClearOnDrop(Arc<AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Deploy {
    /// `running` is what the previous generation exec'd, if it knew; otherwise the image is
    /// hashed in the background (not on the restart path).
    pub fn new(
        path: &Path,
        config: &Path,
        running: Option<Known>,
        last_refused: Option<Refused>,
        worker_uid: Option<u32>,
        publish: impl Fn(&str) + Send + 'static,
    ) -> Deploy {
        let known = Arc::new(Mutex::new(running.clone()));
        let hashing = Arc::new(AtomicBool::new(running.is_none()));
        if running.is_none() {
            let slot = Arc::clone(&known);
            let path = path.to_path_buf();
            // Cleared when the thread ends, or when it could not be started (the closure dropped).
            let done = ClearOnDrop(Arc::clone(&hashing));
            let _ = crate::ops::signals::spawn_helper("hash-self", move || {
                let _done = done;
                #[cfg(gearshift_faults)]
                crate::ops::faults::stall_while(
                    "GEARSHIFT_FAULT_STALL_HASH_SELF",
                    "stalling the running image's digest",
                );
                // /proc/self/exe is the image we run, even if the path was replaced since.
                if let Ok(sha) = hash_file(Path::new("/proc/self/exe")) {
                    let before = Ident::of(&path);
                    let same = before.filter(|_| hash_file(&path).ok().as_deref() == Some(&sha));
                    let same = same.filter(|i| Ident::of(&path) == Some(*i));
                    publish(&sha);
                    if let Ok(mut k) = slot.lock() {
                        *k = Some(Known {
                            ident: same,
                            sha256: sha,
                        });
                    }
                }
            });
        }
        Deploy {
            path: path.to_path_buf(),
            config: config.to_path_buf(),
            running: known,
            image: Ident::of(Path::new("/proc/self/exe")),
            hashing,
            last_seen: None,
            refused: None,
            approved: None,
            approved_file: None,
            approved_takes_locks: false,
            preflight: None,
            last_refused,
            refusals: 0,
            known_bad: None,
            unreadable_said: None,
            worker_uid,
            missing: None,
        }
    }

    /// Refuses this digest without a pre-flight (a binary we rolled back from).
    pub fn mark_bad(&mut self, sha: &str) {
        self.known_bad = Some(sha.to_string());
    }

    pub fn running_sha(&self) -> Option<String> {
        self.running
            .lock()
            .ok()
            .and_then(|k| k.as_ref().map(|k| k.sha256.clone()))
    }

    fn running_ident(&self) -> Option<Ident> {
        self.running
            .lock()
            .ok()
            .and_then(|k| k.as_ref().and_then(|k| k.ident))
    }

    /// Whether `ident` is a file already judged: the running image, the refused or the
    /// approved candidate.
    fn judged(&self, ident: Ident) -> bool {
        Some(ident) == self.image
            || Some(ident) == self.running_ident()
            || Some(ident) == self.refused
            || self.approved.as_ref().and_then(|a| a.ident) == Some(ident)
    }

    /// The path resolves to no file: a deploy between its steps (the file removed, a link not
    /// yet swapped), or one that went wrong (a release link left dangling or looping). Said once
    /// it lasts [`MISSING_SAID`]: the worker runs on (a restart re-execs the running image), but
    /// a fresh start of that path would fail.
    fn missing(&mut self) -> Step {
        let (since, said) = self.missing.get_or_insert((Instant::now(), false));
        if *said {
            return Step::Nothing;
        }
        if let Some(left) = MISSING_SAID.checked_sub(since.elapsed()) {
            return Step::CheckIn(left.max(SETTLE));
        }
        *said = true;
        let why = std::fs::metadata(&self.path).map_or_else(|e| e.to_string(), |_| "back".into());
        log::warn!(
            "deploy: \"{}\" resolves to no file ({why}) for {}s: the worker runs on as it is (a restart re-execs the running image), but a fresh start of that path would fail; put a binary there",
            self.path.shown(),
            MISSING_SAID.as_secs()
        );
        Step::Nothing
    }

    /// A restart is asked for: a new file at the path (a release link swapped, then a reload)
    /// is checked now, beside the jobs the restart waits for, without waiting for it to settle:
    /// one still open for writing is found busy by its pre-flight and waits as before, and a
    /// truncated one fails. `again`: a refused file is judged again too (a reload by hand or
    /// a new config: what its pre-flight refused may be mended). Nothing while the running
    /// image's own digest is not known yet.
    pub fn hurry(&mut self, again: bool) {
        if self.preflight.is_some() || self.running_sha().is_none() {
            return;
        }
        let Some(ident) = Ident::of(&self.path) else {
            return;
        };
        if again && Some(ident) == self.refused {
            self.refused = None;
        } else if self.judged(ident) {
            return;
        }
        self.begin(ident, again);
    }

    /// A new file at the path is settling, being judged, or approved and not yet run.
    pub fn pending(&self) -> bool {
        self.preflight.is_some()
            || self.approved.is_some()
            || self.last_seen.is_some_and(|(ident, _)| {
                !self.judged(ident) && Ident::of(&self.path) == Some(ident)
            })
    }

    /// A candidate's pre-flight is under way (a restart waits for its verdict).
    pub fn deciding(&self) -> bool {
        self.preflight.is_some()
    }

    /// Looks at the file after an event or a timer.
    pub fn check(&mut self) -> Step {
        if let Some(step) = self.poll_preflight() {
            return step;
        }
        let Some(ident) = Ident::of(&self.path) else {
            return self.missing();
        };
        self.missing = None;
        if self.judged(ident) {
            return Step::Nothing;
        }
        if self.hashing.load(Ordering::Acquire) {
            return Step::CheckIn(Duration::from_millis(100));
        }
        // Stable for SETTLE?
        match self.last_seen {
            Some((seen, since)) if seen == ident => {
                if since.elapsed() < SETTLE {
                    return Step::CheckIn(SETTLE.saturating_sub(since.elapsed()));
                }
            }
            _ => {
                self.last_seen = Some((ident, Instant::now()));
                return Step::CheckIn(SETTLE);
            }
        }
        self.begin(ident, false)
    }

    /// Judges `ident`, the file at the path: refused at once if it cannot be a binary of ours,
    /// else hashed and pre-flighted on a thread of its own.
    /// `again`: judged even if an earlier generation refused these bytes.
    fn begin(&mut self, ident: Ident, again: bool) -> Step {
        // No binary will ever be read from it (it was looked at again every second, a warning
        // each time): refused until something else is there.
        if ident.mode & libc::S_IFMT != libc::S_IFREG {
            let what = crate::ops::safefs::kind_of(ident.mode);
            self.refuse(ident, String::new(), format!("not a regular file ({what})"));
            return Step::Nothing;
        }
        if ident.mode & 0o111 == 0 {
            self.refuse(ident, String::new(), "the file is not executable".into());
            return Step::Nothing;
        }
        if let Some(why) = self
            .worker_uid
            .and_then(|uid| super::preflight::writable_by(&self.path, uid))
        {
            self.refuse(ident, String::new(), why);
            return Step::Nothing;
        }
        // Hashing a binary and running its pre-flight take a while: not on the control thread.
        let (tx, rx) = bounded(1);
        let (path, config) = (self.path.clone(), self.config.clone());
        let say = self.unreadable_said != Some(ident);
        let digests = Digests {
            running: self.running_sha(),
            refused: (!again)
                .then(|| self.last_refused.as_ref().map(|r| r.sha256.clone()))
                .flatten()
                .filter(|sha| !sha.is_empty()),
            bad: self.known_bad.clone(),
        };
        let spawned = crate::ops::signals::spawn_helper("preflight", move || {
            let _ = tx.send(super::preflight::judge(
                &path, &config, ident, &digests, say,
            ));
        });
        if let Err(e) = spawned {
            // The worker's user out of processes, say: no verdict; said once, tried again.
            if self.unreadable_said.replace(ident) != Some(ident) {
                log::warn!(
                    "deploy: cannot start the thread that judges \"{}\" now ({e}); trying again",
                    self.path.shown()
                );
            }
            self.last_seen = None;
            return Step::CheckIn(SETTLE);
        }
        self.preflight = Some((ident, rx));
        Step::CheckIn(Duration::from_millis(50))
    }

    fn poll_preflight(&mut self) -> Option<Step> {
        let (ident, rx) = self.preflight.as_ref()?;
        let outcome = match rx.try_recv() {
            Ok(r) => r,
            Err(crossbeam_channel::TryRecvError::Empty) => {
                return Some(Step::CheckIn(Duration::from_millis(50)))
            }
            Err(_) => Outcome::Unreadable("the pre-flight thread died; trying again".into()),
        };
        let ident = *ident;
        self.preflight = None;
        if Ident::of(&self.path) != Some(ident) {
            // The file changed meanwhile: start over with what is there now.
            self.last_seen = None;
            return Some(Step::CheckIn(SETTLE));
        }
        let (sha, result) = match outcome {
            Outcome::Same(sha) => {
                if let Ok(mut k) = self.running.lock() {
                    *k = Some(Known {
                        ident: Some(ident),
                        sha256: sha,
                    });
                }
                return Some(Step::Nothing);
            }
            Outcome::Refused => {
                self.refused = Some(ident);
                return Some(Step::Nothing);
            }
            Outcome::Unreadable(e) => {
                // Looked at again (it may be a fault that passes), said once per file.
                if self.unreadable_said.replace(ident) != Some(ident) {
                    log::warn!("deploy: {e}");
                }
                self.last_seen = None;
                return Some(Step::CheckIn(SETTLE));
            }
            Outcome::Checked(sha, result, file) => (
                sha,
                result.and_then(|takes| {
                    file.map(|f| (f, takes))
                        .ok_or_else(|| NotPassed::Failed("the checked file was not kept".into()))
                }),
            ),
        };
        match result {
            Ok((file, takes_locks)) => {
                log::info!(
                    "deploy: candidate sha256 {} passed its pre-flight",
                    short(&sha)
                );
                self.approved = Some(Known {
                    ident: Some(ident),
                    sha256: sha,
                });
                self.approved_file = Some(file);
                self.approved_takes_locks = takes_locks;
                Some(Step::Approved)
            }
            Err(NotPassed::Busy | NotPassed::Later(_)) => {
                // Still open for writing somewhere: not whole yet.
                self.last_seen = None;
                Some(Step::CheckIn(SETTLE))
            }
            Err(NotPassed::Failed(e)) => {
                self.refuse(ident, sha, e);
                Some(Step::Nothing)
            }
        }
    }

    fn refuse(&mut self, ident: Ident, sha: String, error: String) {
        log::error!("deploy: refused \"{}\": {error}", self.path.shown());
        self.refused = Some(ident);
        self.refusals += 1;
        self.last_refused = Some(Refused {
            at_ms: crate::clock::now_ms(),
            sha256: sha,
            error: crate::text::cut(&error, 4096).into_owned(),
        });
    }

    /// Refusals since the last call (each is counted once in the metrics).
    pub fn take_refusals(&mut self) -> u64 {
        std::mem::take(&mut self.refusals)
    }

    /// What to exec for the next generation, and what that image is.
    pub fn exec_target(&self) -> (PathBuf, Option<Known>) {
        let now = Ident::of(&self.path);
        if let (Some(a), Some(file)) = (&self.approved, &self.approved_file) {
            // The path still names what was approved (else a newer file awaits its own
            // check): exec the descriptor that was hashed, whatever the path holds by now.
            if now.is_some() && a.ident == now {
                use std::os::fd::AsRawFd;
                let fd = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
                return (fd, Some(a.clone()));
            }
        }
        let running = self.running.lock().ok().and_then(|k| k.clone());
        match &running {
            Some(k) if now.is_some() && k.ident == now => (self.path.clone(), running),
            // The path holds something unvalidated (or we do not know yet): run this image again.
            _ => (PathBuf::from("/proc/self/exe"), running),
        }
    }

    /// Whether the binary `known` (what [`Deploy::exec_target`] gave) takes up the lock
    /// descriptors an exec hands it: the running image, or an approved candidate that said so
    /// at its pre-flight.
    pub fn takes_locks(&self, known: Option<&Known>) -> bool {
        let Some(known) = known else {
            return false;
        };
        self.running_sha().as_ref() == Some(&known.sha256)
            || (self.approved_takes_locks
                && self.approved.as_ref().map(|a| &a.sha256) == Some(&known.sha256))
    }
}

#[cfg(test)]
mod tests {
    /// A digest as a worker's answer may give it: never a panic (it sliced bytes, and a
    /// character across the twelfth byte panicked the CLI's `status` and the supervisor).
    #[test]
    fn short_digests_cut_on_characters() {
        assert_eq!(super::short("0123456789abcdef"), "0123456789ab");
        assert_eq!(super::short("abc"), "abc");
        let hostile = format!("a{}", "é".repeat(12));
        assert_eq!(super::short(&hostile), format!("a{}", "é".repeat(11)));
    }
}
