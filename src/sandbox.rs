//! A Genesys-Cloud-like login host and API host on loopback, for `tokengate demo` and for
//! the tests. It behaves as the platforms' developer documentation describes them:
//!
//! - `POST /oauth/token` on the login host: `Authorization: Basic base64(id:secret)`, form
//!   body `grant_type=client_credentials`; answers `{"access_token", "token_type":
//!   "bearer", "expires_in"}`, or 400 `{"error": "invalid_client", ...}` /
//!   `unsupported_grant_type`.
//! - `/api/v2/...` on the API host wants `Authorization: Bearer <token>`; otherwise 401 with
//!   Genesys' `ErrorBody` (`authentication.required`, `bad.credentials`,
//!   `credentials.expired`). Every answer carries `inin-correlation-id`.
//!
//! Beyond the platform, a few endpoints exercise the proxy: `GET /api/v2/sandbox/bytes?n=N`
//! streams N bytes, `/api/v2/sandbox/gate` answers when the test opens the gate,
//! `/api/v2/sandbox/always401` rejects every token, `/api/v2/sandbox/hang`
//! never answers, `/api/v2/sandbox/stall` sends its head and a first chunk, then nothing, and every other path echoes what it received (method, path, query,
//! header names, body length and SHA-256).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::body::{self, ProxyBody};

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
            limit_window: Duration::from_secs(60),
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
    seen: Mutex<Vec<SeenRequest>>,
    /// `/api/v2/sandbox/gate` answers once this is true.
    gate: Gate,
    /// Hold `bad.credentials` answers until this many are waiting (0: never hold).
    hold_401s: AtomicU64,
    /// API calls still to be answered with 429.
    throttle: AtomicU64,
    /// Per token: when its rate-limit window started, and the calls in it.
    usage: Mutex<HashMap<String, (Instant, u64)>>,
    held_401s: tokio::sync::watch::Sender<u64>,
}

struct Gate(tokio::sync::watch::Sender<bool>);

impl State {
    /// Answer a rejected token, after waiting for company if the test asked for it.
    async fn bad_credentials(&self) -> Response<ProxyBody> {
        let hold = self.hold_401s.load(Ordering::SeqCst);
        if hold > 0 {
            self.held_401s.send_modify(|n| *n += 1);
            let mut held = self.held_401s.subscribe();
            let _ = held.wait_for(|n| *n >= hold).await;
        }
        unauthorized("bad.credentials", "Invalid login credentials.")
    }
}

impl Default for Gate {
    fn default() -> Self {
        Gate(tokio::sync::watch::channel(false).0)
    }
}

/// A running sandbox; its servers stop when it is dropped.
pub struct Sandbox {
    pub login_addr: SocketAddr,
    pub api_addr: SocketAddr,
    options: Arc<SandboxOptions>,
    state: Arc<State>,
    tasks: Vec<JoinHandle<()>>,
    /// The login host's server and the switch that stops it (see [`Sandbox::stop_login`]).
    login: Option<(JoinHandle<()>, tokio::sync::watch::Sender<bool>)>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some((t, _)) = &self.login {
            t.abort();
        }
    }
}

