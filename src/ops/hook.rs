//! A process-wide callback that a lower layer calls and the worker sets (a helper thread's
//! death, a forced exit, the spool found replaced): the lower layer knows when, the worker
//! what to do, and neither imports the other.

use std::sync::Mutex;

/// The callback a [`Hook`] holds.
type Callback<A> = Box<dyn Fn(A) + Send>;

/// A callback taking an `A`, set once a generation starts (a later `set` replaces it).
pub struct Hook<A>(Mutex<Option<Callback<A>>>);

impl<A> Hook<A> {
    pub const fn new() -> Hook<A> {
        Hook(Mutex::new(None))
    }

    pub fn set(&self, f: impl Fn(A) + Send + 'static) {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *slot = Some(Box::new(f));
    }

    /// Calls the callback, if one is set and nobody is setting it right now: never waits (it
    /// is called from a dying thread and on the way to a forced exit).
    pub fn call(&self, a: A) {
        if let Ok(slot) = self.0.try_lock() {
            if let Some(f) = slot.as_ref() {
                f(a);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[test]
    fn a_hook_calls_what_was_set_last_and_nothing_before() {
        let hook: Hook<usize> = Hook::new();
        hook.call(1);
        let seen = Arc::new(AtomicUsize::new(0));
        let s = Arc::clone(&seen);
        hook.set(move |n| s.store(n, Ordering::SeqCst));
        hook.call(7);
        assert_eq!(seen.load(Ordering::SeqCst), 7);
        hook.set(|_| {});
        hook.call(9);
        assert_eq!(seen.load(Ordering::SeqCst), 7);
    }
}
