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
//! them can run code as the worker. The same holds for every directory on the path to them, as
//! written and through every link (a root-owned file in a directory another user owns is that
//! user's to swap). A reload that would load such a file is refused.

use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use nix::unistd::{geteuid, initgroups, setgid, setuid, Group, Uid, User};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::text::ShowPath;

pub use crate::ops::layout::Target;

/// Makes this image of the worker not dumpable, first thing in every generation. Jobs run as the
/// worker's user, and a process of that user may ptrace a dumpable one, or take any of its
/// descriptors with `pidfd_getfd` or through `/proc/PID/fd`: the privilege drop leaves a fresh
/// start not dumpable, but every execve makes the process dumpable again. (OpenSSH's privsep
/// does the same; the cost is no core dump of the worker.) Best effort: a kernel that refuses
/// it is said, and the worker runs on.
pub fn refuse_tracing() {
    // SAFETY: prctl with PR_SET_DUMPABLE takes plain integers and touches no memory.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } == -1 {
        log::warn!(
            "could not make the worker undumpable ({}): a job could trace it",
            std::io::Error::last_os_error()
        );
    }
}

/// `[worker] user` / `group` as last resolved, with the user's home. Carried across every exec
/// in the restart parcel, so that a generation (already that user) validates a reload, and
/// starts, without asking the user database again: an LDAP or sssd server that does not answer
/// held every HUP's validation, and so the worker, for as long as it did not.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KnownUser {
    pub user: String,
    pub group: Option<String>,
    pub uid: u32,
    pub gid: u32,
    /// The user's home directory (a job's `HOME`).
    #[serde(default)]
    pub home: Option<std::path::PathBuf>,
}

static KNOWN: std::sync::Mutex<Option<KnownUser>> = std::sync::Mutex::new(None);

/// What [`target`] last resolved, for the next image.
pub fn known_user() -> Option<KnownUser> {
    KNOWN.lock().ok()?.clone()
}

/// What the previous image resolved (a new image's first step).
pub fn know_user(known: Option<KnownUser>) {
    if let Ok(mut k) = KNOWN.lock() {
        *k = known;
    }
}

/// What a job is told of the user it runs as, when this process runs as `[worker] user`:
/// `HOME`, `USER` and `LOGNAME` as `su` sets them. Started as root, the worker's own are root's
/// (or the launcher's), and jobs then looked for their settings and caches in `/root`.
pub fn job_identity() -> Vec<(&'static str, std::ffi::OsString)> {
    let Some(k) = known_user().filter(|k| k.uid == geteuid().as_raw()) else {
        return Vec::new();
    };
    let mut env = vec![("USER", k.user.clone().into()), ("LOGNAME", k.user.into())];
    if let Some(home) = k.home {
        env.push(("HOME", home.into_os_string()));
    }
    env
}

/// Resolves `[worker] user` / `group`, if set: as resolved before for the same names (in this
/// process, or an earlier image of it), else from the user database.
pub fn target(cfg: &Config) -> Result<Option<Target>> {
    let Some(name) = &cfg.worker.user else {
        return Ok(None);
    };
    let known = known_user().filter(|k| k.user == *name && k.group == cfg.worker.group);
    if let Some(k) = known {
        return Ok(Some(Target {
            name: name.clone(),
            uid: Uid::from_raw(k.uid),
            gid: nix::unistd::Gid::from_raw(k.gid),
        }));
    }
    let (resolved, home) = lookup(cfg, name)?;
    know_user(Some(KnownUser {
        user: name.clone(),
        group: cfg.worker.group.clone(),
        uid: resolved.uid.as_raw(),
        gid: resolved.gid.as_raw(),
        home: Some(home),
    }));
    Ok(Some(resolved))
}

/// `[worker] user` (`name`) and `group` from the user database, and the user's home.
fn lookup(cfg: &Config, name: &str) -> Result<(Target, std::path::PathBuf)> {
    let user = User::from_name(name)
        .map_err(|e| Error::Msg(format!("looking up user \"{name}\": {e}")))?
        .ok_or_else(|| {
            Error::Config(format!(
                "{}: [worker] user \"{name}\" does not exist (create it, e.g. useradd --system {name})",
                cfg.worker.user_at.clone().unwrap_or_else(|| cfg.path.shown().to_string())
            ))
        })?;
    let gid = match &cfg.worker.group {
        None => user.gid,
        Some(g) => {
            Group::from_name(g)
                .map_err(|e| Error::Msg(format!("looking up group \"{g}\": {e}")))?
                .ok_or_else(|| {
                    Error::Config(format!(
                        "{}: [worker] group \"{g}\" does not exist (leave it out to use the user's own group)",
                        cfg.worker.group_at.clone().unwrap_or_else(|| cfg.path.shown().to_string())
                    ))
                })?
                .gid
        }
    };
    Ok((
        Target {
            name: name.to_string(),
            uid: user.uid,
            gid,
        },
        user.dir,
    ))
}

