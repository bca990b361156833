//! The rate budget of an upstream's tokens, and a fair share of it for every client.
//!
//! Genesys Cloud allows each token so many API calls per window (300 a minute by
//! default) and says where a token stands on every answer: `inin-ratelimit-allowed`,
//! `inin-ratelimit-count`, `inin-ratelimit-reset` (seconds). The [`Governor`] learns that
//! (or takes `rate_limit = "300/min"` where a platform says nothing), counts the calls it
//! lets through in each token's window, and holds back a call that would overrun it:
//! the call waits for the window to reset, up to `rate_limit_max_wait_secs`, else the
//! proxy answers `429 rate_limited` itself, without spending the platform's budget.
//!
//! Waiting calls are let through in weighted fair order (start-time fair queueing): each
//! call gets a tag, its client's last tag (or the virtual time, if later) plus
//! `1 / share`, and the smallest tag goes first. A client within its share is never
//! starved by one above it, and a quiet client's call goes ahead of a noisy client's
//! backlog. Until a budget is known, calls pass without taking the lock.

mod answers;
mod fleet;
mod gate;
mod queue;
mod routes;
mod shares;
mod unanswered;
mod window;

pub use gate::{FleetBudget, Governor};
pub use queue::Refusal;
pub use routes::{RouteBudget, RouteBudgets};
pub use shares::ShareNow;
pub use unanswered::{Admission, Unanswered};
pub use window::Budget;
pub use window::{
    documented_budget, header_number, RATELIMIT_ALLOWED, RATELIMIT_COUNT, RATELIMIT_RESET,
};

#[cfg(test)]
mod tests;
