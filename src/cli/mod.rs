//! The command line. [`main`] is the whole program: the stock binary calls it with the
//! built-in functions, a user's binary with its own.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::{parse_duration, Config};
use crate::error::{Error, Result};
use crate::jobs::functions::Functions;
use crate::text::ShowPath;
use crate::worker::{self, Plan};

mod control;
mod exit;
mod gearman;
mod locate;
mod rerun;
mod restart;
mod stop;
mod submit;
mod top;
mod zeromq;

/// How long `restart` waits for the daemon it starts to serve (`start --timeout`'s default).
const START_WAIT: Duration = Duration::from_secs(60);
/// `start --supervise`'s crashes within a minute before its supervisor gives up.
const DEFAULT_MAX_RESTARTS: usize = 5;

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
    /// `-c` was given (else `config` is the default, in the current directory).
    #[arg(skip)]
    config_named: bool,
    /// This process is a re-exec'd generation (a restart parcel is in its environment).
    #[arg(skip)]
    reexec: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct SubmitArgs {
    /// Spool: wait for the job to finish and print its result (exit 1 if it failed).
    #[arg(long)]
    wait: bool,
    /// Spool, with --wait; gearman, foreground: give up after this long (exit 5), e.g. "30s".
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
    /// Submit this many copies (load mode, pipelined; 1 to 100000000); prints a summary, not
    /// the ids.
    #[arg(long, default_value_t = 1, conflicts_with = "wait",
          value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    count: u64,
    /// Gearman load mode: this many client connections (1 to 1024).
    #[arg(long, default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    concurrency: u16,
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
    /// Exit codes: 0 after a graceful stop, 1 on a start-up error; a forced stop (a second TERM or
    /// INT) ends it by that signal.
    Run {
        /// Log to this file instead of stderr (what a daemon from `start` re-execs with).
        #[arg(long)]
        log_file: Option<PathBuf>,
    },
    /// Start the worker as a daemon; returns once it serves, or prints its error.
    /// Exit codes: 0 started, 1 failed or already running, 5 still starting after --timeout.
    Start {
        /// Keep a supervisor process that restarts the worker when it dies abnormally.
        #[arg(long)]
        supervise: bool,
        /// With --supervise: give up after this many crashes within a minute.
        #[arg(long, default_value_t = DEFAULT_MAX_RESTARTS)]
        max_restarts: usize,
        /// Stop waiting for the daemon to serve after this long (exit 5): it goes on starting.
        #[arg(long, value_parser = parse_duration, default_value = "60s")]
        timeout: Duration,
    },
    /// Stop (if running), then start (with its supervisor, if it had one).
    /// Exit codes: as `start`; 5 if the stop timed out.
    Restart {
        /// Give up waiting for the stop after this long.
        #[arg(long, value_parser = parse_duration, default_value = "10m")]
        timeout: Duration,
    },
    /// Submit a job. Spool: prints its id (with --wait, its result). Gearman: runs it in the
    /// foreground and prints its result (streaming WORK_DATA), unless --background.
    /// Exit codes: 0 submitted (or done, when waiting), 1 failed, 3 no worker is running (spool
    /// --wait), 5 not finished within --timeout.
    Submit(SubmitArgs),
    /// Print a job's result.
    /// Exit codes: 0 done, 1 failed, 2 unknown id, 5 not finished yet (queued, running, or
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
    /// Exit codes: 0 reloaded, 1 refused (the reason is printed), 3 not running (also: it
    /// exited during the reload), 4 unknown, 5 no new generation within --timeout.
    Reload {
        /// Give up waiting after this long.
        #[arg(long, value_parser = parse_duration, default_value = "10m")]
        timeout: Duration,
    },
    /// Stop the worker gracefully (SIGTERM): running jobs finish first.
    /// Exit codes: 0 stopped or not running, 4 unknown, 5 still running after the timeout (with --force: killed, and not gone 5 s later).
    Stop {
        /// Give up waiting after this long.
        #[arg(long, value_parser = parse_duration, default_value = "10m")]
        timeout: Duration,
        /// After the timeout, stop now: a second TERM (its running jobs killed, to run again),
        /// and SIGKILL if that has not ended the worker within 3 s.
        #[arg(long)]
        force: bool,
    },
    /// Ask the worker to reopen its log file (SIGUSR1 to the proven holder of the pidfile
    /// lock), after logrotate moved it away: one postrotate line for systemd units and `start`
    /// daemons alike.
    /// Exit codes: 0 asked, 3 not running, 4 unknown.
    ReopenLogs,
    /// The supervisor process `start --supervise` runs (an image of its own, so that `ps`
    /// names it); not for use by hand.
    #[command(hide = true)]
    Supervise {
        #[arg(long)]
        max_restarts: usize,
        #[arg(long)]
        log_file: PathBuf,
        #[arg(long)]
        status_socket: PathBuf,
        #[arg(long)]
        ready_fd: i32,
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
    // Before anything else: a HUP or USR1 sent while a fresh `run` starts must not end it.
    let held = crate::ops::sigstate::hold_requests();
    crate::set_identity(name, version);
    let reexec = std::env::var_os(crate::restart::parcel::ENV_FD).is_some();
    if reexec {
        let args: Vec<OsString> = std::env::args_os().collect();
        if let Some(run) = rerun::parse(&args) {
            let cli = Cli {
                config: run.config,
                config_named: true,
                reexec,
                command: Command::Run {
                    log_file: run.log_file,
                },
            };
            return execute(cli, functions);
        }
    }
    // Signals a launcher left ignored stay ignored through fork and exec: a supervisor
    // (`start --supervise`) with SIGCHLD ignored never saw its worker's exit status (the kernel
    // reaped it), and took a clean stop for a crash to restart from. (A worker's image does
    // this again itself, `worker::run_with`.)
    crate::ops::sigstate::restore_ignored();
    let matches = Cli::command()
        .name(name)
        .version(version)
        .after_help(exit::TABLE)
        .mut_subcommands(|c| c.after_help(exit::TABLE))
        .get_matches();
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    cli.config_named =
        matches.value_source("config") == Some(clap::parser::ValueSource::CommandLine);
    cli.reexec = reexec;
    if !matches!(cli.command, Command::Run { .. }) {
        if let Some(old) = &held {
            crate::ops::sigstate::release_requests(old);
        }
    }
    execute(cli, functions)
}

/// Runs the parsed command and maps the outcome to an exit code.
fn execute(cli: Cli, functions: Functions) -> ExitCode {
    crate::ops::logging::init(log::LevelFilter::Info);
    crate::ops::logging::install_panic_hook();
    // What an error means depends on the command: for those that start or check a worker it is
    // "failed"; for the others, "could not act".
    let starting = matches!(
        cli.command,
        Command::Run { .. }
            | Command::Start { .. }
            | Command::Restart { .. }
            | Command::Supervise { .. }
            | Command::Check { .. }
    );
    let default_config = (!cli.config_named).then(|| cli.config.clone());
    // A fresh `run` handed a ready pipe (by a supervisor, or by a rollback exec under a waiting
    // `start`) says there that it serves, or why it could not start: `start` says its words.
    let ready = match cli.command {
        Command::Run { .. } if !cli.reexec => crate::restart::reexec::ready_from_env(),
        _ => None,
    };
    let outcome = dispatch(cli, functions, ready.as_ref());
    // Said after the error (the command's own, or the one printed below).
    let hint = || {
        if locate::FOUND_WITHOUT_CONFIG.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        if let Some(hint) = default_config.and_then(|c| missing_default(&c)) {
            if crate::ops::logging::is_json() {
                log::warn!("{hint}");
                log::logger().flush();
            } else {
                eprintln!("gearshift: {}", crate::text::escape_lines(&hint));
            }
        }
    };
    match outcome {
        Ok(code) => {
            if code != exit::OK {
                hint();
            }
            ExitCode::from(code)
        }
        Err(e) => {
            if let Some(mut r) = ready {
                // Cut as below: the pipe (64 KiB) never fills, whoever reads it.
                use std::io::Write;
                let _ = writeln!(r, "error {}", crate::text::cut(&e.to_string(), 16 << 10));
            }
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
                eprintln!(
                    "gearshift: {}",
                    crate::text::escape_lines(&crate::text::cut(&e.to_string(), 16 << 10))
                );
                hint();
            }
            ExitCode::from(match e {
                Error::NotRunning => exit::NOT_RUNNING,
                Error::Unknown(_) => exit::UNKNOWN,
                Error::TimedOut(_) => exit::NOT_YET,
                _ if starting => exit::FAILED,
                _ => exit::ERROR,
            })
        }
    }
}

