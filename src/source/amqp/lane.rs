//! One lane's connection, channel and consumer, and the job it holds.

use std::time::{Duration, Instant};

use super::conn::{Delivery, Event, CHANNEL};
use super::link::Link;
use super::wire::{self, Props, Value};
use super::{Setup, CLOSE_WAIT};
use crate::error::{Error, Result};
use crate::jobs::functions::{JobResult, NoProgress, Progress};
use crate::kinds::ConnState;
use crate::shutdown::Shutdown;
use crate::source::lane::{Claimed, Lane};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// The header a reply carries: `done` or `failed`.
pub const OUTCOME_HEADER: &str = "x-gearshift-outcome";

/// The delivery a claimed job came from.
struct InHand {
    id: String,
    tag: u64,
    epoch: u64,
    reply_to: Option<Vec<u8>>,
    correlation_id: Option<Vec<u8>>,
    message_id: Option<Vec<u8>>,
}

pub(super) struct AmqpLane {
    s: Setup,
    link: Option<Link>,
    epoch: u64,
    /// The broker of the last link, or of the next try.
    url: usize,
    backoff: Duration,
    retry_at: Instant,
    logged: String,
    in_hand: Option<InHand>,
    progress: NoProgress,
}

impl AmqpLane {
    pub(super) fn new(s: Setup) -> AmqpLane {
        let lane = AmqpLane {
            // A fleet started together spreads over the brokers instead of all connecting to
            // the first one listed.
            url: std::process::id() as usize % s.cfg.urls.len().max(1),
            s,
            link: None,
            epoch: 0,
            backoff: BACKOFF_MIN,
            retry_at: Instant::now(),
            logged: String::new(),
            in_hand: None,
            progress: NoProgress,
        };
        for u in &lane.s.cfg.urls {
            lane.view(&u.shown, ConnState::Connecting, None);
        }
        lane
    }

    fn view(&self, addr: &str, state: ConnState, error: Option<String>) {
        crate::status::show_server(&self.s.views, addr, self.s.index, state, error);
    }

    /// Connects to the current broker and opens this lane's consumer.
    fn connect(&mut self) -> Result<()> {
        self.epoch += 1;
        let shown = self.s.cfg.urls[self.url].shown.clone();
        self.view(&shown, ConnState::Connecting, None);
        self.link = Some(super::link::open(&self.s, self.url, self.epoch)?);
        self.backoff = BACKOFF_MIN;
        if !self.logged.is_empty() {
            log::info!("amqp {shown}: lane {} consuming again", self.s.index);
            self.logged.clear();
        }
        self.view(&shown, ConnState::Connected, None);
        Ok(())
    }

    /// Drops the link (the broker requeues whatever it held) and schedules a new one, on the
    /// next broker, with backoff and jitter.
    fn fail(&mut self, why: &str) {
        let url = self.s.cfg.urls[self.url].shown.clone();
        self.link = None;
        if self.logged != why {
            log::warn!(
                "amqp {url}: lane {}: {why}; retrying with backoff (up to {:?})",
                self.s.index,
                self.s.cfg.reconnect_max
            );
            self.logged = why.to_string();
        }
        self.view(&url, ConnState::BackingOff, Some(why.to_string()));
        crate::status::count_reconnect(&self.s.views, &url, self.s.index);
        let jitter = 0.75 + 0.5 * crate::clock::random_fraction();
        self.retry_at = Instant::now() + self.backoff.mul_f64(jitter);
        self.backoff = (self.backoff * 2).min(self.s.cfg.reconnect_max);
        self.url = (self.url + 1) % self.s.cfg.urls.len().max(1);
    }

