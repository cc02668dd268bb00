//! TOML syntax errors told as the mistake a person made. The toml crate names what its parser
//! expected next ("invalid string; expected `\"`, `'`", "invalid array; expected `]`",
//! "expected newline, `#`"), or nothing at all, whatever the mistake was; these functions look
//! at the text where it stopped and say what is wrong there and how TOML writes it. Every word
//! they quote from the file is escaped and at most 60 characters long.

use super::messages::explain;

/// [`explain`] for an error at `span` of `text`, with the syntax errors told as the mistake.
pub(super) fn explain_at(
    message: &str,
    text: &str,
    span: Option<std::ops::Range<usize>>,
) -> String {
    let start = span.as_ref().map_or(text.len(), |s| s.start);
    let (before, rest) = (
        text.get(..start).unwrap_or_default(),
        text.get(start..).unwrap_or_default(),
    );
    // The parser stops at such a character, or just past it.
    let last = before
        .char_indices()
        .next_back()
        .map_or("", |(i, _)| &text[i..]);
    if let Some(said) = control_character(rest).or_else(|| control_character(last)) {
        return said;
    }
    if let Some(said) = span.as_ref().and_then(|_| array_of_tables(rest)) {
        return said;
    }
    if message.trim().is_empty() {
        // The toml crate says nothing for a key whose value the file ends before.
        return if before.trim_end().ends_with('=') && rest.trim().is_empty() {
            missing_value(true)
        } else {
            "invalid TOML here".to_string()
        };
    }
    // The toml crate puts "expected ..." on a line of its own.
    let flat = message.trim().replace('\n', "; ");
    if span.is_some() {
        if let Some(said) = unreadable_value(&flat, before, rest)
            .or_else(|| unreadable_list(&flat, rest))
            .or_else(|| misplaced(&flat, before, rest))
            .or_else(|| dotted_table(&flat, before, rest))
        {
            return said;
        }
    }
    let explained = explain(message, rest);
    if flat != "expected `.`, `=`" {
        return explained;
    }
    if rest
        .strip_prefix('.')
        .is_some_and(|after| after.trim_start().starts_with('=') || after.trim().is_empty())
    {
        return "a name is missing after this `.` (a dotted key joins names: a.b = 1)".into();
    }
    if rest.starts_with(':') {
        format!("{explained} (`key: value` is YAML; TOML writes `key = value`)")
    } else {
        format!("{explained} (TOML writes a key and its value as `key = value`, one to a line)")
    }
}

