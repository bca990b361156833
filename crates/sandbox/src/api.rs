//! The API host: Genesys-like answers to bearer-token calls, 401s with Genesys' error body,
//! a per-token rate limit when configured, and an echo of what it received.

use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::{json, lock, unauthorized, Body, SandboxOptions, SeenRequest, State};

fn correlation_id() -> HeaderValue {
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    HeaderValue::try_from(hex::encode(bytes)).unwrap_or(HeaderValue::from_static("0"))
}

/// Answer a rejected token (after waiting for company, if a test asked for it).
async fn bad_credentials(_s: &State) -> Response<Body> {
    #[cfg(feature = "fixtures")]
    _s.controls.hold_401().await;
    unauthorized("bad.credentials", "Invalid login credentials.")
}

pub(crate) async fn answer(
    o: &SandboxOptions,
    s: &State,
    req: Request<Incoming>,
) -> Response<Body> {
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

/// Where a token stands in its rate-limit window: calls allowed, counted, seconds left.
struct Standing {
    allowed: u64,
    count: u64,
    reset: u64,
}

impl Standing {
    /// Genesys' headers, on every answer to a call with a valid token.
    fn write(&self, h: &mut HeaderMap) {
        h.insert("inin-ratelimit-count", HeaderValue::from(self.count));
        h.insert("inin-ratelimit-allowed", HeaderValue::from(self.allowed));
        h.insert("inin-ratelimit-reset", HeaderValue::from(self.reset));
    }
}

/// Count a call in a window of `window` (when it started, and its calls; a new one starts
/// when it has run out): the calls in it, and the seconds left.
fn count_call(entry: &mut (Instant, u64), now: Instant, window: std::time::Duration) -> (u64, u64) {
    if now.duration_since(entry.0) >= window {
        *entry = (now, 0);
    }
    entry.1 += 1;
    let left = window.saturating_sub(now.duration_since(entry.0));
    // Whole seconds, rounded up: the window ends no later than it says.
    (entry.1, left.as_secs_f64().ceil().max(1.0) as u64)
}

/// Count a call against `token`'s rate limit (when one is set): where it stands, or the
/// 429 to answer when the window is spent.
#[allow(clippy::result_large_err)] // one answer, made once per call
fn rate_limited(
    o: &SandboxOptions,
    s: &State,
    token: &str,
) -> Result<Option<Standing>, Response<Body>> {
    let Some(allowed) = o.per_token_limit else {
        return Ok(None);
    };
    let now = Instant::now();
    let (count, reset) = count_call(
        lock(&s.usage).entry(token.to_string()).or_insert((now, 0)),
        now,
        o.limit_window,
    );
    if count <= allowed {
        return Ok(Some(Standing {
            allowed,
            count,
            reset,
        }));
    }
    s.throttled.fetch_add(1, Ordering::SeqCst);
    let mut resp = json(
        StatusCode::TOO_MANY_REQUESTS,
        serde_json::json!({"message": format!("Rate limit exceeded the maximum. [{allowed}] requests for [{}] seconds", o.limit_window.as_secs()), "code": "too.many.requests", "status": 429}),
    );
    let h = resp.headers_mut();
    h.insert(header::RETRY_AFTER, HeaderValue::from(reset));
    Standing {
        allowed,
        count,
        reset,
    }
    .write(h);
    Err(resp)
}

/// Count a call against the `route_limit` when it is on that route: the 429 to answer when
/// the route's window is spent (the platform's uniform 429, `Retry-After` always).
#[allow(clippy::result_large_err)] // one answer, made once per call
fn route_limited(
    o: &SandboxOptions,
    s: &State,
    req: &Request<Incoming>,
) -> Result<(), Response<Body>> {
    let Some((route, allowed)) = &o.route_limit else {
        return Ok(());
    };
    if !format!("{} {}", req.method(), req.uri().path()).starts_with(route.as_str()) {
        return Ok(());
    }
    let now = Instant::now();
    let (count, reset) = count_call(
        lock(&s.route_usage).get_or_insert((now, 0)),
        now,
        o.limit_window,
    );
    if count <= *allowed {
        return Ok(());
    }
    s.throttled.fetch_add(1, Ordering::SeqCst);
    let mut resp = json(
        StatusCode::TOO_MANY_REQUESTS,
        serde_json::json!({"message": "Rate limit exceeded the maximum for this resource", "code": "too.many.requests.retry.after", "status": 429}),
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(reset));
    Err(resp)
}

async fn api_answer(o: &SandboxOptions, s: &State, req: Request<Incoming>) -> Response<Body> {
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
        None => return bad_credentials(s).await,
        Some(expiry) if expiry <= Instant::now() => {
            return unauthorized(
                "credentials.expired",
                "The authentication token has expired.",
            )
        }
        Some(_) => {}
    }
    if let Some(idle) = o.idle_timeout {
        let now = Instant::now();
        let mut last_use = lock(&s.last_use);
        let used = last_use.entry(token.clone()).or_insert(now);
        if now.duration_since(*used) >= idle {
            drop(last_use);
            s.idled_calls.fetch_add(1, Ordering::SeqCst);
            return unauthorized(
                "credentials.expired",
                "The authentication token has expired.",
            );
        }
        let preserves = req.method() == Method::GET
            && req.uri().path() == "/api/v2/tokens/me"
            && req
                .uri()
                .query()
                .is_some_and(|q| q.split('&').any(|p| p == "preserveIdleTTL=true"));
        if !preserves {
            *used = now;
            s.idle_resets.fetch_add(1, Ordering::SeqCst);
        }
    }
    let standing = match rate_limited(o, s, &token) {
        Ok(standing) => standing,
        Err(resp) => return resp,
    };
    if let Err(resp) = route_limited(o, s, &req) {
        return resp;
    }
    let mut resp = match token_itself(o, s, &token, &req) {
        Some(resp) => resp,
        None => served(s, req).await,
    };
    if let Some(standing) = standing {
        standing.write(resp.headers_mut());
    }
    resp
}

