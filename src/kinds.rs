//! Words every layer shares, as types rather than strings: why a generation restarts, what the
//! worker is doing, how a deploy ended, where a connection to a server is. A leaf.

use serde::{Deserialize, Serialize};

/// Why a generation restarts (carried to the next, shown in `status` and the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RestartReason {
    #[serde(rename = "sighup")]
    Sighup,
    #[serde(rename = "config changed")]
    ConfigChanged,
    #[serde(rename = "jobs changed")]
    JobsChanged,
    #[serde(rename = "binary changed")]
    BinaryChanged,
    #[serde(rename = "max_jobs")]
    MaxJobs,
    #[serde(rename = "max_rss")]
    MaxRss,
    #[serde(rename = "max_age")]
    MaxAge,
    /// A lane or an essential helper thread died (a panic): the generation is replaced.
    #[serde(rename = "thread died")]
    ThreadDied,
    /// The spool's directory was removed or replaced while the worker ran: opened again.
    #[serde(rename = "spool replaced")]
    SpoolReplaced,
}

impl RestartReason {
    /// Every reason, for metrics that show each one from the start.
    pub const ALL: [RestartReason; 9] = [
        RestartReason::Sighup,
        RestartReason::ConfigChanged,
        RestartReason::JobsChanged,
        RestartReason::BinaryChanged,
        RestartReason::MaxJobs,
        RestartReason::MaxRss,
        RestartReason::MaxAge,
        RestartReason::ThreadDied,
        RestartReason::SpoolReplaced,
    ];

    /// The name in `status` and the log (`last_restart_reason`).
    pub fn as_str(self) -> &'static str {
        match self {
            RestartReason::Sighup => "sighup",
            RestartReason::ConfigChanged => "config changed",
            RestartReason::JobsChanged => "jobs changed",
            RestartReason::BinaryChanged => "binary changed",
            RestartReason::MaxJobs => "max_jobs",
            RestartReason::MaxRss => "max_rss",
            RestartReason::MaxAge => "max_age",
            RestartReason::ThreadDied => "thread died",
            RestartReason::SpoolReplaced => "spool replaced",
        }
    }
}

impl std::fmt::Display for RestartReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the worker is doing (the status document's `state`, before health is considered).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerPhase {
    Running,
    /// Waiting for running jobs before a re-exec.
    Draining,
    /// Handing over and exec'ing.
    Restarting,
    /// Waiting for running jobs before exiting.
    Stopping,
}

impl WorkerPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerPhase::Running => "running",
            WorkerPhase::Draining => "draining",
            WorkerPhase::Restarting => "restarting",
            WorkerPhase::Stopping => "stopping",
        }
    }
}

/// How a deploy of a new binary ended (the `result` label of `gearshift_deploys_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeployResult {
    Switched,
    Refused,
    RolledBack,
}

impl DeployResult {
    /// Every result, for metrics that show each one from the start.
    pub const ALL: [DeployResult; 3] = [
        DeployResult::Switched,
        DeployResult::Refused,
        DeployResult::RolledBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeployResult::Switched => "switched",
            DeployResult::Refused => "refused",
            DeployResult::RolledBack => "rolled_back",
        }
    }
}

/// Where one lane's connection to a network server is (status and metrics), best first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum ConnState {
    Connected,
    /// Connected, but the broker reads nothing published on it (AMQP `connection.blocked`:
    /// a memory or disk alarm).
    Blocked,
    /// A connect or handshake under way.
    #[default]
    Connecting,
    /// Failed; waiting out the backoff.
    BackingOff,
    /// Reached, and refused (AMQP: a queue that does not exist, a login or a vhost refused, a
    /// server that is no broker); waiting out the backoff.
    Refused,
    /// Not connected, and not to be: another of the brokers listed for failover is in use
    /// (AMQP `urls`).
    Standby,
}

/// How a broker's `last_error` begins while it blocks publishing (AMQP `connection.blocked`);
/// the broker's reason follows.
pub const BLOCKED_ERROR: &str = "the broker blocks publishing: ";

/// How many [`ConnState`]s there are.
pub const CONN_STATES: usize = 6;

/// Lanes per [`ConnState`] (`ConnState::ALL`'s order).
pub type StateCounts = [u64; CONN_STATES];

impl ConnState {
    pub const ALL: [ConnState; CONN_STATES] = [
        ConnState::Connected,
        ConnState::Blocked,
        ConnState::Connecting,
        ConnState::BackingOff,
        ConnState::Refused,
        ConnState::Standby,
    ];

    /// Of `lanes`, how many are connected (a blocked connection still delivers).
    pub fn up(lanes: &StateCounts) -> u64 {
        let up = |s: &ConnState| matches!(s, ConnState::Connected | ConnState::Blocked);
        (ConnState::ALL.iter().zip(lanes))
            .filter(|(s, _)| up(s))
            .map(|(_, n)| n)
            .sum()
    }

