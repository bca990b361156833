//! `[[upstream]]`: one API platform, where its calls go and how they are limited.

use std::sync::Arc;
use std::time::Duration;

use http::Uri;

use super::cx::Cx;
use super::error::ConfigError;
use super::grant::GrantConfig;
use super::raw::RawUpstream;
use super::server::ServerConfig;
use crate::config::policy::AllowRule;
use crate::config::providers::{self, GenesysRegion, Provider};

/// One API platform the proxy forwards to, and how it gets tokens for it.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub name: Arc<str>,
    pub provider: Provider,
    /// Genesys Cloud: the region the config names.
    pub region: Option<GenesysRegion>,
    /// Path prefix routed here, normalised: starts with `/`, no trailing `/` unless it is `/`.
    pub prefix: String,
    /// Where calls go: scheme, authority and an optional base path (no trailing `/`).
    /// `None` for CXone without an override: discovery finds the tenant's API host.
    pub base_url: Option<Uri>,
    /// How long the upstream may take to answer with a response head.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// The most one call may take from arrival to the last byte of the answer, token wait
    /// and retries included (`None`: no limit beyond `timeout`, the default).
    pub request_timeout: Option<Duration>,
    /// How many times an idempotent request that got 429 is sent again after its
    /// `Retry-After` (0: 429 goes back to the caller, the default).
    pub retry_429: u32,
    /// The most time spent waiting on `Retry-After` for one request.
    pub retry_429_max_wait: Duration,
    /// Token pool size: each Genesys token has its own API rate limit.
    pub tokens: u32,
    /// The most connections open to this upstream at once (the proxy's share of them is
    /// split evenly over its workers); calls beyond it wait for one, within `queue_timeout`.
    pub max_connections: usize,
    /// How long a call may wait for a free connection before `503 upstream_busy`
    /// (`queue_timeout_secs`, 5 s by default).
    pub queue_timeout: Duration,
    /// Genesys: where notification channels' WebSockets go (`streaming.<region domain>`,
    /// or `streaming_url`), as an `http`/`https` URL (for `ws`/`wss`). `None`: the
    /// upstream has no notification channels.
    pub streaming_url: Option<Uri>,
    /// How a WebSocket handshake carries the upstream's token.
    pub websocket_token: WebsocketToken,
    /// `rate_limit`: calls a token may make per window, where the platform does not say
    /// (Genesys says, in `inin-ratelimit-*` headers, which win).
    pub rate_limit: Option<RateLimit>,
    /// How long a call may wait for room in the rate budget before the proxy answers
    /// `429 rate_limited` itself (`rate_limit_max_wait_secs`, 10 s by default).
    pub rate_limit_max_wait: Duration,
    /// `introspection_url` (RFC 7662, `provider = "oauth2"`): asked whether a token the
    /// API answered with 401 is still active, before it is replaced.
    pub introspection_url: Option<String>,
    /// `notification_channels`: the platform's channels per OAuth client, shared by every
    /// client of this upstream (genesys: 20; `None`: channels are not counted).
    pub notification_channels: Option<u32>,
    /// `[[upstream.route_limit]]`: routes the platform limits below the token's budget.
    pub route_limits: Vec<RouteLimit>,
    pub grant: GrantConfig,
}

/// A route with a limit of its own below the token's (`[[upstream.route_limit]]`), such
/// as Genesys' 100 a minute on `PUT /api/v2/architect/ivrs/{id}`.
#[derive(Debug, Clone)]
pub struct RouteLimit {
    /// The rule as written, for logs and the status page.
    pub route: Arc<str>,
    pub rule: AllowRule,
    pub rate: RateLimit,
}

/// A rate budget: `calls` per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub calls: u64,
    pub window: Duration,
}

/// Where a WebSocket handshake puts the upstream's token (`websocket_token`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebsocketToken {
    /// `Authorization: Bearer <token>`, as on every call (the default).
    Header,
    /// A query parameter of this name (some platforms' sockets take the token there);
    /// the caller's own value of it is never forwarded.
    Query(String),
}