/// `/api/v2/tokens/me`, about the token the call carries: `GET` describes it, `HEAD`
/// verifies it (200, no body), `DELETE` revokes it (204).
fn token_itself(
    o: &SandboxOptions,
    s: &State,
    token: &str,
    req: &Request<Incoming>,
) -> Option<Response<Body>> {
    if req.uri().path() == "/api/v2/tokens/timeout" && req.method() == Method::GET {
        s.idle_questions.fetch_add(1, Ordering::SeqCst);
        return Some(json(
            StatusCode::OK,
            serde_json::json!({
                "idleTokenTimeoutSeconds": o.idle_timeout.map_or(0, |d| d.as_secs()),
                "enableIdleTokenTimeout": o.idle_timeout.is_some(),
            }),
        ));
    }
    if req.uri().path() != "/api/v2/tokens/me" {
        return None;
    }
    let resp = match *req.method() {
        Method::HEAD => {
            s.token_checks.fetch_add(1, Ordering::SeqCst);
            Response::new(crate::full(Bytes::new()))
        }
        Method::GET => json(
            StatusCode::OK,
            serde_json::json!({"organization": {"id": "5f4c0000-0000-4000-8000-00000000beef"}, "homeOrg": {"id": "5f4c0000-0000-4000-8000-00000000beef"}, "OAuthClient": {"id": o.client_id, "name": "sandbox"}}),
        ),
        Method::DELETE => {
            lock(&s.tokens).remove(token);
            s.tokens_deleted.fetch_add(1, Ordering::SeqCst);
            let mut resp = Response::new(crate::full(Bytes::new()));
            *resp.status_mut() = StatusCode::NO_CONTENT;
            resp
        }
        _ => json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"message": "method not allowed", "code": "method.not.allowed", "status": 405}),
        ),
    };
    Some(resp)
}

/// The answer to a call with a valid token, within its rate limit.
async fn served(s: &State, req: Request<Incoming>) -> Response<Body> {
    let req = match crate::streaming::answer(s, req).await {
        Ok(resp) => return resp,
        Err(req) => req,
    };
    #[cfg(feature = "fixtures")]
    if let Some(resp) = crate::fixtures::answer(s, &req).await {
        return resp;
    }
    // CXone's agent event long poll: answers 304 when nothing happened within `timeout`
    // seconds (at most 60).
    if req.uri().path().ends_with("/get-next-event") && req.method() == Method::GET {
        let secs = req
            .uri()
            .query()
            .and_then(|q| {
                form_urlencoded::parse(q.as_bytes())
                    .find(|(k, _)| k == "timeout")
                    .and_then(|(_, v)| v.parse::<u64>().ok())
            })
            .unwrap_or(60)
            .min(60);
        tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
        let mut resp = Response::new(crate::full(Bytes::new()));
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        return resp;
    }
    if req.uri().path() == "/api/v2/users/me" && req.method() == Method::GET {
        return json(
            StatusCode::OK,
            serde_json::json!({"id": "7e4c1b9a-0000-4000-8000-000000000001", "name": "Sandbox Client", "state": "active", "division": {"name": "Home"}}),
        );
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
