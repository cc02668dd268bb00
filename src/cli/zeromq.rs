//! `gearshift submit` to a ZeroMQ source: a REQ client that resends with a timeout and a retry
//! limit (the lazy pirate pattern), as a client must: a message the worker received but had
//! not made durable when it restarted is never answered.

use std::time::Duration;

use crate::config::{Endpoint, ZeromqConfig, ZeromqReply};
use crate::error::{Error, Result};

use super::exit;
use super::SubmitArgs;

/// Tries per message before giving up.
const TRIES: u32 = 3;
/// How long to wait for each answer unless `--timeout` says.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a client on this host reaches the source.
fn connect_to(ep: &Endpoint) -> String {
    match ep {
        Endpoint::Tcp { host, port } if host == "*" || host == "0.0.0.0" => {
            format!("tcp://127.0.0.1:{port}")
        }
        Endpoint::Tcp { host, port } if host == "::" => format!("tcp://[::1]:{port}"),
        other => other.to_string(),
    }
}

/// Sends one message and returns the answer; None if none came in `TRIES` tries.
fn request(
    ctx: &zmq::Context,
    to: &str,
    frames: &[&[u8]],
    wait: Duration,
) -> Result<Option<Vec<u8>>> {
    let zerr = |e: zmq::Error| Error::Peer(format!("zeromq {to}: {e}"));
    for _ in 0..TRIES {
        let socket = ctx.socket(zmq::REQ).map_err(zerr)?;
        socket.set_linger(0).map_err(zerr)?;
        socket.connect(to).map_err(zerr)?;
        socket.send_multipart(frames, 0).map_err(zerr)?;
        let ms = i64::try_from(wait.as_millis()).unwrap_or(i64::MAX);
        if socket.poll(zmq::POLLIN, ms).map_err(zerr)? > 0 {
            let mut answer = socket.recv_multipart(0).map_err(zerr)?;
            return Ok(answer.pop());
        }
        // No answer: this socket is stuck waiting; a new one resends.
    }
    Ok(None)
}

/// What `submit` got: the last answer (`TRUE` or an id, escaped), or the exit code to end with.
pub(super) enum Sent {
    Answer(String),
    Exit(u8),
}

/// Sends the message `args.count` times; the caller prints the answer or waits for the job.
pub(super) fn send(cfg: &ZeromqConfig, args: &SubmitArgs, payload: &[u8]) -> Result<Sent> {
    let Some(ep) = cfg.bind.first() else {
        return Err(Error::Msg("the zeromq source binds nothing".into()));
    };
    if args.wait && cfg.reply == ZeromqReply::True {
        eprintln!(
            "gearshift: --wait needs the job id, and this source answers TRUE: set [source] reply = \"id\""
        );
        return Ok(Sent::Exit(exit::USAGE));
    }
    let to = connect_to(ep);
    let wait = args.timeout.unwrap_or(ANSWER_TIMEOUT);
    let ctx = zmq::Context::new();
    let frames: [&[u8]; 2] = [args.function.as_bytes(), payload];
    let mut last = Vec::new();
    for _ in 0..args.count {
        match request(&ctx, &to, &frames, wait)? {
            Some(answer) if answer.starts_with(b"ERROR") => {
                eprintln!(
                    "gearshift: refused: {}",
                    crate::text::escape(&String::from_utf8_lossy(&answer))
                );
                return Ok(Sent::Exit(exit::FAILED));
            }
            Some(answer) => last = answer,
            None => {
                eprintln!(
                    "gearshift: no answer from {to} in {TRIES} tries of {} each: is the worker running?",
                    crate::clock::human_secs(wait.as_secs().max(1))
                );
                return Ok(Sent::Exit(exit::NOT_RUNNING));
            }
        }
    }
    if args.count != 1 {
        println!("submitted {} jobs to {to}", args.count);
        return Ok(Sent::Exit(exit::OK));
    }
    Ok(Sent::Answer(
        crate::text::escape(&String::from_utf8_lossy(&last)).to_string(),
    ))
}
