//! What became of one call, in one typed record on its response.
//!
//! Each layer writes the part it learns, where it learns it — `route` the upstream and
//! client, `bearer` the token the upstream answered, `retry` why the call went again,
//! `forward` that a connection closed before answering, [`ProxyError::into_response`] the
//! proxy's own error code — and `observe` reads the whole record once, for the metrics,
//! the status page and the audit line (pingora's per-request context, on the response
//! because in tower that is where a call's results travel).
//!
//! [`ProxyError::into_response`]: crate::call::error::ProxyError::into_response

use std::sync::Arc;

use crate::call::ProxyResponse;
use crate::upstream::WorkerUpstream;

/// Which token a request carried: its place in the upstream's pool, and its generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenId {
    pub pool_index: usize,
    pub generation: u64,
}

/// Why a call was sent to the upstream more than once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryReason {
    /// A pooled connection closed before any answer; an idempotent call went again.
    ConnectionClosed,
    /// The upstream answered 401; the call went again with a fresh token.
    Unauthorized,
    /// The upstream answered 429 and `retry_429` allowed another try after `Retry-After`.
    Throttled,
}

impl RetryReason {
    /// The label in metrics and the audit line.
    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::ConnectionClosed => "connection_closed",
            RetryReason::Unauthorized => "unauthorized",
            RetryReason::Throttled => "throttled",
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The upstream the call was routed to; `None` when it was refused before routing.
    pub upstream: Option<WorkerUpstream>,
    /// The client that called; `None` for an anonymous caller or before client auth.
    pub client: Option<Arc<str>>,
    /// The token the upstream saw, when the upstream answered.
    pub token: Option<TokenId>,
    /// Why the answer comes from a later attempt (the first reason, when there were several).
    pub retried: Option<RetryReason>,
    /// The proxy's own error code, when the proxy made the answer.
    pub error: Option<crate::http::codes::ErrorCode>,
    /// The upstream closed a pooled connection before any byte of an answer: nothing was
    /// answered, so an idempotent call may go again.
    pub closed_before_answer: bool,
    /// The API host refused the request before processing any of it (an HTTP/2 GOAWAY or
    /// REFUSED_STREAM): whatever its method, it may go again.
    pub never_processed: bool,
    /// Set by `bearer` on a second attempt it did not send: the token the upstream
    /// rejected is still good (or may not be replaced yet), so the first 401 stands.
    pub rejection_stood: bool,
}

impl Outcome {
    /// The record on `resp`, created empty if no layer wrote one yet.
    pub fn of(resp: &mut ProxyResponse) -> &mut Outcome {
        resp.extensions_mut().get_or_insert_default::<Outcome>()
    }

    /// The record on `resp`, if any layer wrote one.
    pub fn read(resp: &ProxyResponse) -> Option<&Outcome> {
        resp.extensions().get::<Outcome>()
    }

    /// Whether the proxy made this answer itself (an upstream did not).
    pub fn made_by_proxy(resp: &ProxyResponse) -> bool {
        Outcome::read(resp).is_some_and(|o| o.error.is_some())
    }
}
