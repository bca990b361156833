//! `private_key_jwt` (RFC 7523 §2.2, §3): the client proves who it is with a JWT signed by
//! its private key, a new one for every grant.

use std::time::{SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, Header};
use serde::Serialize;

use crate::config::{JwtSigning, SigningAlg};

/// How long an assertion is valid: RFC 7523 §3 asks for a short `exp`; a minute covers
/// any clock skew the endpoint tolerates.
const LIFETIME_SECS: u64 = 60;

/// The claims of a client assertion (RFC 7523 §3).
#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    /// Unique per assertion, so an endpoint can refuse one that is replayed.
    jti: String,
    iat: u64,
    exp: u64,
}

/// A fresh assertion for `client_id`, addressed to `token_endpoint` (or the configured
/// audience).
pub fn assertion(
    signing: &JwtSigning,
    client_id: &str,
    token_endpoint: &str,
) -> Result<String, String> {
    let key = crate::config::signing_key(signing)?;
    let mut header = Header::new(match signing.alg {
        SigningAlg::RS256 => Algorithm::RS256,
        SigningAlg::PS256 => Algorithm::PS256,
        SigningAlg::ES256 => Algorithm::ES256,
    });
    header.kid = signing.key_id.clone();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| "the system clock is before 1970".to_string())?
        .as_secs();
    let claims = Claims {
        iss: client_id,
        sub: client_id,
        aud: signing.audience.as_deref().unwrap_or(token_endpoint),
        jti: hex::encode(rand::random::<[u8; 16]>()),
        iat: now,
        exp: now + LIFETIME_SECS,
    };
    jsonwebtoken::encode(&header, &claims, &key).map_err(|e| format!("signing failed: {e}"))
}
