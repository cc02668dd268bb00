//! Log lines: `2026-11-24T09:51:28.123Z INFO  g3 message`, to stderr or to `[log] file`. The
//! generation is in every line so a restart is visible in the log; job lines name the job id.
//! With `[log] format = "json"`, one JSON object per line instead: `time`, `level`,
//! `generation`, `message`, and the record's key-values (a job's `job`, `function`,
//! `duration_ms`, `outcome`).
//!
//! The log file is opened for appending and reopened on SIGUSR1, so logrotate can move it away
//! without `copytruncate` (the nginx and Unicorn convention).
//!
//! In JSON mode every line is one JSON object, from the first: `start` and every exec (the
//! supervisor's worker, a re-exec'd generation, a rollback) pass [`ENV_FORMAT`] on, so a line
//! written before the config is read (a start-up error) is JSON too; panics reach the log
//! through [`install_panic_hook`], not as the runtime's plain text on stderr.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use nix::unistd::{Gid, Uid};

use crate::ops::safefs::{Dir, Open};
use crate::text::ShowPath;

pub use super::recurring::Recurring;

/// Set (to `json`) in the environment of every process this one execs while in JSON mode.
/// Under the internal prefix: never passed to jobs.
pub const ENV_FORMAT: &str = "GEARSHIFT_INHERIT_LOG_FORMAT";

static GENERATION: AtomicU64 = AtomicU64::new(0);
static JSON: AtomicBool = AtomicBool::new(false);
static JOB_LINES: AtomicBool = AtomicBool::new(false);

/// Where log lines go: stderr until a file is set.
static SINK: Mutex<Option<(PathBuf, File)>> = Mutex::new(None);

/// The writer env_logger writes each record to.
struct Sink;

/// What the log file could not take since it last could (see [`to_file`]).
struct Lost {
    since_ms: u64,
    why: String,
    lines: u64,
}

