//! `gearshift submit` to a Gearman source: one job in the foreground (its WORK_DATA streamed,
//! escaped at a terminal) or the background, or `--count` jobs over several connections.

use std::io::{IsTerminal, Write};
use std::time::Instant;

use crate::config::GearmanConfig;
use crate::error::{Error, Result};

use super::exit;
use super::{PriorityArg, SubmitArgs};

/// Submits to the first Gearman server that takes it: a foreground job's WORK_DATA streamed to
/// stdout and its result printed, or with `--count` many jobs at once and their rate.
pub(super) fn submit(cfg: &GearmanConfig, args: &SubmitArgs, payload: &[u8]) -> Result<u8> {
    use crate::source::gearman::client::{Client, Outcome, Priority, Update};
    use crate::source::gearman::load::{self, LoadOptions};
    let priority = match args.priority {
        PriorityArg::Low => Priority::Low,
        PriorityArg::Normal => Priority::Normal,
        PriorityArg::High => Priority::High,
    };
    if args.count != 1 {
        let opts = LoadOptions {
            count: args.count,
            connections: usize::from(args.concurrency),
            background: args.background,
            priority,
            unique: args.unique.clone(),
            timeout: args.timeout,
        };
        let r = load::load_with(
            &cfg.servers,
            &args.function,
            payload,
            &opts,
            cfg.max_packet_bytes,
            cfg.tls.as_ref(),
        )?;
        let secs = r.elapsed.as_secs_f64();
        let unfinished = if r.unfinished > 0 {
            format!(", {} not finished within --timeout", r.unfinished)
        } else {
            String::new()
        };
        println!(
            "{} jobs: {} {}, {} failed{unfinished} in {secs:.3}s ({:.0} jobs/s)",
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
        return Ok(if r.failed > 0 {
            exit::FAILED
        } else if r.unfinished > 0 {
            exit::NOT_YET
        } else {
            exit::OK
        });
    }
    let mut c = Client::connect_with(&cfg.servers, cfg.max_packet_bytes, cfg.tls.as_ref())?;
    c.set_deadline(args.timeout.map(|t| Instant::now() + t));
    if args.background {
        // The server's handle: text from outside.
        let handle = c.submit_background(&args.function, &args.unique, payload, priority)?;
        println!("{}", crate::text::escape(&handle));
        return Ok(0);
    }
    let mut out = std::io::stdout().lock();
    let person = out.is_terminal();
    let outcome = c.submit(
        &args.function,
        &args.unique,
        payload,
        priority,
        |u| match u {
            Update::Data(d) => {
                let _ = out
                    .write_all(&crate::text::for_stdout(d, person, false))
                    .and_then(|()| out.flush());
            }
            Update::Warning(w) => eprintln!("warning: {}", crate::text::escape_bytes(w)),
            Update::Status(n, d) => eprintln!("status: {n}/{d}"),
        },
    )?;
    match outcome {
        Outcome::Complete(result) => {
            out.write_all(&crate::text::for_stdout(&result, person, true))
                .and_then(|()| out.flush())
                .map_err(|e| Error::io("writing result", e))?;
            Ok(0)
        }
        Outcome::Fail => {
            eprintln!("job failed");
            Ok(exit::FAILED)
        }
        Outcome::Exception(text) => {
            eprintln!("job failed: {}", crate::text::escape_bytes(&text));
            Ok(exit::FAILED)
        }
    }
}
