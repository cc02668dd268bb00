//! The command line. [`main`] is the whole program: the stock binary calls it with the
//! built-in functions, a user's binary with its own.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::config::{parse_duration, Config, GearmanConfig, Source as SourceConfig};
use crate::error::{Error, Result};
use crate::jobs::functions::Functions;
use crate::ops::pidfile::{self, Probe};
use crate::source::spool::{Lookup, Outcome, Spool};
use crate::worker::{self, Plan};

/// LSB exit code: program is not running.
mod top;

const NOT_RUNNING: u8 = 3;
/// LSB exit code: status unknown.
const UNKNOWN: u8 = 4;

#[derive(Parser)]
#[command(name = "gearshift", version = crate::VERSION, about = "A job worker that restarts itself in place, between jobs")]
struct Cli {
    /// The config file.
    #[arg(
        short = 'c',
        long = "config",
        global = true,
        default_value = "config.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct SubmitArgs {
    /// Spool: wait for the job to finish and print its result (exit 1 if it failed).
    #[arg(long)]
    wait: bool,
    /// Spool, with --wait; gearman, foreground: give up after this long (exit 3), e.g. "30s".
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Gearman: submit as a background job and print its handle.
    #[arg(long)]
    background: bool,
    /// Gearman: job priority.
    #[arg(long, value_enum, default_value = "normal")]
    priority: PriorityArg,
    /// Gearman: the unique id (jobs with the same unique id are coalesced by the server).
    #[arg(long, default_value = "")]
    unique: String,
    /// Submit this many copies (load mode, pipelined); prints a summary, not the ids.
    #[arg(long, default_value_t = 1, conflicts_with = "wait")]
    count: u64,
    /// Gearman load mode: this many client connections.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// The function to run.
    function: String,
    /// The payload; read from standard input when omitted.
    payload: Option<OsString>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PriorityArg {
    Low,
    Normal,
    High,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker in the foreground (for a terminal, systemd or another supervisor).
    /// Exit codes: 0 after a graceful stop, 1 on a start-up error or a forced stop.
    Run {
        /// Log to this file instead of stderr (what a daemon from `start` re-execs with).
        #[arg(long)]
        log_file: Option<PathBuf>,
    },
    /// Start the worker as a daemon; returns once it serves, or prints its error.
    /// Exit codes: 0 started, 1 failed or already running.
    Start {
        /// Keep a supervisor process that restarts the worker when it dies abnormally.
        #[arg(long)]
        supervise: bool,
        /// With --supervise: give up after this many crashes within a minute.
        #[arg(long, default_value_t = 5)]
        max_restarts: usize,
    },
    /// Stop (if running), then start (with its supervisor, if it had one).
    /// Exit codes: as `start`; 1 if the stop timed out.
    Restart {
        /// Give up waiting for the stop after this long.
        #[arg(long, value_parser = parse_duration, default_value = "10m")]
        timeout: Duration,
    },
    /// Submit a job. Spool: prints its id (with --wait, its result). Gearman: runs it in the
    /// foreground and prints its result (streaming WORK_DATA), unless --background.
    /// Exit codes: 0 submitted (or done, when waiting), 1 failed, 3 not finished within
    /// --timeout, or no worker is running (spool --wait).
    Submit(SubmitArgs),
    /// Print a job's result.
    /// Exit codes: 0 done, 1 failed, 2 unknown id, 3 not finished yet (queued, running, or
    /// interrupted and waiting for a worker).
    Result {
        /// The id printed by `submit`.
        job_id: String,
    },
    /// Is the worker running, and how? Works even while config.toml is invalid.
    /// Exit codes: 0 running, 3 not running, 4 unknown.
    Status {
        /// Print the full status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the worker's metrics in the Prometheus text format, through its status socket
    /// (for node_exporter's textfile collector or a quick look).
    /// Exit codes: 0 printed, 3 not running, 4 unknown.
    Metrics,
    /// A live view of the worker: lanes and what each runs, per-function rate, failures and
    /// latency, restarts, servers; refreshed every second. `q` quits.
    Top {
        /// Refresh this often.
        #[arg(long, value_parser = parse_duration, default_value = "1s")]
        interval: Duration,
    },
    /// Ask the worker to restart in place (SIGHUP) and wait until it has, or has refused.
    /// Exit codes: 0 reloaded, 1 refused (the reason is printed), 3 not running.
    Reload {
        /// Give up waiting after this long.
        #[arg(long, value_parser = parse_duration, default_value = "10m")]
        timeout: Duration,
    },
    /// Stop the worker gracefully (SIGTERM): running jobs finish first.
    /// Exit codes: 0 stopped or not running, 1 still running after the timeout.
    Stop {
        /// Give up waiting after this long.
        #[arg(long, value_parser = parse_duration, default_value = "10m")]
        timeout: Duration,
        /// After the timeout, SIGKILL the worker (its running jobs will run again).
        #[arg(long)]
        force: bool,
    },
    /// Validate the config and jobs_dir, like `nginx -t`.
    /// Exit codes: 0 valid, 1 invalid.
    Check {
        /// The config file alone (syntax, types, ranges), not the user, directories and
        /// executables it names: for linting a config on a build machine.
        #[arg(long)]
        config_only: bool,
    },
}

/// Parses the command line, runs the command, and maps the outcome to an exit code.
pub fn main(functions: Functions) -> ExitCode {
    main_as("gearshift", crate::VERSION, functions)
}

/// [`main`] for a user's own binary: `name` and `version` are what `--version`, `status` and
/// the log report (e.g. `main_as("mailer", env!("CARGO_PKG_VERSION"), functions)`).
pub fn main_as(name: &'static str, version: &'static str, functions: Functions) -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    crate::set_identity(name, version);
    let matches = Cli::command().name(name).version(version).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    crate::ops::logging::init(log::LevelFilter::Info);
    crate::ops::logging::install_panic_hook();
    match dispatch(cli, functions) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            // A generation that fails to start writes to the log file, not only to a stderr
            // nobody reads. In JSON mode, the error is a log line (to the file, or to stderr)
            // and plain text only for a person at a terminal.
            use std::io::IsTerminal;
            let json = crate::ops::logging::is_json();
            if crate::ops::logging::has_file() || json {
                log::error!("{e}");
                log::logger().flush();
            }
            if !json || (crate::ops::logging::has_file() && std::io::stderr().is_terminal()) {
                eprintln!("gearshift: {e}");
            }
            ExitCode::from(if matches!(e, Error::NotRunning | Error::TimedOut(_)) {
                NOT_RUNNING
            } else {
                1
            })
        }
    }
}

