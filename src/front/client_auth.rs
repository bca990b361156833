//! Who is calling: the client key, checked before anything else is looked at.
//!
//! A client presents its key as `Authorization: Bearer <key>` (what a legacy app already
//! sends in place of a real token) or as `X-Api-Key: <key>`. The proxy stores only the
//! key's SHA-256 and compares digests in constant time. Over HTTPS with `client_ca` set, a
//! client certificate whose subject common name is a client's name identifies that client
//! without a key. A legacy app that did OAuth against the proxy's own token endpoint
//! presents the [session token](crate::front::session) it got there instead. With no `[[client]]`
//! configured, every caller is anonymous (config only allows that on loopback, or when the
//! operator says so). Either way the caller's credentials are removed here: they never
//! reach an upstream.
//!
//! A refuse-or-forward check, so it runs as tower-http's `ValidateRequestHeader` layer.

use std::sync::Arc;

use http::{header, HeaderMap, HeaderName};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tower_http::validate_request::{ValidateRequest, ValidateRequestHeaderLayer};

use crate::back::notifications::{self, Channels};
use crate::back::websocket;
use crate::call::error::ProxyError;
use crate::call::messages::Caller;
use crate::call::messages::KeylessSocket;
use crate::call::messages::PeerIdentity;
use crate::call::messages::UnresolvedChannel;
use crate::call::{ProxyRequest, ProxyResponse};
use crate::config::ClientConfig;
use crate::front::session::Sessions;
use crate::front::shared_credentials;
use crate::http::body::ProxyBody;

pub static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The layer: refuse callers without a known key, mark the others with their [`Caller`].
pub type ClientAuthLayer = ValidateRequestHeaderLayer<ClientKeys>;

/// Require one of these clients' keys (or a session token of theirs); with no clients,
/// serve anonymous callers.
///
/// Built per worker, with the worker's own copy of every client (its name too): a call
/// clones its caller's `Arc`s several times (the caller, its name for the outcome and the
/// connection slots), and on a shared copy every clone and drop would move one cache line
/// between the cores (measured: these counts were among the hottest instructions of the
/// proxy's user time).
pub fn layer(
    clients: &[Arc<ClientConfig>],
    sessions: Arc<Sessions>,
    channels: Arc<Channels>,
) -> ClientAuthLayer {
    let own = |c: &Arc<ClientConfig>| {
        Arc::new(ClientConfig {
            name: Arc::from(&*c.name),
            ..ClientConfig::clone(c)
        })
    };
    ValidateRequestHeaderLayer::custom(ClientKeys {
        clients: clients.iter().map(own).collect(),
        sessions,
        channels,
    })
}

/// The clients' keys and the session tokens issued to them.
#[derive(Debug, Clone)]
pub struct ClientKeys {
    clients: Arc<[Arc<ClientConfig>]>,
    sessions: Arc<Sessions>,
    channels: Arc<Channels>,
}

/// The key a caller presented, if any.
fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(key) = headers
        .get(header::AUTHORIZATION)
        .and_then(crate::http::credentials::bearer)
    {
        return Some(key);
    }
    headers
        .get(&X_API_KEY)
        .map(|v| v.as_bytes().trim_ascii())
        .filter(|k| !k.is_empty())
}

/// Find the client whose key hash matches, comparing against every key in constant time.
pub fn identify(clients: &[Arc<ClientConfig>], key: &[u8]) -> Option<Arc<ClientConfig>> {
    identify_key(clients, key).map(|(client, _)| client)
}

/// [`identify`], with the hash of the key that matched. A key past its `not_after` is
/// refused like an unknown one (the reason only in the debug log); a key that matched
/// records its use.
pub fn identify_key(
    clients: &[Arc<ClientConfig>],
    key: &[u8],
) -> Option<(Arc<ClientConfig>, [u8; 32])> {
    let digest: [u8; 32] = Sha256::digest(key).into();
    let mut found = None;
    for c in clients {
        for k in &c.keys {
            if bool::from(k.sha256.ct_eq(&digest)) {
                found = Some((c, k));
            }
        }
    }
    let (client, key) = found?;
    let now = std::time::SystemTime::now();
    if !key.live_at(now) {
        tracing::debug!(client = %client.name, key = %key.fingerprint(), "a client key past its not_after was refused");
        return None;
    }
    key.used_at(now);
    Some((Arc::clone(client), key.sha256))
}

/// Anonymous mode (no `[[client]]`, loopback only) trusts whoever can connect, and a
/// browser on the same machine can connect too: a page elsewhere could call the proxy
/// (a cross-site request) or rebind its own name to 127.0.0.1 (DNS rebinding) and use the
/// team's token. So only loopback `Host` names, and no cross-site requests; a CORS
/// preflight is answered here, without any `Access-Control-Allow-*`, and never forwarded.
fn anonymous_browser_refusal(req: &ProxyRequest) -> Option<ProxyResponse> {
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    if !host.is_some_and(crate::http::is_loopback_host) {
        return Some(ProxyError::Forbidden(
            "without [[client]] keys the proxy answers only requests addressed to a loopback name (localhost, 127.0.0.1, [::1])".into(),
        )
        .into_response());
    }
    if req.method() == http::Method::OPTIONS
        && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        let mut resp = http::Response::new(crate::http::body::empty());
        *resp.status_mut() = http::StatusCode::NO_CONTENT;
        crate::call::outcome::Outcome::of(&mut resp).error =
            Some(crate::http::codes::ErrorCode::PreflightRefused);
        return Some(resp);
    }
    let cross_site = headers
        .get("sec-fetch-site")
        .is_some_and(|v| !matches!(v.as_bytes(), b"same-origin" | b"none"))
        || headers.get(header::ORIGIN).is_some_and(|origin| {
            let origin_host = origin
                .to_str()
                .ok()
                .and_then(|o| o.parse::<http::Uri>().ok())
                .and_then(|u| u.authority().map(|a| a.as_str().to_ascii_lowercase()));
            origin_host != host.map(str::to_ascii_lowercase)
        });
    if cross_site {
        return Some(ProxyError::Forbidden(
            "cross-site requests are refused: without [[client]] keys a web page must not use the team's token".into(),
        )
        .into_response());
    }
    None
}

