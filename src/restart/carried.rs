//! What one generation hands the next across execve (in the restart parcel, `parcel.rs`), and the identity
//! of the binary it runs. The records it carries belong to their owners: the status records
//! (`status::records`), the metrics' counts (`metrics::carry`), the restart reason (`kinds`).

use serde::{Deserialize, Serialize};

use crate::status::records::{Refusal, Refused, Rollback};

/// State carried from one generation to the next.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Inherited {
    pub generation: u64,
    /// The pidfile, its lock held.
    #[serde(default, with = "fd_or_none")]
    pub pidfile_fd: Option<i32>,
    /// The log file, open for appending (used when its path cannot be opened again).
    #[serde(default, with = "fd_or_none")]
    pub log_fd: Option<i32>,
    /// `[worker] user` and `group` as resolved (see `privilege::known_user`).
    #[serde(default)]
    pub worker_user: Option<crate::ops::privilege::KnownUser>,
    /// The inotify instance handed over.
    #[serde(default, with = "fd_or_none")]
    pub inotify_fd: Option<i32>,
    /// The earlier form's memfd with the source's hand-over (read, never written: the parts
    /// travel in the parcel now).
    #[serde(default, with = "fd_or_none")]
    pub source_fd: Option<i32>,
    pub started_at_ms: u64,
    pub restarted_at_ms: u64,
    pub reason: String,
    pub completed: u64,
    pub failed: u64,
    /// Spool entries rejected so far.
    #[serde(default)]
    pub rejected: u64,
    pub restarts: u64,
    pub refusals: u64,
    pub last_refused: Option<Refusal>,
    /// CLOCK_MONOTONIC (µs) when the restart was requested: the new image measures its pause.
    pub requested_mono_us: u64,
    /// The config text the old image validated (None: too large, read the file).
    #[serde(default)]
    pub config_text: Option<String>,
    /// The binary the old image exec'd (None: unknown, hash it).
    #[serde(default)]
    pub binary: Option<Known>,
    #[serde(default)]
    pub last_refused_deploy: Option<Refused>,
    #[serde(default)]
    pub last_rollback: Option<Rollback>,
    /// The earlier form's memfd with the metrics' counts (read, never written).
    #[serde(default, with = "fd_or_none")]
    pub metrics_fd: Option<i32>,
    /// The `/metrics` listening socket.
    #[serde(default, with = "fd_or_none")]
    pub metrics_listen_fd: Option<i32>,
    /// The earlier form's memfd with the validated `jobs_dir` (read, never written).
    #[serde(default, with = "fd_or_none")]
    pub jobs_fd: Option<i32>,
    /// The status socket, listening (bound by the first generation).
    #[serde(default, with = "fd_or_none")]
    pub status_listen_fd: Option<i32>,
    /// The status socket file's (device, inode) when it was bound: adopted only while the path
    /// still names it.
    #[serde(default)]
    pub status_socket: Option<(u64, u64)>,
    /// A network source's listening sockets, by endpoint (ZeroMQ's `bind`).
    #[serde(default)]
    pub listen_fds: Vec<(String, i32)>,
    /// The source's lock descriptors (the spool's consumer lock), by key: handed only to an
    /// image that takes them up (this one, or a build whose pre-flight said so: an image that
    /// knows no such field would keep them open, and find its spool locked by them).
    #[serde(default)]
    pub lock_fds: Vec<(String, i32)>,
    /// A generation said that the worker's supervisor is gone (`status::records`): said once
    /// for the worker, not once a generation.
    #[serde(default)]
    pub supervisor_gone_said: bool,
    /// A message-ingesting source's counters: accepted, rejected, batches.
    #[serde(default)]
    pub ingress_counts: [u64; 3],
    /// The clients it closed, for the first [`FIRST_CLOSE_REASONS`] reasons of
    /// `kinds::CloseReason::ALL` (an image that knows no more reads exactly these)...
    #[serde(default)]
    pub(crate) ingress_closed: [u64; FIRST_CLOSE_REASONS],
    /// ...and for the reasons after them, in order (older images skip the field; a shorter
    /// list, from an image that knew fewer, counts the rest from 0).
    #[serde(default)]
    pub(crate) ingress_closed_more: Vec<u64>,
}

