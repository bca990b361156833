//! `[[client]]`: a caller of the proxy, its key and what it may do.

use std::sync::Arc;

use super::raw::RawClient;
use super::upstream::UpstreamConfig;
use super::Config;
use super::{ConfigError, Cx};
use crate::config::policy::AllowRule;

/// A caller of the proxy, identified by its key.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub name: Arc<str>,
    pub key_sha256: [u8; 32],
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

impl Cx<'_> {
    pub(super) fn client(
        &self,
        i: usize,
        raw: RawClient,
        upstreams: &[Arc<UpstreamConfig>],
    ) -> Result<ClientConfig, ConfigError> {
        if raw.name.is_empty() {
            return Err(self.err(&format!("client[{i}].name"), "is empty"));
        }
        let key = |k: &str| format!("client \"{}\".{k}", raw.name);
        let key_sha256 = self.sha256_hex(&key("key_sha256"), &raw.key_sha256)?;
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
            key_sha256,
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

impl Config {
    /// The notification channels `client` may hold on `upstream`: its `max_channels`, else
    /// an equal part of the upstream's channels among the clients allowed there (at least
    /// one). `None`: the upstream's channels are not counted.
    pub fn channel_share(&self, upstream: &UpstreamConfig, client: &ClientConfig) -> Option<u32> {
        let total = upstream.notification_channels?;
        if let Some(max) = client.max_channels {
            return Some(max);
        }
        let sharing = self
            .clients
            .iter()
            .filter(|c| c.may_use(&upstream.name))
            .count()
            .max(1) as u32;
        Some((total / sharing).max(1))
    }
}
