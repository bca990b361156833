//! What the log says of a token endpoint that keeps failing, and the last failure the
//! status page shows.
//!
//! While no usable token is held, a failing grant that may pass by itself is tried again by
//! the next call that needs a token after a second ([`super::backoff::PROBE_AFTER`]), so a
//! down endpoint sees about one grant a second per upstream and replica — which is what
//! brings calls back within two seconds of its return. A WARN line per attempt would be
//! one a second: the log says so when grants start failing, then once a minute with the
//! failures since, and when a grant succeeds again. Every attempt is logged at debug.

use std::time::Duration;

use tokio::time::Instant;

use super::grant::GrantError;

/// How often a grant that keeps failing is logged again.
const EVERY: Duration = Duration::from_secs(60);

/// The last failed grant, for the status page.
#[derive(Debug, Clone)]
pub struct Failure {
    pub at: std::time::SystemTime,
    pub error: GrantError,
}

#[derive(Debug, Default)]
pub(super) struct FailureLog {
    /// Since when grants fail, and failures since then.
    since: Option<Instant>,
    failures: u64,
    /// When the last WARN line was written, and failures since it.
    warned_at: Option<Instant>,
    unreported: u64,
}

impl FailureLog {
    /// A grant failed.
    pub(super) fn failed(
        &mut self,
        upstream: &str,
        cause: &GrantError,
        retry_after: Option<Duration>,
    ) {
        let now = Instant::now();
        self.failures += 1;
        self.unreported += 1;
        let retry_in_secs = retry_after.map(|d| d.as_secs_f32());
        let Some(since) = self.since else {
            (self.since, self.warned_at, self.unreported) = (Some(now), Some(now), 0);
            tracing::warn!(upstream, error = %cause, retry_in_secs, "token grant failed (while it keeps failing, this is logged once a minute)");
            crate::emit!(warn, "grant_failed", upstream, error = %cause);
            return;
        };
        if self
            .warned_at
            .is_some_and(|at| now.saturating_duration_since(at) >= EVERY)
        {
            let failed = std::mem::take(&mut self.unreported);
            self.warned_at = Some(now);
            tracing::warn!(
                upstream,
                error = %cause,
                failed_in_last_minute = failed,
                failing_secs = now.saturating_duration_since(since).as_secs(),
                "token grant still failing"
            );
        } else {
            tracing::debug!(upstream, error = %cause, retry_in_secs, "token grant failed again");
        }
    }

    /// A grant succeeded: whether it ended a run of failures (then logged here).
    pub(super) fn recovered(&mut self, upstream: &str) -> bool {
        let was = std::mem::take(self);
        let Some(since) = was.since else {
            return false;
        };
        tracing::warn!(
            upstream,
            failed_grants = was.failures,
            failing_secs = since.elapsed().as_secs(),
            "token grant succeeded again"
        );
        crate::emit!(
            info,
            "grant_recovered",
            upstream,
            failed_grants = was.failures,
            failing_secs = since.elapsed().as_secs()
        );
        true
    }
}