fn dispatch(cli: Cli, functions: Functions) -> Result<u8> {
    let path = &cli.config;
    if !matches!(
        cli.command,
        Command::Run { .. } | Command::Start { .. } | Command::Restart { .. }
    ) {
        crate::ops::signals::default_sigpipe();
    }
    match cli.command {
        Command::Run { log_file } => {
            let opts = worker::RunOptions {
                log_file,
                ..Default::default()
            };
            worker::run_with(path, functions, opts).map(|code| code as u8)
        }
        Command::Start {
            supervise,
            max_restarts,
        } => crate::ops::daemon::start(path, functions, supervise.then_some(max_restarts)),
        Command::Restart { timeout } => {
            // A worker started with --supervise is started again with its supervisor.
            let supervised = running(path).ok().and_then(|(pid, socket, _)| {
                crate::status::query_patiently(&socket, Some(pid), Duration::from_secs(2))
                    .ok()
                    .and_then(|s| s.supervisor.map(|sv| sv.max_restarts as u64))
            });
            stop(path, timeout, false)?;
            crate::ops::daemon::start(path, functions, supervised.map(|m| m as usize))
        }
        Command::Submit(args) => submit(path, args),
        Command::Result { job_id } => result(path, &job_id),
        Command::Status { json } => status(path, json),
        Command::Metrics => metrics(path),
        Command::Top { interval } => top::run(path, interval),
        Command::Reload { timeout } => reload(path, timeout),
        Command::Stop { timeout, force } => stop(path, timeout, force),
        Command::Check { config_only: true } => {
            let config = Config::load(path)?;
            println!("{}: ok (sha256 {})", config.path.display(), config.sha256);
            Ok(0)
        }
        Command::Check { config_only: false } => check(path, &functions),
    }
}

