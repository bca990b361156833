//! One OAuth 2.0 token grant: the request as the platform wants it, the answer parsed, and
//! every way it can fail told apart (the `check` command builds its diagnosis on these).

use std::time::Duration;

use base64::Engine as _;
use secrecy::{ExposeSecret, SecretString};

use crate::config::{AuthMethod, BasicEncoding, GrantConfig};

/// Largest token-endpoint answer read; a real one is well under 8 KiB.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// A token just obtained.
pub struct Granted {
    pub access_token: SecretString,
    pub expires_in: Duration,
}

/// Why a grant failed. Texts come from the endpoint's error codes and descriptions, never
/// from the request, and pass through [`Granter::redact`] before they are kept.
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
            GrantError::Unreachable(_) | GrantError::Tls(_) | GrantError::Timeout => true,
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
        }
    }
}

/// Performs grants for one upstream's credentials.
pub struct Granter {
    http: reqwest::Client,
    config: GrantConfig,
}

impl std::fmt::Debug for Granter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Granter")
            .field("config", &self.config)
            .finish()
    }
}

/// The HTTP client for side calls (token endpoints): rustls, no redirects (a redirect from
/// a token endpoint is a misconfiguration to report, and following it could carry the
/// credentials elsewhere), bounded time.
pub fn side_call_client() -> reqwest::Client {
    reqwest::Client::builder()
        .use_rustls_tls()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .user_agent(concat!("tokengate/", env!("CARGO_PKG_VERSION")))
        .build()
        // Building fails only if the TLS backend cannot initialise, before any request.
        .unwrap_or_else(|_| reqwest::Client::new())
}

impl Granter {
    pub fn new(http: reqwest::Client, config: GrantConfig) -> Granter {
        Granter { http, config }
    }

    pub fn config(&self) -> &GrantConfig {
        &self.config
    }

    /// Ask the token endpoint for a token once.
    pub async fn grant(&self) -> Result<Granted, GrantError> {
        let c = &self.config;
        // The form is finished before anything is awaited: its serializer is not `Send`.
        let mut basic = None;
        let form = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            form.append_pair("grant_type", "client_credentials");
            if let Some(scope) = &c.scope {
                form.append_pair("scope", scope);
            }
            for (k, v) in &c.params {
                form.append_pair(k, v);
            }
            match c.auth_method {
                AuthMethod::Basic => {
                    let mut value = http::HeaderValue::try_from(basic_credentials(
                        &c.client_id,
                        c.client_secret.expose_secret(),
                        c.basic_encoding,
                    ))
                    .map_err(|_| {
                        GrantError::Unreachable("the client id cannot be sent in a header".into())
                    })?;
                    value.set_sensitive(true);
                    basic = Some(value);
                }
                AuthMethod::Post => {
                    form.append_pair("client_id", &c.client_id);
                    form.append_pair("client_secret", c.client_secret.expose_secret());
                }
            }
            form.finish()
        };
        let mut req = self
            .http
            .post(&c.token_url)
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            );
        if let Some(value) = basic {
            req = req.header(http::header::AUTHORIZATION, value);
        }
        let resp = req
            .body(form)
            .send()
            .await
            .map_err(|e| self.transport_error(&e))?;
        let status = resp.status().as_u16();
        let content_type = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        let body = read_limited(resp)
            .await
            .map_err(|e| self.transport_error(&e))?;
        self.parse_answer(status, &content_type, &body)
    }

    fn parse_answer(
        &self,
        status: u16,
        content_type: &str,
        body: &[u8],
    ) -> Result<Granted, GrantError> {
        let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let field = |name: &str| {
            json.as_ref()
                .and_then(|j| j.get(name))
                .and_then(|v| v.as_str())
                .map(|s| self.redact(s))
        };
        if !(200..300).contains(&status) {
            if let Some(error) = field("error") {
                return Err(GrantError::Refused {
                    status,
                    error,
                    description: field("error_description").or_else(|| field("description")),
                });
            }
            return Err(GrantError::NotOAuth {
                status,
                api_code: field("code"),
                what: match (&json, field("message")) {
                    (Some(_), Some(m)) => format!("a JSON error: {m}"),
                    (Some(_), None) => "a JSON body without an OAuth \"error\"".into(),
                    (None, _) => answer_kind(content_type, body),
                },
            });
        }
        let Some(json) = json else {
            return Err(GrantError::NotOAuth {
                status,
                api_code: None,
                what: answer_kind(content_type, body),
            });
        };
        let token = json
            .get("access_token")
            .and_then(|v| v.as_str())
            .filter(|t| {
                !t.is_empty() && http::HeaderValue::from_str(&format!("Bearer {t}")).is_ok()
            });
        let Some(token) = token else {
            return Err(GrantError::NotOAuth {
                status,
                api_code: None,
                what: "a JSON body without a usable \"access_token\"".into(),
            });
        };
        if let Some(tt) = json.get("token_type").and_then(|v| v.as_str()) {
            if !tt.eq_ignore_ascii_case("bearer") {
                return Err(GrantError::NotOAuth {
                    status,
                    api_code: None,
                    what: format!("a token of type \"{}\", not bearer", self.redact(tt)),
                });
            }
        }
        // RFC 6749 recommends expires_in; some servers send it as a string.
        let expires_in = match json.get("expires_in") {
            Some(serde_json::Value::Number(n)) => n.as_f64(),
            Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
            _ => Some(3600.0),
        }
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(|s| Duration::from_secs_f64(s.min(31_536_000.0)));
        let Some(expires_in) = expires_in else {
            return Err(GrantError::NotOAuth {
                status,
                api_code: None,
                what: "an \"expires_in\" that is not a positive number".into(),
            });
        };
        Ok(Granted {
            access_token: SecretString::from(token.to_string()),
            expires_in,
        })
    }

    fn transport_error(&self, e: &reqwest::Error) -> GrantError {
        if e.is_timeout() {
            return GrantError::Timeout;
        }
        let chain = error_chain(e);
        if is_tls_error(e) {
            GrantError::Tls(self.redact(&chain))
        } else {
            GrantError::Unreachable(self.redact(&chain))
        }
    }

    /// Remove the secret from a text that came from elsewhere, in case a server echoes it.
    pub fn redact(&self, text: &str) -> String {
        let secret = self.config.client_secret.expose_secret();
        let mut s: String = text.chars().filter(|c| !c.is_control()).take(300).collect();
        if !secret.is_empty() && s.contains(secret) {
            s = s.replace(secret, "[redacted]");
        }
        s
    }
}

