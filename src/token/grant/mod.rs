//! One OAuth 2.0 token grant: the request as the platform wants it, the answer parsed, and
//! every way it can fail told apart (the `check` command builds its diagnosis on these).

mod answer;
mod cxone;
mod error;
pub mod jwt;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use base64::Engine as _;
use secrecy::{ExposeSecret, SecretString};

use crate::config::{AuthMethod, BasicEncoding, GrantConfig, GrantFlow, Secret};
pub use crate::http::causes::{error_chain, is_tls_error};
use answer::{header_text, Answer};
pub use error::GrantError;

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
    /// What [`Granter::redact`] removes: every form of every secret this granter has sent.
    secret_forms: RwLock<Vec<String>>,
    /// The secrets as last read from their files (a file that cannot be read keeps the
    /// value before it).
    secrets: RwLock<[Option<SecretString>; 2]>,
    /// The last grant that succeeded used `client_secret_next`.
    using_next: AtomicBool,
}

impl std::fmt::Debug for Granter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Granter")
            .field("config", &self.config)
            .finish()
    }
}

/// What a granter learns and keeps between grants (discovered endpoints; CXone's refresh
/// token and API host).
#[derive(Default)]
struct Memory {
    token_endpoint: Option<String>,
    refresh_token: Option<SecretString>,
    api_base: Option<http::Uri>,
}

/// Every form in which a grant request carries `secret`: raw, form-encoded, percent-encoded
/// and as a JSON string, and the Basic credentials of both encodings (base64 of
/// `id:secret`, with and without padding). A token endpoint that echoes the request (a
/// debugging proxy, a misconfigured gateway) echoes one of these.
fn secret_forms(client_id: &str, secret: &str) -> Vec<String> {
    let mut forms = Vec::new();
    if secret.is_empty() {
        return forms;
    }
    forms.push(secret.to_string());
    forms.push(form_urlencoded::byte_serialize(secret.as_bytes()).collect());
    forms.push(
        percent_encoding::utf8_percent_encode(secret, percent_encoding::NON_ALPHANUMERIC)
            .to_string(),
    );
    let json = serde_json::Value::String(secret.to_string()).to_string();
    forms.push(json.trim_matches('"').to_string());
    for encoding in [BasicEncoding::Raw, BasicEncoding::FormEncoded] {
        let header = basic_credentials(client_id, secret, encoding);
        let encoded = header.trim_start_matches("Basic ").to_string();
        forms.push(encoded.trim_end_matches('=').to_string());
        forms.push(encoded);
    }
    forms
}

/// Which of an upstream's secrets a grant uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretInUse {
    Current,
    Next,
}

impl SecretInUse {
    pub fn name(self) -> &'static str {
        match self {
            SecretInUse::Current => "current",
            SecretInUse::Next => "next",
        }
    }
}

impl Granter {
    pub fn new(config: GrantConfig) -> Granter {
        let granter = Granter {
            http: config.http.clone(),
            secret_forms: RwLock::new(Vec::new()),
            secrets: RwLock::new([
                config.client_secret.as_ref().map(|s| s.value.clone()),
                config.client_secret_next.as_ref().map(|s| s.value.clone()),
            ]),
            using_next: AtomicBool::new(false),
            config,
            memory: tokio::sync::Mutex::new(Memory::default()),
        };
        let mut known: Vec<String> = [
            &granter.config.client_secret,
            &granter.config.client_secret_next,
        ]
        .into_iter()
        .flatten()
        .map(|s| s.value.expose_secret().to_string())
        .collect();
        if let GrantFlow::CxoneAccessKey {
            access_key_secret, ..
        } = &granter.config.flow
        {
            known.push(access_key_secret.expose_secret().to_string());
        }
        for secret in known {
            granter.remember_forms(&secret);
        }
        granter
    }

    /// Add a secret's forms to what [`Granter::redact`] removes (longest first).
    fn remember_forms(&self, secret: &str) {
        let mut forms = self
            .secret_forms
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        forms.extend(secret_forms(&self.config.client_id, secret));
        forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
        forms.dedup();
    }