/// A key that takes one value, made a table by a dotted key (`dir.x = 1` under `[source]`, or
/// `[source.dir.x]`): the spanned value's reader takes the table's first key for its own, and
/// serde said "expected a borrowed string, not the string \"x\"" at `x`.
fn dotted_table(message: &str, before: &str, rest: &str) -> Option<String> {
    if !message.contains("expected a borrowed string") {
        return None;
    }
    let line = before.rsplit('\n').next().unwrap_or_default();
    let parent = line.trim_end().strip_suffix('.')?.trim_end();
    let parent = parent
        .rsplit(['.', '[', ' ', '\t'])
        .next()
        .unwrap_or_default();
    let child: String = first_word(rest).chars().take_while(|&c| c != '.').collect();
    if parent.is_empty() || child.is_empty() {
        return Some(
            "a dotted key makes a table of a key that takes one value: write key = value".into(),
        );
    }
    let (parent, child) = (name_shown(parent), name_shown(&child));
    Some(format!(
        "`{parent}.{child}` makes `{parent}` a table (a dotted key), and {parent} takes one value, not a table: write {parent} = ..."
    ))
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

/// A character TOML allows nowhere, not even in a comment or a string, where the parser stopped
/// (it said the comment or string ended there, or nothing): a NUL, an escape sequence a
/// terminal's colours left behind, a lone carriage return.
fn control_character(rest: &str) -> Option<String> {
    let c = rest.chars().next()?;
    if c == '\r' && !rest[1..].starts_with('\n') {
        return Some(
            "a carriage return without a line feed after it (a line ends in \\n or \\r\\n)"
                .to_string(),
        );
    }
    ((c < ' ' && !"\t\n\r".contains(c)) || c == '\x7f').then(|| {
        format!(
            "a control character (U+{:04X}) is not allowed in TOML, even in a comment or a string (tabs and line ends are the only ones)",
            u32::from(c)
        )
    })
}

/// The toml crate's words for a value or a string it cannot read told as the mistake: a bare
/// word where a string goes, a stray character before a string, a second `=`, no value at all,
/// a string not closed, an escape a `"..."` string does not have (a Windows path).
fn unreadable_value(message: &str, before: &str, rest: &str) -> Option<String> {
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
        if message == format!("invalid multiline {}", &kind["invalid ".len()..])
            && rest.trim().is_empty()
        {
            let three = quote.repeat(3);
            return Some(format!(
                "the string's closing `{three}` is missing: the file ends in it (written only in part?)"
            ));
        }
    }
    if message.starts_with("invalid unicode") {
        let (_, after) = before.rsplit_once('\\')?;
        let (u, digits) = if after.starts_with('U') {
            ("U", "eight")
        } else {
            ("u", "four")
        };
        return Some(format!(
            "`\\{u}` begins a Unicode escape of {digits} hex digits: {BACKSLASH}"
        ));
    }
    if message.starts_with("invalid escape sequence") {
        // The parser stops after the escape (or at its second character).
        let (_, after) = before.rsplit_once('\\')?;
        let escaped = after.chars().next().or_else(|| rest.chars().next())?;
        let escaped = crate::text::escape(&escaped.to_string()).into_owned();
        return Some(format!("`\\{escaped}` is no escape: {BACKSLASH}"));
    }
    if !message.starts_with("invalid string") {
        return None;
    }
    let line = first_line(rest);
    if line.starts_with('=') {
        return Some("one `=` between a key and its value (`key = value`)".to_string());
    }
    if line.is_empty() || line.starts_with('#') {
        return Some(missing_value(rest.trim().is_empty()));
    }
    let word = first_word(line);
    match line.chars().next() {
        Some(c) if word.is_empty() => Some(cannot_begin(c)),
        _ => Some(no_toml_value(&word)),
    }
}

/// How a backslash is written (a Windows path in a `"..."` string).
const BACKSLASH: &str = "in a \"...\" string a backslash is written `\\\\`, or the string in single quotes ('...', where nothing is escaped)";

/// The rest of the line `rest` begins, trimmed.
fn first_line(rest: &str) -> &str {
    rest.split('\n').next().unwrap_or_default().trim()
}

/// The first word of `line`: what a message may quote (at most 60 characters).
fn first_word(line: &str) -> String {
    line.chars()
        .take_while(|c| !c.is_whitespace() && !",]}#=".contains(*c))
        .take(60)
        .collect()
}

/// The word the parser stopped in, `before` it and `rest` from it (a value's whole word, at
/// most 60 characters).
fn word_at(before: &str, rest: &str) -> String {
    let head = before
        .rsplit(|c: char| c.is_whitespace() || c == '=')
        .next()
        .unwrap_or_default();
    head.chars()
        .chain(first_word(rest).chars())
        .take(60)
        .collect()
}

/// The key and table of the parser's "`KEY` in table `TABLE`" (or "in document root"): split
/// at the last quoting, since a quoted key may hold a backtick.
fn key_in_table(m: &str) -> Option<(&str, Option<&str>)> {
    let m = m.strip_prefix('`')?;
    if let Some((key, table)) = m.rsplit_once("` in table `") {
        return Some((key, Some(table.strip_suffix('`')?)));
    }
    let key = m
        .strip_suffix("` in document root")
        .or_else(|| m.strip_suffix('`'))?;
    Some((key, None))
}

/// A word from the file in a message's quoting, escaped: in backticks, or in double quotes if
/// it holds a backtick itself (`` `a`b` `` reads as two quoted words).
fn code(word: &str) -> String {
    let word = crate::text::escape(word);
    match word.contains('`') {
        true => format!("\"{word}\""),
        false => format!("`{word}`"),
    }
}

/// A key's or table's name from the file, as a message shows it: escaped, and at most 60
/// characters (a name is the file's text, of any length).
fn name_shown(name: &str) -> String {
    let mut shown: String = name.chars().take(60).collect();
    if shown.len() < name.len() {
        shown.push('…');
    }
    crate::text::escape(&shown).into_owned()
}

