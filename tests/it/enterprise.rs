//! In an enterprise network: the corporate egress proxy (a real tinyproxy), a private CA
//! (`ca_file`), secrets that rotate, and client authentication without a shared secret
//! (`private_key_jwt`, mutual TLS) against token endpoints that verify them as RFC 7523 and
//! RFC 8705 say; and `issuer` discovery for generic OAuth2.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use sha2::{Digest, Sha256};

use crate::support::pki::{pki, tls_front, tls_front_recording, Pki};
use crate::support::tinyproxy::Tinyproxy;
use crate::support::*;

/// Run `check --json` on `config` with `env`; its one diagnosis. Asserts that none of
/// `secrets` was printed.
async fn check(
    config: String,
    env: Vec<(String, String)>,
    secrets: Vec<String>,
) -> serde_json::Value {
    tokio::task::spawn_blocking(move || {
        let (_dir, path) = write_config(&config);
        let out = binary()
            .args(["check", "--json", "-c", path.to_str().unwrap()])
            .envs(env)
            .output()
            .unwrap();
        let (o, e) = (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        );
        for s in &secrets {
            assert!(
                !o.contains(s.as_str()) && !e.contains(s.as_str()),
                "a secret was printed: {o}{e}"
            );
        }
        serde_json::from_str(o.lines().next().unwrap_or("")).unwrap_or_else(|_| panic!("{o}{e}"))
    })
    .await
    .unwrap()
}

/// A Genesys-like upstream whose login and API hosts are the sandbox behind HTTPS fronts
/// with certificates of the test CA.
fn https_upstream(login: &Served, api: &Served, extra: &str) -> String {
    format!(
        "[[upstream]]\nname = \"genesys\"\nprovider = \"genesys\"\nregion = \"us_east_1\"\ntoken_url = \"https://127.0.0.1:{}/oauth/token\"\nbase_url = \"https://127.0.0.1:{}\"\nclient_id = \"sandbox-client\"\nclient_secret = \"${{SANDBOX_SECRET}}\"\n{extra}\n",
        login.addr.port(),
        api.addr.port()
    )
}

