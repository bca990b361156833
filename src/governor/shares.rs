//! Each client's share of a window, told to it and held to.
//!
//! A client alone may spend the whole budget. While other clients call too — any that
//! asked for a call within the last window's length — each holds `share / Σ shares` of
//! every window (rounded down, at least one call), and a call past its client's share
//! waits for the window to end, or is refused when that is beyond
//! `rate_limit_max_wait_secs`. So the figures every answer carries (`RateLimit-Limit`,
//! `RateLimit-Remaining`, `RateLimit-Reset`, Kong's convention) are what the governor then
//! allows: an app that spends its announced remainder is served, and its next call waits.
//! A share a calling client leaves unspent is not handed to the others within the window:
//! the price of a number an app can pace itself by.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::queue::State;
use super::window::TokenWindow;

/// A client's share of the budget now, as its answers tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShareNow {
    /// Calls it may make per window (over the pool's tokens).
    pub limit: u64,
    /// Calls it may still make in the current window.
    pub remaining: u64,
    /// Until the current window ends (the first to end, over the pool).
    pub reset: Duration,
}

/// A window's length where none is known yet.
const DEFAULT_LEN: Duration = Duration::from_secs(60);

/// The calls of a window a client of weight `share` among clients weighing `total` may
/// make: at least one.
fn part(allowed: u64, (share, total): (u64, u64)) -> u64 {
    (allowed.saturating_mul(share) / total.max(1)).max(1)
}

impl State {
    /// `client`'s weight and the weight of every client calling now (itself included),
    /// when others call too; `None` when it is alone (it may spend the whole budget).
    pub(super) fn sharing(&self, client: &Arc<str>, now: Instant) -> Option<(u64, u64)> {
        let len = self
            .windows
            .first()
            .and_then(|w| w.len)
            .unwrap_or(DEFAULT_LEN);
        let mut total = 0u64;
        let mut others = false;
        let mut own = 1u64;
        for (name, book) in &self.clients {
            let calling = book
                .last_asked
                .is_some_and(|t| now.saturating_duration_since(t) < len);
            if name == client {
                own = u64::from(book.share.max(1));
                total += own;
            } else if calling {
                others = true;
                total += u64::from(book.share.max(1));
            }
        }
        others.then_some((own, total))
    }

    /// Calls `client` made in window `index` (this generation of it).
    fn spent_in(&self, client: &Arc<str>, index: usize) -> u64 {
        let generation = self.windows[index].generation;
        self.clients
            .get(client)
            .and_then(|b| b.spent.get(index))
            .filter(|(g, _)| *g == generation)
            .map_or(0, |(_, n)| *n)
    }

    /// Whether `client` has spent its share of window `index`.
    pub(super) fn past_share(
        &self,
        client: &Arc<str>,
        index: usize,
        sharing: Option<(u64, u64)>,
    ) -> bool {
        let (Some(sharing), Some(allowed)) = (sharing, self.windows[index].allowed) else {
            return false;
        };
        self.spent_in(client, index) >= part(allowed, sharing)
    }

    /// Whether `client` has spent its share of every window (while others call).
    pub(super) fn share_spent(&self, client: &Arc<str>, now: Instant) -> bool {
        let sharing = self.sharing(client, now);
        sharing.is_some() && (0..self.windows.len()).all(|i| self.past_share(client, i, sharing))
    }

    pub(super) fn spend(&mut self, client: &Arc<str>, index: usize) {
        let generation = self.windows[index].generation;
        let book = self.clients.entry(Arc::clone(client)).or_default();
        if book.spent.len() <= index {
            book.spent.resize(index + 1, (0, 0));
        }
        let slot = &mut book.spent[index];
        if slot.0 != generation {
            *slot = (generation, 0);
        }
        slot.1 += 1;
    }

    pub(super) fn unspend(&mut self, client: &Arc<str>, index: usize) {
        if let Some(slot) = self
            .clients
            .get_mut(client)
            .and_then(|b| b.spent.get_mut(index))
        {
            slot.1 = slot.1.saturating_sub(1);
        }
    }

    /// When `client` next has room: when the first window ends, if it spent its share of
    /// every one; else when the budget has room.
    pub(super) fn room_at_for(&self, client: &Arc<str>, now: Instant) -> Instant {
        let room = self.room_at(now);
        if !self.share_spent(client, now) {
            return room;
        }
        let end = self
            .windows
            .iter()
            .filter_map(|w| w.ends)
            .min()
            .unwrap_or(now + DEFAULT_LEN);
        room.max(end)
    }

    /// When the dispatcher should look again: the soonest any waiting call has room.
    pub(super) fn next_wake(&self, now: Instant) -> Instant {
        self.waiting
            .iter()
            .map(|w| self.room_at_for(&w.0.client, now))
            .min()
            .unwrap_or_else(|| self.room_at(now))
    }

    /// `client`'s share as it stands now (see [`ShareNow`]); `None` while no budget is
    /// known.
    pub(super) fn share_now(&self, client: &Arc<str>, now: Instant) -> Option<ShareNow> {
        let sharing = self.sharing(client, now);
        let mut share = ShareNow {
            limit: 0,
            remaining: 0,
            reset: Duration::MAX,
        };
        for (i, w) in self.windows.iter().enumerate() {
            let mut w: TokenWindow = w.clone();
            w.roll(now);
            let allowed = w.allowed?;
            let limit = sharing.map_or(allowed, |s| part(allowed, s));
            let spent = if w.generation == self.windows[i].generation {
                self.spent_in(client, i)
            } else {
                0
            };
            let room = allowed.saturating_sub(w.used + w.guard);
            share.limit += limit;
            share.remaining += limit.saturating_sub(spent).min(room);
            let reset = w.ends.map_or(w.len.unwrap_or(DEFAULT_LEN), |e| {
                e.saturating_duration_since(now)
            });
            share.reset = share.reset.min(reset);
        }
        (share.reset != Duration::MAX).then_some(share)
    }
}