/// What to say when the default config (`config.toml` in the current directory) is not there:
/// most often a command run away from the worker's directory.
fn missing_default(config: &std::path::Path) -> Option<String> {
    let missing =
        std::fs::symlink_metadata(config).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound);
    let here = std::env::current_dir().ok()?;
    missing.then(|| {
        format!(
            "no {} in {} (without -c, the config is looked for in the current directory): run gearshift where the worker's config is, or name it with -c PATH",
            config.shown(),
            here.shown()
        )
    })
}

fn dispatch(cli: Cli, functions: Functions, ready: Option<&std::fs::File>) -> Result<u8> {
    let path = &cli.config;
    if !matches!(
        cli.command,
        Command::Run { .. }
            | Command::Start { .. }
            | Command::Restart { .. }
            | Command::Supervise { .. }
    ) {
        crate::ops::sigstate::default_sigpipe();
    }
    // A re-exec'd generation is the worker itself: it runs the plan its parcel carries, and
    // reading and parsing the config again here, with root's record looked up, put about 30
    // system calls in every restart pause.
    // A fault-injection build (tests only): a fresh `run` stalls before its start-up proper.
    #[cfg(gearshift_faults)]
    if matches!(cli.command, Command::Run { .. }) && !cli.reexec {
        crate::ops::faults::stall_while("GEARSHIFT_FAULT_STALL_RUN", "stalling a fresh run");
    }
    if matches!(cli.command, Command::Run { .. } | Command::Start { .. }) && !cli.reexec {
        locate::refuse_beside_another(path)?;
    }
    match cli.command {
        Command::Run { log_file } => {
            let opts = worker::RunOptions {
                // Where `run` was typed, once: every generation and every reopen then means the
                // same file.
                log_file: log_file.map(|f| crate::config::absolute(&f)).transpose()?,
                ready: ready.and_then(|r| r.try_clone().ok()),
                ..Default::default()
            };
            worker::run_with(path, functions, opts).map(|code| code as u8)
        }
        Command::Start {
            supervise,
            max_restarts,
            timeout,
        } => crate::daemon::start(path, functions, supervise.then_some(max_restarts), timeout),
        Command::Restart { timeout } => restart::restart(path, functions, timeout),
        Command::Supervise {
            max_restarts,
            log_file,
            status_socket,
            ready_fd,
        } => Ok(crate::daemon::supervisor::main(
            path,
            log_file,
            status_socket,
            max_restarts,
            ready_fd,
        ) as u8),
        Command::Submit(args) => submit::submit(path, args),
        Command::Result { job_id } => submit::result(path, &job_id),
        Command::Status { json } => control::status(path, json),
        Command::Metrics => control::metrics(path),
        Command::Top { interval } => top::run(path, interval),
        Command::Reload { timeout } => control::reload(path, timeout),
        Command::Stop { timeout, force } => stop::stop(path, timeout, force),
        Command::ReopenLogs => control::reopen_logs(path),
        Command::Check { config_only: true } => {
            let config = Config::load(path)?;
            println!("{}: ok (sha256 {})", config.path.shown(), config.sha256);
            Ok(0)
        }
        Command::Check { config_only: false } => check(path, &functions),
    }
}

fn check(path: &Path, functions: &Functions) -> Result<u8> {
    let plan = Plan::prepare(path, functions)?;
    // What `start` would fail on: said as it would say it.
    let unmakeable = plan.unmakeable();
    if !unmakeable.is_empty() {
        return Err(Error::Msg(unmakeable.join("\n")));
    }
    for w in &plan.warnings {
        eprintln!("warning: {}", crate::text::escape(w));
    }
    println!(
        "{}: ok (sha256 {})",
        plan.config.path.shown(),
        plan.config.sha256
    );
    for (name, what) in worker::describe(&plan.table) {
        let (name, what) = (crate::text::escape(&name), crate::text::escape(&what));
        println!("  {name}: {what}");
    }
    // A running worker's pre-flight of this build: what it may hand over at the exec.
    if std::env::var_os(crate::restart::preflight::PREFLIGHT_ENV).is_some() {
        println!("{}", crate::restart::preflight::TAKES_LOCKS);
    }
    Ok(0)
}
