//! How an upstream's outbound connections leave the host: directly or through the
//! corporate HTTP proxy (a CONNECT tunnel), trusting which certificate authorities, and
//! presenting which client certificate.
//!
//! Every outbound connection of an upstream goes through what is here: its API calls and
//! streaming sockets (hyper, through [`Connector`]) and its token grants and discovery
//! (reqwest, through [`Egress::side_call_client`]). Both read the same [`ProxyRoutes`], so
//! grants and API calls never take different ways out.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use secrecy::{ExposeSecret, SecretString};
use tokio::net::TcpStream;

use crate::http::body::BoxError;

/// Where outbound connections go, by the destination's scheme, and which hosts go direct
/// (`NO_PROXY`). Proxy URLs may carry a user and password, so they are secrets.
#[derive(Clone)]
pub struct ProxyRoutes {
    pub http: Option<SecretString>,
    pub https: Option<SecretString>,
    /// The `NO_PROXY` list as curl reads it (comma-separated hosts, domains, IP ranges).
    pub no_proxy: String,
}

impl ProxyRoutes {
    /// The proxy for `scheme`'s destinations without its credentials, for messages.
    pub fn shown(&self, https: bool) -> Option<String> {
        let url = if https { &self.https } else { &self.http };
        url.as_ref().map(|u| without_credentials(u.expose_secret()))
    }

    /// Whether a request to `dst` goes through the proxy (`NO_PROXY` honoured).
    pub fn applies_to(&self, dst: &Uri) -> bool {
        self.matcher().intercept(dst).is_some()
    }

    fn matcher(&self) -> Matcher {
        let mut b = Matcher::builder().no(self.no_proxy.clone());
        if let Some(u) = &self.http {
            b = b.http(u.expose_secret().to_string());
        }
        if let Some(u) = &self.https {
            b = b.https(u.expose_secret().to_string());
        }
        b.build()
    }
}

impl std::fmt::Debug for ProxyRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyRoutes")
            .field("http", &self.shown(false))
            .field("https", &self.shown(true))
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

/// `scheme://host:port` of a proxy URL: what may be shown (no user, no password, no path).
pub fn without_credentials(url: &str) -> String {
    match url.parse::<Uri>() {
        Ok(u) => {
            let host = u
                .authority()
                .map(|a| {
                    a.as_str()
                        .rsplit('@')
                        .next()
                        .unwrap_or_default()
                        .to_string()
                })
                .unwrap_or_default();
            format!("{}://{host}", u.scheme_str().unwrap_or("http"))
        }
        Err(_) => "(an unreadable URL)".into(),
    }
}

/// One upstream's way out: the proxy routes (`None`: always direct) and the TLS settings
/// of its API host and of its token endpoint.
#[derive(Clone)]
pub struct Egress {
    pub proxy: Option<ProxyRoutes>,
    /// For the API host and the streaming host: the web roots and/or `ca_file`, and the
    /// client certificate when `mtls_upstream` is set.
    pub api_tls: Arc<rustls::ClientConfig>,
    /// For the token endpoint and discovery: the same roots, and the client certificate of
    /// `tls_client_auth`.
    pub token_tls: Arc<rustls::ClientConfig>,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("proxy", &self.proxy)
            .finish_non_exhaustive()
    }
}

impl Egress {
    /// Direct connections trusting the web roots, presenting no certificate (for unit
    /// tests; the config builds the real ones).
    #[cfg(test)]
    pub fn direct() -> Egress {
        let roots = rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        };
        let tls = Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );
        Egress {
            proxy: None,
            api_tls: Arc::clone(&tls),
            token_tls: tls,
        }
    }

    /// The HTTP client for side calls (token endpoints, discovery): rustls with this
    /// upstream's roots and client certificate, through its proxy, no redirects (a
    /// redirect from a token endpoint is a misconfiguration to report, and following it
    /// could carry the credentials elsewhere), bounded time.
    pub fn side_call_client(&self) -> Result<reqwest::Client, String> {
        self.client_with(&self.token_tls)
    }

    /// A client like [`Egress::side_call_client`] for the API host (its TLS: `ca_file`,
    /// and the client certificate of `mtls_upstream`), for `check`'s look at the budget.
    pub fn api_client(&self) -> Result<reqwest::Client, String> {
        self.client_with(&self.api_tls)
    }

    fn client_with(&self, tls: &rustls::ClientConfig) -> Result<reqwest::Client, String> {
        let mut b = reqwest::Client::builder()
            .use_preconfigured_tls(tls.clone())
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(15))
            .user_agent(concat!("tokengate/", env!("CARGO_PKG_VERSION")))
            // Only the routes below: reqwest would otherwise read the environment itself,
            // and could disagree with what the API calls do.
            .no_proxy();
        if let Some(routes) = &self.proxy {
            let no = reqwest::NoProxy::from_string(&routes.no_proxy);
            if let Some(u) = &routes.http {
                b = b.proxy(
                    reqwest::Proxy::http(u.expose_secret())
                        .map_err(|_| "the egress proxy URL is not usable".to_string())?
                        .no_proxy(no.clone()),
                );
            }
            if let Some(u) = &routes.https {
                b = b.proxy(
                    reqwest::Proxy::https(u.expose_secret())
                        .map_err(|_| "the egress proxy URL is not usable".to_string())?
                        .no_proxy(no),
                );
            }
        }
        b.build().map_err(|e| crate::http::causes::error_chain(&e))
    }

    /// A connector for API calls: TCP (through the proxy's tunnel when one applies), then
    /// TLS with `api_tls`, offering HTTP/2 and HTTP/1.1 (or only HTTP/1.1, for WebSocket
    /// handshakes, which need `Upgrade`).
    pub fn api_connector(
        &self,
        connect_timeout: Duration,
        http1_only: bool,
    ) -> hyper_rustls::HttpsConnector<Connector> {
        let mut http = HttpConnector::new();
        // The https connector decides between http and https by the URL's scheme.
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let connector = Connector {
            http,
            proxy: self.proxy.as_ref().map(|p| Arc::new(p.matcher())),
        };
        let b = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*self.api_tls).clone())
            .https_or_http()
            .enable_http1();
        if http1_only {
            b.wrap_connector(connector)
        } else {
            b.enable_http2().wrap_connector(connector)
        }
    }
}

