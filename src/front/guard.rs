//! First line: refuse what a reverse proxy must never act on, and bodies over the limit.
//!
//! - `CONNECT` and absolute-form targets (`GET http://elsewhere/ HTTP/1.1`) are a forward
//!   proxy's business; tokengate only ever connects to its configured upstreams.
//! - A declared `Content-Length` over `max_body_bytes` gets 413 before anything is read; a
//!   body without one is wrapped so that it fails when it crosses the limit.
//! - A body must keep coming: it fails (408 `body_timeout`) when nothing arrives for 10 s
//!   or all of it takes over 60 s ([`body::with_deadlines`]), wherever it is read.
//!
//! And clean what the caller sent, before any layer acts on it: hop-by-hop headers (and
//! those the caller's `Connection` names) go here, at the edge, so that nothing a caller
//! sends can remove a header a later layer sets (`Connection: authorization` once stripped
//! the proxy's own bearer token in `forward`, and each such call cost a grant). Headers that
//! ask a server to treat the call as another method or path, and forwarding headers the
//! caller made up, go too: the upstream must see the call the allow list checked.

use http::{header, HeaderMap, HeaderName, Method, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tower_http::validate_request::{ValidateRequest, ValidateRequestHeaderLayer};

use crate::back::forward::strip_hop_by_hop;
use crate::back::websocket;
use crate::call::error::ProxyError;
use crate::call::{ProxyRequest, ProxyResponse};
use crate::front::client_auth::X_API_KEY;
use crate::http::body::BodyLimitExceeded;
use crate::http::body::{self, BoxError, ProxyBody};

/// Headers a caller may not set: method overrides and URL rewrites (frameworks honour them,
/// and they would let a call be something other than what the allow list checked), and
/// forwarding headers, which would otherwise reach the API as if the proxy had vouched for
/// them. A match on the text, as in `forward`'s hop-by-hop test: cheaper than hashing
/// each name into the map.
fn caller_must_not_set(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "x-http-method-override"
            | "x-http-method"
            | "x-method-override"
            | "x-original-url"
            | "x-rewrite-url"
            | "forwarded"
            | "x-forwarded-for"
            | "x-forwarded-host"
            | "x-forwarded-proto"
    )
}

/// Remove what the caller must not pass on (see the module docs). The caller's
/// credentials stay even when its `Connection` header names them: the proxy is the
/// recipient that header speaks to, and client auth reads and removes them itself.
pub fn clean_caller_headers(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let credentials = [
            (header::AUTHORIZATION, headers.remove(header::AUTHORIZATION)),
            (X_API_KEY.clone(), headers.remove(&X_API_KEY)),
        ];
        strip_hop_by_hop(headers);
        for (name, value) in credentials {
            if let Some(value) = value {
                headers.insert(name, value);
            }
        }
    } else {
        strip_hop_by_hop(headers);
    }
    // One pass over the names; a hashed removal only for the (rare) ones present.
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|name| caller_must_not_set(name))
        .cloned()
        .collect();
    for name in present {
        headers.remove(name);
    }
}

/// The layer: refuse what must never be forwarded, clean and bound the rest.
pub type GuardLayer = ValidateRequestHeaderLayer<Guard>;

/// Refuse bodies over `max_body_bytes` (and the rest the module docs list).
pub fn layer(max_body_bytes: u64) -> GuardLayer {
    ValidateRequestHeaderLayer::custom(Guard { max_body_bytes })
}

/// The checks, as tower-http's refuse-or-forward layer runs them.
#[derive(Debug, Clone)]
pub struct Guard {
    max_body_bytes: u64,
}

impl Guard {
    fn check(&self, req: &ProxyRequest) -> Result<(), ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::BadRequest("CONNECT is not supported"));
        }
        // HTTP/2 always carries a scheme and authority; on HTTP/1 they mean absolute form.
        if req.version() < Version::HTTP_2 && req.uri().scheme().is_some() {
            return Err(ProxyError::BadRequest(
                "absolute-form request targets are not supported",
            ));
        }
        if !req.uri().path().starts_with('/') {
            return Err(ProxyError::BadRequest("the request target must be a path"));
        }
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_body_bytes) {
            return Err(ProxyError::BodyTooLarge {
                limit: self.max_body_bytes,
            });
        }
        Ok(())
    }
}

