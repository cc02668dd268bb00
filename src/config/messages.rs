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

/// [`explain`] for an error at `span` of `text`: a key not followed by `=` also says how TOML
/// writes one (a YAML `key: value`, a key with a space in it, a file that is no TOML at all),
/// and a value the file ends before says so (the toml crate's message is empty there).
pub(super) fn explain_at(
    message: &str,
    text: &str,
    span: Option<std::ops::Range<usize>>,
) -> String {
    if message.trim().is_empty() {
        // The toml crate says nothing for a key whose value the file ends before.
        let start = span.map_or(text.len(), |s| s.start);
        let (before, after) = (text.get(..start), text.get(start..));
        let ended = before.is_some_and(|b| b.trim_end().ends_with('='))
            && after.is_some_and(|a| a.trim().is_empty());
        return if ended {
            missing_value(true)
        } else {
            "invalid TOML here".to_string()
        };
    }
    // The toml crate puts "expected ..." on a line of its own.
    let flat = message.trim().replace('\n', "; ");
    if let Some(said) = span.as_ref().and_then(|s| {
        let rest = text.get(s.start..)?;
        unreadable_value(message, rest).or_else(|| unreadable_list(&flat, rest))
    }) {
        return said;
    }
    match flat.as_str() {
        "expected newline, `#`" => {
            return "one value to a key, then the line ends (or a `#` comment begins); several values are a list in brackets: [2, 3]".to_string();
        }
        "invalid table header; expected newline, `#`" => {
            return "a table header stands alone on its line: what follows it goes on the next"
                .to_string();
        }
        _ => {}
    }
    let explained = explain(message);
    if message.trim() != "expected `.`, `=`" {
        return explained;
    }
    let at = span
        .and_then(|s| text.get(s.start..))
        .and_then(|t| t.chars().next());
    if at == Some(':') {
        format!("{explained} (`key: value` is YAML; TOML writes `key = value`)")
    } else {
        format!("{explained} (TOML writes a key and its value as `key = value`, one to a line)")
    }
}

/// A key with no value: `at_end`, the file ends there too (written only in part, most likely).
fn missing_value(at_end: bool) -> String {
    let said = "a value is missing after `=`";
    if at_end {
        format!("{said}: the file ends here (written only in part?)")
    } else {
        said.to_string()
    }
}

/// The toml crate's words for a value it cannot read ("invalid string; expected `\"`, `'`",
/// whatever the mistake) told as the mistake: a bare word where a string goes, a second `=`,
/// no value at all, a string not closed on its line. `rest`: the text from the error on.
fn unreadable_value(message: &str, rest: &str) -> Option<String> {
    let message = message.trim();
    for (kind, quote) in [
        ("invalid basic string", "\""),
        ("invalid literal string", "'"),
    ] {
        if message == kind {
            let three = quote.repeat(3);
            return Some(format!(
                "the string's closing `{quote}` is missing (a string ends on its line; `{three}` begins one over several lines)"
            ));
        }
    }
    if !message.starts_with("invalid string") {
        return None;
    }
    let line = rest.split('\n').next().unwrap_or_default().trim();
    if line.starts_with('=') {
        return Some("one `=` between a key and its value (`key = value`)".to_string());
    }
    if line.is_empty() || line.starts_with('#') {
        return Some(missing_value(rest.trim().is_empty()));
    }
    let word = first_word(line);
    if word.is_empty() {
        return None;
    }
    Some(no_toml_value(&word))
}

/// The first word of `line`: what a message may quote (at most 60 characters).
fn first_word(line: &str) -> String {
    line.chars()
        .take_while(|c| !c.is_whitespace() && !",]}#=".contains(*c))
        .take(60)
        .collect()
}

/// A bare word where a value goes.
fn no_toml_value(word: &str) -> String {
    let word = crate::text::escape(word);
    format!(
        "`{word}` is no TOML value: a string is written in quotes (\"{word}\"); numbers, true and false without"
    )
}

/// The toml crate's "invalid array; expected `]`" told as the mistake: a bare word among the
/// items, a missing comma, or a `]` missing before the next key (or the file's end).
fn unreadable_list(message: &str, rest: &str) -> Option<String> {
    if message != "invalid array; expected `]`" {
        return None;
    }
    let unclosed = "the list's closing `]` is missing";
    if rest.trim().is_empty() {
        return Some(format!(
            "{unclosed}: the file ends here (written only in part?)"
        ));
    }
    let line = rest.split('\n').next().unwrap_or_default().trim();
    let word = first_word(line);
    let after = line.get(word.len()..).unwrap_or_default().trim_start();
    if !word.is_empty() && (after.starts_with('=') || after.starts_with('.')) {
        return Some(format!("{unclosed} before this line"));
    }
    let scalar = ["true", "false", "inf", "nan"].contains(&word.as_str());
    match line.chars().next() {
        Some(c) if scalar || "\"'[{+-".contains(c) || c.is_ascii_digit() => {
            Some("a comma is missing between a list's items: [\"a\", \"b\"]".to_string())
        }
        _ if !word.is_empty() => Some(no_toml_value(&word)),
        _ => None,
    }
}

/// Rewrites serde's messages into ours, with a "did you mean" where a close name exists.
pub(super) fn explain(message: &str) -> String {
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
            return match closest(got, &expected) {
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
pub(super) fn closest<'a>(got: &str, candidates: &[&'a str]) -> Option<&'a str> {
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
