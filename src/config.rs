//! Configuration: `proxy.toml` as written by an operator, turned into typed values.
//!
//! Two steps, so that nothing downstream ever re-checks a string:
//! 1. `RawConfig` mirrors the file. `deny_unknown_fields` everywhere: a typo in a key must
//!    be an error, never a silently different behaviour.
//! 2. [`Config::from_toml`] resolves `${VAR}` references, reads secret files, looks up
//!    provider endpoints and validates everything, naming the offending key in each error.
//!
//! ```
//! let toml = r#"
//! [[upstream]]
//! name = "api"
//! provider = "oauth2"
//! token_url = "https://login.example.com/oauth/token"
//! base_url = "https://api.example.com"
//! client_id = "id"
//! client_secret = "${SECRET}"
//! "#;
//! let env = |name: &str| (name == "SECRET").then(|| "s3cret".to_string());
//! let config = tokengate::config::Config::from_toml(toml, "proxy.toml".as_ref(), &env).unwrap();
//! assert_eq!(config.upstreams[0].name.as_ref(), "api");
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use secrecy::{ExposeSecret, SecretBox, SecretString};
use serde::Deserialize;

use crate::policy::AllowRule;
use crate::providers::{self, GenesysRegion, Provider};

/// What went wrong while loading a config. The message always names the file and, where
/// there is one, the key; it never contains a secret value.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    file: String,
    message: String,
}

impl ConfigError {
    fn new(file: &Path, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.display().to_string(),
            message: message.into(),
        }
    }
}

// === The file as written ===

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    #[serde(default)]
    upstream: Vec<RawUpstream>,
    #[serde(default)]
    client: Vec<RawClient>,
    cache: Option<RawCache>,
    #[serde(default)]
    log: RawLog,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    max_connections: Option<usize>,
    max_connections_per_address: Option<usize>,
    workers: Option<usize>,
    admin_listen: Option<String>,
    admin_key_sha256: Option<String>,
    allow_anonymous: Option<bool>,
    token_paths: Option<Vec<String>>,
    max_body_bytes: Option<u64>,
    retry_body_bytes: Option<u64>,
    prefetch_tokens: Option<bool>,
    shutdown_grace_secs: Option<f64>,
    session_lifetime_secs: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: String,
    provider: String,
    region: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    client_secret_file: Option<PathBuf>,
    prefix: Option<String>,
    token_url: Option<String>,
    base_url: Option<String>,
    auth_method: Option<String>,
    basic_encoding: Option<String>,
    scope: Option<String>,
    token_params: Option<BTreeMap<String, String>>,
    tokens: Option<u32>,
    max_connections: Option<usize>,
    issuer: Option<String>,
    access_key_id: Option<String>,
    access_key_secret: Option<String>,
    access_key_secret_file: Option<PathBuf>,
    timeout_secs: Option<f64>,
    connect_timeout_secs: Option<f64>,
    request_timeout_secs: Option<f64>,
    queue_timeout_secs: Option<f64>,
    retry_429: Option<u32>,
    retry_429_max_wait_secs: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClient {
    name: String,
    key_sha256: String,
    upstreams: Option<Vec<String>>,
    allow: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)] // read only to give a precise "not supported yet" error
struct RawCache {
    redis_url: Option<String>,
    redis_url_file: Option<PathBuf>,
    encryption_key: Option<String>,
    encryption_key_file: Option<PathBuf>,
    timeout_ms: Option<u64>,
    key_prefix: Option<String>,
}

// === The typed config ===

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, for messages.
    pub source: PathBuf,
    pub server: ServerConfig,
    pub log_format: LogFormat,
    pub upstreams: Vec<Arc<UpstreamConfig>>,
    pub clients: Vec<Arc<ClientConfig>>,
    /// The fleet's shared token cache; `None`: each process keeps its tokens in memory.
    pub cache: Option<CacheConfig>,
}

/// `[cache]`: tokens shared by replicas through Redis, encrypted at rest.
#[derive(Clone)]
pub struct CacheConfig {
    /// May carry a password, so it is a secret.
    pub redis_url: SecretString,
    /// `host:port` (or socket path) of the Redis server: what logs name.
    pub redis_target: String,
    /// XChaCha20-Poly1305 key for the values stored in Redis.
    pub encryption_key: Arc<SecretBox<[u8; 32]>>,
    /// How long one Redis command may take before the proxy carries on without it.
    pub timeout: Duration,
    /// Prefix of every key the proxy writes, so several fleets can share one Redis.
    pub key_prefix: String,
}

impl std::fmt::Debug for CacheConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheConfig")
            .field("redis_target", &self.redis_target)
            .field("redis_url", &"[redacted]")
            .field("encryption_key", &"[redacted]")
            .field("timeout", &self.timeout)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

