//! The file in `jobs_dir` that would serve a function the running generation does not serve
//! yet (a deploy's new file, whose restart is still to come), looked up by name alone.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::text::ShowPath;

/// The function a file of this name in `jobs_dir` would serve, if it could serve one
/// (editors' backups and swap files, and hidden files, never do): the scan's rule and ours.
pub(super) fn function_of(file: &str) -> Option<&str> {
    if file.starts_with('.') || file.ends_with('~') || file.ends_with(".swp") {
        return None;
    }
    Path::new(file).file_stem()?.to_str()
}

/// A regular, executable file (links followed).
fn serves(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The file in `jobs_dir` that would serve a function once a generation scans it (a regular,
/// executable file of that name, links followed), if there is one: a job for a function the
/// running generation lacks waits for the restart a deploy's new file brings, rather than fail.
/// Only names are listed, no content read.
///
/// Names come from outside, as many as a client cares to send (the ZeroMQ ingress asks for
/// each message naming a function it does not serve, a lane for each such job: from an AMQP
/// publisher, a spool submitter), so the directory's names are listed once per change of the
/// directory, not once per name: a name no file has costs
/// one `stat` of the directory, one a file has a `stat` of that file. Measured: with 300 files in
/// `jobs_dir`, eight clients sending such names got 15.7k answers a second against 107k for an
/// empty `jobs_dir`, one listing a message (docs/measurements.md, "The ZeroMQ source").
///
/// A listing is kept only while the directory is unchanged (device, inode, change time: every
/// entry added, removed or renamed changes it, and unlike the modification time no one can set
/// it back, as `rsync -t` and `cp -p` do), and only if that change was a second old when it was
/// listed: two changes within one tick of the file system's clock share a time, and a listing
/// made between them must not be kept.
pub struct Offers {
    dir: PathBuf,
    kept: Mutex<Kept>,
    /// [`Offers::MAX_NAMES`] (fewer in tests).
    max_names: usize,
}

#[derive(Default)]
struct Kept {
    /// The directory's (device, inode, ctime s, ctime ns) when listed, if the listing may be
    /// kept (None: the next name lists again).
    key: Option<(u64, u64, i64, i64)>,
    /// Functions, each with the names of the files that could serve it (None: the directory
    /// could not be listed, or holds too many names).
    files: Option<HashMap<String, Vec<String>>>,
    /// A key not yet kept, and when it was first seen (monotonic time: a listing is kept once
    /// the directory has stayed unchanged that long, whatever its ctime says after a step of
    /// the wall clock).
    seen: Option<((u64, u64, i64, i64), Instant)>,
    /// Listings made so far (tests).
    listings: u64,
}

/// Whether a listing of a directory last changed at `ctime` (s, ns) may be kept: the change
/// is [`Offers::SETTLED`] old by the wall clock, or the directory was seen unchanged for as
/// long (`seen_for`; a ctime ahead of a clock stepped back is never old).
fn settled((s, ns): (i64, i64), now: SystemTime, seen_for: Duration) -> bool {
    let changed = u64::try_from(s)
        .ok()
        .map(|s| UNIX_EPOCH + Duration::new(s, ns.clamp(0, 999_999_999) as u32));
    seen_for >= Offers::SETTLED
        || changed
            .and_then(|c| now.duration_since(c).ok())
            .is_some_and(|age| age >= Offers::SETTLED)
}

impl Offers {
    /// Past this many names in `jobs_dir`, none are kept, and no name is looked up there.
    const MAX_NAMES: usize = 100_000;
    /// How old the directory's last change must be for its listing to be kept.
    const SETTLED: Duration = Duration::from_secs(1);

    pub fn new(dir: PathBuf) -> Offers {
        Offers {
            dir,
            kept: Mutex::new(Kept::default()),
            max_names: Self::MAX_NAMES,
        }
    }

    /// The file that would serve `function`.
    pub fn offers(&self, function: &str) -> Option<PathBuf> {
        crate::config::check_function_name(function).ok()?;
        let meta = fs::metadata(&self.dir).ok()?;
        let key = (meta.dev(), meta.ino(), meta.ctime(), meta.ctime_nsec());
        let mut kept = self.kept.lock().unwrap_or_else(|p| p.into_inner());
        if kept.key != Some(key) {
            let now = Instant::now();
            if kept.seen.is_none_or(|(k, _)| k != key) {
                kept.seen = Some((key, now));
            }
            let seen_for = kept.seen.map_or(Duration::ZERO, |(_, at)| now - at);
            let settled = settled((key.2, key.3), SystemTime::now(), seen_for);
            let (files, too_many) = self.list();
            if too_many && settled {
                log::warn!(
                    "\"{}\" holds over {} names: a job for a function this generation does not serve is not looked for there (one a deploy adds is served after its restart)",
                    self.dir.shown(),
                    self.max_names
                );
            }
            kept.listings = kept.listings.saturating_add(1);
            kept.files = files;
            kept.key = settled.then_some(key);
        }
        let files = kept.files.as_ref()?.get(function)?;
        files.iter().map(|f| self.dir.join(f)).find(|p| serves(p))
    }

    /// The directory's names by function (None if it cannot be listed or holds more than
    /// MAX_NAMES), and whether it holds too many.
    fn list(&self) -> (Option<HashMap<String, Vec<String>>>, bool) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return (None, false);
        };
        let mut files: HashMap<String, Vec<String>> = HashMap::new();
        for (n, e) in entries.enumerate() {
            if n >= self.max_names {
                return (None, true);
            }
            let Ok(e) = e else { continue };
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(function) = function_of(name) {
                files
                    .entry(function.to_string())
                    .or_default()
                    .push(name.to_string());
            }
        }
        (Some(files), false)
    }

    #[cfg(test)]
    fn listings(&self) -> u64 {
        self.kept.lock().unwrap_or_else(|p| p.into_inner()).listings
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn put(dir: &Path, name: &str, mode: u32) {
        fs::write(dir.join(name), "#!/bin/sh\n").expect("write");
        fs::set_permissions(dir.join(name), fs::Permissions::from_mode(mode)).expect("chmod");
    }

    /// Until the directory's last change is old enough for a listing to be kept.
    fn settle() {
        std::thread::sleep(Offers::SETTLED + Duration::from_millis(100));
    }

    #[test]
    fn offers_names_only_an_executable_file_of_that_function() {
        let dir = crate::testutil::tempdir("offers", "jobs");
        put(&dir, "mail.sh", 0o755);
        put(&dir, "notes", 0o644);
        put(&dir, ".hidden", 0o755);
        put(&dir, "vim.swp", 0o755);
        fs::create_dir(dir.join("sub")).expect("dir");
        std::os::unix::fs::symlink("mail.sh", dir.join("alias")).expect("link");
        let kept = Offers::new(dir.clone());
        // Listed for each name while the directory is new, then from the listing kept.
        for round in 0..2 {
            assert_eq!(kept.offers("mail"), Some(dir.join("mail.sh")));
            assert_eq!(kept.offers("alias"), Some(dir.join("alias")));
            for name in [
                "notes",
                "hidden",
                ".hidden",
                "vim",
                "sub",
                "nope",
                "../jobs/mail",
                "",
            ] {
                assert_eq!(kept.offers(name), None, "{name}");
            }
            if round == 0 {
                assert!(kept.listings() > 2);
                settle();
            }
        }
        assert_eq!(Offers::new(dir.join("missing")).offers("mail"), None);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_listing_is_kept_once_its_change_is_a_second_old_by_either_clock() {
        let now = SystemTime::now();
        let at = |t: SystemTime| {
            let d = t.duration_since(UNIX_EPOCH).unwrap();
            (d.as_secs() as i64, d.subsec_nanos() as i64)
        };
        let s = Duration::from_secs;
        assert!(!settled(at(now), now, Duration::ZERO), "just changed");
        assert!(
            settled(at(now - s(2)), now, Duration::ZERO),
            "old by the wall clock"
        );
        // The wall clock stepped back an hour: the ctime is ahead of it.
        let ahead = at(now + s(3600));
        assert!(!settled(ahead, now, Duration::from_millis(10)));
        assert!(settled(ahead, now, s(1)), "seen unchanged for a second");
        assert!(!settled((-5, 0), now, Duration::ZERO));
    }

    #[test]
    fn names_from_outside_list_the_directory_once_per_change() {
        let dir = crate::testutil::tempdir("offers", "kept");
        for i in 0..300 {
            put(&dir, &format!("job{i}.sh"), 0o755);
        }
        put(&dir, "late", 0o644);
        settle();
        let kept = Offers::new(dir.clone());
        for i in 0..1000 {
            assert_eq!(kept.offers(&format!("nobody{i}")), None);
        }
        assert_eq!(kept.offers("job7"), Some(dir.join("job7.sh")));
        assert_eq!(kept.offers("late"), None);
        assert_eq!(kept.listings(), 1, "one listing for all those names");

        // A file made executable changes no name: found from the listing kept.
        fs::set_permissions(dir.join("late"), fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(kept.offers("late"), Some(dir.join("late")));
        assert_eq!(kept.listings(), 1);

        // A file added changes the directory: listed again, for every name while the change
        // is under a second old (a second file may come within the same tick).
        put(&dir, "fresh.sh", 0o755);
        assert_eq!(kept.offers("fresh"), Some(dir.join("fresh.sh")));
        assert_eq!(kept.offers("nobody"), None);
        assert_eq!(kept.listings(), 3);
        put(&dir, "fresher.sh", 0o755);
        assert_eq!(kept.offers("fresher"), Some(dir.join("fresher.sh")));

        // A file removed, once settled: gone, and the rest kept.
        fs::remove_file(dir.join("job7.sh")).unwrap();
        settle();
        assert_eq!(kept.offers("job7"), None);
        for _ in 0..100 {
            assert_eq!(kept.offers("nobody"), None);
        }
        assert_eq!(kept.offers("job8"), Some(dir.join("job8.sh")));
        assert_eq!(kept.listings(), 5);

        // A file added, the directory's modification time then set back as `cp -p` and
        // `rsync -t` do: found.
        let before = fs::metadata(&dir).unwrap().modified().unwrap();
        put(&dir, "copied.sh", 0o755);
        fs::File::open(&dir).unwrap().set_modified(before).unwrap();
        assert_eq!(kept.offers("copied"), Some(dir.join("copied.sh")));

        // More names than are kept: none is looked for (no listing a name either).
        settle();
        let crowded = Offers {
            max_names: 100,
            ..Offers::new(dir.clone())
        };
        for _ in 0..10 {
            assert_eq!(crowded.offers("job8"), None);
        }
        assert_eq!(crowded.listings(), 1);
        let _ = fs::remove_dir_all(&dir);
    }
}
