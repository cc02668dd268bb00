//! Running a job executable from `jobs_dir`: payload on stdin, result on stdout, exit 0 for
//! success, the tail of stderr as the error otherwise. No shell is involved.
//!
//! The child runs in a session of its own (so a process group of its own, and no controlling
//! terminal), so a Ctrl-C at the worker's terminal does not reach it (a graceful stop lets it
//! finish), it cannot open that terminal, and a timeout can kill everything it started. Progress
//! lines written to fd 3 (`status N D`, `data TEXT`, `warning TEXT`) become Gearman
//! WORK_STATUS / WORK_DATA / WORK_WARNING packets.
//!
//! One thread drives all pipes with poll(2), plus a pidfd for the child's exit, so a job costs no
//! extra threads and no sleeps.

use std::collections::HashSet;
use std::ffi::{CString, OsString};
use std::io::{self};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use nix::fcntl::OFlag;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::jobs::functions::{Job, JobError, JobResult};
use crate::jobs::starts::Starts;
use crate::text::ShowPath;

/// Process groups of running executables, so a forced stop can kill them all; and what every
/// job process is told about its worker.
#[derive(Default, Clone)]
pub struct Children {
    groups: Arc<Mutex<HashSet<i32>>>,
    /// Set by [`Children::kill_all`]: the worker exits now, and the jobs it kills are
    /// interrupted, not failed (their outcomes are never reported: they run again).
    abandoned: Arc<std::sync::atomic::AtomicBool>,
    /// `GEARSHIFT_WORKER` for job processes (see [`crate::jobs::reaper`]).
    worker_key: Arc<OsString>,
    ended: Option<crate::jobs::reaper::JobEvents>,
    /// Starts take turns while resources run short (`starts.rs`).
    starts: Arc<Starts>,
    /// What job processes write to their `oom_score_adj` (see [`OomScore`]).
    oom_score: Arc<OomScore>,
}

/// `[worker] job_oom_score_adj`, as a job process writes it: never below the worker's own
/// (lowering needs privilege), and nothing to write when it is the worker's own. The worker's
/// is read at the first job, not on the restart path.
#[derive(Default)]
struct OomScore {
    wanted: i32,
    text: OnceLock<Option<CString>>,
}

impl OomScore {
    fn text(&self) -> Option<CString> {
        self.text
            .get_or_init(|| {
                let own = std::fs::read_to_string("/proc/self/oom_score_adj")
                    .ok()
                    .and_then(|t| t.trim().parse::<i32>().ok());
                match own {
                    Some(own) if own >= self.wanted => None,
                    _ => CString::new(self.wanted.to_string()).ok(),
                }
            })
            .clone()
    }
}

impl Children {
    /// Job processes will carry `worker_key` and start with `oom_score_adj` (see [`OomScore`]);
    /// `ended` hears of every job's end.
    pub fn new(
        worker_key: &Path,
        oom_score_adj: i32,
        ended: Option<crate::jobs::reaper::JobEvents>,
    ) -> Children {
        Children {
            groups: Arc::default(),
            abandoned: Arc::default(),
            worker_key: Arc::new(worker_key.as_os_str().to_os_string()),
            ended,
            starts: Arc::default(),
            oom_score: Arc::new(OomScore {
                wanted: oom_score_adj,
                text: OnceLock::new(),
            }),
        }
    }

    /// A start failed: if for want of a resource, starts take turns for a while.
    fn ran_short_if(&self, e: &JobError) {
        if e.is_transient() {
            self.starts.ran_short();
        }
    }

    /// How this generation's job starts share what a start needs.
    pub fn starts(&self) -> &Starts {
        &self.starts
    }

