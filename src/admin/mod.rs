//! The admin listener: liveness, readiness and metrics for the operator's tooling.
//!
//! - `GET /healthz`: 200 while the process serves.
//! - `GET /readyz`: 200 when every upstream holds a usable token (`[server] ready = "any"`:
//!   when one does), else 503; the list of those that do not either way.
//!   `GET /readyz/<upstream>`: the same for one upstream.
//! - `GET /metrics`: Prometheus text.
//! - `GET /`: the operator's status page; `GET /status.json`: the same data as JSON.
//! - `GET /usage.json?since=<unix>`, `GET /usage.csv`: usage per app (see [`usage`]).
//!
//! With `admin_key_sha256` set, everything but `/healthz` and `/readyz…` wants the admin key:
//! `Authorization: Bearer <key>`, or as the password of Basic credentials (so a browser
//! can ask for it).

mod chart;
pub mod page;
pub mod usage;

use std::convert::Infallible;

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::config::{Config, Readiness};
use crate::http::body::ProxyBody;
use crate::live::Live;
use crate::telemetry::metrics::Metrics;
use page::{status_html, status_json};

#[derive(Debug, Clone)]
pub struct Admin {
    /// The current config, upstreams and status board (they change on reload).
    pub live: Live,
    /// The proxy listener's real address (the config may say port 0).
    pub proxy_addr: std::net::SocketAddr,
    pub metrics: Metrics,
}

impl Admin {
    pub fn answer(&self, req: &Request<Incoming>) -> Response<ProxyBody> {
        let now = self.live.current();
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "only GET\n".into(),
            );
        }
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
            "/readyz" => {
                let failing: Vec<&str> = now
                    .upstreams
                    .iter()
                    .filter(|u| lacks_token(u))
                    .map(|u| u.name().as_ref())
                    .collect();
                let ready = match now.config.server.ready {
                    Readiness::All => failing.is_empty(),
                    Readiness::Any => failing.len() < now.upstreams.len(),
                };
                readiness(ready, &failing)
            }
            path if path.starts_with("/readyz/") => {
                let name = &path["/readyz/".len()..];
                let Some(u) = now.upstreams.iter().find(|u| u.name().as_ref() == name) else {
                    return text(
                        StatusCode::NOT_FOUND,
                        "text/plain",
                        "no upstream has that name\n".into(),
                    );
                };
                let failing: Vec<&str> = lacks_token(u).then_some(name).into_iter().collect();
                readiness(failing.is_empty(), &failing)
            }
            _ if !authorized(&now.config, req) => {
                let mut resp = text(
                    StatusCode::UNAUTHORIZED,
                    "text/plain",
                    "the admin key is required\n".into(),
                );
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Basic realm=\"tokengate admin\""),
                );
                resp
            }
            "/" => {
                let doc = status_json(
                    self.proxy_addr,
                    &now.upstreams,
                    &now.board,
                    now.shared.as_deref(),
                    (&now.sockets, &now.channels),
                );
                text(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    status_html(&doc),
                )
            }
            "/status.json" => {
                let doc = status_json(
                    self.proxy_addr,
                    &now.upstreams,
                    &now.board,
                    now.shared.as_deref(),
                    (&now.sockets, &now.channels),
                );
                text(StatusCode::OK, "application/json", doc.to_string())
            }
            "/metrics" => {
                // Read the rate budgets now rather than on every call.
                for u in now.upstreams.iter() {
                    if let Some(b) = u.budget.budget() {
                        self.metrics
                            .rate_budget_remaining(u.name(), b.allowed.saturating_sub(b.used));
                    }
                }
                let at = std::time::SystemTime::now();
                self.metrics
                    .client_key_expiry(now.board.clients.iter().flat_map(|c| {
                        c.keys.iter().filter_map(move |k| {
                            let secs = page::seconds_until(k.not_after?, at);
                            Some((c.name.to_string(), k.fingerprint(), secs))
                        })
                    }));
                text(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    self.metrics.render(),
                )
            }
            _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        }
    }
}

/// With no admin key configured the listener is on loopback (config insists), and open;
/// with one, the request must carry it.
fn authorized(config: &Config, req: &Request<Incoming>) -> bool {
    let Some(expected) = config.server.admin_key_sha256 else {
        return true;
    };
    let Some(value) = req.headers().get(header::AUTHORIZATION) else {
        return false;
    };
    // The key as a bearer token, or as the password of Basic credentials (a browser).
    let key = match crate::http::credentials::bearer(value) {
        Some(key) => key.to_vec(),
        None => match crate::http::credentials::basic(value) {
            Some((_user, password)) => password,
            None => return false,
        },
    };
    use sha2::Digest as _;
    use subtle::ConstantTimeEq as _;
    let digest: [u8; 32] = sha2::Sha256::digest(&key).into();
    bool::from(digest.ct_eq(&expected))
}

impl Admin {
    pub fn service(self) -> impl crate::ingress::server::HttpService<Incoming> {
        tower::service_fn(move |req: Request<Incoming>| {
            let (path, get) = (req.uri().path(), req.method() == Method::GET);
            // Usage may be read from Redis: the one answer that waits.
            let usage = get
                && matches!(path, "/usage.json" | "/usage.csv")
                && authorized(&self.live.current().config, &req);
            let (live, path, query) = (
                self.live.clone(),
                path.to_string(),
                req.uri().query().map(str::to_string),
            );
            let resp = (!usage).then(|| self.answer(&req));
            async move {
                Ok::<_, Infallible>(match resp {
                    Some(resp) => resp,
                    None => usage::answer(&live, &path, query.as_deref()).await,
                })
            }
        })
    }
}

use crate::http::answers::text;

/// Whether an upstream lacks a usable token (any of its pool's).
fn lacks_token(u: &crate::upstream::Upstream) -> bool {
    u.tokens.iter().any(|t| t.usable().is_none())
}

/// A readiness answer: 200 or 503, `{"ready", "failing": [upstreams without a token]}`.
fn readiness(ready: bool, failing: &[&str]) -> Response<ProxyBody> {
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({ "ready": ready, "failing": failing });
    text(status, "application/json", body.to_string())
}