/// The close reasons every image that counted them carries in `ingress_closed`: its length is
/// fixed for them, so a reason added since goes in `ingress_closed_more`.
const FIRST_CLOSE_REASONS: usize = 4;

impl Inherited {
    /// The clients the ingress closed, by reason (`kinds::CloseReason::ALL`'s order).
    pub fn ingress_closed(&self) -> [u64; crate::kinds::CLOSE_REASONS] {
        std::array::from_fn(|i| match i.checked_sub(FIRST_CLOSE_REASONS) {
            None => self.ingress_closed.get(i).copied().unwrap_or(0),
            Some(more) => self.ingress_closed_more.get(more).copied().unwrap_or(0),
        })
    }

    /// Carries the clients the ingress closed, by reason (`kinds::CloseReason::ALL`'s order).
    pub fn set_ingress_closed(&mut self, closed: [u64; crate::kinds::CLOSE_REASONS]) {
        let (first, more) = closed.split_at(FIRST_CLOSE_REASONS.min(closed.len()));
        self.ingress_closed = std::array::from_fn(|i| first.get(i).copied().unwrap_or(0));
        self.ingress_closed_more = more.to_vec();
    }
}

/// A carried descriptor number on the wire: -1 for none, as every earlier image wrote and reads
/// it (a rollback execs an older binary with what we carry).
mod fd_or_none {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(fd: &Option<i32>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i32(fd.unwrap_or(-1))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i32>, D::Error> {
        Ok(Some(i32::deserialize(d)?).filter(|fd| *fd >= 0))
    }
}

pub use crate::ops::fileid::Ident;

/// A binary we know: where its identity came from, and its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Known {
    pub ident: Option<Ident>,
    pub sha256: String,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Older images write -1 for "no descriptor" and read it back so: a rollback hands them
    /// what we carry, and we adopt what they carried.
    #[test]
    fn descriptors_cross_the_wire_as_older_images_write_them() {
        let mine = Inherited {
            pidfile_fd: Some(3),
            inotify_fd: None,
            ..Inherited::default()
        };
        let json = serde_json::to_value(&mine).unwrap();
        assert_eq!(json["pidfile_fd"], 3);
        assert_eq!(json["inotify_fd"], -1);
        assert_eq!(json["source_fd"], -1);
        let old: Inherited =
            serde_json::from_str(r#"{"generation":4,"pidfile_fd":5,"inotify_fd":-1,"started_at_ms":0,"restarted_at_ms":0,"reason":"sighup","completed":0,"failed":0,"restarts":0,"refusals":0,"last_refused":null,"requested_mono_us":0}"#)
                .unwrap();
        assert_eq!(
            (old.pidfile_fd, old.inotify_fd, old.source_fd),
            (Some(5), None, None)
        );
    }

    /// Images before `dead_peer` carried four close reasons in an array of four, and read
    /// exactly that: what we write still reads so, and what they wrote reads as zero for it.
    #[test]
    fn close_reasons_cross_the_wire_as_older_images_read_them() {
        let mut mine = Inherited::default();
        let counts: [u64; crate::kinds::CLOSE_REASONS] = std::array::from_fn(|i| i as u64 + 1);
        mine.set_ingress_closed(counts);
        let json = serde_json::to_value(&mine).unwrap();
        assert_eq!(json["ingress_closed"], serde_json::json!([1, 2, 3, 4]));
        let back: Inherited = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back.ingress_closed(), counts);
        #[derive(serde::Deserialize)]
        struct Older {
            ingress_closed: [u64; 4],
        }
        let older: Older = serde_json::from_value(json).unwrap();
        assert_eq!(older.ingress_closed, [1, 2, 3, 4]);
        let theirs: Inherited = serde_json::from_str(
            r#"{"generation":4,"started_at_ms":0,"restarted_at_ms":0,"reason":"sighup","completed":0,"failed":0,"restarts":0,"refusals":0,"last_refused":null,"requested_mono_us":0,"ingress_closed":[5,6,7,8]}"#,
        )
        .unwrap();
        let mut want = [0; crate::kinds::CLOSE_REASONS];
        want[..4].copy_from_slice(&[5, 6, 7, 8]);
        assert_eq!(theirs.ingress_closed(), want);
    }
}
