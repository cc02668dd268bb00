//! Validating the raw sections into a [`Config`]: one function per section, each error with
//! `file:line:col` (through [`Cx`]) and a hint.

use std::collections::BTreeMap;
use std::time::Duration;

use toml::Spanned;

pub(super) use super::cx::Cx;
use super::raw::*;
use super::*;
use crate::error::Result;

/// `[worker]`, checked (`builtins` is decided with the source, see [`parse`]).
pub(super) fn worker(cx: &Cx<'_>, w: RawWorker) -> Result<Worker> {
    let concurrency = *w.concurrency.get_ref();
    if !(1..=1024).contains(&concurrency) {
        return Err(cx.located(
            Some(w.concurrency.span()),
            &format!("concurrency must be between 1 and 1024, not {concurrency}"),
        ));
    }
    let max_payload_bytes =
        cx.in_range(&w.max_payload_bytes, "max_payload_bytes", 1, MAX_PAYLOAD)?;
    let max_rss_mb = cx.in_range(&w.max_rss_mb, "max_rss_mb", 0, 1 << 24)?;
    let splay = *w.recycle_splay.get_ref();
    if !(0.0..=1.0).contains(&splay) {
        return Err(cx.located(
            Some(w.recycle_splay.span()),
            &format!("recycle_splay must be a fraction between 0 and 1, not {splay}"),
        ));
    }
    if let Some(a) = w
        .max_age
        .as_ref()
        .filter(|a| a.get_ref().0 < Duration::from_secs(1))
    {
        return Err(cx.located(Some(a.span()), "max_age must be at least 1s (or left out)"));
    }
    if let Some(s) = w
        .restart_splay
        .as_ref()
        .filter(|s| s.get_ref().0 > Duration::from_secs(86400))
    {
        return Err(cx.located(
            Some(s.span()),
            "restart_splay is at most \"24h\" (a restart delayed longer is a stale worker)",
        ));
    }
    let oom = *w.job_oom_score_adj.get_ref();
    if !(-1000..=1000).contains(&oom) {
        return Err(cx.located(
            Some(w.job_oom_score_adj.span()),
            &format!("job_oom_score_adj must be between -1000 and 1000, not {oom}"),
        ));
    }
    account(cx, w.user.as_ref(), "user")?;
    account(cx, w.group.as_ref(), "group")?;
    let worker = Worker {
        concurrency: concurrency as usize,
        jobs_dir: cx.dir(&w.jobs_dir, "jobs_dir")?,
        state_dir: cx.dir(&w.state_dir, "state_dir")?,
        max_payload_bytes: max_payload_bytes as usize,
        watch_config: w.watch_config,
        watch_jobs: w.watch_jobs,
        umask: umask(cx, &w.umask)?,
        user_at: w.user.as_ref().map(|u| cx.where_is(u.span())),
        group_at: w.group.as_ref().map(|g| cx.where_is(g.span())),
        user: w.user.map(|u| u.into_inner()),
        group: w.group.map(|g| g.into_inner()),
        allow_root: w.allow_root,
        strict_modes: w.strict_modes,
        watch_binary: w.watch_binary,
        max_jobs: w.max_jobs,
        max_rss_mb,
        max_age: w.max_age.map(|d| d.into_inner().0),
        recycle_splay: splay,
        restart_splay: w
            .restart_splay
            .map(|s| s.into_inner().0)
            .filter(|s| !s.is_zero()),
        builtins: true,
        job_timeout: cx.nonzero_limit(&w.job_timeout)?,
        job_oom_score_adj: oom as i32,
        abandon_after: w.abandon_after.0,
    };
    Ok(worker)
}

/// `[source]`, checked.
pub(super) fn source(cx: &Cx<'_>, mut s: RawSource, worker: &Worker) -> Result<Source> {
    let source = match s.kind {
        SourceKind::Spool => Source::Spool(spool(cx, &s)?),
        SourceKind::Gearman => gearman(cx, s, worker)?,
        SourceKind::Zeromq => zeromq(cx, s)?,
        SourceKind::Amqp => {
            let tls = tls_files(cx, s.tls.take(), None)?;
            super::amqp::amqp(cx, s, tls)?
        }
    };
    Ok(source)
}

/// The spool's keys (of `kind = "spool"`, and of `kind = "zeromq"`, which keeps its jobs there).
fn spool(cx: &Cx<'_>, s: &RawSource) -> Result<SpoolConfig> {
    Ok(SpoolConfig {
        dir: cx.dir(&s.dir, "dir")?,
        max_attempts: max_attempts(cx, s)?,
        retain_results: s.retain_results.0,
        min_free: s.min_free,
        fsync: s.fsync,
    })
}

