//! `tokengate check`: one real grant per upstream, and a diagnosis when it fails.
//!
//! The diagnosis names the likely cause with one of the contract's `hint` codes and says,
//! in one sentence, what to change. It never prints a secret: messages are built from the
//! endpoint's error codes, the URLs and the proxy's own words.

use serde::Serialize;

use crate::config::{Config, UpstreamConfig};
use crate::providers::Provider;
use crate::token::grant::{side_call_client, GrantError, Granter};

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
}

/// Try one grant for every upstream, all at once (each upstream's endpoint sees one request).
pub async fn check(config: &Config) -> Vec<Diagnosis> {
    let http = side_call_client();
    let tasks = config.upstreams.iter().map(|u| {
        let granter = Granter::new(http.clone(), u.grant.clone());
        async move {
            let result = granter.grant().await.map(|g| g.expires_in);
            diagnose(u, result)
        }
    });
    futures_util::future::join_all(tasks).await
}

pub fn diagnose(u: &UpstreamConfig, result: Result<std::time::Duration, GrantError>) -> Diagnosis {
    let mut d = Diagnosis {
        upstream: u.name.to_string(),
        ok: false,
        token_url: u.grant.token_url.clone(),
        status: None,
        grant_error: None,
        hint: "ok",
        message: String::new(),
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
                    Provider::Genesys => "the login host does not know this client id and secret: check both in Admin > OAuth, and that the OAuth client belongs to the org of this region".to_string(),
                    _ => "the token endpoint does not accept this client id and secret: check both, and auth_method (basic or post)".to_string(),
                }),
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
            format!("TLS with the token endpoint failed ({detail}): check the URL's host and any TLS-intercepting proxy"),
        ),
    };
    d.hint = hint;
    d.message = message;
    d
}
