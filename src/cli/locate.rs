//! Where the running worker keeps its state, as the CLI finds it: from the config, or from
//! root's record of where the worker started when the config cannot say (it does not validate
//! now) or says otherwise (its `state_dir` was edited since: that moves only at a fresh start).

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::ops::pidfile;

/// Where the worker keeps its state, even when config.toml does not validate right now (the
/// worker serves on its last good config meanwhile), and whether that is certain: the valid
/// config; or, with a warning, the `state_dir` root recorded at the worker's start; or `[worker]
/// state_dir` read leniently from the file (certain only if its TOML syntax holds).
pub(super) fn state_dir_of(path: &Path) -> Result<(PathBuf, bool)> {
    match Config::load(path) {
        Ok(c) => {
            if let Ok(Some(t)) = crate::ops::privilege::target(&c) {
                pidfile::configured_user(t.uid.as_raw());
            }
            let config = crate::config::absolute(path).unwrap_or_default();
            match running_elsewhere(&config, &c.worker.state_dir) {
                Some(dir) => {
                    eprintln!("gearshift: warning: config.toml names state_dir \"{}\", but the worker started with it runs in \"{}\" (a state_dir moves only at a fresh start: `gearshift restart`)", c.worker.state_dir.display(), dir.display());
                    Ok((dir, true))
                }
                None => Ok((c.worker.state_dir, true)),
            }
        }
        Err(Error::Config(msg)) => {
            eprintln!(
                "gearshift: warning: the config file is invalid: {}",
                crate::text::escape_lines(&msg)
            );
            let recorded = crate::config::absolute(path)
                .ok()
                .and_then(|p| crate::ops::layout::recorded_state_dir(&p));
            let (dir, certain, how) = match recorded {
                Some(dir) => (dir, true, "recorded at the worker's start"),
                None => {
                    let (dir, certain) = crate::config::lenient_state_dir(path)?;
                    let how = if certain {
                        "from the file"
                    } else {
                        "a guess: the file's syntax is broken"
                    };
                    (dir, certain, how)
                }
            };
            eprintln!(
                "gearshift: warning: looking for the running worker in state_dir \"{}\" ({how})",
                dir.display()
            );
            Ok((dir, certain))
        }
        Err(e) => Err(e),
    }
}

/// Refuses a start beside a worker started with the same config in another `state_dir` (the
/// config's was edited since): two workers would serve one source.
pub(super) fn refuse_beside_elsewhere(path: &Path) -> Result<()> {
    let (Ok(c), Ok(config)) = (Config::load(path), crate::config::absolute(path)) else {
        return Ok(());
    };
    match running_elsewhere(&config, &c.worker.state_dir) {
        Some(dir) => Err(Error::Locked {
            what: dir.join(crate::ops::layout::PIDFILE),
            pid: pidfile::probe(&dir.join(crate::ops::layout::PIDFILE))
                .ok()
                .and_then(|p| match p {
                    pidfile::Probe::Running(pid) => pid,
                    pidfile::Probe::NotRunning => None,
                }),
        }),
        None => Ok(()),
    }
}

/// The `state_dir` a worker started with `config` runs in, when that is not `configured` (the
/// file was edited since: a `state_dir` moves only at a fresh start): root's record, while a
/// worker holds the pidfile lock there.
fn running_elsewhere(config: &Path, configured: &Path) -> Option<PathBuf> {
    let recorded = crate::ops::layout::recorded_state_dir(config).filter(|r| r != configured)?;
    let probe = crate::ops::pidfile::probe(&recorded.join(crate::ops::layout::PIDFILE)).ok()?;
    matches!(probe, crate::ops::pidfile::Probe::Running(_)).then_some(recorded)
}
