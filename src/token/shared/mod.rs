//! The fleet's shared token cache: tokens kept in Redis, encrypted, so replicas behind a
//! load balancer share one token (and one grant) instead of minting one each.
//!
//! Redis is consulted only when a replica's own copy is missing, due for refresh or was
//! just rejected — never on the request hot path, which stays one atomic load.
//!
//! What Redis holds, per set of credentials (a hash of [`GrantConfig::cache_key`], never
//! the credentials themselves):
//! - `<prefix>:token:<creds>:<pool index>` — the token, sealed with XChaCha20-Poly1305
//!   under the configured key, the Redis key as associated data (a value copied under
//!   another key does not open), and a TTL of the token's remaining life;
//! - `<prefix>:lock:<creds>` — the fleet's single flight: `SET NX PX` with a lease, held by
//!   whoever is minting, released with a compare-and-delete. A holder that dies only
//!   delays the others by the lease.
//! - `<prefix>:calls:<creds>:<pool index>` — the calls of a token's rate-limit window the
//!   replicas have reserved, and how many replicas reserved some (see `budget`).
//!
//! Redis is one server (`redis_url`) or a master found through Sentinel (`sentinels`,
//! `master_name`): after a failed command the master is asked of the sentinels again, so
//! a failover moves the fleet to the new master without a restart.
//!
//! Redis down or slow is never a failed request: every command has a short timeout, and
//! after a failure the cache is left alone for a few seconds (each replica mints on its
//! own meanwhile). The outage is logged once, and the return once.
//!
//! [`GrantConfig::cache_key`]: crate::config::GrantConfig::cache_key

mod budget;
mod scripts;
mod seal;
mod store;
mod usage;

pub use budget::{Lease, Leased};
pub use store::{FleetLock, SharedCache, SharedToken, Unavailable};
pub use usage::UsageRows;

#[cfg(test)]
mod tests;
