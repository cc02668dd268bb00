//! The source's heartbeat thread: sends each connection's heartbeat when it has sent nothing for
//! half the agreed interval, so a lane running a ten-minute job keeps its connection (the lane
//! itself reads nothing meanwhile). It sleeps until the next one is due: one wake-up per half
//! interval per connection, none without connections.

use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use super::conn::Io;

#[derive(Default)]
struct List {
    conns: Vec<Weak<Mutex<Io>>>,
    started: bool,
    stop: bool,
}

/// The heartbeat thread's list of connections (it starts with the first one).
#[derive(Default)]
pub struct Beats {
    inner: Arc<(Mutex<List>, Condvar)>,
}

impl Beats {
    /// Serves `io`'s heartbeats from now until it is dropped.
    pub fn add(&self, io: &Arc<Mutex<Io>>) {
        let (list, cv) = &*self.inner;
        let mut l = list.lock().unwrap_or_else(|p| p.into_inner());
        l.conns.push(Arc::downgrade(io));
        if !l.started {
            let inner = Arc::clone(&self.inner);
            match crate::ops::signals::spawn_essential("amqp-heartbeat", move || run(&inner)) {
                Ok(_) => l.started = true,
                Err(e) => log::error!("amqp: cannot start the heartbeat thread: {e}"),
            }
        }
        cv.notify_one();
    }
}

impl Drop for Beats {
    fn drop(&mut self) {
        let (list, cv) = &*self.inner;
        list.lock().unwrap_or_else(|p| p.into_inner()).stop = true;
        cv.notify_one();
    }
}

fn run(inner: &(Mutex<List>, Condvar)) {
    let (list, cv) = inner;
    let mut l = list.lock().unwrap_or_else(|p| p.into_inner());
    while !l.stop {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        l.conns.retain(|w| w.strong_count() > 0);
        for io in l.conns.iter().filter_map(Weak::upgrade) {
            // A lane writing holds the lock: it is sending anyway; look again soon.
            let due = match io.try_lock() {
                Ok(mut io) if !io.broken && !io.heartbeat.is_zero() => {
                    let half = io.heartbeat / 2;
                    if io.last_sent + half <= now {
                        io.beat();
                    }
                    (io.last_sent + half).max(now + Duration::from_millis(100))
                }
                Ok(_) => continue,
                Err(_) => now + Duration::from_millis(100),
            };
            next = Some(next.map_or(due, |n| n.min(due)));
        }
        l = match next {
            None => cv.wait(l).unwrap_or_else(|p| p.into_inner()),
            Some(t) => {
                cv.wait_timeout(l, t.saturating_duration_since(Instant::now()))
                    .unwrap_or_else(|p| p.into_inner())
                    .0
            }
        };
    }
}
