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
    /// A persistent request's reply is published persistent (so that it outlives a broker
    /// restart in a durable reply queue); false: every reply is transient.
    pub persistent_replies: bool,
    /// Runs of a message that ended the worker before it is dead-lettered unrun.
    pub max_attempts: u32,
    /// The broker's `consumer_timeout`, to warn about longer function timeouts.
    pub consumer_timeout: Duration,
    /// `[source.tls]`, for `amqps://` brokers with a private CA or a client certificate.
    pub tls: Option<TlsFiles>,
    /// How long a lane waiting for a delivery first polls without sleeping (zero: never;
    /// `source::spin`).
    pub busy_poll: Duration,
}

#[cfg(test)]
impl AmqpConfig {
    /// A broker URL as the config reads it (for tests of the client).
    #[allow(clippy::unwrap_used)]
    pub(crate) fn url_for_test(text: &str) -> AmqpUrl {
        url(text).unwrap()
    }
}

/// One broker URL. Its `Debug` shows `shown`, never the URL as written or the password.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl {
    /// As written (it may hold a password: never shown).
    pub url: String,
    /// Shown in `status`, metrics and logs: without the password.
    pub shown: String,
    pub tls: bool,
    /// The host (without brackets for IPv6), port, credentials and vhost, percent-decoded.
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    pub vhost: String,
}

impl std::fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("AmqpUrl").field(&self.shown).finish()
    }
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

/// Parses one URL (`amqp[s]://[user[:password]@]host[:port][/vhost][?query]`, the RabbitMQ
/// URI spec: guest/guest, port 5672 or 5671 and vhost `/` by default; the query is accepted and
/// ignored, `[source]` says the rest); the error says what is wrong.
fn url(text: &str) -> std::result::Result<AmqpUrl, String> {
    let shown_raw = crate::text::escape(&without_password(text)).into_owned();
    let bad = |why: &str| {
        format!("url \"{shown_raw}\" is not an AMQP URL such as \"amqp://user:password@127.0.0.1:5672/%2f\" ({why})")
    };
    let (tls, rest) = if let Some(r) = text.strip_prefix("amqps://") {
        (true, r)
    } else if let Some(r) = text.strip_prefix("amqp://") {
        (false, r)
    } else {
        return Err(bad("the scheme must be amqp:// or amqps://"));
    };
    let rest = rest.split_once('?').map_or(rest, |(r, _)| r);
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (user, password) = match userinfo {
        None => ("guest".to_string(), "guest".to_string()),
        Some(u) => {
            let (name, pass) = u.split_once(':').unwrap_or((u, ""));
            (
                decode(name).map_err(|e| bad(&e))?,
                decode(pass).map_err(|_| bad("a bad %-escape in the password"))?,
            )
        }
    };
    let (host, port) = if let Some(r) = hostport.strip_prefix('[') {
        let (h, after) = r
            .split_once(']')
            .ok_or_else(|| bad("an unclosed [ in the host"))?;
        (h.to_string(), after.strip_prefix(':'))
    } else {
        match hostport.split_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (hostport.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port = match port {
        None | Some("") => {
            if tls {
                5671
            } else {
                5672
            }
        }
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| bad(&format!("port \"{p}\"")))?,
    };
    let vhost = if path.is_empty() {
        "/".to_string()
    } else if path.contains('/') {
        // The URI spec's vhost is one path segment (a / inside it is %2f): a second segment
        // was taken into the vhost unseen, and the broker then refused a vhost nobody meant.
        return Err(bad(&format!(
            "the vhost is one path segment: a / in it is written %2f, as in \"{}\"",
            crate::text::escape(&path.replace('/', "%2f"))
        )));
    } else {
        decode(path).map_err(|e| bad(&e))?
    };
    for (what, v) in [("user", &user), ("password", &password), ("vhost", &vhost)] {
        if v.len() > 255 || v.chars().any(char::is_control) {
            return Err(bad(&format!(
                "the {what} is longer than 255 bytes or has control characters"
            )));
        }
    }
    let shown_host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.clone()
    };
    let shown = format!(
        "{}://{user}@{shown_host}:{port}/{}",
        if tls { "amqps" } else { "amqp" },
        vhost.replace('/', "%2f")
    );
    Ok(AmqpUrl {
        url: text.to_string(),
        shown: crate::text::escape(&shown).into_owned(),
        tls,
        host,
        port,
        user,
        password,
        vhost,
    })
}

/// `text` as written, the password of its user part (if it has one) written `***`: for errors
/// about a URL that may not parse, which a terminal, the log or `status` show.
fn without_password(text: &str) -> String {
    let Some((scheme, rest)) = text.split_once("://") else {
        return text.to_string();
    };
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let masked = if user.len() < userinfo.len() {
                ":***"
            } else {
                ""
            };
            format!("{scheme}://{user}{masked}@{host}{tail}")
        }
        None => text.to_string(),
    }
}

/// Percent-decoding of one URL part (UTF-8 after decoding).
fn decode(part: &str) -> std::result::Result<String, String> {
    let b = part.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = part
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| format!("a bad %-escape in \"{}\"", crate::text::escape(part)))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| "a %-escape that is not UTF-8".to_string())
}

