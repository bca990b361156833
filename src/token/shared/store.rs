//! The cache itself: the connection to Redis (one server, or a master found through
//! Sentinel), the fleet's lock, and tokens stored and read sealed. What else the fleet
//! shares through it is in `budget` (rate-limit windows) and `usage` (calls per app);
//! how a token is sealed is in `seal`.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use chacha20poly1305::aead::KeyInit;
use chacha20poly1305::XChaCha20Poly1305;
use rand::RngCore;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use secrecy::{ExposeSecret, SecretString};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use super::scripts::RELEASE;
use crate::config::{CacheConfig, RedisTarget};
use crate::telemetry::metrics::Metrics;

/// How long the cache is left alone after a failed command.
const COOL_OFF: Duration = Duration::from_secs(5);
/// A token as the fleet shares it.
pub struct SharedToken {
    pub access_token: SecretString,
    /// Wall-clock time the grant was sent: replicas share no monotonic clock.
    pub issued_at: SystemTime,
    pub lifetime: Duration,
    /// CXone: the tenant's API host discovery found.
    pub api_base: Option<String>,
    /// Counts the tokens the fleet minted for this place, sealed with the token, so a
    /// replica can tell a stored value older than one it already had (see `adopt`).
    pub generation: u64,
}

/// Redis could not be used this time; the caller carries on without it.
#[derive(Debug)]
pub struct Unavailable;

/// A held fleet lock; give it back with [`SharedCache::release`].
pub struct FleetLock {
    pub(super) key: String,
    pub(super) value: String,
}

/// The connection to Redis: to one server, or to the master the sentinels name.
enum Redis {
    Direct(ConnectionManager),
    Sentinel {
        // Boxed: the sentinel client is large, and one per process.
        sentinels: Box<tokio::sync::Mutex<redis::sentinel::SentinelClient>>,
        /// The master's connection, until a command fails (then the sentinels are asked
        /// again).
        master: arc_swap::ArcSwapOption<ConnectionManager>,
        manager_config: ConnectionManagerConfig,
    },
}

pub struct SharedCache {
    pub(super) config: CacheConfig,
    redis: Redis,
    pub(super) cipher: XChaCha20Poly1305,
    /// How long a minting replica holds the fleet lock at most.
    pub(super) lease: Duration,
    /// The hour whose usage hash this replica last gave its lifetime (see `add_usage`).
    pub(super) usage_dated: AtomicU64,
    cool_off_until: Mutex<Option<Instant>>,
    /// Set while an outage has been logged, so it is logged once, and the return once.
    pub(super) down: AtomicBool,
    /// `tokengate_shared_cache_up`.
    up: prometheus_client::metrics::gauge::Gauge,
    /// Tokens this replica took from the fleet, and stored for it.
    pub(super) taken: AtomicU64,
    pub(super) stored: AtomicU64,
}

impl std::fmt::Debug for SharedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCache")
            .field("redis", &self.config.redis_target)
            .finish()
    }
}

impl SharedCache {
    /// Connects lazily: a Redis that is down at start is an outage like any other. Call
    /// within the tokio runtime (the connection manager spawns its task there).
    pub fn new(config: &CacheConfig, metrics: &Metrics) -> Result<SharedCache, String> {
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let redis = match &config.redis {
            RedisTarget::Url(url) => {
                let client = redis::Client::open(url.expose_secret())
                    .map_err(|e| format!("cache.redis_url: {}", e.category()))?;
                Redis::Direct(
                    ConnectionManager::new_lazy_with_config(client, manager_config)
                        .map_err(|e| format!("cache.redis_url: {}", e.category()))?,
                )
            }
            RedisTarget::Sentinel {
                sentinels,
                master_name,
            } => {
                let urls: Vec<&str> = sentinels.iter().map(|u| u.expose_secret()).collect();
                // The master takes the password (and TLS) the sentinels' addresses carry.
                let first = redis::IntoConnectionInfo::into_connection_info(urls[0])
                    .map_err(|e| format!("cache.sentinels: {}", e.category()))?;
                let node = redis::sentinel::SentinelNodeConnectionInfo::default()
                    .set_redis_connection_info(first.redis_settings().clone());
                let client = redis::sentinel::SentinelClient::build(
                    urls,
                    master_name,
                    Some(node),
                    redis::sentinel::SentinelServerType::Master,
                )
                .map_err(|e| format!("cache.sentinels: {}", e.category()))?;
                Redis::Sentinel {
                    sentinels: Box::new(tokio::sync::Mutex::new(client)),
                    master: arc_swap::ArcSwapOption::empty(),
                    manager_config,
                }
            }
        };
        let cipher = XChaCha20Poly1305::new(config.encryption_key.expose_secret().into());
        let up = metrics.shared_cache_up(&config.redis_target);
        up.set(1);
        Ok(SharedCache {
            up,
            taken: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            config: config.clone(),
            redis,
            cipher,
            // Longer than the slowest grant (three side calls of at most 15 s would be
            // extreme; one is the norm), short enough that a dead holder is soon forgotten.
            lease: Duration::from_secs(20),
            usage_dated: AtomicU64::new(0),
            cool_off_until: Mutex::new(None),
            down: AtomicBool::new(false),
        })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.config
    }

    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// Whether the last command reached Redis.
    pub fn is_up(&self) -> bool {
        !self.down.load(Ordering::Acquire)
    }

