//! `tokengate check`: one real grant per upstream, and a diagnosis when it fails.
//!
//! The diagnosis names the likely cause with one of the contract's `hint` codes and says,
//! in one sentence, what to change. It never prints a secret: messages are built from the
//! endpoint's error codes, the URLs and the proxy's own words.

use serde::Serialize;

use crate::config::providers::{GenesysRegion, Provider, GENESYS_REGIONS};
use crate::config::{AuthMethod, BasicEncoding, Config, GrantConfig, GrantFlow, UpstreamConfig};
use crate::token::grant::{GrantError, Granter};

/// One upstream's result, as `check --json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Diagnosis {
    pub upstream: String,
    pub ok: bool,
    pub token_url: String,
    pub status: Option<u16>,
    pub grant_error: Option<String>,
    pub hint: &'static str,
    pub message: String,
    /// How the client proves itself to the token endpoint (`client_secret_basic`,
    /// `private_key_jwt`, …).
    pub auth_method: &'static str,
    /// The egress proxy the grant went through (no credentials), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<String>,
    /// The token's rate budget as the platform reports it (Genesys' `inin-ratelimit-*`
    /// on one API call), or as `rate_limit` configures it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_budget: Option<RateBudget>,
}

/// A token's rate budget, as `check` found it.
#[derive(Debug, Clone, Serialize)]
pub struct RateBudget {
    /// `platform` (from the answer's headers) or `config` (`rate_limit`).
    pub source: &'static str,
    pub allowed: u64,
    /// Used so far in the window (platform only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used: Option<u64>,
    /// Seconds until the window resets (platform), or the window's length (config).
    pub window_secs: u64,
}

impl std::fmt::Display for RateBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.used {
            Some(used) => write!(
                f,
                "rate budget {} calls per window, {used} used, resets in {} s (as the platform reports it)",
                self.allowed, self.window_secs
            ),
            None => write!(
                f,
                "rate budget {} calls per {} s (rate_limit)",
                self.allowed, self.window_secs
            ),
        }
    }
}

/// Try one grant for every upstream, all at once (each upstream's endpoint sees one request,
/// and a few more only to pin down an `invalid_client`).
pub async fn check(config: &Config) -> Vec<Diagnosis> {
    check_with(config, &|r: &GenesysRegion| r.token_url()).await
}

/// [`check`], with the login URL of each Genesys region given (tests point them at local
/// servers).
pub async fn check_with(
    config: &Config,
    region_token_url: &(dyn Fn(&GenesysRegion) -> String + Sync),
) -> Vec<Diagnosis> {
    let tasks = config
        .upstreams
        .iter()
        .map(|u| check_upstream(u, region_token_url));
    futures_util::future::join_all(tasks).await
}

async fn try_grant(grant: GrantConfig) -> Result<std::time::Duration, GrantError> {
    Granter::new(grant).grant().await.map(|g| g.expires_in)
}

async fn check_upstream(
    u: &UpstreamConfig,
    region_token_url: &(dyn Fn(&GenesysRegion) -> String + Sync),
) -> Diagnosis {
    let granter = Granter::new(u.grant.clone());
    let granted = granter.grant().await;
    let probe = match &granted {
        Ok(g) => Some(probe_api_host(u, g).await),
        Err(_) => None,
    };
    let result = granted.map(|g| g.expires_in);
    let mut d = diagnose(u, shown_token_url(&granter).await, result);
    if let Some(probe) = probe {
        d.rate_budget = probe.budget;
        if let Some((hint, message)) = probe.failure {
            (d.ok, d.hint, d.message) = (false, hint, message);
        }
    }
    if d.hint == "egress_proxy_refused" {
        // Name the proxy's own answer (401/407: its password; 403: its rules).
        // (Only a tunnel, for https: a plain-http URL's refusal already says it all.)
        let status = match (&u.grant.egress.proxy, d.token_url.parse::<http::Uri>()) {
            (Some(routes), Ok(dst)) if dst.scheme_str() == Some("https") => {
                crate::outbound::egress::tunnel_status(routes, &dst).await
            }
            _ => None,
        };
        if let (Some(status), Some(proxy)) = (status, d.egress_proxy.clone()) {
            d.status = Some(status);
            d.message = format!(
                "the egress proxy {proxy} {}; the token endpoint was never reached",
                crate::outbound::egress::refusal_reason(status)
            );
        }
        return d;
    }
    if d.hint != "invalid_client" {
        return d;
    }
    if let Some(fix) = other_client_authentication(u).await {
        d.message = fix;
    } else if let Some(region) = region_of_client(u, region_token_url).await {
        d.hint = "wrong_region";
        d.message = format!(
            "this OAuth client belongs to region {} (its login host granted a token): set region = \"{}\"",
            region.name, region.name
        );
    } else if encoding_matters(&u.grant) {
        d.message = "the token endpoint refused this client id and secret in every encoding tried (Basic raw, Basic form-encoded, post): check both values".to_string();
    }
    d
}

