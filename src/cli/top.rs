//! `gearshift top`: a live view of the running worker, drawn from its status document and its
//! counters as data (`counts`; both through the status socket) once per interval. Rates, failures and latency
//! are the differences between two samples, so they describe the last interval. `q` (or
//! Ctrl-C, Esc) quits; the terminal is restored however the view ends.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::termios::{self, LocalFlags, SetArg, Termios};

use crate::error::{Error, Result};
use crate::ops::pidfile::Probe;
use crate::status::Doc;

/// One function's counters in a sample.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Counts {
    done: f64,
    failed: f64,
    timed_out: f64,
    duration_sum: f64,
    duration_count: f64,
}

/// What one refresh read.
struct Sample {
    at: Instant,
    doc: Doc,
    functions: BTreeMap<String, Counts>,
    deploys: BTreeMap<String, f64>,
    queue: Option<(f64, f64)>,
}

pub(super) fn run(path: &Path, interval: Duration) -> Result<u8> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        eprintln!(
            "gearshift top draws on a terminal; for a pipe or a file use `status --json` or `metrics`"
        );
        return Ok(super::exit::USAGE);
    }
    // Without a terminal on stdin there are no keys: only a signal ends it.
    let keys = std::io::stdin().is_terminal();
    let mut target = match super::locate::running(path) {
        Ok((pid, socket, pidfile)) => Some((pid, socket, pidfile)),
        Err(Error::NotRunning) => {
            eprintln!("gearshift is not running");
            return Ok(super::exit::NOT_RUNNING);
        }
        Err(e) => return Err(e),
    };
    let interval = interval.max(Duration::from_millis(100));
    // A signal that would end us (a closed terminal's HUP, a TERM) ends the loop instead, so
    // the screen is restored on the way out; the handler only sets the flag.
    let ended = Arc::new(AtomicBool::new(false));
    for sig in [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGQUIT,
    ] {
        signal_hook::flag::register(sig, Arc::clone(&ended))
            .map_err(|e| Error::io("installing signal handlers", e))?;
    }
    let _screen = Screen::enter(keys)?;
    let mut before: Option<Sample> = None;
    let mut gone: Option<(i32, String)> = None;
    loop {
        let quit_hint = if keys {
            "q: quit"
        } else {
            "Ctrl-C or a TERM: quit"
        };
        // Stopped by SIGSTOP: it answers nothing until continued; not asked meanwhile.
        let halted = (target.as_ref()).and_then(|(pid, _, _)| super::locate::stopped(*pid));
        // The view's table is cut at the window's edge; a sentence is wrapped.
        let mut table = false;
        let frame = match &target {
            Some((pid, _, _)) if halted.is_some() => unanswered(*pid, halted, quit_hint),
            Some((pid, socket, pidfile)) => match read_sample(socket, *pid, pidfile) {
                Ok(sample) => {
                    table = true;
                    let frame = draw(&sample, before.as_ref());
                    before = Some(sample);
                    frame
                }
                // It holds its lock but does not answer (wedged, or stopped just now): said,
                // and asked again after the interval (keys and signals looked at meanwhile).
                Err(e) if crate::ops::pidfile::probe(pidfile).ok() != Some(Probe::NotRunning) => {
                    unanswered(*pid, Some(e.to_string()), quit_hint)
                }
                Err(e) => {
                    // Stopped (or crashed): wait for a worker to start again, and follow it.
                    gone = Some((*pid, crate::text::escape(&e.to_string()).into_owned()));
                    target = None;
                    before = None;
                    continue;
                }
            },
            None => match super::locate::running(path) {
                Ok(found) => {
                    target = Some(found);
                    continue;
                }
                Err(e) => {
                    let (pid, why) = gone.clone().unwrap_or((0, e.to_string()));
                    format!(
                        "gearshift top: the worker (pid {pid}) is gone ({why}).\nWaiting for a worker to start; it is followed when one does.\n\n{quit_hint}"
                    )
                }
            },
        };
        let frame = match window() {
            Some((rows, cols)) => fit(&frame, rows, cols, !table),
            None => frame,
        };
        let mut out = std::io::stdout().lock();
        // Home, draw, clear what is left of the previous frame.
        let _ = write!(out, "\x1b[H{}\x1b[J", frame.replace('\n', "\x1b[K\r\n"));
        let _ = out.flush();
        drop(out);
        if quit_pressed(interval, &ended, keys)? {
            return Ok(super::exit::OK);
        }
    }
}

