//! Send a request once more when the upstream says 401 — with a fresh token.
//!
//! A 401 from the upstream means the token stopped being valid (revoked, expired early,
//! rotated). This layer sits outside [`super::bearer`], so the second attempt goes through
//! it again and gets a token other than the rejected one. Only one retry: a second 401
//! goes back to the caller as it came.
//!
//! To send a request twice its body must be kept. Bodies up to `retry_body_bytes` are read
//! into memory first; larger ones (or ones that turn out larger while reading) stream
//! through once and are not retried.

use std::convert::Infallible;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{header, Request, StatusCode};
use http_body::Body as _;
use http_body_util::{BodyExt, BodyStream, StreamBody};
use tower::{Layer, Service, ServiceExt};

use super::bearer::{ReplaceToken, TokenUsed};
use super::route::Route;
use super::{BoxFuture, ProxyRequest, ProxyResponse};
use crate::body::{self, BoxError, ProxyBody};
use crate::error::{body_error_or, ProxyError};
use crate::metrics::Metrics;

/// Set on a response that came from the second attempt.
#[derive(Debug, Clone, Copy)]
pub struct Retried;

#[derive(Debug, Clone)]
pub struct RetryOn401Layer {
    keep_bytes: usize,
    metrics: Metrics,
}

impl RetryOn401Layer {
    /// Retry requests whose bodies are at most `keep_bytes` long.
    pub fn keeping_bodies_up_to(keep_bytes: usize, metrics: Metrics) -> Self {
        RetryOn401Layer {
            keep_bytes,
            metrics,
        }
    }
}

impl<S> Layer<S> for RetryOn401Layer {
    type Service = RetryOn401<S>;
    fn layer(&self, inner: S) -> RetryOn401<S> {
        RetryOn401 {
            inner,
            keep_bytes: self.keep_bytes,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct RetryOn401<S> {
    inner: S,
    keep_bytes: usize,
    metrics: Metrics,
}

/// A request body after the attempt to keep it.
enum Kept {
    /// Fully read: can be sent any number of times.
    Whole(Bytes),
    /// Too large to keep: streams once.
    Streaming(ProxyBody),
}

/// Read `body` into memory if it is at most `limit` bytes; otherwise give back a body that
/// streams what was read so far followed by the rest.
async fn keep_body(
    mut body: ProxyBody,
    declared: Option<u64>,
    limit: usize,
) -> Result<Kept, BoxError> {
    if body.is_end_stream() {
        return Ok(Kept::Whole(Bytes::new()));
    }
    if declared.is_some_and(|len| len > limit as u64) {
        return Ok(Kept::Streaming(body));
    }
    let mut chunks: Vec<Bytes> = Vec::new();
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        // Trailers on a request are vanishingly rare; they are not worth a retry.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        total += data.len();
        chunks.push(data);
        if total > limit {
            let read = futures_util::stream::iter(
                chunks.into_iter().map(|b| Ok(http_body::Frame::data(b))),
            );
            let rest = BodyStream::new(body);
            return Ok(Kept::Streaming(body::boxed(StreamBody::new(
                read.chain(rest),
            ))));
        }
    }
    Ok(Kept::Whole(match chunks.len() {
        0 => Bytes::new(),
        1 => chunks.swap_remove(0),
        _ => chunks.concat().into(),
    }))
}

/// A copy of the request's head with `body`.
fn copy_with_body(head: &http::request::Parts, body: Bytes) -> ProxyRequest {
    let mut req = Request::new(body::full(body));
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = head.uri.clone();
    *req.version_mut() = head.version;
    *req.headers_mut() = head.headers.clone();
    *req.extensions_mut() = head.extensions.clone();
    req
}

impl<S> Service<ProxyRequest> for RetryOn401<S>
where
    // A concrete future type: rustc cannot yet prove a generic `S::Future` is `Send` inside
    // an `async` block (rust-lang/rust#110338); the inner layers box theirs anyway.
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

    fn call(&mut self, req: ProxyRequest) -> BoxFuture {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let keep_bytes = self.keep_bytes;
        let metrics = self.metrics.clone();
        Box::pin(async move {
            let (head, body) = req.into_parts();
            let declared = head
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let kept = match keep_body(body, declared, keep_bytes).await {
                Ok(kept) => kept,
                Err(e) => {
                    let unread = ProxyError::BadRequest("the request body could not be read");
                    return Ok(body_error_or(&*e, unread).into_response());
                }
            };
            let body = match kept {
                Kept::Streaming(body) => {
                    return inner.call(Request::from_parts(head, body)).await;
                }
                Kept::Whole(body) => body,
            };
            let resp = inner.call(copy_with_body(&head, body.clone())).await?;
            let rejected = match resp.extensions().get::<TokenUsed>() {
                Some(TokenUsed(generation)) if resp.status() == StatusCode::UNAUTHORIZED => {
                    *generation
                }
                _ => return Ok(resp),
            };
            if let Some(route) = head.extensions.get::<Route>() {
                metrics.retry(route.upstream.name(), "unauthorized");
                tracing::info!(upstream = %route.upstream.name(), "upstream answered 401; retrying with a fresh token");
            }
            drop(resp);
            let mut again = copy_with_body(&head, body);
            again.extensions_mut().insert(ReplaceToken(rejected));
            let mut resp = inner.ready().await?.call(again).await?;
            resp.extensions_mut().insert(Retried);
            Ok(resp)
        })
    }
}