/// `[source] max_attempts`: runs of a job interrupted by the worker's end before it is failed
/// (the spool's and the ZeroMQ source's jobs, AMQP messages).
pub(super) fn max_attempts(cx: &Cx<'_>, s: &RawSource) -> Result<u32> {
    let attempts = *s.max_attempts.get_ref();
    if !(1..=1_000_000).contains(&attempts) {
        return Err(cx.located(
            Some(s.max_attempts.span()),
            &format!("max_attempts must be between 1 and 1000000, not {attempts}"),
        ));
    }
    Ok(attempts)
}

/// `[source] dead_peer_timeout` (gearman's servers, the zeromq source's clients): 2 s to 1 h.
fn dead_peer_timeout(cx: &Cx<'_>, s: &RawSource) -> Result<Duration> {
    let d = s.dead_peer_timeout.get_ref().0;
    if !(Duration::from_secs(2)..=Duration::from_secs(3600)).contains(&d) {
        return Err(cx.located(
            Some(s.dead_peer_timeout.span()),
            "dead_peer_timeout must be between \"2s\" and \"1h\"",
        ));
    }
    Ok(d)
}

/// `[source]` of `kind = "zeromq"`: endpoints (tcp:// host:port, ipc:// absolute path, each
/// once), the function of single-frame messages, the reply, and the spool.
fn zeromq(cx: &Cx<'_>, s: RawSource) -> Result<Source> {
    use super::{ZeromqConfig, ZeromqReply};
    let span = s.bind.span();
    let span = || Some(span.clone());
    if s.bind.get_ref().is_empty() {
        return Err(cx.located(
            span(),
            "kind = \"zeromq\" needs at least one endpoint, e.g. bind = [\"tcp://127.0.0.1:5555\"]",
        ));
    }
    let n = s.bind.get_ref().len();
    if n > MAX_ENDPOINTS {
        return Err(cx.located(
            span(),
            &format!("{n} endpoints, more than the {MAX_ENDPOINTS} a worker binds (each is a listening socket handed across every restart)"),
        ));
    }
    let mut bind: Vec<super::Endpoint> = Vec::new();
    for text in s.bind.get_ref() {
        let ep = super::Endpoint::parse(text).map_err(|why| cx.located(span(), &why))?;
        if bind.contains(&ep) {
            return Err(cx.located(span(), &format!("endpoint \"{ep}\" is listed twice")));
        }
        if !ep.is_local() && !s.allow_remote {
            return Err(cx.located(
                span(),
                &format!(
                    "endpoint \"{ep}\" is not a loopback address: anyone who can reach it could submit jobs; set [source] allow_remote = true if that is meant"
                ),
            ));
        }
        bind.push(ep);
    }
    let function = match &s.function {
        Some(f) => {
            check_function_name(f.get_ref()).map_err(|why| cx.located(Some(f.span()), &why))?;
            Some(f.get_ref().clone())
        }
        None => None,
    };
    let reply = match s.reply.get_ref().as_str() {
        "true" => ZeromqReply::True,
        "id" => ZeromqReply::Id,
        other => {
            return Err(cx.located(
                Some(s.reply.span()),
                &format!(
                    "reply \"{}\" is not \"true\" (answer TRUE, as the PHP daemons do) or \"id\" (answer the job id)",
                    crate::text::escape(other)
                ),
            ))
        }
    };
    Ok(Source::Zeromq(ZeromqConfig {
        spool: spool(cx, &s)?,
        bind,
        function,
        reply,
        busy_poll: cx.busy_poll(&s.busy_poll)?,
        max_connections: s
            .max_connections
            .as_ref()
            .map(|m| cx.in_range(m, "max_connections", 1, 1_000_000))
            .transpose()?,
        dead_peer_timeout: dead_peer_timeout(cx, &s)?,
    }))
}

/// `[functions.NAME]`: valid names, and each one's time limit (else `[worker] job_timeout`).
pub(super) fn functions(
    cx: &Cx<'_>,
    raw: BTreeMap<Spanned<String>, RawFunction>,
    worker: &Worker,
) -> Result<BTreeMap<String, FunctionConfig>> {
    let mut functions = BTreeMap::new();
    for (name, f) in raw {
        if let Err(why) = check_function_name(name.get_ref()) {
            return Err(cx.located(Some(name.span()), &why));
        }
        let timeout = match &f.timeout {
            Some(t) => cx.nonzero_limit(t)?,
            None => worker.job_timeout,
        };
        functions.insert(name.into_inner(), FunctionConfig { timeout });
    }
    Ok(functions)
}

