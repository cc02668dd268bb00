//! The generation's one connection to a broker, shared by the lanes (each opens its own channel
//! on it): one socket, one lapin I/O thread, heartbeats served whatever the lanes do.
//!
//! The first lane that needs a connection makes it (the others wait for it, or for its failure,
//! on the slot's lock; the connect is bounded and given up when the lanes are asked to stop). A
//! failed connect is retried with backoff and jitter (100 ms doubling to `reconnect_max`),
//! across `urls` in turn; meanwhile lanes are told the last error at once. A connection found
//! closed is dropped, and the next lane to ask makes a new one.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::{Connection, ConnectionProperties};

use super::wait::step;
use super::Setup;
use crate::config::AmqpUrl;
use crate::error::{Error, Result};
use crate::shutdown::Shutdown;

const BACKOFF_MIN: Duration = Duration::from_millis(100);

/// A connection lanes share, and which broker it reaches.
#[derive(Clone)]
pub(super) struct Shared {
    pub conn: Arc<Connection>,
    /// Tells this connection from earlier ones.
    pub epoch: u64,
    pub url: usize,
}

#[derive(Default)]
struct Slot {
    current: Option<Shared>,
    epochs: u64,
    next_url: usize,
    /// The broker of the last connect tried (for the lanes' views).
    tried: usize,
    backoff: Duration,
    retry_at: Option<Instant>,
    last_error: String,
    /// The failure last logged (the same again is only counted: it is in `status`).
    logged: String,
}

/// The slot for the generation's connection.
#[derive(Default)]
pub(super) struct Broker {
    slot: Mutex<Slot>,
}

impl Broker {
    /// A slot whose first connect tries broker `first` (a fleet started together spreads over
    /// the brokers instead of all connecting to the first one listed).
    pub fn starting_at(first: usize) -> Broker {
        Broker {
            slot: Mutex::new(Slot {
                next_url: first,
                ..Slot::default()
            }),
        }
    }

    /// The live connection, made now if there is none (Err: none can be had now, and why).
    pub fn connection(&self, s: &Setup, stop: &Shutdown) -> Result<Shared> {
        let mut slot = self
            .slot
            .lock()
            .map_err(|_| Error::Internal("amqp connection lock poisoned".into()))?;
        if let Some(c) = &slot.current {
            if c.conn.status().connected() {
                return Ok(c.clone());
            }
            slot.current = None;
        }
        if slot.retry_at.is_some_and(|t| Instant::now() < t) {
            return Err(Error::Gone(slot.last_error.clone()));
        }
        let url = slot.next_url % s.cfg.urls.len().max(1);
        slot.tried = url;
        match connect(s, &s.cfg.urls[url], stop) {
            Ok(conn) => {
                slot.epochs += 1;
                let shared = Shared {
                    conn: Arc::new(conn),
                    epoch: slot.epochs,
                    url,
                };
                slot.current = Some(shared.clone());
                slot.backoff = BACKOFF_MIN;
                slot.retry_at = None;
                if !slot.logged.is_empty() {
                    log::info!("amqp {}: connected", s.cfg.urls[url].shown);
                    slot.logged.clear();
                }
                Ok(shared)
            }
            Err(e) if stop.is_set() => Err(e),
            Err(e) => {
                let why = e.to_string();
                if slot.logged != why {
                    log::warn!(
                        "amqp {}: {why}; retrying with backoff (up to {:?})",
                        s.cfg.urls[url].shown,
                        s.cfg.reconnect_max
                    );
                    slot.logged = why.clone();
                }
                let backoff = slot.backoff.max(BACKOFF_MIN);
                let jitter = 0.75 + 0.5 * crate::clock::random_fraction();
                slot.retry_at = Some(Instant::now() + backoff.mul_f64(jitter));
                slot.backoff = (backoff * 2).min(s.cfg.reconnect_max);
                slot.next_url = url + 1;
                slot.last_error = why;
                Err(e)
            }
        }
    }

    /// A lane's link on connection `epoch` failed: if the connection itself is closed or
    /// errored, drop it, so the next lane to ask makes a new one, on the next broker.
    pub fn failed_if_closed(&self, epoch: u64) {
        if let Ok(mut slot) = self.slot.lock() {
            let closed = slot
                .current
                .as_ref()
                .is_some_and(|c| c.epoch == epoch && !c.conn.status().connected());
            if closed {
                if let Some(c) = slot.current.take() {
                    slot.next_url = c.url + 1;
                }
            }
        }
    }

    /// The broker of the last connect tried, or of the live connection.
    pub fn tried(&self) -> usize {
        self.slot
            .lock()
            .map(|s| s.current.as_ref().map_or(s.tried, |c| c.url))
            .unwrap_or(0)
    }

    /// Closes the connection (every lane has ended), waiting at most `limit`.
    pub fn close(&self, limit: Duration) {
        let current = self
            .slot
            .lock()
            .ok()
            .and_then(|mut slot| slot.current.take());
        if let Some(c) = current {
            let _ = super::wait::bounded(
                limit,
                "closing the connection",
                c.conn.close(200, "gearshift restarting or stopping".into()),
            );
        }
    }
}

/// A connection to `url`: heartbeat and frame size as configured.
fn connect(s: &Setup, url: &AmqpUrl, stop: &Shutdown) -> Result<Connection> {
    let mut uri: lapin::uri::AMQPUri = url
        .url
        .parse()
        .map_err(|e| Error::Config(format!("{}: {e}", url.shown)))?;
    uri.query.heartbeat = Some(s.cfg.heartbeat.as_secs().min(u64::from(u16::MAX)) as u16);
    // Frames no larger than a job needs (the broker may ask for smaller ones).
    uri.query.frame_max = Some((s.max_payload + 4096).clamp(8192, 1 << 20) as u32);
    uri.query.connection_timeout = Some(s.cfg.io_timeout.as_millis() as u64);
    let props = ConnectionProperties::default().with_connection_name(s.name.clone().into());
    step(
        s,
        stop,
        "connecting",
        Connection::connect_uri_with_config(uri, props, s.tls.clone(), s.runtime.clone()),
    )
}
