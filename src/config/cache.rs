//! `[cache]`: the fleet's Redis, and the key that seals tokens stored there.

use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretBox, SecretString};

use super::raw::RawCache;
use super::{ConfigError, Cx};

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

impl Cx<'_> {
    pub(super) fn cache(&self, raw: RawCache) -> Result<CacheConfig, ConfigError> {
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