/// The frame for a worker that runs (holds its lock) but does not answer, and why.
fn unanswered(pid: i32, why: Option<String>, quit_hint: &str) -> String {
    let why = crate::text::escape(why.as_deref().unwrap_or("no answer")).into_owned();
    format!(
        "gearshift top: the worker (pid {pid}) runs but does not answer on its status socket: {why}\nAsking again; it is shown when it answers.\n\n{quit_hint}"
    )
}

/// Waits up to `d` for a key (if `keys`); true for `q`, Esc or Ctrl-C, or once a signal set
/// `ended`.
fn quit_pressed(d: Duration, ended: &AtomicBool, keys: bool) -> Result<bool> {
    let deadline = Instant::now() + d;
    let stdin = std::io::stdin();
    loop {
        if ended.load(Ordering::Relaxed) {
            return Ok(true);
        }
        // A signal interrupts poll (EINTR); the flag is looked at again then.
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        if !keys {
            std::thread::sleep(left.min(Duration::from_millis(50)));
            continue;
        }
        let ms = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(Error::io("reading keys", e.into())),
        }
        let mut buf = [0u8; 64];
        match nix::unistd::read(std::os::fd::AsRawFd::as_raw_fd(&stdin), &mut buf) {
            // End of input: nobody can press q any more.
            Ok(0) => return Ok(true),
            Ok(n) => {
                if buf[..n]
                    .iter()
                    .any(|b| matches!(b, b'q' | b'Q' | 0x1b | 0x03))
                {
                    return Ok(true);
                }
            }
            Err(nix::errno::Errno::EINTR | nix::errno::Errno::EAGAIN) => {}
            Err(e) => return Err(Error::io("reading keys", e.into())),
        }
    }
}

fn read_sample(socket: &Path, pid: i32, pidfile: &Path) -> Result<Sample> {
    // The socket is briefly away while the worker re-execs; a worker whose lock is gone is not
    // waited for.
    let doc = match crate::status::query(socket, Some(pid)) {
        Ok(doc) => doc,
        Err(_)
            if crate::ops::pidfile::probe(pidfile).ok()
                == Some(crate::ops::pidfile::Probe::NotRunning) =>
        {
            return Err(Error::Msg("it stopped".into()))
        }
        Err(_) => crate::status::query_patiently(socket, Some(pid), Duration::from_secs(2))?,
    }
    .for_terminal();
    // The counters as data (no exposition to parse back); an older worker has none to give.
    let counts = crate::status::query_counts(socket, Some(pid)).unwrap_or_default();
    let functions: BTreeMap<String, Counts> = counts
        .metrics
        .functions
        .iter()
        .map(|(name, f)| {
            let c = Counts {
                done: f.done as f64,
                failed: f.failed as f64,
                timed_out: f.timed_out as f64,
                duration_sum: f.duration.sum_us as f64 / 1e6,
                duration_count: f.duration.counts.iter().sum::<u64>() as f64,
            };
            (crate::text::escape(name).into_owned(), c)
        })
        .collect();
    let deploys = counts
        .metrics
        .deploys
        .iter()
        .map(|(k, v)| (k.clone(), *v as f64))
        .collect();
    let queue = counts
        .queue
        .map(|q| (q.depth as f64, q.oldest_age_us as f64 / 1e6));
    Ok(Sample {
        at: Instant::now(),
        doc,
        functions,
        deploys,
        queue,
    })
}

/// Milliseconds as `850ms`, `12.3s`, `4m05s`, `2h10m`.
fn human_ms(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms}ms"),
        1_000..=59_999 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{}m{:02}s", ms / 60_000, (ms / 1000) % 60),
        _ => format!("{}h{:02}m", ms / 3_600_000, (ms / 60_000) % 60),
    }
}

