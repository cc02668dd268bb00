//! A worker binary of your own: the gearshift daemon with your Rust job functions.
//!
//! ```text
//! cargo run --example custom_worker -- -c config.toml run
//! cargo run --example custom_worker -- -c config.toml submit --wait shout hello
//! ```
//!
//! Everything the stock binary does (hot restart, spool, executables in `jobs/`, the CLI) works
//! the same; `shout` and `count_lines` are simply more functions. Deploying a new build of this
//! binary and sending SIGHUP (or `gearshift reload`) switches to it between jobs.

use gearshift::{Functions, Job, JobError, JobResult};

/// Upper-cases the payload.
fn shout(job: &mut Job<'_>) -> JobResult {
    Ok(job.payload().to_ascii_uppercase())
}

/// Counts lines, reporting progress as it goes (WORK_STATUS on Gearman, debug log on the spool).
fn count_lines(job: &mut Job<'_>) -> JobResult {
    let text =
        std::str::from_utf8(job.payload()).map_err(|_| JobError::new("payload is not UTF-8"))?;
    let total = text.lines().count() as u64;
    for (i, _) in text.lines().enumerate() {
        job.status(i as u64 + 1, total);
    }
    Ok(total.to_string().into_bytes())
}

fn main() -> std::process::ExitCode {
    let mut functions = Functions::with_builtins();
    functions
        .register("shout", shout)
        .register("count_lines", count_lines);
    // A closure works as well; return an error to fail the job.
    functions.register("must_be_even", |job: &mut Job<'_>| {
        let n: i64 = String::from_utf8_lossy(job.payload()).trim().parse()?;
        if n % 2 == 0 {
            Ok(b"even".to_vec())
        } else {
            Err(JobError::new(format!("{n} is odd")))
        }
    });
    // A Rust function cannot be killed at its timeout; this one ignores `job.deadline()` on
    // purpose, to show (and test) what a Gearman server does with a late result.
    functions.register("slow", |job: &mut Job<'_>| {
        let ms: u64 = String::from_utf8_lossy(job.payload()).trim().parse()?;
        std::thread::sleep(std::time::Duration::from_millis(ms));
        Ok(job.payload().to_vec())
    });
    // Leaks the given number of MiB on purpose: what `[worker] max_rss_mb` recycling is for.
    functions.register("leak", |job: &mut Job<'_>| {
        let mib: usize = String::from_utf8_lossy(job.payload()).trim().parse()?;
        let leaked: &'static mut [u8] = Box::leak(vec![1u8; mib << 20].into_boxed_slice());
        Ok(format!("leaked {} MiB", leaked.len() >> 20).into_bytes())
    });
    // Our own name and version in `--version`, `status` and the log (cli::main would say
    // "gearshift" and the library's version).
    gearshift::cli::main_as("custom-worker", "1.0.0-example", functions)
}
