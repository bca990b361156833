//! Attach the upstream's bearer token, from its cache.
//!
//! Built for one upstream. The token comes from one of its
//! [token sources](crate::token::TokenSource) —
//! picked by [`Upstream::pick`](crate::upstream::Upstream::pick) when there is a pool —
//! usually with one atomic load. If the retry layer marked the request with
//! [`ReplaceToken`], that source is asked for a token other than the rejected one. The
//! upstream's answer records the token it was made with in its [`Outcome`], so a 401 can
//! name the token it rejected, and its rate-limit headers steer the pool.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header;
use tokio::time::Instant;
use tower::{Layer, Service};

use futures_util::FutureExt as _;

use crate::call::error::ProxyError;
use crate::call::messages::Admitted;
use crate::call::messages::Caller;
use crate::call::messages::ReplaceToken;
use crate::call::outcome::{Outcome, TokenId};
use crate::call::{BoxFuture, ProxyRequest, ProxyResponse};
use crate::config::providers::Provider;
use crate::telemetry::traces::CallTrace;
use crate::token::rejection::{Check, Liveness, Rejection};
use crate::token::{Token, TokenError, TokenSource};
use crate::upstream::WorkerUpstream;

/// How the platform is asked whether it still accepts a token, where it can be asked:
/// an OAuth2 server with `introspection_url` by RFC 7662; Genesys verifies one with
/// `HEAD /api/v2/tokens/me` (200 or 401, no body, and the token's
/// idle clock is not the caller's concern: the proxy's token is in use anyway).
fn liveness_check<S>(upstream: &WorkerUpstream, forward: &S, req: &ProxyRequest) -> Option<Check>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = Infallible, Future = BoxFuture>
        + Clone
        + Send
        + 'static,
{
    if upstream.config.provider == Provider::Oauth2 {
        let url = upstream.config.introspection_url.as_deref()?;
        return crate::token::rejection::introspection(&upstream.config.grant, url);
    }
    if upstream.config.provider != Provider::Genesys {
        return None;
    }
    let mut forward = forward.clone();
    let caller = req.extensions().get::<Caller>().cloned();
    Some(Box::new(move |token: http::HeaderValue| {
        Box::pin(async move {
            // A HEAD may go again, as retry sends calls whose connection closed unanswered
            // (the 401 being judged often closed the connection it came on).
            for _ in 0..3 {
                let mut ask = http::Request::head(TOKEN_ITSELF)
                    .body(crate::http::body::empty())
                    .ok()?;
                ask.headers_mut()
                    .insert(header::AUTHORIZATION, token.clone());
                if let Some(caller) = caller.clone() {
                    ask.extensions_mut().insert(caller);
                }
                let answer = forward.call(ask).await.ok()?;
                match Outcome::read(&answer) {
                    Some(o) if o.closed_before_answer => continue,
                    Some(o) if o.error.is_some() => return None,
                    _ => return Some(answer.status()),
                }
            }
            None
        })
        .map(|status| match status.map(|s| s.as_u16()) {
            Some(200..=299) => Liveness::Alive,
            Some(401) => Liveness::Dead,
            _ => Liveness::Unknown,
        })
        .boxed()
    }))
}

/// The platform's description of the token a call carries (Genesys).
pub const TOKEN_ITSELF: &str = "/api/v2/tokens/me";

#[derive(Debug, Clone)]
pub struct BearerLayer {
    upstream: WorkerUpstream,
}

impl BearerLayer {
    /// Attach tokens from `upstream`'s pool.
    pub fn with_tokens_of(upstream: &WorkerUpstream) -> Self {
        BearerLayer {
            upstream: upstream.clone(),
        }
    }
}

