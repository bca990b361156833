//! One pooled token's window of calls as the governor counts it, and what the platform's
//! answers and documentation say about it.

use std::time::Duration;

use http::{HeaderMap, HeaderName};
use tokio::time::Instant;

use crate::config::RateLimit;
use crate::token::shared::Lease;

/// Added to the end of a window the platform reports: its reset is in whole seconds, so
/// the real end may be up to a second later than it says.
pub(super) const MARGIN: Duration = Duration::from_secs(1);

/// The most calls a replica reserves at a time: an eighth of the budget, at least 10
/// (one Redis command per slice).
pub(super) fn slice_of(allowed: u64) -> u64 {
    (allowed / 8).max(10).min(allowed)
}

/// One pooled token's window, as the governor counts it, and the pace it spends it at.
#[derive(Debug, Clone)]
pub(super) struct TokenWindow {
    /// Calls allowed per window; `None`: not known (the token is not held back).
    pub(super) allowed: Option<u64>,
    /// Calls let through in this window (or counted by the platform, if more).
    pub(super) used: u64,
    /// When this window ends; `None`: no call started one yet (the next one does).
    pub(super) ends: Option<Instant>,
    /// How long a window lasts, as configured or as the platform's resets tell (the
    /// longest reset seen); `None`: not known yet.
    pub(super) len: Option<Duration>,
    /// Calls that may start now, once calls wait: a backlog is let through at an even
    /// pace (`allowed / len`, with a burst of a quarter of it), so it cannot spend a
    /// whole window in its first moment and leave a quiet client nothing. While nobody
    /// waits, a call with room in the window goes at once (it spends the pace too).
    pub(super) bucket: f64,
    pub(super) refilled: Instant,
    /// With a fleet: calls of this window reserved in Redis and not used yet. A call
    /// spends one; when none are left, the dispatcher reserves a slice more.
    pub(super) leased: u64,
    /// This replica leased in this window (its next lease is its first of the next); a
    /// task watches for leased calls it stops using (see `Governor::watch_lease`).
    pub(super) joined: bool,
    pub(super) watched: bool,
    /// How many windows in a row this replica's first lease found spent (kept across
    /// windows): a counter that outlived its window is found so every time (see
    /// `SharedCache::lease_budget`).
    pub(super) spent_joins: u32,
    /// The fleet's reservations in this window as the last lease told (at the budget: the
    /// window is spent once this replica's leased calls are); and how many replicas
    /// reserved, the most seen lately (kept across windows, renewed within five minutes).
    /// While Redis is down, a replica spends what it leased, then an equal part of what
    /// the fleet had not reserved.
    pub(super) fleet_total: u64,
    pub(super) replicas: u64,
    pub(super) replicas_seen: Option<Instant>,
    /// Calls this replica made in this window without a leased one (before it learned
    /// the budget, while Redis was away, late calls of the last window): its next lease
    /// counts them first. Every replica counts its own, so the fleet's count has each
    /// once — if the replica leases again in the window.
    pub(super) unreserved: u64,
    /// The fleet had no more of this window for this replica; and, of the last window,
    /// the calls this replica let through and whether it was short: slices are sized from
    /// them.
    pub(super) starved: bool,
    pub(super) last: Option<(u64, bool)>,
    /// Since Redis went down (in this window): the window's count then, and this
    /// replica's calls then.
    pub(super) fallback_from: Option<(u64, u64)>,
    /// Calls that were in flight when this window's count was learned (the platform may
    /// not have counted them yet): held back from the budget until the platform's count
    /// shows them, or fewer calls than that are still in flight.
    pub(super) guard: u64,
    /// Calls this replica let through in this window.
    pub(super) own: u64,
    /// Calls let through in the window's last two seconds (and when the first was): the
    /// platform's window may already have ended, so they may count in its next one.
    pub(super) late: u64,
    pub(super) late_first: Option<Instant>,
    /// `allowed` and `len` are the provider's documented budget, assumed until the
    /// platform's first answer says what it is.
    pub(super) assumed: bool,
    /// Counts the windows: a client's calls in a window are kept with its generation.
    pub(super) generation: u64,
}

