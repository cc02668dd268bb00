//! Signals: handlers only forward; the worker loop decides, between jobs.
//!
//! Signal state survives execve: the blocked mask and pending signals are kept while handlers
//! fall back to their default actions, and SIGHUP's default kills. So the self re-exec blocks
//! every signal we handle just before execve (`sigstate::block`); the new image installs its
//! handlers first ([`Signals::install`]) and only then unblocks. A HUP sent during the exec is held
//! pending and delivered once it is safe: it simply asks for one more reload. A signal a
//! handler took before the mask was set, still waiting in the forwarding thread or the control
//! loop's queue, is raised again before the exec ([`carry_unacted`]) to wait the same way.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
use signal_hook::iterator::Signals as Iter;

use crate::error::{Error, Result};
use crate::ops::hook::Hook;
use crate::ops::sigstate::{handled_set, HANDLED};

/// The installed handlers and the thread forwarding them to the worker loop.
pub struct Signals {
    // The forwarding thread lives as long as the image; execve ends it.
    _thread: JoinHandle<()>,
}

/// The handlers installed and their descriptors taken, not yet forwarded (see
/// [`Installed::forward`]): a restarted generation takes every descriptor before its lanes.
pub struct Installed(Iter);

impl Signals {
    /// Installs handlers for [`HANDLED`]. Call with the signals blocked ([`crate::ops::sigstate::block`]), start
    /// forwarding ([`Installed::forward`]) and then clear the mask ([`crate::ops::sigstate::clear_mask`]): what
    /// arrived meanwhile stays pending until then, and reaches the handlers.
    pub fn install() -> Result<Installed> {
        for (sig, flag) in UNACTED.iter() {
            signal_hook::flag::register(*sig as i32, Arc::clone(flag))
                .map_err(|e| Error::io("installing signal handlers", e))?;
        }
        let raw: Vec<i32> = HANDLED.iter().map(|s| *s as i32).collect();
        Iter::new(&raw)
            .map(Installed)
            .map_err(|e| Error::io("installing signal handlers", e))
    }
}

/// What became of a signal handed to the control loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Taken: the control loop will act on it.
    Taken,
    /// No room for it yet (the control loop is behind): it is held and offered again.
    Full,
    /// Nobody listens any more.
    Gone,
}

impl Installed {
    /// Forwards each delivery to `deliver`, on a thread of its own. A signal the control loop
    /// has no room for is held (a HUP, USR1 or USR2 already held is not held twice) and offered
    /// again, never dropped, while the thread goes on counting what arrives. A second TERM,
    /// INT or QUIT that the control thread has not acted on within [`FORCED_AFTER`] (it is
    /// wedged, or could not be reached) ends the process from here ([`forced_exit`]).
    pub fn forward(self, deliver: impl Fn(Signal) -> Delivery + Send + 'static) -> Result<Signals> {
        let mut iter = self.0;
        let thread = spawn_essential("signals", move || {
            let mut held: Vec<Signal> = Vec::new();
            let (mut stops, mut last_stop) = (0u32, Signal::SIGTERM);
            loop {
                let arrived: Vec<i32> = if held.is_empty() {
                    iter.wait().collect()
                } else {
                    iter.pending().collect()
                };
                for raw in arrived {
                    let Ok(sig) = Signal::try_from(raw) else {
                        continue;
                    };
                    let stop = is_stop(sig);
                    if stop {
                        (stops, last_stop) = (stops + 1, sig);
                    }
                    if stop || !held.contains(&sig) {
                        held.push(sig);
                    }
                }
                while let Some(&sig) = held.first() {
                    match deliver(sig) {
                        Delivery::Taken => {
                            held.remove(0);
                        }
                        Delivery::Full => break,
                        Delivery::Gone => return,
                    }
                }
                if stops >= 2 {
                    // The control thread exits at once on the second; still here after this,
                    // it never will.
                    std::thread::sleep(FORCED_AFTER);
                    forced_exit(last_stop);
                }
            }
        })
        .map_err(|e| Error::io("spawning signal thread", e))?;
        Ok(Signals { _thread: thread })
    }
}

/// How long the control thread has to act on a second TERM, INT or QUIT (it exits at once on
/// one) before the signal thread ends the process itself: within the 2 s an operator is owed.
pub const FORCED_AFTER: Duration = Duration::from_millis(1200);

