//! A token endpoint's answer, parsed: a usable bearer token and its lifetime, or why the
//! answer is not one (an OAuth refusal, an API gateway's JSON, an HTML page).

use std::time::Duration;

use secrecy::SecretString;

use super::error::GrantError;

/// What a token endpoint answered, parsed.
pub(super) struct Answer {
    pub(super) access_token: SecretString,
    pub(super) expires_in: Duration,
    pub(super) refresh_token: Option<SecretString>,
    pub(super) id_token: Option<String>,
}

/// The answer of a token endpoint (`status`, `content_type`, `body`) as a token, or why it
/// is not one; `redact` takes the grant's secrets out of any text the answer echoes.
pub(super) fn parse(
    status: u16,
    content_type: &str,
    body: &[u8],
    redact: impl Fn(&str) -> String,
) -> Result<Answer, GrantError> {
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let field = |name: &str| {
        json.as_ref()
            .and_then(|j| j.get(name))
            .and_then(|v| v.as_str())
            .map(&redact)
    };
    if !(200..300).contains(&status) {
        if let Some(error) = field("error") {
            return Err(GrantError::Refused {
                status,
                error,
                description: field("error_description").or_else(|| field("description")),
            });
        }
        return Err(GrantError::NotOAuth {
            status,
            api_code: field("code"),
            what: match (&json, field("message")) {
                (Some(_), Some(m)) => format!("a JSON error: {m}"),
                (Some(_), None) => "a JSON body without an OAuth \"error\"".into(),
                (None, _) => redact(&answer_kind(content_type, body)),
            },
        });
    }
    let Some(json) = json else {
        return Err(GrantError::NotOAuth {
            status,
            api_code: None,
            what: redact(&answer_kind(content_type, body)),
        });
    };
    let token = json
        .get("access_token")
        .and_then(|v| v.as_str())
        .filter(|t| !t.is_empty() && http::HeaderValue::from_str(&format!("Bearer {t}")).is_ok());
    let Some(token) = token else {
        return Err(GrantError::NotOAuth {
            status,
            api_code: None,
            what: "a JSON body without a usable \"access_token\"".into(),
        });
    };
    if let Some(tt) = json.get("token_type").and_then(|v| v.as_str()) {
        if !tt.eq_ignore_ascii_case("bearer") {
            return Err(GrantError::NotOAuth {
                status,
                api_code: None,
                what: format!("a token of type \"{}\", not bearer", redact(tt)),
            });
        }
    }
    // RFC 6749 recommends expires_in; some servers send it as a string.
    let expires_in = match json.get("expires_in") {
        Some(serde_json::Value::Number(n)) => n.as_f64(),
        Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
        _ => Some(3600.0),
    }
    .filter(|s| s.is_finite() && *s > 0.0)
    .map(|s| Duration::from_secs_f64(s.min(31_536_000.0)));
    let Some(expires_in) = expires_in else {
        return Err(GrantError::NotOAuth {
            status,
            api_code: None,
            what: "an \"expires_in\" that is not a positive number".into(),
        });
    };
    let text = |name: &str| {
        json.get(name)
            .and_then(|v| v.as_str())
            .filter(|t| !t.is_empty())
    };
    Ok(Answer {
        access_token: SecretString::from(token.to_string()),
        expires_in,
        refresh_token: text("refresh_token").map(|t| SecretString::from(t.to_string())),
        id_token: text("id_token").map(str::to_string),
    })
}

pub(super) fn header_text(headers: &http::HeaderMap, name: http::header::HeaderName) -> String {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

pub(super) fn answer_kind(content_type: &str, body: &[u8]) -> String {
    let head = String::from_utf8_lossy(&body[..body.len().min(200)]).to_ascii_lowercase();
    if content_type.contains("html") || head.trim_start().starts_with('<') {
        "an HTML page (a login page or a proxy's error page?)".into()
    } else if body.is_empty() {
        "an empty body".into()
    } else {
        format!("a body of type \"{content_type}\" that is not JSON")
    }
}
