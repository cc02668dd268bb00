//! The ZeroMQ ingress: one ROUTER socket on every configured endpoint (so it serves REQ and
//! DEALER clients, many at once), read in batches; each batch is made durable in the spool with
//! one sync, and only then is each message answered: `TRUE` or its job id, or `ERROR <why>`
//! for a message that is not a job. A message received but not yet durable when the worker
//! stops or restarts is never answered, so a resending client (the lazy pirate pattern) sends
//! it again; nothing answered is ever lost.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::config::ZeromqReply;
use crate::error::{Error, Result};
use crate::kinds::Ingress as Stats;
use crate::ops::logging::Recurring;
use crate::source::spool::{BatchWriter, Feed, Spool};

use super::listen::Listener;
use super::peers::{count_peers, peers_monitor, Peers};

/// How long one poll for messages lasts at most (the stop flag is looked at in between).
const POLL_MS: i64 = 100;
/// Messages read before one sync at most.
const BATCH: usize = 256;
/// How long a reply may wait to be sent when the socket closes (a restart or a stop).
const LINGER_MS: i32 = 500;
/// How long a stop waits for the thread (its poll, the batch in hand, the linger): the control
/// thread must stay able to act on a second TERM.
const STOP_WAIT: Duration = Duration::from_millis(700);
/// Bytes of messages read before one sync at most (besides the message count).
const BATCH_BYTES: usize = 64 << 20;
/// Bytes a peer may have waiting in libzmq at most (the high-water mark counts messages).
const PEER_BYTES: i64 = 256 << 20;
/// Messages a peer may have waiting, each way, before libzmq stops reading from it.
const HWM: i32 = 1000;
/// Frames in a routing envelope at most (a REQ client's: identity and delimiter).
const MAX_ENVELOPE: usize = 32;
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
}

