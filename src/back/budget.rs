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

use tower::{Layer, Service};

use crate::call::error::ProxyError;
use crate::call::messages::Admitted;
use crate::call::messages::Caller;
use crate::call::{BoxFuture, ProxyRequest, ProxyResponse};
use crate::governor::Refusal;
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
        if !self.capped && !self.upstream.budget.is_active() {
            // No budget known, no client with a cap: nothing to hold, nothing to count.
            return self.inner.call(req);
        }
        let caller = match req.extensions().get::<Caller>() {
            Some(Caller(Some(c))) => Some(c),
            _ => None,
        };
        let cap = caller.and_then(|c| c.max_per_minute);
        if !self.upstream.budget.is_active() && cap.is_none() {
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
            match upstream.budget.admit(&name, share, cap).await {
                Ok(index) => {
                    let waited = asked.elapsed();
                    if !waited.is_zero() {
                        metrics.rate_wait(upstream.name(), waited);
                    }
                    if let Some(i) = index {
                        req.extensions_mut().insert(Admitted(i));
                    }
                }
                Err(refusal) => {
                    metrics.rate_limited(upstream.name(), &name, "proxy");
                    let (retry_after, message) = match refusal {
                        Refusal::Budget(after) => (after, format!(
                            "the rate budget of upstream \"{}\" has no room for this call within rate_limit_max_wait_secs; the platform's budget was not spent",
                            upstream.name()
                        )),
                        Refusal::ClientCap(after) => (after, format!(
                            "this client made its max_per_minute calls to upstream \"{}\" this minute",
                            upstream.name()
                        )),
                    };
                    return Ok(ProxyError::RateLimited {
                        retry_after,
                        message,
                    }
                    .into_response());
                }
            }
            // The platform's own 429s are counted by the observe layer, for every call.
            inner.call(req).await
        })
    }
}
