//! What crosses execve travels one way: one versioned memfd (`gearshift-carry`) whose descriptor
//! number is in `GEARSHIFT_INHERIT_FD`. It holds the carried state ([`Inherited`], JSON) and the
//! parts too large or too structured for it: the source's hand-over, the validated `jobs_dir`,
//! the metrics' counts.
//!
//! Layout: the magic `GSCARRY\0`, a version (u16 LE), then sections, each a tag (u8), a length
//! (u64 LE) and that many bytes. A reader skips tags it does not know (a newer writer) and drops
//! a part over its own bound; a parcel that is not whole is not ours and is ignored.
//!
//! The form before it (images up to 0.x: the state as JSON in `GEARSHIFT_INHERIT_STATE`, each
//! part in its own memfd) is still read ([`legacy_parts`]), so a deploy from such an image
//! carries everything; and a copy of the state is still written there (without the parts), so a
//! deploy back to such an image keeps its pidfile lock and generation.

use std::os::fd::{OwnedFd, RawFd};

use crate::restart::carried::Inherited;

/// The environment variable naming the parcel's descriptor.
pub const ENV_FD: &str = "GEARSHIFT_INHERIT_FD";
/// This layout's version.
pub const VERSION: u16 = 2;
const MAGIC: &[u8; 8] = b"GSCARRY\0";
const NAME: &str = "carry";

const TAG_STATE: u8 = 1;
const TAG_SOURCE: u8 = 2;
const TAG_JOBS: u8 = 3;
const TAG_METRICS: u8 = 4;

/// The state's bound, and each part's.
const STATE_LIMIT: u64 = 16 << 20;
const SOURCE_LIMIT: u64 = 1 << 20;
const JOBS_LIMIT: u64 = 64 << 20;
const METRICS_LIMIT: u64 = 256 << 20;

/// The parts carried beside the state.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Parts {
    /// The source's hand-over ([`crate::source::JobSource::hand_over`]).
    pub source: Option<Vec<u8>>,
    /// `jobs_dir` as the old image validated it (JSON).
    pub jobs: Option<Vec<u8>>,
    /// The metrics' counters and histograms (JSON).
    pub metrics: Option<Vec<u8>>,
}

/// The parcel's bytes.
pub fn encode(state: &[u8], parts: &Parts) -> Vec<u8> {
    let sections = [
        (TAG_STATE, Some(state)),
        (TAG_SOURCE, parts.source.as_deref()),
        (TAG_JOBS, parts.jobs.as_deref()),
        (TAG_METRICS, parts.metrics.as_deref()),
    ];
    let size: usize = sections
        .iter()
        .map(|(_, b)| b.map_or(0, |b| b.len() + 9))
        .sum();
    let mut out = Vec::with_capacity(MAGIC.len() + 2 + size);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    for (tag, bytes) in sections {
        if let Some(bytes) = bytes {
            out.push(tag);
            out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
            out.extend_from_slice(bytes);
        }
    }
    out
}

/// The state's bytes and the parts, or why this is not a parcel.
pub fn decode(data: &[u8]) -> Result<(Vec<u8>, Parts), String> {
    let rest = data
        .strip_prefix(MAGIC.as_slice())
        .ok_or("no parcel magic")?;
    let (version, mut rest) = rest.split_at_checked(2).ok_or("no version")?;
    let version = u16::from_le_bytes([version[0], version[1]]);
    if version < VERSION {
        return Err(format!("version {version} is older than any parcel"));
    }
    let (mut state, mut parts) = (None, Parts::default());
    while let Some((&tag, after)) = rest.split_first() {
        let (len, after) = after.split_at_checked(8).ok_or("a section cut short")?;
        let mut word = [0u8; 8];
        word.copy_from_slice(len);
        let len = u64::from_le_bytes(word);
        let body_len = usize::try_from(len)
            .ok()
            .filter(|l| *l <= after.len())
            .ok_or("a section longer than the parcel")?;
        let (body, after) = after.split_at(body_len);
        rest = after;
        let (slot, limit) = match tag {
            TAG_STATE => (&mut state, STATE_LIMIT),
            TAG_SOURCE => (&mut parts.source, SOURCE_LIMIT),
            TAG_JOBS => (&mut parts.jobs, JOBS_LIMIT),
            TAG_METRICS => (&mut parts.metrics, METRICS_LIMIT),
            // A newer writer's part: not ours to read.
            _ => continue,
        };
        if len <= limit {
            *slot = Some(body.to_vec());
        } else {
            log::warn!("carried part {tag} is {len} bytes, over its {limit}: started without it");
        }
    }
    Ok((state.ok_or("no state section")?, parts))
}

