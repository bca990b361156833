//! An issuer's public keys (a JWKS), fetched from `jwks_url` through the egress path or
//! read from `jwks_file`, and kept for every JWT caller that names the same source.
//!
//! A URL's keys are kept as long as its `Cache-Control: max-age` says (5 minutes without
//! one; between 30 s and a day), and fetched again at once for a `kid` they do not hold —
//! at most once per 30 s, so tokens with made-up `kid`s cannot make the proxy hammer the
//! issuer. A file is read again when its modification time changes. A source that cannot
//! be read keeps the keys it gave last (a warning in the log).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::DecodingKey;
use tokio::time::Instant;

use crate::config::JwksSource;

/// Fetch again on an unknown `kid` at most this often.
const UNKNOWN_KID_EVERY: Duration = Duration::from_secs(30);
/// A JWKS larger than this is refused.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// One source's keys.
pub struct KeySet {
    source: JwksSource,
    state: tokio::sync::Mutex<KeyState>,
}

#[derive(Default)]
struct KeyState {
    keys: Vec<(Option<String>, DecodingKey)>,
    /// Until when the keys are fresh (a URL's `max-age`); `None`: never read yet.
    fresh_until: Option<Instant>,
    /// The last fetch made for an unknown `kid`.
    unknown_kid_fetch: Option<Instant>,
    /// The file's modification time when it was read.
    file_stamp: Option<SystemTime>,
}

/// The key set of `source`, shared by every client and every config that names it (a
/// reload keeps the keys).
pub fn key_set(source: &JwksSource) -> Arc<KeySet> {
    static SETS: OnceLock<Mutex<HashMap<String, Arc<KeySet>>>> = OnceLock::new();
    let mut sets = SETS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let set = sets.entry(source.name()).or_insert_with(|| {
        Arc::new(KeySet {
            source: source.clone(),
            state: tokio::sync::Mutex::new(KeyState::default()),
        })
    });
    Arc::clone(set)
}

impl KeySet {
    /// The key for `kid` (`None`: the set's only key), reading the source again when its
    /// keys are stale, or once in a while when none has that `kid`.
    pub async fn key(&self, kid: Option<String>) -> Option<DecodingKey> {
        let kid = kid.as_deref();
        let mut st = self.state.lock().await;
        let now = Instant::now();
        let stale = match &self.source {
            JwksSource::Url(..) | JwksSource::Discovery(..) => {
                st.fresh_until.is_none_or(|t| now >= t)
            }
            JwksSource::File(path) => {
                let stamp = tokio::fs::metadata(path)
                    .await
                    .and_then(|m| m.modified())
                    .ok();
                st.fresh_until.is_none() || stamp != st.file_stamp
            }
        };
        if stale {
            self.read(&mut st).await;
        }
        if let Some(key) = find(&st.keys, kid) {
            return Some(key);
        }
        let may_ask = st
            .unknown_kid_fetch
            .is_none_or(|t| now.saturating_duration_since(t) >= UNKNOWN_KID_EVERY);
        if stale || !may_ask {
            return None;
        }
        st.unknown_kid_fetch = Some(now);
        self.read(&mut st).await;
        find(&st.keys, kid)
    }

    /// Read the source; on failure keep what it gave last.
    async fn read(&self, st: &mut KeyState) {
        let got = match &self.source {
            JwksSource::Url(url, egress) => fetch(url, egress).await,
            JwksSource::Discovery(issuer, egress) => match discover(issuer, egress).await {
                Ok(url) => fetch(&url, egress).await,
                Err(why) => Err(why),
            },
            JwksSource::File(path) => {
                let stamp = tokio::fs::metadata(path)
                    .await
                    .and_then(|m| m.modified())
                    .ok();
                match tokio::fs::read(path).await {
                    Ok(bytes) => {
                        st.file_stamp = stamp;
                        parse(&bytes).map(|keys| (keys, Duration::MAX))
                    }
                    Err(e) => Err(format!("cannot read it: {e}")),
                }
            }
        };
        let now = Instant::now();
        match got {
            Ok((keys, max_age)) => {
                st.keys = keys;
                st.fresh_until = Some(
                    now.checked_add(max_age)
                        .unwrap_or(now + Duration::from_secs(86_400 * 365)),
                );
            }
            Err(why) => {
                tracing::warn!(jwks = %self.source.name(), %why, kept = st.keys.len(), "the JWT callers' keys could not be read; the keys read before are kept");
                // Ask again in a while, not at every call.
                st.fresh_until = Some(now + UNKNOWN_KID_EVERY);
            }
        }
    }
}

