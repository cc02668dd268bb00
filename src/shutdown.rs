//! Who may stop the lanes: only the control loop holds a [`Switch`]; lanes and sources get a
//! [`Shutdown`] they can watch but not set (the mini-redis pattern, with an atomic instead of a
//! broadcast channel because lanes block in `poll` and `recv`, and are woken separately).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// A read-only view of the stop decision.
#[derive(Debug, Clone, Default)]
pub struct Shutdown(Arc<AtomicBool>);

impl Shutdown {
    /// True once the control loop asked the lanes to stop (between jobs).
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    /// A view that is already set or never set, for tests and one-off calls.
    #[cfg(test)]
    pub fn fixed(set: bool) -> Shutdown {
        Shutdown(Arc::new(AtomicBool::new(set)))
    }
}

/// The stop decision itself; owned by the control loop alone.
#[derive(Debug, Default)]
pub struct Switch(Shutdown);

impl Switch {
    /// A handle for a lane.
    pub fn handle(&self) -> Shutdown {
        self.0.clone()
    }

    /// Asks every lane to stop after its current job.
    pub fn trigger(&self) {
        (self.0).0.store(true, Ordering::Release);
    }

    /// Lanes are about to be started again (a refused restart): clear the request.
    pub fn reset(&self) {
        (self.0).0.store(false, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_switch_sets_and_every_handle_sees_it() {
        let switch = Switch::default();
        let (a, b) = (switch.handle(), switch.handle());
        assert!(!a.is_set() && !b.is_set());
        switch.trigger();
        assert!(a.is_set() && b.is_set());
        switch.reset();
        assert!(!a.is_set());
    }
}
