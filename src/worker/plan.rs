//! One generation, validated before it is used: the config, `jobs_dir` and the functions
//! table. A config that fails here never replaces the running one.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use crate::config::Config;
use crate::error::{Error, Result};
use crate::jobs::functions::{Functions, Runner, Table};
#[cfg(gearshift_faults)]
pub(super) use crate::ops::faults::stall_while;
use crate::text::ShowPath;
use crate::watch::{self};

/// Everything one generation needs, built and checked before it is used: a config that fails
/// here never replaces the running one.
pub struct Plan {
    pub config: Config,
    pub table: Table,
    pub jobs_sha256: String,
    /// `jobs_dir` as validated: what a restart hands the next generation.
    pub jobs: watch::Jobs,
    /// Non-fatal findings, e.g. a `[functions.x]` section for a function that does not exist.
    pub warnings: Vec<String>,
}

impl Plan {
    /// Reads and validates the config at `path` and the executables of its `jobs_dir`.
    pub fn prepare(path: &Path, functions: &Functions) -> Result<Plan> {
        Plan::prepare_from(path, functions, None, None)
    }

    /// Like [`Plan::prepare`], from config text already read (`None`: read the file) and, in a
    /// re-exec'd generation, the `jobs_dir` its predecessor validated just before the exec
    /// (`None`: scan and check it). What was handed over is used as it is: a deploy writing
    /// into `jobs_dir` meanwhile cannot make a new generation fail what the last one passed;
    /// the change is looked at once serving, like any other.
    pub fn prepare_from(
        path: &Path,
        functions: &Functions,
        text: Option<&str>,
        handed: Option<watch::Jobs>,
    ) -> Result<Plan> {
        // A fault-injection build (tests only): reading the config from disk fails with EMFILE
        // while the file GEARSHIFT_FAULT_EMFILE names exists.
        #[cfg(gearshift_faults)]
        if text.is_none()
            && std::env::var_os("GEARSHIFT_FAULT_EMFILE").is_some_and(|p| Path::new(&p).exists())
        {
            return Err(Error::io_path(
                "reading config (injected fault, gearshift_faults build)",
                path,
                std::io::Error::from_raw_os_error(libc::EMFILE),
            ));
        }
        // A fault-injection build (tests only): the control thread's look at the files does
        // not return while the file GEARSHIFT_FAULT_WEDGE names exists (a wedged or stalled
        // system call).
        #[cfg(gearshift_faults)]
        if text.is_none() {
            stall_while("GEARSHIFT_FAULT_WEDGE", "wedging the control thread");
        }
        let config = match text {
            Some(t) => Config::parse(&crate::config::absolute(path)?, t.as_bytes())?,
            None => Config::load(path)?,
        };
        if config.text.trim().is_empty() {
            // An editor or `>` truncates before it writes: an empty file is far more likely a
            // half-written config than a wish for every default.
            return Err(Error::Config(format!(
                "{}: the file is empty (half-written?); refusing it",
                config.path.shown()
            )));
        }
        // Who we would run as is part of the config's validity: refuse before exec what the
        // new image could not run with.
        crate::ops::privilege::check_policy(&config)?;
        check_places(&config)?;
        if let crate::config::Source::Gearman(g) = &config.source {
            // Certificate files are part of what a reload must validate.
            crate::source::gearman::tls::targets(&g.servers, g.tls.as_ref())?;
        }
        let scanned = match handed {
            Some(jobs) => jobs,
            None => check_jobs_dir(&config)?,
        };
        let dropping = crate::ops::privilege::dropping_to(&config)?;
        if let Some(t) = &dropping {
            // Root can read everything; the user it drops to must too, or every reload fails.
            use crate::ops::privilege::{check_access, Need};
            check_access(&config.path, "config", t, Need::Read)?;
            if let Some(tls) = config.source.tls() {
                let files = [
                    (Some(&tls.ca_file), "[source.tls] ca_file"),
                    (tls.cert_file.as_ref(), "[source.tls] cert_file"),
                    (tls.key_file.as_ref(), "[source.tls] key_file"),
                ];
                for (file, what) in files {
                    if let Some(file) = file {
                        check_access(file, what, t, Need::Read)?;
                    }
                }
            }
            if let Ok(bin) = std::env::current_exe() {
                check_access(
                    &bin,
                    "the gearshift binary (it re-execs itself)",
                    t,
                    Need::Exec,
                )?;
            }
        }
        let mut table = Table::default();
        for name in functions.names() {
            if functions.is_builtin(name) && !config.worker.builtins {
                continue;
            }
            if let Some(f) = functions.get(name) {
                table.insert(
                    name.to_string(),
                    Runner::Rust(Arc::clone(f)),
                    config.timeout(name),
                );
            }
        }
        for (name, path) in scanned.functions.clone() {
            if table.contains(&name) {
                return Err(Error::Config(format!(
                    "\"{}\" would define function \"{name}\", which is already a built-in or Rust function (rename the file)",
                    path.shown()
                )));
            }
            let timeout = config.timeout(&name);
            table.insert(name, Runner::Executable(path), timeout);
        }
        let mut warnings: Vec<String> = unknown_timeouts(&config, &table).into_iter().collect();
        warnings.extend(scanned.warnings.iter().cloned());
        if table.iter().next().is_none() {
            let builtins = if config.worker.builtins {
                "" // The built-ins were left out of the binary (a user's own build).
            } else {
                " and the built-ins are off (a network source serves them only with [worker] builtins = true)"
            };
            warnings.push(format!(
                "no function to serve: jobs_dir \"{}\" holds no executable{builtins}: this worker can run no job",
                config.worker.jobs_dir.shown()
            ));
        }
        if let Some(key) = config.source.tls().and_then(|t| t.key_file.as_ref()) {
            // The worker reads it at every reload, as the user every job runs as.
            let user = dropping
                .as_ref()
                .map_or("the worker's user".to_string(), |t| {
                    format!("user \"{}\"", t.name)
                });
            warnings.push(format!(
                "[source.tls] key_file \"{}\" is readable by {user}, so by every job it runs: a job can copy the client key (give this worker a certificate of its own, one you can revoke)",
                key.shown()
            ));
        }
        warnings.extend(release_link_warnings(&config));
        if let crate::config::Source::Amqp(a) = &config.source {
            warnings.extend(consumer_timeout_warnings(&table, a.consumer_timeout));
        }
        if let crate::config::Source::Gearman(g) = &config.source {
            warnings.extend(descriptor_warning(
                g.servers.len(),
                config.worker.concurrency,
            ));
        }
        Ok(Plan {
            config,
            table,
            jobs_sha256: scanned.digest.clone(),
            jobs: scanned,
            warnings,
        })
    }
}