    fn add(&self, pgid: i32) {
        if let Ok(mut g) = self.groups.lock() {
            g.insert(pgid);
        }
    }
    fn remove(&self, pgid: i32) {
        if let Ok(mut g) = self.groups.lock() {
            g.remove(&pgid);
        }
    }
    /// SIGKILLs every running job's process group (on a forced stop). From now on
    /// [`Children::abandoned`] holds: a lane must not report what a killed job did.
    pub fn kill_all(&self) {
        self.abandoned
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if let Ok(g) = self.groups.lock() {
            for &pgid in g.iter() {
                let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
            }
        }
    }
}

impl Children {
    /// The worker is exiting at once (a second TERM): outcomes are no longer reported.
    pub fn abandoned(&self) -> bool {
        self.abandoned.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Environment variables kept from the processes the worker starts (jobs, a pre-flight): those
/// gearshift itself uses across re-exec, and the service manager's, which are the worker's alone
/// (see [`crate::ops::notify::SERVICE_VARS`]).
pub fn withheld_from_children(key: &OsString) -> bool {
    key.to_str().is_some_and(|k| {
        k.starts_with(crate::ops::handover::ENV_PREFIX)
            || crate::ops::notify::SERVICE_VARS.contains(&k)
    })
}

/// Runs `exe` for `job` and returns its stdout (bounded by `max_output`) or the failure.
pub fn run(
    exe: &Path,
    job: &mut Job<'_>,
    timeout: Option<Duration>,
    max_output: usize,
    children: &Children,
) -> JobResult {
    // While resources run short, one start at a time (until the spawn has closed what the
    // child took).
    let turn = children.starts.turn();
    let (progress_read, progress_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| {
            start_error(
                format!("cannot create progress pipe: {e}"),
                e as i32,
                exe,
                false,
            )
        })
        .inspect_err(|e| children.ran_short_if(e))?;
    let progress_fd = progress_write.as_raw_fd();

    let mut cmd = Command::new(exe);
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_clear()
        .envs(std::env::vars_os().filter(|(k, _)| !withheld_from_children(k)))
        .env(crate::jobs::reaper::ENV_JOB, job.id())
        .env(
            crate::jobs::reaper::ENV_WORKER,
            children.worker_key.as_os_str(),
        )
        .env("GEARSHIFT_FUNCTION", job.function())
        .env("GEARSHIFT_UNIQUE", job.unique())
        .env("GEARSHIFT_PROGRESS_FD", "3")
        .envs(crate::ops::privilege::job_identity());
    if let Some(dir) = exe.parent() {
        cmd.current_dir(dir);
    }
    let worker_pid = std::process::id() as libc::pid_t;
    let oom_score = children.oom_score.text();
    // SAFETY: the closure runs in the forked child before exec and only calls prctl, getppid,
    // setsid, open, write, close, dup2, fcntl, close_range and kill, which are
    // async-signal-safe; it allocates nothing (`oom_score` was made before the fork) and
    // touches no locks.
    unsafe {
        cmd.pre_exec(move || {
            // Die with the worker (the death of the lane thread that forked us, which outlives
            // the job: lanes end only between jobs). If the worker died before this line, our
            // parent is already someone else: die now.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) == -1 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != worker_pid {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            // A session of its own, so a process group of its own too (its id the child's,
            // what the worker kills the job's leftovers by), and no controlling terminal: under
            // `run` in a terminal a job could open the worker's (`/dev/tty`), read what the
            // operator types and push input into root's shell with TIOCSTI.
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            // The kernel's OOM killer takes the job's processes before the worker (the largest
            // process of a cgroup whose job runs in many small ones). Best effort: without
            // /proc the job starts as the worker is.
            if let Some(score) = &oom_score {
                let fd = libc::open(
                    c"/proc/self/oom_score_adj".as_ptr(),
                    libc::O_WRONLY | libc::O_CLOEXEC,
                );
                if fd >= 0 {
                    let bytes = score.as_bytes();
                    libc::write(fd, bytes.as_ptr().cast(), bytes.len());
                    libc::close(fd);
                }
            }
            // No capability of the worker's passes to the job (ambient ones, as systemd's
            // `AmbientCapabilities=` gives a `User=` service, would pass through the exec).
            // Fails only on a kernel without ambient capabilities (before 4.3): none to pass.
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            );
            if progress_fd == 3 {
                // dup2(3, 3) would keep FD_CLOEXEC set: clear it instead.
                if libc::fcntl(3, libc::F_SETFD, 0) == -1 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(progress_fd, 3) == -1 {
                return Err(io::Error::last_os_error());
            }
            // The job gets 0-3 and nothing else of ours, even a descriptor a library made
            // without close-on-exec (as the vendored libzmq once did): all above 3 become close-on-exec (marked, not
            // closed: std's pipe that reports a failed exec must stay open until the exec). A
            // kernel without CLOSE_RANGE_CLOEXEC (before 5.11) leaves it to the flags we set.
            libc::syscall(
                libc::SYS_close_range,
                4u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
    let spawned = super::exact::exactly(&mut cmd, super::exact::Env::Cleared)
        .and_then(|()| crate::jobs::reaper::spawn(&mut cmd));
    if let (Ok(_), Some(events)) = (&spawned, &children.ended) {
        events.started();
    }
    drop(progress_write);
    drop(turn);
    let mut child = spawned
        .map_err(|e| {
            let why = super::shebang::why_not_started(exe, &e);
            let explained = why.is_some();
            start_error(
                format!(
                    "cannot start {}: {}",
                    exe.shown(),
                    why.unwrap_or_else(|| e.to_string())
                ),
                e.raw_os_error().unwrap_or(0),
                exe,
                explained,
            )
        })
        .inspect_err(|e| children.ran_short_if(e))?;
    let pgid = child.id() as i32;
    children.add(pgid);
    let outcome = super::pipes::drive(&mut child, job, progress_read, timeout, max_output);
    // Kill leftovers of the group while the leader is still a zombie (not yet reaped), so the
    // group id cannot have been reused by an unrelated process.
    let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
    let reaped = super::pipes::reap_killed(&mut child);
    // Waited for, or the reaper's from now on (it reaps the process once it can die).
    crate::jobs::reaper::forget(child.id());
    drop(child);
    children.remove(pgid);
    // Its descriptors are closed: a start waiting for room tries again.
    children.starts.job_ended();
    if let Some(ended) = &children.ended {
        ended.notify();
    }

    let out = outcome?;
    let status = match reaped {
        super::pipes::Reaped::Exited(status) => status,
        super::pipes::Reaped::Failed(e) => {
            return Err(JobError::new(format!("waiting for {}: {e}", exe.shown())))
        }
        super::pipes::Reaped::Undying(state) => {
            let what = out.timed_out.map_or_else(
                || "process group killed".to_string(),
                |limit| {
                    format!(
                        "timed out after {} (process group killed)",
                        crate::clock::human(limit)
                    )
                },
            );
            let error = if out.timed_out.is_some() {
                JobError::timed_out
            } else {
                JobError::new
            };
            return Err(error(format!(
                "{what}, but its process {pgid} is still there {:?} later, in state {state}: \
                 the kernel holds it in a wait nothing interrupts (a hung disk or NFS server, \
                 a frozen cgroup); it dies when that wait ends, and the lane goes on",
                super::pipes::KILL_WAIT
            )));
        }
    };
    if let Some(limit) = out.timed_out {
        return Err(JobError::timed_out(format!(
            "timed out after {} (process group killed){}",
            crate::clock::human(limit),
            tail_suffix(&out.stderr)
        )));
    }
    if out.overflow {
        return Err(JobError::new(format!(
            "result is larger than {max_output} bytes (max_payload_bytes)"
        )));
    }
    match (status.code(), status.signal()) {
        (Some(0), _) => Ok(out.stdout),
        (Some(code), _) => Err(JobError::new(format!(
            "exit status {code}{}",
            tail_suffix(&out.stderr)
        ))),
        (None, Some(sig)) => {
            let name =
                Signal::try_from(sig).map_or_else(|_| sig.to_string(), |s| s.as_str().to_string());
            Err(JobError::new(format!(
                "killed by {name}{}",
                tail_suffix(&out.stderr)
            )))
        }
        (None, None) => Err(JobError::new(format!("ended with {status}"))),
    }
}

/// A job that could not be started: transient if for want of a resource that comes back.
/// `explained`: the file says why (a `#!` interpreter or an ELF loader missing).
fn start_error(message: String, errno: i32, exe: &Path, explained: bool) -> JobError {
    // Not there for a moment: a deploy that removes the file, or moves `jobs_dir` or a link's
    // target aside, before it puts the new one in place. ENOENT of a file that is there again
    // is that too (it came back between the exec and this look), unless the file names an
    // interpreter or loader that is missing: that fails at once.
    let away =
        || !explained || std::fs::metadata(exe).is_err_and(|e| e.kind() == io::ErrorKind::NotFound);
    if [libc::EMFILE, libc::ENFILE, libc::EAGAIN, libc::ENOMEM].contains(&errno) {
        JobError::transient(message)
    } else if errno == libc::ETXTBSY || (errno == libc::ENOENT && away()) {
        JobError::busy(message)
    } else {
        JobError::new(message)
    }
}

fn tail_suffix(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    if text.is_empty() {
        String::new()
    } else {
        format!(": {text}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::functions::Progress;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Instant;

    /// ENOENT of a file that is there when we look again is the file (or `jobs_dir`) coming
    /// back from a deploy's move, and is waited for: it failed the job at once when the
    /// directory came back between the child's `chdir` and this look (a flaky test in CI,
    /// `an_executable_missing_for_a_moment_is_waited_for_not_failed`). Only a missing `#!`
    /// interpreter or loader, which the file names, fails at once.
    #[test]
    fn an_enoent_is_waited_for_unless_the_file_names_what_is_missing() {
        let dir = crate::testutil::tempdir("exec", "enoent");
        let there = dir.join("there.sh");
        std::fs::write(&there, "#!/bin/sh\n").unwrap();
        let gone = dir.join("gone.sh");
        let busy =
            |exe: &Path, explained| start_error("x".into(), libc::ENOENT, exe, explained).is_busy();
        assert!(busy(&there, false), "back between the exec and the look");
        assert!(busy(&gone, false), "away");
        assert!(!busy(&there, true), "its interpreter is missing");
        assert!(busy(&gone, true), "away, whatever it said before");
        assert!(!start_error("x".into(), libc::EACCES, &there, false).is_busy());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A job's score is the configured one, never below the worker's own, and nothing is
    /// written when it would change nothing.
    #[test]
    fn a_jobs_oom_score_is_never_below_the_workers() {
        let own: i32 = std::fs::read_to_string("/proc/self/oom_score_adj")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let text = |wanted| {
            OomScore {
                wanted,
                text: OnceLock::new(),
            }
            .text()
        };
        assert_eq!(text(own), None);
        assert_eq!(text(-1000.min(own)), None);
        if own < 1000 {
            assert_eq!(text(1000), Some(CString::new("1000").unwrap()));
        }
    }

    #[derive(Default)]
    struct Seen(Vec<String>);
    impl Progress for Seen {
        fn status(&mut self, n: u64, d: u64) {
            self.0.push(format!("status {n}/{d}"));
        }
        fn data(&mut self, data: &[u8]) {
            self.0
                .push(format!("data {}", String::from_utf8_lossy(data)));
        }
        fn warning(&mut self, data: &[u8]) {
            self.0
                .push(format!("warning {}", String::from_utf8_lossy(data)));
        }
    }

    fn script(dir: &Path, body: &str) -> std::path::PathBuf {
        let p = dir.join("job.sh");
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("write script");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        p
    }

    fn exec(body: &str, payload: &[u8], timeout: Option<Duration>) -> (JobResult, Vec<String>) {
        let dir =
            crate::testutil::tempdir("exec", &format!("{:x}", body.len() * 7919 + payload.len()));
        let exe = script(&dir, body);
        let mut seen = Seen::default();
        let mut job = Job::new("id1", "job", payload, &mut seen);
        let r = run(&exe, &mut job, timeout, 1 << 20, &Children::default());
        let _ = std::fs::remove_dir_all(&dir);
        (r, seen.0)
    }

    #[test]
    fn success_failure_and_progress() {
        let (r, _) = exec("tr a-z A-Z", b"hello", None);
        assert_eq!(r.as_deref(), Ok(&b"HELLO"[..]));

        let (r, _) = exec("echo \"bad input\" >&2; exit 3", b"x", None);
        assert_eq!(r, Err(JobError::new("exit status 3: bad input")));

        let (r, seen) = exec(
            "echo 'status 1 2' >&3; echo 'data part' >&3; echo 'warning careful' >&3; printf done",
            b"",
            None,
        );
        assert_eq!(r.as_deref(), Ok(&b"done"[..]));
        assert_eq!(seen, ["status 1/2", "data part", "warning careful"]);

        let (r, _) = exec(
            "printf \"$GEARSHIFT_JOB_ID:$GEARSHIFT_FUNCTION\"",
            b"",
            None,
        );
        assert_eq!(r.as_deref(), Ok(&b"id1:job"[..]));

        let (r, _) = exec("kill -SEGV $$", b"", None);
        assert!(
            r.as_ref()
                .is_err_and(|e| e.message.starts_with("killed by SIGSEGV")),
            "{r:?}"
        );
    }

    #[test]
    fn large_payload_not_read_by_job() {
        let big = vec![b'x'; 1 << 20];
        let (r, _) = exec("printf ok", &big, None);
        assert_eq!(r.as_deref(), Ok(&b"ok"[..]));
        let (r, _) = exec("wc -c", &big, None);
        assert_eq!(
            String::from_utf8_lossy(r.as_deref().expect("ok")).trim(),
            "1048576"
        );
    }

    #[test]
    fn timeout_kills_the_whole_group() {
        let started = Instant::now();
        let marks = crate::testutil::tempdir("exec", "group-marks");
        let pidfile = marks.join("grandchild");
        // A grandchild holding stdout open would keep a naive reader waiting forever; and it
        // must die with the group, not only the leader.
        let (r, _) = exec(
            &format!("sleep 30 & echo $! > {}; sleep 30", pidfile.display()),
            b"",
            Some(Duration::from_millis(300)),
        );
        assert!(
            r.as_ref()
                .is_err_and(|e| e.message.starts_with("timed out after 300ms")),
            "{r:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .expect("grandchild pid")
            .trim()
            .parse()
            .expect("a pid");
        let deadline = Instant::now() + Duration::from_secs(5);
        let alive = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| {
                    !s.rsplit_once(')')
                        .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
                })
                .unwrap_or(false)
        };
        while alive() {
            assert!(
                Instant::now() < deadline,
                "grandchild {pid} outlived the timeout"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = std::fs::remove_dir_all(&marks);
    }

    #[test]
    fn output_of_an_exited_job_is_kept_when_the_grace_runs_out() {
        // A grandchild keeps stdout open, so EOF never comes; the output written before the
        // job exited must still be returned after the grace.
        let (r, _) = exec("printf 'line one'; (sleep 30 >&1 &); exit 0", b"", None);
        assert_eq!(r.as_deref(), Ok(&b"line one"[..]));
    }

    #[test]
    fn exited_child_with_lingering_grandchild() {
        let started = Instant::now();
        let (r, _) = exec("sleep 30 & printf quick", b"", None);
        assert_eq!(r.as_deref(), Ok(&b"quick"[..]));
        assert!(started.elapsed() < Duration::from_secs(10));
    }
}