/// The running ingress thread.
pub struct Ingress {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ingress {
    /// Binds a ROUTER socket on `listeners` (through duplicates of their descriptors) and
    /// starts reading. With a `feed`, accepted jobs go to the lanes without a file each.
    pub fn start(
        listeners: &[Listener],
        spool: Spool,
        feed: Option<Feed>,
        rules: Rules,
        stats: Arc<Stats>,
    ) -> Result<Ingress> {
        let ctx = zmq::Context::new();
        let mut socket = router(&ctx, &rules)?;
        let monitor = peers_monitor(&ctx, &socket)?;
        let mut peers = Peers::new(stats.max_peers.load(Ordering::Relaxed), listeners)?;
        peers.doors.open(&mut socket)?;
        // libzmq is built to make its descriptors close-on-exec (`.cargo/config.toml`); a build
        // without those flags (a CXXFLAGS of the builder's own wins) would not: none may reach
        // a job process or the next image, so they are marked here too.
        crate::ops::handover::close_inherited();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = crate::ops::signals::spawn_essential("zeromq", move || {
            let mut writer = spool.batch_writer();
            if let Some(feed) = feed {
                writer.feed(feed);
            }
            serve(
                &mut socket,
                &monitor,
                &mut writer,
                &rules,
                &stats,
                &flag,
                &mut peers,
            );
            drop(writer);
            // Answers already queued get up to LINGER_MS to leave; then the context ends.
            drop(socket);
            drop(monitor);
            stats.peers.store(0, Ordering::Relaxed);
            drop(ctx);
        })
        .map_err(|e| Error::io("spawning the ZeroMQ ingress thread", e))?;
        Ok(Ingress {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops reading, answers the batch in hand, closes the socket (bounded by its linger) and
    /// ends the context. Returns once that is done.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let deadline = std::time::Instant::now() + STOP_WAIT;
            while !t.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
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

fn router(ctx: &zmq::Context, rules: &Rules) -> Result<zmq::Socket> {
    let zerr = |what: &str, e: zmq::Error| Error::Msg(format!("zeromq: {what}: {e}"));
    let socket = ctx
        .socket(zmq::ROUTER)
        .map_err(|e| zerr("creating a ROUTER socket", e))?;
    // Room for a message a little over the limit, so it gets an error reply; one far over it
    // is cut by libzmq, which drops that peer's connection.
    let max = rules.max_payload as i64 + 64 * 1024;
    // At most HWM messages, and at most about PEER_BYTES of the largest, wait per peer.
    let hwm = (PEER_BYTES / max).clamp(1, i64::from(HWM)) as i32;
    socket
        .set_maxmsgsize(max)
        .and_then(|()| socket.set_rcvhwm(hwm))
        .and_then(|()| socket.set_sndhwm(HWM))
        .and_then(|()| socket.set_linger(LINGER_MS))
        .map_err(|e| zerr("setting socket options", e))?;
    Ok(socket)
}

fn serve(
    socket: &mut zmq::Socket,
    monitor: &zmq::Socket,
    writer: &mut BatchWriter,
    rules: &Rules,
    stats: &Stats,
    stop: &AtomicBool,
    peers: &mut Peers,
) {
    let mut spin = crate::source::spin::Spin::new(rules.busy_poll);
    // Batches of one message in a row: messages coming one at a time mean clients wait on our
    // answers (a latency a brief busy-poll takes out); several at once mean they keep the
    // CPUs busy, which a spinning ingress would take from them (measured: 8 REQ clients
    // 10-25% slower when it spun after every single message).
    let mut singles = 0u32;
    let mut placing = Recurring::new(
        "zeromq: accepted jobs not in place yet (their journal records keep them), trying again",
        "zeromq: accepted jobs in place again",
    );
    while !stop.load(Ordering::Acquire) {
        // Files of jobs already answered: written while no message waits (or retried).
        if writer.pending() {
            place(writer, &mut placing);
        }
        let timeout = peers
            .doors
            .tick(socket)
            .map_or(POLL_MS, |d| (d.as_millis() as i64).clamp(1, POLL_MS));
        let mut items = [
            socket.as_poll_item(zmq::POLLIN),
            monitor.as_poll_item(zmq::POLLIN),
        ];
        let _waiting = crate::source::spin::Waiting::enter();
        let spun = singles >= SINGLES_TO_SPIN
            && spin.wait_for(|| zmq::poll(&mut items, 0).is_ok_and(|n| n > 0));
        let (messages, events) = match if spun {
            Ok(1)
        } else {
            zmq::poll(&mut items, timeout)
        } {
            Ok(0) => continue,
            Ok(_) => (items[0].is_readable(), items[1].is_readable()),
            Err(zmq::Error::EINTR) => continue,
            Err(e) => {
                log::error!("zeromq: polling: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if events {
            count_peers(monitor, socket, stats, peers);
        }
        if !messages {
            continue;
        }
        let mut batch = Vec::new();
        let mut bytes = 0;
        while batch.len() < BATCH && bytes < BATCH_BYTES {
            match socket.recv_multipart(zmq::DONTWAIT) {
                Ok(frames) => {
                    bytes += frames.iter().map(Vec::len).sum::<usize>();
                    batch.push(frames);
                }
                Err(zmq::Error::EAGAIN) | Err(zmq::Error::EINTR) => break,
                Err(e) => {
                    log::warn!("zeromq: receiving: {e}");
                    break;
                }
            }
        }
        singles = if batch.len() == 1 {
            singles.saturating_add(1)
        } else {
            0
        };
        if !batch.is_empty() {
            answer(socket, writer, &mut placing, rules, stats, batch);
        }
    }
}

/// A message split into the routing envelope (sent back with the answer) and the body.
fn split(mut frames: Vec<Vec<u8>>) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    // A REQ client's envelope ends with an empty delimiter frame; a DEALER may send none.
    let delimiter = frames
        .iter()
        .take(MAX_ENVELOPE)
        .position(|f| f.is_empty())
        .filter(|&i| i > 0 && i + 1 < frames.len());
    let at = delimiter.map_or(1.min(frames.len()), |i| i + 1);
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

/// Makes the batch's jobs durable with one sync, then answers every message of it.
fn answer(
    socket: &zmq::Socket,
    writer: &mut BatchWriter,
    placing: &mut Recurring,
    rules: &Rules,
    stats: &Stats,
    batch: Vec<Vec<Vec<u8>>>,
) {
    // Each message's envelope, and the index of its job or why it is none.
    type Reply = (Vec<Vec<u8>>, std::result::Result<usize, String>);
    let mut replies: Vec<Reply> = Vec::new();
    let mut jobs: Vec<(String, Vec<u8>)> = Vec::new();
    for frames in batch {
        let (envelope, body) = split(frames);
        match job(body, rules) {
            Ok(j) => {
                jobs.push(j);
                replies.push((envelope, Ok(jobs.len() - 1)));
            }
            Err(why) => replies.push((envelope, Err(why))),
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
            log::error!("zeromq: {} job(s) not stored: {e}", refs.len());
            None
        }
    };
    // An id answered must be found by `gearshift result` at once: its file goes in place
    // first. `TRUE` gives nothing to look up: it goes out first, the files right after.
    if rules.reply == ZeromqReply::Id && ids.is_some() {
        place(writer, placing);
    }
    for (mut envelope, outcome) in replies {
        let text: Vec<u8> = match (&outcome, &ids) {
            (Ok(i), Some(ids)) => match rules.reply {
                ZeromqReply::True => b"TRUE".to_vec(),
                ZeromqReply::Id => ids
                    .get(*i)
                    .map(|id| id.as_bytes().to_vec())
                    .unwrap_or_default(),
            },
            (Ok(_), None) => {
                b"ERROR not stored, try again: the spool cannot take jobs now".to_vec()
            }
            (Err(why), _) => {
                stats.rejected.fetch_add(1, Ordering::Relaxed);
                format!("ERROR {why}").into_bytes()
            }
        };
        envelope.push(text);
        // A peer gone, or over its high-water mark, just misses its answer (it resends).
        if let Err(e) = socket.send_multipart(envelope, zmq::DONTWAIT) {
            log::debug!("zeromq: answering: {e}");
        }
    }
    place(writer, placing);
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
        }
    }

    fn frames(parts: &[&[u8]]) -> Vec<Vec<u8>> {
        parts.iter().map(|p| p.to_vec()).collect()
    }

    #[test]
    fn envelopes_of_req_and_dealer_clients_are_split_off() {
        // REQ: identity, delimiter, body.
        let (env, body) = split(frames(&[b"id", b"", b"echo", b"x"]));
        assert_eq!((env.len(), body), (2, frames(&[b"echo", b"x"])));
        // DEALER without a delimiter: identity, body (an empty payload is not a delimiter).
        let (env, body) = split(frames(&[b"id", b"echo", b""]));
        assert_eq!((env, body), (frames(&[b"id"]), frames(&[b"echo", b""])));
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
