//! The operator's counters: every upstream's traffic and every client's use, as the
//! [observe layer](crate::front::observe) sees them; the status page
//! ([`crate::admin::page`]) shows them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::config::ClientConfig;

pub(crate) const WINDOW_SECS: usize = 60;

/// Requests and errors per second over the last minute, counted without a lock: every
/// worker records every answer here, and a shared mutex on that path costs each call.
/// A bucket is one atomic word per count, the second it belongs to in the high half and
/// the count in the low half, so moving a bucket to a new second and counting are one
/// atomic update and no count is lost at the turn of a second.
pub(crate) struct Window {
    /// Per second modulo 60: (second since start << 32 | requests, same | errors).
    pub(crate) buckets: [(AtomicU64, AtomicU64); WINDOW_SECS],
}

/// Count one in `slot` for `second`, starting the count afresh if it held another second.
fn count_in(slot: &AtomicU64, second: u64) {
    let _ = slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |word| {
        Some(if word >> 32 == second {
            word + 1
        } else {
            (second << 32) | 1
        })
    });
}

/// The count `slot` holds if it belongs to the minute before `now`.
pub(crate) fn count_of(slot: &AtomicU64, now: u64) -> u64 {
    let word = slot.load(Ordering::Relaxed);
    if now.saturating_sub(word >> 32) < WINDOW_SECS as u64 {
        word & u64::from(u32::MAX)
    } else {
        0
    }
}

impl Window {
    fn new() -> Window {
        Window {
            buckets: std::array::from_fn(|_| (AtomicU64::new(0), AtomicU64::new(0))),
        }
    }

    fn record(&self, second: u64, error: bool) {
        // Seconds since start fit the high half for 136 years.
        let second = second & u64::from(u32::MAX);
        let (requests, errors) = &self.buckets[(second % WINDOW_SECS as u64) as usize];
        count_in(requests, second);
        if error {
            count_in(errors, second);
        }
    }

    pub(crate) fn totals(&self, now: u64) -> (u64, u64) {
        self.buckets
            .iter()
            .fold((0, 0), |(r, e), (requests, errors)| {
                (r + count_of(requests, now), e + count_of(errors, now))
            })
    }
}

/// Calls sent to an upstream per 10 s over the last 10 minutes, for one client: the
/// status page's chart. Buckets as in [`Window`]: (bucket number << 32 | count).
pub(crate) struct History {
    pub(crate) buckets: [AtomicU64; HISTORY_BUCKETS],
}

pub(crate) const HISTORY_BUCKETS: usize = 60;
pub(crate) const BUCKET_SECS: u64 = 10;

impl History {
    fn new() -> History {
        History {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn record(&self, second: u64) {
        let bucket = (second / BUCKET_SECS) & u64::from(u32::MAX);
        count_in(
            &self.buckets[(bucket % HISTORY_BUCKETS as u64) as usize],
            bucket,
        );
    }

    /// The counts, oldest first, the last one the bucket `second` falls in.
    pub(crate) fn counts(&self, second: u64) -> Vec<u64> {
        let now = second / BUCKET_SECS;
        (0..HISTORY_BUCKETS as u64)
            .rev()
            .map(|ago| match now.checked_sub(ago) {
                Some(b) => {
                    let word =
                        self.buckets[(b % HISTORY_BUCKETS as u64) as usize].load(Ordering::Relaxed);
                    if word >> 32 == b {
                        word & u64::from(u32::MAX)
                    } else {
                        0
                    }
                }
                None => 0,
            })
            .collect()
    }
}

pub(crate) struct UpstreamStats {
    pub(crate) name: Arc<str>,
    pub(crate) window: Window,
    /// Per client, in the order of [`StatusBoard::clients`].
    pub(crate) history: Vec<History>,
    pub(crate) retries_401: AtomicU64,
    pub(crate) throttled_429: AtomicU64,
}

pub(crate) struct ClientStats {
    pub(crate) name: Arc<str>,
    pub(crate) share: u32,
    pub(crate) max_per_minute: Option<u64>,
    /// Its keys (their hashes, expiry and last use; never a key).
    pub(crate) keys: Vec<crate::config::ClientKey>,
    pub(crate) requests: AtomicU64,
    pub(crate) forbidden: AtomicU64,
}

/// Counters for the status page, fed by the observe layer.
pub struct StatusBoard {
    /// Usage per app (`/usage.json`): the process's, kept across reloads; here so the
    /// observe layer reaches it without another handle per call.
    pub usage: Arc<super::usage::Usage>,
    pub(crate) started: Instant,
    pub(crate) upstreams: Vec<UpstreamStats>,
    pub(crate) clients: Vec<ClientStats>,
}

impl std::fmt::Debug for StatusBoard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatusBoard")
    }
}

