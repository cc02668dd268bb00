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
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver};
use nix::fcntl::OFlag;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ops::layout;
use crate::ops::safefs::Dir;
use crate::restart::carried::{Ident, Known};
use crate::status::records::{Refused, Rollback};
use crate::text::hex;

/// How long a candidate must stay unchanged before it is considered whole.
pub const SETTLE: Duration = Duration::from_millis(500);
/// How long a pre-flight may take.
pub const PREFLIGHT_TIMEOUT: Duration = Duration::from_secs(10);

/// Written (by the worker, into its own `state_dir/worker/`) before switching to a new
/// binary, removed once a generation serves. Found by a fresh start whose own image is
/// `to_sha`, it means that binary died during start-up: roll back. It is data from the worker's
/// user: it names no path, and root compares it with its own digest only.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Marker {
    pub from_sha: String,
    pub to_sha: String,
    pub at_ms: u64,
}

/// Largest deploy marker root agrees to read.
const MAX_MARKER: u64 = 4096;

pub fn write_marker(state_dir: &Path, marker: &Marker) -> std::io::Result<()> {
    let json = serde_json::to_vec(marker).map_err(std::io::Error::other)?;
    let dir = layout::worker_dir(state_dir);
    let tmp = dir.join(format!("{}.tmp", layout::MARKER));
    std::fs::write(&tmp, json)?;
    std::fs::rename(&tmp, dir.join(layout::MARKER))
}

/// Reads the marker as untrusted data: never through a link, at most 4 KiB.
pub fn read_marker(state_dir: &Path) -> Option<Marker> {
    let dir = Dir::open(&layout::worker_dir(state_dir)).ok()?;
    let bytes = dir.read_small(layout::MARKER, MAX_MARKER).ok()??;
    serde_json::from_slice(&bytes).ok()
}

pub fn clear_marker(state_dir: &Path) {
    let _ = std::fs::remove_file(layout::worker_dir(state_dir).join(layout::MARKER));
}

/// On a fresh start: if this image is the binary a deploy switched to and the marker is still
/// there, that binary died before serving. Returns the rollback to perform: exec the returned
/// descriptor of `state_dir/last-good`, which only the owner of `state_dir` (root, under a
/// privilege drop) can have written. The marker decides only *whether*, never *what*.
pub fn rollback_needed(state_dir: &Path) -> Option<(File, Rollback)> {
    let marker = read_marker(state_dir)?;
    let me = hash_file(Path::new("/proc/self/exe")).ok()?;
    if me != marker.to_sha {
        return None;
    }
    let (last_good, to_sha) = match open_last_good(state_dir).and_then(|f| {
        // What runs is that file, whatever the marker says it came from (after A -> B -> C under
        // a privilege drop, last-good is still the A root copied at the fresh start).
        let sha = hash_reader(&mut &f)
            .map_err(|e| crate::Error::io_path("reading", &state_dir.join(layout::LAST_GOOD), e))?;
        Ok((f, sha))
    }) {
        Ok(found) => found,
        Err(e) => {
            log::error!("the deploy marker asks for a rollback, but {e}");
            return None;
        }
    };
    let reason = match crate::status::records::from_env().and_then(|i| i.last_exit) {
        Some(exit) => format!("the new binary {exit} before it was serving"),
        None => "the new binary died before it was serving".to_string(),
    };
    let rollback = Rollback {
        from_sha: marker.to_sha.clone(),
        to_sha,
        reason,
        at_ms: crate::clock::now_ms(),
    };
    Some((last_good, rollback))
}

