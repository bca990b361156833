//! Upstream tokens: obtained by the proxy, cached, refreshed ahead of expiry, shared.
//!
//! A [`TokenSource`] holds one upstream's current token. The hot path is one atomic load
//! ([`arc_swap`]) and a comparison of instants: no lock, no allocation. Minting happens
//! under a tokio `Mutex`, so concurrent requests that find no usable token wait for one
//! grant instead of starting their own (single flight), and the token endpoint — which has
//! its own rate limit — never sees a burst. Failed grants back off exponentially, with
//! jitter; while a usable token exists nobody waits for a grant at all.
//!
//! With `[cache]`, a source that needs a token asks the fleet first ([`shared`]): another
//! replica's token from Redis, or the fleet's lock and then a grant of its own, stored for
//! the others. Redis is never on the hot path, and never a reason for a request to fail.
//!
//! A token's life, for `expires_in = L`:
//! - usable until `L - min(L/10, 60 s)`: a margin for clock skew and time in flight;
//! - refreshed in the background from `min(L/4, 5 min)` before that.

pub mod grant;
pub mod shared;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use rand::Rng;
use secrecy::ExposeSecret;
use tokio::time::Instant;

use crate::config::{CacheConfig, GrantConfig};
use crate::metrics::Metrics;
use grant::{GrantError, Granter};
use shared::{FleetLock, SharedCache, SharedToken};

/// A bearer token, ready to be attached.
pub struct Token {
    /// `Bearer <token>`, marked sensitive so HTTP/2 never indexes it.
    header: HeaderValue,
    /// Tells tokens apart without comparing their values: a 401 names the one it rejected.
    pub generation: u64,
    pub obtained: Instant,
    pub refresh_at: Instant,
    pub usable_until: Instant,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("generation", &self.generation)
            .field("header", &"[redacted]")
            .field("usable_until", &self.usable_until)
            .finish()
    }
}

impl Token {
    pub fn header(&self) -> &HeaderValue {
        &self.header
    }

    pub fn is_usable(&self, now: Instant) -> bool {
        now < self.usable_until
    }

    fn due_for_refresh(&self, now: Instant) -> bool {
        now >= self.refresh_at
    }

    /// Lifetimes are measured from when the grant was *sent*, so time in flight only ever
    /// makes the proxy's idea of expiry earlier than the server's.
    fn new(header: HeaderValue, generation: u64, sent: Instant, lifetime: Duration) -> Token {
        let margin = (lifetime / 10).min(Duration::from_secs(60));
        let usable_until = sent + lifetime - margin;
        let lead = (lifetime / 4).min(Duration::from_secs(300));
        Token {
            header,
            generation,
            obtained: sent,
            refresh_at: usable_until - lead,
            usable_until,
        }
    }
}

/// Why no token could be had.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{cause}")]
pub struct TokenError {
    pub cause: GrantError,
    /// When the next grant will be attempted, if the source is backing off.
    pub retry_after: Option<Duration>,
}

/// What a caller needs from the cache.
#[derive(Debug, Clone, Copy)]
enum Want {
    /// Any token still usable.
    Usable,
    /// A usable token other than this one, which the upstream just rejected.
    Replacing(u64),
    /// A token not yet due for refresh (background refresh).
    Fresh,
}

impl Want {
    fn satisfied_by(self, t: &Token, now: Instant) -> bool {
        match self {
            Want::Usable => t.is_usable(now),
            Want::Replacing(g) => t.is_usable(now) && t.generation != g,
            Want::Fresh => t.is_usable(now) && !t.due_for_refresh(now),
        }
    }

    /// Can a caller make do with `t` when no new token can be had right now?
    fn tolerates(self, t: &Token, now: Instant) -> bool {
        match self {
            Want::Replacing(g) => t.is_usable(now) && t.generation != g,
            Want::Usable | Want::Fresh => t.is_usable(now),
        }
    }
}

