//! What a watched path depends on: the directories whose entries, when they change, change
//! what the path names.
//!
//! A path leads through symbolic links anywhere along it, not only at its last part: a
//! ConfigMap's `..data` beside the file, a deploy tool's `current` link to the release
//! directory (`/srv/app/current/config.toml`). Swapping such a link is an event in the
//! directory holding it, so that directory is watched too; without it a release switch was
//! seen only at the next look at the watched directories, up to 5 s later.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The most links followed in one path (the kernel's own limit, `MAXSYMLINKS`).
const MAX_LINKS: usize = 40;

/// Whether a target is a file (config.toml, the binary: its directory is watched) or a
/// directory (`jobs_dir`: watched itself).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    File,
    Dir,
}

/// The directories to watch for one target: `dirs`, where the target's own entries change
/// (a failure to watch them is the target unwatched, and polled); `holders`, the directories
/// holding each link its path leads through (watched if they can be: a swap there is also
/// found by the look every 5 s); and `names`, the names of those links and of the file itself
/// (the entries whose writers the watch follows for the config).
#[derive(Debug, Default)]
pub(super) struct Chain {
    pub dirs: Vec<PathBuf>,
    pub holders: Vec<PathBuf>,
    pub names: Vec<OsString>,
}

/// The [`Chain`] of `path` as it leads now.
pub(super) fn chain(path: &Path, kind: Kind) -> Chain {
    let (links, at) = links_on(path);
    let mut c = Chain::default();
    let own = match kind {
        Kind::Dir => Some(at.as_path()),
        Kind::File => at.parent(),
    };
    c.dirs.extend(own.map(Path::to_path_buf));
    if kind == Kind::File {
        c.names.extend(at.file_name().map(|n| n.to_os_string()));
    }
    for (dir, name) in links {
        // Never procfs (`/proc/self/exe`): its links are no deploy's, and it has no events.
        if !dir.starts_with("/proc") && !c.holders.contains(&dir) && !c.dirs.contains(&dir) {
            c.holders.push(dir);
        }
        if !c.names.contains(&name) {
            c.names.push(name);
        }
    }
    c
}

/// Every symbolic link `path` leads through (its path with no link before it), in the order met.
pub fn links_through(path: &Path) -> Vec<PathBuf> {
    let (links, _) = links_on(path);
    links
        .into_iter()
        .map(|(dir, name)| dir.join(name))
        .collect()
}

/// Every symbolic link `path` leads through as the kernel walks it (each as the directory
/// holding it and its name, in the order met), and the path it finally leads to, with no link
/// left in it. A part that does not exist ends nothing: it is taken as it is.
fn links_on(path: &Path) -> (Vec<(PathBuf, OsString)>, PathBuf) {
    let absolute;
    let path = if path.is_relative() {
        absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        &absolute
    } else {
        path
    };
    let mut todo: VecDeque<OsString> = parts(path).collect();
    let mut links = Vec::new();
    let mut at = PathBuf::new();
    while let Some(part) = todo.pop_front() {
        match part.as_bytes() {
            b"/" => at = PathBuf::from("/"),
            b"." => {}
            b".." => {
                // `at` holds no link, so its parent is the parent the kernel takes.
                at.pop();
            }
            _ => {
                let next = at.join(&part);
                let target = fs::read_link(&next)
                    .ok()
                    .filter(|_| links.len() < MAX_LINKS);
                let Some(target) = target else {
                    at = next;
                    continue;
                };
                links.push((at.clone(), part));
                // The link's target is walked from the directory holding it, before the rest.
                let mut walk: VecDeque<OsString> = parts(&target).collect();
                walk.append(&mut todo);
                todo = walk;
            }
        }
    }
    (links, at)
}

fn parts(path: &Path) -> impl Iterator<Item = OsString> + '_ {
    path.components().map(|c| c.as_os_str().to_os_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn every_link_on_the_way_is_found_with_the_directory_holding_it() {
        let t = std::env::temp_dir().join(format!("gs-chain-{}", std::process::id()));
        let _ = fs::remove_dir_all(&t);
        fs::create_dir_all(t.join("app/releases/1/jobs")).unwrap();
        fs::write(t.join("app/releases/1/config.toml"), "").unwrap();
        // A deploy's `current`, a config link beside the worker, and a relative `..` link.
        symlink("releases/1", t.join("app/current")).unwrap();
        symlink("app/current/config.toml", t.join("config.toml")).unwrap();
        symlink("../app/current", t.join("app/up")).unwrap();

        let c = chain(&t.join("config.toml"), Kind::File);
        assert_eq!(c.dirs, [t.join("app/releases/1")]);
        assert_eq!(c.holders, [t.clone(), t.join("app")]);
        assert_eq!(c.names, ["config.toml", "current"]);

        let j = chain(&t.join("app/up/jobs"), Kind::Dir);
        assert_eq!(j.dirs, [t.join("app/releases/1/jobs")]);
        assert_eq!(j.holders, [t.join("app")]);

        // No link: the file's directory only. A loop ends at the kernel's limit.
        let plain = chain(&t.join("app/releases/1/config.toml"), Kind::File);
        assert_eq!(
            (plain.dirs, plain.holders.len()),
            (vec![t.join("app/releases/1")], 0)
        );
        symlink("loop", t.join("loop")).unwrap();
        let (links, _) = links_on(&t.join("loop/x"));
        assert_eq!(links.len(), MAX_LINKS);
        fs::remove_dir_all(&t).unwrap();
    }
}
