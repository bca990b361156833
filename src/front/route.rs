//! Which upstream a request goes to, and whether its caller may go there: the end of the
//! shared front half, which hands each call to its upstream's own prebuilt service.
//!
//! The longest configured `prefix` that matches whole path segments wins; the prefix is
//! stripped unless it is `/`. Only the path and query travel on: the forwarder joins them
//! to the upstream's base URL, never to the request's `Host` or authority, so no request
//! can make the proxy connect anywhere else.
//!
//! Policy: a client's `upstreams` list and its `allow` rules (see [`crate::config::policy`]); rules
//! match the path as the caller sent it, and only paths in plain form. An upstream whose
//! `base_url` has a path takes plain paths only, from every caller: `..` must not climb
//! out of it.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{ready, Either, Ready};
use http::Uri;
use tower::Service;

use crate::call::error::ProxyError;
use crate::call::messages::Caller;
use crate::call::messages::UnresolvedChannel;
use crate::call::outcome::Outcome;
use crate::call::{ProxyRequest, ProxyResponse};
use crate::config::policy::is_plain_path;
use crate::front::shared_credentials;
use crate::upstream::{Upstream, WorkerUpstream};

/// One upstream and the service that carries calls to it (its prebuilt back half).
#[derive(Debug, Clone)]
pub struct Destination<B> {
    pub upstream: WorkerUpstream,
    pub service: B,
}

/// The last service of the shared front half: picks the upstream by prefix, applies the
/// caller's policy, and hands the request — its URI now the path *within* the upstream,
/// prefix stripped — to that upstream's own service. Nothing downstream looks the route
/// up again: each back half was built for its upstream.
///
/// Each connection's copy of the request path owns its copy of the router (see
/// [`crate::live::WorkerService`]), so a call goes to its upstream's service directly,
/// with no clone of that service per call. The back halves are always ready (deadline,
/// retry, bearer and forward do their waiting inside the call's future, never in
/// `poll_ready`), so they are called without being driven to readiness first.
#[derive(Debug, Clone)]
pub struct Router<B> {
    /// Longest prefix first.
    destinations: Vec<Destination<B>>,
}

impl<B> Router<B> {
    pub fn by_prefix(destinations: impl IntoIterator<Item = Destination<B>>) -> Self {
        let mut sorted: Vec<Destination<B>> = destinations.into_iter().collect();
        sorted.sort_by_key(|d| std::cmp::Reverse(d.upstream.config.prefix.len()));
        Router {
            destinations: sorted,
        }
    }
}

fn not_plain() -> ProxyError {
    ProxyError::Forbidden(
        "the path has dot-segments, empty segments, encoded separators or characters that could change its meaning on the way"
            .into(),
    )
}

/// The rest of `path` after `prefix`, if `prefix` matches whole segments.
fn strip_prefix<'a>(prefix: &str, path: &'a str) -> Option<&'a str> {
    if prefix == "/" {
        return Some(path);
    }
    match path.strip_prefix(prefix)? {
        "" => Some("/"),
        rest if rest.starts_with('/') => Some(rest),
        _ => None,
    }
}

/// May this caller send this request to `upstream`?
fn permitted(req: &ProxyRequest, upstream: &Upstream) -> Result<(), ProxyError> {
    let path = req.uri().path();
    if let Some(why) =
        shared_credentials::refusal(req.method(), path, &upstream.config.grant.client_id)
    {
        return Err(ProxyError::Forbidden(why));
    }
    let caller = req.extensions().get::<Caller>();
    // A bare socket on a notification channel this replica does not know (client_auth let
    // it on for the notifications layer to decide): only an upstream with notification
    // channels has that layer.
    if matches!(caller, Some(Caller(None)))
        && req.extensions().get::<UnresolvedChannel>().is_some()
        && upstream.config.streaming_url.is_none()
    {
        return Err(ProxyError::NoRoute);
    }
    if let Some(Caller(Some(client))) = caller {
        if let Some(allowed) = &client.upstreams {
            if !allowed.contains(upstream.name()) {
                return Err(ProxyError::Forbidden(format!(
                    "client \"{}\" may not use upstream \"{}\"",
                    client.name,
                    upstream.name()
                )));
            }
        }
        if let Some(rules) = &client.allow {
            if !is_plain_path(path) {
                return Err(not_plain());
            }
            if !rules.iter().any(|r| r.allows(req.method(), path)) {
                return Err(ProxyError::Forbidden(format!(
                    "client \"{}\" may not {} this path",
                    client.name,
                    req.method()
                )));
            }
        }
    }
    if upstream.plain_paths_only && !is_plain_path(path) {
        return Err(not_plain());
    }
    Ok(())
}

