//! A process's signal state as exec hands it on: the signals gearshift handles, the mask
//! (blocked across our own re-exec, cleared once handlers are in place), and the dispositions a
//! launcher may have left (ignored signals survive exec). The handlers and their forwarding
//! thread are `signals`'.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, LazyLock};

use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};

use crate::error::{Error, Result};

/// The signals gearshift acts on (SIGXCPU: the soft CPU time limit reached, whose default
/// action would end the worker at once).
pub const HANDLED: [Signal; 7] = [
    Signal::SIGHUP,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGXCPU,
];

/// [`HANDLED`] as a set.
pub fn handled_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in HANDLED {
        set.add(s);
    }
    set
}

/// Gives every signal the launcher left ignored its default action back, but SIGPIPE (which
/// Rust's runtime ignores on purpose, and gives back to the processes it spawns). Ignored
/// signals survive exec: a launcher that ignores SIGCHLD (to be rid of zombies) had the kernel
/// reap the worker's job processes, so every executable job failed with "No child processes";
/// an ignored SIGALRM disarmed the start-up alarm of a re-exec'd generation; and whatever else
/// was ignored (`nohup`'s HUP, a shell's INT and QUIT for a background command) reached every
/// job. First thing in every image, before any handler is installed.
pub fn restore_ignored() {
    for sig in Signal::iterator() {
        // The handled ones get handlers of their own (an ignored HUP until then is better
        // than a default one that kills), which an exec resets to the defaults for jobs.
        if matches!(sig, Signal::SIGKILL | Signal::SIGSTOP | Signal::SIGPIPE)
            || HANDLED.contains(&sig)
        {
            continue;
        }
        // SAFETY: sigaction with a null new action only reads the current one into `old`, a
        // zeroed plain C struct that outlives the call.
        let ignored = unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            libc::sigaction(sig as i32, std::ptr::null(), &mut old) == 0
                && old.sa_sigaction == libc::SIG_IGN
        };
        if ignored {
            // SAFETY: SIG_DFL is no handler of ours: nothing runs in signal context.
            let _ = unsafe { nix::sys::signal::signal(sig, nix::sys::signal::SigHandler::SigDfl) };
        }
    }
}

/// Keeps a file size limit (`ulimit -f`, systemd's `LimitFSIZE=`) from killing the worker:
/// SIGXFSZ's default action ends the process the first time a write passes the limit (the log
/// reaching it, a journal segment written ahead). With a handler installed that write fails
/// with EFBIG instead, which is a storage fault like a full disk (`is_transient_errno`).
/// Handlers go back to their defaults at every exec, so job processes keep SIGXFSZ's usual
/// meaning, and each image of the worker installs it again, first thing.
pub fn survive_file_size_limit() {
    static PASSED: LazyLock<Arc<AtomicBool>> = LazyLock::new(|| Arc::new(AtomicBool::new(false)));
    if let Err(e) = signal_hook::flag::register(libc::SIGXFSZ, Arc::clone(&PASSED)) {
        log::warn!("could not handle SIGXFSZ ({e}): a file size limit would end the worker");
    }
}

/// Empties the calling thread's signal mask: neither the mask carried across our own re-exec
/// nor one inherited from whatever launched us may keep signals blocked.
pub fn clear_mask() -> Result<()> {
    pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(|e| Error::io("clearing the signal mask", e.into()))
}

/// The signals that ask a worker for something other than a stop (HUP: restart in place, USR1:
/// reopen the log, USR2: nothing), whose default action would end it instead.
const REQUESTS: [Signal; 3] = [Signal::SIGHUP, Signal::SIGUSR1, Signal::SIGUSR2];

/// Blocks [`REQUESTS`] in the calling (main) thread, the first thing a command does, and
/// returns the mask before: a command other than `run` puts it back ([`release_requests`]); a
/// fresh `run` keeps them blocked until its handlers are in place, so one sent while it starts
/// (parsing its arguments, looking for another worker) is acted on then instead of ending it.
/// Stop signals keep their default action until the worker blocks them too: one sent before
/// it serves ends it, with nothing claimed yet.
pub fn hold_requests() -> Option<SigSet> {
    let mut set = SigSet::empty();
    for s in REQUESTS {
        set.add(s);
    }
    let mut old = SigSet::empty();
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old))
        .is_ok()
        .then_some(old)
}

/// Puts back the mask [`hold_requests`] returned.
pub fn release_requests(old: &SigSet) {
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(old), None);
}

/// Blocks every handled signal in the calling thread (before execve).
pub fn block() -> Result<()> {
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&handled_set()), None)
        .map_err(|e| Error::io("blocking signals", e.into()))
}

/// Gives SIGPIPE its default action back, for a CLI command that only prints: writing to a
/// closed pipe (`gearshift status | head -1`) then ends it quietly, as it ends any Unix tool,
/// instead of a panic in `println!`. Never for the worker, whose sockets must see EPIPE.
pub fn default_sigpipe() {
    // SAFETY: installs the default disposition (no handler code of ours runs); called on the
    // main thread before the command does anything else.
    let _ =
        unsafe { nix::sys::signal::signal(Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl) };
}
