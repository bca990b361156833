//! A Genesys-Cloud-like login host and API host on loopback, for `tokengate demo` and for
//! tokengate's tests. It behaves as the platforms' developer documentation describes them:
//!
//! - `POST /oauth/token` on the login host: `Authorization: Basic base64(id:secret)`, form
//!   body `grant_type=client_credentials`; answers `{"access_token", "token_type":
//!   "bearer", "expires_in"}`, or 400 `{"error": "invalid_client", ...}` /
//!   `unsupported_grant_type` ([`login`]). The CXone flavour adds discovery and the
//!   password grant with an access key.
//! - `/api/v2/...` on the API host wants `Authorization: Bearer <token>`; otherwise 401 with
//!   Genesys' `ErrorBody` (`authentication.required`, `bad.credentials`,
//!   `credentials.expired`). Every answer carries `inin-correlation-id`. `GET
//!   /api/v2/users/me` answers a user; every other path echoes what it received (method,
//!   path, query, header names, body length and SHA-256) ([`api`]).
//!   `/api/v2/tokens/me` is about the token itself: `GET` describes it, `HEAD` verifies it,
//!   `DELETE` revokes it.
//!
//! With the `fixtures` feature (tests only), endpoints and controls that exercise the
//! proxy's failure paths ([`fixtures`]); the release binary has none of them.

mod api;
#[cfg(feature = "fixtures")]
mod fixtures;
mod login;
mod serve;
mod streaming;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

#[cfg(feature = "fixtures")]
pub use fixtures::pattern_byte;

/// The sandbox's answer body.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// Which platform the sandbox imitates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// `client_credentials` at `/oauth/token`.
    Genesys,
    /// NICE CXone: discovery at `/.well-known/openid-configuration`, the password grant
    /// with an access key at `/auth/token` (and `refresh_token`), an `id_token` naming the
    /// tenant, and `/.well-known/cxone-configuration?tenantId=` giving the API host.
    Cxone,
}

/// How the sandbox behaves.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    pub flavor: Flavor,
    pub client_id: String,
    pub client_secret: String,
    /// `expires_in` of every token, and how long the API host accepts it.
    pub token_lifetime: Duration,
    /// The status of a refused grant (Genesys: 400 or 401, unverified which).
    pub refusal_status: u16,
    /// Decode Basic credentials as RFC 6749 §2.3.1 says (form-encoded id and secret)
    /// rather than raw, as Genesys' SDKs send them.
    pub basic_form_encoded: bool,
    /// Accept `client_id`/`client_secret` in the form (client_secret_post).
    pub accept_client_secret_post: bool,
    /// Whether the OAuth client may use its grant (Genesys: the client's grant type).
    pub grant_enabled: bool,
    /// Scopes a grant may ask for; `None`: any.
    pub allowed_scopes: Option<Vec<String>>,
    /// CXone: the user's access key, sent as the password grant's username and password.
    pub access_key_id: String,
    pub access_key_secret: String,
    pub tenant_id: String,
    /// Genesys-like API rate limit: calls allowed per token per `limit_window`.
    pub per_token_limit: Option<u64>,
    pub limit_window: Duration,
    /// A resource limit below the token's (Genesys: 100 a minute on
    /// `PUT /api/v2/architect/ivrs/{id}`): calls whose `METHOD /path` starts with the
    /// text, allowed per `limit_window` over the whole org.
    pub route_limit: Option<(String, u64)>,
    /// The org's idle token timeout (`GET /api/v2/tokens/timeout`; the platform allows 5 min
    /// to 8 h): a token unused this long is dead. Any call resets its clock except
    /// `GET /api/v2/tokens/me?preserveIdleTTL=true`.
    pub idle_timeout: Option<Duration>,
    /// How often the streaming host sends each socket a heartbeat (Genesys: 30 s).
    pub heartbeat: Duration,
    /// Notification channels the OAuth client may hold (Genesys: 20).
    pub channels_per_client: usize,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            flavor: Flavor::Genesys,
            client_id: "sandbox-client".into(),
            client_secret: "sandbox-secret".into(),
            token_lifetime: Duration::from_secs(86400),
            refusal_status: 400,
            basic_form_encoded: false,
            accept_client_secret_post: false,
            grant_enabled: true,
            allowed_scopes: None,
            access_key_id: "sandbox-access-key-id".into(),
            access_key_secret: "sandbox-access-key-secret".into(),
            tenant_id: "11eb0a6e-0000-4000-8000-00000000cafe".into(),
            per_token_limit: None,
            route_limit: None,
            idle_timeout: None,
            limit_window: Duration::from_secs(60),
            heartbeat: Duration::from_secs(30),
            channels_per_client: streaming::CHANNELS_PER_CLIENT,
        }
    }
}

