//! Which upstream a request goes to, and whether its caller may go there.
//!
//! The longest configured `prefix` that matches whole path segments wins; the prefix is
//! stripped unless it is `/`. Only the path and query travel on: the forwarder joins them
//! to the upstream's base URL, never to the request's `Host` or authority, so no request
//! can make the proxy connect anywhere else.
//!
//! Policy: a client's `upstreams` list and its `allow` rules (see [`crate::policy`]); rules
//! match the path as the caller sent it, and only paths in plain form. An upstream whose
//! `base_url` has a path takes plain paths only, from every caller: `..` must not climb
//! out of it.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{ready, Either, Ready};
use tower::{Layer, Service};

use super::client_auth::Caller;
use super::{ProxyRequest, ProxyResponse};
use crate::error::ProxyError;
use crate::policy::is_plain_path;
use crate::upstream::Upstream;

/// Where a request is going; set on the request by [`Router`].
#[derive(Debug, Clone)]
pub struct Route {
    pub upstream: Arc<Upstream>,
    /// The request's path with the prefix stripped, and its query: appended to the
    /// upstream's base URL by [`crate::forward`].
    pub path_and_query: String,
}

/// Who asked and which upstream answered, set on every response that reached the router
/// (its own refusals included), for logs, metrics and the status page.
#[derive(Debug, Clone, Default)]
pub struct Served {
    pub upstream: Option<Arc<Upstream>>,
    /// `None` for an anonymous caller.
    pub client: Option<Arc<str>>,
}

#[derive(Debug, Clone)]
pub struct RouteLayer {
    /// Longest prefix first.
    upstreams: Arc<[Arc<Upstream>]>,
}

impl RouteLayer {
    pub fn by_prefix(upstreams: &[Arc<Upstream>]) -> Self {
        let mut sorted = upstreams.to_vec();
        sorted.sort_by_key(|u| std::cmp::Reverse(u.config.prefix.len()));
        RouteLayer {
            upstreams: sorted.into(),
        }
    }
}

impl<S> Layer<S> for RouteLayer {
    type Service = Router<S>;
    fn layer(&self, inner: S) -> Router<S> {
        Router {
            inner,
            upstreams: self.upstreams.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Router<S> {
    inner: S,
    upstreams: Arc<[Arc<Upstream>]>,
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

impl<S> Router<S> {
    fn route(&self, req: &ProxyRequest) -> Result<Route, ProxyError> {
        let path = req.uri().path();
        let (upstream, rest) = self
            .upstreams
            .iter()
            .find_map(|u| strip_prefix(&u.config.prefix, path).map(|rest| (u, rest)))
            .ok_or(ProxyError::NoRoute)?;
        if let Some(Caller(Some(client))) = req.extensions().get::<Caller>() {
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
        Ok(Route {
            upstream: Arc::clone(upstream),
            path_and_query: match req.uri().query() {
                Some(q) => format!("{rest}?{q}"),
                None => rest.to_string(),
            },
        })
    }
}

impl<S> Service<ProxyRequest> for Router<S>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = ProxyResponse;
    type Error = Infallible;
    type Future = Either<Ready<Result<ProxyResponse, Infallible>>, ServedResponse<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: ProxyRequest) -> Self::Future {
        let client = req
            .extensions()
            .get::<Caller>()
            .and_then(|c| c.0.as_ref())
            .map(|c| c.name.clone());
        match self.route(&req) {
            Ok(route) => {
                let served = Served {
                    upstream: Some(Arc::clone(&route.upstream)),
                    client,
                };
                req.extensions_mut().insert(route);
                Either::Right(ServedResponse {
                    inner: self.inner.call(req),
                    served: Some(served),
                })
            }
            Err(e) => {
                let mut resp = e.into_response();
                resp.extensions_mut().insert(Served {
                    upstream: None,
                    client,
                });
                Either::Left(ready(Ok(resp)))
            }
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner response with [`Served`] attached.
    pub struct ServedResponse<F> {
        #[pin]
        inner: F,
        served: Option<Served>,
    }
}

impl<F> Future for ServedResponse<F>
where
    F: Future<Output = Result<ProxyResponse, Infallible>>,
{
    type Output = Result<ProxyResponse, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Ok(mut resp) = std::task::ready!(this.inner.poll(cx));
        if let Some(served) = this.served.take() {
            resp.extensions_mut().insert(served);
        }
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
