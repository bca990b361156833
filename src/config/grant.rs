//! How an upstream's tokens are obtained: the grant, the credentials, how they are sent.

use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};

use super::cx::Cx;
use super::egress::EgressParts;
use super::error::ConfigError;
use super::raw::RawUpstream;
use super::raw::{AuthMethod, BasicEncoding, SigningAlg};
use super::signing::{signing_key, JwtSigning};
use crate::config::providers::{self, Provider};
use crate::outbound::egress::{Egress, ProxyRoutes};

/// Everything that shapes a token grant.
#[derive(Clone)]
pub struct GrantConfig {
    /// `None`: found by discovery (CXone, or `issuer` for OAuth2).
    pub token_url: Option<String>,
    /// OAuth2: the issuer whose metadata (OpenID discovery or RFC 8414) names the token
    /// endpoint, when `token_url` is not given.
    pub issuer: Option<String>,
    pub flow: GrantFlow,
    pub client_id: String,
    /// `None` for the methods that need no shared secret (a signed assertion, a client
    /// certificate).
    pub client_secret: Option<Secret>,
    /// The secret a rotation is moving to: tried when the current one is refused with
    /// `invalid_client`.
    pub client_secret_next: Option<Secret>,
    pub auth_method: AuthMethod,
    /// `private_key_jwt`: how the assertion is signed.
    pub signing: Option<JwtSigning>,
    /// `client_secret_basic` encoding: Genesys' SDKs base64 the raw `id:secret`; RFC 6749
    /// §2.3.1 form-encodes both first.
    pub basic_encoding: BasicEncoding,
    pub scope: Option<String>,
    pub params: Vec<(String, String)>,
    /// How the token endpoint is reached (proxy, CAs, client certificate).
    pub egress: Egress,
    /// The client for token endpoints and discovery, made from `egress`.
    pub http: reqwest::Client,
    /// A fingerprint of `egress`: grants through different ways out get their own sources.
    pub transport_key: String,
}

/// A secret as configured: its value when the config was read, and the file it came from,
/// if any, which is read again before each grant (a rotated file needs no reload).
#[derive(Clone)]
pub struct Secret {
    pub value: SecretString,
    pub file: Option<PathBuf>,
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
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "[redacted]"),
            )
            .field(
                "client_secret_next",
                &self.client_secret_next.as_ref().map(|_| "[redacted]"),
            )
            .field("auth_method", &self.auth_method)
            .field("signing", &self.signing)
            .field("egress", &self.egress)
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
        let key_file = self
            .signing
            .as_ref()
            .map(|s| s.key_file.to_string_lossy().into_owned())
            .unwrap_or_default();
        for part in [
            self.token_url.as_deref().unwrap_or(""),
            self.issuer.as_deref().unwrap_or(""),
            issuer,
            key_id,
            key_secret,
            self.client_id.as_str(),
            self.client_secret
                .as_ref()
                .map(|s| s.value.expose_secret())
                .unwrap_or(""),
            self.scope.as_deref().unwrap_or(""),
            self.auth_method.name(),
            &key_file,
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
        server_routes: Option<&ProxyRoutes>,
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
        let auth_method = raw.auth_method.unwrap_or(AuthMethod::Basic);
        let method = auth_method.name();
        if !auth_method.uses_secret() && provider != Provider::Oauth2 {
            return Err(self.err(
                &key("auth_method"),
                format!("\"{method}\" is only valid for provider = \"oauth2\" (Genesys Cloud and CXone accept client secrets only)"),
            ));
        }
        let (client_secret, client_secret_next) = self.client_secrets(&key, auth_method, raw)?;
        let signing = self.signing(&key, auth_method, raw)?;
        let identity = match (raw.client_cert_file.take(), raw.client_key_file.take()) {
            (Some(cert), Some(k)) => {
                Some(self.identity(&format!("upstream \"{name}\""), &cert, &k)?)
            }
            (None, None) => None,
            _ => {
                return Err(self.err(
                    &key("client_cert_file"),
                    "set both client_cert_file and client_key_file, or neither",
                ))
            }
        };
        let mtls_upstream = raw.mtls_upstream.unwrap_or(false);
        if identity.is_none() && (auth_method.uses_certificate() || mtls_upstream) {
            return Err(self.err(
                &key("client_cert_file"),
                format!(
                    "is required with {}",
                    if mtls_upstream {
                        "mtls_upstream = true".to_string()
                    } else {
                        format!("auth_method = \"{method}\"")
                    }
                ),
            ));
        }
        if identity.is_some() && !auth_method.uses_certificate() && !mtls_upstream {
            return Err(self.err(
                &key("client_cert_file"),
                "is used with auth_method = \"tls_client_auth\" (or \"self_signed_tls_client_auth\") or mtls_upstream = true; set one of them",
            ));
        }
        let prefix = format!("upstream \"{name}\"");
        let (egress, transport_key) = self.egress(
            server_routes,
            EgressParts {
                key_prefix: &prefix,
                proxy: raw.egress_proxy.as_deref(),
                ca_file: raw.ca_file.as_deref(),
                ca_key: "ca_file",
                ca_only: raw.ca_only.unwrap_or(false),
                token_identity: identity.as_ref().filter(|_| auth_method.uses_certificate()),
                api_identity: identity.as_ref().filter(|_| mtls_upstream),
            },
        )?;
        let http = egress.side_call_client().map_err(|e| {
            self.err(
                &key("ca_file"),
                format!("cannot build the HTTPS client for the token endpoint: {e}"),
            )
        })?;
        let issuer = match (provider, raw.issuer.take()) {
            (Provider::Oauth2, Some(i)) => {
                let i = self.interpolate(&key("issuer"), &i)?;
                Some(
                    self.http_url(&key("issuer"), &i)?
                        .to_string()
                        .trim_end_matches('/')
                        .to_string(),
                )
            }
            _ => None,
        };
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
            issuer,
            flow,
            client_id,
            client_secret,
            client_secret_next,
            auth_method,
            signing,
            egress,
            http,
            transport_key,
            basic_encoding,
            scope,
            params,
        })
    }
}

