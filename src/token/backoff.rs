//! What a caller wants from a token source, and how failed grants back off.

use std::time::Duration;

use http::HeaderValue;
use rand::Rng;
use tokio::time::Instant;

use super::grant::GrantError;
use super::issued::Token;

/// What a caller needs from the cache.
#[derive(Debug, Clone, Copy)]
pub(super) enum Want {
    /// Any token still usable.
    Usable,
    /// A usable token other than this one, which the upstream just rejected.
    Replacing(u64),
    /// A token not yet due for refresh (background refresh).
    Fresh,
}

impl Want {
    pub(super) fn satisfied_by(self, t: &Token, now: Instant) -> bool {
        match self {
            Want::Usable => t.is_usable(now),
            Want::Replacing(g) => t.is_usable(now) && t.generation != g,
            Want::Fresh => t.is_usable(now) && !t.due_for_refresh(now),
        }
    }

    /// Can a caller make do with `t` when no new token can be had right now?
    pub(super) fn tolerates(self, t: &Token, now: Instant) -> bool {
        match self {
            Want::Replacing(g) => t.is_usable(now) && t.generation != g,
            Want::Usable | Want::Fresh => t.is_usable(now),
        }
    }
}

/// While no usable token is held, a failed grant that may succeed on its own (the token
/// endpoint down, slow or rate limited) is tried again by the next call once it is this
/// old, however long the backoff has grown: service comes back within about this long of
/// the token endpoint. One probe at a time (the single flight), so at most one grant a
/// second reaches an endpoint that is failing.
pub(super) const PROBE_AFTER: Duration = Duration::from_secs(1);

/// The longest a source waits for another replica's grant under the fleet lock.
pub(super) const FOREIGN_LOCK_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, Default)]
pub(super) struct Backoff {
    pub(super) failures: u32,
    /// When the last grant failed.
    pub(super) failed_at: Option<Instant>,
    pub(super) until: Option<Instant>,
    pub(super) last_error: Option<GrantError>,
    /// The last token the upstream rejected: the fleet's cache may still hold it, and it
    /// must not come back from there.
    pub(super) rejected: Option<HeaderValue>,
    /// Judgements of rejected tokens: kept across grants, unlike the rest.
    pub(super) judge: super::rejection::Judge,
}

impl Backoff {
    /// After a token was had: no failure is remembered, the judgements are.
    pub(super) fn succeeded(&mut self) {
        let judge = std::mem::take(&mut self.judge);
        *self = Backoff {
            judge,
            ..Backoff::default()
        };
    }

    pub(super) fn record(&mut self, error: GrantError, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        let exp = 1u64 << self.failures.saturating_sub(1).min(6); // 1 s … 64 s
        let base = Duration::from_secs(exp).min(Duration::from_secs(60));
        let jitter = rand::thread_rng().gen_range(0.8..1.2);
        self.until = Some(now + base.mul_f64(jitter));
        self.failed_at = Some(now);
        self.last_error = Some(error);
    }

    pub(super) fn active(&self, now: Instant) -> Option<Duration> {
        self.until.filter(|u| *u > now).map(|u| u - now)
    }

    /// How long until a caller holding no usable token may probe with a grant of its own
    /// (see [`PROBE_AFTER`]); `None` when the backoff is not active or the last failure
    /// will not pass by itself (refused credentials wait out the whole backoff).
    pub(super) fn probe_in(&self, now: Instant) -> Option<Duration> {
        self.active(now)?;
        if !self
            .last_error
            .as_ref()
            .is_some_and(GrantError::is_transient)
        {
            return None;
        }
        let since = now.saturating_duration_since(self.failed_at?);
        Some(PROBE_AFTER.saturating_sub(since))
    }

    /// What a caller with no usable token waits for: the backoff, or a probe sooner.
    pub(super) fn wait_without_token(&self, now: Instant) -> Option<Duration> {
        let wait = self.active(now)?;
        Some(self.probe_in(now).map_or(wait, |probe| probe.min(wait)))
    }
}
