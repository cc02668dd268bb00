//! Publishing jobs to the configured queue (`gearshift submit` to an AMQP source), and the RPC
//! form: a reply queue of the client's own, `reply_to` and `correlation_id`, the answer awaited.

use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

use super::lane::OUTCOME_HEADER;
use super::wait::bounded;
use crate::config::AmqpConfig;
use crate::error::{Error, Result};

/// A job's answer, for `submit --wait`.
pub struct Answer {
    pub done: bool,
    pub body: Vec<u8>,
}

/// A client connection to the first broker that answers.
struct Client {
    conn: Connection,
    channel: lapin::Channel,
    io_timeout: Duration,
}

impl Client {
    fn connect(cfg: &AmqpConfig) -> Result<Client> {
        let runtime = async_rs::Runtime::async_global_executor();
        let tls = match &cfg.tls {
            None => lapin::tcp::OwnedTLSConfig::default(),
            Some(files) => super::tls_config(files)?,
        };
        let mut errors = Vec::new();
        for url in &cfg.urls {
            let Ok(mut uri) = url.url.parse::<lapin::uri::AMQPUri>() else {
                continue;
            };
            uri.query.connection_timeout = Some(cfg.io_timeout.as_millis() as u64);
            let props =
                ConnectionProperties::default().with_connection_name("gearshift submit".into());
            match bounded(
                cfg.io_timeout,
                "connecting",
                Connection::connect_uri_with_config(uri, props, tls.clone(), runtime.clone()),
            ) {
                Ok(conn) => {
                    let channel =
                        bounded(cfg.io_timeout, "opening a channel", conn.create_channel())?;
                    bounded(
                        cfg.io_timeout,
                        "confirm.select",
                        channel.confirm_select(ConfirmSelectOptions::default()),
                    )?;
                    return Ok(Client {
                        conn,
                        channel,
                        io_timeout: cfg.io_timeout,
                    });
                }
                Err(e) => errors.push(format!("{}: {e}", url.shown)),
            }
        }
        Err(Error::Peer(format!(
            "no AMQP broker reachable ({})",
            errors.join("; ")
        )))
    }

    /// Publishes `count` persistent messages and waits for every confirm (1,000 in flight).
    fn publish(
        &self,
        cfg: &AmqpConfig,
        function: &str,
        payload: &[u8],
        count: u64,
        props: &BasicProperties,
    ) -> Result<()> {
        let (exchange, key): (ShortString, ShortString) = match &cfg.declare {
            Some(d) if d.exchange.is_some() => (
                d.exchange.clone().unwrap_or_default().as_str().into(),
                d.routing_key.as_str().into(),
            ),
            _ => ("".into(), cfg.queue.as_str().into()),
        };
        let kind = ShortString::try_new(function.to_string())
            .map_err(|_| Error::Msg("a function name is at most 255 bytes".into()))?;
        let mut left = count;
        while left > 0 {
            let n = left.min(1000);
            let batch = async {
                let mut confirms = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    let p = props
                        .clone()
                        .with_type(kind.clone())
                        .with_timestamp(crate::clock::now_ms() / 1000)
                        .with_delivery_mode(2)
                        .with_message_id(message_id().into());
                    confirms.push(
                        self.channel
                            .basic_publish(
                                exchange.clone(),
                                key.clone(),
                                BasicPublishOptions::default(),
                                payload,
                                p,
                            )
                            .await?,
                    );
                }
                let mut nacked = 0u64;
                for c in confirms {
                    if c.await?.is_nack() {
                        nacked += 1;
                    }
                }
                Ok(nacked)
            };
            let wait = self.io_timeout + Duration::from_millis(n);
            let nacked = bounded(wait, "publishing", batch)?;
            if nacked > 0 {
                return Err(Error::Peer(format!(
                    "the broker refused {nacked} of the messages (nack)"
                )));
            }
            left -= n;
        }
        Ok(())
    }

    fn close(self) {
        let _ = bounded(
            Duration::from_secs(1),
            "closing",
            self.conn.close(200, "done".into()),
        );
    }
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
    let client = Client::connect(cfg)?;
    let r = client.publish(cfg, function, payload, count, &BasicProperties::default());
    client.close();
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
    let client = Client::connect(cfg)?;
    let r = call_on(&client, cfg, function, payload, wait);
    client.close();
    r
}

fn call_on(
    client: &Client,
    cfg: &AmqpConfig,
    function: &str,
    payload: &[u8],
    wait: Duration,
) -> Result<Option<Answer>> {
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    let queue = bounded(
        client.io_timeout,
        "declaring a reply queue",
        client
            .channel
            .queue_declare("".into(), exclusive, FieldTable::default()),
    )?;
    let mut replies = bounded(
        client.io_timeout,
        "consuming replies",
        client.channel.basic_consume(
            queue.name().clone(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..BasicConsumeOptions::default()
            },
            FieldTable::default(),
        ),
    )?;
    let correlation = message_id();
    let props = BasicProperties::default()
        .with_reply_to(queue.name().clone())
        .with_correlation_id(correlation.as_str().into());
    client.publish(cfg, function, payload, 1, &props)?;
    let answer = async {
        while let Some(d) = replies.next().await {
            let d = d?;
            if d.properties.correlation_id().as_ref().map(|c| c.as_str()) != Some(&correlation) {
                continue;
            }
            let done = d
                .properties
                .headers()
                .as_ref()
                .and_then(|h| h.inner().get(OUTCOME_HEADER).cloned())
                .is_none_or(|v| matches!(v, AMQPValue::LongString(s) if s.as_bytes() == b"done"));
            return Ok(Some(Answer { done, body: d.data }));
        }
        Ok(None)
    };
    match bounded(wait, "waiting for the answer", answer) {
        Err(Error::TimedOut(_)) => Ok(None),
        other => other,
    }
}