impl<S> Layer<S> for BearerLayer {
    type Service = Bearer<S>;
    fn layer(&self, inner: S) -> Bearer<S> {
        Bearer {
            inner,
            upstream: self.upstream.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Bearer<S> {
    inner: S,
    upstream: WorkerUpstream,
}

/// A failed grant, as the caller sees it: a refusal that needs a configuration change is
/// 502 `token_grant_failed`; an outage or rate limit is 503 `token_unavailable`.
pub fn token_error(upstream: &str, e: TokenError) -> ProxyError {
    use crate::token::grant::GrantError;
    if e.cause.is_transient() {
        return ProxyError::TokenUnavailable {
            retry_after: e.retry_after,
            message: format!(
                "no token for upstream \"{upstream}\" is available: {}",
                e.cause.for_caller()
            ),
        };
    }
    let grant_error = match &e.cause {
        GrantError::Refused { error, .. } => Some(error.clone()),
        _ => None,
    };
    ProxyError::TokenGrantFailed {
        grant_error,
        message: format!(
            "the token grant for upstream \"{upstream}\" failed: {} (`tokengate check` tells why)",
            e.cause.for_caller()
        ),
    }
}

impl<S> Service<ProxyRequest> for Bearer<S>
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
        // Take the service that was driven to readiness; leave a clone in its place.
        let clone = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, clone);
        let replace = req.extensions().get::<ReplaceToken>().copied();
        let admitted = req.extensions().get::<Admitted>().copied();
        // A traced call waits for a token in its own context: a grant it starts is its
        // child, one it waits for gets a link.
        let trace = req
            .extensions()
            .get::<CallTrace>()
            .map(|t| t.context().clone());
        if replace.is_none() && trace.is_none() {
            // The usual case: the cached token is good. The request goes out now, and the
            // call's future holds neither it nor a wait for a token.
            let (i, source) = chosen(&self.upstream, admitted);
            let now = Instant::now();
            if let Some(token) = source.ready(now) {
                return Box::pin(send_with(self.upstream.clone(), inner, req, i, token, now));
            }
        }
        let upstream = self.upstream.clone();
        let check = replace.and_then(|_| liveness_check(&upstream, &self.inner, &req));
        let call = Box::pin(async move {
            let (pool_index, token) = match replace {
                Some(ReplaceToken { rejected, seen_at }) => {
                    let i = rejected.pool_index.min(upstream.tokens.len() - 1);
                    let source = &upstream.tokens[i];
                    match source.replace(rejected.generation, seen_at, check).await {
                        Rejection::Replaced(token) => (i, token),
                        Rejection::Stands => {
                            let mut stood = http::Response::new(crate::http::body::empty());
                            *stood.status_mut() = http::StatusCode::UNAUTHORIZED;
                            Outcome::of(&mut stood).rejection_stood = true;
                            return Ok(stood);
                        }
                    }
                }
                None => {
                    let (i, source) = chosen(&upstream, admitted);
                    (i, source.token().await)
                }
            };
            let token = match token {
                Ok(t) => t,
                Err(e) => return Ok(token_error(upstream.name(), e).into_response()),
            };
            send_with(upstream, inner, req, pool_index, token, Instant::now()).await
        });
        match trace {
            Some(cx) => Box::pin(opentelemetry::context::FutureExt::with_context(call, cx)),
            None => call,
        }
    }
}

/// The token source for a call: the one whose budget the rate governor found room in,
/// if it holds a budget; else the pool's turn.
fn chosen(upstream: &WorkerUpstream, admitted: Option<Admitted>) -> (usize, &Arc<TokenSource>) {
    match admitted {
        Some(Admitted(i)) if i < upstream.tokens.len() => (i, &upstream.tokens[i]),
        _ => upstream.pick(),
    }
}

