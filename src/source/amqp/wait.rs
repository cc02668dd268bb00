//! Waiting for lapin's futures on a lane's own thread: polled here, woken by lapin's I/O
//! thread through a waker that unparks this one. No executor hop and no reactor timer per
//! wait (a timer per ack made every job wake the reactor thread twice): the time limit is
//! `park_timeout`.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

struct Unpark(Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// Polls `fut` on this thread until it is ready (Some), `deadline` passes or `give_up()` says
/// so (None). `give_up` is asked at least every `check` while waiting.
pub(super) fn run_until<T>(
    fut: impl Future<Output = T>,
    deadline: Option<Instant>,
    check: Option<(Duration, &dyn Fn() -> bool)>,
) -> Option<T> {
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return Some(v);
        }
        if check.is_some_and(|(_, give_up)| give_up()) {
            return None;
        }
        let slice = check.map(|(every, _)| every);
        match (deadline, slice) {
            (Some(d), _) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return None;
                }
                std::thread::park_timeout(slice.map_or(left, |s| s.min(left)));
            }
            (None, Some(s)) => std::thread::park_timeout(s),
            (None, None) => std::thread::park(),
        }
    }
}

/// Runs `fut` to its end (no limit: for futures that end by themselves, such as a race with a
/// wake-up).
pub(super) fn run<T>(fut: impl Future<Output = T>) -> T {
    let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
    let mut cx = Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        std::thread::park();
    }
}
