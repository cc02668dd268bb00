//! File watching: inotify on directories, never on files.
//!
//! Editors and `sed -i` replace a file by renaming a new one over it, and Kubernetes swaps a
//! `..data` symlink; a watch on the file itself would follow the old inode and go silent. So we
//! watch the parent directory and treat every event there as "maybe changed". The watcher only
//! says that something happened; the worker loop debounces, then reads, hashes and validates
//! between jobs, and restarts only if the content digest really differs.
//!
//! All watches of a generation (config, jobs_dir, the spool queue) share one inotify instance,
//! read by one thread; see [`crate::watch::inotify`] for why that instance outlives the generation.

mod chain;
pub mod inotify;
mod offers;

pub use chain::links_through;
pub use offers::Offers;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::text::{hex, ShowPath};
use crate::watch::chain::{chain, Kind};
use crate::watch::inotify::{Event, Inotify};

/// What changed on disk, as reported to the worker loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Touched {
    /// `writing`: the config (or a link it leads through) is open for writing now: modified and
    /// not yet closed (a slow write in place, whose prefix must not be judged).
    Config {
        writing: bool,
    },
    Jobs,
    Binary,
    /// The watch itself failed (the reason): nothing more will be reported; poll instead.
    Lost(String),
}

const CONFIG: u8 = 1;
const JOBS: u8 = 2;
const QUEUE: u8 = 4;
const BINARY: u8 = 8;

/// What to watch in one generation.
pub struct Targets<'a> {
    pub config: Option<&'a Path>,
    pub jobs_dir: Option<&'a Path>,
    /// Directories where new jobs appear (the spool's `new/`).
    pub queue: Vec<PathBuf>,
    /// The binary (deploys): its directory is watched, and every link its path leads through.
    pub binary: Option<&'a Path>,
}

/// Which targets could not be watched (the caller polls those instead).
#[derive(Debug, Default)]
pub struct Unwatched {
    pub config: Option<Error>,
    pub jobs: Option<Error>,
    pub queue: Option<Error>,
}