/// What to do before a forced exit (kill the job processes; set by the control loop).
static ON_FORCED_EXIT: Hook<()> = Hook::new();

/// Runs `before` when the signal thread ends the process itself (see [`Installed::forward`]).
pub fn on_forced_exit(before: impl Fn() + Send + 'static) {
    ON_FORCED_EXIT.set(move |()| before());
}

/// Ends the process from the signal thread, as the control thread would have on the second
/// stop signal: the hook (the job processes killed), a last word in the log, the end by that
/// signal ([`die_by`]). The log line is written by a thread of its own, waited for at most
/// [`LAST_WORD`]: a writer stuck on a full pipe or a stalled disk (maybe what wedged the
/// control thread) must not keep the process alive. No exit handlers or destructors run: the
/// wedged thread may hold locks they would wait for.
fn forced_exit(sig: Signal) -> ! {
    ON_FORCED_EXIT.call(());
    let (said, heard) = std::sync::mpsc::channel();
    let spoke = spawn_helper("forced-exit", move || {
        log::error!(
            "{} again, and the control thread did not act on the second within {} ms (it is wedged): exiting from the signal thread; interrupted jobs will run again",
            sig.as_str(),
            FORCED_AFTER.as_millis()
        );
        log::logger().flush();
        let _ = said.send(());
    });
    if spoke.is_ok() {
        let _ = heard.recv_timeout(LAST_WORD);
    }
    die_by(sig)
}

/// Ends the process by the stop signal it was sent a second time, once what a forced stop
/// owes is done: a shell then shows 143 (130 for Ctrl-C), and a supervisor or systemd's
/// `Restart=on-failure` takes the death for the stop an operator asked for, where an exit 1
/// looked like a crash and the worker was started again, to run its interrupted jobs at once.
/// SIGQUIT's default action dumps core, so a forced stop by QUIT ends by TERM. If the signal
/// does not end the process (it cannot happen), it exits 1 as before.
pub fn die_by(sig: Signal) -> ! {
    let sig = if sig == Signal::SIGQUIT {
        Signal::SIGTERM
    } else {
        sig
    };
    let default = nix::sys::signal::SigAction::new(
        nix::sys::signal::SigHandler::SigDfl,
        nix::sys::signal::SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: installs the default disposition, which runs no code of ours, replacing the
    // forwarding handler on the way out of the process.
    let _ = unsafe { nix::sys::signal::sigaction(sig, &default) };
    let mut set = SigSet::empty();
    set.add(sig);
    let _ = pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&set), None);
    // A signal raised by and unblocked in this thread is delivered before raise returns.
    let _ = nix::sys::signal::raise(sig);
    // SAFETY: _exit ends the process at once; it takes no pointers and never returns.
    unsafe { libc::_exit(1) }
}

/// How long a re-exec'd generation has to serve before SIGALRM ends it (its default action:
/// the process dies): a new image that hangs in its start-up (a deadlocked new binary, a hung
/// mount) must not wedge the worker for good; its supervisor (or systemd) starts it afresh,
/// and after a deploy the marker rolls it back. Longer than a start-up may wait for threads
/// ([`PATIENCE`]).
pub const SERVE_WITHIN: Duration = Duration::from_secs(120);

/// Arms the alarm of [`SERVE_WITHIN`], first thing in a re-exec'd image. The image it guards
/// arms it (alarms cross execve): the one before cannot know whether the next disarms it.
pub fn arm_serve_alarm() {
    #[allow(unused_mut)]
    let mut secs = SERVE_WITHIN.as_secs() as u32;
    // A fault-injection build (tests only): a shorter alarm.
    #[cfg(gearshift_faults)]
    if let Some(s) = std::env::var("GEARSHIFT_FAULT_SERVE_ALARM_S")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        secs = s;
    }
    let _ = nix::unistd::alarm::set(secs);
}

/// An armed serve alarm ([`arm_serve_alarm`]) is given at least `wait` more than the alarm's
/// own time: a bounded wait under way (threads refused for now) is no hang. Not armed (a fresh
/// start, or serving): nothing is armed.
fn push_back_serve_alarm(wait: Duration) {
    if let Some(left) = nix::unistd::alarm::cancel() {
        let wanted = (wait + SERVE_WITHIN).as_secs().min(u64::from(u32::MAX)) as u32;
        let _ = nix::unistd::alarm::set(left.max(wanted));
    }
}