/// `Authorization: Basic` for a client id and secret. Genesys' SDKs encode the raw
/// `id:secret`; RFC 6749 §2.3.1 form-encodes each first. They differ only for secrets with
/// characters other than letters, digits, `-`, `_`, `.` (and `*`).
pub fn basic_credentials(id: &str, secret: &str, encoding: BasicEncoding) -> String {
    let pair = match encoding {
        BasicEncoding::Raw => format!("{id}:{secret}"),
        BasicEncoding::FormEncoded => format!(
            "{}:{}",
            form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>(),
            form_urlencoded::byte_serialize(secret.as_bytes()).collect::<String>()
        ),
    };
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    )
}

async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        let room = MAX_ANSWER_BYTES.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if body.len() >= MAX_ANSWER_BYTES {
            break;
        }
    }
    Ok(body)
}

fn answer_kind(content_type: &str, body: &[u8]) -> String {
    let head = String::from_utf8_lossy(&body[..body.len().min(200)]).to_ascii_lowercase();
    if content_type.contains("html") || head.trim_start().starts_with('<') {
        "an HTML page (a login page or a proxy's error page?)".into()
    } else if body.is_empty() {
        "an empty body".into()
    } else {
        format!("a body of type \"{content_type}\" that is not JSON")
    }
}

/// The error and its causes in one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// Did TLS (a certificate, a handshake) fail somewhere in this error's causes?
pub fn is_tls_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<rustls::Error>() {
            return true;
        }
        // An `io::Error`'s `source()` skips the error it wraps; descend into that instead
        // (rustls' errors arrive as io::Error inside io::Error).
        cur = match err.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_encodings_differ_only_for_special_characters() {
        let raw = basic_credentials("id", "a-b_c.d", BasicEncoding::Raw);
        assert_eq!(
            raw,
            basic_credentials("id", "a-b_c.d", BasicEncoding::FormEncoded)
        );
        assert_eq!(
            raw,
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode("id:a-b_c.d")
            )
        );
        assert_ne!(
            basic_credentials("id", "a+b/c=", BasicEncoding::Raw),
            basic_credentials("id", "a+b/c=", BasicEncoding::FormEncoded)
        );
    }
}
