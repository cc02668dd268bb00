//! `config.toml`: parsing, validation and error messages that point at `file:line:col`.
//!
//! Parsing is strict: an unknown key is an error with a suggestion, because a silently ignored
//! typo (`concurency = 8`) is worse than a refused reload. Relative paths are resolved against
//! the directory of the config file, so a config works the same from any working directory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::text::ShowPath;

mod amqp;
mod cx;
mod duration;
mod kinds;
mod messages;
mod parse;
mod raw;
mod size;
mod syntax;

pub use amqp::{AmqpConfig, AmqpUrl};
pub use duration::{parse_duration, Dur, Limit, MAX_PAYLOAD};
pub(crate) use messages::closest;
pub use size::{bytes, MinFree};

/// The time limit of a function without a `[functions.NAME] timeout` (`[worker] job_timeout`).
pub const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long a restart or a stop waits past a Rust function's timeout before it abandons the
/// job (`[worker] abandon_after`).
pub const DEFAULT_ABANDON_AFTER: Duration = Duration::from_secs(60);
use messages::line_col;
use parse::{functions, metrics, source, worker, Cx};
use raw::*;
use syntax::explain_at;

/// A validated configuration with absolute paths.
#[derive(Debug, Clone)]
pub struct Config {
    /// Absolute path of the file this was read from.
    pub path: PathBuf,
    /// Hex sha256 of the file's bytes: the identity of this config for change detection.
    pub sha256: String,
    /// The text it was parsed from (handed to the next generation, which then runs exactly
    /// what was validated).
    pub text: String,
    pub worker: Worker,
    pub source: Source,
    pub functions: BTreeMap<String, FunctionConfig>,
    pub log: Log,
    /// The Prometheus endpoint, if any.
    pub metrics: Option<Metrics>,
}

/// `[metrics]`: where `/metrics` is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metrics {
    pub listen: std::net::SocketAddr,
}

#[derive(Debug, Clone)]
pub struct Worker {
    pub concurrency: usize,
    pub jobs_dir: PathBuf,
    pub state_dir: PathBuf,
    pub max_payload_bytes: usize,
    pub watch_config: bool,
    pub watch_jobs: bool,
    /// File mode creation mask of a daemon (`start`).
    pub umask: u32,
    /// Drop to this user (and group) when started as root.
    pub user: Option<String>,
    pub group: Option<String>,
    /// `file:line:col` of `user` and `group`, for the errors of looking them up.
    pub user_at: Option<String>,
    pub group_at: Option<String>,
    /// Allow running as root without `user`.
    pub allow_root: bool,
    /// Refuse config and job files writable by group/others or owned by another user.
    pub strict_modes: bool,
    /// Watch the binary's path for deploys.
    pub watch_binary: bool,
    /// Recycle (re-exec) after this many jobs in one generation (0: never).
    pub max_jobs: u64,
    /// Recycle when resident memory exceeds this many MiB (0: never).
    pub max_rss_mb: u64,
    /// Recycle a generation older than this.
    pub max_age: Option<Duration>,
    /// Each limit is raised by a random fraction up to this (0.1 = up to 10%), so a fleet
    /// started together does not recycle all at once.
    pub recycle_splay: f64,
    /// Delay a restart caused by a config, jobs_dir or binary change by a random fraction of
    /// this (a fleet that gets the change at once does not reconnect at once). None: off.
    pub restart_splay: Option<Duration>,
    /// Offer the binary's built-in functions (`echo`, `reverse`, `sha256`, `sleep`). Default:
    /// yes for the spool (local submitters only), no for a network source, where any client
    /// of a shared server could send them.
    pub builtins: bool,
    /// The time limit of a function without its own `[functions.NAME] timeout`; None only
    /// when written as `"none"`.
    pub job_timeout: Option<Duration>,
    /// Every job process starts with this `oom_score_adj` (never below the worker's own), so
    /// the kernel's OOM killer takes a job's processes before the worker.
    pub job_oom_score_adj: i32,
    /// A restart or a stop that waits for a Rust function this long past its timeout abandons
    /// it (the job runs again, as after a kill); None (`"none"`): it waits however long it runs.
    pub abandon_after: Option<Duration>,
}

#[derive(Debug, Clone)]
pub enum Source {
    Spool(SpoolConfig),
    Gearman(GearmanConfig),
    Zeromq(ZeromqConfig),
    Amqp(AmqpConfig),
}

/// `kind = "zeromq"`: jobs arrive on ZeroMQ sockets and are kept in the embedded spool.
#[derive(Debug, Clone)]
pub struct ZeromqConfig {
    /// Where accepted jobs are kept (and results stored).
    pub spool: SpoolConfig,
    /// `tcp://host:port` and `ipc:///path` endpoints, bound once and kept across restarts.
    pub bind: Vec<Endpoint>,
    /// The function of single-frame messages (none: every message must name one).
    pub function: Option<String>,
    /// What a client is told once its job is durable.
    pub reply: ZeromqReply,
    /// How long the ingress, after a message that came alone, first polls for the next without
    /// sleeping (zero: never; `source::spin`).
    pub busy_poll: Duration,
    /// Clients connected at once at most; those over it are closed as soon as they are
    /// accepted. None: from the descriptor limit at start (`zeromq::peer_cap`).
    pub max_connections: Option<u64>,
    /// A TCP client whose host stops answering (gone without a FIN) is closed within about
    /// this (`source::detect_dead_peer`), so it never holds one of `max_connections` for good.
    pub dead_peer_timeout: Duration,
}

/// Where a ZeroMQ source listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `tcp://host:port` (`*` for every address).
    Tcp { host: String, port: u16 },
    /// `ipc:///absolute/path` (a Unix socket).
    Ipc(PathBuf),
}

impl Endpoint {
    /// Parses `tcp://host:port` or `ipc:///absolute/path`; the error says what is wrong.
    pub fn parse(text: &str) -> std::result::Result<Endpoint, String> {
        let shown = crate::text::escape(text);
        if let Some(rest) = text.strip_prefix("tcp://") {
            let parsed = rest.rsplit_once(':').and_then(|(h, p)| {
                let host = h.trim_start_matches('[').trim_end_matches(']');
                let port = p.parse::<u16>().ok().filter(|p| *p != 0)?;
                let ok = !host.is_empty()
                    && !host.contains('/')
                    && !host.chars().any(|c| c.is_whitespace() || c.is_control());
                ok.then(|| Endpoint::Tcp {
                    host: host.to_string(),
                    port,
                })
            });
            return parsed.ok_or_else(|| {
                format!(
                    "endpoint \"{shown}\" is not tcp://host:port (e.g. \"tcp://127.0.0.1:5555\")"
                )
            });
        }
        if let Some(path) = text.strip_prefix("ipc://") {
            let path = Path::new(path);
            // sun_path holds 108 bytes with its NUL.
            if !path.is_absolute() || path.as_os_str().len() > 107 {
                return Err(format!(
                    "endpoint \"{shown}\" is not ipc:// and an absolute path of at most 107 bytes (e.g. \"ipc:///run/gearshift/jobs.sock\")"
                ));
            }
            return Ok(Endpoint::Ipc(path.to_path_buf()));
        }
        Err(format!(
            "endpoint \"{shown}\" is neither tcp://host:port nor ipc:///path (gearshift binds these two transports)"
        ))
    }

