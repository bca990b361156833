//! `[[client]]`: a caller of the proxy, its key and what it may do.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::cx::Cx;
use super::error::ConfigError;
use super::jwt::JwtCaller;
use super::raw::{RawClient, RawTime};
use super::server::ServerConfig;
use super::upstream::UpstreamConfig;
use crate::config::policy::AllowRule;

/// A caller of the proxy, identified by one of its keys.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub name: Arc<str>,
    /// `key_sha256` and `keys`: two overlap while a key is rotated; one stops at its
    /// `not_after`.
    pub keys: Vec<ClientKey>,
    /// `jwt_*`: it may also present a signed JWT of its workload identity.
    pub jwt: Option<Arc<JwtCaller>>,
    /// Upstreams this client may use; `None` means all.
    pub upstreams: Option<Vec<Arc<str>>>,
    /// Requests this client may make; `None` means any.
    pub allow: Option<Vec<AllowRule>>,
    /// Its weight when calls wait for an upstream's rate budget (`share`, 1 by default):
    /// a client with share 3 is served three calls for every one of a client with share 1.
    pub share: u32,
    /// The most calls it may make in a minute, to each upstream (`None`: no cap).
    pub max_per_minute: Option<u64>,
    /// `max_channels`: the notification channels it may hold on each upstream (`None`: an
    /// equal part of the upstream's `notification_channels` among its clients).
    pub max_channels: Option<u32>,
}

/// One of a client's keys, by its SHA-256.
#[derive(Debug, Clone)]
pub struct ClientKey {
    pub sha256: [u8; 32],
    /// When it stops working (`None`: never).
    pub not_after: Option<SystemTime>,
    /// When it was last presented (unix seconds; 0: not since the proxy started). Shared
    /// by every copy of the config and kept across reloads (see [`ClientKey::of_hash`]).
    last_used: Arc<AtomicU64>,
}

impl ClientKey {
    /// The key with this hash, never expiring; its last use is the one the process has
    /// recorded for the hash (a reload keeps it).
    pub fn of_hash(sha256: [u8; 32]) -> ClientKey {
        static LAST_USED: OnceLock<Mutex<HashMap<[u8; 32], Arc<AtomicU64>>>> = OnceLock::new();
        let mut seen = LAST_USED
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let last_used = Arc::clone(seen.entry(sha256).or_default());
        ClientKey {
            sha256,
            not_after: None,
            last_used,
        }
    }

    /// A short name for the key that shows neither it nor enough of its hash to search
    /// for: `sha256:` and the hash's first 8 hex digits.
    pub fn fingerprint(&self) -> String {
        format!("sha256:{}", hex::encode(&self.sha256[..4]))
    }

    /// Whether it works at `now`.
    pub fn live_at(&self, now: SystemTime) -> bool {
        self.not_after.is_none_or(|t| now < t)
    }

    /// Record a use at `now` (one write a second at most: the line is shared by workers).
    pub fn used_at(&self, now: SystemTime) {
        let secs = unix_secs(now);
        if self.last_used.load(Ordering::Relaxed) != secs {
            self.last_used.store(secs, Ordering::Relaxed);
        }
    }

