//! Who is calling: the client key, checked before anything else is looked at.
//!
//! A client presents its key as `Authorization: Bearer <key>` (what a legacy app already
//! sends in place of a real token) or as `X-Api-Key: <key>`. The proxy stores only the
//! key's SHA-256 and compares digests in constant time. With no `[[client]]` configured,
//! Over HTTPS with `client_ca` set, a client certificate whose subject common name is a
//! client's name identifies that client without a key. A legacy app that did OAuth against the proxy's own token endpoint presents the
//! [session token](crate::session) it got there instead. With no `[[client]]` configured,
//! every caller is anonymous (config only allows that on loopback, or when the operator
//! says so). Either way the caller's credentials are removed here: they never reach an
//! upstream.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{ready, Either, Ready};
use http::{header, HeaderMap, HeaderName};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tower::{Layer, Service};

use super::{ProxyRequest, ProxyResponse};
use crate::config::ClientConfig;
use crate::error::ProxyError;
use crate::server::PeerIdentity;
use crate::session::Sessions;

pub static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The caller of a request, as established by [`ClientAuth`].
#[derive(Debug, Clone)]
pub struct Caller(pub Option<Arc<ClientConfig>>);

#[derive(Debug, Clone)]
pub struct ClientAuthLayer {
    clients: Arc<[Arc<ClientConfig>]>,
    sessions: Arc<Sessions>,
}

impl ClientAuthLayer {
    /// Require one of these clients' keys (or a session token of theirs); with no clients,
    /// serve anonymous callers.
    pub fn with_clients(clients: &[Arc<ClientConfig>], sessions: Arc<Sessions>) -> Self {
        ClientAuthLayer {
            clients: clients.into(),
            sessions,
        }
    }
}

impl<S> Layer<S> for ClientAuthLayer {
    type Service = ClientAuth<S>;
    fn layer(&self, inner: S) -> ClientAuth<S> {
        ClientAuth {
            inner,
            clients: self.clients.clone(),
            sessions: self.sessions.clone(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ClientAuth<S> {
    inner: S,
    clients: Arc<[Arc<ClientConfig>]>,
    sessions: Arc<Sessions>,
}

/// The key a caller presented, if any.
fn presented_key(headers: &HeaderMap) -> Option<&[u8]> {
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.as_bytes();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
            return Some(v[7..].trim_ascii());
        }
    }
    headers
        .get(&X_API_KEY)
        .map(|v| v.as_bytes().trim_ascii())
        .filter(|k| !k.is_empty())
}

/// Find the client whose key hash matches, comparing against every client in constant time.
pub fn identify(clients: &[Arc<ClientConfig>], key: &[u8]) -> Option<Arc<ClientConfig>> {
    let digest: [u8; 32] = Sha256::digest(key).into();
    let mut found = None;
    for c in clients {
        if bool::from(c.key_sha256.ct_eq(&digest)) {
            found = Some(Arc::clone(c));
        }
    }
    found
}

impl<S> Service<ProxyRequest> for ClientAuth<S>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = Infallible>,
{
    type Response = ProxyResponse;
    type Error = Infallible;
    type Future = Either<Ready<Result<ProxyResponse, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: ProxyRequest) -> Self::Future {
        let caller = if self.clients.is_empty() {
            Caller(None)
        } else {
            let found = match presented_key(req.headers()) {
                Some(k) if Sessions::is_session(k) => self.sessions.verify(k, &self.clients),
                Some(k) => identify(&self.clients, k),
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
                None => return Either::Left(ready(Ok(ProxyError::Unauthorized.into_response()))),
            }
        };
        let headers = req.headers_mut();
        headers.remove(header::AUTHORIZATION);
        headers.remove(&X_API_KEY);
        req.extensions_mut().insert(caller);
        Either::Right(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn client(name: &str, key: &str) -> Arc<ClientConfig> {
        Arc::new(ClientConfig {
            name: name.into(),
            key_sha256: Sha256::digest(key.as_bytes()).into(),
            upstreams: None,
            allow: None,
        })
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
