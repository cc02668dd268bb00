//! A file's identity (device, inode, size, modification time, mode): what tells that the file
//! at a path is another, or was written, renamed or chmod'ed. The deploy watch keeps it for the
//! binary across every exec (`restart::carried`), and the job lanes compare it with the file at
//! the binary's path now (`jobs::functions::candidate_pending`).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// A file's identity: any write, rename or chmod changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ident {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    pub mode: u32,
}

impl Ident {
    pub fn of(path: &Path) -> Option<Ident> {
        Some(Ident::of_meta(&std::fs::metadata(path).ok()?))
    }

    /// The identity of an open file (the one that was checked is the one exec'd).
    pub fn of_file(file: &std::fs::File) -> Option<Ident> {
        Some(Ident::of_meta(&file.metadata().ok()?))
    }

    fn of_meta(m: &std::fs::Metadata) -> Ident {
        Ident {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            // Wrapping: a time past 2262 (anyone may set one) overflows an i64 of nanoseconds.
            mtime_ns: m
                .mtime()
                .wrapping_mul(1_000_000_000)
                .wrapping_add(m.mtime_nsec()),
            mode: m.permissions().mode(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// A file at the binary's path with a modification time past 2262 (any user may set one):
    /// its identity overflowed (a panic of the control thread, or of a lane or the ZeroMQ
    /// ingress asking whether a candidate binary is pending, in a debug build).
    #[test]
    fn a_file_with_a_far_future_mtime_has_an_identity() {
        let dir = crate::testutil::tempdir("fileid", "mtime");
        let path = dir.join("gearshift");
        let file = std::fs::File::create(&path).unwrap();
        let far = std::time::UNIX_EPOCH + std::time::Duration::from_secs(10_000_000_000);
        file.set_modified(far).unwrap();
        let id = Ident::of(&path).unwrap();
        file.set_modified(far + std::time::Duration::from_secs(1))
            .unwrap();
        assert_ne!(Ident::of(&path), Some(id));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
