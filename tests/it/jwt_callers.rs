//! Callers without static secrets (issue 27): a client that presents a JWT signed by its
//! workload's issuer (a Kubernetes service account here), checked against the issuer's
//! JWKS, served by a local HTTP server that the test rotates and takes down.

use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use crate::support::*;

const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const AUDIENCE: &str = "tokengate";
const SUBJECT: &str = "system:serviceaccount:etl:nightly";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// A signing key: its private PEM, its algorithm and its public JWK.
struct SigningKey {
    pem: String,
    alg: Algorithm,
    kid: &'static str,
    jwk: serde_json::Value,
    public_pem: String,
}

fn rsa_signing_key(kid: &'static str) -> SigningKey {
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    use rsa::traits::PublicKeyParts;
    let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
    let public = key.to_public_key();
    SigningKey {
        pem: key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
        alg: Algorithm::RS256,
        kid,
        jwk: serde_json::json!({
            "kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
            "n": b64(&public.n().to_bytes_be()), "e": b64(&public.e().to_bytes_be()),
        }),
        public_pem: public.to_public_key_pem(LineEnding::LF).unwrap(),
    }
}

fn ec_signing_key(kid: &'static str) -> SigningKey {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let point = key.public_key_raw();
    SigningKey {
        pem: key.serialize_pem(),
        alg: Algorithm::ES256,
        kid,
        jwk: serde_json::json!({
            "kty": "EC", "kid": kid, "use": "sig", "alg": "ES256", "crv": "P-256",
            "x": b64(&point[1..33]), "y": b64(&point[33..65]),
        }),
        public_pem: key.public_key_pem(),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims a Kubernetes projected token carries, with `edit` applied.
fn claims(edit: impl FnOnce(&mut serde_json::Value)) -> serde_json::Value {
    let mut c = serde_json::json!({
        "iss": ISSUER, "aud": [AUDIENCE], "sub": SUBJECT,
        "iat": now(), "nbf": now(), "exp": now() + 600,
    });
    edit(&mut c);
    c
}

fn sign(key: &SigningKey, claims: &serde_json::Value) -> String {
    let mut header = Header::new(key.alg);
    header.kid = Some(key.kid.to_string());
    let encoding = match key.alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(key.pem.as_bytes()).unwrap(),
        _ => EncodingKey::from_rsa_pem(key.pem.as_bytes()).unwrap(),
    };
    jsonwebtoken::encode(&header, claims, &encoding).unwrap()
}

/// An issuer's JWKS endpoint: the keys it serves now, whether it answers, and how many
/// times it was asked.
#[derive(Default)]
struct Jwks {
    keys: Vec<serde_json::Value>,
    down: bool,
    fetches: u32,
}

async fn serve_jwks(jwks: Arc<Mutex<Jwks>>) -> Served {
    let svc = tower::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let jwks = Arc::clone(&jwks);
        async move {
            let mut j = jwks.lock().unwrap();
            let host = req.headers()["host"].to_str().unwrap().to_string();
            let (status, body) = if j.down {
                (503, String::new())
            } else if req.uri().path() == "/.well-known/openid-configuration" {
                // The issuer's discovery document.
                let doc = serde_json::json!({
                    "issuer": format!("http://{host}"),
                    "jwks_uri": format!("http://{host}/jwks"),
                });
                (200, doc.to_string())
            } else {
                j.fetches += 1;
                (200, serde_json::json!({ "keys": j.keys }).to_string())
            };
            let mut resp = http::Response::new(tokengate::http::body::full(body));
            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
            resp.headers_mut().insert(
                "cache-control",
                http::HeaderValue::from_static("max-age=3600"),
            );
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    serve_service(svc).await
}

fn jwt_client(name: &str, issuer: &str, jwks: &Served) -> String {
    format!(
        "\n[[client]]\nname = \"{name}\"\njwt_issuer = \"{issuer}\"\njwt_audience = \"{AUDIENCE}\"\njwt_subject = \"system:serviceaccount:etl:*\"\njwks_url = \"http://{}/jwks\"\n",
        jwks.addr
    )
}

async fn status_with(proxy: &Proxy, token: &str) -> u16 {
    status_with_authorization(proxy, &format!("Bearer {token}")).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_workload_token_is_a_key_and_every_forgery_is_refused() {
    let sandbox = sandbox().await;
    let (rsa, ec) = (rsa_signing_key("k1"), ec_signing_key("e1"));
    let jwks = Arc::new(Mutex::new(Jwks {
        keys: vec![rsa.jwk.clone(), ec.jwk.clone()],
        ..Jwks::default()
    }));
    let served = serve_jwks(Arc::clone(&jwks)).await;
    let config = format!(
        "{}{}",
        standard_config(&sandbox, ""),
        jwt_client("etl", ISSUER, &served)
    );
    let proxy = Proxy::start(&config);
    let good = sign(&rsa, &claims(|_| {}));
    assert_eq!(status_with(&proxy, &good).await, 200);
    assert_eq!(status_with(&proxy, &sign(&ec, &claims(|_| {}))).await, 200);
    // The platform saw the proxy's token, never the JWT; the calls count under etl.
    let echoed = client()
        .get(proxy.url("/api/v2/seen-by-the-platform"))
        .header("Authorization", format!("Bearer {good}"))
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.status(), 200);
    let seen = sandbox.seen();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].headers.contains_key("authorization"));
    for r in &seen {
        for v in r.headers.values() {
            assert!(!String::from_utf8_lossy(v.as_bytes()).contains(&good[..40]));
        }
    }
    let doc: serde_json::Value =
        serde_json::from_str(&admin_text(&proxy, "/status.json").await).unwrap();
    let etl = doc["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "etl")
        .unwrap();
    assert_eq!(etl["requests"], 3, "{etl}");
    // The team key still works beside it.
    assert_eq!(status_with(&proxy, CLIENT_KEY).await, 200);

    // Each forgery or mismatch: 401.
    let tampered = {
        let other = sign(
            &rsa,
            &claims(|c| c["sub"] = "system:serviceaccount:admin:root".into()),
        );
        let mut parts: Vec<&str> = good.split('.').collect();
        parts[1] = other.split('.').nth(1).unwrap();
        parts.join(".")
    };
    let unsigned = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims(|_| {}).to_string().as_bytes())
    );
    let hmac_with_public_key = {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        jsonwebtoken::encode(
            &header,
            &claims(|_| {}),
            &EncodingKey::from_secret(rsa.public_pem.as_bytes()),
        )
        .unwrap()
    };
    let unknown_kid = {
        let mut stranger = rsa_signing_key("k-unknown");
        stranger.kid = "k-unknown";
        sign(&stranger, &claims(|_| {}))
    };
    let cases = [
        (
            "expired",
            sign(&rsa, &claims(|c| c["exp"] = (now() - 120).into())),
        ),
        (
            "no exp",
            sign(
                &rsa,
                &claims(|c| {
                    c.as_object_mut().unwrap().remove("exp");
                }),
            ),
        ),
        (
            "wrong aud",
            sign(&rsa, &claims(|c| c["aud"] = "someone-else".into())),
        ),
        (
            "wrong iss",
            sign(&rsa, &claims(|c| c["iss"] = "https://evil.example".into())),
        ),
        (
            "subject outside the glob",
            sign(
                &rsa,
                &claims(|c| c["sub"] = "system:serviceaccount:etl2:x".into()),
            ),
        ),
        (
            "not yet valid",
            sign(&rsa, &claims(|c| c["nbf"] = (now() + 600).into())),
        ),
        ("unknown kid", unknown_kid),
        ("alg none", unsigned),
        ("HS256 with the public key", hmac_with_public_key),
        ("tampered payload", tampered),
    ];
    for (case, token) in &cases {
        assert_eq!(status_with(&proxy, token).await, 401, "{case}");
    }
    // Nothing of any token in the proxy's output.
    let output = proxy.output.text();
    for (_, token) in &cases {
        let signature = token.rsplit('.').next().unwrap();
        assert!(signature.is_empty() || !output.contains(signature));
    }
    assert!(!output.contains(good.rsplit('.').next().unwrap()));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotated_jwks_is_read_at_the_first_call_that_needs_it_and_an_outage_keeps_the_keys() {
    let sandbox = sandbox().await;
    let (old, new) = (rsa_signing_key("2026-12"), ec_signing_key("2027-01"));
    let jwks = Arc::new(Mutex::new(Jwks {
        keys: vec![old.jwk.clone()],
        ..Jwks::default()
    }));
    let served = serve_jwks(Arc::clone(&jwks)).await;
    let config = format!(
        "{}{}",
        standard_config(&sandbox, ""),
        jwt_client("etl", ISSUER, &served)
    );
    let proxy = Proxy::start(&config);
    assert_eq!(status_with(&proxy, &sign(&old, &claims(|_| {}))).await, 200);
    assert_eq!(jwks.lock().unwrap().fetches, 1);
    // The issuer adds a key: the first token signed with it makes the proxy look again.
    jwks.lock().unwrap().keys.push(new.jwk.clone());
    assert_eq!(status_with(&proxy, &sign(&new, &claims(|_| {}))).await, 200);
    assert_eq!(jwks.lock().unwrap().fetches, 2);
    // Made-up kids cannot make it ask again and again.
    let stranger = rsa_signing_key("made-up");
    for _ in 0..5 {
        assert_eq!(
            status_with(&proxy, &sign(&stranger, &claims(|_| {}))).await,
            401
        );
    }
    assert_eq!(jwks.lock().unwrap().fetches, 2);
    // The issuer goes down: the keys read before still serve.
    jwks.lock().unwrap().down = true;
    assert_eq!(status_with(&proxy, &sign(&old, &claims(|_| {}))).await, 200);
    assert_eq!(status_with(&proxy, &sign(&new, &claims(|_| {}))).await, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jwks_file_is_read_again_when_it_changes() {
    let sandbox = sandbox().await;
    let (old, new) = (ec_signing_key("a"), ec_signing_key("b"));
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    let write = |keys: &[&serde_json::Value]| {
        std::fs::write(&file, serde_json::json!({ "keys": keys }).to_string()).unwrap();
    };
    write(&[&old.jwk]);
    let config = format!(
        "{}\n[[client]]\nname = \"ci\"\njwt_issuer = \"{ISSUER}\"\njwt_audience = \"{AUDIENCE}\"\njwt_subject = \"system:serviceaccount:etl:*\"\njwks_file = \"{}\"\n",
        standard_config(&sandbox, ""),
        file.display()
    );
    let proxy = Proxy::start(&config);
    assert_eq!(status_with(&proxy, &sign(&old, &claims(|_| {}))).await, 200);
    assert_eq!(status_with(&proxy, &sign(&new, &claims(|_| {}))).await, 401);
    // The old key is replaced by the new one in the file.
    let before = std::fs::metadata(&file).unwrap().modified().unwrap();
    wait_for(std::time::Duration::from_secs(5), || {
        write(&[&new.jwk]);
        (std::fs::metadata(&file).unwrap().modified().unwrap() != before).then_some(())
    })
    .await
    .expect("the file's modification time moves");
    assert_eq!(status_with(&proxy, &sign(&new, &claims(|_| {}))).await, 200);
    assert_eq!(status_with(&proxy, &sign(&old, &claims(|_| {}))).await, 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_jwks_the_issuers_discovery_document_says_where_its_keys_are() {
    let sandbox = sandbox().await;
    let key = ec_signing_key("d1");
    let jwks = Arc::new(Mutex::new(Jwks {
        keys: vec![key.jwk.clone()],
        ..Jwks::default()
    }));
    let served = serve_jwks(Arc::clone(&jwks)).await;
    let issuer = format!("http://{}", served.addr);
    let config = format!(
        "{}\n[[client]]\nname = \"ci\"\njwt_issuer = \"{issuer}\"\njwt_audience = \"{AUDIENCE}\"\njwt_subject = \"system:serviceaccount:etl:*\"\n",
        standard_config(&sandbox, ""),
    );
    let proxy = Proxy::start(&config);
    let token = sign(&key, &claims(|c| c["iss"] = issuer.clone().into()));
    assert_eq!(status_with(&proxy, &token).await, 200);
    assert_eq!(jwks.lock().unwrap().fetches, 1);
}
