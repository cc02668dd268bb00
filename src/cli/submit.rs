//! `submit` and `result`: queueing a job (spool or Gearman) and reading its outcome.

use std::io::{IsTerminal, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::config::{Config, Source as SourceConfig};
use crate::error::{Error, Result};
use crate::ops::pidfile::{self, Probe};
use crate::source::spool::{Lookup, Outcome, Spool};

use super::exit;
use super::SubmitArgs;

fn spool(config: &Config) -> Result<Spool> {
    match config.source.spool() {
        Some(s) => Spool::from_config(s),
        None => Err(Error::Msg(
            "results are stored by the spool only; with gearman, `submit` prints the result".into(),
        )),
    }
}

pub(super) fn submit(path: &Path, args: SubmitArgs) -> Result<u8> {
    let config = Config::load(path)?;
    // A bad argument, for every source whose workers are gearshift's (a gearmand may have
    // workers of its own that serve other names).
    if !matches!(config.source, SourceConfig::Gearman(_)) {
        if let Err(why) = crate::config::check_function_name(&args.function) {
            eprintln!("gearshift: {}", crate::text::escape(&why));
            return Ok(exit::USAGE);
        }
    }
    let max = config.worker.max_payload_bytes;
    // Standard input is read up to the limit only: an endless or huge input is refused at
    // once, not read into memory until it ends.
    let payload = match &args.payload {
        Some(p) => Some(p.as_bytes().to_vec()).filter(|p| p.len() <= max),
        None => {
            let stdin = std::io::stdin().lock();
            if stdin.is_terminal() {
                // Else it looks like a hang: the payload forgotten, or to be typed.
                eprintln!("gearshift: the payload is read from the terminal: type it, then Ctrl-D on a line of its own (or give it as an argument)");
            }
            crate::ops::safefs::read_bounded(stdin, max as u64)
                .map_err(|e| Error::io("reading payload from stdin", e))?
        }
    };
    let Some(payload) = payload else {
        match &args.payload {
            Some(p) => eprintln!(
                "gearshift: refused: the payload is {} bytes, over max_payload_bytes ({max})",
                p.len()
            ),
            None => eprintln!(
                "gearshift: refused: the payload on standard input is over max_payload_bytes ({max}); nothing more of it was read"
            ),
        }
        return Ok(exit::FAILED);
    };
    match &config.source {
        SourceConfig::Spool(s) => {
            // Looked up only by root, the one whose files need an owner; a worker user that
            // cannot be looked up: the worker cannot start either.
            let root = nix::unistd::geteuid().is_root();
            let user = root
                .then(|| crate::ops::privilege::target(&config).ok().flatten())
                .flatten();
            let spool = Spool::for_submit(s, user.as_ref())?;
            let (pidfile, socket) = (config.pidfile(), config.status_socket());
            submit_spool(&spool, &args, &payload, (&pidfile, &socket))
        }
        SourceConfig::Gearman(g) => super::gearman::submit(g, &args, &payload),
        SourceConfig::Zeromq(z) => {
            let (pidfile, socket) = (config.pidfile(), config.status_socket());
            submit_zeromq(z, &args, &payload, (&pidfile, &socket))
        }
        SourceConfig::Amqp(a) => submit_amqp(a, &args, &payload),
    }
}

/// To an AMQP source: published (persistent, confirmed); with `--wait`, as an RPC whose answer
/// is printed.
fn submit_amqp(cfg: &crate::config::AmqpConfig, args: &SubmitArgs, payload: &[u8]) -> Result<u8> {
    use crate::source::amqp::client;
    if !args.wait {
        let started = Instant::now();
        client::submit(cfg, &args.function, payload, args.count)?;
        if args.count == 1 {
            println!("published");
        } else {
            let secs = started.elapsed().as_secs_f64();
            println!(
                "published {} jobs in {secs:.3}s ({:.0} jobs/s)",
                args.count,
                args.count as f64 / secs.max(1e-9)
            );
        }
        return Ok(exit::OK);
    }
    let wait = args.timeout.unwrap_or(Duration::from_secs(30));
    match client::call(cfg, &args.function, payload, wait)? {
        Some(answer) => {
            print_bytes(&answer.body, answer.done)?;
            Ok(if answer.done { exit::OK } else { exit::FAILED })
        }
        None => {
            let wait = crate::clock::human(wait);
            eprintln!("gearshift: no answer within {wait} (the job stays queued or running)");
            Ok(exit::NOT_YET)
        }
    }
}

fn submit_spool(
    spool: &Spool,
    args: &SubmitArgs,
    payload: &[u8],
    worker: (&Path, &Path),
) -> Result<u8> {
    let function = &args.function;
    if !args.wait {
        say_if_unserved(function, worker);
    }
    if args.count != 1 {
        // Durable in batches: one sync per batch (see the spool's journal).
        const BATCH: u64 = 512;
        let started = Instant::now();
        let mut left = args.count;
        while left > 0 {
            let n = left.min(BATCH);
            let jobs = vec![(function.as_str(), payload); n as usize];
            spool.submit_batch(&jobs)?;
            left -= n;
        }
        let secs = started.elapsed().as_secs_f64();
        println!(
            "submitted {} jobs in {secs:.3}s ({:.0} jobs/s)",
            args.count,
            args.count as f64 / secs.max(1e-9)
        );
        return Ok(0);
    }
    let id = spool.submit(function, payload)?;
    if !args.wait {
        println!("{id}");
        return Ok(0);
    }
    eprintln!("{id}");
    match wait_for_result(spool, &id, args.timeout, worker)? {
        Some(lookup) => print_lookup(&id, lookup),
        None => Ok(exit::NOT_RUNNING),
    }
}

/// At a terminal, a job for a function the running worker does not have (a typo, most often)
/// is said at once, with the functions it has: the job is queued all the same (a reload may
/// bring the function) and fails when it is claimed. Only at a terminal: a script is not slowed
/// by the question, and a worker stopped by SIGSTOP is not asked.
fn say_if_unserved(function: &str, (pidfile, socket): (&Path, &Path)) {
    if !std::io::stderr().is_terminal() {
        return;
    }
    let Ok(Probe::Running(Some(pid))) = pidfile::probe(pidfile) else {
        return;
    };
    if super::locate::stopped(pid).is_some() {
        return;
    }
    let Ok(s) = crate::status::query(socket, Some(pid)) else {
        return;
    };
    if !s.functions.iter().any(|f| f == function) {
        eprintln!(
            "gearshift: warning: the running worker has no function \"{}\" (it has: {}): the job fails when it is claimed, unless a reload brings the function first",
            crate::text::escape(function),
            crate::text::escape(&crate::text::some_of(&s.functions, 20))
        );
    }
}

/// To a ZeroMQ source: the answer printed, or (`--wait`, `reply = "id"`) the job's result.
fn submit_zeromq(
    cfg: &crate::config::ZeromqConfig,
    args: &SubmitArgs,
    payload: &[u8],
    worker: (&Path, &Path),
) -> Result<u8> {
    // A worker stopped by SIGSTOP answers nothing, but the kernel takes each try: sent three
    // times, the message was run three times once the worker was continued. Asked before the
    // first message and before every resend (a worker stopped after the first try).
    let held = || match pidfile::probe(worker.0) {
        Ok(Probe::Running(Some(pid))) => super::locate::stopped(pid),
        _ => None,
    };
    let answer = match super::zeromq::send(cfg, args, payload, &held)? {
        super::zeromq::Sent::Exit(code) => return Ok(code),
        super::zeromq::Sent::Answer(a) => a,
    };
    if !args.wait {
        println!("{answer}");
        return Ok(exit::OK);
    }
    eprintln!("{answer}");
    match wait_for_result(
        &Spool::from_config(&cfg.spool)?,
        &answer,
        args.timeout,
        worker,
    )? {
        Some(lookup) => print_lookup(&answer, lookup),
        None => Ok(exit::NOT_RUNNING),
    }
}

/// How long `submit --wait` waits for a worker to appear before saying there is none.
const NO_WORKER_PATIENCE: Duration = Duration::from_secs(2);

/// Whether the worker has been stopping (a TERM taken, claiming nothing new) for
/// [`NO_WORKER_PATIENCE`], asked of its status socket at most once a second.
#[derive(Default)]
struct Stopping {
    since: Option<Instant>,
    asked: Option<Instant>,
}

impl Stopping {
    fn for_a_while(&mut self, socket: &Path, pid: i32) -> bool {
        if self
            .asked
            .is_some_and(|a| a.elapsed() < Duration::from_secs(1))
        {
            return self
                .since
                .is_some_and(|s| s.elapsed() >= NO_WORKER_PATIENCE);
        }
        self.asked = Some(Instant::now());
        match crate::status::query(socket, Some(pid)) {
            Ok(s) if s.state == "stopping" => {
                let since = *self.since.get_or_insert_with(Instant::now);
                since.elapsed() >= NO_WORKER_PATIENCE
            }
            _ => {
                self.since = None;
                false
            }
        }
    }
}

/// Waits for job `id`; None (having said so) when no worker has been running for a moment.
fn wait_for_result(
    spool: &Spool,
    id: &str,
    timeout: Option<Duration>,
    (pidfile, socket): (&Path, &Path),
) -> Result<Option<Lookup>> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut absent_since: Option<Instant> = None;
    let (mut stopped_since, mut said_stopped): (Option<Instant>, bool) = (None, false);
    let mut stopping = Stopping::default();
    let mut waiting = spool.waiting(id);
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let slice = left.map_or(Duration::from_millis(500), |l| {
            l.min(Duration::from_millis(500))
        });
        let lookup = waiting.wait(Some(slice))?;
        // At `--timeout`, no worker running is said as such, however short the timeout.
        let timed_out = deadline.is_some_and(|d| Instant::now() >= d);
        let probed = pidfile::probe(pidfile).ok();
        if matches!(lookup, Lookup::Finished(_) | Lookup::Unknown)
            || (timed_out && probed != Some(Probe::NotRunning))
        {
            return Ok(Some(lookup));
        }
        // A worker stopped by SIGSTOP runs nothing until continued: said once, after 2 s.
        match probed.as_ref().and_then(|p| match p {
            Probe::Running(Some(pid)) => super::locate::stopped(*pid),
            _ => None,
        }) {
            Some(why) if !said_stopped => {
                let since = *stopped_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= NO_WORKER_PATIENCE {
                    eprintln!("job {id} is queued, but {why}");
                    said_stopped = true;
                }
            }
            Some(_) => {}
            None => stopped_since = None,
        }
        // Asked only of a worker that can answer (a stopped one is said above).
        if let (Some(Probe::Running(Some(pid))), None) = (&probed, stopped_since) {
            let pid = *pid;
            if stopping.for_a_while(socket, pid) {
                eprintln!(
                    "job {id} is queued, but the worker (pid {pid}) is stopping: it claims nothing new, and the job runs when a worker starts (gearshift start)"
                );
                return Ok(None);
            }
        }
        if probed == Some(Probe::NotRunning) {
            let since = *absent_since.get_or_insert_with(Instant::now);
            // A supervisor about to start the worker again (after a crash, up to 30 s): the
            // wait goes on (it gave up, and said to start a worker, which `start` refuses then).
            let coming = super::locate::supervisor_beside(pidfile).is_some();
            if coming && !timed_out {
                absent_since = None;
                continue;
            }
            if since.elapsed() >= NO_WORKER_PATIENCE || timed_out {
                match coming {
                    true => eprintln!("job {id} is queued; no worker runs yet: its supervisor is about to start one again (after a crash)"),
                    false => eprintln!(
                        "job {id} is queued, but no worker is running (start one: gearshift start)"
                    ),
                }
                return Ok(None);
            }
        } else {
            absent_since = None;
        }
    }
}

