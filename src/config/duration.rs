//! Durations as config.toml and the command line write them, bounded so that time arithmetic
//! on them cannot overflow.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;

/// A duration written as `"500ms"`, `"30s"`, `"5m"`, `"2h"`, `"7d"`, `"1h30m"`, or a number of seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Dur, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"30s\", \"500ms\", \"5m\" or a number of seconds")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Dur, E> {
                let secs =
                    u64::try_from(v).map_err(|_| E::custom("a duration cannot be negative"))?;
                bounded(Duration::from_secs(secs), &v.to_string())
                    .map(Dur)
                    .map_err(E::custom)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<Dur, E> {
                Duration::try_from_secs_f64(v)
                    .map_err(|_| E::custom(format!("{v} is not a valid number of seconds")))
                    .and_then(|d| bounded(d, &v.to_string()).map_err(E::custom))
                    .map(Dur)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Dur, E> {
                parse_duration(v).map(Dur).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// A time limit: a duration as [`Dur`] writes it, or `"none"` for no limit at all (an explicit
/// choice: nothing runs unbounded by default).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit(pub Option<Duration>);

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Limit, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Limit;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"30s\" or \"5m\", or \"none\" for no limit")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Limit, E> {
                Dur::deserialize(de::value::I64Deserializer::<E>::new(v)).map(|d| Limit(Some(d.0)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<Limit, E> {
                Dur::deserialize(de::value::F64Deserializer::<E>::new(v)).map(|d| Limit(Some(d.0)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Limit, E> {
                if v.trim() == "none" {
                    return Ok(Limit(None));
                }
                parse_duration(v).map(|d| Limit(Some(d))).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// The largest `max_payload_bytes` (1 GiB): a job is held in memory.
pub const MAX_PAYLOAD: u64 = 1 << 30;

/// Parses `"100us"`, `"250ms"`, `"30s"`, `"5m"`, `"2h"`, `"7d"`, a bare number of seconds, or
/// pieces of these, the largest unit first (`"1h30m"`, `"1m 30s"`).
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let s = s.trim();
    let invalid =
        || format!("invalid duration \"{s}\" (examples: \"500ms\", \"30s\", \"5m\", \"1h30m\")");
    let mut rest = s;
    let mut secs = 0.0;
    let mut last_scale = f64::INFINITY;
    loop {
        let at = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (num, after) = rest.split_at(at);
        let n: f64 = num.parse().map_err(|_| invalid())?;
        let after = after.trim_start();
        let at = after.find(|c: char| c.is_ascii_digit() || c.is_whitespace());
        let (unit, after) = after.split_at(at.unwrap_or(after.len()));
        let scale = match unit {
            "us" | "µs" => 0.000_001,
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            "" if rest.len() == s.len() && after.trim().is_empty() => 1.0,
            "" => {
                return Err(format!(
                    "\"{s}\": {num} has no unit (use us, ms, s, m, h or d after each number)"
                ))
            }
            other => {
                return Err(format!(
                    "unknown duration unit \"{other}\" in \"{s}\" (use us, ms, s, m, h or d)"
                ))
            }
        };
        if scale >= last_scale {
            return Err(format!(
                "\"{s}\": write the larger unit first (as in \"1h30m\")"
            ));
        }
        last_scale = scale;
        secs += n * scale;
        rest = after.trim_start();
        if rest.is_empty() {
            break;
        }
    }
    match Duration::try_from_secs_f64(secs) {
        Ok(d) => bounded(d, s),
        // Not negative, not NaN (only digits and dots were parsed): too large to hold.
        Err(_) => Err(format!("duration \"{s}\" is over the maximum of 3650d")),
    }
}

/// The longest duration anything accepts: time arithmetic on it (deadlines, splay) can then
/// never overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(3650 * 86400);

pub(super) fn bounded(d: Duration, written: &str) -> std::result::Result<Duration, String> {
    if d > MAX_DURATION {
        Err(format!(
            "duration \"{written}\" is over the maximum of 3650d"
        ))
    } else {
        Ok(d)
    }
}