/// What the observe layer knows of one answer.
#[derive(Debug, Clone, Copy)]
pub struct Answered<'a> {
    pub upstream: Option<&'a str>,
    pub client: Option<&'a str>,
    pub status: u16,
    /// The proxy's own error code, if the proxy made the answer.
    pub proxy_error: Option<crate::http::codes::ErrorCode>,
    pub retried_after_401: bool,
}

pub(crate) const ANONYMOUS: &str = "anonymous";

impl StatusBoard {
    /// Counters for `upstreams` (by name) and `clients` (anonymous callers when none).
    pub fn new<'a>(
        upstreams: impl IntoIterator<Item = &'a Arc<str>>,
        clients: &[Arc<ClientConfig>],
        usage: Arc<super::usage::Usage>,
    ) -> StatusBoard {
        let mut clients: Vec<ClientStats> = clients
            .iter()
            .map(|c| ClientStats {
                name: c.name.clone(),
                share: c.share,
                max_per_minute: c.max_per_minute,
                keys: c.keys.clone(),
                requests: AtomicU64::new(0),
                forbidden: AtomicU64::new(0),
            })
            .collect();
        if clients.is_empty() {
            clients.push(ClientStats {
                name: Arc::from(ANONYMOUS),
                share: 1,
                max_per_minute: None,
                keys: Vec::new(),
                requests: AtomicU64::new(0),
                forbidden: AtomicU64::new(0),
            });
        }
        let n = clients.len();
        StatusBoard {
            usage,
            started: Instant::now(),
            upstreams: upstreams
                .into_iter()
                .map(|name| UpstreamStats {
                    name: Arc::clone(name),
                    window: Window::new(),
                    history: (0..n).map(|_| History::new()).collect(),
                    retries_401: AtomicU64::new(0),
                    throttled_429: AtomicU64::new(0),
                })
                .collect(),
            clients,
        }
    }

    /// `now`: when the answer was made (the observe layer has read the clock already).
    pub fn record(&self, a: Answered<'_>, now: Instant) {
        let second = now.saturating_duration_since(self.started).as_secs();
        let client = a.client.unwrap_or(ANONYMOUS);
        let client_index = self.clients.iter().position(|c| c.name.as_ref() == client);
        if let Some(u) = a
            .upstream
            .and_then(|name| self.upstreams.iter().find(|u| u.name.as_ref() == name))
        {
            u.window.record(second, a.status >= 400);
            // The chart shows calls that reached the platform (and spent its budget).
            if let (None, Some(i)) = (a.proxy_error, client_index) {
                u.history[i].record(second);
            }
            if a.retried_after_401 {
                u.retries_401.fetch_add(1, Ordering::Relaxed);
            }
            if a.status == 429 && a.proxy_error.is_none() {
                u.throttled_429.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(c) = client_index.map(|i| &self.clients[i]) {
            c.requests.fetch_add(1, Ordering::Relaxed);
            if a.proxy_error == Some(crate::http::codes::ErrorCode::Forbidden) {
                c.forbidden.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_forgets_after_a_minute() {
        let w = Window::new();
        w.record(5, false);
        w.record(5, true);
        w.record(30, false);
        assert_eq!(w.totals(30), (3, 1));
        assert_eq!(w.totals(66), (1, 0));
        assert_eq!(w.totals(200), (0, 0));
        // A bucket reused a minute later starts afresh.
        w.record(65, true);
        assert_eq!(w.totals(65), (2, 1));
    }

    #[test]
    fn counts_from_many_threads_are_not_lost() {
        let w = Window::new();
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| (0..10_000).for_each(|i| w.record(7, i % 10 == 0)));
            }
        });
        assert_eq!(w.totals(7), (40_000, 4_000));
    }
}
