//! The file as written: a serde mirror of `proxy.toml`. `deny_unknown_fields` everywhere, so
//! a typo in a key is an error, never a silently different behaviour. Closed sets of words
//! (provider, auth method, Basic encoding, signing algorithm, log format, readiness) are enums here, so toml names the
//! key and the accepted values; the rest stays text, and the resolver (the sibling
//! modules) turns it into types and names the key in every error.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::config::providers::Provider;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) upstream: Vec<RawUpstream>,
    #[serde(default)]
    pub(super) client: Vec<RawClient>,
    pub(super) cache: Option<RawCache>,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) events: super::events::RawEvents,
    #[serde(default)]
    pub(super) telemetry: super::telemetry::RawTelemetry,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) format: Option<LogFormat>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<String>,
    pub(super) tls_cert: Option<PathBuf>,
    pub(super) tls_key: Option<PathBuf>,
    pub(super) client_ca: Option<PathBuf>,
    pub(super) max_connections: Option<usize>,
    pub(super) max_connections_per_address: Option<usize>,
    pub(super) workers: Option<usize>,
    pub(super) admin_listen: Option<String>,
    pub(super) admin_key_sha256: Option<String>,
    pub(super) allow_anonymous: Option<bool>,
    pub(super) token_paths: Option<Vec<String>>,
    pub(super) max_body_bytes: Option<u64>,
    pub(super) retry_body_bytes: Option<u64>,
    pub(super) prefetch_tokens: Option<bool>,
    pub(super) ready: Option<Readiness>,
    pub(super) shutdown_grace_secs: Option<f64>,
    pub(super) session_lifetime_secs: Option<f64>,
    pub(super) max_websockets: Option<usize>,
    pub(super) public_url: Option<String>,
    pub(super) websocket_idle_secs: Option<f64>,
    pub(super) egress_proxy: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) name: String,
    pub(super) provider: Provider,
    pub(super) region: Option<String>,
    pub(super) client_id: Option<String>,
    pub(super) client_secret: Option<String>,
    pub(super) client_secret_file: Option<PathBuf>,
    pub(super) prefix: Option<String>,
    pub(super) token_url: Option<String>,
    pub(super) base_url: Option<String>,
    pub(super) auth_method: Option<AuthMethod>,
    pub(super) basic_encoding: Option<BasicEncoding>,
    pub(super) scope: Option<String>,
    pub(super) token_params: Option<BTreeMap<String, String>>,
    pub(super) tokens: Option<u32>,
    pub(super) max_connections: Option<usize>,
    pub(super) issuer: Option<String>,
    pub(super) introspection_url: Option<String>,
    pub(super) access_key_id: Option<String>,
    pub(super) access_key_secret: Option<String>,
    pub(super) access_key_secret_file: Option<PathBuf>,
    pub(super) timeout_secs: Option<f64>,
    pub(super) connect_timeout_secs: Option<f64>,
    pub(super) request_timeout_secs: Option<f64>,
    pub(super) queue_timeout_secs: Option<f64>,
    pub(super) retry_429: Option<u32>,
    pub(super) retry_429_max_wait_secs: Option<f64>,
    pub(super) streaming_url: Option<String>,
    pub(super) websocket_token: Option<String>,
    pub(super) egress_proxy: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) ca_only: Option<bool>,
    pub(super) client_secret_next: Option<String>,
    pub(super) client_secret_next_file: Option<PathBuf>,
    pub(super) private_key_file: Option<PathBuf>,
    pub(super) signing_alg: Option<SigningAlg>,
    pub(super) key_id: Option<String>,
    pub(super) assertion_audience: Option<String>,
    pub(super) client_cert_file: Option<PathBuf>,
    pub(super) client_key_file: Option<PathBuf>,
    pub(super) mtls_upstream: Option<bool>,
    pub(super) rate_limit: Option<String>,
    pub(super) rate_limit_max_wait_secs: Option<f64>,
    pub(super) notification_channels: Option<u32>,
    #[serde(default)]
    pub(super) route_limit: Vec<RawRouteLimit>,
}

