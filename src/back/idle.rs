//! The org's idle token timeout (Genesys): a token no call used for that long is dead on
//! the platform (5 min to 8 h; at most 15 min with HIPAA), so after a quiet spell the
//! cached token would cost the first call a 401 and a retry. After a token's first
//! answer the proxy asks `GET /api/v2/tokens/timeout` with it, once, and holds the token
//! (and every later one) to it: a token past its idle time is replaced before a call is
//! sent, and the background refresh replaces it as it idles (see
//! [`crate::token::Token::idles_at`]). A 403 or 404 means the org sets none.

use std::time::Duration;

use http::header;

use crate::call::messages::Caller;
use crate::call::{BoxFuture, ProxyRequest};
use crate::governor::Unanswered;
use crate::http::body;
use crate::token::Token;
use crate::upstream::WorkerUpstream;

/// Where the platform tells its idle timeout.
pub const IDLE_TIMEOUT: &str = "/api/v2/tokens/timeout";

/// The idle timeout an answer to [`IDLE_TIMEOUT`] gives: `Some(None)` for none,
/// `None` when the answer says nothing either way (a 5xx, a body that is not the one
/// documented).
pub fn read_answer(status: u16, body: &[u8]) -> Option<Option<Duration>> {
    match status {
        200 => {
            let v: serde_json::Value = serde_json::from_slice(body).ok()?;
            let enabled = v.get("enableIdleTokenTimeout")?.as_bool()?;
            let secs = v.get("idleTokenTimeoutSeconds").and_then(|s| s.as_u64());
            Some(match (enabled, secs) {
                (true, Some(secs)) if secs > 0 => Some(Duration::from_secs(secs)),
                _ => None,
            })
        }
        403 | 404 => Some(None),
        _ => None,
    }
}

/// The question to ask with `token` (as `caller`, for the connection slots).
pub fn question(token: &Token, caller: Option<Caller>) -> Option<ProxyRequest> {
    let mut ask = http::Request::get(IDLE_TIMEOUT).body(body::empty()).ok()?;
    ask.headers_mut()
        .insert(header::AUTHORIZATION, token.header().clone());
    if let Some(caller) = caller {
        ask.extensions_mut().insert(caller);
    }
    Some(ask)
}

/// Read the platform's `answer` to [`question`], asked with pooled token `index`, and
/// hold the upstream's tokens to the idle timeout it gives.
/// (`unanswered`: the question, on its way until its answer was read.)
pub async fn learn(
    upstream: WorkerUpstream,
    answer: BoxFuture,
    index: usize,
    unanswered: Unanswered,
) {
    let Ok(answer) = answer.await;
    let status = answer.status().as_u16();
    // It is a call in the token's budget like any other.
    upstream
        .budget
        .observe(index, status, answer.headers(), || upstream.in_flight());
    drop(unanswered);
    let Some(bytes) = body::read_small(answer.into_body(), 64 * 1024).await else {
        return;
    };
    let Some(idle) = read_answer(status, &bytes) else {
        tracing::debug!(upstream = %upstream.name(), status, "the idle token timeout could not be read");
        return;
    };
    if let Some(source) = upstream.tokens.get(index) {
        source.learned_idle_timeout(idle);
    }
    match idle {
        Some(idle) => {
            tracing::info!(upstream = %upstream.name(), idle_secs = idle.as_secs(), "the org's tokens idle out: a token unused this long is replaced before a call")
        }
        None => tracing::debug!(upstream = %upstream.name(), "the org sets no idle token timeout"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_answer_is_read_as_documented() {
        let on = br#"{"idleTokenTimeoutSeconds": 900, "enableIdleTokenTimeout": true}"#;
        assert_eq!(read_answer(200, on), Some(Some(Duration::from_secs(900))));
        let off = br#"{"idleTokenTimeoutSeconds": 900, "enableIdleTokenTimeout": false}"#;
        assert_eq!(read_answer(200, off), Some(None));
        assert_eq!(read_answer(404, b""), Some(None));
        assert_eq!(read_answer(403, b"{}"), Some(None));
        assert_eq!(read_answer(200, b"<html>"), None);
        assert_eq!(read_answer(503, b""), None);
    }
}
