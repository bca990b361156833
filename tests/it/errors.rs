//! Every row of the contract's error table, produced over real loopback HTTP, plus the
//! requests a reverse proxy must refuse.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use crate::support::*;

async fn error_of(resp: reqwest::Response) -> (u16, serde_json::Value) {
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(ct, "application/json");
    (status, resp.json().await.unwrap())
}

/// The answer is the contract's JSON error with this status and code.
async fn expect_error(resp: reqwest::Response, status: u16, code: &str) {
    let (got, body) = error_of(resp).await;
    assert_eq!((got, body["error"].as_str()), (status, Some(code)));
}

fn key() -> String {
    format!("Bearer {CLIENT_KEY}")
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_or_wrong_client_key_is_401_unauthorized() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    let c = client();
    let resp = c.get(proxy.url("/api/v2/users/me")).send().await.unwrap();
    assert_eq!(
        resp.headers().get("www-authenticate").unwrap(),
        "Bearer realm=\"tokengate\""
    );
    expect_error(resp, 401, "unauthorized").await;
    let resp = c
        .get(proxy.url("/api/v2/users/me"))
        .header("Authorization", "Bearer not-the-key")
        .send()
        .await
        .unwrap();
    expect_error(resp, 401, "unauthorized").await;
    assert!(sandbox.seen().is_empty(), "nothing was forwarded");
    // The key also works as X-Api-Key.
    let resp = c
        .get(proxy.url("/api/v2/users/me"))
        .header("X-Api-Key", CLIENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_outside_the_clients_policy_is_403_forbidden() {
    let sandbox = sandbox().await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{}{}{}",
        upstream_toml(&sandbox, "genesys", "/"),
        upstream_toml(&sandbox, "other", "/other"),
        client_toml(
            "reporting-job",
            r#"upstreams = ["genesys"]
allow = ["GET /api/v2/analytics/**", "POST /api/v2/analytics/conversations/details/query"]"#
        )
    );
    let proxy = Proxy::start(&config);
    let c = client();
    let get = |path: &str| c.get(proxy.url(path)).header("Authorization", key()).send();
    assert_eq!(
        get("/api/v2/analytics/reporting/exports")
            .await
            .unwrap()
            .status(),
        200
    );
    for path in [
        "/api/v2/users/me",
        "/other/api/v2/analytics/x",
        "/api/v2/analytics/../users",
        "/api/v2/analytics/%2e%2e/users",
        "/api/v2/analytics%2f..%2fusers",
        "/api/v2//analytics/x",
    ] {
        let (status, body) = error_of(get(path).await.unwrap()).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (403, Some("forbidden")),
            "{path}"
        );
    }
    let resp = c
        .delete(proxy.url("/api/v2/analytics/x"))
        .header("Authorization", key())
        .send()
        .await
        .unwrap();
    expect_error(resp, 403, "forbidden").await;
    assert_eq!(
        sandbox.seen().len(),
        1,
        "only the allowed call was forwarded"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_path_no_upstream_serves_is_404_no_route() {
    let sandbox = sandbox().await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n{}{}",
        upstream_toml(&sandbox, "genesys", "/genesys"),
        client_toml("job", "")
    );
    let proxy = Proxy::start(&config);
    for path in ["/api/v2/users/me", "/genesysx/api"] {
        let resp = get_with_key(&proxy, path).await;
        let (status, body) = error_of(resp).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (404, Some("no_route")),
            "{path}"
        );
    }
    let resp = get_with_key(&proxy, "/genesys/api/v2/users/me").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        sandbox.seen().len(),
        0,
        "/users/me is answered without echo"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_over_the_limit_is_413_body_too_large() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, "max_body_bytes = 1000"));
    // A connection whose request body was refused half-read is closed by the proxy
    // (`Connection: close`); a fresh connection per call keeps the test about the proxy.
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    // Declared length over the limit.
    let resp = c
        .post(proxy.url("/api/v2/x"))
        .header("Authorization", key())
        .body(vec![b'a'; 2000])
        .send()
        .await
        .unwrap();
    expect_error(resp, 413, "body_too_large").await;
    // Streamed without a length, crossing the limit on the way.
    let chunks =
        futures_util::stream::iter((0..4).map(|_| Ok::<_, std::io::Error>(vec![b'b'; 400])));
    let resp = c
        .post(proxy.url("/api/v2/x"))
        .header("Authorization", key())
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    expect_error(resp, 413, "body_too_large").await;
    assert!(sandbox.seen().is_empty());
    // Under the limit passes.
    let resp = c
        .post(proxy.url("/api/v2/x"))
        .header("Authorization", key())
        .body(vec![b'a'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_credentials_are_502_token_grant_failed_with_the_grant_error() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start_with_env(
        &standard_config(&sandbox, ""),
        &[("SANDBOX_SECRET", "a-wrong-secret-value")],
    );
    let resp = get_with_key(&proxy, "/api/v2/users/me").await;
    let (status, body) = error_of(resp).await;
    assert_eq!(status, 502);
    assert_eq!(body["error"], "token_grant_failed");
    assert_eq!(body["grant_error"], "invalid_client");
    let text = body.to_string();
    assert!(!text.contains("a-wrong-secret-value") && !text.contains(CLIENT_KEY));
    assert!(
        sandbox.api_calls() == 0,
        "nothing reached the API without a token"
    );
    // A refused grant backs off (1 s, then longer): callers get the same answer fast and
    // the token endpoint is not hammered.
    for _ in 0..20 {
        let resp = get_with_key(&proxy, "/api/v2/users/me").await;
        assert_eq!(resp.status(), 502);
    }
    assert!(
        sandbox.grant_requests() <= 2,
        "{} grant requests",
        sandbox.grant_requests()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_upstream_is_502_upstream_unreachable() {
    let sandbox = sandbox().await;
    let closed = closed_addr();
    let config =
        standard_config(&sandbox, "").replace(&sandbox.api_url(), &format!("http://{closed}"));
    let proxy = Proxy::start(&config);
    let resp = get_with_key(&proxy, "/api/v2/users/me").await;
    expect_error(resp, 502, "upstream_unreachable").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_token_endpoint_is_503_token_unavailable_with_retry_after() {
    let sandbox = sandbox().await;
    let closed = closed_addr();
    let config = standard_config(&sandbox, "").replace(
        &sandbox.token_url(),
        &format!("http://{closed}/oauth/token"),
    );
    let proxy = Proxy::start(&config);
    for _ in 0..2 {
        let resp = get_with_key(&proxy, "/api/v2/users/me").await;
        let retry_after: u64 = resp
            .headers()
            .get("retry-after")
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!((1..=120).contains(&retry_after));
        expect_error(resp, 503, "token_unavailable").await;
    }
    assert_eq!(sandbox.api_calls(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_that_does_not_answer_is_504_upstream_timeout() {
    let sandbox = sandbox().await;
    let config = config_with(&sandbox, "", "timeout_secs = 0.5");
    let proxy = Proxy::start(&config);
    let resp = get_with_key(&proxy, "/api/v2/sandbox/hang").await;
    expect_error(resp, 504, "upstream_timeout").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn request_timeout_bounds_the_whole_call_head_and_body() {
    let sandbox = sandbox().await;
    let config = config_with(&sandbox, "", "timeout_secs = 300\nrequest_timeout_secs = 1");
    let proxy = Proxy::start(&config);
    // Calls within the limit are untouched.
    assert_eq!(get_with_key(&proxy, "/api/v2/users/me").await.status(), 200);
    // No head within the whole-call limit (far shorter than timeout_secs): 504.
    let bounded = std::time::Duration::from_secs(60);
    let resp = tokio::time::timeout(bounded, get_with_key(&proxy, "/api/v2/sandbox/hang"))
        .await
        .expect("the proxy answered");
    expect_error(resp, 504, "upstream_timeout").await;
    // A head, then a body that stalls: the answer is cut off, never left hanging and
    // never made to look complete.
    let resp = get_with_key(&proxy, "/api/v2/sandbox/stall").await;
    assert_eq!(resp.status(), 200);
    let rest = tokio::time::timeout(bounded, resp.bytes())
        .await
        .expect("the body ended");
    assert!(rest.is_err(), "a cut-off body must not read as complete");
    let logged = wait_until(std::time::Duration::from_secs(10), || {
        proxy
            .output
            .text()
            .contains("request_timeout_secs")
            .then_some(())
    });
    assert!(logged.is_some(), "the cut-off is logged");
}

/// Send raw bytes on a fresh connection; return the status line.
fn raw(addr: &str, request: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or("")
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn connect_and_absolute_form_targets_never_reach_another_host() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    let bait = TcpListener::bind("127.0.0.1:0").unwrap();
    bait.set_nonblocking(true).unwrap();
    let bait_addr = bait.local_addr().unwrap();
    let k = CLIENT_KEY;
    let addr = proxy.addr.clone();
    let lines = tokio::task::spawn_blocking(move || {
        vec![
            raw(&addr, &format!("CONNECT {bait_addr} HTTP/1.1\r\nHost: {bait_addr}\r\nAuthorization: Bearer {k}\r\n\r\n")),
            raw(&addr, &format!("GET http://{bait_addr}/api/v2/users/me HTTP/1.1\r\nHost: {bait_addr}\r\nAuthorization: Bearer {k}\r\n\r\n")),
            raw(&addr, &format!("GET /api/v2/x HTTP/1.1\r\nHost: {bait_addr}\r\nAuthorization: Bearer {k}\r\nConnection: close\r\n\r\n")),
        ]
    })
    .await
    .unwrap();
    assert!(lines[0].contains(" 400 "), "{}", lines[0]);
    assert!(lines[1].contains(" 400 "), "{}", lines[1]);
    assert!(
        lines[2].contains(" 200 "),
        "a forged Host still goes to the upstream: {}",
        lines[2]
    );
    assert_eq!(sandbox.seen().len(), 1);
    assert!(bait.accept().is_err(), "the bait port saw a connection");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_endpoint_that_stays_down_is_logged_when_it_fails_not_at_every_attempt() {
    let sandbox = sandbox().await;
    let closed = closed_addr();
    let config = standard_config(&sandbox, "").replace(
        &sandbox.token_url(),
        &format!("http://{closed}/oauth/token"),
    );
    let proxy = Proxy::start(&config);
    // Callers keep coming while the proxy probes the endpoint about once a second: wait
    // for fifteen attempts (the debug log has each).
    let attempts = |text: &str| text.matches("token grant failed").count();
    let probed = wait_for_async(Duration::from_secs(40), || async {
        let _ = get_with_key(&proxy, "/api/v2/users/me").await;
        (attempts(&proxy.output.text()) >= 15).then_some(())
    })
    .await;
    assert!(probed.is_some(), "{}", proxy.output.text());
    let text = proxy.output.text();
    let warnings = text
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("token grant"))
        .count();
    assert_eq!(warnings, 1, "{text}");
}