impl Cx<'_> {
    /// `client_secret` and `client_secret_next` (inline or in files), for the methods
    /// that send a secret; an error if they are set for one that does not.
    fn client_secrets(
        &self,
        key: &dyn Fn(&str) -> String,
        method: AuthMethod,
        raw: &mut RawUpstream,
    ) -> Result<(Option<Secret>, Option<Secret>), ConfigError> {
        let current = (raw.client_secret.take(), raw.client_secret_file.take());
        let next = (
            raw.client_secret_next.take(),
            raw.client_secret_next_file.take(),
        );
        if !method.uses_secret() {
            for (k, set) in [
                ("client_secret", current.0.is_some() || current.1.is_some()),
                ("client_secret_next", next.0.is_some() || next.1.is_some()),
            ] {
                if set {
                    return Err(self.err(
                        &key(k),
                        format!("is not used with auth_method = \"{}\"", method.name()),
                    ));
                }
            }
            return Ok((None, None));
        }
        let secret = |k: &str, (inline, file): (Option<String>, Option<PathBuf>)| {
            let path = file.as_deref().map(|f| self.relative(f));
            self.secret(&key(k), inline, file)
                .map(|value| Secret { value, file: path })
        };
        let current = secret("client_secret", current)?;
        let next = match next {
            (None, None) => None,
            next => Some(secret("client_secret_next", next)?),
        };
        Ok((Some(current), next))
    }

    /// `private_key_jwt`'s key and claims; an error if they are set for another method.
    fn signing(
        &self,
        key: &dyn Fn(&str) -> String,
        method: AuthMethod,
        raw: &mut RawUpstream,
    ) -> Result<Option<JwtSigning>, ConfigError> {
        if method != AuthMethod::PrivateKeyJwt {
            for (k, set) in [
                ("private_key_file", raw.private_key_file.is_some()),
                ("signing_alg", raw.signing_alg.is_some()),
                ("key_id", raw.key_id.is_some()),
                ("assertion_audience", raw.assertion_audience.is_some()),
            ] {
                if set {
                    return Err(self.err(
                        &key(k),
                        "is only used with auth_method = \"private_key_jwt\"",
                    ));
                }
            }
            return Ok(None);
        }
        let file = raw.private_key_file.take().ok_or_else(|| {
            self.err(
                &key("private_key_file"),
                "is required with auth_method = \"private_key_jwt\" (a PEM RSA or EC private key)",
            )
        })?;
        let signing = JwtSigning {
            key_file: self.relative(&file),
            alg: raw.signing_alg.unwrap_or(SigningAlg::RS256),
            key_id: raw
                .key_id
                .take()
                .map(|k| self.interpolate(&key("key_id"), &k))
                .transpose()?,
            audience: raw
                .assertion_audience
                .take()
                .map(|a| self.interpolate(&key("assertion_audience"), &a))
                .transpose()?,
        };
        // Read once now, so a wrong file or algorithm stops the start, not the first grant.
        signing_key(&signing).map_err(|why| self.err(&key("private_key_file"), why))?;
        Ok(Some(signing))
    }
}
