//! One lane's connection, channel and consumer, and the job it holds.

use std::time::{Duration, Instant};

use futures_lite::StreamExt;
use lapin::options::{BasicAckOptions, BasicCancelOptions, BasicNackOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::BasicProperties;

use super::link::{drop_link, Link};
use super::wait::bounded;
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
    reply_to: Option<ShortString>,
    correlation_id: Option<ShortString>,
    message_id: Option<ShortString>,
}

pub(super) struct AmqpLane {
    s: Setup,
    link: Option<Link>,
    epoch: u64,
    /// The broker of the last link (for `status`).
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
            url: 0,
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

    /// Opens this lane's channel and consumer on the generation's connection (made now if
    /// there is none).
    fn connect(&mut self, stop: &Shutdown) -> Result<()> {
        let shared = self.s.broker.connection(&self.s, stop).inspect_err(|_| {
            self.url = self.s.broker.tried() % self.s.cfg.urls.len().max(1);
        })?;
        self.url = shared.url;
        self.epoch += 1;
        let shown = self.s.cfg.urls[shared.url].shown.clone();
        self.view(&shown, ConnState::Connecting, None);
        let epoch = shared.epoch;
        match super::link::open(&self.s, shared, self.epoch, stop) {
            Ok(link) => self.link = Some(link),
            Err(e) => {
                self.s.broker.failed_if_closed(epoch);
                return Err(e);
            }
        }
        self.backoff = BACKOFF_MIN;
        if !self.logged.is_empty() {
            log::info!("amqp {shown}: lane {} consuming again", self.s.index);
            self.logged.clear();
        }
        self.view(&shown, ConnState::Connected, None);
        Ok(())
    }

    /// Drops the link (its channel; the connection too if it is the one that failed) and
    /// schedules a new one with backoff and jitter.
    fn fail(&mut self, why: &str) {
        let url = self.s.cfg.urls[self.url].shown.clone();
        if let Some(link) = self.link.take() {
            self.s.broker.failed_if_closed(link.shared.epoch);
            // Whatever it held goes back to the queue when the channel closes.
            drop_link(link);
        }
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
    }

    /// A delivery as a claimed job, or None when it needs no run (a redelivery of a job that
    /// already succeeded, acknowledged here).
    fn claim(&mut self, epoch: u64, d: lapin::message::Delivery) -> Result<Option<Claimed>> {
        let p = &d.properties;
        let message_id = p.message_id().clone();
        // A redelivery, or a publisher's retry, of a job that already succeeded.
        let done = self.s.cfg.dedupe_ids > 0
            && message_id.as_ref().is_some_and(|id| {
                self.s
                    .dedupe
                    .lock()
                    .is_ok_and(|set| set.seen(id.as_str().as_bytes()))
            });
        if done {
            log::info!(
                "amqp: message {} already succeeded: acknowledged without running it again",
                crate::text::escape(message_id.as_ref().map_or("", |m| m.as_str()))
            );
            self.ack(d.delivery_tag, true)?;
            return Ok(None);
        }
        let function = match p.kind() {
            Some(t) => t.as_str().to_string(),
            None => self.s.cfg.function.clone().unwrap_or_default(),
        };
        let attempt = if d.redelivered { 2 } else { 1 };
        let id = match &message_id {
            Some(m) if !m.as_str().is_empty() => crate::text::escape(m.as_str()).into_owned(),
            _ => format!("amqp-{}-{}-{}", self.s.index, epoch, d.delivery_tag),
        };
        let oversized = (d.data.len() > self.s.max_payload).then_some(d.data.len());
        self.in_hand = Some(InHand {
            id: id.clone(),
            tag: d.delivery_tag,
            epoch,
            reply_to: p.reply_to().clone().filter(|r| !r.as_str().is_empty()),
            correlation_id: p.correlation_id().clone(),
            message_id,
        });
        Ok(Some(Claimed {
            id,
            function,
            unique: String::new(),
            payload: if oversized.is_some() {
                Vec::new()
            } else {
                d.data
            },
            attempt,
            submitted_ms: p.timestamp().map_or(0, |t| t.saturating_mul(1000)),
            oversized,
        }))
    }

    /// `basic.ack` (done) or `basic.nack` without requeue (failed: dead-lettered if the queue
    /// has a dead-letter exchange). The frame is queued for lapin's I/O thread and not waited
    /// for: the broker does not answer an ack anyway, and if the connection breaks before it is
    /// written, the broker delivers the job again (the next delivery shows the break).
    fn ack(&mut self, tag: u64, done: bool) -> Result<()> {
        let link = self
            .link
            .as_ref()
            .ok_or_else(|| Error::Gone("no connection".into()))?;
        let now = Some(Instant::now());
        let first = if done {
            super::wait::run_until(
                link.channel.basic_ack(tag, BasicAckOptions::default()),
                now,
                None,
            )
        } else {
            super::wait::run_until(
                link.channel.basic_nack(tag, BasicNackOptions::default()),
                now,
                None,
            )
        };
        match first {
            Some(Err(e)) => {
                let e = super::wait::lapin_error(if done { "basic.ack" } else { "basic.nack" }, &e);
                self.fail(&e.to_string());
                Err(e)
            }
            _ => Ok(()),
        }
    }

