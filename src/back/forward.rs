//! The innermost service: send the request to its upstream and stream the answer back.
//!
//! Built for one upstream and one worker: the request (its URI the path within the
//! upstream, set by the router) goes to that upstream over that worker's own connections
//! (`connections`: hyper's HTTP/1.1 senders on an idle stack, or one shared HTTP/2
//! connection, over rustls), so a call never waits on another thread. A call takes a
//! connection slot first (`connection_slots`: at the cap, calls queue, fairly by client).
//! Hop-by-hop headers (RFC 9110 §7.6.1) are removed from the answer here and from the
//! request at the edge (the guard layer), `Host` is set for the upstream, and neither body
//! is buffered: bytes flow as they come, with hyper's back-pressure.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::uri::PathAndQuery;
use http::{header, HeaderMap, HeaderName, Version};
use tower::Service;

use crate::back::channels::SocketMark;
use crate::back::websocket::{self, Sockets};
use crate::call::error::{body_error_or, ProxyError};
use crate::call::messages::Caller;
use crate::call::outcome::Outcome;
use crate::call::{BoxFuture, ProxyRequest};
use crate::config::WebsocketToken;
use crate::http::body;
use crate::http::causes::error_chain;
use crate::outbound::connections::{
    never_processed, Answered, Origin, SendError, WorkerConnections,
};
use crate::outbound::lease::Lease;
use crate::outbound::slots::{Claimant, Slot};
use crate::telemetry::traces::Attempt;
use crate::upstream::WorkerUpstream;
use futures_util::future::Either;
use futures_util::FutureExt as _;
use hyper::upgrade::OnUpgrade;

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
/// de-facto `Proxy-Connection` and `Keep-Alive`, and `Trailer`. A match on the text is a
/// length test and at most a short comparison, cheaper than comparing `HeaderName`s.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Remove hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the names (cheap comparisons of standard headers) finds the few that
    // are present, so only those cost a hashed removal. Usually it is `Connection:
    // keep-alive` alone, or nothing: then nothing is allocated.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Header names the `Connection` header lists, besides its options (RFC 9112 §9.6):
    // a byte scan first, since nearly every answer says only `keep-alive` or `close`.
    let options = |v: &http::HeaderValue| {
        v.as_bytes().split(|b| *b == b',').all(|token| {
            let token = token.trim_ascii();
            token.is_empty()
                || token.eq_ignore_ascii_case(b"keep-alive")
                || token.eq_ignore_ascii_case(b"close")
        })
    };
    if !headers.get_all(header::CONNECTION).iter().all(options) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|token| {
                !token.eq_ignore_ascii_case(b"keep-alive") && !token.eq_ignore_ascii_case(b"close")
            })
            .filter_map(|name| HeaderName::from_bytes(name).ok())
            .collect();
        for name in &named {
            headers.remove(name);
        }
    }
    // Cloning a name to remove it copies no bytes (a standard name, or shared bytes), so
    // this allocates nothing.
    while let Some(name) = headers.keys().find(|name| is_hop_by_hop(name)).cloned() {
        headers.remove(&name);
    }
}

/// The name anonymous callers share their connection slots under.
static ANONYMOUS: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));

/// Did the upstream close the connection before any byte of an answer arrived? That is
/// a kept-alive connection the API host (or a load balancer) closed as idle just as the
/// call was sent on it: nothing was answered, so an idempotent call may be sent again on
/// another connection (nginx's `proxy_next_upstream`, haproxy's `retry-on conn-failure`).
fn closed_before_answering(e: &SendError) -> bool {
    let e = match e {
        SendError::Exchange(e) => e,
        // HTTP/2: the connection ended (after a GOAWAY, say) before this stream's answer.
        SendError::Http2(h2) => {
            return h2.get_io().is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                )
            })
        }
        SendError::Connect(_) => return false,
    };
    if e.is_incomplete_message() || e.is_canceled() {
        return true;
    }
    let mut cause = std::error::Error::source(e);
    while let Some(err) = cause {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ) {
                return true;
            }
        }
        cause = err.source();
    }
    false
}

/// One upstream's connections on one worker.
#[derive(Debug, Clone)]
pub struct Forward {
    upstream: WorkerUpstream,
    /// Open WebSockets, for `max_websockets`.
    sockets: Arc<Sockets>,
}

impl Forward {
    /// Send calls to `upstream` over its worker's connections.
    pub fn to(upstream: &WorkerUpstream, sockets: &Arc<Sockets>) -> Forward {
        Forward {
            upstream: upstream.clone(),
            sockets: Arc::clone(sockets),
        }
    }
}

/// The message for a failed exchange with `origin`.
fn failure(origin: &Origin, e: &SendError) -> String {
    match e {
        SendError::Connect(_) => format!(
            "connecting to {origin} failed: {}",
            error_chain(e.as_error())
        ),
        SendError::Exchange(_) | SendError::Http2(_) => format!(
            "the exchange with {origin} failed: {}",
            error_chain(e.as_error())
        ),
    }
}

