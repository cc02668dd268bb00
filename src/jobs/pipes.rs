//! Driving a job executable's pipes: one thread, poll(2) over stdin (the payload), stdout (the
//! result, bounded), stderr (its tail kept), fd 3 (progress lines), plus a pidfd for the exit;
//! no extra threads, no sleeps.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::process::Child;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::jobs::functions::{Job, JobError};

/// How much of stderr is kept for the error message.
const STDERR_TAIL: usize = 2048;

/// After the child exits, how long to wait for its pipes to reach EOF (a grandchild may still
/// hold them) before the rest of the process group is killed.
const EXIT_GRACE: Duration = Duration::from_millis(200);

/// How long the leader of a job whose group was sent SIGKILL gets to die before its lane goes
/// on without it (dying can take a while: a process with gigabytes mapped frees them first).
pub(crate) const KILL_WAIT: Duration = Duration::from_secs(5);

/// How the leader of a killed job ended ([`reap_killed`]).
pub(super) enum Reaped {
    Exited(std::process::ExitStatus),
    Failed(io::Error),
    /// Still there [`KILL_WAIT`] after SIGKILL, in this state (`/proc/PID/stat`): a process the
    /// kernel holds in an uninterruptible wait (a hung disk or NFS server, a frozen cgroup)
    /// dies only once that wait ends. It is the reaper's then (`reaper::forget`).
    Undying(char),
}

/// Waits for `child`, whose process group was just sent SIGKILL, at most [`KILL_WAIT`]: the
/// lane must not wait for ever with a process that cannot die yet.
pub(super) fn reap_killed(child: &mut Child) -> Reaped {
    // Most jobs have exited by now: no pidfd for them.
    match child.try_wait() {
        Ok(Some(status)) => return Reaped::Exited(status),
        Ok(None) => {}
        Err(e) => return Reaped::Failed(e),
    }
    let pidfd = pidfd_open(child.id() as i32);
    let deadline = Instant::now() + KILL_WAIT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Reaped::Exited(status),
            Ok(None) => {}
            Err(e) => return Reaped::Failed(e),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            let state = crate::ops::procfs::Stat::of(Some(child.id() as i32));
            return Reaped::Undying(state.map_or('?', |s| s.state));
        }
        match &pidfd {
            Some(fd) => {
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                let ms = u16::try_from(left.as_millis() + 1).unwrap_or(u16::MAX);
                let _ = poll(&mut fds, PollTimeout::from(ms));
            }
            None => std::thread::sleep(left.min(Duration::from_millis(10))),
        }
    }
}

pub(super) struct Output {
    pub(super) stdout: Vec<u8>,
    pub(super) stderr: Vec<u8>,
    pub(super) overflow: bool,
    pub(super) timed_out: Option<Duration>,
}

impl Output {
    fn take_stdout(&mut self, chunk: &[u8], max: usize) {
        if self.stdout.len() + chunk.len() > max {
            self.overflow = true;
        } else {
            self.stdout.extend_from_slice(chunk);
        }
    }

    fn take_stderr(&mut self, chunk: &[u8]) {
        self.stderr.extend_from_slice(chunk);
        if self.stderr.len() > 2 * STDERR_TAIL {
            self.stderr.drain(..self.stderr.len() - STDERR_TAIL);
        }
    }
}

