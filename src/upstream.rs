//! An upstream at run time: its configuration, its token cache and its connection pool.

use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use crate::body::ProxyBody;
use crate::config::UpstreamConfig;
use crate::token::TokenSource;

/// hyper-util's pooled client over rustls; HTTP/1.1 or HTTP/2 as ALPN decides.
pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, ProxyBody>;

#[derive(Debug)]
pub struct Upstream {
    pub config: Arc<UpstreamConfig>,
    pub tokens: Arc<TokenSource>,
    pub client: UpstreamClient,
}

impl Upstream {
    /// `tokens` comes from the [`TokenCache`](crate::token::TokenCache), shared with any
    /// upstream that has the same credentials.
    pub fn new(config: Arc<UpstreamConfig>, tokens: Arc<TokenSource>) -> Upstream {
        let client = upstream_client(config.connect_timeout);
        Upstream {
            config,
            tokens,
            client,
        }
    }

    pub fn name(&self) -> &Arc<str> {
        &self.config.name
    }

    /// Where calls go: the configured `base_url`, else what discovery found (CXone).
    pub fn api_base(&self) -> Option<http::Uri> {
        self.config
            .base_url
            .clone()
            .or_else(|| self.tokens.api_base())
    }
}

fn upstream_client(connect_timeout: Duration) -> UpstreamClient {
    let mut http = HttpConnector::new();
    // The https connector below decides between http and https by the URL's scheme.
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    http.set_keepalive(Some(Duration::from_secs(60)));
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .build(https)
}