/// How long a forced exit waits for its log line at most.
const LAST_WORD: Duration = Duration::from_millis(250);

/// Spawns a helper thread that never takes a handled signal, whatever the caller's mask: the
/// handled signals are blocked around the spawn (the new thread inherits that mask) and the
/// caller's mask is restored. Every thread but the main one (helpers and lanes) is spawned
/// through this, so "only the main thread takes a signal" holds by construction, also for
/// threads spawned while serving.
pub fn spawn_helper<F, T>(name: &str, f: F) -> std::io::Result<std::thread::JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    // A fault-injection build (tests only): threads of `name` cannot be had (EAGAIN) while
    // the file GEARSHIFT_FAULT_NO_THREAD names exists (its name then "NAME:PATH").
    #[cfg(gearshift_faults)]
    crate::ops::faults::no_thread(name)?;
    let mut old = SigSet::empty();
    let blocked =
        pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&handled_set()), Some(&mut old)).is_ok();
    let spawned = std::thread::Builder::new().name(name.into()).spawn(f);
    if blocked {
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    }
    spawned
}

/// Called with a thread's name when an essential helper dies (set by the control loop).
static ON_DEATH: Hook<String> = Hook::new();

/// Tells `report` about every essential helper that dies from now on (the control loop then
/// replaces the generation).
pub fn on_thread_death(report: impl Fn(&str) + Send + 'static) {
    ON_DEATH.set(move |name: String| report(&name));
}

/// Reports its thread's death when dropped by a panic's unwinding.
struct Watchdog(String);

impl Drop for Watchdog {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // The panic itself is in the log already (the panic hook).
            ON_DEATH.call(self.0.clone());
        }
    }
}

/// [`spawn_helper`] for a thread the worker cannot do without (signals, watch, status, metrics,
/// reaper, queue poll): if it dies by a panic, the control loop hears of it
/// ([`on_thread_death`]) and replaces the generation, or exits for the supervisor. While a
/// generation starts, a thread that cannot be had for now is waited for ([`spawn_starting`]).
pub fn spawn_essential<F>(name: &str, f: F) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let watchdog = Watchdog(name.to_string());
    spawn_starting(name, move || {
        let _watchdog = watchdog;
        f()
    })
}

/// Set until the generation's control loop runs ([`started`]).
static STARTING: AtomicBool = AtomicBool::new(true);

/// How long a starting generation waits for threads at most.
const PATIENCE: Duration = Duration::from_secs(60);

/// The generation has started: from now on a thread that cannot be had is an error at once
/// (the caller tries again in its own time), never a wait.
pub fn started() {
    STARTING.store(false, Ordering::Release);
    // Serving: a re-exec'd generation's alarm ([`arm_serve_alarm`]) is done with.
    let _ = nix::unistd::alarm::cancel();
}

/// The generation starts its lanes again (its restart was refused, its exec failed, or they
/// all ended): their threads are waited for as a starting generation's are, until [`started`].
pub fn starting_again() {
    STARTING.store(true, Ordering::Release);
}

/// [`spawn_helper`]; while the generation starts, a thread refused for now (`EAGAIN`: the
/// user's processes or the system's threads used up, say by a job's fork bomb, or what is left
/// of one being reaped) is tried again, up to [`PATIENCE`] and until a TERM or INT is asked,
/// instead of failing the start and leaving no worker. Said once.
pub fn spawn_starting<F>(name: &str, f: F) -> std::io::Result<std::thread::JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    // Each try gets the closure through this, so a failed spawn (which drops what it was given)
    // leaves it here for the next.
    let carrier = Arc::new(Mutex::new(Some(f)));
    let deadline = Instant::now() + PATIENCE;
    let mut pause = Duration::from_millis(10);
    let mut said = false;
    loop {
        let mine = Arc::clone(&carrier);
        let spawned = spawn_helper(name, move || {
            let f = mine.lock().ok().and_then(|mut f| f.take());
            if let Some(f) = f {
                f();
            }
        });
        match spawned {
            Err(e)
                if e.raw_os_error() == Some(libc::EAGAIN)
                    && STARTING.load(Ordering::Acquire)
                    && Instant::now() < deadline
                    && !stop_asked() =>
            {
                if !said {
                    log::warn!(
                        "cannot start the {name} thread now ({e}: the worker's user out of processes?); trying again for up to {} s",
                        PATIENCE.as_secs()
                    );
                    said = true;
                }
                // A bounded wait, said: no hang for the serve alarm to end.
                push_back_serve_alarm(deadline.saturating_duration_since(Instant::now()));
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(200));
            }
            other => {
                if said && other.is_ok() {
                    log::info!("the {name} thread started");
                }
                return other;
            }
        }
    }
}