fn find(keys: &[(Option<String>, DecodingKey)], kid: Option<&str>) -> Option<DecodingKey> {
    match kid {
        Some(kid) => keys
            .iter()
            .find(|(k, _)| k.as_deref() == Some(kid))
            .map(|(_, key)| key.clone()),
        None if keys.len() == 1 => Some(keys[0].1.clone()),
        None => None,
    }
}

/// The `jwks_uri` of `issuer`'s discovery document (OpenID Connect Discovery 1.0, §4):
/// https, or http on loopback, like a configured `jwks_url`.
async fn discover(
    issuer: &http::Uri,
    egress: &crate::outbound::egress::Egress,
) -> Result<http::Uri, String> {
    let client = egress.side_call_client()?;
    let url = format!(
        "{}/.well-known/openid-configuration",
        issuer.to_string().trim_end_matches('/')
    );
    let resp = client
        .get(&url)
        .header(http::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| crate::http::causes::error_chain(&e))?;
    if !resp.status().is_success() {
        return Err(format!(
            "the discovery document answered HTTP {}",
            resp.status().as_u16()
        ));
    }
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| crate::http::causes::error_chain(&e))?;
    let doc: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|_| "the discovery document is not JSON".to_string())?;
    let jwks_uri: http::Uri = doc["jwks_uri"]
        .as_str()
        .and_then(|u| u.parse().ok())
        .ok_or_else(|| "the discovery document has no usable jwks_uri".to_string())?;
    let https = jwks_uri.scheme_str() == Some("https");
    let local_http = jwks_uri.scheme_str() == Some("http") && crate::config::is_loopback(&jwks_uri);
    if !https && !local_http {
        return Err("the discovery document's jwks_uri is not https".into());
    }
    Ok(jwks_uri)
}

/// GET a JWKS through the egress path: its keys and how long they are fresh.
async fn fetch(
    url: &http::Uri,
    egress: &crate::outbound::egress::Egress,
) -> Result<(Vec<(Option<String>, DecodingKey)>, Duration), String> {
    let client = egress.side_call_client()?;
    let resp = client
        .get(url.to_string())
        .header(http::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| crate::http::causes::error_chain(&e))?;
    if !resp.status().is_success() {
        return Err(format!("HTTP {}", resp.status().as_u16()));
    }
    let max_age = resp
        .headers()
        .get(http::header::CACHE_CONTROL)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split(',')
                .filter_map(|d| d.trim().strip_prefix("max-age="))
                .find_map(|n| n.trim().parse::<u64>().ok())
        })
        .map_or(Duration::from_secs(300), |s| {
            Duration::from_secs(s.clamp(30, 86_400))
        });
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
    {
        return Err("the JWKS is larger than 1 MiB".into());
    }
    let bytes = resp
        .bytes()
        .await
        .map_err(|e| crate::http::causes::error_chain(&e))?;
    if bytes.len() > MAX_JWKS_BYTES {
        return Err("the JWKS is larger than 1 MiB".into());
    }
    Ok((parse(&bytes)?, max_age))
}

/// The usable keys of a JWKS document (`{"keys": [...]}`); keys of kinds the proxy does
/// not verify with (symmetric ones) are left out.
fn parse(bytes: &[u8]) -> Result<Vec<(Option<String>, DecodingKey)>, String> {
    let doc: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|_| "not a JSON document".to_string())?;
    let keys = doc["keys"]
        .as_array()
        .ok_or_else(|| "no \"keys\" array".to_string())?;
    let usable: Vec<_> = keys
        .iter()
        .filter(|k| k["kty"].as_str() != Some("oct"))
        .filter_map(|k| serde_json::from_value::<Jwk>(k.clone()).ok())
        .filter_map(|jwk| {
            let key = DecodingKey::from_jwk(&jwk).ok()?;
            Some((jwk.common.key_id.clone(), key))
        })
        .collect();
    Ok(usable)
}
