//! The security boundary: started as root with `[worker] user`, root never opens, chowns,
//! signals or executes anything the worker's user (every job runs as it) can plant.
//!
//! Each test plants its case as that user (`setpriv` to nobody), then runs a root command, and
//! asserts that the target is untouched, nothing was chowned, no foreign process was signalled,
//! and the command refused with a message naming the path (or the plant itself was refused,
//! because the path is no longer the worker's to write).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use common::*;

fn nobody() -> nix::unistd::User {
    nix::unistd::User::from_name("nobody").unwrap().unwrap()
}

/// Points the sandbox's `state_dir` at `dir`.
fn set_state_dir(sb: &Sandbox, dir: &Path) {
    let cfg = fs::read_to_string(sb.config()).unwrap();
    let cfg = cfg.replace(
        "state_dir = \"state\"",
        &format!("state_dir = \"{}\"", dir.display()),
    );
    fs::write(sb.config(), cfg).unwrap();
}

/// A sandbox whose worker drops to nobody, running a copy of the binary nobody can reach.
fn privsep(name: &str) -> Sandbox {
    assert!(
        nix::unistd::geteuid().is_root(),
        "CI runs as root; these tests check the root side"
    );
    let mut sb = Sandbox::new(name);
    sb.own_binary();
    let cfg = sb
        .config_text("")
        .replace("allow_root = true", "user = \"nobody\"");
    fs::write(sb.config(), cfg).unwrap();
    sb
}

/// Puts `bytes` at the sandbox's binary path as a deploy does (a new file, 0755, renamed).
fn put_binary(sb: &Sandbox, bytes: &[u8]) {
    let tmp = sb.path("bin/.gearshift.new");
    fs::write(&tmp, bytes).unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).unwrap();
    fs::rename(&tmp, &sb.bin).unwrap();
}

/// A file's sha256, as gearshift names binaries.
fn sha_of(p: &std::path::Path) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(fs::read(p).unwrap())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Runs `script` with sh as the worker's user, in the sandbox.
fn as_worker(sb: &Sandbox, script: &str) -> Output {
    worker_sh(sb, script).output().unwrap()
}

/// `script` for sh as the worker's user, in the sandbox.
fn worker_sh(sb: &Sandbox, script: &str) -> Command {
    let n = nobody();
    let mut c = Command::new("setpriv");
    c.arg(format!("--reuid={}", n.uid))
        .arg(format!("--regid={}", n.gid))
        .arg("--clear-groups")
        .args(["sh", "-c", script])
        .current_dir(&sb.dir)
        .stdin(Stdio::null());
    c
}

/// A root-owned file outside everything the worker may touch.
struct Victim {
    path: PathBuf,
}

impl Victim {
    fn new(sb: &Sandbox, name: &str) -> Victim {
        let path = sb.path(name);
        fs::write(&path, "precious\n").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        Victim { path }
    }

    fn assert_untouched(&self) {
        let m = fs::metadata(&self.path).unwrap();
        assert_eq!(
            fs::read_to_string(&self.path).unwrap(),
            "precious\n",
            "{} was written",
            self.path.display()
        );
        assert_eq!(m.uid(), 0, "{} was chowned", self.path.display());
        assert_eq!(m.gid(), 0, "{} was chgrp'd", self.path.display());
        assert_eq!(
            m.mode() & 0o7777,
            0o600,
            "{} was chmod'ed",
            self.path.display()
        );
    }
}