/// Adds the watches for `targets` to `inotify` and starts the thread that reads it: config and
/// jobs events are reported as [`Touched`]; queue events call `on_queue`.
pub fn start(
    inotify: &Arc<Inotify>,
    targets: &Targets<'_>,
    report: impl Fn(Touched) + Send + 'static,
    on_queue: impl Fn() + Send + 'static,
) -> Result<Unwatched> {
    let mut routes: HashMap<i32, u8> = HashMap::new();
    let mut unwatched = Unwatched::default();
    let mut watched: Vec<PathBuf> = Vec::new();
    // What each directory watched for config, jobs or the binary is now (see `Rewatch`).
    let mut seen: HashMap<PathBuf, (u64, u64)> = HashMap::new();
    let mut add = |dirs: &[PathBuf], bit: u8| -> Option<Error> {
        for dir in dirs {
            // Taken before the watch: a directory replaced in between is seen as new later.
            let id = (bit != QUEUE).then(|| identity(dir)).flatten();
            // A queue is watched for arrivals only (its claims would wake us at the job rate),
            // unless the same directory is watched for everything already.
            let added = if bit == QUEUE && !watched.contains(dir) {
                inotify.add_arrivals(dir)
            } else {
                inotify.add(dir)
            };
            match added {
                Ok(wd) => *routes.entry(wd).or_default() |= bit,
                Err(e) => return Some(Error::io_path("watching", dir, e)),
            }
            if let Some(id) = id {
                seen.insert(dir.clone(), id);
            }
            watched.push(dir.clone());
        }
        None
    };
    let paths: Vec<(PathBuf, Kind, u8)> = [
        (targets.config, Kind::File, CONFIG),
        (targets.jobs_dir, Kind::Dir, JOBS),
        (targets.binary, Kind::File, BINARY),
    ]
    .into_iter()
    .filter_map(|(p, kind, bit)| p.map(|p| (p.to_path_buf(), kind, bit)))
    .collect();
    let mut config_names = Vec::new();
    for (path, kind, bit) in &paths {
        let c = chain(path, *kind);
        let failed = add(&c.dirs, *bit);
        match *bit {
            CONFIG => (unwatched.config, config_names) = (failed, c.names),
            JOBS => unwatched.jobs = failed,
            _ => {
                if let Some(e) = failed {
                    log::warn!("{e}; deploys of a new binary will not be noticed");
                }
            }
        }
        // Best effort: a swap there is also found by the look every REWATCH_EVERY.
        for holder in &c.holders {
            let _ = add(std::slice::from_ref(holder), *bit);
        }
    }
    unwatched.queue = add(&targets.queue, QUEUE);

    let mut writers = Writers::default();
    let mut anew = Rewatch {
        paths,
        config_names,
        seen,
        last: std::time::Instant::now(),
    };
    let ino = Arc::clone(inotify);
    crate::ops::signals::spawn_essential("watch", move || {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let left = REWATCH_EVERY.saturating_sub(anew.last.elapsed());
            let follow = |wd: i32, name: &[u8]| {
                routes.get(&wd).is_some_and(|b| b & CONFIG != 0)
                    && anew.config_names.iter().any(|n| n.as_bytes() == name)
            };
            let waited = ino.wait_named(
                Some(left.max(std::time::Duration::from_millis(10))),
                &mut buf,
                &follow,
            );
            // Fault-injection builds (tests only): a failed read, a watch thread held.
            #[cfg(gearshift_faults)]
            let waited = crate::ops::faults::watch_read(waited);
            let events = match waited {
                Ok(e) => e,
                Err(e) => {
                    report(Touched::Lost(format!("reading inotify: {e}")));
                    return;
                }
            };
            let mut bits = 0u8;
            for e in events {
                bits |= match e {
                    Event::Overflow => {
                        // A writer's close may be among the events lost.
                        writers.open.clear();
                        CONFIG | JOBS | QUEUE | BINARY
                    }
                    // Watches of earlier generations that this one no longer routes.
                    Event::Watch(wd) => routes.get(&wd).copied().unwrap_or(0),
                    Event::Named { wd, mask, name } => {
                        writers.note(wd, mask, name);
                        0
                    }
                };
            }
            if bits & !QUEUE != 0 || anew.last.elapsed() >= REWATCH_EVERY {
                let rewatched = anew.check(&ino, &mut routes);
                if rewatched & CONFIG != 0 {
                    // Watched anew: what was open in the directories left is not followed.
                    writers.open.clear();
                }
                bits |= rewatched;
            }
            if bits & QUEUE != 0 {
                on_queue();
            }
            if bits & CONFIG != 0 {
                report(Touched::Config {
                    writing: !writers.open.is_empty(),
                });
            }
            if bits & JOBS != 0 {
                report(Touched::Jobs);
            }
            if bits & BINARY != 0 {
                report(Touched::Binary);
            }
        }
    })
    .map_err(|e| Error::io("spawning the watch thread", e))?;
    Ok(unwatched)
}

/// How often the watched directories are looked at again when no event came (see [`Rewatch`]).
const REWATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// The directories of the config, `jobs_dir` and the binary, as their paths lead now. A watch
/// follows a directory's inode: one moved away and made again at its path (deploy and config
/// tools replace a directory whole) left the watch on the old one, and every later edit went
/// unnoticed. So after any event there, and every [`REWATCH_EVERY`], each path is looked at
/// again; a directory that is not the one watched is watched anew, and reported as touched.
struct Rewatch {
    /// Each target (config, `jobs_dir`, binary) as given.
    paths: Vec<(PathBuf, Kind, u8)>,
    /// The names of the config's path and of each link it leads through ([`chain`]), as last
    /// looked at: the entries whose writers are followed ([`Writers`]).
    config_names: Vec<OsString>,
    /// The identity (device, inode) last watched at each path.
    seen: HashMap<PathBuf, (u64, u64)>,
    last: std::time::Instant,
}

