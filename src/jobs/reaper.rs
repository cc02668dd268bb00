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
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
    tx: Sender<Event>,
    rx: Option<Receiver<Event>>,
    /// The sweeper looks for zombies every [`REAP_EVERY`] (so a job start need not say so).
    ticking: Arc<AtomicBool>,
}

impl Reaper {
    /// The sweeper's channel, without its thread yet: lanes may report job ends (they wait in
    /// the channel) before [`Reaper::start`] runs, so a restarted generation's lanes need not
    /// wait for this thread.
    pub fn new() -> Reaper {
        let (tx, rx) = bounded::<Event>(64);
        Reaper {
            tx,
            rx: Some(rx),
            ticking: Arc::default(),
        }
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
        let ticking = Arc::clone(&self.ticking);
        crate::ops::signals::spawn_essential("reaper", move || sweeper(&rx, &running, &ticking))
            .map_err(|e| crate::Error::io("spawning the reaper thread", e))?;
        Ok(())
    }

    /// A handle for lanes to say "a job started" and "a job ended".
    pub fn handle(&self) -> JobEvents {
        JobEvents(self.tx.clone(), Arc::clone(&self.ticking))
    }
}

/// What the sweeper hears of.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Event {
    /// A job process started: its leftovers that exit are reaped while it runs.
    Started,
    /// A job ended: its strays are now fair game.
    Ended,
}

/// Tells the sweeper that a job started or ended.
#[derive(Clone)]
pub struct JobEvents(Sender<Event>, Arc<AtomicBool>);

impl JobEvents {
    pub fn notify(&self) {
        let _ = self.0.try_send(Event::Ended);
    }

    /// Said only when the sweeper is not looking for zombies already (no wake-up per job).
    pub fn started(&self) {
        if !self.1.swap(true, Ordering::AcqRel) {
            let _ = self.0.try_send(Event::Started);
        }
    }
}

/// The grid follow-up looks are put on: at most one sweep per this, however many jobs end.
const COALESCE: Duration = Duration::from_millis(50);

/// While jobs run, the zombies they leave are reaped this often (a look at our threads'
/// children, nothing when there are none): a job that goes on leaving exited children behind
/// holds at most what it leaves in this time.
const REAP_EVERY: Duration = Duration::from_millis(200);