/// What the API host saw of one request.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: Method,
    pub path: String,
    pub query: Option<String>,
    pub headers: HeaderMap,
    pub body_len: u64,
    pub body_sha256: String,
}

/// What both hosts share: issued tokens and counters.
#[derive(Default)]
struct State {
    /// token -> expiry
    tokens: Mutex<HashMap<String, Instant>>,
    grant_requests: AtomicU64,
    grants: AtomicU64,
    grants_in_flight: AtomicU64,
    refresh_grants: AtomicU64,
    refresh_tokens: Mutex<HashMap<String, ()>>,
    max_grants_in_flight: AtomicU64,
    api_calls: AtomicU64,
    api_in_flight: AtomicU64,
    max_api_in_flight: AtomicU64,
    api_401s: AtomicU64,
    /// API calls answered 429 because their token's window was spent.
    throttled: AtomicU64,
    /// `HEAD /api/v2/tokens/me` with a good token (a dead one is answered 401).
    token_checks: AtomicU64,
    /// `DELETE /api/v2/tokens/me`: tokens revoked by a call that carried them.
    tokens_deleted: AtomicU64,
    /// RFC 7662 questions to the login host's `/oauth/introspect`.
    introspections: AtomicU64,
    seen: Mutex<Vec<SeenRequest>>,
    /// Per token: when its rate-limit window started, and the calls in it.
    usage: Mutex<HashMap<String, (Instant, u64)>>,
    /// Per token: when a call last used it (for `idle_timeout`), and calls refused
    /// because their token had idled.
    last_use: Mutex<HashMap<String, Instant>>,
    idled_calls: AtomicU64,
    /// Calls that started a token's idle clock again (all but
    /// `GET /api/v2/tokens/me?preserveIdleTTL=true`).
    idle_resets: AtomicU64,
    /// `GET /api/v2/tokens/timeout` questions answered.
    idle_questions: AtomicU64,
    /// The `route_limit`'s window: when it started, and the calls in it.
    route_usage: Mutex<Option<(Instant, u64)>>,
    /// Notification channels, shared with the streaming host.
    notifications: Arc<streaming::Notifications>,
    /// The client secret the login host accepts now, once a test has rotated it
    /// (`None`: the options' `client_secret`).
    rotated_secret: Mutex<Option<String>>,
    #[cfg(feature = "fixtures")]
    controls: fixtures::Controls,
}

/// A running sandbox; its servers stop when it is dropped.
pub struct Sandbox {
    pub login_addr: SocketAddr,
    pub api_addr: SocketAddr,
    /// The notification service's WebSocket host (Genesys' `streaming.<domain>`).
    pub streaming_addr: SocketAddr,
    streaming: JoinHandle<()>,
    options: Arc<SandboxOptions>,
    state: Arc<State>,
    api: JoinHandle<()>,
    /// The login host's server; `None` while it is taken down (fixtures).
    login: Option<JoinHandle<()>>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.api.abort();
        self.streaming.abort();
        if let Some(t) = &self.login {
            t.abort();
        }
    }
}