/// The uid files must belong to (besides root): the target user's, or ours.
pub fn owner_uid(cfg: &Config) -> Result<Uid> {
    Ok(target(cfg)?.map_or_else(geteuid, |t| t.uid))
}

/// Said when a process that is not root is asked to run as another user or group (a `start` by
/// a user, a `check` of a production config on a build machine).
const ONLY_ROOT: &str =
    "only root switches users (`check --config-only` checks the file alone, as any user)";

/// Checks, without changing anything, that this process could run with `cfg`: the user exists,
/// and we are root if we must switch to it, or may stay root.
pub fn check_policy(cfg: &Config) -> Result<()> {
    let euid = geteuid();
    let at = |where_: &Option<String>| {
        where_
            .clone()
            .unwrap_or_else(|| cfg.path.shown().to_string())
    };
    // Not root, and already another user than the one named: no switch can follow, so the
    // user database need not be asked (a hung one held such a reload's validation for ever).
    if let (false, Some(name), Some(k)) = (euid.is_root(), &cfg.worker.user, known_user()) {
        if k.user != *name && k.uid == euid.as_raw() {
            return Err(Error::Config(format!(
                "{}: cannot switch to user \"{name}\": not started as root (running as user \"{}\", uid {euid}); restart the worker as root to change users",
                at(&cfg.worker.user_at),
                k.user
            )));
        }
        // The same user in another group: no more possible without root (it asked the
        // database, and then ran on in the old group without a word).
        if k.user == *name && k.group != cfg.worker.group && k.uid == euid.as_raw() {
            let group = cfg.worker.group.as_deref().map_or_else(
                || format!("user \"{name}\"'s own group"),
                |g| format!("group \"{g}\""),
            );
            return Err(Error::Config(format!(
                "{}: cannot switch to {group}: not started as root (running in {}, gid {}); restart the worker as root to change groups",
                at(if cfg.worker.group.is_some() { &cfg.worker.group_at } else { &cfg.worker.user_at }),
                k.group.as_deref().map_or_else(|| format!("user \"{}\"'s own group", k.user), |g| format!("group \"{g}\"")),
                k.gid
            )));
        }
    }
    match target(cfg)? {
        Some(t) if t.uid.is_root() => Err(Error::Config(format!(
            "{}: [worker] user \"{}\" is uid 0: no privilege drop (the worker would refuse to run after it); name an unprivileged user, or leave user out and set allow_root = true",
            at(&cfg.worker.user_at),
            t.name
        ))),
        Some(t) if t.gid.as_raw() == 0 && !cfg.worker.allow_root => Err(Error::Config(format!(
            "{}: [worker] {} is gid 0: every job would run in root's group; name another group (or set allow_root = true if that is meant)",
            at(if cfg.worker.group.is_some() { &cfg.worker.group_at } else { &cfg.worker.user_at }),
            cfg.worker.group.as_ref().map_or_else(
                || format!("user \"{}\"'s group", t.name),
                |g| format!("group \"{g}\"")
            )
        ))),
        Some(t) if !euid.is_root() && t.uid != euid => Err(Error::Config(format!(
            "{}: cannot switch to user \"{}\": not started as root (running as uid {euid}); {ONLY_ROOT}",
            at(&cfg.worker.user_at),
            t.name
        ))),
        // The user's own, but not in the group named: only root can switch groups (it ran
        // on in its own group, its jobs with it, without a word).
        Some(t) if !euid.is_root() && cfg.worker.group.is_some() && t.gid != nix::unistd::getegid() => {
            Err(Error::Config(format!(
                "{}: cannot switch to group \"{}\": not started as root (running as gid {}); {ONLY_ROOT}",
                at(&cfg.worker.group_at),
                cfg.worker.group.as_deref().unwrap_or_default(),
                nix::unistd::getegid()
            )))
        }
        None if euid.is_root() && !cfg.worker.allow_root => Err(Error::Config(format!(
            "{}: refusing to run as root: set [worker] user = \"...\" to drop privileges (or allow_root = true)",
            cfg.path.shown()
        ))),
        _ => Ok(()),
    }
}