impl Sandbox {
    /// Start both hosts on loopback, on ports the OS picks.
    pub async fn start(options: SandboxOptions) -> std::io::Result<Sandbox> {
        Self::start_on(
            options,
            "127.0.0.1:0"
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))),
        )
        .await
    }

    /// Start with the API host on `api` (the login host takes any free port).
    pub async fn start_on(options: SandboxOptions, api: SocketAddr) -> std::io::Result<Sandbox> {
        let options = Arc::new(options);
        let state = Arc::new(State::default());
        let login = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        let api = TcpListener::bind(api).await?;
        let (login_addr, api_addr) = (login.local_addr()?, api.local_addr()?);
        let forever = std::future::pending::<()>;
        let (o, s) = (options.clone(), state.clone());
        let api_svc = tower::service_fn(move |req: Request<Incoming>| {
            let (o, s) = (o.clone(), s.clone());
            async move { Ok::<_, Infallible>(api_host(&o, &s, req).await) }
        });
        let tasks = vec![tokio::spawn(crate::server::serve(
            crate::server::plain("sandbox-api", api),
            api_svc,
            forever(),
            Duration::from_secs(1),
        ))];
        let mut sandbox = Sandbox {
            login_addr,
            api_addr,
            options,
            state,
            tasks,
            login: None,
        };
        sandbox.serve_login(login);
        Ok(sandbox)
    }

    fn serve_login(&mut self, listener: TcpListener) {
        let (o, s) = (self.options.clone(), self.state.clone());
        let issuer: Arc<str> = Arc::from(format!("http://{}", self.login_addr));
        let api_url: Arc<str> = Arc::from(format!("http://{}", self.api_addr));
        let login_svc = tower::service_fn(move |req: Request<Incoming>| {
            let (o, s, issuer, api_url) = (o.clone(), s.clone(), issuer.clone(), api_url.clone());
            async move { Ok::<_, Infallible>(token_endpoint(&o, &s, &issuer, &api_url, req).await) }
        });
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(crate::server::serve(
            crate::server::plain("sandbox-login", listener),
            login_svc,
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
            Duration::from_millis(200),
        ));
        self.login = Some((task, stop));
    }

    /// Take the login host down, as an outage would: its port refuses connections.
    pub async fn stop_login(&mut self) {
        if let Some((task, stop)) = self.login.take() {
            let _ = stop.send(true);
            let _ = task.await;
        }
    }

    /// Bring the login host back on the same port.
    pub async fn start_login(&mut self) -> std::io::Result<()> {
        if self.login.is_none() {
            let listener = TcpListener::bind(self.login_addr).await?;
            self.serve_login(listener);
        }
        Ok(())
    }

    /// Answer the next `n` API calls with 429 and `Retry-After: 1`, as a spent rate limit.
    pub fn throttle_next(&self, n: u64) {
        self.state.throttle.store(n, Ordering::SeqCst);
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

    /// Revoke every token, and hold the 401s that follow until `n` requests are waiting for
    /// one: so that `n` concurrent calls all meet the revoked token.
    pub fn revoke_all_and_hold_401s(&self, n: u64) {
        self.state.held_401s.send_replace(0);
        self.state.hold_401s.store(n, Ordering::SeqCst);
        self.revoke_all();
    }

    /// Every token issued and not revoked.
    pub fn issued_tokens(&self) -> Vec<String> {
        lock(&self.state.tokens).keys().cloned().collect()
    }

    /// Let the requests waiting at `/api/v2/sandbox/gate` (and later ones) through.
    pub fn open_gate(&self) {
        self.state.gate.0.send_replace(true);
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

fn json(status: StatusCode, value: serde_json::Value) -> Response<ProxyBody> {
    let mut resp = Response::new(body::full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

fn random_token() -> String {
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn correlation_id() -> HeaderValue {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    HeaderValue::try_from(hex::encode(bytes)).unwrap_or(HeaderValue::from_static("0"))
}

async fn token_endpoint(
    o: &SandboxOptions,
    s: &State,
    issuer: &str,
    api: &str,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let path = req.uri().path().to_string();
    match (o.flavor, path.as_str()) {
        (Flavor::Cxone, "/.well-known/openid-configuration") => {
            return json(
                StatusCode::OK,
                serde_json::json!({"issuer": issuer, "token_endpoint": format!("{issuer}/auth/token"), "grant_types_supported": ["password", "refresh_token", "authorization_code"]}),
            );
        }
        (Flavor::Cxone, "/.well-known/cxone-configuration") => {
            let tenant = req
                .uri()
                .query()
                .and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "tenantId"))
                .map(|(_, v)| v.into_owned());
            if tenant.as_deref() != Some(o.tenant_id.as_str()) {
                return json(
                    StatusCode::NOT_FOUND,
                    serde_json::json!({"error": "unknown tenant"}),
                );
            }
            return json(
                StatusCode::OK,
                serde_json::json!({"tenantId": o.tenant_id, "api_endpoint": api, "area": "na1"}),
            );
        }
        (Flavor::Genesys, "/oauth/token") | (Flavor::Cxone, "/auth/token") => {}
        _ => {
            return json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not_found"}),
            )
        }
    }
    if req.method() != Method::POST {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "invalid_request"}),
        );
    }
    s.grant_requests.fetch_add(1, Ordering::SeqCst);
    let in_flight = s.grants_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    s.max_grants_in_flight
        .fetch_max(in_flight, Ordering::SeqCst);
    let resp = grant(o, s, issuer, req).await;
    s.grants_in_flight.fetch_sub(1, Ordering::SeqCst);
    resp
}