    /// Whether only this host can reach it (a loopback address, or a Unix socket).
    pub fn is_local(&self) -> bool {
        match self {
            Endpoint::Ipc(_) => true,
            Endpoint::Tcp { host, .. } => {
                host == "localhost"
                    || host
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp://[{host}]:{port}")
            }
            Endpoint::Tcp { host, port } => write!(f, "tcp://{host}:{port}"),
            Endpoint::Ipc(p) => write!(f, "ipc://{}", p.display()),
        }
    }
}

/// The reply to an accepted message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeromqReply {
    /// `TRUE`, as the PHP daemons answer.
    True,
    /// The job id (for `gearshift result ID`).
    Id,
}

#[derive(Debug, Clone)]
pub struct GearmanConfig {
    /// Runs of a job that ended the worker before it is failed unrun (WORK_FAIL).
    pub max_attempts: u32,
    /// `host:port` of each server; every lane keeps one connection to each.
    pub servers: Vec<String>,
    /// Prefix of the client id shown by `gearadmin --workers` (default `host:pid:generation`).
    pub client_id: Option<String>,
    /// Send failures as WORK_EXCEPTION with the error text (clients must ask for exceptions).
    pub exceptions: bool,
    /// Largest packet accepted from a server; a bigger one drops the connection.
    pub max_packet_bytes: usize,
    /// A server that leaves a request (connect, handshake, GRAB, ECHO, a write) unanswered
    /// this long is dropped and backed off.
    pub io_timeout: Duration,
    /// The longest pause between reconnects (backoff doubles from 100 ms up to this).
    pub reconnect_max: Duration,
    /// A connection whose peer stops answering (a host gone, a link down: no FIN, no RST) is
    /// noticed within about this long: TCP keepalive while idle, TCP_USER_TIMEOUT while
    /// data is unacknowledged.
    pub dead_peer_timeout: Duration,
    /// How long a lane waiting for gearmand's answer to a GRAB first polls without sleeping
    /// (zero: never; `source::spin`).
    pub busy_poll: Duration,
    /// `[source.tls]`: for `tls://` servers.
    pub tls: Option<TlsFiles>,
}

/// `[source.tls]`: the files a TLS connection to gearmand uses (read when a generation is
/// prepared, so a bad file refuses the reload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The CA certificate(s) the server's chain must lead to (PEM).
    pub ca_file: PathBuf,
    /// A client certificate chain and its key (PEM), for servers that ask for one.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// The name the server's certificate must carry, instead of the host in `servers`.
    pub server_name: Option<String>,
}

#[derive(Debug, Clone)]
pub struct SpoolConfig {
    pub dir: PathBuf,
    pub max_attempts: u32,
    pub retain_results: Duration,
    /// Room kept free for results: no new job is taken while less is free (`[source] min_free`).
    pub min_free: MinFree,
    /// fsync job and result files and their directories (the durability promise). Only a
    /// benchmark or a throwaway queue should turn this off.
    pub fsync: bool,
}

#[derive(Debug, Clone, Default)]
pub struct FunctionConfig {
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct Log {
    pub level: log::LevelFilter,
    /// Log to this file (appending; reopened on SIGUSR1) instead of stderr.
    pub file: Option<PathBuf>,
    /// One JSON object per line instead of text.
    pub json: bool,
    /// A line per finished job at info level (id, function, duration, outcome).
    pub jobs: bool,
}

impl Source {
    /// The TLS files a network source reads, if any.
    pub fn tls(&self) -> Option<&TlsFiles> {
        match self {
            Source::Gearman(g) => g.tls.as_ref(),
            Source::Amqp(a) => a.tls.as_ref(),
            Source::Spool(_) | Source::Zeromq(_) => None,
        }
    }

    /// The spool this source keeps its jobs in, if it keeps them itself.
    pub fn spool(&self) -> Option<&SpoolConfig> {
        match self {
            Source::Spool(s) => Some(s),
            Source::Zeromq(z) => Some(&z.spool),
            Source::Gearman(_) | Source::Amqp(_) => None,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Source::Spool(_) => "spool",
            Source::Gearman(_) => "gearman",
            Source::Zeromq(_) => "zeromq",
            Source::Amqp(_) => "amqp",
        }
    }
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config> {
        let path = absolute(path)?;
        let bytes = read_file(&path)?;
        Config::parse(&path, &bytes)
    }

    /// Parses and validates config bytes as if read from `path` (which must be absolute).
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Config> {
        let sha256 = crate::text::hex(&Sha256::digest(bytes));
        let cx = Cx {
            path,
            bytes,
            base: path.parent().unwrap_or(Path::new("/")),
        };
        let text = std::str::from_utf8(bytes).map_err(|e| {
            let (line, col) = line_col(bytes, e.valid_up_to());
            let utf16 = [b"\xff\xfe", b"\xfe\xff"]
                .iter()
                .any(|m| bytes.starts_with(*m));
            let hint = if utf16 {
                ": it looks like UTF-16 (a byte order mark begins it); save it as UTF-8"
            } else {
                ""
            };
            Error::Config(format!(
                "{}:{line}:{col}: the file is not valid UTF-8{hint}",
                path.shown()
            ))
        })?;
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| cx.located(e.span(), &explain_at(e.message(), text, e.span())))?;
        let builtins_written = raw.worker.builtins;
        let mut worker = worker(&cx, raw.worker)?;
        kinds::foreign_keys(&cx, text, raw.source.kind)?;
        let source = source(&cx, raw.source, &worker)?;
        // Built-ins answer whoever can submit: on a network source, only when asked for.
        worker.builtins =
            builtins_written.unwrap_or(matches!(source, Source::Spool(_) | Source::Zeromq(_)));
        let functions = functions(&cx, raw.functions, &worker)?;
        let metrics = metrics(&cx, raw.metrics)?;
        Ok(Config {
            path: path.to_path_buf(),
            sha256,
            text: text.to_string(),
            worker,
            source,
            functions,
            log: Log {
                level: raw.log.level.into_inner().0,
                file: raw.log.file.map(|f| cx.base.join(f)),
                json: raw.log.format == RawLogFormat::Json,
                jobs: raw.log.jobs,
            },
            metrics,
        })
    }

    /// The time limit of `function`: its own `[functions.NAME] timeout`, else `[worker]
    /// job_timeout`; None only where `"none"` was written.
    pub fn timeout(&self, function: &str) -> Option<Duration> {
        match self.functions.get(function) {
            Some(f) => f.timeout,
            None => self.worker.job_timeout,
        }
    }

    /// Where the worker's pidfile lives.
    pub fn pidfile(&self) -> PathBuf {
        self.worker.state_dir.join(crate::ops::layout::PIDFILE)
    }

    /// Where the worker answers `status`.
    pub fn status_socket(&self) -> PathBuf {
        crate::ops::layout::worker_dir(&self.worker.state_dir).join(crate::ops::layout::SOCKET)
    }
}

/// The most of a config file read: anything larger is no config (parsing takes about 40 times
/// its size in memory).
const MAX_FILE: u64 = 1 << 20;

/// The bytes of the config file at `path`: a regular file (a FIFO or a device in its place is
/// never waited on) of at most 16 MiB. What is no config file at all is `Error::Config`; an I/O
/// error is `Error::Io`.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    let file = match crate::ops::safefs::open_regular(path, "reading config") {
        Err(Error::Unsafe(why)) => return Err(Error::Config(why)),
        other => other?,
    };
    crate::ops::safefs::read_bounded(file, MAX_FILE)
        .at("reading config", path)?
        .ok_or_else(|| {
            Error::Config(format!(
                "\"{}\" is larger than {} MiB: not a config file",
                path.shown(),
                MAX_FILE >> 20
            ))
        })
}