/// Decides who we run as, and drops privileges if we must. What the dropped user needs was
/// prepared beforehand, through descriptors ([`crate::ops::layout::prepare`], the log, the spool).
pub fn settle(cfg: &Config) -> Result<()> {
    match target(cfg)? {
        Some(t) if geteuid().is_root() => drop_to(&t),
        _ => check_policy(cfg),
    }
}

/// The target user when we are root and will drop to it: the one case in which files must be
/// checked on that user's behalf.
pub fn dropping_to(cfg: &Config) -> Result<Option<Target>> {
    // Not root: nothing to drop, and no reason to ask the user database (an LDAP or sssd server
    // that does not answer would hold every reload's validation).
    if !geteuid().is_root() {
        return Ok(None);
    }
    target(cfg)
}

/// The uid of the user jobs run as when `[worker] user` is set: the kernel's word once we are
/// that user (a generation after the drop asks no user database), else the database's.
pub fn worker_uid(cfg: &Config) -> Option<u32> {
    cfg.worker.user.as_ref()?;
    if !geteuid().is_root() {
        return Some(geteuid().as_raw());
    }
    target(cfg).ok().flatten().map(|t| t.uid.as_raw())
}

/// What a user needs of a file.
#[derive(Debug, Clone, Copy)]
pub enum Need {
    Read,
    /// Read and search (a directory) or read and execute (a job executable).
    ReadExec,
    Exec,
}

/// Refuses `path` if `t` could not use it as `need` says (by mode bits and ownership: ACLs are
/// not consulted), nor search every directory above it. Run by root before dropping, so that
/// `check` and `start` fail instead of a worker whose every reload is refused.
pub fn check_access(path: &Path, what: &str, t: &Target, need: Need) -> Result<()> {
    let groups = user_groups(t);
    let allows = |meta: &std::fs::Metadata, bits: u32| {
        let mode = meta.permissions().mode();
        let class = if meta.uid() == t.uid.as_raw() {
            6
        } else if groups.contains(&meta.gid()) {
            3
        } else {
            0
        };
        (mode >> class) & bits == bits
    };
    let abs = std::path::absolute(path).map_err(|e| Error::io_path("resolving", path, e))?;
    for dir in abs.ancestors().skip(1) {
        let meta = std::fs::metadata(dir).map_err(|e| Error::io_path("checking", dir, e))?;
        if !allows(&meta, 0o1) {
            return Err(Error::Config(format!(
                "{what} \"{}\": user \"{}\" cannot search the directory \"{}\" above it (mode {:o}, owner uid {}); fix: chmod o+x \"{}\" (or give it to that user's group)",
                path.shown(),
                t.name,
                dir.shown(),
                meta.permissions().mode() & 0o7777,
                meta.uid(),
                dir.shown()
            )));
        }
    }
    let meta = std::fs::metadata(path).map_err(|e| Error::io_path("checking", path, e))?;
    let (bits, verb) = match need {
        Need::Read => (0o4, "read"),
        Need::ReadExec if meta.is_dir() => (0o5, "read and search"),
        Need::ReadExec => (0o5, "read and execute"),
        Need::Exec => (0o1, "execute"),
    };
    if allows(&meta, bits) {
        return Ok(());
    }
    Err(Error::Config(format!(
        "{what} \"{}\" is not something user \"{}\" (the worker drops to it) can {verb}: mode {:o}, owner uid {}, group {}; fix: chgrp {} \"{}\" and chmod g+{} it, or chmod o+{} it",
        path.shown(),
        t.name,
        meta.permissions().mode() & 0o7777,
        meta.uid(),
        meta.gid(),
        t.gid,
        path.shown(),
        perm_letters(bits),
        perm_letters(bits)
    )))
}

fn perm_letters(bits: u32) -> &'static str {
    match bits {
        0o4 => "r",
        0o5 => "rx",
        _ => "x",
    }
}

/// The user's primary and supplementary group ids.
fn user_groups(t: &Target) -> Vec<u32> {
    let mut groups = vec![t.gid.as_raw()];
    if let Ok(name) = CString::new(t.name.as_bytes()) {
        if let Ok(list) = nix::unistd::getgrouplist(&name, t.gid) {
            groups.extend(list.iter().map(|g| g.as_raw()));
        }
    }
    groups
}

