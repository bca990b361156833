//! Token sources shared by every upstream with the same credentials, and the fleet's
//! Redis cache they use when `[cache]` is configured.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;

use super::grant::Granter;
use super::shared::SharedCache;
use super::source::{Fleet, TokenSource};
use crate::config::{CacheConfig, GrantConfig};
use crate::telemetry::metrics::Metrics;

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

    /// The fleet's cache as it will be after any reload (empty while none is configured).
    pub fn shared_handle(&self) -> Arc<ArcSwapOption<SharedCache>> {
        Arc::clone(&self.shared)
    }

    /// The `index`th token source of the pool for `grant`, made on first use; `upstream`
    /// names it in logs and metrics.
    pub fn source_for(
        &self,
        upstream: &Arc<str>,
        grant: &GrantConfig,
        index: u32,
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
        // Sources differ by their way out too (a reload that changes `ca_file` or the
        // egress proxy gets a granter with the new client); the fleet shares by `key`.
        let local = format!("{key}/{}", grant.transport_key);
        let source = sources.entry((local, index)).or_insert_with(|| {
            let granter = Granter::new(grant.clone());
            let fleet = Fleet {
                shared: Arc::clone(&self.shared),
                cache_key: key.clone(),
                index,
                newest: Default::default(),
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
