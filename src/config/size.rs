//! `[source] min_free`: room the spool keeps for the results of the jobs it holds.

use std::fmt;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// How much of the spool's file system must stay free for a new job to be taken: bytes, or a
/// share of the file system's size. Results, retries and recovery may use it; new jobs may not,
/// so that a queue which grows until the disk is full still leaves room for its own results.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum MinFree {
    /// At least this many bytes free.
    Bytes(u64),
    /// At least this share (percent, 0 to 50) of the file system's size free.
    Percent(f64),
    /// Unset: 5% of the file system, at most 256 MiB (a large disk that other data
    /// fills to 96% still takes jobs; a small one keeps its share).
    #[default]
    Default,
}

/// The most the default keeps: room for the results of many jobs in flight, whatever the disk.
pub const DEFAULT_CAP: u64 = 256 << 20;

impl MinFree {
    /// The bytes to keep free on a file system of `total` bytes.
    pub fn of(self, total: u64) -> u64 {
        match self {
            MinFree::Bytes(b) => b,
            // At most 50% of a u64: the product fits, and the cast saturates anyway.
            MinFree::Percent(p) => (total as f64 * p / 100.0) as u64,
            MinFree::Default => MinFree::Percent(5.0).of(total).min(DEFAULT_CAP),
        }
    }
}

impl fmt::Display for MinFree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MinFree::Bytes(b) => write!(f, "{}", bytes(*b)),
            MinFree::Percent(p) => write!(f, "{p}%"),
            MinFree::Default => write!(f, "5% up to {} (the default)", bytes(DEFAULT_CAP)),
        }
    }
}

/// `n` bytes as a person reads them: `512 B`, `3.5 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// Parses `"5%"`, `"2.5%"`, `"64MiB"`, `"500 MB"`, `"1GiB"`, `"0"` (the same as `"0%"`: no
/// room kept), or a bare number of bytes.
pub fn parse_min_free(s: &str) -> std::result::Result<MinFree, String> {
    let t = s.trim();
    let invalid =
        || format!("invalid size \"{s}\" (examples: \"5%\", \"256MiB\", \"1GiB\", \"0\")");
    if let Some(p) = t.strip_suffix('%') {
        let p: f64 = p.trim().parse().map_err(|_| invalid())?;
        if !(0.0..=50.0).contains(&p) {
            return Err(format!(
                "\"{s}\": a share between 0% and 50% of the file system"
            ));
        }
        return Ok(MinFree::Percent(p));
    }
    let at = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(at);
    let n: f64 = num.parse().map_err(|_| invalid())?;
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1000,
        "KiB" => 1 << 10,
        "MB" => 1000 * 1000,
        "MiB" => 1 << 20,
        "GB" => 1000 * 1000 * 1000,
        "GiB" => 1 << 30,
        "TB" => 1000 * 1000 * 1000 * 1000,
        "TiB" => 1 << 40,
        other => {
            return Err(format!(
                "unknown size unit \"{other}\" in \"{s}\" (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB or %)"
            ))
        }
    };
    let b = n * scale as f64;
    if !b.is_finite() || b > (1u64 << 60) as f64 {
        return Err(format!("\"{s}\" is over the maximum of 1 EiB"));
    }
    Ok(MinFree::Bytes(b as u64))
}

impl<'de> Deserialize<'de> for MinFree {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<MinFree, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = MinFree;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"5%\", \"256MiB\" or a number of bytes")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<MinFree, E> {
                u64::try_from(v)
                    .map(MinFree::Bytes)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<MinFree, E> {
                parse_min_free(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_shares_parse_and_the_rest_is_refused_with_examples() {
        assert_eq!(parse_min_free("5%"), Ok(MinFree::Percent(5.0)));
        assert_eq!(parse_min_free(" 2.5 % "), Ok(MinFree::Percent(2.5)));
        assert_eq!(parse_min_free("64MiB"), Ok(MinFree::Bytes(64 << 20)));
        assert_eq!(parse_min_free("500 MB"), Ok(MinFree::Bytes(500_000_000)));
        assert_eq!(parse_min_free("1.5GiB"), Ok(MinFree::Bytes(3 << 29)));
        assert_eq!(parse_min_free("0"), Ok(MinFree::Bytes(0)));
        assert!(parse_min_free("60%").unwrap_err().contains("50%"));
        assert!(parse_min_free("5 parsecs")
            .unwrap_err()
            .contains("unknown size unit"));
        assert!(parse_min_free("lots").unwrap_err().contains("examples"));
        assert!(parse_min_free("99999999TiB")
            .unwrap_err()
            .contains("maximum"));
        assert_eq!(MinFree::Percent(5.0).of(2 << 20), 104_857);
        assert_eq!(MinFree::Default.of(2 << 20), 104_857);
        assert_eq!(MinFree::Default.of(2 << 40), DEFAULT_CAP);
        assert_eq!(MinFree::Bytes(7).of(1 << 40), 7);
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 19), "1.5 MiB");
    }
}
