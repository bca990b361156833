//! What one config builds — upstreams, the request stack, the status board — and the
//! swap that replaces it on reload (SIGHUP) without dropping a request.
//!
//! The listeners serve [`Live`], which hands each request to the current [`Generation`].
//! A reload builds a new generation beside the old one and swaps it in atomically: new
//! requests meet the new config, requests in flight finish on the old one. Token sources
//! live in a [`TokenCache`] that outlives generations, keyed by everything that shapes a
//! grant, so an upstream whose credentials did not change keeps its token; the key that
//! signs session tokens outlives them too.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use tower::util::BoxCloneSyncService;
use tower::Service;

use crate::call::BoxFuture;
use crate::config::Config;
use crate::front::session::Sessions;
use crate::http::body::ProxyBody;
use crate::telemetry::board::StatusBoard;
use crate::telemetry::metrics::Metrics;
use crate::token::shared::SharedCache;
use crate::token::{TokenCache, TokenSource};
use crate::upstream::Upstream;

pub type ProxyService = BoxCloneSyncService<Request<Incoming>, Response<ProxyBody>, Infallible>;

/// Everything built from one config.
pub struct Generation {
    pub config: Arc<Config>,
    pub upstreams: Arc<[Arc<Upstream>]>,
    pub board: Arc<StatusBoard>,
    /// The request path, one per worker (each forwards over its own connections).
    pub services: Vec<ProxyService>,
    /// The fleet's token cache, when `[cache]` is configured.
    pub shared: Option<Arc<SharedCache>>,
    /// Open WebSockets and live notification channels (the process's, shown per generation).
    pub sockets: Arc<crate::back::websocket::Sockets>,
    pub channels: Arc<crate::back::notifications::Channels>,
}

impl Generation {
    /// The distinct token sources (upstreams with the same credentials share one).
    pub fn token_sources(&self) -> Vec<Arc<TokenSource>> {
        let mut sources: Vec<Arc<TokenSource>> = Vec::new();
        for t in self.upstreams.iter().flat_map(|u| u.tokens.iter()) {
            if !sources.iter().any(|s| Arc::ptr_eq(s, t)) {
                sources.push(Arc::clone(t));
            }
        }
        sources
    }
}

/// What outlives a generation: the token cache, sessions, sockets, channels, the metrics.
pub struct Builder {
    tokens: TokenCache,
    /// Signs the proxy's own session tokens; kept, so sessions survive a reload.
    sessions: Arc<Sessions>,
    /// Open WebSockets, counted across reloads.
    sockets: Arc<crate::back::websocket::Sockets>,
    /// Notification channels made through the proxy; kept across reloads.
    channels: Arc<crate::back::notifications::Channels>,
    metrics: Metrics,
    /// Usage per app, kept across reloads.
    usage: Arc<crate::telemetry::usage::Usage>,
    /// Each worker gets its own connection pool per upstream.
    workers: usize,
    /// The upstreams of the generation built last.
    upstreams: std::sync::Mutex<Arc<[Arc<Upstream>]>>,
}

