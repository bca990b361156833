//! The fleet's side of the governor: leases of a shared token's window in Redis, and
//! giving back what a replica holds of one and is not using.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::gate::Governor;
use crate::token::shared::{Lease, SharedCache};

impl Governor {
    /// The shared cache and the credentials' name in it, while one is configured.
    fn fleet_cache(&self) -> Option<(Arc<SharedCache>, String)> {
        let fleet = self.fleet.as_ref()?;
        let shared = fleet.shared.load_full()?;
        let creds = shared.credentials_id(&fleet.cache_key);
        Some((shared, creds))
    }

    /// Reserve calls of pool token `index`'s window in Redis and book what they got
    /// (nothing, when Redis cannot be used: this replica falls back to its part of the
    /// budget for a while).
    pub(super) async fn lease(&self, index: usize, lease: Lease) {
        let allowed = self.lock().windows.get(index).and_then(|w| w.allowed);
        let got = match (self.fleet_cache(), allowed) {
            (Some((shared, creds)), Some(allowed)) => shared
                .lease_budget(&creds, index, allowed, lease)
                .await
                .ok(),
            _ => None,
        };
        let mut st = self.lock();
        let granted = st.leased(index, lease, got, Instant::now());
        if granted > 0 {
            if let Some(w) = st.windows.get_mut(index).filter(|w| !w.watched) {
                w.watched = true;
                self.watch_lease(index, w.len.unwrap_or(Duration::from_secs(60)) / 4);
            }
        }
    }

    /// Report calls of window `index` to the fleet without reserving any (a lease of no
    /// calls, off the caller's path: a round trip to Redis).
    pub(super) fn report(&self, index: usize, lease: Lease) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let me = self.me.clone();
        runtime.spawn(async move {
            if let Some(governor) = me.upgrade() {
                governor.lease(index, lease).await;
            }
        });
    }

    /// Give back what this replica holds of window `index` once it is quiet: when a
    /// `quiet` stretch (a quarter of the window) passes with no call let through, the
    /// calls still leased go back to the fleet, for the replicas that have calls. Not in
    /// the window's last two seconds (the counter may be the next window's by then, see
    /// `TokenWindow::in_tail`); what is left at a window's end is gone with it.
    fn watch_lease(&self, index: usize, quiet: Duration) {
        let me = self.me.clone();
        tokio::spawn(async move {
            let Some((mut generation, mut own)) = me.upgrade().and_then(|g| {
                let st = g.lock();
                st.windows.get(index).map(|w| (w.generation, w.own))
            }) else {
                return;
            };
            loop {
                tokio::time::sleep(quiet).await;
                let Some(governor) = me.upgrade() else { return };
                let unused = {
                    let mut st = governor.lock();
                    let now = Instant::now();
                    let Some(w) = st.windows.get_mut(index) else {
                        return;
                    };
                    w.roll(now);
                    if w.leased == 0 {
                        w.watched = false;
                        return;
                    }
                    // Calls since the last look (or a new window's lease): still in use.
                    if (w.generation, w.own) != (generation, own) || w.in_tail(now) {
                        (generation, own) = (w.generation, w.own);
                        continue;
                    }
                    w.watched = false;
                    let unused = std::mem::take(&mut w.leased);
                    w.fleet_total = w.fleet_total.saturating_sub(unused);
                    unused
                };
                if let Some((shared, creds)) = governor.fleet_cache() {
                    shared.give_back(&creds, index, unused).await;
                }
                return;
            }
        });
    }
}
