//! Job functions: the [`Job`] a function receives, the [`Functions`] registry a binary builds,
//! the built-ins, and the per-generation [`Table`] that also holds the executables of `jobs_dir`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::config::check_function_name;
use crate::ops::fileid::Ident;
use crate::text::{hex, ShowPath};

/// What a function returns: the result bytes, or why the job failed.
pub type JobResult = Result<Vec<u8>, JobError>;

/// A job failure. The message reaches whoever waits for the job (the spool's result record,
/// or a Gearman client that asked for exceptions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    /// What went wrong, as the waiting client sees it.
    pub message: String,
    kind: Kind,
}

/// What kind of failure a [`JobError`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Failed,
    /// Could not be started for want of a resource: run again after a pause, not failed.
    Transient,
    /// Killed at its timeout (counted apart in the metrics).
    TimedOut,
    /// The executable is being written (ETXTBSY) or is not there for a moment (a deploy
    /// replacing it): run it again in a moment.
    Busy,
}

impl JobError {
    /// A failure with this message.
    pub fn new(message: impl Into<String>) -> JobError {
        JobError {
            message: message.into(),
            kind: Kind::Failed,
        }
    }

    /// A failure to *start* the job for want of a resource (EMFILE, EAGAIN, ENOMEM): the
    /// worker pauses and runs the job again instead of failing it.
    pub fn transient(message: impl Into<String>) -> JobError {
        JobError {
            message: message.into(),
            kind: Kind::Transient,
        }
    }

    /// Whether this was made by [`JobError::transient`].
    pub fn is_transient(&self) -> bool {
        self.kind == Kind::Transient
    }

    /// The job's executable is open for writing right now, or not there (a deploy in
    /// progress): the job is started again in a moment instead of failing.
    pub(crate) fn busy(message: impl Into<String>) -> JobError {
        JobError {
            message: message.into(),
            kind: Kind::Busy,
        }
    }

    /// Whether this was made by [`JobError::busy`].
    pub(crate) fn is_busy(&self) -> bool {
        self.kind == Kind::Busy
    }

    /// Whether the job was stopped at its timeout.
    pub(crate) fn is_timeout(&self) -> bool {
        self.kind == Kind::TimedOut
    }

    /// The job was stopped at its timeout.
    pub(crate) fn timed_out(message: impl Into<String>) -> JobError {
        JobError {
            message: message.into(),
            kind: Kind::TimedOut,
        }
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl<E: std::error::Error> From<E> for JobError {
    fn from(e: E) -> JobError {
        JobError::new(e.to_string())
    }
}

/// Where a running job's progress goes: Gearman sends WORK_STATUS / WORK_DATA / WORK_WARNING,
/// the spool logs it. Implemented by each job source.
pub trait Progress {
    /// Progress as numerator and denominator.
    fn status(&mut self, numerator: u64, denominator: u64);
    /// A piece of the result sent before the end.
    fn data(&mut self, data: &[u8]);
    /// A warning for whoever waits for the job.
    fn warning(&mut self, data: &[u8]);
}

/// A progress sink that drops everything: for unit tests of your own job functions
/// (`Job::new("1", "shout", b"hi", &mut NoProgress)`).
pub struct NoProgress;

impl Progress for NoProgress {
    fn status(&mut self, _: u64, _: u64) {}
    fn data(&mut self, _: &[u8]) {}
    fn warning(&mut self, _: &[u8]) {}
}

/// One job, as a function sees it.
pub struct Job<'a> {
    pub(crate) id: &'a str,
    pub(crate) function: &'a str,
    pub(crate) unique: &'a str,
    pub(crate) payload: &'a [u8],
    pub(crate) deadline: Option<Instant>,
    pub(crate) progress: &'a mut dyn Progress,
}

impl<'a> Job<'a> {
    /// Builds a job by hand: for unit tests of job functions and for embedding.
    ///
    /// ```
    /// use gearshift::{Job, JobResult, NoProgress};
    ///
    /// fn shout(job: &mut Job<'_>) -> JobResult {
    ///     Ok(job.payload().to_ascii_uppercase())
    /// }
    ///
    /// let out = shout(&mut Job::new("1", "shout", b"hi", &mut NoProgress));
    /// assert_eq!(out.unwrap(), b"HI");
    /// ```
    pub fn new(
        id: &'a str,
        function: &'a str,
        payload: &'a [u8],
        progress: &'a mut dyn Progress,
    ) -> Self {
        Job {
            id,
            function,
            unique: "",
            payload,
            deadline: None,
            progress,
        }
    }