fn oauth_refusal(status: StatusCode, error: &str, description: &str) -> Response<ProxyBody> {
    json(
        status,
        serde_json::json!({"error": error, "description": description, "error_description": description}),
    )
}

/// Decode `Basic` credentials as the sandbox is told to.
fn basic_credentials(o: &SandboxOptions, header: Option<&HeaderValue>) -> Option<(String, String)> {
    let b64 = header?.to_str().ok()?.strip_prefix("Basic ")?;
    let decoded =
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    if o.basic_form_encoded {
        let decode = |s: &str| -> Option<String> {
            let plus = s.replace('+', " ");
            percent_encoding::percent_decode_str(&plus)
                .decode_utf8()
                .ok()
                .map(|c| c.into_owned())
        };
        Some((decode(id)?, decode(secret)?))
    } else {
        Some((id.to_string(), secret.to_string()))
    }
}

async fn grant(
    o: &SandboxOptions,
    s: &State,
    issuer: &str,
    req: Request<Incoming>,
) -> Response<ProxyBody> {
    let basic = basic_credentials(o, req.headers().get(header::AUTHORIZATION));
    let Ok(form) = req.into_body().collect().await else {
        return oauth_refusal(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "unreadable body",
        );
    };
    let form: HashMap<String, String> = form_urlencoded::parse(&form.to_bytes())
        .into_owned()
        .collect();
    let posted = match (form.get("client_id"), form.get("client_secret")) {
        (Some(id), Some(secret)) if o.accept_client_secret_post => {
            Some((id.clone(), secret.clone()))
        }
        _ => None,
    };
    let client_ok = basic
        .or(posted)
        .is_some_and(|(id, secret)| id == o.client_id && secret == o.client_secret);
    if !client_ok {
        let status = StatusCode::from_u16(o.refusal_status).unwrap_or(StatusCode::BAD_REQUEST);
        return oauth_refusal(status, "invalid_client", "authentication failed");
    }
    let grant_type = form.get("grant_type").map(String::as_str).unwrap_or("");
    let expected = match o.flavor {
        Flavor::Genesys => "client_credentials",
        Flavor::Cxone => "password",
    };
    let refreshing = o.flavor == Flavor::Cxone && grant_type == "refresh_token";
    if grant_type != expected && !refreshing {
        return oauth_refusal(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant type is not supported",
        );
    }
    if !o.grant_enabled {
        return oauth_refusal(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            "the client is not authorized to use this grant type",
        );
    }
    if let (Some(allowed), Some(scope)) = (&o.allowed_scopes, form.get("scope")) {
        if scope.split(' ').any(|sc| !allowed.iter().any(|a| a == sc)) {
            return oauth_refusal(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                "the requested scope is invalid",
            );
        }
    }
    if refreshing {
        let known = form
            .get("refresh_token")
            .is_some_and(|t| lock(&s.refresh_tokens).remove(t).is_some());
        if !known {
            return oauth_refusal(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "refresh token is invalid",
            );
        }
        s.refresh_grants.fetch_add(1, Ordering::SeqCst);
    } else if o.flavor == Flavor::Cxone
        && (form.get("username") != Some(&o.access_key_id)
            || form.get("password") != Some(&o.access_key_secret))
    {
        return oauth_refusal(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "invalid username or password",
        );
    }
    let token = random_token();
    lock(&s.tokens).insert(token.clone(), Instant::now() + o.token_lifetime);
    s.grants.fetch_add(1, Ordering::SeqCst);
    let expires_in = o.token_lifetime.as_secs().max(1);
    let answer = match o.flavor {
        Flavor::Genesys => {
            serde_json::json!({"access_token": token, "token_type": "bearer", "expires_in": expires_in})
        }
        Flavor::Cxone => {
            let refresh = random_token();
            lock(&s.refresh_tokens).insert(refresh.clone(), ());
            // An unsigned JWT is enough here: the proxy reads the claims, it does not
            // authenticate with the id_token.
            let b64 = |v: serde_json::Value| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
            };
            let id_token = format!(
                "{}.{}.",
                b64(serde_json::json!({"alg": "none", "typ": "JWT"})),
                b64(
                    serde_json::json!({"iss": issuer, "tenantId": o.tenant_id, "sub": "user:sandbox"})
                )
            );
            serde_json::json!({"access_token": token, "token_type": "Bearer", "expires_in": expires_in, "id_token": id_token, "refresh_token": refresh})
        }
    };
    json(StatusCode::OK, answer)
}

