//! The AEAD seal on what the fleet stores: XChaCha20-Poly1305 under `cache.encryption_key`,
//! a fresh random nonce per value, and the Redis key as associated data, so a value copied
//! under another key (another pool index, other credentials) does not open.

use std::time::{Duration, UNIX_EPOCH};

use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::XNonce;
use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use super::store::{SharedCache, SharedToken};

/// Stored values start with this, so a future format can be told apart.
const FORMAT: &[u8] = b"tg1";
const NONCE_LEN: usize = 24;

/// The sealed form. Field names are short: this is what Redis stores, encrypted.
#[derive(Serialize, Deserialize)]
struct Sealed {
    t: String,
    at_ms: u64,
    life_ms: u64,
    api: Option<String>,
    /// The fleet generation; values stored before it was sealed in count as 0.
    #[serde(default)]
    g: u64,
}

impl SharedCache {
    /// The stored form of `token` under `key`; `None` if it cannot be made.
    pub(super) fn seal(&self, key: &str, token: &SharedToken) -> Option<Vec<u8>> {
        let millis = |d: Duration| d.as_millis().min(u64::MAX as u128) as u64;
        let plain = Sealed {
            t: token.access_token.expose_secret().to_string(),
            at_ms: millis(
                token
                    .issued_at
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default(),
            ),
            life_ms: millis(token.lifetime),
            api: token.api_base.clone(),
            g: token.generation,
        };
        let plain = serde_json::to_vec(&plain).ok()?;
        self.seal_bytes(key, &plain)
    }

    /// `plain`, sealed under `key` (see the module docs).
    pub(super) fn seal_bytes(&self, key: &str, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        let sealed = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: key.as_bytes(),
                },
            )
            .ok()?;
        let mut out = Vec::with_capacity(FORMAT.len() + NONCE_LEN + sealed.len());
        out.extend_from_slice(FORMAT);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        Some(out)
    }

    /// The plaintext of a stored value; `None` for anything that does not open: another
    /// key, another fleet, tampering, a value of another format.
    pub(super) fn unseal(&self, key: &str, value: &[u8]) -> Option<Vec<u8>> {
        let rest = value.strip_prefix(FORMAT)?;
        if rest.len() < NONCE_LEN {
            return None;
        }
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let payload = Payload {
            msg: sealed,
            aad: key.as_bytes(),
        };
        self.cipher.decrypt(XNonce::from_slice(nonce), payload).ok()
    }

    pub(super) fn open(&self, key: &str, value: &[u8]) -> Option<SharedToken> {
        let Some(plain) = self.unseal(key, value) else {
            tracing::warn!(
                redis = %self.config.redis_target,
                "a shared token did not open with this replica's cache.encryption_key; ignoring it (do all replicas use the same key?)"
            );
            return None;
        };
        let sealed: Sealed = serde_json::from_slice(&plain).ok()?;
        Some(SharedToken {
            access_token: SecretString::from(sealed.t),
            issued_at: UNIX_EPOCH + Duration::from_millis(sealed.at_ms),
            lifetime: Duration::from_millis(sealed.life_ms),
            api_base: sealed.api,
            generation: sealed.g,
        })
    }
}
