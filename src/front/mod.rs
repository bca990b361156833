//! The front half of the request path, shared by every upstream: observe, guard, the
//! proxy's own token endpoint and sessions, the client key check, and the route to an
//! upstream's back half (see [`crate::stack`]).

pub mod client_auth;
pub mod guard;
pub mod jwks;
pub mod jwt_callers;
pub mod keys;
pub mod observe;
pub mod route;
pub mod session;
pub mod shared_credentials;
pub mod token_endpoint;
