//! Log lines: `2026-11-24T09:51:28.123Z INFO  g3 message`, to stderr. The generation is in every
//! line so a restart is visible in the log; job lines name the job id.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// Sets the generation shown in log lines.
pub fn set_generation(g: u64) {
    GENERATION.store(g, Ordering::Relaxed);
}

/// Installs the logger. `GEARSHIFT_LOG` (env_logger syntax) overrides the configured level.
pub fn init(default: log::LevelFilter) {
    let mut b = env_logger::Builder::new();
    // The builder's own filter lets everything through; log::max_level does the filtering, so
    // the level can change once the config has been read.
    b.filter_level(log::LevelFilter::Trace);
    let spec = std::env::var("GEARSHIFT_LOG").ok();
    if let Some(spec) = &spec {
        b.parse_filters(spec);
    }
    b.format(|buf, record| {
        let g = GENERATION.load(Ordering::Relaxed);
        let ts = crate::status::rfc3339_ms(crate::spool::now_ms());
        let gen = if g == 0 {
            String::new()
        } else {
            format!(" g{g}")
        };
        writeln!(buf, "{ts} {:<5}{gen} {}", record.level(), record.args())
    });
    b.target(env_logger::Target::Stderr);
    if b.try_init().is_ok() && spec.is_none() {
        log::set_max_level(default);
    }
}

/// Applies the configured level (after the config is read); `GEARSHIFT_LOG` still wins.
pub fn set_level(level: log::LevelFilter) {
    if std::env::var_os("GEARSHIFT_LOG").is_none() {
        log::set_max_level(level);
    }
}
