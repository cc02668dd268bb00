//! `[source]` of `kind = "amqp"`: consume from RabbitMQ (AMQP 0-9-1) as the PHP daemons do,
//! with `[source.declare]` for the topology they declare.

use std::time::Duration;

use toml::Spanned;

use super::cx::Cx;
use super::raw::{RawDeclare, RawSource};
use super::{check_function_name, Source, TlsFiles};
use crate::error::Result;

/// `kind = "amqp"`.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// The brokers, tried in turn (failover): `amqp://` or `amqps://` URLs.
    pub urls: Vec<AmqpUrl>,
    /// The queue each lane consumes from.
    pub queue: String,
    /// The function of a message without a `type` property.
    pub function: Option<String>,
    /// Unacknowledged deliveries per lane (`basic.qos`).
    pub prefetch: u16,
    /// The heartbeat asked of the broker (it may choose a shorter one); 0 asks for none.
    pub heartbeat: Duration,
    /// A broker that leaves a request (connect, a declaration, a confirm) unanswered this long
    /// is dropped and backed off.
    pub io_timeout: Duration,
    /// The longest pause between reconnects (backoff doubles from 100 ms up to this).
    pub reconnect_max: Duration,
    /// What to declare before consuming (the PHP daemons' exchange, queue and binding).
    pub declare: Option<Declare>,
    /// How many `message_id`s of succeeded jobs are remembered, so a redelivery of one is
    /// acknowledged without running it again (0: off).
    pub dedupe_ids: usize,
    /// The broker's `consumer_timeout`, to warn about longer function timeouts.
    pub consumer_timeout: Duration,
    /// `[source.tls]`, for `amqps://` brokers with a private CA or a client certificate.
    pub tls: Option<TlsFiles>,
}

/// One broker URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpUrl {
    /// As written (it may hold a password: never shown).
    pub url: String,
    /// Shown in `status`, metrics and logs: without the password.
    pub shown: String,
    pub tls: bool,
}

/// `[source.declare]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Declare {
    /// A durable exchange the queue is bound to (none: only the queue is declared).
    pub exchange: Option<String>,
    /// The exchange's type: direct, fanout, topic, headers.
    pub kind: String,
    /// The binding's routing key (default: the queue's name).
    pub routing_key: String,
    /// `x-dead-letter-exchange` of the queue: where failed jobs go.
    pub dead_letter_exchange: Option<String>,
    /// `x-queue-type`: classic or quorum.
    pub queue_type: Option<String>,
}

/// A name RabbitMQ takes (a short string of at most 255 bytes, no control characters).
fn amqp_name(text: &str, what: &str) -> std::result::Result<(), String> {
    if text.len() > 255 || text.chars().any(char::is_control) {
        return Err(format!(
            "{what} \"{}\" is not an AMQP name (at most 255 bytes, no control characters)",
            crate::text::escape(text)
        ));
    }
    Ok(())
}

/// Parses one URL; the error says what is wrong.
fn url(text: &str) -> std::result::Result<AmqpUrl, String> {
    let shown_raw = crate::text::escape(text);
    let uri: lapin::uri::AMQPUri = text.parse().map_err(|e| {
        format!("url \"{shown_raw}\" is not an AMQP URL such as \"amqp://user:password@127.0.0.1:5672/%2f\" ({e})")
    })?;
    let tls = uri.scheme == lapin::uri::AMQPScheme::AMQPS;
    let host = &uri.authority.host;
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    let shown = format!(
        "{}://{}@{host}:{}/{}",
        if tls { "amqps" } else { "amqp" },
        uri.authority.userinfo.username,
        uri.authority.port,
        uri.vhost.replace('/', "%2f")
    );
    Ok(AmqpUrl {
        url: text.to_string(),
        shown: crate::text::escape(&shown).into_owned(),
        tls,
    })
}