impl Sandbox {
    /// Start both hosts on loopback, on ports the OS picks.
    pub async fn start(options: SandboxOptions) -> std::io::Result<Sandbox> {
        let loopback = SocketAddr::from(([127, 0, 0, 1], 0));
        let options = Arc::new(options);
        let state = Arc::new(State::default());
        let login = TcpListener::bind(loopback).await?;
        let api = TcpListener::bind(loopback).await?;
        let streaming = TcpListener::bind(loopback).await?;
        let (login_addr, api_addr) = (login.local_addr()?, api.local_addr()?);
        let streaming_addr = streaming.local_addr()?;
        let _ = state
            .notifications
            .url
            .set(format!("ws://{streaming_addr}"));
        state
            .notifications
            .limit
            .store(options.channels_per_client, Ordering::SeqCst);
        let streaming = streaming::serve(
            streaming,
            Arc::clone(&state.notifications),
            options.heartbeat,
        );
        let (o, s) = (options.clone(), state.clone());
        let api = serve::serve(api, move |req| {
            let (o, s) = (o.clone(), s.clone());
            async move { api::answer(&o, &s, req).await }
        });
        let mut sandbox = Sandbox {
            login_addr,
            api_addr,
            streaming_addr,
            streaming,
            options,
            state,
            api,
            login: None,
        };
        sandbox.serve_login(login);
        Ok(sandbox)
    }

    fn serve_login(&mut self, listener: TcpListener) {
        let (o, s) = (self.options.clone(), self.state.clone());
        let issuer: Arc<str> = Arc::from(format!("http://{}", self.login_addr));
        let api_url: Arc<str> = Arc::from(format!("http://{}", self.api_addr));
        self.login = Some(serve::serve(listener, move |req| {
            let (o, s, issuer, api_url) = (o.clone(), s.clone(), issuer.clone(), api_url.clone());
            async move { login::answer(&o, &s, &issuer, &api_url, req).await }
        }));
    }

    pub fn token_url(&self) -> String {
        match self.options.flavor {
            Flavor::Genesys => format!("http://{}/oauth/token", self.login_addr),
            Flavor::Cxone => format!("http://{}/auth/token", self.login_addr),
        }
    }

    /// CXone: the issuer, where discovery starts.
    pub fn issuer(&self) -> String {
        format!("http://{}", self.login_addr)
    }

    pub fn api_url(&self) -> String {
        format!("http://{}", self.api_addr)
    }

    /// `ws://host:port` of the streaming host.
    pub fn streaming_url(&self) -> String {
        format!("ws://{}", self.streaming_addr)
    }

    /// Send `event` on `topic` to every socket whose channel subscribed to it; to how many.
    pub fn publish(&self, topic: &str, event: &serde_json::Value) -> usize {
        streaming::publish(&self.state.notifications, topic, event)
    }

    /// Heartbeats the streaming host has sent so far, on every socket.
    pub fn heartbeats_sent(&self) -> u64 {
        self.state.notifications.heartbeats.load(Ordering::SeqCst)
    }

    /// Calls that came with a token past the idle timeout (answered 401).
    pub fn idled_calls(&self) -> u64 {
        self.state.idled_calls.load(Ordering::SeqCst)
    }

    /// `GET /api/v2/tokens/timeout` questions answered (the proxy asks once per token).
    pub fn idle_questions(&self) -> u64 {
        self.state.idle_questions.load(Ordering::SeqCst)
    }

    /// Calls that started a token's idle clock again.
    pub fn idle_resets(&self) -> u64 {
        self.state.idle_resets.load(Ordering::SeqCst)
    }

    /// Tokens issued and not revoked that have idled out (with `idle_timeout`).
    pub fn idled_tokens(&self) -> usize {
        let Some(idle) = self.options.idle_timeout else {
            return 0;
        };
        let now = Instant::now();
        lock(&self.state.last_use)
            .values()
            .filter(|used| now.duration_since(**used) >= idle)
            .count()
    }

    /// Channels the platform removed to make room for newer ones (the 20-channel rule).
    pub fn channels_evicted(&self) -> u64 {
        self.state.notifications.evicted.load(Ordering::SeqCst)
    }

