//! One lane's link to a broker: the connection, its channel (confirms, qos), the declared
//! topology and the consumer, each step bounded by `io_timeout`.

use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::Channel;

use super::broker::Shared;
use super::wait::{bounded, step};
use super::{Setup, CLOSE_WAIT};
use crate::error::Result;
use crate::shutdown::Shutdown;

/// This lane's channel and consumer on the shared connection.
pub(super) struct Link {
    pub(super) shared: Shared,
    pub(super) channel: Channel,
    /// Deliveries, polled by the lane itself (no hop through an executor task).
    pub(super) consumer: lapin::Consumer,
    pub(super) consumer_tag: ShortString,
    /// Tells this link from the lane's earlier ones.
    pub(super) epoch: u64,
}

/// Opens this lane's channel on `shared`: confirms, qos, `[source.declare]`, the consumer.
pub(super) fn open(s: &Setup, shared: Shared, epoch: u64, stop: &Shutdown) -> Result<Link> {
    let channel = step(s, stop, "opening a channel", shared.conn.create_channel())?;
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
    let consumer_tag: ShortString = format!("{} lane {} {}", s.name, s.index, epoch)
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
    Ok(Link {
        shared,
        channel,
        consumer,
        consumer_tag,
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

/// Closes a link's channel without waiting long: the broker requeues what it held.
pub(super) fn drop_link(link: Link) {
    let _ = bounded(
        CLOSE_WAIT,
        "channel.close",
        link.channel.close(200, "gearshift".into()),
    );
}