/// `[[upstream.route_limit]]`: a platform limit below the token's on some routes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRouteLimit {
    pub(super) route: String,
    pub(super) rate: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawClient {
    pub(super) name: String,
    pub(super) key_sha256: Option<String>,
    pub(super) keys: Option<Vec<RawKey>>,
    pub(super) jwt_issuer: Option<String>,
    pub(super) jwt_audience: Option<String>,
    pub(super) jwt_subject: Option<String>,
    pub(super) jwks_url: Option<String>,
    pub(super) jwks_file: Option<PathBuf>,
    pub(super) jwks_ca_file: Option<PathBuf>,
    pub(super) upstreams: Option<Vec<String>>,
    pub(super) allow: Option<Vec<String>>,
    pub(super) share: Option<u32>,
    pub(super) max_per_minute: Option<u64>,
    pub(super) max_channels: Option<u32>,
}

/// One of a client's keys, with the time it stops working.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKey {
    pub(super) sha256: String,
    pub(super) not_after: Option<RawTime>,
}

/// A moment, as TOML writes one (`2027-03-01T00:00:00Z`) or as a string.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawTime {
    Text(String),
    Toml(toml::value::Datetime),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCache {
    pub(super) redis_url: Option<String>,
    pub(super) redis_url_file: Option<PathBuf>,
    pub(super) encryption_key: Option<String>,
    pub(super) encryption_key_file: Option<PathBuf>,
    pub(super) timeout_ms: Option<u64>,
    pub(super) key_prefix: Option<String>,
    pub(super) sentinels: Option<Vec<String>>,
    pub(super) master_name: Option<String>,
}

// === The typed config ===

/// `auth_method`: how the client proves who it is to the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMethod {
    /// `client_secret_basic`: id and secret in an `Authorization: Basic` header.
    #[serde(alias = "client_secret_basic")]
    Basic,
    /// `client_secret_post`: id and secret as form fields.
    #[serde(alias = "client_secret_post")]
    Post,
    /// RFC 7523: a JWT signed with the client's private key, a new one per grant.
    #[serde(rename = "private_key_jwt")]
    PrivateKeyJwt,
    /// RFC 8705 §2.1: a client certificate from a CA the endpoint trusts.
    #[serde(rename = "tls_client_auth")]
    TlsClientAuth,
    /// RFC 8705 §2.2: a self-signed client certificate the endpoint has registered.
    #[serde(rename = "self_signed_tls_client_auth")]
    SelfSignedTlsClientAuth,
}

impl AuthMethod {
    /// The method's name as RFC 8414's `token_endpoint_auth_methods_supported` spells it.
    pub fn name(self) -> &'static str {
        match self {
            AuthMethod::Basic => "client_secret_basic",
            AuthMethod::Post => "client_secret_post",
            AuthMethod::PrivateKeyJwt => "private_key_jwt",
            AuthMethod::TlsClientAuth => "tls_client_auth",
            AuthMethod::SelfSignedTlsClientAuth => "self_signed_tls_client_auth",
        }
    }

    /// Whether the client authenticates with a shared secret.
    pub fn uses_secret(self) -> bool {
        matches!(self, AuthMethod::Basic | AuthMethod::Post)
    }

    pub(super) fn uses_certificate(self) -> bool {
        matches!(
            self,
            AuthMethod::TlsClientAuth | AuthMethod::SelfSignedTlsClientAuth
        )
    }
}

/// `basic_encoding`: `raw` or `form`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BasicEncoding {
    Raw,
    #[serde(rename = "form")]
    FormEncoded,
}

/// `signing_alg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SigningAlg {
    RS256,
    PS256,
    ES256,
}

/// How log lines (the audit line per request among them) are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// `[server] ready`: what `/readyz` waits for. `"all"` (the default): every upstream holds
/// a usable token. `"any"`: at least one does — so one upstream's bad credentials do not
/// take the others' traffic out of a load balancer; `/readyz/<upstream>` answers for one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Readiness {
    #[default]
    All,
    Any,
}
