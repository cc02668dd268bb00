//! The client side: submitting jobs to gearmand (the `submit` command), and a pipelined load
//! generator for benchmarks and chaos tests.

use std::time::{Duration, Instant};

use super::connection::{Conn, ConnError};
use super::protocol as p;
use crate::error::{Error, Result};

/// Job priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    /// `SUBMIT_JOB`, `SUBMIT_JOB_BG`.
    #[default]
    Normal,
    /// `SUBMIT_JOB_HIGH`, `SUBMIT_JOB_HIGH_BG`: ahead of normal jobs.
    High,
    /// `SUBMIT_JOB_LOW`, `SUBMIT_JOB_LOW_BG`: after normal jobs.
    Low,
}

pub(super) fn submit_type(priority: Priority, background: bool) -> u32 {
    match (priority, background) {
        (Priority::Normal, false) => p::SUBMIT_JOB,
        (Priority::Normal, true) => p::SUBMIT_JOB_BG,
        (Priority::High, false) => p::SUBMIT_JOB_HIGH,
        (Priority::High, true) => p::SUBMIT_JOB_HIGH_BG,
        (Priority::Low, false) => p::SUBMIT_JOB_LOW,
        (Priority::Low, true) => p::SUBMIT_JOB_LOW_BG,
    }
}

/// What a running foreground job sends before its end.
#[derive(Debug, PartialEq, Eq)]
pub enum Update<'a> {
    /// `WORK_DATA`: a piece of the result sent early.
    Data(&'a [u8]),
    /// `WORK_WARNING`: a warning (an executable's stderr, a job's `warning`).
    Warning(&'a [u8]),
    /// `WORK_STATUS`: progress as numerator and denominator.
    Status(u64, u64),
}

/// How a foreground job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `WORK_COMPLETE` with the result.
    Complete(Vec<u8>),
    /// `WORK_FAIL`: the job failed (no message in the protocol).
    Fail,
    /// `WORK_EXCEPTION` with the failure's message (the client asked for exceptions).
    Exception(Vec<u8>),
}

/// A client connection to the first reachable server.
pub struct Client {
    pub(super) conn: Conn,
    pub(super) addr: String,
    deadline: Option<Instant>,
}

/// How long connecting and the first exchange may take.
const HANDSHAKE: Duration = Duration::from_secs(3);

pub(super) fn conn_err(addr: &str) -> impl Fn(ConnError) -> Error + '_ {
    move |e| Error::Peer(format!("gearman {addr}: {e}"))
}

impl Client {
    /// Connects to the first of `servers` that answers, asking for exceptions (so a worker's
    /// WORK_EXCEPTION text reaches us).
    /// `tls://` servers need [`Client::connect_tls`].
    pub fn connect(servers: &[String], max_packet: usize) -> Result<Client> {
        Client::connect_with(servers, max_packet, None)
    }

    /// [`Client::connect`] where `tls://` servers are verified against `ca_file` (PEM), with
    /// an optional client certificate and key and a name to verify instead of the host.
    pub fn connect_tls(
        servers: &[String],
        max_packet: usize,
        ca_file: &std::path::Path,
        client_cert: Option<(&std::path::Path, &std::path::Path)>,
        server_name: Option<&str>,
    ) -> Result<Client> {
        let files = crate::config::TlsFiles {
            ca_file: ca_file.to_path_buf(),
            cert_file: client_cert.map(|c| c.0.to_path_buf()),
            key_file: client_cert.map(|c| c.1.to_path_buf()),
            server_name: server_name.map(str::to_string),
        };
        Client::connect_with(servers, max_packet, Some(&files))
    }

    /// Connects with the configured `[source.tls]` (the `submit` command).
    pub(crate) fn connect_with(
        servers: &[String],
        max_packet: usize,
        tls: Option<&crate::config::TlsFiles>,
    ) -> Result<Client> {
        let targets = super::tls::targets(servers, tls)?;
        let mut errors = Vec::new();
        for (addr, (target, tls)) in servers.iter().zip(&targets) {
            match Client::handshake(addr, target, tls.as_ref(), max_packet) {
                Ok(c) => return Ok(c),
                Err(e) => errors.push(e.to_string()),
            }
        }
        Err(Error::Msg(format!(
            "no gearman server reachable ({})",
            errors.join("; ")
        )))
    }