impl TokenWindow {
    /// A window of `limit` (`None`: not known yet), before any call.
    pub(super) fn new(limit: Option<RateLimit>) -> TokenWindow {
        TokenWindow {
            allowed: limit.map(|l| l.calls),
            used: 0,
            ends: None,
            len: limit.map(|l| l.window),
            bucket: limit.map_or(1.0, |l| (l.calls as f64 / 4.0).max(1.0)),
            refilled: Instant::now(),
            leased: 0,
            joined: false,
            watched: false,
            spent_joins: 0,
            fleet_total: 0,
            replicas: 1,
            replicas_seen: None,
            unreserved: 0,
            starved: false,
            last: None,
            fallback_from: None,
            guard: 0,
            own: 0,
            late: 0,
            late_first: None,
            assumed: false,
            generation: 0,
        }
    }

    /// Calls per second and the burst, when both the budget and the window are known.
    pub(super) fn pace(&self) -> Option<(f64, f64)> {
        let (allowed, len) = (self.allowed?, self.len?);
        if len.is_zero() {
            return None;
        }
        let burst = (allowed as f64 / 4.0).max(1.0);
        Some((allowed as f64 / len.as_secs_f64(), burst))
    }

    pub(super) fn refill(&mut self, now: Instant) {
        if let Some((rate, burst)) = self.pace() {
            let gained = now.saturating_duration_since(self.refilled).as_secs_f64() * rate;
            self.bucket = (self.bucket + gained).min(burst);
        }
        self.refilled = now;
    }

    /// Late in the window (its last two margins, see [`Self::count_call`]): the
    /// platform's window may have ended already (its reset is in whole seconds), so calls
    /// of a lease taken now could be counted in the next one, which the fleet would not
    /// know. A replica leases again once its own window has ended; what it leased before
    /// it still spends (and counts in its next lease).
    pub(super) fn in_tail(&self, now: Instant) -> bool {
        self.ends.is_some_and(|e| now + MARGIN * 2 >= e)
    }

    /// A lease of `slice` calls of this window made now (see [`Lease`]).
    pub(super) fn lease(&self, slice: u64, now: Instant) -> Lease {
        // The counter lives until the platform's window ends as this replica sees it (its
        // own view ends a margin later, as every replica's does, so a replica that starts
        // the next window finds a new counter); a window no call has started yet lasts
        // its length from its first call, after this.
        let lifetime = self
            .ends
            .map_or(self.len.unwrap_or(Duration::from_secs(60)) + MARGIN, |e| {
                e.saturating_duration_since(now + MARGIN)
            });
        Lease {
            slice,
            unreserved: self.unreserved,
            first: !self.joined,
            lifetime,
            spent_before: self.spent_joins,
        }
    }

    pub(super) fn window_has_room(&self) -> bool {
        self.allowed.is_none_or(|a| self.used + self.guard < a)
    }

    /// Room for a call now. `fleet`: the budget is shared through Redis and reachable
    /// (a reserved call is needed); `Some(false)`: shared but Redis is down (this
    /// replica's part of the budget); `None`: not shared.
    pub(super) fn has_room(&self, fleet: Option<bool>, paced: bool) -> bool {
        let share = match fleet {
            None => true,
            Some(true) => self.leased > 0,
            Some(false) => {
                // What nobody had counted when Redis went down, less what the others may
                // still hold reserved (a slice each), in equal parts.
                let (base, own_then) = self.fallback_from.unwrap_or((self.used, self.own));
                self.leased > 0
                    || self.allowed.is_none_or(|a| {
                        let others = (self.replicas.max(1) - 1) * slice_of(a);
                        let part =
                            a.saturating_sub(base).saturating_sub(others) / self.replicas.max(1);
                        self.own.saturating_sub(own_then) < part
                    })
            }
        };
        share && self.window_has_room() && (!paced || self.pace().is_none() || self.bucket >= 1.0)
    }