fn draw(now: &Sample, before: Option<&Sample>) -> String {
    let d = &now.doc;
    let mut f = String::new();
    let _ = writeln!(
        f,
        "{} {} pid {}  generation {}  {}  source {}  {}",
        d.name,
        d.version,
        d.pid,
        d.generation,
        d.state,
        d.source,
        crate::clock::rfc3339_ms(crate::clock::now_ms())
    );
    let deploy = |k: &str| now.deploys.get(k).copied().unwrap_or(0.0);
    let _ = writeln!(
        f,
        "restarts {} (last: {} {})  refused reloads {}  deploys {}/{}/{} (switched/refused/rolled back)",
        d.restarts,
        d.last_restart_reason.as_deref().unwrap_or("-"),
        d.restarted_at.as_deref().unwrap_or(""),
        d.reload_refusals,
        deploy("switched"),
        deploy("refused"),
        deploy("rolled_back"),
    );
    let queue = match now.queue {
        Some((depth, oldest)) => format!("  queue {depth} (oldest {oldest:.1}s)"),
        None => String::new(),
    };
    let _ = writeln!(
        f,
        "jobs {} done, {} failed  in flight {}/{}{queue}",
        d.jobs_completed,
        d.jobs_failed,
        d.running_jobs.len(),
        d.lanes
    );
    if let Some(s) = &d.storage {
        let _ = writeln!(f, "DEGRADED: {} (since {})", s.error, s.since);
    }
    let _ = writeln!(
        f,
        "\n{:<5} {:<34} {:<24} {:>9}",
        "LANE", "JOB", "FUNCTION", "RUNNING"
    );
    for lane in 0..d.lanes {
        match d.running_jobs.iter().find(|j| j.lane == lane) {
            Some(j) => {
                let _ = writeln!(
                    f,
                    "{lane:<5} {:<34} {:<24} {:>9}",
                    clip(&j.id, 34),
                    clip(&j.function, 24),
                    human_ms(j.running_ms)
                );
            }
            None => {
                let _ = writeln!(f, "{lane:<5} {:<34}", "idle");
            }
        }
    }
    let _ = writeln!(
        f,
        "\n{:<24} {:>8} {:>10} {:>8} {:>9} {:>12}",
        "FUNCTION", "RATE/s", "DONE", "FAILED", "TIMEDOUT", "LATENCY"
    );
    for (name, c) in &now.functions {
        let prev = before.and_then(|b| b.functions.get(name).map(|p| (b.at, *p)));
        let (rate, latency) = match prev {
            Some((at, p)) => {
                let secs = now.at.duration_since(at).as_secs_f64().max(1e-3);
                let ended = (c.done + c.failed + c.timed_out) - (p.done + p.failed + p.timed_out);
                let n = c.duration_count - p.duration_count;
                let lat = if n > 0.0 {
                    human_ms(((c.duration_sum - p.duration_sum) / n * 1000.0).round() as u64)
                } else {
                    "-".into()
                };
                (format!("{:.1}", ended.max(0.0) / secs), lat)
            }
            None => ("-".into(), "-".into()),
        };
        let _ = writeln!(
            f,
            "{:<24} {:>8} {:>10} {:>8} {:>9} {:>12}",
            clip(name, 24),
            rate,
            c.done,
            c.failed,
            c.timed_out,
            latency
        );
    }
    if !d.servers.is_empty() {
        let _ = writeln!(
            f,
            "\n{:<28} {:<12} {:>6} {:>10}  LAST ERROR",
            "SERVER", "STATE", "LANES", "RECONNECTS"
        );
        for s in &d.servers {
            let _ = writeln!(
                f,
                "{:<28} {:<12} {:>6} {:>10}  {}",
                clip(&s.address, 28),
                s.state,
                s.lanes_connected,
                s.reconnects,
                s.last_error.as_deref().unwrap_or("")
            );
        }
    }
    let _ = writeln!(f, "\nq: quit");
    f
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut c: String = s.chars().take(n.saturating_sub(1)).collect();
        c.push('~');
        c
    }
}

/// The terminal's rows and columns, asked at every frame (a resized window is drawn to fit at
/// the next one); None if it says no size.
fn window() -> Option<(usize, usize)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which points at one that
    // lives through the call; the descriptor is only read from.
    let r = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    (r == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row.into(), ws.ws_col.into()))
}

