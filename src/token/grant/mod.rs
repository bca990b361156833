//! One OAuth 2.0 token grant: the request as the platform wants it, the answer parsed, and
//! every way it can fail told apart (the `check` command builds its diagnosis on these).

mod answer;
mod cxone;
mod error;

use std::time::Duration;

use base64::Engine as _;
use secrecy::{ExposeSecret, SecretString};

use crate::config::{AuthMethod, BasicEncoding, GrantConfig, GrantFlow};
use answer::{header_text, Answer};
pub use error::{error_chain, is_tls_error, GrantError};

/// Largest token-endpoint answer read; a real one is well under 8 KiB.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// A token just obtained.
pub struct Granted {
    pub access_token: SecretString,
    pub expires_in: Duration,
    /// CXone: the tenant's API host, as discovery found it.
    pub api_base: Option<http::Uri>,
}

/// Performs grants for one upstream's credentials.
pub struct Granter {
    http: reqwest::Client,
    config: GrantConfig,
    memory: tokio::sync::Mutex<Memory>,
    /// What [`Granter::redact`] removes; made once.
    secret_forms: Vec<String>,
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
/// credentials elsewhere), bounded time. Building fails only if the TLS backend cannot
/// initialise; that stops the start (or `check`), never a fall back to a default client
/// that would follow redirects.
pub fn side_call_client() -> Result<reqwest::Client, SideClientError> {
    reqwest::Client::builder()
        .use_rustls_tls()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .user_agent(concat!("tokengate/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| SideClientError(error_chain(&e)))
}

/// The client for token endpoints could not be built.
#[derive(Debug, Clone, thiserror::Error)]
#[error("cannot build the HTTPS client for token endpoints: {0}")]
pub struct SideClientError(String);

/// What a CXone granter learns and keeps between grants.
#[derive(Default)]
struct Memory {
    token_endpoint: Option<String>,
    refresh_token: Option<SecretString>,
    api_base: Option<http::Uri>,
}

/// Every form in which a grant request carries a secret of `config`, longest first: the
/// secret raw, form-encoded and as a JSON string, and the Basic credentials of both
/// encodings (base64 of `id:secret`, with and without padding). A token endpoint that
/// echoes the request (a debugging proxy, a misconfigured gateway) echoes one of these.
fn secret_forms(config: &GrantConfig) -> Vec<String> {
    let mut secrets = vec![config.client_secret.expose_secret().to_string()];
    if let GrantFlow::CxoneAccessKey {
        access_key_secret, ..
    } = &config.flow
    {
        secrets.push(access_key_secret.expose_secret().to_string());
    }
    let mut forms = Vec::new();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        forms.push(secret.clone());
        forms.push(form_urlencoded::byte_serialize(secret.as_bytes()).collect());
        forms.push(
            percent_encoding::utf8_percent_encode(secret, percent_encoding::NON_ALPHANUMERIC)
                .to_string(),
        );
        let json = serde_json::Value::String(secret.clone()).to_string();
        forms.push(json.trim_matches('"').to_string());
    }
    let secret = config.client_secret.expose_secret();
    if !secret.is_empty() {
        for encoding in [BasicEncoding::Raw, BasicEncoding::FormEncoded] {
            let header = basic_credentials(&config.client_id, secret, encoding);
            let encoded = header.trim_start_matches("Basic ").to_string();
            forms.push(encoded.trim_end_matches('=').to_string());
            forms.push(encoded);
        }
    }
    forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
    forms.dedup();
    forms
}

impl Granter {
    pub fn new(http: reqwest::Client, config: GrantConfig) -> Granter {
        Granter {
            http,
            secret_forms: secret_forms(&config),
            config,
            memory: tokio::sync::Mutex::new(Memory::default()),
        }
    }

    pub fn config(&self) -> &GrantConfig {
        &self.config
    }

    /// The token endpoint, as configured or as last discovered (for messages).
    pub async fn token_endpoint(&self) -> Option<String> {
        match &self.config.token_url {
            Some(u) => Some(u.clone()),
            None => self.memory.lock().await.token_endpoint.clone(),
        }
    }

    /// Obtain a token once (for CXone: discovering what is not yet known, and using a
    /// refresh token when the last grant gave one).
    pub async fn grant(&self) -> Result<Granted, GrantError> {
        match &self.config.flow {
            GrantFlow::ClientCredentials => {
                let url = self.config.token_url.as_deref().unwrap_or_default();
                let answer = self
                    .request(url, &[("grant_type", "client_credentials")])
                    .await?;
                Ok(Granted {
                    access_token: answer.access_token,
                    expires_in: answer.expires_in,
                    api_base: None,
                })
            }
            GrantFlow::CxoneAccessKey {
                issuer,
                access_key_id,
                access_key_secret,
                discover_api_host,
            } => {
                self.cxone(issuer, access_key_id, access_key_secret, *discover_api_host)
                    .await
            }
        }
    }

    /// POST one grant to `url`: `fields`, then the scope and extra parameters, with the
    /// client authenticated as configured.
    async fn request(&self, url: &str, fields: &[(&str, &str)]) -> Result<Answer, GrantError> {
        let c = &self.config;
        // The form is finished before anything is awaited: its serializer is not `Send`.
        let mut basic = None;
        let form = {
            let mut form = form_urlencoded::Serializer::new(String::new());
            for (k, v) in fields {
                form.append_pair(k, v);
            }
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
            .post(url)
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            );
        if let Some(value) = basic {
            req = req.header(http::header::AUTHORIZATION, value);
        }
        let (status, content_type, body) = self.exchange(req.body(form)).await?;
        self.parse_answer(status, &content_type, &body)
    }

    /// Send a side call; its status, content type and (bounded) body.
    async fn exchange(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<(u16, String, Vec<u8>), GrantError> {
        let resp = req.send().await.map_err(|e| self.transport_error(&e))?;
        let status = resp.status().as_u16();
        let content_type = header_text(resp.headers(), http::header::CONTENT_TYPE);
        let body = read_limited(resp)
            .await
            .map_err(|e| self.transport_error(&e))?;
        Ok((status, content_type, body))
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

    /// Remove every secret from a text that came from elsewhere, in case a server echoes
    /// the request: in every form the request carried it (see `secret_forms`), before
    /// the text is cut to length (a cut could leave a secret's first half).
    pub fn redact(&self, text: &str) -> String {
        let mut s: String = text.chars().filter(|c| !c.is_control()).collect();
        for form in &self.secret_forms {
            if s.contains(form.as_str()) {
                s = s.replace(form.as_str(), "[redacted]");
            }
        }
        s.chars().take(300).collect()
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