/// `[source]` of `kind = "amqp"`.
pub(super) fn amqp(cx: &Cx<'_>, s: RawSource, tls: Option<TlsFiles>) -> Result<Source> {
    let mut texts: Vec<Spanned<String>> = s.urls.into_inner();
    if let Some(u) = s.url {
        texts.insert(0, u);
    }
    if texts.is_empty() {
        return Err(cx.located(
            None,
            "kind = \"amqp\" needs a broker: url = \"amqp://user:password@127.0.0.1:5672/%2f\" (or urls = [...] for failover)",
        ));
    }
    let mut urls: Vec<AmqpUrl> = Vec::new();
    for t in &texts {
        let u = url(t.get_ref()).map_err(|why| cx.located(Some(t.span()), &why))?;
        if urls.iter().any(|o| o.url == u.url) {
            return Err(cx.located(
                Some(t.span()),
                &format!("broker \"{}\" is listed twice", u.shown),
            ));
        }
        urls.push(u);
    }
    let Some(queue) = s.queue else {
        return Err(cx.located(
            None,
            "kind = \"amqp\" needs the queue to consume from: queue = \"jobs\"",
        ));
    };
    amqp_name(queue.get_ref(), "queue").map_err(|why| cx.located(Some(queue.span()), &why))?;
    if queue.get_ref().is_empty() {
        return Err(cx.located(Some(queue.span()), "queue must not be empty"));
    }
    let function = match &s.function {
        Some(f) => {
            check_function_name(f.get_ref()).map_err(|why| cx.located(Some(f.span()), &why))?;
            Some(f.get_ref().clone())
        }
        None => None,
    };
    let prefetch = cx.in_range(&s.prefetch, "prefetch", 1, 1000)? as u16;
    let heartbeat = s.heartbeat.get_ref().0;
    if heartbeat > Duration::from_secs(3600) || heartbeat.subsec_nanos() != 0 {
        return Err(cx.located(
            Some(s.heartbeat.span()),
            "heartbeat is whole seconds up to \"1h\" (\"0s\" asks the broker for none)",
        ));
    }
    let declare = match s.declare {
        None => None,
        Some(d) => Some(declare(cx, d, queue.get_ref())?),
    };
    if tls.is_some() && !urls.iter().any(|u| u.tls) {
        return Err(cx.located(
            None,
            "[source.tls] is for amqps:// brokers, and no url is amqps://",
        ));
    }
    Ok(Source::Amqp(AmqpConfig {
        urls,
        queue: queue.into_inner(),
        function,
        prefetch,
        heartbeat,
        io_timeout: cx.at_least_100ms(&s.io_timeout, "io_timeout")?,
        reconnect_max: cx.at_least_100ms(&s.reconnect_max, "reconnect_max")?,
        declare,
        dedupe_ids: cx.in_range(&s.dedupe_ids, "dedupe_ids", 0, 1_000_000)? as usize,
        consumer_timeout: s.consumer_timeout.get_ref().0,
        tls,
    }))
}

fn declare(cx: &Cx<'_>, d: Spanned<RawDeclare>, queue: &str) -> Result<Declare> {
    let span = d.span();
    let d = d.into_inner();
    let at = |why: String| cx.located(Some(span.clone()), &why);
    let kind = d.kind.unwrap_or_else(|| "direct".into());
    if !["direct", "fanout", "topic", "headers"].contains(&kind.as_str()) {
        return Err(at(format!(
            "[source.declare] type \"{}\" is not direct, fanout, topic or headers",
            crate::text::escape(&kind)
        )));
    }
    for (name, what) in [
        (&d.exchange, "exchange"),
        (&d.routing_key, "routing_key"),
        (&d.dead_letter_exchange, "dead_letter_exchange"),
    ] {
        if let Some(n) = name {
            amqp_name(n, what).map_err(at)?;
        }
    }
    if let Some(t) = &d.queue_type {
        if !["classic", "quorum"].contains(&t.as_str()) {
            return Err(at(format!(
                "[source.declare] queue_type \"{}\" is not classic or quorum",
                crate::text::escape(t)
            )));
        }
    }
    Ok(Declare {
        exchange: d.exchange.filter(|e| !e.is_empty()),
        kind,
        routing_key: d.routing_key.unwrap_or_else(|| queue.to_string()),
        dead_letter_exchange: d.dead_letter_exchange,
        queue_type: d.queue_type,
    })
}