/// `[metrics]`: the listen address, loopback unless `allow_remote`.
pub(super) fn metrics(cx: &Cx<'_>, raw: RawMetrics) -> Result<Option<Metrics>> {
    let metrics = match raw.listen {
        None => None,
        Some(listen) => {
            let addr = listen_address(listen.get_ref()).ok_or_else(|| {
                cx.located(
                    Some(listen.span()),
                    &format!(
                        "listen \"{}\" is not an address:port such as \"127.0.0.1:9464\", \"[::1]:9464\" or \"localhost:9464\" (names other than localhost are not resolved)",
                        listen.get_ref()
                    ),
                )
            })?;
            if !addr.ip().is_loopback() && !raw.allow_remote {
                return Err(cx.located(
                    Some(listen.span()),
                    &format!(
                        "listen \"{addr}\" is not a loopback address: metrics would be open to the network; set [metrics] allow_remote = true if that is meant"
                    ),
                ));
            }
            Some(Metrics { listen: addr })
        }
    };
    Ok(metrics)
}

/// `[metrics] listen`: an address and port, or `localhost:PORT` (127.0.0.1, as the ZeroMQ
/// source's `tcp://localhost:PORT`). No other name is resolved: a listen address that moved
/// with DNS could open the metrics to a network.
fn listen_address(text: &str) -> Option<std::net::SocketAddr> {
    if let Ok(addr) = text.parse() {
        return Some(addr);
    }
    let (host, port) = text.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    host.eq_ignore_ascii_case("localhost")
        .then(|| std::net::SocketAddr::from(([127, 0, 0, 1], port)))
}

/// The most Gearman servers one worker connects to (every lane holds a connection to each).
const MAX_SERVERS: usize = 256;
/// The most endpoints a zeromq source binds (each a socket handed across every exec).
const MAX_ENDPOINTS: usize = 64;