/// The request's URI within the upstream: `rest` and the query, in origin form. Only this
/// travels on; the forwarder joins it to the upstream's base URL, never to the caller's
/// `Host` or authority.
fn within_upstream(uri: &Uri, rest: &str) -> Result<Uri, ProxyError> {
    let path_and_query = match uri.query() {
        Some(q) => format!("{rest}?{q}"),
        None => rest.to_string(),
    };
    Uri::try_from(path_and_query)
        .map_err(|_| ProxyError::BadRequest("the request path cannot be forwarded"))
}

impl<B> Router<B> {
    /// The destination, or the refusal and the upstream it names (none: no route).
    #[allow(clippy::result_large_err)] // the refusal is made once, into an answer
    fn route(
        &mut self,
        req: &mut ProxyRequest,
    ) -> Result<&mut Destination<B>, (ProxyError, Option<WorkerUpstream>)> {
        let (index, rest) = self
            .destinations
            .iter()
            .enumerate()
            .find_map(|(i, d)| {
                strip_prefix(&d.upstream.config.prefix, req.uri().path()).map(|rest| (i, rest))
            })
            .ok_or((ProxyError::NoRoute, None))?;
        let destination = &mut self.destinations[index];
        // Counted under the upstream it asked for (usage, the status page).
        permitted(req, &destination.upstream)
            .map_err(|e| (e, Some(destination.upstream.clone())))?;
        // Already the path within the upstream (prefix "/", origin form): nothing to do.
        if req.uri().scheme().is_some() || rest.len() != req.uri().path().len() {
            let uri = within_upstream(req.uri(), rest).map_err(|e| (e, None))?;
            let called = std::mem::replace(req.uri_mut(), uri);
            // An HTTP/2 call names the host it called in its URI, which has just gone:
            // keep it as `Host`, as HTTP/1.1 calls carry it (a notification channel's
            // rewritten `connectUri` names it). The upstream gets its own `Host` anyway.
            if let Some(authority) = called.authority() {
                if let Ok(host) = http::HeaderValue::from_str(authority.as_str()) {
                    req.headers_mut().entry(http::header::HOST).or_insert(host);
                }
            }
        }
        Ok(destination)
    }
}

impl<B> Service<ProxyRequest> for Router<B>
where
    B: Service<ProxyRequest, Response = ProxyResponse, Error = Infallible> + Clone,
{
    type Response = ProxyResponse;
    type Error = Infallible;
    type Future = Either<Ready<Result<ProxyResponse, Infallible>>, Routed<B::Future>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // Always ready, as every back half is (see the type's documentation).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: ProxyRequest) -> Self::Future {
        let client = req
            .extensions()
            .get::<Caller>()
            .and_then(|c| c.0.as_ref())
            .map(|c| c.name.clone());
        match self.route(&mut req) {
            Ok(destination) => Either::Right(Routed {
                upstream: Some(destination.upstream.clone()),
                client,
                inner: destination.service.call(req),
            }),
            Err((e, upstream)) => {
                let mut resp = e.into_response();
                Outcome::of(&mut resp).client = client;
                Outcome::of(&mut resp).upstream = upstream;
                Either::Left(ready(Ok(resp)))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The upstream's answer, with the route written into its [`Outcome`].
    pub struct Routed<F> {
        #[pin]
        inner: F,
        upstream: Option<WorkerUpstream>,
        client: Option<Arc<str>>,
    }
}

impl<F> Future for Routed<F>
where
    F: Future<Output = Result<ProxyResponse, Infallible>>,
{
    type Output = Result<ProxyResponse, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut resp) = std::task::ready!(this.inner.poll(cx));
        let outcome = Outcome::of(&mut resp);
        outcome.upstream = this.upstream.take();
        outcome.client = this.client.take();
        Poll::Ready(Ok(resp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_whole_segments() {
        assert_eq!(strip_prefix("/", "/api/v2"), Some("/api/v2"));
        assert_eq!(strip_prefix("/cxone", "/cxone"), Some("/"));
        assert_eq!(strip_prefix("/cxone", "/cxone/x"), Some("/x"));
        assert_eq!(strip_prefix("/cxone", "/cxonex"), None);
    }
}
