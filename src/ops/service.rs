//! Whether a process is a systemd service's main process (the one systemd starts again by the
//! unit's `Restart=` when it exits), as far as the kernel tells: for the CLI, of the worker it
//! found; for the worker, of itself, before it says who starts it again.

use std::path::PathBuf;

use crate::ops::procfs::read_bounded;

/// The systemd service whose main process `pid` is, as far as the kernel tells: a
/// child of PID 1, with the `INVOCATION_ID` systemd gives a service's processes, in a
/// `.service` cgroup that holds nothing but it and its descendants (`Type=notify` running
/// `run`, or a forking unit running `start`). Not one: a worker started from a shell, by
/// `start --supervise`, by cron (in `cron.service`'s cgroup, with cron's environment), or by a
/// deploy agent's service (in that service's cgroup, beside the agent, its main process).
pub fn systemd_unit(pid: i32) -> Option<String> {
    if crate::ops::procfs::Stat::of(Some(pid))?.ppid != 1 {
        return None;
    }
    let environ = read_bounded(format!("/proc/{pid}/environ"), 1 << 20)?;
    if !environ
        .split(|b| *b == 0)
        .any(|v| v.starts_with(b"INVOCATION_ID="))
    {
        return None;
    }
    // Each read bounded: a text cut short finds nothing, and nothing is said.
    let text = String::from_utf8(read_bounded(format!("/proc/{pid}/cgroup"), 1 << 16)?).ok()?;
    let (named, path) = systemd_path(&text)?;
    let unit = unit_of(path)?;
    let mount =
        String::from_utf8_lossy(&read_bounded("/proc/self/mountinfo", 1 << 20)?).into_owned();
    let dir = hierarchy(&mount, named)?.join(path.trim_start_matches('/'));
    let procs = read_bounded(dir.join("cgroup.procs"), 1 << 20)?;
    let alone = String::from_utf8_lossy(&procs)
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .all(|p| descends(p, pid));
    alone.then(|| unit.to_string())
}

/// The path in the systemd hierarchy of a `/proc/PID/cgroup` text: the named v1 hierarchy
/// (true), else the unified one.
fn systemd_path(cgroup: &str) -> Option<(bool, &str)> {
    let named = cgroup.lines().find_map(|l| {
        let (_, rest) = l.split_once(':')?;
        rest.strip_prefix("name=systemd:")
    });
    match named {
        Some(path) => Some((true, path)),
        None => cgroup
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .map(|p| (false, p)),
    }
}

/// The deepest `.service` of a cgroup path.
fn unit_of(path: &str) -> Option<&str> {
    path.split('/')
        .rev()
        .find(|c| c.len() > ".service".len() && c.ends_with(".service"))
}

/// Where the systemd hierarchy (`named`: cgroup v1's `name=systemd`, else cgroup2) is mounted
/// with its root, from a `/proc/self/mountinfo` text.
fn hierarchy(mountinfo: &str, named: bool) -> Option<PathBuf> {
    mountinfo.lines().find_map(|l| {
        let fields: Vec<&str> = l.split(' ').collect();
        let dash = fields.iter().position(|f| *f == "-")?;
        let (fstype, opts) = (*fields.get(dash + 1)?, *fields.get(dash + 3)?);
        let ours = if named {
            fstype == "cgroup" && opts.split(',').any(|o| o == "name=systemd")
        } else {
            fstype == "cgroup2"
        };
        let mount = fields.get(4)?;
        (ours && fields.get(3) == Some(&"/")).then(|| PathBuf::from(mount))
    })
}

/// Whether `p` is `ancestor` or descends from it.
fn descends(mut p: i32, ancestor: i32) -> bool {
    for _ in 0..64 {
        if p == ancestor {
            return true;
        }
        match crate::ops::procfs::Stat::of(Some(p)) {
            Some(s) if s.ppid > 1 => p = s.ppid,
            _ => return false,
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::{hierarchy, systemd_path, unit_of};

    fn unit_in(cgroup: &str) -> Option<&str> {
        unit_of(systemd_path(cgroup)?.1)
    }

    #[test]
    fn the_service_is_read_from_the_systemd_hierarchy() {
        let hybrid = "9:name=systemd:/system.slice/gearshift.service\n8:pids:/system.slice\n0::/\n";
        assert_eq!(unit_in(hybrid), Some("gearshift.service"));
        let unified = "0::/system.slice/gearshift.service\n";
        assert_eq!(unit_in(unified), Some("gearshift.service"));
        let user = "0::/user.slice/user-1000.slice/user@1000.service/app.slice/jobs.service\n";
        assert_eq!(unit_in(user), Some("jobs.service"));
        assert_eq!(
            unit_in("0::/user.slice/user-1000.slice/session-3.scope\n"),
            None
        );
        assert_eq!(unit_in("9:name=systemd:/\n0::/\n"), None);
        assert_eq!(unit_in("0::/x/.service\n"), None);
    }

    #[test]
    fn the_hierarchy_is_found_where_it_is_mounted_with_its_root() {
        let mountinfo =
            "35 25 0:30 / /sys/fs/cgroup/systemd rw,nosuid - cgroup cgroup rw,xattr,name=systemd\n\
             36 25 0:31 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw\n\
             37 25 0:32 /inner /mnt/cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            hierarchy(mountinfo, true),
            Some("/sys/fs/cgroup/systemd".into())
        );
        assert_eq!(
            hierarchy(mountinfo, false),
            Some("/sys/fs/cgroup/unified".into())
        );
        assert_eq!(
            hierarchy("37 25 0:32 /inner /mnt/cg rw - cgroup2 cgroup2 rw\n", false),
            None
        );
    }
}