    /// The job's id (spool) or handle (Gearman).
    pub fn id(&self) -> &'a str {
        self.id
    }
    /// The function the job asked for.
    pub fn function(&self) -> &'a str {
        self.function
    }
    /// The client's unique id (Gearman); empty for the spool.
    pub fn unique(&self) -> &'a str {
        self.unique
    }
    /// The payload; borrowed from the job's data, not from `self`, so progress can be reported
    /// while reading it.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }
    /// When the configured timeout runs out. Executables are killed then; a Rust function
    /// cannot be killed, so a long one should check this and give up.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }
    /// Reports progress (Gearman WORK_STATUS).
    pub fn status(&mut self, numerator: u64, denominator: u64) {
        self.progress.status(numerator, denominator);
    }
    /// Streams partial output (Gearman WORK_DATA). Note for Gearman clients built on
    /// libgearman (the `gearman` CLI, php-gearman, Python's and Perl's libgearman bindings):
    /// they append every WORK_DATA chunk to the result they return, so what you stream here
    /// becomes part of the job's result for them (the final result follows it). On the spool it
    /// is logged at debug level, not stored.
    pub fn data(&mut self, data: &[u8]) {
        self.progress.data(data);
    }
    /// Sends a warning (Gearman WORK_WARNING).
    pub fn warning(&mut self, data: &[u8]) {
        self.progress.warning(data);
    }
}

/// A job function written in Rust. Closures `Fn(&mut Job) -> JobResult` implement it.
pub trait JobFunction: Send + Sync + 'static {
    /// Runs the job: its result bytes, or why it failed.
    fn call(&self, job: &mut Job<'_>) -> JobResult;
}

impl<F> JobFunction for F
where
    F: Fn(&mut Job<'_>) -> JobResult + Send + Sync + 'static,
{
    fn call(&self, job: &mut Job<'_>) -> JobResult {
        self(job)
    }
}

/// The Rust functions a binary offers. [`Functions::with_builtins`] is what the stock binary uses;
/// a user's binary adds its own with [`Functions::register`].
#[derive(Clone, Default)]
pub struct Functions {
    rust: BTreeMap<String, Arc<dyn JobFunction>>,
    /// Which of them are the stock built-ins (offered only where `[worker] builtins` allows).
    builtin: std::collections::BTreeSet<String>,
}

impl Functions {
    /// No functions at all (executables in `jobs_dir` are still found).
    pub fn empty() -> Functions {
        Functions::default()
    }

    /// `echo`, `reverse`, `sha256` and `sleep`.
    pub fn with_builtins() -> Functions {
        let mut f = Functions::empty();
        f.register("echo", |job: &mut Job<'_>| Ok(job.payload().to_vec()));
        f.register("reverse", |job: &mut Job<'_>| {
            let mut out = job.payload().to_vec();
            out.reverse();
            Ok(out)
        });
        f.register("sha256", |job: &mut Job<'_>| {
            Ok(hex(&Sha256::digest(job.payload())).into_bytes())
        });
        f.register("sleep", sleep);
        f.builtin = f.rust.keys().cloned().collect();
        f
    }

    /// Adds (or replaces) a Rust function.
    ///
    /// A function name is 1 to 128 bytes of ASCII letters, digits, `_`, `-`, `.` and `:`, and
    /// does not start with `.` (it travels in file names, environment variables and protocol
    /// packets). For names that come from outside, use [`Functions::try_register`].
    ///
    /// A panic in a function fails its job (with the panic's message) and the lane goes on,
    /// unless your binary is built with `panic = "abort"` in its profile: then a panic ends the
    /// worker (the job runs again after the restart). Keep the default `panic = "unwind"`.
    ///
    /// # Panics
    /// If `name` is not a valid function name: that is a programming error in the binary, found
    /// on its first run.
    pub fn register(&mut self, name: &str, function: impl JobFunction) -> &mut Functions {
        if let Err(why) = check_function_name(name) {
            panic!("Functions::register: {why}");
        }
        self.rust.insert(name.to_string(), Arc::new(function));
        // The binary's own function of that name now: no longer a built-in.
        self.builtin.remove(name);
        self
    }

    /// [`Functions::register`] for a name that may be invalid: the reason instead of a panic.
    pub fn try_register(
        &mut self,
        name: &str,
        function: impl JobFunction,
    ) -> std::result::Result<&mut Functions, String> {
        check_function_name(name)?;
        Ok(self.register(name, function))
    }

    /// Whether `name` is one of the stock built-ins (and not replaced by the binary's own).
    pub fn is_builtin(&self, name: &str) -> bool {
        self.builtin.contains(name)
    }

    /// The names of the Rust functions registered.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.rust.keys().map(String::as_str)
    }

    pub(crate) fn get(&self, name: &str) -> Option<&Arc<dyn JobFunction>> {
        self.rust.get(name)
    }
}