    /// When it was last presented, if it was since the proxy started.
    pub fn last_used(&self) -> Option<SystemTime> {
        match self.last_used.load(Ordering::Relaxed) {
            0 => None,
            s => Some(UNIX_EPOCH + Duration::from_secs(s)),
        }
    }
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Client keys that expire within this long are warned of (`check`, the `key_expiring`
/// event).
pub const KEY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// RFC 3339, as the status page and `tokengate key new` write a moment.
pub fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

impl Cx<'_> {
    /// A client's keys: `key_sha256` (never expiring) and `keys`; at least one.
    /// (`jwt`: the client may present a JWT instead, so it needs no key.)
    fn client_keys(&self, raw: &RawClient, jwt: bool) -> Result<Vec<ClientKey>, ConfigError> {
        let key = |k: &str| format!("client \"{}\".{k}", raw.name);
        let mut keys = Vec::new();
        if let Some(hash) = &raw.key_sha256 {
            keys.push(ClientKey::of_hash(
                self.sha256_hex(&key("key_sha256"), hash)?,
            ));
        }
        for (i, k) in raw.keys.iter().flatten().enumerate() {
            let at = |field: &str| key(&format!("keys[{i}].{field}"));
            let mut client_key = ClientKey::of_hash(self.sha256_hex(&at("sha256"), &k.sha256)?);
            client_key.not_after = match &k.not_after {
                None => None,
                Some(t) => {
                    let text = match t {
                        RawTime::Text(s) => s.clone(),
                        RawTime::Toml(d) => d.to_string(),
                    };
                    let parsed = time::OffsetDateTime::parse(
                        &text,
                        &time::format_description::well_known::Rfc3339,
                    )
                    .map_err(|_| {
                        self.err(
                            &at("not_after"),
                            "must be a moment with its offset, such as 2027-03-01T00:00:00Z",
                        )
                    })?;
                    Some(SystemTime::from(parsed))
                }
            };
            if keys
                .iter()
                .any(|o: &ClientKey| o.sha256 == client_key.sha256)
            {
                return Err(self.err(&at("sha256"), "is this client's key twice"));
            }
            keys.push(client_key);
        }
        if keys.is_empty() && !jwt {
            return Err(self.err(
                &key("key_sha256"),
                "is missing: a client needs key_sha256 or keys = [{ sha256 = \"…\", not_after = … }] (`tokengate key new`)",
            ));
        }
        Ok(keys)
    }

    pub(super) fn client(
        &self,
        i: usize,
        raw: RawClient,
        upstreams: &[Arc<UpstreamConfig>],
        server: &ServerConfig,
    ) -> Result<ClientConfig, ConfigError> {
        if raw.name.is_empty() {
            return Err(self.err(&format!("client[{i}].name"), "is empty"));
        }
        let key = |k: &str| format!("client \"{}\".{k}", raw.name);
        let jwt = self.jwt_caller(&raw, server)?.map(Arc::new);
        let keys = self.client_keys(&raw, jwt.is_some())?;
        let allowed_upstreams = match raw.upstreams {
            None => None,
            Some(names) => {
                let mut out = Vec::new();
                for n in names {
                    let up = upstreams
                        .iter()
                        .find(|u| u.name.as_ref() == n)
                        .ok_or_else(|| {
                            self.err(&key("upstreams"), format!("no upstream is named \"{n}\""))
                        })?;
                    out.push(up.name.clone());
                }
                Some(out)
            }
        };
        let allow = match raw.allow {
            None => None,
            Some(rules) => {
                let mut out = Vec::new();
                for (i, r) in rules.iter().enumerate() {
                    out.push(
                        AllowRule::parse(r)
                            .map_err(|e| self.err(&key(&format!("allow[{i}]")), e))?,
                    );
                }
                Some(out)
            }
        };
        let share = raw.share.unwrap_or(1);
        if !(1..=1000).contains(&share) {
            return Err(self.err(&key("share"), "must be between 1 and 1000"));
        }
        if raw.max_per_minute == Some(0) {
            return Err(self.err(
                &key("max_per_minute"),
                "must be at least 1 (leave it out for no cap)",
            ));
        }
        if raw.max_channels == Some(0) {
            return Err(self.err(
                &key("max_channels"),
                "must be at least 1 (leave it out for an equal part of the upstream's channels)",
            ));
        }
        Ok(ClientConfig {
            name: Arc::from(raw.name.as_str()),
            keys,
            jwt,
            upstreams: allowed_upstreams,
            allow,
            share,
            max_per_minute: raw.max_per_minute,
            max_channels: raw.max_channels,
        })
    }
}

impl ClientConfig {
    /// Whether it may call upstream `name`.
    pub fn may_use(&self, name: &str) -> bool {
        self.upstreams
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n.as_ref() == name))
    }
}