static LOST: Mutex<Option<Lost>> = Mutex::new(None);
/// The last write to the file ended inside a line (the disk took only part of it).
static TORN: AtomicBool = AtomicBool::new(false);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut guard = SINK.lock().ok();
        match guard.as_mut().and_then(|g| g.as_mut()) {
            Some((_, file)) => to_file(file, buf),
            None => Ok(to_stderr(buf)),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes to the log file. A write that fails (a full disk, a file size limit) loses the line
/// there; it goes to stderr instead (the journal, under systemd), is counted, and `status`
/// says so ([`failing`]); the first line the file takes again is preceded by one saying how
/// many were lost, and since when. Before, every line was lost without a word anywhere.
fn to_file(file: &mut File, buf: &[u8]) -> io::Result<usize> {
    let gap = LOST
        .lock()
        .ok()
        .and_then(|l| l.as_ref().map(|l| (l.lines, l.since_ms, l.why.clone())));
    let written = match gap {
        Some((n, since, why)) => {
            let mut note = own_line(
                "warn",
                &format!(
                    "{n} log lines were lost: the log file could not be written from {} ({why})",
                    crate::clock::rfc3339_ms(since)
                ),
                false,
            );
            if TORN.load(Ordering::Relaxed) {
                note.insert(0, '\n');
            }
            file.write_all(note.as_bytes())
                .and_then(|()| file.write(buf))
        }
        None => file.write(buf),
    };
    match written {
        Ok(n) => {
            if let Ok(mut l) = LOST.lock() {
                *l = None;
            }
            TORN.store(
                n < buf.len() || !buf[..n].ends_with(b"\n"),
                Ordering::Relaxed,
            );
            Ok(n)
        }
        Err(e) => {
            if let Ok(mut l) = LOST.lock() {
                let l = l.get_or_insert_with(|| Lost {
                    since_ms: crate::clock::now_ms(),
                    why: e.to_string(),
                    lines: 0,
                });
                l.lines += 1;
            }
            to_stderr(buf);
            Err(e)
        }
    }
}

/// A line to stderr, never waited for (see [`super::stderr`]); what it lost is said first once
/// it takes lines again.
fn to_stderr(buf: &[u8]) -> usize {
    super::stderr::write_line(buf, |lost| own_line("warn", lost, false))
}

/// Why the log file cannot be written, and how many lines that has cost, while it lasts (for
/// `status`).
pub fn failing() -> Option<String> {
    let l = LOST.lock().ok()?;
    let l = l.as_ref()?;
    Some(format!(
        "the log file cannot be written since {} ({}): {} lines lost so far (on stderr instead)",
        crate::clock::rfc3339_ms(l.since_ms),
        l.why,
        l.lines
    ))
}

/// Opens the log file for appending (creating it 0640), never through a planted link, FIFO or
/// hard link (see [`crate::ops::safefs`]). `owner`: give the file to the user we will drop to,
/// through its descriptor, so later generations can reopen it.
pub fn open_log(path: &Path, owner: Option<(Uid, Gid)>) -> crate::Result<File> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Err(crate::Error::Msg(format!(
            "bad log file path \"{}\"",
            path.shown()
        )));
    };
    // A bare name's parent is empty: the working directory.
    let dir = Some(dir)
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let opened = Dir::open(dir)?.file(
        name,
        Open {
            write: true,
            append: true,
            create: Some(0o640),
        },
    )?;
    if let Some((uid, gid)) = owner {
        let held_by = opened
            .file
            .metadata()
            .map_err(|e| crate::Error::io_path("checking", path, e))?
            .uid();
        // Root gives away only a log file it made just now, or one the user has already: any
        // other (say `/etc/passwd` by a slip of the hand) every job could then rewrite.
        if !opened.created && held_by != uid.as_raw() {
            return Err(crate::Error::Unsafe(format!(
                "log file \"{}\" is {}, and root gives the worker's user only a log file it makes itself or one already the user's; if it is gearshift's log: chown {}:{} \"{}\", else point [log] file at a file of its own",
                path.shown(),
                if held_by == 0 { "root's".to_string() } else { format!("uid {held_by}'s") },
                uid,
                gid,
                path.shown()
            )));
        }
        crate::ops::safefs::chown_file(&opened.file, path, uid, gid)?;
    }
    Ok(opened.file)
}

/// Sends log lines to `path` (appending) from now on; see [`open_log`] for `owner`.
pub fn set_file(path: &Path, owner: Option<(Uid, Gid)>) -> crate::Result<()> {
    let file = open_log(path, owner)?;
    if let Ok(mut s) = SINK.lock() {
        *s = Some((path.to_path_buf(), file));
    }
    Ok(())
}

/// Whether log lines go to a file (rather than stderr).
pub fn has_file() -> bool {
    SINK.lock().map(|s| s.is_some()).unwrap_or(false)
}

/// Reopens the log file at its path (after logrotate moved it). Returns the path, or None when
/// logging to stderr.
pub fn reopen() -> crate::Result<Option<PathBuf>> {
    let Ok(mut s) = SINK.lock() else {
        return Ok(None);
    };
    let Some((path, file)) = s.as_mut() else {
        return Ok(None);
    };
    match open_log(path, None) {
        Ok(f) => *file = f,
        Err(e) => {
            set_astray(path, &e, "a SIGUSR1 could not open it");
            return Err(e);
        }
    }
    set_unstray();
    Ok(Some(path.clone()))
}

/// SIGUSR1: [`reopen`], and what came of it said.
pub fn on_usr1() {
    match reopen() {
        Ok(Some(path)) => log::info!("SIGUSR1: reopened log file {}", path.shown()),
        Ok(None) => log::info!("SIGUSR1: logging to stderr, nothing to reopen"),
        Err(e) => log::error!("SIGUSR1: {e}; still writing to the old file"),
    }
}

/// Why lines go to a file the log's path no longer names, since when (for `status`).
static ASTRAY: Mutex<Option<String>> = Mutex::new(None);

