//! What the status page shows of a token source. Nothing secret.

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::TokenSource;
use crate::token::failure_log::Failure;

/// A token source's state as an operator sees it. Nothing secret.
#[derive(Debug, Clone)]
pub struct TokenSnapshot {
    /// `valid`, `refreshing` (a grant is in flight), `failing` (no usable token and the
    /// last grant failed) or `none` (nothing obtained yet).
    pub state: &'static str,
    pub expires_in: Option<Duration>,
    pub age: Option<Duration>,
    pub grants_ok: u64,
    pub grants_failed: u64,
    pub last_failure: Option<Failure>,
    /// `current` or `next` (`client_secret_next`), for methods that send a secret.
    pub secret_in_use: Option<&'static str>,
    /// The org's idle token timeout, once the platform told it.
    pub idle_timeout: Option<Duration>,
}

impl TokenSource {
    /// The state of this source, for the status page.
    pub fn snapshot(&self) -> TokenSnapshot {
        let now = Instant::now();
        let usable = self.usable();
        let minting = self.minting.try_lock().is_err() || self.refreshing.load(Ordering::Relaxed);
        let last_failure = self
            .last_failure
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        let state = match (&usable, minting, &last_failure) {
            (_, true, _) => "refreshing",
            (Some(_), false, _) => "valid",
            (None, false, Some(_)) => "failing",
            (None, false, None) => "none",
        };
        TokenSnapshot {
            state,
            expires_in: usable.as_ref().map(|t| t.usable_until - now),
            age: usable.as_ref().map(|t| now - t.obtained),
            grants_ok: self.grants_ok.load(Ordering::Relaxed),
            grants_failed: self.grants_failed.load(Ordering::Relaxed),
            last_failure,
            secret_in_use: self.granter.secret_in_use().map(|s| s.name()),
            idle_timeout: match self.idle_ms.load(Ordering::Relaxed) {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
        }
    }
}
