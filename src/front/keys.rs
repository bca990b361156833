//! Client keys: made at random, stored only as their SHA-256.

use base64::Engine as _;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// A new random client key: 32 bytes from the OS generator, base64url, with a `tg_` prefix
/// so it is recognisable in a secret scanner.
pub fn new_key() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!(
        "tg_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// The lowercase hex SHA-256 of a key, as `[[client]] key_sha256` wants it.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A key's lifetime as `tokengate key new --expires` takes it: a whole number of days
/// (`90d`), hours (`12h`) or weeks (`2w`), at most ten years.
pub fn lifetime(text: &str) -> Option<std::time::Duration> {
    let text = text.trim();
    let unit = match text.chars().last()? {
        'h' => 3600,
        'd' => 86_400,
        'w' => 7 * 86_400,
        _ => return None,
    };
    let n: u64 = text[..text.len() - 1].parse().ok().filter(|&n| n > 0)?;
    let secs = n.checked_mul(unit).filter(|&s| s <= 3653 * 86_400)?;
    Some(std::time::Duration::from_secs(secs))
}

/// Log a `key_expiring` security event for each client key of the live config that has
/// expired or expires within [`crate::config::KEY_WARNING`]: now, then once a day (a
/// reload tells at once, see [`tell_expiring`]).
/// `current`: the config being served.
pub async fn warn_of_expiry(current: impl Fn() -> std::sync::Arc<crate::config::Config>) {
    let mut day = tokio::time::interval(std::time::Duration::from_secs(24 * 3600));
    loop {
        day.tick().await;
        tell_expiring(&current());
    }
}

/// One `key_expiring` event per client key of `config` near or past its end.
pub fn tell_expiring(config: &crate::config::Config) {
    let now = std::time::SystemTime::now();
    for (client, key, left) in config.keys_expiring(now, crate::config::KEY_WARNING) {
        let not_after = key
            .not_after
            .map(crate::config::rfc3339)
            .unwrap_or_default();
        let expires_in_secs = match left {
            Ok(left) => left.as_secs() as i64,
            Err(ago) => -(ago.as_secs() as i64),
        };
        crate::emit!(
            warn,
            "key_expiring",
            client = %client,
            key = %key.fingerprint(),
            %not_after,
            expires_in_secs
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_are_days_hours_or_weeks() {
        assert_eq!(lifetime("90d").map(|d| d.as_secs()), Some(90 * 86_400));
        assert_eq!(lifetime("12h").map(|d| d.as_secs()), Some(12 * 3600));
        assert_eq!(lifetime("2w").map(|d| d.as_secs()), Some(14 * 86_400));
        for bad in ["", "d", "0d", "-1d", "90", "90m", "1.5d", "99999w"] {
            assert_eq!(lifetime(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn keys_are_random_and_hash_to_hex() {
        let (a, b) = (new_key(), new_key());
        assert_ne!(a, b);
        assert!(a.starts_with("tg_") && a.len() > 40);
        assert_eq!(
            hash_key("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
