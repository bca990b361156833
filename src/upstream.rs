//! An upstream at run time: its configuration, its pool of token sources and its
//! connections.
//!
//! Genesys Cloud limits API requests per token (300 a minute by default), so one token
//! shared by a whole team throttles it. With `tokens = N` the upstream keeps N tokens and
//! spreads calls over them round-robin, steering away from a token whose answers said it
//! is spent (a 429, or `inin-ratelimit-count` at `inin-ratelimit-allowed`) until its
//! window resets. The N tokens are minted one at a time (see [`TokenCache`]).
//!
//! [`TokenCache`]: crate::token::TokenCache

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::HeaderMap;

use crate::config::UpstreamConfig;
use crate::governor::{
    header_number, FleetBudget, Governor, RouteBudgets, RATELIMIT_ALLOWED, RATELIMIT_COUNT,
    RATELIMIT_RESET,
};
use crate::outbound::connections::{Origin, WorkerConnections};
use crate::telemetry::metrics::UpstreamMetrics;
use crate::token::TokenSource;

#[derive(Debug)]
pub struct Upstream {
    pub config: Arc<UpstreamConfig>,
    /// The pool: one source per token (one, unless `tokens = N`).
    pub tokens: Vec<Arc<TokenSource>>,
    /// One connection pool per worker, so a call never waits on another thread's pool,
    /// each with its share of `max_connections`: a call takes a permit before it is sent
    /// and its answer's body gives it back when it ends.
    clients: Vec<Arc<WorkerConnections>>,
    /// Request counters and latency, resolved once.
    pub metrics: UpstreamMetrics,
    /// The tokens' rate budget and the clients' fair shares of it.
    pub budget: Arc<Governor>,
    /// Routes with a limit of their own below the token's (`[[upstream.route_limit]]`).
    pub route_budgets: RouteBudgets,
    /// `base_url` has a path of its own: every caller's path must then be plain, or `..`
    /// would climb out of it (see [`crate::config::policy::is_plain_path`]).
    pub plain_paths_only: bool,
    next: AtomicUsize,
    /// Per pooled token: until when (ms after `epoch`) it is spent; 0 when it is not.
    spent_until: Arc<[AtomicU64]>,
    epoch: Instant,
}

/// What a reload carries from an upstream to its successor of the same identity (see
/// [`Upstream::new`]).
#[derive(Clone)]
struct Kept {
    clients: Vec<Arc<WorkerConnections>>,
    budget: Arc<Governor>,
    spent_until: Arc<[AtomicU64]>,
    epoch: Instant,
}

impl Upstream {
    /// `tokens` come from the [`TokenCache`](crate::token::TokenCache), shared with any
    /// upstream that has the same credentials.
    ///
    /// `previous`: the upstream of the same name in the config this one replaces (a
    /// reload). When its identity — credentials, API host, way out — and the settings of
    /// its limits are unchanged, this one takes over its connections and their slots, its
    /// rate governor (the windows, the clients' shares and `max_per_minute` counts) and
    /// its spent tokens: a reload must not hand a fresh budget or fresh connection slots
    /// to calls that already spent them (a SIGHUP every 2 s used to bring 429s from the
    /// platform and four times `max_connections` in flight).
    pub fn new(
        config: Arc<UpstreamConfig>,
        tokens: Vec<Arc<TokenSource>>,
        workers: usize,
        metrics: UpstreamMetrics,
        fleet: Option<FleetBudget>,
        previous: Option<&Upstream>,
    ) -> Upstream {
        let kept = previous.and_then(|p| p.kept_for(&config, tokens.len(), workers));
        let kept = kept.unwrap_or_else(|| Kept {
            clients: connection_shares(config.max_connections, workers)
                .map(|share| {
                    WorkerConnections::new(config.connect_timeout, share, &config.grant.egress)
                })
                .collect(),
            budget: Governor::new(&config, tokens.len(), fleet),
            spent_until: tokens.iter().map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
        });
        let plain_paths_only = config
            .base_url
            .as_ref()
            .is_some_and(|b| !b.path().trim_matches('/').is_empty());
        Upstream {
            plain_paths_only,
            route_budgets: RouteBudgets::for_upstream(&config, previous.map(|p| &p.route_budgets)),
            budget: kept.budget,
            config,
            tokens,
            clients: kept.clients,
            metrics,
            next: AtomicUsize::new(0),
            spent_until: kept.spent_until,
            epoch: kept.epoch,
        }
    }

