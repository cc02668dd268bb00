//! Waiting for lapin's futures on a lane's own thread: polled here, woken by lapin's I/O
//! thread through a waker that unparks this one. No executor hop and no reactor timer per
//! wait (a timer per ack made every job wake the reactor thread twice): the time limit is
//! `park_timeout`.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

use super::Setup;
use crate::error::{Error, Result};
use crate::shutdown::Shutdown;

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

/// A lapin error as ours: a closed connection or channel means the peer is gone (whatever the
/// lane held is the broker's again); anything else is the broker misbehaving.
pub(super) fn lapin_error(what: &str, e: &lapin::Error) -> Error {
    let text = crate::text::escape(&e.to_string()).into_owned();
    match e.kind() {
        lapin::ErrorKind::InvalidConnectionState(_)
        | lapin::ErrorKind::InvalidChannelState(..)
        | lapin::ErrorKind::IOError(_)
        | lapin::ErrorKind::MissingHeartbeatError => Error::Gone(format!("{what}: {text}")),
        lapin::ErrorKind::ParsingError(_) | lapin::ErrorKind::InvalidProtocolVersion(_) => {
            Error::Peer(format!(
                "{what}: the server does not speak AMQP 0-9-1 as a broker should ({text})"
            ))
        }
        _ => Error::Peer(format!("{what}: {text}")),
    }
}

/// Runs `fut` for at most `limit`; a lapin error is an [`Error`], the time running out
/// [`Error::TimedOut`].
pub(super) fn bounded<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = lapin::Result<T>>,
) -> Result<T> {
    match run_until(fut, Some(Instant::now() + limit), None) {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => Err(lapin_error(what, &e)),
        None => Err(Error::TimedOut(format!(
            "{what}: no answer within {limit:?}"
        ))),
    }
}

/// A step of opening a link: bounded by `io_timeout`, and given up as soon as the lane is
/// asked to stop (a restart does not wait for a broker that does not answer).
pub(super) fn step<T>(
    s: &Setup,
    stop: &Shutdown,
    what: &str,
    fut: impl Future<Output = lapin::Result<T>>,
) -> Result<T> {
    let stopping = || stop.is_set();
    let deadline = Some(Instant::now() + s.cfg.io_timeout);
    match run_until(fut, deadline, Some((Duration::from_millis(50), &stopping))) {
        Some(r) => r.map_err(|e| lapin_error(what, &e)),
        None if stop.is_set() => Err(Error::Gone(format!("{what}: the lane is stopping"))),
        None => Err(Error::TimedOut(format!(
            "{what}: no answer within {:?}",
            s.cfg.io_timeout
        ))),
    }
}
