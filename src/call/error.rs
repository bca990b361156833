//! The errors the proxy itself answers with, in one place.
//!
//! Every layer that refuses a request returns a [`ProxyError`]; [`ProxyError::into_response`]
//! is the only place that turns one into the contract's status and JSON body
//! `{"error": "<code>", "message": "<text>"}`. Messages never contain a secret, a token or
//! a client key: they are built from the proxy's own words and the upstream's error codes.

use std::time::Duration;

use http::{header, HeaderValue, Response, StatusCode};

use crate::http::body::{BodyLimitExceeded, BodyTimedOut, ProxyBody};
pub use crate::http::codes::ErrorCode;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ProxyError {
    #[error("a valid client key is required: send it as `Authorization: Bearer <key>` or `X-Api-Key: <key>`")]
    Unauthorized,
    #[error("{0}")]
    Forbidden(String),
    #[error("no upstream is configured for this path")]
    NoRoute,
    #[error("the request is not one the proxy forwards: {0}")]
    BadRequest(&'static str),
    #[error("the request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    /// A body on a method that carries none (GET, HEAD, DELETE, OPTIONS, TRACE), too large
    /// to keep for a retry, from a client with allow rules: it would hold a connection to
    /// the API for as long as its upload took.
    #[error("a {method} request's body may be at most {limit} bytes (retry_body_bytes)")]
    UnexpectedBody { method: http::Method, limit: u64 },
    #[error("{0}")]
    BodyTimeout(BodyTimedOut),
    #[error("{message}")]
    TokenGrantFailed {
        grant_error: Option<String>,
        message: String,
    },
    #[error("{message}")]
    TokenUnavailable {
        retry_after: Option<Duration>,
        message: String,
    },
    #[error("could not reach the upstream: {0}")]
    UpstreamUnreachable(String),
    #[error("the upstream did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    /// Every connection the upstream may have was in use for the whole queue time: the
    /// proxy is busy, which says nothing about the API's health.
    #[error("every connection to upstream \"{upstream}\" (max_connections) was busy for {waited:?}; try again shortly")]
    UpstreamBusy {
        upstream: std::sync::Arc<str>,
        waited: Duration,
    },
    /// The rate governor could not fit the call in the token's budget in time (or the
    /// client is past its `max_per_minute`); the platform's budget was not spent.
    #[error("{message}")]
    RateLimited {
        retry_after: Duration,
        message: String,
    },
    /// The client holds `max_websockets` sockets already.
    #[error("this client has {0} WebSockets open, its limit (max_websockets); close one first")]
    TooManyWebsockets(usize),
    /// The client holds its share of the upstream's notification channels (or the
    /// upstream's channels are all held and none of the client's can give way): a new
    /// one would make the platform evict another app's channel.
    #[error("{0}")]
    TooManyChannels(String),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Unauthorized => StatusCode::UNAUTHORIZED,
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::BodyTooLarge { .. } | ProxyError::UnexpectedBody { .. } => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ProxyError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::TokenGrantFailed { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamUnreachable(_) => StatusCode::BAD_GATEWAY,
            ProxyError::TokenUnavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpstreamBusy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::TooManyWebsockets(_) | ProxyError::TooManyChannels(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            ProxyError::Unauthorized => ErrorCode::Unauthorized,
            ProxyError::Forbidden(_) => ErrorCode::Forbidden,
            ProxyError::NoRoute => ErrorCode::NoRoute,
            ProxyError::BadRequest(_) => ErrorCode::BadRequest,
            ProxyError::BodyTooLarge { .. } | ProxyError::UnexpectedBody { .. } => {
                ErrorCode::BodyTooLarge
            }
            ProxyError::BodyTimeout(_) => ErrorCode::BodyTimeout,
            ProxyError::TokenGrantFailed { .. } => ErrorCode::TokenGrantFailed,
            ProxyError::UpstreamUnreachable(_) => ErrorCode::UpstreamUnreachable,
            ProxyError::TokenUnavailable { .. } => ErrorCode::TokenUnavailable,
            ProxyError::UpstreamTimeout(_) => ErrorCode::UpstreamTimeout,
            ProxyError::UpstreamBusy { .. } => ErrorCode::UpstreamBusy,
            ProxyError::TooManyWebsockets(_) => ErrorCode::TooManyWebsockets,
            ProxyError::TooManyChannels(_) => ErrorCode::TooManyChannels,
            ProxyError::RateLimited { .. } => ErrorCode::RateLimited,
        }
    }

    pub fn into_response(self) -> Response<ProxyBody> {
        let mut body = serde_json::json!({
            "error": self.code().as_str(),
            "message": self.to_string(),
        });
        if let ProxyError::TokenGrantFailed {
            grant_error: Some(code),
            ..
        } = &self
        {
            body["grant_error"] = serde_json::Value::String(code.clone());
        }
        let mut resp = crate::http::answers::json(self.status(), &body);
        let headers = resp.headers_mut();
        match &self {
            ProxyError::Unauthorized => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"tokengate\""),
                );
            }
            // The rest of the body is never read: the connection cannot carry another
            // request, and the client must not try.
            ProxyError::BodyTooLarge { .. }
            | ProxyError::UnexpectedBody { .. }
            | ProxyError::BodyTimeout(_) => {
                headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            ProxyError::TokenUnavailable {
                retry_after: Some(after),
                ..
            } => {
                let secs = after.as_secs().max(1);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
            }
            ProxyError::UpstreamBusy { .. } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            ProxyError::RateLimited { retry_after, .. } => {
                // Whole seconds, rounded up: a caller that waits this long finds room.
                let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                headers.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
            }
            _ => {}
        }
        // So logs and metrics can tell the proxy's answer from an upstream's.
        crate::call::outcome::Outcome::of(&mut resp).error = Some(self.code());
        resp
    }
}

