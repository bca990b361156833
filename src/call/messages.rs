//! The messages the parts of the request path leave each other on a request or an answer
//! (`http` extensions), in one list: what each says, who writes it and who reads it.
//!
//! | on | message | written by | read by |
//! |---|---|---|---|
//! | request | [`PeerIdentity`]: the client certificate's common name | `ingress::server` (HTTPS with `client_ca`) | `client_auth` |
//! | request | [`PeerAddr`]: the caller's address (POSTs only) | `ingress::server` | `token_endpoint` (failed key checks per address) |
//! | request | [`OnConnection`]: the token forms being read on the connection | `ingress::watch` (POSTs on HTTP/2 and HTTPS connections) | `token_endpoint` (token forms per connection) |
//! | request | [`Caller`]: the client, or anonymous | `client_auth`; `retry` and `bearer` on the copies they send | `route`, `budget`, `bearer`, `retry`, `forward`, `notifications` |
//! | request | [`UnresolvedChannel`]: a keyless socket on a channel another replica made | `client_auth` | `route`, `notifications` |
//! | request | [`KeylessSocket`]: a keyless socket on a channel this replica made | `client_auth` | `notifications` |
//! | request | [`Admitted`]: the pooled token the governor let the call through for | `budget` | `bearer` |
//! | request | [`ReplaceToken`]: the token the upstream rejected, and when | `retry` | `bearer` |
//! | request | [`CallTrace`](crate::telemetry::traces::CallTrace): the call's server span, when traces are on | `observe`; `retry` on the copies it sends | `bearer` (a grant's parent or link), `budget` (a wait's span), `forward` (an attempt's span) |
//! | request | [`OnUpgrade`]: the caller's side of a WebSocket | hyper | `retry` (kept for a second attempt), `forward` |
//! | answer | [`Outcome`]: the call's typed record (upstream, client, token, retry, [`ErrorCode`]) | every layer that learns its part | `observe`, `retry`, `bearer`, `deadline` |
//!
//! A new message goes into this list, with its writer and its readers.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::call::outcome::TokenId;
use crate::config::ClientConfig;

pub use crate::call::outcome::Outcome;
pub use crate::http::codes::ErrorCode;
pub use hyper::upgrade::OnUpgrade;

/// The caller of a request, as established by [`crate::front::client_auth`].
#[derive(Debug, Clone)]
pub struct Caller(pub Option<Arc<ClientConfig>>);

/// Marks a socket that came without a key on a channel this replica does not know: it
/// may be the fleet's (see [`crate::back::channels::resolve`]); the notifications layer decides.
#[derive(Debug, Clone, Copy)]
pub struct UnresolvedChannel;

/// Marks a socket that came without a key on a channel this replica made: it acts as the
/// channel's maker, but its sockets are counted apart from the maker's own (see
/// [`crate::back::notifications::keyless_sockets_of`]).
#[derive(Debug, Clone, Copy)]
pub struct KeylessSocket;

/// Set on a request by the retry layer, the one message a request carries inside an
/// upstream's stack: the upstream rejected this token (its 401 arrived at `seen_at`); use
/// another from the same source — unless the platform still accepts this one, and then
/// answer with [`Outcome::rejection_stood`] so that the 401 goes to the caller.
#[derive(Debug, Clone, Copy)]
pub struct ReplaceToken {
    pub rejected: TokenId,
    pub seen_at: tokio::time::Instant,
}

/// Set on a call the governor let through: the pooled token whose budget it spends.
#[derive(Debug, Clone, Copy)]
pub struct Admitted(pub usize);

/// The address a request came from (set on POST requests only; see `PerConnection`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddr(pub IpAddr);

/// The identity a client certificate gave the connection (mutual TLS): its subject's
/// common name. Set on every request of that connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity(pub Arc<str>);

/// The token-endpoint forms being read on one connection (see [`OnConnection`]).
#[derive(Debug, Default)]
pub struct TokenForms(AtomicUsize);

/// Token-endpoint forms read at once on one connection (see
/// [`crate::front::token_endpoint`]).
pub const TOKEN_FORMS_PER_CONNECTION: usize = 2;

impl TokenForms {
    /// A place for a form on this connection, if one is free.
    pub fn take(self: &Arc<Self>) -> Option<TokenForm> {
        let taken = self.0.fetch_add(1, Ordering::Relaxed);
        let place = TokenForm(Arc::clone(self));
        (taken < TOKEN_FORMS_PER_CONNECTION).then_some(place)
    }
}

/// A token-endpoint form being read on a connection; the place is free again when dropped.
#[derive(Debug)]
pub struct TokenForm(Arc<TokenForms>);

impl Drop for TokenForm {
    fn drop(&mut self) {
        (self.0).0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The connection a request came on: its token-endpoint forms (set on POSTs on HTTP/2 and
/// HTTPS connections).
#[derive(Debug, Clone)]
pub struct OnConnection(pub Arc<TokenForms>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_reads_at_most_two_token_forms_at_once() {
        let forms = Arc::new(TokenForms::default());
        let (a, b) = (forms.take(), forms.take());
        assert!(a.is_some() && b.is_some());
        assert!(forms.take().is_none());
        drop(a);
        assert!(forms.take().is_some());
    }
}
