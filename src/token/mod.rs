//! Upstream tokens: obtained by the proxy, cached, refreshed ahead of expiry, shared.
//!
//! A [`TokenSource`] holds one upstream's current token. The hot path is one atomic load
//! ([`arc_swap`]) and a comparison of instants: no lock, no allocation. Minting happens
//! under a tokio `Mutex`, so concurrent requests that find no usable token wait for one
//! grant instead of starting their own (single flight), and the token endpoint — which has
//! its own rate limit — never sees a burst. Failed grants back off exponentially, with
//! jitter; while a usable token exists nobody waits for a grant at all.
//!
//! With `[cache]`, a source that needs a token asks the fleet first ([`shared`]): another
//! replica's token from Redis, or the fleet's lock and then a grant of its own, stored for
//! the others. Redis is never on the hot path, and never a reason for a request to fail.
//!
//! A token's life, for `expires_in = L`:
//! - usable until `L - min(L/10, 60 s)`: a margin for clock skew and time in flight;
//! - refreshed in the background from `min(L/4, 5 min)` before that.
mod backoff;
mod cache;
mod failure_log;
pub mod grant;
mod issued;
pub mod rejection;
pub mod shared;
mod source;
#[cfg(test)]
pub(crate) mod tests;

pub use cache::TokenCache;
pub use failure_log::Failure;
pub use issued::{Token, TokenError};
pub use source::snapshot::TokenSnapshot;
pub use source::{Fleet, TokenSource};
