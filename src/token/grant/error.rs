//! Every way a grant can fail, told apart (the `check` command builds its diagnosis on
//! these), and the helpers that read an error's causes.

/// Why a grant failed. Texts come from the endpoint's error codes and descriptions, never
/// from the request, and pass through [`Granter::redact`](super::Granter::redact) before they are kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// An OAuth error answer (`{"error": "invalid_client", ...}`).
    #[error("the token endpoint refused the grant: HTTP {status}, error \"{error}\"{}", describe(.description))]
    Refused {
        status: u16,
        error: String,
        description: Option<String>,
    },
    /// An answer that is not OAuth at all: an API gateway's JSON, an HTML page, a 404.
    #[error("the token endpoint's answer is not an OAuth token response: HTTP {status}, {what}")]
    NotOAuth {
        status: u16,
        /// The `code` of a Genesys API error body (`authentication.required`), if it was one.
        api_code: Option<String>,
        what: String,
    },
    #[error("could not reach the token endpoint: {0}")]
    Unreachable(String),
    #[error("TLS failed with the token endpoint: {0}")]
    Tls(String),
    #[error("the token endpoint did not answer in time")]
    Timeout,
    /// The egress proxy refused to open a tunnel (407, 403…); the token endpoint was
    /// never reached.
    #[error("{0}")]
    EgressRefused(String),
    /// The private_key_jwt assertion could not be made (the key file unreadable or not a
    /// key of the configured algorithm).
    #[error("cannot sign the client assertion: {0}")]
    Assertion(String),
}

impl GrantError {
    /// What a caller of the proxy is told: the failure's kind and the endpoint's error
    /// code, never the endpoint's own text (descriptions, messages, page contents), which
    /// operators see in the log, on the status page and from `tokengate check`.
    pub fn for_caller(&self) -> String {
        match self {
            GrantError::Refused { status, error, .. } => {
                format!("the token endpoint refused the grant: HTTP {status}, error \"{error}\"")
            }
            GrantError::NotOAuth { status, .. } => {
                format!(
                    "the token endpoint's answer is not an OAuth token response (HTTP {status})"
                )
            }
            GrantError::Unreachable(_) => "could not reach the token endpoint".into(),
            GrantError::Tls(_) => "TLS failed with the token endpoint".into(),
            GrantError::Timeout => "the token endpoint did not answer in time".into(),
            GrantError::EgressRefused(_) => {
                "the egress proxy refused the tunnel to the token endpoint".into()
            }
            GrantError::Assertion(_) => "the proxy cannot sign its client assertion".into(),
        }
    }

    /// The endpoint refused the client's credentials (RFC 6749 §5.2 `invalid_client`).
    pub fn is_invalid_client(&self) -> bool {
        matches!(self, GrantError::Refused { error, .. } if error == "invalid_client")
    }
}

fn describe(d: &Option<String>) -> String {
    match d {
        Some(d) => format!(" ({d})"),
        None => String::new(),
    }
}

impl GrantError {
    /// A failure that may pass by itself (outage, rate limit), as opposed to a refusal that
    /// needs a change of configuration.
    pub fn is_transient(&self) -> bool {
        match self {
            GrantError::Refused {
                status,
                description,
                ..
            } => {
                *status >= 500
                    || *status == 429
                    || description
                        .as_deref()
                        .is_some_and(|d| d.to_ascii_lowercase().contains("rate limit"))
            }
            GrantError::NotOAuth { status, .. } => *status >= 500 || *status == 429,
            GrantError::Unreachable(_)
            | GrantError::Tls(_)
            | GrantError::Timeout
            | GrantError::EgressRefused(_) => true,
            GrantError::Assertion(_) => false,
        }
    }

    /// A short label for metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            GrantError::Refused { .. } => "refused",
            GrantError::NotOAuth { .. } => "bad_response",
            GrantError::Unreachable(_) => "unreachable",
            GrantError::Tls(_) => "tls_error",
            GrantError::Timeout => "timeout",
            GrantError::EgressRefused(_) => "egress_proxy_refused",
            GrantError::Assertion(_) => "assertion_error",
        }
    }
}
