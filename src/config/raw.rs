//! The file as serde reads it: raw sections with their defaults and spans, before validation.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use toml::Spanned;

use super::*;

#[derive(Debug, Clone, Copy)]
pub(super) struct Level(pub(super) log::LevelFilter);

impl<'de> Deserialize<'de> for Level {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Level, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(Level).map_err(|_| {
            de::Error::custom(format!(
                "unknown log level \"{s}\" (use off, error, warn, info, debug or trace)"
            ))
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) worker: RawWorker,
    #[serde(default)]
    pub(super) source: RawSource,
    #[serde(default)]
    pub(super) functions: BTreeMap<Spanned<String>, RawFunction>,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) metrics: RawMetrics,
}

/// The table `key` is a key of, if it is one of a table's (`[worker]`, `[source]`, `[log]`,
/// `[metrics]`): a key written above every table is said where it goes.
pub(super) fn table_of(key: &str) -> Option<&'static str> {
    let quoted = toml::Value::String(key.to_string()).to_string();
    ["worker", "source", "log", "metrics"]
        .into_iter()
        .find(|table| {
            toml::from_str::<RawConfig>(&format!("[{table}]\n{quoted} = 0\n"))
                .err()
                .is_none_or(|e| !e.message().starts_with("unknown field"))
        })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawMetrics {
    pub(super) listen: Option<Spanned<String>>,
    pub(super) allow_remote: bool,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug, Default)]
#[serde(rename_all = "lowercase")]
pub(super) enum RawLogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawWorker {
    pub(super) concurrency: Spanned<i64>,
    pub(super) jobs_dir: Spanned<PathBuf>,
    pub(super) state_dir: Spanned<PathBuf>,
    pub(super) max_payload_bytes: Spanned<u64>,
    pub(super) watch_config: bool,
    pub(super) watch_jobs: bool,
    pub(super) watch_binary: bool,
    pub(super) max_jobs: u64,
    pub(super) max_rss_mb: Spanned<u64>,
    pub(super) max_age: Option<Spanned<Dur>>,
    pub(super) recycle_splay: Spanned<f64>,
    pub(super) restart_splay: Option<Spanned<Dur>>,
    pub(super) umask: Spanned<String>,
    pub(super) user: Option<Spanned<String>>,
    pub(super) group: Option<Spanned<String>>,
    pub(super) allow_root: bool,
    pub(super) strict_modes: bool,
    pub(super) builtins: Option<bool>,
    pub(super) job_timeout: Spanned<Limit>,
    pub(super) job_oom_score_adj: Spanned<i64>,
    pub(super) abandon_after: Limit,
}

