//! The worker's one connection to the broker, shared by its lanes: one channel and one
//! consumer, with `basic.qos` of `prefetch` for each lane (so as many deliveries are in hand
//! as with a channel per lane). Measured against a connection per lane and against a channel
//! per lane on one connection: the broker spends about half the CPU per job, and on two cores
//! the drain is that much faster (README, "AMQP consumers").
//!
//! The lanes take turns reading: an idle lane takes the reader (a lock; the other idle lanes
//! wait for it), reads until a delivery comes and lets the reader go before running it, so a
//! delivery runs on the thread that read it, with no hand-over between threads. Acks and
//! replies are written through the connection's writing half ([`Writer`], the lock the
//! heartbeat thread shares), never waiting for the reader. A lane waiting for its reply's
//! confirm reads itself when no lane does, and otherwise waits for the reader to record it.
//!
//! What one connection costs: a broken connection (or a channel the broker closes) takes
//! every lane's delivery back at once, not one lane's; the broker delivers them again (with
//! `redelivered` set), as after a crash.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use super::conn::{Delivery, Event, Writer};
use super::link::{self, Link};
use super::{wire, Setup, CLOSE_WAIT};
use crate::error::{Error, Result};
use crate::kinds::ConnState;
use crate::shutdown::Shutdown;

const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// A lane waiting for its confirm while another lane reads looks again this often.
const CONFIRM_SLICE: Duration = Duration::from_millis(100);

/// The connection, and the lanes' turns at reading it.
pub(super) struct Shared {
    s: Arc<Setup>,
    reader: Mutex<Reader>,
    board: Mutex<Board>,
    /// Told when a confirm is recorded, the link changes, or the reader is let go.
    changed: Condvar,
    /// Written by [`super::AmqpSource`]'s wake: the lane waiting in poll(2) on the connection
    /// (or in the pause before a new try) looks at its stop flag.
    pub(super) wake: Arc<OwnedFd>,
}

/// The reading half, and when to try again without one.
struct Reader {
    link: Option<Link>,
    /// The broker of the last link, or of the next try.
    url: usize,
    backoff: Duration,
    retry_at: Instant,
    /// The last failure said in the log (said once until it changes).
    logged: String,
}

/// What the lanes look at without the reader.
#[derive(Default)]
struct Board {
    /// The link's writing half (None: no link).
    writer: Option<Writer>,
    /// Counts the links: a delivery's acks go only to the link that delivered it.
    epoch: u64,
    /// The link's broker.
    url: usize,
    consumer_tag: String,
    /// Replies published on this link and not confirmed yet: None until the broker answers.
    confirms: BTreeMap<u64, Option<bool>>,
    /// `connection.blocked`: a confirm then waits as long as it lasts.
    blocked: bool,
    /// Lanes of this source, and how many have not closed.
    lanes: Vec<usize>,
    open: usize,
    /// The consumer is cancelled (the lanes are closing), and the broker said so.
    cancelled: bool,
    cancel_ok: bool,
    /// Lanes waiting on `changed` (for a confirm).
    waiters: usize,
}

/// A delivery, and the link it came by.
pub(super) struct Got {
    pub(super) delivery: Delivery,
    pub(super) writer: Writer,
    pub(super) epoch: u64,
}

/// What one read brought.
enum Read {
    Delivery(Box<Delivery>),
    /// A method a consumer does not expect.
    Method(wire::Id),
    /// A confirm (recorded), a wake-up, a returned message.
    Nothing,
    TimedOut,
}

impl Shared {
    pub(super) fn new(s: Arc<Setup>) -> Result<Shared> {
        Ok(Shared {
            reader: Mutex::new(Reader {
                // A fleet started together spreads over the brokers instead of all connecting
                // to the first one listed.
                url: std::process::id() as usize % s.cfg.urls.len().max(1),
                link: None,
                backoff: BACKOFF_MIN,
                retry_at: Instant::now(),
                logged: String::new(),
            }),
            s,
            board: Mutex::new(Board::default()),
            changed: Condvar::new(),
            wake: Arc::new(crate::source::gearman::worker::eventfd()?),
        })
    }

