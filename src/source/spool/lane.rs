//! A spool lane (one per worker thread).

use std::sync::Arc;

use crate::clock::now_ms;
use crate::error::Result;
use crate::jobs::functions::{JobResult, Progress};
use crate::shutdown::Shutdown;
use crate::source::lane::{Claimed, Lane};

use super::source::SpoolSource;
use super::*;

pub(super) struct SpoolLane {
    pub(super) source: Arc<SpoolSource>,
    pub(super) started_ms: u64,
    /// The current job's id and progress lines logged so far (a job may write millions).
    pub(super) job: String,
    pub(super) progress_lines: u64,
}

/// Progress lines of one job that reach the log; the rest are counted and summarised.
pub(super) const PROGRESS_LOG_LINES: u64 = 10;

impl Lane for SpoolLane {
    fn next(&mut self, stop: &Shutdown) -> Result<Option<Claimed>> {
        loop {
            if stop.is_set() {
                return Ok(None);
            }
            let seen = self.source.waker.current();
            // Results past retention go at start and every tenth of the period; abandoned
            // temp files every few seconds.
            self.source.prune();
            self.source.housekeeping();
            // The spool was removed under this worker, whose user cannot open the one at its
            // path: nothing to claim or write there until it can (the housekeeping looks).
            if self
                .source
                .unopenable
                .load(std::sync::atomic::Ordering::Acquire)
            {
                self.source.waker.wait_past(seen, HOUSEKEEPING);
                continue;
            }
            self.source.checkpoint();
            // Results cannot be stored now: claim nothing until they can.
            if let Some(e) = self.source.committer.as_ref().and_then(|c| c.failing()) {
                return Err(e);
            }
            // Outcomes carried in or kept unplaced (`carry.rs`) are stored before any claim.
            self.source.place_unplaced()?;
            if let Some(job) = self.source.claim()? {
                self.started_ms = now_ms();
                self.job.clone_from(&job.id);
                self.progress_lines = 0;
                return Ok(Some(job));
            }
            if stop.is_set() {
                return Ok(None);
            }
            self.source.waker.wait_past(seen, HOUSEKEEPING);
        }
    }

    fn progress(&mut self) -> &mut dyn Progress {
        self
    }

    fn finish(&mut self, job: &Claimed, outcome: &JobResult) -> Result<()> {
        if self.progress_lines > PROGRESS_LOG_LINES {
            log::info!(
                "job {}: {} more progress lines not logged",
                job.id,
                self.progress_lines - PROGRESS_LOG_LINES
            );
        }
        self.progress_lines = 0;
        self.source.finish(job, outcome, self.started_ms)
    }

    /// Returns once every outcome this generation's lanes handed over is durable and in place;
    /// at once when the worker re-execs (they cross the exec: `carry.rs`).
    fn close(&mut self) -> Result<()> {
        match &self.source.committer {
            Some(_) if self.source.handing_over() => Ok(()),
            Some(c) => c.flush(),
            None => Ok(()),
        }
    }

    fn release(&mut self, job: &Claimed) -> bool {
        if let Some(hold) = self.source.direct.finished(&job.id) {
            return spill_claimed(&self.source, job, hold);
        }
        let from = self.source.spool.dir("cur").join(&job.id);
        let to = self.source.spool.dir("new").join(&job.id);
        match fs::rename(&from, &to) {
            Ok(()) => true,
            Err(e) => {
                log::error!(
                    "job {}: cannot give it back ({e}); it runs again at the next start",
                    job.id
                );
                false
            }
        }
    }
}

impl SpoolLane {
    /// Whether one more progress line of this job may be logged.
    fn may_log(&mut self) -> bool {
        self.progress_lines += 1;
        self.progress_lines <= PROGRESS_LOG_LINES
    }
}

impl Progress for SpoolLane {
    fn status(&mut self, n: u64, d: u64) {
        if self.may_log() {
            log::debug!("job {}: progress {n}/{d}", self.job);
        }
    }
    fn data(&mut self, data: &[u8]) {
        if self.may_log() {
            log::debug!("job {}: data {:?}", self.job, lossy_prefix(data));
        }
    }
    fn warning(&mut self, data: &[u8]) {
        if self.may_log() {
            log::warn!("job {}: job warning: {}", self.job, lossy_prefix(data));
        }
    }
}

/// Gives back a job that came without a file (`direct.rs`): it is written to `new/`.
fn spill_claimed(src: &SpoolSource, job: &Claimed, hold: super::direct::Hold) -> bool {
    let file = JobFile {
        function: job.function.clone(),
        submitted_ms: job.submitted_ms,
        attempts: job.attempt.saturating_sub(1),
        payload: job.payload.clone(),
    };
    match super::journal::materialize(
        &src.spool,
        &super::journal::job_entry(job.id.clone(), &file),
    ) {
        Ok(()) => {
            hold.release();
            true
        }
        Err(e) => {
            // Its segment stays held, unsealed: the next start queues it again.
            log::error!(
                "job {}: cannot give it back ({e}); it runs again at the next start",
                job.id
            );
            false
        }
    }
}

/// At most 1 KiB of `data` as text, for a log line.
pub(super) fn lossy_prefix(data: &[u8]) -> String {
    let cut = &data[..data.len().min(1024)];
    let mut s = String::from_utf8_lossy(cut).into_owned();
    if data.len() > cut.len() {
        s.push_str(&format!("... ({} bytes)", data.len()));
    }
    s
}

impl SpoolSource {
    /// A lane (one per worker thread) over this spool.
    pub fn lane(self: &Arc<Self>) -> Box<dyn Lane> {
        Box::new(SpoolLane {
            source: Arc::clone(self),
            started_ms: 0,
            job: String::new(),
            progress_lines: 0,
        })
    }
}