/// A WebSocket handshake: sent on a connection of its own; on `101` both connections are
/// handed to [`websocket::relay`], and the caller gets the `101`. Any other answer (a
/// 401, a 404) goes back as an ordinary one.
pub(crate) async fn handshake(
    upstream: WorkerUpstream,
    sockets: Arc<Sockets>,
    origin: Arc<Origin>,
    path: PathAndQuery,
    caller: Arc<str>,
    channel: Option<SocketMark>,
    mut req: ProxyRequest,
) -> Result<crate::call::ProxyResponse, Infallible> {
    // hyper gives every HTTP/1.1 request that asks to upgrade a way to take over its
    // connection (retry keeps it for a second attempt).
    let Some(caller_side) = req.extensions_mut().remove::<OnUpgrade>() else {
        let e = ProxyError::BadRequest("this connection cannot be upgraded to a WebSocket");
        return Ok(e.into_response());
    };
    let Some(mut ticket) = sockets.admit(upstream.name(), &caller) else {
        return Ok(ProxyError::TooManyWebsockets(sockets.max_per_client()).into_response());
    };
    if let Some(channel) = channel {
        ticket.hold(channel);
    }
    let path = match &upstream.config.websocket_token {
        WebsocketToken::Query(name) if req.headers().contains_key(http::header::AUTHORIZATION) => {
            match websocket::token_into_query(&path, name, req.headers_mut()) {
                Some(path) => path,
                None => {
                    let e = ProxyError::BadRequest("the WebSocket target cannot carry the token");
                    return Ok(e.into_response());
                }
            }
        }
        _ => path,
    };
    let timeout = upstream.config.timeout;
    let sent = upstream.connections().upgrade(&origin, path, req);
    let mut resp = match tokio::time::timeout(timeout, sent).await {
        Err(_) => return Ok(ProxyError::UpstreamTimeout(timeout).into_response()),
        Ok(Err(e)) => {
            let failure = failure(&origin, &e);
            tracing::warn!(upstream = %upstream.name(), error = %failure, "WebSocket handshake failed");
            return Ok(ProxyError::UpstreamUnreachable(failure).into_response());
        }
        Ok(Ok(resp)) => resp,
    };
    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        let upstream_side = hyper::upgrade::on(&mut resp);
        websocket::relay(caller_side, upstream_side, ticket, sockets.idle());
        let (mut head, _) = resp.into_parts();
        strip_hop_by_hop(&mut head.headers);
        websocket::keep_upgrade(&mut head.headers);
        return Ok(http::Response::from_parts(head, body::empty()));
    }
    // Not switched (a 401, a 404): an ordinary answer, cut like any other if it stalls.
    let (mut head, incoming) = resp.into_parts();
    strip_hop_by_hop(&mut head.headers);
    let answer = body::settle_answer(incoming, (), timeout);
    Ok(http::Response::from_parts(head, answer))
}

impl Service<ProxyRequest> for Forward {
    type Response = crate::call::ProxyResponse;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: ProxyRequest) -> BoxFuture {
        let upstream = self.upstream.clone();
        let Some(origin) = upstream.origin() else {
            let e = ProxyError::TokenUnavailable {
                retry_after: None,
                message: format!("the API host of upstream \"{}\" is not known yet (discovery has not succeeded)", upstream.name()),
            };
            return Box::pin(async { Ok(e.into_response()) });
        };
        // A traced call's attempt: its span, and its context to the API host.
        let Some(attempt) = Attempt::begin(&mut req, || origin.server()) else {
            return self.send(upstream, origin, req);
        };
        Box::pin(self.send(upstream, origin, req).map(move |resp| {
            if let Ok(resp) = &resp {
                let error = Outcome::read(resp).and_then(|o| o.error);
                attempt.end(
                    resp.status().as_u16(),
                    resp.headers(),
                    error.map(|e| e.as_str()),
                );
            }
            resp
        }))
    }
}