/// While no usable token is held, a failed grant that may succeed on its own (the token
/// endpoint down, slow or rate limited) is tried again by the next call once it is this
/// old, however long the backoff has grown: service comes back within about this long of
/// the token endpoint. One probe at a time (the single flight), so at most one grant a
/// second reaches an endpoint that is failing.
const PROBE_AFTER: Duration = Duration::from_secs(1);

/// The longest a source waits for another replica's grant under the fleet lock.
const FOREIGN_LOCK_WAIT: Duration = Duration::from_secs(3);

#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    /// When the last grant failed.
    failed_at: Option<Instant>,
    until: Option<Instant>,
    last_error: Option<GrantError>,
    /// The last token the upstream rejected: the fleet's cache may still hold it, and it
    /// must not come back from there.
    rejected: Option<HeaderValue>,
    /// The generation of the last token minted to replace a rejected one.
    replacement: Option<u64>,
}

/// A token minted to replace a rejected one is not replaced again while it is younger than
/// this: the platform just issued it, so a 401 for it says more about the call than about
/// the token, and a caller that can provoke 401s must not make the proxy mint a token per
/// call (the token endpoint has its own rate limit, shared by every client).
const REPLACEMENT_MIN_AGE: Duration = Duration::from_secs(5);

impl Backoff {
    fn record(&mut self, error: GrantError, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        let exp = 1u64 << self.failures.saturating_sub(1).min(6); // 1 s … 64 s
        let base = Duration::from_secs(exp).min(Duration::from_secs(60));
        let jitter = rand::thread_rng().gen_range(0.8..1.2);
        self.until = Some(now + base.mul_f64(jitter));
        self.failed_at = Some(now);
        self.last_error = Some(error);
    }

    fn active(&self, now: Instant) -> Option<Duration> {
        self.until.filter(|u| *u > now).map(|u| u - now)
    }

    /// How long until a caller holding no usable token may probe with a grant of its own
    /// (see [`PROBE_AFTER`]); `None` when the backoff is not active or the last failure
    /// will not pass by itself (refused credentials wait out the whole backoff).
    fn probe_in(&self, now: Instant) -> Option<Duration> {
        self.active(now)?;
        if !self
            .last_error
            .as_ref()
            .is_some_and(GrantError::is_transient)
        {
            return None;
        }
        let since = now.saturating_duration_since(self.failed_at?);
        Some(PROBE_AFTER.saturating_sub(since))
    }

    /// What a caller with no usable token waits for: the backoff, or a probe sooner.
    fn wait_without_token(&self, now: Instant) -> Option<Duration> {
        let wait = self.active(now)?;
        Some(self.probe_in(now).map_or(wait, |probe| probe.min(wait)))
    }
}

/// Token sources by everything that shapes a grant ([`GrantConfig::cache_key`]): token URL,
/// client id, a hash of the secret, scope, parameters. Upstreams with the same credentials
/// share one token; a changed secret or scope is a different key, so it never gets a token
/// minted for the old one.
#[derive(Default)]
pub struct TokenCache {
    sources: Mutex<HashMap<(String, u32), Arc<TokenSource>>>,
    /// One per set of credentials: the tokens of a pool are minted one at a time, since
    /// the token endpoint has its own rate limit.
    pool_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The fleet's cache in Redis when `[cache]` is configured; swapped on reload.
    shared: Arc<ArcSwapOption<SharedCache>>,
}

impl TokenCache {
    /// Uses the fleet's cache `config` describes from now on (`None`: memory only). A
    /// reload that names the same Redis the same way keeps the connection.
    pub fn use_shared(
        &self,
        config: Option<&CacheConfig>,
        metrics: &Metrics,
    ) -> Result<(), String> {
        let current = self.shared.load_full();
        let next = match (config, current) {
            (None, _) => None,
            (Some(c), Some(cur)) if cur.config().same_as(c) => return Ok(()),
            (Some(c), _) => {
                tracing::info!(redis = %c.redis_target, "replicas share tokens through Redis");
                Some(Arc::new(SharedCache::new(c, metrics)?))
            }
        };
        self.shared.store(next);
        Ok(())
    }