    /// What a successor configured as `config` (with `tokens` tokens, on `workers`
    /// workers) may take over from this upstream; `None` when it is another upstream in
    /// all but name, or its limits changed.
    fn kept_for(&self, config: &UpstreamConfig, tokens: usize, workers: usize) -> Option<Kept> {
        let (old, new) = (&*self.config, config);
        let same_identity = old.name == new.name
            && old.base_url == new.base_url
            && old.provider == new.provider
            && old.grant.cache_key() == new.grant.cache_key()
            && old.grant.transport_key == new.grant.transport_key;
        let same_limits = old.max_connections == new.max_connections
            && old.connect_timeout == new.connect_timeout
            && old.rate_limit == new.rate_limit
            && old.rate_limit_max_wait == new.rate_limit_max_wait
            && self.tokens.len() == tokens
            && self.clients.len() == workers.max(1);
        (same_identity && same_limits).then(|| Kept {
            clients: self.clients.clone(),
            budget: Arc::clone(&self.budget),
            spent_until: Arc::clone(&self.spent_until),
            epoch: self.epoch,
        })
    }

    /// Worker `worker`'s connection pool to this upstream, and its connection slots.
    pub fn connections(&self, worker: usize) -> Arc<WorkerConnections> {
        Arc::clone(&self.clients[worker % self.clients.len()])
    }

    pub fn name(&self) -> &Arc<str> {
        &self.config.name
    }

    /// Calls holding a connection to this upstream now, over all workers.
    pub fn in_flight(&self) -> u64 {
        self.clients.iter().map(|c| c.slots.in_use() as u64).sum()
    }

    /// Where calls go: the configured `base_url`, else what discovery found (CXone).
    pub fn api_base(&self) -> Option<http::Uri> {
        self.config
            .base_url
            .clone()
            .or_else(|| self.tokens.first().and_then(|t| t.api_base()))
    }

    /// Where calls go, as [`Upstream::api_base`], worked out for connecting. Each worker
    /// keeps the configured one (see [`WorkerUpstream::origin`]); a discovered base (CXone)
    /// is worked out per call: it may change when a token is granted.
    pub fn origin(&self) -> Option<Arc<Origin>> {
        self.api_base().as_ref().and_then(Origin::of).map(Arc::new)
    }

    /// The pooled token source for the next call: round-robin over those not spent; if
    /// all are spent, the one that recovers first.
    pub fn pick(&self) -> (usize, &Arc<TokenSource>) {
        let n = self.tokens.len();
        if n == 1 {
            return (0, &self.tokens[0]);
        }
        let now = self.epoch.elapsed().as_millis() as u64;
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut soonest = (u64::MAX, start % n);
        for i in (0..n).map(|k| (start + k) % n) {
            let until = self.spent_until[i].load(Ordering::Relaxed);
            if until <= now {
                return (i, &self.tokens[i]);
            }
            if until < soonest.0 {
                soonest = (until, i);
            }
        }
        (soonest.1, &self.tokens[soonest.1])
    }

    /// Read an answer's rate-limit signals for pooled token `index`.
    pub fn observe_limits(&self, index: usize, status: u16, headers: &HeaderMap) {
        if self.tokens.len() < 2 {
            return;
        }
        let number = |name| header_number(headers, name);
        let reset = number(RATELIMIT_RESET).or_else(|| number(http::header::RETRY_AFTER));
        let spent = status == 429
            || matches!(
                (number(RATELIMIT_COUNT), number(RATELIMIT_ALLOWED)),
                (Some(count), Some(allowed)) if count >= allowed
            );
        if spent {
            let wait = Duration::from_secs(reset.unwrap_or(1).clamp(1, 600));
            let until = (self.epoch.elapsed() + wait).as_millis() as u64;
            if let Some(slot) = self.spent_until.get(index) {
                slot.store(until, Ordering::Relaxed);
            }
        }
    }
}

