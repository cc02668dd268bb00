//! Text that came from outside (a server's error, a job's error or output, a file name in a
//! directory the worker's user writes) made safe for where a person or a log parser reads it:
//! control characters (C0, DEL, C1) and the Unicode bidirectional overrides are written as
//! escapes, so such text cannot forge a log line, move a terminal's cursor, set its title or
//! reorder what is shown. Raw bytes go only where raw bytes were asked for (a pipe, a result
//! file). A leaf module.

use std::borrow::Cow;
use std::fmt::{self, Write as _};
use std::path::Path;

/// `s` with every character that could act on a terminal or split a line escaped (`\n`, `\r`,
/// `\t`, `\e`, `\xNN`, `\u{NNNN}`); borrowed when there is nothing to escape.
pub fn escape(s: &str) -> Cow<'_, str> {
    if !s.chars().any(needs_escape) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if !needs_escape(c) {
            out.push(c);
            continue;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\x1b' => out.push_str("\\e"),
            c if (c as u32) < 0x100 => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => {
                let _ = write!(out, "\\u{{{:04x}}}", c as u32);
            }
        }
    }
    Cow::Owned(out)
}

/// [`escape`] line by line: the line breaks `s` was written with are kept (a message with a
/// hint on a line of its own), every other control character escaped.
pub fn escape_lines(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| c != '\n' && needs_escape(c)) {
        return Cow::Borrowed(s);
    }
    Cow::Owned(s.split('\n').map(escape).collect::<Vec<_>>().join("\n"))
}

/// Serialized JSON with the characters [`escape`] escapes and JSON leaves raw (DEL, C1, the
/// bidirectional overrides) written as `\uXXXX`: the same document to a parser, inert where a
/// person reads it (`tail -f` of a JSON log, `status --json` at a terminal). JSON escapes the
/// other control characters itself; these can stand only inside its strings, where an escape
/// means the same character.
pub fn json_inert(json: String) -> String {
    if !json.chars().any(needs_escape) {
        return json;
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        if needs_escape(c) {
            let _ = write!(out, "\\u{:04x}", c as u32);
        } else {
            out.push(c);
        }
    }
    out
}

/// Bytes (not necessarily UTF-8) as escaped text: the valid parts [`escape`]d, each byte of
/// invalid UTF-8 as `\xNN` (so a file name can still be told from another, and typed).
pub fn escape_bytes(b: &[u8]) -> String {
    // The `\xNN` written for invalid bytes hold no character `escape` changes.
    escape(&invalid_as_hex(b)).into_owned()
}

/// Bytes as text: the valid UTF-8 as it is, each byte of invalid UTF-8 as `\xNN` (for JSON,
/// which escapes control characters by its own rules but cannot hold such bytes).
pub fn invalid_as_hex(b: &[u8]) -> String {
    let mut out = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        out.push_str(chunk.valid());
        for byte in chunk.invalid() {
            let _ = write!(out, "\\x{byte:02x}");
        }
    }
    out
}

/// A path as a message shows it: [`escape_bytes`] of its bytes. `Path::display` keeps line
/// breaks and control characters (which the CLI's `escape_lines` keeps too, for messages with
/// a hint on a line of their own) and shows invalid UTF-8 as U+FFFD.
pub struct Shown<'a>(&'a Path);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&escape_bytes(self.0.as_os_str().as_encoded_bytes()))
    }
}

/// `.shown()` on a path, where a message would use `.display()`.
pub trait ShowPath {
    /// The path escaped for a person or a log parser (see [`Shown`]).
    fn shown(&self) -> Shown<'_>;
}

impl ShowPath for Path {
    fn shown(&self) -> Shown<'_> {
        Shown(self)
    }
}

fn needs_escape(c: char) -> bool {
    let u = c as u32;
    u < 0x20
        || (0x7f..=0x9f).contains(&u)
        || (0x202a..=0x202e).contains(&u)
        || (0x2066..=0x2069).contains(&u)
}

/// `s` at most about `most` bytes long: its beginning and its end (where a message's hint is),
/// and how much was cut between them. Text from outside (a 2 MB server name in a config) must
/// not make a message nobody can read, nor a status document no client takes.
pub fn cut(s: &str, most: usize) -> Cow<'_, str> {
    if s.len() <= most {
        return Cow::Borrowed(s);
    }
    let boundary = |mut i: usize| {
        while !s.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let head = boundary(most * 3 / 4);
    let tail = boundary(s.len() - most / 4);
    Cow::Owned(format!(
        "{} [... {} bytes cut ...] {}",
        &s[..head],
        tail - head,
        &s[tail..]
    ))
}