impl Rewatch {
    /// Watches what is new at the paths; returns the bits of the targets it touched.
    fn check(&mut self, ino: &Inotify, routes: &mut HashMap<i32, u8>) -> u8 {
        self.last = std::time::Instant::now();
        let mut touched = 0;
        for (path, kind, bit) in &self.paths {
            let c = chain(path, *kind);
            for dir in c.dirs.into_iter().chain(c.holders) {
                // Gone for now: watched once it is back.
                let Some(id) = identity(&dir) else { continue };
                if self.seen.get(&dir) == Some(&id) {
                    continue;
                }
                if let Ok(wd) = ino.add(&dir) {
                    *routes.entry(wd).or_default() |= bit;
                    self.seen.insert(dir, id);
                    touched |= bit;
                }
            }
            if *bit == CONFIG {
                self.config_names = c.names;
            }
        }
        touched
    }
}

/// The device and inode of what `dir` leads to now.
fn identity(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(dir).ok().map(|m| (m.dev(), m.ino()))
}

/// The config's entries a writer holds open: modified (`IN_MODIFY`, a truncation too) and not
/// yet closed. Only the names of the config's chain are followed (`Rewatch::config_names`: a
/// log file beside it is written all the time and never closed).
#[derive(Default)]
struct Writers {
    open: HashSet<(i32, OsString)>,
}

impl Writers {
    fn note(&mut self, wd: i32, mask: u32, name: OsString) {
        if mask & (libc::IN_CLOSE_WRITE | libc::IN_DELETE | libc::IN_MOVED_FROM) != 0 {
            self.open.remove(&(wd, name));
        } else if mask & libc::IN_MODIFY != 0 {
            self.open.insert((wd, name));
        }
    }
}

/// What a file in `jobs_dir` that is neither a regular file nor a directory (which may hold a
/// job's helpers) is said to be: no job function (it was skipped without a word).
fn not_a_file(path: &Path, meta: &fs::Metadata) -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    let what = if t.is_dir() {
        return None;
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "of an unknown type"
    };
    Some(format!(
        "\"{}\" in jobs_dir is {what}, not a regular file, so it is no job function",
        path.shown()
    ))
}

/// How many bytes of job executables one scan of `jobs_dir` hashes, in name order (about a
/// quarter second here); the files past it enter the digest by identity (device, inode, size,
/// modification and change times) instead of content.
const HASHED_PER_SCAN: u64 = 128 << 20;

