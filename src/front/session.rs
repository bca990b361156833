//! Tokens the proxy issues itself, to legacy apps that insist on doing OAuth.
//!
//! Such an app (an official Genesys SDK, say) first asks `/oauth/token` for a token with
//! its client name and key as Basic credentials, then sends that token on every call. The
//! proxy answers with a session token that names the client and its expiry, signed with
//! HMAC-SHA-256 under a key made at random when the process starts (reloads keep it). It is never the
//! upstream's token and carries nothing secret: the signature covers the client's key
//! hash, so rotating a client's key ends its sessions; a restart ends them all (the app
//! then gets 401 and asks again, as OAuth clients do).
//!
//! Format: `tgs.<base64url(client name)>.<expiry, unix seconds>.<base64url(mac)>`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

use crate::config::ClientConfig;

const PREFIX: &str = "tgs.";

pub struct Sessions {
    /// One HMAC-SHA-256 block: the key length HMAC uses as is.
    key: [u8; 64],
    /// Session tokens their callers ended (`DELETE /api/v2/tokens/me`), by SHA-256, with
    /// their expiry: refused until then.
    ended: std::sync::Mutex<std::collections::HashMap<[u8; 32], u64>>,
    /// Whether any session was ever ended: until then a session costs no hash or lock.
    any_ended: std::sync::atomic::AtomicBool,
}

/// The most ended sessions remembered at once (expired ones are forgotten first).
const MAX_ENDED: usize = 65_536;

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions").finish_non_exhaustive()
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Default for Sessions {
    fn default() -> Self {
        Self::new()
    }
}

impl Sessions {
    /// A new signing key. It lives as long as the process (config reloads keep it), so
    /// sessions survive a reload.
    pub fn new() -> Sessions {
        let mut key = [0u8; 64];
        rand::rngs::OsRng.fill_bytes(&mut key);
        Sessions {
            key,
            ended: Default::default(),
            any_ended: Default::default(),
        }
    }

    /// End the (valid) session `token`, as `DELETE /api/v2/tokens/me` with it asks: 204, or
    /// 503 while too many ended sessions are remembered to take one more.
    pub fn end(&self, token: &[u8]) -> http::Response<crate::http::body::ProxyBody> {
        let expiry = std::str::from_utf8(token)
            .ok()
            .and_then(|t| t.rsplit('.').nth(1))
            .and_then(|e| e.parse::<u64>().ok())
            .unwrap_or(u64::MAX);
        let digest: [u8; 32] = <Sha256 as sha2::Digest>::digest(token).into();
        let mut ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        if ended.len() >= MAX_ENDED {
            let now = now_unix();
            ended.retain(|_, until| *until > now);
        }
        let mut resp = http::Response::new(crate::http::body::empty());
        if ended.len() >= MAX_ENDED {
            *resp.status_mut() = http::StatusCode::SERVICE_UNAVAILABLE;
            return resp;
        }
        ended.insert(digest, expiry);
        self.any_ended
            .store(true, std::sync::atomic::Ordering::Release);
        *resp.status_mut() = http::StatusCode::NO_CONTENT;
        resp
    }

    fn mac(&self, name: &str, expiry: u64, key_sha256: &[u8; 32]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new(&self.key.into());
        mac.update(name.as_bytes());
        mac.update(&[0]);
        mac.update(&expiry.to_be_bytes());
        mac.update(key_sha256);
        mac
    }

    /// A session token for `client` and the hash of the key it presented (`None`: an
    /// anonymous caller), valid for `lifetime` — and only while that key is one of the
    /// client's and has not expired: it ends with the key.
    pub fn issue(&self, client: Option<(&ClientConfig, [u8; 32])>, lifetime: Duration) -> String {
        let (name, key_sha256) = match client {
            Some((c, key)) => (c.name.as_ref(), key),
            None => ("", [0u8; 32]),
        };
        let expiry = now_unix() + lifetime.as_secs();
        let tag = self.mac(name, expiry, &key_sha256).finalize().into_bytes();
        format!(
            "{PREFIX}{}.{expiry}.{}",
            URL_SAFE_NO_PAD.encode(name),
            URL_SAFE_NO_PAD.encode(tag)
        )
    }

    /// Whether `token` looks like a session token at all.
    pub fn is_session(token: &[u8]) -> bool {
        token.starts_with(PREFIX.as_bytes())
    }

