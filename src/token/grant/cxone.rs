//! NICE CXone's flow: discovery from the issuer, the password grant with a user's access
//! key (then its refresh token), and the tenant's API host from the `id_token`.

use secrecy::{ExposeSecret, SecretString};

use base64::Engine as _;

use super::answer::answer_kind;
use super::error::GrantError;
use super::{Granted, Granter};

impl Granter {
    pub(super) async fn cxone(
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
            match self.request_with_secrets(&endpoint, &fields).await {
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
                match self.request_with_secrets(&endpoint, &fields).await {
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
    pub(super) async fn api_host(&self, id_token: Option<&str>) -> Result<http::Uri, GrantError> {
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
    pub(super) async fn discovery(&self, url: &str) -> Result<serde_json::Value, GrantError> {
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

    pub(super) fn url_field(
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
}
