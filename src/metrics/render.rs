//! The text exposition (Prometheus text format 0.0.4): every family, in sections.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::carry::HistogramCounts;
use super::{process, FunctionStats, Gauges, Metrics, Outcome, QueueStats};
use crate::kinds::ConnState;
use crate::kinds::DeployResult;
use crate::kinds::RestartReason;

impl Metrics {
    /// This process's text exposition (Prometheus text format 0.0.4).
    pub fn render(&self, g: &Gauges) -> String {
        let mut out = String::with_capacity(8192);
        let w = &mut out;
        let (restarts, deploys, reconnects_before) = self
            .rare
            .lock()
            .map(|r| (r.restarts.clone(), r.deploys.clone(), r.reconnects.clone()))
            .unwrap_or_default();
        render_worker(w, g);
        self.render_jobs(w);
        self.render_restarts(w, g, &restarts, &deploys);
        if let Some(q) = &g.queue {
            render_queue(w, g, q);
        }
        if !g.servers.is_empty() {
            render_servers(w, g, &reconnects_before);
        }
        if let Some(i) = &g.ingress {
            render_ingress(w, i);
        }
        process::render(w);
        out
    }

    /// Jobs that ended and how long they ran, per function.
    fn render_jobs(&self, w: &mut String) {
        header(
            w,
            "gearshift_jobs_total",
            "counter",
            "Jobs that ended, by function and outcome (done, failed, timed_out).",
        );
        let functions: Vec<(String, Arc<FunctionStats>)> = self
            .functions
            .read()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), Arc::clone(v))).collect())
            .unwrap_or_default();
        for (name, s) in &functions {
            let f = escape(name);
            for (outcome, c) in [
                (Outcome::Done, &s.done),
                (Outcome::Failed, &s.failed),
                (Outcome::TimedOut, &s.timed_out),
            ] {
                let _ = writeln!(
                    w,
                    "gearshift_jobs_total{{function=\"{f}\",outcome=\"{}\"}} {}",
                    outcome.as_str(),
                    c.load(Ordering::Relaxed)
                );
            }
        }
        header(
            w,
            "gearshift_job_duration_seconds",
            "histogram",
            "How long jobs ran, by function.",
        );
        for (name, s) in &functions {
            histogram(
                w,
                "gearshift_job_duration_seconds",
                &format!("function=\"{}\"", escape(name)),
                &s.duration.counts(),
            );
        }
    }

    /// Restarts by reason, their pause, refusals, deploys.
    fn render_restarts(
        &self,
        w: &mut String,
        g: &Gauges,
        restarts: &BTreeMap<String, u64>,
        deploys: &BTreeMap<String, u64>,
    ) {
        header(
            w,
            "gearshift_restarts_total",
            "counter",
            "Re-execs in place, by reason.",
        );
        for reason in RestartReason::ALL {
            let n = restarts.get(reason.as_str()).copied().unwrap_or(0);
            let _ = writeln!(
                w,
                "gearshift_restarts_total{{reason=\"{}\"}} {n}",
                reason.as_str()
            );
        }
        header(
            w,
            "gearshift_restart_pause_seconds",
            "histogram",
            "From a restart's request until the new generation serves.",
        );
        histogram(
            w,
            "gearshift_restart_pause_seconds",
            "",
            &self.restart_pause.counts(),
        );
        header(
            w,
            "gearshift_reload_refusals_total",
            "counter",
            "Reloads refused because the new config, jobs_dir or binary was invalid.",
        );
        let _ = writeln!(w, "gearshift_reload_refusals_total {}", g.refusals);
        header(
            w,
            "gearshift_deploys_total",
            "counter",
            "Deploys of a new binary, by result (switched, refused, rolled_back).",
        );
        for result in DeployResult::ALL.map(DeployResult::as_str) {
            let n = deploys.get(result).copied().unwrap_or(0);
            let _ = writeln!(w, "gearshift_deploys_total{{result=\"{result}\"}} {n}");
        }
    }
}

/// What the worker is and does now.
fn render_worker(w: &mut String, g: &Gauges) {
    header(
        w,
        "gearshift_info",
        "gauge",
        "The worker's name and version.",
    );
    let _ = writeln!(
        w,
        "gearshift_info{{name=\"{}\",version=\"{}\",source=\"{}\"}} 1",
        escape(&g.name),
        escape(&g.version),
        g.source
    );
    gauge(
        w,
        "gearshift_generation",
        "Generation of the running image (1 at start, +1 per re-exec).",
        g.generation,
    );
    gauge(
        w,
        "gearshift_lanes",
        "Lanes (job threads) of the running generation.",
        g.lanes,
    );
    gauge(
        w,
        "gearshift_jobs_in_flight",
        "Jobs running now.",
        g.in_flight,
    );
    gauge(
        w,
        "gearshift_degraded",
        "1 while a result or an accepted message cannot be stored (a full disk, no descriptors).",
        u64::from(g.degraded),
    );
}

/// The spool's queue.
fn render_queue(w: &mut String, g: &Gauges, q: &QueueStats) {
    gauge(
        w,
        "gearshift_spool_queue_depth",
        "Spool jobs waiting for a lane.",
        q.depth,
    );
    gauge(
        w,
        "gearshift_spool_running",
        "Spool jobs claimed by a lane (cur/).",
        q.running,
    );
    header(
        w,
        "gearshift_spool_oldest_job_age_seconds",
        "gauge",
        "Age of the oldest waiting spool job (0: none waiting).",
    );
    let _ = writeln!(
        w,
        "gearshift_spool_oldest_job_age_seconds {}",
        seconds(q.oldest_age_us)
    );
    header(
        w,
        "gearshift_spool_rejected_total",
        "counter",
        "Spool entries set aside in rejected/.",
    );
    let _ = writeln!(w, "gearshift_spool_rejected_total {}", g.rejected);
}

