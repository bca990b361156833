//! The calls on their way to the platform: let through by the governor and not answered
//! yet. When a window's count is learned from an answer, the platform may not have
//! counted those yet, so they are held back from the budget (see `Governor::observe`).
//!
//! A call is counted from the moment the governor lets it through (under its lock, with
//! the window's count), not when it reaches the connection pool: a call let through by
//! the dispatcher may not have run yet, and one may wait for a token or a connection.
//! Counting only the calls holding a connection, the governor believed the calls queued
//! for one were free and the platform answered 429s.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One call on its way with one pooled token; it stops counting when dropped (once its
/// answer's head was read, or when the call ends without one). Counted per token: a
/// token's window is learned from its own answers, and only its own calls can be in it.
#[derive(Debug)]
pub struct Unanswered(Arc<[AtomicU64]>, usize);

impl Unanswered {
    /// Count a call with token `index` among `calls` (one count per pooled token).
    pub(super) fn counted(calls: &Arc<[AtomicU64]>, index: usize) -> Unanswered {
        if let Some(n) = calls.get(index) {
            n.fetch_add(1, Ordering::Relaxed);
        }
        Unanswered(Arc::clone(calls), index)
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        if let Some(n) = self.0.get(self.1) {
            n.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// A call let through: the pooled token whose budget it spends (`None`: no budget is
/// known; pick as usual), counted until its answer when it has one.
#[derive(Debug)]
pub struct Admission {
    pub index: Option<usize>,
    pub unanswered: Option<Unanswered>,
}
