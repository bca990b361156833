//! The proxy's error codes.

/// Every error code the proxy answers with (the `error` of its JSON answers, the
/// `proxy_error` of the status board, the audit line's `error`), in one list: no code is
/// compared as a string anywhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    Unauthorized,
    Forbidden,
    NoRoute,
    BadRequest,
    BodyTooLarge,
    BodyTimeout,
    TokenGrantFailed,
    UpstreamUnreachable,
    TokenUnavailable,
    UpstreamTimeout,
    UpstreamBusy,
    TooManyWebsockets,
    TooManyChannels,
    RateLimited,
    /// A cross-site preflight refused in anonymous mode (`client_auth`).
    PreflightRefused,
    /// The proxy's own token endpoint (OAuth's codes, RFC 6749 §5.2 and RFC 8628 §3.5).
    InvalidClient,
    InvalidRequest,
    UnsupportedGrantType,
    TemporarilyUnavailable,
    SlowDown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NoRoute => "no_route",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::BodyTimeout => "body_timeout",
            ErrorCode::TokenGrantFailed => "token_grant_failed",
            ErrorCode::UpstreamUnreachable => "upstream_unreachable",
            ErrorCode::TokenUnavailable => "token_unavailable",
            ErrorCode::UpstreamTimeout => "upstream_timeout",
            ErrorCode::UpstreamBusy => "upstream_busy",
            ErrorCode::TooManyWebsockets => "too_many_websockets",
            ErrorCode::TooManyChannels => "too_many_channels",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::PreflightRefused => "preflight_refused",
            ErrorCode::InvalidClient => "invalid_client",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnsupportedGrantType => "unsupported_grant_type",
            ErrorCode::TemporarilyUnavailable => "temporarily_unavailable",
            ErrorCode::SlowDown => "slow_down",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
