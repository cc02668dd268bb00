//! A lane: the job it holds, taken from the connection the lanes share ([`super::shared`]).

use std::sync::Arc;
use std::time::Duration;

use super::conn::{Writer, CHANNEL};
use super::shared::{Got, Shared};
use super::wire::{self, Props, Value};
use super::Setup;
use crate::error::{Error, Result};
use crate::jobs::functions::{JobResult, NoProgress, Progress};
use crate::shutdown::Shutdown;
use crate::source::lane::{Claimed, Lane};

/// The pauses before a reply the broker refused is published again.
const REPLY_PAUSES_MS: [u64; 2] = [100, 300];
/// How many times a reply the broker refuses is published.
const REPLY_TRIES: usize = REPLY_PAUSES_MS.len() + 1;

/// The header a reply carries: `done` or `failed`.
pub const OUTCOME_HEADER: &str = "x-gearshift-outcome";

/// The delivery a claimed job came from, and the link that delivered it.
struct InHand {
    id: String,
    tag: u64,
    epoch: u64,
    writer: Writer,
    reply_to: Option<Vec<u8>>,
    correlation_id: Option<Vec<u8>>,
    /// The request's `delivery_mode`, which its reply keeps: a persistent request's reply
    /// outlives a broker restart in a durable reply queue, as the request would have.
    delivery_mode: Option<u8>,
    message_id: Option<Vec<u8>>,
    /// Its key among the runs that ended the worker ([`crate::source::attempts`]).
    key: String,
}

pub(super) struct AmqpLane {
    s: Arc<Setup>,
    shared: Arc<Shared>,
    index: usize,
    in_hand: Option<InHand>,
    progress: NoProgress,
    /// Closed: no longer counted among the connection's lanes.
    left: bool,
}

impl AmqpLane {
    pub(super) fn new(s: Arc<Setup>, shared: Arc<Shared>, index: usize) -> AmqpLane {
        shared.join(index);
        AmqpLane {
            s,
            shared,
            index,
            in_hand: None,
            progress: NoProgress,
            left: false,
        }
    }

    /// A delivery as a claimed job, or None when it needs no run (a redelivery of a job that
    /// already succeeded, acknowledged here).
    fn claim(&mut self, got: Got) -> Result<Option<Claimed>> {
        let Got {
            delivery: d,
            writer,
            epoch,
        } = got;
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
            ack(&writer, d.tag, true)?;
            return Ok(None);
        }
        let function = match &p.kind {
            // Invalid UTF-8 as `\xNN`: shown as it came, and no function's name.
            Some(t) => crate::text::invalid_as_hex(t),
            None => self.s.cfg.function.clone().unwrap_or_default(),
        };
        let id = match &message_id {
            Some(m) => escape(m),
            None => format!("amqp-{}-{}-{}", self.index, epoch, d.tag),
        };
        let mut unrun = d.unreadable.or(d.oversized.map(|len| {
            format!("payload is {len} bytes, over max_payload_bytes: read past and discarded unrun")
        }));
        let key =
            crate::source::attempts::key(&[message_id.as_deref().unwrap_or_default(), &d.body]);
        if let Ok(mut attempts) = self.s.attempts.lock() {
            let cut = attempts.interrupted(&key);
            let limit = self.s.cfg.max_attempts;
            if d.redelivered && unrun.is_none() && cut >= limit {
                unrun = Some(format!(
                    "its last {cut} run(s) ended the worker (max_attempts = {limit}): dead-lettered unrun"
                ));
            }
            if unrun.is_none() {
                attempts.running(self.index, Some(&key));
            }
        }
        self.in_hand = Some(InHand {
            id: id.clone(),
            tag: d.tag,
            epoch,
            writer,
            reply_to: p.reply_to.filter(|r| !r.is_empty()),
            correlation_id: p.correlation_id,
            delivery_mode: p
                .delivery_mode
                .filter(|&m| m == 2 && self.s.cfg.persistent_replies),
            message_id,
            key,
        });
        Ok(Some(Claimed {
            id,
            function,
            unique: String::new(),
            payload: d.body,
            attempt: if d.redelivered { 2 } else { 1 },
            submitted_ms: p.timestamp.map_or(0, |t| t.saturating_mul(1000)),
            unrun,
        }))
    }

    /// Publishes the reply a message asked for (`reply_to`), and waits for the broker's confirm;
    /// a reply the broker refuses is sent again, [`REPLY_TRIES`] times in all, 0.1 s and then
    /// 0.3 s apart. False: refused every time.
    fn reply(&self, hand: &InHand, outcome: &JobResult) -> Result<bool> {
        let Some(reply_to) = &hand.reply_to else {
            return Ok(true);
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
            delivery_mode: hand.delivery_mode,
            ..Props::default()
        };
        let frame_max = hand.writer.frame_max();
        for tried in 0..REPLY_TRIES {
            let confirmed = self
                .shared
                .publish(&hand.writer, hand.epoch, &hand.id, |b| {
                    wire::method(b, CHANNEL, wire::BASIC_PUBLISH, |a| {
                        a.u16(0).short(b"").short(reply_to).bits(&[false, false]);
                    });
                    wire::content(b, CHANNEL, &props, body, frame_max);
                })?;
            if confirmed {
                return Ok(true);
            }
            if let Some(&ms) = REPLY_PAUSES_MS.get(tried) {
                std::thread::sleep(Duration::from_millis(ms));
            }
        }
        Ok(false)
    }
}