/// The proxy's answer to an error that came out of a request body: 413 if it crossed the
/// limit anywhere in its causes, 408 if it came too slowly, else `otherwise`.
pub fn body_error_or(e: &(dyn std::error::Error + 'static), otherwise: ProxyError) -> ProxyError {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(BodyLimitExceeded(limit)) = err.downcast_ref::<BodyLimitExceeded>() {
            return ProxyError::BodyTooLarge { limit: *limit };
        }
        if let Some(slow) = err.downcast_ref::<BodyTimedOut>() {
            return ProxyError::BodyTimeout(*slow);
        }
        cur = err.source();
    }
    otherwise
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The contract's error table, row by row.
    #[test]
    fn statuses_and_codes_follow_the_contract() {
        let rows: Vec<(ProxyError, u16, &str)> = vec![
            (ProxyError::Unauthorized, 401, "unauthorized"),
            (ProxyError::Forbidden("x".into()), 403, "forbidden"),
            (ProxyError::NoRoute, 404, "no_route"),
            (ProxyError::BodyTooLarge { limit: 1 }, 413, "body_too_large"),
            (
                ProxyError::UnexpectedBody {
                    method: http::Method::GET,
                    limit: 1,
                },
                413,
                "body_too_large",
            ),
            (
                ProxyError::BodyTimeout(BodyTimedOut::Idle(Duration::from_secs(1))),
                408,
                "body_timeout",
            ),
            (
                ProxyError::TokenGrantFailed {
                    grant_error: Some("invalid_client".into()),
                    message: "m".into(),
                },
                502,
                "token_grant_failed",
            ),
            (
                ProxyError::UpstreamUnreachable("x".into()),
                502,
                "upstream_unreachable",
            ),
            (
                ProxyError::TokenUnavailable {
                    retry_after: None,
                    message: "m".into(),
                },
                503,
                "token_unavailable",
            ),
            (
                ProxyError::UpstreamTimeout(Duration::from_secs(1)),
                504,
                "upstream_timeout",
            ),
            (
                ProxyError::UpstreamBusy {
                    upstream: "u".into(),
                    waited: Duration::from_secs(1),
                },
                503,
                "upstream_busy",
            ),
            (
                ProxyError::TooManyWebsockets(100),
                429,
                "too_many_websockets",
            ),
            (
                ProxyError::RateLimited {
                    retry_after: Duration::from_millis(2500),
                    message: "m".into(),
                },
                429,
                "rate_limited",
            ),
        ];
        for (err, status, code) in rows {
            let resp = err.into_response();
            assert_eq!(resp.status().as_u16(), status);
            let outcome = crate::call::outcome::Outcome::read(&resp).and_then(|o| o.error);
            assert_eq!(outcome.map(ErrorCode::as_str), Some(code));
        }
    }
}