/// The executables of `jobs_dir` by function name (the file name without its last extension),
/// a digest of the directory's state (names, modes, contents; hidden files and editor leftovers
/// skipped) for change detection, and warnings (files that are not functions, and why: not
/// executable, not a file, a name no function can have). A file that is executable but could
/// not run without a shell (no `#!`, not ELF), or two files for one name, make the whole
/// directory invalid.
pub fn scan_jobs(dir: &Path) -> Result<Jobs> {
    let mut budget = HASHED_PER_SCAN;
    let mut found = BTreeMap::new();
    let mut warnings = Vec::new();
    let mut digest = Sha256::new();
    let too_many = |what: &str, most: usize| {
        Error::Invalid(format!(
            "jobs_dir \"{}\" holds more than {most} {what}, more than one worker serves (its status, metrics and server registrations stay bounded): is it the directory meant?",
            dir.shown()
        ))
    };
    let mut entries = Vec::new();
    let listed = fs::read_dir(dir).map_err(|e| Error::io_path("reading jobs_dir", dir, e))?;
    for entry in listed.filter_map(|e| e.ok()) {
        if entries.len() == MAX_ENTRIES {
            return Err(too_many("entries", MAX_ENTRIES));
        }
        entries.push(entry);
    }
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let Some(file) = entry.file_name().to_str().map(str::to_string) else {
            let name = entry.file_name();
            warnings.push(format!(
                "\"{}\" in jobs_dir has a name that is not UTF-8, so it is no job function (rename it)",
                crate::text::escape_bytes(name.as_encoded_bytes())
            ));
            continue;
        };
        let Some(function) = offers::function_of(&file) else {
            continue;
        };
        let path = entry.path();
        // Follow symlinks: a deploy may point jobs at a versioned directory.
        let meta = match fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) => {
                warnings.extend(link_to_nothing(&path, &e));
                continue;
            }
        };
        if !meta.is_file() {
            warnings.extend(not_a_file(&path, &meta));
            continue;
        }
        let mode = meta.permissions().mode();
        digest.update(file.as_bytes());
        digest.update(mode.to_le_bytes());
        // Root reads these at `check` and `start`, and jobs_dir may be the worker's user's:
        // opened without blocking (a FIFO swapped in after the metadata look cannot hang us),
        // the type checked on the open descriptor, the content hashed as a stream.
        let mut opened = crate::ops::safefs::open_regular(&path, "reading job")?;
        let mut head = [0u8; crate::jobs::shebang::HEAD];
        let n = std::io::Read::read(&mut opened, &mut head)
            .map_err(|e| Error::io_path("reading job", &path, e))?;
        // Contents are hashed up to a budget per scan: a file past it (a 1 TiB sparse file a
        // job made would hold root's `check` and the control thread for an hour) is known by
        // its identity instead, whose change time no user can set back.
        let m = opened
            .metadata()
            .map_err(|e| Error::io_path("reading job", &path, e))?;
        if m.len() <= budget {
            budget -= m.len();
            let mut content = Sha256::new();
            content.update(&head[..n]);
            std::io::copy(&mut std::io::Read::take(&mut opened, m.len()), &mut content)
                .map_err(|e| Error::io_path("reading job", &path, e))?;
            digest.update(content.finalize());
        } else {
            use std::os::unix::fs::MetadataExt;
            for x in [m.dev(), m.ino(), m.len()] {
                digest.update(x.to_le_bytes());
            }
            for x in [m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()] {
                digest.update(x.to_le_bytes());
            }
        }
        if mode & 0o111 == 0 {
            warnings.push(format!(
                "\"{}\" is not executable, so it is no job function (chmod +x it, or move it out of jobs_dir)",
                path.shown()
            ));
            continue;
        }
        if let Some(why) = unnamable(&path, function) {
            warnings.push(why);
            continue;
        }
        let name = function.to_string();
        if let Some(why) = crate::jobs::shebang::cannot_run(&path, &head[..n]) {
            return Err(Error::Invalid(why));
        }
        warnings.extend(crate::jobs::shebang::line_endings_warning(
            &path,
            &head[..n],
        ));
        if found.len() == MAX_FUNCTIONS {
            return Err(too_many("executables", MAX_FUNCTIONS));
        }
        if let Some(other) = found.insert(name.clone(), path.clone()) {
            return Err(Error::Invalid(format!(
                "function \"{name}\" is defined twice in jobs_dir: \"{}\" and \"{}\" (rename one)",
                other.shown(),
                path.shown()
            )));
        }
    }
    if warnings.len() > MAX_WARNINGS {
        let more = warnings.len() - MAX_WARNINGS;
        warnings.truncate(MAX_WARNINGS);
        warnings.push(format!("and {more} more such findings in jobs_dir"));
    }
    Ok(Jobs {
        functions: found,
        digest: hex(&digest.finalize()),
        warnings,
    })
}

/// The most executables a `jobs_dir` may hold: each is a function in `status`, in the metrics
/// and in every server registration. 4,096 names of the longest (128 bytes) fit the status
/// document a client reads (1 MiB).
pub const MAX_FUNCTIONS: usize = 4096;
/// The most entries of any kind a `jobs_dir` is listed with (its listing is held in memory).
const MAX_ENTRIES: usize = 65_536;
/// The warning for an executable whose file names a function no function can be called (a
/// space, a character beyond ASCII, over 128 bytes), if `function` is such a name.
fn unnamable(path: &Path, function: &str) -> Option<String> {
    crate::config::check_function_name(function).err()?;
    Some(format!(
        "\"{}\" is named for the function \"{}\", which no function can be called (letters, digits, '_', '-', '.', ':'; at most 128 bytes), so it is no job function (rename it)",
        path.shown(),
        crate::text::escape(&crate::text::cut(function, 160))
    ))
}

/// The most findings of one scan kept as warnings (each one is in `status` and the log).
const MAX_WARNINGS: usize = 20;