impl Builder {
    pub fn new(metrics: Metrics, workers: usize) -> Builder {
        let tokens = TokenCache::default();
        Builder {
            workers,
            channels: crate::back::notifications::Channels::new(
                tokens.shared_handle(),
                metrics.clone(),
            ),
            tokens,
            sessions: Arc::new(Sessions::new()),
            sockets: crate::back::websocket::Sockets::new(metrics.clone()),
            metrics,
            usage: Arc::default(),
            upstreams: std::sync::Mutex::new(Arc::from(Vec::new())),
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    pub fn build(&self, config: Config) -> Generation {
        // The config checked the URL, so this fails only in ways it could not foresee.
        if let Err(why) = self.tokens.use_shared(config.cache.as_ref(), &self.metrics) {
            tracing::error!(error = %why, "cannot use the shared token cache; tokens stay in memory");
        }
        // The upstreams this config replaces: each successor of the same identity takes
        // over its connections and budget (see `Upstream::new`).
        let previous = Arc::clone(
            &self
                .upstreams
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let upstreams: Arc<[Arc<Upstream>]> = config
            .upstreams
            .iter()
            .map(|u| {
                let pool = (0..u.tokens)
                    .map(|i| self.tokens.source_for(&u.name, &u.grant, i, &self.metrics))
                    .collect();
                // With [cache], the fleet shares each token's rate budget through Redis.
                let fleet = crate::governor::FleetBudget {
                    shared: self.tokens.shared_handle(),
                    cache_key: u.grant.cache_key(),
                };
                let previous = previous.iter().find(|p| p.name() == &u.name);
                Arc::new(Upstream::new(
                    Arc::clone(u),
                    pool,
                    self.workers,
                    self.metrics.for_upstream(&u.name),
                    Some(fleet),
                    previous.map(|p| &**p),
                ))
            })
            .collect();
        *self
            .upstreams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::clone(&upstreams);
        self.usage.share(config.cache.is_some());
        let board = Arc::new(StatusBoard::new(
            config.upstreams.iter().map(|u| &u.name),
            &config.clients,
            Arc::clone(&self.usage),
        ));
        self.sockets
            .configure(config.server.max_websockets, config.server.websocket_idle);
        let parts = crate::stack::Parts {
            config: &config,
            upstreams: &upstreams,
            metrics: &self.metrics,
            board: &board,
            sessions: &self.sessions,
            sockets: &self.sockets,
            channels: &self.channels,
        };
        let services = (0..self.workers.max(1))
            .map(|worker| BoxCloneSyncService::new(crate::stack::proxy_service(&parts, worker)))
            .collect();
        Generation {
            config: Arc::new(config),
            upstreams,
            board,
            services,
            shared: self.tokens.shared(),
            sockets: Arc::clone(&self.sockets),
            channels: Arc::clone(&self.channels),
        }
    }
}

/// The current generation, swappable.
#[derive(Clone)]
pub struct Live(Arc<ArcSwap<Generation>>);

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Live")
    }
}

impl Live {
    pub fn new(generation: Generation) -> Live {
        Live(Arc::new(ArcSwap::from_pointee(generation)))
    }

    pub fn current(&self) -> Arc<Generation> {
        self.0.load_full()
    }

    pub fn swap(&self, generation: Generation) {
        self.0.store(Arc::new(generation));
    }

    /// The service worker `worker` serves: the current generation's request path for it.
    pub fn for_worker(&self, worker: usize) -> WorkerService {
        WorkerService {
            live: self.clone(),
            worker,
            serving: None,
        }
    }
}

/// What a worker's listener serves: each request meets the current generation's request
/// path built for this worker.
///
/// hyper gives each connection its own copy of this service, and the copy keeps the
/// request path it last used: a call costs a pointer comparison with the current
/// generation, not a clone of the whole stack (measured: that clone and its box were
/// about 3 % of the proxy's user time). After a reload a connection takes the new
/// generation at its next call; until then its copy keeps the old one alive.
#[derive(Clone)]
pub struct WorkerService {
    live: Live,
    worker: usize,
    serving: Option<(Arc<Generation>, ProxyService)>,
}

impl std::fmt::Debug for WorkerService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerService")
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

impl Service<Request<Incoming>> for WorkerService {
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        // No layer of the request path reserves anything in `poll_ready`: every one is
        // always ready (the router hands each call to a fresh clone of its upstream's
        // stack, driven to readiness by `oneshot`).
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Incoming>) -> BoxFuture {
        let current = self.live.0.load();
        let fresh =
            matches!(&self.serving, Some((generation, _)) if Arc::ptr_eq(generation, &current));
        if !fresh {
            let generation = arc_swap::Guard::into_inner(current);
            // A generation builds a service for every worker; the fallback is never taken.
            let services = &generation.services;
            let Some(service) = services.get(self.worker).or(services.first()).cloned() else {
                let e = crate::call::error::ProxyError::NoRoute;
                return Box::pin(async { Ok(e.into_response()) });
            };
            self.serving = Some((generation, service));
        }
        match &mut self.serving {
            Some((_, service)) => service.call(req),
            None => Box::pin(async { Ok(crate::call::error::ProxyError::NoRoute.into_response()) }),
        }
    }
}