/// The warning for `[functions.NAME]` tables that name no function `table` serves (a typo's
/// timeout never applies), each with the served name it is most likely meant to be. One
/// warning for them all: a generated config may hold thousands, each said at every start and
/// restart (and a suggestion only for the ten shown: each is compared with every name).
fn unknown_timeouts(config: &Config, table: &Table) -> Option<String> {
    let unknown: Vec<&String> = (config.functions.keys())
        .filter(|name| !table.contains(name))
        .collect();
    if unknown.is_empty() {
        return None;
    }
    // Borrowed only when there is something to say (this runs at every start and restart).
    let served: Vec<&str> = table.iter().map(|(name, _)| name.as_str()).collect();
    let meant = |name: &str| {
        crate::config::closest(name, &served)
            .map(|m| format!(" (did you mean [functions.{m}]?)"))
            .unwrap_or_default()
    };
    let path = config.path.shown();
    match unknown.as_slice() {
        [] => None,
        [one] => Some(format!(
            "{path}: [functions.{one}] names no known function{}",
            meant(one)
        )),
        many => {
            let named: Vec<String> = (many.iter().enumerate())
                .map(|(i, n)| match i < 10 {
                    true => format!("[functions.{n}]{}", meant(n)),
                    false => String::new(),
                })
                .collect();
            Some(format!(
                "{path}: {} name no known function",
                crate::text::some_of(&named, 10)
            ))
        }
    }
}