impl CacheConfig {
    /// Whether two configs talk to the same Redis the same way (a reload keeps the client).
    pub fn same_as(&self, other: &CacheConfig) -> bool {
        self.redis_url.expose_secret() == other.redis_url.expose_secret()
            && self.encryption_key.expose_secret() == other.encryption_key.expose_secret()
            && self.timeout == other.timeout
            && self.key_prefix == other.key_prefix
    }
}

/// How log lines (the audit line per request among them) are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// HTTPS on `listen` (rustls), with client certificates verified when `client_ca` is set.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    /// Threads serving the proxy listener, each with its own runtime and upstream pools.
    pub workers: usize,
    pub admin_listen: Option<SocketAddr>,
    /// SHA-256 of the key that protects the admin listener, when one is set.
    pub admin_key_sha256: Option<[u8; 32]>,
    /// Serve callers without a key even though no `[[client]]` is configured and a listener
    /// is not on loopback.
    pub allow_anonymous: bool,
    /// Paths where legacy apps ask for tokens (answered by the proxy itself).
    pub token_paths: Vec<String>,
    /// Largest request body accepted (413 above it).
    pub max_body_bytes: u64,
    /// Request bodies up to this size are kept so they can be sent again after a 401.
    pub retry_body_bytes: usize,
    /// Obtain every upstream's token at start and keep it fresh in the background.
    pub prefetch_tokens: bool,
    /// How long in-flight requests may take to finish after SIGINT/SIGTERM.
    pub shutdown_grace: Duration,
    /// Lifetime of the session tokens the proxy's own token endpoint issues.
    pub session_lifetime: Duration,
}

/// One API platform the proxy forwards to, and how it gets tokens for it.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: Arc<str>,
    pub provider: Provider,
    /// Genesys Cloud: the region the config names.
    pub region: Option<GenesysRegion>,
    /// Path prefix routed here, normalised: starts with `/`, no trailing `/` unless it is `/`.
    pub prefix: String,
    /// Where calls go: scheme, authority and an optional base path (no trailing `/`).
    /// `None` for CXone without an override: discovery finds the tenant's API host.
    pub base_url: Option<Uri>,
    /// How long the upstream may take to answer with a response head.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// The most one call may take from arrival to the last byte of the answer, token wait
    /// and retries included (`None`: no limit beyond `timeout`, the default).
    pub request_timeout: Option<Duration>,
    /// How many times an idempotent request that got 429 is sent again after its
    /// `Retry-After` (0: 429 goes back to the caller, the default).
    pub retry_429: u32,
    /// The most time spent waiting on `Retry-After` for one request.
    pub retry_429_max_wait: Duration,
    /// Token pool size: each Genesys token has its own API rate limit.
    pub tokens: u32,
    /// The most connections open to this upstream at once (the proxy's share of them is
    /// split evenly over its workers); calls beyond it wait for one, within `queue_timeout`.
    pub max_connections: usize,
    /// How long a call may wait for a free connection before `503 upstream_busy`
    /// (`queue_timeout_secs`, 5 s by default).
    pub queue_timeout: Duration,
    pub grant: GrantConfig,
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// `client_secret_basic`: id and secret in an `Authorization: Basic` header.
    Basic,
    /// `client_secret_post`: id and secret as form fields.
    Post,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BasicEncoding {
    Raw,
    FormEncoded,
}

/// A caller of the proxy, identified by its key.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub name: Arc<str>,
    pub key_sha256: [u8; 32],
    /// Upstreams this client may use; `None` means all.
    pub upstreams: Option<Vec<Arc<str>>>,
    /// Requests this client may make; `None` means any.
    pub allow: Option<Vec<AllowRule>>,
}

/// A TOML error as line, column, key and what is wrong, never the line itself: toml's own
/// text quotes the offending line, and a typo beside an inline secret would print the
/// secret (on stderr, and in the log line of a refused reload). Values toml quotes in its
/// message (`invalid type: string "..."`) are left out the same way.
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.message().to_string();
    };
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    let line = text[line_start..].lines().next().unwrap_or("");
    let key = line.split_once('=').map(|(k, _)| k.trim()).filter(|k| {
        !k.is_empty()
            && k.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.\"".contains(c))
    });
    let value = line.split_once('=').map_or("", |(_, v)| v);
    // Backtick-quoted fragments of the message that come from the value are dropped.
    let mut message = String::new();
    for (i, part) in e.message().split('`').enumerate() {
        if i % 2 == 1 {
            let from_value = !part.is_empty() && value.contains(part);
            message.push('`');
            message.push_str(if from_value { "…" } else { part });
            message.push('`');
        } else {
            message.push_str(part);
        }
    }
    // serde quotes strings with double quotes: the value itself goes too.
    let bare = value.trim().trim_matches(|c| c == '"' || c == '\'');
    let quoted = format!("{bare:?}");
    if !bare.is_empty() && message.contains(&quoted) {
        message = message.replace(&quoted, "\"…\"");
    }
    match key {
        Some(key) => format!("line {line_no}, column {column}, key `{key}`: {message}"),
        None => format!("line {line_no}, column {column}: {message}"),
    }
}