/// Feeds stdin, collects stdout/stderr/progress, and watches the deadline, until the child has
/// exited and its pipes are closed (or the grace after its exit ran out). Past the deadline it
/// looks once more without waiting: a job seen to have exited then is not timed out.
pub(super) fn drive(
    child: &mut Child,
    job: &mut Job<'_>,
    progress: OwnedFd,
    timeout: Option<Duration>,
    max_output: usize,
) -> Result<Output, JobError> {
    let mut st = Streams {
        stdin: child.stdin.take().map(OwnedFd::from),
        stdout: child.stdout.take().map(OwnedFd::from),
        stderr: child.stderr.take().map(OwnedFd::from),
        progress: Some(progress),
        payload: job.payload().to_vec(),
        written: 0,
        out: Output {
            stdout: Vec::new(),
            stderr: Vec::new(),
            overflow: false,
            timed_out: None,
        },
        lines: ProgressLines::default(),
        buf: vec![0u8; 64 * 1024],
        max_output,
    };
    for fd in [&st.stdin, &st.stdout, &st.stderr, &st.progress]
        .into_iter()
        .flatten()
    {
        set_nonblocking(fd.as_fd()).map_err(io_err)?;
    }
    if st.payload.is_empty() {
        st.stdin = None;
    }
    let pidfd = pidfd_open(child.id() as i32);
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut exited_at: Option<Instant> = None;
    let mut last_look = false;
    loop {
        if exited_at.is_none() && (pidfd.is_none() && child.try_wait().map_err(io_err)?.is_some()) {
            exited_at = Some(Instant::now());
        }
        if let Some(at) = exited_at {
            if !st.pipes_open() || at.elapsed() >= EXIT_GRACE {
                // What the job wrote before it exited is in the pipes even if a lingering
                // grandchild holds back their EOF (or we were not scheduled for the whole
                // grace): take it without waiting.
                st.drain(job)?;
                break;
            }
        }
        // A fault-injection build (tests only): the thread not scheduled between two polls (a
        // stopped worker, a VM paused).
        #[cfg(gearshift_faults)]
        crate::ops::faults::stall_while("GEARSHIFT_FAULT_STALL_PIPES", "stalling a job's pipes");
        let now = Instant::now();
        if let (Some(d), Some(limit)) = (deadline, timeout) {
            if now >= d && exited_at.is_some() {
                // It exited, seen at the last look: what it wrote is in the pipes.
                st.drain(job)?;
                break;
            }
            if now >= d && last_look {
                st.out.timed_out = Some(limit);
                break;
            }
            // Past the deadline, one more look without waiting first: the job may have ended
            // while this thread was not running (the worker stopped, the VM paused).
            last_look = now >= d;
        }
        let mut wait = deadline.map(|d| d.saturating_duration_since(now));
        if let Some(at) = exited_at {
            let grace = EXIT_GRACE.saturating_sub(at.elapsed());
            wait = Some(wait.map_or(grace, |w| w.min(grace)));
        }
        if pidfd.is_none() && exited_at.is_none() {
            // No pidfd (old kernel): check for exit every 50 ms.
            let tick = Duration::from_millis(50);
            wait = Some(wait.map_or(tick, |w| w.min(tick)));
        }
        let watch_exit = pidfd.as_ref().filter(|_| exited_at.is_none());
        let ready = match st.poll(watch_exit, wait) {
            Ok(r) => r,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(JobError::new(format!("poll: {e}"))),
        };
        for (tag, rev) in ready {
            if !rev.is_empty() && st.on_ready(tag, job)? {
                exited_at = Some(Instant::now());
            }
        }
        if st.out.overflow {
            break;
        }
    }
    let mut out = st.out;
    if out.stderr.len() > STDERR_TAIL {
        out.stderr.drain(..out.stderr.len() - STDERR_TAIL);
    }
    Ok(out)
}

fn io_err(e: io::Error) -> JobError {
    JobError::new(format!("job I/O: {e}"))
}

/// A running job's pipes: the payload going in, stdout, stderr and progress coming out.
struct Streams {
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
    progress: Option<OwnedFd>,
    payload: Vec<u8>,
    written: usize,
    out: Output,
    lines: ProgressLines,
    buf: Vec<u8>,
    max_output: usize,
}

impl Streams {
    fn pipes_open(&self) -> bool {
        self.stdout.is_some() || self.stderr.is_some() || self.progress.is_some()
    }

    /// Reads what the pipes hold now, without waiting (after the job exited).
    fn drain(&mut self, job: &mut Job<'_>) -> Result<(), JobError> {
        let max = self.max_output;
        let (out, buf, lines) = (&mut self.out, &mut self.buf, &mut self.lines);
        read_into(&mut self.stdout, buf, |c| out.take_stdout(c, max)).map_err(io_err)?;
        read_into(&mut self.stderr, buf, |c| out.take_stderr(c)).map_err(io_err)?;
        read_into(&mut self.progress, buf, |c| lines.feed(c, job)).map_err(io_err)?;
        lines.finish(job);
        Ok(())
    }

