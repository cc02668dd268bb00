//! Which `[source]` keys each source kind reads. A key of another kind would be taken and then
//! do nothing (`bind` under a `[source]` that names no `kind` serves no ZeroMQ at all), so it is
//! refused where it is written, as an unknown key is.

use std::collections::BTreeMap;

use serde::de::IgnoredAny;
use serde::Deserialize;
use toml::Spanned;

use super::cx::Cx;
use super::raw::SourceKind::{self, Amqp, Gearman, Spool, Zeromq};
use crate::error::Result;

/// Every `[source]` key and the kinds that read it (a unit test holds it to `RawSource`).
pub(super) const SOURCE_KEYS: &[(&str, &[SourceKind])] = &[
    ("kind", &[Spool, Gearman, Zeromq, Amqp]),
    ("max_attempts", &[Spool, Gearman, Zeromq, Amqp]),
    ("dir", &[Spool, Zeromq]),
    ("retain_results", &[Spool, Zeromq]),
    ("min_free", &[Spool, Zeromq]),
    ("fsync", &[Spool, Zeromq]),
    ("servers", &[Gearman]),
    ("client_id", &[Gearman]),
    ("exceptions", &[Gearman]),
    ("max_packet_bytes", &[Gearman]),
    ("io_timeout", &[Gearman, Amqp]),
    ("reconnect_max", &[Gearman, Amqp]),
    ("dead_peer_timeout", &[Gearman, Zeromq]),
    ("tls", &[Gearman, Amqp]),
    ("busy_poll", &[Gearman, Zeromq, Amqp]),
    ("bind", &[Zeromq]),
    ("reply", &[Zeromq]),
    ("allow_remote", &[Zeromq]),
    ("max_connections", &[Zeromq]),
    ("function", &[Zeromq, Amqp]),
    ("url", &[Amqp]),
    ("urls", &[Amqp]),
    ("queue", &[Amqp]),
    ("prefetch", &[Amqp]),
    ("heartbeat", &[Amqp]),
    ("declare", &[Amqp]),
    ("dedupe_ids", &[Amqp]),
    ("persistent_replies", &[Amqp]),
    ("consumer_timeout", &[Amqp]),
];

impl SourceKind {
    pub(super) fn name(self) -> &'static str {
        match self {
            Spool => "spool",
            Gearman => "gearman",
            Zeromq => "zeromq",
            Amqp => "amqp",
        }
    }
}

/// The keys written under `[source]`, each with where it is written (its table's other forms,
/// `[source.tls]` and `tls.ca_file = ...`, included).
#[derive(Deserialize)]
struct Written {
    #[serde(default)]
    source: BTreeMap<Spanned<String>, IgnoredAny>,
}

/// Refuses the first key (in the file's order) that `kind` does not read. `text` has already
/// been read as the config, so it parses; a key nobody reads was refused then.
pub(super) fn foreign_keys(cx: &Cx<'_>, text: &str, kind: SourceKind) -> Result<()> {
    let Ok(written) = toml::from_str::<Written>(text) else {
        return Ok(());
    };
    let kind_written = written.source.keys().any(|k| k.get_ref() == "kind");
    let first_foreign = (written.source.keys())
        .filter_map(|k| {
            let (_, kinds) = SOURCE_KEYS.iter().find(|(name, _)| name == k.get_ref())?;
            (!kinds.contains(&kind)).then_some((k, *kinds))
        })
        .min_by_key(|(k, _)| k.span().start);
    let Some((key, kinds)) = first_foreign else {
        return Ok(());
    };
    let readers: Vec<String> = kinds.iter().map(|k| format!("\"{}\"", k.name())).collect();
    let this = if kind_written {
        format!("this [source] is kind = \"{}\"", kind.name())
    } else {
        "this [source] names no kind, so it is the spool's".to_string()
    };
    Err(cx.located(
        Some(key.span()),
        &format!(
            "{name} is read only by kind = {readers}, and {this}: it would do nothing. Write kind = \"{first}\", or remove {name}",
            name = key.get_ref(),
            readers = readers.join(" or "),
            first = kinds.first().map_or("spool", |k| k.name()),
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table names every key `RawSource` takes (serde lists them in its unknown-key
    /// error), and no other.
    #[test]
    fn every_source_key_is_in_the_table() {
        let err = toml::from_str::<super::super::raw::RawConfig>("[source]\nno_such_key = 1\n")
            .err()
            .map(|e| e.message().to_string())
            .unwrap_or_default();
        let expected = err.split("expected one of").nth(1).unwrap_or("");
        let mut taken: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
        let mut listed: Vec<&str> = SOURCE_KEYS.iter().map(|(k, _)| *k).collect();
        taken.sort_unstable();
        listed.sort_unstable();
        assert!(taken.len() > 20, "{err}");
        assert_eq!(taken, listed);
    }
}
