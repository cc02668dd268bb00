//! The worker's link to a broker: its connection and channel (confirms, qos for every lane),
//! the declared topology and the consumer, each step bounded by `io_timeout` and given up when
//! the lanes are woken to stop.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use super::conn::{Conn, Event, Options, CHANNEL};
use super::wire::{self, Value};
use super::Setup;
use crate::error::Result;

/// The connection and its consumer.
pub(super) struct Link {
    pub(super) conn: Conn,
    pub(super) consumer_tag: String,
}

/// Connects to broker `url` and opens the consumer: confirms, qos, `[source.declare]`,
/// `basic.consume`. `epoch` tells this link from the source's earlier ones; `wake` gives up
/// any wait.
pub(super) fn open(s: &Setup, url: usize, epoch: u64, wake: &Arc<OwnedFd>) -> Result<Link> {
    let u = &s.cfg.urls[url];
    let tls = super::tls_target(&s.cfg, s.tls.as_ref(), u)?;
    let opts = Options {
        name: &s.name,
        heartbeat: s.cfg.heartbeat,
        // Frames no larger than a job needs (the broker may ask for smaller ones).
        frame_max: (s.max_payload + 4096).clamp(8192, 1 << 20),
        max_body: s.max_payload,
        io_timeout: s.cfg.io_timeout,
        // The prefetch, and as many again in flight while a cancel is answered.
        max_pending: usize::from(s.prefetch) * 2 + 1,
        busy_poll: s.cfg.busy_poll,
    };
    let mut conn = Conn::open(u, tls.as_ref(), &opts, Some(Arc::clone(wake)))?;
    s.beats.add(conn.io());
    conn.confirm_select()?;
    conn.call(
        wire::BASIC_QOS,
        |a| {
            a.u32(0).u16(s.prefetch).bits(&[false]);
        },
        wire::BASIC_QOS_OK,
        "basic.qos",
    )?;
    declare(s, &mut conn)?;
    let consumer_tag: String = format!("{} {}", s.name, epoch).chars().take(250).collect();
    conn.call(
        wire::BASIC_CONSUME,
        |a| {
            a.u16(0)
                .short(s.cfg.queue.as_bytes())
                .short(consumer_tag.as_bytes())
                .bits(&[false, false, false, false])
                .table(&[]);
        },
        wire::BASIC_CONSUME_OK,
        "basic.consume",
    )?;
    Ok(Link { conn, consumer_tag })
}

/// `[source.declare]`: the durable queue, the durable exchange, the binding.
fn declare(s: &Setup, conn: &mut Conn) -> Result<()> {
    let Some(d) = &s.cfg.declare else {
        return Ok(());
    };
    let queue = s.cfg.queue.as_bytes();
    let mut args = Vec::new();
    if let Some(dlx) = &d.dead_letter_exchange {
        args.push(("x-dead-letter-exchange", Value::Str(dlx.as_bytes())));
    }
    if let Some(t) = &d.queue_type {
        args.push(("x-queue-type", Value::Str(t.as_bytes())));
    }
    // passive, durable, exclusive, auto-delete, nowait
    conn.call(
        wire::QUEUE_DECLARE,
        |a| {
            a.u16(0)
                .short(queue)
                .bits(&[false, true, false, false, false])
                .table(&args);
        },
        wire::QUEUE_DECLARE_OK,
        "queue.declare",
    )?;
    if let Some(exchange) = &d.exchange {
        // passive, durable, auto-delete, internal, nowait
        conn.call(
            wire::EXCHANGE_DECLARE,
            |a| {
                a.u16(0)
                    .short(exchange.as_bytes())
                    .short(d.kind.as_bytes())
                    .bits(&[false, true, false, false, false])
                    .table(&[]);
            },
            wire::EXCHANGE_DECLARE_OK,
            "exchange.declare",
        )?;
        conn.call(
            wire::QUEUE_BIND,
            |a| {
                a.u16(0)
                    .short(queue)
                    .short(exchange.as_bytes())
                    .short(d.routing_key.as_bytes())
                    .bits(&[false])
                    .table(&[]);
            },
            wire::QUEUE_BIND_OK,
            "queue.bind",
        )?;
    }
    Ok(())
}

/// Appends `basic.cancel` of consumer `tag` (the broker delivers nothing new after its answer).
pub(super) fn cancel(buf: &mut Vec<u8>, tag: &str) {
    wire::method(buf, CHANNEL, wire::BASIC_CANCEL, |a| {
        a.short(tag.as_bytes()).bits(&[false]);
    })
}

/// After the consumer's cancel was sent (`answered`: the broker said so already): waits for its
/// answer, gives back the deliveries that arrived and did not start (`basic.nack(requeue)`),
/// and closes the connection, within about `limit` in all. Returns how many it gave back.
pub(super) fn close(mut link: Link, limit: Duration, answered: bool) -> usize {
    let deadline = std::time::Instant::now() + limit;
    if !answered {
        // Deliveries sent before the cancel arrive first, then its answer.
        while let Ok(ev) = link.conn.next(Some(deadline)) {
            let done = match ev {
                Event::Delivery(d) => link.conn.keep(d).is_err(),
                Event::Method(wire::BASIC_CANCEL_OK, _) | Event::TimedOut => true,
                _ => false,
            };
            if done {
                break;
            }
        }
    }
    let tags: Vec<u64> = link.conn.pending.drain(..).map(|d| d.tag).collect();
    let given = if tags.is_empty() {
        0
    } else {
        let sent = link.conn.send(|b| {
            for t in &tags {
                wire::method(b, CHANNEL, wire::BASIC_NACK, |a| {
                    a.u64(*t).bits(&[false, true]);
                });
            }
        });
        if sent.is_ok() {
            tags.len()
        } else {
            0
        }
    };
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    link.conn.close(left.max(Duration::from_millis(100)));
    given
}
