//! The integration tests, one binary: the real `tokengate` binary on loopback ports, called
//! over HTTP by real clients, in front of the sandbox crate (a Genesys-like and CXone-like
//! login host and API host) and, where a test says so, redis-server, chromium or the
//! official Genesys Python SDK. Those tests are `#[ignore]`d so that `cargo test` passes
//! without them; `scripts/test.sh` installs them and runs everything.

mod support;

mod api_host_connections;
mod attacks;
mod channels;
mod client_keys;

mod check;
mod cli;
mod cxone;
mod deploy;
mod enterprise;
mod errors;
mod events;
mod fleet_budget;
mod fuzz;
mod genesys_sdk;
mod hardening;
mod jwt_callers;
mod notifications;
mod proxy;
mod rate_budget;
mod replicas;
mod resilience;
mod revocation;
mod security;
mod shared_limits;

mod status_page;
mod traces;
mod usage;
mod websockets;
