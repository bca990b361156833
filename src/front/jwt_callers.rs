//! Callers without a static secret: a `[[client]]` with `jwt_issuer`, `jwt_audience`,
//! `jwt_subject` and a JWKS accepts `Authorization: Bearer <JWT>` — the workload identity
//! a Kubernetes pod, a CI job or a cloud workload already carries.
//!
//! A token passes when its signature verifies with a key of its issuer's JWKS under one
//! of RS256, PS256, ES256 or EdDSA (never `none`, never an HMAC: a public key used as an
//! HMAC secret would let anyone sign), its `iss` and `aud` are the client's, it has not
//! expired (`exp` is required; 60 s of leeway for clocks, as for `nbf`), and its `sub`
//! matches the client's `jwt_subject`. Anything else is `401 unauthorized`, with the
//! reason in the debug log only. The token is removed from the request here: it never
//! reaches an upstream, a log or an error.
//!
//! This layer runs before the client key check, which it leaves alone for anything that
//! is not a JWT of a JWT client's issuer (keys, session tokens): a caller it identifies
//! goes on with its [`Caller`], which the key check then keeps.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use base64::Engine as _;
use futures_util::future::{ready, Either, FutureExt};
use http::header;
use jsonwebtoken::{Algorithm, Validation};
use tower::{Layer, Service};

use crate::call::error::ProxyError;
use crate::call::messages::Caller;
use crate::call::{BoxFuture, ProxyRequest, ProxyResponse};
use crate::config::ClientConfig;
use crate::front::jwks::key_set;

/// The layer: JWT callers identified, the rest passed on untouched.
#[derive(Clone)]
pub struct JwtCallersLayer {
    clients: Arc<[Arc<ClientConfig>]>,
}

impl JwtCallersLayer {
    /// For the clients that accept JWTs (none: the layer passes everything on).
    pub fn of(clients: &[Arc<ClientConfig>]) -> JwtCallersLayer {
        JwtCallersLayer {
            clients: clients
                .iter()
                .filter(|c| c.jwt.is_some())
                .cloned()
                .collect(),
        }
    }
}

impl<S> Layer<S> for JwtCallersLayer {
    type Service = JwtCallers<S>;
    fn layer(&self, inner: S) -> JwtCallers<S> {
        JwtCallers {
            clients: Arc::clone(&self.clients),
            inner,
        }
    }
}

#[derive(Clone)]
pub struct JwtCallers<S> {
    clients: Arc<[Arc<ClientConfig>]>,
    inner: S,
}

/// A bearer credential that is a JWT (a header that decodes), if the request has one.
fn presented_jwt(req: &ProxyRequest) -> Option<String> {
    let value = req.headers().get(header::AUTHORIZATION)?;
    let token = crate::http::credentials::bearer(value)?;
    let token = std::str::from_utf8(token).ok()?;
    jsonwebtoken::decode_header(token).ok()?;
    Some(token.to_string())
}

impl<S> Service<ProxyRequest> for JwtCallers<S>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = ProxyResponse;
    type Error = Infallible;
    // A key's call (nearly all) goes on as the inner service's own future, unboxed.
    type Future = Either<S::Future, BoxFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: ProxyRequest) -> Self::Future {
        // Only a JWT whose issuer is a JWT client's is this layer's; anything else is
        // for the key check (and a wrong key there).
        let token = match self.clients.is_empty() {
            false => presented_jwt(&req).filter(|token| {
                let issuer = unverified_issuer(token);
                self.clients.iter().any(|c| {
                    c.jwt
                        .as_ref()
                        .is_some_and(|j| Some(&j.issuer) == issuer.as_ref())
                })
            }),
            true => None,
        };
        let Some(token) = token else {
            return Either::Left(self.inner.call(req));
        };
        let clients = Arc::clone(&self.clients);
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        // The check, then the call: chained rather than in one async block, which would
        // hold the inner service's future across an await (and Rust cannot then prove it
        // Send for every lifetime of the body's error type).
        let check = async move { identify(&clients, &token).await };
        Either::Right(Box::pin(check.then(move |found| match found {
            Ok(client) => {
                req.headers_mut().remove(header::AUTHORIZATION);
                req.extensions_mut().insert(Caller(Some(client)));
                Either::Left(inner.call(req))
            }
            Err(why) => {
                tracing::debug!(%why, "a JWT was refused");
                let mut refused = ProxyError::Unauthorized.into_response();
                if req.version() <= http::Version::HTTP_11 {
                    refused
                        .headers_mut()
                        .insert(header::CONNECTION, http::HeaderValue::from_static("close"));
                }
                Either::Right(ready(Ok(refused)))
            }
        })))
    }
}

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
}

/// The `iss` of a token, read before its signature is checked: only to pick the client
/// (and so the keys) to check it with.
fn unverified_issuer(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    claims["iss"].as_str().map(str::to_string)
}

/// The client `token` proves, or why it proves none (for the debug log: never the token).
pub async fn identify(
    clients: &[Arc<ClientConfig>],
    token: &str,
) -> Result<Arc<ClientConfig>, String> {
    let header = jsonwebtoken::decode_header(token).map_err(|_| "not a JWT".to_string())?;
    if !matches!(
        header.alg,
        Algorithm::RS256 | Algorithm::PS256 | Algorithm::ES256 | Algorithm::EdDSA
    ) {
        return Err(format!("alg {:?} is not accepted", header.alg));
    }
    let issuer = unverified_issuer(token).ok_or("no iss")?;
    let mut why = format!("no client has jwt_issuer {issuer:?}");
    for client in clients.iter().cloned() {
        let jwt = match &client.jwt {
            Some(jwt) if jwt.issuer == issuer => Arc::clone(jwt),
            _ => continue,
        };
        let set = key_set(&jwt.jwks);
        let Some(key) = set.key(header.kid.clone()).await else {
            why = format!("no key of {} has kid {:?}", jwt.jwks.name(), header.kid);
            continue;
        };
        let mut rules = Validation::new(header.alg);
        rules.set_issuer(&[jwt.issuer.as_str()]);
        rules.set_audience(&[jwt.audience.as_str()]);
        rules.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        rules.leeway = 60;
        rules.validate_nbf = true;
        match jsonwebtoken::decode::<Claims>(token, &key, &rules) {
            Ok(data) if jwt.subject_matches(&data.claims.sub) => return Ok(client),
            Ok(_) => why = format!("its sub is outside jwt_subject of client {:?}", client.name),
            Err(e) => why = format!("client {:?}: {e}", client.name),
        }
    }
    Err(why)
}
