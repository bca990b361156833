//! Hold a call to its upstream's rate budget, in its client's fair share (see
//! [`crate::governor`]).
//!
//! Inside the retry layer, so every attempt (a resend after a 401 too) spends budget, and
//! outside the bearer layer, which attaches the token whose budget had room. A call that
//! cannot fit within `rate_limit_max_wait_secs`, or whose client is past its
//! `max_per_minute`, is answered `429 rate_limited` here and reaches no platform. Until
//! a budget is known and for clients without a cap, calls pass through untouched.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderName, HeaderValue};
use tower::{Layer, Service};

use crate::call::error::ProxyError;
use crate::call::messages::Admitted;
use crate::call::messages::Caller;
use crate::call::{BoxFuture, ProxyRequest, ProxyResponse};
use crate::governor::{Admission, Refusal};
use crate::telemetry::metrics::Metrics;
use crate::upstream::WorkerUpstream;

#[derive(Debug, Clone)]
pub struct BudgetLayer {
    upstream: WorkerUpstream,
    metrics: Metrics,
    capped: bool,
}

impl BudgetLayer {
    /// `clients`: the configured ones (whether any has a `max_per_minute` decides whether
    /// a call's caller needs looking at when no budget is known).
    pub fn of(
        upstream: &WorkerUpstream,
        metrics: &Metrics,
        clients: &[Arc<crate::config::ClientConfig>],
    ) -> BudgetLayer {
        BudgetLayer {
            upstream: upstream.clone(),
            metrics: metrics.clone(),
            capped: clients.iter().any(|c| c.max_per_minute.is_some()),
        }
    }
}