fn unauthorized(code: &str, message: &str) -> Response<ProxyBody> {
    json(
        StatusCode::UNAUTHORIZED,
        serde_json::json!({"message": message, "code": code, "status": 401, "messageParams": {}, "contextId": hex::encode(rand::random::<[u8; 8]>()), "details": [], "errors": []}),
    )
}

async fn api_host(o: &SandboxOptions, s: &State, req: Request<Incoming>) -> Response<ProxyBody> {
    s.api_calls.fetch_add(1, Ordering::SeqCst);
    let in_flight = s.api_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    s.max_api_in_flight.fetch_max(in_flight, Ordering::SeqCst);
    let mut resp = api_answer(o, s, req).await;
    s.api_in_flight.fetch_sub(1, Ordering::SeqCst);
    if resp.status() == StatusCode::UNAUTHORIZED {
        s.api_401s.fetch_add(1, Ordering::SeqCst);
    }
    resp.headers_mut()
        .insert("inin-correlation-id", correlation_id());
    resp
}

/// Count a call against `token`'s rate limit; the 429 to answer when it is spent.
fn rate_limited(o: &SandboxOptions, s: &State, token: &str) -> Option<Response<ProxyBody>> {
    let allowed = o.per_token_limit?;
    let now = Instant::now();
    let (count, reset) = {
        let mut usage = lock(&s.usage);
        let entry = usage.entry(token.to_string()).or_insert((now, 0));
        if now.duration_since(entry.0) >= o.limit_window {
            *entry = (now, 0);
        }
        entry.1 += 1;
        let left = o.limit_window.saturating_sub(now.duration_since(entry.0));
        (entry.1, left.as_secs().max(1))
    };
    if count <= allowed {
        return None;
    }
    let mut resp = json(
        StatusCode::TOO_MANY_REQUESTS,
        serde_json::json!({"message": format!("Rate limit exceeded the maximum. [{allowed}] requests for [{}] seconds", o.limit_window.as_secs()), "code": "too.many.requests", "status": 429}),
    );
    let h = resp.headers_mut();
    h.insert(header::RETRY_AFTER, HeaderValue::from(reset));
    h.insert("inin-ratelimit-count", HeaderValue::from(count));
    h.insert("inin-ratelimit-allowed", HeaderValue::from(allowed));
    h.insert("inin-ratelimit-reset", HeaderValue::from(reset));
    Some(resp)
}