/// A bare word where a value goes: a string without its opening quote, or after a stray
/// character, or no string at all.
fn no_toml_value(word: &str) -> String {
    if let Some(at) = word.find(['"', '\'']).filter(|&at| at > 0) {
        let (stray, quote) = word.split_at(at);
        if quote.len() == 1 {
            let stray = crate::text::escape(stray);
            return format!("the string's opening `{quote}` is missing: {quote}{stray}{quote}");
        }
        let quote = &quote[..1];
        return format!(
            "{} before the string's opening `{quote}`: a string begins with its quote",
            code(stray)
        );
    }
    let digits = word.trim_start_matches(['+', '-']).as_bytes();
    if digits.first() == Some(&b'0') && digits.get(1).is_some_and(u8::is_ascii_digit) {
        return format!(
            "{} begins with a 0 before its other digits, which TOML does not allow: 7 (0o7 for an octal number)",
            code(word)
        );
    }
    format!(
        "{} is no TOML value: a string is written in quotes (\"{}\"); numbers, true and false without",
        code(word),
        crate::text::escape(word)
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
    let line = first_line(rest);
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
        Some(c) if word.is_empty() => Some(cannot_begin(c)),
        _ => Some(no_toml_value(&word)),
    }
}

/// Punctuation where a value goes.
fn cannot_begin(c: char) -> String {
    format!(
        "a value cannot begin with {}: a string is written in quotes (\"...\"); numbers, true and false without",
        code(&c.to_string())
    )
}

/// Something where a line should end or a name should be: a second value after a key's value
/// (or letters glued to a number), a key after a table header, a header not closed, a name
/// left out.
fn misplaced(message: &str, before: &str, rest: &str) -> Option<String> {
    let said = match message {
        "expected newline, `#`" => {
            let glued = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
            if glued(before.chars().next_back()) && glued(rest.chars().next()) {
                return Some(no_toml_value(&word_at(before, rest)));
            }
            if glued(before.chars().next_back()) && rest.starts_with(['+', '-', '*', '/', '%']) {
                return Some(format!(
                    "{} is no TOML value: a number is written as it is, TOML does no arithmetic",
                    code(&word_at(before, rest))
                ));
            }
            let list = match before.trim_end().ends_with(['"', '\'']) {
                true => "[\"a\", \"b\"]",
                false => "[2, 3]",
            };
            return Some(format!(
                "one value to a key, then the line ends (or a `#` comment begins); several values are a list in brackets: {list}"
            ));
        }
        "invalid table header; expected newline, `#`" => {
            "a table header stands alone on its line: what follows it goes on the next"
        }
        "invalid table header; expected `.`, `]`" if first_line(rest).contains(']') => {
            "a table's name is one word of letters, digits, `_` and `-`, or a string in quotes: [worker], [\"a name\"]"
        }
        "invalid table header; expected `.`, `]`" => {
            "the table header's closing `]` is missing (a header is `[name]`, alone on its line)"
        }
        "invalid table header; expected `.`, `]]`" => {
            "the header's closing `]]` is missing; and `[[name]]` heads an array of tables, which this config has none of: a table is written [name]"
        }
        "invalid inline table; expected `}`" => inline_table(rest),
        "invalid integer; expected digit" if before.ends_with('_') => {
            "an underscore in a number stands between two digits: 1_000"
        }
        "invalid floating-point number; expected digit"
        | "invalid floating-point number; expected digit, digit"
            if before.ends_with('_') =>
        {
            "an underscore in a number stands between two digits: 1_000.5"
        }
        "invalid floating-point number" if before.ends_with(['e', 'E', '+', '-']) => {
            "an exponent's digits follow its `e` (and its sign): 1e6, 2.5e-3"
        }
        "invalid floating-point number" => {
            let word = first_word(rest);
            if word.replace('_', "").parse::<f64>().is_ok_and(f64::is_infinite) {
                return Some(format!(
                    "{} is beyond the largest number TOML holds (about 1.8e308)",
                    code(&word)
                ));
            }
            return Some(no_toml_value(&word));
        }
        m if m.starts_with("invalid time") || m.starts_with("invalid date-time") => {
            let word = word_at(before, rest);
            return Some(format!(
                "{} reads as a date or a time of day, which no setting takes: a number has no `:` \
                 or `-` in it, and a string is written in quotes",
                code(&word)
            ));
        }
        "invalid integer; expected leading digit" if rest.starts_with('_') => {
            return Some(no_toml_value(&first_word(rest)));
        }
        "invalid table header" if rest.trim_end() == "[" => {
            "the file ends in a table header's `[`: a header is `[name]`, alone on its line"
        }
        "invalid floating-point number; expected leading digit" => {
            "a number begins with a digit: 0.5"
        }
        "invalid floating-point number; expected digit" if before.ends_with('.') => {
            "a digit follows a decimal point: 1.0"
        }
        "invalid hexadecimal integer; expected digit" if before.ends_with('_') => {
            "an underscore in a number stands between two digits: 0xff_ff"
        }
        "invalid octal integer; expected digit" if before.ends_with('_') => {
            "an underscore in a number stands between two digits: 0o7_777"
        }
        "invalid binary integer; expected digit" if before.ends_with('_') => {
            "an underscore in a number stands between two digits: 0b1111_0000"
        }
        "invalid hexadecimal integer" => {
            "`0x` begins a hexadecimal number, and its digits (0-9, a-f) follow it: 0x1f"
        }
        "invalid octal integer" => {
            "`0o` begins an octal number, and its digits (0-7) follow it: 0o17"
        }
        "invalid binary integer" => {
            "`0b` begins a binary number, and its digits (0, 1) follow it: 0b101"
        }
        "invalid integer" if before.ends_with(['+', '-']) || rest.starts_with(['+', '-']) => {
            "a sign goes right before a number's digits: -1, +1"
        }
        "invalid key" => {
            "a name is missing here (a key or a table's name: letters, digits, `_` and `-`, or a string in quotes)"
        }
        _ => return twice_or_missing(message, rest),
    };
    Some(said.to_string())
}

