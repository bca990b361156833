//! The proxy's request path, composed in one place. Read top to bottom: it is the order
//! in which a request meets each layer.
//!
//! Two halves. The front half is shared by every call: observe → guard → token_endpoint →
//! client_auth → route. The router hands each call to the back half of its upstream, built
//! once per upstream and per worker with that upstream's settings baked in (linkerd2-proxy's
//! `NewService<Target>`): deadline (only where `request_timeout_secs` is set) → retry (its
//! policy) → bearer (its token pool) → forward (this worker's connections to its host).
//! Nothing in a back half looks its upstream up per request.

use std::sync::Arc;

use http::Request;
use hyper::body::Incoming;
use tower::util::Either;
use tower::ServiceBuilder;

use crate::back::bearer::{Bearer, BearerLayer};
use crate::back::budget::{Budget, BudgetLayer};
use crate::back::deadline::{Deadline, DeadlineLayer};
use crate::back::forward::Forward;
use crate::back::notifications::{Channels, Notifications, NotificationsLayer};
use crate::back::retry::{Retry, RetryLayer};
use crate::config::Config;
use crate::front::client_auth;
use crate::front::guard;
use crate::front::jwt_callers::JwtCallersLayer;
use crate::front::observe::ObserveLayer;
use crate::front::route::{Destination, Router};
use crate::front::session::Sessions;
use crate::front::token_endpoint::TokenEndpointLayer;
use crate::http::body::{self, ProxyBody};
use crate::ingress::server::HttpService;
use crate::outbound::connections::Origin;
use crate::telemetry::board::StatusBoard;
use crate::telemetry::metrics::Metrics;
use crate::upstream::{Upstream, WorkerUpstream};

/// What one worker needs to build its request path: the config and what outlives a call.
pub struct Parts<'a> {
    pub config: &'a Config,
    pub upstreams: &'a [Arc<Upstream>],
    pub metrics: &'a Metrics,
    pub board: &'a Arc<StatusBoard>,
    pub sessions: &'a Arc<Sessions>,
    /// Open WebSockets, for `max_websockets`.
    pub sockets: &'a Arc<crate::back::websocket::Sockets>,
    /// Notification channels made through the proxy.
    pub channels: &'a Arc<Channels>,
}

/// Build the service that answers every request on worker `worker`'s proxy listener.
pub fn proxy_service(parts: &Parts<'_>, worker: usize) -> impl HttpService<Incoming> {
    ServiceBuilder::new()
        // One body type from here on: hyper's, limited, or a kept copy for a retry.
        // A request with no body (most) gets the empty body, which costs no allocation.
        .map_request(|req: Request<Incoming>| {
            req.map(|incoming| {
                if http_body::Body::is_end_stream(&incoming) {
                    body::empty()
                } else {
                    body::boxed(incoming)
                }
            })
        })
        .service(request_path(parts, worker))
}

/// The layers every request goes through, on the proxy's one body type (also what the
/// in-process benchmark drives).
pub fn request_path(parts: &Parts<'_>, worker: usize) -> impl HttpService<ProxyBody> {
    let Parts {
        config,
        upstreams,
        metrics,
        board,
        sessions,
        sockets,
        channels,
    } = *parts;
    let destinations = upstreams.iter().map(|upstream| {
        let upstream = WorkerUpstream::new(upstream, worker);
        Destination {
            service: upstream_service(&upstream, config, metrics, sockets, channels),
            upstream,
        }
    });
    ServiceBuilder::new()
        // Outermost, so that every answer is counted — including the proxy's own refusals.
        .layer(ObserveLayer::recording_to(metrics.clone(), board.clone()))
        // Refuse what must never be forwarded (CONNECT, absolute-form, oversized bodies)
        // before spending anything on it.
        .layer(guard::layer(config.server.max_body_bytes))
        // Legacy apps doing OAuth get a session token from the proxy itself, never the
        // upstream's; before client auth, because the request carries Basic credentials.
        .layer(TokenEndpointLayer::answering_at(
            &config.server.token_paths,
            &config.clients,
            sessions.clone(),
            config.server.session_lifetime,
        ))
        // A caller presenting a signed JWT of its workload identity (jwt_* clients).
        .layer(JwtCallersLayer::of(&config.clients))
        // Who is calling; strips the caller's credentials so they can never be forwarded.
        // (A notification channel's socket may come without a key: its channel id says
        // which client made it.)
        .layer(client_auth::layer(
            &config.clients,
            sessions.clone(),
            channels.clone(),
        ))
        // Where it goes, and whether this caller may go there; then on to that upstream's
        // own service.
        .service(Router::by_prefix(destinations))
}

/// Retry, the rate budget, bearer and forward, as every upstream has them.
type Attempts = Retry<Budget<Bearer<Forward>>>;

/// With a deadline on the whole call, or without one.
type Bounded = Either<Deadline<Attempts>, Attempts>;

/// One upstream's back half: with notification channels (Genesys), or without.
pub type UpstreamService = Either<Notifications<Bounded>, Bounded>;

/// The back half of `upstream`'s calls on its worker.
pub fn upstream_service(
    upstream: &WorkerUpstream,
    config: &Config,
    metrics: &Metrics,
    sockets: &Arc<crate::back::websocket::Sockets>,
    channels: &Arc<Channels>,
) -> UpstreamService {
    let limit = upstream.config.request_timeout;
    let notifications = upstream
        .config
        .streaming_url
        .as_ref()
        .and_then(Origin::of)
        .map(|streaming| {
            NotificationsLayer::new(upstream, Arc::new(streaming), config, channels, sockets)
        });
    ServiceBuilder::new()
        // Genesys notification channels: `connectUri` rewritten to the proxy, and the
        // channel's socket relayed to the streaming host.
        .option_layer(notifications)
        // The upstream's limit on the whole call, retries and token waits included.
        .option_layer(limit.map(|limit| DeadlineLayer::cutting_after(limit, upstream.name())))
        // Outside the bearer layer, so a second attempt after a 401 gets a fresh token.
        .layer(RetryLayer::for_upstream(
            &upstream.config,
            config.server.retry_body_bytes,
            metrics.clone(),
        ))
        // Room in the tokens' rate budget, in the caller's fair share; inside the retry
        // layer, so a second attempt spends budget too.
        .layer(BudgetLayer::of(upstream, metrics, &config.clients))
        // The upstream's cached token, in place of whatever the caller sent.
        .layer(BearerLayer::with_tokens_of(upstream))
        // To the upstream's host, over this worker's connections, streaming both ways.
        // (A WebSocket handshake gets a connection of its own, and its socket a relay.)
        .service(Forward::to(upstream, sockets))
}
