//! A call's attempts: the first, and those its answer calls for (a connection closed
//! before any answer, a 401 with a token the platform no longer accepts, a 429 the
//! policy waits out).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::StatusCode;
use tower::{Service, ServiceExt};

use super::policy::{as_body, idempotent, retry_after, KeptHead, RetryPolicy, STALE_RESENDS};
use crate::call::error::ProxyError;
use crate::call::messages::ReplaceToken;
use crate::call::outcome::{Outcome, RetryReason, TokenId};
use crate::call::{BoxFuture, ProxyRequest, ProxyResponse};
use crate::http::body::{self, Reserved};

/// `resp` with its body read into memory (so its connection is free again), or the
/// error answer when it is not whole within [`body::SETTLED_ANSWER_BYTES`] and 10 s (a
/// Genesys 401 is about 300 bytes).
async fn in_hand(resp: ProxyResponse) -> Result<ProxyResponse, ProxyResponse> {
    let (head, answer) = resp.into_parts();
    let read = body::read_small(answer, body::SETTLED_ANSWER_BYTES);
    match tokio::time::timeout(std::time::Duration::from_secs(10), read).await {
        Ok(Some(bytes)) => Ok(http::Response::from_parts(head, as_body(&bytes))),
        _ => Err(ProxyError::UpstreamUnreachable(
            "the upstream's 401 answer could not be read whole (64 KiB within 10 s)".into(),
        )
        .into_response()),
    }
}

/// A call's first attempt, and more when its answer calls for them. A future of its own,
/// not an `async fn`: one of those keeps its arguments twice (rust-lang/rust#62958), and
/// every call in flight holds this one.
pub(super) struct Attempts<S> {
    first: BoxFuture,
    /// What another attempt needs; taken when one is made.
    again: Option<Again<S>>,
    /// The attempts after the first, once the first answer called for them.
    more: Option<BoxFuture>,
}

struct Again<S> {
    inner: S,
    policy: Arc<RetryPolicy>,
    kept: KeptHead,
    body: Bytes,
    reserved: Reserved,
}

pub(super) fn attempts<S>(
    inner: S,
    policy: Arc<RetryPolicy>,
    kept: KeptHead,
    body: Bytes,
    reserved: Reserved,
    first: BoxFuture,
) -> Attempts<S> {
    let again = Again {
        inner,
        policy,
        kept,
        body,
        reserved,
    };
    Attempts {
        first,
        again: Some(again),
        more: None,
    }
}

// Nothing in it is polled where it lies: `first` and `more` are boxed, `again` is moved out.
impl<S> Unpin for Attempts<S> {}

impl<S> Future for Attempts<S>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = Infallible, Future = BoxFuture>
        + Send
        + 'static,
{
    type Output = Result<ProxyResponse, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        if let Some(more) = &mut this.more {
            return more.as_mut().poll(cx);
        }
        let resp = ready!(this.first.as_mut().poll(cx))?;
        // Nearly every call ends here. (A request never processed is also closed before
        // its answer: `forward` marks both.)
        let again = matches!(
            resp.status(),
            StatusCode::UNAUTHORIZED | StatusCode::TOO_MANY_REQUESTS
        ) || Outcome::read(&resp).is_some_and(|o| o.closed_before_answer);
        let Some(Again {
            inner,
            policy,
            kept,
            body,
            reserved,
        }) = this.again.take().filter(|_| again)
        else {
            return Poll::Ready(Ok(resp));
        };
        let more: BoxFuture = Box::pin(again_as_the_policy_says(
            inner, policy, kept, body, reserved, resp,
        ));
        this.more.insert(more).as_mut().poll(cx)
    }
}

/// After a first answer that may call for another attempt: a connection closed before
/// answering, a 401, a 429.
async fn again_as_the_policy_says<S>(
    mut inner: S,
    policy: Arc<RetryPolicy>,
    kept: KeptHead,
    body: Bytes,
    _reserved: Reserved,
    mut resp: ProxyResponse,
) -> Result<ProxyResponse, Infallible>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = Infallible, Future = BoxFuture>,
{
    let (name, metrics) = (&*policy.upstream, &policy.metrics);
    let mut retried = None;
    // A pooled connection closed under the call before any answer: nothing was
    // answered, and the body is here (empty, for most), so an idempotent call goes
    // again; each time the pool drops that connection, and a burst of idle closes
    // can take several.
    let mut resends = 0;
    // A request the API host never processed (HTTP/2 GOAWAY, REFUSED_STREAM) goes again
    // whatever its method.
    let closed = |r: &ProxyResponse| Outcome::read(r).is_some_and(|o| o.closed_before_answer);
    let unprocessed = |r: &ProxyResponse| Outcome::read(r).is_some_and(|o| o.never_processed);
    while resends < STALE_RESENDS
        && (unprocessed(&resp) || closed(&resp) && idempotent(&kept.head.method))
    {
        resends += 1;
        metrics.retry(name, RetryReason::ConnectionClosed.as_str());
        drop(resp);
        resp = inner.ready().await?.call(kept.with_body(&body)).await?;
        retried = Some(RetryReason::ConnectionClosed);
    }
    // The token the upstream saw; none when the proxy made the answer itself.
    let from_upstream =
        |r: &ProxyResponse| -> Option<TokenId> { Outcome::read(r).and_then(|o| o.token) };
    if let (StatusCode::UNAUTHORIZED, Some(rejected)) = (resp.status(), from_upstream(&resp)) {
        let seen_at = tokio::time::Instant::now();
        // Kept in hand (it is small) and its connection freed: the bearer layer may ask
        // the platform about the token first, and the 401 goes back if it is still good.
        let first = match in_hand(resp).await {
            Ok(first) => first,
            Err(unread) => return Ok(unread),
        };
        let mut again = kept.with_body(&body);
        again
            .extensions_mut()
            .insert(ReplaceToken { rejected, seen_at });
        let second = inner.ready().await?.call(again).await?;
        if Outcome::read(&second).is_some_and(|o| o.rejection_stood) {
            resp = first;
        } else {
            metrics.retry(name, RetryReason::Unauthorized.as_str());
            tracing::info!(
                upstream = name,
                "upstream answered 401 for a token it no longer accepts; sent again with a fresh one"
            );
            resp = second;
            retried = Some(RetryReason::Unauthorized);
        }
    }
    if idempotent(&kept.head.method) {
        let (mut left, mut budget) = (policy.retry_429, policy.retry_429_max_wait);
        while left > 0
            && resp.status() == StatusCode::TOO_MANY_REQUESTS
            && from_upstream(&resp).is_some()
        {
            let wait = retry_after(resp.headers()).unwrap_or(std::time::Duration::from_secs(1));
            if wait > budget {
                break;
            }
            (left, budget) = (left - 1, budget - wait);
            metrics.retry(name, RetryReason::Throttled.as_str());
            tracing::info!(
                upstream = name,
                wait_secs = wait.as_secs_f32(),
                "upstream answered 429; retrying after Retry-After"
            );
            drop(resp);
            tokio::time::sleep(wait).await;
            resp = inner.ready().await?.call(kept.with_body(&body)).await?;
            retried = retried.or(Some(RetryReason::Throttled));
        }
    }
    if retried.is_some() {
        Outcome::of(&mut resp).retried = retried;
    }
    Ok(resp)
}
