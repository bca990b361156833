//! Memory that callers no longer use goes back to the system.
//!
//! glibc keeps what a thread freed in that thread's arena for reuse, so after a burst —
//! thousands of connections, many of them hostile, that have since left — the pages stay
//! resident: an attack run left 2.1 GiB held after its callers were gone. After such a
//! burst (the proxy listener's connections fell to half of their peak), the allocator is
//! asked to give its free pages back (`malloc_trim`), off the workers' threads. The same
//! after many connections came to rest (see [`super::resting`]): each gave back hyper's
//! buffers, 16 KiB or so, into pages that stay resident among the connections' small
//! state until trimmed. A trim holds each arena's lock while it walks it (milliseconds
//! with thousands of connections), so it waits for rests worth it: at least 256, and an
//! eighth of the connections open.

use std::sync::Arc;
use std::time::Duration;

use crate::ingress::server::ConnectionGate;

/// How often the connection count is looked at.
const EVERY: Duration = Duration::from_secs(5);
/// Connections come to rest since the last trim, worth one (and an eighth of those open).
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
    loop {
        tokio::time::sleep(EVERY).await;
        let open = gate.open();
        peak = peak.max(open);
        rests += super::between::came_to_rest();
        // A burst worth the walk: a few hundred connections, now half gone.
        let burst_gone = peak >= 256 && open <= peak / 2;
        let rested = rests >= RESTS_WORTH_A_TRIM.max(open / 8);
        if burst_gone || rested {
            peak = open;
            rests = 0;
            let _ = tokio::task::spawn_blocking(give_back_freed).await;
        }
    }
}
