//! The AMQP 0-9-1 source (RabbitMQ), consuming as the PHP daemons do: a durable queue (bound to
//! a durable exchange when `[source.declare]` says so), `basic.qos(prefetch)` per lane, and a
//! manual ack only once the job's outcome is known (after its reply, when the message asked for
//! one, is confirmed by the broker).
//!
//! Each lane has its own connection and channel (a broken connection costs only its lane, as a
//! Gearman connection does); lapin serves the connection (heartbeats) from its own threads while
//! the lane runs a job. Every exchange with the broker is bounded by `io_timeout`; a broker that
//! misses one is dropped and retried with backoff, across `urls` in turn.
//!
//! A restart cancels the consumers, gives back deliveries that arrived but did not start
//! (`basic.nack(requeue)`), closes channels and connections, and execs: an AMQP session cannot
//! cross execve. The new generation consumes afresh; nothing acknowledged is run again, and
//! nothing unacknowledged is lost (the broker holds it).

mod broker;
pub mod client;
mod dedupe;
mod lane;
mod link;
mod wait;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::AmqpConfig;
use crate::error::{Error, Result};
use crate::source::lane::Lane;
use crate::source::JobSource;
pub use crate::status::ServerViews as Views;
use dedupe::Dedupe;

/// How long closing a link may take before it is dropped (the broker then requeues).
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// What a lane is made of.
struct Setup {
    cfg: AmqpConfig,
    runtime: Runtime,
    tls: lapin::tcp::OwnedTLSConfig,
    max_payload: usize,
    name: String,
    index: usize,
    /// Notified by [`JobSource::wake`]: lanes waiting for a delivery look at their stop flag.
    wake: Arc<event_listener::Event>,
    views: Views,
    dedupe: Arc<Mutex<Dedupe>>,
    broker: Arc<broker::Broker>,
}

/// The executor lapin's connections run on (its threads serve heartbeats while lanes run jobs).
type Runtime = async_rs::AGERuntime;

/// The configured brokers, shared by this generation's lanes.
pub struct AmqpSource {
    cfg: AmqpConfig,
    runtime: Runtime,
    tls: lapin::tcp::OwnedTLSConfig,
    max_payload: usize,
    generation: u64,
    wake: Arc<event_listener::Event>,
    views: Views,
    dedupe: Arc<Mutex<dedupe::Dedupe>>,
    broker: Arc<broker::Broker>,
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
        let tls = match &cfg.tls {
            None => lapin::tcp::OwnedTLSConfig::default(),
            Some(files) => tls_config(files)?,
        };
        let dedupe = dedupe::Dedupe::open(
            &crate::ops::layout::worker_dir(state_dir).join(dedupe::FILE),
            cfg.dedupe_ids,
        );
        Ok(AmqpSource {
            cfg: cfg.clone(),
            runtime: async_rs::Runtime::async_global_executor(),
            tls,
            max_payload,
            generation,
            wake: Arc::new(event_listener::Event::new()),
            views,
            dedupe: Arc::new(Mutex::new(dedupe)),
            broker: Arc::new(broker::Broker::starting_at(
                std::process::id() as usize % cfg.urls.len().max(1),
            )),
        })
    }
}

/// `[source.tls]` as lapin takes it: the CA chain (PEM) and a client identity (PEM + PKCS#8).
pub(super) fn tls_config(files: &crate::config::TlsFiles) -> Result<lapin::tcp::OwnedTLSConfig> {
    // Through safefs, as for Gearman: root reads these at `check` and `submit`.
    let read = |path: &std::path::Path, what: &str| {
        crate::source::gearman::tls::read_pem(path, &format!("reading [source.tls] {what}"))
    };
    let cert_chain = Some(
        String::from_utf8(read(&files.ca_file, "ca_file")?).map_err(|_| {
            Error::Invalid(format!("\"{}\" is not PEM text", files.ca_file.display()))
        })?,
    );
    let identity = match (&files.cert_file, &files.key_file) {
        (Some(cert), Some(key)) => {
            let key_pem = read(key, "key_file")?;
            check_key(&key_pem, key)?;
            Some(lapin::tcp::OwnedIdentity::PKCS8 {
                pem: read(cert, "cert_file")?,
                key: key_pem,
            })
        }
        _ => None,
    };
    Ok(lapin::tcp::OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

/// A PEM file holds a private key (lapin would say so only at the first connect).
fn check_key(pem: &[u8], path: &std::path::Path) -> Result<()> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::PrivateKeyDer::from_pem_slice(pem)
        .map(drop)
        .map_err(|e| Error::Invalid(format!("{}: no private key in it: {e:?}", path.display())))
}

impl JobSource for AmqpSource {
    fn lane(
        &self,
        index: usize,
        _functions: &[(String, Option<Duration>)],
    ) -> Result<Box<dyn Lane>> {
        Ok(Box::new(lane::AmqpLane::new(Setup {
            cfg: self.cfg.clone(),
            runtime: self.runtime.clone(),
            tls: self.tls.clone(),
            max_payload: self.max_payload,
            name: format!(
                "gearshift {}:{}:{}",
                hostname(),
                std::process::id(),
                self.generation
            ),
            index,
            wake: Arc::clone(&self.wake),
            views: Arc::clone(&self.views),
            dedupe: Arc::clone(&self.dedupe),
            broker: Arc::clone(&self.broker),
        })))
    }

    fn wake(&self) {
        self.wake.notify(usize::MAX);
    }

    /// Every lane has closed its channel: close the connection (at most 1 s).
    fn settle(&self, _exiting: bool) {
        self.broker.close(CLOSE_WAIT);
    }
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}