/// TCP to the destination, or to the egress proxy with a CONNECT tunnel to the
/// destination inside (hyper-util's `Tunnel`); TLS, if any, follows inside the tunnel.
#[derive(Clone)]
pub struct Connector {
    http: HttpConnector,
    proxy: Option<Arc<Matcher>>,
}

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    // Boxed: connecting is rare next to the calls a connection carries.
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let mut http = self.http.clone();
        let Some(via) = self.proxy.as_ref().and_then(|m| m.intercept(&dst)) else {
            return Box::pin(async move { http.call(dst).await.map_err(Into::into) });
        };
        let proxy = without_credentials(&via.uri().to_string());
        let mut tunnel = Tunnel::new(via.uri().clone(), http);
        if let Some(auth) = via.basic_auth() {
            tunnel = tunnel.with_auth(auth.clone());
        }
        Box::pin(async move {
            tunnel
                .call(dst)
                .await
                .map_err(|e| Box::new(ProxyError::of(proxy, &e)) as BoxError)
        })
    }
}

/// The egress proxy did not open a tunnel.
#[derive(Debug, thiserror::Error)]
#[error("the egress proxy {proxy} {what}")]
pub struct ProxyError {
    proxy: String,
    what: String,
    /// It answered the CONNECT with a refusal (407 or another status), as opposed to not
    /// being reachable at all.
    pub refused: bool,
}

impl ProxyError {
    fn of(proxy: String, e: &(dyn std::error::Error + 'static)) -> ProxyError {
        let text = crate::http::causes::error_chain(e);
        let (what, refused) = refusal(&text).unwrap_or((format!("failed: {text}"), false));
        ProxyError {
            proxy,
            what,
            refused,
        }
    }
}

/// Whether an error's text (hyper-util's tunnel errors, whose type is not public) says
/// the proxy refused the CONNECT; what to say if so.
pub fn refusal(text: &str) -> Option<(String, bool)> {
    if text.contains("proxy authorization required") {
        Some((
            "refused the tunnel: 407 Proxy Authentication Required (check the user and password in egress_proxy)".into(),
            true,
        ))
    } else if text.contains("unsuccessful") && !text.contains("failed to create underlying") {
        Some((
            "refused the tunnel (it answered the CONNECT with an error status, such as 403: does it allow this host and port?)".into(),
            true,
        ))
    } else {
        None
    }
}

/// For `check`, when a tunnel was refused: ask the proxy for one to `dst` (a CONNECT over
/// hyper's HTTP/1.1 client) and return the status it answers — hyper-util's tunnel error
/// does not keep it. `None`: no proxy applies, or no answer.
pub async fn tunnel_status(routes: &ProxyRoutes, dst: &Uri) -> Option<u16> {
    let via = routes.matcher().intercept(dst)?;
    let proxy = via.uri().authority()?.as_str().to_string();
    let port = dst
        .port_u16()
        .unwrap_or(if dst.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let target = format!("{}:{port}", dst.host()?);
    let probe = async {
        let tcp = TcpStream::connect(&proxy).await.ok()?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake::<
            _,
            http_body_util::Empty<bytes::Bytes>,
        >(TokioIo::new(tcp))
        .await
        .ok()?;
        tokio::spawn(conn);
        let mut req = http::Request::connect(target.as_str()).header(http::header::HOST, &target);
        if let Some(auth) = via.basic_auth() {
            req = req.header(http::header::PROXY_AUTHORIZATION, auth.clone());
        }
        let resp = sender
            .send_request(req.body(http_body_util::Empty::new()).ok()?)
            .await
            .ok()?;
        Some(resp.status().as_u16())
    };
    tokio::time::timeout(Duration::from_secs(5), probe)
        .await
        .ok()
        .flatten()
}

/// What an egress proxy's refusal status means, in one sentence.
pub fn refusal_reason(status: u16) -> String {
    match status {
        401 | 407 => format!(
            "refused the tunnel with {status} (authentication required): check the user and password in egress_proxy"
        ),
        403 => "refused the tunnel with 403: the proxy does not allow this host or port".into(),
        other => format!("refused the tunnel with {other}"),
    }
}