fn drop_to(t: &Target) -> Result<()> {
    let name =
        CString::new(t.name.as_bytes()).map_err(|_| Error::Invalid("NUL in user name".into()))?;
    initgroups(&name, t.gid)
        .map_err(|e| Error::io(format!("initgroups for {}", t.name), e.into()))?;
    setgid(t.gid).map_err(|e| Error::io(format!("setgid {}", t.gid), e.into()))?;
    setuid(t.uid).map_err(|e| Error::io(format!("setuid {}", t.uid), e.into()))?;
    if setuid(Uid::from_raw(0)).is_ok() {
        return Err(Error::Unsafe(format!(
            "dropped to user \"{}\" but could become root again; refusing to run",
            t.name
        )));
    }
    log::info!("running as user {} (uid {}, gid {})", t.name, t.uid, t.gid);
    Ok(())
}

/// How many symbolic links one path may go through (the kernel's own limit).
const MAX_LINKS: usize = 40;

/// Strict modes for `path` and everything its meaning depends on: the file itself
/// ([`check_file`]) and every directory walked to reach it, through every symbolic link. A
/// directory must be owned by root or `owner`; one writable by group or others is accepted only
/// if sticky (`/tmp`) and the entry in it is owned by root or `owner` (nobody else can then
/// rename it away).
pub fn check_path(path: &Path, what: &str, owner: Uid) -> Result<()> {
    use std::collections::VecDeque;
    use std::path::{Component, PathBuf};
    /// One step of the walk, owned (a link's target is spliced in front of what is left).
    enum Step {
        Root,
        Up,
        Name(std::ffi::OsString),
    }
    fn steps(p: &Path) -> impl DoubleEndedIterator<Item = Step> + '_ {
        p.components().filter_map(|c| match c {
            Component::RootDir => Some(Step::Root),
            Component::ParentDir => Some(Step::Up),
            Component::Normal(n) => Some(Step::Name(n.to_os_string())),
            Component::CurDir | Component::Prefix(_) => None,
        })
    }
    let absolute = std::path::absolute(path).map_err(|e| Error::io_path("checking", path, e))?;
    let mut todo: VecDeque<Step> = steps(&absolute).collect();
    let mut here = PathBuf::from("/");
    let mut links = 0;
    let trusted_owner = |uid: u32| uid == 0 || uid == owner.as_raw();
    while let Some(step) = todo.pop_front() {
        let name = match step {
            Step::Root => {
                here = PathBuf::from("/");
                continue;
            }
            Step::Up => {
                here.pop();
                continue;
            }
            Step::Name(name) => name,
        };
        let dir = std::fs::metadata(&here).map_err(|e| Error::io_path("checking", &here, e))?;
        let entry = here.join(name);
        let meta =
            std::fs::symlink_metadata(&entry).map_err(|e| Error::io_path("checking", &entry, e))?;
        let why = if !trusted_owner(dir.uid()) {
            Some(format!("is owned by uid {}", dir.uid()))
        } else if dir.mode() & 0o022 != 0
            && !(dir.mode() & 0o1000 != 0 && trusted_owner(meta.uid()))
        {
            Some(format!(
                "is writable by group or others (mode {:o})",
                dir.mode() & 0o7777
            ))
        } else {
            None
        };
        if let Some(why) = why {
            return Err(Error::Config(format!(
                "{what} \"{}\": the directory \"{}\" on its path {why} (only root and the worker's user, uid {owner}, may write there): whoever can write it can swap \"{}\"; fix: keep job files in directories only root can write, or chown root and chmod go-w \"{}\"",
                path.shown(),
                here.shown(),
                entry.shown(),
                here.shown(),
            )));
        }
        if meta.file_type().is_symlink() {
            links += 1;
            if links > MAX_LINKS {
                return Err(Error::Config(format!(
                    "{what} \"{}\": more than {MAX_LINKS} symbolic links on its path",
                    path.shown()
                )));
            }
            let target = std::fs::read_link(&entry)
                .map_err(|e| Error::io_path("reading link", &entry, e))?;
            for step in steps(&target).rev() {
                todo.push_front(step);
            }
            continue;
        }
        here = entry;
    }
    check_file(path, what, owner)
}

/// Strict modes for one file or directory.
pub fn check_file(path: &Path, what: &str, owner: Uid) -> Result<()> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io_path("checking", path, e))?;
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 {
        return Err(Error::Config(format!(
            "{what} \"{}\" is writable by group or others (mode {:o}); fix: chmod go-w \"{}\"",
            path.shown(),
            mode & 0o777,
            path.shown()
        )));
    }
    if meta.uid() != 0 && meta.uid() != owner.as_raw() {
        return Err(Error::Config(format!(
            "{what} \"{}\" is owned by uid {}, not root or the worker's user (uid {owner}); fix: chown root \"{}\"",
            path.shown(),
            meta.uid(),
            path.shown()
        )));
    }
    Ok(())
}
