//! The ZeroMQ ingress: one thread serves every configured endpoint as a ROUTER socket would
//! (REQ and DEALER clients, many at once; `engine.rs`), reads messages in batches; each batch
//! is made durable in the spool with one sync, and only then is each message answered: `TRUE`
//! or its job id, or `ERROR <why>` for a message that is not a job. A message received but not
//! yet durable when the worker stops or restarts is never answered, so a resending client (the
//! lazy pirate pattern) sends it again; nothing answered is ever lost.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::config::ZeromqReply;
use crate::error::{Error, Result};
use crate::kinds::Ingress as Stats;
use crate::ops::logging::Recurring;
use crate::source::spool::{BatchWriter, Feed, Spool};

use super::engine::{Engine, Received};
use super::listen::Listener;
use super::zmtp::{self, Limits};

/// How long one wait for messages lasts at most.
const POLL: Duration = Duration::from_millis(100);
/// Messages read before one sync at most.
const BATCH: usize = 256;
/// How long answers may take to leave when the ingress stops (a restart or a stop).
const LINGER: Duration = Duration::from_millis(500);
/// How long a stop waits for the thread (the batch in hand, the linger): the control thread
/// must stay able to act on a second TERM.
const STOP_WAIT: Duration = Duration::from_millis(700);
/// Bytes of messages read before one sync at most (besides the message count).
const BATCH_BYTES: usize = 64 << 20;
/// Frames in a routing envelope at most (a REQ client's: the delimiter).
const MAX_ENVELOPE: usize = 32;
/// Frames of one message at most; more end the connection.
const MAX_FRAMES: usize = 64;
/// How often an idle ingress whose batches were refused looks whether the spool takes jobs
/// again.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// How often the ingress looks whether each `ipc://` endpoint's socket file is still at its
/// path (`listen::renew`).
const FILES_EVERY: Duration = Duration::from_secs(2);
/// Batches of one message in a row before the ingress busy-polls for the next.
const SINGLES_TO_SPIN: u32 = 16;

/// What the ingress needs to decide about a message.
pub struct Rules {
    /// The function of single-frame messages.
    pub function: Option<String>,
    pub reply: ZeromqReply,
    pub max_payload: usize,
    /// `[source] busy_poll`.
    pub busy_poll: Duration,
    /// The functions this worker serves (set by the lanes as they start).
    pub served: Arc<RwLock<Vec<String>>>,
    /// A function not served yet is taken if `jobs_dir` has a file for it (a deploy's restart
    /// is yet to come; `watch::Offers`: listed once per change of the directory, not once per
    /// message), or while a new binary is judged (it may bring it).
    pub jobs_dir: crate::watch::Offers,
    /// `[source] dead_peer_timeout`: a TCP client whose host is gone is closed within about it.
    pub dead_peer: Duration,
}

/// The running ingress thread.
pub struct Ingress {
    stop: Arc<AtomicBool>,
    wake: Arc<OwnedFd>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ingress {
    /// Serves `listeners` (through duplicates of their descriptors) and starts reading. With a
    /// `feed`, accepted jobs go to the lanes without a file each.
    pub fn start(
        listeners: &Arc<Mutex<Vec<Listener>>>,
        spool: Spool,
        feed: Option<Feed>,
        rules: Rules,
        stats: Arc<Stats>,
    ) -> Result<Ingress> {
        // Room for a message a little over the limit, so it gets an error reply; one far over
        // it ends that client's connection.
        let limits = Limits {
            message_bytes: rules.max_payload.saturating_add(64 * 1024),
            frames: MAX_FRAMES,
            peers: zmtp::CLIENTS,
        };
        let max_peers = stats.max_peers.load(Ordering::Relaxed);
        let mut engine = {
            let held = listeners
                .lock()
                .map_err(|_| Error::Internal("zeromq listeners lock poisoned".into()))?;
            Engine::new(&held, limits, max_peers, rules.dead_peer)?
        };
        let listeners = Arc::clone(listeners);
        let wake = engine.waker();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = crate::ops::signals::spawn_essential("zeromq", move || {
            let mut writer = spool.batch_writer();
            if let Some(feed) = feed {
                writer.feed(feed);
            }
            serve(&mut engine, &mut writer, &rules, &stats, &flag, &listeners);
            drop(writer);
            // Answers already queued get up to LINGER to leave; then every connection closes.
            engine.linger(Instant::now() + LINGER);
            stats.peers.store(0, Ordering::Relaxed);
        })
        .map_err(|e| Error::io("spawning the ZeroMQ ingress thread", e))?;
        Ok(Ingress {
            stop,
            wake,
            thread: Some(thread),
        })
    }

    /// Stops reading, answers the batch in hand, lets the answers leave (bounded by the
    /// linger) and closes every connection. Returns once that is done.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = nix::unistd::write(self.wake.as_fd(), &1u64.to_ne_bytes());
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + STOP_WAIT;
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                // Stuck in a sync on a slow disk: nothing it holds was answered yet.
                log::warn!(
                    "zeromq: the ingress did not stop within {} ms; going on without it",
                    STOP_WAIT.as_millis()
                );
            }
        }
    }
}

