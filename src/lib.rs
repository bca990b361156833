//! tokengate: an authenticating reverse proxy for the Genesys Cloud and NICE CXone APIs.
//!
//! A legacy app points its base URL at the proxy and presents a team key; the proxy checks
//! the key, attaches a bearer token it obtained and caches itself, retries once on a 401
//! with a fresh token, and forwards the call to the platform's API host. The request's
//! path through the proxy is composed in [`stack`]; the front half lives in [`front`], each upstream's half in [`back`].
//!
//! The binary is thin: it parses the command line, loads [`config::Config`], and calls
//! [`start`]. Tests drive the same function.

// Unsafe code only where a C library must be called (`memory`: the allocator's trim).
#![deny(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod back;
pub mod call;
pub mod cli;
pub mod config;
pub mod front;
pub mod governor;
pub mod http;
pub mod ingress;
pub mod live;
pub mod outbound;
pub mod stack;
pub mod telemetry;
pub mod token;
pub mod upstream;

use std::net::SocketAddr;

use tokio::net::TcpListener;

use ingress::gate::{ConnectionGate, ConnectionLimits};
use ingress::{descriptors, memory, server, workers};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::telemetry::metrics::Metrics;

/// Why the proxy could not start (the config itself was valid).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Listen {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("{0}")]
    Telemetry(String),
}

/// A proxy that is serving.
pub struct Running {
    /// Where the proxy listens (with the real port when the config said port 0).
    pub proxy_addr: SocketAddr,
    pub admin_addr: Option<SocketAddr>,
    live: live::Live,
    builder: live::Builder,
    stop: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
    refreshers: Vec<JoinHandle<()>>,
    /// Gives memory back after bursts of connections (see [`memory`]).
    memory: JoinHandle<()>,
}

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Listen { what, addr, source })
}

/// Keep every token of `generation` fresh in the background, if its config asks for it.
fn spawn_refreshers(generation: &live::Generation) -> Vec<JoinHandle<()>> {
    if !generation.config.server.prefetch_tokens {
        return Vec::new();
    }
    generation
        .token_sources()
        .into_iter()
        .map(|s| tokio::spawn(s.keep_fresh()))
        .collect()
}

/// The admin listener's connections: a few are plenty for the operator's tooling...
const ADMIN_CONNECTIONS: usize = 256;
/// ...and no one address may take them all (a status page left open in many tabs, or a
/// scraper gone wrong).
const ADMIN_CONNECTIONS_PER_ADDRESS: usize = 32;

/// The listeners' connection caps under the process's limit of open files, raised first
/// (see [`descriptors`]): the configured `max_connections` unless the descriptors cannot
/// hold it beside the admin listener and the upstream connections.
fn connection_caps(config: &Config) -> (usize, usize) {
    let wanted = config.server.max_connections;
    let Some(open_files) = descriptors::raise_limit() else {
        return (wanted, ADMIN_CONNECTIONS);
    };
    let upstream = config.upstreams.iter().map(|u| u.max_connections).sum();
    let (proxy, admin) = descriptors::fit(open_files, wanted, ADMIN_CONNECTIONS, upstream);
    if proxy < wanted {
        tracing::warn!(
            open_files,
            max_connections = proxy,
            configured = wanted,
            "the process may open only {open_files} files (ulimit -n): the proxy listener takes at most {proxy} connections; raise the limit for more"
        );
    }
    (proxy, admin)
}

