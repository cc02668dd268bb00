//! File watching: `notify` (inotify) on directories, never on files.
//!
//! Editors and `sed -i` replace a file by renaming a new one over it, and Kubernetes swaps a
//! `..data` symlink; a watch on the file itself would follow the old inode and go silent. So we
//! watch the parent directory and treat every event there as "maybe changed". The watcher only
//! says that something happened; the worker loop debounces, then reads, hashes and validates
//! between jobs, and restarts only if the content digest really differs.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crossbeam_channel::Sender;
use notify::{RecursiveMode, Watcher};
use sha2::{Digest, Sha256};

use crate::config::hex;
use crate::error::{Error, Result};

/// A running directory watch; dropping it stops the watch and closes its inotify descriptor.
pub struct DirWatcher {
    _inner: notify::RecommendedWatcher,
}

/// Calls `on_event` (on the watcher's thread) for every event in any of `dirs`.
pub fn watch_dirs(
    dirs: &[PathBuf],
    mut on_event: impl FnMut() + Send + 'static,
) -> Result<DirWatcher> {
    let mut w = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            on_event();
        }
    })
    .map_err(|e| Error::Msg(format!("cannot start a file watcher: {e}")))?;
    for dir in dirs {
        w.watch(dir, RecursiveMode::NonRecursive)
            .map_err(|e| Error::Msg(format!("cannot watch \"{}\": {e}", dir.display())))?;
    }
    Ok(DirWatcher { _inner: w })
}

/// What changed on disk, as reported to the worker loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touched {
    Config,
    Jobs,
}

/// Watches the config file's directory and `jobs_dir`, sending [`Touched`] for each event.
/// Returns the watchers that could be set up and the kinds that could not (those the worker
/// checks by polling the digest instead).
pub fn watch_config_and_jobs(
    config: Option<&Path>,
    jobs_dir: Option<&Path>,
    tx: &Sender<Touched>,
) -> (Vec<DirWatcher>, Vec<(Touched, Error)>) {
    let mut watchers = Vec::new();
    let mut failed = Vec::new();
    let targets = [
        (Touched::Config, config.map(config_dirs).unwrap_or_default()),
        (
            Touched::Jobs,
            jobs_dir.map(|d| vec![d.to_path_buf()]).unwrap_or_default(),
        ),
    ];
    for (kind, dirs) in targets {
        if dirs.is_empty() {
            continue;
        }
        let tx = tx.clone();
        match watch_dirs(&dirs, move || {
            let _ = tx.try_send(kind);
        }) {
            Ok(w) => watchers.push(w),
            Err(e) => failed.push((kind, e)),
        }
    }
    (watchers, failed)
}

/// The directories whose events may mean the config changed: the one holding the path we were
/// given, and the one holding each symlink it leads through (a ConfigMap's `..data` swap
/// happens beside `config.toml`, not in the directory of the file it finally names).
fn config_dirs(path: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut add = |d: &Path| {
        if !dirs.iter().any(|x| x == d) {
            dirs.push(d.to_path_buf());
        }
    };
    let mut current = path.to_path_buf();
    for _ in 0..16 {
        let Some(parent) = current.parent() else {
            break;
        };
        add(parent);
        match fs::read_link(&current) {
            Ok(target) => current = parent.join(target),
            Err(_) => break,
        }
    }
    if let Some(parent) = fs::canonicalize(path)
        .ok()
        .as_deref()
        .and_then(Path::parent)
    {
        add(parent);
    }
    dirs
}

/// The job executables of `dir` by function name, with a digest of the directory's state
/// (names, modes, contents) for change detection. Hidden files and editor leftovers are skipped;
/// two files with the same function name are an error.
pub fn scan_jobs(dir: &Path) -> Result<(BTreeMap<String, PathBuf>, String)> {
    let mut found = BTreeMap::new();
    let mut digest = Sha256::new();
    let mut entries: Vec<_> = fs::read_dir(dir)
        .map_err(|e| Error::io_path("reading jobs_dir", dir, e))?
        .filter_map(|e| e.ok())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let Some(file) = entry.file_name().to_str().map(str::to_string) else {
            continue;
        };
        if file.starts_with('.') || file.ends_with('~') || file.ends_with(".swp") {
            continue;
        }
        let path = entry.path();
        // Follow symlinks: a deploy may point jobs at a versioned directory.
        let Ok(meta) = fs::metadata(&path) else {
            continue;
        };
        if !meta.is_file() {
            continue;
        }
        let mode = meta.permissions().mode();
        digest.update(file.as_bytes());
        digest.update(mode.to_le_bytes());
        match fs::read(&path) {
            Ok(bytes) => digest.update(Sha256::digest(&bytes)),
            Err(e) => return Err(Error::io_path("reading job", &path, e)),
        }
        if mode & 0o111 == 0 {
            continue;
        }
        let name = file.split('.').next().unwrap_or(&file).to_string();
        crate::config::check_function_name(&name)
            .map_err(|why| Error::Msg(format!("{}: {why}", path.display())))?;
        if let Some(other) = found.insert(name.clone(), path.clone()) {
            return Err(Error::Msg(format!(
                "function \"{name}\" is defined twice in jobs_dir: \"{}\" and \"{}\" (rename one)",
                other.display(),
                path.display()
            )));
        }
    }
    Ok((found, hex(&digest.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scan_finds_executables_and_notices_changes() {
        let dir = std::env::temp_dir().join(format!("gs-scan-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("mkdir");
        let write = |name: &str, body: &str, mode: u32| {
            let p = dir.join(name);
            fs::write(&p, body).expect("write");
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).expect("chmod");
        };
        write("wc.sh", "#!/bin/sh\nwc -w\n", 0o755);
        write("notes.txt", "not a job", 0o644);
        write(".hidden", "x", 0o755);
        let (found, d1) = scan_jobs(&dir).expect("scan");
        assert_eq!(found.keys().collect::<Vec<_>>(), ["wc"]);

        write("wc.sh", "#!/bin/sh\nwc -l\n", 0o755);
        let (_, d2) = scan_jobs(&dir).expect("scan");
        assert_ne!(d1, d2, "content change must change the digest");

        write("notes.txt", "not a job", 0o755);
        let (found, d3) = scan_jobs(&dir).expect("scan");
        assert_ne!(d2, d3, "mode change must change the digest");
        assert!(found.contains_key("notes"));

        write("wc.py", "#!/usr/bin/env python3\n", 0o755);
        let err = scan_jobs(&dir).expect_err("duplicate").to_string();
        assert!(err.contains("defined twice"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }
}