impl Drop for Ingress {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(
    engine: &mut Engine,
    writer: &mut BatchWriter,
    rules: &Rules,
    stats: &Stats,
    stop: &AtomicBool,
    listeners: &Mutex<Vec<Listener>>,
) {
    let mut spin = crate::source::spin::Spin::new(rules.busy_poll);
    // Batches of one message in a row: messages coming one at a time mean clients wait on our
    // answers (a latency a brief busy-poll takes out); several at once mean they keep the
    // CPUs busy, which a spinning ingress would take from them (measured: 8 REQ clients
    // 10-25% slower when it spun after every single message).
    let mut singles = 0u32;
    let mut said = Said {
        placing: Recurring::new(
            "zeromq: accepted jobs not in place yet (their journal records keep them), trying again",
            "zeromq: accepted jobs in place again",
        ),
        storing: Recurring::new(
            "zeromq: messages not stored, answered \"ERROR not stored, try again\"",
            "zeromq: the spool takes jobs again",
        ),
        binding: Recurring::new(
            "zeromq: a socket file removed from its path cannot be bound again, so no client can connect there",
            "zeromq: every socket file is at its path again",
        ),
    };
    let mut probed = Instant::now();
    let mut files_looked = Instant::now();
    let mut batch: Vec<Received> = Vec::new();
    while !stop.load(Ordering::Acquire) {
        // Files of jobs already answered: written while no message waits (or retried).
        if writer.pending() {
            place(writer, &mut said.placing);
        }
        let woken = {
            let _waiting = crate::source::spin::Waiting::enter();
            let spun = singles >= SINGLES_TO_SPIN
                && !engine.has_pending()
                && spin.wait_for(|| engine.poll_now());
            let timeout = if spun {
                Duration::ZERO
            } else {
                engine.timeout(POLL)
            };
            engine.wait(timeout, &mut batch, BATCH, BATCH_BYTES)
        };
        stats.peers.store(engine.peers() as u64, Ordering::Relaxed);
        for (n, more) in stats.closed.iter().zip(engine.take_closed()) {
            if more > 0 {
                n.fetch_add(more, Ordering::Relaxed);
            }
        }
        if woken && stop.load(Ordering::Acquire) {
            // Read but not durable: never answered (the clients send them again).
            break;
        }
        if files_looked.elapsed() >= FILES_EVERY {
            files_looked = Instant::now();
            renew_files(engine, listeners, &mut said.binding);
        }
        if batch.is_empty() && said.storing.failing() && probed.elapsed() >= PROBE_EVERY {
            // Refused batches leave the worker degraded; with no client sending, nothing else
            // would find out that the disk has room again.
            probed = Instant::now();
            if writer.ready().is_ok() {
                said.storing.worked();
                stats.storing(None);
            }
        }
        match batch.len() {
            0 => continue,
            1 => singles = singles.saturating_add(1),
            _ => singles = 0,
        }
        answer(
            engine,
            writer,
            &mut said,
            rules,
            stats,
            std::mem::take(&mut batch),
        );
    }
}

/// A message split into the routing envelope (sent back with the answer) and the body.
fn split(mut frames: Vec<Vec<u8>>) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    // A REQ client's envelope ends with an empty delimiter frame; a DEALER may send none.
    let delimiter = frames
        .iter()
        .take(MAX_ENVELOPE)
        .position(|f| f.is_empty())
        .filter(|&i| i + 1 < frames.len());
    let at = delimiter.map_or(0, |i| i + 1);
    let body = frames.split_off(at);
    (frames, body)
}