/// `[source]` of `kind = "gearman"`: servers (schemes, duplicates), client id, TLS files,
/// timeouts, packet bound.
fn gearman(cx: &Cx<'_>, s: RawSource, worker: &Worker) -> Result<Source> {
    if s.servers.get_ref().is_empty() {
        return Err(cx.located(
            Some(s.servers.span()),
            "kind = \"gearman\" needs at least one server, e.g. servers = [\"127.0.0.1:4730\"]",
        ));
    }
    let n = s.servers.get_ref().len();
    if n > MAX_SERVERS {
        return Err(cx.located(
            Some(s.servers.span()),
            &format!("{n} servers, more than the {MAX_SERVERS} a worker connects to (each lane holds a connection to each)"),
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    for server in s.servers.get_ref() {
        let bare = server.strip_prefix("tls://").unwrap_or(server);
        let ok = bare.rsplit_once(':').is_some_and(|(h, p)| {
            !h.is_empty()
                && p.parse::<u16>().is_ok_and(|p| p != 0)
                && !h.contains('/')
                && !h.chars().any(|c| c.is_whitespace() || c.is_control())
        });
        if !ok {
            let hint = match server.split_once("://") {
                Some((scheme, _)) if scheme != "tls" => format!(
                    " (\"{scheme}://\" is no scheme gearshift speaks: plain host:port, or tls://)"
                ),
                _ => String::new(),
            };
            return Err(cx.located(
                Some(s.servers.span()),
                &format!(
                    "server \"{}\" is not host:port or tls://host:port (e.g. \"127.0.0.1:4730\"){hint}",
                    crate::text::escape(server)
                ),
            ));
        }
        if !seen.insert(bare.to_ascii_lowercase()) {
            return Err(cx.located(
                Some(s.servers.span()),
                &format!(
                    "server \"{}\" is listed twice (every lane would hold two connections to it, and take its jobs twice as often)",
                    crate::text::escape(server)
                ),
            ));
        }
    }
    if let Some(spanned) = &s.client_id {
        let id = spanned.get_ref();
        if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_graphic()) {
            return Err(cx.located(
                Some(spanned.span()),
                &format!(
                    "[source] client_id \"{}\" must be 1 to 64 printable characters without spaces (gearadmin --workers separates fields with spaces)",
                    crate::text::escape(id)
                ),
            ));
        }
    }
    let max_attempts = max_attempts(cx, &s)?;
    let dead_peer = dead_peer_timeout(cx, &s)?;
    let wants_tls = s.servers.get_ref().iter().any(|v| v.starts_with("tls://"));
    let tls = tls_files(
        cx,
        s.tls,
        wants_tls.then(|| {
            (
                s.servers.span(),
                "a tls:// server needs a [source.tls] table with ca_file (the CA that signed the server's certificate)",
            )
        }),
    )?;
    Ok(Source::Gearman(GearmanConfig {
        max_attempts,
        servers: s.servers.into_inner(),
        client_id: s.client_id.map(|c| c.into_inner()),
        exceptions: s.exceptions,
        io_timeout: cx.network_wait(&s.io_timeout, "io_timeout")?,
        reconnect_max: cx.network_wait(&s.reconnect_max, "reconnect_max")?,
        tls,
        dead_peer_timeout: dead_peer,
        busy_poll: cx.busy_poll(&s.busy_poll)?,
        max_packet_bytes: match &s.max_packet_bytes {
            None => (worker.max_payload_bytes + 4096).max(1 << 20),
            Some(b) => cx.in_range(b, "max_packet_bytes", 64, MAX_PAYLOAD + 65536)? as usize,
        },
    }))
}

/// `[source.tls]`, checked: required for `tls://` Gearman servers, cert and key together.
fn tls_files(
    cx: &Cx<'_>,
    raw: Option<RawTls>,
    required: Option<(std::ops::Range<usize>, &str)>,
) -> Result<Option<TlsFiles>> {
    let Some(t) = raw else {
        return match required {
            Some((span, why)) => Err(cx.located(Some(span), why)),
            None => Ok(None),
        };
    };
    match (&t.cert_file, &t.key_file) {
        (Some(alone), None) | (None, Some(alone)) => return Err(cx.located(
            Some(alone.span()),
            "[source.tls] cert_file and key_file go together (a client certificate and its key)",
        )),
        _ => {}
    }
    let join = |f: Option<Spanned<PathBuf>>| f.map(|f| cx.base.join(f.into_inner()));
    Ok(Some(TlsFiles {
        ca_file: cx.base.join(t.ca_file),
        cert_file: join(t.cert_file),
        key_file: join(t.key_file),
        server_name: t.server_name,
    }))
}

/// `[worker] user` or `group` (`key`): a name as the user database holds one. A name no one
/// could create (empty, a space, `:`, `/`, `,`, a leading `-`) or a number (an id, which a
/// lookup by name does not find) is said as such, where a lookup would say only "does not
/// exist".
fn account(cx: &Cx<'_>, v: Option<&Spanned<String>>, key: &str) -> Result<()> {
    let Some(v) = v else {
        return Ok(());
    };
    let name = v.get_ref();
    let shown = crate::text::escape(name);
    let db = if key == "user" { "passwd" } else { "group" };
    let why = if name.is_empty() {
        format!("[worker] {key} is empty: name the {key} the worker runs as, or leave {key} out")
    } else if name.bytes().all(|b| b.is_ascii_digit()) {
        format!("[worker] {key} \"{shown}\" is a number: name the {key} (`getent {db} {shown}` says whose id it is)")
    } else if name.starts_with('-')
        || name
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, ':' | '/' | ','))
    {
        format!("[worker] {key} \"{shown}\" is no {key} name: a name holds no spaces, `:`, `/` or `,`, and does not begin with `-`")
    } else {
        return Ok(());
    };
    Err(cx.located(Some(v.span()), &why))
}

/// `[worker] umask`: an octal mode that leaves the owner's own bits alone (with them masked,
/// the worker could not read or enter the spool and state it makes).
fn umask(cx: &Cx<'_>, m: &Spanned<String>) -> Result<u32> {
    let text = m.get_ref();
    match u32::from_str_radix(text, 8).ok().filter(|m| *m <= 0o777) {
        None => Err(cx.located(
            Some(m.span()),
            &format!("[worker] umask \"{text}\" is not an octal mode like \"027\""),
        )),
        Some(mask) if mask & 0o700 != 0 => Err(cx.located(
            Some(m.span()),
            &format!("[worker] umask \"{text}\" takes the worker's own permissions: it could not read or write the spool and state it makes; mask only group and others' bits, as \"027\" or \"077\" do"),
        )),
        Some(mask) => Ok(mask),
    }
}
