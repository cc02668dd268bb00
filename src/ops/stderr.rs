//! Log lines to stderr, never waited for. A stderr nobody reads (a pipe to a consumer that
//! stalled, `run 2>&1 | less` left unread, a terminal paused with Ctrl-S, a journal that does
//! not keep up) made every thread that logs wait on it, so the lanes stopped serving once it
//! was full. Now each piece of a line is written only when stderr can take it at once (poll
//! with no timeout); what it cannot take is counted, and said (and shown by `status`) once it
//! takes lines again.

use std::io;
use std::sync::Mutex;

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

/// Lines stderr could not take since it last could.
struct Lost {
    since_ms: u64,
    why: String,
    lines: u64,
}

struct State {
    lost: Option<Lost>,
    /// The last write ended inside a line: what comes next starts on a line of its own.
    torn: bool,
}

static STATE: Mutex<State> = Mutex::new(State {
    lost: None,
    torn: false,
});

/// At most this much per write: a pipe, socket or terminal that polls writable takes this much
/// without waiting (a pipe has at least a page free then).
const PIECE: usize = 4096;

/// Writes `line` as far as stderr takes it now, after the note of what it lost before, if any
/// (`note` makes a log line of that message). A line it cannot take is counted, never waited for.
/// Returns the line's length: for the caller a line is either on stderr or counted.
pub fn write_line(line: &[u8], note: impl FnOnce(&str) -> String) -> usize {
    let mut st = STATE.lock().unwrap_or_else(|p| p.into_inner());
    // The note and the line in one write (a pipe that polls writable takes one more piece).
    let mut text = Vec::new();
    if let Some(l) = &st.lost {
        if st.torn {
            text.push(b'\n');
        }
        let lost = format!(
            "{} log lines were lost: stderr could not take them from {} ({})",
            l.lines,
            crate::clock::rfc3339_ms(l.since_ms),
            l.why
        );
        text.extend_from_slice(note(&lost).as_bytes());
    }
    text.extend_from_slice(line);
    match put(&mut st, &text) {
        Ok(()) => st.lost = None,
        Err(why) => {
            let l = st.lost.get_or_insert_with(|| Lost {
                since_ms: crate::clock::now_ms(),
                why,
                lines: 0,
            });
            l.lines += 1;
        }
    }
    line.len()
}

/// How many lines stderr could not take, since when and why, while it lasts (for `status`).
pub fn failing() -> Option<String> {
    let st = STATE.lock().ok()?;
    let l = st.lost.as_ref()?;
    Some(format!(
        "{} log lines could not be written to stderr since {} ({}): they are lost",
        l.lines,
        crate::clock::rfc3339_ms(l.since_ms),
        l.why
    ))
}

/// Writes all of `buf` in pieces, each once stderr can take it at once; why not, if it stopped
/// short (`st.torn` then says whether it stopped inside).
fn put(st: &mut State, buf: &[u8]) -> Result<(), String> {
    let stderr = io::stderr();
    let mut done = 0;
    let mut stop = |done: usize, why: String| {
        if done > 0 {
            st.torn = true;
        }
        Err(why)
    };
    while done < buf.len() {
        let mut fds = [PollFd::new(
            std::os::fd::AsFd::as_fd(&stderr),
            PollFlags::POLLOUT,
        )];
        match poll(&mut fds, PollTimeout::ZERO) {
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return stop(done, format!("polling it: {e}")),
            Ok(_) => {}
        }
        let ready = fds[0].revents().unwrap_or(PollFlags::empty());
        if !ready.contains(PollFlags::POLLOUT) {
            let closed =
                ready.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL);
            return stop(
                done,
                if closed {
                    "it is closed"
                } else {
                    "nobody reads it"
                }
                .to_string(),
            );
        }
        let end = (done + PIECE).min(buf.len());
        match nix::unistd::write(&stderr, &buf[done..end]) {
            Ok(n) => done += n,
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return stop(done, e.to_string()),
        }
    }
    st.torn = !buf.ends_with(b"\n");
    Ok(())
}