/// `[worker] state_dir` read leniently from a config file that does not validate: from the TOML
/// if it still parses as TOML, else from a `state_dir = "..."` line under `[worker]`, else the
/// default. Relative to the file's directory, as always. The flag says whether the file can
/// tell for certain (it is read, and its TOML syntax holds), or this is a guess.
pub fn lenient_state_dir(path: &Path) -> Result<(PathBuf, bool)> {
    let abs = absolute(path)?;
    let base = abs.parent().unwrap_or(Path::new("/")).to_path_buf();
    // Not read (no regular file, too large): nothing is certain.
    let Ok(bytes) = read_file(&abs) else {
        return Ok((base.join("state"), false));
    };
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if let Ok(table) = text.parse::<toml::Table>() {
        // The syntax holds: what it says (or the default, when it says nothing) is certain,
        // unless the key is there with a value of the wrong type.
        let value = table.get("worker").and_then(|w| w.get("state_dir"));
        let dir = value.and_then(|d| d.as_str()).unwrap_or("state");
        let certain = value.is_none_or(|v| v.is_str());
        return Ok((base.join(dir), certain));
    }
    // Broken syntax: a guess from the lines that look like `[worker]`'s `state_dir = "..."`.
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('[') {
            section = line
                .trim_matches(|c| c == '[' || c == ']')
                .trim()
                .to_string();
            continue;
        }
        if section != "worker" {
            continue;
        }
        if let Some((key, value)) = line.split_once('=') {
            let value = value.split('#').next().unwrap_or("").trim();
            if key.trim() == "state_dir"
                && value.len() >= 2
                && value.starts_with('"')
                && value.ends_with('"')
            {
                return Ok((base.join(&value[1..value.len() - 1]), false));
            }
        }
    }
    Ok((base.join("state"), false))
}

/// Function names travel in file names, environment variables and protocol packets: keep them
/// to a safe alphabet.
pub fn check_function_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid function name \"{}\" (use letters, digits, '_', '-', '.', ':'; at most 128 bytes)",
            crate::text::escape(name)
        ))
    }
}

/// `path` made absolute against the current directory, without resolving symlinks (a symlinked
/// config, as in a Kubernetes ConfigMap, must be re-resolved on every read).
pub fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).at("resolving", path)
}

#[cfg(test)]
mod tests {
    use super::messages::closest;
    use super::*;

    fn parse(text: &str) -> std::result::Result<Config, String> {
        Config::parse(Path::new("/etc/gs/config.toml"), text.as_bytes()).map_err(|e| e.to_string())
    }

    /// Notepad's "Unicode" is UTF-16: said as such, with what to do.
    #[test]
    fn a_utf16_file_is_named_as_such() {
        for bom in [&b"\xff\xfe"[..], b"\xfe\xff"] {
            let text = [bom, b"[\0w\0"].concat();
            let err = Config::parse(Path::new("/etc/gs/config.toml"), &text)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert_eq!(
                err,
                "/etc/gs/config.toml:1:1: the file is not valid UTF-8: it looks like UTF-16 (a byte order mark begins it); save it as UTF-8"
            );
        }
    }

    #[test]
    fn defaults_and_relative_paths() {
        let c = parse("").expect("empty config is valid");
        assert_eq!(c.worker.concurrency, 1);
        assert_eq!(c.worker.jobs_dir, Path::new("/etc/gs/jobs"));
        assert_eq!(c.worker.state_dir, Path::new("/etc/gs/state"));
        let Source::Spool(s) = &c.source else {
            panic!("not spool")
        };
        assert_eq!(s.dir, Path::new("/etc/gs/spool"));
        assert_eq!(s.max_attempts, 3);
        let c = parse("[worker]\nstate_dir = \"/var/lib/gs\"\n").expect("valid");
        assert_eq!(c.worker.state_dir, Path::new("/var/lib/gs"));
    }

