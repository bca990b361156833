//! The login host: the OAuth token endpoint (Genesys `client_credentials`; CXone's password
//! grant with an access key, its refresh grant and discovery documents).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Instant;

use base64::Engine as _;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use rand::RngCore;

use crate::{json, lock, Body, Flavor, SandboxOptions, State};

pub(crate) fn random_token() -> String {
    let mut bytes = [0u8; 24];
    rand::thread_rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

pub(crate) async fn answer(
    o: &SandboxOptions,
    s: &State,
    issuer: &str,
    api: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    match (o.flavor, path.as_str()) {
        (Flavor::Cxone, "/.well-known/openid-configuration") => {
            return json(
                StatusCode::OK,
                serde_json::json!({"issuer": issuer, "token_endpoint": format!("{issuer}/auth/token"), "grant_types_supported": ["password", "refresh_token", "authorization_code"]}),
            );
        }
        (Flavor::Cxone, "/.well-known/cxone-configuration") => {
            let tenant = req
                .uri()
                .query()
                .and_then(|q| form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "tenantId"))
                .map(|(_, v)| v.into_owned());
            if tenant.as_deref() != Some(o.tenant_id.as_str()) {
                return json(
                    StatusCode::NOT_FOUND,
                    serde_json::json!({"error": "unknown tenant"}),
                );
            }
            return json(
                StatusCode::OK,
                serde_json::json!({"tenantId": o.tenant_id, "api_endpoint": api, "area": "na1"}),
            );
        }
        (Flavor::Genesys, "/oauth/token") | (Flavor::Cxone, "/auth/token") => {}
        (_, "/oauth/introspect") if req.method() == Method::POST => {
            return introspect(o, s, req).await;
        }
        _ => {
            return json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not_found"}),
            )
        }
    }
    if req.method() != Method::POST {
        return json(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({"error": "invalid_request"}),
        );
    }
    s.grant_requests.fetch_add(1, Ordering::SeqCst);
    #[cfg(feature = "fixtures")]
    if s.controls.grants_rate_limited.load(Ordering::SeqCst) {
        // Genesys' answer to a burst of token requests.
        return oauth_refusal(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "rate limit exceeded",
        );
    }
    let in_flight = s.grants_in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    s.max_grants_in_flight
        .fetch_max(in_flight, Ordering::SeqCst);
    let resp = grant(o, s, issuer, req).await;
    s.grants_in_flight.fetch_sub(1, Ordering::SeqCst);
    resp
}

fn oauth_refusal(status: StatusCode, error: &str, description: &str) -> Response<Body> {
    json(
        status,
        serde_json::json!({"error": error, "description": description, "error_description": description}),
    )
}

/// Decode `Basic` credentials as the sandbox is told to.
fn basic_credentials(o: &SandboxOptions, header: Option<&HeaderValue>) -> Option<(String, String)> {
    let b64 = header?.to_str().ok()?.strip_prefix("Basic ")?;
    let decoded =
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    if o.basic_form_encoded {
        let decode = |s: &str| -> Option<String> {
            let plus = s.replace('+', " ");
            percent_encoding::percent_decode_str(&plus)
                .decode_utf8()
                .ok()
                .map(|c| c.into_owned())
        };
        Some((decode(id)?, decode(secret)?))
    } else {
        Some((id.to_string(), secret.to_string()))
    }
}

/// RFC 7662 introspection, for the OAuth client itself (Basic credentials):
/// `{"active": true}` for a token issued, not revoked and not expired.
async fn introspect(o: &SandboxOptions, s: &State, req: Request<Incoming>) -> Response<Body> {
    let basic = basic_credentials(o, req.headers().get(header::AUTHORIZATION));
    if basic.map(|(id, _)| id) != Some(o.client_id.clone()) {
        return oauth_refusal(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "authentication failed",
        );
    }
    let Ok(form) = req.into_body().collect().await else {
        return oauth_refusal(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "unreadable body",
        );
    };
    let token = form_urlencoded::parse(&form.to_bytes())
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned())
        .unwrap_or_default();
    s.introspections.fetch_add(1, Ordering::SeqCst);
    let active = lock(&s.tokens)
        .get(&token)
        .is_some_and(|expiry| *expiry > Instant::now());
    json(StatusCode::OK, serde_json::json!({"active": active}))
}

