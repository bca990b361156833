//! Outermost: count and time every answer, by upstream and status, and log a line for it.
//!
//! Everything else it needs comes from the call's [`Outcome`], read once here; answers
//! made before routing (401) count under an empty upstream. Counts go to the
//! Prometheus metrics and to the [status board](crate::telemetry::board::StatusBoard), and one
//! audit line per request goes to the log (target `tokengate::audit`): client, upstream,
//! method, path (no query), status, latency, whether it was retried, and the upstream's
//! correlation id. The log line has the method,
//! the path without its query (queries can carry things nobody should log) and the status.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http::Method;
use tower::{Layer, Service};

use std::sync::Arc;

use crate::call::outcome::{Outcome, RetryReason};
use crate::call::{ProxyRequest, ProxyResponse};
use crate::http::codes::ErrorCode;
use crate::telemetry::board::{Answered, StatusBoard};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::traces::CallTrace;
use crate::telemetry::usage::Call;

/// Response headers that carry the platform's id for a call (Genesys first).
static CORRELATION_HEADERS: [http::HeaderName; 3] = [
    http::HeaderName::from_static("inin-correlation-id"),
    http::HeaderName::from_static("x-request-id"),
    http::HeaderName::from_static("x-correlation-id"),
];

#[derive(Debug, Clone)]
pub struct ObserveLayer {
    metrics: Metrics,
    board: Arc<StatusBoard>,
}

impl ObserveLayer {
    pub fn recording_to(metrics: Metrics, board: Arc<StatusBoard>) -> Self {
        ObserveLayer { metrics, board }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            metrics: self.metrics.clone(),
            board: self.board.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: Metrics,
    board: Arc<StatusBoard>,
}

impl<S> Service<ProxyRequest> for Observe<S>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = Infallible>,
{
    type Response = ProxyResponse;
    type Error = Infallible;
    type Future = Observed<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: ProxyRequest) -> Self::Future {
        // The URI is kept (shared, not copied); its path is worked out for the log only
        // when a line takes it. (No check of the log's level here: the security events'
        // layer takes every level of its own target, so the subscriber's hint is always
        // TRACE; and `tracing::enabled!` with per-layer filters left the thread's filter
        // state marked, and the next event, a security event, was lost to its layer.)
        let trace =
            crate::telemetry::traces::on().map(|traces| traces.begin_call(&mut req, audited_path));
        Observed {
            trace,
            method: req.method().clone(),
            uri: req.uri().clone(),
            bytes_in: declared_length(req.headers(), req.body()),
            started: Instant::now(),
            metrics: self.metrics.clone(),
            board: self.board.clone(),
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct Observed<F> {
        #[pin]
        inner: F,
        // The call's server span, when traces are on.
        trace: Option<CallTrace>,
        method: Method,
        // The caller's URI, for the audit line and a policy refusal's event.
        uri: http::Uri,
        bytes_in: u64,
        started: Instant,
        metrics: Metrics,
        board: Arc<StatusBoard>,
    }
}

impl<F> Future for Observed<F>
where
    F: Future<Output = Result<ProxyResponse, Infallible>>,
{
    type Output = Result<ProxyResponse, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(resp) = std::task::ready!(this.inner.poll(cx));
        // One clock read for the latency and the status board's second.
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(*this.started);
        let status = resp.status().as_u16();
        let none = Outcome::default();
        let outcome = Outcome::read(&resp).unwrap_or(&none);
        let upstream = outcome.upstream.as_ref().map_or("", |u| u.name().as_ref());
        match &outcome.upstream {
            Some(u) => u.metrics.request(status, elapsed),
            None => this.metrics.unrouted().request(status, elapsed),
        }
        let (client, error) = (outcome.client.as_deref(), outcome.error);
        let retried = outcome.retried.map(RetryReason::as_str);
        if let Some(trace) = this.trace.take() {
            trace.end(status, upstream, client, error.map(ErrorCode::as_str));
        }
        if status == 429 && error.is_none() && !upstream.is_empty() {
            this.metrics
                .rate_limited(upstream, client.unwrap_or(""), "platform");
        }
        this.board.record(
            Answered {
                upstream: Some(upstream).filter(|u| !u.is_empty()),
                client,
                status,
                proxy_error: error,
                retried_after_401: outcome.retried == Some(RetryReason::Unauthorized),
            },
            now,
        );
        this.board.usage.record(
            client.unwrap_or(crate::telemetry::board::ANONYMOUS),
            upstream,
            Call {
                status,
                rate_limited: error == Some(crate::http::codes::ErrorCode::RateLimited),
                bytes_in: *this.bytes_in,
                bytes_out: declared_length(resp.headers(), resp.body()),
            },
        );
        if error == Some(crate::http::codes::ErrorCode::Forbidden) {
            // A key that is good, used where its policy does not reach.
            crate::emit!(
                warn,
                "policy_refused",
                client = client.unwrap_or("anonymous"),
                upstream,
                method = %this.method,
                path = %AuditedPath(this.uri.path())
            );
        }
        // The audit line: who called what, what came back, and the upstream's own
        // correlation id to find the call in the platform's logs. Never a header value
        // that could authenticate, never a query string. Its fields are worked out only
        // when the line is written (the correlation id is up to three header lookups).
        tracing::info!(
            target: "tokengate::audit",
            client = client.unwrap_or("anonymous"),
            upstream,
            method = %this.method,
            path = %AuditedPath(this.uri.path()),
            status,
            ms = (elapsed.as_secs_f64() * 1000.0 * 10.0).round() / 10.0,
            retried,
            correlation_id = CORRELATION_HEADERS
                .iter()
                .find_map(|h| resp.headers().get(h))
                .and_then(|v| v.to_str().ok()),
            error = error.map(ErrorCode::as_str),
            "request"
        );
        Poll::Ready(Ok(resp))
    }
}

/// A body's length as known before it is sent: its `Content-Length`, or the exact size of
/// a body the proxy holds whole (0 for a body streamed without a length).
fn declared_length(headers: &http::HeaderMap, body: &impl http_body::Body) -> u64 {
    headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .or_else(|| body.size_hint().exact())
        .unwrap_or(0)
}

/// [`audited_path`] of a path, worked out only when a log line takes it.
struct AuditedPath<'a>(&'a str);

