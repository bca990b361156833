//! One token source: the current token, single-flight minting, background refresh, the
//! fleet's cache, and what the status page shows of it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use rand::Rng;
use secrecy::ExposeSecret;
use tokio::time::Instant;

use super::backoff::{Backoff, Want, FOREIGN_LOCK_WAIT};
use super::failure_log::{Failure, FailureLog};

pub(super) mod snapshot;
use super::grant::{GrantError, Granter};
use super::issued::{Token, TokenError};
use super::rejection::{Check, Rejection};
use super::shared::{FleetLock, SharedCache, SharedToken};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::traces::GrantSpan;

/// Where a token source stands in the fleet's cache (the default: in no fleet).
#[derive(Default)]
pub struct Fleet {
    /// Empty while no `[cache]` is configured.
    pub(super) shared: Arc<ArcSwapOption<SharedCache>>,
    /// [`GrantConfig::cache_key`]: the credentials, hashed again before Redis sees them.
    ///
    /// [`GrantConfig::cache_key`]: crate::config::GrantConfig::cache_key
    pub(super) cache_key: String,
    /// The place in the pool.
    pub(super) index: u32,
    /// The newest fleet generation this source has seen stored for its place: a value
    /// older than that is a replay (someone who can write to Redis, but has not the key,
    /// putting back a token the fleet has moved on from) and is never taken.
    pub(super) newest: AtomicU64,
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
    /// The org's idle timeout as last learned, in ms (0: none): new tokens are held to it.
    idle_ms: AtomicU64,
    /// What the log said of failing grants.
    failure_log: Mutex<FailureLog>,
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
            failure_log: Mutex::default(),
            idle_ms: AtomicU64::new(0),
        })
    }

    /// The org's idle timeout, as the platform told it with token `generation`: that
    /// token and every later one are held to it (see [`Token::idles_at`]).
    pub fn learned_idle_timeout(&self, idle: Option<Duration>) {
        let ms = idle.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.idle_ms.store(ms, Ordering::Relaxed);
        if let Some(t) = self.current.load_full() {
            t.set_idle_timeout(idle);
        }
    }

    /// The cached token if it is usable at `now` (and a refresh started in the background
    /// if it is due): the usual case, with nothing to wait for.
    pub fn ready(self: &Arc<Self>, now: Instant) -> Option<Arc<Token>> {
        let t = self.current.load_full()?;
        if !t.is_usable(now) {
            return None;
        }
        if t.due_for_refresh(now) {
            self.refresh_in_background();
        }
        Some(t)
    }

    /// The token to attach to a request. Waits only when no usable token exists.
    pub async fn token(self: &Arc<Self>) -> Result<Arc<Token>, TokenError> {
        if let Some(t) = self.ready(Instant::now()) {
            return Ok(t);
        }
        // Boxed: the grant path's state is large and rarely needed; every call waiting
        // on a cached token would otherwise carry its size (about 2 KB each).
        Box::pin(self.obtain(Want::Usable)).await
    }

    /// A token to replace `rejected`, which the upstream answered with 401 at `seen_at`,
    /// unless the platform still accepts it (`check` asks; see [`super::rejection`]).
    /// Concurrent callers that saw the same rejection share one question and one grant; a
    /// newer token is kept.
    pub async fn replace(
        self: &Arc<Self>,
        rejected: u64,
        seen_at: Instant,
        check: Option<Check>,
    ) -> Rejection<Result<Arc<Token>, TokenError>> {
        let mut backoff = self.minting.lock().await;
        if let Some(t) = self.current.load_full() {
            if t.generation == rejected && t.is_usable(Instant::now()) {
                let replace = backoff
                    .judge
                    .should_replace(rejected, t.header(), seen_at, check)
                    .await;
                if !replace {
                    tracing::debug!(upstream = %self.upstream, generation = rejected, "the platform answered 401 for a token it still accepts (or replacements are spent for now); keeping the token");
                    return Rejection::Stands;
                }
            }
        }
        Rejection::Replaced(Box::pin(self.obtain_with(backoff, Want::Replacing(rejected))).await)
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
                    // Before it idles too: the first call after a quiet hour must not pay.
                    (Some(t), None) => t.refresh_at.min(t.idles_at()),
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
        let backoff = self.minting.lock().await;
        self.obtain_with(backoff, want).await
    }

    /// [`Self::obtain`], with the single flight's lock already held.
    async fn obtain_with(
        self: &Arc<Self>,
        mut backoff: tokio::sync::MutexGuard<'_, Backoff>,
        want: Want,
    ) -> Result<Arc<Token>, TokenError> {
        let now = Instant::now();
        let current = self.current.load_full();
        // Someone else may have minted while we waited for the lock.
        if let Some(t) = current.as_ref().filter(|t| want.satisfied_by(t, now)) {
            crate::telemetry::traces::waited_for_grant(t.grant_span.as_ref());
            return Ok(Arc::clone(t));
        }
        // Discard the rejected token, and only it: a newer one would have satisfied us.
        if let (Want::Replacing(g), Some(t)) = (want, current.as_ref()) {
            if t.generation == g {
                backoff.rejected = Some(t.header().clone());
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
                let rejected = backoff.rejected.take();
                backoff.succeeded();
                backoff.rejected = rejected;
                return Ok(token);
            }
            FleetAnswer::Mint(shared, creds, lock) => Some((shared, creds, lock)),
            FleetAnswer::Alone => None,
        };
        let sent = Instant::now();
        let sent_wall = std::time::SystemTime::now();
        let span = GrantSpan::begin(&self.upstream);
        let result = self.granter.grant().await;
        drop(pool_turn);
        let result = result.and_then(|granted| {
            let token = self.token_for(
                &granted.access_token,
                sent,
                granted.expires_in,
                span.context(),
            )?;
            Ok((granted, token))
        });
        span.end(
            result
                .as_ref()
                .err()
                .map(|cause| (cause.outcome(), cause.for_caller())),
        );
        match result {
            Ok((granted, token)) => {
                if let Some((shared, creds, lock)) = fleet_turn {
                    // One past the newest this source has seen: replicas that took that
                    // one take this one, and refuse anything older from then on.
                    let generation = self.fleet.newest.load(Ordering::Acquire) + 1;
                    self.fleet.newest.fetch_max(generation, Ordering::AcqRel);
                    let for_fleet = SharedToken {
                        access_token: granted.access_token.clone(),
                        issued_at: sent_wall,
                        lifetime: granted.expires_in,
                        api_base: granted.api_base.as_ref().map(|u| u.to_string()),
                        generation,
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
                backoff.succeeded();
                self.metrics.grant(&self.upstream, "ok");
                self.grants_ok.fetch_add(1, Ordering::Relaxed);
                let recovered = self
                    .failure_log
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .recovered(&self.upstream);
                if !recovered {
                    tracing::info!(
                        upstream = %self.upstream,
                        generation = token.generation,
                        expires_in_secs = granted.expires_in.as_secs(),
                        "token granted"
                    );
                }
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
                self.failure_log
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .failed(&self.upstream, &cause, retry_after);
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
        grant_span: Option<opentelemetry::trace::SpanContext>,
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
        let mut token = Token::new(header, generation, sent, lifetime);
        token.grant_span = grant_span;
        let idle = self.idle_ms.load(Ordering::Relaxed);
        token.set_idle_timeout((idle > 0).then(|| Duration::from_millis(idle)));
        Ok(Arc::new(token))
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
        // Sealed with the fleet's key, so only a replica could have written it; but a value
        // can be copied back. One older than a token already seen here is such a copy.
        let newest = self
            .fleet
            .newest
            .fetch_max(found.generation, Ordering::AcqRel);
        if found.generation < newest {
            tracing::warn!(
                upstream = %self.upstream,
                stored = found.generation,
                seen = newest,
                "the shared cache holds a token older than one this replica already had (a value written back into Redis?); not taking it"
            );
            return None;
        }
        let age = std::time::SystemTime::now()
            .duration_since(found.issued_at)
            .unwrap_or_default();
        let now = Instant::now();
        let sent = now.checked_sub(age)?;
        let token = self
            .token_for(&found.access_token, sent, found.lifetime, None)
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
