//! The helper threads a generation starts beside its lanes: the signal thread, the reaper,
//! the file watch (or the queue poll that stands in for it, `lane.rs`), the status socket,
//! `/metrics`, the deploy watch. Their descriptors are taken first ([`prepare_helpers`]), their
//! threads after ([`start_helpers`]): a re-exec'd generation starts its lanes in between.

use std::path::PathBuf;
use std::sync::Arc;

use crate::clock::now_ms;
use crate::error::Result;
use crate::jobs::reaper::Reaper;
use crate::kinds::RestartReason;
use crate::ops::signals;
use crate::restart::carried::Inherited;
use crate::restart::deploy::Deploy;
use crate::restart::reexec::Boot;
use crate::status::{self, State};
use crate::text::ShowPath;
use crate::watch::inotify::Inotify;
use crate::watch::{self, Touched};

use super::control::{Control, POLL_FALLBACK};
use super::event::Event;
use super::Plan;

/// What a generation starts beside its lanes (see [`start_helpers`]).
pub(super) struct Helpers {
    pub(super) reaper: Reaper,
    pub(super) inotify: std::io::Result<Arc<Inotify>>,
    pub(super) metrics_listener: Option<std::net::TcpListener>,
    pub(super) inherited: Inherited,
    /// The signal handlers, once installed ([`prepare_helpers`]).
    pub(super) signals: Option<signals::Installed>,
}

/// The inotify instance handed over, or a new one (taken before the lanes start, like every
/// descriptor carried across the exec).
pub(super) fn inotify(boot: &Boot) -> std::io::Result<Arc<Inotify>> {
    boot.inherited
        .as_ref()
        .and_then(|i| Inotify::adopt(i.inotify_fd))
        .map(Ok)
        .unwrap_or_else(Inotify::new)
        .map(Arc::new)
}

/// Takes every descriptor the helpers need, without their threads: the signal handlers' pipe,
/// the status socket (the one handed over, or bound) and its wake-up pipe, `/metrics`' wake-up
/// pipe. A re-exec'd generation does this before its lanes start, so that lanes short of
/// descriptors (a low `ulimit -n`) can never leave a helper without one.
pub(super) fn prepare_helpers(ctl: &mut Control, h: &mut Helpers) -> Result<()> {
    h.signals = Some(signals::Signals::install()?);
    let carried = h.inherited.status_listen_fd.zip(h.inherited.status_socket);
    ctl.status_server = Some(status::Server::prepare(
        &ctl.plan.config.status_socket(),
        carried,
    )?);
    if let Some(l) = h.metrics_listener.take() {
        ctl.metrics_server = Some(crate::metrics::http::Server::prepare(l)?);
    }
    Ok(())
}

/// Starts the helper threads: the signal thread, the reaper, the file watch, the status
/// socket, `/metrics`, the deploy watch; then this thread takes signals (also after a failure:
/// a second SIGTERM must end a generation whose lanes are finishing their jobs). None of it is
/// needed for a claim: a re-exec'd generation starts its lanes first, since every thread
/// spawned before them would lengthen the restart pause; a fresh start starts them after, so
/// that a start-up error still comes before any job. `prepared`: how [`prepare_helpers`] went.
pub(super) fn start_helpers(ctl: &mut Control, mut h: Helpers, prepared: Result<()>) -> Result<()> {
    let tx = ctl.events.clone();
    // What the control loop does on a second TERM, for the signal thread to do if the control
    // loop is wedged (`signals::forward`).
    let children = ctl.children.clone();
    signals::on_forced_exit(move || {
        children.kill_all();
        crate::restart::preflight::kill_preflight();
    });
    // The spool's directories removed or replaced under the worker: a restart opens them again.
    let events = ctl.events.clone();
    crate::source::spool::recover::on_replaced(move || {
        let _ = events.try_send(Event::Recycle(crate::kinds::RestartReason::SpoolReplaced));
    });
    let forwarding = match h.signals.take() {
        Some(installed) => installed
            // Bounded: a signal the control loop has no room for within a quarter second is
            // held and offered again, while the signal thread goes on to count a second TERM
            // (see `forward`; the bound, the wait for the control thread and its last word
            // make under 2 s).
            .forward(move |sig| {
                use crossbeam_channel::SendTimeoutError;
                match tx.send_timeout(Event::Signal(sig), std::time::Duration::from_millis(250)) {
                    Ok(()) => signals::Delivery::Taken,
                    Err(SendTimeoutError::Timeout(_)) => signals::Delivery::Full,
                    Err(SendTimeoutError::Disconnected(_)) => signals::Delivery::Gone,
                }
            })
            .map(|s| ctl.signals = Some(s)),
        None => Ok(()),
    };
    let started = forwarding.and(prepared).and_then(|()| start_each(ctl, h));
    started.and(crate::ops::sigstate::clear_mask())
}