/// `sleep`: the payload is a number of milliseconds; returns the payload. It honours the
/// function's timeout, so it also serves to test timeouts of Rust functions.
fn sleep(job: &mut Job<'_>) -> JobResult {
    let text = std::str::from_utf8(job.payload())
        .map_err(|_| JobError::new("sleep: payload is not UTF-8"))?;
    let ms: u64 = text.trim().parse().map_err(|_| {
        JobError::new(format!(
            "sleep: payload must be a number of milliseconds, got {text:?}"
        ))
    })?;
    let want = Duration::from_millis(ms);
    match job.deadline() {
        Some(deadline)
            if Instant::now()
                .checked_add(want)
                .is_none_or(|end| end > deadline) =>
        {
            std::thread::sleep(deadline.saturating_duration_since(Instant::now()));
            Err(JobError::new(format!(
                "sleep: timed out before {ms} ms had passed"
            )))
        }
        _ => {
            std::thread::sleep(want);
            Ok(job.payload().to_vec())
        }
    }
}

/// How one function of a generation runs.
#[derive(Clone)]
pub enum Runner {
    Rust(Arc<dyn JobFunction>),
    Executable(PathBuf),
}

/// One generation's function table: the binary's Rust functions plus the executables found in
/// `jobs_dir`, each with its timeout. Built during validation, immutable afterwards.
#[derive(Clone, Default)]
pub struct Table {
    entries: BTreeMap<String, (Runner, Option<Duration>)>,
}

/// A new file at the binary's path is settling, being judged, or approved and not yet run
/// (`restart::deploy::Deploy::pending`): a job for a function this generation lacks waits for
/// the restart, which may bring it, instead of failing as unknown. One deploy watch a process.
static CANDIDATE_PENDING: AtomicBool = AtomicBool::new(false);

/// The file at the binary's path as the deploy watch last looked at it: the path and the
/// file's identity (none: no file there).
type Seen = (std::path::PathBuf, Option<Ident>);
static BINARY_SEEN: std::sync::Mutex<Option<Seen>> = std::sync::Mutex::new(None);

/// Whether a candidate binary may yet bring a function this generation lacks: one the deploy
/// watch judges, or a file at the binary's path it has not looked at yet. The second is asked
/// of the path itself: a binary dropped there just before a job for its new function came was
/// not yet reported by the watch thread when a lane (or the ZeroMQ ingress) met the job, which
/// then failed as unknown (under load).
pub fn candidate_pending() -> bool {
    if CANDIDATE_PENDING.load(Ordering::Acquire) {
        return true;
    }
    let seen = BINARY_SEEN.lock().ok().and_then(|s| s.clone());
    seen.is_some_and(|(path, id)| Ident::of(&path) != id)
}

/// Set by the control loop at each look of the deploy watch: the file at `path` (the worker's
/// binary path) is known to it now, judged or being judged.
pub fn binary_looked_at(path: &std::path::Path) {
    let id = Ident::of(path);
    if let Ok(mut seen) = BINARY_SEEN.lock() {
        *seen = Some((path.to_path_buf(), id));
    }
}

/// Set by the control loop: when the binary's directory changed (until the file at the path is
/// looked at), and after every look, from `restart::deploy::Deploy::pending`.
pub fn set_candidate_pending(pending: bool) {
    CANDIDATE_PENDING.store(pending, Ordering::Release);
}