/// The parser's "invalid inline table; expected `}`" told as the mistake.
fn inline_table(rest: &str) -> &'static str {
    // The parser stops at the comma.
    if rest
        .strip_prefix(',')
        .is_some_and(|r| r.trim_start().starts_with('}'))
    {
        "no comma after an inline table's last item: { key = \"value\", other = 1 }"
    } else if first_line(rest).is_empty() {
        "the inline table's closing `}` is missing: an inline table is written on one line, { key = \"value\", other = 1 }"
    } else {
        "a comma is missing between an inline table's items: { key = \"value\", other = 1 }"
    }
}

/// A header `[[name]]` where the parser stopped: an array of tables, for a key that takes a
/// table (or a number: serde's words then name what the key is, not the mistake).
fn array_of_tables(rest: &str) -> Option<String> {
    let name = first_line(rest)
        .strip_prefix("[[")?
        .split_once("]]")?
        .0
        .trim();
    let name = name_shown(name);
    Some(format!(
        "`[[{name}]]` heads an array of tables, which this config has none of: a table is written [{name}]"
    ))
}

/// serde's and the parser's words for a table or a key written twice, or a key a table needs
/// and lacks, with the table named as the file writes it.
fn twice_or_missing(message: &str, rest: &str) -> Option<String> {
    if let Some(m) = message.strip_prefix("invalid table header; duplicate key ") {
        // "duplicate key `tls` in table `source`", or "... in document root".
        let (key, table) = key_in_table(m)?;
        let name = table.map_or_else(|| key.to_string(), |t| format!("{t}.{key}"));
        return Some(format!(
            "the table [{}] is written twice (all its keys go under one header)",
            name_shown(&name)
        ));
    }
    if let Some(m) = message.strip_prefix("duplicate key ") {
        let (key, table) = key_in_table(m)?;
        let key = code(&name_shown(key));
        return Some(match table {
            Some(table) => format!("{key} is set twice in [{}]", name_shown(table)),
            None => format!("{key} is set twice"),
        });
    }
    let key = message.strip_prefix("missing field `")?.strip_suffix('`')?;
    let key = code(&name_shown(key));
    let header = first_line(rest)
        .strip_prefix('[')
        .and_then(|h| h.split_once(']'))
        .map(|(name, _)| name_shown(name.trim()));
    Some(match header {
        Some(table) => format!("[{table}] needs the key {key}"),
        None => format!("the key {key} is missing here"),
    })
}
