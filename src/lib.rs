//! tokengate: an authenticating reverse proxy for the Genesys Cloud and NICE CXone APIs.
//!
//! A legacy app points its base URL at the proxy and presents a team key; the proxy checks
//! the key, attaches a bearer token it obtained and caches itself, retries once on a 401
//! with a fresh token, and forwards the call to the platform's API host. The request's
//! path through the proxy is composed in [`stack`]; each layer lives in [`layers`].
//!
//! The binary is thin: it parses the command line, loads [`config::Config`], and calls
//! [`start`]. Tests drive the same function.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod body;
pub mod check;
pub mod config;
pub mod demo;
pub mod error;
pub mod forward;
pub mod keys;
pub mod layers;
pub mod metrics;
pub mod policy;
pub mod providers;
pub mod sandbox;
pub mod server;
pub mod session;
pub mod stack;
pub mod status;
pub mod token;
pub mod upstream;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::upstream::Upstream;

/// Why the proxy could not start (the config itself was valid).
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr} ({what}): {source}")]
pub struct StartError {
    what: &'static str,
    addr: SocketAddr,
    source: std::io::Error,
}

/// A proxy that is serving.
pub struct Running {
    /// Where the proxy listens (with the real port when the config said port 0).
    pub proxy_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    stop: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    refreshers: Vec<JoinHandle<()>>,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError { what, addr, source })
}

/// Bind the listeners and start serving.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let metrics = Metrics::new();
    let http = token::grant::side_call_client();
    let tokens = token::TokenCache::default();
    let upstreams: Arc<[Arc<Upstream>]> = config
        .upstreams
        .iter()
        .map(|u| {
            let source = tokens.source_for(&u.name, &u.grant, &http, &metrics);
            Arc::new(Upstream::new(Arc::clone(u), source))
        })
        .collect();

    let proxy_listener = bind("proxy", config.server.listen).await?;
    let admin_listener = match config.server.admin_listen {
        Some(addr) => Some(bind("admin", addr).await?),
        None => None,
    };
    let proxy_addr = proxy_listener.local_addr().unwrap_or(config.server.listen);
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());

    let board = Arc::new(status::StatusBoard::new(&config));
    let (stop, stopped) = watch::channel(false);
    let on_stop = move || {
        let mut rx = stopped.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let grace = config.server.shutdown_grace;
    let limits = server::ConnectionLimits {
        max_connections: config.server.max_connections,
        max_per_address: config.server.max_connections_per_address,
    };
    let proxy_listener = server::Listener {
        what: "proxy",
        tcp: proxy_listener,
        tls: config
            .server
            .tls
            .clone()
            .map(tokio_rustls::TlsAcceptor::from),
        limits,
    };
    let mut servers = vec![tokio::spawn(server::serve(
        proxy_listener,
        stack::proxy_service(&config, &upstreams, &metrics, &board),
        on_stop(),
        grace,
    ))];
    if let Some(listener) = admin_listener {
        let admin = admin::Admin {
            config: Arc::new(config.clone()),
            proxy_addr,
            upstreams: upstreams.clone(),
            metrics: metrics.clone(),
            board: board.clone(),
        };
        servers.push(tokio::spawn(server::serve(
            server::plain("admin", listener),
            admin.service(),
            on_stop(),
            grace,
        )));
    }
    let mut refreshers = Vec::new();
    if config.server.prefetch_tokens {
        let mut sources: Vec<&Arc<token::TokenSource>> = Vec::new();
        for u in upstreams.iter() {
            if !sources.iter().any(|s| Arc::ptr_eq(s, &u.tokens)) {
                sources.push(&u.tokens);
                refreshers.push(tokio::spawn(Arc::clone(&u.tokens).keep_fresh()));
            }
        }
    }
    tracing::info!(%proxy_addr, admin = ?admin_addr, upstreams = upstreams.len(), clients = config.clients.len(), "serving");
    Ok(Running {
        proxy_addr,
        admin_addr,
        stop,
        servers,
        refreshers,
    })
}

impl Running {
    /// Stop accepting, let in-flight requests finish (up to the grace period), and return.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for r in &self.refreshers {
            r.abort();
        }
        for s in self.servers {
            let _ = s.await;
        }
    }
}
