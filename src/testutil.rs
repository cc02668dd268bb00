//! Helpers for the unit tests (compiled only for them).

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

/// A fresh, empty directory (0755) for one test: `$TMPDIR/gs-WHAT-NAME-PID`, emptied first.
#[allow(clippy::unwrap_used)]
pub(crate) fn tempdir(what: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("gs-{what}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}