fn spool(config: &Config) -> Result<Spool> {
    match &config.source {
        SourceConfig::Spool(s) => Spool::from_config(s),
        SourceConfig::Gearman(_) => Err(Error::Msg(
            "results are stored by the spool only; with gearman, `submit` prints the result".into(),
        )),
    }
}

fn submit(path: &Path, args: SubmitArgs) -> Result<u8> {
    let config = Config::load(path)?;
    let payload = match &args.payload {
        Some(p) => p.as_bytes().to_vec(),
        None => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .map_err(|e| Error::io("reading payload from stdin", e))?;
            buf
        }
    };
    if payload.len() > config.worker.max_payload_bytes {
        return Err(Error::Msg(format!(
            "payload is {} bytes, over max_payload_bytes ({})",
            payload.len(),
            config.worker.max_payload_bytes
        )));
    }
    match &config.source {
        SourceConfig::Spool(s) => {
            submit_spool(&Spool::from_config(s)?, &args, &payload, &config.pidfile())
        }
        SourceConfig::Gearman(g) => submit_gearman(g, &args, &payload),
    }
}

fn submit_spool(spool: &Spool, args: &SubmitArgs, payload: &[u8], pidfile: &Path) -> Result<u8> {
    let function = &args.function;
    if args.count != 1 {
        let started = Instant::now();
        for _ in 0..args.count {
            spool.submit(function, payload)?;
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
    print_lookup(&id, wait_for_result(spool, &id, args.timeout, pidfile)?)
}

/// How long `submit --wait` waits for a worker to appear before saying there is none.
const NO_WORKER_PATIENCE: Duration = Duration::from_secs(2);

/// Waits for job `id`, saying so (exit 3) when no worker has been running for a moment.
fn wait_for_result(
    spool: &Spool,
    id: &str,
    timeout: Option<Duration>,
    pidfile: &Path,
) -> Result<Lookup> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut absent_since: Option<Instant> = None;
    loop {
        let slice = match deadline {
            Some(d) => d
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(500)),
            None => Duration::from_millis(500),
        };
        let lookup = spool.wait(id, Some(slice))?;
        if matches!(lookup, Lookup::Finished(_) | Lookup::Unknown)
            || deadline.is_some_and(|d| Instant::now() >= d)
        {
            return Ok(lookup);
        }
        if pidfile::probe(pidfile).ok() == Some(Probe::NotRunning) {
            let since = *absent_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= NO_WORKER_PATIENCE {
                return Err(Error::TimedOut(format!(
                    "job {id} is queued, but no worker is running (start one: gearshift start)"
                )));
            }
        } else {
            absent_since = None;
        }
    }
}

fn submit_gearman(cfg: &GearmanConfig, args: &SubmitArgs, payload: &[u8]) -> Result<u8> {
    use crate::source::gearman::client::{self, Client, Outcome, Priority, Update};
    if args.count != 1 {
        let r = client::load_with(
            &cfg.servers,
            &args.function,
            payload,
            (args.count, args.concurrency, args.background),
            cfg.max_packet_bytes,
            cfg.tls.as_ref(),
        )?;
        let secs = r.elapsed.as_secs_f64();
        println!(
            "{} jobs: {} {}, {} failed in {secs:.3}s ({:.0} jobs/s)",
            r.submitted,
            r.completed,
            if args.background {
                "queued"
            } else {
                "completed"
            },
            r.failed,
            (r.completed + r.failed) as f64 / secs.max(1e-9)
        );
        return Ok(u8::from(r.failed > 0));
    }
    let priority = match args.priority {
        PriorityArg::Low => Priority::Low,
        PriorityArg::Normal => Priority::Normal,
        PriorityArg::High => Priority::High,
    };
    let mut c = Client::connect_with(&cfg.servers, cfg.max_packet_bytes, cfg.tls.as_ref())?;
    c.set_deadline(args.timeout.map(|t| Instant::now() + t));
    if args.background {
        println!(
            "{}",
            c.submit_background(&args.function, &args.unique, payload, priority)?
        );
        return Ok(0);
    }
    let mut out = std::io::stdout().lock();
    let outcome = c.submit(
        &args.function,
        &args.unique,
        payload,
        priority,
        |u| match u {
            Update::Data(d) => {
                let _ = out.write_all(d).and_then(|()| out.flush());
            }
            Update::Warning(w) => eprintln!("warning: {}", crate::text::escape_bytes(w)),
            Update::Status(n, d) => eprintln!("status: {n}/{d}"),
        },
    )?;
    match outcome {
        Outcome::Complete(result) => {
            out.write_all(&result)
                .and_then(|()| out.flush())
                .map_err(|e| Error::io("writing result", e))?;
            Ok(0)
        }
        Outcome::Fail => {
            eprintln!("job failed");
            Ok(1)
        }
        Outcome::Exception(text) => {
            eprintln!("job failed: {}", crate::text::escape_bytes(&text));
            Ok(1)
        }
    }
}