impl Forward {
    /// One attempt: the request to the API host at `origin` over this worker's
    /// connections.
    fn send(
        &mut self,
        upstream: WorkerUpstream,
        origin: Arc<Origin>,
        mut req: ProxyRequest,
    ) -> BoxFuture {
        let within = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let Ok(path) = origin.path(&within) else {
            let e = ProxyError::BadRequest("the request path cannot be forwarded");
            return Box::pin(async { Ok(e.into_response()) });
        };
        // The upstream connection's protocol is the client's choice (ALPN), not the caller's.
        *req.version_mut() = Version::HTTP_11;
        // The caller's hop-by-hop headers went at the edge (guard): stripping them here,
        // after the bearer layer, would let `Connection: authorization` remove the token.
        // `Host` is set by `connections` for the upstream (HTTP/1.1) or left out (HTTP/2).
        let (caller, weight) = match req.extensions().get::<Caller>() {
            Some(Caller(Some(client))) => (Arc::clone(&client.name), client.share),
            _ => (Arc::clone(&ANONYMOUS), 1),
        };
        if websocket::is_handshake(req.method(), req.version(), req.headers()) {
            let sockets = Arc::clone(&self.sockets);
            return Box::pin(handshake(
                upstream, sockets, origin, path, caller, None, req,
            ));
        }
        let connections = Arc::clone(upstream.connections());
        let timeout = upstream.config.timeout;
        // A free connection slot at once is the usual case: no timer and no queue for it.
        let who = Claimant {
            client: &caller,
            weight,
        };
        if let Some(permit) = connections.slots.try_acquire(who) {
            // And usually an idle connection ready for the request: it goes out now.
            // Either way the call's future holds the request once and stays small enough
            // for the allocator's thread cache (an `async` block holding it would hold it
            // twice; rust-lang/rust#62958).
            let exchange = match connections.send_now(&origin, path, req) {
                Ok(answer) => Either::Left(answer),
                Err((path, req)) => Either::Right(Box::pin(Arc::clone(&connections).send(
                    Arc::clone(&origin),
                    path,
                    req,
                ))),
            };
            return Box::pin(tokio::time::timeout(timeout, exchange).map(move |answer| {
                Ok(answered(answer, &upstream, &connections, &origin, permit))
            }));
        }
        // Every connection busy: calls queue here rather than open one more, and a freed
        // connection goes to the client holding fewest (see `connection_slots`). Waiting is
        // the proxy being busy, not the API being slow, so it ends in 503 upstream_busy,
        // never in a 504 that would blame the API.
        Box::pin(async move {
            let queue = upstream.config.queue_timeout;
            tracing::debug!(upstream = %upstream.name(), client = %caller, "every connection to the upstream is busy; waiting for one");
            let who = Claimant {
                client: &caller,
                weight,
            };
            let Ok(permit) = tokio::time::timeout(queue, connections.slots.acquire(who)).await
            else {
                let busy = ProxyError::UpstreamBusy {
                    upstream: Arc::clone(upstream.name()),
                    waited: queue,
                };
                tracing::warn!(upstream = %upstream.name(), "{busy}");
                return Ok(busy.into_response());
            };
            // Boxed once there is a slot: every queued call would carry its state.
            let exchange = Box::pin(Arc::clone(&connections).send(Arc::clone(&origin), path, req));
            let answer = tokio::time::timeout(timeout, exchange).await;
            Ok(answered(answer, &upstream, &connections, &origin, permit))
        })
    }
}

/// The caller's answer from an exchange with the upstream (or its failure, or its
/// timeout). The connection stays leased until the answer's body has been read.
fn answered(
    answer: Result<Answered, tokio::time::error::Elapsed>,
    upstream: &WorkerUpstream,
    connections: &Arc<WorkerConnections>,
    origin: &Arc<Origin>,
    permit: Slot,
) -> crate::call::ProxyResponse {
    let timeout = upstream.config.timeout;
    let (resp, sender) = match answer {
        Err(_) => return ProxyError::UpstreamTimeout(timeout).into_response(),
        Ok(Err(e)) => {
            let failure = failure(origin, &e);
            tracing::warn!(upstream = %upstream.name(), error = %failure, "upstream request failed");
            let err = body_error_or(e.as_error(), ProxyError::UpstreamUnreachable(failure));
            let mut resp = err.into_response();
            let outcome = Outcome::of(&mut resp);
            outcome.never_processed = never_processed(&e);
            outcome.closed_before_answer = outcome.never_processed || closed_before_answering(&e);
            return resp;
        }
        Ok(Ok(answered)) => answered,
    };
    let (mut head, incoming) = resp.into_parts();
    strip_hop_by_hop(&mut head.headers);
    // The connection is busy until the body has been read (or dropped): at once for a
    // small answer that came with its head, else as the caller reads it.
    let lease = Lease::new(connections, origin, sender, permit);
    let answer = body::settle_answer(incoming, lease, timeout);
    http::Response::from_parts(head, answer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    /// Every call's future is allocated once; past 1 KiB glibc serves it from its bins
    /// instead of the thread cache, and every call copies it (see docs/testing.md, issue 13).
    #[tokio::test]
    async fn a_calls_future_fits_the_allocators_thread_cache() {
        let (_sandbox, upstream, metrics) = crate::upstream::sandboxed_worker_upstream().await;
        let mut forward = Forward::to(&upstream, &Sockets::new(metrics));
        let call = forward.call(http::Request::get("/x").body(body::empty()).unwrap());
        let size = std::mem::size_of_val(&*call);
        assert!(size <= 1024, "{size} bytes");
    }

    #[test]
    fn the_hop_by_hop_test_knows_every_listed_name() {
        let listed = [
            header::CONNECTION,
            HeaderName::from_static("keep-alive"),
            HeaderName::from_static("proxy-connection"),
            header::PROXY_AUTHENTICATE,
            header::PROXY_AUTHORIZATION,
            header::TE,
            header::TRAILER,
            header::TRANSFER_ENCODING,
            header::UPGRADE,
        ];
        for name in &listed {
            assert!(is_hop_by_hop(name), "{name}");
        }
        assert!(!is_hop_by_hop(&header::AUTHORIZATION));
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
        // A name only the Connection header makes hop-by-hop goes too.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("x-hop"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.keys().collect::<Vec<_>>(), [header::ACCEPT]);
        // Nothing hop-by-hop: nothing changes.
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        h.insert("x-hop", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 2);
    }
}
