//! The AMQP 0-9-1 source (RabbitMQ), consuming as the PHP daemons do: a durable queue (bound to
//! a durable exchange when `[source.declare]` says so), `basic.qos(prefetch)` per lane, and a
//! manual ack only once the job's outcome is known (after its reply, when the message asked for
//! one, is confirmed by the broker).
//!
//! The lanes share one connection, channel and consumer ([`shared`]: the broker spends half the
//! CPU per job it spends on a connection per lane), read and written by the lanes' own threads
//! ([`conn`]: a synchronous client, no I/O thread); the source's heartbeat thread ([`beat`])
//! keeps it alive while jobs run. Every exchange with the broker is bounded by `io_timeout`; a
//! broker that misses one is dropped and retried with backoff, across `urls` in turn.
//!
//! A restart cancels the consumer, gives back deliveries that arrived but did not start
//! (`basic.nack(requeue)`), closes the channel and connection, and execs: an AMQP session
//! cannot cross execve. The new generation consumes afresh; nothing acknowledged is run again,
//! and nothing unacknowledged is lost (the broker holds it).

mod beat;
pub mod client;
mod conn;
mod dedupe;
mod lane;
mod link;
mod shared;
mod wire;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::AmqpConfig;
use crate::error::Result;
use crate::source::lane::Lane;
use crate::source::JobSource;
pub use crate::status::ServerViews as Views;
use dedupe::Dedupe;

/// How long closing a link may take before it is dropped (the broker then requeues).
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// What the lanes share besides the connection.
struct Setup {
    cfg: AmqpConfig,
    /// For `amqps://` brokers.
    tls: Option<Arc<rustls::ClientConfig>>,
    max_payload: usize,
    /// The connection's name, as the broker shows it.
    name: String,
    /// `basic.qos` of the one channel: `prefetch` for each lane.
    prefetch: u16,
    views: Views,
    dedupe: Arc<Mutex<Dedupe>>,
    /// Runs that ended the worker (`max_attempts`).
    attempts: Mutex<crate::source::attempts::Attempts>,
    beats: Arc<beat::Beats>,
}

/// The configured brokers and the one connection this generation's lanes share.
pub struct AmqpSource {
    setup: Arc<Setup>,
    shared: Arc<shared::Shared>,
}

impl AmqpSource {
    /// The configured brokers (reading `[source.tls]` files once), for `lanes` lanes; the
    /// connection is made lazily, by the first lane that asks for a job.
    pub fn open(
        cfg: &AmqpConfig,
        state_dir: &std::path::Path,
        max_payload: usize,
        generation: u64,
        views: Views,
        lanes: usize,
    ) -> Result<AmqpSource> {
        let dedupe = dedupe::Dedupe::open(
            &crate::ops::layout::worker_dir(state_dir).join(dedupe::FILE),
            cfg.dedupe_ids,
        );
        crate::status::show_configured(&views, cfg.urls.iter().map(|u| u.shown.as_str()), lanes);
        let lanes = u16::try_from(lanes.max(1)).unwrap_or(u16::MAX);
        let setup = Arc::new(Setup {
            cfg: cfg.clone(),
            tls: tls_config(cfg)?,
            max_payload,
            name: format!(
                "gearshift {}:{}:{generation}",
                hostname(),
                std::process::id()
            ),
            prefetch: cfg.prefetch.saturating_mul(lanes),
            views,
            dedupe: Arc::new(Mutex::new(dedupe)),
            attempts: Mutex::new(crate::source::attempts::Attempts::open(
                &crate::ops::layout::worker_dir(state_dir),
                usize::from(lanes),
            )),
            beats: Arc::new(beat::Beats::default()),
        });
        Ok(AmqpSource {
            shared: Arc::new(shared::Shared::new(Arc::clone(&setup))?),
            setup,
        })
    }
}

/// What TLS broker `url` is reached with (None: plain `amqp://`): `config` (from
/// [`tls_config`]) and the name its certificate must carry, `[source.tls] server_name`, else the
/// URL's host.
pub(super) fn tls_target(
    cfg: &AmqpConfig,
    config: Option<&Arc<rustls::ClientConfig>>,
    url: &crate::config::AmqpUrl,
) -> Result<Option<crate::source::gearman::tls::TlsTarget>> {
    let Some(config) = config.filter(|_| url.tls) else {
        return Ok(None);
    };
    let host = cfg
        .tls
        .as_ref()
        .and_then(|t| t.server_name.clone())
        .unwrap_or_else(|| url.host.clone());
    let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|_| {
        crate::error::Error::Config(format!(
            "\"{}\" is not a valid TLS server name",
            crate::text::escape(&host)
        ))
    })?;
    Ok(Some((Arc::clone(config), name)))
}

/// Where Debian (and RHEL) keep the system's CA certificates.
const SYSTEM_ROOTS: [&str; 2] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

/// TLS for `amqps://` brokers (None when no URL asks for it): the system's CA certificates and
/// `[source.tls] ca_file`, and its client certificate if it names one.
pub(super) fn tls_config(cfg: &AmqpConfig) -> Result<Option<Arc<rustls::ClientConfig>>> {
    if !cfg.urls.iter().any(|u| u.tls) {
        return Ok(None);
    }
    let mut roots = rustls::RootCertStore::empty();
    for path in SYSTEM_ROOTS {
        let path = std::path::Path::new(path);
        if path.exists() {
            if let Err(e) = crate::source::gearman::tls::add_roots(&mut roots, path) {
                log::warn!("amqp: the system's CA certificates: {e}");
            }
        }
    }
    if let Some(files) = &cfg.tls {
        crate::source::gearman::tls::add_roots(&mut roots, &files.ca_file)?;
    }
    crate::source::gearman::tls::with_roots(roots, cfg.tls.as_ref()).map(Some)
}

impl JobSource for AmqpSource {
    fn lane(
        &self,
        index: usize,
        _functions: &[(String, Option<Duration>)],
    ) -> Result<Box<dyn Lane>> {
        Ok(Box::new(lane::AmqpLane::new(
            Arc::clone(&self.setup),
            Arc::clone(&self.shared),
            index,
        )))
    }

    fn wake(&self) {
        let _ = nix::unistd::write(self.shared.wake.as_ref(), &1u64.to_ne_bytes());
    }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}