    /// Connects to `addr` and asks for exceptions, within a few seconds: a server that does not
    /// answer, or answers garbage, is skipped for the next one.
    fn handshake(
        addr: &str,
        target: &str,
        tls: Option<&super::tls::TlsTarget>,
        max_packet: usize,
    ) -> Result<Client> {
        let conn = Conn::connect(target, HANDSHAKE, p::RES, max_packet, tls)
            .map_err(|e| Error::Peer(format!("{addr}: {e}")))?;
        let mut c = Client {
            conn,
            addr: addr.to_string(),
            deadline: None,
        };
        c.conn
            .set_read_timeout(Some(HANDSHAKE))
            .map_err(|e| Error::io(format!("gearman {addr}"), e))?;
        c.conn.queue(p::OPTION_REQ, &[b"exceptions"]);
        c.conn.flush().map_err(conn_err(addr))?;
        loop {
            let pkt = c.conn.recv().map_err(conn_err(addr))?;
            match pkt.kind {
                p::OPTION_RES => break,
                p::ERROR => {
                    return Err(Error::Peer(format!(
                        "gearman {addr}: refused option exceptions"
                    )))
                }
                _ => {}
            }
        }
        c.conn
            .set_read_timeout(Some(super::connection::IO_TIMEOUT))
            .map_err(|e| Error::io(format!("gearman {addr}"), e))?;
        Ok(c)
    }

    /// Gives up waiting for a foreground job at `deadline` (`submit --timeout`).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    /// Submits a background job and returns its handle.
    pub fn submit_background(
        &mut self,
        function: &str,
        unique: &str,
        payload: &[u8],
        priority: Priority,
    ) -> Result<String> {
        let addr = self.addr.clone();
        self.conn.queue(
            submit_type(priority, true),
            &[function.as_bytes(), unique.as_bytes(), payload],
        );
        self.conn.flush().map_err(conn_err(&addr))?;
        loop {
            let pkt = self.conn.recv().map_err(conn_err(&addr))?;
            match pkt.kind {
                p::JOB_CREATED => return Ok(String::from_utf8_lossy(pkt.data).into_owned()),
                p::ERROR => return Err(server_error(&addr, pkt.data)),
                _ => {}
            }
        }
    }