/// Said of a link in `jobs_dir` whose target is gone (a versioned directory removed): its
/// function would vanish without a word. None: `path` is no link.
fn link_to_nothing(path: &Path, e: &std::io::Error) -> Option<String> {
    let target = fs::read_link(path).ok()?;
    Some(format!(
        "\"{}\" is a link to \"{}\", which {}, so it is no job function",
        path.shown(),
        crate::text::escape_bytes(target.as_os_str().as_encoded_bytes()),
        if e.kind() == std::io::ErrorKind::NotFound {
            "does not exist".to_string()
        } else {
            format!("cannot be used ({e})")
        }
    ))
}

/// What [`scan_jobs`] found; handed to the next generation as validated (see
/// [`crate::worker::Plan`]).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Jobs {
    pub functions: BTreeMap<String, PathBuf>,
    pub digest: String,
    pub warnings: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn a_scans_findings_are_bounded() {
        let dir = crate::testutil::tempdir("scan", "findings");
        for i in 0..25 {
            fs::write(dir.join(format!("note{i:02}.txt")), "not a job").expect("write");
        }
        let jobs = scan_jobs(&dir).expect("scan");
        assert_eq!(jobs.warnings.len(), MAX_WARNINGS + 1, "{:?}", jobs.warnings);
        assert_eq!(
            jobs.warnings[MAX_WARNINGS],
            "and 5 more such findings in jobs_dir"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn scan_finds_executables_and_notices_changes() {
        let dir = crate::testutil::tempdir("scan", "jobs");
        let write = |name: &str, body: &str, mode: u32| {
            let p = dir.join(name);
            fs::write(&p, body).expect("write");
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
        };
        write("wc.sh", "#!/bin/sh\nwc -w\n", 0o755);
        write("notes.txt", "not a job", 0o644);
        write(".hidden", "x", 0o755);
        let jobs = scan_jobs(&dir).expect("scan");
        assert_eq!(jobs.functions.keys().collect::<Vec<_>>(), ["wc"]);
        assert!(
            jobs.warnings[0].contains("notes.txt\" is not executable"),
            "{:?}",
            jobs.warnings
        );
        let d1 = jobs.digest;

        write("wc.sh", "#!/bin/sh\nwc -l\n", 0o755);
        let d2 = scan_jobs(&dir).expect("scan").digest;
        assert_ne!(d1, d2, "content change must change the digest");

        write("notes.txt", "#!/bin/sh\n", 0o755);
        let jobs = scan_jobs(&dir).expect("scan");
        assert_ne!(d2, jobs.digest, "mode change must change the digest");
        assert!(jobs.functions.contains_key("notes"));
        // The name is the file name without its last extension.
        write("my.job.sh", "#!/bin/sh\n", 0o755);
        assert!(scan_jobs(&dir)
            .expect("scan")
            .functions
            .contains_key("my.job"));
        fs::remove_file(dir.join("my.job.sh")).expect("rm");
        // Executable but no #! and not ELF: it would run through /bin/sh; refused.
        write("bare", "echo hi\n", 0o755);
        let err = scan_jobs(&dir)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("no #! line"), "{err}");
        fs::remove_file(dir.join("bare")).expect("rm");

        write("wc.py", "#!/usr/bin/env python3\n", 0o755);
        let err = scan_jobs(&dir).expect_err("duplicate").to_string();
        assert!(err.contains("defined twice"), "{err}");
        fs::remove_file(dir.join("wc.py")).expect("rm");
        // A name that is not UTF-8 is no function, and says so (it was skipped silently).
        let odd = std::ffi::OsStr::from_bytes(b"caf\xe9.sh");
        fs::write(dir.join(odd), "#!/bin/sh\n").expect("write");
        let jobs = scan_jobs(&dir).expect("scan");
        assert!(
            jobs.warnings
                .iter()
                .any(|w| w.contains("caf\\xe9.sh") && w.contains("not UTF-8")),
            "{:?}",
            jobs.warnings
        );
        let _ = fs::remove_dir_all(&dir);
    }
}