impl Table {
    pub fn insert(&mut self, name: String, runner: Runner, timeout: Option<Duration>) {
        self.entries.insert(name, (runner, timeout));
    }
    pub fn get(&self, name: &str) -> Option<&(Runner, Option<Duration>)> {
        self.entries.get(name)
    }
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
    pub fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }
    pub fn iter(&self) -> impl Iterator<Item = (&String, &(Runner, Option<Duration>))> {
        self.entries.iter()
    }

    /// A job for `function`, which this generation does not serve: failed, unless `jobs_dir`
    /// has a file for it now (a deploy added it, and the restart that serves it is yet to come:
    /// the change is debounced, judged, perhaps splayed) or a new binary at the worker's path is
    /// being judged (it may register the function), for which it waits, as for a busy file.
    pub fn unknown(&self, jobs_dir: &crate::watch::Offers, function: &str) -> JobError {
        // Stored as the job's result and logged, for every such job: a few names.
        let has = || crate::text::some_of(&self.names(), 8);
        match jobs_dir.offers(function) {
            Some(file) => JobError::busy(format!(
                "function \"{function}\" is not served by this generation (it has: {}), but jobs_dir has \"{}\" for it: the job waits for the restart that serves it",
                has(),
                file.shown()
            )),
            None if candidate_pending() => JobError::busy(format!(
                "function \"{function}\" is not served by this generation (it has: {}), and a new binary at the worker's path is being judged: the job waits for the restart that may serve it",
                has()
            )),
            None => JobError::new(format!(
                "unknown function \"{function}\" (this worker has: {})",
                has()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, payload: &[u8]) -> JobResult {
        let f = Functions::with_builtins();
        let mut p = NoProgress;
        let mut job = Job::new("j1", name, payload, &mut p);
        f.get(name).expect("builtin").call(&mut job)
    }

    #[test]
    fn builtins() {
        assert_eq!(call("echo", b"hi\0there").as_deref(), Ok(&b"hi\0there"[..]));
        assert_eq!(call("reverse", b"abc").as_deref(), Ok(&b"cba"[..]));
        assert_eq!(call("reverse", b"").as_deref(), Ok(&b""[..]));
        assert_eq!(
            call("sha256", b"abc").as_deref(),
            Ok(&b"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"[..])
        );
        assert_eq!(call("sleep", b"1").as_deref(), Ok(&b"1"[..]));
        assert!(call("sleep", b"soon").is_err());
    }

    #[test]
    fn try_register_says_why_a_name_is_refused() {
        let mut f = Functions::empty();
        let err = f.try_register("bad name", |_: &mut Job<'_>| Ok(Vec::new()));
        assert!(err.is_err_and(|e| e.contains("use letters, digits")));
        assert!(f
            .try_register("good.name-1", |_: &mut Job<'_>| Ok(Vec::new()))
            .is_ok());
        assert!(f.get("good.name-1").is_some());
    }

    #[test]
    fn sleep_honours_deadline() {
        let f = Functions::with_builtins();
        let mut p = NoProgress;
        let mut job = Job::new("j", "sleep", b"10000", &mut p);
        job.deadline = Some(Instant::now() + Duration::from_millis(20));
        let started = Instant::now();
        let got = f.get("sleep").expect("builtin").call(&mut job);
        assert!(got.is_err());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// The functions a worker has are named in an unknown function's error, which is stored
    /// as the job's result and logged for every such job: a worker of thousands of functions
    /// names a few and counts the rest.
    #[test]
    fn an_unknown_functions_error_names_a_bounded_few_of_the_rest() {
        let mut table = Table::default();
        for i in 0..3000 {
            table.insert(
                format!("resize_{i:04}"),
                Runner::Executable(PathBuf::from("/bin/true")),
                None,
            );
        }
        let nowhere = crate::watch::Offers::new(PathBuf::from("/nonexistent"));
        let e = table.unknown(&nowhere, "resize");
        let start: String = e.message.chars().take(200).collect();
        assert!(e.message.len() < 400, "{} bytes: {start}", e.message.len());
        assert!(
            e.message.contains("resize_0000, resize_0001"),
            "{}",
            e.message
        );
        assert!(e.message.contains("and 2992 more"), "{}", e.message);
        let mut few = Table::default();
        few.insert(
            "echo".into(),
            Runner::Executable(PathBuf::from("/bin/cat")),
            None,
        );
        assert_eq!(
            few.unknown(&nowhere, "ehco").message,
            "unknown function \"ehco\" (this worker has: echo)"
        );
    }
}
