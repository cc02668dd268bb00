//! The systemd notify protocol (sd_notify(3)), spoken directly: one datagram per message to
//! `$NOTIFY_SOCKET` (a path, or an abstract name written with a leading `@`). No libsystemd.
//!
//! `READY=1` once a generation serves; `RELOADING=1` with `MONOTONIC_USEC=` before each re-exec
//! (without it `systemctl reload` of a Type=notify-reload unit hangs), then `READY=1` from the
//! new image (same PID, so MAINPID stays right); `STOPPING=1`; `STATUS=` with the generation and
//! job counts; `WATCHDOG=1` at half of `$WATCHDOG_USEC` from the control loop, which keeps
//! running while lanes are busy with long jobs.
//!
//! A message is sent only if the socket takes it at once: a service manager that reads nothing
//! (hung, stopped, or a socket nobody serves) would otherwise hold the control thread in the
//! send once the socket's queue is full, and with it every reload and the first TERM. What
//! cannot be sent is dropped and said once while it lasts.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// The service manager's variables: the worker's alone, kept from every process it starts
/// (sd_notify(3): a child that inherits `NOTIFY_SOCKET` could speak for the service, say
/// `STOPPING=1`, or under `NotifyAccess=all` name another `MAINPID`).
pub const SERVICE_VARS: [&str; 6] = [
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
];

/// The shortest time between two `WATCHDOG=1`: the control thread's own pace.
const FASTEST_PING: Duration = Duration::from_millis(10);

/// How often to ping a watchdog of `usec` µs: at half of it (as sd_watchdog_enabled(3) asks),
/// but never more often than [`FASTEST_PING`]. `WATCHDOG_USEC=1` (`WatchdogSec=1us`) asked
/// for no time at all between pings, and the control thread sent nothing else; said instead.
fn watchdog_interval(usec: u64) -> Duration {
    let half = Duration::from_nanos(usec.saturating_mul(500));
    if half < FASTEST_PING {
        log::warn!(
            "WATCHDOG_USEC={usec} asks for a ping every {half:?}, more often than the worker pings (every {FASTEST_PING:?}): the service manager may end it as hung; give the unit WatchdogSec= of a second or more"
        );
    }
    half.max(FASTEST_PING)
}

/// A connection to the service manager, if we were started by one.
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
    watchdog: Option<Duration>,
    failing: std::sync::Mutex<crate::ops::recurring::Recurring>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET` and `$WATCHDOG_USEC` / `$WATCHDOG_PID`; None when not supervised.
    pub fn from_env() -> Option<Notifier> {
        let path = std::env::var_os("NOTIFY_SOCKET")?;
        let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name).ok()?
            }
            None => SocketAddr::from_pathname(&path).ok()?,
        };
        let socket = match UnixDatagram::unbound().and_then(|s| {
            s.set_nonblocking(true)?;
            Ok(s)
        }) {
            Ok(s) => s,
            Err(e) => {
                log::warn!("NOTIFY_SOCKET is set but no datagram socket: {e}");
                return None;
            }
        };
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .and_then(|p| p.parse::<u32>().ok())
            .is_none_or(|p| p == std::process::id());
        let watchdog = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|u| u.parse::<u64>().ok())
            .filter(|&u| u > 0 && for_us)
            .map(watchdog_interval);
        Some(Notifier {
            socket,
            addr,
            watchdog,
            failing: std::sync::Mutex::new(crate::ops::recurring::Recurring::new(
                "sd_notify: the service manager's socket could not take a message at once \
                 (does anything read it?); messages are dropped while it lasts",
                "sd_notify: the service manager's socket takes messages again",
            )),
        })
    }

    /// How often to send `WATCHDOG=1`, if the service manager asked for it.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    pub fn send(&self, message: &str) {
        let sent = self.socket.send_to_addr(message.as_bytes(), &self.addr);
        let Ok(mut failing) = self.failing.lock() else {
            return;
        };
        match sent {
            Ok(_) => failing.worked(),
            Err(e) => {
                let first = message.lines().next().unwrap_or_default();
                failing.failed(&format_args!("{e} (dropped: {first})"));
            }
        }
    }
}