async fn https_fronts(sandbox: &Sandbox, pki: &Pki) -> (Served, Served) {
    (
        tls_front(sandbox.login_addr, pki.server_config(false)).await,
        tls_front(sandbox.api_addr, pki.server_config(false)).await,
    )
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs tinyproxy (scripts/test.sh installs it)"]
async fn grants_and_api_calls_leave_through_the_egress_proxy_to_a_private_ca_host() {
    let (sandbox, pki) = (
        sandbox_with_heartbeat(Duration::from_millis(200)).await,
        pki(),
    );
    let (login, api) = https_fronts(&sandbox, &pki).await;
    let streaming = tls_front(sandbox.streaming_addr, pki.server_config(false)).await;
    let tinyproxy = Tinyproxy::start();
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\negress_proxy = \"{}\"\n{}{}",
        tinyproxy.url(),
        https_upstream(
            &login,
            &api,
            &format!(
                "ca_file = \"{}\"\nstreaming_url = \"wss://127.0.0.1:{}\"",
                pki.path("ca.pem"),
                streaming.addr.port()
            )
        ),
        client_toml("reporting-job", "")
    );
    let proxy = Proxy::start(&config);
    let r = get_with_key(&proxy, "/api/v2/users/me").await;
    assert_eq!(r.status(), 200);
    assert_eq!(sandbox.grants(), 1);
    // Both tunnels went through the proxy: one to the login host, one to the API host.
    let tunnels = tinyproxy.tunnels();
    assert!(tunnels.contains(&login.addr.port()), "{}", tinyproxy.log());
    assert!(tunnels.contains(&api.addr.port()), "{}", tinyproxy.log());

    // A notification socket: the streaming host is reached through the proxy as well.
    let channel: serde_json::Value = client()
        .post(proxy.url("/api/v2/notifications/channels"))
        .header("Authorization", format!("Bearer {CLIENT_KEY}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let connect = channel["connectUri"].as_str().unwrap();
    let (mut ws, _) = tokio_tungstenite::connect_async(connect).await.unwrap();
    let first = futures_util::StreamExt::next(&mut ws)
        .await
        .unwrap()
        .unwrap();
    assert!(
        first.to_text().unwrap().contains("WebSocket Heartbeat"),
        "{first}"
    );
    assert!(
        tinyproxy.tunnels().contains(&streaming.addr.port()),
        "{}",
        tinyproxy.log()
    );
    assert!(!proxy.output.text().contains(&tinyproxy.password));

    // check: through the proxy, and when the proxy refuses the password.
    let env = vec![("SANDBOX_SECRET".to_string(), CLIENT_SECRET.to_string())];
    let upstream = https_upstream(
        &login,
        &api,
        &format!("ca_file = \"{}\"", pki.path("ca.pem")),
    );
    let good = check(
        format!(
            "[server]\negress_proxy = \"{}\"\n{upstream}",
            tinyproxy.url()
        ),
        env.clone(),
        vec![CLIENT_SECRET.into(), tinyproxy.password.clone()],
    )
    .await;
    assert_eq!(good["ok"], true, "{good}");
    assert_eq!(
        good["egress_proxy"],
        format!("http://127.0.0.1:{}", tinyproxy.port)
    );
    assert_eq!(good["auth_method"], "client_secret_basic");
    let wrong = "not-the-proxy-password";
    let refused = check(
        format!(
            "[server]\negress_proxy = \"{}\"\n{upstream}",
            tinyproxy.url_with_password(wrong)
        ),
        env,
        vec![CLIENT_SECRET.into(), wrong.into()],
    )
    .await;
    assert_eq!(refused["ok"], false);
    assert_eq!(refused["hint"], "egress_proxy_refused", "{refused}");
    // tinyproxy answers a wrong password with 401 (others say 407): either names the cause.
    let message = refused["message"].as_str().unwrap();
    assert!(
        message.contains("401") && message.contains("password"),
        "{refused}"
    );
    assert_eq!(
        sandbox.grants(),
        2,
        "the refused check reached no token endpoint"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs tinyproxy (scripts/test.sh installs it)"]
async fn an_upstream_can_opt_out_of_the_egress_proxy_and_no_proxy_is_honoured() {
    let sandbox = sandbox().await;
    let tinyproxy = Tinyproxy::start();
    for (server_extra, upstream_extra, env) in [
        ("", "egress_proxy = \"none\"", vec![]),
        (
            "",
            "",
            vec![
                ("HTTPS_PROXY", tinyproxy.url()),
                ("HTTP_PROXY", tinyproxy.url()),
                ("NO_PROXY", "127.0.0.1".to_string()),
            ],
        ),
    ] {
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\negress_proxy = \"{}\"\n{server_extra}\n{}{upstream_extra}\n{}",
            tinyproxy.url(),
            upstream_toml(&sandbox, "genesys", "/"),
            client_toml("reporting-job", "")
        );
        let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        env.push(("SANDBOX_SECRET", CLIENT_SECRET));
        let proxy = Proxy::start_with_env(&config, &env);
        assert_eq!(get_with_key(&proxy, "/api/v2/users/me").await.status(), 200);
    }
    assert_eq!(
        tinyproxy.tunnels(),
        Vec::<u16>::new(),
        "{}",
        tinyproxy.log()
    );
    assert!(
        !tinyproxy.log().contains("Request (file descriptor"),
        "{}",
        tinyproxy.log()
    );

    // From the environment alone (no egress_proxy): every way out takes the proxy.
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{}{}",
        upstream_toml(&sandbox, "genesys", "/"),
        client_toml("reporting-job", "")
    );
    let url = tinyproxy.url();
    let proxy = Proxy::start_with_env(
        &config,
        &[
            ("HTTP_PROXY", url.as_str()),
            ("SANDBOX_SECRET", CLIENT_SECRET),
        ],
    );
    assert_eq!(get_with_key(&proxy, "/api/v2/users/me").await.status(), 200);
    let log = tinyproxy.log();
    assert!(
        log.contains(&format!("CONNECT 127.0.0.1:{}", sandbox.api_addr.port())),
        "{log}"
    );
    assert!(
        log.contains(&format!("POST {}", sandbox.token_url())),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_private_ca_is_trusted_only_through_ca_file() {
    let (sandbox, pki) = (sandbox().await, pki());
    let (login, api) = https_fronts(&sandbox, &pki).await;
    let env = vec![("SANDBOX_SECRET".to_string(), CLIENT_SECRET.to_string())];
    let secrets = vec![CLIENT_SECRET.to_string()];
    let without = check(
        https_upstream(&login, &api, ""),
        env.clone(),
        secrets.clone(),
    )
    .await;
    assert_eq!(without["hint"], "tls_error", "{without}");
    assert!(
        without["message"].as_str().unwrap().contains("ca_file"),
        "{without}"
    );
    for extra in ["", "ca_only = true"] {
        let with = check(
            https_upstream(
                &login,
                &api,
                &format!("ca_file = \"{}\"\n{extra}", pki.path("ca.pem")),
            ),
            env.clone(),
            secrets.clone(),
        )
        .await;
        assert_eq!(with["ok"], true, "{with}");
    }
    // The API host too (tokens from the plain login host here): without ca_file a call
    // cannot reach it; with it, it does.
    for (extra, status) in [("", 502), ("ca_file = \"ca.pem\"", 200)] {
        let upstream = https_upstream(&login, &api, &extra.replace("ca.pem", &pki.path("ca.pem")))
            .replace(
                &format!("https://127.0.0.1:{}/oauth/token", login.addr.port()),
                &sandbox.token_url(),
            );
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{upstream}{}",
            client_toml("reporting-job", "")
        );
        let proxy = Proxy::start(&config);
        let r = get_with_key(&proxy, "/api/v2/users/me").await;
        assert_eq!(r.status(), status);
        if status == 502 {
            let body = r.text().await.unwrap();
            assert!(body.contains("upstream_unreachable"), "{body}");
        }
    }
}

/// An API host that speaks HTTP/2 (ALPN `h2`): every call shares one connection, the first call opening it and the rest going out on it at once
/// (`WorkerConnections::send_now`), in sequence and side by side.
#[tokio::test(flavor = "multi_thread")]
async fn an_http2_api_host_is_called_over_one_shared_connection() {
    let (sandbox, pki) = (sandbox().await, pki());
    let mut h2 = (*pki.server_config(false)).clone();
    h2.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let (api, negotiated) = tls_front_recording(sandbox.api_addr, Arc::new(h2)).await;
    let login = tls_front(sandbox.login_addr, pki.server_config(false)).await;
    let upstream = https_upstream(
        &login,
        &api,
        &format!("ca_file = \"{}\"", pki.path("ca.pem")),
    )
    .replace(
        &format!("https://127.0.0.1:{}/oauth/token", login.addr.port()),
        &sandbox.token_url(),
    );
    // One worker: one shared connection in all.
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nworkers = 1\n{upstream}{}",
        client_toml("reporting-job", "")
    );
    let proxy = Proxy::start(&config);
    for _ in 0..10 {
        assert_eq!(get_with_key(&proxy, "/api/v2/users/me").await.status(), 200);
    }
    let side_by_side = (0..30).map(|_| get_with_key(&proxy, "/api/v2/users/me"));
    for r in futures_util::future::join_all(side_by_side).await {
        assert_eq!(r.status(), 200);
    }
    // Bodies go into their streams whole: a small one (sent with the head), and one of
    // 1 MiB streamed in chunks, larger than a stream's flow-control window, side by side.
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    let proxy = &proxy;
    let posts = [b"{\"small\":true}".to_vec(), big].map(|body| {
        let (len, sha) = (body.len(), hex::encode(Sha256::digest(&body)));
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
            body.chunks(64 * 1024).map(|c| Ok(c.to_vec())).collect();
        let streamed = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
        async move {
            let r = client()
                .post(proxy.url("/api/v2/analytics/conversations/details/query"))
                .header("Authorization", format!("Bearer {CLIENT_KEY}"))
                .body(streamed)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let seen: serde_json::Value = r.json().await.unwrap();
            assert_eq!(seen["body_bytes"], len, "{seen}");
            assert_eq!(seen["body_sha256"], sha.as_str(), "{seen}");
        }
    });
    futures_util::future::join_all(posts).await;
    let negotiated = negotiated.lock().unwrap().clone();
    assert!(!negotiated.is_empty());
    assert!(
        negotiated.iter().all(|p| p.as_deref() == Some(&b"h2"[..])),
        "{negotiated:?}"
    );
    assert_eq!(negotiated.len(), 1, "{negotiated:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_secret_file_rewritten_while_calls_flow_fails_no_call() {
    let sandbox = sandbox().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("client-secret");
    std::fs::write(&file, format!("{CLIENT_SECRET}\n")).unwrap();
    let upstream = upstream_toml(&sandbox, "genesys", "/").replace(
        "client_secret = \"${SANDBOX_SECRET}\"",
        &format!("client_secret_file = \"{}\"", file.display()),
    );
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{upstream}{}",
        client_toml("reporting-job", "")
    );
    let proxy = Arc::new(Proxy::start(&config));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loops: Vec<_> = (0..4)
        .map(|_| {
            let (proxy, ok, failed, stop) =
                (proxy.clone(), ok.clone(), failed.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let r = get_with_key(&proxy, "/api/v2/users/me").await;
                    if r.status() == 200 { &ok } else { &failed }.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    wait_for(Duration::from_secs(10), || {
        (ok.load(Ordering::Relaxed) > 50).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(sandbox.grants(), 1);

    // The rotation: the file gets the new secret, the platform accepts only it and drops
    // the tokens it issued.
    let new_secret = "rotated-secret-7Hq2";
    std::fs::write(&file, format!("{new_secret}\n")).unwrap();
    sandbox.rotate_client_secret(new_secret);
    sandbox.revoke_all();
    let before = ok.load(Ordering::Relaxed);
    wait_for(Duration::from_secs(10), || {
        (sandbox.grants() >= 2 && ok.load(Ordering::Relaxed) > before + 50).then_some(())
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "calls failed during the rotation"
    );
    assert_eq!(sandbox.grants(), 2, "one grant with the new secret");
    let logs = wait_for(Duration::from_secs(5), || {
        let text = proxy.output.text();
        text.contains("the secret file changed").then_some(text)
    })
    .await
    .unwrap_or_else(|| proxy.output.text());
    assert!(logs.contains("the secret file changed"), "{logs}");
    assert!(!logs.contains(new_secret) && !logs.contains(CLIENT_SECRET));
}

#[tokio::test(flavor = "multi_thread")]
async fn client_secret_next_is_tried_when_the_current_one_is_refused() {
    let sandbox = sandbox().await;
    let old = "the-old-secret-retired";
    let upstream = upstream_toml(&sandbox, "genesys", "/").replace(
        "client_secret = \"${SANDBOX_SECRET}\"",
        &format!("client_secret = \"{old}\"\nclient_secret_next = \"${{SANDBOX_SECRET}}\""),
    );
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{upstream}{}",
        client_toml("reporting-job", "")
    );
    let proxy = Proxy::start(&config);
    assert_eq!(get_with_key(&proxy, "/api/v2/users/me").await.status(), 200);
    let status: serde_json::Value =
        serde_json::from_str(&admin_text(&proxy, "/status.json").await).unwrap();
    let u = &status["upstreams"][0];
    assert_eq!(u["secret_in_use"], "next", "{u}");
    assert_eq!(u["auth_method"], "client_secret_basic");
    let page = admin_text(&proxy, "/").await;
    assert!(
        page.contains("secret in use: <span class=\"secret-in-use\">next</span>"),
        "{page}"
    );
    for text in [&status.to_string(), &page, &proxy.output.text()] {
        assert!(!text.contains(old) && !text.contains(CLIENT_SECRET));
    }
}

/// What a test token endpoint saw, and the tokens it issued.
#[derive(Default)]
struct Issuer {
    assertions: Mutex<Vec<String>>,
    jtis: Mutex<HashSet<String>>,
    tokens: Mutex<HashSet<String>>,
    grants: AtomicU64,
}

fn json_answer(status: u16, body: serde_json::Value) -> Response<tokengate::http::body::ProxyBody> {
    let mut r = Response::new(tokengate::http::body::full(body.to_string()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn refusal(why: &str) -> Response<tokengate::http::body::ProxyBody> {
    json_answer(
        401,
        serde_json::json!({"error": "invalid_client", "error_description": why}),
    )
}

impl Issuer {
    fn grant(&self) -> Response<tokengate::http::body::ProxyBody> {
        let n = self.grants.fetch_add(1, Ordering::SeqCst);
        let token = format!("issued-{n}-{}", hex::encode(rand::random::<[u8; 8]>()));
        self.tokens.lock().unwrap().insert(token.clone());
        json_answer(
            200,
            serde_json::json!({"access_token": token, "token_type": "Bearer", "expires_in": 3600}),
        )
    }

    /// RFC 7523 §3: a signature by the client's key, `iss` = `sub` = the client, `aud` this
    /// endpoint, an `exp` ahead, and a `jti` never seen before.
    fn verify_assertion(
        &self,
        form: &std::collections::HashMap<String, String>,
        key: &jsonwebtoken::DecodingKey,
        alg: jsonwebtoken::Algorithm,
        aud: &str,
    ) -> Result<(), String> {
        if form.get("client_assertion_type").map(String::as_str)
            != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
        {
            return Err("no jwt-bearer client assertion".into());
        }
        let jwt = form.get("client_assertion").ok_or("no client_assertion")?;
        self.assertions.lock().unwrap().push(jwt.clone());
        let mut v = jsonwebtoken::Validation::new(alg);
        v.set_audience(&[aud]);
        v.set_issuer(&["jwt-client"]);
        v.set_required_spec_claims(&["exp", "iat", "aud", "iss", "sub", "jti"]);
        let data =
            jsonwebtoken::decode::<serde_json::Value>(jwt, key, &v).map_err(|e| e.to_string())?;
        let c = data.claims;
        if c["sub"] != "jwt-client" || data.header.kid.as_deref() != Some("key-2026") {
            return Err("wrong sub or kid".into());
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        if c["exp"].as_u64().unwrap_or(0) > now + 300 {
            return Err("exp too far ahead".into());
        }
        let jti = c["jti"].as_str().ok_or("no jti")?.to_string();
        if !self.jtis.lock().unwrap().insert(jti) {
            return Err("this assertion's jti was used before".into());
        }
        Ok(())
    }

    /// An API host that accepts the tokens this endpoint issued.
    async fn api(self: &Arc<Self>) -> Served {
        let me = Arc::clone(self);
        serve_service(tower::service_fn(move |req: Request<Incoming>| {
            let me = Arc::clone(&me);
            async move {
                let bearer = req
                    .headers()
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::to_string);
                let known = bearer.is_some_and(|b| me.tokens.lock().unwrap().contains(&b));
                Ok::<_, std::convert::Infallible>(if known {
                    json_answer(200, serde_json::json!({"id": "me"}))
                } else {
                    json_answer(401, serde_json::json!({"code": "bad.credentials"}))
                })
            }
        }))
        .await
    }
}

async fn form_of(req: Request<Incoming>) -> std::collections::HashMap<String, String> {
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    form_urlencoded::parse(&body).into_owned().collect()
}

/// An RSA key (PKCS#8 PEM) and its public key (SPKI PEM).
fn rsa_key() -> (String, String) {
    use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).unwrap();
    (
        key.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
        key.to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .unwrap(),
    )
}

/// A P-256 key (PKCS#8 PEM) and its public key (SPKI PEM).
fn ec_key() -> (String, String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    (key.serialize_pem(), key.public_key_pem())
}

#[tokio::test(flavor = "multi_thread")]
async fn private_key_jwt_assertions_are_verified_and_a_replayed_one_is_refused() {
    let (rsa_private, rsa_public) = rsa_key();
    let (ec_private, ec_public) = ec_key();
    for (alg, name, private, public) in [
        (
            jsonwebtoken::Algorithm::RS256,
            "RS256",
            &rsa_private,
            &rsa_public,
        ),
        (
            jsonwebtoken::Algorithm::PS256,
            "PS256",
            &rsa_private,
            &rsa_public,
        ),
        (
            jsonwebtoken::Algorithm::ES256,
            "ES256",
            &ec_private,
            &ec_public,
        ),
    ] {
        let issuer = Arc::new(Issuer::default());
        let key = match alg {
            jsonwebtoken::Algorithm::ES256 => {
                jsonwebtoken::DecodingKey::from_ec_pem(public.as_bytes())
            }
            _ => jsonwebtoken::DecodingKey::from_rsa_pem(public.as_bytes()),
        }
        .unwrap();
        let (me, key) = (Arc::clone(&issuer), Arc::new(key));
        let endpoint_url = Arc::new(Mutex::new(String::new()));
        let url = Arc::clone(&endpoint_url);
        let token_server = serve_service(tower::service_fn(move |req: Request<Incoming>| {
            let (me, key, url) = (Arc::clone(&me), Arc::clone(&key), Arc::clone(&url));
            async move {
                let form = form_of(req).await;
                let aud = url.lock().unwrap().clone();
                let answer = match me.verify_assertion(&form, &key, alg, &aud) {
                    Ok(()) if !form.contains_key("client_secret") => me.grant(),
                    Ok(()) => refusal("a secret was sent too"),
                    Err(why) => refusal(&why),
                };
                Ok::<_, std::convert::Infallible>(answer)
            }
        }))
        .await;
        let token_url = format!(
            "http://127.0.0.1:{}/oauth2/v1/token",
            token_server.addr.port()
        );
        *endpoint_url.lock().unwrap() = token_url.clone();
        let api = issuer.api().await;
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("client.key"), private).unwrap();
        let upstream = format!(
            "[[upstream]]\nname = \"idp\"\nprovider = \"oauth2\"\ntoken_url = \"{token_url}\"\nbase_url = \"http://{}\"\nclient_id = \"jwt-client\"\nauth_method = \"private_key_jwt\"\nprivate_key_file = \"{}\"\nsigning_alg = \"{name}\"\nkey_id = \"key-2026\"\n",
            api.addr,
            dir.path().join("client.key").display()
        );
        let proxy = Proxy::start(&format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n{upstream}{}",
            client_toml("reporting-job", "")
        ));
        let r = get_with_key(&proxy, "/anything").await;
        assert_eq!(r.status(), 200, "{name}: {}", proxy.output.text());
        // A second grant (check, another process) signs a new assertion.
        let d = check(upstream.clone(), vec![], vec![]).await;
        assert_eq!(d["ok"], true, "{name}: {d}");
        assert_eq!(d["auth_method"], "private_key_jwt");
        assert_eq!(issuer.grants.load(Ordering::SeqCst), 2, "{name}");
        // The first assertion, sent again, is refused.
        let first = issuer.assertions.lock().unwrap()[0].clone();
        let replay = client()
            .post(&token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", "jwt-client"),
                (
                    "client_assertion_type",
                    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                ),
                ("client_assertion", first.as_str()),
            ])
            .send()
            .await
            .unwrap();
        assert_eq!(replay.status(), 401, "{name}");
        assert!(replay.text().await.unwrap().contains("used before"));
        assert_eq!(issuer.grants.load(Ordering::SeqCst), 2);
        assert!(!proxy.output.text().contains(&first));
    }
}

/// A token endpoint over TLS that grants to the client whose certificate names the
/// registered subject (RFC 8705 §2.1), with only `client_id` in the form.
async fn mtls_token_endpoint(pki: &Pki, issuer: Arc<Issuer>) -> Served {
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config(true));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (acceptor, issuer) = (acceptor.clone(), Arc::clone(&issuer));
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else {
                    return;
                };
                let subject = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|c| {
                        let (_, cert) = x509_parser::parse_x509_certificate(c.as_ref()).ok()?;
                        let cn = cert
                            .subject()
                            .iter_common_name()
                            .next()?
                            .as_str()
                            .ok()?
                            .to_string();
                        Some(cn)
                    });
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let (issuer, subject) = (Arc::clone(&issuer), subject.clone());
                    async move {
                        let form = form_of(req).await;
                        let ok = subject.as_deref() == Some("reporting-job")
                            && form.get("client_id").map(String::as_str) == Some("mtls-client")
                            && form.get("grant_type").map(String::as_str)
                                == Some("client_credentials")
                            && !form.contains_key("client_secret");
                        Ok::<_, std::convert::Infallible>(if ok {
                            issuer.grant()
                        } else {
                            refusal("the certificate is not registered for this client")
                        })
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    Served::new(addr, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_client_auth_presents_the_certificate_to_the_token_endpoint_and_the_api_host() {
    let pki = pki();
    let issuer = Arc::new(Issuer::default());
    let token_server = mtls_token_endpoint(&pki, Arc::clone(&issuer)).await;
    // The API host wants the certificate too (mtls_upstream: certificate-bound tokens).
    let api_plain = issuer.api().await;
    let api = tls_front(api_plain.addr, pki.server_config(true)).await;
    let upstream = |client: usize| {
        format!(
            "[[upstream]]\nname = \"idp\"\nprovider = \"oauth2\"\ntoken_url = \"https://127.0.0.1:{}/token\"\nbase_url = \"https://127.0.0.1:{}\"\nclient_id = \"mtls-client\"\nauth_method = \"tls_client_auth\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\nmtls_upstream = true\nca_file = \"{}\"\n",
            token_server.addr.port(),
            api.addr.port(),
            pki.path(&format!("client{client}.pem")),
            pki.path(&format!("client{client}.key")),
            pki.path("ca.pem"),
        )
    };
    let proxy = Proxy::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{}{}",
        upstream(0),
        client_toml("reporting-job", "")
    ));
    let r = get_with_key(&proxy, "/anything").await;
    assert_eq!(r.status(), 200, "{}", proxy.output.text());
    let d = check(upstream(0), vec![], vec![]).await;
    assert_eq!(
        (d["ok"].clone(), d["auth_method"].clone()),
        (true.into(), "tls_client_auth".into()),
        "{d}"
    );
    // Another certificate of the same CA is not the registered one.
    let d = check(upstream(1), vec![], vec![]).await;
    assert_eq!(d["hint"], "invalid_client", "{d}");
    assert!(
        d["message"].as_str().unwrap().contains("certificate"),
        "{d}"
    );
    assert_eq!(issuer.grants.load(Ordering::SeqCst), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_issuer_alone_finds_the_token_endpoint() {
    let sandbox = sandbox().await;
    // An authorization server with a path in its issuer: RFC 8414 puts the well-known
    // segment before the path; it has no OpenID configuration.
    let token_url = sandbox.token_url();
    let looked = Arc::new(Mutex::new(Vec::new()));
    let seen = Arc::clone(&looked);
    let metadata = serve_service(tower::service_fn(move |req: Request<Incoming>| {
        let (token_url, seen) = (token_url.clone(), Arc::clone(&seen));
        async move {
            seen.lock().unwrap().push(req.uri().path().to_string());
            Ok::<_, std::convert::Infallible>(
                if req.uri().path() == "/.well-known/oauth-authorization-server/tenant-7" {
                    json_answer(
                        200,
                        serde_json::json!({"issuer": "x", "token_endpoint": token_url}),
                    )
                } else {
                    json_answer(404, serde_json::json!({"error": "not_found"}))
                },
            )
        }
    }))
    .await;
    let upstream = format!(
        "[[upstream]]\nname = \"idp\"\nprovider = \"oauth2\"\nissuer = \"http://{}/tenant-7\"\nbase_url = \"{}\"\nclient_id = \"sandbox-client\"\nclient_secret = \"${{SANDBOX_SECRET}}\"\nbasic_encoding = \"raw\"\n",
        metadata.addr,
        sandbox.api_url()
    );
    let proxy = Proxy::start(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{upstream}{}",
        client_toml("reporting-job", "")
    ));
    let r = get_with_key(&proxy, "/api/v2/users/me").await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(
        *looked.lock().unwrap(),
        [
            "/tenant-7/.well-known/openid-configuration",
            "/.well-known/oauth-authorization-server/tenant-7"
        ]
    );
    let d = check(
        upstream,
        vec![("SANDBOX_SECRET".into(), CLIENT_SECRET.into())],
        vec![CLIENT_SECRET.into()],
    )
    .await;
    assert_eq!(d["ok"], true, "{d}");
    assert_eq!(d["token_url"], sandbox.token_url());
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs tinyproxy (scripts/test.sh installs it)"]
async fn an_egress_proxy_refusing_an_http_token_url_is_named_as_the_cause() {
    let sandbox = sandbox().await;
    let tinyproxy = Tinyproxy::start();
    let wrong = "not-the-proxy-password";
    // The sandbox's login host is plain http: the proxy forwards the request itself (no
    // tunnel), and refuses it.
    let refused = check(
        format!(
            "[server]\negress_proxy = \"{}\"\n{}",
            tinyproxy.url_with_password(wrong),
            upstream_toml(&sandbox, "genesys", "/")
        ),
        vec![("SANDBOX_SECRET".to_string(), CLIENT_SECRET.to_string())],
        vec![CLIENT_SECRET.into(), wrong.into()],
    )
    .await;
    assert_eq!(refused["ok"], false);
    assert_eq!(refused["hint"], "egress_proxy_refused", "{refused}");
    let message = refused["message"].as_str().unwrap();
    assert!(message.contains("password"), "{refused}");
    assert_eq!(sandbox.grants(), 0, "the token endpoint was never reached");
}