/// What the API host said when the new token was shown to it.
struct ApiProbe {
    /// The hint and message when calls would fail there.
    failure: Option<(&'static str, String)>,
    budget: Option<RateBudget>,
}

/// After a grant, the API host: reached through the egress path with its own TLS settings
/// (a token endpoint on plain HTTP says nothing about them). On Genesys, `GET
/// /api/v2/tokens/me?preserveIdleTTL=true` with the new token (it spends one call of the
/// budget, and its `inin-ratelimit-*` headers give the budget); elsewhere `HEAD /`, where
/// any answer at all shows the host is reachable. Else the configured `rate_limit`.
async fn probe_api_host(u: &UpstreamConfig, granted: &crate::token::grant::Granted) -> ApiProbe {
    use secrecy::ExposeSecret;
    let configured = u.rate_limit.map(|r| RateBudget {
        source: "config",
        allowed: r.calls,
        used: None,
        window_secs: r.window.as_secs(),
    });
    let failed = |hint, message| ApiProbe {
        failure: Some((hint, message)),
        budget: None,
    };
    let Some(base) = u.base_url.clone().or_else(|| granted.api_base.clone()) else {
        return ApiProbe {
            failure: None,
            budget: configured,
        };
    };
    let base = base.to_string().trim_end_matches('/').to_string();
    let client = match u.grant.egress.api_client() {
        Ok(client) => client,
        Err(e) => {
            return failed(
                "api_host_tls_error",
                format!("the TLS settings for the API host {base} cannot be used: {e}"),
            )
        }
    };
    let genesys = u.provider == Provider::Genesys;
    let probe = if genesys {
        client
            .get(format!("{base}/api/v2/tokens/me?preserveIdleTTL=true"))
            .bearer_auth(granted.access_token.expose_secret())
    } else {
        client.head(format!("{base}/"))
    };
    let resp = match probe.send().await {
        Ok(resp) => resp,
        Err(e) if crate::http::causes::is_tls_error(&e) => {
            return failed(
                "api_host_tls_error",
                format!(
                    "the token was granted, but TLS with the API host {base} failed ({}): a private CA needs ca_file (the API host's own, where it differs from the token endpoint's)",
                    crate::http::causes::error_chain(&e)
                ),
            )
        }
        Err(e) => {
            return failed(
                "api_host_unreachable",
                format!(
                    "the token was granted, but the API host {base} cannot be reached ({}): check base_url (or region), DNS, the egress proxy and firewall",
                    crate::http::causes::error_chain(&e)
                ),
            )
        }
    };
    if genesys && resp.status() == http::StatusCode::UNAUTHORIZED {
        return failed(
            "wrong_region",
            format!("the API host {base} refused the token its login host just granted: the token endpoint and the API host belong to different regions (check region, token_url and base_url)"),
        );
    }
    use crate::governor::{header_number, RATELIMIT_ALLOWED, RATELIMIT_COUNT, RATELIMIT_RESET};
    let number = |name| header_number(resp.headers(), name);
    let budget = match number(RATELIMIT_ALLOWED) {
        Some(allowed) => Some(RateBudget {
            source: "platform",
            allowed,
            used: number(RATELIMIT_COUNT),
            window_secs: number(RATELIMIT_RESET).unwrap_or(0),
        }),
        None => configured,
    };
    ApiProbe {
        failure: None,
        budget,
    }
}

/// Whether the secret has characters that RFC 6749 §2.3.1 form-encoding changes.
fn encoding_matters(g: &GrantConfig) -> bool {
    use secrecy::ExposeSecret;
    let changes = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>() != s;
    let Some(secret) = &g.client_secret else {
        return false;
    };
    changes(&g.client_id) || changes(secret.value.expose_secret())
}

/// For an `invalid_client` with a secret that encodings treat differently: does the other
/// Basic encoding, or client_secret_post, work? Returns the fix in one sentence.
async fn other_client_authentication(u: &UpstreamConfig) -> Option<String> {
    if !encoding_matters(&u.grant) {
        return None;
    }
    let mut tries: Vec<(GrantConfig, String)> = Vec::new();
    if u.grant.auth_method == AuthMethod::Basic {
        let (other, name) = match u.grant.basic_encoding {
            BasicEncoding::Raw => (BasicEncoding::FormEncoded, "form"),
            BasicEncoding::FormEncoded => (BasicEncoding::Raw, "raw"),
        };
        let mut g = u.grant.clone();
        g.basic_encoding = other;
        tries.push((g, format!(
            "the secret has characters that encodings treat differently, and the token endpoint accepts it encoded the other way: set basic_encoding = \"{name}\""
        )));
    }
    if u.grant.auth_method != AuthMethod::Post {
        let mut g = u.grant.clone();
        g.auth_method = AuthMethod::Post;
        tries.push((g, "the secret has characters that the Basic header mangles, and the token endpoint accepts it in the form: set auth_method = \"post\"".to_string()));
    }
    for (grant, fix) in tries {
        if try_grant(grant).await.is_ok() {
            return Some(fix);
        }
    }
    None
}

/// For a Genesys `invalid_client`: ask every other region's login host once, in parallel.
async fn region_of_client(
    u: &UpstreamConfig,
    region_token_url: &(dyn Fn(&GenesysRegion) -> String + Sync),
) -> Option<GenesysRegion> {
    if u.provider != Provider::Genesys {
        return None;
    }
    let probes = GENESYS_REGIONS
        .iter()
        .filter(|r| Some(**r) != u.region)
        .map(|r| {
            let mut g = u.grant.clone();
            g.token_url = Some(region_token_url(r));
            async move { try_grant(g).await.ok().map(|_| *r) }
        });
    futures_util::future::join_all(probes)
        .await
        .into_iter()
        .flatten()
        .next()
}

pub fn diagnose(
    u: &UpstreamConfig,
    token_url: String,
    result: Result<std::time::Duration, GrantError>,
) -> Diagnosis {
    let https = token_url.starts_with("https://") || token_url.is_empty();
    let mut d = Diagnosis {
        upstream: u.name.to_string(),
        ok: false,
        token_url,
        status: None,
        grant_error: None,
        hint: "ok",
        message: String::new(),
        auth_method: u.grant.auth_method.name(),
        egress_proxy: u.grant.egress.proxy.as_ref().and_then(|p| p.shown(https)),
        rate_budget: None,
    };
    let err = match result {
        Ok(expires_in) => {
            d.ok = true;
            d.status = Some(200);
            d.message = format!("a token was granted; it lives {} s", expires_in.as_secs());
            return d;
        }
        Err(e) => e,
    };
    let (hint, message) = match &err {
        GrantError::Refused { status, error, description } => {
            d.status = Some(*status);
            d.grant_error = Some(error.clone());
            match error.as_str() {
                "invalid_client" => ("invalid_client", match u.provider {
                    _ if u.grant.auth_method == AuthMethod::PrivateKeyJwt => "the token endpoint refused the signed client assertion: check that it holds this key's public key (and key_id), the client_id, and the audience it expects (assertion_audience)".to_string(),
                    _ if !u.grant.auth_method.uses_secret() => "the token endpoint refused the client certificate: check that it is registered for this client_id (and issued by a CA the endpoint trusts)".to_string(),
                    _ if u.grant.client_secret_next.is_some() => "the token endpoint refused both client_secret and client_secret_next: check the client id and both secrets".to_string(),
                    Provider::Genesys => "the login host does not know this client id and secret: check both in Admin > OAuth, and that the OAuth client belongs to the org of this region".to_string(),
                    _ => "the token endpoint does not accept this client id and secret: check both, and auth_method (basic or post)".to_string(),
                }),
                "invalid_grant" if matches!(u.grant.flow, GrantFlow::CxoneAccessKey { .. }) => (
                    "invalid_client",
                    "CXone refused the access key (invalid_grant): check access_key_id and access_key_secret, and that the key's user is active".to_string(),
                ),
                "unauthorized_client" | "unsupported_grant_type" => (
                    "grant_type_not_enabled",
                    "the OAuth client may not use the client_credentials grant: set its grant type to Client Credentials".to_string(),
                ),
                "invalid_scope" => (
                    "invalid_scope",
                    "the token endpoint rejected the scope: correct or remove `scope`".to_string(),
                ),
                _ => (
                    "bad_response",
                    format!(
                        "the token endpoint refused the grant with \"{error}\"{}: see its description",
                        description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default()
                    ),
                ),
            }
        }
        GrantError::NotOAuth { status, api_code, what } => {
            d.status = Some(*status);
            let gateway = api_code.as_deref() == Some("authentication.required")
                || *status == 404
                || *status == 405;
            if gateway {
                (
                    "wrong_token_path",
                    match u.provider {
                        Provider::Genesys => "this URL is not the token endpoint (an API answered): tokens come from https://login.<domain>/oauth/token, not the api. host or /api/v2/oauth/token".to_string(),
                        _ => "this URL is not the token endpoint (it answered like an API or not at all): correct token_url".to_string(),
                    },
                )
            } else {
                ("bad_response", format!("the answer is {what}: check token_url"))
            }
        }
        GrantError::Unreachable(detail) => (
            "unreachable",
            format!("the token endpoint cannot be reached ({detail}): check the host name, DNS, proxy and firewall"),
        ),
        GrantError::Timeout => (
            "unreachable",
            "the token endpoint did not answer in time: check the network path to it".to_string(),
        ),
        GrantError::Tls(detail) => (
            "tls_error",
            format!("TLS with the token endpoint failed ({detail}): check the URL's host; a private CA or a TLS-intercepting proxy needs ca_file"),
        ),
        GrantError::EgressRefused(detail) => (
            "egress_proxy_refused",
            format!("{detail}; the token endpoint was never reached"),
        ),
        GrantError::Assertion(detail) => (
            "invalid_client",
            format!("the client assertion cannot be signed ({detail}): check private_key_file and signing_alg"),
        ),
    };
    d.hint = hint;
    d.message = message;
    d
}

/// The token URL to show: configured, discovered, or where discovery starts.
async fn shown_token_url(granter: &Granter) -> String {
    if let Some(url) = granter.token_endpoint().await {
        return url;
    }
    match &granter.config().flow {
        GrantFlow::CxoneAccessKey { issuer, .. } => {
            format!("{issuer}/.well-known/openid-configuration")
        }
        GrantFlow::ClientCredentials => match &granter.config().issuer {
            Some(issuer) => format!("{issuer}/.well-known/openid-configuration"),
            None => String::new(),
        },
    }
}

/// A client key that has expired or expires within [`crate::config::KEY_WARNING`] of `now`: one line for
/// `check` (its fingerprint, never the key).
pub fn key_warnings(config: &Config, now: std::time::SystemTime) -> Vec<String> {
    let warning = crate::config::KEY_WARNING;
    let lines = config.keys_expiring(now, warning).into_iter().map(|(client, k, left)| {
        let when = k.not_after.map(crate::config::rfc3339).unwrap_or_default();
        let key = k.fingerprint();
        match left {
            Err(_) => format!(
                "client \"{client}\" key {key}: expired at {when}; it is refused — remove it from keys"
            ),
            Ok(left) => format!(
                "client \"{client}\" key {key}: expires in {} day(s), at {when}; add its successor to keys (`tokengate key new --expires 90d`)",
                left.as_secs().div_ceil(86_400)
            ),
        }
    });
    lines.collect()
}
