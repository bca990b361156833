//! The fleet's reservations of a token's rate-limit window: one Redis counter per window,
//! `<prefix>:calls:<creds>:<pool index>`, that lives as long as the window.
//!
//! The cost must scale with the budget, not with the fleet (issue 25): a lease is one
//! `INCRBY` — no script, no set of replicas — so a replica pays one command per slice it
//! reserves, and nothing while it gets no call. The counter packs two numbers, both
//! raised by that `INCRBY`: the calls counted (reserved, or made without a reservation:
//! before the replica learned the budget, while Redis was away, or late in the last window
//! so that the platform may count them in this one), bits 0–47; and how many replicas
//! reserved in this window (a replica's first lease of a window adds one), bits 48–62. A
//! replica needs that count only while Redis is away, to know its part of the budget;
//! reading it this way costs nothing.
//!
//! Two cases take a second command: the first lease of a window sets the counter's
//! lifetime (`PEXPIRE`: until the platform's window ends, by the leasing replica's view,
//! and before any replica's own view of it ends, so a replica that starts a new window
//! finds a new counter); and a replica whose first leases found the window spent four
//! windows in a row (and every fourth after) asks how long the counter has left (`PTTL`)
//! and gives it a lifetime if it has none. A counter that outlived its window (a replica
//! died between its two commands) is found spent at every window's start, by every
//! replica: it costs the fleet four windows, never all. A replica that an overloaded
//! fleet leaves short window after window pays one command in four windows for the
//! question; a fleet from a cold start, whose first window is spent on the safe side
//! (see `Governor::observe`), asks nothing.

use std::time::Duration;

use super::scripts::GIVE_BACK;
use super::store::{SharedCache, Unavailable};

/// Added by a replica's first lease in a window: the high bits count the replicas.
const JOINED: u64 = 1 << 48;

/// What a replica asks of the fleet's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// Calls to reserve.
    pub slice: u64,
    /// Calls this replica made in the window without a reservation: counted first.
    pub unreserved: u64,
    /// This replica's first lease in the window.
    pub first: bool,
    /// How long the counter lives if this lease starts it.
    pub lifetime: Duration,
    /// How many windows in a row, before this one, this replica's first lease found
    /// spent.
    pub spent_before: u32,
}

/// What the fleet's window said to a lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leased {
    /// Calls the fleet has counted in the window, this lease included.
    pub counted: u64,
    /// Replicas that reserved some.
    pub replicas: u64,
    /// How long the window has left: asked only of a counter that outlived its window.
    pub left: Option<Duration>,
}

impl SharedCache {
    fn calls_key(&self, creds: &str, index: usize) -> String {
        format!("{}:calls:{creds}:{index}", self.config.key_prefix)
    }

    /// Reserve `lease.slice` calls of pool token `index`'s current window of `allowed`
    /// calls (a count past it means the window is spent).
    pub async fn lease_budget(
        &self,
        creds: &str,
        index: usize,
        allowed: u64,
        lease: Lease,
    ) -> Result<Leased, Unavailable> {
        let key = self.calls_key(creds, index);
        let mut redis = self.connection().await?;
        let add = lease.slice + lease.unreserved + if lease.first { JOINED } else { 0 };
        let counter: u64 = self
            .run(
                redis::cmd("INCRBY")
                    .arg(&key)
                    .arg(add)
                    .query_async(&mut redis),
            )
            .await?;
        let before = counter.saturating_sub(add);
        let lifetime = lease.lifetime.as_millis().clamp(1, u64::MAX as u128) as u64;
        let pexpire = redis::cmd("PEXPIRE").arg(&key).arg(lifetime).to_owned();
        if before == 0 {
            self.run(pexpire.query_async::<()>(&mut redis)).await?;
        }
        let (counted, replicas) = (counter % JOINED, counter / JOINED);
        let spent = counted.saturating_sub(lease.slice) >= allowed;
        let mut left = None;
        if lease.first && spent && lease.spent_before % 4 == 3 {
            let ms: i64 = self
                .run(redis::cmd("PTTL").arg(&key).query_async(&mut redis))
                .await?;
            left = Some(match ms {
                0.. => Duration::from_millis(ms as u64),
                // Gone since the INCRBY: the window has just ended.
                -2 => Duration::ZERO,
                // No lifetime: the PEXPIRE of its first lease never came.
                _ => {
                    self.run(pexpire.query_async::<()>(&mut redis)).await?;
                    lease.lifetime
                }
            });
        }
        Ok(Leased {
            counted,
            replicas,
            left,
        })
    }
}

impl SharedCache {
    /// Give `calls` reserved and not used back to pool token `index`'s window (a small
    /// script, rare: only a replica that went quiet holding a lease does this). A failure
    /// costs the fleet those calls for the window, as before.
    pub async fn give_back(&self, creds: &str, index: usize, calls: u64) {
        let key = self.calls_key(creds, index);
        let Ok(mut redis) = self.connection().await else {
            return;
        };
        let script = redis::Script::new(GIVE_BACK);
        let mut call = script.key(&key);
        call.arg(calls);
        let _ = self.run(call.invoke_async::<i64>(&mut redis)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_counter_keeps_calls_and_replicas_apart() {
        let counter = 3 * JOINED + 57;
        assert_eq!((counter % JOINED, counter / JOINED), (57, 3));
        // Redis counts in signed 64 bits: 32767 replicas fit.
        assert!(32_767 * JOINED + (1 << 40) < i64::MAX as u64);
    }
}
