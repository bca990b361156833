//! Memory that callers no longer use goes back to the system.
//!
//! The binary allocates with jemalloc (`main.rs`), chosen for what a proxy holding
//! thousands of connections does to a heap: each connection's long-lived state (its task,
//! its socket's registration) is made among short-lived buffers (hyper's, 8 KiB and more,
//! freed when the connection comes to rest, see [`super::resting`]). glibc's malloc keeps
//! a page resident while one object in it lives, so freed buffers stayed resident among
//! the live state: 5–6.5 KiB per idle connection in `benches/load.sh`, where 2.35 KiB
//! was in use. jemalloc keeps each size of object in slabs of its own; the buffers' slabs
//! empty whole and can go back (1.8 KiB per idle connection in the same bench, about
//! 1 KiB of it in use).
//!
//! jemalloc returns freed pages after about a second, by its background thread (its
//! options are in `main.rs`). After a burst (the proxy listener's connections fell to
//! half of their peak) or after many connections came to rest, the watcher asks it to
//! return them at once, off the workers' threads: at least 256 rests, and an eighth of
//! the connections open. A page still cached for a worker's thread (jemalloc keeps
//! recently freed objects per thread, and collects that cache only as the thread
//! allocates) cannot go: a worker whose connections came to rest by the hundred flushes
//! its cache (`rests`' sweep), about 200 bytes less per idle caller in `benches/load.sh`'s
//! harness (10,000 callers: 653–780 against 889–959).

use std::sync::Arc;
use std::time::Duration;

use crate::ingress::gate::ConnectionGate;

/// How often the connection count is looked at.
const EVERY: Duration = Duration::from_secs(5);
/// Connections come to rest since the last purge, worth one (and an eighth of those open).
const RESTS_WORTH_A_PURGE: usize = 256;

/// Ask jemalloc to return every arena's freed pages now; whether it did. Where the
/// process allocates with another allocator (the tests use the system's), this touches
/// only jemalloc's own empty arenas.
pub fn give_back_freed() -> bool {
    // "arena.<MALLCTL_ARENAS_ALL>.purge".
    command(c"arena.4096.purge")
}

/// Give the calling thread's cache of freed objects back to jemalloc's arenas, so the
/// pages they hold can be returned: a worker calls it after many of its connections came
/// to rest (see `rests`), as nothing else would while it stays idle (jemalloc collects a
/// thread's cache only as the thread allocates). Whether it did.
pub fn flush_thread_cache() -> bool {
    command(c"thread.tcache.flush")
}

/// A jemalloc command that reads and writes no value (`mallctl`); whether it was taken.
#[allow(unsafe_code)]
fn command(name: &std::ffi::CStr) -> bool {
    // SAFETY: the name is a NUL-terminated string; the null pointers and zero length say
    // that nothing is read or written, as such a command expects.
    unsafe {
        tikv_jemalloc_sys::mallctl(
            name.as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        ) == 0
    }
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
        let rested = rests >= RESTS_WORTH_A_PURGE.max(open / 8);
        if burst_gone || rested {
            peak = open;
            rests = 0;
            let _ = tokio::task::spawn_blocking(give_back_freed).await;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn jemalloc_takes_both_commands() {
        // A misspelt name is refused (ENOENT) and would silently give nothing back.
        assert!(super::give_back_freed(), "arena.4096.purge refused");
        assert!(super::flush_thread_cache(), "thread.tcache.flush refused");
    }
}
