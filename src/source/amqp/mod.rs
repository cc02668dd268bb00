//! The AMQP 0-9-1 source (RabbitMQ), consuming as the PHP daemons do: a durable queue (bound to
//! a durable exchange when `[source.declare]` says so), `basic.qos(prefetch)` per lane, and a
//! manual ack only once the job's outcome is known (after its reply, when the message asked for
//! one, is confirmed by the broker).
//!
//! Each lane has its own connection and channel (a broken connection costs only its lane, as a
//! Gearman connection does), read and written by the lane's own thread ([`conn`]: a synchronous
//! client, no I/O thread); the source's heartbeat thread ([`beat`]) keeps them alive while jobs
//! run. Every exchange with the broker is bounded by `io_timeout`; a broker that misses one is
//! dropped and retried with backoff, across `urls` in turn.
//!
//! A restart cancels the consumers, gives back deliveries that arrived but did not start
//! (`basic.nack(requeue)`), closes channels and connections, and execs: an AMQP session cannot
//! cross execve. The new generation consumes afresh; nothing acknowledged is run again, and
//! nothing unacknowledged is lost (the broker holds it).

mod beat;
pub mod client;
mod conn;
mod dedupe;
mod lane;
mod link;
mod wire;

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::config::AmqpConfig;
use crate::error::Result;
use crate::source::lane::Lane;
use crate::source::JobSource;
pub use crate::status::ServerViews as Views;
use dedupe::Dedupe;

/// How long closing a link may take before it is dropped (the broker then requeues).
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// What a lane is made of.
struct Setup {
    cfg: AmqpConfig,
    /// For `amqps://` brokers.
    tls: Option<Arc<rustls::ClientConfig>>,
    max_payload: usize,
    name: String,
    index: usize,
    /// Written by [`JobSource::wake`]: the lane, waiting in poll(2), looks at its stop flag.
    wake: Arc<OwnedFd>,
    views: Views,
    dedupe: Arc<Mutex<Dedupe>>,
    beats: Arc<beat::Beats>,
}

/// The configured brokers, shared by this generation's lanes.
pub struct AmqpSource {
    cfg: AmqpConfig,
    tls: Option<Arc<rustls::ClientConfig>>,
    max_payload: usize,
    generation: u64,
    wakers: Mutex<Vec<Weak<OwnedFd>>>,
    views: Views,
    dedupe: Arc<Mutex<dedupe::Dedupe>>,
    beats: Arc<beat::Beats>,
}

impl AmqpSource {
    /// The configured brokers (reading `[source.tls]` files once); lanes connect lazily.
    pub fn open(
        cfg: &AmqpConfig,
        state_dir: &std::path::Path,
        max_payload: usize,
        generation: u64,
        views: Views,
    ) -> Result<AmqpSource> {
        let dedupe = dedupe::Dedupe::open(
            &crate::ops::layout::worker_dir(state_dir).join(dedupe::FILE),
            cfg.dedupe_ids,
        );
        Ok(AmqpSource {
            cfg: cfg.clone(),
            tls: tls_config(cfg)?,
            max_payload,
            generation,
            wakers: Mutex::new(Vec::new()),
            views,
            dedupe: Arc::new(Mutex::new(dedupe)),
            beats: Arc::new(beat::Beats::default()),
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
        let wake = Arc::new(crate::source::gearman::worker::eventfd()?);
        if let Ok(mut w) = self.wakers.lock() {
            w.retain(|w| w.strong_count() > 0);
            w.push(Arc::downgrade(&wake));
        }
        Ok(Box::new(lane::AmqpLane::new(Setup {
            cfg: self.cfg.clone(),
            tls: self.tls.clone(),
            max_payload: self.max_payload,
            name: format!(
                "gearshift {}:{}:{}",
                hostname(),
                std::process::id(),
                self.generation
            ),
            index,
            wake,
            views: Arc::clone(&self.views),
            dedupe: Arc::clone(&self.dedupe),
            beats: Arc::clone(&self.beats),
        })))
    }

    fn wake(&self) {
        if let Ok(w) = self.wakers.lock() {
            for fd in w.iter().filter_map(Weak::upgrade) {
                let _ = nix::unistd::write(fd.as_ref(), &1u64.to_ne_bytes());
            }
        }
    }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}