    #[test]
    fn errors_point_at_line_and_column() {
        let cases: &[(&str, &str)] = &[
            (
                "[worker]\nconcurency = 2\n",
                "/etc/gs/config.toml:2:1: unknown key \"concurency\" (did you mean \"concurrency\"?)",
            ),
            (
                "[worker]\nconcurrency = 0\n",
                "/etc/gs/config.toml:2:15: concurrency must be between 1 and 1024, not 0",
            ),
            (
                "[source]\nkind = \"spoool\"\n",
                "/etc/gs/config.toml:2:8: unknown value \"spoool\" (did you mean \"spool\"?)",
            ),
            ("[wrker]\n", "/etc/gs/config.toml:1:2: unknown key \"wrker\" (did you mean \"worker\"?)"),
            // An abbreviation is a better guess than the nearest spelling ("zmq" was "amqp"?).
            (
                "[source]\nkind = \"zmq\"\n",
                "/etc/gs/config.toml:2:8: unknown value \"zmq\" (did you mean \"zeromq\"?)",
            ),
            // The broker's name for the protocol's: the kind that speaks to it.
            (
                "[source]\nkind = \"RabbitMQ\"\n",
                "/etc/gs/config.toml:2:8: unknown value \"RabbitMQ\" (did you mean \"amqp\"?)",
            ),
            // Serde's words for a table and a list are Rust's (`struct RawFunction`, "a
            // sequence"): TOML's instead, and a single string where a list goes is shown in
            // brackets.
            (
                "[functions]\necho = 5\n",
                "/etc/gs/config.toml:2:8: expected a table: [functions.NAME] and its keys, not the number 5",
            ),
            (
                "[source]\ntls = 5\n",
                "/etc/gs/config.toml:2:7: expected a table: [source.tls] and its keys, not the number 5",
            ),
            (
                "worker = 5\n",
                "/etc/gs/config.toml:1:10: expected a table: [worker] and its keys, not the number 5",
            ),
            (
                "[source]\nkind = \"gearman\"\nservers = \"127.0.0.1:4730\"\n",
                "/etc/gs/config.toml:3:11: a list is written in brackets, even of one: [\"127.0.0.1:4730\"]",
            ),
            (
                "[source]\nbind = 5\n",
                "/etc/gs/config.toml:2:8: expected a list (in brackets: [\"a\", \"b\"]), not the number 5",
            ),
            (
                "[worker]\nstate_dir = [\"a\"]\n",
                "/etc/gs/config.toml:2:13: expected a path (a string in quotes), not a list",
            ),
            // What was found, in TOML's words too: serde said "map" for a table and a date.
            (
                "[worker]\nconcurrency = {a = 1}\n",
                "/etc/gs/config.toml:2:15: expected a whole number (written without quotes), not a table",
            ),
            (
                "[worker]\nconcurrency = 1979-05-27\n",
                "/etc/gs/config.toml:2:15: expected a whole number (written without quotes), not a date or a time",
            ),
            (
                "[worker]\nconcurrency = \"2\"\n",
                "/etc/gs/config.toml:2:15: expected a whole number (written without quotes), not the string \"2\": write 2",
            ),
            (
                "[worker]\nconcurrency = \"two\"\n",
                "/etc/gs/config.toml:2:15: expected a whole number (written without quotes), not the string \"two\"",
            ),
            (
                "[worker]\nconcurrency = 2.5\n",
                "/etc/gs/config.toml:2:15: expected a whole number (written without quotes), not the number 2.5",
            ),
            (
                "[worker]\nallow_root = \"true\"\n",
                "/etc/gs/config.toml:2:14: expected true or false (without quotes), not the string \"true\": write true",
            ),
            (
                "[worker]\nuser = 1000\n",
                "/etc/gs/config.toml:2:8: expected a string (in quotes), not the number 1000",
            ),
            // Found by mutating the shipped config: what the parser said was about something
            // else (a control character "ended" a comment or a string), jargon, or nothing.
            (
                "[worker]\nmax_jobs = 2 # a\u{0}b\n",
                "/etc/gs/config.toml:2:17: a control character (U+0000) is not allowed in TOML, even in a comment or a string (tabs and line ends are the only ones)",
            ),
            (
                "[worker]\njobs_dir = \"a\u{1b}b\"\n",
                "/etc/gs/config.toml:2:14: a control character (U+001B) is not allowed in TOML",
            ),
            (
                "[worker]\nmax_jobs = 2 # x\ry\n",
                "/etc/gs/config.toml:2:17: a carriage return without a line feed after it (a line ends in \\n or \\r\\n)",
            ),
            (
                "[worker]\njobs_dir = \"C:\\jobs\"\n",
                "/etc/gs/config.toml:2:17: `\\j` is no escape: in a \"...\" string a backslash is written `\\\\`, or the string in single quotes ('...', where nothing is escaped)",
            ),
            (
                "[worker]\njobs_dir = s\"jobs\"\n",
                "/etc/gs/config.toml:2:12: `s` before the string's opening `\"`: a string begins with its quote",
            ),
            (
                "[worker]\njobs_dir = jobs\"\n",
                "/etc/gs/config.toml:2:12: the string's opening `\"` is missing: \"jobs\"",
            ),
            (
                "[worker]\nmax_age = 4h\"\n",
                "/etc/gs/config.toml:2:12: the string's opening `\"` is missing: \"4h\"",
            ),
            (
                "[worker]\njobs_dir = , \"jobs\"\n",
                "/etc/gs/config.toml:2:12: a value cannot begin with `,`: a string is written in quotes (\"...\"); numbers, true and false without",
            ),
            (
                "[worker]\nmax_jobs = 12ab\n",
                "/etc/gs/config.toml:2:14: `12ab` is no TOML value",
            ),
            (
                "[worker\nmax_jobs = 2\n",
                "/etc/gs/config.toml:1:8: the table header's closing `]` is missing (a header is `[name]`, alone on its line)",
            ),
            (
                "[]\n",
                "/etc/gs/config.toml:1:2: a name is missing here (a key or a table's name: letters, digits, `_` and `-`, or a string in quotes)",
            ),
            (
                "[worker]\njobs_dir = \"\"\"jobs\n",
                "/etc/gs/config.toml:3:1: the string's closing `\"\"\"` is missing: the file ends in it (written only in part?)",
            ),
            (
                "[worker]\nconcurrency = 2\n[worker]\n",
                "/etc/gs/config.toml:3:1: the table [worker] is written twice (all its keys go under one header)",
            ),
            // The parser may stop just past the character, or at a value's first character.
            (
                "[source]\nbind = [\"a\",\r:b\"]\n",
                "/etc/gs/config.toml:2:14: a carriage return without a line feed after it",
            ),
            (
                "[source]\nbind = [\"a\", =\"b\"]\n",
                "/etc/gs/config.toml:2:14: a value cannot begin with `=`",
            ),
            (
                "[source.tls]\nca_file = \"a\"\n[source.tls]\n",
                "/etc/gs/config.toml:3:1: the table [source.tls] is written twice",
            ),
            (
                "[functions.sleep]\ntimeout = \"1s\"\ntimeout = \"2s\"\n",
                "/etc/gs/config.toml:3:1: `timeout` is set twice in [functions.sleep]",
            ),
            (
                "[source]\nkind = \"amqp\"\nurl = \"amqp://h/\"\nqueue = \"q\"\n[source.tls]\n",
                "/etc/gs/config.toml:5:1: [source.tls] needs the key `ca_file`",
            ),
            (
                "[worker]\njobs_dir = \"C:\\users\"\n",
                "/etc/gs/config.toml:2:17: `\\u` begins a Unicode escape of four hex digits: in a \"...\" string a backslash is written `\\\\`, or the string in single quotes ('...', where nothing is escaped)",
            ),
            (
                "[w\"orker]\n",
                "/etc/gs/config.toml:1:3: a table's name is one word of letters, digits, `_` and `-`, or a string in quotes: [worker], [\"a name\"]",
            ),
            // An array of tables (`[[name]]`), which gearshift's config has none of.
            (
                "[[worker]\n",
                "/etc/gs/config.toml:1:9: the header's closing `]]` is missing; and `[[name]]` heads an array of tables, which this config has none of: a table is written [name]",
            ),
            (
                "[[worker]]\nconcurrency = 2\n",
                "/etc/gs/config.toml:1:1: `[[worker]]` heads an array of tables, which this config has none of: a table is written [worker]",
            ),
            // An inline table not closed on its line, or with a comma after its last item.
            (
                "[source]\ntls = { ca_file = \"x\"\n",
                "/etc/gs/config.toml:2:22: the inline table's closing `}` is missing: an inline table is written on one line, { key = \"value\", other = 1 }",
            ),
            (
                "[source]\ntls = { ca_file = \"x\", }\n",
                "/etc/gs/config.toml:2:22: no comma after an inline table's last item: { key = \"value\", other = 1 }",
            ),
            // A number's underscores and decimal point.
            (
                "[worker]\nmax_jobs = 1_\n",
                "/etc/gs/config.toml:2:14: an underscore in a number stands between two digits: 1_000",
            ),
            (
                "[worker]\nrecycle_splay = .5\n",
                "/etc/gs/config.toml:2:17: a number begins with a digit: 0.5",
            ),
            (
                "[worker]\nrecycle_splay = 1.\n",
                "/etc/gs/config.toml:2:19: a digit follows a decimal point: 1.0",
            ),
            (
                "[worker]\nrecycle_splay = 1.5_\n",
                "/etc/gs/config.toml:2:21: an underscore in a number stands between two digits: 1_000.5",
            ),
            (
                "[worker]\nrecycle_splay = 1e5_\n",
                "/etc/gs/config.toml:2:21: an underscore in a number stands between two digits: 1_000.5",
            ),
            (
                "[worker]\nrecycle_splay = 1e\n",
                "/etc/gs/config.toml:2:19: an exponent's digits follow its `e` (and its sign): 1e6, 2.5e-3",
            ),
            (
                "[worker]\nrecycle_splay = 1.5e+\n",
                "/etc/gs/config.toml:2:22: an exponent's digits follow its `e` (and its sign): 1e6, 2.5e-3",
            ),
            (
                "[worker]\nrecycle_splay = 1e_5\n",
                "/etc/gs/config.toml:2:19: an exponent's digits follow its `e` (and its sign): 1e6, 2.5e-3",
            ),
            (
                "[worker]\nmax_jobs = 007\n",
                "/etc/gs/config.toml:2:13: `007` begins with a 0 before its other digits, which TOML does not allow: 7 (0o7 for an octal number)",
            ),
            (
                "[worker]\nrecycle_splay = -01.5\n",
                "/etc/gs/config.toml:2:19: `-01.5` begins with a 0 before its other digits, which TOML does not allow: 7 (0o7 for an octal number)",
            ),
            (
                "[worker]\nrecycle_splay = 1e400\n",
                "/etc/gs/config.toml:2:17: `1e400` is beyond the largest number TOML holds (about 1.8e308)",
            ),
            (
                "[worker]\nrecycle_splay = 1e400s\n",
                "/etc/gs/config.toml:2:17: `1e400s` is no TOML value: a string is written in quotes (\"1e400s\"); numbers, true and false without",
            ),
            (
                "[worker]\nmax=_attempts = 3\n",
                "/etc/gs/config.toml:2:5: `_attempts` is no TOML value: a string is written in quotes (\"_attempts\"); numbers, true and false without",
            ),
            (
                "[worker]\nconcurrency = 1\n[",
                "/etc/gs/config.toml:3:1: the file ends in a table header's `[`: a header is `[name]`, alone on its line",
            ),
            (
                "[worker]\nmax_payload_bytes = 16:777216\n",
                "/etc/gs/config.toml:2:24: `16:777216` reads as a date or a time of day, which no setting takes: a number has no `:` or `-` in it, and a string is written in quotes",
            ),
            (
                "[worker]\nmax_payload_bytes = 1677-16\n",
                "/etc/gs/config.toml:2:26: `1677-16` reads as a date or a time of day, which no setting takes: a number has no `:` or `-` in it, and a string is written in quotes",
            ),
            // A prefixed number without its digits, a sign without its number.
            (
                "[worker]\nmax_jobs = 0x\n",
                "/etc/gs/config.toml:2:14: `0x` begins a hexadecimal number, and its digits (0-9, a-f) follow it: 0x1f",
            ),
            (
                "[worker]\nmax_jobs = 0o9\n",
                "/etc/gs/config.toml:2:14: `0o` begins an octal number, and its digits (0-7) follow it: 0o17",
            ),
            (
                "[worker]\nmax_jobs = 0x1_\n",
                "/etc/gs/config.toml:2:16: an underscore in a number stands between two digits: 0xff_ff",
            ),
            (
                "[worker]\nmax_jobs = 0b1__0\n",
                "/etc/gs/config.toml:2:16: an underscore in a number stands between two digits: 0b1111_0000",
            ),
            (
                "[worker]\nmax_jobs = 0o7_\n",
                "/etc/gs/config.toml:2:16: an underscore in a number stands between two digits: 0o7_777",
            ),
            (
                "[worker]\nmax_jobs = +\n",
                "/etc/gs/config.toml:2:13: a sign goes right before a number's digits: -1, +1",
            ),
            // A key written above every table is one of a table's keys: say which.
            (
                "concurrency = 2\n[worker]\n",
                "/etc/gs/config.toml:1:1: unknown key \"concurrency\": it belongs in a table, under [worker]",
            ),
            (
                "bind = [\"tcp://127.0.0.1:5555\"]\n",
                "/etc/gs/config.toml:1:1: unknown key \"bind\": it belongs in a table, under [source]",
            ),
            (
                "[functions.sleep]\ntimeout = \"5 parsecs\"\n",
                "/etc/gs/config.toml:2:11: unknown duration unit \"parsecs\" in \"5 parsecs\" (use us, ms, s, m, h or d)",
            ),
            (
                "[functions.\"a b\"]\n",
                "/etc/gs/config.toml:1:12: invalid function name \"a b\"",
            ),
            ("[log]\nlevel = \"loud\"\n", "/etc/gs/config.toml:2:9: unknown log level \"loud\""),
            ("[source]\nmax_attempts = 0\n", "/etc/gs/config.toml:2:16: max_attempts must be between 1 and 1000000, not 0"),
            (
                "[worker]\nrecycle_splay = nan\n",
                "/etc/gs/config.toml:2:17: recycle_splay must be a fraction between 0 and 1, not NaN",
            ),
            (
                "[functions.f]\ntimeout = 1e19\n",
                "/etc/gs/config.toml:2:11: duration \"10000000000000000000\" is over the maximum of 3650d",
            ),
            (
                "[worker]\nmax_payload_bytes = 0\n",
                "/etc/gs/config.toml:2:21: max_payload_bytes must be between 1 and 1073741824, not 0",
            ),
            ("[functions.f]\ntimeout = 0\n", "/etc/gs/config.toml:2:11: a timeout of 0 would fail"),
            // A typo of "30d" for "30s" would leave a lane 30 days between reconnects.
            (
                "[source]\nkind = \"gearman\"\nservers = [\"h:1\"]\nreconnect_max = \"30d\"\n",
                "/etc/gs/config.toml:4:17: reconnect_max must be between 100ms and 1h",
            ),
            (
                "[source]\nkind = \"amqp\"\nurl = \"amqp://h/%2f\"\nqueue = \"q\"\nio_timeout = \"2h\"\n",
                "/etc/gs/config.toml:5:14: io_timeout must be between 100ms and 1h",
            ),
            // Out-of-range whole numbers say so, not "expected a whole number".
            (
                "[source]\nmax_attempts = 4294967296\n",
                "/etc/gs/config.toml:2:16: 4294967296 is too large here (at most 4294967295)",
            ),
            (
                "[worker]\nmax_jobs = -1\n",
                "/etc/gs/config.toml:2:12: -1 is negative: a whole number of 0 or more is expected",
            ),
            (
                "[worker]\nmax_jobs = 18446744073709551615\n",
                "/etc/gs/config.toml:2:12: number too large (TOML's whole numbers stop at 9223372036854775807)",
            ),
            (
                "[worker]\njob_oom_score_adj = 1001\n",
                "/etc/gs/config.toml:2:21: job_oom_score_adj must be between -1000 and 1000, not 1001",
            ),
            (
                "[worker]\nmax_age = \"999999999999999d\"\n",
                "/etc/gs/config.toml:2:11: duration \"999999999999999d\" is over the maximum of 3650d",
            ),
        ];
        for (text, want) in cases {
            let got = parse(text).expect_err(text);
            assert!(
                got.starts_with(want),
                "config {text:?}\n got: {got}\nwant: {want}"
            );
        }
    }

