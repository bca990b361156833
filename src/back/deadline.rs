//! A limit on the whole call, when the upstream has `request_timeout_secs`: from arrival to
//! the last byte of the answer, waiting for a token, a retry after 401 or 429, and the
//! upload included.
//!
//! Before the answer's head exists the caller gets `504 upstream_timeout`. Once it is on
//! its way the status cannot change, so the body ends in an error instead: the connection
//! is cut and the caller sees a truncated answer rather than a complete-looking one.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};

use crate::call::error::ProxyError;
use crate::call::{BoxFuture, ProxyRequest, ProxyResponse};
use crate::http::body::{self, BoxError, ProxyBody};

/// Built only for upstreams that have `request_timeout_secs`; the others have no
/// deadline layer at all.
#[derive(Debug, Clone)]
pub struct DeadlineLayer {
    limit: Duration,
    upstream: Arc<str>,
}

impl DeadlineLayer {
    pub fn cutting_after(limit: Duration, upstream: &Arc<str>) -> Self {
        DeadlineLayer {
            limit,
            upstream: Arc::clone(upstream),
        }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;
    fn layer(&self, inner: S) -> Deadline<S> {
        Deadline {
            inner,
            limit: self.limit,
            upstream: Arc::clone(&self.upstream),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    limit: Duration,
    /// For the log line when an answer is cut off.
    upstream: Arc<str>,
}

impl<S> Service<ProxyRequest> for Deadline<S>
where
    // A concrete future type, as in the retry layer (rust-lang/rust#110338).
    S: Service<ProxyRequest, Response = ProxyResponse, Error = Infallible, Future = BoxFuture>,
{
    type Response = ProxyResponse;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ProxyRequest) -> Self::Future {
        let (limit, upstream) = (self.limit, Arc::clone(&self.upstream));
        let deadline = Instant::now() + limit;
        let call = self.inner.call(req);
        Box::pin(async move {
            let resp = match tokio::time::timeout_at(deadline, call).await {
                Err(_) => return Ok(ProxyError::UpstreamTimeout(limit).into_response()),
                Ok(Ok(resp)) => resp,
            };
            let (head, answer) = resp.into_parts();
            let answer = body::boxed(DeadlineBody::new(answer, deadline, limit, upstream));
            Ok(ProxyResponse::from_parts(head, answer))
        })
    }
}

pin_project_lite::pin_project! {
    /// An answer's body that fails when the call's time is up.
    struct DeadlineBody {
        inner: ProxyBody,
        #[pin]
        sleep: Sleep,
        limit: Duration,
        upstream: Arc<str>,
    }
}

impl DeadlineBody {
    fn new(
        inner: ProxyBody,
        deadline: Instant,
        limit: Duration,
        upstream: Arc<str>,
    ) -> DeadlineBody {
        DeadlineBody {
            inner,
            sleep: tokio::time::sleep_until(deadline),
            limit,
            upstream,
        }
    }
}

/// The error that ends a body cut off by the deadline (seen in logs only).
#[derive(Debug, thiserror::Error)]
#[error("the call took longer than request_timeout_secs ({0:?}); the answer was cut off")]
pub struct CallTimedOut(Duration);

impl Body for DeadlineBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        if let Poll::Ready(frame) = Pin::new(this.inner).poll_frame(cx) {
            return Poll::Ready(frame);
        }
        match this.sleep.poll(cx) {
            Poll::Ready(()) => {
                let cut = CallTimedOut(*this.limit);
                tracing::warn!(upstream = %this.upstream, "{cut}");
                Poll::Ready(Some(Err(Box::new(cut))))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, StreamBody};
    use tower::{service_fn, ServiceExt};

    use super::*;

    const LIMIT: Duration = Duration::from_millis(50);

    fn deadline<F>(
        answer: F,
    ) -> Deadline<
        impl Service<ProxyRequest, Response = ProxyResponse, Error = Infallible, Future = BoxFuture>
            + Clone,
    >
    where
        F: Fn() -> BoxFuture + Clone + Send + 'static,
    {
        DeadlineLayer::cutting_after(LIMIT, &Arc::from("u"))
            .layer(service_fn(move |_req: ProxyRequest| answer()))
    }

    fn get() -> ProxyRequest {
        http::Request::get("/x").body(body::empty()).unwrap()
    }

    #[tokio::test]
    async fn no_head_within_the_limit_is_a_504() {
        let svc = deadline(|| Box::pin(std::future::pending()) as BoxFuture);
        let resp = svc.oneshot(get()).await.unwrap();
        assert_eq!(resp.status(), 504);
        let outcome = crate::call::outcome::Outcome::read(&resp).and_then(|o| o.error);
        assert_eq!(
            outcome,
            Some(crate::http::codes::ErrorCode::UpstreamTimeout)
        );
    }

    #[tokio::test]
    async fn a_body_still_coming_at_the_limit_ends_in_an_error_after_what_arrived() {
        let svc = deadline(|| {
            Box::pin(async {
                let first = futures_util::stream::once(async {
                    Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"partial")))
                });
                let stalled =
                    futures_util::StreamExt::chain(first, futures_util::stream::pending());
                Ok(http::Response::new(body::boxed(StreamBody::new(stalled))))
            }) as BoxFuture
        });
        let resp = svc.oneshot(get()).await.unwrap();
        assert_eq!(resp.status(), 200, "the head came in time");
        let mut body = resp.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first, "partial");
        let cut = body.frame().await.unwrap().unwrap_err();
        assert!(cut.is::<CallTimedOut>(), "{cut}");
    }

    #[tokio::test]
    async fn an_answer_that_ends_in_time_is_untouched() {
        let svc = deadline(|| {
            Box::pin(async { Ok(http::Response::new(body::full("whole"))) }) as BoxFuture
        });
        let resp = svc.oneshot(get()).await.unwrap();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(bytes, "whole");
    }
}