/// Opens `state_dir/last-good` for exec, only if nobody but us (or root) could have written it.
fn open_last_good(state_dir: &Path) -> crate::Result<File> {
    let dir = Dir::open(state_dir)?;
    if !dir.trusted() {
        return Err(crate::Error::Msg(format!(
            "\"{}\" can be written by others: not running its last-good",
            state_dir.display()
        )));
    }
    let file = dir
        .file(layout::LAST_GOOD, crate::ops::safefs::Open::READ)?
        .file;
    let meta = file
        .metadata()
        .map_err(|e| crate::Error::io_path("checking", &state_dir.join(layout::LAST_GOOD), e))?;
    let me = nix::unistd::geteuid().as_raw();
    if (meta.uid() != 0 && meta.uid() != me) || meta.mode() & 0o022 != 0 {
        return Err(crate::Error::Msg(format!(
            "\"{}\" is owned by uid {} (mode {:o}): not running it",
            state_dir.join(layout::LAST_GOOD).display(),
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    Ok(file)
}

/// Keeps a copy of the running image as `state_dir/last-good`, if `state_dir` is ours to write
/// (under a privilege drop it is root's: root made the copy at the fresh start).
pub fn save_last_good(state_dir: &Path) -> crate::Result<Option<PathBuf>> {
    let dir = Dir::open(state_dir)?;
    if dir.owner().0 != nix::unistd::geteuid() {
        return Ok(dir
            .file(layout::LAST_GOOD, crate::ops::safefs::Open::READ)
            .ok()
            .map(|_| state_dir.join(layout::LAST_GOOD)));
    }
    let tmp = format!("{}.tmp", layout::LAST_GOOD);
    dir.remove(&tmp)?;
    let mut out = dir
        .file(
            &tmp,
            crate::ops::safefs::Open {
                write: true,
                append: false,
                create: Some(0o700),
            },
        )?
        .file;
    let path = state_dir.join(layout::LAST_GOOD);
    let mut exe =
        File::open("/proc/self/exe").map_err(|e| crate::Error::io("opening /proc/self/exe", e))?;
    std::io::copy(&mut exe, &mut out).map_err(|e| crate::Error::io_path("writing", &path, e))?;
    out.set_permissions(std::fs::Permissions::from_mode(0o755))
        .map_err(|e| crate::Error::io_path("chmod", &path, e))?;
    drop(out);
    dir.rename(&tmp, layout::LAST_GOOD)?;
    Ok(Some(path))
}

/// What the background check of a stable candidate found.
enum Outcome {
    /// The same bytes as the running image (a touch, or a copy of the same build).
    Same(String),
    Unreadable(String),
    Checked(String, Result<(), String>),
}

/// What the control loop should do next about the binary.
pub enum Step {
    Nothing,
    /// Look again after this long (the file is still changing, or the pre-flight runs).
    CheckIn(Duration),
    /// The candidate passed its pre-flight: restart into it.
    Approved,
}

pub struct Deploy {
    path: PathBuf,
    config: PathBuf,
    /// The running image (sha computed in the background on a first start).
    running: Arc<Mutex<Option<Known>>>,
    last_seen: Option<(Ident, Instant)>,
    refused: Option<Ident>,
    approved: Option<Known>,
    preflight: Option<(Ident, Receiver<Outcome>)>,
    pub last_refused: Option<Refused>,
    /// A binary that was rolled back from: refused on sight.
    known_bad: Option<String>,
    /// Under a privilege drop, the worker's uid: a candidate that user could have written
    /// would be run by root at the next fresh start, so it is refused.
    worker_uid: Option<u32>,
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
        if running.is_none() {
            let slot = Arc::clone(&known);
            let path = path.to_path_buf();
            let _ = crate::ops::signals::spawn_helper("hash-self", move || {
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
            last_seen: None,
            refused: None,
            approved: None,
            preflight: None,
            last_refused,
            known_bad: None,
            worker_uid,
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

    /// Looks at the file after an event or a timer.
    pub fn check(&mut self) -> Step {
        if let Some(step) = self.poll_preflight() {
            return step;
        }
        let Some(ident) = Ident::of(&self.path) else {
            return Step::Nothing;
        };
        if Some(ident) == self.running_ident()
            || Some(ident) == self.refused
            || self.approved.as_ref().and_then(|a| a.ident) == Some(ident)
        {
            return Step::Nothing;
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
        if ident.mode & 0o111 == 0 {
            self.refuse(ident, String::new(), "the file is not executable".into());
            return Step::Nothing;
        }
        if let Some(why) = self.worker_uid.and_then(|uid| writable_by(&self.path, uid)) {
            self.refuse(ident, String::new(), why);
            return Step::Nothing;
        }
        // Hashing a binary and running its pre-flight take a while: not on the control thread.
        let (tx, rx) = bounded(1);
        let (path, config, running) = (self.path.clone(), self.config.clone(), self.running_sha());
        let bad = self.known_bad.clone();
        let _ = crate::ops::signals::spawn_helper("preflight", move || {
            let outcome = match hash_file(&path) {
                Err(e) => Outcome::Unreadable(e.to_string()),
                Ok(sha) if Some(&sha) == running.as_ref() => Outcome::Same(sha),
                Ok(sha) if Some(&sha) == bad.as_ref() => Outcome::Checked(
                    sha,
                    Err("this binary was rolled back: it died during start-up".into()),
                ),
                Ok(sha) => {
                    log::info!(
                        "deploy: candidate \"{}\" (sha256 {}); running its pre-flight",
                        path.display(),
                        short(&sha)
                    );
                    let result = preflight(&path, &config);
                    Outcome::Checked(sha, result)
                }
            };
            let _ = tx.send(outcome);
        });
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
            Err(_) => Outcome::Unreadable("the pre-flight thread died".into()),
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
            Outcome::Unreadable(e) => {
                log::warn!("deploy: cannot read \"{}\": {e}", self.path.display());
                self.last_seen = None;
                return Some(Step::CheckIn(SETTLE));
            }
            Outcome::Checked(sha, result) => (sha, result),
        };
        match result {
            Ok(()) => {
                log::info!(
                    "deploy: candidate sha256 {} passed its pre-flight",
                    short(&sha)
                );
                self.approved = Some(Known {
                    ident: Some(ident),
                    sha256: sha,
                });
                Some(Step::Approved)
            }
            Err(e) if e.contains("Text file busy") => {
                // Still open for writing somewhere: not whole yet.
                self.last_seen = None;
                Some(Step::CheckIn(SETTLE))
            }
            Err(e) => {
                self.refuse(ident, sha, e);
                Some(Step::Nothing)
            }
        }
    }

    fn refuse(&mut self, ident: Ident, sha: String, error: String) {
        log::error!("deploy: refused \"{}\": {error}", self.path.display());
        self.refused = Some(ident);
        self.last_refused = Some(Refused {
            at_ms: crate::clock::now_ms(),
            sha256: sha,
            error,
        });
    }

    /// What to exec for the next generation, and what that image is.
    pub fn exec_target(&self) -> (PathBuf, Option<Known>) {
        let now = Ident::of(&self.path);
        if let Some(a) = &self.approved {
            if now.is_some() && a.ident == now {
                return (self.path.clone(), Some(a.clone()));
            }
        }
        let running = self.running.lock().ok().and_then(|k| k.clone());
        match &running {
            Some(k) if now.is_some() && k.ident == now => (self.path.clone(), running),
            // The path holds something unvalidated (or we do not know yet): run this image again.
            _ => (PathBuf::from("/proc/self/exe"), running),
        }
    }
}

/// Why the worker's user (`uid`) could have written the binary at `path` or replaced it in its
/// directory, if it could.
fn writable_by(path: &Path, uid: u32) -> Option<String> {
    let dir = path.parent().unwrap_or(Path::new("/"));
    for (p, what) in [(path, "the binary"), (dir, "its directory")] {
        let Ok(m) = std::fs::metadata(p) else {
            return Some(format!("cannot check \"{}\"", p.display()));
        };
        if (m.uid() == uid && uid != 0) || m.mode() & 0o022 != 0 {
            return Some(format!(
                "{what} \"{}\" is writable by the worker's user or by others (owner uid {}, mode {:o}): root would run it at the next fresh start; fix: chown root and chmod go-w",
                p.display(),
                m.uid(),
                m.mode() & 0o7777
            ));
        }
    }
    None
}

/// First 12 hex digits, for log lines.
pub fn short(sha: &str) -> &str {
    &sha[..sha.len().min(12)]
}

pub fn hash_file(path: &Path) -> std::io::Result<String> {
    hash_reader(&mut std::fs::File::open(path)?)
}

/// The hex sha256 of everything `f` yields.
fn hash_reader(f: &mut impl Read) -> std::io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// The process group of the pre-flight under way (0: none), killed when the worker exits or
/// re-execs: a hanging pre-flight and whatever it started never outlive the worker.
static PREFLIGHT_GROUP: AtomicI32 = AtomicI32::new(0);

/// How much of a pre-flight's output is kept (its tail) for the log and `status`.
const KEEP_OUTPUT: usize = 1000;

/// SIGKILLs the pre-flight under way, if any, with its whole process group.
pub fn kill_preflight() {
    let pgid = PREFLIGHT_GROUP.swap(0, Ordering::AcqRel);
    if pgid > 0 {
        let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    }
}

/// Runs `candidate -c config check` with a timeout; Ok if it exits 0, else the tail of its
/// output. Its stdout and stderr share one pipe, read while it runs (a pre-flight that prints
/// more than a pipe holds is not mistaken for a hanging one). It runs in a process group of its
/// own and dies with the thread that started it (`PR_SET_PDEATHSIG`), so neither it nor its
/// children outlive the worker.
fn preflight(candidate: &Path, config: &Path) -> Result<(), String> {
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC | OFlag::O_NONBLOCK)
        .map_err(|e| format!("cannot create a pipe for the candidate: {e}"))?;
    let write2 = write
        .try_clone()
        .map_err(|e| format!("cannot create a pipe for the candidate: {e}"))?;
    // The candidate's end must block like any stdout.
    let _ = nix::fcntl::fcntl(
        write.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(OFlag::empty()),
    );
    let mut cmd = Command::new(candidate);
    cmd.arg("-c")
        .arg(config)
        .arg("check")
        .env_clear()
        .envs(std::env::vars_os().filter(|(k, _)| !crate::jobs::executable::is_internal_var(k)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(write))
        .stderr(Stdio::from(write2))
        .process_group(0);
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and only calls prctl, getppid,
    // getpid and kill, which are async-signal-safe; it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            Ok(())
        });
    }
    let spawned = crate::jobs::reaper::spawn(&mut cmd);
    // Our copies of the write end go with the command: EOF comes when the candidate's close.
    drop(cmd);
    let mut child = spawned.map_err(|e| format!("cannot run the candidate: {e}"))?;
    let pid = child.id();
    PREFLIGHT_GROUP.store(pid as i32, Ordering::Release);
    let result = wait_preflight(&mut child, read);
    let _ = PREFLIGHT_GROUP.compare_exchange(pid as i32, 0, Ordering::AcqRel, Ordering::Acquire);
    crate::jobs::reaper::forget(pid);
    result
}

/// Reads the pre-flight's output while waiting for it (bounded by [`PREFLIGHT_TIMEOUT`]) and
/// judges it. Its group is killed once the leader has exited (while the leader is still a
/// zombie, so the group id cannot have been reused) or at the deadline.
fn wait_preflight(child: &mut std::process::Child, out: OwnedFd) -> Result<(), String> {
    let deadline = Instant::now() + PREFLIGHT_TIMEOUT;
    let pid = Pid::from_raw(child.id() as i32);
    let mut tail = Vec::new();
    let mut eof = false;
    let timed_out = loop {
        eof = eof || drain(&out, &mut tail);
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        match waitid(Id::Pid(pid), flags) {
            Ok(WaitStatus::StillAlive) => {}
            Ok(_) => break false,
            Err(e) => return Err(format!("waiting for the candidate: {e}")),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break true;
        }
        let nap = left.min(Duration::from_millis(20));
        if eof {
            std::thread::sleep(nap);
        } else {
            let mut fds = [PollFd::new(out.as_fd(), PollFlags::POLLIN)];
            let ms = u16::try_from(nap.as_millis()).unwrap_or(20);
            let _ = poll(&mut fds, PollTimeout::from(ms));
        }
    };
    let _ = killpg(pid, Signal::SIGKILL);
    let status = child.wait();
    if !eof {
        drain(&out, &mut tail);
    }
    let said = String::from_utf8_lossy(&tail);
    let said = said.trim();
    if timed_out {
        return Err(format!(
            "`check` did not finish within {}s: {said}",
            PREFLIGHT_TIMEOUT.as_secs()
        ));
    }
    match status {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(format!("`check` failed ({s}): {said}")),
        Err(e) => Err(format!("waiting for the candidate: {e}")),
    }
}

/// Reads what `fd` (non-blocking) holds now, keeping the last [`KEEP_OUTPUT`] bytes in `tail`.
/// True at end of file.
fn drain(fd: &OwnedFd, tail: &mut Vec<u8>) -> bool {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match nix::unistd::read(fd.as_raw_fd(), &mut buf) {
            Ok(0) => return true,
            Ok(n) => {
                tail.extend_from_slice(&buf[..n]);
                if tail.len() > 2 * KEEP_OUTPUT {
                    tail.drain(..tail.len() - KEEP_OUTPUT);
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => {
                // EAGAIN (nothing more for now) or an error that reading again will not fix.
                if tail.len() > KEEP_OUTPUT {
                    tail.drain(..tail.len() - KEEP_OUTPUT);
                }
                return false;
            }
        }
    }
}
