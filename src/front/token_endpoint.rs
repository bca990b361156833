//! The proxy's own OAuth token endpoint, for legacy apps that insist on doing OAuth.
//!
//! `POST /oauth/token` or `/login/oauth/token` (the official Genesys SDKs' gateway mode
//! with `path_params_login = "login"`; the list is `[server] token_paths`) with
//! `grant_type=client_credentials` and the client's **name and key** as Basic credentials
//! (or as `client_id`/`client_secret` form fields) is answered here, never forwarded:
//! `{"access_token", "token_type": "bearer", "expires_in"}` with a [session
//! token](crate::front::session) that authenticates that client on later calls. Errors are
//! OAuth's (`error`, `error_description`), with the contract's `message` beside them.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::Either;
use http::{header, HeaderValue, Method, StatusCode};
use tower::{Layer, Service};

use crate::call::messages::OnConnection;
use crate::call::messages::PeerAddr;
use crate::call::outcome::Outcome;
use crate::call::{BoxFuture, ProxyRequest, ProxyResponse};
use crate::config::ClientConfig;
use crate::front::client_auth::{identify, identify_key};
use crate::front::session::Sessions;
use crate::http::body::{self, ByteBudget, Reserved};
use crate::http::codes::ErrorCode;

/// Token requests are a few dozen bytes.
const MAX_FORM_BYTES: usize = 16 * 1024;

/// The most bytes of token forms the whole process holds at once before it knows who sent
/// them (a form without Basic credentials is read to find its `client_id`). Past it such
/// forms are refused at once: without it, 1,000 HTTP/2 connections of 64 slow forms each
/// took the proxy from 9 MiB to 2.9 GiB.
pub const PRE_AUTH_BUDGET_BYTES: usize = 8 * 1024 * 1024;

/// Bytes of forms held before authentication, process-wide.
static PRE_AUTH_HELD: ByteBudget = ByteBudget::new(PRE_AUTH_BUDGET_BYTES);

/// Failed key checks an address may make at once...
const GUESSES_AT_ONCE: f64 = 10.0;
/// ...and then one per this long: a key guesser on one connection went at 127,000 a
/// second. Past them the address is answered 429 before any key is looked at (a caller
/// with a good key behind the same address waits too, as it would for any limit).
const GUESS_EVERY: Duration = Duration::from_secs(1);
/// Addresses remembered at once; past it, those whose allowance has come back are
/// forgotten first.
const GUESSERS_REMEMBERED: usize = 65_536;

/// Per address: failed key checks it may still make now, and when that was worked out.
static GUESSES: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, (f64, std::time::Instant)>>,
> = std::sync::LazyLock::new(Default::default);

/// The allowance of `peer` now, topped up for the time since it was last worked out.
fn guesses_left(
    table: &std::collections::HashMap<std::net::IpAddr, (f64, std::time::Instant)>,
    peer: std::net::IpAddr,
) -> f64 {
    let now = std::time::Instant::now();
    let (left, at) = table.get(&peer).copied().unwrap_or((GUESSES_AT_ONCE, now));
    let refilled = now.duration_since(at).as_secs_f64() / GUESS_EVERY.as_secs_f64();
    (left + refilled).min(GUESSES_AT_ONCE)
}

/// May `peer` have a key checked now?
fn may_guess(peer: Option<std::net::IpAddr>) -> bool {
    let Some(peer) = peer else {
        return true;
    };
    let table = GUESSES.lock().unwrap_or_else(|p| p.into_inner());
    guesses_left(&table, peer) >= 1.0
}

/// `peer`'s key check failed: one less.
fn guessed_wrong(peer: Option<std::net::IpAddr>) {
    let Some(peer) = peer else {
        return;
    };
    let mut table = GUESSES.lock().unwrap_or_else(|p| p.into_inner());
    if table.len() >= GUESSERS_REMEMBERED && !table.contains_key(&peer) {
        let now = std::time::Instant::now();
        let full_after = GUESS_EVERY.mul_f64(GUESSES_AT_ONCE);
        table.retain(|_, (_, at)| now.duration_since(*at) < full_after);
        if table.len() >= GUESSERS_REMEMBERED {
            return;
        }
    }
    let left = guesses_left(&table, peer) - 1.0;
    table.insert(peer, (left.max(0.0), std::time::Instant::now()));
}