/// A memfd holding the parcel, to hand over with [`crate::ops::handover::keep`].
pub fn write(state: &Inherited, parts: &Parts) -> crate::error::Result<OwnedFd> {
    let json = serde_json::to_vec(state)
        .map_err(|e| crate::error::Error::Msg(format!("cannot encode restart state: {e}")))?;
    crate::ops::handover::memfd(NAME, &encode(&json, parts)).ok_or_else(|| {
        crate::error::Error::io(
            "creating the restart parcel (memfd)",
            std::io::Error::last_os_error(),
        )
    })
}

/// Adopts and reads the parcel handed over in descriptor `fd`.
pub fn read(fd: RawFd) -> Option<(Inherited, Parts)> {
    let limit = MAGIC.len() as u64 + 2 + 4 * 9 + STATE_LIMIT + SOURCE_LIMIT + JOBS_LIMIT;
    let data = crate::ops::handover::read_memfd(Some(fd), NAME, limit + METRICS_LIMIT)?;
    match decode(&data).and_then(|(state, parts)| {
        serde_json::from_slice::<Inherited>(&state)
            .map(|s| (s, parts))
            .map_err(|e| e.to_string())
    }) {
        Ok(carried) => Some(carried),
        Err(e) => {
            log::warn!("ignoring an unreadable restart parcel ({e}); starting as generation 1");
            None
        }
    }
}

/// The parts an image of the earlier form handed over, each in its own memfd.
pub fn legacy_parts(state: &Inherited) -> Parts {
    let read = |fd, name, limit| crate::ops::handover::read_memfd(fd, name, limit);
    Parts {
        source: read(state.source_fd, "pending", SOURCE_LIMIT),
        jobs: read(state.jobs_fd, "jobs", JOBS_LIMIT),
        metrics: read(state.metrics_fd, "metrics", METRICS_LIMIT),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_parcel_reads_back_what_was_written() {
        let parts = Parts {
            source: Some(b"a\nb\n+\n".to_vec()),
            jobs: None,
            metrics: Some(b"{}".to_vec()),
        };
        let data = encode(b"{\"generation\":3}", &parts);
        let (state, back) = decode(&data).unwrap();
        assert_eq!(state, b"{\"generation\":3}");
        assert_eq!(back, parts);
    }

    #[test]
    fn unknown_sections_are_skipped_and_broken_parcels_refused() {
        let mut data = encode(b"{}", &Parts::default());
        // A newer writer's section after ours.
        data.push(99);
        data.extend_from_slice(&3u64.to_le_bytes());
        data.extend_from_slice(b"new");
        assert_eq!(decode(&data).unwrap().0, b"{}");
        // Cut short, a length past the end, no state, no magic, an older version.
        assert!(decode(&data[..data.len() - 1]).is_err());
        let mut long = encode(b"{}", &Parts::default());
        long[11..19].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(decode(&long).is_err());
        let mut no_state = MAGIC.to_vec();
        no_state.extend_from_slice(&VERSION.to_le_bytes());
        assert!(decode(&no_state).is_err());
        assert!(decode(b"{\"generation\":3}").is_err());
        let mut old = encode(b"{}", &Parts::default());
        old[8..10].copy_from_slice(&1u16.to_le_bytes());
        assert!(decode(&old).is_err());
    }

    #[test]
    fn a_parcel_crosses_as_a_memfd() {
        use std::os::fd::IntoRawFd;
        let state = Inherited {
            generation: 7,
            config_text: Some("x".repeat(200 * 1024)),
            ..Inherited::default()
        };
        let parts = Parts {
            jobs: Some(b"[]".to_vec()),
            ..Parts::default()
        };
        let fd = write(&state, &parts).unwrap().into_raw_fd();
        let (back, back_parts) = read(fd).unwrap();
        assert_eq!(back.generation, 7);
        // No 64 KiB cap on the config text any more.
        assert_eq!(back.config_text.map(|t| t.len()), Some(200 * 1024));
        assert_eq!(back_parts, parts);
    }

    /// An image of the earlier form handed each part over in its own memfd: still read.
    #[test]
    fn the_earlier_form_is_still_read() {
        use std::os::fd::IntoRawFd;
        let fd = |name, data: &[u8]| {
            Some(
                crate::ops::handover::memfd(name, data)
                    .unwrap()
                    .into_raw_fd(),
            )
        };
        let state = Inherited {
            source_fd: fd("pending", b"x\n"),
            jobs_fd: fd("jobs", b"[1]"),
            // A memfd of another name is not taken for the metrics.
            metrics_fd: fd("pending", b"{}"),
            ..Inherited::default()
        };
        let parts = legacy_parts(&state);
        assert_eq!(parts.source.as_deref(), Some(b"x\n".as_slice()));
        assert_eq!(parts.jobs.as_deref(), Some(b"[1]".as_slice()));
        assert_eq!(parts.metrics, None);
    }
}