    /// Count a call let through now (`fleet`: see [`Self::has_room`]).
    pub(super) fn count_call(&mut self, now: Instant, fleet: Option<bool>) {
        self.used += 1;
        self.own += 1;
        // A reserved call first (also while Redis is down).
        if fleet.is_some() && self.leased > 0 {
            self.leased -= 1;
            // The last lease found the fleet at the budget: nothing more to lease.
            if self.leased == 0 && self.allowed.is_some_and(|a| self.fleet_total >= a) {
                self.used = self.used.max(self.fleet_total);
                self.starved = true;
            }
        } else if fleet.is_some() {
            self.unreserved += 1;
        }
        if self.pace().is_some() {
            self.bucket = (self.bucket - 1.0).max(0.0);
        }
        match self.ends {
            // Until the platform says otherwise, a window as long as the longest seen (a
            // minute, if none was).
            None => self.ends = Some(now + self.len.unwrap_or(Duration::from_secs(60)) + MARGIN),
            // Late in the window: the platform's may have ended, and count it in its next.
            Some(e) if now + MARGIN * 2 >= e => {
                self.late += 1;
                self.late_first.get_or_insert(now);
            }
            Some(_) => {}
        }
    }

    pub(super) fn roll(&mut self, now: Instant) {
        if self.ends.is_some_and(|e| e <= now) {
            // The late calls may have started the platform's next window: count them in
            // ours, which then ends a window after the first of them.
            self.used = self.late;
            self.last = Some((self.own, self.starved));
            self.own = self.late;
            self.unreserved = self.late;
            self.starved = false;
            self.ends = self
                .late_first
                .map(|t| t + self.len.unwrap_or(Duration::from_secs(60)) + MARGIN);
            self.leased = 0;
            self.joined = false;
            self.fleet_total = 0;
            self.fallback_from = None;
            self.guard = 0;
            self.late = 0;
            self.late_first = None;
            self.generation += 1;
        }
        self.refill(now);
    }

    /// When it next has room (`now` if it has, or if it needs a lease from the fleet).
    pub(super) fn room_at(&self, now: Instant, fleet: Option<bool>) -> Instant {
        let part_spent =
            fleet == Some(false) && !self.has_room(Some(false), false) && self.window_has_room();
        if self.guard > 0 && self.allowed.is_some_and(|a| self.used < a) && !self.window_has_room()
        {
            // Room comes with the answers of the calls in flight (each answer dispatches);
            // look again soon in any case.
            return now + Duration::from_millis(20);
        }
        let lease_waits = fleet == Some(true) && self.leased == 0 && self.in_tail(now);
        if !self.window_has_room() || part_spent || lease_waits {
            return self.ends.unwrap_or(now);
        }
        match self.pace() {
            Some((rate, _)) if self.bucket < 1.0 => {
                now + Duration::from_secs_f64((1.0 - self.bucket) / rate)
            }
            _ => now,
        }
    }
}

/// The budget a provider documents for a token, held until its answers say otherwise:
/// Genesys Cloud allows 300 calls a minute per client-credentials token
/// (`client.credentials.token.rate.per.minute`). CXone documents none.
pub fn documented_budget(provider: crate::config::providers::Provider) -> Option<RateLimit> {
    match provider {
        crate::config::providers::Provider::Genesys => Some(RateLimit {
            calls: 300,
            window: Duration::from_secs(60),
        }),
        _ => None,
    }
}

/// Genesys Cloud's rate-limit headers, as names made once: looked up in every answer, a
/// name given as text would be parsed and checked again each time.
pub const RATELIMIT_ALLOWED: HeaderName = HeaderName::from_static("inin-ratelimit-allowed");
pub const RATELIMIT_COUNT: HeaderName = HeaderName::from_static("inin-ratelimit-count");
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("inin-ratelimit-reset");

/// A header holding a whole number (`inin-ratelimit-*`, `Retry-After` in seconds).
pub fn header_number(headers: &HeaderMap, name: HeaderName) -> Option<u64> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
}

/// A budget as it stands, for the status page, metrics and `check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    /// Calls allowed per window, over the pool's tokens.
    pub allowed: u64,
    pub used: u64,
    pub window: Duration,
    /// Calls waiting for room now.
    pub waiting: usize,
}
