//! Memory that callers no longer use goes back to the system.
//!
//! glibc keeps what a thread freed in that thread's arena for reuse, so after a burst —
//! thousands of connections, many of them hostile, that have since left — the pages stay
//! resident: an attack run left 2.1 GiB held after its callers were gone. After such a
//! burst (the proxy listener's connections fell to half of their peak), the allocator is
//! asked to give its free pages back (`malloc_trim`), off the workers' threads. The same
//! after many connections came to rest (see [`super::resting`]): each gave back hyper's
//! buffers, 16 KiB or so, into pages that stay resident among the connections' small
//! state until trimmed — at most once per [`AFTER_RESTS_EVERY`], as a trim holds each
//! arena's lock while it walks it.

use std::sync::Arc;
use std::time::Duration;

use crate::ingress::server::ConnectionGate;

/// How often the connection count is looked at.
const EVERY: Duration = Duration::from_secs(5);
/// Trims for connections that came to rest, at most this often.
const AFTER_RESTS_EVERY: Duration = Duration::from_secs(30);
/// Connections come to rest since the last look, worth a trim.
const RESTS_WORTH_A_TRIM: usize = 256;

/// Ask the allocator to return its free pages; whether it gave any back.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub fn give_back_freed() -> bool {
    // SAFETY: malloc_trim takes no pointers; glibc locks each arena while it walks it.
    unsafe { libc::malloc_trim(0) == 1 }
}

/// Other allocators return large blocks themselves.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn give_back_freed() -> bool {
    false
}

/// Watch `gate`'s connections for good; after each burst has gone, give memory back.
pub async fn give_back_after_bursts(gate: Arc<ConnectionGate>) {
    let mut peak = 0;
    let mut rests = 0;
    let mut last_for_rests: Option<tokio::time::Instant> = None;
    loop {
        tokio::time::sleep(EVERY).await;
        let open = gate.open();
        peak = peak.max(open);
        rests += super::resting::came_to_rest();
        // A burst worth the walk: a few hundred connections, now half gone.
        let burst_gone = peak >= 256 && open <= peak / 2;
        let rested = rests >= RESTS_WORTH_A_TRIM
            && last_for_rests.is_none_or(|t| t.elapsed() >= AFTER_RESTS_EVERY);
        if burst_gone || rested {
            peak = open;
            if rested {
                rests = 0;
                last_for_rests = Some(tokio::time::Instant::now());
            }
            let _ = tokio::task::spawn_blocking(give_back_freed).await;
        }
    }
}
