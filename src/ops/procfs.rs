//! Reading `/proc`, in one place: a process's `stat` line (its command name may hold spaces and
//! parentheses, so fields are split after the last `)`), its effective uid, one variable of its
//! environment, the processes whose parent is a given one, and a file the kernel writes read up
//! to a bound.

/// The fields of `/proc/PID/stat` gearshift uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    /// R, S, D, Z, ...
    pub state: char,
    pub ppid: i32,
    pub pgrp: i32,
    pub session: i32,
    /// Clock ticks in user and system mode.
    pub utime: u64,
    pub stime: u64,
    /// Clock ticks after boot when it started.
    pub starttime: u64,
    /// Virtual memory in bytes, resident set in pages.
    pub vsize: u64,
    pub rss_pages: u64,
}

impl Stat {
    /// `pid`'s stat, or ours (`None`).
    pub fn of(pid: Option<i32>) -> Option<Stat> {
        let path = match pid {
            Some(p) => format!("/proc/{p}/stat"),
            None => "/proc/self/stat".to_string(),
        };
        Stat::parse(&std::fs::read_to_string(path).ok()?)
    }

    /// Parses a stat line (field N of proc(5) is at index N - 3 after the command name).
    pub fn parse(text: &str) -> Option<Stat> {
        let rest = &text[text.rfind(')')? + 1..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
        let int = |n: usize| f.get(n - 3)?.parse::<i32>().ok();
        Some(Stat {
            state: f.first()?.chars().next()?,
            ppid: int(4)?,
            pgrp: int(5)?,
            session: int(6)?,
            utime: num(14)?,
            stime: num(15)?,
            starttime: num(22)?,
            vsize: num(23)?,
            rss_pages: num(24)?,
        })
    }

    /// Running (or sleeping): neither gone nor a zombie.
    pub fn alive(pid: i32) -> bool {
        Stat::of(Some(pid)).is_some_and(|s| s.state != 'Z')
    }
}

/// Every process id in `/proc` now.
pub fn pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
                .collect()
        })
        .unwrap_or_default()
}

/// The processes whose parent is `parent`, with their stat: the ones its threads' `children`
/// files name (a few reads), or, where the kernel has no such file, every process's stat read.
pub fn children_of(parent: i32) -> Vec<(i32, Stat)> {
    let candidates = listed_children(parent).unwrap_or_else(pids);
    candidates
        .into_iter()
        .filter_map(|pid| {
            Stat::of(Some(pid))
                .filter(|s| s.ppid == parent)
                .map(|s| (pid, s))
        })
        .collect()
}

/// The children `/proc/PARENT/task/*/children` name (each lists the children of one thread: an
/// orphan re-parented to a subreaper goes to one of its threads). None: the kernel keeps no
/// such file (`CONFIG_PROC_CHILDREN`), or `parent` is gone.
fn listed_children(parent: i32) -> Option<Vec<i32>> {
    static KEPT: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*KEPT.get_or_init(|| std::path::Path::new("/proc/thread-self/children").exists()) {
        return None;
    }
    let tasks = std::fs::read_dir(format!("/proc/{parent}/task")).ok()?;
    let mut children = Vec::new();
    for task in tasks.flatten() {
        // A thread that ended meanwhile has no file any more: its children went to another.
        if let Ok(text) = std::fs::read_to_string(task.path().join("children")) {
            children.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    Some(children)
}

/// The effective uid of process `pid` (`/proc/PID/status`), if it still exists.
pub fn euid(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

/// `pid`'s pid in its own (innermost) pid namespace: the last number of `NSpid:` in
/// `/proc/PID/status` (a container's worker is 1 there), if it still exists.
pub fn innermost_pid(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("NSpid:"))?;
    line.split_whitespace().last()?.parse().ok()
}

/// Whether this process runs in a pid namespace below another (a container's): the initial
/// one has a fixed inode (`PROC_PID_INIT_INO`); `NSpid:` cannot tell where `/proc` is the
/// namespace's own.
pub fn in_nested_pid_namespace() -> bool {
    const INITIAL: &str = "pid:[4026531836]";
    std::fs::read_link("/proc/self/ns/pid").is_ok_and(|l| l.as_os_str() != INITIAL)
}

/// A variable of `pid`'s environment (`/proc/PID/environ`: readable for our own user's
/// processes, and root's).
pub fn env_var(pid: i32, key: &str) -> Option<Vec<u8>> {
    let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    env.split(|b| *b == 0).find_map(|kv| {
        kv.strip_prefix(key.as_bytes())
            .and_then(|rest| rest.strip_prefix(b"="))
            .map(<[u8]>::to_vec)
    })
}

/// A file the kernel writes (under `/proc`, a cgroup's), read up to `bound` bytes.
pub fn read_bounded(path: impl AsRef<std::path::Path>, bound: u64) -> Option<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(bound)
        .read_to_end(&mut bytes)
        .ok()?;
    Some(bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_command_name_with_spaces_and_parentheses_is_skipped() {
        let line = "42 (a (b) c) S 1 42 42 0 -1 4194304 1 0 0 0 7 3 0 0 20 0 1 0 1234 5678 99 18446744073709551615";
        let s = Stat::parse(line).unwrap();
        assert_eq!((s.state, s.ppid, s.pgrp, s.session), ('S', 1, 42, 42));
        assert_eq!(
            (s.utime, s.stime, s.starttime, s.vsize, s.rss_pages),
            (7, 3, 1234, 5678, 99)
        );
        let me = Stat::of(None).unwrap();
        // A child, found through the threads' children files and by the full scan alike.
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let me_pid = std::process::id() as i32;
        let found = children_of(me_pid);
        let scanned: Vec<i32> = pids()
            .into_iter()
            .filter(|p| Stat::of(Some(*p)).is_some_and(|s| s.ppid == me_pid))
            .collect();
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            found.iter().any(|(p, _)| *p == child.id() as i32),
            "{found:?}"
        );
        assert!(scanned.contains(&(child.id() as i32)));
        assert_eq!(me.ppid, nix::unistd::getppid().as_raw());
        assert!(Stat::alive(std::process::id() as i32));
        assert_eq!(
            euid(std::process::id() as i32),
            Some(nix::unistd::geteuid().as_raw())
        );
    }
}