/// The directories a worker makes at its start and keeps: each one's key, what a release
/// switch does with what it holds (see [`release_link_warnings`]), and its path (None: this
/// source keeps no spool).
fn own_dirs(config: &Config) -> [(&'static str, &'static str, Option<&Path>); 2] {
    [
        (
            "state_dir",
            "its pidfile and status socket stay behind, and its next restart opens the new release's, or cannot make it and ends",
            Some(config.worker.state_dir.as_path()),
        ),
        (
            "[source] dir",
            "its queued jobs and results stay behind, and its next restart opens the new release's, or cannot make it and ends",
            config.source.spool().map(|s| s.dir.as_path()),
        ),
    ]
}

impl Plan {
    /// What of [`own_dirs`] a start would fail to make where it is missing
    /// ([`crate::ops::safefs::could_create`]), each said with its key.
    pub fn unmakeable(&self) -> Vec<String> {
        (own_dirs(&self.config).into_iter())
            .filter_map(|(what, _, dir)| {
                let e = crate::ops::safefs::could_create(dir?).err()?;
                Some(format!("{what}: {e}"))
            })
            .collect()
    }
}

/// The worker's own directories (`state_dir`, the spool) whose paths lead through a link the
/// config's path leads through too: a deploy's `current` (`-c /srv/app/current/config.toml`
/// with the stock relative `state_dir = "state"`). A release switch moves them away from the
/// running worker: its queue, pidfile and socket stay in the old release, and its next restart
/// opens the new release's, or, as the user it dropped to, cannot make them and ends.
fn release_link_warnings(config: &Config) -> Vec<String> {
    let links = crate::watch::links_through(&config.path);
    if links.is_empty() {
        return Vec::new();
    }
    let log = (
        "[log] file",
        "its log goes on in the old release's file, or in each new release's, and goes with it",
        config.log.file.as_deref(),
    );
    (own_dirs(config).into_iter().chain([log]))
        .filter_map(|(what, held, dir)| {
            let dir = dir?;
            let link = (crate::watch::links_through(dir).into_iter()).find(|l| links.contains(l))?;
            Some(format!(
                "{what} \"{}\" leads through the link \"{}\", as the config's path does: a deploy that switches that link moves {what} away from the running worker ({held}); keep {what} outside the release, in a directory the releases share",
                dir.shown(),
                link.shown()
            ))
        })
        .collect()
}