/// `frame` fitted to `rows` x `cols`: each line cut at the right edge (it wrapped onto the
/// next), or wrapped there if `wrap` (a sentence, not a table); at most `rows` lines with no
/// newline after the last (one more scrolled the header off the top at every refresh), the
/// lines that do not fit left out but the last (the key hint), with a line in their place
/// saying how many.
fn fit(frame: &str, rows: usize, cols: usize, wrap: bool) -> String {
    let lines: Vec<String> = frame
        .trim_end_matches('\n')
        .split('\n')
        .flat_map(|l| match wrap {
            true => wrapped(l, cols),
            false => vec![clip(l, cols)],
        })
        .collect();
    if lines.len() <= rows || rows < 3 {
        return lines[..lines.len().min(rows)].join("\n");
    }
    let head = rows - 2;
    let left = lines.len() - head - 1;
    let mut kept = lines[..head].to_vec();
    kept.push(clip(
        &format!("... {left} more lines: a taller window shows them"),
        cols,
    ));
    kept.extend(lines.last().cloned());
    kept.join("\n")
}

/// `line` in pieces of at most `cols` characters, broken after a space where one is.
fn wrapped(line: &str, cols: usize) -> Vec<String> {
    let mut pieces = Vec::new();
    let mut rest: Vec<char> = line.chars().collect();
    while rest.len() > cols {
        let at = rest[..=cols]
            .iter()
            .rposition(|&c| c == ' ')
            .filter(|&at| at > 0)
            .unwrap_or(cols);
        pieces.push(rest[..at].iter().collect::<String>().trim_end().to_string());
        rest.drain(..at);
        while rest.first() == Some(&' ') {
            rest.remove(0);
        }
    }
    pieces.push(rest.into_iter().collect());
    pieces
}

/// The terminal in raw mode on the alternate screen, restored when dropped.
struct Screen {
    saved: Option<Termios>,
}

impl Screen {
    fn enter(keys: bool) -> Result<Screen> {
        let stdin = std::io::stdin();
        let saved = if keys {
            termios::tcgetattr(stdin.as_fd()).ok()
        } else {
            None
        };
        if let Some(t) = &saved {
            let mut raw = t.clone();
            // Keys one by one, unechoed; Ctrl-C arrives as a byte (and quits).
            raw.local_flags
                .remove(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG);
            termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)
                .map_err(|e| Error::io("setting the terminal", e.into()))?;
        }
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "\x1b[?1049h\x1b[?25l\x1b[2J");
        let _ = out.flush();
        Ok(Screen { saved })
    }
}

impl Drop for Screen {
    fn drop(&mut self) {
        let mut out = std::io::stdout().lock();
        let _ = write!(out, "\x1b[?25h\x1b[?1049l");
        let _ = out.flush();
        if let Some(t) = &self.saved {
            let _ = termios::tcsetattr(std::io::stdin().as_fd(), SetArg::TCSANOW, t);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_fits_the_window() {
        let frame = "head\nlane 0 a long line of text\nf1\nf2\nf3\n\nq: quit\n";
        assert_eq!(fit(frame, 40, 80, false), frame.trim_end());
        assert_eq!(
            fit(frame, 5, 10, false),
            "head\nlane 0 a ~\nf1\n... 3 mor~\nq: quit"
        );
        assert_eq!(fit(frame, 7, 80, false).lines().count(), 7);
        assert_eq!(fit(frame, 2, 80, false), "head\nlane 0 a long line of text");
        assert_eq!(fit(frame, 1, 1, false), "~");
        // A sentence is wrapped, at a space where one is.
        assert_eq!(
            fit("it does not answer: kill -CONT 42\n\nq: quit", 10, 12, true),
            "it does not\nanswer: kill\n-CONT 42\n\nq: quit"
        );
        assert_eq!(wrapped("abcdefgh", 3), ["abc", "def", "gh"]);
        assert_eq!(wrapped("", 3), [""]);
    }

    #[test]
    fn durations_read_well() {
        assert_eq!(human_ms(850), "850ms");
        assert_eq!(human_ms(12_300), "12.3s");
        assert_eq!(human_ms(245_000), "4m05s");
        assert_eq!(human_ms(7_800_000), "2h10m");
    }
}