/// `429`: too many failed key checks from this address.
fn slow_down() -> ProxyResponse {
    let mut resp = oauth_error(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::SlowDown,
        "too many failed key checks from this address: wait a second before the next",
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

/// Read a form of at most [`MAX_FORM_BYTES`] sent without credentials, within the
/// process's [`PRE_AUTH_BUDGET_BYTES`]: `Err` with the answer when it cannot be.
async fn read_unauthenticated_form(
    body: crate::http::body::ProxyBody,
) -> Result<(bytes::Bytes, Reserved), ProxyResponse> {
    use http_body_util::BodyExt as _;
    let mut body = body;
    let mut held = Reserved::default();
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return Err(unreadable_form());
        };
        if let Ok(data) = frame.into_data() {
            if out.len() + data.len() > MAX_FORM_BYTES {
                return Err(unreadable_form());
            }
            if !held.grow(&PRE_AUTH_HELD, data.len()) {
                return Err(busy("too many token requests are being read; try again"));
            }
            out.extend_from_slice(&data);
        }
    }
    Ok((out.into(), held))
}

fn unreadable_form() -> ProxyResponse {
    oauth_error(
        StatusCode::BAD_REQUEST,
        ErrorCode::InvalidRequest,
        "the form could not be read",
    )
}

/// `503 temporarily_unavailable`, to be tried again in a second.
fn busy(description: &str) -> ProxyResponse {
    let mut resp = oauth_error(
        StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::TemporarilyUnavailable,
        description,
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    resp
}

#[derive(Debug, Clone)]
pub struct TokenEndpointLayer {
    paths: Arc<[String]>,
    clients: Arc<[Arc<ClientConfig>]>,
    sessions: Arc<Sessions>,
    lifetime: Duration,
}

impl TokenEndpointLayer {
    /// Answer at `paths`, with sessions of `lifetime` signed by `sessions`.
    pub fn answering_at(
        paths: &[String],
        clients: &[Arc<ClientConfig>],
        sessions: Arc<Sessions>,
        lifetime: Duration,
    ) -> Self {
        TokenEndpointLayer {
            paths: paths.into(),
            clients: clients.into(),
            sessions,
            lifetime,
        }
    }
}

impl<S> Layer<S> for TokenEndpointLayer {
    type Service = TokenEndpoint<S>;
    fn layer(&self, inner: S) -> TokenEndpoint<S> {
        TokenEndpoint {
            inner,
            paths: self.paths.clone(),
            clients: self.clients.clone(),
            sessions: self.sessions.clone(),
            lifetime: self.lifetime,
        }
    }
}

#[derive(Debug, Clone)]
pub struct TokenEndpoint<S> {
    inner: S,
    paths: Arc<[String]>,
    clients: Arc<[Arc<ClientConfig>]>,
    sessions: Arc<Sessions>,
    lifetime: Duration,
}

fn oauth_error(status: StatusCode, error: ErrorCode, description: &str) -> ProxyResponse {
    let body = serde_json::json!({
        "error": error.as_str(),
        "error_description": description,
        "message": description,
    });
    let mut resp = crate::http::answers::json(status, &body);
    let h = resp.headers_mut();
    if status == StatusCode::UNAUTHORIZED {
        h.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"tokengate\""),
        );
    }
    if status == StatusCode::METHOD_NOT_ALLOWED {
        h.insert(header::ALLOW, HeaderValue::from_static("POST"));
    }
    Outcome::of(&mut resp).error = Some(error);
    resp
}

fn refused_client() -> ProxyResponse {
    oauth_error(
        StatusCode::UNAUTHORIZED,
        ErrorCode::InvalidClient,
        "send the client's name and key as the Basic credentials (client id and secret)",
    )
}

/// Client name and key from `Authorization: Basic` (client_secret_basic) or the form
/// (client_secret_post).
fn credentials(
    req_auth: Option<&HeaderValue>,
    form: &[(String, String)],
) -> Option<(String, String)> {
    // Basic credentials, when sent, are the only ones read: a malformed header is refused,
    // never passed over for the form.
    if let Some(auth) = req_auth.filter(|v| crate::http::credentials::uses_scheme(v, "basic")) {
        let (id, secret) = crate::http::credentials::basic(auth)?;
        return Some((String::from_utf8(id).ok()?, String::from_utf8(secret).ok()?));
    }
    let field = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    Some((field("client_id")?, field("client_secret")?))
}

