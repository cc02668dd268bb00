//! A pipelined load generator over the client protocol: `submit --count` and benchmarks.

use std::time::{Duration, Instant};

use super::client::{conn_err, server_error, submit_type, Client, Priority};
use super::connection::ConnError;
use super::protocol as p;
use crate::error::{Error, Result};

/// How a load run submits: how many jobs over how many connections, as what.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Jobs to submit in all.
    pub count: u64,
    /// Client connections, each with its share of the jobs (256 in flight each).
    pub connections: usize,
    /// Background jobs (counted when created) instead of foreground (counted when they end).
    pub background: bool,
    /// The jobs' priority.
    pub priority: Priority,
    /// Each job's unique id is `UNIQUE-CONNECTION-N` (default: the pid for UNIQUE), so jobs
    /// are never coalesced with each other.
    pub unique: String,
    /// Stop waiting after this long; jobs not finished by then are reported as such.
    pub timeout: Option<Duration>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            count: 1,
            connections: 1,
            background: false,
            priority: Priority::Normal,
            unique: String::new(),
            timeout: None,
        }
    }
}

/// The outcome of a load run.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Jobs the servers accepted (`JOB_CREATED`).
    pub submitted: u64,
    /// Jobs that ended with a result (foreground) or were created (background).
    pub completed: u64,
    /// Foreground jobs that failed or ended with an exception.
    pub failed: u64,
    /// Jobs without an outcome when the timeout passed.
    pub unfinished: u64,
    /// Wall time of the whole run.
    pub elapsed: Duration,
}

/// Submits `count` jobs over `connections` connections, pipelined (up to `window` outstanding
/// per connection). Foreground jobs are counted when they end; background jobs when created.
pub fn load(
    servers: &[String],
    function: &str,
    payload: &[u8],
    count: u64,
    connections: usize,
    background: bool,
    max_packet: usize,
) -> Result<LoadReport> {
    load_with(
        servers,
        function,
        payload,
        &LoadOptions {
            count,
            connections,
            background,
            ..LoadOptions::default()
        },
        max_packet,
        None,
    )
}

/// [`load`] with every option and the configured `[source.tls]` (the `submit --count` command).
pub(crate) fn load_with(
    servers: &[String],
    function: &str,
    payload: &[u8],
    opts: &LoadOptions,
    max_packet: usize,
    tls: Option<&crate::config::TlsFiles>,
) -> Result<LoadReport> {
    let started = Instant::now();
    let deadline = opts.timeout.map(|t| started + t);
    let (count, connections) = (opts.count, opts.connections.max(1) as u64);
    let threads: Vec<_> = (0..connections)
        .map(|c| {
            let share = count / connections + u64::from(c < count % connections);
            let (servers, function, payload, tls, opts) = (
                servers.to_vec(),
                function.to_string(),
                payload.to_vec(),
                tls.cloned(),
                opts.clone(),
            );
            std::thread::spawn(move || {
                let mut client = Client::connect_with(&servers, max_packet, tls.as_ref())?;
                load_one(&mut client, &function, &payload, share, c, &opts, deadline)
            })
        })
        .collect();
    let mut report = LoadReport::default();
    for t in threads {
        let r = t
            .join()
            .map_err(|_| Error::Internal("load thread panicked".into()))??;
        report.submitted += r.submitted;
        report.completed += r.completed;
        report.failed += r.failed;
        report.unfinished += r.unfinished;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

fn load_one(
    client: &mut Client,
    function: &str,
    payload: &[u8],
    count: u64,
    index: u64,
    opts: &LoadOptions,
    deadline: Option<Instant>,
) -> Result<LoadReport> {
    const WINDOW: u64 = 256;
    let addr = client.addr.clone();
    let kind = submit_type(opts.priority, opts.background);
    let prefix = if opts.unique.is_empty() {
        std::process::id().to_string()
    } else {
        opts.unique.clone()
    };
    let mut r = LoadReport::default();
    let mut outstanding = 0u64;
    while r.completed + r.failed < count {
        while r.submitted < count && outstanding < WINDOW {
            let unique = format!("{prefix}-{index}-{}", r.submitted);
            client
                .conn
                .queue(kind, &[function.as_bytes(), unique.as_bytes(), payload]);
            r.submitted += 1;
            outstanding += 1;
        }
        client.conn.flush().map_err(conn_err(&addr))?;
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                r.unfinished = count - r.completed - r.failed;
                return Ok(r);
            }
            let _ = client.conn.set_read_timeout(Some(left));
        }
        let pkt = match client.conn.recv() {
            Ok(pkt) => pkt,
            // A read timeout: the deadline decides, or (without one) we keep waiting.
            Err(ConnError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(conn_err(&addr)(e)),
        };
        match (pkt.kind, opts.background) {
            (p::JOB_CREATED, true) | (p::WORK_COMPLETE, false) => {
                r.completed += 1;
                outstanding -= 1;
            }
            (p::WORK_FAIL | p::WORK_EXCEPTION, false) => {
                r.failed += 1;
                outstanding -= 1;
            }
            (p::ERROR, _) => return Err(server_error(&addr, pkt.data)),
            _ => {}
        }
    }
    Ok(r)
}