    /// A delivery as a claimed job, or None when it needs no run (a redelivery of a job that
    /// already succeeded, acknowledged here).
    fn claim(&mut self, epoch: u64, d: Delivery) -> Result<Option<Claimed>> {
        let p = d.props;
        let message_id = p.message_id.filter(|m| !m.is_empty());
        // A redelivery, or a publisher's retry, of a job that already succeeded.
        let done = self.s.cfg.dedupe_ids > 0
            && message_id
                .as_ref()
                .is_some_and(|id| self.s.dedupe.lock().is_ok_and(|set| set.seen(id)));
        if done {
            log::info!(
                "amqp: message {} already succeeded: acknowledged without running it again",
                escape(message_id.as_deref().unwrap_or_default())
            );
            self.ack(d.tag, true)?;
            return Ok(None);
        }
        let function = match &p.kind {
            Some(t) => String::from_utf8_lossy(t).into_owned(),
            None => self.s.cfg.function.clone().unwrap_or_default(),
        };
        let id = match &message_id {
            Some(m) => escape(m),
            None => format!("amqp-{}-{}-{}", self.s.index, epoch, d.tag),
        };
        self.in_hand = Some(InHand {
            id: id.clone(),
            tag: d.tag,
            epoch,
            reply_to: p.reply_to.filter(|r| !r.is_empty()),
            correlation_id: p.correlation_id,
            message_id,
        });
        Ok(Some(Claimed {
            id,
            function,
            unique: String::new(),
            payload: d.body,
            attempt: if d.redelivered { 2 } else { 1 },
            submitted_ms: p.timestamp.map_or(0, |t| t.saturating_mul(1000)),
            oversized: d.oversized,
        }))
    }

    /// `basic.ack` (done) or `basic.nack` without requeue (failed: dead-lettered if the queue
    /// has a dead-letter exchange). One write; the broker does not answer it. If the
    /// connection breaks before the broker reads it, the broker delivers the job again.
    fn ack(&mut self, tag: u64, done: bool) -> Result<()> {
        let link = self
            .link
            .as_ref()
            .ok_or_else(|| Error::Gone("no connection".into()))?;
        let sent = link.conn.send(|b| {
            if done {
                wire::method(b, CHANNEL, wire::BASIC_ACK, |a| {
                    a.u64(tag).bits(&[false]);
                })
            } else {
                wire::method(b, CHANNEL, wire::BASIC_NACK, |a| {
                    a.u64(tag).bits(&[false, false]);
                })
            }
        });
        sent.inspect_err(|e| self.fail(&e.to_string()))
    }

    /// Publishes the reply a message asked for (`reply_to`), and waits for the broker's confirm.
    /// While the broker blocks publishing (`connection.blocked`), it waits.
    fn reply(&mut self, hand: &InHand, outcome: &JobResult) -> Result<()> {
        let Some(reply_to) = &hand.reply_to else {
            return Ok(());
        };
        let (body, word) = match outcome {
            Ok(r) => (r.as_slice(), "done"),
            Err(e) => (e.message.as_bytes(), "failed"),
        };
        let props = Props {
            headers: Some(wire::table_bytes(&[(
                OUTCOME_HEADER,
                Value::Str(word.as_bytes()),
            )])),
            correlation_id: hand.correlation_id.clone(),
            ..Props::default()
        };
        self.publish_reply(hand, reply_to, body, &props)
            .inspect_err(|e| {
                if !matches!(e, Error::Peer(m) if m.contains("(nack)")) {
                    self.fail(&e.to_string());
                }
            })
    }

    /// Publishes a reply and waits for its confirm.
    fn publish_reply(
        &mut self,
        hand: &InHand,
        reply_to: &[u8],
        body: &[u8],
        props: &Props,
    ) -> Result<()> {
        let link = self
            .link
            .as_mut()
            .ok_or_else(|| Error::Gone("no connection".into()))?;
        let frame_max = link.conn.frame_max();
        link.conn.send(|b| {
            wire::method(b, CHANNEL, wire::BASIC_PUBLISH, |a| {
                a.u16(0).short(b"").short(reply_to).bits(&[false, false]);
            });
            wire::content(b, CHANNEL, props, body, frame_max);
        })?;
        link.conn.published += 1;
        let seq = link.conn.published;
        let io_timeout = self.s.cfg.io_timeout;
        let mut said = false;
        let mut deadline = Instant::now() + io_timeout;
        loop {
            match link.conn.next(Some(deadline))? {
                Event::Confirm { tag, multiple, ack } if tag == seq || (multiple && tag > seq) => {
                    return if ack {
                        Ok(())
                    } else {
                        Err(Error::Peer("the broker refused the reply (nack)".into()))
                    };
                }
                Event::Delivery(d) => link.conn.keep(d)?,
                // The job is finishing whatever else happens: the stop is looked at after.
                Event::Woken | Event::Confirm { .. } | Event::Method(..) | Event::Returned => {}
                Event::Cancelled => {
                    return Err(Error::Gone("the broker cancelled the consumer".into()))
                }
                // A resource alarm (`connection.blocked`): the confirm waits for its end, as
                // long as the connection lives.
                Event::TimedOut if link.conn.blocked => {
                    if !said {
                        log::warn!("amqp: the broker blocks publishing (a resource alarm): job {}'s reply waits", hand.id);
                        said = true;
                    }
                    deadline = Instant::now() + io_timeout;
                }
                Event::TimedOut => {
                    return Err(Error::TimedOut(format!(
                        "publishing the reply: no confirm within {io_timeout:?}"
                    )))
                }
            }
        }
    }

