//! The messages the parts of the request path leave each other on a request or an answer
//! (`http` extensions), in one list: what each says, who writes it and who reads it.
//!
//! | on | message | written by | read by |
//! |---|---|---|---|
//! | request | [`PeerIdentity`]: the client certificate's common name | `server` (HTTPS with `client_ca`) | `client_auth` |
//! | request | [`PeerAddr`]: the caller's address (POSTs only) | `server` | `token_endpoint` (failed key checks per address) |
//! | request | [`OnConnection`]: the connection's watch | `connection_watch` (HTTP/2 and HTTPS connections) | `token_endpoint` (token forms per connection) |
//! | request | [`Caller`]: the client, or anonymous | `client_auth`; `retry` and `bearer` on the copies they send | `route`, `budget`, `bearer`, `retry`, `forward`, `notifications` |
//! | request | [`UnresolvedChannel`]: a keyless socket on a channel another replica made | `client_auth` | `route`, `notifications` |
//! | request | [`KeylessSocket`]: a keyless socket on a channel this replica made | `client_auth` | `notifications` |
//! | request | [`Admitted`]: the pooled token the governor let the call through for | `budget` | `bearer` |
//! | request | [`ReplaceToken`]: the token the upstream rejected, and when | `retry` | `bearer` |
//! | request | [`OnUpgrade`]: the caller's side of a WebSocket | hyper | `retry` (kept for a second attempt), `forward` |
//! | answer | [`Outcome`]: the call's typed record (upstream, client, token, retry, [`ErrorCode`]) | every layer that learns its part | `observe`, `retry`, `bearer`, `deadline` |
//!
//! A new message goes into this list, with its writer and its readers.

pub use crate::connection_watch::OnConnection;
pub use crate::error::ErrorCode;
pub use crate::layers::bearer::ReplaceToken;
pub use crate::layers::budget::Admitted;
pub use crate::layers::client_auth::Caller;
pub use crate::notifications::{KeylessSocket, UnresolvedChannel};
pub use crate::outcome::Outcome;
pub use crate::server::{PeerAddr, PeerIdentity};
pub use hyper::upgrade::OnUpgrade;
