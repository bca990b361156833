//! Prometheus metrics, with the contract's names, served as text on the admin listener.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    upstream: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrantLabels {
    upstream: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    upstream: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SocketLabels {
    upstream: String,
    client: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KeyLabels {
    client: String,
    /// The key's fingerprint (`sha256:` and 8 hex digits of its hash), never the key.
    key: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RateLimitedLabels {
    upstream: String,
    client: String,
    by: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RedisLabels {
    redis: String,
}

type HistogramFamily = Family<UpstreamLabels, Histogram, fn() -> Histogram>;

/// All of the proxy's metrics. Cheap to clone; every clone records into the same registry.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily,
    grants: Family<GrantLabels, Counter>,
    retries: Family<RetryLabels, Counter>,
    shared_cache_up: Family<RedisLabels, Gauge>,
    websockets_open: Family<SocketLabels, Gauge>,
    channels_open: Family<SocketLabels, Gauge>,
    websocket_bytes: Family<DirectionLabels, Counter>,
    rate_budget_remaining: Family<UpstreamLabels, Gauge>,
    client_key_expiry: Family<KeyLabels, Gauge>,
    rate_limited: Family<RateLimitedLabels, Counter>,
    rate_wait: HistogramFamily,
    telemetry_export_failures: Counter,
    /// Resolved on the first answer refused before routing.
    unrouted: OnceLock<UpstreamMetrics>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        let duration: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 18)));
        let grants = Family::<GrantLabels, Counter>::default();
        let retries = Family::<RetryLabels, Counter>::default();
        let shared_cache_up = Family::<RedisLabels, Gauge>::default();
        let websockets_open = Family::<SocketLabels, Gauge>::default();
        let channels_open = Family::<SocketLabels, Gauge>::default();
        let websocket_bytes = Family::<DirectionLabels, Counter>::default();
        let rate_budget_remaining = Family::<UpstreamLabels, Gauge>::default();
        let client_key_expiry = Family::<KeyLabels, Gauge>::default();
        let rate_limited = Family::<RateLimitedLabels, Counter>::default();
        let rate_wait: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.01, 2.0, 12)));
        registry.register(
            "tokengate_requests",
            "Requests answered, by upstream and status (upstream is empty before routing)",
            requests.clone(),
        );
        registry.register(
            "tokengate_request_duration_seconds",
            "Time from request to response head",
            duration.clone(),
        );
        registry.register(
            "tokengate_token_grants",
            "Token grants attempted, by upstream and outcome",
            grants.clone(),
        );
        registry.register(
            "tokengate_retries",
            "Requests sent to the upstream a second time, by reason",
            retries.clone(),
        );
        registry.register(
            "tokengate_shared_cache_up",
            "1 while the shared token cache in Redis answers, 0 while this replica works without it",
            shared_cache_up.clone(),
        );
        registry.register(
            "tokengate_websockets_open",
            "WebSockets relayed now, by upstream and client (empty for anonymous callers)",
            websockets_open.clone(),
        );
        registry.register(
            "tokengate_channels_open",
            "Notification channels made through the proxy and alive, by upstream and client (empty for anonymous callers)",
            channels_open.clone(),
        );
        registry.register(
            "tokengate_websocket_bytes",
            "Bytes relayed on WebSockets, counted when each socket ends: up (caller to upstream) and down",
            websocket_bytes.clone(),
        );
        registry.register(
            "tokengate_rate_budget_remaining",
            "Calls left in the current rate-limit window, over the upstream's tokens (once a budget is known)",
            rate_budget_remaining.clone(),
        );
        registry.register(
            "tokengate_client_key_expiry_seconds",
            "Seconds until a client key's not_after (negative once past), for keys that have one",
            client_key_expiry.clone(),
        );
        registry.register(
            "tokengate_rate_limited",
            "Calls answered 429, by who refused them: proxy (the rate governor or max_per_minute) or platform",
            rate_limited.clone(),
        );
        let telemetry_export_failures = Counter::default();
        registry.register(
            "tokengate_telemetry_export_failures",
            "Batches of trace spans the OpenTelemetry collector did not take (unreachable, refused, timed out); the calls they describe were served",
            telemetry_export_failures.clone(),
        );
        registry.register(
            "tokengate_rate_wait_seconds",
            "How long calls waited for room in the rate budget (calls that waited)",
            rate_wait.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                rate_budget_remaining,
                client_key_expiry,
                rate_limited,
                rate_wait,
                requests,
                duration,
                grants,
                retries,
                shared_cache_up,
                websockets_open,
                channels_open,
                websocket_bytes,
                telemetry_export_failures,
                unrouted: OnceLock::new(),
            }),
        }
    }

    /// Counts trace exports that failed (shared with the exporter's thread).
    pub fn telemetry_export_failures(&self) -> Counter {
        self.inner.telemetry_export_failures.clone()
    }

    /// The request metrics of one upstream, resolved once (see [`UpstreamMetrics`]).
    pub fn for_upstream(&self, upstream: &str) -> UpstreamMetrics {
        UpstreamMetrics::resolve(&self.inner.requests, &self.inner.duration, upstream)
    }

    /// Answers that belong to no upstream (refused before routing): upstream "".
    pub fn unrouted(&self) -> &UpstreamMetrics {
        self.inner.unrouted.get_or_init(|| self.for_upstream(""))
    }

    /// `outcome`: `ok`, or the failure's kind (`refused`, `unreachable`, ...).
    pub fn grant(&self, upstream: &str, outcome: &'static str) {
        self.inner
            .grants
            .get_or_create(&GrantLabels {
                upstream: upstream.to_string(),
                outcome,
            })
            .inc();
    }

    pub fn retry(&self, upstream: &str, reason: &'static str) {
        self.inner
            .retries
            .get_or_create(&RetryLabels {
                upstream: upstream.to_string(),
                reason,
            })
            .inc();
    }

    /// The gauge that says whether the shared cache at `redis` (host:port) answers.
    pub fn shared_cache_up(&self, redis: &str) -> Gauge {
        self.inner
            .shared_cache_up
            .get_or_create(&RedisLabels {
                redis: redis.to_string(),
            })
            .clone()
    }

    pub fn websocket_opened(&self, upstream: &str, client: &str) {
        self.socket_gauge(upstream, client).inc();
    }

    pub fn websocket_closed(&self, upstream: &str, client: &str) {
        self.socket_gauge(upstream, client).dec();
    }

    /// The live notification channels `client` holds on `upstream`.
    pub fn channels_open(&self, upstream: &str, client: &str, open: usize) {
        self.inner
            .channels_open
            .get_or_create(&SocketLabels {
                upstream: upstream.to_string(),
                client: client.to_string(),
            })
            .set(i64::try_from(open).unwrap_or(i64::MAX));
    }

    /// `direction`: `up` (caller to upstream) or `down`.
    pub fn websocket_bytes(&self, direction: &'static str, bytes: u64) {
        self.inner
            .websocket_bytes
            .get_or_create(&DirectionLabels { direction })
            .inc_by(bytes);
    }

    /// The client keys that expire: client, fingerprint and seconds left (set when the
    /// metrics are read; keys a reload removed go).
    pub fn client_key_expiry(&self, keys: impl IntoIterator<Item = (String, String, i64)>) {
        let family = &self.inner.client_key_expiry;
        family.clear();
        for (client, key, secs) in keys {
            family.get_or_create(&KeyLabels { client, key }).set(secs);
        }
    }

    /// Calls left in `upstream`'s window (set when the metrics are read).
    pub fn rate_budget_remaining(&self, upstream: &str, remaining: u64) {
        self.inner
            .rate_budget_remaining
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_string(),
            })
            .set(i64::try_from(remaining).unwrap_or(i64::MAX));
    }

    /// `by`: `proxy` or `platform`.
    pub fn rate_limited(&self, upstream: &str, client: &str, by: &'static str) {
        self.inner
            .rate_limited
            .get_or_create(&RateLimitedLabels {
                upstream: upstream.to_string(),
                client: client.to_string(),
                by,
            })
            .inc();
    }

    pub fn rate_wait(&self, upstream: &str, waited: Duration) {
        self.inner
            .rate_wait
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_string(),
            })
            .observe(waited.as_secs_f64());
    }

    fn socket_gauge(&self, upstream: &str, client: &str) -> Gauge {
        self.inner
            .websockets_open
            .get_or_create(&SocketLabels {
                upstream: upstream.to_string(),
                client: client.to_string(),
            })
            .clone()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }
}

