//! What the platform's answers say about a token's window: Genesys' `inin-ratelimit-*`
//! headers and its 429s, read after every call (see [`Governor::observe`]).

use std::sync::atomic::Ordering;
use std::time::Duration;

use http::HeaderMap;
use tokio::time::Instant;

use super::gate::Governor;
use super::window::MARGIN;
use super::window::{header_number, RATELIMIT_ALLOWED, RATELIMIT_COUNT, RATELIMIT_RESET};

impl Governor {
    /// Read an answer's budget for pooled token `index` (Genesys' `inin-ratelimit-*`),
    /// and a platform 429, which says the window is spent whatever was believed. The
    /// calls on their way (this one among them) may be counted by the platform after
    /// this answer's count: read when a budget is first learned, or the platform starts a
    /// window the governor did not expect. They are the calls let through and still
    /// [`Unanswered`](super::Unanswered), or, if more, `holding_connections` (calls that
    /// passed while the governor held no budget were not counted by it).
    pub fn observe(
        &self,
        index: usize,
        status: u16,
        headers: &HeaderMap,
        holding_connections: impl Fn() -> u64,
    ) {
        let number = |name| header_number(headers, name);
        let allowed = number(RATELIMIT_ALLOWED);
        if allowed.is_none()
            && !matches!(status, 401 | 429)
            && self.assuming.load(Ordering::Relaxed)
        {
            self.drop_assumption();
            return;
        }
        if allowed.is_none() && (status != 429 || !self.is_active()) {
            return;
        }
        let (count, reset) = (
            number(RATELIMIT_COUNT),
            number(RATELIMIT_RESET).or_else(|| number(http::header::RETRY_AFTER)),
        );
        let now = Instant::now();
        let mut st = self.lock();
        let unanswered = st
            .unanswered
            .get(index)
            .map_or(0, |n| n.load(Ordering::Relaxed));
        let in_flight = || unanswered.max(holding_connections());
        let Some(w) = st.windows.get_mut(index) else {
            return;
        };
        w.roll(now);
        let learned = allowed.is_some() && (w.allowed.is_none() || w.assumed);
        let was_assumed = w.assumed;
        if let Some(a) = allowed {
            w.allowed = Some(a);
            w.assumed = false;
            self.active.store(true, Ordering::Relaxed);
        }
        if let Some(reset) = reset {
            let left = Duration::from_secs(reset.min(86_400));
            if status != 429 {
                // The platform's resets replace an assumed window's length.
                let learned = w.len.is_none() || (was_assumed && !w.assumed);
                w.len = Some(if learned {
                    left
                } else {
                    w.len.unwrap_or_default().max(left)
                });
                if learned {
                    w.bucket = w.pace().map_or(1.0, |(_, burst)| burst);
                }
            }
            let end = now + left + MARGIN;
            // A reset well past the window believed: the platform started a new one.
            let len = w.len.unwrap_or(left);
            let newer = w.ends.is_none_or(|e| end > e + len / 2);
            if newer || learned {
                // Calls let through before this count was known, or counted in a window
                // it did not expect, may be in flight: hold that many back until the count
                // shows them (this answer's own call is in it).
                w.used = count.unwrap_or(w.used);
                w.guard = in_flight().saturating_sub(1);
            } else {
                let count = count.unwrap_or(0);
                if w.guard > 0 {
                    // Counted beyond what was let through since: those were the calls in
                    // flight; and no more can be unaccounted than are in flight now.
                    let held = w.guard.saturating_sub(count.saturating_sub(w.used));
                    w.guard = held.min(in_flight().saturating_sub(1));
                }
                w.used = w.used.max(count);
            }
            // The platform's clock decides when its window ends.
            w.ends = Some(end);
        }
        if status == 429 {
            w.used = w.used.max(w.allowed.unwrap_or(w.used));
            if w.allowed.is_none() {
                w.allowed = Some(w.used.max(1));
            }
            if reset.is_none() {
                w.ends = Some(w.ends.unwrap_or(now).max(now + Duration::from_secs(1)));
            }
        }
        // The calls this replica made before it knew the budget (none was reserved with
        // the fleet) go to the fleet's counter at once: reported with its next lease, they
        // could come after the other replicas had leased the whole window, and the
        // platform would count more than it allows. Each replica reports its own, so the
        // counter holds each call once.
        let report = (learned && st.fleet_mode(now) == Some(true))
            .then(|| st.windows.get(index).map(|w| w.lease(0, now)))
            .flatten();
        if let Some(lease) = report {
            self.report(index, lease);
        }
        if !st.waiting.is_empty() {
            st.dispatch(now);
        }
    }
}