fn start_each(ctl: &mut Control, mut h: Helpers) -> Result<()> {
    let state = Arc::clone(&ctl.state);
    h.reaper.start(move || state.running_ids())?;
    let (inotify, poll_fallback) = start_watch(
        h.inotify,
        &ctl.plan,
        &ctl.boot,
        &ctl.source,
        &ctl.state,
        &ctl.events,
    )?;
    (ctl.inotify, ctl.poll_fallback) = (inotify, poll_fallback);
    let answers = status::server::Answers {
        metrics: Arc::clone(&ctl.render),
        counts: Arc::clone(&ctl.counts),
    };
    if let Some(s) = ctl.status_server.as_mut() {
        s.start(Arc::clone(&ctl.state), answers)?;
    }
    if let Some(m) = ctl.metrics_server.as_mut() {
        m.resume(Arc::clone(&ctl.render))?;
    }
    // Spawns the hashing thread on a first start.
    ctl.deploy = new_deploy(&ctl.plan, &ctl.boot, &h.inherited, &ctl.state);
    if let (Some(d), Some(rb)) = (ctl.deploy.as_mut(), &ctl.last_rollback) {
        d.mark_bad(&rb.from_sha);
    }
    Ok(())
}

/// Starts the file watch (the inotify instance handed over, or a new one): config.toml,
/// `jobs_dir`, the queue's directories, the binary's directory. Where something cannot be
/// watched, polls instead and says so. Returns the instance and whether files are polled.
fn start_watch(
    inotify: std::io::Result<Arc<Inotify>>,
    plan: &Plan,
    boot: &Boot,
    source: &Arc<crate::source::Source>,
    state: &Arc<State>,
    events_tx: &crossbeam_channel::Sender<Event>,
) -> Result<(Option<Arc<Inotify>>, bool)> {
    let mut poll_fallback = false;
    match &inotify {
        Ok(ino) => {
            let w = &plan.config.worker;
            let targets = watch::Targets {
                config: w.watch_config.then_some(plan.config.path.as_path()),
                jobs_dir: w.watch_jobs.then_some(w.jobs_dir.as_path()),
                queue: source.watch_dirs(),
                binary: w.watch_binary.then_some(boot.exe.as_path()),
            };
            let waker = Arc::clone(source);
            let tx = events_tx.clone();
            let report = move |t: Touched| {
                // A lost event would be a change unseen: wait for room rather than drop one.
                let _ = tx.send(Event::Touched(t));
            };
            let unwatched = watch::start(ino, &targets, report, move || waker.wake())?;
            for e in [&unwatched.config, &unwatched.jobs].into_iter().flatten() {
                log::warn!(
                    "{e}; checking for changes every {}s instead",
                    POLL_FALLBACK.as_secs()
                );
                poll_fallback = true;
                polling(state, &e.to_string());
            }
            if let Some(e) = unwatched.queue {
                log::warn!("{e}; checking for new jobs every second instead");
                super::lane::poll_queue(source)?;
            }
        }
        Err(e) => {
            log::warn!(
                "no inotify ({e}); checking files every {}s and the queue every second",
                POLL_FALLBACK.as_secs()
            );
            poll_fallback = true;
            polling(state, &format!("no inotify ({e})"));
            super::lane::poll_queue(source)?;
        }
    }
    Ok((inotify.ok(), poll_fallback))
}

/// Says in `status` why files are polled instead of watched.
fn polling(state: &State, why: &str) {
    if let Ok(mut i) = state.inner.lock() {
        i.watch = Some(format!("polling: {why}"));
    }
}

