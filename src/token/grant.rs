//! One OAuth 2.0 token grant: the request as the platform wants it, the answer parsed, and
//! every way it can fail told apart (the `check` command builds its diagnosis on these).

use std::time::Duration;

use base64::Engine as _;
use secrecy::{ExposeSecret, SecretString};

use crate::config::{AuthMethod, BasicEncoding, GrantConfig, GrantFlow};

/// Largest token-endpoint answer read; a real one is well under 8 KiB.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// A token just obtained.
pub struct Granted {
    pub access_token: SecretString,
    pub expires_in: Duration,
    /// CXone: the tenant's API host, as discovery found it.
    pub api_base: Option<http::Uri>,
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
        }
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

/// What a token endpoint answered, parsed.
struct Answer {
    access_token: SecretString,
    expires_in: Duration,
    refresh_token: Option<SecretString>,
    id_token: Option<String>,
}

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

    async fn cxone(
        &self,
        issuer: &str,
        access_key_id: &str,
        access_key_secret: &SecretString,
        discover_api_host: bool,
    ) -> Result<Granted, GrantError> {
        let mut memory = self.memory.lock().await;
        let endpoint = match (&self.config.token_url, &memory.token_endpoint) {
            (Some(u), _) | (None, Some(u)) => u.clone(),
            (None, None) => {
                let doc = self
                    .discovery(&format!("{issuer}/.well-known/openid-configuration"))
                    .await?;
                let endpoint =
                    self.url_field(&doc, "token_endpoint", "the OpenID configuration")?;
                memory.token_endpoint = Some(endpoint.clone());
                endpoint
            }
        };
        // A refresh token spares the access key; if it is refused, the access key it is.
        let mut refreshed = None;
        if let Some(rt) = memory.refresh_token.take() {
            let fields = [
                ("grant_type", "refresh_token"),
                ("refresh_token", rt.expose_secret()),
            ];
            match self.request(&endpoint, &fields).await {
                Ok(answer) => refreshed = Some(answer),
                Err(GrantError::Refused { .. }) => {}
                Err(e) => {
                    memory.refresh_token = Some(rt);
                    return Err(e);
                }
            }
        }
        let was_refresh = refreshed.is_some();
        let answer = match refreshed {
            Some(a) => a,
            None => {
                let fields = [
                    ("grant_type", "password"),
                    ("username", access_key_id),
                    ("password", access_key_secret.expose_secret()),
                ];
                match self.request(&endpoint, &fields).await {
                    Ok(a) => a,
                    Err(e) => {
                        // A discovered endpoint that fails may have moved: look again next time.
                        if self.config.token_url.is_none()
                            && !matches!(e, GrantError::Refused { .. })
                        {
                            memory.token_endpoint = None;
                        }
                        return Err(e);
                    }
                }
            }
        };
        memory.refresh_token = answer.refresh_token;
        if discover_api_host && (!was_refresh || memory.api_base.is_none()) {
            match self.api_host(answer.id_token.as_deref()).await {
                Ok(base) => memory.api_base = Some(base),
                // Keep serving with the host found before; without one there is nothing to call.
                Err(e) if memory.api_base.is_some() => {
                    tracing::warn!(error = %e, "CXone API host discovery failed; keeping the last one")
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Granted {
            access_token: answer.access_token,
            expires_in: answer.expires_in,
            api_base: memory.api_base.clone(),
        })
    }

    /// The tenant's API host: the `id_token` names the issuer and tenant, and the issuer's
    /// `cxone-configuration` names the host.
    async fn api_host(&self, id_token: Option<&str>) -> Result<http::Uri, GrantError> {
        let bad = |what: &str| GrantError::NotOAuth {
            status: 200,
            api_code: None,
            what: what.to_string(),
        };
        let claims = id_token
            .and_then(|t| t.split('.').nth(1))
            .and_then(|p| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(p.trim_end_matches('=')).ok())
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .ok_or_else(|| bad("a token answer without a readable id_token (needed to find the CXone API host; or set base_url)"))?;
        let iss = claims.get("iss").and_then(|v| v.as_str());
        let tenant = claims.get("tenantId").and_then(|v| v.as_str());
        let (Some(iss), Some(tenant)) = (iss, tenant) else {
            return Err(bad("an id_token without iss and tenantId (needed to find the CXone API host; or set base_url)"));
        };
        let mut url = reqwest::Url::parse(&format!(
            "{}/.well-known/cxone-configuration",
            iss.trim_end_matches('/')
        ))
        .map_err(|_| bad("an id_token whose iss is not a URL"))?;
        url.query_pairs_mut().append_pair("tenantId", tenant);
        let doc = self.discovery(url.as_str()).await?;
        let api = self.url_field(&doc, "api_endpoint", "the CXone configuration")?;
        api.trim_end_matches('/')
            .parse::<http::Uri>()
            .map_err(|_| bad("an api_endpoint that is not a URL"))
    }

    /// GET a discovery document.
    async fn discovery(&self, url: &str) -> Result<serde_json::Value, GrantError> {
        let req = self
            .http
            .get(url)
            .header(http::header::ACCEPT, "application/json");
        let (status, content_type, body) = self.exchange(req).await?;
        match serde_json::from_slice(&body) {
            Ok(doc) if (200..300).contains(&status) => Ok(doc),
            _ => Err(GrantError::NotOAuth {
                status,
                api_code: None,
                what: format!(
                    "the discovery document at {url} is {}",
                    if (200..300).contains(&status) {
                        answer_kind(&content_type, &body)
                    } else {
                        format!("missing (HTTP {status})")
                    }
                ),
            }),
        }
    }

    fn url_field(
        &self,
        doc: &serde_json::Value,
        field: &str,
        what: &str,
    ) -> Result<String, GrantError> {
        doc.get(field)
            .and_then(|v| v.as_str())
            .filter(|u| u.starts_with("https://") || u.starts_with("http://"))
            .map(str::to_string)
            .ok_or_else(|| GrantError::NotOAuth {
                status: 200,
                api_code: None,
                what: format!("{what} without a \"{field}\" URL"),
            })
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

    fn parse_answer(
        &self,
        status: u16,
        content_type: &str,
        body: &[u8],
    ) -> Result<Answer, GrantError> {
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
                    (None, _) => self.redact(&answer_kind(content_type, body)),
                },
            });
        }
        let Some(json) = json else {
            return Err(GrantError::NotOAuth {
                status,
                api_code: None,
                what: self.redact(&answer_kind(content_type, body)),
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
        let text = |name: &str| {
            json.get(name)
                .and_then(|v| v.as_str())
                .filter(|t| !t.is_empty())
        };
        Ok(Answer {
            access_token: SecretString::from(token.to_string()),
            expires_in,
            refresh_token: text("refresh_token").map(|t| SecretString::from(t.to_string())),
            id_token: text("id_token").map(str::to_string),
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

    /// Remove every secret from a text that came from elsewhere, in case a server echoes
    /// the request: in every form the request carried it (see [`secret_forms`]), before
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

fn header_text(headers: &http::HeaderMap, name: http::header::HeaderName) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
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
