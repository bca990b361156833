//! When a call may be sent again, and what of it is kept to send it: the retry layer
//! (`super`) keeps it, its attempts (`attempts`) send it.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request};

use crate::call::messages::Caller;
use crate::call::ProxyRequest;
use crate::http::body::{self, ProxyBody};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::traces::CallTrace;

/// How many times a call is sent again after its pooled connection closed under it.
pub(super) const STALE_RESENDS: usize = 3;

/// Methods whose requests may be sent twice (RFC 9110 §9.2.2).
pub(super) fn idempotent(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Methods whose requests have no defined use for a body (RFC 9110 §9.3).
pub(super) fn carries_no_body(method: &http::Method) -> bool {
    use http::Method;
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::DELETE | Method::OPTIONS | Method::TRACE
    )
}

/// `Retry-After` as a wait: seconds, or an HTTP date.
pub(super) fn retry_after(headers: &http::HeaderMap) -> Option<std::time::Duration> {
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(std::time::Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// One upstream's retry policy, fixed when its stack is built.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Requests whose bodies are at most this long are kept, so they can be sent again.
    pub(super) keep_bytes: usize,
    /// After a 429, idempotent calls go again at most this many times...
    pub(super) retry_429: u32,
    /// ...and wait at most this long in all.
    pub(super) retry_429_max_wait: std::time::Duration,
    pub(super) upstream: Arc<str>,
    pub(super) metrics: Metrics,
}

/// A request's head, kept to send it again. Of its extensions only the [`Caller`] (the
/// forwarder shares connections out by caller) and the call's trace matter past this
/// layer; they are kept on their own and put back only on a copy that is sent, so the usual call, sent once, does not
/// pay for a copy of the extension map.
pub(super) struct KeptHead {
    pub(super) head: http::request::Parts,
    pub(super) caller: Option<Caller>,
    /// A WebSocket handshake's hold on its caller's connection, for a second attempt.
    pub(super) upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// The call's trace, so every attempt is a span of the same call.
    pub(super) trace: Option<CallTrace>,
}

impl KeptHead {
    pub(super) fn of(req: &ProxyRequest) -> KeptHead {
        let (mut head, ()) = Request::new(()).into_parts();
        head.method = req.method().clone();
        head.uri = req.uri().clone();
        head.version = req.version();
        head.headers = req.headers().clone();
        KeptHead {
            head,
            caller: req.extensions().get::<Caller>().cloned(),
            upgrade: req.extensions().get::<hyper::upgrade::OnUpgrade>().cloned(),
            trace: req.extensions().get::<CallTrace>().cloned(),
        }
    }

    /// A copy of the request with `body`.
    pub(super) fn with_body(&self, body: &Bytes) -> ProxyRequest {
        let mut req = Request::new(as_body(body));
        *req.method_mut() = self.head.method.clone();
        *req.uri_mut() = self.head.uri.clone();
        *req.version_mut() = self.head.version;
        *req.headers_mut() = self.head.headers.clone();
        if let Some(caller) = &self.caller {
            req.extensions_mut().insert(caller.clone());
        }
        if let Some(upgrade) = &self.upgrade {
            req.extensions_mut().insert(upgrade.clone());
        }
        if let Some(trace) = &self.trace {
            req.extensions_mut().insert(trace.clone());
        }
        req
    }
}

/// A kept body to send (an empty one, most calls', costs no allocation).
pub(super) fn as_body(kept: &Bytes) -> ProxyBody {
    if kept.is_empty() {
        body::empty()
    } else {
        body::full(kept.clone())
    }
}
