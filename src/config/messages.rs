//! Error messages a user can act on: `file:line:col` positions and "did you mean" hints.

/// 1-based line and column (in characters) of byte offset `at`.
pub(super) fn line_col(bytes: &[u8], at: usize) -> (usize, usize) {
    let before = &bytes[..at.min(bytes.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let line_start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let col = String::from_utf8_lossy(&before[line_start..])
        .chars()
        .count()
        + 1;
    (line, col)
}

/// A server's name written where the protocol that speaks to it goes (`kind = "rabbitmq"`),
/// which no spelling distance finds, and the kind meant.
const SPOKEN_BY: &[(&str, &str)] = &[
    ("rabbitmq", "amqp"),
    ("rabbit", "amqp"),
    ("amqps", "amqp"),
    ("lavinmq", "amqp"),
    ("0mq", "zeromq"),
    ("gearmand", "gearman"),
];

/// Rewrites serde's messages into ours, with a "did you mean" where a close name exists;
/// `rest` is the file's text from where the error points.
pub(super) fn explain(message: &str, rest: &str) -> String {
    let message = message.trim();
    for (prefix, what) in [("unknown field `", "key"), ("unknown variant `", "value")] {
        if let Some(rest) = message.strip_prefix(prefix) {
            let Some((got, tail)) = rest.split_once('`') else {
                break;
            };
            let expected: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
            let table = (what == "key" && expected.contains(&"worker"))
                .then(|| super::raw::table_of(got))
                .flatten();
            if let Some(table) = table {
                return format!("unknown key \"{got}\": it belongs in a table, under [{table}]");
            }
            let spoken = (what == "value")
                .then(|| SPOKEN_BY.iter().find(|(p, _)| got.eq_ignore_ascii_case(p)))
                .flatten()
                .map(|(_, kind)| *kind)
                .filter(|kind| expected.contains(kind));
            return match spoken.or_else(|| closest(got, &expected)) {
                Some(best) => format!("unknown {what} \"{got}\" (did you mean \"{best}\"?)"),
                None if expected.is_empty() => format!("unknown {what} \"{got}\""),
                None => format!(
                    "unknown {what} \"{got}\" (expected one of: {})",
                    expected.join(", ")
                ),
            };
        }
    }
    if let Some(said) = out_of_range(message) {
        return said;
    }
    if let Some(said) = not_a_list(message) {
        return said;
    }
    let message = wrong_type(message, rest).unwrap_or_else(|| message.to_string());
    // Rust type names mean nothing to someone writing TOML.
    let message = message
        .replace(
            "expected i64",
            "expected a whole number (written without quotes)",
        )
        .replace(
            "expected u64",
            "expected a whole number (written without quotes)",
        )
        .replace(
            "expected u32",
            "expected a whole number (written without quotes)",
        )
        .replace("expected f64", "expected a number (written without quotes)")
        .replace(
            "expected a boolean",
            "expected true or false (without quotes)",
        )
        .replace("expected a string", "expected a string (in quotes)")
        .replace(
            "expected path string",
            "expected a path (a string in quotes)",
        )
        .replace(
            "expected a sequence",
            "expected a list (in brackets: [\"a\", \"b\"])",
        );
    let message = tables_in_toml_words(&message);
    message.replace('\n', "; ")
}

/// The tables serde names by their Rust types (`expected struct RawWorker`), in TOML's words.
fn tables_in_toml_words(message: &str) -> String {
    const TABLES: [(&str, &str); 7] = [
        ("RawWorker", "[worker]"),
        ("RawSource", "[source]"),
        ("RawTls", "[source.tls]"),
        ("RawDeclare", "[source.declare]"),
        ("RawFunction", "[functions.NAME]"),
        ("RawLog", "[log]"),
        ("RawMetrics", "[metrics]"),
    ];
    let mut message = message.to_string();
    for (rust, toml) in TABLES {
        message = message.replace(
            &format!("expected struct {rust}"),
            &format!("expected a table: {toml} and its keys"),
        );
    }
    message
}

/// serde's "invalid type: GOT, expected WHAT" as "expected WHAT, not GOT", GOT in TOML's words
/// (serde said "map" for a table and for a date alike, "sequence" for a list), and a string
/// that holds what was expected told to lose its quotes.
fn wrong_type(message: &str, rest: &str) -> Option<String> {
    let (got, expected) = message
        .strip_prefix("invalid type: ")?
        .rsplit_once(", expected ")?;
    let quoted = |word: &str, got: &str| {
        got.strip_prefix(word)
            .and_then(|g| g.strip_prefix(" `"))
            .and_then(|g| g.strip_suffix('`'))
            .map(str::to_string)
    };
    let value = rest.trim_start();
    let found = if got == "map" && value.starts_with(|c: char| c.is_ascii_digit()) {
        "a date or a time".to_string()
    } else if got == "map" {
        "a table".to_string()
    } else if got == "sequence" {
        "a list".to_string()
    } else if let Some(n) = quoted("integer", got) {
        format!("the number {n}")
    } else if let Some(n) = quoted("floating point", got) {
        format!("the number {n}")
    } else if let Some(b) = quoted("boolean", got) {
        b
    } else if let Some(text) = got.strip_prefix("string ") {
        let inner = text.trim_matches('"');
        let bare = match expected {
            "i64" | "u64" | "u32" => inner.parse::<i64>().is_ok(),
            "f64" => inner.parse::<f64>().is_ok_and(f64::is_finite),
            "a boolean" => inner == "true" || inner == "false",
            _ => false,
        };
        return Some(match bare {
            true => format!("expected {expected}, not the string {text}: write {inner}"),
            false => format!("expected {expected}, not the string {text}"),
        });
    } else {
        got.to_string()
    };
    Some(format!("expected {expected}, not {found}"))
}

/// A single string where a list goes (`servers = "host:4730"`): shown as the list it should be.
fn not_a_list(message: &str) -> Option<String> {
    let quoted = message
        .strip_prefix("invalid type: string ")?
        .strip_suffix(", expected a sequence")?;
    Some(format!(
        "a list is written in brackets, even of one: [{quoted}]"
    ))
}

/// serde's and toml's words for a whole number the key's type cannot hold, in ours: the
/// number is whole, so "expected a whole number" would mislead.
fn out_of_range(message: &str) -> Option<String> {
    if message.starts_with("number too large to fit in target type") {
        return Some("number too large (TOML's whole numbers stop at 9223372036854775807)".into());
    }
    let rest = message.strip_prefix("invalid value: integer `")?;
    let (number, expected) = rest.split_once("`, expected ")?;
    let max = match expected.trim() {
        "u8" => u64::from(u8::MAX),
        "u16" => u64::from(u16::MAX),
        "u32" => u64::from(u32::MAX),
        "u64" | "usize" => u64::MAX,
        _ => return None,
    };
    Some(if number.starts_with('-') {
        format!("{number} is negative: a whole number of 0 or more is expected")
    } else {
        format!("{number} is too large here (at most {max})")
    })
}

/// The name `got` was meant to be: the one name it abbreviates (three letters or more, the
/// first the same, the rest in order: `zmq` for `zeromq`, where the nearest spelling was
/// `amqp`), else the nearest spelling within a third of the name.
pub(crate) fn closest<'a>(got: &str, candidates: &[&'a str]) -> Option<&'a str> {
    if got.chars().count() >= 3 {
        let mut abbreviated = candidates.iter().filter(|c| abbreviates(got, c));
        if let (Some(one), None) = (abbreviated.next(), abbreviated.next()) {
            return Some(one);
        }
    }
    candidates
        .iter()
        .map(|c| (strsim::levenshtein(got, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn abbreviates(short: &str, long: &str) -> bool {
    let mut rest = long.chars();
    short.len() < long.len()
        && short.chars().next() == long.chars().next()
        && short.chars().all(|c| rest.any(|l| l == c))
}
