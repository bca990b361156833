//! `[server]`: the listeners (addresses, TLS, connection limits) and the proxy's own limits.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::cx::Cx;
use super::error::ConfigError;
use super::raw::{RawServer, Readiness};

/// Where the proxy's own token endpoint answers unless `token_paths` says otherwise.
const DEFAULT_TOKEN_PATHS: [&str; 2] = ["/oauth/token", "/login/oauth/token"];

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    /// HTTPS on `listen` (rustls), with client certificates verified when `client_ca` is set.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub max_connections: usize,
    pub max_connections_per_address: usize,
    /// Threads serving the proxy listener, each with its own runtime and upstream pools.
    pub workers: usize,
    pub admin_listen: Option<SocketAddr>,
    /// SHA-256 of the key that protects the admin listener, when one is set.
    pub admin_key_sha256: Option<[u8; 32]>,
    /// Serve callers without a key even though no `[[client]]` is configured and a listener
    /// is not on loopback.
    pub allow_anonymous: bool,
    /// Paths where legacy apps ask for tokens (answered by the proxy itself).
    pub token_paths: Vec<String>,
    /// Largest request body accepted (413 above it).
    pub max_body_bytes: u64,
    /// Request bodies up to this size are kept so they can be sent again after a 401.
    pub retry_body_bytes: usize,
    /// Obtain every upstream's token at start and keep it fresh in the background.
    pub prefetch_tokens: bool,
    /// When `/readyz` answers 200: every upstream holds a usable token, or any does.
    pub ready: Readiness,
    /// How long in-flight requests may take to finish after SIGINT/SIGTERM.
    pub shutdown_grace: Duration,
    /// Lifetime of the session tokens the proxy's own token endpoint issues.
    pub session_lifetime: Duration,
    /// How apps reach the proxy, for the notification URIs it rewrites (`None`: the
    /// `Host` each app called).
    pub public_url: Option<http::Uri>,
    /// WebSockets one client may hold open at once.
    pub max_websockets: usize,
    /// A WebSocket on which neither side sends anything this long is closed.
    pub websocket_idle: Duration,
    /// Where outbound connections go (`egress_proxy`, else the environment's
    /// `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY`); `None`: direct.
    pub egress: Option<crate::outbound::egress::ProxyRoutes>,
}

impl Cx<'_> {
    pub(super) fn server(&self, raw: RawServer) -> Result<ServerConfig, ConfigError> {
        let listen = match raw.listen {
            Some(s) => self.socket_addr("server.listen", &s)?,
            None => SocketAddr::from(([127, 0, 0, 1], 8080)),
        };
        let admin_listen = raw
            .admin_listen
            .map(|s| self.socket_addr("server.admin_listen", &s))
            .transpose()?;
        let admin_key_sha256 = raw
            .admin_key_sha256
            .map(|s| self.sha256_hex("server.admin_key_sha256", &s))
            .transpose()?;
        if let Some(addr) = admin_listen {
            if !addr.ip().is_loopback() && admin_key_sha256.is_none() {
                return Err(self.err(
                    "server.admin_listen",
                    format!("{addr} is not a loopback address, so admin_key_sha256 is required"),
                ));
            }
        }
        let tls = self.tls(raw.tls_cert, raw.tls_key, raw.client_ca)?;
        let token_paths = match raw.token_paths {
            Some(paths) => {
                for p in &paths {
                    if !p.starts_with('/') {
                        return Err(
                            self.err("server.token_paths", format!("\"{p}\" must start with '/'"))
                        );
                    }
                }
                paths
            }
            None => DEFAULT_TOKEN_PATHS.iter().map(|s| s.to_string()).collect(),
        };
        let retry_body_bytes = raw.retry_body_bytes.unwrap_or(1024 * 1024);
        let retry_body_bytes = usize::try_from(retry_body_bytes)
            .map_err(|_| self.err("server.retry_body_bytes", "too large"))?;
        let max_connections = raw.max_connections.unwrap_or(10_000);
        let max_connections_per_address = raw.max_connections_per_address.unwrap_or(1_000);
        if max_connections == 0 || max_connections_per_address == 0 {
            return Err(self.err("server.max_connections", "must be at least 1"));
        }
        let workers = match raw.workers {
            None | Some(0) => default_workers(),
            Some(n @ 1..=1024) => n,
            Some(_) => {
                return Err(self.err("server.workers", "must be 1 to 1024 (0: one per core)"))
            }
        };
        Ok(ServerConfig {
            listen,
            tls,
            max_connections,
            max_connections_per_address,
            workers,
            admin_listen,
            admin_key_sha256,
            allow_anonymous: raw.allow_anonymous.unwrap_or(false),
            token_paths,
            max_body_bytes: raw.max_body_bytes.unwrap_or(32 * 1024 * 1024),
            retry_body_bytes,
            prefetch_tokens: raw.prefetch_tokens.unwrap_or(true),
            ready: raw.ready.unwrap_or_default(),
            session_lifetime: self.secs(
                "server.session_lifetime_secs",
                raw.session_lifetime_secs,
                86_400.0,
            )?,
            shutdown_grace: self.secs(
                "server.shutdown_grace_secs",
                raw.shutdown_grace_secs,
                30.0,
            )?,
            max_websockets: raw.max_websockets.unwrap_or(100),
            public_url: raw
                .public_url
                .map(|u| self.base_url("server.public_url", &u))
                .transpose()?,
            websocket_idle: self.secs(
                "server.websocket_idle_secs",
                raw.websocket_idle_secs,
                120.0,
            )?,
            egress: self.proxy_routes(raw.egress_proxy)?,
        })
    }

    /// The HTTPS listener's rustls config from PEM files: certificate chain, private key,
    /// and optionally the CA whose certificates identify clients (mutual TLS).
    pub(super) fn tls(
        &self,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
        client_ca: Option<PathBuf>,
    ) -> Result<Option<Arc<rustls::ServerConfig>>, ConfigError> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::PrivateKeyDer;
        let (cert, key) = match (cert, key) {
            (None, None) => {
                if client_ca.is_some() {
                    return Err(self.err("server.client_ca", "needs tls_cert and tls_key"));
                }
                return Ok(None);
            }
            (Some(c), Some(k)) => (c, k),
            _ => {
                return Err(self.err(
                    "server.tls_cert",
                    "set both tls_cert and tls_key, or neither",
                ))
            }
        };
        let chain = self.pem_certs("server.tls_cert", &cert)?;
        let key_path = self.relative(&key);
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| {
            self.err(
                "server.tls_key",
                format!("cannot read a private key from {}: {e}", key_path.display()),
            )
        })?;
        let builder = rustls::ServerConfig::builder();
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in self.pem_certs("server.client_ca", &ca)? {
                    roots.add(c).map_err(|e| {
                        self.err(
                            "server.client_ca",
                            format!("an unusable CA certificate: {e}"),
                        )
                    })?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                    .build()
                    .map_err(|e| self.err("server.client_ca", e))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| self.err("server.tls_key", format!("does not fit tls_cert: {e}")))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Some(Arc::new(config)))
    }
}

/// How many workers to run when the config does not say: one per core the process may use.
fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