    /// The fleet's cache in use, if any (for the status page).
    pub fn shared(&self) -> Option<Arc<SharedCache>> {
        self.shared.load_full()
    }

    /// The `index`th token source of the pool for `grant`, made on first use; `upstream`
    /// names it in logs and metrics.
    pub fn source_for(
        &self,
        upstream: &Arc<str>,
        grant: &GrantConfig,
        index: u32,
        http: &reqwest::Client,
        metrics: &Metrics,
    ) -> Arc<TokenSource> {
        let key = grant.cache_key();
        let pool_lock = Arc::clone(
            self.pool_locks
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .entry(key.clone())
                .or_default(),
        );
        let mut sources = self
            .sources
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let source = sources.entry((key.clone(), index)).or_insert_with(|| {
            let granter = Granter::new(http.clone(), grant.clone());
            let fleet = Fleet {
                shared: Arc::clone(&self.shared),
                cache_key: key.clone(),
                index,
            };
            TokenSource::new(
                Arc::clone(upstream),
                granter,
                metrics.clone(),
                pool_lock,
                fleet,
            )
        });
        Arc::clone(source)
    }
}

/// Where a token source stands in the fleet's cache (the default: in no fleet).
#[derive(Default)]
pub struct Fleet {
    /// Empty while no `[cache]` is configured.
    shared: Arc<ArcSwapOption<SharedCache>>,
    /// [`GrantConfig::cache_key`]: the credentials, hashed again before Redis sees them.
    cache_key: String,
    /// The place in the pool.
    index: u32,
}

/// What the fleet's cache gave.
enum FleetAnswer {
    /// A token another replica minted.
    Token(Arc<Token>),
    /// Nothing usable, and the fleet lock is ours: mint, store, release.
    Mint(Arc<SharedCache>, String, FleetLock),
    /// Redis is unavailable (or the lock was held too long): mint on our own.
    Alone,
}

/// One upstream's token cache.
pub struct TokenSource {
    upstream: Arc<str>,
    granter: Granter,
    metrics: Metrics,
    current: ArcSwapOption<Token>,
    /// Held while a grant is in flight: the single flight.
    minting: tokio::sync::Mutex<Backoff>,
    /// Shared by the sources of one pool: one grant at a time for the same credentials.
    pool_lock: Arc<tokio::sync::Mutex<()>>,
    /// The fleet's cache, and this source's place in it.
    fleet: Fleet,
    /// Set while a background refresh task exists, so the hot path spawns at most one.
    refreshing: AtomicBool,
    generations: AtomicU64,
    /// The API host discovery found with the last grant (CXone).
    api_base: ArcSwapOption<http::Uri>,
    grants_ok: AtomicU64,
    grants_failed: AtomicU64,
    last_failure: Mutex<Option<Failure>>,
}

/// The last failed grant, for the status page.
#[derive(Debug, Clone)]
pub struct Failure {
    pub at: std::time::SystemTime,
    pub error: GrantError,
}

/// A token source's state as an operator sees it. Nothing secret.
#[derive(Debug, Clone)]
pub struct TokenSnapshot {
    /// `valid`, `refreshing` (a grant is in flight), `failing` (no usable token and the
    /// last grant failed) or `none` (nothing obtained yet).
    pub state: &'static str,
    pub expires_in: Option<Duration>,
    pub age: Option<Duration>,
    pub grants_ok: u64,
    pub grants_failed: u64,
    pub last_failure: Option<Failure>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("upstream", &self.upstream)
            .field("granter", &self.granter)
            .finish()
    }
}

