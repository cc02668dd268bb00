//! A re-exec'd generation's command line, read without clap.
//!
//! Every restart re-execs the worker with the arguments it was started with. Building clap's
//! whole command tree to read `-c PATH run [--log-file PATH]` again costs about 0.17 ms of
//! every restart pause (measured with timestamps in the worker), for an answer the previous
//! generation already accepted. So a new generation (the restart parcel's descriptor is in its
//! environment) whose arguments have exactly that shape reads them here; any other shape goes
//! to clap as on a first start, which accepts or reports it as it always does.

use std::ffi::OsString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// What `run` needs: the config file and the log file, if any.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct RunArgs {
    pub(super) config: PathBuf,
    pub(super) log_file: Option<PathBuf>,
}

/// `args` (the program's name first) read as `run`, if they have one of the shapes clap reads
/// the same way: `-c`/`--config` (anywhere, once), `run`, then `--log-file` (once); a value
/// given separately or after `=`. None for anything else, a repeated option or a value clap
/// might read otherwise (empty, or starting with `-`).
pub(super) fn parse(args: &[OsString]) -> Option<RunArgs> {
    let mut config = None;
    let mut log_file = None;
    let mut run = false;
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        let bytes = arg.as_bytes();
        if bytes == b"run" && !run {
            run = true;
            continue;
        }
        let (name, inline) = match bytes.iter().position(|&b| b == b'=') {
            Some(at) if bytes.starts_with(b"--") => (&bytes[..at], Some(&bytes[at + 1..])),
            _ => (bytes, None),
        };
        let slot = match name {
            b"-c" if inline.is_none() => &mut config,
            b"--config" => &mut config,
            b"--log-file" if run => &mut log_file,
            _ => return None,
        };
        let value = match inline {
            Some(v) => v,
            None => rest.next()?.as_bytes(),
        };
        if slot.is_some() || value.is_empty() || value.starts_with(b"-") {
            return None;
        }
        *slot = Some(PathBuf::from(std::ffi::OsStr::from_bytes(value)));
    }
    run.then(|| RunArgs {
        config: config.unwrap_or_else(|| PathBuf::from("config.toml")),
        log_file,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn argv(s: &str) -> Vec<OsString> {
        std::iter::once("gearshift")
            .chain(s.split(' ').filter(|a| !a.is_empty()))
            .map(OsString::from)
            .collect()
    }

    /// Where the shortcut answers, clap answers the same; where clap would refuse or read
    /// something else, the shortcut leaves it to clap.
    #[test]
    fn reads_what_clap_reads_or_leaves_it_to_clap() {
        let read = [
            "run",
            "-c /etc/gs/config.toml run",
            "--config /etc/gs/config.toml run --log-file /var/log/gs.log",
            "--config=/a/config.toml run --log-file=/a/w.log",
            "run -c /a/c.toml",
            "run --log-file /a/w.log --config /a/c.toml",
            "-c /a/=b.toml run",
        ];
        let left = [
            "",
            "status",
            "run run",
            "-c a -c b run",
            "--log-file /a/w.log run",
            "run --log-file",
            "run --log-file=",
            "-c -x run",
            "-ca.toml run",
            "run --help",
            "--version",
            "run --log-file a --log-file b",
            "run extra",
            "run -- -c a",
        ];
        for s in read {
            let fast = parse(&argv(s)).unwrap_or_else(|| panic!("not read: {s}"));
            let cli = super::super::Cli::try_parse_from(argv(s)).expect(s);
            let super::super::Command::Run { log_file } = cli.command else {
                panic!("clap reads no run: {s}");
            };
            assert_eq!(
                fast,
                RunArgs {
                    config: cli.config,
                    log_file
                },
                "{s}"
            );
        }
        for s in left {
            assert_eq!(parse(&argv(s)), None, "{s}");
        }
    }
}