/// Sends `req` with `token` at once; the future reads what the answer says about the
/// token and the budget.
fn send_with<S>(
    upstream: WorkerUpstream,
    mut inner: S,
    mut req: ProxyRequest,
    pool_index: usize,
    token: Arc<Token>,
    now: Instant,
) -> impl Future<Output = Result<ProxyResponse, Infallible>> + Send + 'static
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = Infallible, Future = BoxFuture>
        + Send
        + 'static,
{
    let generation = token.generation;
    // Only a token whose idle timeout is still to be asked (once per token) needs
    // the caller kept for the question.
    let asks_idle = upstream.config.provider == Provider::Genesys
        && !upstream.plain_paths_only
        && token.idle_timeout_unasked();
    let caller = asks_idle
        .then(|| req.extensions().get::<Caller>().cloned())
        .flatten();
    req.headers_mut()
        .insert(header::AUTHORIZATION, token.header().clone());
    token.touch(now);
    let sent = inner.call(req);
    async move {
        let mut resp = sent.await?;
        if Outcome::made_by_proxy(&resp) {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        upstream.observe_limits(pool_index, status, resp.headers());
        upstream
            .budget
            .observe(pool_index, status, resp.headers(), || upstream.in_flight());
        Outcome::of(&mut resp).token = Some(TokenId {
            pool_index,
            generation,
        });
        if asks_idle && resp.status().is_success() && token.ask_idle_timeout() {
            // A call in the token's budget: asked only when the budget has room
            // for it now, else with the token's next answer.
            let Some(unanswered) = upstream.budget.take_own(pool_index) else {
                token.ask_idle_timeout_later();
                return Ok(resp);
            };
            if let Some(question) = super::idle::question(&token, caller) {
                let answer = inner.call(question);
                let learn = super::idle::learn(upstream, answer, pool_index, unanswered);
                tokio::spawn(learn);
            }
        }
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tower::{service_fn, ServiceExt};

    use super::*;
    use crate::http::body;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_callers_credentials_are_replaced_and_a_rejected_token_is_swapped() {
        let (sandbox, upstream, _metrics) = crate::upstream::sandboxed_worker_upstream().await;
        // The inner service plays the upstream: it records the Authorization it was sent.
        let sent: Arc<Mutex<Vec<http::HeaderValue>>> = Arc::default();
        let recorder = {
            let sent = Arc::clone(&sent);
            service_fn(move |req: ProxyRequest| {
                let sent = Arc::clone(&sent);
                Box::pin(async move {
                    if let Some(v) = req.headers().get(header::AUTHORIZATION) {
                        sent.lock().unwrap().push(v.clone());
                    }
                    Ok(http::Response::new(body::empty()))
                }) as BoxFuture
            })
        };
        let bearer = BearerLayer::with_tokens_of(&upstream).layer(recorder);
        let call = |replace: Option<TokenId>| {
            let mut req = http::Request::get("/x")
                .header(header::AUTHORIZATION, "Bearer the-callers-own")
                .body(body::empty())
                .unwrap();
            if let Some(rejected) = replace {
                req.extensions_mut().insert(ReplaceToken {
                    rejected,
                    seen_at: tokio::time::Instant::now(),
                });
            }
            bearer.clone().oneshot(req)
        };
        let first = call(None).await.unwrap();
        let used = Outcome::read(&first).and_then(|o| o.token).unwrap();
        let again = call(Some(used)).await.unwrap();
        let swapped = Outcome::read(&again).and_then(|o| o.token).unwrap();
        assert_ne!(swapped.generation, used.generation);
        let sent = sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 2);
        assert_ne!(sent[0], sent[1], "the second call carried the new token");
        for v in &sent {
            assert_ne!(v, "Bearer the-callers-own");
        }
        assert!(sandbox.issued(&sent[1]));
        assert_eq!(sandbox.grants(), 2);
    }

    /// With a cached token the request goes out as the layer is called, and the call's
    /// future holds neither the request nor a wait for a token: every call in flight
    /// holds it, and every call copies it into its box.
    #[tokio::test]
    async fn a_call_with_a_cached_token_goes_out_at_once_and_its_future_stays_small() {
        let (_sandbox, upstream, _metrics) = crate::upstream::sandboxed_worker_upstream().await;
        let sent: Arc<Mutex<Vec<http::HeaderValue>>> = Arc::default();
        let recorder = {
            let sent = Arc::clone(&sent);
            service_fn(move |req: ProxyRequest| {
                if let Some(v) = req.headers().get(header::AUTHORIZATION) {
                    sent.lock().unwrap().push(v.clone());
                }
                Box::pin(async { Ok(http::Response::new(body::empty())) }) as BoxFuture
            })
        };
        let mut bearer = BearerLayer::with_tokens_of(&upstream).layer(recorder);
        let get = || http::Request::get("/x").body(body::empty()).unwrap();
        // The first call waits for the grant.
        let first = bearer.call(get());
        assert!(sent.lock().unwrap().is_empty());
        first.await.unwrap();
        assert_eq!(sent.lock().unwrap().len(), 1);
        let second = bearer.call(get());
        assert_eq!(
            sent.lock().unwrap().len(),
            2,
            "sent before the future was polled"
        );
        let size = std::mem::size_of_val(&*second);
        // 96 bytes; it was 768 when it held the request and the wait for a token.
        assert!(size <= 128, "{size} bytes");
        second.await.unwrap();
    }
}