/// What a ZeroMQ source did with the messages it received.
fn render_ingress(w: &mut String, i: &super::IngressGauge) {
    header(
        w,
        "gearshift_zeromq_messages_total",
        "counter",
        "Messages received on the ZeroMQ sockets: accepted (durable jobs) or rejected (answered with an error).",
    );
    for (outcome, n) in [("accepted", i.accepted), ("rejected", i.rejected)] {
        let _ = writeln!(
            w,
            "gearshift_zeromq_messages_total{{outcome=\"{outcome}\"}} {n}"
        );
    }
    header(
        w,
        "gearshift_zeromq_batches_total",
        "counter",
        "Syncs that made accepted messages durable (messages per sync = accepted / batches).",
    );
    let _ = writeln!(w, "gearshift_zeromq_batches_total {}", i.batches);
    header(
        w,
        "gearshift_zeromq_peers",
        "gauge",
        "Clients connected to the ZeroMQ sockets now.",
    );
    let _ = writeln!(w, "gearshift_zeromq_peers {}", i.peers);
    header(
        w,
        "gearshift_zeromq_max_connections",
        "gauge",
        "Clients connected at once at most; one over it is closed as soon as it is accepted.",
    );
    let _ = writeln!(w, "gearshift_zeromq_max_connections {}", i.max_peers);
    header(
        w,
        "gearshift_zeromq_closed_total",
        "counter",
        "Clients the worker closed itself: broke the protocol, handshake not done in time, over max_connections, holding the most over the memory budget.",
    );
    for (why, n) in crate::kinds::CloseReason::ALL.iter().zip(i.closed) {
        let _ = writeln!(
            w,
            "gearshift_zeromq_closed_total{{reason=\"{}\"}} {n}",
            why.label()
        );
    }
}

/// Each server's connections and reconnects (earlier generations' included), named by the
/// source's kind: `gearshift_gearman_*` for gearmand, `gearshift_amqp_*` for AMQP brokers.
fn render_servers(w: &mut String, g: &Gauges, reconnects_before: &BTreeMap<String, u64>) {
    let kind = g.source;
    header(
        w,
        &format!("gearshift_{kind}_server_up"),
        "gauge",
        "1 while at least one lane is connected to the server.",
    );
    for s in &g.servers {
        let _ = writeln!(
            w,
            "gearshift_{kind}_server_up{{server=\"{}\"}} {}",
            escape(&s.address),
            u64::from(ConnState::up(&s.lanes) > 0)
        );
    }
    header(
        w,
        &format!("gearshift_{kind}_connections"),
        "gauge",
        "Lanes' connections to each server, by state.",
    );
    // A broker's alarm, refusal and failover are AMQP's: a Gearman server is never in them.
    let amqp = kind == "amqp";
    for s in &g.servers {
        for (state, n) in ConnState::ALL.iter().zip(s.lanes) {
            if !amqp && state.amqp_only() {
                continue;
            }
            let _ = writeln!(
                w,
                "gearshift_{kind}_connections{{server=\"{}\",state=\"{}\"}} {n}",
                escape(&s.address),
                state.label()
            );
        }
    }
    header(
        w,
        &format!("gearshift_{kind}_reconnects_total"),
        "counter",
        "Connections to each server lost and made again.",
    );
    let mut all: BTreeMap<&str, u64> = BTreeMap::new();
    // Earlier generations' counts, for the servers this one still has: a server taken
    // out of the config leaves no series behind.
    for (server, n) in reconnects_before {
        if g.servers.iter().any(|s| s.address == *server) {
            *all.entry(server).or_default() += n;
        }
    }
    for s in &g.servers {
        *all.entry(&s.address).or_default() += s.reconnects;
    }
    for (server, n) in all {
        let _ = writeln!(
            w,
            "gearshift_{kind}_reconnects_total{{server=\"{}\"}} {n}",
            escape(server)
        );
    }
    if kind == "amqp" {
        header(
            w,
            "gearshift_amqp_replies_lost_total",
            "counter",
            "Replies (reply_to) the broker refused every time they were sent: the job was settled, its requester got no answer.",
        );
        let lost = super::REPLIES_LOST.load(Ordering::Relaxed);
        let _ = writeln!(w, "gearshift_amqp_replies_lost_total {lost}");
    }
}

fn header(w: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(w, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn gauge(w: &mut String, name: &str, help: &str, value: u64) {
    header(w, name, "gauge", help);
    let _ = writeln!(w, "{name} {value}");
}

/// Microseconds as seconds, exactly (no float noise: "0.0025", "1", "3600").
pub(super) fn seconds(us: u64) -> String {
    let (s, frac) = (us / 1_000_000, us % 1_000_000);
    if frac == 0 {
        s.to_string()
    } else {
        let f = format!("{frac:06}");
        format!("{s}.{}", f.trim_end_matches('0'))
    }
}

fn histogram(w: &mut String, name: &str, labels: &str, h: &HistogramCounts) {
    let sep = if labels.is_empty() { "" } else { "," };
    let mut cumulative = 0u64;
    for (i, c) in h.counts.iter().enumerate() {
        cumulative += c;
        let le = h
            .bounds_us
            .get(i)
            .map_or_else(|| "+Inf".to_string(), |b| seconds(*b));
        let _ = writeln!(w, "{name}_bucket{{{labels}{sep}le=\"{le}\"}} {cumulative}");
    }
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(w, "{name}_sum{braces} {}", seconds(h.sum_us));
    let _ = writeln!(w, "{name}_count{braces} {cumulative}");
}

/// A label value with `\`, `"` and newlines escaped.
pub(super) fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