fn result(path: &Path, id: &str) -> Result<u8> {
    let config = Config::load(path)?;
    let lookup = spool(&config)?.lookup(id)?;
    if matches!(lookup, Lookup::Running)
        && pidfile::probe(&config.pidfile()).ok() == Some(Probe::NotRunning)
    {
        eprintln!(
            "job {id}: interrupted: the worker stopped while it ran; it runs again (attempt counted) when a worker starts"
        );
        return Ok(3);
    }
    print_lookup(id, lookup)
}

fn print_lookup(id: &str, lookup: Lookup) -> Result<u8> {
    match lookup {
        Lookup::Finished(r) if r.outcome == Outcome::Done => {
            use std::io::IsTerminal;
            let mut out = std::io::stdout().lock();
            // Raw bytes for a pipe or a file; escaped for a person at a terminal.
            let shown = if out.is_terminal() {
                std::borrow::Cow::Owned(crate::text::escape_bytes(&r.result).into_bytes())
            } else {
                std::borrow::Cow::Borrowed(&r.result[..])
            };
            out.write_all(&shown)
                .and_then(|()| out.flush())
                .map_err(|e| Error::io("writing result", e))?;
            Ok(0)
        }
        Lookup::Finished(r) => {
            eprintln!(
                "job {id} failed after {} attempt(s): {}",
                r.attempts,
                crate::text::escape(&r.error.unwrap_or_default())
            );
            Ok(1)
        }
        Lookup::Unknown => {
            eprintln!("job {id}: unknown id");
            Ok(2)
        }
        Lookup::Queued => {
            eprintln!("job {id}: queued, not finished yet");
            Ok(3)
        }
        Lookup::Running => {
            eprintln!("job {id}: running, not finished yet");
            Ok(3)
        }
    }
}

/// Where the worker keeps its state, even when config.toml does not parse right now (the
/// worker serves on its last good config meanwhile): then `[worker] state_dir` is read
/// leniently from the file, with a warning, so `status`, `reload` and `stop` still find it.
fn state_dir_of(path: &Path) -> Result<PathBuf> {
    match Config::load(path) {
        Ok(c) => Ok(c.worker.state_dir),
        Err(Error::Config(msg)) => {
            let dir = crate::config::lenient_state_dir(path)?;
            eprintln!("gearshift: warning: the config file is invalid: {msg}");
            eprintln!(
                "gearshift: warning: looking for the running worker in state_dir \"{}\"",
                dir.display()
            );
            Ok(dir)
        }
        Err(e) => Err(e),
    }
}

/// The running worker's pid and status socket, decided by the pidfile lock.
fn running(path: &Path) -> Result<(i32, PathBuf, PathBuf)> {
    let state_dir = state_dir_of(path)?;
    let pidfile = state_dir.join(crate::ops::layout::PIDFILE);
    let socket = crate::ops::layout::worker_dir(&state_dir).join(crate::ops::layout::SOCKET);
    match pidfile::probe(&pidfile)? {
        Probe::Running(Some(pid)) => Ok((pid, socket, pidfile)),
        Probe::Running(None) => Err(Error::Msg(format!(
            "\"{}\" is locked but holds no pid",
            pidfile.display()
        ))),
        Probe::NotRunning => Err(Error::NotRunning),
    }
}