    /// Waits (up to `wait`) for a pipe, or for the exit `pidfd` reports; which are ready:
    /// 0 stdin, 1 stdout, 2 stderr, 3 progress, 4 exited.
    fn poll(
        &self,
        pidfd: Option<&OwnedFd>,
        wait: Option<Duration>,
    ) -> nix::Result<Vec<(u8, PollFlags)>> {
        let mut fds: Vec<(u8, PollFd<'_>)> = Vec::with_capacity(5);
        if let Some(fd) = &self.stdin {
            fds.push((0, PollFd::new(fd.as_fd(), PollFlags::POLLOUT)));
        }
        for (tag, fd) in [(1, &self.stdout), (2, &self.stderr), (3, &self.progress)] {
            if let Some(fd) = fd {
                fds.push((tag, PollFd::new(fd.as_fd(), PollFlags::POLLIN)));
            }
        }
        if let Some(fd) = pidfd {
            fds.push((4, PollFd::new(fd.as_fd(), PollFlags::POLLIN)));
        }
        let poll_timeout = match wait {
            None => PollTimeout::NONE,
            Some(w) => PollTimeout::try_from(w.as_millis().clamp(1, 60_000) as i32)
                .unwrap_or(PollTimeout::MAX),
        };
        let mut pfds: Vec<PollFd<'_>> = fds.iter().map(|(_, p)| *p).collect();
        poll(&mut pfds, poll_timeout)?;
        Ok(fds
            .iter()
            .zip(&pfds)
            .map(|((tag, _), p)| (*tag, p.revents().unwrap_or(PollFlags::empty())))
            .collect())
    }

    /// Serves the pipe `tag` that is ready; true if it was the exit notice.
    fn on_ready(&mut self, tag: u8, job: &mut Job<'_>) -> Result<bool, JobError> {
        let max = self.max_output;
        let (out, buf, lines) = (&mut self.out, &mut self.buf, &mut self.lines);
        match tag {
            0 => {
                if let Some(fd) = &self.stdin {
                    match write_some(fd, &self.payload[self.written..]) {
                        Ok(n) => self.written += n,
                        // The job closed stdin without reading it all: not our error.
                        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                            self.written = self.payload.len()
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(io_err(e)),
                    }
                }
                if self.written >= self.payload.len() {
                    self.stdin = None;
                }
            }
            1 => {
                if !read_into(&mut self.stdout, buf, |c| out.take_stdout(c, max)).map_err(io_err)? {
                    self.stdout = None;
                }
            }
            2 => {
                if !read_into(&mut self.stderr, buf, |c| out.take_stderr(c)).map_err(io_err)? {
                    self.stderr = None;
                }
            }
            3 => {
                if !read_into(&mut self.progress, buf, |c| lines.feed(c, job)).map_err(io_err)? {
                    lines.finish(job);
                    self.progress = None;
                }
            }
            _ => return Ok(true),
        }
        Ok(false)
    }
}

/// Reads what is available; returns false at EOF.
fn read_into(
    fd: &mut Option<OwnedFd>,
    buf: &mut [u8],
    mut sink: impl FnMut(&[u8]),
) -> io::Result<bool> {
    let Some(owned) = fd else { return Ok(false) };
    let mut file = std::mem::ManuallyDrop::new(
        // SAFETY: the File borrows the descriptor owned by `owned`, which outlives it; ManuallyDrop
        // keeps the File from closing it.
        unsafe { std::fs::File::from_raw_fd(owned.as_raw_fd()) },
    );
    loop {
        match file.read(buf) {
            Ok(0) => return Ok(false),
            Ok(n) => sink(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn write_some(fd: &OwnedFd, data: &[u8]) -> io::Result<usize> {
    let mut file = std::mem::ManuallyDrop::new(
        // SAFETY: as in read_into, the File only borrows `fd` and never closes it.
        unsafe { std::fs::File::from_raw_fd(fd.as_raw_fd()) },
    );
    file.write(data)
}

/// The longest fd-3 progress line kept; a longer one is dropped (and said once per job).
pub const MAX_PROGRESS_LINE: usize = 64 * 1024;

/// Malformed progress lines of one job that are logged; the rest are counted.
const BAD_LINES_LOGGED: u64 = 5;

/// The fd-3 progress channel's line splitter: bounded memory (one line of at most
/// [`MAX_PROGRESS_LINE`]) and linear cost (each byte is looked at once).
#[derive(Default)]
struct ProgressLines {
    buf: Vec<u8>,
    /// Dropping the rest of a line that grew too long, until its newline.
    skipping: bool,
    too_long: u64,
    bad: u64,
    finished: bool,
}

impl ProgressLines {
    /// Takes a chunk read from the channel and forwards every complete line in it.
    fn feed(&mut self, mut chunk: &[u8], job: &mut Job<'_>) {
        while let Some(nl) = chunk.iter().position(|&b| b == b'\n') {
            let (line, rest) = (&chunk[..nl], &chunk[nl + 1..]);
            chunk = rest;
            if std::mem::take(&mut self.skipping) {
                continue;
            }
            if self.buf.len() + line.len() > MAX_PROGRESS_LINE {
                self.buf.clear();
                self.oversized(job);
                continue;
            }
            if self.buf.is_empty() {
                self.line(line, job);
            } else {
                self.buf.extend_from_slice(line);
                let whole = std::mem::take(&mut self.buf);
                self.line(&whole, job);
            }
        }
        if self.skipping {
            return;
        }
        if self.buf.len() + chunk.len() > MAX_PROGRESS_LINE {
            self.buf.clear();
            self.skipping = true;
            self.oversized(job);
        } else {
            self.buf.extend_from_slice(chunk);
        }
    }

    /// The channel closed: a last line without a newline still counts.
    fn finish(&mut self, job: &mut Job<'_>) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        if !self.buf.is_empty() && !self.skipping {
            let line = std::mem::take(&mut self.buf);
            self.line(&line, job);
        }
        if self.bad > BAD_LINES_LOGGED {
            log::warn!(
                "job {}: {} more malformed progress lines not logged",
                job.id(),
                self.bad - BAD_LINES_LOGGED
            );
        }
    }

    fn oversized(&mut self, job: &mut Job<'_>) {
        self.too_long += 1;
        if self.too_long == 1 {
            log::warn!(
                "job {}: a progress line over {MAX_PROGRESS_LINE} bytes was dropped (and any more like it)",
                job.id()
            );
        }
    }

    fn line(&mut self, line: &[u8], job: &mut Job<'_>) {
        if let Err(why) = progress_line(line, job) {
            self.bad += 1;
            if self.bad <= BAD_LINES_LOGGED {
                log::warn!("job {}: {why}", job.id());
            }
        }
    }
}

fn progress_line(line: &[u8], job: &mut Job<'_>) -> Result<(), String> {
    let (word, rest) = match line.iter().position(|&b| b == b' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, &[][..]),
    };
    match word {
        b"data" => job.data(rest),
        b"warning" => job.warning(rest),
        b"status" => {
            let text = String::from_utf8_lossy(rest);
            let mut nums = text.split_whitespace().map(str::parse::<u64>);
            match (nums.next(), nums.next()) {
                (Some(Ok(n)), Some(Ok(d))) => job.status(n, d),
                _ => return Err(format!("bad progress line {text:?} (want \"status N D\")")),
            }
        }
        _ => {
            let shown = String::from_utf8_lossy(&line[..line.len().min(200)]).into_owned();
            return Err(format!(
                "unknown progress line {shown:?} (want status, data or warning)"
            ));
        }
    }
    Ok(())
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// A pidfd for `pid` (readable once the process has exited), or None on kernels without
/// pidfd_open (before 5.3), where the caller falls back to checking every 50 ms.
fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor or -1; no memory is
    // passed.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return None;
    }
    let fd = fd as RawFd;
    let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    // SAFETY: the syscall just returned this descriptor to us and nothing else owns it.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}