    /// Waits until the next try at connecting, or a wake-up.
    fn pause(&self) {
        super::conn::sleep_until(self.retry_at, &self.s.wake);
    }
}

fn escape(b: &[u8]) -> String {
    crate::text::escape(&String::from_utf8_lossy(b)).into_owned()
}

impl Lane for AmqpLane {
    fn next(&mut self, stop: &Shutdown) -> Result<Option<Claimed>> {
        loop {
            if stop.is_set() {
                return Ok(None);
            }
            let Some(link) = self.link.as_mut() else {
                if Instant::now() < self.retry_at {
                    self.pause();
                    continue;
                }
                if let Err(e) = self.connect() {
                    if stop.is_set() {
                        return Ok(None);
                    }
                    self.fail(&e.to_string());
                }
                continue;
            };
            let epoch = link.epoch;
            let got = match link.conn.pending.pop_front() {
                Some(d) => Ok(Event::Delivery(d)),
                None => link.conn.next(None),
            };
            match got {
                Ok(Event::Delivery(d)) => {
                    if let Some(job) = self.claim(epoch, d)? {
                        return Ok(Some(job));
                    }
                }
                // Woken: look at the stop flag.
                Ok(Event::Woken | Event::TimedOut | Event::Confirm { .. } | Event::Returned) => {}
                Ok(Event::Cancelled) => self.fail("the broker cancelled the consumer"),
                Ok(Event::Method(id, _)) => self.fail(&format!(
                    "the broker sent method {id:?}, which a consumer does not expect"
                )),
                Err(e) => self.fail(&e.to_string()),
            }
        }
    }

    fn progress(&mut self) -> &mut dyn Progress {
        &mut self.progress
    }

    fn finish(&mut self, job: &Claimed, outcome: &JobResult) -> Result<()> {
        let Some(hand) = self.in_hand.take().filter(|h| h.id == job.id) else {
            return Err(Error::Internal(format!(
                "amqp: job {} is not in hand",
                job.id
            )));
        };
        if self.link.as_ref().map(|l| l.epoch) != Some(hand.epoch) {
            return Err(Error::Gone(format!(
                "amqp: the connection that delivered job {} is gone: the broker delivers it again",
                hand.id
            )));
        }
        self.reply(&hand, outcome)?;
        let done = outcome.is_ok();
        if done && self.s.cfg.dedupe_ids > 0 {
            if let (Some(id), Ok(mut set)) = (&hand.message_id, self.s.dedupe.lock()) {
                set.record(id);
            }
        }
        self.ack(hand.tag, done)
    }

    /// Cancels the consumer, gives back what arrived but did not start, closes the connection
    /// (each step bounded; the broker requeues whatever is left either way).
    fn close(&mut self) -> Result<()> {
        if let Some(link) = self.link.take() {
            let given_back = super::link::close(link, CLOSE_WAIT);
            if given_back > 0 {
                log::info!("amqp: gave back {given_back} delivery(ies) that had not started");
            }
        }
        Ok(())
    }

    fn release(&mut self, job: &Claimed) -> bool {
        let Some(hand) = self.in_hand.take().filter(|h| h.id == job.id) else {
            return false;
        };
        let Some(link) = self.link.as_ref().filter(|l| l.epoch == hand.epoch) else {
            // Its connection is gone: the broker has it again.
            return true;
        };
        let _ = link.conn.send(|b| {
            wire::method(b, CHANNEL, wire::BASIC_NACK, |a| {
                a.u64(hand.tag).bits(&[false, true]);
            })
        });
        true
    }
}
