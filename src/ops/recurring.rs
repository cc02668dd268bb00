//! A failure a loop may meet many times a second for as long as it lasts, said once, then
//! once a minute with a count, and once when it ends (see [`Recurring`]).

/// How often a failure that lasts is said again.
const SAY_AGAIN_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// A failure a loop may meet many times a second for as long as it lasts (an accept short of
/// descriptors): said when it starts, again once a minute with how often it happened, and once
/// when it ends. Each try is still made; only the lines are spared.
pub struct Recurring {
    failing: &'static str,
    again: &'static str,
    /// Since when it fails, how often it failed, and when that was last said.
    since: Option<(std::time::Instant, u64, std::time::Instant)>,
}

impl Recurring {
    /// `failing`: what cannot be done ("status socket: cannot accept a client"); `again`: the
    /// line for when it works again ("status socket: accepting clients again").
    pub const fn new(failing: &'static str, again: &'static str) -> Recurring {
        Recurring {
            failing,
            again,
            since: None,
        }
    }

    /// One more failure.
    pub fn failed(&mut self, e: &dyn std::fmt::Display) {
        let now = std::time::Instant::now();
        match &mut self.since {
            None => {
                log::warn!(
                    "{}: {e} (said again once a minute while it lasts)",
                    self.failing
                );
                self.since = Some((now, 1, now));
            }
            Some((since, n, said)) => {
                *n += 1;
                if now.duration_since(*said) >= SAY_AGAIN_EVERY {
                    log::warn!(
                        "{}: {e} ({n} times in {} s)",
                        self.failing,
                        now.duration_since(*since).as_secs()
                    );
                    *said = now;
                }
            }
        }
    }

    /// Whether it failed last.
    pub fn failing(&self) -> bool {
        self.since.is_some()
    }

    /// It worked: says so if it had failed.
    pub fn worked(&mut self) {
        if let Some((since, n, _)) = self.since.take() {
            log::info!(
                "{} after {n} time(s) in {} s",
                self.again,
                since.elapsed().as_secs()
            );
        }
    }
}