    /// Names the parser quotes in backticks were split at every backtick: a key with one in it
    /// (`"a`b" = 1` twice) was said as `a`, and a table's name lost its parts; a word with a
    /// backtick is quoted in double quotes (`` `a`b` `` read as two words). And a name is the
    /// file's text: a 5,000-character key set twice was repeated whole in the message.
    #[test]
    fn names_in_messages_are_whole_and_bounded() {
        let cases = [
            (
                "[functions.sleep]\n\"a`b\" = 1\n\"a`b\" = 2\n".to_string(),
                "\"a`b\" is set twice in [functions.sleep]".to_string(),
            ),
            (
                "[worker]\njobs_dir = a`b\n".to_string(),
                "\"a`b\" is no TOML value".to_string(),
            ),
            (
                "[functions.\"x`y\"]\n[functions.\"x`y\"]\n".to_string(),
                "the table [functions.\"x`y\"] is written twice".to_string(),
            ),
            (
                format!("[worker]\n{0} = 1\n{0} = 2\n", "k".repeat(5000)),
                format!("`{}…` is set twice in [worker]", "k".repeat(60)),
            ),
            (
                format!("[{0}]\n[{0}]\n", "t".repeat(5000)),
                format!("the table [{}…] is written twice", "t".repeat(60)),
            ),
        ];
        for (text, want) in cases {
            let got = parse(&text).expect_err(&text);
            assert!(
                got.contains(&want) && got.len() < 400,
                "config {:?}\n got: {got}\nwant: {want}",
                &text[..text.len().min(80)]
            );
        }
    }

