//! Gearman connections kept across a re-exec. A lane stopping for a restart parks each healthy
//! plain connection at a safe point (its last result written, no GRAB outstanding, nothing
//! unread), the main thread hands the sockets to the next image like a listening socket, and
//! the new generation's lane of the same index takes them up: no bye round trip before the
//! exec, no connect and handshake after it, so the first GRAB goes out at once.
//!
//! A taken-up connection is registered afresh in one write (RESET_ABILITIES, SET_CLIENT_ID,
//! CAN_DO...): the functions may have changed with the reload, and a connection parked at a
//! safe point holds no job (RESET_ABILITIES while holding one would requeue it). Connections
//! that cannot be taken up (TLS, a server or lane no longer configured, `exceptions` changed:
//! gearmand has no way to switch the option off) are closed and reconnected as before.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// What crosses the exec for one connection: which lane, server and option set it belongs to.
pub(super) fn key(index: usize, exceptions: bool, addr: &str) -> String {
    format!("gearman lane {index} exceptions {exceptions} {addr}")
}

/// Shared by a generation's source and its lanes.
#[derive(Default)]
pub(super) struct Handover {
    /// The lanes are stopping for a re-exec: park, do not close.
    restarting: AtomicBool,
    /// Parked by this generation's lanes, for the next.
    parked: Mutex<Vec<(String, OwnedFd)>>,
    /// Handed over by the previous generation, until its lane takes them.
    adopted: Mutex<Vec<(String, OwnedFd)>>,
}

impl Handover {
    /// Keeps what the previous generation handed over under a `usable` key (a lane that will
    /// exist, a plain server still configured, the same `exceptions`); closes the rest.
    pub(super) fn new(carried: Vec<(String, OwnedFd)>, usable: impl Fn(&str) -> bool) -> Self {
        let adopted = carried.into_iter().filter(|(k, _)| usable(k)).collect();
        Handover {
            adopted: Mutex::new(adopted),
            ..Handover::default()
        }
    }

    pub(super) fn set_restarting(&self, on: bool) {
        self.restarting.store(on, Ordering::Relaxed);
        if !on {
            // The restart did not happen: the lanes reconnect (closing is enough at a safe
            // point: the results went out before the FIN).
            if let Ok(mut parked) = self.parked.lock() {
                parked.clear();
            }
        }
    }

    pub(super) fn restarting(&self) -> bool {
        self.restarting.load(Ordering::Relaxed)
    }

    /// The parked sockets, by key (the source keeps them open until the exec or its failure).
    pub(super) fn parked(&self) -> Vec<(String, RawFd)> {
        self.parked
            .lock()
            .map(|p| {
                p.iter()
                    .map(|(k, fd)| (k.clone(), fd.as_raw_fd()))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub(super) fn park(&self, key: String, fd: OwnedFd) {
        if let Ok(mut parked) = self.parked.lock() {
            parked.push((key, fd));
        }
    }

    pub(super) fn take(&self, key: &str) -> Option<OwnedFd> {
        let mut adopted = self.adopted.lock().ok()?;
        let i = adopted.iter().position(|(k, _)| k == key)?;
        Some(adopted.swap_remove(i).1)
    }
}
