//! One lane's link to a broker: the connection, its channel (confirms, qos), the declared
//! topology and the consumer, each step bounded by `io_timeout`.

use std::future::Future;
use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, Connection, ConnectionProperties};

use super::{Msg, Runtime, Setup, CLOSE_WAIT};
use crate::config::AmqpUrl;
use crate::error::{Error, Result};
use crate::shutdown::Shutdown;

/// A connection with this lane's channel and consumer.
pub(super) struct Link {
    pub(super) conn: Connection,
    pub(super) channel: Channel,
    pub(super) consumer_tag: ShortString,
    pub(super) events: std::pin::Pin<Box<dyn futures_lite::Stream<Item = lapin::Event> + Send>>,
    /// The broker's `connection.blocked` reason while publishing is blocked.
    pub(super) blocked: Option<String>,
    pub(super) epoch: u64,
}

/// Connects to `url` and starts this lane's consumer; its deliveries reach the lane tagged
/// with `epoch`.
pub(super) fn open(s: &Setup, url: &AmqpUrl, epoch: u64, stop: &Shutdown) -> Result<Link> {
    let mut uri: lapin::uri::AMQPUri = url
        .url
        .parse()
        .map_err(|e| Error::Config(format!("{}: {e}", url.shown)))?;
    uri.query.heartbeat = Some(s.cfg.heartbeat.as_secs().min(u64::from(u16::MAX)) as u16);
    // Frames no larger than a job needs (the broker may ask for smaller ones).
    uri.query.frame_max = Some((s.max_payload + 4096).clamp(8192, 1 << 20) as u32);
    uri.query.connection_timeout = Some(s.cfg.io_timeout.as_millis() as u64);
    let props = ConnectionProperties::default().with_connection_name(s.name.clone().into());
    let conn = step(
        s,
        stop,
        "connecting",
        Connection::connect_uri_with_config(uri, props, s.tls.clone(), s.runtime.clone()),
    )?;
    let events = Box::pin(conn.events_listener());
    let channel = step(s, stop, "opening a channel", conn.create_channel())?;
    step(
        s,
        stop,
        "confirm.select",
        channel.confirm_select(ConfirmSelectOptions::default()),
    )?;
    step(
        s,
        stop,
        "basic.qos",
        channel.basic_qos(s.cfg.prefetch, BasicQosOptions::default()),
    )?;
    declare(s, &channel, stop)?;
    let consumer_tag: ShortString = format!("{} {}", s.name, epoch)
        .chars()
        .take(250)
        .collect::<String>()
        .into();
    let consumer = step(
        s,
        stop,
        "basic.consume",
        channel.basic_consume(
            s.cfg.queue.as_str().into(),
            consumer_tag.clone(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )?;
    let tx = s.tx.clone();
    consumer.set_delegate(move |delivery: lapin::message::DeliveryResult| {
        let msg = match delivery {
            Ok(Some(d)) => Msg::Delivery(epoch, Box::new(d)),
            Ok(None) => Msg::Broken(epoch, "the broker cancelled the consumer".into()),
            Err(e) => Msg::Broken(epoch, e.to_string()),
        };
        let _ = tx.send(msg);
        std::future::ready(())
    });
    Ok(Link {
        conn,
        channel,
        consumer_tag,
        events,
        blocked: None,
        epoch,
    })
}

/// `[source.declare]`: the durable exchange, the durable queue, the binding.
fn declare(s: &Setup, channel: &Channel, stop: &Shutdown) -> Result<()> {
    let Some(d) = &s.cfg.declare else {
        return Ok(());
    };
    let queue = s.cfg.queue.as_str();
    let mut args = FieldTable::default();
    if let Some(dlx) = &d.dead_letter_exchange {
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(dlx.as_str().into()),
        );
    }
    if let Some(t) = &d.queue_type {
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString(t.as_str().into()),
        );
    }
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    step(
        s,
        stop,
        "queue.declare",
        channel.queue_declare(queue.into(), durable, args),
    )?;
    if let Some(exchange) = &d.exchange {
        let kind = match d.kind.as_str() {
            "fanout" => lapin::ExchangeKind::Fanout,
            "topic" => lapin::ExchangeKind::Topic,
            "headers" => lapin::ExchangeKind::Headers,
            _ => lapin::ExchangeKind::Direct,
        };
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        step(
            s,
            stop,
            "exchange.declare",
            channel.exchange_declare(
                exchange.as_str().into(),
                kind,
                durable,
                FieldTable::default(),
            ),
        )?;
        step(
            s,
            stop,
            "queue.bind",
            channel.queue_bind(
                queue.into(),
                exchange.as_str().into(),
                d.routing_key.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        )?;
    }
    Ok(())
}

/// A lapin error as ours: a closed connection or channel means the peer is gone (whatever the
/// lane held is the broker's again); anything else is the broker misbehaving.
fn lapin_error(what: &str, e: &lapin::Error) -> Error {
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
pub(crate) fn bounded<T>(
    runtime: &Runtime,
    limit: Duration,
    what: &str,
    fut: impl Future<Output = lapin::Result<T>>,
) -> Result<T> {
    let timed = futures_lite::future::or(async { Some(fut.await) }, async {
        async_rs::traits::Reactor::sleep(runtime, limit).await;
        None
    });
    match async_rs::traits::Executor::block_on(runtime, timed) {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => Err(lapin_error(what, &e)),
        None => Err(Error::TimedOut(format!(
            "{what}: no answer within {limit:?}"
        ))),
    }
}

/// A step of opening a link: bounded by `io_timeout`, and given up as soon as the lane is
/// asked to stop (a restart does not wait for a broker that does not answer).
fn step<T>(
    s: &Setup,
    stop: &Shutdown,
    what: &str,
    fut: impl Future<Output = lapin::Result<T>>,
) -> Result<T> {
    let stopped = async {
        while !stop.is_set() {
            async_rs::traits::Reactor::sleep(&s.runtime, Duration::from_millis(50)).await;
        }
        Some(Err(Error::Gone(format!("{what}: the lane is stopping"))))
    };
    let timed = futures_lite::future::or(
        async { Some(fut.await.map_err(|e| lapin_error(what, &e))) },
        stopped,
    );
    let timed = futures_lite::future::or(timed, async {
        async_rs::traits::Reactor::sleep(&s.runtime, s.cfg.io_timeout).await;
        None
    });
    match async_rs::traits::Executor::block_on(&s.runtime, timed) {
        Some(r) => r,
        None => Err(Error::TimedOut(format!(
            "{what}: no answer within {:?}",
            s.cfg.io_timeout
        ))),
    }
}

/// Closes a link without waiting long: the broker requeues what it held either way.
pub(super) fn drop_link(runtime: &Runtime, link: Link) {
    let _ = bounded(
        runtime,
        CLOSE_WAIT,
        "closing",
        link.conn.close(320, "gearshift".into()),
    );
}