    /// A config cut anywhere (a write in place seen half done, a truncated copy) either parses
    /// or says what is wrong, with a position: never an empty message.
    #[test]
    fn every_cut_of_a_config_says_what_is_wrong() {
        let text = concat!(
            "# a comment\n[worker]\nconcurrency = 2\njobs_dir = \"jobs\"\n",
            "max_payload_bytes = 1_048_576\nrecycle_splay = 0.5\n\n",
            "[source]\nkind = \"gearman\"\nservers = [\"127.0.0.1:4730\", 'h:1']\n\n",
            "[functions.\"img.resize\"]\ntimeout = \"5s\"\nflag = true\n",
            "[log]\nlevel = \"info\" # inline\n",
        );
        let silent: Vec<String> = (0..=text.len())
            .filter_map(|cut| {
                let e = parse(&text[..cut]).err()?;
                let said = e.rsplit_once(": ").map_or("", |(_, m)| m).trim();
                let at = e.strip_prefix("/etc/gs/config.toml:").unwrap_or("");
                let located = at.starts_with(|c: char| c.is_ascii_digit());
                (said.is_empty() || !located).then(|| format!("{:?}: {e:?}", &text[..cut]))
            })
            .collect();
        assert!(silent.is_empty(), "{}", silent.join("\n"));
    }

    #[test]
    fn syntax_errors_are_located() {
        let got = parse("[worker]\nconcurrency = = 2\n").expect_err("syntax");
        assert!(got.starts_with("/etc/gs/config.toml:2:"), "{got}");
        assert!(!got.contains('\n'), "one line: {got}");
        // The parser's words named none of these mistakes: "expected newline, `#`" (and the
        // example of a list was of numbers for strings too), "expected `.`, `=`" at a `.`.
        for (text, at) in [
            (
                "[worker]\nconcurrency = 1+\n",
                "2:16: `1+` is no TOML value: a number is written as it is, TOML does no arithmetic",
            ),
            (
                "[worker]\nconcurrency = 2*4\n",
                "2:16: `2*4` is no TOML value",
            ),
            (
                "[worker]\nuser = \"a\" \"b\"\n",
                "2:12: one value to a key, then the line ends (or a `#` comment begins); several values are a list in brackets: [\"a\", \"b\"]",
            ),
            (
                "[worker]\nconcurrency = 2 3\n",
                "2:17: one value to a key, then the line ends (or a `#` comment begins); several values are a list in brackets: [2, 3]",
            ),
            (
                "[worker]\na.b. = 1\n",
                "2:4: a name is missing after this `.` (a dotted key joins names: a.b = 1)",
            ),
        ] {
            let got = parse(text).expect_err(text);
            assert!(got.starts_with(&format!("/etc/gs/config.toml:{at}")), "{text}: {got}");
        }
    }

    /// `busy_poll` (amqp): 100 µs unless set, "0" turns it off, over 1 ms is refused where
    /// it is written.
    #[test]
    fn amqp_busy_poll() {
        let base = "[source]\nkind = \"amqp\"\nurl = \"amqp://127.0.0.1/%2f\"\nqueue = \"q\"\n";
        let poll = |extra: &str| match parse(&format!("{base}{extra}")).map(|c| c.source) {
            Ok(Source::Amqp(a)) => Ok(a.busy_poll),
            Ok(_) => Err("not amqp".to_string()),
            Err(e) => Err(e),
        };
        assert_eq!(poll(""), Ok(Duration::from_micros(100)));
        assert_eq!(poll("busy_poll = \"0\"\n"), Ok(Duration::ZERO));
        assert_eq!(
            poll("busy_poll = \"250us\"\n"),
            Ok(Duration::from_micros(250))
        );
        let gearman = "[source]\nkind = \"gearman\"\nservers = [\"127.0.0.1:4730\"]\n";
        match parse(&format!("{gearman}busy_poll = \"50us\"\n")).map(|c| c.source) {
            Ok(Source::Gearman(g)) => assert_eq!(g.busy_poll, Duration::from_micros(50)),
            other => panic!("{other:?}"),
        }
        let err = poll("busy_poll = \"5ms\"\n").expect_err("over 1ms");
        assert!(err.starts_with("/etc/gs/config.toml:5:"), "{err}");
        assert!(err.contains("busy_poll is at most"), "{err}");
    }

    /// `max_connections` (zeromq): unset is derived at start; 0 is refused where it is written.
    #[test]
    fn zeromq_max_connections() {
        let base = "[source]\nkind = \"zeromq\"\nbind = [\"tcp://127.0.0.1:5555\"]\n";
        let cap = |extra: &str| match parse(&format!("{base}{extra}")).map(|c| c.source) {
            Ok(Source::Zeromq(z)) => Ok(z.max_connections),
            Ok(_) => Err("not zeromq".to_string()),
            Err(e) => Err(e),
        };
        assert_eq!(cap(""), Ok(None));
        assert_eq!(cap("max_connections = 64\n"), Ok(Some(64)));
        let err = cap("max_connections = 0\n").expect_err("0");
        assert!(err.starts_with("/etc/gs/config.toml:4:"), "{err}");
        assert!(err.contains("max_connections must be between 1"), "{err}");
    }