fn sweeper(rx: &Receiver<Event>, running: &dyn Fn() -> Vec<String>, ticking: &AtomicBool) {
    // After a job ends, its group's members die and their children are re-parented to us a
    // moment later: look again a few times.
    const FOLLOW_UPS: [Duration; 4] = [
        Duration::ZERO,
        Duration::from_millis(100),
        Duration::from_millis(500),
        Duration::from_secs(2),
    ];
    let epoch = Instant::now();
    // A look at the start: what jobs of the image before left (a stray that had not died when
    // it exec'd, a killed job's process that could not die yet) is this image's to sweep.
    let mut due: Vec<Instant> = vec![epoch + COALESCE];
    // Strays still alive after a sweep: swept again a second later.
    let mut strays: Option<Instant> = None;
    // While jobs run: the next look for zombies only.
    let mut reap: Option<Instant> = None;
    // The strays killed and said so: one that does not die at once (in a wait the kernel does
    // not interrupt) is killed again at every sweep, and said once.
    let mut told = HashSet::new();
    loop {
        let timer = match due.iter().chain(&strays).chain(&reap).min() {
            Some(t) => after(t.saturating_duration_since(Instant::now())),
            None => never(),
        };
        select! {
            recv(rx) -> msg => {
                match msg {
                    Err(_) => return,
                    Ok(Event::Started) => {
                        reap.get_or_insert_with(|| Instant::now() + REAP_EVERY);
                        continue;
                    }
                    Ok(Event::Ended) => {}
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
                let passed = |t: &Instant| *t <= now;
                if due.iter().any(passed) || strays.as_ref().is_some_and(passed) {
                    due.retain(|t| *t > now);
                    strays = sweep(running, &mut told).then(|| now + Duration::from_secs(1));
                } else {
                    reap_zombies();
                }
                if reap.as_ref().is_some_and(passed) {
                    // Cleared first: a job starting meanwhile says so, or is in `running`.
                    ticking.store(false, Ordering::Release);
                    reap = (!running().is_empty()).then(|| {
                        ticking.store(true, Ordering::Release);
                        now + REAP_EVERY
                    });
                }
            }
        }
    }
}

/// A zombie we may reap: not a child someone waits for ([`spawn`]), nor one of the worker's
/// own session (a process a Rust function started, which its function waits for): what a job
/// left is in the job's session or one of its own, never in the worker's.
fn unclaimed_zombie(pid: i32, stat: &crate::ops::procfs::Stat, tracked: &HashSet<i32>) -> bool {
    stat.state == 'Z' && !tracked.contains(&pid) && own_session().is_some_and(|s| s != stat.session)
}

/// The worker's session, asked once per image (it is set before any job runs: `start` makes
/// it, `run` inherits it).
fn own_session() -> Option<i32> {
    static OWN: std::sync::OnceLock<Option<i32>> = std::sync::OnceLock::new();
    *OWN.get_or_init(|| nix::unistd::getsid(None).ok().map(|s| s.as_raw()))
}

/// Reaps the zombies jobs left (see [`unclaimed_zombie`]), killing nothing.
fn reap_zombies() {
    let me = std::process::id() as i32;
    let tracked = TRACKED.lock().unwrap_or_else(|p| p.into_inner());
    let none = HashSet::new();
    for (pid, stat) in crate::ops::procfs::children_of(me) {
        if unclaimed_zombie(pid, &stat, tracked.as_ref().unwrap_or(&none)) {
            let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
        }
    }
}

/// One sweep; true if strays are still alive. `told`: the strays already said to be killed
/// (kept to those still alive).
fn sweep(running: &dyn Fn() -> Vec<String>, told: &mut HashSet<i32>) -> bool {
    let running = running();
    let me = std::process::id() as i32;
    // Held for the whole sweep: a child spawned meanwhile is registered before we can see it.
    let tracked = TRACKED.lock().unwrap_or_else(|p| p.into_inner());
    let mut alive = false;
    let none = HashSet::new();
    let mut still = HashSet::new();
    for (pid, stat) in crate::ops::procfs::children_of(me) {
        if tracked.as_ref().is_some_and(|t| t.contains(&pid)) {
            continue;
        }
        if stat.state == 'Z' {
            if unclaimed_zombie(pid, &stat, tracked.as_ref().unwrap_or(&none)) {
                let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
            }
            continue;
        }
        let job = env_var(pid, ENV_JOB);
        let stale = match &job {
            Some(id) => !running.iter().any(|r| r == id),
            None => running.is_empty(),
        };
        if stale {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            if !told.contains(&pid) {
                log::info!(
                    "killed pid {pid}, left behind by {}",
                    job.map_or_else(|| "a job".to_string(), |j| format!("job {j}"))
                );
            }
            still.insert(pid);
        }
        alive = true;
    }
    *told = still;
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;

    fn zombie(child: &Child) {
        let pid = child.id() as i32;
        let until = Instant::now() + Duration::from_secs(10);
        while crate::ops::procfs::Stat::of(Some(pid)).is_some_and(|s| s.state != 'Z') {
            assert!(Instant::now() < until, "pid {pid} never exited");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A zombie of the worker's own session (a process a Rust function started) is left to
    /// whoever started it; one in a session of its own (what a job leaves) is reaped.
    #[test]
    fn only_what_jobs_leave_is_reaped() {
        let mut own = Command::new("true").spawn().unwrap();
        let mut apart = Command::new("true");
        // SAFETY: setsid is async-signal-safe; the closure allocates nothing.
        unsafe {
            apart.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let mut apart = apart.spawn().unwrap();
        zombie(&own);
        zombie(&apart);
        reap_zombies();
        assert!(
            own.wait().unwrap().success(),
            "its owner still waits for it"
        );
        assert!(apart.wait().is_err(), "reaped already");
    }
}
