//! Test harness: each test gets its own directory with a config, a jobs dir and a spool, and
//! drives the real `gearshift` binary. Every wait is bounded.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

pub mod rabbit;
pub mod tmpfs;

pub const BIN: &str = env!("CARGO_BIN_EXE_gearshift");

/// A test's private directory, removed at the end unless the test failed.
pub struct Sandbox {
    pub dir: PathBuf,
    /// The binary to drive: the stock `gearshift` unless a test chose another.
    pub bin: PathBuf,
}

impl Sandbox {
    pub fn new(name: &str) -> Sandbox {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "gs-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("jobs")).unwrap();
        let sb = Sandbox {
            dir,
            bin: PathBuf::from(BIN),
        };
        sb.write_config("");
        sb
    }

    /// Writes config.toml: the common settings plus `extra` (TOML appended as is).
    pub fn write_config(&self, extra: &str) {
        fs::write(self.config(), self.config_text(extra)).unwrap();
    }

    pub fn config_text(&self, extra: &str) -> String {
        format!(
            "[worker]\nconcurrency = 2\njobs_dir = \"jobs\"\nstate_dir = \"state\"\nallow_root = true\n\n\
             [source]\nkind = \"spool\"\ndir = \"spool\"\nfsync = false\n\n{extra}"
        )
    }

    /// Writes config.toml with extra keys in the [worker] section.
    pub fn write_worker_config(&self, worker_keys: &str) {
        let text = with_worker_keys(&self.config_text(""), worker_keys);
        fs::write(self.config(), text).unwrap();
    }

    /// Adds keys to the [worker] section of the config.toml written (after `allow_root`).
    pub fn add_worker_keys(&self, worker_keys: &str) {
        let text = fs::read_to_string(self.config()).unwrap();
        fs::write(self.config(), with_worker_keys(&text, worker_keys)).unwrap();
    }

    /// The config of a worker built from `examples/custom_worker` (set `bin` to it), whose Rust
    /// function `slow` ignores its deadline (it sleeps the milliseconds it is given), with a 1 s
    /// timeout; `source` replaces the spool's section unless empty.
    pub fn write_stubborn_config(&self, source: &str, abandon_after: &str) {
        let text = self.config_text("[functions.slow]\ntimeout = \"1s\"\n");
        let text = match source {
            "" => text,
            s => text.replace(
                "[source]\nkind = \"spool\"\ndir = \"spool\"\nfsync = false\n",
                s,
            ),
        };
        let keys = format!("abandon_after = \"{abandon_after}\"");
        // One write: a worker that reads the config may not see it half made.
        fs::write(self.config(), with_worker_keys(&text, &keys)).unwrap();
    }

