//! The proxy's request path, composed in one place. Read top to bottom: it is the order
//! in which a request meets each layer.

use std::sync::Arc;

use http::Request;
use hyper::body::Incoming;
use tower::ServiceBuilder;

use crate::body::{self, ProxyBody};
use crate::config::Config;
use crate::forward::Forward;
use crate::layers::bearer::BearerLayer;
use crate::layers::client_auth::ClientAuthLayer;
use crate::layers::deadline::DeadlineLayer;
use crate::layers::guard::GuardLayer;
use crate::layers::observe::ObserveLayer;
use crate::layers::retry::RetryLayer;
use crate::layers::route::RouteLayer;
use crate::layers::token_endpoint::TokenEndpointLayer;
use crate::metrics::Metrics;
use crate::server::HttpService;
use crate::session::Sessions;
use crate::status::StatusBoard;
use crate::upstream::Upstream;

/// Build the service that answers every request on the proxy listener.
pub fn proxy_service(
    config: &Config,
    upstreams: &[Arc<Upstream>],
    metrics: &Metrics,
    board: &Arc<StatusBoard>,
    sessions: &Arc<Sessions>,
) -> impl HttpService<Incoming> {
    ServiceBuilder::new()
        // One body type from here on: hyper's, limited, or a kept copy for a retry.
        .map_request(|req: Request<Incoming>| req.map(body::boxed))
        .service(request_path(config, upstreams, metrics, board, sessions))
}

/// The layers every request goes through, on the proxy's one body type (also what the
/// in-process benchmark drives).
pub fn request_path(
    config: &Config,
    upstreams: &[Arc<Upstream>],
    metrics: &Metrics,
    board: &Arc<StatusBoard>,
    sessions: &Arc<Sessions>,
) -> impl HttpService<ProxyBody> {
    ServiceBuilder::new()
        // Outermost, so that every answer is counted — including the proxy's own refusals.
        .layer(ObserveLayer::recording_to(metrics.clone(), board.clone()))
        // Refuse what must never be forwarded (CONNECT, absolute-form, oversized bodies)
        // before spending anything on it.
        .layer(GuardLayer::with_body_limit(config.server.max_body_bytes))
        // Legacy apps doing OAuth get a session token from the proxy itself, never the
        // upstream's; before client auth, because the request carries Basic credentials.
        .layer(TokenEndpointLayer::answering_at(
            &config.server.token_paths,
            &config.clients,
            sessions.clone(),
            config.server.session_lifetime,
        ))
        // Who is calling; strips the caller's credentials so they can never be forwarded.
        .layer(ClientAuthLayer::with_clients(
            &config.clients,
            sessions.clone(),
        ))
        // Where it goes, and whether this caller may go there.
        .layer(RouteLayer::by_prefix(upstreams))
        // The upstream's limit on the whole call, retries and token waits included.
        .layer(DeadlineLayer)
        // Outside the bearer layer, so a second attempt after a 401 gets a fresh token.
        .layer(RetryLayer::keeping_bodies_up_to(
            config.server.retry_body_bytes,
            metrics.clone(),
        ))
        // The upstream's cached token, in place of whatever the caller sent.
        .layer(BearerLayer)
        // To the configured upstream host, streaming both ways.
        .service(Forward)
}