impl TokenSource {
    pub fn new(
        upstream: Arc<str>,
        granter: Granter,
        metrics: Metrics,
        pool_lock: Arc<tokio::sync::Mutex<()>>,
        fleet: Fleet,
    ) -> Arc<TokenSource> {
        Arc::new(TokenSource {
            upstream,
            granter,
            metrics,
            pool_lock,
            fleet,
            current: ArcSwapOption::empty(),
            minting: tokio::sync::Mutex::new(Backoff::default()),
            refreshing: AtomicBool::new(false),
            generations: AtomicU64::new(0),
            api_base: ArcSwapOption::empty(),
            grants_ok: AtomicU64::new(0),
            grants_failed: AtomicU64::new(0),
            last_failure: Mutex::new(None),
        })
    }

    /// The token to attach to a request. Waits only when no usable token exists.
    pub async fn token(self: &Arc<Self>) -> Result<Arc<Token>, TokenError> {
        let now = Instant::now();
        if let Some(t) = self.current.load_full() {
            if t.is_usable(now) {
                if t.due_for_refresh(now) {
                    self.refresh_in_background();
                }
                return Ok(t);
            }
        }
        // Boxed: the grant path's state is large and rarely needed; every call waiting
        // on a cached token would otherwise carry its size (about 2 KB each).
        Box::pin(self.obtain(Want::Usable)).await
    }

    /// A token to replace `rejected`, which the upstream answered with 401. Concurrent
    /// callers that saw the same rejection share one grant; a newer token is kept.
    pub async fn replace(self: &Arc<Self>, rejected: u64) -> Result<Arc<Token>, TokenError> {
        Box::pin(self.obtain(Want::Replacing(rejected))).await
    }

    /// The state of this source, for the status page.
    pub fn snapshot(&self) -> TokenSnapshot {
        let now = Instant::now();
        let usable = self.usable();
        let minting = self.minting.try_lock().is_err() || self.refreshing.load(Ordering::Relaxed);
        let last_failure = self
            .last_failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let state = match (&usable, minting, &last_failure) {
            (_, true, _) => "refreshing",
            (Some(_), false, _) => "valid",
            (None, false, Some(_)) => "failing",
            (None, false, None) => "none",
        };
        TokenSnapshot {
            state,
            expires_in: usable.as_ref().map(|t| t.usable_until - now),
            age: usable.as_ref().map(|t| now - t.obtained),
            grants_ok: self.grants_ok.load(Ordering::Relaxed),
            grants_failed: self.grants_failed.load(Ordering::Relaxed),
            last_failure,
        }
    }

    /// The API host the last grant's discovery found, if any.
    pub fn api_base(&self) -> Option<http::Uri> {
        self.api_base.load_full().map(|u| (*u).clone())
    }

    /// The current token if it is usable (for readiness), without any side effect.
    pub fn usable(&self) -> Option<Arc<Token>> {
        self.current
            .load_full()
            .filter(|t| t.is_usable(Instant::now()))
    }

    /// Keep a fresh token at all times, also when no request comes: so readiness holds and
    /// the first request after a quiet night does not wait. Runs until aborted.
    pub async fn keep_fresh(self: Arc<Self>) {
        loop {
            let wake = {
                let backoff = self.minting.lock().await;
                let now = Instant::now();
                match (self.usable(), backoff.active(now)) {
                    (None, Some(_)) => now + backoff.wait_without_token(now).unwrap_or_default(),
                    (_, Some(wait)) => now + wait,
                    (Some(t), None) => t.refresh_at,
                    (None, None) => now,
                }
            };
            tokio::time::sleep_until(wake).await;
            let _ = self.obtain(Want::Fresh).await;
        }
    }