    /// Channels the platform holds now.
    pub fn channels_held(&self) -> usize {
        lock(&self.state.notifications.channels).len()
    }

    /// The request target of every socket that reached the streaming host.
    pub fn streaming_seen(&self) -> Vec<String> {
        lock(&self.state.notifications.seen).clone()
    }

    pub fn options(&self) -> &SandboxOptions {
        &self.options
    }

    /// Tokens issued so far.
    pub fn grants(&self) -> u64 {
        self.state.grants.load(Ordering::SeqCst)
    }

    /// Grants made with a refresh token (CXone).
    pub fn refresh_grants(&self) -> u64 {
        self.state.refresh_grants.load(Ordering::SeqCst)
    }

    /// Token requests received, granted or not.
    pub fn grant_requests(&self) -> u64 {
        self.state.grant_requests.load(Ordering::SeqCst)
    }

    /// The most token requests that were ever being answered at the same time.
    pub fn max_grants_in_flight(&self) -> u64 {
        self.state.max_grants_in_flight.load(Ordering::SeqCst)
    }

    /// The most API calls the API host was answering at once (until their answer heads).
    pub fn max_api_in_flight(&self) -> u64 {
        self.state.max_api_in_flight.load(Ordering::SeqCst)
    }

    pub fn api_calls(&self) -> u64 {
        self.state.api_calls.load(Ordering::SeqCst)
    }

    /// 401s the API host has answered.
    /// API calls answered 429 because their token's rate-limit window was spent.
    pub fn throttled(&self) -> u64 {
        self.state.throttled.load(Ordering::SeqCst)
    }

    /// A token's rate-limit window is open (started by a call, not run out yet).
    pub fn rate_window_open(&self) -> bool {
        lock(&self.state.usage)
            .values()
            .any(|(start, _)| start.elapsed() < self.options.limit_window)
    }

    /// Good tokens verified with `HEAD /api/v2/tokens/me` (a dead one counts in 401s).
    pub fn token_checks(&self) -> u64 {
        self.state.token_checks.load(Ordering::SeqCst)
    }

    /// Questions to the login host's `/oauth/introspect` (RFC 7662).
    pub fn introspections(&self) -> u64 {
        self.state.introspections.load(Ordering::SeqCst)
    }

    /// Tokens revoked with `DELETE /api/v2/tokens/me`.
    pub fn tokens_deleted(&self) -> u64 {
        self.state.tokens_deleted.load(Ordering::SeqCst)
    }

    pub fn api_401s(&self) -> u64 {
        self.state.api_401s.load(Ordering::SeqCst)
    }

    /// Invalidate every token issued so far, as an admin revoking them would.
    pub fn revoke_all(&self) {
        lock(&self.state.tokens).clear();
    }

    /// Whether `authorization` is `Bearer <a token this sandbox issued>`.
    pub fn issued(&self, authorization: &HeaderValue) -> bool {
        let Some(token) = authorization
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
        else {
            return false;
        };
        lock(&self.state.tokens).contains_key(token)
    }

    /// Every token issued and not revoked.
    pub fn issued_tokens(&self) -> Vec<String> {
        lock(&self.state.tokens).keys().cloned().collect()
    }

    /// Every request the API host answered with something other than 401.
    pub fn seen(&self) -> Vec<SeenRequest> {
        lock(&self.state.seen).clone()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not take the sandbox down with it.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn full(bytes: impl Into<Bytes>) -> Body {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes.into()).boxed_unsync()
}

/// A Genesys 401: `code` and `message` in the platform's error document.
pub(crate) fn unauthorized(code: &str, message: &str) -> Response<Body> {
    json(
        StatusCode::UNAUTHORIZED,
        serde_json::json!({"message": message, "code": code, "status": 401, "messageParams": {}, "contextId": hex::encode(rand::random::<[u8; 8]>()), "details": [], "errors": []}),
    )
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}
