//! Time as the daemon reads and prints it: wall-clock milliseconds for records and status,
//! CLOCK_MONOTONIC microseconds for measuring pauses, RFC 3339 for people, and the jitter that
//! spreads timers out. A leaf module.

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix time in milliseconds.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// CLOCK_MONOTONIC in microseconds: the same clock before and after execve.
pub fn monotonic_us() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000
    })
}

/// `7d`, `3h`, `90s`: a whole number of seconds in the largest unit that divides it.
pub fn human_secs(secs: u64) -> String {
    match secs {
        0 => "0s".into(),
        s if s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A duration as people write it: `10m`, `3s`, `300ms`, `1.5s`, `0s` (never Rust's `0ns`).
pub fn human(d: std::time::Duration) -> String {
    match (d.as_secs(), d.subsec_nanos()) {
        (s, 0) => human_secs(s),
        (0, n) if n % 1_000_000 == 0 => format!("{}ms", n / 1_000_000),
        (0, _) => format!("{}µs", d.as_micros()),
        _ => format!("{:.1}s", d.as_secs_f64()),
    }
}

/// A random fraction in [0, 1), for splay and backoff jitter (not for secrets): each call
/// draws from the standard library's per-process random keys.
pub fn random_fraction() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(monotonic_us());
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// `2026-11-24T09:51:28.123Z` for unix milliseconds.
pub fn rfc3339_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (y, m, d) = civil_from_days((secs / 86400) as i64);
    let s = secs % 86400;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s / 60 % 60,
        s % 60,
        ms % 1000
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar
/// (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::{human, rfc3339_ms};
    use std::time::Duration;

    #[test]
    fn durations_read_as_written() {
        let cases = [
            (Duration::ZERO, "0s"),
            (Duration::from_secs(600), "10m"),
            (Duration::from_secs(3), "3s"),
            (Duration::from_millis(300), "300ms"),
            (Duration::from_micros(1500), "1500µs"),
            (Duration::from_millis(1500), "1.5s"),
        ];
        for (d, want) in cases {
            assert_eq!(human(d), want, "{d:?}");
        }
    }

    #[test]
    fn timestamps() {
        let cases = [
            (0, "1970-01-01T00:00:00.000Z"),
            (951_782_400_000, "2000-02-29T00:00:00.000Z"),
            (1_795_513_888_123, "2026-11-24T09:51:28.123Z"),
            (4_107_542_399_999, "2100-02-28T23:59:59.999Z"),
        ];
        for (ms, want) in cases {
            assert_eq!(rfc3339_ms(ms), want, "{ms}");
        }
    }
}