/// The binary watch's deploy state (`[worker] watch_binary`), from what the predecessor knew.
pub(super) fn new_deploy(
    plan: &Plan,
    boot: &Boot,
    inherited: &Inherited,
    state: &Arc<State>,
) -> Option<Deploy> {
    plan.config.worker.watch_binary.then(|| {
        // What is at the path now is known to the watch (a new file there is looked at
        // within 0.2 s): only a file that comes after is a candidate nobody looked at.
        crate::jobs::functions::binary_looked_at(&boot.exe);
        let state = Arc::clone(state);
        let worker_uid = crate::ops::privilege::worker_uid(&plan.config);
        Deploy::new(
            &boot.exe,
            &plan.config.path,
            inherited.binary.clone(),
            inherited.last_refused_deploy.clone(),
            worker_uid,
            move |sha| {
                if let Ok(mut i) = state.inner.lock() {
                    i.binary_sha256 = Some(sha.to_string());
                }
            },
        )
    })
}

impl Control {
    /// Every 5 s: the pidfile at its path (made again if it can be), the supervisor still the
    /// worker's parent, the status socket at its path (bound again if it can be).
    pub(super) fn look_at_paths(&mut self) {
        self.pidfile.look(&self.plan.config.worker.state_dir);
        crate::status::records::look_for_supervisor();
        if let Some(s) = self.status_server.as_mut() {
            s.renew();
        }
    }

    /// What to exec: the path only if it holds a validated binary (a deploy switching keeps
    /// the running one as last-good and writes the rollback marker); else this very image.
    pub(super) fn exec_target(
        &self,
        plan: &Plan,
        reason: RestartReason,
    ) -> (PathBuf, Option<crate::restart::carried::Known>) {
        // Exec the path only if it holds a validated binary; else this very image again.
        match &self.deploy {
            Some(d) => {
                let (exe, known) = d.exec_target();
                let switching = known.as_ref().map(|k| &k.sha256) != d.running_sha().as_ref();
                if switching {
                    let state_dir = &plan.config.worker.state_dir;
                    match (crate::restart::rollback::save_last_good(state_dir), d.running_sha(), &known) {
                        (Ok(Some(last_good)), Some(from_sha), Some(to)) => {
                            log::info!("deploy: the running binary is kept as {}", last_good.shown());
                            let marker = crate::restart::rollback::Marker {
                                from_sha,
                                to_sha: to.sha256.clone(),
                                at_ms: now_ms(),
                            };
                            if let Err(e) = crate::restart::rollback::write_marker(state_dir, &marker) {
                                log::warn!("deploy: no rollback marker ({e}): a crash of the new binary cannot be rolled back");
                            }
                        }
                        (Ok(None), _, _) => {
                            log::warn!("deploy: no last-good binary in state_dir: no rollback possible")
                        }
                        (Err(e), _, _) => {
                            log::warn!("deploy: could not keep the running binary as last-good ({e}): no rollback possible")
                        }
                        _ => log::warn!("deploy: the running binary's sha is not known yet: no rollback possible"),
                    }
                }
                (exe, known)
            }
            // Without the binary watch nothing has checked what is at the path now: exec the
            // running image itself (the kernel's link to its inode), never the path.
            None => {
                log::info!(
                    "{reason}: re-exec the running image (watch_binary is off: \"{}\" is not looked at)",
                    self.boot.exe.shown()
                );
                (PathBuf::from("/proc/self/exe"), None)
            }
        }
    }

    /// Whether the exec of `exe` (the `known` binary) runs an image that takes up the source's
    /// lock descriptors (`Inherited::lock_fds`): the running image itself, a file whose sha256
    /// is the running one's, or a new binary that said so at its pre-flight. An older build
    /// would keep them open and find its own spool locked by them.
    pub(super) fn takes_locks(
        &self,
        exe: &std::path::Path,
        known: Option<&crate::restart::carried::Known>,
    ) -> bool {
        exe == std::path::Path::new("/proc/self/exe")
            || self.deploy.as_ref().is_some_and(|d| d.takes_locks(known))
    }
}