pub(super) fn result(path: &Path, id: &str) -> Result<u8> {
    if !crate::source::spool::valid_id(id) {
        eprintln!(
            "\"{}\" is no job id (an id is what submit prints: hex digits and dashes)",
            crate::text::escape(&crate::text::cut(id, 160))
        );
        return Ok(exit::USAGE);
    }
    let config = Config::load(path)?;
    let lookup = spool(&config)?.lookup(id)?;
    if matches!(lookup, Lookup::Running)
        && pidfile::probe(&config.pidfile()).ok() == Some(Probe::NotRunning)
    {
        eprintln!(
            "job {id}: interrupted: the worker stopped while it ran; it runs again (attempt counted) when a worker starts"
        );
        return Ok(exit::NOT_YET);
    }
    if matches!(lookup, Lookup::Unknown) {
        let retain = config
            .source
            .spool()
            .map_or(0, |s| s.retain_results.as_secs());
        eprintln!(
            "job {}: unknown id: never submitted to this spool, or its result expired (results are kept for retain_results = {}; the worker logs what it prunes)",
            crate::text::escape(id),
            crate::clock::human_secs(retain)
        );
        return Ok(exit::USAGE);
    }
    print_lookup(id, lookup)
}

/// A result on stdout: raw bytes for a pipe or a file; escaped for a person at a terminal. A
/// failure's text goes to stderr, escaped.
fn print_bytes(bytes: &[u8], done: bool) -> Result<()> {
    if !done {
        eprintln!("job failed: {}", crate::text::escape_bytes(bytes));
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    let person = out.is_terminal();
    out.write_all(&crate::text::for_stdout(bytes, person, true))
        .and_then(|()| out.flush())
        .map_err(|e| Error::io("writing result", e))
}

fn print_lookup(id: &str, lookup: Lookup) -> Result<u8> {
    match lookup {
        Lookup::Finished(r) if r.outcome == Outcome::Done => {
            print_bytes(&r.result, true)?;
            Ok(0)
        }
        Lookup::Finished(r) => {
            eprintln!(
                "job {id} failed after {} attempt(s): {}",
                r.attempts,
                crate::text::escape(&r.error.unwrap_or_default())
            );
            Ok(exit::FAILED)
        }
        Lookup::Unknown => {
            eprintln!("job {id}: unknown id");
            Ok(exit::USAGE)
        }
        Lookup::Queued => {
            eprintln!("job {id}: queued, not finished yet");
            Ok(exit::NOT_YET)
        }
        Lookup::Running => {
            eprintln!("job {id}: running, not finished yet");
            Ok(exit::NOT_YET)
        }
    }
}