impl std::fmt::Display for AuditedPath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&audited_path(self.0))
    }
}

/// A request's path as the audit log shows it: a notification channel's id (the only
/// credential its socket needs) as a short hash, and every character that could forge or
/// hide log text (controls, including U+0085; line and paragraph separators; the
/// direction controls such as U+202E) escaped as `\u{…}`. A request path can carry such
/// characters raw; text logs and JSON logs (which leave them unescaped) would pass them
/// on to whoever reads the log.
pub fn audited_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut segments = path.split('/').peekable();
    let mut after_channels = false;
    while let Some(segment) = segments.next() {
        if after_channels && !segment.is_empty() {
            out.push_str(&channel_hash(segment));
        } else {
            for c in segment.chars() {
                if hides_or_forges(c) {
                    out.push_str(&format!("\\u{{{:04x}}}", u32::from(c)));
                } else {
                    out.push(c);
                }
            }
        }
        after_channels = segment == "channels";
        if segments.peek().is_some() {
            out.push('/');
        }
    }
    out
}

/// A channel id's stand-in in logs: enough to tell channels apart, nothing to open one.
pub fn channel_hash(id: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(id.as_bytes());
    format!("ch-{}", hex::encode(&digest[..4]))
}

/// Characters a log line must not carry raw.
fn hides_or_forges(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{2028}' | '\u{2029}' | '\u{200e}' | '\u{200f}' | '\u{061c}'
                | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

#[cfg(test)]
mod tests {
    use super::audited_path;

    #[test]
    fn a_logged_path_carries_no_channel_id_and_no_raw_separator_or_direction_control() {
        let id = "streaming-7-9f8b2c1d5e6a4b3c";
        for path in [
            format!("/api/v2/notifications/channels/{id}/subscriptions"),
            format!("/channels/{id}"),
        ] {
            let logged = audited_path(&path);
            assert!(!logged.contains(id), "{logged}");
            assert!(logged.contains("/channels/ch-"), "{logged}");
        }
        assert_eq!(
            audited_path("/api/v2/notifications/channels"),
            "/api/v2/notifications/channels"
        );
        let logged = audited_path("/api/v2/users/a\u{2028}b\u{85}c\u{202e}d\u{2029}e\nf");
        assert_eq!(
            logged,
            "/api/v2/users/a\\u{2028}b\\u{0085}c\\u{202e}d\\u{2029}e\\u{000a}f"
        );
        assert_eq!(audited_path("/api/v2/users/me"), "/api/v2/users/me");
    }
}
