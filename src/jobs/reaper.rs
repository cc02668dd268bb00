//! Job processes must not outlive their job, nor their worker.
//!
//! Three mechanisms, each for a way a process escapes:
//! - The job's leader gets `PR_SET_PDEATHSIG(SIGKILL)` (set in the child before exec, see
//!   `executable.rs`): if the worker dies (even by `kill -9`), the leader dies with it.
//! - The worker is a child subreaper (`PR_SET_CHILD_SUBREAPER`, kept across execve): whatever a
//!   job leaves behind, in its process group or in a session of its own (`setsid`), becomes the
//!   worker's child when its parent exits. A sweep after every job (and while strays remain)
//!   kills each stray whose `GEARSHIFT_JOB_ID` names a job that is no longer running (a stray
//!   whose environment was cleared, once no job runs at all), and reaps the dead.
//! - Every job process carries `GEARSHIFT_WORKER=<state_dir>`. A fresh start, holding the
//!   pidfile lock (so no other worker of that state_dir lives), kills every process of its user
//!   that still carries it: what a killed predecessor left running. So a job never runs twice at
//!   once because the worker was restarted.
//!
//! Children the worker spawns are registered under one lock together with their spawn
//! ([`spawn`]), so a sweep never mistakes a job leader, or a deploy's pre-flight, for a stray,
//! and never reaps one that its owner will wait for.
//!
//! What this cannot catch: a process that both leaves the job's process tree before its parent
//! exits *and* clears its environment. systemd's `KillMode=control-group` (a cgroup per
//! service) catches everything; see README.

use std::collections::HashSet;
use std::io;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crossbeam_channel::{after, bounded, never, select, Receiver, Sender};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag};
use nix::unistd::Pid;

/// Names the worker (its `state_dir`) in every job process's environment.
pub const ENV_WORKER: &str = "GEARSHIFT_WORKER";
/// Names the job in its processes' environment.
pub const ENV_JOB: &str = "GEARSHIFT_JOB_ID";

/// A fault-injection build (tests only): the sweeper panics at its next sweep.
#[cfg(gearshift_faults)]
pub static PANIC_NEXT_SWEEP: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Pids of the children this process spawned itself and will wait for.
static TRACKED: Mutex<Option<HashSet<i32>>> = Mutex::new(None);

/// Spawns `cmd`, registering the child before any sweep can look at it.
pub fn spawn(cmd: &mut Command) -> io::Result<Child> {
    let mut tracked = TRACKED.lock().unwrap_or_else(|p| p.into_inner());
    let child = cmd.spawn()?;
    tracked
        .get_or_insert_with(HashSet::new)
        .insert(child.id() as i32);
    Ok(child)
}

/// Forgets a child spawned with [`spawn`] once its owner has waited for it.
pub fn forget(pid: u32) {
    let mut tracked = TRACKED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(t) = tracked.as_mut() {
        t.remove(&(pid as i32));
    }
}

/// Makes this process the reaper of orphans among its descendants (kept across execve).
pub fn become_subreaper() {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes plain integers and touches no memory.
    let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if r != 0 {
        log::warn!(
            "cannot become a child subreaper ({}): processes a job leaves behind may outlive it",
            io::Error::last_os_error()
        );
    }
}

/// The sweeper: reaps and kills strays after every job, and while strays remain.
pub struct Reaper {
    tx: Sender<()>,
    rx: Option<Receiver<()>>,
}

impl Reaper {
    /// The sweeper's channel, without its thread yet: lanes may report job ends (they wait in
    /// the channel) before [`Reaper::start`] runs, so a restarted generation's lanes need not
    /// wait for this thread.
    pub fn new() -> Reaper {
        let (tx, rx) = bounded::<()>(64);
        Reaper { tx, rx: Some(rx) }
    }

    /// Starts the sweeper thread, once (spawned with the handled signals blocked, like every
    /// helper). `running` names the jobs running now (their processes are not strays).
    pub fn start(
        &mut self,
        running: impl Fn() -> Vec<String> + Send + 'static,
    ) -> crate::Result<()> {
        let Some(rx) = self.rx.take() else {
            return Ok(());
        };
        crate::ops::signals::spawn_essential("reaper", move || sweeper(&rx, &running))
            .map_err(|e| crate::Error::io("spawning the reaper thread", e))?;
        Ok(())
    }

