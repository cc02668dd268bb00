//! Signals: handlers only forward; the worker loop decides, between jobs.
//!
//! Signal state survives execve: the blocked mask and pending signals are kept while handlers
//! fall back to their default actions, and SIGHUP's default kills. So the self re-exec blocks
//! every signal we handle just before execve ([`block`]); the new image installs its handlers
//! first ([`Signals::install`]) and only then unblocks. A HUP sent during the exec is held
//! pending and delivered once it is safe: it simply asks for one more reload.

use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use nix::sys::signal::{pthread_sigmask, SigSet, SigmaskHow, Signal};
use signal_hook::iterator::Signals as Iter;

use crate::error::{Error, Result};

/// The signals gearshift acts on.
pub const HANDLED: [Signal; 6] = [
    Signal::SIGHUP,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];

fn handled_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in HANDLED {
        set.add(s);
    }
    set
}

/// The installed handlers and the thread forwarding them to the worker loop.
pub struct Signals {
    // The forwarding thread lives as long as the image; execve ends it.
    _thread: JoinHandle<()>,
}

impl Signals {
    /// Installs handlers for [`HANDLED`] and forwards each delivery to `tx`. Call with the
    /// signals blocked ([`block`]) and clear the mask ([`clear_mask`]) once the helper threads
    /// are spawned: they inherit the blocked mask and so never take a signal themselves.
    pub fn install(tx: Sender<Signal>) -> Result<Signals> {
        let raw: Vec<i32> = HANDLED.iter().map(|s| *s as i32).collect();
        let mut iter = Iter::new(&raw).map_err(|e| Error::io("installing signal handlers", e))?;
        let thread = std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for raw in iter.forever() {
                    if let Ok(sig) = Signal::try_from(raw) {
                        if tx.send(sig).is_err() {
                            break;
                        }
                    }
                }
            })
            .map_err(|e| Error::io("spawning signal thread", e))?;
        Ok(Signals { _thread: thread })
    }
}

/// Empties the calling thread's signal mask: neither the mask carried across our own re-exec
/// nor one inherited from whatever launched us may keep signals blocked.
pub fn clear_mask() -> Result<()> {
    pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
        .map_err(|e| Error::io("clearing the signal mask", e.into()))
}

/// Blocks every handled signal in the calling thread (before execve).
pub fn block() -> Result<()> {
    pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&handled_set()), None)
        .map_err(|e| Error::io("blocking signals", e.into()))
}

/// Undoes [`block`] (when execve failed and we keep running).
pub fn unblock() {
    let _ = pthread_sigmask(SigmaskHow::SIG_UNBLOCK, Some(&handled_set()), None);
}
