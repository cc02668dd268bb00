//! The metrics' counts as they cross execve (JSON in a memfd): counters only go up for the life
//! of the process.

use serde::{Deserialize, Serialize};

/// A histogram's counts: observations per bucket (the last one: above every bound), their sum.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistogramCounts {
    /// Upper bounds of the buckets, in microseconds.
    pub bounds_us: Vec<u64>,
    /// Per bucket, not cumulative; one more than `bounds_us`.
    pub counts: Vec<u64>,
    pub sum_us: u64,
}

/// One function's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCounts {
    pub done: u64,
    pub failed: u64,
    pub timed_out: u64,
    pub duration: HistogramCounts,
}

/// The metrics' counters, carried across execve so that they only go up for the life of the
/// process.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsCarried {
    pub functions: std::collections::BTreeMap<String, FunctionCounts>,
    pub restarts: std::collections::BTreeMap<String, u64>,
    pub restart_pause: HistogramCounts,
    pub deploys: std::collections::BTreeMap<String, u64>,
    /// Gearman reconnects per server address.
    pub reconnects: std::collections::BTreeMap<String, u64>,
    /// AMQP replies lost ([`super::REPLIES_LOST`]); absent from an older build's.
    #[serde(default)]
    pub replies_lost: u64,
}

/// The counters as data, for `gearshift top` (the status socket's `counts` request): what the
/// exposition renders, without a text format to parse back.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Counts {
    pub metrics: MetricsCarried,
    /// The spool's queue now (None for a network source).
    pub queue: Option<super::QueueStats>,
}
