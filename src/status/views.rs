//! What `status` shows of a source's connections: per server address, per lane, written by
//! the Gearman and AMQP lanes and read by the status document.

use std::sync::{Arc, Mutex};

/// One lane's connection to one Gearman server, for `status`.
#[derive(Debug, Clone, Default)]
pub struct ServerView {
    pub state: crate::kinds::ConnState,
    pub since_ms: u64,
    pub last_error: Option<String>,
    pub last_error_ms: u64,
    pub reconnects: u64,
    /// How the last try failed (backing off, or refused), until one succeeds: a server tried
    /// again after failing is shown connecting, and is no more reachable for it.
    pub failing: Option<crate::kinds::ConnState>,
}

/// Per server address, per lane: written by the Gearman lanes, read by `status`.
pub type ServerViews =
    Arc<Mutex<std::collections::BTreeMap<String, std::collections::BTreeMap<usize, ServerView>>>>;

/// Shows lane `lane`'s connection to `addr` as `state` (and its latest error, if any).
pub fn show_server(
    views: &ServerViews,
    addr: &str,
    lane: usize,
    state: crate::kinds::ConnState,
    error: Option<String>,
) {
    let Ok(mut views) = views.lock() else {
        return;
    };
    let v = views
        .entry(addr.to_string())
        .or_default()
        .entry(lane)
        .or_default();
    // A new view (since 0) takes its first state like any change.
    if v.state != state || v.since_ms == 0 {
        v.state = state;
        v.since_ms = crate::clock::now_ms();
    }
    use crate::kinds::ConnState::{BackingOff, Connecting, Refused};
    match state {
        BackingOff | Refused => v.failing = Some(state),
        Connecting => {}
        _ => v.failing = None,
    }
    if let Some(e) = error {
        v.last_error = Some(e);
        v.last_error_ms = crate::clock::now_ms();
    }
}

/// Shows every one of `lanes` lanes connecting to every address in `addrs`, at once: a source
/// lists its configured servers from the generation's first status answer, before its lanes
/// start or look a name up (they show what follows themselves).
pub fn show_configured<'a>(
    views: &ServerViews,
    addrs: impl IntoIterator<Item = &'a str>,
    lanes: usize,
) {
    let Ok(mut views) = views.lock() else {
        return;
    };
    let now = crate::clock::now_ms();
    for addr in addrs {
        let per_lane = views.entry(addr.to_string()).or_default();
        for lane in 0..lanes {
            let v = per_lane.entry(lane).or_default();
            v.state = crate::kinds::ConnState::Connecting;
            v.since_ms = now;
        }
    }
}

/// Counts a reconnect of lane `lane` to `addr`.
pub fn count_reconnect(views: &ServerViews, addr: &str, lane: usize) {
    if let Ok(mut views) = views.lock() {
        views
            .entry(addr.to_string())
            .or_default()
            .entry(lane)
            .or_default()
            .reconnects += 1;
    }
}