impl Cx<'_> {
    pub(super) fn upstream(
        &self,
        i: usize,
        mut raw: RawUpstream,
        server: &ServerConfig,
    ) -> Result<UpstreamConfig, ConfigError> {
        if raw.name.is_empty()
            || !raw
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        {
            return Err(self.err(
                &format!("upstream[{i}].name"),
                format!(
                    "\"{}\" is not a valid name: use letters, digits, '-', '_' and '.'",
                    raw.name
                ),
            ));
        }
        let name = raw.name.clone();
        let key = |k: &str| format!("upstream \"{name}\".{k}");
        let provider = raw.provider;
        if raw.issuer.is_some() && provider == Provider::Genesys {
            return Err(self.err(
                &key("issuer"),
                "is only valid for provider = \"cxone\" or \"oauth2\"",
            ));
        }
        for (field, set) in [
            ("access_key_id", raw.access_key_id.is_some()),
            ("access_key_secret", raw.access_key_secret.is_some()),
            (
                "access_key_secret_file",
                raw.access_key_secret_file.is_some(),
            ),
        ] {
            if set && provider != Provider::Cxone {
                return Err(self.err(&key(field), "is only valid for provider = \"cxone\""));
            }
        }
        let tokens = raw.tokens.unwrap_or(1);
        if !(1..=32).contains(&tokens) {
            return Err(self.err(&key("tokens"), "must be between 1 and 32"));
        }
        let max_connections = raw.max_connections.unwrap_or(128);
        if !(1..=100_000).contains(&max_connections) {
            return Err(self.err(&key("max_connections"), "must be between 1 and 100000"));
        }
        // Where tokens and calls go: the provider's defaults, then the overrides.
        let region = match provider {
            Provider::Genesys => {
                let region = raw.region.as_deref().ok_or_else(|| {
                    self.err(
                        &key("region"),
                        format!(
                            "is required for provider = \"genesys\"; one of: {}",
                            providers::genesys_region_names().join(", ")
                        ),
                    )
                })?;
                let r = providers::genesys_region(region).ok_or_else(|| {
                    let hint = providers::nearest_genesys_region(region)
                        .map(|n| format!("did you mean \"{n}\"? "))
                        .unwrap_or_default();
                    self.err(
                        &key("region"),
                        format!(
                            "unknown Genesys Cloud region \"{region}\"; {hint}one of: {} (or the region's domain, such as mypurecloud.de)",
                            providers::genesys_region_names().join(", ")
                        ),
                    )
                })?;
                Some(r)
            }
            _ => {
                if raw.region.is_some() {
                    return Err(
                        self.err(&key("region"), "is only valid for provider = \"genesys\"")
                    );
                }
                None
            }
        };
        let defaults = region.map(|r| (r.token_url(), r.api_url()));
        // CXone finds both by discovery unless they are given; OAuth2 finds its token
        // endpoint from `issuer`.
        let discovers = provider == Provider::Cxone;
        let token_url =
            match (raw.token_url.take(), &defaults) {
                (Some(u), _) => Some(self.interpolate(&key("token_url"), &u)?),
                (None, Some((t, _))) => Some(t.clone()),
                (None, None) if discovers || raw.issuer.is_some() => None,
                (None, None) => return Err(self.err(
                    &key("token_url"),
                    "is required for provider = \"oauth2\" (or issuer, to find it by discovery)",
                )),
            };
        let base_url = match (raw.base_url.take(), &defaults) {
            (Some(u), _) => Some(self.interpolate(&key("base_url"), &u)?),
            (None, Some((_, b))) => Some(b.clone()),
            (None, None) if discovers => None,
            (None, None) => {
                return Err(self.err(&key("base_url"), "is required for provider = \"oauth2\""))
            }
        };
        let token_url = token_url
            .map(|u| self.http_url(&key("token_url"), &u).map(|u| u.to_string()))
            .transpose()?;
        if raw.introspection_url.is_some() && provider != Provider::Oauth2 {
            return Err(self.err(
                &key("introspection_url"),
                "is only valid for provider = \"oauth2\"",
            ));
        }
        let introspection_url = raw
            .introspection_url
            .take()
            .map(|u| {
                let u = self.interpolate(&key("introspection_url"), &u)?;
                self.http_url(&key("introspection_url"), &u)
                    .map(|u| u.to_string())
            })
            .transpose()?;
        let base_url = base_url
            .map(|u| self.base_url(&key("base_url"), &u))
            .transpose()?;
        let streaming_url = match (raw.streaming_url.take(), region) {
            (Some(u), _) => Some(self.streaming_url(&key("streaming_url"), &u)?),
            (None, Some(r)) => Some(self.base_url(&key("streaming_url"), &r.streaming_url())?),
            (None, None) => None,
        };
        let notification_channels = match (raw.notification_channels, provider) {
            (Some(0), _) => {
                return Err(self.err(
                    &key("notification_channels"),
                    "must be at least 1 (the platform's channels per OAuth client)",
                ))
            }
            (Some(n), _) => Some(n),
            // Genesys Cloud: 20 channels per user and OAuth client.
            (None, Provider::Genesys) if streaming_url.is_some() => Some(20),
            (None, _) => None,
        };
        let mut route_limits = Vec::new();
        for (i, r) in std::mem::take(&mut raw.route_limit).into_iter().enumerate() {
            let at = |k: &str| key(&format!("route_limit[{i}].{k}"));
            let rule = AllowRule::parse(&r.route).map_err(|e| self.err(&at("route"), e))?;
            let rate = self.rate_limit(&at("rate"), &r.rate)?;
            route_limits.push(RouteLimit {
                route: Arc::from(r.route.trim()),
                rule,
                rate,
            });
        }
        let websocket_token = match raw.websocket_token.as_deref() {
            None | Some("header") => WebsocketToken::Header,
            Some(other) => match other.strip_prefix("query:") {
                Some(name)
                    if !name.is_empty()
                        && name
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b)) =>
                {
                    WebsocketToken::Query(name.to_string())
                }
                _ => {
                    return Err(self.err(
                        &key("websocket_token"),
                        "must be \"header\" or \"query:<name>\" (a name of letters, digits, '-', '_', '.', '~')",
                    ))
                }
            },
        };
        let grant = self.grant(
            provider,
            &mut raw,
            token_url,
            base_url.is_none(),
            server.egress.as_ref(),
        )?;
        let prefix = self.prefix(&key("prefix"), raw.prefix.as_deref().unwrap_or("/"))?;
        Ok(UpstreamConfig {
            name: Arc::from(raw.name.as_str()),
            provider,
            region,
            prefix,
            base_url,
            // Long enough for the platforms' 60 s long polls (CXone's get-next-event) to be
            // answered, with room for the answer to travel.
            timeout: self.secs(&key("timeout_secs"), raw.timeout_secs, 90.0)?,
            connect_timeout: self.secs(
                &key("connect_timeout_secs"),
                raw.connect_timeout_secs,
                10.0,
            )?,
            request_timeout: raw
                .request_timeout_secs
                .map(|v| self.secs(&key("request_timeout_secs"), Some(v), 0.0))
                .transpose()?,
            retry_429: raw.retry_429.unwrap_or(0).min(10),
            tokens,
            max_connections,
            queue_timeout: self.secs(&key("queue_timeout_secs"), raw.queue_timeout_secs, 5.0)?,
            retry_429_max_wait: self.secs(
                &key("retry_429_max_wait_secs"),
                raw.retry_429_max_wait_secs,
                30.0,
            )?,
            streaming_url,
            notification_channels,
            route_limits,
            introspection_url,
            websocket_token,
            rate_limit: raw
                .rate_limit
                .as_deref()
                .map(|r| self.rate_limit(&key("rate_limit"), r))
                .transpose()?,
            // 0: never wait, answer 429 at once when the budget has no room.
            rate_limit_max_wait: if raw.rate_limit_max_wait_secs == Some(0.0) {
                Duration::ZERO
            } else {
                self.secs(
                    &key("rate_limit_max_wait_secs"),
                    raw.rate_limit_max_wait_secs,
                    10.0,
                )?
            },
            grant,
        })
    }

    /// `"300/min"`, `"60/10s"`, `"5/s"`, `"1000/hour"`.
    fn rate_limit(&self, key: &str, s: &str) -> Result<RateLimit, ConfigError> {
        let bad = || {
            self.err(
                key,
                format!("\"{s}\" is not a rate such as \"300/min\", \"60/10s\" or \"5/s\""),
            )
        };
        let (calls, per) = s.split_once('/').ok_or_else(bad)?;
        let calls: u64 = calls.trim().parse().map_err(|_| bad())?;
        let per = per.trim();
        let unit_at = per.find(|c: char| !c.is_ascii_digit()).unwrap_or(per.len());
        let (count, unit) = per.split_at(unit_at);
        let count: u64 = if count.is_empty() {
            1
        } else {
            count.parse().map_err(|_| bad())?
        };
        let unit_secs = match unit {
            "s" | "sec" | "second" => 1,
            "m" | "min" | "minute" => 60,
            "h" | "hour" => 3600,
            _ => return Err(bad()),
        };
        if calls == 0 || count == 0 || count * unit_secs > 86_400 {
            return Err(bad());
        }
        Ok(RateLimit {
            calls,
            window: Duration::from_secs(count * unit_secs),
        })
    }

    /// A `ws://`/`wss://` (or `http://`/`https://`) URL, as the `http`/`https` URL the
    /// proxy connects to.
    fn streaming_url(&self, key: &str, s: &str) -> Result<Uri, ConfigError> {
        let as_http = if let Some(rest) = s.strip_prefix("wss://") {
            format!("https://{rest}")
        } else if let Some(rest) = s.strip_prefix("ws://") {
            format!("http://{rest}")
        } else {
            s.to_string()
        };
        self.base_url(key, &as_http).map_err(|_| {
            self.err(
                key,
                format!("\"{s}\" must be a ws://, wss://, http:// or https:// URL with a host"),
            )
        })
    }
}