/// Every lane keeps a connection to every gearmand: lanes x servers descriptors, beside those
/// the worker and each lane's jobs need (as the ZeroMQ source reckons them), must fit the
/// descriptor limit, or lanes fail their connects (EMFILE) one by one.
fn descriptor_warning(servers: usize, lanes: usize) -> Option<String> {
    use crate::source::zeromq::{FDS_PER_LANE, RESERVED_FDS};
    let (soft, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok()?;
    let connections = (servers as u64).saturating_mul(lanes as u64);
    let need = connections
        .saturating_add(RESERVED_FDS)
        .saturating_add(FDS_PER_LANE.saturating_mul(lanes as u64));
    (need > soft).then(|| {
        format!(
            "[source] servers: {servers} server(s) x {lanes} lane(s) = {connections} connections, with what the worker and the lanes' jobs need about {need} descriptors, over ulimit -n {soft}: some lanes will fail to connect (raise the limit, e.g. LimitNOFILE=, or lower concurrency)"
        )
    })
}

/// Functions allowed to run longer than the broker's `consumer_timeout`: RabbitMQ closes the
/// channel of a delivery unacknowledged that long (406) and redelivers the job while it runs.
fn consumer_timeout_warnings(table: &Table, limit: std::time::Duration) -> Vec<String> {
    let long: Vec<String> = table
        .names()
        .into_iter()
        .filter(|name| {
            table
                .get(name)
                .is_some_and(|(_, t)| t.is_none_or(|t| t > limit))
        })
        .collect();
    if long.is_empty() {
        return Vec::new();
    }
    vec![format!(
        "functions {} may run longer than the broker's consumer_timeout ({}): RabbitMQ would close the worker's channel and deliver the job (and every other lane's) again while it runs; give them a shorter [functions.NAME] timeout (or [worker] job_timeout), or raise consumer_timeout in rabbitmq.conf and [source] consumer_timeout to match",
        crate::text::some_of(&long.iter().map(|n| format!("\"{n}\"")).collect::<Vec<_>>(), 10),
        crate::clock::human_secs(limit.as_secs())
    )]
}

/// The places the config names that `start` would only find wrong later: a `state_dir` or
/// spool `dir` on a pseudo file system (/proc, /sys), a `state_dir` that is not a directory, a
/// `[log] file` whose directory does not exist. Said with the key, so `check` finds what
/// `start` would.
fn check_places(config: &Config) -> Result<()> {
    let at = config.path.shown();
    for (key, _, dir) in own_dirs(config) {
        let Some((dir, existing)) =
            dir.and_then(|d| Some((d, d.ancestors().find(|p| p.exists())?)))
        else {
            continue;
        };
        use nix::sys::statfs::{statfs, PROC_SUPER_MAGIC, SYSFS_MAGIC};
        let kind = statfs(existing).ok().map(|s| s.filesystem_type());
        let table = if key == "state_dir" { "[worker] " } else { "" };
        if kind == Some(PROC_SUPER_MAGIC) || kind == Some(SYSFS_MAGIC) {
            return Err(Error::Config(format!(
                "{at}: {table}{key} \"{}\" is on a pseudo file system ({}): choose a directory on a real one, e.g. /var/lib/gearshift",
                dir.shown(),
                if kind == Some(PROC_SUPER_MAGIC) { "procfs" } else { "sysfs" }
            )));
        }
        if key == "state_dir" && existing == dir && !dir.is_dir() {
            return Err(Error::Config(format!(
                "{at}: {table}{key} \"{}\" exists and is not a directory",
                dir.shown()
            )));
        }
    }
    if let Some(file) = &config.log.file {
        let dir = file.parent().unwrap_or(Path::new("/"));
        if !dir.is_dir() {
            return Err(Error::Config(format!(
                "{at}: [log] file \"{}\": its directory \"{}\" does not exist (create it, or choose another file)",
                file.shown(),
                dir.shown()
            )));
        }
    }
    Ok(())
}

/// Scans `jobs_dir` and checks every executable in it: modes and owners (`strict_modes`), and
/// that the user the worker drops to can run them.
fn check_jobs_dir(config: &Config) -> Result<watch::Jobs> {
    let jobs_dir = &config.worker.jobs_dir;
    if !jobs_dir.is_dir() {
        return Err(Error::Config(format!(
            "{}: jobs_dir \"{}\" is not a directory (create it, or set [worker] jobs_dir)",
            config.path.shown(),
            jobs_dir.shown()
        )));
    }
    let scanned = watch::scan_jobs(jobs_dir)?;
    // Every executable's problem, not the first one's: a deploy of several is fixed at once.
    let mut problems = Vec::new();
    if config.worker.strict_modes {
        let owner = crate::ops::privilege::owner_uid(config)?;
        crate::ops::privilege::check_path(&config.path, "config", owner)?;
        crate::ops::privilege::check_path(jobs_dir, "jobs_dir", owner)?;
        for exe in scanned.functions.values() {
            problems.extend(crate::ops::privilege::check_path(exe, "job executable", owner).err());
        }
    }
    if let Some(t) = crate::ops::privilege::dropping_to(config)? {
        use crate::ops::privilege::{check_access, Need};
        check_access(jobs_dir, "jobs_dir", &t, Need::ReadExec)?;
        for exe in scanned.functions.values() {
            problems.extend(check_access(exe, "job executable", &t, Need::ReadExec).err());
        }
    }
    match problems.len() {
        0 => Ok(scanned),
        1 => Err(problems.remove(0)),
        n => {
            let shown: Vec<String> = problems.iter().take(10).map(|e| format!("  {e}")).collect();
            let more = match n > 10 {
                true => format!("\n  and {} more", n - 10),
                false => String::new(),
            };
            Err(Error::Config(format!(
                "{n} job executables cannot be used:\n{}{more}",
                shown.join("\n")
            )))
        }
    }
}

/// The functions table as a map of name to description, for `check`.
pub fn describe(table: &Table) -> BTreeMap<String, String> {
    table
        .iter()
        .map(|(name, (runner, timeout))| {
            let what = match runner {
                Runner::Rust(_) => "rust".to_string(),
                Runner::Executable(p) => p.shown().to_string(),
            };
            let t = timeout
                .map(|t| format!(" (timeout {})", crate::clock::human(t)))
                .unwrap_or_default();
            (name.clone(), format!("{what}{t}"))
        })
        .collect()
}