/// Checks a message body: Ok((function, payload)) or the error to answer.
fn job(body: Vec<Vec<u8>>, rules: &Rules) -> std::result::Result<(String, Vec<u8>), String> {
    let mut body = body.into_iter();
    let (function, payload) =
        match (body.next(), body.next(), body.next()) {
            (Some(payload), None, None) => match &rules.function {
                Some(f) => (f.clone(), payload),
                None => return Err(
                    "one frame, and this source has no [source] function: send [function, payload]"
                        .into(),
                ),
            },
            (Some(function), Some(payload), None) => {
                let name = String::from_utf8(function)
                    .map_err(|_| "the function name is not UTF-8".to_string())?;
                (name, payload)
            }
            (None, _, _) => {
                return Err("an empty message: send [payload] or [function, payload]".into())
            }
            _ => {
                return Err(format!(
                    "{} frames: send [payload] or [function, payload]",
                    3 + body.len()
                ))
            }
        };
    let shown = || crate::text::escape(&function.chars().take(64).collect::<String>()).to_string();
    crate::config::check_function_name(&function)
        .map_err(|_| format!("\"{}\" is no function name", shown()))?;
    if !rules
        .served
        .read()
        .map(|s| s.contains(&function))
        .unwrap_or(false)
        && !crate::jobs::functions::candidate_pending()
        && rules.jobs_dir.offers(&function).is_none()
    {
        return Err(format!("unknown function \"{}\"", shown()));
    }
    if payload.len() > rules.max_payload {
        return Err(format!(
            "payload is {} bytes, over max_payload_bytes ({})",
            payload.len(),
            rules.max_payload
        ));
    }
    Ok((function, payload))
}

/// What keeps failing while it lasts (a full disk), said once then, not at every batch: the
/// clients resend what is refused, at their own rate.
struct Said {
    /// Files of accepted jobs that cannot be written.
    placing: Recurring,
    /// Batches the journal cannot take.
    storing: Recurring,
    /// `ipc://` socket files that cannot be bound again.
    binding: Recurring,
}

/// Binds again each `ipc://` endpoint whose socket file is no longer at its path, and serves
/// the new socket in place of the old (which no client can reach any more).
fn renew_files(engine: &mut Engine, listeners: &Mutex<Vec<Listener>>, said: &mut Recurring) {
    let Ok(mut held) = listeners.lock() else {
        return;
    };
    let mut failed = None;
    for (i, l) in held.iter_mut().enumerate() {
        match super::listen::renew(l) {
            None => {}
            Some(Ok(fd)) => {
                engine.replace_door(i, fd);
                log::warn!(
                    "zeromq: the socket file of {} was removed or replaced: bound again, clients connect there again",
                    l.endpoint
                );
            }
            Some(Err(e)) => failed = Some(e),
        }
    }
    match failed {
        Some(e) => said.failed(&e),
        None => said.worked(),
    }
}