fn metrics(path: &Path) -> Result<u8> {
    let (pid, socket) = match running(path) {
        Ok((pid, socket, _)) => (pid, socket),
        Err(Error::NotRunning) => {
            eprintln!("gearshift is not running");
            return Ok(NOT_RUNNING);
        }
        Err(e) => {
            eprintln!("gearshift: {e}");
            return Ok(UNKNOWN);
        }
    };
    let text = crate::status::query_metrics(&socket, Some(pid))?;
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| Error::io("writing metrics", e))?;
    Ok(0)
}

fn status(path: &Path, json: bool) -> Result<u8> {
    let (pid, socket) = match running(path) {
        Ok((pid, socket, _)) => (pid, socket),
        Err(Error::NotRunning) => {
            if json {
                println!("{}", serde_json::json!({"running": false}));
            } else {
                println!("gearshift is not running");
            }
            return Ok(NOT_RUNNING);
        }
        Err(e) => {
            eprintln!("gearshift: {e}");
            return Ok(UNKNOWN);
        }
    };
    let s = match crate::status::query_patiently(&socket, Some(pid), Duration::from_secs(2)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gearshift is running (pid {pid}) but its status is unavailable: {e}");
            return Ok(0);
        }
    };
    if json {
        println!(
            "{}",
            serde_json::to_string(&s).map_err(|e| Error::Msg(format!("encoding status: {e}")))?
        );
        return Ok(0);
    }
    print_status(&s.for_terminal());
    Ok(0)
}

/// The human `status`.
fn print_status(s: &crate::status::Doc) {
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    println!(
        "gearshift is {} (pid {}), generation {}, {} source",
        s.state, s.pid, s.generation, s.source
    );
    println!(
        "  started {}, restarts {}, last {} ({})",
        s.started_at,
        s.restarts,
        or_dash(&s.restarted_at),
        or_dash(&s.last_restart_reason)
    );
    println!(
        "  jobs: {} completed, {} failed, {} running",
        s.jobs_completed, s.jobs_failed, s.in_flight
    );
    println!("  functions: {}", s.functions.join(", "));
    println!(
        "  config {} (sha256 {})",
        s.config.display(),
        s.config_sha256
    );
    if !s.servers.is_empty() {
        println!("  servers:");
        for v in &s.servers {
            println!(
                "    {} {} since {} ({} lane(s) connected, {} reconnects){}",
                v.address,
                v.state,
                v.since,
                v.lanes_connected,
                v.reconnects,
                v.last_error
                    .as_ref()
                    .map(|e| format!("; last error: {e}"))
                    .unwrap_or_default()
            );
        }
    }
    if let Some(st) = &s.storage {
        println!("  storage failing since {}: {}", st.since, st.error);
    }
    if s.rejected > 0 {
        println!(
            "  spool entries rejected (set aside in rejected/): {}",
            s.rejected
        );
    }
    if let Some(m) = &s.metrics {
        println!("  metrics: http://{m}/metrics");
    }
    if s.watch != "inotify" {
        println!("  file watch: {}", s.watch);
    }
    if let Some(sv) = &s.supervisor {
        println!(
            "  supervisor pid {}, {} crash(es){}",
            sv.pid,
            sv.crashes,
            sv.last_exit
                .as_ref()
                .map(|e| format!(", last: {e}"))
                .unwrap_or_default()
        );
    }
    for w in &s.warnings {
        println!("  warning: {w}");
    }
    if let Some(r) = &s.last_refused_deploy {
        println!(
            "  last refused deploy at {} (sha256 {}): {}",
            r.at,
            crate::restart::deploy::short(&r.sha256),
            r.error
        );
    }
    if let Some(r) = &s.last_refused_reload {
        println!(
            "  last refused reload at {} ({}): {}",
            r.at, r.reason, r.error
        );
    }
}