/// One upstream's request counters and latency histogram, resolved when the upstream is
/// built: recording a call is an atomic add and a histogram observation, with no label
/// lookup or allocation (the handles share their values with the registry's families).
pub struct UpstreamMetrics {
    name: String,
    duration: Histogram,
    requests: Family<RequestLabels, Counter>,
    /// Counters by status (100 to 599), each resolved on first use.
    by_status: Box<[OnceLock<Counter>]>,
}

impl std::fmt::Debug for UpstreamMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamMetrics")
            .field("upstream", &self.name)
            .finish()
    }
}

impl UpstreamMetrics {
    fn resolve(
        requests: &Family<RequestLabels, Counter>,
        duration: &HistogramFamily,
        upstream: &str,
    ) -> UpstreamMetrics {
        let duration = duration
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_string(),
            })
            .clone();
        UpstreamMetrics {
            name: upstream.to_string(),
            duration,
            requests: requests.clone(),
            by_status: (100..600).map(|_| OnceLock::new()).collect(),
        }
    }

    pub fn request(&self, status: u16, elapsed: Duration) {
        self.duration.observe(elapsed.as_secs_f64());
        let resolve = || {
            self.requests
                .get_or_create(&RequestLabels {
                    upstream: self.name.clone(),
                    status,
                })
                .clone()
        };
        match self.by_status.get(usize::from(status).wrapping_sub(100)) {
            Some(slot) => slot.get_or_init(resolve).inc(),
            // hyper only lets 100..=999 through; the odd 6xx-9xx is not worth a slot.
            None => resolve().inc(),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolved_handles_count_into_the_registry() {
        let metrics = Metrics::new();
        let up = metrics.for_upstream("genesys");
        up.request(200, Duration::from_millis(3));
        up.request(200, Duration::from_millis(3));
        up.request(799, Duration::from_millis(3));
        // A second resolution (a reload) shares the same values.
        metrics
            .for_upstream("genesys")
            .request(503, Duration::from_millis(1));
        let text = metrics.render();
        assert!(
            text.contains("tokengate_requests_total{upstream=\"genesys\",status=\"200\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("tokengate_requests_total{upstream=\"genesys\",status=\"799\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tokengate_requests_total{upstream=\"genesys\",status=\"503\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tokengate_request_duration_seconds_count{upstream=\"genesys\"} 4"),
            "{text}"
        );
    }
}