    #[test]
    fn durations() {
        let ok: &[(&str, Duration)] = &[
            ("500ms", Duration::from_millis(500)),
            ("100us", Duration::from_micros(100)),
            ("30s", Duration::from_secs(30)),
            ("30", Duration::from_secs(30)),
            ("1.5s", Duration::from_millis(1500)),
            ("5m", Duration::from_secs(300)),
            ("2h", Duration::from_secs(7200)),
            ("7d", Duration::from_secs(7 * 86400)),
            // Compound, largest unit first, as Go and systemd write them.
            ("1h30m", Duration::from_secs(5400)),
            ("1h 30m", Duration::from_secs(5400)),
            ("30 s", Duration::from_secs(30)),
            (" 2 h 5 m ", Duration::from_secs(7500)),
            ("1m30s", Duration::from_secs(90)),
            ("2d12h", Duration::from_secs(216_000)),
            ("1s500ms", Duration::from_millis(1500)),
            ("1.5h30s", Duration::from_secs(5430)),
        ];
        for (s, d) in ok {
            assert_eq!(parse_duration(s).as_ref(), Ok(d), "{s}");
        }
        for bad in [
            "", "s", "5x", "-1s", "1e999s", "1h-30m", "1h1h", "h30m", "1hm",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
        for (bad, said) in [
            (
                "30m1h",
                "\"30m1h\": write the larger unit first (as in \"1h30m\")",
            ),
            (
                "1h30",
                "\"1h30\": 30 has no unit (use us, ms, s, m, h or d after each number)",
            ),
            (
                "3650d1s",
                "duration \"3650d1s\" is over the maximum of 3650d",
            ),
            (
                "1h30x",
                "unknown duration unit \"x\" in \"1h30x\" (use us, ms, s, m, h or d)",
            ),
        ] {
            assert_eq!(parse_duration(bad).err().as_deref(), Some(said), "{bad}");
        }
        let c = parse("[functions.sleep]\ntimeout = 3\n[functions.wc]\ntimeout = \"250ms\"\n")
            .expect("valid");
        assert_eq!(c.timeout("sleep"), Some(Duration::from_secs(3)));
        assert_eq!(c.timeout("wc"), Some(Duration::from_millis(250)));
        assert_eq!(
            c.timeout("echo"),
            Some(DEFAULT_JOB_TIMEOUT),
            "bounded by default"
        );
        assert!(c.worker.builtins, "the spool offers the built-ins");
        let c = parse("[worker]\njob_timeout = \"none\"\n[functions.wc]\ntimeout = \"none\"\n[functions.up]\n")
            .expect("valid");
        assert_eq!(c.timeout("echo"), None, "unbounded only when written");
        assert_eq!(c.timeout("wc"), None);
        assert_eq!(c.timeout("up"), None);
        assert_eq!(c.worker.abandon_after, Some(DEFAULT_ABANDON_AFTER));
        let c = parse("[worker]\nabandon_after = \"none\"\n").expect("valid");
        assert_eq!(
            c.worker.abandon_after, None,
            "a restart waits for ever when written"
        );
        let c = parse("[worker]\nabandon_after = \"5s\"\n").expect("valid");
        assert_eq!(c.worker.abandon_after, Some(Duration::from_secs(5)));
        let c = parse("[worker]\njob_timeout = \"5m\"\n[functions.wc]\ntimeout = \"none\"\n")
            .expect("valid");
        assert_eq!(c.timeout("echo"), Some(Duration::from_secs(300)));
        assert_eq!(c.timeout("wc"), None);
        let err = parse("[worker]\njob_timeout = \"forever\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(":2:15:") && err.contains("invalid duration"),
            "{err}"
        );
    }

    #[test]
    fn gearman_source() {
        let c =
            parse("[source]\nkind = \"gearman\"\nservers = [\"127.0.0.1:4730\", \"gm2:4731\"]\n")
                .expect("valid");
        let Source::Gearman(g) = &c.source else {
            panic!("not gearman")
        };
        assert_eq!(g.servers, ["127.0.0.1:4730", "gm2:4731"]);
        assert!(g.max_packet_bytes > c.worker.max_payload_bytes);
        assert!(
            !c.worker.builtins,
            "no built-ins on a network source unless asked"
        );
        let c =
            parse("[worker]\nbuiltins = true\n[source]\nkind = \"gearman\"\nservers = [\"h:1\"]\n")
                .expect("valid");
        assert!(c.worker.builtins);
        let err = parse("[source]\nkind = \"gearman\"\n").expect_err("no servers");
        assert!(err.contains("needs at least one server"), "{err}");
        let err = parse("[source]\nkind = \"gearman\"\nservers = [\"localhost\"]\n")
            .expect_err("no port");
        assert!(
            err.starts_with("/etc/gs/config.toml:3:11: server \"localhost\" is not host:port"),
            "{err}"
        );
    }

    #[test]
    fn metrics_listen_takes_localhost() {
        let at = |text: &str| parse(text).map(|c| c.metrics.map(|m| m.listen.to_string()));
        assert_eq!(
            at("[metrics]\nlisten = \"localhost:9464\"\n"),
            Ok(Some("127.0.0.1:9464".into()))
        );
        assert_eq!(
            at("[metrics]\nlisten = \"[::1]:0\"\n"),
            Ok(Some("[::1]:0".into()))
        );
        for bad in ["localhost", "localhost:99999", "local:1", ":9464"] {
            let err = at(&format!("[metrics]\nlisten = \"{bad}\"\n")).expect_err(bad);
            assert!(err.contains("is not an address:port"), "{err}");
        }
    }

    /// A key of another source kind was taken and did nothing: `bind` under a `[source]` that
    /// names no kind served no ZeroMQ and said nothing. It is refused where it is written,
    /// saying which kind reads it, in each of TOML's forms of a table.
    #[test]
    fn keys_of_another_kind_are_refused() {
        let cases = [
            (
                "[source]\nbind = [\"tcp://127.0.0.1:5555\"]\n",
                "2:1: bind is read only by kind = \"zeromq\", and this [source] names no kind, so it is the spool's: it would do nothing. Write kind = \"zeromq\", or remove bind",
            ),
            (
                "[source]\nkind = \"gearman\"\nservers = [\"h:1\"]\nqueue = \"jobs\"\nbind = []\n",
                "4:1: queue is read only by kind = \"amqp\", and this [source] is kind = \"gearman\": it would do nothing. Write kind = \"amqp\", or remove queue",
            ),
            (
                "[source]\nkind = \"zeromq\"\nbind = [\"tcp://127.0.0.1:1\"]\nio_timeout = \"5s\"\n",
                "4:1: io_timeout is read only by kind = \"gearman\" or \"amqp\", and this [source] is kind = \"zeromq\"",
            ),
            (
                "[source]\nkind = \"amqp\"\nurl = \"amqp://h/%2f\"\nqueue = \"q\"\nfsync = false\n",
                "5:1: fsync is read only by kind = \"spool\" or \"zeromq\"",
            ),
            (
                "[source.tls]\nca_file = \"ca.pem\"\n",
                "1:9: tls is read only by kind = \"gearman\" or \"amqp\"",
            ),
            (
                "[source]\ntls.ca_file = \"ca.pem\"\n",
                "2:1: tls is read only by kind = \"gearman\" or \"amqp\"",
            ),
            (
                "source = { kind = \"spool\", servers = [\"h:1\"] }\n",
                "1:28: servers is read only by kind = \"gearman\", and this [source] is kind = \"spool\"",
            ),
        ];
        for (text, want) in cases {
            let err = parse(text).expect_err(text);
            assert!(
                err.starts_with(&format!("/etc/gs/config.toml:{want}")),
                "{text}\n{err}"
            );
        }
        // Each kind's own keys are taken.
        for text in [
            "[source]\ndir = \"s\"\nfsync = false\nretain_results = \"1d\"\nmax_attempts = 2\n",
            "[source]\nkind = \"zeromq\"\nbind = [\"tcp://127.0.0.1:1\"]\ndir = \"s\"\nfunction = \"f\"\nmax_connections = 5\ndead_peer_timeout = \"5s\"\n",
            "[source]\nkind = \"gearman\"\nservers = [\"h:1\"]\nio_timeout = \"5s\"\ndead_peer_timeout = \"5s\"\nbusy_poll = \"0\"\n",
            "[source]\nkind = \"amqp\"\nurl = \"amqp://h/%2f\"\nqueue = \"q\"\nfunction = \"f\"\nio_timeout = \"5s\"\n",
        ] {
            parse(text).map_err(|e| format!("{text}\n{e}")).expect("valid");
        }
    }

    /// A table may be written as `[source.tls]`, inline (`tls = { ... }`) or with dotted keys
    /// (`tls.ca_file = ...` under `[source]`): the same TOML, read alike. The dotted form, and
    /// a sub-table under it, said "expected a borrowed string, not the string \"ca_file\""
    /// (toml gives a table made of dotted keys no span, and a spanned table then reads its
    /// keys as the span's). Errors point at the value that is wrong, in every form.
    #[test]
    fn tables_written_with_dotted_keys_are_read_alike() {
        let gearman = "[source]\nkind = \"gearman\"\nservers = [\"tls://h:1\"]\n";
        for tls in [
            "[source.tls]\nca_file = \"ca.pem\"\n",
            "tls = { ca_file = \"ca.pem\" }\n",
            "tls.ca_file = \"ca.pem\"\n",
        ] {
            let c = parse(&format!("{gearman}{tls}")).unwrap_or_else(|e| panic!("{tls}: {e}"));
            let Source::Gearman(g) = &c.source else {
                panic!("not gearman")
            };
            let files = g.tls.as_ref().expect("tls");
            assert_eq!(files.ca_file, Path::new("/etc/gs/ca.pem"), "{tls}");
        }
        let err = parse(&format!(
            "{gearman}tls.ca_file = \"ca\"\ntls.cert_file = \"c\"\n"
        ))
        .expect_err("a certificate without its key");
        assert!(
            err.starts_with(
                "/etc/gs/config.toml:5:17: [source.tls] cert_file and key_file go together"
            ),
            "{err}"
        );
        let err = parse(&format!("{gearman}[source.tls.ca_file]\nx = 1\n")).expect_err("a table");
        assert!(err.contains("not a table"), "{err}");
        let amqp = "[source]\nkind = \"amqp\"\nurl = \"amqp://h\"\nqueue = \"q\"\n";
        for declare in [
            "[source.declare]\nexchange = \"x\"\n",
            "declare = { exchange = \"x\" }\n",
            "declare.exchange = \"x\"\n",
        ] {
            let c = parse(&format!("{amqp}{declare}")).unwrap_or_else(|e| panic!("{declare}: {e}"));
            let Source::Amqp(a) = &c.source else {
                panic!("not amqp")
            };
            let d = a.declare.as_ref().expect("declare");
            assert_eq!(
                (d.exchange.as_deref(), d.routing_key.as_str()),
                (Some("x"), "q")
            );
        }
        // A key that takes one value, given a table by a dotted key.
        for (text, at) in [
            (
                "[source]\ndir.x = 1\n",
                "2:5: `dir.x` makes `dir` a table (a dotted key)",
            ),
            (
                "[worker]\nconcurrency . x = 1\n",
                "2:15: `concurrency.x` makes `concurrency` a table",
            ),
            (
                "[functions.a]\ntimeout.x = 1\n",
                "2:9: `timeout.x` makes `timeout` a table",
            ),
            (
                "[source.max_attempts.x]\n",
                "1:22: `max_attempts.x` makes `max_attempts` a table",
            ),
        ] {
            let err = parse(text).expect_err(text);
            assert!(
                err.starts_with(&format!("/etc/gs/config.toml:{at}")),
                "{text}: {err}"
            );
            assert!(
                err.contains("takes one value, not a table: write "),
                "{err}"
            );
        }
        for (declare, at) in [
            (
                "declare.type = \"bogus\"\n",
                "5:16: [source.declare] type \"bogus\" is not direct",
            ),
            (
                "declare = { queue_type = \"x\" }\n",
                "5:26: [source.declare] queue_type \"x\" is not",
            ),
            ("[source.declare]\nexchange = \"a\\u0001\"\n", "6:12: "),
        ] {
            let err = parse(&format!("{amqp}{declare}")).expect_err(declare);
            assert!(
                err.starts_with(&format!("/etc/gs/config.toml:{at}")),
                "{declare}: {err}"
            );
        }
    }

    /// A user or group name no database could hold, or a number, is said as such where it is
    /// written: a lookup said only "does not exist (create it, e.g. useradd --system )" for
    /// an empty name, and offered `useradd` a name with spaces or a `:`.
    #[test]
    fn user_and_group_are_names() {
        for (text, at) in [
            ("user = \"\"", "2:8: [worker] user is empty: name the user"),
            (
                "user = \"  nobody\"",
                "2:8: [worker] user \"  nobody\" is no user name",
            ),
            (
                "user = \"a:b\"",
                "2:8: [worker] user \"a:b\" is no user name",
            ),
            ("user = \"-x\"", "2:8: [worker] user \"-x\" is no user name"),
            (
                "user = \"1000\"",
                "2:8: [worker] user \"1000\" is a number: name the user",
            ),
            (
                "user = \"a\\u001b\"",
                "2:8: [worker] user \"a\\e\" is no user name",
            ),
            ("user = \"n\"\ngroup = \"\"", "3:9: [worker] group is empty"),
            (
                "user = \"n\"\ngroup = \"100\"",
                "3:9: [worker] group \"100\" is a number",
            ),
        ] {
            let text = format!("[worker]\n{text}\n");
            let err = parse(&text).expect_err(&text);
            assert!(
                err.starts_with(&format!("/etc/gs/config.toml:{at}")),
                "{text}: {err}"
            );
        }
        let c = parse("[worker]\nuser = \"www-data\"\ngroup = \"_gs.2\"\n").expect("names");
        assert_eq!(c.worker.user.as_deref(), Some("www-data"));
    }

    /// A list of servers or endpoints is bounded before it is looked at: each endpoint was
    /// compared with every other, and 20,000 `ipc://` ones (a generated file) took 15 s of a
    /// CPU in `check` and in the control thread at every look (a debug build); each server is
    /// a connection per lane.
    #[test]
    fn long_lists_of_servers_and_endpoints_are_refused_at_once() {
        let list = |n: usize, item: &dyn Fn(usize) -> String| {
            (0..n).map(item).collect::<Vec<_>>().join(", ")
        };
        let servers = list(257, &|i| format!("\"gm{i}:4730\""));
        let err = parse(&format!(
            "[source]\nkind = \"gearman\"\nservers = [{servers}]\n"
        ))
        .expect_err("257 servers");
        assert!(
            err.starts_with(
                "/etc/gs/config.toml:3:11: 257 servers, more than the 256 a worker connects to"
            ),
            "{err}"
        );
        let bind = list(100_000, &|i| format!("\"ipc:///tmp/gs{i}\""));
        let err = parse(&format!("[source]\nkind = \"zeromq\"\nbind = [{bind}]\n"))
            .expect_err("100,000 endpoints");
        assert!(
            err.starts_with(
                "/etc/gs/config.toml:3:8: 100000 endpoints, more than the 64 a worker binds"
            ),
            "{err}"
        );
    }

    /// A config file is read up to 1 MiB: 15 MB of valid `[functions.x]` tables (under the 16
    /// MiB read before) took 1.1 s and 674 MB of memory to parse, in root's `check` and in the
    /// control thread at every look.
    #[test]
    fn a_config_file_is_at_most_a_mebibyte() {
        let dir = crate::testutil::tempdir("config", "size");
        let path = dir.join("config.toml");
        let tables: String = (0..40_000)
            .map(|i| format!("[functions.f{i}]\ntimeout = \"1s\"\n"))
            .collect();
        assert!(tables.len() > 1 << 20);
        std::fs::write(&path, &tables).unwrap();
        let err = match read_file(&path) {
            Ok(b) => format!("read {} bytes", b.len()),
            Err(e) => e.to_string(),
        };
        assert!(
            err.contains("is larger than 1 MiB: not a config file"),
            "{err}"
        );
        std::fs::write(&path, &tables[..tables.len() / 2]).unwrap();
        assert!(read_file(&path).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn suggestions() {
        assert_eq!(
            closest("concurency", &["concurrency", "jobs_dir"]),
            Some("concurrency")
        );
        assert_eq!(closest("zzzzzz", &["concurrency", "jobs_dir"]), None);
        assert_eq!(
            closest("conc", &["concurrency", "jobs_dir"]),
            Some("concurrency")
        );
        // Too short to be told an abbreviation of one name: none.
        assert_eq!(closest("c", &["concurrency", "jobs_dir"]), None);
        // An abbreviation of two names: the nearest spelling decides, as before.
        assert_eq!(closest("max", &["max_jobs", "max_age"]), None);
    }

    #[test]
    fn sha256_is_of_the_bytes() {
        let a = parse("[worker]\nconcurrency = 2\n").expect("valid");
        let b = parse("[worker]\nconcurrency = 2\n\n").expect("valid");
        assert_ne!(a.sha256, b.sha256);
        assert_eq!(a.sha256.len(), 64);
    }
}