    fn board(&self) -> MutexGuard<'_, Board> {
        self.board.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes the lanes waiting for a confirm: to look again, or to read themselves (the
    /// reader was let go). Under the board's lock, so that none misses it between looking
    /// and waiting.
    fn nudge(&self) {
        if self.board().waiters > 0 {
            self.changed.notify_all();
        }
    }

    /// Shows `state` for broker `url` in every lane's view.
    fn view(&self, b: &Board, url: usize, state: ConnState, error: Option<&str>) {
        let shown = &self.s.cfg.urls[url].shown;
        for &lane in &b.lanes {
            crate::status::show_server(&self.s.views, shown, lane, state, error.map(String::from));
        }
    }

    /// Shows `why` as the connected broker's last error, the connection still good (status's
    /// `last_error`: a reply it refused).
    pub(super) fn note(&self, why: &str) {
        let b = self.board();
        if b.writer.is_some() {
            self.view(&b, b.url, Self::live(&b), Some(why));
        }
    }

    /// The state of a connection that is up: blocked while the broker's alarm lasts.
    fn live(b: &Board) -> ConnState {
        if b.blocked {
            ConnState::Blocked
        } else {
            ConnState::Connected
        }
    }

    /// The broker's publishing alarm (`connection.blocked`, with its reason; None: lifted)
    /// began or ended: logged once, and shown in `status` and the metrics while it lasts.
    fn alarm(&self, b: &Board, reason: Option<&str>) {
        let shown = &self.s.cfg.urls[b.url].shown;
        let Some(why) = reason else {
            log::info!("amqp {shown}: the broker accepts publishing again");
            return self.view(b, b.url, ConnState::Connected, None);
        };
        log::warn!(
            "amqp {shown}: the broker blocks publishing ({why}): replies wait until it lifts \
             the alarm"
        );
        let error = format!("{}{why}", crate::kinds::BLOCKED_ERROR);
        self.view(b, b.url, ConnState::Blocked, Some(&error));
    }

    /// Lane `index` starts: it is shown connecting to every broker, or connected to the one in
    /// use and on standby for the others.
    pub(super) fn join(&self, index: usize) {
        let mut b = self.board();
        // Lanes spawned again (a restart refused after the drain) keep their index.
        if !b.lanes.contains(&index) {
            b.lanes.push(index);
        }
        b.open += 1;
        for u in &self.s.cfg.urls {
            crate::status::show_server(&self.s.views, &u.shown, index, ConnState::Connecting, None);
        }
        if b.writer.is_some() {
            self.show_in_use(&b, &[index], Self::live(&b));
        }
    }

    /// Shows `lanes` on the broker in use (as `live`), and on standby for the others.
    fn show_in_use(&self, b: &Board, lanes: &[usize], live: ConnState) {
        for (i, u) in self.s.cfg.urls.iter().enumerate() {
            let state = if i == b.url { live } else { ConnState::Standby };
            for &lane in lanes {
                crate::status::show_server(&self.s.views, &u.shown, lane, state, None);
            }
        }
    }

    /// The reader, if no lane holds it.
    fn try_reader(&self) -> Option<MutexGuard<'_, Reader>> {
        match self.reader.try_lock() {
            Ok(r) => Some(r),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// Whether link `epoch` is the one in use.
    pub(super) fn current(&self, epoch: u64) -> bool {
        let b = self.board();
        b.epoch == epoch && b.writer.is_some()
    }

    /// The next delivery; None when woken, after a pause before a new try, or after a failure
    /// (the caller looks at its stop flag and asks again).
    pub(super) fn next(&self, stop: &Shutdown) -> Option<Got> {
        // Only the reader waits for input (the lanes waiting for their turn are not counted
        // as waiting, `crate::source::spin`), so it busy-polls while deliveries come within
        // the window: on one connection the broker leaves the CPU for it. Measured at four
        // lanes it drains faster with the spin than without (README, "AMQP consumers").
        let mut r = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        if stop.is_set() {
            return None;
        }
        let Some(link) = r.link.as_mut() else {
            if Instant::now() < r.retry_at {
                super::conn::sleep_until(r.retry_at, &self.wake);
            } else if let Err(e) = self.connect(&mut r) {
                if !stop.is_set() {
                    self.fail(&mut r, &e);
                }
            }
            return None;
        };
        let read = match link.conn.pending.pop_front() {
            Some(d) => Ok(Read::Delivery(Box::new(d))),
            None => self.read(link, None),
        };
        let got = match read {
            Ok(Read::Delivery(delivery)) => Some(*delivery),
            Ok(Read::Nothing | Read::TimedOut) => None,
            Ok(Read::Method(id)) => {
                let why =
                    format!("the broker sent method {id:?}, which a consumer does not expect");
                self.fail(&mut r, &Error::Peer(why));
                None
            }
            Err(e) => {
                self.fail(&mut r, &e);
                None
            }
        };
        let got = got.and_then(|delivery| {
            let b = self.board();
            Some(Got {
                delivery,
                writer: b.writer.clone()?,
                epoch: b.epoch,
            })
        });
        drop(r);
        self.nudge();
        got
    }

    /// Reads one event from `link` (waiting until `deadline`): a confirm is recorded, the
    /// consumer's cancel answered is noted.
    fn read(&self, link: &mut Link, deadline: Option<Instant>) -> Result<Read> {
        let ev = link.conn.next(deadline);
        let mut b = self.board();
        if link.conn.blocked.is_some() != b.blocked {
            b.blocked = link.conn.blocked.is_some();
            self.alarm(&b, link.conn.blocked.as_deref());
        }
        match ev? {
            Event::Delivery(d) => Ok(Read::Delivery(Box::new(d))),
            Event::Confirm { tag, multiple, ack } => {
                if multiple {
                    for (_, v) in b.confirms.range_mut(..=tag) {
                        v.get_or_insert(ack);
                    }
                } else if let Some(v) = b.confirms.get_mut(&tag) {
                    *v = Some(ack);
                }
                if b.waiters > 0 {
                    self.changed.notify_all();
                }
                Ok(Read::Nothing)
            }
            Event::Method(wire::BASIC_CANCEL_OK, _) if b.cancelled => {
                b.cancel_ok = true;
                Ok(Read::Nothing)
            }
            Event::Method(id, _) => Ok(Read::Method(id)),
            Event::Woken | Event::Returned => Ok(Read::Nothing),
            Event::TimedOut => Ok(Read::TimedOut),
            Event::Cancelled => Err(Error::Gone("the broker cancelled the consumer".into())),
        }
    }

    /// Connects to the current broker and opens the consumer.
    fn connect(&self, r: &mut Reader) -> Result<()> {
        let epoch = {
            let mut b = self.board();
            b.epoch += 1;
            self.view(&b, r.url, ConnState::Connecting, None);
            b.epoch
        };
        let link = link::open(&self.s, r.url, epoch, &self.wake)?;
        {
            let mut b = self.board();
            b.writer = Some(link.conn.writer());
            b.url = r.url;
            b.consumer_tag = link.consumer_tag.clone();
            b.confirms.clear();
            b.blocked = false;
            b.cancel_ok = false;
            // One broker at a time: the others wait for a failover.
            self.show_in_use(&b, &b.lanes, ConnState::Connected);
        }
        r.backoff = BACKOFF_MIN;
        if !r.logged.is_empty() {
            let shown = &self.s.cfg.urls[r.url].shown;
            log::info!("amqp {shown}: consuming again");
            r.logged.clear();
        }
        r.link = Some(link);
        Ok(())
    }

    /// Drops the link (the broker requeues whatever it delivered) and schedules a new one, on
    /// the next broker, with backoff and jitter. A broker that answered and refused (`Peer`:
    /// no such queue, a login refused, no broker at all) is shown `refused`, not unreachable.
    fn fail(&self, r: &mut Reader, e: &Error) {
        let why = e.to_string();
        let why = why.as_str();
        let state = match e {
            Error::Peer(_) => ConnState::Refused,
            _ => ConnState::BackingOff,
        };
        if let Some(link) = r.link.take() {
            link.conn.writer().cut();
        }
        let url = self.s.cfg.urls[r.url].shown.clone();
        {
            let mut b = self.board();
            b.writer = None;
            self.view(&b, r.url, state, Some(why));
            if let Some(&lane) = b.lanes.first() {
                crate::status::count_reconnect(&self.s.views, &url, lane);
            }
        }
        self.nudge();
        if r.logged != why {
            log::warn!(
                "amqp {url}: {why}; retrying with backoff (up to {:?})",
                self.s.cfg.reconnect_max
            );
            r.logged = why.to_string();
        }
        let jitter = 0.75 + 0.5 * crate::clock::random_fraction();
        r.retry_at = Instant::now() + r.backoff.mul_f64(jitter);
        r.backoff = (r.backoff * 2).min(self.s.cfg.reconnect_max);
        r.url = (r.url + 1) % self.s.cfg.urls.len().max(1);
    }

    /// Publishes through `writer` (link `epoch`) what `build` appends, and waits for the
    /// broker's confirm; while the broker blocks publishing (`connection.blocked`), as long
    /// as that lasts. `id` names the job in the log. Ok(false): the broker refused the message
    /// (`basic.nack`: a queue full under `x-overflow = reject-publish`, or the queue's own
    /// failure), the connection still good.
    pub(super) fn publish(
        &self,
        writer: &Writer,
        epoch: u64,
        id: &str,
        build: impl FnOnce(&mut Vec<u8>),
    ) -> Result<bool> {
        // Noted under the writing lock, before the broker can answer.
        let seq = writer.publish(|buf, seq| {
            self.board().confirms.insert(seq, None);
            build(buf);
        });
        let seq = seq.inspect_err(|_| writer.cut())?;
        let waited = self.confirmed(seq, epoch, id);
        self.board().confirms.remove(&seq);
        waited.inspect_err(|_| writer.cut())
    }

    /// Waits for the confirm of publish `seq` on link `epoch`: true an ack, false a nack.
    fn confirmed(&self, seq: u64, epoch: u64, id: &str) -> Result<bool> {
        let io_timeout = self.s.cfg.io_timeout;
        let mut deadline = Instant::now() + io_timeout;
        let (mut said, mut last_look) = (false, false);
        let mut b = self.board();
        loop {
            if b.epoch != epoch || b.writer.is_none() {
                return Err(Error::Gone(
                    "the connection was lost before the broker confirmed the reply".into(),
                ));
            }
            if let Some(Some(ack)) = b.confirms.get(&seq) {
                return Ok(*ack);
            }
            let now = Instant::now();
            if now >= deadline {
                if b.blocked {
                    if !said {
                        log::warn!("amqp: the broker blocks publishing (a resource alarm): job {id}'s reply waits");
                        said = true;
                    }
                    deadline = now + io_timeout;
                } else if !last_look {
                    // One more slice for the reader (this lane or another) to record what came
                    // meanwhile: this process may have stalled past the deadline (SIGSTOP, a
                    // paused VM) with the confirm waiting in the socket.
                    last_look = true;
                    deadline = now + CONFIRM_SLICE;
                } else {
                    // The connection is given up (`publish` cuts it): nothing is lost.
                    return Err(Error::Gone(format!(
                        "publishing the reply: no confirm within {}: the connection is given \
                         up, and the broker delivers the job again",
                        crate::clock::human(io_timeout)
                    )));
                }
            }
            // Nobody reads: read here. Otherwise the reader records the confirm (or lets the
            // reader go, and says so).
            if let Some(mut r) = self.try_reader() {
                drop(b);
                self.read_for_confirm(&mut r, epoch, deadline);
                drop(r);
                self.nudge();
                b = self.board();
                continue;
            }
            b.waiters += 1;
            let left = deadline.saturating_duration_since(now).min(CONFIRM_SLICE);
            b = self
                .changed
                .wait_timeout(b, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            b.waiters -= 1;
        }
    }

    /// One read for a lane waiting for a confirm: deliveries are kept for the idle lanes.
    fn read_for_confirm(&self, r: &mut Reader, epoch: u64, deadline: Instant) {
        if !self.current(epoch) {
            return;
        }
        let Some(link) = r.link.as_mut() else {
            return;
        };
        // The job is finishing whatever else happens: the stop flag is looked at after.
        let failed = match self.read(link, Some(deadline)) {
            Ok(Read::Delivery(d)) => link.conn.keep(*d).err(),
            Ok(_) => None,
            Err(e) => Some(e),
        };
        if let Some(e) = failed {
            self.fail(r, &e);
        }
    }

    /// A lane closes. The first cancels the consumer (the broker sends nothing new); the
    /// last gives back the deliveries that arrived and did not start (`basic.nack(requeue)`)
    /// and closes the connection, within about [`CLOSE_WAIT`]. Returns how many it gave back.
    pub(super) fn leave(&self) -> usize {
        let (cancel, last) = {
            let mut b = self.board();
            b.open = b.open.saturating_sub(1);
            let cancel = match (&b.writer, b.cancelled) {
                (Some(w), false) => Some((w.clone(), b.consumer_tag.clone())),
                _ => None,
            };
            b.cancelled = true;
            (cancel, b.open == 0)
        };
        if let Some((writer, tag)) = cancel {
            let _ = writer.send(|buf| link::cancel(buf, &tag));
        }
        if !last {
            return 0;
        }
        let mut r = self.reader.lock().unwrap_or_else(|p| p.into_inner());
        let answered = self.board().cancel_ok;
        let given = r
            .link
            .take()
            .map_or(0, |l| link::close(l, CLOSE_WAIT, answered));
        let mut b = self.board();
        b.writer = None;
        b.cancelled = false;
        b.cancel_ok = false;
        given
    }
}
