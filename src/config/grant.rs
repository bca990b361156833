//! How an upstream's tokens are obtained: the grant, the credentials, how they are sent.

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::raw::RawUpstream;
use super::{ConfigError, Cx};
use crate::providers::{self, Provider};

/// Everything that shapes a token grant.
#[derive(Clone)]
pub struct GrantConfig {
    /// `None`: found by discovery (CXone).
    pub token_url: Option<String>,
    pub flow: GrantFlow,
    pub client_id: String,
    pub client_secret: SecretString,
    pub auth_method: AuthMethod,
    /// `client_secret_basic` encoding: Genesys' SDKs base64 the raw `id:secret`; RFC 6749
    /// §2.3.1 form-encodes both first.
    pub basic_encoding: BasicEncoding,
    pub scope: Option<String>,
    pub params: Vec<(String, String)>,
}

/// Which grant obtains the token.
#[derive(Clone)]
pub enum GrantFlow {
    /// RFC 6749 §4.4, as Genesys Cloud and most OAuth servers do it.
    ClientCredentials,
    /// NICE CXone back-end apps: the password grant with a user's access key, the token
    /// endpoint found from the issuer's discovery document.
    CxoneAccessKey {
        issuer: String,
        access_key_id: String,
        access_key_secret: SecretString,
        /// Find the tenant's API host (no `base_url` was given).
        discover_api_host: bool,
    },
}

impl std::fmt::Debug for GrantFlow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GrantFlow::ClientCredentials => f.write_str("ClientCredentials"),
            GrantFlow::CxoneAccessKey {
                issuer,
                access_key_id,
                ..
            } => f
                .debug_struct("CxoneAccessKey")
                .field("issuer", issuer)
                .field("access_key_id", access_key_id)
                .field("access_key_secret", &"[redacted]")
                .finish(),
        }
    }
}

impl std::fmt::Debug for GrantConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrantConfig")
            .field("token_url", &self.token_url)
            .field("flow", &self.flow)
            .field("client_id", &self.client_id)
            .field("client_secret", &"[redacted]")
            .field("auth_method", &self.auth_method)
            .field("basic_encoding", &self.basic_encoding)
            .field("scope", &self.scope)
            .field("params", &self.params)
            .finish()
    }
}

impl GrantConfig {
    /// A fingerprint of everything that shapes a grant. Tokens are cached under it, so a
    /// changed secret, scope or parameter never gets a token minted for the old one. The
    /// secret enters only through a hash.
    pub fn cache_key(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        let (issuer, key_id, key_secret) = match &self.flow {
            GrantFlow::ClientCredentials => ("", "", ""),
            GrantFlow::CxoneAccessKey {
                issuer,
                access_key_id,
                access_key_secret,
                ..
            } => (
                issuer.as_str(),
                access_key_id.as_str(),
                access_key_secret.expose_secret(),
            ),
        };
        for part in [
            self.token_url.as_deref().unwrap_or(""),
            issuer,
            key_id,
            key_secret,
            self.client_id.as_str(),
            self.client_secret.expose_secret(),
            self.scope.as_deref().unwrap_or(""),
            match self.auth_method {
                AuthMethod::Basic => "basic",
                AuthMethod::Post => "post",
            },
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        for (k, v) in &self.params {
            h.update((k.len() as u64).to_le_bytes());
            h.update(k.as_bytes());
            h.update((v.len() as u64).to_le_bytes());
            h.update(v.as_bytes());
        }
        hex::encode(h.finalize())
    }
}

/// `auth_method`: how the client id and secret reach the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMethod {
    /// `client_secret_basic`: id and secret in an `Authorization: Basic` header.
    #[serde(alias = "client_secret_basic")]
    Basic,
    /// `client_secret_post`: id and secret as form fields.
    #[serde(alias = "client_secret_post")]
    Post,
}

/// `basic_encoding`: `raw` or `form`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BasicEncoding {
    Raw,
    #[serde(rename = "form")]
    FormEncoded,
}

impl Cx<'_> {
    /// The grant of upstream `raw`: its flow, credentials and how they are sent. CXone's
    /// flow finds the token endpoint by discovery (and the API host, when
    /// `discover_api_host`).
    pub(super) fn grant(
        &self,
        provider: Provider,
        raw: &mut RawUpstream,
        token_url: Option<String>,
        discover_api_host: bool,
    ) -> Result<GrantConfig, ConfigError> {
        let name = raw.name.clone();
        let key = |k: &str| format!("upstream \"{name}\".{k}");
        let flow = if provider == Provider::Cxone {
            let issuer = match raw.issuer.take() {
                Some(i) => self.interpolate(&key("issuer"), &i)?,
                None => providers::CXONE_ISSUER.to_string(),
            };
            let issuer = self.http_url(&key("issuer"), &issuer)?;
            let access_key_id = self.interpolate(
                &key("access_key_id"),
                raw.access_key_id.as_deref().ok_or_else(|| {
                    self.err(
                        &key("access_key_id"),
                        "is required for provider = \"cxone\" (the user's access key)",
                    )
                })?,
            )?;
            let access_key_secret = self.secret(
                &key("access_key_secret"),
                raw.access_key_secret.take(),
                raw.access_key_secret_file.take(),
            )?;
            GrantFlow::CxoneAccessKey {
                issuer: issuer.to_string().trim_end_matches('/').to_string(),
                access_key_id,
                access_key_secret,
                discover_api_host,
            }
        } else {
            GrantFlow::ClientCredentials
        };

        let client_id = self.interpolate(
            &key("client_id"),
            raw.client_id
                .as_deref()
                .ok_or_else(|| self.err(&key("client_id"), "is required"))?,
        )?;
        if client_id.is_empty() {
            return Err(self.err(&key("client_id"), "is empty"));
        }
        let client_secret = self.secret(
            &key("client_secret"),
            raw.client_secret.take(),
            raw.client_secret_file.take(),
        )?;
        let auth_method = raw.auth_method.unwrap_or(AuthMethod::Basic);
        // RFC 6749 form-encodes both; Genesys' and CXone's own clients send them raw.
        let basic_encoding = raw.basic_encoding.unwrap_or(match provider {
            Provider::Oauth2 => BasicEncoding::FormEncoded,
            _ => BasicEncoding::Raw,
        });
        let scope = raw
            .scope
            .take()
            .map(|s| self.interpolate(&key("scope"), &s))
            .transpose()?;
        let mut params = Vec::new();
        for (k, v) in raw.token_params.take().unwrap_or_default() {
            if matches!(
                k.as_str(),
                "grant_type" | "client_id" | "client_secret" | "scope" | "username" | "password"
            ) {
                return Err(self.err(
                    &key(&format!("token_params.{k}")),
                    "is set by the proxy itself and cannot be overridden",
                ));
            }
            let v = self.interpolate(&key(&format!("token_params.{k}")), &v)?;
            params.push((k, v));
        }
        Ok(GrantConfig {
            token_url,
            flow,
            client_id,
            client_secret,
            auth_method,
            basic_encoding,
            scope,
            params,
        })
    }
}
