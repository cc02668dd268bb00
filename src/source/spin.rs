//! Busy-polling: a lane about to sleep in poll(2) for its next job (an AMQP delivery, gearmand's
//! answer to a GRAB), or the ZeroMQ ingress for its next message, first polls its sockets
//! without sleeping, for a short window (`[source] busy_poll`). On this kind of VM a thread
//! woken from poll(2) by a peer's packet starts 40-60 µs later (a wake-up across CPUs of a
//! nested guest), as long as RabbitMQ's own work for a delivery: where every job waits for one
//! round trip, the window takes most of that out.
//!
//! It must not take the CPU the broker (or another lane) needs, so it spins only where that
//! pays: only while no other lane of the worker waits too (several lanes waiting at once means
//! the server's CPU is the limit, and a spinning lane would take from it; so one lane at most
//! spins), never on a machine of one CPU, and a lane stops spinning once most of its windows
//! end empty (jobs come slower than the window: the queue is empty, or the server is slow),
//! trying again every [`RETRY_AFTER`] waits. An idle worker spins a few windows after its last
//! job, then sleeps. (AMQP lanes share one connection and take turns reading it: only the lane
//! holding the reader waits for input, the others wait for their turn and are not counted, so
//! the reader spins; on one connection the broker leaves it the CPU.)

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollTimeout};

/// Waits without a spin before a lane that stopped spinning tries one again.
const RETRY_AFTER: u8 = 32;
/// Empty windows a lane may have in hand (each costs one, each delivery seen earns one): it
/// spins on while at least half its windows see a delivery.
const MAX_CREDIT: u8 = 8;

/// Lanes waiting for input right now (spinning or asleep), in this process.
static WAITING: AtomicUsize = AtomicUsize::new(0);

/// Counts a lane as waiting for input while it lives.
pub(crate) struct Waiting(());

impl Waiting {
    pub(crate) fn enter() -> Waiting {
        WAITING.fetch_add(1, Ordering::AcqRel);
        Waiting(())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        WAITING.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether this process may use more than one CPU (a spinning lane then leaves one to others).
fn several_cpus() -> bool {
    static SEVERAL: OnceLock<bool> = OnceLock::new();
    *SEVERAL.get_or_init(|| std::thread::available_parallelism().is_ok_and(|n| n.get() > 1))
}

/// One lane's busy-poll state.
pub(crate) struct Spin {
    window: Duration,
    /// Empty windows still allowed before this lane stops spinning.
    credit: u8,
    /// Waits since it stopped.
    skipped: u8,
}

impl Spin {
    pub(crate) fn new(window: Duration) -> Spin {
        Spin {
            window,
            credit: MAX_CREDIT,
            skipped: 0,
        }
    }

    /// Polls `fds` without sleeping, for up to the window, if spinning pays lately, no other
    /// lane waits (the caller holds a [`Waiting`]) and a CPU is left for others. True: one of
    /// them has events (their `revents` are set, as a poll(2) would).
    pub(crate) fn wait(&mut self, fds: &mut [PollFd<'_>]) -> bool {
        self.wait_for(|| poll(fds, PollTimeout::ZERO).is_ok_and(|n| n > 0))
    }

    /// [`Spin::wait`] for whatever `ready` looks at without sleeping (a ZeroMQ poll, say).
    pub(crate) fn wait_for(&mut self, mut ready: impl FnMut() -> bool) -> bool {
        // Every waiting lane holds a Waiting first: of lanes waiting at once, none sees 1.
        if self.window.is_zero()
            || !several_cpus()
            || WAITING.load(Ordering::Acquire) > 1
            || !self.worth_it()
        {
            return false;
        }
        let start = Instant::now();
        let mut came = false;
        while !came && start.elapsed() < self.window {
            came = ready();
            std::hint::spin_loop();
        }
        self.credit = if came {
            self.credit.saturating_add(1).min(MAX_CREDIT)
        } else {
            self.credit.saturating_sub(1)
        };
        came
    }

    /// Whether to spin this time: while credit is left, and once every RETRY_AFTER waits.
    fn worth_it(&mut self) -> bool {
        if self.credit > 0 {
            return true;
        }
        self.skipped += 1;
        if self.skipped < RETRY_AFTER {
            return false;
        }
        self.skipped = 0;
        self.credit = 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::poll::PollFlags;
    use std::io::Write;
    use std::os::fd::AsFd;

    fn input(spin: &mut Spin, rx: &std::os::unix::net::UnixStream) -> bool {
        spin.wait(&mut [PollFd::new(rx.as_fd(), PollFlags::POLLIN)])
    }

    /// Input that comes within the window is seen without sleeping; windows that end empty
    /// stop the spinning, which is tried again after RETRY_AFTER waits; a zero window never
    /// spins.
    #[test]
    fn spins_while_it_pays_and_stops_when_it_does_not() {
        let (mut tx, rx) = std::os::unix::net::UnixStream::pair().unwrap_or_else(|e| panic!("{e}"));
        let _waiting = Waiting::enter();
        let mut spin = Spin::new(Duration::from_micros(200));
        if !several_cpus() {
            assert!(!input(&mut spin, &rx), "one CPU: never spins");
            return;
        }
        tx.write_all(b"x").unwrap_or_else(|e| panic!("{e}"));
        assert!(input(&mut spin, &rx));
        assert_eq!(spin.credit, MAX_CREDIT);
        {
            // The input is still there: a spin would see it at once.
            let _another = Waiting::enter();
            assert!(!input(&mut spin, &rx), "another lane waits: no spin");
        }
        let mut buf = [0u8; 1];
        std::io::Read::read(&mut &rx, &mut buf).unwrap_or_else(|e| panic!("{e}"));
        for left in (0..MAX_CREDIT).rev() {
            assert!(!input(&mut spin, &rx), "nothing came");
            assert_eq!(spin.credit, left);
        }
        // Whether a wait spun, by whether it looked at all (not by how long it took: a thread
        // of a loaded machine can be off its CPU for longer than the window).
        let spun = (0..RETRY_AFTER).filter(|_| {
            let mut looked = false;
            spin.wait_for(|| {
                looked = true;
                false
            });
            looked
        });
        assert_eq!(spun.count(), 1, "one retry in RETRY_AFTER waits");
        assert!(!input(&mut Spin::new(Duration::ZERO), &rx));
    }
}