async fn answer(
    req: ProxyRequest,
    clients: Arc<[Arc<ClientConfig>]>,
    sessions: Arc<Sessions>,
    lifetime: Duration,
) -> ProxyResponse {
    if req.method() != Method::POST {
        return oauth_error(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::InvalidRequest,
            "token requests are POSTs",
        );
    }
    let (head, body) = req.into_parts();
    let peer = head.extensions.get::<PeerAddr>().map(|PeerAddr(ip)| *ip);
    if !clients.is_empty() && !may_guess(peer) {
        return slow_down();
    }
    // Basic credentials are checked before the form is read: a caller without a key must
    // not make the proxy wait on (and hold) its upload.
    let basic = head.headers.get(header::AUTHORIZATION);
    if !clients.is_empty() && basic.is_some() {
        let known = credentials(basic, &[]).is_some_and(|(name, key)| {
            identify(&clients, key.as_bytes()).is_some_and(|c| c.name.as_ref() == name)
        });
        if !known {
            guessed_wrong(peer);
            return refused_client();
        }
    }
    // A form without Basic credentials comes from no one yet: a couple at a time per
    // connection, and within the process's budget.
    let mut _held = None;
    let form = if clients.is_empty() || basic.is_some() {
        match body::read_small(body, MAX_FORM_BYTES).await {
            Some(form) => form,
            None => return unreadable_form(),
        }
    } else {
        let place = match head.extensions.get::<OnConnection>() {
            Some(OnConnection(forms)) => match forms.take() {
                Some(place) => Some(place),
                None => return busy("too many token requests at once on this connection"),
            },
            None => None,
        };
        match read_unauthenticated_form(body).await {
            Ok((form, held)) => {
                _held = Some((place, held));
                form
            }
            Err(refused) => return refused,
        }
    };
    let form: Vec<(String, String)> = form_urlencoded::parse(&form).into_owned().collect();
    let grant_type = form
        .iter()
        .find(|(k, _)| k == "grant_type")
        .map(|(_, v)| v.as_str());
    if grant_type != Some("client_credentials") {
        return oauth_error(
            StatusCode::BAD_REQUEST,
            ErrorCode::UnsupportedGrantType,
            "the proxy issues tokens for grant_type=client_credentials only",
        );
    }
    let client = if clients.is_empty() {
        None // anonymous mode: every caller is let through anyway
    } else {
        let found =
            credentials(head.headers.get(header::AUTHORIZATION), &form).and_then(|(name, key)| {
                identify_key(&clients, key.as_bytes()).filter(|(c, _)| c.name.as_ref() == name)
            });
        match found {
            Some(c) => Some(c),
            None => {
                guessed_wrong(peer);
                return refused_client();
            }
        }
    };
    let token = sessions.issue(client.as_ref().map(|(c, key)| (&**c, *key)), lifetime);
    let body = serde_json::json!({
        "access_token": token,
        "token_type": "bearer",
        "expires_in": lifetime.as_secs(),
    });
    let mut resp = crate::http::answers::json(StatusCode::OK, &body);
    resp.headers_mut()
        .insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    tracing::info!(
        client = client.as_ref().map_or("anonymous", |(c, _)| &c.name),
        "session token issued"
    );
    resp
}

impl<S> Service<ProxyRequest> for TokenEndpoint<S>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = Infallible>,
{
    type Response = ProxyResponse;
    type Error = Infallible;
    type Future = Either<BoxFuture, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ProxyRequest) -> Self::Future {
        if !self.paths.iter().any(|p| p == req.uri().path()) {
            return Either::Right(self.inner.call(req));
        }
        let (clients, sessions, lifetime) =
            (self.clients.clone(), self.sessions.clone(), self.lifetime);
        Either::Left(Box::pin(async move {
            Ok(answer(req, clients, sessions, lifetime).await)
        }))
    }
}

#[cfg(test)]
mod tests;
