//! Publishing jobs to the configured queue (`gearshift submit` to an AMQP source), and the RPC
//! form: a reply queue of the client's own, `reply_to` and `correlation_id`, the answer awaited.

use std::time::{Duration, Instant};

use super::conn::{Conn, Event, Options, CHANNEL};
use super::lane::OUTCOME_HEADER;
use super::wire::{self, Props};
use crate::config::AmqpConfig;
use crate::error::{Error, Result};

/// Publishes in flight before their confirms are awaited.
const WINDOW: u64 = 1000;

/// A job's answer, for `submit --wait`.
pub struct Answer {
    pub done: bool,
    pub body: Vec<u8>,
}

/// A connection to the first broker that answers, with publisher confirms on.
fn connect(cfg: &AmqpConfig) -> Result<Conn> {
    let tls = super::tls_config(cfg)?;
    let opts = Options {
        name: "gearshift submit",
        heartbeat: Duration::ZERO,
        frame_max: 128 * 1024,
        max_body: usize::try_from(crate::config::MAX_PAYLOAD).unwrap_or(usize::MAX),
        io_timeout: cfg.io_timeout,
        // Answers on the client's own reply queue: one is awaited.
        max_pending: 1000,
        busy_poll: std::time::Duration::ZERO,
    };
    let mut errors = Vec::new();
    for url in &cfg.urls {
        let target = match super::tls_target(cfg, tls.as_ref(), url) {
            Ok(t) => t,
            Err(e) => {
                errors.push(format!("{}: {e}", url.shown));
                continue;
            }
        };
        let opened = Conn::open(url, target.as_ref(), &opts, None).and_then(|mut c| {
            c.confirm_select()?;
            Ok(c)
        });
        match opened {
            Ok(c) => return Ok(c),
            Err(e) => errors.push(format!("{}: {e}", url.shown)),
        }
    }
    Err(Error::Peer(format!(
        "no AMQP broker reachable ({})",
        errors.join("; ")
    )))
}

/// Publishes `count` persistent messages (`mandatory`: one no queue takes comes back) and waits
/// for every confirm ([`WINDOW`] in flight).
fn publish(
    conn: &mut Conn,
    cfg: &AmqpConfig,
    function: &str,
    payload: &[u8],
    count: u64,
    props: &Props,
) -> Result<()> {
    if function.len() > 255 {
        return Err(Error::Msg("a function name is at most 255 bytes".into()));
    }
    let (exchange, key) = match &cfg.declare {
        Some(d) if d.exchange.is_some() => (
            d.exchange.clone().unwrap_or_default(),
            d.routing_key.clone(),
        ),
        _ => (String::new(), cfg.queue.clone()),
    };
    let frame_max = conn.frame_max();
    let last = conn.published + count;
    // The publishes not confirmed yet: confirms may come out of order, one or many at a time.
    let mut waiting = std::collections::BTreeSet::new();
    let mut nacked = 0u64;
    let mut returned = 0u64;
    while conn.published < last || !waiting.is_empty() {
        let batch = (last - conn.published).min(WINDOW.saturating_sub(waiting.len() as u64));
        if batch > 0 {
            conn.send(|b| {
                for _ in 0..batch {
                    let p = Props {
                        kind: Some(function.as_bytes().to_vec()),
                        timestamp: Some(crate::clock::now_ms() / 1000),
                        delivery_mode: Some(2),
                        message_id: Some(message_id().into_bytes()),
                        ..props.clone()
                    };
                    wire::method(b, CHANNEL, wire::BASIC_PUBLISH, |a| {
                        a.u16(0)
                            .short(exchange.as_bytes())
                            .short(key.as_bytes())
                            .bits(&[true, false]);
                    });
                    wire::content(b, CHANNEL, &p, payload, frame_max);
                }
            })?;
            waiting.extend(conn.published + 1..=conn.published + batch);
            conn.published += batch;
        }
        let deadline = Instant::now() + cfg.io_timeout;
        match conn.next(Some(deadline))? {
            Event::Confirm { tag, multiple, ack } => {
                let done: Vec<u64> = if multiple {
                    waiting.range(..=tag).copied().collect()
                } else {
                    waiting.get(&tag).copied().into_iter().collect()
                };
                for t in &done {
                    waiting.remove(t);
                }
                if !ack {
                    nacked += done.len() as u64;
                }
            }
            Event::TimedOut => {
                // Sent, but the broker reads nothing while its alarm lasts: it may take
                // them once the alarm ends, so a second submit could queue the jobs twice.
                let why = conn.blocked.as_ref().map_or_else(String::new, |why| {
                    format!(
                        ": the broker blocks publishing ({why}: a memory or disk alarm), and may \
                         still take them once it lifts the alarm"
                    )
                });
                return Err(Error::TimedOut(format!(
                    "publishing: {} of {count} message(s) unconfirmed after {}{why}",
                    waiting.len() as u64 + (last - conn.published),
                    crate::clock::human(cfg.io_timeout)
                )));
            }
            Event::Returned => returned += 1,
            // An answer (`call`) can come before the confirm of its request.
            Event::Delivery(d) => conn.keep(d)?,
            _ => {}
        }
    }
    if returned > 0 {
        let to = match &cfg.declare {
            Some(d) if d.exchange.is_some() => {
                format!("exchange \"{exchange}\" with routing key \"{key}\" reaches no queue")
            }
            _ => format!("no queue \"{key}\" exists"),
        };
        return Err(Error::Peer(format!(
            "{returned} of {count} message(s) were not taken: {to} (start the worker once to declare [source.declare], or declare it)"
        )));
    }
    if nacked > 0 {
        return Err(Error::Peer(format!(
            "the broker refused {nacked} of the messages (nack)"
        )));
    }
    Ok(())
}