impl<S> Layer<S> for BudgetLayer {
    type Service = Budget<S>;
    fn layer(&self, inner: S) -> Budget<S> {
        Budget {
            inner,
            upstream: self.upstream.clone(),
            metrics: self.metrics.clone(),
            capped: self.capped,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Budget<S> {
    inner: S,
    upstream: WorkerUpstream,
    metrics: Metrics,
    capped: bool,
}

const ANONYMOUS: &str = "";

/// Kong's names for a client's own share of the budget, beside the platform's headers
/// (which describe the whole pooled token).
const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Tell the caller its share of the upstream's budget as it stands after its call (see
/// [`crate::governor::ShareNow`]), once a budget is known.
fn tell_share(upstream: &WorkerUpstream, client: &Arc<str>, headers: &mut HeaderMap) {
    let Some(share) = upstream.budget.share_of(client) else {
        return;
    };
    // Whole seconds, rounded up: the window has ended when the caller looks again.
    let reset = share.reset.as_secs() + u64::from(share.reset.subsec_nanos() > 0);
    headers.insert(RATELIMIT_LIMIT, HeaderValue::from(share.limit));
    headers.insert(RATELIMIT_REMAINING, HeaderValue::from(share.remaining));
    headers.insert(RATELIMIT_RESET, HeaderValue::from(reset));
}

impl<S> Service<ProxyRequest> for Budget<S>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = Infallible, Future = BoxFuture>
        + Clone
        + Send
        + 'static,
{
    type Response = ProxyResponse;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: ProxyRequest) -> BoxFuture {
        let route = self
            .upstream
            .route_budgets
            .matching(req.method(), req.uri().path())
            .cloned();
        if !self.capped && !self.upstream.budget.is_active() && route.is_none() {
            // No budget known, no client with a cap: nothing to hold, nothing to count.
            return self.inner.call(req);
        }
        let caller = match req.extensions().get::<Caller>() {
            Some(Caller(Some(c))) => Some(c),
            _ => None,
        };
        let cap = caller.and_then(|c| c.max_per_minute);
        if !self.upstream.budget.is_active() && cap.is_none() && route.is_none() {
            // No budget known, no cap: nothing to hold, nothing to count.
            return self.inner.call(req);
        }
        let client = caller.map(Arc::clone);
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (upstream, metrics) = (self.upstream.clone(), self.metrics.clone());
        Box::pin(async move {
            let name: Arc<str> = client
                .as_ref()
                .map_or_else(|| Arc::from(ANONYMOUS), |c| Arc::clone(&c.name));
            let share = client.as_ref().map_or(1, |c| c.share);
            let asked = tokio::time::Instant::now();
            // The route's own limit first: a call it holds back spends no token budget.
            let routed = match &route {
                Some(route) => route
                    .governor
                    .admit(&name, share, None)
                    .await
                    .map_err(|refusal| match refusal {
                        Refusal::Budget(after) | Refusal::ClientCap(after) => (after, format!(
                            "the limit of route \"{}\" on upstream \"{}\" ({}/{}s, route_limit) has no room for this call within rate_limit_max_wait_secs; the platform's budget was not spent",
                            route.limit.route,
                            upstream.name(),
                            route.limit.rate.calls,
                            route.limit.rate.window.as_secs(),
                        )),
                    }),
                None => Ok(None),
            };
            let admitted = match routed {
                Ok(_) => upstream.budget.admit_call(&name, share, cap).await.map_err(|refusal| match refusal {
                    Refusal::Budget(after) => (after, format!(
                        "the rate budget of upstream \"{}\" has no room for this call within rate_limit_max_wait_secs; the platform's budget was not spent",
                        upstream.name()
                    )),
                    Refusal::ClientCap(after) => (after, format!(
                        "this client made its max_per_minute calls to upstream \"{}\" this minute",
                        upstream.name()
                    )),
                }),
                Err(refused) => Err(refused),
            };
            // Counted as on its way until its answer was observed (see `Unanswered`).
            let _unanswered = match admitted {
                Ok(Admission { index, unanswered }) => {
                    let waited = asked.elapsed();
                    if !waited.is_zero() {
                        metrics.rate_wait(upstream.name(), waited);
                        crate::telemetry::traces::waited_for_budget(
                            req.extensions().get(),
                            waited,
                            upstream.name(),
                        );
                    }
                    if let Some(i) = index {
                        req.extensions_mut().insert(Admitted(i));
                    }
                    unanswered
                }
                Err((retry_after, message)) => {
                    metrics.rate_limited(upstream.name(), &name, "proxy");
                    let mut refused = ProxyError::RateLimited {
                        retry_after,
                        message,
                    }
                    .into_response();
                    tell_share(&upstream, &name, refused.headers_mut());
                    return Ok(refused);
                }
            };
            // The platform's own 429s are counted by the observe layer, for every call.
            let mut answer = inner.call(req).await?;
            tell_share(&upstream, &name, answer.headers_mut());
            Ok(answer)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tower::ServiceExt;

    #[tokio::test]
    async fn a_client_past_its_max_per_minute_is_answered_here_and_reaches_nothing() {
        let (_sandbox, upstream, metrics) = crate::upstream::sandboxed_worker_upstream().await;
        let capped = Arc::new(crate::config::ClientConfig {
            name: "capped".into(),
            keys: vec![crate::config::ClientKey::of_hash([0; 32])],
            upstreams: None,
            allow: None,
            share: 1,
            max_per_minute: Some(2),
            max_channels: None,
            jwt: None,
        });
        let reached = Arc::new(AtomicUsize::new(0));
        let behind = {
            let reached = Arc::clone(&reached);
            tower::service_fn(move |_req: ProxyRequest| {
                reached.fetch_add(1, Ordering::SeqCst);
                Box::pin(async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(
                        crate::http::body::empty(),
                    ))
                }) as BoxFuture
            })
        };
        let budget = BudgetLayer::of(&upstream, &metrics, &[Arc::clone(&capped)]).layer(behind);
        let call = || {
            let mut req = http::Request::get("/api/v2/users/me")
                .body(crate::http::body::empty())
                .unwrap();
            req.extensions_mut()
                .insert(Caller(Some(Arc::clone(&capped))));
            budget.clone().oneshot(req)
        };
        assert_eq!(call().await.unwrap().status(), 200);
        assert_eq!(call().await.unwrap().status(), 200);
        let third = call().await.unwrap();
        assert_eq!(third.status(), 429);
        assert!(third.headers().contains_key(http::header::RETRY_AFTER));
        assert_eq!(reached.load(Ordering::SeqCst), 2);
    }
}