/// Reads the environment for `${VAR}` references; injected so tests never touch the
/// process environment.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

const DEFAULT_TOKEN_PATHS: [&str; 2] = ["/oauth/token", "/login/oauth/token"];

impl Config {
    /// Load a config file, reading `${VAR}` from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(path, format!("cannot read the config file: {e}")))?;
        Config::from_toml(&text, path, &|name| std::env::var(name).ok())
    }

    /// Parse and validate a config. `file` is used for messages and to resolve relative
    /// secret-file paths.
    pub fn from_toml(text: &str, file: &Path, env: Env<'_>) -> Result<Config, ConfigError> {
        // toml's own error names the line, column and key (unknown keys included).
        let raw: RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::new(file, toml_error(text, &e)))?;
        let cx = Cx { file, env };
        cx.build(raw)
    }

    pub fn upstream(&self, name: &str) -> Option<&Arc<UpstreamConfig>> {
        self.upstreams.iter().find(|u| u.name.as_ref() == name)
    }
}

/// The context of one load: the file for messages, the environment for `${VAR}`.
struct Cx<'a> {
    file: &'a Path,
    env: Env<'a>,
}

impl Cx<'_> {
    fn err(&self, key: &str, message: impl std::fmt::Display) -> ConfigError {
        ConfigError::new(self.file, format!("{key}: {message}"))
    }

    fn build(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let cache = raw.cache.map(|c| self.cache(c)).transpose()?;
        let server = self.server(raw.server)?;
        if raw.upstream.is_empty() {
            return Err(self.err("[[upstream]]", "at least one upstream is required"));
        }
        let mut upstreams: Vec<Arc<UpstreamConfig>> = Vec::new();
        for (i, u) in raw.upstream.into_iter().enumerate() {
            let up = self.upstream(i, u)?;
            if upstreams.iter().any(|o| o.name == up.name) {
                return Err(self.err(
                    &format!("upstream[{i}].name"),
                    format!("the name \"{}\" is used twice", up.name),
                ));
            }
            if let Some(other) = upstreams.iter().find(|o| o.prefix == up.prefix) {
                return Err(self.err(
                    &format!("upstream \"{}\".prefix", up.name),
                    format!(
                        "\"{}\" is already the prefix of upstream \"{}\"",
                        up.prefix, other.name
                    ),
                ));
            }
            upstreams.push(Arc::new(up));
        }
        let mut clients: Vec<Arc<ClientConfig>> = Vec::new();
        for (i, c) in raw.client.into_iter().enumerate() {
            let client = self.client(i, c, &upstreams)?;
            if clients.iter().any(|o| o.name == client.name) {
                return Err(self.err(
                    &format!("client[{i}].name"),
                    format!("the name \"{}\" is used twice", client.name),
                ));
            }
            if clients.iter().any(|o| o.key_sha256 == client.key_sha256) {
                return Err(self.err(
                    &format!("client \"{}\".key_sha256", client.name),
                    "two clients have the same key; give each its own (`tokengate key new`)",
                ));
            }
            clients.push(Arc::new(client));
        }
        // Anonymous callers are tolerable only where nobody else can reach the proxy.
        if clients.is_empty() && !server.allow_anonymous {
            let exposed = std::iter::once(server.listen)
                .chain(server.admin_listen)
                .find(|a| !a.ip().is_loopback());
            if let Some(addr) = exposed {
                return Err(self.err(
                    "[server]",
                    format!(
                        "no [[client]] is configured, so anyone could use the proxy, and {addr} is not a loopback address; add [[client]] keys or set allow_anonymous = true"
                    ),
                ));
            }
        }
        let log_format = match raw.log.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(self.err(
                    "log.format",
                    format!("unknown format \"{other}\"; use text or json"),
                ))
            }
        };
        Ok(Config {
            source: self.file.to_path_buf(),
            server,
            log_format,
            upstreams,
            clients,
            cache,
        })
    }

    fn cache(&self, raw: RawCache) -> Result<CacheConfig, ConfigError> {
        let redis_url = self.secret("cache.redis_url", raw.redis_url, raw.redis_url_file)?;
        // Messages name the scheme and the problem, never the URL: it may hold a password.
        let info = redis::IntoConnectionInfo::into_connection_info(redis_url.expose_secret())
            .map_err(|e| {
                self.err(
                    "cache.redis_url",
                    format!(
                        "is not a Redis URL such as redis://host:6379, rediss://:password@host:6380/0 or redis+unix:///path ({})",
                        e.category()
                    ),
                )
            })?;
        let key = self.secret(
            "cache.encryption_key",
            raw.encryption_key,
            raw.encryption_key_file,
        )?;
        let encryption_key = parse_key(key.expose_secret().trim()).ok_or_else(|| {
            self.err(
                "cache.encryption_key",
                "must be 32 bytes written as 64 hex digits or in base64 (make one with `head -c 32 /dev/urandom | base64`)",
            )
        })?;
        let timeout = match raw.timeout_ms {
            None => Duration::from_millis(500),
            Some(ms @ 1..=60_000) => Duration::from_millis(ms),
            Some(_) => return Err(self.err("cache.timeout_ms", "must be 1 to 60000")),
        };
        let key_prefix = raw.key_prefix.unwrap_or_else(|| "tokengate".into());
        if key_prefix.is_empty()
            || !key_prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
        {
            return Err(self.err("cache.key_prefix", "use letters, digits and - _ . : only"));
        }
        Ok(CacheConfig {
            redis_url,
            redis_target: info.addr().to_string(),
            encryption_key: Arc::new(SecretBox::new(Box::new(encryption_key))),
            timeout,
            key_prefix,
        })
    }

    fn server(&self, raw: RawServer) -> Result<ServerConfig, ConfigError> {
        let listen = match raw.listen {
            Some(s) => self.socket_addr("server.listen", &s)?,
            None => SocketAddr::from(([127, 0, 0, 1], 8080)),
        };
        let admin_listen = raw
            .admin_listen
            .map(|s| self.socket_addr("server.admin_listen", &s))
            .transpose()?;
        let admin_key_sha256 = raw
            .admin_key_sha256
            .map(|s| self.sha256_hex("server.admin_key_sha256", &s))
            .transpose()?;
        if let Some(addr) = admin_listen {
            if !addr.ip().is_loopback() && admin_key_sha256.is_none() {
                return Err(self.err(
                    "server.admin_listen",
                    format!("{addr} is not a loopback address, so admin_key_sha256 is required"),
                ));
            }
        }
        let tls = self.tls(raw.tls_cert, raw.tls_key, raw.client_ca)?;
        let token_paths = match raw.token_paths {
            Some(paths) => {
                for p in &paths {
                    if !p.starts_with('/') {
                        return Err(
                            self.err("server.token_paths", format!("\"{p}\" must start with '/'"))
                        );
                    }
                }
                paths
            }
            None => DEFAULT_TOKEN_PATHS.iter().map(|s| s.to_string()).collect(),
        };
        let retry_body_bytes = raw.retry_body_bytes.unwrap_or(1024 * 1024);
        let retry_body_bytes = usize::try_from(retry_body_bytes)
            .map_err(|_| self.err("server.retry_body_bytes", "too large"))?;
        let max_connections = raw.max_connections.unwrap_or(10_000);
        let max_connections_per_address = raw.max_connections_per_address.unwrap_or(1_000);
        if max_connections == 0 || max_connections_per_address == 0 {
            return Err(self.err("server.max_connections", "must be at least 1"));
        }
        let workers = match raw.workers {
            None | Some(0) => crate::workers::default_count(),
            Some(n @ 1..=1024) => n,
            Some(_) => {
                return Err(self.err("server.workers", "must be 1 to 1024 (0: one per core)"))
            }
        };
        Ok(ServerConfig {
            listen,
            tls,
            max_connections,
            max_connections_per_address,
            workers,
            admin_listen,
            admin_key_sha256,
            allow_anonymous: raw.allow_anonymous.unwrap_or(false),
            token_paths,
            max_body_bytes: raw.max_body_bytes.unwrap_or(32 * 1024 * 1024),
            retry_body_bytes,
            prefetch_tokens: raw.prefetch_tokens.unwrap_or(true),
            session_lifetime: self.secs(
                "server.session_lifetime_secs",
                raw.session_lifetime_secs,
                86_400.0,
            )?,
            shutdown_grace: self.secs(
                "server.shutdown_grace_secs",
                raw.shutdown_grace_secs,
                30.0,
            )?,
        })
    }

    fn upstream(&self, i: usize, raw: RawUpstream) -> Result<UpstreamConfig, ConfigError> {
        if raw.name.is_empty()
            || !raw
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(self.err(
                &format!("upstream[{i}].name"),
                format!(
                    "\"{}\" is not a valid name: use letters, digits, '-', '_' and '.'",
                    raw.name
                ),
            ));
        }
        let key = |k: &str| format!("upstream \"{}\".{k}", raw.name);
        let provider = Provider::parse(&raw.provider).ok_or_else(|| {
            self.err(
                &key("provider"),
                format!(
                    "unknown provider \"{}\"; use genesys, cxone or oauth2",
                    raw.provider
                ),
            )
        })?;
        for (field, set) in [
            ("issuer", raw.issuer.is_some()),
            ("access_key_id", raw.access_key_id.is_some()),
            ("access_key_secret", raw.access_key_secret.is_some()),
            (
                "access_key_secret_file",
                raw.access_key_secret_file.is_some(),
            ),
        ] {
            if set && provider != Provider::Cxone {
                return Err(self.err(&key(field), "is only valid for provider = \"cxone\""));
            }
        }
        let tokens = raw.tokens.unwrap_or(1);
        if !(1..=32).contains(&tokens) {
            return Err(self.err(&key("tokens"), "must be between 1 and 32"));
        }
        let max_connections = raw.max_connections.unwrap_or(128);
        if !(1..=100_000).contains(&max_connections) {
            return Err(self.err(&key("max_connections"), "must be between 1 and 100000"));
        }
        // Where tokens and calls go: the provider's defaults, then the overrides.
        let region = match provider {
            Provider::Genesys => {
                let region = raw.region.as_deref().ok_or_else(|| {
                    self.err(
                        &key("region"),
                        format!(
                            "is required for provider = \"genesys\"; one of: {}",
                            providers::genesys_region_names().join(", ")
                        ),
                    )
                })?;
                let r = providers::genesys_region(region).ok_or_else(|| {
                    self.err(
                        &key("region"),
                        format!(
                            "unknown Genesys Cloud region \"{region}\"; one of: {}",
                            providers::genesys_region_names().join(", ")
                        ),
                    )
                })?;
                Some(r)
            }
            _ => {
                if raw.region.is_some() {
                    return Err(
                        self.err(&key("region"), "is only valid for provider = \"genesys\"")
                    );
                }
                None
            }
        };
        let defaults = region.map(|r| (r.token_url(), r.api_url()));
        // CXone finds both by discovery unless they are given.
        let discovers = provider == Provider::Cxone;
        let token_url = match (raw.token_url, &defaults) {
            (Some(u), _) => Some(self.interpolate(&key("token_url"), &u)?),
            (None, Some((t, _))) => Some(t.clone()),
            (None, None) if discovers => None,
            (None, None) => {
                return Err(self.err(&key("token_url"), "is required for provider = \"oauth2\""))
            }
        };
        let base_url = match (raw.base_url, &defaults) {
            (Some(u), _) => Some(self.interpolate(&key("base_url"), &u)?),
            (None, Some((_, b))) => Some(b.clone()),
            (None, None) if discovers => None,
            (None, None) => {
                return Err(self.err(&key("base_url"), "is required for provider = \"oauth2\""))
            }
        };
        let token_url = token_url
            .map(|u| self.http_url(&key("token_url"), &u).map(|u| u.to_string()))
            .transpose()?;
        let base_url = base_url
            .map(|u| self.base_url(&key("base_url"), &u))
            .transpose()?;
        let flow = if discovers {
            let issuer = match raw.issuer {
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
                raw.access_key_secret,
                raw.access_key_secret_file,
            )?;
            GrantFlow::CxoneAccessKey {
                issuer: issuer.to_string().trim_end_matches('/').to_string(),
                access_key_id,
                access_key_secret,
                discover_api_host: base_url.is_none(),
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
            raw.client_secret,
            raw.client_secret_file,
        )?;
        let auth_method = match raw.auth_method.as_deref() {
            None | Some("basic") | Some("client_secret_basic") => AuthMethod::Basic,
            Some("post") | Some("client_secret_post") => AuthMethod::Post,
            Some(other) => {
                return Err(self.err(
                    &key("auth_method"),
                    format!("unknown method \"{other}\"; use basic or post"),
                ))
            }
        };
        let basic_encoding = match raw.basic_encoding.as_deref() {
            None => match provider {
                Provider::Oauth2 => BasicEncoding::FormEncoded,
                _ => BasicEncoding::Raw,
            },
            Some("raw") => BasicEncoding::Raw,
            Some("form") => BasicEncoding::FormEncoded,
            Some(other) => {
                return Err(self.err(
                    &key("basic_encoding"),
                    format!("unknown encoding \"{other}\"; use raw or form"),
                ))
            }
        };
        let scope = raw
            .scope
            .map(|s| self.interpolate(&key("scope"), &s))
            .transpose()?;
        let mut params = Vec::new();
        for (k, v) in raw.token_params.unwrap_or_default() {
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
        let prefix = self.prefix(&key("prefix"), raw.prefix.as_deref().unwrap_or("/"))?;
        Ok(UpstreamConfig {
            name: Arc::from(raw.name.as_str()),
            provider,
            region,
            prefix,
            base_url,
            timeout: self.secs(&key("timeout_secs"), raw.timeout_secs, 60.0)?,
            connect_timeout: self.secs(
                &key("connect_timeout_secs"),
                raw.connect_timeout_secs,
                10.0,
            )?,
            request_timeout: raw
                .request_timeout_secs
                .map(|v| self.secs(&key("request_timeout_secs"), Some(v), 0.0))
                .transpose()?,
            retry_429: raw.retry_429.unwrap_or(0).min(10),
            tokens,
            max_connections,
            queue_timeout: self.secs(&key("queue_timeout_secs"), raw.queue_timeout_secs, 5.0)?,
            retry_429_max_wait: self.secs(
                &key("retry_429_max_wait_secs"),
                raw.retry_429_max_wait_secs,
                30.0,
            )?,
            grant: GrantConfig {
                token_url,
                flow,
                client_id,
                client_secret,
                auth_method,
                basic_encoding,
                scope,
                params,
            },
        })
    }

    fn client(
        &self,
        i: usize,
        raw: RawClient,
        upstreams: &[Arc<UpstreamConfig>],
    ) -> Result<ClientConfig, ConfigError> {
        if raw.name.is_empty() {
            return Err(self.err(&format!("client[{i}].name"), "is empty"));
        }
        let key = |k: &str| format!("client \"{}\".{k}", raw.name);
        let key_sha256 = self.sha256_hex(&key("key_sha256"), &raw.key_sha256)?;
        let allowed_upstreams = match raw.upstreams {
            None => None,
            Some(names) => {
                let mut out = Vec::new();
                for n in names {
                    let up = upstreams
                        .iter()
                        .find(|u| u.name.as_ref() == n)
                        .ok_or_else(|| {
                            self.err(&key("upstreams"), format!("no upstream is named \"{n}\""))
                        })?;
                    out.push(up.name.clone());
                }
                Some(out)
            }
        };
        let allow = match raw.allow {
            None => None,
            Some(rules) => {
                let mut out = Vec::new();
                for r in rules {
                    out.push(AllowRule::parse(&r).map_err(|e| self.err(&key("allow"), e))?);
                }
                Some(out)
            }
        };
        Ok(ClientConfig {
            name: Arc::from(raw.name.as_str()),
            key_sha256,
            upstreams: allowed_upstreams,
            allow,
        })
    }

    /// The HTTPS listener's rustls config from PEM files: certificate chain, private key,
    /// and optionally the CA whose certificates identify clients (mutual TLS).
    fn tls(
        &self,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        client_ca: Option<PathBuf>,
    ) -> Result<Option<Arc<rustls::ServerConfig>>, ConfigError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let (cert, key) = match (cert, key) {
            (None, None) => {
                if client_ca.is_some() {
                    return Err(self.err("server.client_ca", "needs tls_cert and tls_key"));
                }
                return Ok(None);
            }
            (Some(c), Some(k)) => (c, k),
            _ => {
                return Err(self.err(
                    "server.tls_cert",
                    "set both tls_cert and tls_key, or neither",
                ))
            }
        };
        let base = self.file.parent().unwrap_or(Path::new("."));
        let certs = |key: &str, path: &Path| -> Result<Vec<CertificateDer<'static>>, ConfigError> {
            let path = base.join(path);
            let certs: Vec<_> = CertificateDer::pem_file_iter(&path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| {
                    self.err(
                        key,
                        format!("cannot read certificates from {}: {e}", path.display()),
                    )
                })?;
            if certs.is_empty() {
                return Err(self.err(key, format!("{} holds no PEM certificate", path.display())));
            }
            Ok(certs)
        };
        let chain = certs("server.tls_cert", &cert)?;
        let key_path = base.join(&key);
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
            self.err(
                "server.tls_key",
                format!("cannot read a private key from {}: {e}", key_path.display()),
            )
        })?;
        let builder = rustls::ServerConfig::builder();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certs("server.client_ca", &ca)? {
                    roots.add(c).map_err(|e| {
                        self.err(
                            "server.client_ca",
                            format!("an unusable CA certificate: {e}"),
                        )
                    })?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                    .build()
                    .map_err(|e| self.err("server.client_ca", e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| self.err("server.tls_key", format!("does not fit tls_cert: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Some(Arc::new(config)))
    }

    // --- value helpers ---

    /// Replace `${NAME}` with the environment variable `NAME`; `$$` is a literal `$`.
    fn interpolate(&self, key: &str, value: &str) -> Result<String, ConfigError> {
        let mut out = String::with_capacity(value.len());
        let mut rest = value;
        while let Some(pos) = rest.find('$') {
            out.push_str(&rest[..pos]);
            rest = &rest[pos..];
            if let Some(after) = rest.strip_prefix("$$") {
                out.push('$');
                rest = after;
            } else if let Some(after) = rest.strip_prefix("${") {
                let end = after
                    .find('}')
                    .ok_or_else(|| self.err(key, "an unclosed \"${\"; write ${NAME}"))?;
                let name = &after[..end];
                if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(self.err(
                        key,
                        format!("\"${{{name}}}\" is not a valid environment variable reference"),
                    ));
                }
                let v = (self.env)(name).ok_or_else(|| {
                    self.err(key, format!("environment variable {name} is not set"))
                })?;
                out.push_str(&v);
                rest = &after[end + 1..];
            } else {
                out.push('$');
                rest = &rest[1..];
            }
        }
        out.push_str(rest);
        Ok(out)
    }

    fn secret(
        &self,
        key: &str,
        inline: Option<String>,
        file: Option<PathBuf>,
    ) -> Result<SecretString, ConfigError> {
        let value = match (inline, file) {
            (Some(_), Some(_)) => {
                return Err(self.err(key, format!("set either {key} or {key}_file, not both")))
            }
            (None, None) => {
                return Err(self.err(key, format!("is required (or {key}_file)")));
            }
            (Some(v), None) => self.interpolate(key, &v)?,
            (None, Some(path)) => {
                let path = self.file.parent().unwrap_or(Path::new(".")).join(path);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    self.err(
                        &format!("{key}_file"),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                text.trim_end_matches(['\r', '\n']).to_string()
            }
        };
        if value.is_empty() {
            return Err(self.err(key, "is empty"));
        }
        Ok(SecretString::from(value))
    }

    /// An address, `${VAR}` allowed (replicas sharing one file each set their own).
    fn socket_addr(&self, key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
        let s = self.interpolate(key, s)?;
        s.parse().map_err(|_| {
            self.err(
                key,
                format!("\"{s}\" is not an IP address and port such as 127.0.0.1:8080"),
            )
        })
    }

    fn sha256_hex(&self, key: &str, s: &str) -> Result<[u8; 32], ConfigError> {
        let bytes = hex::decode(s)
            .ok()
            .filter(|b| b.len() == 32 && s.len() == 64);
        let bytes = bytes.filter(|_| !s.chars().any(|c| c.is_ascii_uppercase()));
        let bytes = bytes.ok_or_else(|| {
            self.err(
                key,
                "must be 64 lowercase hex digits, the SHA-256 of the key (`tokengate key hash`)",
            )
        })?;
        let mut out = [0u8; 32];
        out.copy_from_slice(&bytes);
        Ok(out)
    }

    fn secs(&self, key: &str, v: Option<f64>, default: f64) -> Result<Duration, ConfigError> {
        let v = v.unwrap_or(default);
        if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
            return Err(self.err(key, "must be a number of seconds between 0 and 86400"));
        }
        Ok(Duration::from_secs_f64(v))
    }

    fn http_url(&self, key: &str, s: &str) -> Result<Uri, ConfigError> {
        let uri: Uri = s
            .parse()
            .map_err(|_| self.err(key, format!("\"{s}\" is not a valid URL")))?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => return Err(self.err(key, format!("\"{s}\" must start with https:// or http://"))),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(self.err(key, format!("\"{s}\" has no host")));
        }
        Ok(uri)
    }

    fn base_url(&self, key: &str, s: &str) -> Result<Uri, ConfigError> {
        let uri = self.http_url(key, s)?;
        if uri.query().is_some() {
            return Err(self.err(key, "must not have a query"));
        }
        // Keep the base path without its trailing '/', so joining with a request path
        // (which starts with '/') never doubles it.
        let path = uri.path().trim_end_matches('/').to_string();
        let mut parts = uri.into_parts();
        parts.path_and_query = Some(
            if path.is_empty() { "/" } else { path.as_str() }
                .parse()
                .map_err(|_| self.err(key, "has an invalid path"))?,
        );
        Uri::from_parts(parts).map_err(|_| self.err(key, "is not a valid URL"))
    }

    fn prefix(&self, key: &str, s: &str) -> Result<String, ConfigError> {
        if !s.starts_with('/') {
            return Err(self.err(key, format!("\"{s}\" must start with '/'")));
        }
        if s.contains("//")
            || s.split('/').any(|seg| seg == "." || seg == "..")
            || s.contains(['?', '#', '%'])
        {
            return Err(self.err(key, format!("\"{s}\" must be a plain path such as /cxone")));
        }
        let trimmed = s.trim_end_matches('/');
        Ok(if trimmed.is_empty() {
            "/".into()
        } else {
            trimmed.into()
        })
    }
}

/// A 32-byte key written as 64 hex digits or as base64 (standard or URL-safe, padded or not).
fn parse_key(text: &str) -> Option<[u8; 32]> {
    use base64::Engine as _;
    let engines = [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::STANDARD_NO_PAD,
        &base64::engine::general_purpose::URL_SAFE,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    let bytes = (text.len() == 64)
        .then(|| hex::decode(text).ok())
        .flatten()
        .or_else(|| engines.iter().find_map(|e| e.decode(text).ok()))?;
    bytes.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "ID" => Some("my-id".into()),
            "SECRET" => Some("super-secret-value".into()),
            _ => None,
        }
    }

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("proxy.toml"), &env)
    }

    const GENESYS: &str = r#"