/// One flag for each handled signal, set by the handler itself at every delivery, before
/// the signal thread or the control loop hear of it: what a handler took is known to be taken
/// even while it waits in the signal thread or the control loop's queue, both of which an exec
/// drops. The control loop clears a flag as it acts on the signal ([`acting_on`]); a stop's
/// stays set (a stop is never taken back).
static UNACTED: LazyLock<[(Signal, Arc<AtomicBool>); HANDLED.len()]> =
    LazyLock::new(|| HANDLED.map(|s| (s, Arc::new(AtomicBool::new(false)))));

/// TERM, INT or QUIT: a stop (a second one: a stop now).
pub fn is_stop(sig: Signal) -> bool {
    matches!(sig, Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT)
}

/// The control loop is about to act on `sig`: a delivery from now on is a new one.
pub fn acting_on(sig: Signal) {
    if !is_stop(sig) {
        if let Some((_, flag)) = UNACTED.iter().find(|(s, _)| *s == sig) {
            flag.store(false, Ordering::Release);
        }
    }
}

/// Whether a TERM, INT or QUIT was delivered (whether or not the control loop has acted on it
/// yet) or is pending (signals are blocked until the handlers run).
pub fn stop_asked() -> bool {
    if UNACTED
        .iter()
        .any(|(s, flag)| is_stop(*s) && flag.load(Ordering::Acquire))
    {
        return true;
    }
    // SAFETY: `set` is a plain sigset_t, emptied before use; sigpending only writes it.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigpending(&mut set) == 0
            && [libc::SIGTERM, libc::SIGINT, libc::SIGQUIT]
                .iter()
                .any(|s| libc::sigismember(&set, *s) == 1)
    }
}

/// Just before execve, with the handled signals blocked ([`crate::ops::sigstate::block`]): every signal a handler
/// took and the control loop has not acted on is raised again, to wait pending across the exec
/// for the next image's handlers (a TERM then stops the next generation, a USR1 reopens its
/// log, a HUP asks it for one more reload). Without this the exec would drop them with the
/// queues they wait in.
pub fn carry_unacted() {
    for (sig, flag) in UNACTED.iter() {
        if flag.load(Ordering::Acquire) {
            if let Err(e) = nix::sys::signal::raise(*sig) {
                log::error!(
                    "{} taken but not acted on, and cannot be carried across the exec: {e}",
                    sig.as_str()
                );
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ops::sigstate::clear_mask;

    /// Only thread masks change here (no process-wide signal state): a helper spawned from a
    /// thread that takes every signal still has the handled ones blocked, and the spawning
    /// thread's mask is as before.
    #[test]
    fn helpers_are_spawned_with_the_handled_signals_blocked() {
        std::thread::spawn(|| {
            clear_mask().unwrap();
            let helper = spawn_helper("test-helper", || {
                let mut mask = SigSet::empty();
                pthread_sigmask(SigmaskHow::SIG_BLOCK, None, Some(&mut mask)).unwrap();
                HANDLED.iter().all(|s| mask.contains(*s))
            })
            .unwrap();
            assert!(
                helper.join().unwrap(),
                "the helper must have every handled signal blocked"
            );
            let mut mine = SigSet::empty();
            pthread_sigmask(SigmaskHow::SIG_BLOCK, None, Some(&mut mine)).unwrap();
            assert!(
                !mine.contains(Signal::SIGHUP),
                "the caller's mask is restored"
            );
        })
        .join()
        .unwrap();
    }
}