    /// Counts a token taken from the fleet instead of minted.
    pub fn count_taken(&self) {
        self.taken.fetch_add(1, Ordering::Relaxed);
    }

    /// Tokens taken from the fleet and stored for it by this replica.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.taken.load(Ordering::Relaxed),
            self.stored.load(Ordering::Relaxed),
        )
    }

    /// The part of every key that names a set of credentials: a hash, so Redis never
    /// sees a client id or anything derived from a secret that could be tested offline.
    pub fn credentials_id(&self, cache_key: &str) -> String {
        let mut h = Sha256::new();
        h.update(self.config.key_prefix.as_bytes());
        h.update([0]);
        h.update(cache_key.as_bytes());
        hex::encode(&h.finalize()[..16])
    }

    pub(super) fn token_key(&self, creds: &str, index: u32) -> String {
        format!("{}:token:{creds}:{index}", self.config.key_prefix)
    }

    pub(super) fn lock_key(&self, creds: &str) -> String {
        format!("{}:lock:{creds}", self.config.key_prefix)
    }

    /// The fleet's token for this pool slot, if one is stored and opens with our key.
    pub async fn get(&self, creds: &str, index: u32) -> Result<Option<SharedToken>, Unavailable> {
        let key = self.token_key(creds, index);
        let mut redis = self.connection().await?;
        let value: Option<Vec<u8>> = self
            .run(redis::cmd("GET").arg(&key).query_async(&mut redis))
            .await?;
        Ok(value.and_then(|v| self.open(&key, &v)))
    }

    /// Stores a freshly minted token for the fleet, until its life ends.
    pub async fn put(
        &self,
        creds: &str,
        index: u32,
        token: &SharedToken,
    ) -> Result<(), Unavailable> {
        let remaining = (token.issued_at + token.lifetime)
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        let ttl_ms = remaining.as_millis().min(u64::MAX as u128) as u64;
        if ttl_ms == 0 {
            return Ok(());
        }
        let key = self.token_key(creds, index);
        let Some(value) = self.seal(&key, token) else {
            // Never store a value that does not open (an empty one, say): the others mint.
            tracing::warn!("a token could not be sealed for the shared cache; not stored");
            return Ok(());
        };
        self.set_for(&key, value, ttl_ms).await?;
        self.stored.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// `SET key value PX ttl_ms`.
    async fn set_for(&self, key: &str, value: Vec<u8>, ttl_ms: u64) -> Result<(), Unavailable> {
        let mut redis = self.connection().await?;
        self.run(
            redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("PX")
                .arg(ttl_ms)
                .query_async::<()>(&mut redis),
        )
        .await
    }

    /// Stores `plain`, sealed like tokens, under `<prefix>:<name>` for `ttl`: what else the
    /// fleet shares (notification channels).
    pub async fn put_sealed(
        &self,
        name: &str,
        plain: &[u8],
        ttl: Duration,
    ) -> Result<(), Unavailable> {
        let key = format!("{}:{name}", self.config.key_prefix);
        let Some(value) = self.seal_bytes(&key, plain) else {
            return Ok(());
        };
        let ttl_ms = ttl.as_millis().min(u64::MAX as u128) as u64;
        self.set_for(&key, value, ttl_ms).await
    }

    /// What [`put_sealed`](Self::put_sealed) stored under `name`, if it opens.
    pub async fn get_sealed(&self, name: &str) -> Result<Option<Vec<u8>>, Unavailable> {
        let key = format!("{}:{name}", self.config.key_prefix);
        let mut redis = self.connection().await?;
        let value: Option<Vec<u8>> = self
            .run(redis::cmd("GET").arg(&key).query_async(&mut redis))
            .await?;
        Ok(value.and_then(|v| self.unseal(&key, &v)))
    }

    /// Takes the fleet lock for these credentials if nobody holds it.
    pub async fn try_lock(&self, creds: &str) -> Result<Option<FleetLock>, Unavailable> {
        let mut nonce = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let lock = FleetLock {
            key: self.lock_key(creds),
            value: hex::encode(nonce),
        };
        let mut redis = self.connection().await?;
        let taken: Option<String> = self
            .run(
                redis::cmd("SET")
                    .arg(&lock.key)
                    .arg(&lock.value)
                    .arg("NX")
                    .arg("PX")
                    .arg(self.lease.as_millis() as u64)
                    .query_async(&mut redis),
            )
            .await?;
        Ok(taken.map(|_| lock))
    }

    /// Gives the lock back, if it is still ours.
    pub async fn release(&self, lock: FleetLock) {
        let Ok(mut redis) = self.connection().await else {
            return;
        };
        let script = redis::Script::new(RELEASE);
        let mut call = script.key(&lock.key);
        call.arg(&lock.value);
        // A failure here costs the others at most the lease.
        let _ = self.run(call.invoke_async::<i64>(&mut redis)).await;
    }

    /// For `tokengate check`: reach Redis, and try every shared token stored under this
    /// prefix with this replica's key. `(tokens that open, tokens that do not)`, or why
    /// Redis could not be used.
    pub async fn probe(&self) -> Result<(usize, usize), String> {
        let mut redis = self
            .connection()
            .await
            .map_err(|_| "no Redis master could be reached".to_string())?;
        let work = async {
            redis::cmd("PING").query_async::<String>(&mut redis).await?;
            let pattern = format!("{}:token:*", self.config.key_prefix);
            let (mut opened, mut closed) = (0, 0);
            let mut cursor: u64 = 0;
            // Bounded: a fleet has a handful of tokens; a stranger's keyspace is not ours
            // to walk.
            for _ in 0..100 {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(100)
                    .query_async(&mut redis)
                    .await?;
                for key in keys {
                    let value: Option<Vec<u8>> =
                        redis::cmd("GET").arg(&key).query_async(&mut redis).await?;
                    match value.map(|v| self.unseal(&key, &v).is_some()) {
                        Some(true) => opened += 1,
                        Some(false) => closed += 1,
                        None => {}
                    }
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
            Ok::<_, redis::RedisError>((opened, closed))
        };
        match tokio::time::timeout(self.config.timeout * 10, work).await {
            Ok(Ok(counts)) => Ok(counts),
            Ok(Err(e)) => Err(format!("{} ({:?})", e.category(), e.kind())),
            Err(_) => Err(format!(
                "no answer within {} ms",
                (self.config.timeout * 10).as_millis()
            )),
        }
    }

    /// The connection to send a command on: the one server's, or the master's (asked of
    /// the sentinels when none is known, or the last command failed).
    pub(super) async fn connection(&self) -> Result<ConnectionManager, Unavailable> {
        let (sentinels, master, manager_config) = match &self.redis {
            Redis::Direct(m) => return Ok(m.clone()),
            Redis::Sentinel {
                sentinels,
                master,
                manager_config,
            } => (sentinels, master, manager_config),
        };
        if let Some(m) = master.load_full() {
            return Ok((*m).clone());
        }
        if self.cooling_off() {
            return Err(Unavailable);
        }
        let ask = async {
            let mut sentinels = sentinels.lock().await;
            // Another caller may have asked while this one waited for the lock.
            if let Some(m) = master.load_full() {
                return Ok((*m).clone());
            }
            let client = sentinels.async_get_client().await?;
            let m = ConnectionManager::new_lazy_with_config(client, manager_config.clone())?;
            master.store(Some(std::sync::Arc::new(m.clone())));
            Ok::<_, redis::RedisError>(m)
        };
        match tokio::time::timeout(self.config.timeout * 4, ask).await {
            Ok(Ok(m)) => Ok(m),
            Ok(Err(e)) => Err(self.failed(format!(
                "the sentinels named no reachable master: {} ({:?})",
                e.category(),
                e.kind()
            ))),
            Err(_) => Err(self.failed("the sentinels did not answer in time".into())),
        }
    }

    fn cooling_off(&self) -> bool {
        let until = self
            .cool_off_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        until.is_some_and(|u| Instant::now() < u)
    }

    /// A command failed: leave Redis alone for a while (and, with Sentinel, ask for the
    /// master again then); log the outage once.
    pub(super) fn failed(&self, why: String) -> Unavailable {
        self.up.set(0);
        *self
            .cool_off_until
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Instant::now() + COOL_OFF);
        if let Redis::Sentinel { master, .. } = &self.redis {
            master.store(None);
        }
        if !self.down.swap(true, Ordering::AcqRel) {
            tracing::warn!(
                redis = %self.config.redis_target,
                error = %why,
                "shared token cache unavailable; this replica mints and keeps its own tokens until it returns"
            );
        }
        Unavailable
    }

    /// Runs one command with the timeout and the cool-off; logs an outage once.
    pub(super) async fn run<T>(
        &self,
        command: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Unavailable> {
        if self.cooling_off() {
            return Err(Unavailable);
        }
        let outcome = match tokio::time::timeout(self.config.timeout, command).await {
            Ok(Ok(value)) => Ok(value),
            // Only the error's category and kind are logged: details could echo a command.
            Ok(Err(e)) => Err(format!("{} ({:?})", e.category(), e.kind())),
            Err(_) => Err(format!(
                "no answer within {} ms",
                self.config.timeout.as_millis()
            )),
        };
        match outcome {
            Ok(value) => {
                self.up.set(1);
                if self.down.swap(false, Ordering::AcqRel) {
                    tracing::info!(redis = %self.config.redis_target, "shared token cache reachable again; replicas share tokens again");
                }
                Ok(value)
            }
            Err(why) => Err(self.failed(why)),
        }
    }
}
