//! Where a config error is: the file, its bytes, its directory, for `file:line:col` and hints.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::messages::line_col;
use super::{Dur, Limit};
use crate::error::{Error, Result};
use crate::text::ShowPath;

/// The longest config error message (the value it quotes is the file's text, of any length).
const MAX_MESSAGE: usize = 2048;

/// What every check needs to say where: the file, its bytes, its directory (relative paths).
pub(super) struct Cx<'a> {
    pub(super) path: &'a Path,
    pub(super) bytes: &'a [u8],
    pub(super) base: &'a Path,
}

impl Cx<'_> {
    /// `file:line:col` of a key's value, for errors found later (a user that does not exist).
    pub(super) fn where_is(&self, span: Range<usize>) -> String {
        let (line, col) = line_col(self.bytes, span.start);
        format!("{}:{line}:{col}", self.path.shown())
    }

    /// A config error at `span` (1:1 when none).
    pub(super) fn located(&self, span: Option<Range<usize>>, msg: &str) -> Error {
        let (line, col) = span.map_or((1, 1), |s| line_col(self.bytes, s.start));
        let msg = crate::text::cut(msg, MAX_MESSAGE);
        Error::Config(format!("{}:{line}:{col}: {msg}", self.path.shown()))
    }

    /// A directory key, relative to the config's directory. Not empty: that would be the
    /// config's own directory (a template's unset variable), which root must not hand to the
    /// worker's user or fill with the worker's files.
    pub(super) fn dir(&self, v: &Spanned<PathBuf>, key: &str) -> Result<PathBuf> {
        if v.get_ref().as_os_str().is_empty() {
            return Err(self.located(
                Some(v.span()),
                &format!("{key} must not be empty (that would be the config's own directory): give it a directory of its own"),
            ));
        }
        Ok(self.base.join(v.get_ref()))
    }

    /// A network wait or backoff (`io_timeout`, `reconnect_max`): at least 100 ms, and at most
    /// an hour, so that a slip ("30d" for "30s") cannot leave a lane days between reconnects.
    pub(super) fn network_wait(&self, v: &Spanned<Dur>, key: &str) -> Result<Duration> {
        let t = v.get_ref().0;
        if t < Duration::from_millis(100) || t > Duration::from_secs(3600) {
            Err(self.located(
                Some(v.span()),
                &format!("{key} must be between 100ms and 1h"),
            ))
        } else {
            Ok(t)
        }
    }

    pub(super) fn nonzero_limit(&self, v: &Spanned<Limit>) -> Result<Option<Duration>> {
        match v.get_ref().0 {
            Some(t) if t.is_zero() => Err(self.located(
                Some(v.span()),
                "a timeout of 0 would fail every job: give a duration such as \"30s\" (or \"none\" for no limit)",
            )),
            t => Ok(t),
        }
    }

    /// `[source] busy_poll`: at most 1 ms (a window longer than a round trip only burns CPU).
    pub(super) fn busy_poll(&self, v: &Spanned<Dur>) -> Result<Duration> {
        let t = v.get_ref().0;
        if t > Duration::from_millis(1) {
            return Err(self.located(
                Some(v.span()),
                "busy_poll is at most \"1ms\" (\"0\" turns it off; the default is \"100us\")",
            ));
        }
        Ok(t)
    }

    pub(super) fn in_range(&self, v: &Spanned<u64>, key: &str, min: u64, max: u64) -> Result<u64> {
        let n = *v.get_ref();
        if (min..=max).contains(&n) {
            Ok(n)
        } else {
            Err(self.located(
                Some(v.span()),
                &format!("{key} must be between {min} and {max}, not {n}"),
            ))
        }
    }
}