/// `basic.ack` (done) or `basic.nack` without requeue (failed: dead-lettered if the queue has a
/// dead-letter exchange). One write; the broker does not answer it. If the connection breaks
/// before the broker reads it, the broker delivers the job again; a write that fails gives the
/// connection up (the lane reading it then connects again).
fn ack(writer: &Writer, tag: u64, done: bool) -> Result<()> {
    let sent = writer.send(|b| {
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
    sent.inspect_err(|_| writer.cut())
}

fn escape(b: &[u8]) -> String {
    crate::text::escape_bytes(b)
}

impl Lane for AmqpLane {
    fn next(&mut self, stop: &Shutdown) -> Result<Option<Claimed>> {
        loop {
            if stop.is_set() {
                return Ok(None);
            }
            // None: woken, or the connection failed (and a new one waits for its turn).
            if let Some(got) = self.shared.next(stop) {
                if let Some(job) = self.claim(got)? {
                    return Ok(Some(job));
                }
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
        // The run ended, and the worker lived through it.
        if let Ok(mut attempts) = self.s.attempts.lock() {
            attempts.running(self.index, None);
            attempts.ended(&hand.key);
        }
        if !self.shared.current(hand.epoch) {
            return Err(Error::Gone(format!(
                "amqp: the connection that delivered job {} is gone: the broker delivers it again",
                hand.id
            )));
        }
        let done = outcome.is_ok();
        if !self.reply(&hand, outcome)? {
            // Settled all the same: the job ran, and its delivery held unacknowledged would
            // hold its prefetch slot for as long as the connection lives.
            let why = format!(
                "job {} {}: the broker refused its reply {REPLY_TRIES} times (basic.nack: a full \
                 reply queue with x-overflow = reject-publish?): the reply is lost, the message {}",
                hand.id,
                job.function,
                if done {
                    "acknowledged"
                } else {
                    "dead-lettered"
                }
            );
            log::error!("{why}");
            self.shared.note(&why);
            crate::metrics::REPLIES_LOST.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if done && self.s.cfg.dedupe_ids > 0 {
            if let (Some(id), Ok(mut set)) = (&hand.message_id, self.s.dedupe.lock()) {
                set.record(id);
            }
        }
        ack(&hand.writer, hand.tag, done)
    }

    /// Leaves the connection: the first lane to close cancels the consumer, the last gives
    /// back what arrived but did not start and closes the connection (each step bounded; the
    /// broker requeues whatever is left either way).
    fn close(&mut self) -> Result<()> {
        if !self.left {
            self.left = true;
            let given_back = self.shared.leave();
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
        // Never run.
        if let Ok(mut attempts) = self.s.attempts.lock() {
            attempts.running(self.index, None);
        }
        // Its connection gone, the broker has it again.
        if self.shared.current(hand.epoch) {
            let _ = hand.writer.send(|b| {
                wire::method(b, CHANNEL, wire::BASIC_NACK, |a| {
                    a.u64(hand.tag).bits(&[false, true]);
                })
            });
        }
        true
    }
}

impl Drop for AmqpLane {
    /// A lane that ends without closing (its thread panicked) no longer counts among the
    /// connection's lanes, so the last one still closes it.
    fn drop(&mut self) {
        let _ = self.close();
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_message_id_is_shown_escaped_byte_for_byte() {
        // Two ids of invalid UTF-8 were both shown as "\u{fffd}": now each byte as it is.
        assert_eq!(super::escape(b"m\xff\xfe\x1b[2J"), "m\\xff\\xfe\\e[2J");
        assert_ne!(super::escape(b"\xff"), super::escape(b"\xfe"));
    }

    #[test]
    fn a_type_of_invalid_utf8_names_no_function_and_is_shown_as_it_came() {
        let shown = crate::text::invalid_as_hex(b"echo\xff");
        assert_eq!(shown, "echo\\xff");
        assert!(crate::config::check_function_name(&shown).is_err());
    }
}