/// Makes the batch's jobs durable with one sync, then answers every message of it.
fn answer(
    engine: &mut Engine,
    writer: &mut BatchWriter,
    said: &mut Said,
    rules: &Rules,
    stats: &Stats,
    batch: Vec<Received>,
) {
    // Each message's connection and envelope, and the index of its job or why it is none.
    type Reply = (u64, Vec<Vec<u8>>, std::result::Result<usize, String>);
    let mut replies: Vec<Reply> = Vec::new();
    let mut jobs: Vec<(String, Vec<u8>)> = Vec::new();
    for (conn, frames) in batch {
        let (envelope, body) = split(frames);
        match job(body, rules) {
            Ok(j) => {
                jobs.push(j);
                replies.push((conn, envelope, Ok(jobs.len() - 1)));
            }
            Err(why) => replies.push((conn, envelope, Err(why))),
        }
    }
    let refs: Vec<(&str, &[u8])> = jobs.iter().map(|(f, p)| (f.as_str(), &p[..])).collect();
    let stored = if refs.is_empty() {
        Ok(Vec::new())
    } else {
        writer.accept(&refs)
    };
    let ids = match stored {
        Ok(ids) => {
            // Nothing locked on a batch's path unless it had failed.
            if !ids.is_empty() && said.storing.failing() {
                said.storing.worked();
                stats.storing(None);
            }
            stats
                .accepted
                .fetch_add(ids.len() as u64, Ordering::Relaxed);
            if !ids.is_empty() {
                stats.batches.fetch_add(1, Ordering::Relaxed);
                stats
                    .largest_batch
                    .fetch_max(ids.len() as u64, Ordering::Relaxed);
            }
            Some(ids)
        }
        Err(e) => {
            said.storing.failed(&e);
            stats.storing(Some((
                format!("zeromq: messages not stored: {e}"),
                crate::clock::now_ms(),
            )));
            None
        }
    };
    // An id answered must be found by `gearshift result` at once: its file goes in place
    // first. `TRUE` gives nothing to look up: it goes out first, the files right after.
    if rules.reply == ZeromqReply::Id && ids.is_some() {
        place(writer, &mut said.placing);
    }
    for (conn, envelope, outcome) in replies {
        let text: Vec<u8> = match (&outcome, &ids) {
            (Ok(i), Some(ids)) => match rules.reply {
                ZeromqReply::True => b"TRUE".to_vec(),
                ZeromqReply::Id => ids
                    .get(*i)
                    .map(|id| id.as_bytes().to_vec())
                    .unwrap_or_default(),
            },
            (Ok(_), None) => {
                stats.rejected.fetch_add(1, Ordering::Relaxed);
                b"ERROR not stored, try again: the spool cannot take jobs now".to_vec()
            }
            (Err(why), _) => {
                stats.rejected.fetch_add(1, Ordering::Relaxed);
                format!("ERROR {why}").into_bytes()
            }
        };
        let mut frames: Vec<&[u8]> = envelope.iter().map(Vec::as_slice).collect();
        frames.push(&text);
        // A client gone just misses its answer (it resends).
        engine.answer(conn, &frames);
    }
    engine.flush();
    place(writer, &mut said.placing);
}

/// Places what was accepted (files in `new/`, or jobs handed to the lanes); a failure that
/// lasts (a full disk) is said once, not at every try.
fn place(writer: &mut BatchWriter, placing: &mut Recurring) {
    match writer.place() {
        Ok(()) => placing.worked(),
        Err(e) => placing.failed(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            function: Some("ingest".into()),
            reply: ZeromqReply::True,
            max_payload: 10,
            busy_poll: Duration::ZERO,
            served: Arc::new(RwLock::new(vec!["ingest".into(), "echo".into()])),
            jobs_dir: crate::watch::Offers::new("/nonexistent".into()),
            dead_peer: Duration::from_secs(15),
        }
    }

    fn frames(parts: &[&[u8]]) -> Vec<Vec<u8>> {
        parts.iter().map(|p| p.to_vec()).collect()
    }

    #[test]
    fn envelopes_of_req_and_dealer_clients_are_split_off() {
        // REQ: delimiter, body.
        let (env, body) = split(frames(&[b"", b"echo", b"x"]));
        assert_eq!((env, body), (frames(&[b""]), frames(&[b"echo", b"x"])));
        // DEALER without a delimiter: the body alone (an empty payload is not a delimiter).
        let (env, body) = split(frames(&[b"echo", b""]));
        assert_eq!((env, body), (vec![], frames(&[b"echo", b""])));
        // An empty message from a REQ client: delimiter and one empty frame.
        let (env, body) = split(frames(&[b"", b""]));
        assert_eq!((env, body), (frames(&[b""]), frames(&[b""])));
    }

    #[test]
    fn messages_that_are_no_jobs_get_reasons() {
        let r = rules();
        assert_eq!(
            job(frames(&[b"p"]), &r),
            Ok(("ingest".into(), b"p".to_vec()))
        );
        assert_eq!(
            job(frames(&[b"echo", b"p"]), &r),
            Ok(("echo".into(), b"p".to_vec()))
        );
        let err = |b: &[&[u8]]| job(frames(b), &r).err().unwrap_or_default();
        assert!(err(&[]).contains("empty message"));
        assert!(err(&[b"a", b"b", b"c"]).starts_with("3 frames"));
        assert!(err(&[b"nope", b"p"]).contains("unknown function \"nope\""));
        assert!(err(&[b"", b"p"]).contains("no function name"));
        assert!(err(&[b"\x1b[2J", b"p"]).contains("\\e[2J"), "escaped");
        assert!(err(&[b"echo", b"12345678901"]).contains("over max_payload_bytes"));
        let none = Rules {
            function: None,
            ..rules()
        };
        assert!(job(frames(&[b"p"]), &none).is_err_and(|e| e.contains("no [source] function")));
    }
}