impl ValidateRequest<ProxyBody> for Guard {
    type ResponseBody = ProxyBody;

    fn validate(&mut self, req: &mut ProxyRequest) -> Result<(), ProxyResponse> {
        self.check(req).map_err(ProxyError::into_response)?;
        // A WebSocket handshake keeps the two hop-by-hop headers that make it one.
        let handshake = websocket::is_handshake(req.method(), req.version(), req.headers());
        clean_caller_headers(req.headers_mut());
        if handshake {
            websocket::keep_upgrade(req.headers_mut());
        }
        // No body (most GETs): nothing to limit or time.
        if req.body().is_end_stream() {
            return Ok(());
        }
        let max = self.max_body_bytes;
        let limit = usize::try_from(max).unwrap_or(usize::MAX);
        let unlimited = std::mem::replace(req.body_mut(), body::empty());
        let limited = Limited::new(unlimited, limit).map_err(move |e| {
            if e.is::<LengthLimitError>() {
                Box::new(BodyLimitExceeded(max)) as BoxError
            } else {
                e
            }
        });
        *req.body_mut() = body::with_deadlines(body::boxed(limited));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use tower::{Layer, ServiceExt};

    /// The guard in front of a service that echoes what reached it: the headers it saw.
    async fn through_guard(req: ProxyRequest) -> ProxyResponse {
        let inner = tower::service_fn(|req: ProxyRequest| async move {
            let mut seen: Vec<String> = req.headers().keys().map(|k| k.to_string()).collect();
            seen.sort();
            Ok::<_, std::convert::Infallible>(http::Response::new(body::full(seen.join(","))))
        });
        layer(16).layer(inner).oneshot(req).await.unwrap()
    }

    async fn text(resp: ProxyResponse) -> String {
        use http_body_util::BodyExt;
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[tokio::test]
    async fn refused_requests_never_reach_the_service() {
        let connect = http::Request::connect("api.example.com:443")
            .body(body::empty())
            .unwrap();
        assert_eq!(through_guard(connect).await.status(), 400);
        let absolute = http::Request::get("http://elsewhere.example/api")
            .body(body::empty())
            .unwrap();
        assert_eq!(through_guard(absolute).await.status(), 400);
        let large = http::Request::post("/api/v2/x")
            .header(header::CONTENT_LENGTH, "17")
            .body(body::full("x".repeat(17)))
            .unwrap();
        assert_eq!(through_guard(large).await.status(), 413);
    }

    #[tokio::test]
    async fn forwarding_and_override_headers_go_but_the_callers_key_stays() {
        let mut req = http::Request::get("/api/v2/users/me")
            .body(body::empty())
            .unwrap();
        let h = req.headers_mut();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("x-api-key, x-hop"),
        );
        h.insert("x-hop", HeaderValue::from_static("1"));
        h.insert("x-api-key", HeaderValue::from_static("tg_k"));
        h.insert("x-http-method-override", HeaderValue::from_static("DELETE"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert(header::ACCEPT, HeaderValue::from_static("*/*"));
        let resp = through_guard(req).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(text(resp).await, "accept,x-api-key");
    }

    #[tokio::test]
    async fn a_body_longer_than_it_declared_is_cut_at_the_limit() {
        use http_body_util::BodyExt;
        let inner = tower::service_fn(|req: ProxyRequest| async move {
            let read = req.into_body().collect().await;
            let status = if read.is_err() { 413 } else { 200 };
            let mut resp = http::Response::new(body::empty());
            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
            Ok::<_, std::convert::Infallible>(resp)
        });
        // Chunked (no Content-Length): the limit applies as the body arrives.
        let req = http::Request::post("/api/v2/x")
            .body(body::boxed(http_body_util::StreamBody::new(
                futures_util::stream::iter(["0123456789", "0123456789"].map(|c| {
                    Ok::<_, std::convert::Infallible>(http_body::Frame::data(bytes::Bytes::from(c)))
                })),
            )))
            .unwrap();
        let resp = layer(16).layer(inner).oneshot(req).await.unwrap();
        assert_eq!(resp.status(), 413);
    }
}
