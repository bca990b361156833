//! Outermost: count and time every answer, by upstream and status, and log a line for it.
//!
//! The upstream comes from the [`RouteName`] the router put on the response; answers made
//! before routing (401, 404) count under an empty upstream. The log line has the method,
//! the path without its query (queries can carry things nobody should log) and the status.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http::Method;
use tower::{Layer, Service};

use super::route::RouteName;
use super::{ProxyRequest, ProxyResponse};
use crate::error::ProxyErrorCode;
use crate::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct ObserveLayer {
    metrics: Metrics,
}

impl ObserveLayer {
    pub fn recording_to(metrics: Metrics) -> Self {
        ObserveLayer { metrics }
    }
}

impl<S> Layer<S> for ObserveLayer {
    type Service = Observe<S>;
    fn layer(&self, inner: S) -> Observe<S> {
        Observe {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Observe<S> {
    inner: S,
    metrics: Metrics,
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

    fn call(&mut self, req: ProxyRequest) -> Self::Future {
        Observed {
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            started: Instant::now(),
            metrics: self.metrics.clone(),
            inner: self.inner.call(req),
        }
    }
}

pin_project_lite::pin_project! {
    pub struct Observed<F> {
        #[pin]
        inner: F,
        method: Method,
        path: String,
        started: Instant,
        metrics: Metrics,
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
        let elapsed = this.started.elapsed();
        let upstream = resp.extensions().get::<RouteName>().map_or("", |n| &n.0);
        let status = resp.status().as_u16();
        this.metrics.request(upstream, status, elapsed);
        let error = resp.extensions().get::<ProxyErrorCode>().map(|c| c.0);
        tracing::debug!(
            method = %this.method,
            path = %this.path,
            upstream,
            status,
            error,
            ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
        Poll::Ready(Ok(resp))
    }
}
