//! `[cache]`: the fleet's Redis, and the key that seals tokens stored there.

use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretBox, SecretString};

use super::cx::Cx;
use super::error::ConfigError;
use super::raw::RawCache;

/// `[cache]`: tokens shared by replicas through Redis, encrypted at rest.
#[derive(Clone)]
pub struct CacheConfig {
    /// Where Redis is: one server, or a master found through Sentinel.
    pub redis: RedisTarget,
    /// `host:port` (or socket path) of the Redis server, or the master's name and its
    /// sentinels: what logs name.
    pub redis_target: String,
    /// XChaCha20-Poly1305 key for the values stored in Redis.
    pub encryption_key: Arc<SecretBox<[u8; 32]>>,
    /// How long one Redis command may take before the proxy carries on without it.
    pub timeout: Duration,
    /// Prefix of every key the proxy writes, so several fleets can share one Redis.
    pub key_prefix: String,
}

/// How to reach the fleet's Redis. Addresses may carry a password, so they are secrets.
#[derive(Clone)]
pub enum RedisTarget {
    /// `redis_url`.
    Url(SecretString),
    /// `sentinels` and `master_name`: the master is asked of the sentinels, and asked
    /// again when it stops answering (a failover moves it).
    Sentinel {
        sentinels: Vec<SecretString>,
        master_name: String,
    },
}

impl RedisTarget {
    fn same_as(&self, other: &RedisTarget) -> bool {
        match (self, other) {
            (RedisTarget::Url(a), RedisTarget::Url(b)) => a.expose_secret() == b.expose_secret(),
            (
                RedisTarget::Sentinel {
                    sentinels: a,
                    master_name: m,
                },
                RedisTarget::Sentinel {
                    sentinels: b,
                    master_name: n,
                },
            ) => {
                m == n
                    && a.len() == b.len()
                    && a.iter()
                        .zip(b)
                        .all(|(x, y)| x.expose_secret() == y.expose_secret())
            }
            _ => false,
        }
    }
}

impl std::fmt::Debug for CacheConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheConfig")
            .field("redis_target", &self.redis_target)
            .field("redis", &"[redacted]")
            .field("encryption_key", &"[redacted]")
            .field("timeout", &self.timeout)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

impl CacheConfig {
    /// Whether two configs talk to the same Redis the same way (a reload keeps the client).
    pub fn same_as(&self, other: &CacheConfig) -> bool {
        self.redis.same_as(&other.redis)
            && self.encryption_key.expose_secret() == other.encryption_key.expose_secret()
            && self.timeout == other.timeout
            && self.key_prefix == other.key_prefix
    }
}

impl Cx<'_> {
    pub(super) fn cache(&self, mut raw: RawCache) -> Result<CacheConfig, ConfigError> {
        let (redis, redis_target) = self.redis_target(&mut raw)?;
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
            redis,
            redis_target,
            encryption_key: Arc::new(SecretBox::new(Box::new(encryption_key))),
            timeout,
            key_prefix,
        })
    }
}

impl Cx<'_> {
    /// `redis_url` (one server), or `sentinels` with `master_name`; and how logs name it.
    fn redis_target(&self, raw: &mut RawCache) -> Result<(RedisTarget, String), ConfigError> {
        // Messages name the scheme and the problem, never a URL: it may hold a password.
        let parse = |key: &str, url: &str| {
            redis::IntoConnectionInfo::into_connection_info(url).map_err(|e| {
                self.err(
                    key,
                    format!(
                        "is not a Redis URL such as redis://host:6379, rediss://:password@host:6380/0 or redis+unix:///path ({})",
                        e.category()
                    ),
                )
            })
        };
        match (
            raw.sentinels.take(),
            raw.redis_url.is_some() || raw.redis_url_file.is_some(),
        ) {
            (Some(_), true) => Err(self.err(
                "cache.sentinels",
                "set either redis_url (one Redis) or sentinels with master_name, not both",
            )),
            (Some(sentinels), false) => {
                let master_name = raw
                    .master_name
                    .take()
                    .filter(|m| !m.is_empty())
                    .ok_or_else(|| {
                        self.err(
                            "cache.master_name",
                            "is required with sentinels (the name the sentinels monitor)",
                        )
                    })?;
                if sentinels.is_empty() {
                    return Err(self.err("cache.sentinels", "lists no sentinel"));
                }
                let mut addrs = Vec::new();
                let mut urls = Vec::new();
                for (i, s) in sentinels.iter().enumerate() {
                    let s = self.interpolate(&format!("cache.sentinels[{i}]"), s)?;
                    // host:port, as sentinels are usually written, or a redis:// URL (with
                    // the password the sentinels and the master require).
                    let url = if s.contains("://") {
                        s
                    } else {
                        format!("redis://{s}")
                    };
                    let info = parse(&format!("cache.sentinels[{i}]"), &url)?;
                    addrs.push(info.addr().to_string());
                    urls.push(SecretString::from(url));
                }
                let target = format!("sentinel {master_name} via {}", addrs.join(","));
                Ok((
                    RedisTarget::Sentinel {
                        sentinels: urls,
                        master_name,
                    },
                    target,
                ))
            }
            (None, _) => {
                if raw.master_name.is_some() {
                    return Err(self.err("cache.master_name", "is used with sentinels only"));
                }
                let url = self.secret(
                    "cache.redis_url",
                    raw.redis_url.take(),
                    raw.redis_url_file.take(),
                )?;
                let info = parse("cache.redis_url", url.expose_secret())?;
                Ok((RedisTarget::Url(url), info.addr().to_string()))
            }
        }
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