/// Starts the daemon (must succeed) and stops it again, leaving the layout it made.
fn start_and_stop(sb: &Sandbox) {
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = sb.run(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// Either the plant was refused (the path is not the worker's), or the root command failed
/// naming `path`.
fn planted_or_refused(plant: &Output, root: &Output, path: &str) {
    if plant.status.success() {
        assert_ne!(
            root.status.code(),
            Some(0),
            "root command succeeded on a planted {path}: {}",
            text(&root.stdout)
        );
        assert!(
            text(&root.stderr).contains(path),
            "the refusal names {path}: {}",
            text(&root.stderr)
        );
    } else {
        assert!(
            text(&plant.stderr).contains("Permission denied"),
            "{}",
            text(&plant.stderr)
        );
    }
}

#[test]
fn a_planted_pidfile_link_is_never_followed() {
    let sb = privsep("sec-pidlink");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    start_and_stop(&sb);
    let victim = Victim::new(&sb, "victim");
    let plant = as_worker(
        &sb,
        "rm -f state/gearshift.pid && ln -s ../victim state/gearshift.pid",
    );
    assert!(
        !plant.status.success(),
        "the worker's user can no longer write state_dir"
    );
    let out = sb.run(&["start"]);
    victim.assert_untouched();
    planted_or_refused(&plant, &out, "gearshift.pid");
    let _ = sb.run(&["stop"]);

    // An install from before the privilege separation left state_dir to the worker's user.
    // Root takes the directory back, and refuses the link planted in it.
    let n = nobody();
    for e in fs::read_dir(sb.path("state")).unwrap().flatten() {
        let _ = nix::unistd::chown(&e.path(), Some(n.uid), Some(n.gid));
    }
    nix::unistd::chown(&sb.path("state"), Some(n.uid), Some(n.gid)).unwrap();
    let plant = as_worker(
        &sb,
        "rm -f state/gearshift.pid && ln -s ../victim state/gearshift.pid",
    );
    assert!(plant.status.success(), "{}", text(&plant.stderr));
    let out = sb.run(&["start"]);
    victim.assert_untouched();
    planted_or_refused(&plant, &out, "gearshift.pid");
    assert!(
        text(&out.stderr).contains("symbolic link"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        fs::metadata(sb.path("state")).unwrap().uid(),
        0,
        "state_dir taken back"
    );
}

#[test]
fn a_planted_log_link_is_never_followed() {
    let sb = privsep("sec-loglink");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    start_and_stop(&sb);
    let victim = Victim::new(&sb, "victim");
    let plant = as_worker(
        &sb,
        "rm -f state/gearshift.log && ln -s ../victim state/gearshift.log",
    );
    let out = sb.run(&["start"]);
    victim.assert_untouched();
    planted_or_refused(&plant, &out, "gearshift.log");
    let _ = sb.run(&["stop"]);

    // A [log] file in a directory the worker owns (where reopening after logrotate works).
    fs::create_dir(sb.path("logs")).unwrap();
    nix::unistd::chown(&sb.path("logs"), Some(nobody().uid), Some(nobody().gid)).unwrap();
    let cfg = fs::read_to_string(sb.config()).unwrap() + "[log]\nfile = \"logs/gs.log\"\n";
    fs::write(sb.config(), cfg).unwrap();
    let plant = as_worker(&sb, "ln -s ../victim logs/gs.log");
    assert!(plant.status.success(), "{}", text(&plant.stderr));
    let out = sb.run(&["start"]);
    victim.assert_untouched();
    planted_or_refused(&plant, &out, "gs.log");
    // A hard link or a FIFO is refused the same way (never blocks, never appends elsewhere).
    let plant = as_worker(&sb, "rm -f logs/gs.log && mkfifo logs/gs.log");
    assert!(plant.status.success(), "{}", text(&plant.stderr));
    let out = sb.run(&["start"]);
    planted_or_refused(&plant, &out, "gs.log");
    assert!(
        text(&out.stderr).contains("not a regular file"),
        "{}",
        text(&out.stderr)
    );
}

/// `[log] file` naming a file of root's that gearshift did not make (`/etc/passwd` by a slip of
/// the hand): root opened it for appending and gave it to the worker's user, so every job could
/// have rewritten it. Now root gives away only a log file it makes itself or one already the
/// user's; any other existing file is refused with the fix, and stays as it was.
#[test]
fn a_log_file_gearshift_did_not_make_is_never_given_to_the_worker() {
    let sb = privsep("sec-logforeign");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let sys = sb.path("sys");
    fs::create_dir(&sys).unwrap();
    let passwd = sys.join("passwd");
    let content = "root:x:0:0::/root:/bin/sh\n";
    fs::write(&passwd, content).unwrap();
    let cfg = fs::read_to_string(sb.config()).unwrap();
    fs::write(
        sb.config(),
        format!("{cfg}[log]\nfile = \"{}\"\n", passwd.display()),
    )
    .unwrap();
    for cmd in [&["start"][..], &["run"]] {
        let out = sb.run(cmd);
        assert!(!out.status.success(), "{cmd:?}: {}", text_of(&out));
        assert!(
            text(&out.stderr).contains("is root's") && text(&out.stderr).contains("chown"),
            "{cmd:?}: {}",
            text_of(&out)
        );
        let m = fs::metadata(&passwd).unwrap();
        assert_eq!((m.uid(), m.gid()), (0, 0), "{cmd:?}: still root's");
        assert_eq!(fs::read_to_string(&passwd).unwrap(), content, "{cmd:?}");
    }
}

/// The status document of the daemon the sandbox started.
fn daemon_status(sb: &Sandbox) -> serde_json::Value {
    let out = sb.run(&["status", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The warnings in `status` that name the log file.
fn log_warnings(sb: &Sandbox) -> Vec<String> {
    daemon_status(sb)["warnings"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|w| w.as_str())
        .filter(|w| w.contains("log file"))
        .map(str::to_string)
        .collect()
}

/// A log file in a directory only root may write (`/var/log/gearshift.log`, or the default
/// `state_dir/gearshift.log`) that an operator deleted, or that a rotation moved away without
/// making a new one: the next reload's image, already the worker's user, could not make it
/// again and died ("reload failed: the worker exited"), taking the worker with it. Now the
/// log's descriptor crosses every exec; a generation that cannot open the path writes on to
/// the file it has and `status` says so until a SIGUSR1 opens the path again.
#[test]
fn a_log_file_that_was_deleted_or_moved_away_survives_reloads_and_is_said() {
    let sb = privsep("sec-logmoved");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let logs = sb.path("log");
    fs::create_dir(&logs).unwrap();
    fs::set_permissions(&logs, fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = fs::read_to_string(sb.config()).unwrap();
    fs::write(
        sb.config(),
        format!("{cfg}[log]\nfile = \"log/gearshift.log\"\n"),
    )
    .unwrap();
    let log = logs.join("gearshift.log");
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let pid = pid_of(&sb);
    assert!(log_warnings(&sb).is_empty());

    // Deleted, then a reload: the same worker, a new generation, its lines in the file it has.
    fs::remove_file(&log).unwrap();
    let out = sb.run(&["reload"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let status = daemon_status(&sb);
    assert_eq!(status["pid"].as_i64(), Some(pid as i64));
    assert_eq!(status["generation"].as_u64(), Some(2));
    let said = log_warnings(&sb);
    assert_eq!(said.len(), 1, "{said:?}");
    assert!(
        said[0].contains("gearshift.log") && said[0].contains("SIGUSR1"),
        "{said:?}"
    );
    let written = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .find(|e| {
            fs::read_link(e.path())
                .is_ok_and(|t| t.to_string_lossy().ends_with("gearshift.log (deleted)"))
        })
        .map(|e| fs::read_to_string(e.path()).unwrap())
        .expect("the deleted log file is still written");
    assert!(written.contains(" g2 "), "{written}");

    // Made again for the worker's user (logrotate's `create 0640 user group`), then reopened.
    fs::write(&log, "").unwrap();
    nix::unistd::chown(&log, Some(nobody().uid), Some(nobody().gid)).unwrap();
    assert_eq!(sb.run(&["reopen-logs"]).status.code(), Some(0));
    eventually(Duration::from_secs(10), "the log reopened", || {
        fs::read_to_string(&log).is_ok_and(|s| s.contains("SIGUSR1: reopened log file"))
    });
    assert!(log_warnings(&sb).is_empty(), "{:?}", log_warnings(&sb));

    // Moved away with nothing made in its place: a SIGUSR1 cannot make it either, and says so
    // where an operator looks; the lines go on into the moved file, and a reload keeps it.
    let moved = logs.join("gearshift.log.1");
    fs::rename(&log, &moved).unwrap();
    assert_eq!(sb.run(&["reopen-logs"]).status.code(), Some(0));
    eventually(Duration::from_secs(10), "the failed reopen said", || {
        log_warnings(&sb).iter().any(|w| w.contains("SIGUSR1"))
    });
    let out = sb.run(&["reload"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert_eq!(daemon_status(&sb)["generation"].as_u64(), Some(3));
    assert!(!log.exists());
    let text = fs::read_to_string(&moved).unwrap();
    assert!(text.contains(" g3 "), "{text}");
    assert_eq!(log_warnings(&sb).len(), 1, "{:?}", log_warnings(&sb));
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

#[test]
fn a_planted_spool_directory_link_is_never_chowned() {
    let sb = privsep("sec-spoollink");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    start_and_stop(&sb);
    let rootdir = sb.path("rootdir");
    fs::create_dir(&rootdir).unwrap();
    fs::set_permissions(&rootdir, fs::Permissions::from_mode(0o700)).unwrap();
    let plant = as_worker(&sb, "rm -rf spool/done && ln -s ../rootdir spool/done");
    assert!(plant.status.success(), "{}", text(&plant.stderr));
    let out = sb.run(&["start"]);
    let m = fs::metadata(&rootdir).unwrap();
    assert_eq!(
        (m.uid(), m.gid(), m.mode() & 0o7777),
        (0, 0, 0o700),
        "rootdir untouched"
    );
    planted_or_refused(&plant, &out, "spool/done");
}

/// The names in `dir`, sorted.
fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// `[source] dir` naming a directory of root's that holds other things (a typo, a template's
/// empty variable that made it the config's own directory, `/`): root gives a spool directory
/// to the worker's user, and owning a directory means renaming what is in it, so the worker's
/// user (every job) could have swapped root's files there. Before, the directory was chowned
/// to the worker's user and the spool's subdirectories made in it. Now the start is refused,
/// naming what does not belong, and nothing there changes; an empty `dir` is refused by check.
#[test]
fn a_spool_dir_that_holds_other_files_is_never_given_to_the_worker() {
    let sb = privsep("sec-spoolforeign");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let etc = sb.path("etcish");
    fs::create_dir(&etc).unwrap();
    fs::write(etc.join("passwd"), "root:x:0:0::/root:/bin/sh\n").unwrap();
    fs::set_permissions(&etc, fs::Permissions::from_mode(0o755)).unwrap();
    let cfg = fs::read_to_string(sb.config()).unwrap();
    fs::write(
        sb.config(),
        cfg.replace("dir = \"spool\"", &format!("dir = \"{}\"", etc.display())),
    )
    .unwrap();
    let out = sb.run(&["start"]);
    assert!(!out.status.success(), "{}", text_of(&out));
    assert!(
        text(&out.stderr).contains("\"passwd\"") && text(&out.stderr).contains("not a spool's"),
        "{}",
        text_of(&out)
    );
    let m = fs::metadata(&etc).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 0, 0o755));
    assert_eq!(names_in(&etc), ["passwd"], "nothing made in it");
    // The config's own directory, through an empty value.
    fs::write(sb.config(), cfg.replace("dir = \"spool\"", "dir = \"\"")).unwrap();
    let out = sb.run(&["check"]);
    assert!(
        !out.status.success() && text(&out.stderr).contains("dir must not be empty"),
        "{}",
        text_of(&out)
    );
}

/// `[worker] state_dir` naming a directory gearshift did not make (a typo: someone's home, a
/// system directory): root changes neither its owner nor its mode. Before, one owned by another
/// user was taken for root (chown root, go-w), and a root directory that nobody could pass got
/// o+x, whatever else they held. Now the start is refused with why, and nothing changes.
#[test]
fn a_state_dir_gearshift_did_not_make_is_never_taken_or_opened_up() {
    let sb = privsep("sec-statedir");
    let _reaper = Reaper(sb.path("home/gearshift.pid"));
    let home = sb.path("home");
    fs::create_dir(&home).unwrap();
    fs::write(home.join(".profile"), "alice's\n").unwrap();
    set_state_dir(&sb, &home);
    // Another user's (not the worker's), then root's own with other files and no o+x.
    for (uid, mode, want) in [
        (4242, 0o700, "neither root nor"),
        (0, 0o700, "\".profile\""),
    ] {
        nix::unistd::chown(&home, Some(nix::unistd::Uid::from_raw(uid)), None).unwrap();
        fs::set_permissions(&home, fs::Permissions::from_mode(mode)).unwrap();
        let out = sb.run(&["start"]);
        assert!(!out.status.success(), "{uid}: {}", text_of(&out));
        assert!(text(&out.stderr).contains(want), "{uid}: {}", text_of(&out));
        let m = fs::metadata(&home).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o7777), (uid, mode), "untouched");
        assert_eq!(names_in(&home), [".profile"], "nothing made in it");
    }
}

#[test]
fn a_worker_dir_gearshift_did_not_make_is_never_given_to_the_worker() {
    // state_dir = "/home" by a slip, where a user called "worker" lives: root's state_dir is
    // fine, but its worker/ is someone's home, and giving it away lets every job rename and
    // remove what is in it.
    let sb = privsep("sec-workerdir");
    let _reaper = Reaper(sb.path("home/gearshift.pid"));
    let home = sb.path("home");
    let theirs = home.join("worker");
    fs::create_dir_all(&theirs).unwrap();
    fs::set_permissions(&home, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(theirs.join(".profile"), "worker's\n").unwrap();
    set_state_dir(&sb, &home);
    // Another user's home, then root's own directory with files of its own.
    for uid in [4242, 0] {
        nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(uid)), None).unwrap();
        fs::set_permissions(&theirs, fs::Permissions::from_mode(0o700)).unwrap();
        let out = sb.run(&["start"]);
        assert!(!out.status.success(), "{uid}: {}", text_of(&out));
        assert!(
            text(&out.stderr).contains("\".profile\""),
            "{uid}: {}",
            text_of(&out)
        );
        let m = fs::metadata(&theirs).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o7777), (uid, 0o700), "untouched");
        assert_eq!(names_in(&theirs), [".profile"], "nothing made in it");
    }
    // An older install's worker/ (root's after an allow_root run, or the last user's) holding
    // only gearshift's files is still taken over.
    fs::remove_file(theirs.join(".profile")).unwrap();
    fs::write(theirs.join("deploy-pending.json"), "{}").unwrap();
    nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(4242)), None).unwrap();
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert_eq!(
        fs::metadata(&theirs).unwrap().uid(),
        nobody().uid.as_raw(),
        "given to the worker"
    );
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// A job runs as the worker's user. After a re-exec the worker was dumpable again (execve
/// resets what the privilege drop set), so a job could list its descriptors, ptrace it or take
/// any of them with `pidfd_getfd`; and the worker held root's pidfile open for writing: a job
/// wrote "1" into it that way (reproduced). Now no image of the worker is dumpable, and the
/// descriptor that holds the lock is read-only, so even one taken in the moment of an exec
/// cannot write root's file.
#[test]
fn a_job_can_neither_reach_the_workers_descriptors_nor_write_roots_pidfile() {
    let sb = privsep("sec-fds");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    assert_eq!(sb.run(&["start"]).status.code(), Some(0));
    let out = sb.run(&["reload"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let pid = pid_of(&sb);
    let pidfile = fs::canonicalize(sb.path("state/gearshift.pid")).unwrap();
    // Every descriptor of a file the worker's user does not own is open read-only.
    let mut lock_fd = None;
    for entry in fs::read_dir(format!("/proc/{pid}/fd")).unwrap() {
        let entry = entry.unwrap();
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        let Ok(meta) = fs::metadata(&target) else {
            continue;
        };
        if !meta.is_file() || meta.uid() == nobody().uid.as_raw() {
            continue;
        }
        let fd = entry.file_name().into_string().unwrap();
        let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{fd}")).unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .map(|f| u32::from_str_radix(f.trim(), 8).unwrap())
            .unwrap();
        assert_eq!(
            flags & 3,
            0,
            "{} open for writing (fd {fd})",
            target.display()
        );
        if target == pidfile {
            lock_fd = Some(fd);
        }
    }
    let lock_fd = lock_fd.expect("the worker holds the pidfile");
    // As a job would: list them, and take the pidfile's and write it.
    let out = as_worker(&sb, &format!("ls /proc/{pid}/fd"));
    assert!(!out.status.success(), "listed: {}", text_of(&out));
    let steal = format!(
        "import ctypes, os\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         p = libc.syscall(434, {pid}, 0)\n\
         fd = libc.syscall(438, p, {lock_fd}, 0)\n\
         assert fd >= 0, 'pidfd_getfd: ' + os.strerror(ctypes.get_errno())\n\
         os.write(fd, b'1\\n')\n"
    );
    let out = worker_sh(&sb, "exec /usr/bin/python3 -")
        .stdin(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(steal.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(
        !out.status.success(),
        "took and wrote it: {}",
        text_of(&out)
    );
    assert_eq!(
        fs::read_to_string(&pidfile).unwrap(),
        format!("{pid}\n"),
        "root's pidfile unchanged"
    );
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// Root keeps the binary it started as `state_dir/last-good` at every fresh start under a
/// privilege drop. On a `state_dir` without room for it, the partial copy was left behind:
/// its file system stayed full, so the worker's log there got not one line (the warning that
/// no rollback is possible included). Now the partial copy is removed, and the warning said.
#[test]
fn a_last_good_copy_that_does_not_fit_is_removed_and_said() {
    let sb = privsep("sec-lastgood");
    // Mounted first, unmounted last: the reaper ends a worker left running before.
    let _fs = common::tmpfs::Tmpfs::mount(&sb.path("state"), "2m");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let names = names_in(&sb.path("state"));
    assert!(
        !names.iter().any(|n| n.starts_with("last-good")),
        "{names:?}"
    );
    let log = fs::read_to_string(sb.path("state/gearshift.log")).unwrap();
    assert!(
        log.contains("could not keep this binary as last-good")
            && log.contains("cannot be rolled back"),
        "{log:?}"
    );
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
    // With a last-good of an earlier start, the warning says which binary a rollback would run.
    // (Root keeps a binary other than last-good once it has served after a fresh start, which
    // the worker records: written here as the worker would.)
    fs::write(sb.path("state/last-good"), "older\n").unwrap();
    fs::write(sb.path("state/worker/served-sha256"), sha_of(&sb.bin)).unwrap();
    fs::write(sb.path("state/gearshift.log"), "").unwrap();
    assert_eq!(sb.run(&["start"]).status.code(), Some(0));
    let log = fs::read_to_string(sb.path("state/gearshift.log")).unwrap();
    assert!(log.contains("roll back to the older last-good"), "{log:?}");
    assert_eq!(
        fs::read_to_string(sb.path("state/last-good")).unwrap(),
        "older\n"
    );
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// The pidfile removed under a worker that dropped its privileges: it cannot make root's file
/// again. `status` and `stop` said "not running" while it ran (`stop` exited 0 and left it),
/// and its next reload, unable to make the file, died. Now both CLI commands see it on its
/// status socket and say so (exit 4, its pid named, nothing signalled), `start` refuses to
/// start a second worker beside it, a reload keeps it, and its `status` says what happened.
#[test]
fn a_removed_pidfile_the_dropped_worker_cannot_make_again_is_said_and_survives_reloads() {
    let sb = privsep("sec-pidremoved");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let pid = pid_of(&sb);
    let _killer = Reaper(sb.path("pid-copy"));
    fs::write(sb.path("pid-copy"), pid.to_string()).unwrap();
    fs::remove_file(sb.path("state/gearshift.pid")).unwrap();
    for cmd in ["status", "stop", "start"] {
        let out = sb.run(&[cmd]);
        let expected = if cmd == "start" { 1 } else { 4 };
        assert_eq!(
            out.status.code(),
            Some(expected),
            "{cmd}: {}",
            text_of(&out)
        );
        assert!(
            text_of(&out).contains(&format!("pid {pid}")) && text_of(&out).contains("pidfile"),
            "{cmd}: {}",
            text_of(&out)
        );
        assert!(process_alive(pid), "{cmd}");
    }
    let socket = sb.path("state/worker/gearshift.sock");
    let warned = |s: &serde_json::Value| has_warning(s, "pidfile");
    eventually(Duration::from_secs(15), "status to say so", || {
        status_at(&socket).is_some_and(|s| warned(&s))
    });
    kill(Pid::from_raw(pid), Signal::SIGHUP).unwrap();
    eventually(Duration::from_secs(15), "generation 2 serving", || {
        status_at(&socket).is_some_and(|s| s["generation"] == 2 && s["state"] == "running")
    });
    assert!(status_at(&socket).is_some_and(|s| warned(&s) && s["pid"] == pid));
    kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    eventually(Duration::from_secs(10), "the worker to stop", || {
        !process_alive(pid)
    });
}

/// A worker given a capability the way systemd gives a `User=` service one
/// (`AmbientCapabilities=CAP_NET_BIND_SERVICE`, which README suggests for a ZeroMQ port below
/// 1024): the ambient set passes through every exec, so every job had it too. Now a job starts
/// with none (the worker keeps its own, for a reload that binds a new port).
#[test]
fn a_job_gets_none_of_the_workers_ambient_capabilities() {
    let sb = privsep("sec-ambient");
    sb.job(
        "caps",
        "#!/bin/sh\ngrep -E '^Cap(Prm|Eff|Amb)' /proc/self/status\n",
    );
    let [uid, gid] = sb.give_to_nobody();
    let as_service = [
        "setpriv",
        &uid,
        &gid,
        "--clear-groups",
        "--inh-caps=+net_bind_service",
        "--ambient-caps=+net_bind_service",
    ];
    let mut w = sb.start_under(&as_service, "true");
    eventually(Duration::from_secs(20), "the worker to serve", || {
        w.try_status().is_some()
    });
    let own = fs::read_to_string(format!("/proc/{}/status", w.status()["pid"])).unwrap();
    assert!(own.contains("CapAmb:\t0000000000000400"), "{own}");
    let out = worker_sh(
        &sb,
        &format!(
            "{} -c {} submit --wait caps x",
            sb.bin.display(),
            sb.config().display()
        ),
    )
    .output()
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let caps = text(&out.stdout);
    for set in ["CapPrm", "CapEff", "CapAmb"] {
        assert!(
            caps.contains(&format!("{set}:\t0000000000000000")),
            "{set}: {caps}"
        );
    }
    w.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        w.wait_exit(Duration::from_secs(10)).success(),
        "{}",
        w.log_text()
    );
}

/// `state_dir/worker/` removed under a worker that dropped its privileges (a clean-up of
/// "stale" sockets): it cannot make that directory again in root's `state_dir`, and its next
/// reload died at start (`opening directory ".../worker": No such file or directory`). Now the
/// new generation serves on, on the status socket it was handed (which no path reaches until a
/// fresh start makes the directory again), says so in its log, and `stop` still finds it.
#[test]
fn a_removed_worker_dir_neither_ends_a_dropped_worker_nor_its_reloads() {
    let sb = privsep("sec-workerdir");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let pid = pid_of(&sb);
    fs::remove_dir_all(sb.path("state/worker")).unwrap();
    kill(Pid::from_raw(pid), Signal::SIGHUP).unwrap();
    let log = sb.path("state/gearshift.log");
    eventually(Duration::from_secs(15), "generation 2 to serve", || {
        fs::read_to_string(&log).is_ok_and(|l| l.contains(" g2 ") && l.contains("started (pid"))
            || !process_alive(pid)
    });
    assert!(process_alive(pid), "{}", fs::read_to_string(&log).unwrap());
    let said = fs::read_to_string(&log).unwrap();
    assert!(
        said.contains("worker") && said.contains("removed"),
        "{said}"
    );
    let out = sb.run(&["submit", "--wait", "reverse", "abc"]);
    assert_eq!(text(&out.stdout), "cba", "{}", text_of(&out));
    let out = sb.run(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert!(!process_alive(pid));
}

/// A reload of a worker that dropped its privileges looked its user up in the user database
/// again (for the binary watch), though it already runs as that user: with the database hung
/// (an LDAP or sssd server that does not answer; here `/etc/passwd` a FIFO nobody writes, in
/// the worker's own mount namespace), the new generation never served. Now a generation that
/// is already the worker's user takes its uid from the kernel.
#[test]
fn a_reload_never_waits_for_the_user_database() {
    let sb = privsep("sec-nss");
    let mut w = sb.start_under(&["unshare", "-m"], "true");
    eventually(Duration::from_secs(20), "the worker to serve", || {
        w.try_status().is_some()
    });
    let fifo = sb.path("passwd-fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
    let out = Command::new("nsenter")
        .args(["-t", &w.pid().to_string(), "-m", "mount", "--bind"])
        .arg(&fifo)
        .arg("/etc/passwd")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text_of(&out));
    w.acts_at_once(Signal::SIGHUP, Duration::from_secs(10));
    // A config naming another user: a worker that is not root can never switch to it, so the
    // reload is refused at once, without asking the database (it waited for it).
    let cfg = fs::read_to_string(sb.config()).unwrap();
    fs::write(
        sb.config(),
        cfg.replace("user = \"nobody\"", "user = \"daemon\""),
    )
    .unwrap();
    w.wait_for(Duration::from_secs(10), "the reload refused", |s| {
        s["last_refused_reload"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot switch to user \"daemon\""))
    });
    // The same user with another group: no more possible without root, refused at once too
    // (it asked the database, and then, had that answered, ran on in the old group unsaid).
    fs::write(
        sb.config(),
        cfg.replace("user = \"nobody\"", "user = \"nobody\"\ngroup = \"daemon\""),
    )
    .unwrap();
    w.wait_for(Duration::from_secs(10), "the group change refused", |s| {
        s["last_refused_reload"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot switch to group \"daemon\""))
    });
    w.acts_at_once(Signal::SIGTERM, Duration::from_secs(10));
}

/// `gearshift run` in a terminal (an operator trying it, a container started with `-t`), as
/// root with `[worker] user`: every job was in the worker's session, so a job could open that
/// terminal (`/dev/tty`), read what the operator types, write to it, or push input into root's
/// shell with TIOCSTI (still allowed where `dev.tty.legacy_tiocsti` is 1, as here). Now each
/// job starts a session of its own, with no terminal.
#[test]
fn a_job_never_has_the_workers_terminal() {
    let sb = privsep("sec-tty");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    sb.job(
        "tty_probe",
        "#!/bin/sh\nif (: < /dev/tty) 2>/dev/null; then echo has-a-terminal; else echo no-terminal; fi\n",
    );
    // `script` runs the worker on a pseudo-terminal of its own, as its controlling terminal.
    let w = sb.start_under(
        &[],
        &format!(
            "exec script -qfec '{} -c {} run' /dev/null",
            sb.bin.display(),
            sb.config().display()
        ),
    );
    eventually(Duration::from_secs(20), "the worker to serve", || {
        w.try_status().is_some()
    });
    let out = sb.run(&["submit", "--wait", "tty_probe", "x"]);
    assert_eq!(text(&out.stdout), "no-terminal\n", "{}", text_of(&out));
    kill(Pid::from_raw(pid_of(&sb)), Signal::SIGTERM).unwrap();
}

/// Started as root with `[worker] user`, jobs ran as that user with root's `HOME` (and `USER`,
/// `LOGNAME` if the launcher had them): a job's tools then looked for their configuration and
/// caches in `/root` (denied, or, for a file root left readable, root's settings used by the
/// worker's user). Now a job sees the user it runs as, as `su -` or sudo would give it.
#[test]
fn a_job_sees_the_home_and_name_of_the_user_it_runs_as() {
    let sb = privsep("sec-env");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    sb.job(
        "whoami_env",
        "#!/bin/sh\necho \"$HOME $USER $LOGNAME $(id -un)\"\n",
    );
    let out = Command::new(&sb.bin)
        .arg("-c")
        .arg(sb.config())
        .arg("start")
        .env("HOME", "/root")
        .env("USER", "root")
        .env("LOGNAME", "root")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let n = nobody();
    let want = format!("{} {} {} {}\n", n.dir.display(), n.name, n.name, n.name);
    let out = sb.run(&["submit", "--wait", "whoami_env", "x"]);
    assert_eq!(text(&out.stdout), want, "{}", text_of(&out));
    // And after a reload (a re-exec'd generation, already that user).
    assert_eq!(sb.run(&["reload"]).status.code(), Some(0));
    let out = sb.run(&["submit", "--wait", "whoami_env", "x"]);
    assert_eq!(text(&out.stdout), want, "{}", text_of(&out));
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

#[test]
fn stop_signals_only_the_proven_lock_holder() {
    let sb = privsep("sec-stop");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    // Another daemon with its own flock'ed pidfile: `flock` and its child `sleep`, in a process
    // group of their own, ended together (a `sleep` left behind held the test's output open for
    // a minute, and `scripts/test`'s lane waited for it), their output not the test's.
    let other_pidfile = sb.path("other.pid");
    use std::os::unix::process::CommandExt;
    let mut other = Command::new("flock")
        .arg("-x")
        .arg(&other_pidfile)
        .args(["sleep", "60"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let other_pid = other.id() as i32;
    let _other_group = KillGroup(other_pid);
    fs::write(&other_pidfile, format!("{other_pid}\n")).unwrap();
    eventually(Duration::from_secs(5), "the other lock", || {
        fs::read_to_string("/proc/locks")
            .unwrap()
            .contains(&format!(" {other_pid} "))
    });

    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let worker = pid_of(&sb);
    let plant = as_worker(
        &sb,
        "rm -f state/gearshift.pid && ln -s ../other.pid state/gearshift.pid",
    );
    assert!(!plant.status.success(), "state_dir is root's");

    // Even a pidfile whose content was changed (it is root's, but say a bug or an operator did
    // it) is not enough: the pid must be the lock's owner as the kernel reports it.
    fs::OpenOptions::new()
        .write(true)
        .open(sb.path("state/gearshift.pid"))
        .and_then(|mut f| {
            use std::io::Write;
            f.set_len(0)?;
            writeln!(f, "{other_pid}")
        })
        .unwrap();
    let out = sb.run(&["stop", "--timeout", "2s"]);
    assert_eq!(out.status.code(), Some(4), "unknown: {}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains(&format!("the lock is held by pid {worker}")),
        "{}",
        text(&out.stderr)
    );
    assert!(
        other.try_wait().unwrap().is_none(),
        "the other daemon was signalled"
    );
    assert!(Path::new(&format!("/proc/{worker}")).exists());
    let out = sb.run(&["reload"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    let out = sb.run(&["status"]);
    assert_eq!(out.status.code(), Some(4), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("the lock is held by pid"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        other.try_wait().unwrap().is_none(),
        "the other daemon was signalled"
    );
    // Put the right pid back: stop works again.
    fs::write(sb.path("state/gearshift.pid"), format!("{worker}\n")).unwrap();
    let out = sb.run(&["stop"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    drop(_other_group);
    let _ = other.wait();
}

/// Kills a process group when dropped (the test's helpers, a failed assertion too).
struct KillGroup(i32);

impl Drop for KillGroup {
    fn drop(&mut self) {
        let _ = nix::sys::signal::killpg(Pid::from_raw(self.0), Signal::SIGKILL);
    }
}

#[test]
fn root_submits_files_the_worker_can_read_and_unreadable_entries_are_set_aside() {
    let sb = privsep("sec-submit");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let bin = sb.bin.display().to_string();
    let cfg = sb.config().display().to_string();
    let out = Command::new("sh")
        .args([
            "-c",
            &format!("umask 077; exec \"{bin}\" -c \"{cfg}\" submit --wait --timeout 20s echo x"),
        ])
        .output()
        .unwrap();
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(0), "x".to_string()),
        "{}",
        text(&out.stderr)
    );
    // A job file nobody but root can read, dropped into new/ by hand: set aside, not fatal.
    let id = "0000000000000-00000000-bad";
    // Made whole (0600) first, then moved in: the worker may claim it the moment it appears.
    let staged = sb.path("staged");
    fs::write(&staged, "GSJ1 whatever").unwrap();
    fs::set_permissions(&staged, fs::Permissions::from_mode(0o600)).unwrap();
    fs::rename(&staged, sb.path(&format!("spool/new/{id}"))).unwrap();
    eventually(Duration::from_secs(10), "the entry set aside", || {
        sb.path(&format!("spool/rejected/{id}")).exists()
    });
    let out = sb.run(&["reload"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = sb.run(&["submit", "--wait", "--timeout", "20s", "reverse", "ab"]);
    assert_eq!(text(&out.stdout), "ba", "{}", text(&out.stderr));
    let log = fs::read_to_string(sb.path("state/gearshift.log")).unwrap();
    assert!(log.contains(id) && log.contains("rejected"), "{log}");
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

#[test]
fn the_umask_applies_under_run_too() {
    let sb = Sandbox::new("sec-umask");
    let w = sb.start_under_shell("umask 022");
    w.wait_for(Duration::from_secs(20), "start", |_| true);
    let out = sb.run(&["submit", "--wait", "echo", "m"]);
    assert_eq!(text(&out.stdout), "m");
    let id = text(&out.stderr).trim().to_string();
    let mode = fs::metadata(sb.path(&format!("spool/done/{id}")))
        .unwrap()
        .mode();
    assert_eq!(
        mode & 0o027,
        0,
        "result mode {:o} under the default umask 027",
        mode
    );
}

#[test]
fn files_the_dropped_user_cannot_read_are_refused_by_check_and_start() {
    let sb = privsep("sec-readable");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let job = sb.job("private.sh", "#!/bin/sh\necho hi\n");
    let cases: [(&Path, u32, &str); 3] = [
        (&sb.config(), 0o600, "config.toml"),
        (&sb.path("jobs"), 0o700, "jobs"),
        (&job, 0o700, "private.sh"),
    ];
    for (path, mode, name) in cases {
        let before = fs::metadata(path).unwrap().mode() & 0o7777;
        fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
        for cmd in ["check", "start"] {
            let out = sb.run(&[cmd]);
            assert_eq!(out.status.code(), Some(1), "{cmd} with {name} {mode:o}");
            let err = text(&out.stderr);
            assert!(err.contains(name) && err.contains("nobody"), "{cmd}: {err}");
        }
        fs::set_permissions(path, fs::Permissions::from_mode(before)).unwrap();
    }
    let out = sb.run(&["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

#[test]
fn a_planted_deploy_marker_never_makes_root_run_the_workers_program() {
    let sb = privsep("sec-marker");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let sha = {
        let mut sha = None;
        eventually(Duration::from_secs(30), "the running sha", || {
            let out = sb.run(&["status", "--json"]);
            sha = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                .ok()
                .and_then(|s| s["binary_sha256"].as_str().map(String::from));
            sha.is_some()
        });
        sha.unwrap()
    };
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
    let pwned = sb.path("pwned");
    let evil = format!("#!/bin/sh\nid > {}\n", pwned.display());
    // Wherever the worker can write: the old marker place, and the worker's own directory.
    for dir in ["state", "state/worker"] {
        let script = format!(
            "printf '{}' > {dir}/evil; chmod 755 {dir}/evil; \
             printf '{{\"from_sha\":\"{}\",\"to_sha\":\"{sha}\",\"last_good\":\"{}/{dir}/evil\",\"at_ms\":1}}' \
             > {dir}/deploy-pending.json",
            evil.replace('\n', "\\n"),
            "0".repeat(64),
            sb.dir.display()
        );
        let _ = as_worker(&sb, &script);
        let out = sb.run(&["start"]);
        let _ = sb.run(&["stop"]);
        assert!(
            !pwned.exists(),
            "root ran the worker's program: {} / {}",
            fs::read_to_string(&pwned).unwrap_or_default(),
            text(&out.stderr)
        );
    }
}

#[test]
fn the_binary_watch_refuses_a_binary_the_worker_can_write() {
    let sb = privsep("sec-deploy");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let status = || -> serde_json::Value {
        serde_json::from_slice(&sb.run(&["status", "--json"]).stdout).unwrap_or_default()
    };
    eventually(Duration::from_secs(30), "the running sha", || {
        status()["binary_sha256"].is_string()
    });
    // A valid binary with other bytes (a trailing byte does not stop an ELF from running),
    // owned by the worker's user: the worker could have written it.
    let tmp = sb.path("bin/.gearshift.new");
    let mut bytes = fs::read(&sb.bin).unwrap();
    bytes.push(0);
    fs::write(&tmp, &bytes).unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).unwrap();
    nix::unistd::chown(&tmp, Some(nobody().uid), None).unwrap();
    fs::rename(&tmp, &sb.bin).unwrap();
    eventually(Duration::from_secs(30), "the refusal", || {
        status()["last_refused_deploy"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("writable by the worker's user"))
    });
    assert_eq!(status()["generation"], 1, "not switched");

    // Root-owned binary, but in a directory the worker's user owns.
    nix::unistd::chown(&sb.bin, Some(nix::unistd::Uid::from_raw(0)), None).unwrap();
    nix::unistd::chown(&sb.path("bin"), Some(nobody().uid), None).unwrap();
    bytes.push(0);
    fs::write(&tmp, &bytes).unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).unwrap();
    fs::rename(&tmp, &sb.bin).unwrap();
    eventually(Duration::from_secs(30), "the second refusal", || {
        status()["last_refused_deploy"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("directory") && e.contains("writable by the worker's user"))
    });
    assert_eq!(status()["generation"], 1, "not switched");
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// Deploys A -> B -> C under a privilege drop: `last-good` is the binary root copied at the fresh
/// start (A), so C dying at start-up rolls back to A, and that is what `status` and the log say.
#[test]
fn a_rollback_reports_the_binary_it_runs() {
    let crashing = build_variant("deploy-crash", ("GEARSHIFT_CRASH_ON_RUN", "1"));
    let sb = privsep("sec-rollback");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let a = sha_of(&sb.bin);
    let out = sb.run(&["start", "--supervise"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    // The CLI is the stock binary: the sandbox's own is what the test drops.
    let status = || -> serde_json::Value {
        let out = Command::new(BIN)
            .arg("-c")
            .arg(sb.config())
            .args(["status", "--json"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_default()
    };
    eventually(Duration::from_secs(30), "A's sha", || {
        status()["binary_sha256"] == a.as_str()
    });
    // B: A's bytes and one more (a trailing byte does not stop an ELF from running).
    let mut b_bytes = fs::read(&sb.bin).unwrap();
    b_bytes.push(0);
    put_binary(&sb, &b_bytes);
    let b = sha_of(&sb.bin);
    eventually(Duration::from_secs(30), "the switch to B", || {
        status()["binary_sha256"] == b.as_str()
    });
    put_binary(&sb, &fs::read(&crashing).unwrap());
    let c = sha_of(&sb.bin);
    eventually(Duration::from_secs(60), "the rollback", || {
        let s = status();
        s["last_rollback"].is_object() && s["binary_sha256"].is_string()
    });
    let s = status();
    assert_eq!(s["binary_sha256"], a.as_str(), "last-good is A: {s}");
    assert_eq!(s["last_rollback"]["from_sha256"], c.as_str());
    assert_eq!(s["last_rollback"]["to_sha256"], a.as_str(), "{s}");
    let log = fs::read_to_string(sb.path("state/gearshift.log")).unwrap();
    assert!(
        log.contains(&format!("rolled back from {} to {}", &c[..12], &a[..12])),
        "{log}"
    );
    let _ = Command::new(BIN)
        .arg("-c")
        .arg(sb.config())
        .arg("stop")
        .output();
}

/// Strict modes follow a job link's whole path: a root-owned file inside a directory another
/// user owns (or on a path through a link in such a directory) can be swapped by that user.
#[test]
fn strict_modes_check_every_directory_on_a_job_links_path() {
    let sb = Sandbox::new("sec-linkpath");
    let other = nix::unistd::Uid::from_raw(54321);
    let theirs = sb.path("theirs");
    fs::create_dir(&theirs).unwrap();
    let target = theirs.join("up.sh");
    fs::write(&target, "#!/bin/sh\ntr a-z A-Z\n").unwrap();
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
    nix::unistd::chown(&theirs, Some(other), None).unwrap();
    std::os::unix::fs::symlink(&target, sb.path("jobs/up")).unwrap();
    let out = sb.run(&["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let err = text(&out.stderr);
    assert!(
        err.contains(&theirs.display().to_string()) && err.contains("uid 54321"),
        "{err}"
    );

    // Two hops: the job links to a root-owned directory's link, which sits in their directory.
    fs::remove_file(sb.path("jobs/up")).unwrap();
    let safe = sb.path("safe");
    fs::create_dir(&safe).unwrap();
    let real = safe.join("up.sh");
    fs::copy(&target, &real).unwrap();
    std::os::unix::fs::symlink(&real, theirs.join("hop")).unwrap();
    std::os::unix::fs::symlink(theirs.join("hop"), sb.path("jobs/up")).unwrap();
    let out = sb.run(&["check"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("uid 54321"),
        "{}",
        text(&out.stderr)
    );

    // A link straight to the root-owned copy is fine.
    fs::remove_file(sb.path("jobs/up")).unwrap();
    std::os::unix::fs::symlink(&real, sb.path("jobs/up")).unwrap();
    let out = sb.run(&["check"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// Makes the state directory and pidfile exist (a worker started and stopped), then starts the
/// process `holder(fd)` makes, handed the pidfile's descriptor `fd` to lock; returns it once
/// the kernel lists its lock, its pid written in the pidfile.
fn plant_lock_holder(sb: &Sandbox, holder: impl FnOnce(i32) -> Command) -> std::process::Child {
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
    let pidfile = sb.path("state/gearshift.pid");
    let file = fs::File::open(&pidfile).unwrap();
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    nix::fcntl::fcntl(
        fd,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
    )
    .unwrap();
    let child = holder(fd).spawn().unwrap();
    drop(file);
    let hpid = child.id() as i32;
    eventually(Duration::from_secs(5), "the planted lock", || {
        fs::read_to_string("/proc/locks")
            .unwrap()
            .contains(&format!(" {hpid} "))
    });
    fs::write(&pidfile, format!("{hpid}\n")).unwrap();
    child
}

/// A lock holder counts as the worker only if it runs as root or the worker's user: a process of
/// another user holding the pidfile's lock (handed a descriptor, say) is not "running", and is
/// never signalled.
#[test]
fn a_lock_held_by_another_user_is_not_the_worker() {
    let sb = privsep("sec-holder");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    // uid 54321: neither root nor the worker's user (nobody).
    let mut holder = plant_lock_holder(&sb, |fd| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=54321", "--regid=54321", "--clear-groups"])
            .args([
                "perl",
                "-e",
                &format!("use Fcntl qw(:flock); open(my $f, '<&=', {fd}) or die; flock($f, LOCK_EX) or die; sleep 60"),
            ]);
        c
    });
    let out = sb.run(&["status"]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("uid 54321"),
        "{}",
        text(&out.stderr)
    );
    let out = sb.run(&["stop", "--timeout", "1s"]);
    assert_ne!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert!(
        holder.try_wait().unwrap().is_none(),
        "the holder was signalled"
    );
    let _ = holder.kill();
    let _ = holder.wait();
}

/// The worker's user is untrusted, and so is what its process answers: a process of that user
/// that holds the pidfile's lock and serves the status socket (a worker taken over) answered
/// `gearshift metrics` with escape sequences, and root's terminal got them raw (`status`
/// escapes what it shows). Now the exposition is printed with every control character but the
/// line breaks escaped, as `status` prints its text.
#[test]
fn a_hostile_answer_to_metrics_never_reaches_roots_terminal_raw() {
    let sb = privsep("sec-metrics");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let socket = sb.path("state/worker/gearshift.sock");
    let server = |fd: i32| {
        format!(
        "import fcntl, os, socket\n\
         fcntl.flock({fd}, fcntl.LOCK_EX)\n\
         path = {path:?}\n\
         if os.path.exists(path): os.unlink(path)\n\
         s = socket.socket(socket.AF_UNIX); s.bind(path); s.listen(8)\n\
         while True:\n\
         \x20   c, _ = s.accept(); c.recv(100)\n\
         \x20   c.sendall(b'# HELP up \\x1b]0;pwned\\x07\\n\\x1b[2Jgearshift_up 1\\n'); c.close()\n",
        path = socket.display().to_string()
    )
    };
    let user = nobody();
    let mut holder = plant_lock_holder(&sb, |fd| {
        let mut c = Command::new("setpriv");
        c.arg(format!("--reuid={}", user.uid))
            .arg(format!("--regid={}", user.gid))
            .args(["--clear-groups", "/usr/bin/python3", "-c", &server(fd)]);
        c
    });
    eventually(Duration::from_secs(5), "the planted socket", || {
        fs::symlink_metadata(&socket).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_socket()
        })
    });
    let out = sb.run(&["metrics"]);
    let _ = holder.kill();
    let _ = holder.wait();
    let shown = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{shown}{}", text(&out.stderr));
    assert!(
        !shown.contains('\x1b') && !shown.contains('\x07'),
        "{shown:?}"
    );
    assert!(
        shown.contains("\\e]0;pwned\\x07\n\\e[2Jgearshift_up 1\n"),
        "{shown:?}"
    );
}

/// Members of the worker's group may query it (README): `status` and `metrics` work for them
/// without the root-only pidfile, through the status socket.
#[test]
fn the_workers_group_can_query_status_and_metrics() {
    let sb = privsep("sec-group");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let gid = nobody().gid;
    let regid = format!("--regid={gid}");
    let as_member = |args: &[&str]| {
        sb.run_under(
            &["setpriv", "--reuid=54321", &regid, "--clear-groups"],
            args,
        )
    };
    let out = as_member(&["status"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    assert!(
        text(&out.stdout).contains("is running"),
        "{}",
        text(&out.stdout)
    );
    let out = as_member(&["metrics"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("gearshift_generation"),
        "{}",
        text(&out.stdout)
    );
    // Not a member: no answer (the worker's directory is 0750).
    let out = sb.run_under(
        &[
            "setpriv",
            "--reuid=54321",
            "--regid=54321",
            "--clear-groups",
        ],
        &["status"],
    );
    assert_ne!(out.status.code(), Some(0), "{}", text(&out.stdout));
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// A user who is neither root nor the worker's (nor in its group) may not enter the spool:
/// `submit` and `result` said only `opening directory ".../spool/tmp": Permission denied`.
/// They now say whose spool it is and who may use it, and exit 6 (could not act); so does a
/// `submit` by a member of the worker's group, who may read results but not write jobs.
#[test]
fn a_user_who_may_not_enter_the_spool_is_told_whose_it_is() {
    let sb = privsep("sec-stranger");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stranger = [
        "setpriv",
        "--reuid=54321",
        "--regid=54321",
        "--clear-groups",
    ];
    for args in [&["submit", "echo", "hi"][..], &["result", "f00-1"][..]] {
        let out = sb.run_under(&stranger, args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(6), "{args:?}: {err}");
        assert!(
            err.contains("belongs to user \"nobody\"")
                && err.contains("this runs as uid 54321")
                && err.contains("run this as root or as that user")
                && err.contains("Permission denied"),
            "{args:?}: {err}"
        );
    }
    // Root's own submit is unchanged.
    let out = sb.run(&["submit", "--wait", "echo", "hi"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let id = text(&out.stderr).trim().to_string();
    // A member of the worker's group may read a result, not submit (the spool is 0750).
    let regid = format!("--regid={}", nobody().gid);
    let member = ["setpriv", "--reuid=54321", &regid, "--clear-groups"];
    let out = sb.run_under(&member, &["result", &id]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "hi");
    for args in [
        &["submit", "echo", "hi"][..],
        &["submit", "--count", "3", "echo", "hi"][..],
    ] {
        let out = sb.run_under(&member, args);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(6), "{args:?}: {err}");
        assert!(
            err.contains("belongs to user \"nobody\""),
            "{args:?}: {err}"
        );
    }
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// Root's `submit` before the worker's first start, as the README's manual steps do (`run &`,
/// then `submit --wait` at once): the start gives the spool to the worker's user, and a job file
/// root created after that hand-over looked at `new/` stayed root's, unreadable, and was set
/// aside (seen in CI: `submit --wait` never got its answer). Root's files are now the worker
/// user's from their creation, whenever the hand-over happens.
#[test]
fn root_submits_before_the_first_start_write_files_the_worker_owns() {
    let sb = privsep("sec-submit-first");
    let out = sb.run(&["submit", "echo", "early"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let queued: Vec<_> = fs::read_dir(sb.path("spool/new"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(queued.len(), 1);
    let m = queued[0].metadata().unwrap();
    assert_eq!(
        (m.uid(), m.gid()),
        (nobody().uid.as_raw(), nobody().gid.as_raw()),
        "root's job file belongs to the worker's user from the start"
    );
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = sb.run(&["submit", "--wait", "--timeout", "20s", "reverse", "ab"]);
    assert_eq!(text(&out.stdout), "ba", "{}", text(&out.stderr));
    eventually(Duration::from_secs(10), "the early job done", || {
        fs::read_dir(sb.path("spool/done")).unwrap().count() == 2
    });
    assert_eq!(fs::read_dir(sb.path("spool/rejected")).unwrap().count(), 0);
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

#[test]
fn root_reads_a_planted_result_only_as_large_as_a_worker_writes() {
    let sb = privsep("sec-bigresult");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    start_and_stop(&sb);
    // A sparse file far larger than any outcome a worker stores (max_payload_bytes is at most
    // 1 GiB), named like a finished job, planted by the worker's user.
    let id = "0000000a-1-1";
    let plant = as_worker(&sb, &format!("truncate -s 64G spool/done/{id}"));
    assert!(plant.status.success(), "{}", text(&plant.stderr));
    // Under an address-space limit, so that reading it all fails fast instead of taking this
    // machine's memory.
    let out = Command::new("prlimit")
        .arg("--as=3221225472")
        .arg("--")
        .arg(&sb.bin)
        .arg("-c")
        .arg(sb.config())
        .args(["result", id])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(6),
        "a clear error, not a crash: {err}"
    );
    assert!(
        err.contains(&format!("spool/done/{id}")) && err.contains("68719476736 bytes"),
        "names the file and its size: {err}"
    );
}

/// The tests that use up their user's processes run one at a time: one's hog would keep the
/// other's worker from starting.
static OUT_OF_PROCESSES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// The user those tests' workers and hogs run as, one no other test runs as (`scripts/deps`
/// makes it): the suites run two at a time, and another's processes as `nobody` would count
/// against the limit (then free slots a test holds used up) and be killed with the hog.
const NPROC_USER: &str = "gs-nproc-test";

/// A sandbox of the tests that use up processes: [`privsep`]'s with the worker's user
/// [`NPROC_USER`], the worker reaped and the sandbox removed when dropped, and then the turn of
/// the next such test ([`OUT_OF_PROCESSES`]; fields drop in this order).
struct NprocSandbox {
    _reaper: Reaper,
    sb: Sandbox,
    _turn: std::sync::MutexGuard<'static, ()>,
}

impl std::ops::Deref for NprocSandbox {
    type Target = Sandbox;
    fn deref(&self) -> &Sandbox {
        &self.sb
    }
}

/// Waits for this test's turn, then makes its [`NprocSandbox`]; `None` (a skip) where
/// [`NPROC_USER`] is missing.
fn nproc_sandbox(name: &str) -> Option<NprocSandbox> {
    let turn = OUT_OF_PROCESSES.lock().unwrap_or_else(|p| p.into_inner());
    if nix::unistd::User::from_name(NPROC_USER)
        .ok()
        .flatten()
        .is_none()
    {
        skip(
            name,
            &format!("no user {NPROC_USER} (scripts/deps makes it, as root)"),
        );
        return None;
    }
    let sb = privsep(name);
    let cfg = fs::read_to_string(sb.config()).unwrap();
    let cfg = cfg.replace("user = \"nobody\"", &format!("user = \"{NPROC_USER}\""));
    fs::write(sb.config(), cfg).unwrap();
    Some(NprocSandbox {
        _reaper: Reaper(sb.path("state/gearshift.pid")),
        sb,
        _turn: turn,
    })
}

/// [`NPROC_USER`]'s processes, as many as the worker's limit allows its user: not one thread
/// more for the worker. Killed when dropped.
struct Hog(std::process::Child);

impl Drop for Hog {
    fn drop(&mut self) {
        let _ = Command::new("pkill")
            .args(["-KILL", "-u", NPROC_USER, "-x", "sleep"])
            .status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the sandbox's worker with a limit of 400 on its user's processes and threads
/// (`RLIMIT_NPROC`; root's start is not held to it), then uses them up.
fn start_out_of_processes(sb: &Sandbox) -> Hog {
    start_out_of_processes_with(sb, &[])
}

/// [`start_out_of_processes`], the worker started with `env` too.
fn start_out_of_processes_with(sb: &Sandbox, env: &[(&str, &str)]) -> Hog {
    start_with_process_limit(sb, env);
    use_up_processes(sb)
}

/// `gearshift start` of the sandbox's worker under a limit of 400 on its user's processes.
fn limited_start(sb: &Sandbox) -> Command {
    let mut c = Command::new("prlimit");
    c.arg("--nproc=400")
        .arg(&sb.bin)
        .arg("-c")
        .arg(sb.config())
        .arg("start");
    c
}

/// Starts the sandbox's worker (with `env`) under a limit of 400 on its user's processes.
fn start_with_process_limit(sb: &Sandbox, env: &[(&str, &str)]) {
    let out = limited_start(sb)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
}

/// Processes of the worker's user ([`NPROC_USER`]), as many as its limit allows.
fn use_up_processes(sb: &Sandbox) -> Hog {
    let hog = Command::new("setpriv")
        .args([
            "--reuid",
            NPROC_USER,
            "--regid",
            NPROC_USER,
            "--clear-groups",
        ])
        .args(["sh", "-c", "for i in $(seq 400); do sleep 30 & done; wait"])
        .current_dir(&sb.dir)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    Hog(hog)
}

/// Jobs of the worker's user can use up that user's processes (`RLIMIT_NPROC`), and one of
/// them connect to the status socket again and again: the clients are answered all the same
/// (one thread answers them all; a thread per client once made each of them a line in the log
/// while it lasted, and a client closed unanswered), and `status` answers.
#[test]
fn status_clients_are_answered_while_the_user_is_out_of_processes() {
    let Some(sb) = nproc_sandbox("sec-nproc") else {
        return;
    };
    let hog = start_out_of_processes(&sb);
    std::thread::sleep(Duration::from_secs(2));
    let socket = sb.path("state/worker/gearshift.sock");
    let mut answered = 0;
    for _ in 0..50 {
        if let Ok(mut c) = std::os::unix::net::UnixStream::connect(&socket) {
            use std::io::{Read, Write};
            c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let _ = c.write_all(b"status\n");
            let mut doc = String::new();
            let _ = c.read_to_string(&mut doc);
            answered += usize::from(doc.starts_with('{'));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = sb.run(&["status"]);
    drop(hog);
    assert_eq!(answered, 50, "clients answered while out of processes");
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// While the worker's user is out of processes, a durable spool worker keeps serving (its
/// built-in jobs need no process), and the helpers it cannot start (the background listing of
/// `new/`, the journal's checkpoint) are said once while it lasts, not at every claim or every
/// two seconds.
#[test]
fn helpers_that_cannot_start_are_said_once() {
    let Some(sb) = nproc_sandbox("sec-nproc-spool") else {
        return;
    };
    let cfg = fs::read_to_string(sb.config()).unwrap();
    fs::write(sb.config(), cfg.replace("fsync = false", "fsync = true")).unwrap();
    let hog = start_out_of_processes(&sb);
    std::thread::sleep(Duration::from_secs(2));
    // Jobs arriving while the worker claims: each batch wakes the listing.
    for _ in 0..6 {
        let out = sb.run(&["submit", "--count", "5000", "echo", "x"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_secs(2));
    drop(hog);
    let log = fs::read_to_string(sb.path("state/gearshift.log")).unwrap_or_default();
    for what in [
        "cannot list the queue",
        "helper thread",
        "journal checkpoint",
    ] {
        let said = log.lines().filter(|l| l.contains(what)).count();
        assert!(said <= 2, "\"{what}\" said {said} times:\n{log}");
    }
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// [`start_out_of_processes`], then a HUP to the worker: its pid and the hog.
fn reload_out_of_processes(sb: &Sandbox) -> (nix::unistd::Pid, Hog) {
    reload_out_of_processes_with(sb, &[])
}

/// [`reload_out_of_processes`], the worker started with `env` too.
fn reload_out_of_processes_with(sb: &Sandbox, env: &[(&str, &str)]) -> (nix::unistd::Pid, Hog) {
    let hog = start_out_of_processes_with(sb, env);
    std::thread::sleep(Duration::from_secs(2));
    let pid = fs::read_to_string(sb.path("state/gearshift.pid")).unwrap();
    let pid = nix::unistd::Pid::from_raw(pid.trim().parse().unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    (pid, hog)
}

/// A reload while the worker's user is out of processes (a job's fork bomb up to the limit):
/// the new generation cannot start its threads at once; it must not exit and leave no worker,
/// but serve once processes are back.
#[test]
fn a_reload_while_out_of_processes_keeps_a_worker() {
    let Some(sb) = nproc_sandbox("sec-nproc-reload") else {
        return;
    };
    let (pid, hog) = reload_out_of_processes(&sb);
    std::thread::sleep(Duration::from_secs(3));
    let alive = process_alive(pid.as_raw());
    drop(hog);
    let log = fs::read_to_string(sb.path("state/gearshift.log")).unwrap_or_default();
    assert!(
        alive,
        "the worker exited on a reload while out of processes:\n{log}"
    );
    assert!(log.contains("trying again"), "{log}");
    let out = sb.run(&["submit", "--wait", "--timeout", "20s", "reverse", "abc"]);
    assert_eq!(
        text(&out.stdout).trim(),
        "cba",
        "{}\n{log}",
        text(&out.stderr)
    );
    let log = fs::read_to_string(sb.path("state/gearshift.log")).unwrap_or_default();
    assert!(log.contains("thread started"), "{log}");
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// A restarted generation must serve within 120 s or its alarm ends it (a hang before serving
/// must not wedge the worker), but waiting for threads while its user is out of processes is
/// no hang: each such wait (bounded, said) pushes the alarm back. The alarm shortened to 2 s in
/// the fault build; the processes come back after 3 s. Before, the alarm ended the waiting
/// generation, and the jobs its lanes had claimed.
#[test]
fn a_restarted_generation_waiting_for_threads_is_not_ended_by_its_alarm() {
    let Some(sb) = nproc_sandbox("sec-nproc-alarm") else {
        return;
    };
    fs::copy(
        build_variant("faults", ("GEARSHIFT_FAULTS", "1")),
        sb.path("bin/gearshift"),
    )
    .unwrap();
    let (pid, hog) = reload_out_of_processes_with(&sb, &[("GEARSHIFT_FAULT_SERVE_ALARM_S", "2")]);
    std::thread::sleep(Duration::from_secs(3));
    let alive = process_alive(pid.as_raw());
    drop(hog);
    let log = fs::read_to_string(sb.path("state/gearshift.log")).unwrap_or_default();
    assert!(log.contains("trying again"), "{log}");
    assert!(alive, "the waiting generation was ended:\n{log}");
    let out = sb.run(&["submit", "--wait", "--timeout", "20s", "reverse", "abc"]);
    assert_eq!(text(&out.stdout).trim(), "cba", "{}", text(&out.stderr));
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// A restart refused at the last moment (config.toml made invalid while it waited for a job)
/// starts the lanes again; when the worker's user is out of processes then, the lanes are
/// waited for, as a starting generation's threads are. Before, the worker exited ("spawning a
/// lane thread: Resource temporarily unavailable"), found by the soak's `SOAK_NPROC`.
#[test]
fn lanes_started_again_after_a_refused_restart_wait_while_out_of_processes() {
    let Some(sb) = nproc_sandbox("sec-nproc-refused") else {
        return;
    };
    start_with_process_limit(&sb, &[]);
    let pid = fs::read_to_string(sb.path("state/gearshift.pid")).unwrap();
    let pid: i32 = pid.trim().parse().unwrap();
    let log = || fs::read_to_string(sb.path("state/gearshift.log")).unwrap_or_default();
    sb.submit("sleep", "2500");
    std::thread::sleep(Duration::from_millis(500));
    let good = fs::read_to_string(sb.config()).unwrap();
    fs::write(sb.config(), format!("{good}\n# changed\n")).unwrap();
    eventually(Duration::from_secs(10), "the restart waiting", || {
        log().contains("restarting after 1 running job(s) finish")
    });
    fs::write(
        sb.config(),
        good.replacen("concurrency = ", "concurrency == ", 1),
    )
    .unwrap();
    let hog = use_up_processes(&sb);
    eventually(Duration::from_secs(15), "the restart refused", || {
        log().contains("reload refused")
    });
    std::thread::sleep(Duration::from_secs(2));
    let alive = process_alive(pid);
    drop(hog);
    assert!(alive, "the worker exited:\n{}", log());
    assert!(
        log().contains("thread now"),
        "waited for, and said:\n{}",
        log()
    );
    fs::write(sb.config(), &good).unwrap();
    let out = sb.run(&["submit", "--wait", "--timeout", "20s", "reverse", "abc"]);
    assert_eq!(
        text(&out.stdout).trim(),
        "cba",
        "{}\n{}",
        text(&out.stderr),
        log()
    );
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// A fresh start while the worker's user is out of processes (the soak's `SOAK_NPROC` meets
/// only running workers): the new worker cannot have its threads, waits for them (said, and
/// bounded), and serves once processes are back; `start` returns then, not before.
#[test]
fn a_fresh_start_while_out_of_processes_waits_and_then_serves() {
    let Some(sb) = nproc_sandbox("sec-nproc-fresh") else {
        return;
    };
    let hog = use_up_processes(&sb);
    std::thread::sleep(Duration::from_secs(2));
    let mut start = limited_start(&sb)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let log = || fs::read_to_string(sb.path("state/gearshift.log")).unwrap_or_default();
    eventually(Duration::from_secs(15), "the wait for threads said", || {
        log().contains("trying again")
    });
    assert!(
        start.try_wait().unwrap().is_none(),
        "start returned before the worker served:\n{}",
        log()
    );
    drop(hog);
    let started = wait_child(&mut start, Duration::from_secs(30));
    assert_eq!(
        started.and_then(|s| s.code()),
        Some(0),
        "start, once processes are back:\n{}",
        log()
    );
    let out = sb.run(&["submit", "--wait", "--timeout", "20s", "reverse", "abc"]);
    assert_eq!(text(&out.stdout).trim(), "cba", "{}", text(&out.stderr));
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// A TERM while a reloaded generation waits for threads ends the worker within 2 s.
#[test]
fn a_term_while_waiting_for_threads_ends_the_worker_within_two_seconds() {
    let Some(sb) = nproc_sandbox("sec-nproc-term") else {
        return;
    };
    let (pid, hog) = reload_out_of_processes(&sb);
    std::thread::sleep(Duration::from_secs(1));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let asked = std::time::Instant::now();
    // Exited is enough: the worker's parent here is init, which may reap it a second later.
    while process_alive(pid.as_raw()) && asked.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let took = asked.elapsed();
    drop(hog);
    let log = fs::read_to_string(sb.path("state/gearshift.log")).unwrap_or_default();
    assert!(log.contains("trying again"), "{log}");
    assert!(
        took < Duration::from_secs(2),
        "ended after {took:?}:\n{log}"
    );
}

/// Started as its user (not root) with a `[worker] group` that user is not running as: `check`
/// said "ok" and the worker ran, its jobs in the user's own group, without a word (only root can
/// switch groups). Now `check` and `run` refuse it, as they refuse another user.
#[test]
fn a_start_that_is_not_root_refuses_a_group_it_cannot_switch_to() {
    let sb = Sandbox::new("sec-group");
    let dir = sb.path("as-nobody");
    fs::create_dir_all(dir.join("jobs")).unwrap();
    fs::write(
        dir.join("config.toml"),
        "[worker]\njobs_dir = \"jobs\"\nuser = \"nobody\"\ngroup = \"daemon\"\n",
    )
    .unwrap();
    copy_binary(&sb.bin, &dir.join("gearshift"));
    let out = Command::new("chown")
        .args(["-R", "nobody"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text_of(&out));
    for cmd in ["check", "run"] {
        let out = as_worker(
            &sb,
            &format!("exec timeout 20 as-nobody/gearshift -c as-nobody/config.toml {cmd}"),
        );
        assert_eq!(out.status.code(), Some(1), "{cmd}: {}", text_of(&out));
        assert!(
            text(&out.stderr).contains("cannot switch to group \"daemon\""),
            "{cmd}: {}",
            text_of(&out)
        );
    }
}

/// A binary dropped at the path that the worker's user cannot read (root's, mode 0711): the
/// deploy watch, which runs as that user, warned "cannot read" and looked again every second,
/// a warning each time, for as long as it stayed. Said once; still looked at (it may be a
/// fault that passes).
#[test]
fn a_binary_the_worker_cannot_read_is_said_once() {
    let sb = privsep("unreadable-binary");
    let w = sb.start();
    w.wait_running_sha();
    let tmp = sb.path("bin/gearshift.new");
    let mut bytes = fs::read(BIN).unwrap();
    bytes.extend_from_slice(b"another build");
    fs::write(&tmp, bytes).unwrap();
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o711)).unwrap();
    fs::rename(&tmp, &sb.bin).unwrap();
    eventually(Duration::from_secs(10), "the warning", || {
        w.log_text().contains("cannot read")
    });
    std::thread::sleep(Duration::from_secs(4));
    let log = w.log_text();
    assert_eq!(log.matches("cannot read").count(), 1, "{log}");
    assert_eq!(w.status()["generation"], 1);
}

/// `restart` right after a new binary was put at the path, under a privilege drop with the
/// binary watch on (the defaults): root keeps `last-good` at every fresh start, so the new
/// binary's start overwrote it with itself before it crashed, and `restart` then found nothing
/// to roll back to: the healthy worker was stopped and none was left. `restart` now puts back
/// the binary the stopped worker ran (it holds the copy it kept) before the start that rolls
/// back. (Should the binary watch switch first, the worker dies on its own and `restart`'s start
/// rolls back through the deploy's marker: the same end, which this test also accepts.)
#[test]
fn a_restart_onto_a_crashing_binary_rolls_back_under_a_privilege_drop() {
    let crashing = build_variant("deploy-crash", ("GEARSHIFT_CRASH_ON_RUN", "1"));
    let sb = privsep("sec-restart-rollback");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let good = sha_of(&sb.bin);
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    put_binary(&sb, &fs::read(&crashing).unwrap());
    let out = sb.run(&["restart"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let status: serde_json::Value =
        serde_json::from_slice(&sb.run(&["status", "--json"]).stdout).unwrap_or_default();
    assert_eq!(status["state"], "running", "{status}\n{}", text_of(&out));
    assert_eq!(
        status["last_rollback"]["to_sha256"],
        good.as_str(),
        "{status}"
    );
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// A fresh start of a new binary that crashes as it starts, with no deploy marker: what
/// `systemctl restart` right after copying the binary does (here `start`, twice, as systemd's
/// `Restart=on-failure` would). Root kept every fresh start's binary as `last-good` before it
/// served, so the crashing binary replaced the good one there, and every start crashed again.
/// Now a fresh start of a binary other than `last-good` writes the marker naming itself (a
/// start attempt, cleared once it serves) and leaves `last-good` alone until it has served: the
/// next fresh start rolls back.
#[test]
fn a_fresh_start_of_a_crashing_binary_rolls_back_at_the_next_start() {
    let crashing = build_variant("deploy-crash", ("GEARSHIFT_CRASH_ON_RUN", "1"));
    let sb = privsep("sec-attempt");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let good = sha_of(&sb.bin);
    // A first start that serves, and a second one (last-good is kept and promoted by then).
    for _ in 0..2 {
        let out = sb.run(&["start"]);
        assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
        assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
    }
    put_binary(&sb, &fs::read(&crashing).unwrap());
    let bad = sha_of(&sb.bin);
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(1), "it crashes: {}", text_of(&out));
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let s: serde_json::Value =
        serde_json::from_slice(&sb.run(&["status", "--json"]).stdout).unwrap_or_default();
    assert_eq!(s["last_rollback"]["from_sha256"], bad.as_str(), "{s}");
    assert_eq!(s["last_rollback"]["to_sha256"], good.as_str(), "{s}");
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
    // A good new binary (A's bytes and one more): its first fresh start leaves last-good as it
    // is; once it has served, the next fresh start keeps it as last-good.
    let mut newer = fs::read(sb.path("state/last-good")).unwrap();
    newer.push(0);
    put_binary(&sb, &newer);
    let newer = sha_of(&sb.bin);
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
    assert_eq!(
        sha_of(&sb.path("state/last-good")),
        good,
        "not kept before it served"
    );
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
    assert_eq!(
        sha_of(&sb.path("state/last-good")),
        newer,
        "kept once it served"
    );
}

/// Root's `submit` creates its file in `tmp/` and then gives it to the worker's user; the
/// worker's clean-up of `tmp/` (every 5 s) met such a file in between, could not open it, set it
/// aside as hostile, and the submit failed renaming it (found by the chaos soak under a
/// privilege drop). A file the worker cannot read yet, written within the last seconds, is now
/// left to its writer; an old one is still set aside.
#[test]
fn roots_submit_in_the_making_is_never_set_aside() {
    use std::os::unix::fs::OpenOptionsExt;
    let sb = privsep("sec-tmp-race");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    // A slow writer's file, root's and unreadable to the worker, kept young for 12 s (two
    // looks of the clean-up at least).
    let making = sb.path("spool/tmp/f0000001000000000000000a-1-0.1-1");
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o640)
        .open(&making)
        .unwrap();
    let until = std::time::Instant::now() + Duration::from_secs(12);
    while std::time::Instant::now() < until {
        let Ok(f) = fs::OpenOptions::new().append(true).open(&making) else {
            break; // taken away
        };
        f.set_modified(std::time::SystemTime::now()).unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }
    let rejected: Vec<_> = fs::read_dir(sb.path("spool/rejected")).unwrap().collect();
    assert!(
        rejected.is_empty(),
        "set aside: {rejected:?}\n{}",
        fs::read_to_string(sb.path("state/gearshift.log")).unwrap_or_default()
    );
    assert!(making.exists());
    // Left alone for good (older than the writer could be), it is set aside as before.
    let old = std::time::SystemTime::now() - Duration::from_secs(60);
    fs::OpenOptions::new()
        .append(true)
        .open(&making)
        .unwrap()
        .set_modified(old)
        .unwrap();
    eventually(
        Duration::from_secs(15),
        "the abandoned file set aside",
        || fs::read_dir(sb.path("spool/rejected")).is_ok_and(|mut d| d.next().is_some()),
    );
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// A fresh start of a good new binary that a full disk refused (its spool's journal held a job
/// answered before a kill -9 and not yet placed, whose file the start's replay could not write)
/// was taken for the binary's death before serving: the next start, with room again, rolled the
/// deploy back (found by the chaos soak on a full tmpfs, where every deploy was then rolled
/// back). A start a full disk refused now leaves no marker naming it, and the next start runs
/// the new binary.
#[test]
fn a_new_binary_whose_start_a_full_disk_refused_is_not_rolled_back() {
    let sb = privsep("sec-full-attempt");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let port = free_port();
    let cfg = fs::read_to_string(sb.config()).unwrap().replace(
        "kind = \"spool\"",
        &format!(
            "kind = \"zeromq\"\nbind = [\"tcp://127.0.0.1:{port}\"]\nreply = \"id\"\nmin_free = 0"
        ),
    );
    fs::write(sb.config(), cfg.replace("fsync = false", "fsync = true")).unwrap();
    let fsys = common::tmpfs::Tmpfs::mount(&sb.path("spool"), "2m");
    for _ in 0..2 {
        let out = sb.run(&["start"]);
        assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
        assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
    }
    // Answered on a full disk: durable in the journal, its file not written yet.
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    sb.submit("reverse", "first");
    let filler = fsys.fill();
    let ids: Vec<String> = ["second", "third"]
        .iter()
        .filter_map(|p| {
            let out = sb.run(&["submit", "reverse", p]);
            out.status
                .success()
                .then(|| text(&out.stdout).trim().to_string())
        })
        .collect();
    assert!(!ids.is_empty(), "no job answered on the full disk");
    kill(Pid::from_raw(pid_of(&sb)), Signal::SIGKILL).unwrap();
    eventually(Duration::from_secs(10), "the worker gone", || {
        sb.run(&["status"]).status.code() == Some(3)
    });
    let mut newer = fs::read(&sb.bin).unwrap();
    newer.push(0);
    put_binary(&sb, &newer);
    let newer = sha_of(&sb.bin);
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(1), "{}", text_of(&out));
    assert!(
        text_of(&out).contains("No space left on device"),
        "{}",
        text_of(&out)
    );
    fs::remove_file(filler).unwrap();
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let s: serde_json::Value =
        serde_json::from_slice(&sb.run(&["status", "--json"]).stdout).unwrap_or_default();
    assert!(s["last_rollback"].is_null(), "rolled back: {s}");
    // The running binary's digest is computed after the start.
    eventually(Duration::from_secs(20), "the new binary running", || {
        serde_json::from_slice::<serde_json::Value>(&sb.run(&["status", "--json"]).stdout)
            .is_ok_and(|s| s["binary_sha256"] == newer.as_str())
    });
    for id in &ids {
        eventually(Duration::from_secs(20), "the answered job done", || {
            let out = sb.run(&["result", id]);
            out.status.code() == Some(0)
        });
    }
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// `reopen-logs` of a supervised worker under a privilege drop, the log in root's `state_dir`
/// (where the worker's user cannot make a file): the supervisor (root) makes the new log first,
/// gives it to the worker's user as `start` gave the first, and only then passes the signal on,
/// so the worker reopens it too; the supervisor's own lines (a crash) reach it.
#[test]
fn a_supervised_workers_log_is_made_again_for_its_user_at_reopen() {
    let sb = privsep("sec-sup-reopen");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let out = sb.run(&["start", "--supervise"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    let log = sb.path("state/gearshift.log");
    fs::rename(&log, sb.path("state/gearshift.log.1")).unwrap();
    assert_eq!(sb.run(&["reopen-logs"]).status.code(), Some(0));
    eventually(
        Duration::from_secs(10),
        "the worker's line in the new log",
        || fs::read_to_string(&log).is_ok_and(|s| s.contains("SIGUSR1: reopened log file")),
    );
    assert_eq!(fs::metadata(&log).unwrap().uid(), nobody().uid.as_raw());
    let worker = pid_of(&sb);
    kill(Pid::from_raw(worker), Signal::SIGKILL).unwrap();
    eventually(
        Duration::from_secs(10),
        "the supervisor's line in the new log",
        || fs::read_to_string(&log).is_ok_and(|s| s.contains("(crash 1); restarting")),
    );
    eventually(Duration::from_secs(20), "a new worker serving", || {
        sb.run(&["status"]).status.code() == Some(0) && pid_of(&sb) != worker
    });
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// An operator's `rm -rf spool` (to clear the queue) under a worker that dropped its
/// privileges: the worker's restart to open the spool again could not make it where only root
/// may write, and died there, leaving no worker (nothing started it again without a
/// supervisor); a root `submit` meanwhile made the spool root's, which the worker's user could
/// not open either ("the spool belongs to user root"). Now the worker serves on and says why
/// it takes no job, and restarts into the spool once its user can open it: root's next
/// `submit` makes it and gives it to that user, as a fresh start does.
#[test]
fn a_spool_removed_under_a_dropped_worker_is_waited_for_until_root_makes_it_again() {
    let sb = privsep("sec-spool-removed");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let pid = pid_of(&sb);
    fs::remove_dir_all(sb.path("spool")).unwrap();
    let log = || fs::read_to_string(sb.path("state/gearshift.log")).unwrap_or_default();
    eventually(Duration::from_secs(20), "the worker to say why", || {
        assert_eq!(
            sb.run(&["status"]).status.code(),
            Some(0),
            "the worker is gone:\n{}",
            log()
        );
        log().contains("cannot open it again")
    });
    let st = sb.run(&["status", "--json"]);
    let s: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    assert!(
        s["warnings"].to_string().contains("cannot open it again"),
        "{s}"
    );
    let out = sb.run(&["submit", "--wait", "--timeout", "30s", "reverse", "ab"]);
    assert_eq!(
        (out.status.code(), text(&out.stdout).as_str()),
        (Some(0), "ba"),
        "{}\n{}",
        text(&out.stderr),
        log()
    );
    assert_eq!(pid_of(&sb), pid, "restarted in place");
    let s: serde_json::Value =
        serde_json::from_slice(&sb.run(&["status", "--json"]).stdout).unwrap();
    assert_eq!(s["last_restart_reason"], "spool replaced", "{s}");
    assert_eq!(
        fs::metadata(sb.path("spool")).unwrap().uid(),
        nobody().uid.as_raw(),
        "root's submit gave the spool it made to the worker's user"
    );
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}

/// `state_dir` removed under a worker that dropped its privileges (a clean-up of "stale"
/// files): the worker serves on, but its next restart could not make `state_dir` again where
/// only root may write, and died there ("creating directory ...: Permission denied"), so a HUP
/// or a config edit ended it. The restart is now refused, saying why, and the worker serves
/// on; `gearshift restart` makes `state_dir` again and starts it afresh.
#[test]
fn a_restart_after_state_dir_was_removed_under_a_dropped_worker_is_refused_not_fatal() {
    let sb = privsep("sec-state-removed");
    let _reaper = Reaper(sb.path("state/gearshift.pid"));
    let out = sb.run(&["start"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let pid = pid_of(&sb);
    fs::remove_dir_all(sb.path("state")).unwrap();
    // Its log went with state_dir: read through the worker's own descriptor.
    let log = || {
        fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .find(|e| {
                fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains("gearshift.log"))
            })
            .and_then(|e| fs::read_to_string(e.path()).ok())
            .unwrap_or_default()
    };
    kill(Pid::from_raw(pid), Signal::SIGHUP).unwrap();
    eventually(Duration::from_secs(10), "the restart refused", || {
        assert!(process_alive(pid), "the worker died of its restart");
        log().contains("reload refused")
    });
    assert!(log().contains("cannot make it again"), "{}", log());
    std::thread::sleep(Duration::from_millis(500));
    assert!(process_alive(pid), "{}", log());
    let out = sb.run(&["restart"]);
    assert_eq!(out.status.code(), Some(0), "{}", text_of(&out));
    assert_ne!(pid_of(&sb), pid);
    let out = sb.run(&["submit", "--wait", "--timeout", "20s", "reverse", "ab"]);
    assert_eq!(text(&out.stdout), "ba", "{}", text(&out.stderr));
    assert_eq!(sb.run(&["stop"]).status.code(), Some(0));
}
