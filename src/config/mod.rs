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

mod cache;
mod client;
mod cx;
mod egress;
mod error;
mod events;
mod grant;
mod jwt;
pub mod policy;
pub mod providers;
mod raw;
mod server;
mod signing;
mod telemetry;
pub use signing::signing_key;
#[cfg(test)]
mod tests;
mod upstream;
mod values;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use cache::{CacheConfig, RedisTarget};
pub use client::{rfc3339, ClientConfig, ClientKey, KEY_WARNING};
use cx::Cx;
pub use cx::Env;
use error::toml_error;
pub use error::ConfigError;
pub use events::EventsConfig;
pub use grant::{GrantConfig, GrantFlow, Secret};
pub use jwt::{is_loopback, JwksSource, JwtCaller};
use raw::RawConfig;
pub use raw::{AuthMethod, BasicEncoding, LogFormat, Readiness, SigningAlg};
pub use server::ServerConfig;
pub use signing::JwtSigning;
pub use telemetry::TelemetryConfig;
pub use upstream::{RateLimit, RouteLimit, UpstreamConfig, WebsocketToken};

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
    /// Where security events go (`[events]`).
    pub events: EventsConfig,
    /// OpenTelemetry traces (`[telemetry]`); `None`: off.
    pub telemetry: Option<TelemetryConfig>,
}

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
        // Every variable that is not set, in one error: not one per start.
        if let Ok(table) = text.parse::<toml::Table>() {
            let missing = values::missing_variables(&table, env);
            if let [(name, key)] = missing.as_slice() {
                return Err(ConfigError::new(
                    file,
                    format!("{key}: environment variable {name} is not set"),
                ));
            }
            if !missing.is_empty() {
                let list: Vec<String> = missing
                    .iter()
                    .map(|(name, key)| format!("{name} ({key})"))
                    .collect();
                return Err(ConfigError::new(
                    file,
                    format!(
                        "{} environment variables are not set: {}",
                        missing.len(),
                        list.join(", ")
                    ),
                ));
            }
        }
        let cx = Cx { file, env };
        cx.build(raw)
    }

    pub fn upstream(&self, name: &str) -> Option<&Arc<UpstreamConfig>> {
        self.upstreams.iter().find(|u| u.name.as_ref() == name)
    }

    /// The client keys that have expired, or expire within `within` of `now`: the client's
    /// name, the key, and how long it has left (`Err`: how long ago it ended).
    pub fn keys_expiring(
        &self,
        now: SystemTime,
        within: Duration,
    ) -> Vec<(&Arc<str>, &ClientKey, Result<Duration, Duration>)> {
        let mut out = Vec::new();
        for c in &self.clients {
            for k in &c.keys {
                let Some(t) = k.not_after else { continue };
                let left = t.duration_since(now).map_err(|e| e.duration());
                if left.is_err() || left.is_ok_and(|l| l <= within) {
                    out.push((&c.name, k, left));
                }
            }
        }
        out
    }

    /// The notification channels `client` may hold on `upstream`: its `max_channels`, else
    /// an equal part of the upstream's channels among the clients allowed there (at least
    /// one). `None`: the upstream's channels are not counted.
    pub fn channel_share(&self, upstream: &UpstreamConfig, client: &ClientConfig) -> Option<u32> {
        let total = upstream.notification_channels?;
        if let Some(max) = client.max_channels {
            return Some(max);
        }
        let sharing = self
            .clients
            .iter()
            .filter(|c| c.may_use(&upstream.name))
            .count()
            .max(1) as u32;
        Some((total / sharing).max(1))
    }
}

impl Cx<'_> {
    fn build(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        let cache = raw.cache.map(|c| self.cache(c)).transpose()?;
        let events = self.events(raw.events)?;
        let telemetry = self.telemetry(raw.telemetry)?;
        let server = self.server(raw.server)?;
        if raw.upstream.is_empty() {
            return Err(self.err("[[upstream]]", "at least one upstream is required"));
        }
        let mut upstreams: Vec<Arc<UpstreamConfig>> = Vec::new();
        for (i, u) in raw.upstream.into_iter().enumerate() {
            let up = self.upstream(i, u, &server)?;
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
            let client = self.client(i, c, &upstreams, &server)?;
            if clients.iter().any(|o| o.name == client.name) {
                return Err(self.err(
                    &format!("client[{i}].name"),
                    format!("the name \"{}\" is used twice", client.name),
                ));
            }
            let shared_key = |o: &Arc<ClientConfig>| {
                o.keys
                    .iter()
                    .any(|k| client.keys.iter().any(|c| c.sha256 == k.sha256))
            };
            if clients.iter().any(shared_key) {
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
        let log_format = raw.log.format.unwrap_or(LogFormat::Text);
        Ok(Config {
            source: self.file.to_path_buf(),
            server,
            log_format,
            upstreams,
            clients,
            cache,
            events,
            telemetry,
        })
    }
}