async fn grant(
    o: &SandboxOptions,
    s: &State,
    issuer: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    let basic = basic_credentials(o, req.headers().get(header::AUTHORIZATION));
    let Ok(form) = req.into_body().collect().await else {
        return oauth_refusal(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "unreadable body",
        );
    };
    let form: HashMap<String, String> = form_urlencoded::parse(&form.to_bytes())
        .into_owned()
        .collect();
    let posted = match (form.get("client_id"), form.get("client_secret")) {
        (Some(id), Some(secret)) if o.accept_client_secret_post => {
            Some((id.clone(), secret.clone()))
        }
        _ => None,
    };
    let accepted = s
        .rotated_secret
        .lock()
        .ok()
        .and_then(|r| r.clone())
        .unwrap_or_else(|| o.client_secret.clone());
    let client_ok = basic
        .or(posted)
        .is_some_and(|(id, secret)| id == o.client_id && secret == accepted);
    if !client_ok {
        let status = StatusCode::from_u16(o.refusal_status).unwrap_or(StatusCode::BAD_REQUEST);
        return oauth_refusal(status, "invalid_client", "authentication failed");
    }
    let grant_type = form.get("grant_type").map(String::as_str).unwrap_or("");
    let expected = match o.flavor {
        Flavor::Genesys => "client_credentials",
        Flavor::Cxone => "password",
    };
    let refreshing = o.flavor == Flavor::Cxone && grant_type == "refresh_token";
    if grant_type != expected && !refreshing {
        return oauth_refusal(
            StatusCode::BAD_REQUEST,
            "unsupported_grant_type",
            "grant type is not supported",
        );
    }
    if !o.grant_enabled {
        return oauth_refusal(
            StatusCode::BAD_REQUEST,
            "unauthorized_client",
            "the client is not authorized to use this grant type",
        );
    }
    if let (Some(allowed), Some(scope)) = (&o.allowed_scopes, form.get("scope")) {
        if scope.split(' ').any(|sc| !allowed.iter().any(|a| a == sc)) {
            return oauth_refusal(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                "the requested scope is invalid",
            );
        }
    }
    if refreshing {
        let known = form
            .get("refresh_token")
            .is_some_and(|t| lock(&s.refresh_tokens).remove(t).is_some());
        if !known {
            return oauth_refusal(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "refresh token is invalid",
            );
        }
        s.refresh_grants.fetch_add(1, Ordering::SeqCst);
    } else if o.flavor == Flavor::Cxone
        && (form.get("username") != Some(&o.access_key_id)
            || form.get("password") != Some(&o.access_key_secret))
    {
        return oauth_refusal(
            StatusCode::BAD_REQUEST,
            "invalid_grant",
            "invalid username or password",
        );
    }
    let token = random_token();
    lock(&s.tokens).insert(token.clone(), Instant::now() + o.token_lifetime);
    lock(&s.last_use).insert(token.clone(), Instant::now());
    s.grants.fetch_add(1, Ordering::SeqCst);
    let expires_in = o.token_lifetime.as_secs().max(1);
    let answer = match o.flavor {
        Flavor::Genesys => {
            serde_json::json!({"access_token": token, "token_type": "bearer", "expires_in": expires_in})
        }
        Flavor::Cxone => {
            let refresh = random_token();
            lock(&s.refresh_tokens).insert(refresh.clone(), ());
            // An unsigned JWT is enough here: the proxy reads the claims, it does not
            // authenticate with the id_token.
            let b64 = |v: serde_json::Value| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
            };
            let id_token = format!(
                "{}.{}.",
                b64(serde_json::json!({"alg": "none", "typ": "JWT"})),
                b64(
                    serde_json::json!({"iss": issuer, "tenantId": o.tenant_id, "sub": "user:sandbox"})
                )
            );
            serde_json::json!({"access_token": token, "token_type": "Bearer", "expires_in": expires_in, "id_token": id_token, "refresh_token": refresh})
        }
    };
    json(StatusCode::OK, answer)
}