/// `[source]` of `kind = "amqp"`.
pub(super) fn amqp(cx: &Cx<'_>, s: RawSource, tls: Option<TlsFiles>) -> Result<Source> {
    let max_attempts = super::parse::max_attempts(cx, &s)?;
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
    let busy_poll = cx.busy_poll(&s.busy_poll)?;
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
        io_timeout: cx.network_wait(&s.io_timeout, "io_timeout")?,
        reconnect_max: cx.network_wait(&s.reconnect_max, "reconnect_max")?,
        declare,
        dedupe_ids: cx.in_range(&s.dedupe_ids, "dedupe_ids", 0, 1_000_000)? as usize,
        persistent_replies: s.persistent_replies,
        max_attempts,
        consumer_timeout: s.consumer_timeout.get_ref().0,
        tls,
        busy_poll,
    }))
}

fn declare(cx: &Cx<'_>, d: RawDeclare, queue: &str) -> Result<Declare> {
    let at = |v: &Spanned<String>, why: String| cx.located(Some(v.span()), &why);
    if let Some(kind) = &d.kind {
        if !["direct", "fanout", "topic", "headers"].contains(&kind.get_ref().as_str()) {
            return Err(at(
                kind,
                format!(
                    "[source.declare] type \"{}\" is not direct, fanout, topic or headers",
                    crate::text::escape(kind.get_ref())
                ),
            ));
        }
    }
    for (name, what) in [
        (&d.exchange, "exchange"),
        (&d.routing_key, "routing_key"),
        (&d.dead_letter_exchange, "dead_letter_exchange"),
    ] {
        if let Some(n) = name {
            amqp_name(n.get_ref(), what).map_err(|why| at(n, why))?;
        }
    }
    if let Some(t) = &d.queue_type {
        if !["classic", "quorum"].contains(&t.get_ref().as_str()) {
            return Err(at(
                t,
                format!(
                    "[source.declare] queue_type \"{}\" is not classic or quorum",
                    crate::text::escape(t.get_ref())
                ),
            ));
        }
    }
    let text = |v: Option<Spanned<String>>| v.map(Spanned::into_inner);
    Ok(Declare {
        exchange: text(d.exchange).filter(|e| !e.is_empty()),
        kind: text(d.kind).unwrap_or_else(|| "direct".into()),
        routing_key: text(d.routing_key).unwrap_or_else(|| queue.to_string()),
        dead_letter_exchange: text(d.dead_letter_exchange),
        queue_type: text(d.queue_type),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::url;

    #[test]
    fn urls_are_read_as_rabbitmq_reads_them_and_shown_without_the_password() {
        let u = url("amqp://guest:s%40cret@127.0.0.1:5673/%2f").unwrap();
        assert_eq!(
            (
                u.host.as_str(),
                u.port,
                u.user.as_str(),
                u.password.as_str()
            ),
            ("127.0.0.1", 5673, "guest", "s@cret")
        );
        assert_eq!(u.vhost, "/");
        assert_eq!(u.shown, "amqp://guest@127.0.0.1:5673/%2f");
        let d = url("amqps://rabbit.example").unwrap();
        assert_eq!(
            (d.port, d.user.as_str(), d.vhost.as_str(), d.tls),
            (5671, "guest", "/", true)
        );
        let v6 = url("amqp://u:p@[::1]/jobs?heartbeat=10").unwrap();
        assert_eq!(
            (v6.host.as_str(), v6.port, v6.vhost.as_str()),
            ("::1", 5672, "jobs")
        );
        assert_eq!(v6.shown, "amqp://u@[::1]:5672/jobs");
        for bad in [
            "http://h/",
            "amqp://",
            "amqp://h:99999/",
            "amqp://h:0/",
            "amqp://h:x/",
            "amqp://u:p@[::1/",
            "amqp://h/%zz",
            "amqp://h/%ff",
            "amqp://h/a%0ab",
            "amqp://h/jobs/extra",
        ] {
            let e = url(bad).unwrap_err();
            assert!(e.contains("is not an AMQP URL"), "{bad}: {e}");
        }
        let e = url("amqp://h/jobs/extra").unwrap_err();
        assert!(e.contains("\"jobs%2fextra\""), "{e}");
    }

    /// An error about a URL is read by whoever reads the terminal, the log or `status` (a
    /// refused reload): the password in it is never shown, however the URL is broken.
    #[test]
    fn a_broken_url_is_shown_without_its_password() {
        for bad in [
            "amqp://u:s3cret@127.0.0.1:99999/%2f",
            "amqps://u:s3cret@h:x/",
            "amqp://u:s3cret@[::1/",
            "amqp://u:s3cret@h/%zz",
            "amqp://u:s3cret:more@h:0/",
            "amqp://u:s3cret@@h:0/",
            "amqp://u:s3cret@h:0?x=/",
            "amqp://u:s3c%zzret@h/",
            "htp://u:s3cret@h/",
        ] {
            let e = url(bad).unwrap_err();
            assert!(!e.contains("s3cret"), "{bad}: {e}");
            assert!(e.contains("is not an AMQP URL"), "{bad}: {e}");
        }
        let e = url("amqp://u:s3cret@h:0/").unwrap_err();
        assert!(e.contains("\"amqp://u:***@h:0/\""), "{e}");
        let ok = url("amqp://u:s3cret@h/").unwrap();
        assert!(!format!("{ok:?}").contains("s3cret"), "{ok:?}");
    }
}