async fn api_answer(o: &SandboxOptions, s: &State, req: Request<Incoming>) -> Response<ProxyBody> {
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let Some(token) = token else {
        return unauthorized(
            "authentication.required",
            "No authentication bearer token specified in authorization header.",
        );
    };
    let expiry = lock(&s.tokens).get(&token).copied();
    match expiry {
        None => return s.bad_credentials().await,
        Some(expiry) if expiry <= Instant::now() => {
            return unauthorized(
                "credentials.expired",
                "The authentication token has expired.",
            )
        }
        Some(_) => {}
    }
    if let Some(resp) = rate_limited(o, s, &token) {
        return resp;
    }
    let throttled = s
        .throttle
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if throttled {
        let mut resp = json(
            StatusCode::TOO_MANY_REQUESTS,
            serde_json::json!({"message": "Rate limit exceeded the maximum. [300] requests for [60] seconds", "code": "too.many.requests", "status": 429}),
        );
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return resp;
    }
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/api/v2/sandbox/always401" => {
            return unauthorized("bad.credentials", "Invalid login credentials.")
        }
        "/api/v2/sandbox/hang" => std::future::pending::<()>().await,
        "/api/v2/sandbox/stall" => {
            let first = futures_util::stream::once(async {
                Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(
                    b"[{\"partial\":",
                )))
            });
            let stream = futures_util::StreamExt::chain(first, futures_util::stream::pending());
            return Response::new(body::boxed(StreamBody::new(stream)));
        }
        "/api/v2/sandbox/gate" => {
            let mut open = s.gate.0.subscribe();
            let _ = open.wait_for(|open| *open).await;
        }
        "/api/v2/sandbox/bytes" => {
            let n = req
                .uri()
                .query()
                .and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "n"))
                .and_then(|(_, v)| v.parse::<u64>().ok())
                .unwrap_or(0);
            let mut resp = Response::new(body::boxed(StreamBody::new(pattern_stream(n))));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            return resp;
        }
        "/api/v2/users/me" if req.method() == Method::GET => {
            return json(
                StatusCode::OK,
                serde_json::json!({"id": "7e4c1b9a-0000-4000-8000-000000000001", "name": "Sandbox Client", "state": "active", "division": {"name": "Home"}}),
            );
        }
        _ => {}
    }
    let (head, mut body) = req.into_parts();
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"message": "body read failed"}),
            );
        };
        if let Ok(data) = frame.into_data() {
            len += data.len() as u64;
            hasher.update(&data);
        }
    }
    let seen = SeenRequest {
        method: head.method.clone(),
        path: head.uri.path().to_string(),
        query: head.uri.query().map(str::to_string),
        headers: head.headers.clone(),
        body_len: len,
        body_sha256: hex::encode(hasher.finalize()),
    };
    let answer = serde_json::json!({
        "method": seen.method.as_str(),
        "path": seen.path,
        "query": seen.query,
        "header_names": seen.headers.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
        "body_bytes": seen.body_len,
        "body_sha256": seen.body_sha256,
    });
    lock(&s.seen).push(seen);
    json(StatusCode::OK, answer)
}

/// The bytes `GET /api/v2/sandbox/bytes?n=N` sends: `i % 251` for byte `i`, so a reader
/// can check every byte without storing them.
pub fn pattern_byte(i: u64) -> u8 {
    (i % 251) as u8
}

fn pattern_stream(
    n: u64,
) -> impl futures_util::Stream<Item = Result<http_body::Frame<Bytes>, Infallible>> + Send {
    const CHUNK: u64 = 64 * 1024;
    // CHUNK is not a multiple of 251, so each chunk starts at its own offset in the cycle.
    let cycle: Bytes = (0..(CHUNK + 251))
        .map(pattern_byte)
        .collect::<Vec<u8>>()
        .into();
    futures_util::stream::unfold(0u64, move |sent| {
        let cycle = cycle.clone();
        async move {
            if sent >= n {
                return None;
            }
            let len = CHUNK.min(n - sent);
            let start = (sent % 251) as usize;
            let chunk = cycle.slice(start..start + len as usize);
            Some((Ok(http_body::Frame::data(chunk)), sent + len))
        }
    })
}