fn set_astray(path: &Path, e: &crate::Error, when: &str) {
    if let Ok(mut a) = ASTRAY.lock() {
        *a = Some(format!(
            "log file \"{}\": {when} ({e}) at {}; lines go on to the file it had. Make it for the worker's user (logrotate's `create 0640 USER GROUP`) or give its directory to that user, then send SIGUSR1 (`gearshift reopen-logs`)",
            path.shown(),
            crate::clock::rfc3339_ms(crate::clock::now_ms()),
        ));
    }
}

fn set_unstray() {
    if let Ok(mut a) = ASTRAY.lock() {
        *a = None;
    }
}

/// While the log's path names no file this worker can open: why, and what to do (`status`).
pub fn astray() -> Option<String> {
    ASTRAY.lock().ok()?.clone()
}

/// The log file's descriptor, kept open across the coming exec (see [`resume`]); undone by
/// [`not_handed`] if the exec fails.
pub fn handed() -> Option<i32> {
    let s = SINK.lock().ok()?;
    let (_, file) = s.as_ref()?;
    crate::ops::handover::keep(std::os::fd::AsFd::as_fd(file)).ok()?;
    Some(std::os::fd::AsRawFd::as_raw_fd(file))
}

/// Undoes [`handed`] (the exec failed and this image carries on).
pub fn not_handed() {
    if let Ok(s) = SINK.lock() {
        if let Some((_, file)) = s.as_ref() {
            crate::ops::handover::release(std::os::fd::AsFd::as_fd(file));
        }
    }
}

/// A re-exec'd generation's log: `path` opened again (so a rotation is picked up), or, when
/// this image (its user's, not root's) cannot open it (deleted or moved away from a directory
/// only root may write), the file the previous image wrote, `carried`, with a warning in
/// `status` until a SIGUSR1 opens the path. Before, such a generation died at start, and the
/// worker with it. The same path already set (by an earlier step of this start) is kept.
pub fn resume(path: &Path, carried: Option<i32>) -> crate::Result<()> {
    if SINK
        .lock()
        .is_ok_and(|s| s.as_ref().is_some_and(|(p, _)| p == path))
    {
        return Ok(());
    }
    let carried = crate::ops::handover::adopt(carried, |_| true)
        .map(File::from)
        .filter(|f| f.metadata().is_ok_and(|m| m.is_file()));
    let (file, astray) = match (open_log(path, None), carried) {
        (Ok(file), _) => (file, None),
        (Err(e), Some(file)) => (file, Some(e)),
        (Err(e), None) => return Err(e),
    };
    if let Ok(mut s) = SINK.lock() {
        *s = Some((path.to_path_buf(), file));
    }
    match astray {
        Some(e) => {
            set_astray(path, &e, "this generation could not open it");
            log::warn!(
                "log file \"{}\": cannot open it ({e}); writing on to the file the previous generation had",
                path.shown()
            );
        }
        None => set_unstray(),
    }
    Ok(())
}

/// Sets the generation shown in log lines.
pub fn set_generation(g: u64) {
    GENERATION.store(g, Ordering::Relaxed);
}