impl Default for RawWorker {
    fn default() -> Self {
        RawWorker {
            concurrency: Spanned::new(0..0, 1),
            jobs_dir: Spanned::new(0..0, "jobs".into()),
            state_dir: Spanned::new(0..0, "state".into()),
            max_payload_bytes: Spanned::new(0..0, 16 << 20),
            watch_config: true,
            watch_jobs: true,
            watch_binary: true,
            max_jobs: 0,
            max_rss_mb: Spanned::new(0..0, 0),
            max_age: None,
            recycle_splay: Spanned::new(0..0, 0.1),
            restart_splay: None,
            umask: Spanned::new(0..0, "027".into()),
            user: None,
            group: None,
            allow_root: false,
            strict_modes: true,
            builtins: None,
            job_timeout: Spanned::new(0..0, Limit(Some(DEFAULT_JOB_TIMEOUT))),
            job_oom_score_adj: Spanned::new(0..0, 500),
            abandon_after: Limit(Some(DEFAULT_ABANDON_AFTER)),
        }
    }
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub(super) enum SourceKind {
    Spool,
    Gearman,
    Zeromq,
    Amqp,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawSource {
    pub(super) kind: SourceKind,
    pub(super) dir: Spanned<PathBuf>,
    pub(super) max_attempts: Spanned<u32>,
    pub(super) retain_results: Dur,
    pub(super) min_free: super::MinFree,
    pub(super) fsync: bool,
    pub(super) servers: Spanned<Vec<String>>,
    pub(super) client_id: Option<Spanned<String>>,
    pub(super) exceptions: bool,
    pub(super) max_packet_bytes: Option<Spanned<u64>>,
    pub(super) io_timeout: Spanned<Dur>,
    pub(super) reconnect_max: Spanned<Dur>,
    pub(super) dead_peer_timeout: Spanned<Dur>,
    /// Not `Spanned`: a table written with dotted keys (`tls.ca_file = ...`) has no span,
    /// and a spanned one would read its keys as the span's. Its values carry their spans.
    pub(super) tls: Option<RawTls>,
    pub(super) bind: Spanned<Vec<String>>,
    pub(super) function: Option<Spanned<String>>,
    pub(super) reply: Spanned<String>,
    pub(super) allow_remote: bool,
    pub(super) url: Option<Spanned<String>>,
    pub(super) urls: Spanned<Vec<Spanned<String>>>,
    pub(super) queue: Option<Spanned<String>>,
    pub(super) prefetch: Spanned<u64>,
    pub(super) heartbeat: Spanned<Dur>,
    pub(super) declare: Option<RawDeclare>,
    pub(super) dedupe_ids: Spanned<u64>,
    pub(super) persistent_replies: bool,
    pub(super) consumer_timeout: Spanned<Dur>,
    pub(super) busy_poll: Spanned<Dur>,
    pub(super) max_connections: Option<Spanned<u64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) ca_file: PathBuf,
    pub(super) cert_file: Option<Spanned<PathBuf>>,
    pub(super) key_file: Option<Spanned<PathBuf>>,
    pub(super) server_name: Option<String>,
}

impl Default for RawSource {
    fn default() -> Self {
        RawSource {
            kind: SourceKind::Spool,
            dir: Spanned::new(0..0, "spool".into()),
            max_attempts: Spanned::new(0..0, 3),
            retain_results: Dur(Duration::from_secs(7 * 86400)),
            min_free: super::MinFree::default(),
            fsync: true,
            servers: Spanned::new(0..0, Vec::new()),
            client_id: None,
            exceptions: false,
            max_packet_bytes: None,
            io_timeout: Spanned::new(0..0, Dur(Duration::from_secs(10))),
            reconnect_max: Spanned::new(0..0, Dur(Duration::from_secs(3))),
            dead_peer_timeout: Spanned::new(0..0, Dur(Duration::from_secs(15))),
            tls: None,
            bind: Spanned::new(0..0, Vec::new()),
            function: None,
            reply: Spanned::new(0..0, "true".into()),
            allow_remote: false,
            url: None,
            urls: Spanned::new(0..0, Vec::new()),
            queue: None,
            prefetch: Spanned::new(0..0, 1),
            heartbeat: Spanned::new(0..0, Dur(Duration::from_secs(60))),
            declare: None,
            dedupe_ids: Spanned::new(0..0, 0),
            persistent_replies: true,
            consumer_timeout: Spanned::new(0..0, CONSUMER_TIMEOUT),
            busy_poll: Spanned::new(0..0, Dur(BUSY_POLL)),
            max_connections: None,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFunction {
    pub(super) timeout: Option<Spanned<Limit>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLog {
    pub(super) level: Spanned<Level>,
    pub(super) file: Option<PathBuf>,
    pub(super) format: RawLogFormat,
    pub(super) jobs: bool,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: Spanned::new(0..0, Level(log::LevelFilter::Info)),
            file: None,
            format: RawLogFormat::Text,
            jobs: false,
        }
    }
}

/// The raw `[source.declare]` table.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDeclare {
    pub(super) exchange: Option<Spanned<String>>,
    #[serde(rename = "type")]
    pub(super) kind: Option<Spanned<String>>,
    pub(super) routing_key: Option<Spanned<String>>,
    pub(super) dead_letter_exchange: Option<Spanned<String>>,
    pub(super) queue_type: Option<Spanned<String>>,
}

/// Dur's default for a key: the broker's consumer_timeout (30 min since RabbitMQ 3.8.17).
pub(super) const CONSUMER_TIMEOUT: Dur = Dur(Duration::from_secs(30 * 60));

/// `[source] busy_poll`'s default (amqp): longer than this VM's broker round trip at prefetch 1.
const BUSY_POLL: Duration = Duration::from_micros(100);