/// `401 unauthorized`; on HTTP/1 the connection closes after it, so a caller without a key
/// keeps no connection (and no descriptor) of the proxy's between its refused requests.
fn refused(version: http::Version) -> ProxyResponse {
    let mut resp = ProxyError::Unauthorized.into_response();
    if version <= http::Version::HTTP_11 {
        resp.headers_mut()
            .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
    }
    resp
}

impl ValidateRequest<ProxyBody> for ClientKeys {
    type ResponseBody = ProxyBody;

    fn validate(&mut self, req: &mut ProxyRequest) -> Result<(), ProxyResponse> {
        // A JWT caller, identified before (front/jwt_callers.rs).
        if req
            .extensions()
            .get::<Caller>()
            .is_some_and(|c| c.0.is_some())
        {
            req.headers_mut().remove(&X_API_KEY);
            return Ok(());
        }
        let caller = if self.clients.is_empty() {
            if let Some(refusal) = anonymous_browser_refusal(req) {
                return Err(refusal);
            }
            Caller(None)
        } else {
            let found = match presented_key(req.headers()) {
                Some(k) if Sessions::is_session(k) => {
                    let client = self.sessions.verify(k, &self.clients);
                    // Genesys SDKs end their token this way; a session token is the
                    // caller's own to end (the upstream's, shared, is not).
                    if client.is_some()
                        && shared_credentials::ends_own_session(req.method(), req.uri().path())
                    {
                        return Err(self.sessions.end(k));
                    }
                    client
                }
                Some(k) => identify(&self.clients, k),
                // A notification channel's socket: the platform wants no credentials on it
                // (the channel id is one), so apps open it bare; it acts as the channel's
                // maker. An id the proxy never handed out is no route, not a missing key.
                None if websocket::is_handshake(req.method(), req.version(), req.headers())
                    && notifications::is_socket_path(req.uri().path()) =>
                {
                    match self.channels.socket(req.uri().path()) {
                        Some(channel) => {
                            req.extensions_mut().insert(KeylessSocket);
                            let maker = channel.client.as_deref();
                            self.clients
                                .iter()
                                .find(|c| Some(&*c.name) == maker)
                                .cloned()
                        }
                        // Perhaps another replica's: only the notifications layer, after
                        // the route, may let it through (as its maker) or refuse it.
                        None if self.channels.shared() => {
                            req.extensions_mut().insert(UnresolvedChannel);
                            req.extensions_mut().insert(Caller(None));
                            return Ok(());
                        }
                        None => return Err(ProxyError::NoRoute.into_response()),
                    }
                }
                // Mutual TLS: a certificate the client CA signed names the client.
                None => req
                    .extensions()
                    .get::<PeerIdentity>()
                    .and_then(|PeerIdentity(cn)| {
                        self.clients.iter().find(|c| c.name == *cn).cloned()
                    }),
            };
            match found {
                Some(client) => Caller(Some(client)),
                None => return Err(refused(req.version())),
            }
        };
        let headers = req.headers_mut();
        headers.remove(header::AUTHORIZATION);
        headers.remove(&X_API_KEY);
        req.extensions_mut().insert(caller);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn client(name: &str, key: &str) -> Arc<ClientConfig> {
        Arc::new(ClientConfig {
            name: name.into(),
            keys: vec![crate::config::ClientKey::of_hash(
                Sha256::digest(key.as_bytes()).into(),
            )],
            upstreams: None,
            allow: None,
            share: 1,
            max_per_minute: None,
            max_channels: None,
            jwt: None,
        })
    }

    #[test]
    fn loopback_hosts_are_told_apart() {
        for h in [
            "localhost",
            "localhost:8080",
            "127.0.0.1:1",
            "[::1]:9",
            "a.localhost",
        ] {
            assert!(crate::http::is_loopback_host(h), "{h}");
        }
        for h in [
            "attacker.example",
            "127.0.0.1.nip.io",
            "10.0.0.1",
            "",
            "local host",
        ] {
            assert!(!crate::http::is_loopback_host(h), "{h}");
        }
    }

    #[test]
    fn keys_are_found_in_either_header() {
        let clients = vec![client("a", "key-a"), client("b", "key-b")];
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer key-b"),
        );
        assert_eq!(
            identify(&clients, presented_key(&h).unwrap())
                .unwrap()
                .name
                .as_ref(),
            "b"
        );
        let mut h = HeaderMap::new();
        h.insert(&X_API_KEY, HeaderValue::from_static("key-a"));
        assert_eq!(
            identify(&clients, presented_key(&h).unwrap())
                .unwrap()
                .name
                .as_ref(),
            "a"
        );
        assert!(identify(&clients, b"key-c").is_none());
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic a2V5LWE="),
        );
        assert!(presented_key(&h).is_none());
    }
}