    pub fn config(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// Adds an executable job script.
    pub fn job(&self, file: &str, body: &str) -> PathBuf {
        self.job_bytes(file, body.as_bytes())
    }

    /// [`Sandbox::job`] of any bytes (a program, not a script).
    pub fn job_bytes(&self, file: &str, body: &[u8]) -> PathBuf {
        let p = self.dir.join("jobs").join(file);
        let tmp = self.dir.join(format!(".{file}.tmp"));
        fs::write(&tmp, body).unwrap();
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755)).unwrap();
        fs::rename(&tmp, &p).unwrap();
        p
    }

    /// Gives the whole sandbox to user nobody (`chown -R`); returns `setpriv`'s `--reuid` and
    /// `--regid` arguments for running as it.
    pub fn give_to_nobody(&self) -> [String; 2] {
        let out = Command::new("chown")
            .args(["-R", "nobody:"])
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text_of(&out));
        let n = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        [format!("--reuid={}", n.uid), format!("--regid={}", n.gid)]
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("-c").arg(self.config()).args(args);
        c.env_remove("GEARSHIFT_LOG");
        c
    }

    /// Runs a CLI command to completion (bounded). Its pipes are read while it runs (a thread
    /// waits for the output), so a command that prints more than a pipe holds cannot deadlock.
    /// `gearshift -c CONFIG ARGS` run by `outer` (e.g. `setpriv ...`, `unshare ...`).
    pub fn run_under(&self, outer: &[&str], args: &[&str]) -> Output {
        Command::new(outer[0])
            .args(&outer[1..])
            .arg(&self.bin)
            .arg("-c")
            .arg(self.config())
            .args(args)
            .output()
            .unwrap()
    }

    pub fn run(&self, args: &[&str]) -> Output {
        let child = spawn(self.cmd(args).stdout(Stdio::piped()).stderr(Stdio::piped()));
        let pid = child.id() as i32;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(out) => out.unwrap(),
            Err(_) => {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                panic!("CLI command {args:?} timed out");
            }
        }
    }

    pub fn submit(&self, function: &str, payload: &str) -> String {
        let out = self.run(&["submit", function, payload]);
        assert!(
            out.status.success(),
            "submit failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    /// The descriptors a worker of this sandbox holds when idle: started, counted on the worker
    /// itself (the most of a few looks, once its helpers are surely up), stopped.
    pub fn idle_fds(&self) -> usize {
        let mut w = self.start();
        let n = w
            .fd_samples(3, Duration::from_millis(200))
            .into_iter()
            .max()
            .unwrap();
        w.signal(Signal::SIGTERM);
        assert!(w.wait_exit(Duration::from_secs(10)).success());
        n
    }

    /// Starts `gearshift run` and waits until it answers status.
    pub fn start(&self) -> Worker {
        self.start_env(&[])
    }

    /// Like [`Sandbox::start`], with extra environment variables.
    pub fn start_env(&self, env: &[(&str, &str)]) -> Worker {
        let log = self.dir.join("worker.log");
        let log_out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = spawn(
            self.cmd(&["run"])
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log_out),
        );
        let mut w = Worker {
            child,
            socket: self.dir.join("state/worker/gearshift.sock"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while w.try_status().is_none() {
            if let Some(status) = w.child.try_wait().unwrap() {
                panic!("worker exited with {status} at start-up:\n{}", w.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "worker did not answer status:\n{}",
                w.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        w
    }
}

impl Sandbox {
    /// Starts `gearshift run` through `sh -c "PREFIX; exec gearshift run"` (a ulimit, a umask),
    /// logging to `worker.log`; returns at once.
    pub fn start_under_shell(&self, prefix: &str) -> Worker {
        self.start_under(&[], prefix)
    }

    /// [`Sandbox::start_under_shell`] with the shell itself run by `outer` (e.g. `unshare -U -r`).
    pub fn start_under(&self, outer: &[&str], prefix: &str) -> Worker {
        let log = self.dir.join("worker.log");
        let mut cmd = match outer.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg("sh");
                c
            }
            None => Command::new("sh"),
        };
        cmd.args([
            "-c",
            &format!(
                "{prefix}; exec \"{}\" -c \"{}\" run",
                self.bin.display(),
                self.config().display()
            ),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&log).unwrap());
        Worker {
            child: spawn(&mut cmd),
            socket: self.dir.join("state/worker/gearshift.sock"),
            log,
        }
    }

    /// Runs from its own copy of the binary (in `bin/`), which a dropped user can reach and a
    /// test may replace.
    pub fn own_binary(&mut self) {
        fs::create_dir_all(self.path("bin")).unwrap();
        let bin = self.path("bin/gearshift");
        copy_binary(Path::new(BIN), &bin);
        self.bin = bin;
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A running `gearshift run`.
pub struct Worker {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
}

impl Worker {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// The worker's status, or None while it cannot answer (e.g. mid re-exec).
    pub fn try_status(&self) -> Option<Value> {
        status_at(&self.socket)
    }

    pub fn status(&self) -> Value {
        self.wait_for(Duration::from_secs(10), "status", |_| true)
    }

    pub fn generation(&self) -> u64 {
        self.status()["generation"].as_u64().unwrap()
    }

    /// Polls status until `ok` holds; panics with the log after `limit`.
    pub fn wait_for(&self, limit: Duration, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + limit;
        let mut last = None;
        loop {
            if let Some(s) = self.try_status() {
                if ok(&s) {
                    return s;
                }
                last = Some(s);
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; last status {last:?}\nlog:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until the worker knows its own binary's sha256 (hashed in the background at a
    /// fresh start: deploys are judged against it).
    pub fn wait_running_sha(&self) -> Value {
        self.wait_for(Duration::from_secs(30), "the running sha", |s| {
            s["binary_sha256"].is_string()
        })
    }

    pub fn wait_generation(&self, at_least: u64) -> Value {
        self.wait_for(
            Duration::from_secs(30),
            &format!("generation {at_least}"),
            |s| s["generation"].as_u64().unwrap_or(0) >= at_least && s["state"] == "running",
        )
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit (bounded) and returns its status.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        match wait_child(&mut self.child, limit) {
            Some(s) => s,
            None => panic!(
                "worker did not exit within {limit:?}\nlog:\n{}",
                self.log_text()
            ),
        }
    }

    pub fn fd_list(&self) -> String {
        let mut out = String::new();
        for e in fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .flatten()
        {
            let target = fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            out.push_str(&format!(
                "{} -> {target}\n",
                e.file_name().to_string_lossy()
            ));
        }
        out
    }

    /// Waits until the worker knows its binary's sha256: a start that does not know it hashes
    /// it in a helper, holding the binary open meanwhile (a 90 MB debug build takes a while),
    /// so descriptors are counted or limited only after.
    pub fn wait_hashed(&self) {
        self.wait_for(Duration::from_secs(30), "the binary's sha", |s| {
            s["binary_sha256"].is_string()
        });
    }

    /// Leaves the worker no descriptor to make: its soft limit becomes the lowest number free
    /// (a new descriptor takes the lowest free number) among those it holds for good (in every
    /// one of a few looks: a lane's listing holds one for a moment). Returns the limit before.
    /// First waits for the binary's background hash (a start that does not know its binary
    /// holds it open meanwhile; closed after, it would give the worker a descriptor back).
    pub fn run_out_of_fds(&self) -> String {
        self.wait_hashed();
        let held = (0..5)
            .map(|_| {
                std::thread::sleep(Duration::from_millis(30));
                fs::read_dir(format!("/proc/{}/fd", self.pid()))
                    .unwrap()
                    .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                    .collect::<std::collections::HashSet<u32>>()
            })
            .reduce(|a, b| a.intersection(&b).copied().collect())
            .unwrap();
        let lowest_free = (0..).find(|n| !held.contains(n)).unwrap();
        let before = self.prlimit(None);
        self.prlimit(Some(&lowest_free.to_string()));
        before
    }

    /// Sets the worker's soft descriptor limit (raising it back needs no privilege).
    pub fn set_fd_limit(&self, soft: &str) {
        self.prlimit(Some(soft));
    }

    fn prlimit(&self, set: Option<&str>) -> String {
        let out = Command::new("prlimit")
            .args(["--pid", &self.pid().to_string()])
            .arg(set.map_or("--nofile".to_string(), |n| format!("--nofile={n}:")))
            .args(["--output", "SOFT", "--noheadings"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_string()
    }

    /// Open descriptors, the least of a few samples: a lane scanning the spool holds a
    /// directory descriptor for a moment, a leak holds one for good.
    pub fn fd_count(&self) -> usize {
        self.fd_samples(5, Duration::from_millis(20))
            .into_iter()
            .min()
            .unwrap()
    }

    /// `n` counts of the open descriptors, each after `gap`.
    pub fn fd_samples(&self, n: usize, gap: Duration) -> Vec<usize> {
        (0..n)
            .map(|_| {
                std::thread::sleep(gap);
                fs::read_dir(format!("/proc/{}/fd", self.pid()))
                    .unwrap()
                    .count()
            })
            .collect()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A binary cargo built for the examples (cargo test builds them).
pub fn example(name: &str) -> PathBuf {
    let deps = std::env::current_exe().unwrap();
    let p = deps
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples")
        .join(name);
    assert!(
        p.exists(),
        "{} is not built (cargo test builds examples)",
        p.display()
    );
    p
}

/// Runs `cmd` with `input` on its standard input (any size: not through argv) and collects
/// its output.
pub fn output_with_stdin(cmd: &mut Command, input: &[u8]) -> Output {
    use std::io::Write;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A child that exits early (an error) closes its end: what it printed says why.
    let _ = child.stdin.take().unwrap().write_all(input);
    child.wait_with_output().unwrap()
}

/// Spawns, retrying briefly on ETXTBSY: a binary a test just copied can be held open for
/// writing by a fork another test thread made at that moment (until that child execs).
pub fn spawn(cmd: &mut Command) -> Child {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match cmd.spawn() {
            Ok(c) => return c,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("spawning {cmd:?}: {e}"),
        }
    }
}

/// Copies the gearshift binary `from` to `to`, and returns once it can be executed: a fork
/// another test thread makes during the copy holds the new file open for writing until that
/// child execs, and an exec meanwhile fails with ETXTBSY (`prlimit` running it exited 126, a
/// CI failure). One `--version` run through [`spawn`], which waits that out, proves no writer
/// is left: a fork made after the copy no longer has its descriptor to inherit.
pub fn copy_binary(from: &Path, to: &Path) {
    fs::copy(from, to).unwrap();
    let status = spawn(Command::new(to).arg("--version").stdout(Stdio::null()))
        .wait()
        .unwrap();
    assert!(status.success(), "{} --version: {status}", to.display());
}

pub fn wait_child(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Sends TERM, checks the worker is still finishing (a first TERM waits for running jobs), then
/// TERM again: it must be gone within 2 s, whatever it was doing.
pub fn second_term_ends_it(w: &mut Worker, state: &str) {
    w.signal(Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        w.child.try_wait().unwrap().is_none(),
        "{state}: the first TERM waits for the running job"
    );
    let sent = Instant::now();
    w.signal(Signal::SIGTERM);
    let status = w.wait_exit(Duration::from_secs(10));
    let took = sent.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "{state}: the second TERM took {took:?}\n{}",
        w.log_text()
    );
    // Jobs were interrupted: not a clean stop, and ended by the TERM itself (a forced stop, which
    // a supervisor or systemd does not take for a crash), not by a crash of its own.
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&status),
        Some(Signal::SIGTERM as i32),
        "{state}: {status:?}\n{}",
        w.log_text()
    );
}

/// The status document served on `socket`, or None while nothing answers there.
pub fn status_at(socket: &Path) -> Option<Value> {
    let mut c = UnixStream::connect(socket).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let _ = c.write_all(b"status\n");
    let mut s = Vec::new();
    match c.read_to_end(&mut s) {
        Ok(_) => {}
        // A worker that does not read requests resets the connection after its answer.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset && !s.is_empty() => {}
        Err(_) => return None,
    }
    serde_json::from_slice(&s).ok()
}

/// Whether `pid` runs: a zombie has exited (only its parent, often a slow init here, has yet
/// to reap it).
pub fn process_alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

/// Every thread of a process held by this test thread as a debugger holds it (`PTRACE_ATTACH`):
/// it acts on no signal but SIGKILL until let go, which dropping this does (and reaps the
/// threads' deaths the kernel reports to a tracer). Needs root (or `CAP_SYS_PTRACE`).
pub struct Traced(Vec<i32>);

impl Traced {
    /// Threads come and go (a status query is one): listed again until every thread there is
    /// held; one that ended before it was attached to is left out.
    pub fn attach(pid: i32) -> Traced {
        let (mut tids, mut tried): (Vec<i32>, Vec<i32>) = (Vec::new(), Vec::new());
        loop {
            let listed: Vec<i32> = fs::read_dir(format!("/proc/{pid}/task"))
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .filter(|tid| !tried.contains(tid))
                .collect();
            if listed.is_empty() {
                return Traced(tids);
            }
            tried.extend(&listed);
            for tid in listed {
                // SAFETY: PTRACE_ATTACH takes no pointers (addr and data are ignored).
                if unsafe { libc::ptrace(libc::PTRACE_ATTACH, tid, 0, 0) } != 0 {
                    let e = std::io::Error::last_os_error();
                    assert_eq!(
                        e.raw_os_error(),
                        Some(libc::ESRCH),
                        "attaching to {tid}: {e}"
                    );
                    continue;
                }
                let mut status = 0;
                // SAFETY: waits for the attach's stop of a thread this thread now traces;
                // `status` is a valid place for the result.
                unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
                tids.push(tid);
            }
        }
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        for &tid in &self.0 {
            // SAFETY: PTRACE_DETACH with signal 0 takes no pointers; it fails harmlessly for a
            // thread that is gone or not in a tracing stop.
            unsafe { libc::ptrace(libc::PTRACE_DETACH, tid, 0, 0) };
            let mut status = 0;
            // SAFETY: reaps what the kernel still reports to this tracer about `tid`, without
            // blocking; `status` is a valid place for the result.
            unsafe { libc::waitpid(tid, &mut status, libc::__WALL | libc::WNOHANG) };
        }
    }
}

/// A command's stdout and stderr, for an assertion's message.
pub fn text_of(out: &std::process::Output) -> String {
    format!(
        "stdout: {}\nstderr: {}",
        text(&out.stdout),
        text(&out.stderr)
    )
}

/// Whether a status document's `warnings` has one containing `needle`.
pub fn has_warning(s: &Value, needle: &str) -> bool {
    s["warnings"].as_array().is_some_and(|ws| {
        ws.iter()
            .any(|w| w.as_str().is_some_and(|w| w.contains(needle)))
    })
}

/// Polls `cond` until it holds or `limit` passes.
pub fn eventually(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The stored outcome of a job: Some((done?, result or error, attempts)) once finished.
pub fn outcome(spool: &gearshift::client::spool::Spool, id: &str) -> Option<(bool, String, u32)> {
    match spool.lookup(id).unwrap() {
        gearshift::client::spool::Lookup::Finished(r) => Some((
            r.outcome == gearshift::client::spool::Outcome::Done,
            r.error
                .unwrap_or_else(|| String::from_utf8_lossy(&r.result).into_owned()),
            r.attempts,
        )),
        _ => None,
    }
}

pub fn open_spool(sb: &Sandbox) -> gearshift::client::spool::Spool {
    gearshift::client::spool::Spool::open(&sb.path("spool"), false).unwrap()
}

/// Waits until every id has finished and returns their outcomes.
pub fn all_outcomes(sb: &Sandbox, ids: &[String], limit: Duration) -> Vec<(bool, String, u32)> {
    let spool = open_spool(sb);
    let deadline = Instant::now() + limit;
    ids.iter()
        .map(|id| loop {
            if let Some(o) = outcome(&spool, id) {
                break o;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} did not finish in {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        })
        .collect()
}

/// `text` (a config from [`Sandbox::config_text`]) with `keys` added to its [worker] section.
pub fn with_worker_keys(text: &str, keys: &str) -> String {
    text.replace("allow_root = true", &format!("allow_root = true\n{keys}"))
}

/// A real gearmand on a free loopback port, stopped (by pid, bounded) when dropped.
pub struct Gearmand {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Gearmand {
    /// Starts `gearmand` with extra arguments (e.g. `-j 1`), logging to `dir/gearmand-PORT.log`.
    pub fn start(dir: &Path, extra: &[&str]) -> Gearmand {
        let port = free_port();
        Gearmand::start_on(dir, port, extra)
    }

    pub fn start_on(dir: &Path, port: u16, extra: &[&str]) -> Gearmand {
        let log = dir.join(format!("gearmand-{port}.log"));
        let child = Command::new("gearmand")
            .args([
                "-L",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-l",
                "stderr",
                "-t",
                "2",
            ])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            )
            .spawn()
            .expect("gearmand is needed (apt-get install gearman-job-server)");
        let mut g = Gearmand { child, port, log };
        // Not "the port accepts": gearmand retries a port in use without a word, so another
        // process's listener would answer that. Its own listening socket must be there.
        eventually(Duration::from_secs(10), "gearmand to listen", || {
            if let Ok(Some(status)) = g.child.try_wait() {
                panic!(
                    "gearmand exited ({status}): {}",
                    fs::read_to_string(&g.log).unwrap_or_default()
                );
            }
            listens(g.child.id(), port)
        });
        g
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Stops it now (SIGKILL) and waits.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = wait_child(&mut self.child, Duration::from_secs(10));
    }
}

impl Drop for Gearmand {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        if wait_child(&mut self.child, Duration::from_secs(5)).is_none() {
            let _ = self.child.kill();
        }
    }
}

/// Whether process `pid` holds the socket listening on 127.0.0.1:`port` (from /proc/net/tcp and
/// the process's descriptors).
pub fn listens(pid: u32, port: u16) -> bool {
    let local = format!("0100007F:{port:04X}");
    let Ok(table) = fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() > 9 && f[1] == local && f[3] == "0A").then(|| format!("socket:[{}]", f[9]))
        })
        .collect();
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        fs::read_link(fd.path())
            .map(|l| inodes.iter().any(|i| l.as_os_str() == i.as_str()))
            .unwrap_or(false)
    })
}

/// Holds the lock files of the ports this test process took, so that another test process (a
/// second run, a CI clone beside a local run) skips them; the kernel drops the locks at exit.
static PORT_LOCKS: std::sync::Mutex<Vec<nix::fcntl::Flock<fs::File>>> =
    std::sync::Mutex::new(Vec::new());

/// Reserves `port` against other test processes: false if one holds it. Where the lock
/// directory cannot be made, the bind check alone decides.
fn reserve_port(port: u16) -> bool {
    use nix::fcntl::{Flock, FlockArg};
    let dir = std::env::temp_dir().join("gearshift-test-ports");
    let _ = fs::create_dir_all(&dir);
    let Ok(file) = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(port.to_string()))
    else {
        return true;
    };
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => {
            PORT_LOCKS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(lock);
            true
        }
        Err(_) => false,
    }
}

/// A loopback port nobody listens on. Not the kernel's next ephemeral port (bind to 0, close,
/// reuse: two tests of one process can be handed the same one): ports are taken in turn from a
/// range above the ephemeral ones (Linux: 32768-60999), starting where this process's id
/// points, each checked free by binding it and reserved against other test processes.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const LOW: u32 = 61_000;
    const SPAN: u32 = 4_000;
    let base = std::process::id() % SPAN;
    for _ in 0..SPAN {
        let port = (LOW + (base + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() && reserve_port(port) {
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..{}", LOW + SPAN);
}

impl Sandbox {
    /// Writes a config using the gearman source with `servers`.
    pub fn gearman_config(&self, servers: &[String], extra: &str) {
        let list = servers
            .iter()
            .map(|s| format!("\"{s}\""))
            .collect::<Vec<_>>()
            .join(", ");
        fs::write(
            self.config(),
            format!(
                "[worker]\nconcurrency = 2\njobs_dir = \"jobs\"\nstate_dir = \"state\"\nallow_root = true\nbuiltins = true\n\n\
                 [source]\nkind = \"gearman\"\nservers = [{list}]\n{extra}"
            ),
        )
        .unwrap();
    }
}

/// Kills whatever daemon the sandbox's pidfile names when the test ends, pass or fail, and its
/// supervisor first, if it has one (else the supervisor starts it again, and outlives the test).
/// Starts a second worker (`run`, a sandbox and `state_dir` of its own) on the spool at `spool`
/// and asserts that it is refused within 10 s, the spool held by pid `holder`. A second worker
/// that serves instead is ended when this returns.
pub fn a_second_worker_is_refused(spool: &Path, holder: i32) {
    let other = Sandbox::new("second-worker");
    let text = other
        .config_text("")
        .replace("dir = \"spool\"", &format!("dir = \"{}\"", spool.display()));
    fs::write(other.config(), text).unwrap();
    let log = other.path("worker.log");
    let mut second = spawn(
        other
            .cmd(&["run"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap()),
    );
    let _reaper = Reaper(other.path("state/gearshift.pid"));
    let ended = wait_child(&mut second, Duration::from_secs(10));
    let said = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        ended.is_some_and(|s| s.code() == Some(1)),
        "the second worker was not refused ({ended:?}):\n{said}"
    );
    let by = format!("is in use by another worker (its .lock is held, by pid {holder})");
    assert!(said.contains(&by), "{said}");
}

pub struct Reaper(pub PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        // Its supervisor first, found by its command line (`supervise -c` this sandbox's
        // config): by the worker's parent it was missed when the worker had died already (a
        // test that failed while its supervisor waited to start the next one).
        let config = self
            .0
            .parent()
            .and_then(Path::parent)
            .map(|d| d.join("config.toml"));
        if let (Some(config), Ok(procs)) = (config, fs::read_dir("/proc")) {
            let me = std::process::id() as i32;
            for pid in procs
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            {
                let Ok(c) = fs::read(format!("/proc/{pid}/cmdline")) else {
                    continue;
                };
                let args: Vec<&[u8]> = c.split(|&b| b == 0).collect();
                let ours = args.contains(&b"supervise".as_slice())
                    && args
                        .windows(2)
                        .any(|w| w[0] == b"-c" && w[1] == config.as_os_str().as_encoded_bytes());
                if ours && pid != me {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        if let Some(pid) = fs::read_to_string(&self.0)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// The CPU time (user + system, in clock ticks) process `pid` has used so far.
pub fn cpu_ticks(pid: i32) -> u64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// The CPU ticks process `pid` uses in 2 s, from 300 ms from now (a worker that should idle).
pub fn idle_ticks(w: &Worker) -> u64 {
    // Not before the start-up's background work is done: the binary's sha256 (a dozen ticks
    // for a debug build; on a loaded machine it ran into the window, and a CI run failed).
    // Without `watch_binary` it is never computed: then 30 s at most.
    let hashed = Instant::now() + Duration::from_secs(30);
    while Instant::now() < hashed
        && !w
            .try_status()
            .is_some_and(|s| s["binary_sha256"].is_string())
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    busy_ticks(w.pid())
}

/// CPU ticks `pid` uses in 2 s, after 0.3 s to settle (`idle_ticks` without its wait for the
/// start-up's digest: for a worker whose status cannot be asked, out of descriptors).
pub fn busy_ticks(pid: i32) -> u64 {
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    cpu_ticks(pid) - before
}

pub fn pid_of(sb: &Sandbox) -> i32 {
    fs::read_to_string(sb.path("state/gearshift.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Stdout or stderr as text.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Builds gearshift with `env` set at build time, its version suffixed with TARGET (a second
/// build for deploys, or a fault-injection build), in `target/variants`, and returns a copy of
/// it (`target/variants/gearshift-TARGET`).
pub fn build_variant(target: &str, env: (&str, &str)) -> PathBuf {
    use std::os::fd::AsRawFd;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // One target directory for every variant: their dependencies are built once (a variant
    // differs only in gearshift's own crate). Its output path is shared, so one build and copy
    // at a time, under a lock.
    let dir = root.join("target").join("variants");
    fs::create_dir_all(&dir).unwrap();
    let lock = fs::File::create(dir.join(".lock")).unwrap();
    // SAFETY: flock on a descriptor this function owns; released when `lock` is closed.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let copy = dir.join(format!("gearshift-{target}"));
    // Built since the binary under test was (cargo rebuilds that one whenever a source
    // changes, before any test runs): the same sources, no need to build it again. The
    // variants share one target directory, so building them in turn rebuilds each every time.
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(built), Some(main)) = (
        mtime(&copy),
        mtime(Path::new(env!("CARGO_BIN_EXE_gearshift"))),
    ) {
        if built > main {
            return copy;
        }
    }
    let out = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["build", "--quiet", "--bin", "gearshift", "--target-dir"])
        .arg(&dir)
        .env(env.0, env.1)
        .env("GEARSHIFT_VERSION_SUFFIX", target)
        .current_dir(root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building {target}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tmp = dir.join(format!(".gearshift-{target}.tmp"));
    copy_binary(&dir.join("debug/gearshift"), &tmp);
    fs::rename(&tmp, &copy).unwrap();
    drop(lock);
    copy
}

/// Where skipped tests are listed (`scripts/test` prints the list at the end of the run).
pub fn skip_list() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/skipped-tests.txt")
}

/// A test that cannot run here for want of `why` (a tool, namespaces). Under CI (`CI=true`)
/// that is a failure; elsewhere the skip is written to [`skip_list`] (the harness hides a
/// passing test's output, so `scripts/test` lists them at the end) and to stderr.
pub fn skip(test: &str, why: &str) {
    skip_to(
        &skip_list(),
        test,
        why,
        std::env::var("CI").is_ok_and(|v| v == "true"),
    );
}

/// [`skip`], with the list and CI decided by the caller.
pub fn skip_to(list: &Path, test: &str, why: &str, ci: bool) {
    if ci {
        panic!("{test}: cannot run: {why} (under CI=true a missing tool is a failure)");
    }
    use std::io::Write;
    let line = format!("{test}: {why}\n");
    if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(list) {
        let _ = f.write_all(line.as_bytes());
    }
    eprint!("skipped: {line}");
}

/// A name server that takes every question and answers none (one cut off), and a resolv.conf
/// naming it with a 20 s timeout, for a worker started in a mount namespace of its own
/// ([`DeafResolver::OUTER`], [`DeafResolver::prefix`]); the rest of the machine keeps its own.
/// Needs root (port 53, the bind mount).
pub struct DeafResolver {
    _socket: std::net::UdpSocket,
    conf: PathBuf,
}

impl DeafResolver {
    /// `ip`: a loopback address of its own (127.0.0.2, ...), one per test that may run at once.
    pub fn new(sb: &Sandbox, ip: &str) -> DeafResolver {
        let socket = std::net::UdpSocket::bind((ip, 53)).unwrap();
        let conf = sb.path("resolv.conf");
        fs::write(
            &conf,
            format!("nameserver {ip}\noptions timeout:20 attempts:1\n"),
        )
        .unwrap();
        DeafResolver {
            _socket: socket,
            conf,
        }
    }

    /// What runs the worker: in a mount namespace of its own.
    pub const OUTER: [&'static str; 2] = ["unshare", "-m"];

    /// The shell line before the worker's exec: this resolver in its namespace.
    pub fn prefix(&self) -> String {
        format!("mount --bind {} /etc/resolv.conf", self.conf.display())
    }

    /// Runs the CLI command `args` of `sb` with this resolver (bounded: 60 s); its output and
    /// how long it took.
    pub fn cli(&self, sb: &Sandbox, args: &[&str]) -> (Output, Duration) {
        let started = Instant::now();
        let mut c = Command::new(Self::OUTER[0]);
        c.args(&Self::OUTER[1..])
            .args([
                "sh",
                "-c",
                &format!("{}; exec \"$0\" \"$@\"", self.prefix()),
            ])
            .arg(&sb.bin)
            .arg("-c")
            .arg(sb.config())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = spawn(&mut c);
        let pid = child.id() as i32;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait_with_output());
        });
        let out = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                panic!("CLI command {args:?} under a deaf resolver did not end in 60 s");
            });
        (out.unwrap(), started.elapsed())
    }
}

impl Worker {
    /// Sends `sig` (HUP: the next generation must serve; TERM: the worker must exit cleanly)
    /// and asserts that it was acted on within `bound`.
    pub fn acts_at_once(&mut self, sig: Signal, bound: Duration) {
        let sent = Instant::now();
        let next = (sig == Signal::SIGHUP).then(|| self.generation() + 1);
        self.signal(sig);
        match next {
            Some(g) => {
                self.wait_generation(g);
            }
            None => assert!(
                self.wait_exit(Duration::from_secs(30)).success(),
                "{}",
                self.log_text()
            ),
        }
        assert!(sent.elapsed() < bound, "{sig:?} took {:?}", sent.elapsed());
    }
}

/// Starts `gearshift run` again each time it dies (by a signal: a job that ends it), until
/// `settled` holds of the living worker (each start given 30 s); `first`: a worker already
/// started. Returns that worker and how many times it died, which must stay within `deaths`.
pub fn restart_until(
    sb: &Sandbox,
    mut first: Option<Worker>,
    deaths: usize,
    settled: impl Fn(&Worker) -> bool,
) -> (Worker, usize) {
    let mut died = 0;
    loop {
        let mut w = first.take().unwrap_or_else(|| sb.start_under(&[], "true"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = w.child.try_wait().unwrap() {
                assert!(!st.success(), "{st}");
                died += 1;
                assert!(
                    died <= deaths,
                    "ended the worker {died} times:\n{}",
                    w.log_text()
                );
                break;
            }
            if settled(&w) {
                return (w, died);
            }
            assert!(
                Instant::now() < deadline,
                "neither died nor settled:\n{}",
                w.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A shared library that moves the wall clock (CLOCK_REALTIME) of the process that preloads it
/// by the seconds written in the file `GS_TEST_CLOCK_FILE` names, read at every call: a clock
/// step (NTP, a VM resumed, an operator's `date -s`) in one process, the monotonic clock left
/// alone as a real step leaves it. Built with the system's C compiler (cargo links with it).
fn wall_clock_shim(sb: &Sandbox) -> std::path::PathBuf {
    let src = sb.path("clockshift.c");
    fs::write(
        &src,
        r#"#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>
static long shift(void) {
    const char *p = getenv("GS_TEST_CLOCK_FILE");
    char buf[32] = {0};
    int fd = p ? open(p, O_RDONLY | O_CLOEXEC) : -1;
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    return n > 0 ? strtol(buf, 0, 10) : 0;
}
int clock_gettime(clockid_t id, struct timespec *ts) {
    static int (*real)(clockid_t, struct timespec *);
    if (!real) real = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    int r = real(id, ts);
    if (r == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE)) ts->tv_sec += shift();
    return r;
}
"#,
    )
    .unwrap();
    let lib = sb.path("clockshift.so");
    let out = Command::new("cc")
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&lib)
        .arg(&src)
        .arg("-ldl")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text_of(&out));
    lib
}

/// Starts a worker of `sb` whose wall clock is stepped by the seconds written into the file
/// returned (0 at first), through [`wall_clock_shim`].
pub fn start_with_shifted_clock(sb: &Sandbox) -> (Worker, PathBuf) {
    let lib = wall_clock_shim(sb);
    let shift = sb.path("clock-shift");
    fs::write(&shift, "0").unwrap();
    let w = sb.start_env(&[
        ("LD_PRELOAD", lib.to_str().unwrap()),
        ("GS_TEST_CLOCK_FILE", shift.to_str().unwrap()),
    ]);
    (w, shift)
}

/// The sha256 of `bytes` in lower-case hex, as `status` shows digests.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