/// The first `most` of `names`, comma-separated, and how many more there are: a list that
/// goes into every such error (a job's stored result, a log line) stays short however many
/// names there are.
pub fn some_of(names: &[String], most: usize) -> String {
    let shown = names.iter().take(most).map(String::as_str);
    let mut out = shown.collect::<Vec<_>>().join(", ");
    if names.len() > most {
        out.push_str(&format!(" and {} more", names.len() - most));
    }
    out
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing to a String cannot fail.
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// A job's bytes as stdout gets them: as they are for a pipe or a file; escaped for a `person`
/// at a terminal (a job or another client could retitle or clear it), and for the whole result
/// (`last`) the prompt on a line of its own.
pub fn for_stdout(bytes: &[u8], person: bool, last: bool) -> std::borrow::Cow<'_, [u8]> {
    if !person {
        return std::borrow::Cow::Borrowed(bytes);
    }
    let mut text = crate::text::escape_bytes(bytes);
    if last && !text.ends_with('\n') {
        text.push('\n');
    }
    std::borrow::Cow::Owned(text.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn some_of_a_list_names_the_first_and_counts_the_rest() {
        let names: Vec<String> = (0..12).map(|i| format!("f{i}")).collect();
        assert_eq!(some_of(&names[..3], 3), "f0, f1, f2");
        assert_eq!(some_of(&names, 3), "f0, f1, f2 and 9 more");
        assert_eq!(some_of(&[], 3), "");
    }
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn cut_keeps_both_ends_and_says_how_much_went() {
        assert_eq!(cut("short", 10), "short");
        let long = format!("begin {} end: the hint", "é".repeat(1000));
        let c = cut(&long, 100);
        assert!(c.len() < 140, "{c}");
        assert!(
            c.starts_with("begin ") && c.ends_with("end: the hint") && c.contains("bytes cut"),
            "{c}"
        );
    }

    #[test]
    fn escapes_what_acts_on_a_terminal_or_a_log() {
        let cases = [
            ("plain text, ünïcode", "plain text, ünïcode"),
            ("two\nlines", "two\\nlines"),
            ("\x1b]0;owned\x07title", "\\e]0;owned\\x07title"),
            ("\x1b[2J\r", "\\e[2J\\r"),
            ("del\x7f c1\u{9b}", "del\\x7f c1\\x9b"),
            ("bidi \u{202e}txt.exe", "bidi \\u{202e}txt.exe"),
            ("tab\there", "tab\\there"),
        ];
        for (input, want) in cases {
            assert_eq!(escape(input), want, "{input:?}");
        }
        assert!(matches!(escape("nothing"), Cow::Borrowed(_)));
        assert_eq!(escape_bytes(b"bad \xff\n"), "bad \\xff\\n");
        let path = std::ffi::OsStr::from_bytes(b"/srv/a\nb\x1b[2J\xff.toml");
        assert_eq!(
            Path::new(path).shown().to_string(),
            "/srv/a\\nb\\e[2J\\xff.toml"
        );
    }

    #[test]
    fn json_inert_escapes_what_json_leaves_raw_and_means_the_same() {
        let value = serde_json::json!({"m": "csi \u{9b}2J del \x7f rlo \u{202e}x \x1b nl\n"});
        let json = json_inert(value.to_string());
        assert!(!json.chars().any(needs_escape), "{json}");
        assert!(
            json.contains("\\u009b") && json.contains("\\u202e"),
            "{json}"
        );
        let back: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(back, value);
        let plain = String::from("{\"m\":\"ünïcode\"}");
        assert_eq!(json_inert(plain.clone()), plain);
    }

    #[test]
    fn escape_lines_keeps_the_line_breaks_and_escapes_the_rest() {
        assert_eq!(
            escape_lines("error \x1b[2J\nhint:\ttry\r"),
            "error \\e[2J\nhint:\\ttry\\r"
        );
        assert!(matches!(escape_lines("a\nb"), Cow::Borrowed(_)));
        // Already escaped text stays as it is.
        assert_eq!(escape_lines(&escape("\x1b")), "\\e");
    }
}