fn reload(path: &Path, timeout: Duration) -> Result<u8> {
    let (pid, socket, pidfile) = running(path)?;
    let before = crate::status::query_patiently(&socket, Some(pid), Duration::from_secs(5))?;
    let (generation, refusals) = (before.generation, before.reload_refusals);
    kill(Pid::from_raw(pid), Signal::SIGHUP)
        .map_err(|e| Error::io(format!("signalling pid {pid}"), e.into()))?;
    let deadline = Instant::now() + timeout;
    loop {
        if pidfile::probe(&pidfile).is_ok_and(|p| p == Probe::NotRunning) {
            eprintln!(
                "reload failed: the worker (pid {pid}) exited before a new generation served"
            );
            return Ok(NOT_RUNNING);
        }
        if let Ok(now) = crate::status::query(&socket, Some(pid)) {
            let g = now.generation;
            if g > generation {
                println!("reloaded: generation {g} (pid {pid})");
                return Ok(0);
            }
            if now.reload_refusals > refusals {
                let why = now.last_refused_reload.map_or_else(
                    || "unknown reason".to_string(),
                    |r| crate::text::escape(&r.error).into_owned(),
                );
                eprintln!("reload refused, still generation {g}: {why}");
                return Ok(1);
            }
        }
        if Instant::now() >= deadline {
            return Err(Error::Msg(format!(
                "no reload after {timeout:?} (jobs still running?)"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stop(path: &Path, timeout: Duration, force: bool) -> Result<u8> {
    let (pid, socket, pidfile) = match running(path) {
        Err(Error::NotRunning) => {
            println!("gearshift is not running");
            return Ok(0);
        }
        other => other?,
    };
    let target = Pid::from_raw(pid);
    kill(target, Signal::SIGTERM)
        .map_err(|e| Error::io(format!("signalling pid {pid}"), e.into()))?;
    let started = Instant::now();
    let mut said = false;
    while pidfile::probe(&pidfile)? != Probe::NotRunning {
        if !said && started.elapsed() > Duration::from_secs(1) {
            if let Ok(s) = crate::status::query(&socket, Some(pid)) {
                println!("waiting for {} running job(s) to finish", s.in_flight);
            }
            said = true;
        }
        if started.elapsed() >= timeout {
            if !force {
                return Err(Error::Msg(format!(
                    "pid {pid} still running after {timeout:?} (jobs still running?); --force kills it"
                )));
            }
            let jobs: Vec<String> = crate::status::query(&socket, Some(pid))
                .map(|s| s.running_jobs)
                .unwrap_or_default()
                .iter()
                .map(|j| format!("{} ({})", j.id, j.function))
                .collect();
            // Job processes run in their own process groups: the worker's death does not end
            // them, and a spool job would otherwise run twice at once. Find them while they
            // are still the worker's children, then kill the worker, then them.
            let groups = job_groups(pid);
            kill(target, Signal::SIGKILL)
                .map_err(|e| Error::io(format!("killing pid {pid}"), e.into()))?;
            for g in groups {
                let _ = nix::sys::signal::killpg(Pid::from_raw(g), Signal::SIGKILL);
            }
            while pidfile::probe(&pidfile)? != Probe::NotRunning {
                std::thread::sleep(Duration::from_millis(20));
            }
            if jobs.is_empty() {
                println!("killed (pid {pid}) after {timeout:?}; no job was running");
            } else {
                println!(
                    "killed (pid {pid}) after {timeout:?}; these jobs will run again: {}",
                    jobs.join(", ")
                );
            }
            return Ok(0);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("stopped (pid {pid})");
    Ok(0)
}

/// The process groups led by children of `pid` (its running job executables).
fn job_groups(pid: i32) -> Vec<i32> {
    let mut groups = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return groups;
    };
    for e in entries.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        // Fields after the command: state, ppid, pgrp.
        if fields.get(1).and_then(|p| p.parse::<i32>().ok()) == Some(pid)
            && fields.get(2).and_then(|g| g.parse::<i32>().ok()) == Some(child)
        {
            groups.push(child);
        }
    }
    groups
}

fn check(path: &Path, functions: &Functions) -> Result<u8> {
    let plan = Plan::prepare(path, functions)?;
    for w in &plan.warnings {
        eprintln!("warning: {}", crate::text::escape(w));
    }
    println!(
        "{}: ok (sha256 {})",
        plan.config.path.display(),
        plan.config.sha256
    );
    for (name, what) in worker::describe(&plan.table) {
        let (name, what) = (crate::text::escape(&name), crate::text::escape(&what));
        println!("  {name}: {what}");
    }
    Ok(0)
}