    /// A handle for lanes to say "a job ended".
    pub fn handle(&self) -> JobEnded {
        JobEnded(self.tx.clone())
    }
}

/// Tells the sweeper that a job ended (its strays are now fair game).
#[derive(Clone)]
pub struct JobEnded(Sender<()>);

impl JobEnded {
    pub fn notify(&self) {
        let _ = self.0.try_send(());
    }
}

/// The grid follow-up looks are put on: at most one sweep per this, however many jobs end.
const COALESCE: Duration = Duration::from_millis(50);

fn sweeper(rx: &Receiver<()>, running: &dyn Fn() -> Vec<String>) {
    // After a job ends, its group's members die and their children are re-parented to us a
    // moment later: look again a few times.
    const FOLLOW_UPS: [Duration; 4] = [
        Duration::ZERO,
        Duration::from_millis(100),
        Duration::from_millis(500),
        Duration::from_secs(2),
    ];
    let epoch = Instant::now();
    let mut due: Vec<Instant> = Vec::new();
    let mut strays = false;
    loop {
        let next = due.iter().min().copied();
        let timer = match (next, strays) {
            (Some(t), _) => after(t.saturating_duration_since(Instant::now())),
            (None, true) => after(Duration::from_secs(1)),
            (None, false) => never(),
        };
        select! {
            recv(rx) -> msg => {
                if msg.is_err() {
                    return;
                }

                // Each look is put off to the next tick of a COALESCE grid, where one look
                // serves every job that ended in that tick: jobs ending in a stream make at
                // most one sweep per tick, not four per job (each sweep lists /proc).
                let since = epoch.elapsed();
                for d in FOLLOW_UPS {
                    let ticks = (since + d).as_nanos().div_ceil(COALESCE.as_nanos());
                    let t = u32::try_from(ticks)
                        .ok()
                        .and_then(|n| epoch.checked_add(COALESCE * n))
                        .unwrap_or(epoch + since + d);
                    if !due.contains(&t) {
                        due.push(t);
                    }
                }
            }
            recv(timer) -> _ => {
                #[cfg(gearshift_faults)]
                if PANIC_NEXT_SWEEP.swap(false, std::sync::atomic::Ordering::AcqRel) {
                    panic!("injected reaper panic");
                }
                let now = Instant::now();
                due.retain(|t| *t > now);
                strays = sweep(running);
            }
        }
    }
}

/// One sweep; true if strays are still alive.
fn sweep(running: &dyn Fn() -> Vec<String>) -> bool {
    let running = running();
    let me = std::process::id() as i32;
    // Held for the whole sweep: a child spawned meanwhile is registered before we can see it.
    let tracked = TRACKED.lock().unwrap_or_else(|p| p.into_inner());
    let mut alive = false;
    for (pid, stat) in crate::ops::procfs::children_of(me) {
        let zombie = stat.state == 'Z';
        if tracked.as_ref().is_some_and(|t| t.contains(&pid)) {
            continue;
        }
        if zombie {
            let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
            continue;
        }
        let job = env_var(pid, ENV_JOB);
        let stale = match &job {
            Some(id) => !running.iter().any(|r| r == id),
            None => running.is_empty(),
        };
        if stale {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            log::info!(
                "killed pid {pid}, left behind by {}",
                job.map_or_else(|| "a job".to_string(), |j| format!("job {j}"))
            );
        }
        alive = true;
    }
    alive
}

/// At a fresh start: kills every process that still carries `GEARSHIFT_WORKER=<key>`, left by a
/// predecessor that was killed, and waits (up to a second) until they are gone.
pub fn kill_leftovers(key: &Path) {
    let me = std::process::id() as i32;
    let want = key.as_os_str().as_encoded_bytes();
    let mut killed = Vec::new();
    for pid in crate::ops::procfs::pids() {
        if pid == me {
            continue;
        }
        if crate::ops::procfs::env_var(pid, ENV_WORKER).as_deref() == Some(want) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            killed.push(pid);
        }
    }
    if killed.is_empty() {
        return;
    }
    log::warn!(
        "killed {} process(es) a previous run of this worker left behind: {killed:?}",
        killed.len()
    );
    let deadline = Instant::now() + Duration::from_secs(1);
    while killed.iter().any(|p| crate::ops::procfs::Stat::alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn env_var(pid: i32, key: &str) -> Option<String> {
    crate::ops::procfs::env_var(pid, key).map(|v| String::from_utf8_lossy(&v).into_owned())
}