/// A message id unique enough for deduplication: time, pid and a counter.
fn message_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "gs-{:x}-{:x}-{:x}",
        crate::clock::now_ms(),
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Publishes `count` copies of the job (durably: persistent, confirmed).
pub fn submit(cfg: &AmqpConfig, function: &str, payload: &[u8], count: u64) -> Result<()> {
    let mut conn = connect(cfg)?;
    let r = publish(&mut conn, cfg, function, payload, count, &Props::default());
    conn.close(Duration::from_secs(1));
    r
}

/// Publishes one job with a reply queue of its own and waits up to `wait` for the answer (None:
/// no answer in time).
pub fn call(
    cfg: &AmqpConfig,
    function: &str,
    payload: &[u8],
    wait: Duration,
) -> Result<Option<Answer>> {
    let mut conn = connect(cfg)?;
    let r = call_on(&mut conn, cfg, function, payload, wait);
    conn.close(Duration::from_secs(1));
    r
}

fn call_on(
    conn: &mut Conn,
    cfg: &AmqpConfig,
    function: &str,
    payload: &[u8],
    wait: Duration,
) -> Result<Option<Answer>> {
    // passive, durable, exclusive, auto-delete, nowait
    let ok = conn.call(
        wire::QUEUE_DECLARE,
        |a| {
            a.u16(0)
                .short(b"")
                .bits(&[false, false, true, true, false])
                .table(&[]);
        },
        wire::QUEUE_DECLARE_OK,
        "declaring a reply queue",
    )?;
    let queue = wire::Reader::new(&ok)
        .short()
        .map_err(|e| Error::Peer(format!("queue.declare-ok: {e}")))?
        .to_vec();
    // no-local, no-ack, exclusive, nowait
    conn.call(
        wire::BASIC_CONSUME,
        |a| {
            a.u16(0)
                .short(&queue)
                .short(b"")
                .bits(&[false, true, false, false])
                .table(&[]);
        },
        wire::BASIC_CONSUME_OK,
        "consuming replies",
    )?;
    let correlation = message_id();
    let props = Props {
        reply_to: Some(queue),
        correlation_id: Some(correlation.clone().into_bytes()),
        ..Props::default()
    };
    publish(conn, cfg, function, payload, 1, &props)?;
    let deadline = Instant::now() + wait;
    loop {
        let next = match conn.pending.pop_front() {
            Some(d) => Event::Delivery(d),
            None => conn.next(Some(deadline))?,
        };
        match next {
            Event::Delivery(d)
                if d.props.correlation_id.as_deref() == Some(correlation.as_bytes()) =>
            {
                let done = match d
                    .props
                    .headers
                    .as_deref()
                    .map(|h| wire::table_get(h, OUTCOME_HEADER))
                {
                    Some(Ok(Some(v))) => v == b"done",
                    _ => true,
                };
                return Ok(Some(Answer { done, body: d.body }));
            }
            Event::TimedOut => return Ok(None),
            _ => {}
        }
    }
}