    /// Submits a foreground job and waits for its end, passing updates to `on_update`.
    pub fn submit(
        &mut self,
        function: &str,
        unique: &str,
        payload: &[u8],
        priority: Priority,
        mut on_update: impl FnMut(Update<'_>),
    ) -> Result<Outcome> {
        let addr = self.addr.clone();
        self.conn.queue(
            submit_type(priority, false),
            &[function.as_bytes(), unique.as_bytes(), payload],
        );
        self.conn.flush().map_err(conn_err(&addr))?;
        let mut handle: Option<Vec<u8>> = None;
        loop {
            if let Some(d) = self.deadline {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(Error::TimedOut(
                        self.what_is_known(function, handle.as_deref()),
                    ));
                }
                let _ = self.conn.set_read_timeout(Some(left));
            }
            let pkt = match self.conn.recv() {
                Ok(pkt) => pkt,
                Err(ConnError::Io(e))
                    if self.deadline.is_some_and(|d| Instant::now() >= d)
                        && matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                {
                    continue;
                }
                Err(e) => return Err(conn_err(&addr)(e)),
            };
            match pkt.kind {
                p::JOB_CREATED => handle = Some(pkt.data.to_vec()),
                p::ERROR => return Err(server_error(&addr, pkt.data)),
                kind => {
                    let [h, rest] = pkt.args::<2>().unwrap_or([pkt.data, b""]);
                    if handle.as_deref() != Some(h) {
                        continue;
                    }
                    match kind {
                        p::WORK_COMPLETE => return Ok(Outcome::Complete(rest.to_vec())),
                        p::WORK_FAIL => return Ok(Outcome::Fail),
                        p::WORK_EXCEPTION => return Ok(Outcome::Exception(rest.to_vec())),
                        p::WORK_DATA => on_update(Update::Data(rest)),
                        p::WORK_WARNING => on_update(Update::Warning(rest)),
                        p::WORK_STATUS => {
                            let [n, d] = pkt
                                .args::<3>()
                                .map(|[_, n, d]| [n, d])
                                .unwrap_or([b"0", b"0"]);
                            let num = |b: &[u8]| String::from_utf8_lossy(b).parse().unwrap_or(0);
                            on_update(Update::Status(num(n), num(d)));
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

impl Client {
    /// Why a foreground job has no result yet, as far as the server says: asked with
    /// GET_STATUS (1 s at most) once the deadline has passed.
    fn what_is_known(&mut self, function: &str, handle: Option<&[u8]>) -> String {
        let addr = self.addr.clone();
        let Some(handle) = handle else {
            return format!(
                "no result for {function} from gearman {addr} in time: the server did not even acknowledge the job"
            );
        };
        let shown = crate::text::escape_bytes(handle);
        let asked = (|| -> Option<(bool, bool, String, String)> {
            self.conn.queue(p::GET_STATUS, &[handle]);
            self.conn.flush().ok()?;
            let until = Instant::now() + Duration::from_secs(1);
            loop {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return None;
                }
                let _ = self.conn.set_read_timeout(Some(left));
                let pkt = self.conn.recv().ok()?;
                if pkt.kind != p::STATUS_RES {
                    continue;
                }
                let [h, known, running, n, d] = pkt.args::<5>()?;
                if h != handle {
                    continue;
                }
                let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                return Some((known == b"1", running == b"1", text(n), text(d)));
            }
        })();
        match asked {
            Some((_, true, n, d)) if n != "0" || d != "0" => format!(
                "job {shown} ({function}) is running on a worker (status {n}/{d}) but did not finish in time"
            ),
            Some((_, true, _, _)) => format!(
                "job {shown} ({function}) is running on a worker but did not finish in time"
            ),
            Some((true, false, _, _)) => format!(
                "job {shown} ({function}) is queued on gearman {addr}; no worker took it in time: is one registered for {function}? (gearadmin --status)"
            ),
            Some((false, _, _, _)) => format!(
                "job {shown} ({function}) is no longer known to gearman {addr} (it ended, or the server restarted)"
            ),
            None => format!(
                "no result for {function} (job {shown}) from gearman {addr} in time, and it did not answer GET_STATUS"
            ),
        }
    }
}

pub(super) fn server_error(addr: &str, data: &[u8]) -> Error {
    let text = String::from_utf8_lossy(data).replace('\0', ": ");
    Error::Peer(format!("gearman {addr}: server error {text}"))
}

/// Tries a TCP connect to each server (1 s each): Ok if one answers, else every error.
pub fn probe(servers: &[String]) -> std::result::Result<(), String> {
    let mut errors = Vec::new();
    for server in servers {
        let addr = server.strip_prefix(super::tls::SCHEME).unwrap_or(server);
        let by = std::time::Instant::now() + Duration::from_secs(1);
        let sa = match crate::source::resolve::addresses_by(addr, by) {
            Ok(a) => a.into_iter().next(),
            Err(e) => {
                errors.push(e.to_string());
                continue;
            }
        };
        let Some(sa) = sa else {
            errors.push(format!("{addr}: cannot resolve: no address"));
            continue;
        };
        match std::net::TcpStream::connect_timeout(&sa, Duration::from_secs(1)) {
            Ok(_) => return Ok(()),
            Err(e) => errors.push(format!("{addr}: {e}")),
        }
    }
    Err(errors.join("; "))
}
