//! Privileges: who the worker runs as, and which files it agrees to load.
//!
//! Started as root with `[worker] user`, the worker takes the pidfile and opens its log first,
//! hands its state, spool and log files to that user, then drops privileges in the only safe
//! order (supplementary groups, then gid, then uid) and checks that it cannot get root back.
//! A re-exec'd image is already that user and does nothing here. Started as root without
//! `user`, it refuses unless `allow_root = true`.
//!
//! Strict modes (like sshd's): config.toml, `jobs_dir` and every job executable must be owned by
//! root or the worker's user and not writable by group or others; otherwise whoever can write
//! them can run code as the worker. A reload that would load such a file is refused.

use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nix::unistd::{chown, geteuid, initgroups, setgid, setuid, Gid, Group, Uid, User};

use crate::config::Config;
use crate::error::{Error, Result};

/// The user (and group) to run as.
#[derive(Debug, Clone)]
pub struct Target {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
}

/// Resolves `[worker] user` / `group`, if set.
pub fn target(cfg: &Config) -> Result<Option<Target>> {
    let Some(name) = &cfg.worker.user else {
        return Ok(None);
    };
    let user = User::from_name(name)
        .map_err(|e| Error::Msg(format!("looking up user \"{name}\": {e}")))?
        .ok_or_else(|| {
            Error::Config(format!(
                "{}: [worker] user \"{name}\" does not exist",
                cfg.path.display()
            ))
        })?;
    let gid = match &cfg.worker.group {
        None => user.gid,
        Some(g) => {
            Group::from_name(g)
                .map_err(|e| Error::Msg(format!("looking up group \"{g}\": {e}")))?
                .ok_or_else(|| {
                    Error::Config(format!(
                        "{}: [worker] group \"{g}\" does not exist",
                        cfg.path.display()
                    ))
                })?
                .gid
        }
    };
    Ok(Some(Target {
        name: name.clone(),
        uid: user.uid,
        gid,
    }))
}

/// The uid files must belong to (besides root): the target user's, or ours.
pub fn owner_uid(cfg: &Config) -> Result<Uid> {
    Ok(target(cfg)?.map_or_else(geteuid, |t| t.uid))
}

/// Checks, without changing anything, that this process could run with `cfg`: the user exists,
/// and we are root if we must switch to it, or may stay root.
pub fn check_policy(cfg: &Config) -> Result<()> {
    let euid = geteuid();
    match target(cfg)? {
        Some(t) if !euid.is_root() && t.uid != euid => Err(Error::Config(format!(
            "{}: cannot switch to user \"{}\": not started as root (running as uid {euid})",
            cfg.path.display(),
            t.name
        ))),
        None if euid.is_root() && !cfg.worker.allow_root => Err(Error::Config(format!(
            "{}: refusing to run as root: set [worker] user = \"...\" to drop privileges (or allow_root = true)",
            cfg.path.display()
        ))),
        _ => Ok(()),
    }
}

/// Decides who we run as, and drops privileges if we must. `owned` are files and directories
/// created as root that the dropped user needs (state, spool, log).
pub fn settle(cfg: &Config, owned: &[&Path]) -> Result<()> {
    let target = target(cfg)?;
    let euid = geteuid();
    match target {
        Some(t) if euid.is_root() => {
            for path in owned {
                chown(*path, Some(t.uid), Some(t.gid)).map_err(|e| {
                    Error::io_path(&format!("giving to user {}", t.name), path, e.into())
                })?;
            }
            drop_to(&t)
        }
        _ => check_policy(cfg),
    }
}

fn drop_to(t: &Target) -> Result<()> {
    let name =
        CString::new(t.name.as_bytes()).map_err(|_| Error::Msg("NUL in user name".into()))?;
    initgroups(&name, t.gid)
        .map_err(|e| Error::io(format!("initgroups for {}", t.name), e.into()))?;
    setgid(t.gid).map_err(|e| Error::io(format!("setgid {}", t.gid), e.into()))?;
    setuid(t.uid).map_err(|e| Error::io(format!("setuid {}", t.uid), e.into()))?;
    if setuid(Uid::from_raw(0)).is_ok() {
        return Err(Error::Msg(format!(
            "dropped to user \"{}\" but could become root again; refusing to run",
            t.name
        )));
    }
    log::info!("running as user {} (uid {}, gid {})", t.name, t.uid, t.gid);
    Ok(())
}

/// Strict modes for one file or directory.
pub fn check_file(path: &Path, what: &str, owner: Uid) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io_path("checking", path, e))?;
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 {
        return Err(Error::Config(format!(
            "{what} \"{}\" is writable by group or others (mode {:o}); fix: chmod go-w \"{}\"",
            path.display(),
            mode & 0o777,
            path.display()
        )));
    }
    if meta.uid() != 0 && meta.uid() != owner.as_raw() {
        return Err(Error::Config(format!(
            "{what} \"{}\" is owned by uid {}, not root or the worker's user (uid {owner}); fix: chown root \"{}\"",
            path.display(),
            meta.uid(),
            path.display()
        )));
    }
    Ok(())
}
