//! Send a request once more when the upstream says 401 — with a fresh token — and, where
//! the operator asked for it, again after a 429's `Retry-After`.
//!
//! A 401 from the upstream means the token stopped being valid (revoked, expired early,
//! rotated). This layer sits outside [`crate::back::bearer`], so the second attempt goes through
//! it again and gets a token other than the rejected one. Only one retry: a second 401
//! goes back to the caller as it came.
//!
//! A 429 goes back to the caller with its `Retry-After` unless the upstream sets
//! `retry_429 = N`: then idempotent requests are sent again after `Retry-After`, at most N
//! times and `retry_429_max_wait_secs` of waiting in all, as the official Genesys SDKs do.
//!
//! To send a request twice its body must be kept. Bodies up to `retry_body_bytes` are read
//! into memory first, within a process-wide budget ([`RETRY_BUDGET_BYTES`]); larger ones
//! (or ones that turn out larger while reading, or that find the budget spent) stream
//! through once and are not retried.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{header, Request};
use http_body::Body as _;
use http_body_util::{BodyExt, BodyStream, StreamBody};
use tower::{Layer, Service};

use crate::call::error::{body_error_or, ProxyError};
use crate::call::messages::Caller;
use crate::call::{BoxFuture, ProxyRequest, ProxyResponse};
use crate::config::UpstreamConfig;
use crate::http::body::{self, BoxError, ByteBudget, ProxyBody, Reserved};
use crate::telemetry::metrics::Metrics;

#[derive(Debug, Clone)]
pub struct RetryLayer(Arc<RetryPolicy>);

impl RetryLayer {
    /// `upstream`'s policy, keeping request bodies of at most `keep_bytes`.
    pub fn for_upstream(upstream: &UpstreamConfig, keep_bytes: usize, metrics: Metrics) -> Self {
        RetryLayer(Arc::new(RetryPolicy {
            keep_bytes,
            retry_429: upstream.retry_429,
            retry_429_max_wait: upstream.retry_429_max_wait,
            upstream: Arc::clone(&upstream.name),
            metrics,
        }))
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            policy: Arc::clone(&self.0),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Retry<S> {
    inner: S,
    policy: Arc<RetryPolicy>,
}

/// A request body after the attempt to keep it.
enum Kept {
    /// Fully read: can be sent any number of times. Its bytes count against
    /// [`RETRY_BUDGET_BYTES`] until the call ends.
    Whole(Bytes, Reserved),
    /// Too large to keep, or the budget was spent: streams once.
    Streaming(ProxyBody),
}

/// The most bytes of request bodies the whole process keeps for retries at once. Past it
/// bodies stream through without being kept (and are not retried) rather than being
/// refused: without it, 200 callers each holding back the last byte of a 1 MiB body took
/// 200 MB.
pub const RETRY_BUDGET_BYTES: usize = 8 * 1024 * 1024;

static KEPT_BYTES: ByteBudget = ByteBudget::new(RETRY_BUDGET_BYTES);

/// Read `body` into memory if it is at most `limit` bytes; otherwise give back a body that
/// streams what was read so far followed by the rest.
async fn keep_body(
    mut body: ProxyBody,
    declared: Option<u64>,
    limit: usize,
) -> Result<Kept, BoxError> {
    if body.is_end_stream() {
        return Ok(Kept::Whole(Bytes::new(), Reserved::default()));
    }
    if declared.is_some_and(|len| len > limit as u64) {
        return Ok(Kept::Streaming(body));
    }
    // A declared length is counted against the budget before anything is read; if it does
    // not fit, the body streams untouched.
    let mut reserved = Reserved::default();
    if let Some(len) = declared {
        if !reserved.grow(&KEPT_BYTES, len as usize) {
            return Ok(Kept::Streaming(body));
        }
    }
    // Copied out of hyper's read buffers as it comes: a kept chunk would pin the whole
    // buffer it was cut from (measured: 200 held uploads took about 30 MB beyond what was
    // kept).
    let mut kept = BytesMut::with_capacity(declared.unwrap_or(0) as usize);
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        // Trailers on a request are vanishingly rare; they are not worth a retry.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let total = kept.len() + data.len();
        let fits = total <= limit
            && (declared.is_some_and(|len| total as u64 <= len)
                || reserved.grow(&KEPT_BYTES, data.len()));
        if !fits {
            let read = [kept.freeze(), data].map(|b| Ok(http_body::Frame::data(b)));
            let rest = BodyStream::new(body);
            return Ok(Kept::Streaming(body::boxed(StreamBody::new(
                futures_util::stream::iter(read).chain(rest),
            ))));
        }
        kept.extend_from_slice(&data);
    }
    Ok(Kept::Whole(kept.freeze(), reserved))
}

impl<S> Service<ProxyRequest> for Retry<S>
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
        let policy = Arc::clone(&self.policy);
        // Most calls (GET) have no body: nothing to keep. The first attempt is under way
        // before this returns, so the call's future holds neither the request nor the
        // inner service's future inline: small enough for the allocator's thread cache
        // (an `async` block holding the request would hold it twice; rust-lang/rust#62958).
        if req.body().is_end_stream() {
            let kept = KeptHead::of(&req);
            let first = self.inner.call(req);
            let inner = self.inner.clone();
            return Box::pin(attempts(
                inner,
                policy,
                kept,
                Bytes::new(),
                Reserved::default(),
                first,
            ));
        }
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let (head, body) = req.into_parts();
            let declared = head
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            // A GET's body beyond what is kept would stream to the API holding a
            // connection for as long as its caller takes to send it: refused for clients
            // whose rules say what they call (they cannot need one).
            let bodiless = carries_no_body(&head.method)
                && head
                    .extensions
                    .get::<Caller>()
                    .is_some_and(|Caller(c)| c.as_ref().is_some_and(|c| c.allow.is_some()));
            let unexpected = || {
                let e = ProxyError::UnexpectedBody {
                    method: head.method.clone(),
                    limit: policy.keep_bytes as u64,
                };
                Ok(e.into_response())
            };
            if bodiless && declared.is_some_and(|len| len > policy.keep_bytes as u64) {
                return unexpected();
            }
            let kept = match keep_body(body, declared, policy.keep_bytes).await {
                Ok(kept) => kept,
                Err(e) => {
                    let unread = ProxyError::BadRequest("the request body could not be read");
                    return Ok(body_error_or(&*e, unread).into_response());
                }
            };
            match kept {
                Kept::Streaming(_) if bodiless => unexpected(),
                Kept::Streaming(body) => inner.call(Request::from_parts(head, body)).await,
                // The first attempt takes the caller's own head (hyper sized its header
                // map for it, so the token fits without growing it); the copy stays for
                // retries. The body counts against the budget until the call ends.
                Kept::Whole(body, reserved) => {
                    let first = Request::from_parts(head, as_body(&body));
                    let kept = KeptHead::of(&first);
                    let first = inner.call(first);
                    attempts(inner, policy, kept, body, reserved, first).await
                }
            }
        })
    }
}

mod attempts;
mod policy;
use attempts::attempts;
pub use policy::RetryPolicy;
use policy::{as_body, carries_no_body, KeptHead};

#[cfg(test)]
mod tests;