    /// A state only an AMQP broker is ever in (its alarm, a refusal, failover).
    pub fn amqp_only(self) -> bool {
        matches!(
            self,
            ConnState::Blocked | ConnState::Refused | ConnState::Standby
        )
    }

    /// As the metrics label it.
    pub fn label(self) -> &'static str {
        match self {
            ConnState::BackingOff => "backing_off",
            other => other.as_str(),
        }
    }

    /// As `status` shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            ConnState::Connected => "connected",
            ConnState::Blocked => "blocked",
            ConnState::Connecting => "connecting",
            ConnState::BackingOff => "backing off",
            ConnState::Refused => "refused",
            ConnState::Standby => "standby",
        }
    }
}

/// What a message-ingesting source (ZeroMQ) has done, shared with status and metrics, and
/// carried across exec (counters never go back).
#[derive(Debug, Default)]
pub struct Ingress {
    /// The endpoints listened on (none: no such source).
    pub bound: std::sync::Mutex<Vec<String>>,
    /// Messages made durable jobs, and messages refused with an error reply.
    pub accepted: std::sync::atomic::AtomicU64,
    pub rejected: std::sync::atomic::AtomicU64,
    /// Syncs that made accepted messages durable, and the most messages one covered.
    pub batches: std::sync::atomic::AtomicU64,
    pub largest_batch: std::sync::atomic::AtomicU64,
    /// Clients connected now (accepted and not closed, handshake done or not).
    pub peers: std::sync::atomic::AtomicU64,
    /// Clients connected at once at most (`max_connections`, or derived).
    pub max_peers: std::sync::atomic::AtomicU64,
    /// Clients the ingress closed itself, by [`CloseReason`] (in `CloseReason::ALL`'s order).
    pub closed: [std::sync::atomic::AtomicU64; CLOSE_REASONS],
    /// Why messages cannot be stored now (a full disk), and since when (ms since the epoch);
    /// None while they can. The worker is `degraded` meanwhile.
    pub not_stored: std::sync::Mutex<Option<(String, u64)>>,
}

/// How many [`CloseReason`]s there are.
pub const CLOSE_REASONS: usize = 5;

/// Why the ingress closed a client itself (a client that closes or vanishes is not counted).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// It broke ZMTP (not ZeroMQ, a security mechanism, a socket type that cannot send us
    /// requests, a frame far over the limit).
    Protocol,
    /// It did not finish its handshake in time.
    HandshakeTimeout,
    /// It came while `max_connections` clients were connected.
    MaxConnections,
    /// It held the most while all clients together held more than their budget.
    MemoryBudget,
    /// Its host stopped answering: the kernel gave up on the connection (keepalive probes or
    /// unacknowledged data past `dead_peer_timeout`).
    DeadPeer,
}

impl CloseReason {
    pub const ALL: [CloseReason; CLOSE_REASONS] = [
        CloseReason::Protocol,
        CloseReason::HandshakeTimeout,
        CloseReason::MaxConnections,
        CloseReason::MemoryBudget,
        CloseReason::DeadPeer,
    ];

    /// Its name in `status` and in the metrics' `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Protocol => "protocol",
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::MaxConnections => "max_connections",
            CloseReason::MemoryBudget => "memory_budget",
            CloseReason::DeadPeer => "dead_peer",
        }
    }
}

impl Ingress {
    /// (accepted, rejected, batches), to carry across exec.
    pub fn counts(&self) -> [u64; 3] {
        use std::sync::atomic::Ordering::Relaxed;
        [
            self.accepted.load(Relaxed),
            self.rejected.load(Relaxed),
            self.batches.load(Relaxed),
        ]
    }

    /// Messages cannot be stored (`Some((why, now))`, now in ms since the epoch), or can again
    /// (`None`). A failure that goes on keeps the time it began.
    pub fn storing(&self, failure: Option<(String, u64)>) {
        if let Ok(mut n) = self.not_stored.lock() {
            *n = match (failure, n.take()) {
                (Some((why, _)), Some((_, since))) => Some((why, since)),
                (failure, _) => failure,
            };
        }
    }

    /// Why messages cannot be stored now, and since when, if they cannot.
    pub fn not_stored(&self) -> Option<(String, u64)> {
        self.not_stored.lock().ok().and_then(|n| n.clone())
    }

    /// The clients closed, by reason (`CloseReason::ALL`'s order), to carry across exec.
    pub fn closed_counts(&self) -> [u64; CLOSE_REASONS] {
        std::array::from_fn(|i| self.closed[i].load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Takes over what the previous generation counted.
    pub fn resume(&self, counts: [u64; 3], closed: [u64; CLOSE_REASONS]) {
        use std::sync::atomic::Ordering::Relaxed;
        self.accepted.store(counts[0], Relaxed);
        self.rejected.store(counts[1], Relaxed);
        self.batches.store(counts[2], Relaxed);
        for (n, carried) in self.closed.iter().zip(closed) {
            n.store(carried, Relaxed);
        }
    }
}
