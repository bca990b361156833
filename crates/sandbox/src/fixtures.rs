//! Test-only endpoints and controls (the `fixtures` feature): what a test needs to drive
//! the proxy into its failure paths. None of this is in the release binary.
//!
//! Endpoints, for any valid token: `GET /api/v2/sandbox/bytes?n=N` streams N bytes of a
//! known pattern, `/api/v2/sandbox/gate` answers when the test opens the gate,
//! `/api/v2/sandbox/always401` rejects every token, `/api/v2/sandbox/hang` never answers,
//! `/api/v2/sandbox/stall` sends its head and a first chunk, then nothing.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Incoming;
use tokio::sync::watch;

use crate::{json, unauthorized, Body, Sandbox};

/// What the tests can switch.
pub(crate) struct Controls {
    /// `/api/v2/sandbox/gate` answers once this is true.
    gate: watch::Sender<bool>,
    /// Hold `bad.credentials` answers until this many are waiting (0: never hold).
    hold_401s: AtomicU64,
    held_401s: watch::Sender<u64>,
    /// API calls still to be answered with 429.
    throttle: AtomicU64,
    /// The login host answers every grant as its rate limit does.
    pub(crate) grants_rate_limited: std::sync::atomic::AtomicBool,
}

impl Default for Controls {
    fn default() -> Self {
        Controls {
            gate: watch::channel(false).0,
            hold_401s: AtomicU64::new(0),
            held_401s: watch::channel(0).0,
            throttle: AtomicU64::new(0),
            grants_rate_limited: Default::default(),
        }
    }
}

impl Controls {
    /// Before a `bad.credentials` answer: wait for company if the test asked for it.
    pub(crate) async fn hold_401(&self) {
        let hold = self.hold_401s.load(Ordering::SeqCst);
        if hold > 0 {
            self.held_401s.send_modify(|n| *n += 1);
            let mut held = self.held_401s.subscribe();
            let _ = held.wait_for(|n| *n >= hold).await;
        }
    }
}

impl Sandbox {
    /// Take the login host down, as an outage would: its port refuses connections.
    pub async fn stop_login(&mut self) {
        if let Some(task) = self.login.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Bring the login host back on the same port.
    pub async fn start_login(&mut self) -> std::io::Result<()> {
        if self.login.is_none() {
            let listener = tokio::net::TcpListener::bind(self.login_addr).await?;
            self.serve_login(listener);
        }
        Ok(())
    }

    /// Answer the next `n` API calls with 429 and `Retry-After: 1`, as a spent rate limit.
    pub fn throttle_next(&self, n: u64) {
        self.state.controls.throttle.store(n, Ordering::SeqCst);
    }

    /// Revoke every token, and hold the 401s that follow until `n` requests are waiting for
    /// one: so that `n` concurrent calls all meet the revoked token.
    pub fn revoke_all_and_hold_401s(&self, n: u64) {
        let controls = &self.state.controls;
        controls.held_401s.send_replace(0);
        controls.hold_401s.store(n, Ordering::SeqCst);
        self.revoke_all();
    }

    /// Rotate the OAuth client's secret: from now on the login host accepts `new` and
    /// refuses the one before with `invalid_client`.
    pub fn rotate_client_secret(&self, new: &str) {
        if let Ok(mut secret) = self.state.rotated_secret.lock() {
            *secret = Some(new.to_string());
        }
    }

    /// Refuse every grant from now on (`true`) as the login host's rate limit does (400
    /// `invalid_request`, "rate limit exceeded"), or grant again (`false`).
    pub fn rate_limit_grants(&self, on: bool) {
        self.state
            .controls
            .grants_rate_limited
            .store(on, Ordering::SeqCst);
    }

    /// Let the requests waiting at `/api/v2/sandbox/gate` (and later ones) through.
    pub fn open_gate(&self) {
        self.state.controls.gate.send_replace(true);
    }
}

/// The answer to a call with a valid token, if a fixture makes it; `None` lets the API host
/// answer as usual (the gate, once open, falls through to the echo).
pub(crate) async fn answer(s: &crate::State, req: &Request<Incoming>) -> Option<Response<Body>> {
    let c = &s.controls;
    let throttled = c
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
        return Some(resp);
    }
    match req.uri().path() {
        "/api/v2/sandbox/always401" => Some(unauthorized(
            "bad.credentials",
            "Invalid login credentials.",
        )),
        "/api/v2/sandbox/hang" => std::future::pending().await,
        "/api/v2/sandbox/stall" => {
            let first = futures_util::stream::once(async {
                Ok::<_, Infallible>(http_body::Frame::data(Bytes::from_static(
                    b"[{\"partial\":",
                )))
            });
            let stream = futures_util::StreamExt::chain(first, futures_util::stream::pending());
            Some(Response::new(StreamBody::new(stream).boxed_unsync()))
        }
        "/api/v2/sandbox/gate" => {
            let mut open = c.gate.subscribe();
            let _ = open.wait_for(|open| *open).await;
            None
        }
        "/api/v2/sandbox/bytes" => {
            let n = req
                .uri()
                .query()
                .and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "n"))
                .and_then(|(_, v)| v.parse::<u64>().ok())
                .unwrap_or(0);
            let mut resp = Response::new(StreamBody::new(pattern_stream(n)).boxed_unsync());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            Some(resp)
        }
        _ => None,
    }
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