[[upstream]]
name = "genesys"
provider = "genesys"
region = "eu_west_1"
client_id = "${ID}"
client_secret = "${SECRET}"
"#;

    #[test]
    fn genesys_region_sets_login_and_api_hosts() {
        let c = load(GENESYS).unwrap();
        let u = &c.upstreams[0];
        assert_eq!(
            u.grant.token_url.as_deref(),
            Some("https://login.mypurecloud.ie/oauth/token")
        );
        assert_eq!(
            u.base_url.as_ref().map(|b| b.to_string()).as_deref(),
            Some("https://api.mypurecloud.ie/")
        );
        assert_eq!(u.grant.client_id, "my-id");
        assert_eq!(u.prefix, "/");
    }

    #[test]
    fn unknown_key_is_an_error_naming_it() {
        let err = load(&format!("{GENESYS}\nclient_secrte = \"x\"\n"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("proxy.toml: "), "{err}");
        assert!(err.contains("client_secrte"), "{err}");
        assert!(err.contains("line"), "{err}");
    }

    #[test]
    fn missing_variable_is_named_and_no_secret_is_printed() {
        let text = GENESYS.replace("${ID}", "${NOPE}");
        let err = load(&text).unwrap_err().to_string();
        assert!(
            err.contains("environment variable NOPE is not set"),
            "{err}"
        );
        assert!(err.contains("upstream \"genesys\".client_id"), "{err}");
        let dbg = format!("{:?}", load(GENESYS).unwrap());
        assert!(!dbg.contains("super-secret-value"), "{dbg}");
    }

    #[test]
    fn unknown_region_lists_the_valid_ones() {
        let err = load(&GENESYS.replace("eu_west_1", "us-east-9"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("us-east-9") && err.contains("mx_central_1"),
            "{err}"
        );
    }

    #[test]
    fn toml_errors_name_the_place_and_never_quote_a_secret() {
        let secret = "Zq8!x-very-secret";
        for (text, key) in [
            (format!("[[upstream]]\nname = \"a\"\nclient_secret = \"{secret}\nprovider = \"genesys\"\n"), None),
            (format!("[[upstream]]\nname = \"a\"\ntokens = \"{secret}\"\n"), Some("tokens")),
            (format!("[[upstream]]\nname = \"a\"\nmax_connections = 987654321987654321987\nclient_secret = \"{secret}\"\n"), None),
            (format!("[[upstream]]\nname = \"a\"\nclient_secret = \"{secret}\" x\n"), None),
        ] {
            let err = Config::from_toml(&text, "p.toml".as_ref(), &|_| None)
                .unwrap_err()
                .to_string();
            assert!(!err.contains(secret) && !err.contains("Zq8"), "{err}");
            assert!(err.starts_with("p.toml: line "), "{err}");
            if let Some(key) = key {
                assert!(err.contains(&format!("key `{key}`")), "{err}");
            }
        }
    }

    #[test]
    fn anonymous_on_a_public_address_is_refused() {
        let text = format!("[server]\nlisten = \"0.0.0.0:8080\"\n{GENESYS}");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("allow_anonymous"), "{err}");
        let ok = format!("[server]\nlisten = \"0.0.0.0:8080\"\nallow_anonymous = true\n{GENESYS}");
        assert!(load(&ok).is_ok());
    }

    #[test]
    fn cache_takes_hex_or_base64_keys_and_names_bad_values_without_secrets() {
        let cache = |url: &str, key: &str| {
            load(&format!(
                "{GENESYS}\n[cache]\nredis_url = \"{url}\"\nencryption_key = \"{key}\"\n"
            ))
        };
        let hex_key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let b64_key = "ABEiM0RVZneImaq7zN3u/wARIjNEVWZ3iJmqu8zd7v8=";
        let a = cache("redis://:pw-123@10.0.0.5:6379/2", hex_key).unwrap();
        let b = cache("redis://:pw-123@10.0.0.5:6379/2", b64_key).unwrap();
        let (a, b) = (a.cache.unwrap(), b.cache.unwrap());
        assert!(a.same_as(&b), "the same 32 bytes either way");
        assert_eq!(a.redis_target, "10.0.0.5:6379");
        assert_eq!(a.key_prefix, "tokengate");
        let dbg = format!("{a:?}");
        assert!(
            !dbg.contains("pw-123") && !dbg.contains("0011223344"),
            "{dbg}"
        );

        let short = cache("redis://h:6379", "abcd").unwrap_err().to_string();
        assert!(
            short.contains("cache.encryption_key") && short.contains("32 bytes"),
            "{short}"
        );
        assert!(!short.contains("abcd"), "{short}");
        let bad_url = cache("http://:pw-123@h:6379", hex_key)
            .unwrap_err()
            .to_string();
        assert!(bad_url.contains("cache.redis_url"), "{bad_url}");
        assert!(!bad_url.contains("pw-123"), "{bad_url}");
        let missing = load(&format!("{GENESYS}\n[cache]\nredis_url = \"redis://h\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("cache.encryption_key") && missing.contains("required"),
            "{missing}"
        );
    }

    #[test]
    fn cache_key_changes_with_the_secret() {
        let a = load(GENESYS).unwrap().upstreams[0].grant.cache_key();
        let b = load(&GENESYS.replace("${SECRET}", "other"))
            .unwrap()
            .upstreams[0]
            .grant
            .cache_key();
        assert_ne!(a, b);
    }

    #[test]
    fn interpolation_handles_dollars() {
        let text = GENESYS.replace("${SECRET}", "a$$b$c${SECRET}");
        let c = load(&text).unwrap();
        assert_eq!(
            c.upstreams[0].grant.client_secret.expose_secret(),
            "a$b$csuper-secret-value"
        );
    }
}