/// One worker's handle on a shared [`Upstream`], with that worker's connections.
///
/// Every call clones the upstream a few times (into the bearer's and the forwarder's
/// futures, into the call's [`Outcome`](crate::call::outcome::Outcome)). Cloned through a
/// shared `Arc`, each clone and drop moves one cache line between the cores; a profile put
/// such reference counts among the hottest instructions of the proxy. Through this handle
/// they count on a cache line only this worker touches (no change beyond the noise was
/// measured; it also gives the forwarder its connections in one piece). It derefs to the
/// upstream.
#[derive(Debug, Clone)]
pub struct WorkerUpstream(Arc<OnWorker>);

#[derive(Debug)]
struct OnWorker {
    upstream: Arc<Upstream>,
    connections: Arc<WorkerConnections>,
    /// The worker's own copy of the configured origin (see [`Upstream::origin`]).
    origin: Option<Arc<Origin>>,
}

impl WorkerUpstream {
    pub fn new(upstream: &Arc<Upstream>, worker: usize) -> WorkerUpstream {
        WorkerUpstream(Arc::new(OnWorker {
            upstream: Arc::clone(upstream),
            connections: upstream.connections(worker),
            origin: upstream
                .config
                .base_url
                .as_ref()
                .and_then(Origin::of)
                .map(Arc::new),
        }))
    }

    /// This worker's connections to the upstream.
    pub fn connections(&self) -> &Arc<WorkerConnections> {
        &self.0.connections
    }

    /// Where calls go (see [`Upstream::origin`]), the configured one from this worker's copy.
    pub fn origin(&self) -> Option<Arc<Origin>> {
        match &self.0.origin {
            Some(origin) => Some(Arc::clone(origin)),
            None => self.0.upstream.origin(),
        }
    }
}

impl std::ops::Deref for WorkerUpstream {
    type Target = Upstream;
    fn deref(&self) -> &Upstream {
        &self.0.upstream
    }
}

/// Each worker's share of `max_connections`. The shares add up to it exactly (the first
/// workers take the remainder); a worker always has at least one, or its calls could never
/// be sent.
fn connection_shares(max_connections: usize, workers: usize) -> impl Iterator<Item = usize> {
    let workers = workers.max(1);
    let (base, extra) = (max_connections / workers, max_connections % workers);
    (0..workers).map(move |worker| (base + usize::from(worker < extra)).max(1))
}

/// One upstream in front of a fresh sandbox, on worker 0 (for the layers' unit tests).
#[cfg(test)]
pub(crate) async fn sandboxed_worker_upstream() -> (
    tokengate_sandbox::Sandbox,
    WorkerUpstream,
    crate::telemetry::metrics::Metrics,
) {
    let (sandbox, config, source) = crate::token::tests::sandboxed_source().await;
    let metrics = crate::telemetry::metrics::Metrics::new();
    let upstream = Arc::new(Upstream::new(
        config,
        vec![source],
        1,
        metrics.for_upstream("a"),
        None,
        None,
    ));
    (sandbox, WorkerUpstream::new(&upstream, 0), metrics)
}

#[cfg(test)]
mod tests {
    use super::connection_shares;

    #[test]
    fn the_workers_shares_add_up_to_max_connections() {
        let shares = |max, workers| connection_shares(max, workers).collect::<Vec<_>>();
        assert_eq!(shares(128, 2), [64, 64]);
        assert_eq!(shares(4, 3), [2, 1, 1]);
        assert_eq!(shares(5, 1), [5]);
        // Fewer connections than workers: one each, or a worker could send nothing.
        assert_eq!(shares(1, 2), [1, 1]);
    }
}
