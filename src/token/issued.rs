//! A token as the proxy holds it: the header to attach, when it was obtained, when it
//! must be refreshed and when it stops being usable; and why none could be had.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;

use super::grant::GrantError;

/// A bearer token, ready to be attached.
pub struct Token {
    /// `Bearer <token>`, marked sensitive so HTTP/2 never indexes it.
    header: HeaderValue,
    /// Tells tokens apart without comparing their values: a 401 names the one it rejected.
    pub generation: u64,
    pub obtained: Instant,
    pub refresh_at: Instant,
    pub usable_until: Instant,
    /// The org's idle timeout (Genesys `GET /api/v2/tokens/timeout`) in ms, 0 for none:
    /// a token no call used for that long is dead on the platform.
    idle_ms: AtomicU64,
    /// When a call last used it, in ms after `obtained`.
    used_ms: AtomicU64,
    /// The idle timeout was asked for with this token (once per token).
    idle_asked: AtomicBool,
    /// The span of the grant that minted it, when traces are on: calls that waited for
    /// the grant link to it.
    pub grant_span: Option<opentelemetry::trace::SpanContext>,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token")
            .field("generation", &self.generation)
            .field("header", &"[redacted]")
            .field("usable_until", &self.usable_until)
            .finish()
    }
}

impl Token {
    pub fn header(&self) -> &HeaderValue {
        &self.header
    }

    pub fn is_usable(&self, now: Instant) -> bool {
        now < self.usable_until && now < self.idles_at()
    }

    /// When it idles on the platform, with a margin (a tenth, at most 30 s): the next call
    /// then takes a fresh token rather than pay a 401 and a retry. Far off without an
    /// idle timeout.
    pub fn idles_at(&self) -> Instant {
        let idle = self.idle_ms.load(Ordering::Relaxed);
        if idle == 0 {
            return self.usable_until;
        }
        let margin = (idle / 10).min(30_000);
        self.obtained + Duration::from_millis(self.used_ms.load(Ordering::Relaxed) + idle - margin)
    }

    /// A call used it now: its idle clock starts again.
    pub fn touch(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.obtained).as_millis();
        self.used_ms
            .fetch_max(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// Hold it to the org's idle timeout (`None`: none).
    pub fn set_idle_timeout(&self, idle: Option<Duration>) {
        let ms = idle.map_or(0, |d| {
            u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
        });
        self.idle_ms.store(ms, Ordering::Relaxed);
    }

    /// The idle timeout could not be asked now: ask with the next answer.
    pub fn ask_idle_timeout_later(&self) {
        self.idle_asked.store(false, Ordering::Relaxed);
    }

    /// Whether the idle timeout is still to be asked with this token (a look, not a claim).
    pub fn idle_timeout_unasked(&self) -> bool {
        !self.idle_asked.load(Ordering::Relaxed)
    }

    /// Whether the idle timeout is still to be asked with this token (true once).
    pub fn ask_idle_timeout(&self) -> bool {
        !self.idle_asked.swap(true, Ordering::Relaxed)
    }

    pub(super) fn due_for_refresh(&self, now: Instant) -> bool {
        now >= self.refresh_at
    }

    /// Lifetimes are measured from when the grant was *sent*, so time in flight only ever
    /// makes the proxy's idea of expiry earlier than the server's.
    pub(super) fn new(
        header: HeaderValue,
        generation: u64,
        sent: Instant,
        lifetime: Duration,
    ) -> Token {
        let margin = (lifetime / 10).min(Duration::from_secs(60));
        let usable_until = sent + lifetime - margin;
        let lead = (lifetime / 4).min(Duration::from_secs(300));
        Token {
            header,
            generation,
            obtained: sent,
            refresh_at: usable_until - lead,
            usable_until,
            idle_ms: AtomicU64::new(0),
            used_ms: AtomicU64::new(0),
            idle_asked: AtomicBool::new(false),
            grant_span: None,
        }
    }
}

/// Why no token could be had.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{cause}")]
pub struct TokenError {
    pub cause: GrantError,
    /// When the next grant will be attempted, if the source is backing off.
    pub retry_after: Option<Duration>,
}