/// Installs the logger. `GEARSHIFT_LOG` (env_logger syntax) overrides the configured level.
pub fn init(default: log::LevelFilter) {
    let mut b = env_logger::Builder::new();
    // The builder's own filter lets everything through; log::max_level does the filtering, so
    // the level can change once the config has been read.
    b.filter_level(log::LevelFilter::Trace);
    if std::env::var_os(ENV_FORMAT).is_some_and(|v| v == "json") {
        JSON.store(true, Ordering::Relaxed);
    }
    let spec = std::env::var("GEARSHIFT_LOG").ok();
    if let Some(spec) = &spec {
        // env_logger takes any word as a module name: say so for what is no level at all. Said
        // as every generation starts, so never waited for (a stderr nobody reads held a
        // reload's new generation here for ever, and one whose reader was gone ended it).
        for bad in unknown_directives(spec) {
            let line = format!(
                "gearshift: warning: GEARSHIFT_LOG: \"{}\" is not a level (off, error, warn, info, debug, trace) nor module=level; it is taken as a module name and so changes nothing here\n",
                crate::text::escape(&bad)
            );
            to_stderr(line.as_bytes());
        }
        b.parse_filters(spec);
    }
    b.format(|buf, record| {
        let g = GENERATION.load(Ordering::Relaxed);
        let ts = crate::clock::rfc3339_ms(crate::clock::now_ms());
        if JSON.load(Ordering::Relaxed) {
            return writeln!(buf, "{}", super::logjson::line(&ts, g, record));
        }
        let gen = if g == 0 {
            String::new()
        } else {
            format!(" g{g}")
        };
        // One record, one line: text from outside (a server's error, a job's, a file name)
        // cannot forge a line or reach a terminal's escape sequences.
        let message = crate::text::cut(&record.args().to_string(), 16 << 10).into_owned();
        writeln!(
            buf,
            "{ts} {:<5}{gen} {}",
            record.level(),
            crate::text::escape(&message)
        )
    });
    b.target(env_logger::Target::Pipe(Box::new(Sink)));
    if b.try_init().is_ok() && spec.is_none() {
        log::set_max_level(default);
    }
}

/// The directives of a `GEARSHIFT_LOG` spec that set no level: neither `LEVEL` nor
/// `module=LEVEL` (nor a gearshift module path alone).
fn unknown_directives(spec: &str) -> Vec<String> {
    let level = |s: &str| s.trim().parse::<log::LevelFilter>().is_ok();
    spec.split('/')
        .next()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .filter(|d| match d.split_once('=') {
            Some((_, l)) => !level(l),
            None => !level(d) && !d.starts_with("gearshift"),
        })
        .map(str::to_string)
        .collect()
}

/// Applies the configured level (after the config is read); `GEARSHIFT_LOG` still wins.
/// Chooses the line format (`[log] format`) and whether every finished job gets an info line
/// (`[log] jobs`); each generation applies its config's.
pub fn set_format(json: bool, job_lines: bool) {
    JSON.store(json, Ordering::Relaxed);
    JOB_LINES.store(job_lines, Ordering::Relaxed);
}

/// Whether lines are JSON objects (`[log] format = "json"`).
pub fn is_json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// A line the logger writes itself (not through `log`): a panic, or the lines a full disk
/// cost. As the records look: a JSON object in JSON mode, else an escaped text line.
fn own_line(level: &str, message: &str, panic: bool) -> String {
    let ts = crate::clock::rfc3339_ms(crate::clock::now_ms());
    let g = GENERATION.load(Ordering::Relaxed);
    if JSON.load(Ordering::Relaxed) {
        let mut o = super::logjson::head(&ts, level, g, message);
        if panic {
            o.insert("panic".into(), true.into());
        }
        format!("{}\n", super::logjson::text(o))
    } else {
        let gen = if g == 0 {
            String::new()
        } else {
            format!(" g{g}")
        };
        format!(
            "{ts} {:<5}{gen} {}\n",
            level.to_uppercase(),
            crate::text::escape(message)
        )
    }
}

/// Routes panics to the log (a JSON object in JSON mode, an escaped line otherwise) instead of
/// the runtime's plain text on stderr: thread, location and message. Writes directly to the
/// sink without waiting for its lock (a panic inside the logger cannot deadlock here).
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = format!("panic in thread '{name}'{at}: {what}");
        let line = own_line("error", &message, true);
        let mut guard = SINK.try_lock().ok();
        match guard.as_mut().and_then(|g| g.as_mut()) {
            Some((_, file)) => {
                let _ = file.write_all(line.as_bytes());
            }
            None => {
                to_stderr(line.as_bytes());
            }
        }
    }));
}

/// Whether a finished job is logged at info level (else debug; failures always warn).
pub fn job_lines() -> bool {
    JOB_LINES.load(Ordering::Relaxed)
}

pub fn set_level(level: log::LevelFilter) {
    if std::env::var_os("GEARSHIFT_LOG").is_none() {
        log::set_max_level(level);
    }
}