    /// Publishes the reply a message asked for (`reply_to`), and waits for the broker's confirm.
    /// While the broker blocks publishing (`connection.blocked`), it waits.
    fn reply(&mut self, hand: &InHand, outcome: &JobResult) -> Result<()> {
        let Some(reply_to) = &hand.reply_to else {
            return Ok(());
        };
        let (body, word) = match outcome {
            Ok(r) => (r.clone(), "done"),
            Err(e) => (e.message.clone().into_bytes(), "failed"),
        };
        let mut headers = FieldTable::default();
        headers.insert(OUTCOME_HEADER.into(), AMQPValue::LongString(word.into()));
        let mut props = BasicProperties::default().with_headers(headers);
        if let Some(c) = &hand.correlation_id {
            props = props.with_correlation_id(c.clone());
        }
        let answer = self.publish_reply(hand, reply_to, &body, props);
        match answer {
            Ok(c) if c.is_nack() => Err(Error::Peer("the broker refused the reply (nack)".into())),
            Ok(_) => Ok(()),
            Err(e) => {
                let why = e.to_string();
                self.fail(&why);
                Err(e)
            }
        }
    }

    /// Publishes a reply and waits for its confirm.
    fn publish_reply(
        &self,
        hand: &InHand,
        reply_to: &ShortString,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<lapin::Confirmation> {
        let link = self
            .link
            .as_ref()
            .ok_or_else(|| Error::Gone("no connection".into()))?;
        let status = link.shared.conn.status();
        let mut said = false;
        let mut publish = std::pin::pin!(async {
            link.channel
                .basic_publish(
                    "".into(),
                    reply_to.clone(),
                    BasicPublishOptions::default(),
                    body,
                    props,
                )
                .await?
                .await
        });
        // While the broker blocks publishing (`connection.blocked`: a memory or disk alarm) the
        // confirm waits for the alarm to end, as long as the connection lives; otherwise for
        // `io_timeout`.
        loop {
            let deadline = Some(Instant::now() + self.s.cfg.io_timeout);
            match super::wait::run_until(publish.as_mut(), deadline, None) {
                Some(r) => {
                    break r.map_err(|e| super::wait::lapin_error("publishing the reply", &e))
                }
                None if status.blocked() && status.connected() => {
                    if !said {
                        log::warn!("amqp: the broker blocks publishing (a resource alarm): job {}'s reply waits", hand.id);
                        said = true;
                    }
                }
                None => {
                    break Err(Error::TimedOut(format!(
                        "publishing the reply: no confirm within {:?}",
                        self.s.cfg.io_timeout
                    )))
                }
            }
        }
    }
}

impl Lane for AmqpLane {
    fn next(&mut self, stop: &Shutdown) -> Result<Option<Claimed>> {
        loop {
            // Listening before looking at the flag: a wake in between is not lost.
            let woken = self.s.wake.listen();
            if stop.is_set() {
                return Ok(None);
            }
            let Some(link) = self.link.as_mut() else {
                let wait = self.retry_at.saturating_duration_since(Instant::now());
                if !wait.is_zero() {
                    super::wait::run_until(woken, Some(Instant::now() + wait), None);
                    continue;
                }
                if let Err(e) = self.connect(stop) {
                    if stop.is_set() {
                        return Ok(None);
                    }
                    self.fail(&e.to_string());
                }
                continue;
            };
            let epoch = link.epoch;
            let got = super::wait::run(futures_lite::future::or(
                async { Some(link.consumer.next().await) },
                async {
                    woken.await;
                    None
                },
            ));
            match got {
                // Woken: look at the stop flag.
                None => {}
                Some(Some(Ok(d))) => {
                    if let Some(job) = self.claim(epoch, d)? {
                        return Ok(Some(job));
                    }
                }
                Some(Some(Err(e))) => self.fail(&crate::text::escape(&e.to_string())),
                Some(None) => self.fail("the broker cancelled the consumer"),
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
                set.record(id.as_str().as_bytes());
            }
        }
        self.ack(hand.tag, done)
    }

    /// Cancels the consumer, gives back what arrived but did not start, closes the channel and
    /// the connection (each step bounded; the broker requeues whatever is left either way).
    fn close(&mut self) -> Result<()> {
        let Some(link) = self.link.take() else {
            return Ok(());
        };
        let _ = bounded(
            CLOSE_WAIT,
            "basic.cancel",
            link.channel
                .basic_cancel(link.consumer_tag.clone(), BasicCancelOptions::default()),
        );
        let mut given_back = 0;
        let mut link = link;
        // Deliveries that arrived and did not start: back to the queue, not to wait for the
        // channel's close.
        while let Some(Some(Ok(d))) =
            futures_lite::future::block_on(futures_lite::future::poll_once(link.consumer.next()))
        {
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            if bounded(
                CLOSE_WAIT,
                "basic.nack",
                link.channel.basic_nack(d.delivery_tag, requeue),
            )
            .is_ok()
            {
                given_back += 1;
            }
        }
        if given_back > 0 {
            log::info!("amqp: gave back {given_back} delivery(ies) that had not started");
        }
        drop_link(link);
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
        let requeue = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        let _ = bounded(
            CLOSE_WAIT,
            "basic.nack",
            link.channel.basic_nack(hand.tag, requeue),
        );
        true
    }
}