    fn refresh_in_background(self: &Arc<Self>) {
        if self
            .refreshing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            if this.obtain(Want::Fresh).await.is_err() {
                // Stay the only refresher until the backoff ends, so the hot path does
                // not spawn a task per request meanwhile.
                let wait = this.minting.lock().await.active(Instant::now());
                if let Some(wait) = wait {
                    tokio::time::sleep(wait).await;
                }
            }
            this.refreshing.store(false, Ordering::Release);
        });
    }

    async fn obtain(self: &Arc<Self>, want: Want) -> Result<Arc<Token>, TokenError> {
        let mut backoff = self.minting.lock().await;
        let now = Instant::now();
        let current = self.current.load_full();
        // Someone else may have minted while we waited for the lock.
        if let Some(t) = current.as_ref().filter(|t| want.satisfied_by(t, now)) {
            return Ok(Arc::clone(t));
        }
        if let (Want::Replacing(g), Some(t)) = (want, current.as_ref()) {
            let young = now.saturating_duration_since(t.obtained) < REPLACEMENT_MIN_AGE;
            if t.generation == g && backoff.replacement == Some(g) && young && t.is_usable(now) {
                tracing::debug!(upstream = %self.upstream, generation = g, "a token minted seconds ago to replace a rejected one was rejected too; keeping it");
                return Ok(Arc::clone(t));
            }
        }
        // Discard the rejected token, and only it: a newer one would have satisfied us.
        if let (Want::Replacing(g), Some(t)) = (want, current.as_ref()) {
            if t.generation == g {
                backoff.rejected = Some(t.header.clone());
                self.current.store(None);
            }
        }
        let fallback = current.filter(|t| want.tolerates(t, now));
        let probe = fallback.is_none() && backoff.probe_in(now) == Some(Duration::ZERO);
        if let Some(wait) = backoff.active(now).filter(|_| !probe) {
            let wait = backoff.wait_without_token(now).unwrap_or(wait);
            return match fallback {
                Some(t) => Ok(t),
                None => Err(TokenError {
                    cause: backoff
                        .last_error
                        .clone()
                        .unwrap_or_else(|| GrantError::Unreachable("no grant attempted".into())),
                    retry_after: Some(wait),
                }),
            };
        }
        let pool_turn = self.pool_lock.lock().await;
        let fleet_turn = match self.ask_fleet(want, backoff.rejected.as_ref()).await {
            FleetAnswer::Token(token) => {
                self.current.store(Some(Arc::clone(&token)));
                *backoff = Backoff {
                    rejected: backoff.rejected.take(),
                    ..Backoff::default()
                };
                return Ok(token);
            }
            FleetAnswer::Mint(shared, creds, lock) => Some((shared, creds, lock)),
            FleetAnswer::Alone => None,
        };
        let sent = Instant::now();
        let sent_wall = std::time::SystemTime::now();
        let result = self.granter.grant().await;
        drop(pool_turn);
        let result = result.and_then(|granted| {
            let token = self.token_for(&granted.access_token, sent, granted.expires_in)?;
            Ok((granted, token))
        });
        match result {
            Ok((granted, token)) => {
                if let Some((shared, creds, lock)) = fleet_turn {
                    let for_fleet = SharedToken {
                        access_token: granted.access_token.clone(),
                        issued_at: sent_wall,
                        lifetime: granted.expires_in,
                        api_base: granted.api_base.as_ref().map(|u| u.to_string()),
                    };
                    let index = self.fleet.index;
                    // A failed store only means the others mint their own this time.
                    let _ = shared.put(&creds, index, &for_fleet).await;
                    shared.release(lock).await;
                }
                if let Some(base) = granted.api_base {
                    self.api_base.store(Some(Arc::new(base)));
                }
                self.current.store(Some(Arc::clone(&token)));
                *backoff = Backoff {
                    replacement: matches!(want, Want::Replacing(_)).then_some(token.generation),
                    ..Backoff::default()
                };
                self.metrics.grant(&self.upstream, "ok");
                self.grants_ok.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    upstream = %self.upstream,
                    generation = token.generation,
                    expires_in_secs = granted.expires_in.as_secs(),
                    "token granted"
                );
                Ok(token)
            }
            Err(cause) => {
                if let Some((shared, _, lock)) = fleet_turn {
                    shared.release(lock).await;
                }
                self.metrics.grant(&self.upstream, cause.outcome());
                self.grants_failed.fetch_add(1, Ordering::Relaxed);
                *self
                    .last_failure
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Failure {
                    at: std::time::SystemTime::now(),
                    error: cause.clone(),
                });
                backoff.record(cause.clone(), Instant::now());
                let retry_after = backoff.wait_without_token(Instant::now());
                tracing::warn!(
                    upstream = %self.upstream,
                    error = %cause,
                    retry_in_secs = retry_after.map(|d| d.as_secs_f32()),
                    "token grant failed"
                );
                match fallback {
                    Some(t) => Ok(t),
                    None => Err(TokenError { cause, retry_after }),
                }
            }
        }
    }

    /// A [`Token`] for a token string, lifetime measured from `sent`.
    fn token_for(
        &self,
        access_token: &secrecy::SecretString,
        sent: Instant,
        lifetime: Duration,
    ) -> Result<Arc<Token>, GrantError> {
        let header = HeaderValue::from_str(&format!("Bearer {}", access_token.expose_secret()));
        // The granter checked that the token fits a header; stay defensive anyway.
        let Ok(mut header) = header else {
            return Err(GrantError::NotOAuth {
                status: 200,
                api_code: None,
                what: "a token that cannot be sent in a header".into(),
            });
        };
        header.set_sensitive(true);
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        Ok(Arc::new(Token::new(header, generation, sent, lifetime)))
    }

    /// Looks for a token in the fleet's cache; while another replica holds the fleet lock,
    /// waits for its token rather than minting one more. Called with the pool's turn held.
    async fn ask_fleet(&self, want: Want, rejected: Option<&HeaderValue>) -> FleetAnswer {
        let fleet = &self.fleet;
        let Some(shared) = fleet.shared.load_full() else {
            return FleetAnswer::Alone;
        };
        let creds = shared.credentials_id(&fleet.cache_key);
        // A grant takes well under a second: a lock held longer than this is stuck, or held
        // on purpose by someone who can write to Redis; mint rather than wait out its lease.
        let deadline = Instant::now() + shared.lease().min(FOREIGN_LOCK_WAIT);
        loop {
            match shared.get(&creds, fleet.index).await {
                Err(_) => return FleetAnswer::Alone,
                Ok(found) => {
                    if let Some(t) = found.and_then(|f| self.adopt(f, want, rejected)) {
                        shared.count_taken();
                        return FleetAnswer::Token(t);
                    }
                }
            }
            match shared.try_lock(&creds).await {
                Err(_) => return FleetAnswer::Alone,
                Ok(Some(lock)) => {
                    // The holder before us may have stored its token between our read and
                    // our lock: look once more, or we would mint a second one.
                    if let Ok(Some(found)) = shared.get(&creds, fleet.index).await {
                        if let Some(t) = self.adopt(found, want, rejected) {
                            shared.release(lock).await;
                            shared.count_taken();
                            return FleetAnswer::Token(t);
                        }
                    }
                    return FleetAnswer::Mint(shared, creds, lock);
                }
                Ok(None) => {}
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    upstream = %self.upstream,
                    waited_secs = FOREIGN_LOCK_WAIT.as_secs(),
                    "another replica held the fleet's token lock too long; minting here"
                );
                return FleetAnswer::Alone;
            }
            // Grants take tens to hundreds of milliseconds; jitter keeps waiters apart.
            let pause = rand::thread_rng().gen_range(20..60);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
    }

    /// A token from the fleet's cache, if it gives this caller what it wants.
    fn adopt(
        &self,
        found: SharedToken,
        want: Want,
        rejected: Option<&HeaderValue>,
    ) -> Option<Arc<Token>> {
        let age = std::time::SystemTime::now()
            .duration_since(found.issued_at)
            .unwrap_or_default();
        let now = Instant::now();
        let sent = now.checked_sub(age)?;
        let token = self
            .token_for(&found.access_token, sent, found.lifetime)
            .ok()?;
        if !want.satisfied_by(&token, now) || rejected == Some(token.header()) {
            return None;
        }
        if let Some(base) = found.api_base.and_then(|b| b.parse::<http::Uri>().ok()) {
            self.api_base.store(Some(Arc::new(base)));
        }
        tracing::debug!(upstream = %self.upstream, generation = token.generation, "token taken from the shared cache");
        Some(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_shared_by_identical_grants_only() {
        let toml = |secret: &str, scope: &str| {
            format!(
                "[[upstream]]\nname = \"a\"\nprovider = \"oauth2\"\ntoken_url = \"http://127.0.0.1:1/t\"\nbase_url = \"http://127.0.0.1:1\"\nclient_id = \"id\"\nclient_secret = \"{secret}\"\n{scope}\n"
            )
        };
        let grant = |secret: &str, scope: &str| {
            let c =
                crate::config::Config::from_toml(&toml(secret, scope), "t.toml".as_ref(), &|_| {
                    None
                })
                .unwrap();
            c.upstreams[0].grant.clone()
        };
        let cache = TokenCache::default();
        let (http, metrics, name) = (reqwest::Client::new(), Metrics::new(), Arc::from("a"));
        let a = cache.source_for(&name, &grant("s1", ""), 0, &http, &metrics);
        let same = cache.source_for(&name, &grant("s1", ""), 0, &http, &metrics);
        let other_secret = cache.source_for(&name, &grant("s2", ""), 0, &http, &metrics);
        let other_scope =
            cache.source_for(&name, &grant("s1", "scope = \"x\""), 0, &http, &metrics);
        let second_of_pool = cache.source_for(&name, &grant("s1", ""), 1, &http, &metrics);
        assert!(!Arc::ptr_eq(&a, &second_of_pool));
        assert!(Arc::ptr_eq(&a, &same));
        assert!(!Arc::ptr_eq(&a, &other_secret));
        assert!(!Arc::ptr_eq(&a, &other_scope));
    }

    #[test]
    fn lifetimes_leave_margins() {
        let now = Instant::now();
        let t = Token::new(
            HeaderValue::from_static("Bearer x"),
            1,
            now,
            Duration::from_secs(2),
        );
        assert_eq!(t.usable_until - now, Duration::from_millis(1800));
        assert_eq!(t.refresh_at - now, Duration::from_millis(1300));
        let t = Token::new(
            HeaderValue::from_static("Bearer x"),
            1,
            now,
            Duration::from_secs(86400),
        );
        assert_eq!(t.usable_until - now, Duration::from_secs(86400 - 60));
        assert_eq!(t.refresh_at - now, Duration::from_secs(86400 - 360));
        assert!(!format!("{t:?}").contains("Bearer x"));
    }

    #[test]
    fn without_a_token_a_transient_failure_is_probed_after_a_second() {
        let now = Instant::now();
        let mut b = Backoff::default();
        for _ in 0..6 {
            b.record(GrantError::Timeout, now);
        }
        assert!(b.active(now).unwrap() > Duration::from_secs(20));
        assert_eq!(b.wait_without_token(now), Some(PROBE_AFTER));
        assert_eq!(b.probe_in(now + PROBE_AFTER), Some(Duration::ZERO));
        let mut refused = Backoff::default();
        refused.record(
            GrantError::NotOAuth {
                status: 200,
                api_code: None,
                what: "html".into(),
            },
            now,
        );
        assert_eq!(refused.probe_in(now + PROBE_AFTER), None);
    }

    #[test]
    fn backoff_grows_and_caps() {
        let now = Instant::now();
        let mut b = Backoff::default();
        let mut last = Duration::ZERO;
        for _ in 0..10 {
            b.record(GrantError::Timeout, now);
            let wait = b.active(now).unwrap();
            assert!(wait <= Duration::from_secs(73), "{wait:?}");
            last = wait;
        }
        assert!(last >= Duration::from_secs(48));
    }
}