/// Bind the listeners and start serving: the proxy listener on `server.workers` threads
/// (see [`workers`]), the admin listener and the token refreshers on the caller's runtime.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let worker_count = config.server.workers;
    let metrics = Metrics::new();
    if let Some(telemetry) = &config.telemetry {
        crate::telemetry::traces::start(telemetry, &metrics).map_err(StartError::Telemetry)?;
    }
    let builder = live::Builder::new(metrics, worker_count);
    let proxy_listeners =
        workers::bind_reuseport(config.server.listen, worker_count).map_err(|source| {
            StartError::Listen {
                what: "proxy",
                addr: config.server.listen,
                source,
            }
        })?;
    let admin_listener = match config.server.admin_listen {
        Some(addr) => Some(bind("admin", addr).await?),
        None => None,
    };
    let proxy_addr = proxy_listeners
        .first()
        .and_then(|l| l.local_addr().ok())
        .unwrap_or(config.server.listen);
    let admin_addr = admin_listener.as_ref().and_then(|l| l.local_addr().ok());

    let (stop, stopped) = watch::channel(false);
    let on_stop = move || {
        let mut rx = stopped.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let grace = config.server.shutdown_grace;
    let tls = config
        .server
        .tls
        .clone()
        .map(tokio_rustls::TlsAcceptor::from);
    let (max_connections, admin_connections) = connection_caps(&config);
    let gate = ConnectionGate::new(ConnectionLimits {
        max_connections,
        max_per_address: config
            .server
            .max_connections_per_address
            .min(max_connections),
    });
    let generation = builder.build(config);
    let refreshers = spawn_refreshers(&generation);
    let memory = tokio::spawn(memory::give_back_after_bursts(std::sync::Arc::clone(&gate)));
    let summary = (generation.upstreams.len(), generation.config.clients.len());
    let live = live::Live::new(generation);
    // With `[cache]`, each replica adds its usage counts to the fleet's (admin/usage.rs).
    tokio::spawn(admin::usage::share_usage(live.clone()));
    let serving = live.clone();
    tokio::spawn(front::keys::warn_of_expiry(move || {
        std::sync::Arc::clone(&serving.current().config)
    }));
    let mut servers = Vec::new();
    for (index, socket) in proxy_listeners.into_iter().enumerate() {
        let (live, tls, gate, stopping) = (live.clone(), tls.clone(), gate.clone(), on_stop());
        let serve = move || async move {
            let tcp = match TcpListener::from_std(socket) {
                Ok(tcp) => tcp,
                Err(e) => {
                    tracing::error!(worker = index, error = %e, "cannot serve the proxy listener");
                    return;
                }
            };
            let listener = server::Listener {
                what: "proxy",
                tcp,
                tls,
                gate,
            };
            server::serve(listener, live.for_worker(index), stopping, grace).await;
        };
        let finished = workers::spawn(index, serve).map_err(|source| StartError::Listen {
            what: "proxy worker thread",
            addr: proxy_addr,
            source,
        })?;
        servers.push(tokio::spawn(async move {
            let _ = finished.await;
        }));
    }
    if let Some(listener) = admin_listener {
        let admin = admin::Admin {
            live: live.clone(),
            proxy_addr,
            metrics: builder.metrics().clone(),
        };
        // The operator's listener: a few connections are plenty, and no one address may
        // take them all (a status page left open in many tabs, or a scraper gone wrong).
        let admin_gate = ConnectionGate::new(ConnectionLimits {
            max_connections: admin_connections,
            max_per_address: ADMIN_CONNECTIONS_PER_ADDRESS.min(admin_connections),
        });
        servers.push(tokio::spawn(server::serve(
            server::Listener {
                what: "admin",
                tcp: listener,
                tls: None,
                gate: admin_gate,
            },
            admin.service(),
            on_stop(),
            grace,
        )));
    }
    tracing::info!(%proxy_addr, admin = ?admin_addr, workers = worker_count, upstreams = summary.0, clients = summary.1, "serving");
    Ok(Running {
        proxy_addr,
        admin_addr,
        live,
        builder,
        stop,
        servers,
        refreshers,
        memory,
    })
}

impl Running {
    /// Serve `config` from now on: new requests meet it, requests in flight finish on the
    /// old one. Listener settings (addresses, TLS, connection limits) need a restart.
    pub fn reload(&mut self, config: Config) {
        let old = self.live.current();
        let s = (&old.config.server, &config.server);
        if s.0.listen != s.1.listen
            || s.0.admin_listen != s.1.admin_listen
            || s.0.tls.is_some() != s.1.tls.is_some()
            || s.0.max_connections != s.1.max_connections
            || s.0.max_connections_per_address != s.1.max_connections_per_address
            || s.0.workers != s.1.workers
        {
            tracing::warn!(
                "listener settings changed in the config; they take effect at the next restart"
            );
        }
        if old.config.events != config.events {
            tracing::warn!("[events] changed in the config; it takes effect at the next restart");
        }
        if old.config.telemetry != config.telemetry {
            tracing::warn!(
                "[telemetry] changed in the config; it takes effect at the next restart"
            );
        }
        crate::front::keys::tell_expiring(&config);
        let generation = self.builder.build(config);
        let refreshers = spawn_refreshers(&generation);
        let summary = (generation.upstreams.len(), generation.config.clients.len());
        self.live.swap(generation);
        for r in std::mem::replace(&mut self.refreshers, refreshers) {
            r.abort();
        }
        tracing::info!(
            upstreams = summary.0,
            clients = summary.1,
            "config reloaded"
        );
        crate::emit!(
            info,
            "config_reloaded",
            upstreams = summary.0,
            clients = summary.1
        );
    }

    /// Stop accepting, let in-flight requests finish (up to the grace period), and return.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for r in &self.refreshers {
            r.abort();
        }
        self.memory.abort();
        for s in self.servers {
            let _ = s.await;
        }
        // The last calls' spans, before the process ends.
        crate::telemetry::traces::flush().await;
    }
}