    /// The client a valid, unexpired session token belongs to.
    pub fn verify(&self, token: &[u8], clients: &[Arc<ClientConfig>]) -> Option<Arc<ClientConfig>> {
        let whole = token;
        let token = std::str::from_utf8(token).ok()?.strip_prefix(PREFIX)?;
        let mut parts = token.split('.');
        let (name, expiry, tag) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let name = String::from_utf8(URL_SAFE_NO_PAD.decode(name).ok()?).ok()?;
        let expiry: u64 = expiry.parse().ok()?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        let client = clients.iter().find(|c| c.name.as_ref() == name)?;
        let now = std::time::SystemTime::now();
        let signed_by_a_live_key = client.keys.iter().any(|k| {
            k.live_at(now)
                && self
                    .mac(&name, expiry, &k.sha256)
                    .verify_slice(&tag)
                    .is_ok()
        });
        if !signed_by_a_live_key || expiry <= now_unix() {
            return None;
        }
        if !self.any_ended.load(std::sync::atomic::Ordering::Acquire) {
            return Some(Arc::clone(client));
        }
        let digest: [u8; 32] = <Sha256 as sha2::Digest>::digest(whole).into();
        let ended = self.ended.lock().unwrap_or_else(|p| p.into_inner());
        (!ended.contains_key(&digest)).then(|| Arc::clone(client))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    fn client(name: &str, key: &str) -> Arc<ClientConfig> {
        Arc::new(ClientConfig {
            name: name.into(),
            keys: vec![crate::config::ClientKey::of_hash(
                sha2::Sha256::digest(key.as_bytes()).into(),
            )],
            upstreams: None,
            allow: None,
            share: 1,
            max_per_minute: None,
            max_channels: None,
            jwt: None,
        })
    }

    #[test]
    fn sessions_verify_for_their_client_only() {
        let s = Sessions::new();
        // Keys long enough that a random token cannot contain one by chance (a two-letter
        // key did, now and then).
        let (key_a, key_b) = ("tgk_key-of-client-a-7Hq2", "tgk_key-of-client-b-9Lm4");
        let clients = vec![client("a", key_a), client("b", key_b)];
        let t = s.issue(
            Some((&clients[0], clients[0].keys[0].sha256)),
            Duration::from_secs(60),
        );
        assert!(Sessions::is_session(t.as_bytes()));
        assert!(!t.contains(key_a));
        let key_hash = URL_SAFE_NO_PAD.encode(clients[0].keys[0].sha256);
        assert!(
            !t.contains(&key_hash[..16]),
            "no part of the key's hash either"
        );
        assert_eq!(s.verify(t.as_bytes(), &clients).unwrap().name.as_ref(), "a");
        // Tampered name, a rotated key, another process's key: all refused.
        let forged = t.replacen(
            &URL_SAFE_NO_PAD.encode("a"),
            &URL_SAFE_NO_PAD.encode("b"),
            1,
        );
        assert!(s.verify(forged.as_bytes(), &clients).is_none());
        assert!(s.verify(t.as_bytes(), &[client("a", "rotated")]).is_none());
        assert!(Sessions::new().verify(t.as_bytes(), &clients).is_none());
        assert!(s.verify(b"tgs.garbage", &clients).is_none());
    }

    #[test]
    fn a_session_ends_with_the_key_it_was_issued_for() {
        use crate::config::ClientKey;
        let s = Sessions::new();
        let key = |k: &str| ClientKey::of_hash(sha2::Sha256::digest(k.as_bytes()).into());
        let with_keys = |keys: Vec<ClientKey>| {
            let mut c = ClientConfig::clone(&client("a", "unused-key-of-a-3Fq9"));
            c.keys = keys;
            vec![Arc::new(c)]
        };
        let (old, new) = (key("tgk_old-key-of-a-5Rt2"), key("tgk_new-key-of-a-8Wz1"));
        let both = with_keys(vec![old.clone(), new.clone()]);
        let t = s.issue(Some((&both[0], old.sha256)), Duration::from_secs(60));
        assert!(s.verify(t.as_bytes(), &both).is_some(), "both keys live");
        // The key it was issued for is removed by a reload, or reaches its not_after.
        assert!(s
            .verify(t.as_bytes(), &with_keys(vec![new.clone()]))
            .is_none());
        let mut expired = old.clone();
        expired.not_after = Some(std::time::SystemTime::now() - Duration::from_secs(1));
        assert!(s
            .verify(t.as_bytes(), &with_keys(vec![expired, new]))
            .is_none());
    }

    #[test]
    fn expired_sessions_are_refused() {
        let s = Sessions::new();
        let clients = vec![client("a", "ka")];
        let t = s.issue(
            Some((&clients[0], clients[0].keys[0].sha256)),
            Duration::ZERO,
        );
        assert!(s.verify(t.as_bytes(), &clients).is_none());
    }
}