    /// Secret `which` (0: `client_secret`, 1: `client_secret_next`) as it is now: its
    /// file read again, so a rotated file is used by the next grant without a reload.
    fn read_secret(&self, which: usize, secret: &Secret) -> SecretString {
        let mut secrets = self
            .secrets
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(path) = &secret.file {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    let text = text.trim_end_matches(['\r', '\n']);
                    let changed = secrets[which]
                        .as_ref()
                        .is_none_or(|old| old.expose_secret() != text);
                    if !text.is_empty() && changed {
                        tracing::info!(file = %path.display(), "the secret file changed; the next grants use its new content");
                        secrets[which] = Some(SecretString::from(text.to_string()));
                        drop(secrets);
                        self.remember_forms(text);
                        return SecretString::from(text.to_string());
                    }
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot read the secret file; using its last content");
                }
            }
        }
        secrets[which]
            .clone()
            .unwrap_or_else(|| secret.value.clone())
    }

    /// Which secret the last successful grant used (`None`: the method sends none).
    pub fn secret_in_use(&self) -> Option<SecretInUse> {
        self.config.client_secret.as_ref()?;
        Some(if self.using_next.load(Ordering::Relaxed) {
            SecretInUse::Next
        } else {
            SecretInUse::Current
        })
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
                let url = self.oauth2_endpoint().await?;
                let answer = self
                    .request_with_secrets(&url, &[("grant_type", "client_credentials")])
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

    /// The OAuth2 token endpoint: `token_url`, or the one `issuer`'s metadata names
    /// (OpenID Connect discovery, then RFC 8414), found once and kept.
    async fn oauth2_endpoint(&self) -> Result<String, GrantError> {
        if let Some(u) = &self.config.token_url {
            return Ok(u.clone());
        }
        let mut memory = self.memory.lock().await;
        if let Some(u) = &memory.token_endpoint {
            return Ok(u.clone());
        }
        let issuer = self.config.issuer.as_deref().unwrap_or_default();
        let oidc = format!("{issuer}/.well-known/openid-configuration");
        // RFC 8414 §3.1: the well-known segment goes between the host and the issuer's path.
        let rfc8414 = match issuer
            .split_once("://")
            .map(|(s, rest)| (s, rest.split_once('/')))
        {
            Some((scheme, Some((host, path)))) => {
                format!("{scheme}://{host}/.well-known/oauth-authorization-server/{path}")
            }
            _ => format!("{issuer}/.well-known/oauth-authorization-server"),
        };
        let doc = match self.discovery(&oidc).await {
            Ok(doc) => doc,
            Err(first) => self.discovery(&rfc8414).await.map_err(|_| first)?,
        };
        let endpoint = self.url_field(&doc, "token_endpoint", "the issuer's metadata")?;
        memory.token_endpoint = Some(endpoint.clone());
        Ok(endpoint)
    }

    /// [`Granter::request`] with the secret in use; when the endpoint refuses it with
    /// `invalid_client` and a `client_secret_next` is set, the other one is tried (a
    /// rotation in progress), and the one that worked is used from then on.
    async fn request_with_secrets(
        &self,
        url: &str,
        fields: &[(&str, &str)],
    ) -> Result<Answer, GrantError> {
        let c = &self.config;
        let (Some(current), Some(next)) = (&c.client_secret, &c.client_secret_next) else {
            let secret = c.client_secret.as_ref().map(|s| self.read_secret(0, s));
            return self.request(url, fields, secret.as_ref()).await;
        };
        let first_next = self.using_next.load(Ordering::Relaxed);
        let order = if first_next {
            [(1, next), (0, current)]
        } else {
            [(0, current), (1, next)]
        };
        let mut last = None;
        for (which, secret) in order {
            let value = self.read_secret(which, secret);
            match self.request(url, fields, Some(&value)).await {
                Ok(answer) => {
                    if (which == 1) != first_next {
                        tracing::warn!(
                            secret = if which == 1 { "client_secret_next" } else { "client_secret" },
                            "the token endpoint refused the other secret with invalid_client; using this one from now on"
                        );
                    }
                    self.using_next.store(which == 1, Ordering::Relaxed);
                    return Ok(answer);
                }
                Err(e @ GrantError::Refused { .. }) if e.is_invalid_client() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or(GrantError::Timeout))
    }

    /// POST one grant to `url`: `fields`, then the scope and extra parameters, with the
    /// client authenticated as configured (`secret` for the methods that send one).
    async fn request(
        &self,
        url: &str,
        fields: &[(&str, &str)],
        secret: Option<&SecretString>,
    ) -> Result<Answer, GrantError> {
        let c = &self.config;
        // A signed assertion is made before the form (its signing is not async).
        let assertion = match (&c.auth_method, &c.signing) {
            (AuthMethod::PrivateKeyJwt, Some(signing)) => Some(
                jwt::assertion(signing, &c.client_id, url)
                    .map_err(|why| GrantError::Assertion(self.redact(&why)))?,
            ),
            _ => None,
        };
        let secret = secret.map(|s| s.expose_secret()).unwrap_or_default();
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
                        secret,
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
                    form.append_pair("client_secret", secret);
                }
                // RFC 7523 §2.2.
                AuthMethod::PrivateKeyJwt => {
                    form.append_pair("client_id", &c.client_id);
                    form.append_pair(
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    );
                    form.append_pair("client_assertion", assertion.as_deref().unwrap_or_default());
                }
                // RFC 8705 §2: the certificate (on the TLS connection) proves the client;
                // the form names it.
                AuthMethod::TlsClientAuth | AuthMethod::SelfSignedTlsClientAuth => {
                    form.append_pair("client_id", &c.client_id);
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
        answer::parse(status, &content_type, &body, |s| self.redact(s))
    }

    /// Send a side call; its status, content type and (bounded) body.
    async fn exchange(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<(u16, String, Vec<u8>), GrantError> {
        let resp = req.send().await.map_err(|e| self.transport_error(&e))?;
        let status = resp.status().as_u16();
        let content_type = header_text(resp.headers(), http::header::CONTENT_TYPE);
        let forwarded = self.forwarded_by_proxy(resp.url());
        let body = read_limited(resp).await;
        // A plain-http URL goes to the egress proxy as a request it forwards (no tunnel):
        // its refusal is an answer, 407 (or 401, as tinyproxy says it) without an OAuth
        // body, often cut off. It names the proxy, not a strange token endpoint.
        if let Some(proxy) = forwarded {
            let oauth = body.as_ref().is_ok_and(|b| {
                serde_json::from_slice::<serde_json::Value>(b)
                    .is_ok_and(|j| j.get("error").is_some())
            });
            if status == 407 || (status == 401 && !oauth) {
                return Err(GrantError::EgressRefused(format!(
                    "the egress proxy {proxy} {}; the token endpoint was never reached",
                    crate::outbound::egress::refusal_reason(status)
                        .replace("the tunnel", "the request")
                )));
            }
        }
        let body = body.map_err(|e| self.transport_error(&e))?;
        Ok((status, content_type, body))
    }

    /// The egress proxy (as it may be shown) that forwarded a request to the plain-http
    /// `url` itself; `None` for https (a tunnel) or a direct request.
    fn forwarded_by_proxy(&self, url: &reqwest::Url) -> Option<String> {
        if url.scheme() != "http" {
            return None;
        }
        let routes = self.config.egress.proxy.as_ref()?;
        let uri: http::Uri = url.as_str().parse().ok()?;
        routes
            .applies_to(&uri)
            .then(|| routes.shown(false))
            .flatten()
    }

    fn transport_error(&self, e: &reqwest::Error) -> GrantError {
        if e.is_timeout() {
            return GrantError::Timeout;
        }
        let chain = error_chain(e);
        if let Some((what, true)) = crate::outbound::egress::refusal(&chain) {
            let proxy = self
                .config
                .egress
                .proxy
                .as_ref()
                .and_then(|p| p.shown(e.url().is_none_or(|u| u.scheme() == "https")))
                .unwrap_or_default();
            return GrantError::EgressRefused(format!("the egress proxy {proxy} {what}"));
        }
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
        let forms = self
            .secret_forms
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for form in forms.iter() {
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
mod tests;
