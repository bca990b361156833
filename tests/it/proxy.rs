//! The core proxy over real loopback HTTP: the `tokengate` binary in front of the sandbox.

use std::time::Duration;

use crate::support::*;
use sha2::{Digest, Sha256};

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_reaches_the_api_with_a_real_token_and_without_the_callers_key() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    let resp = client()
        .get(proxy.url("/api/v2/conversations?pageSize=5"))
        .header("Authorization", bearer(CLIENT_KEY))
        .header("X-Api-Key", CLIENT_KEY)
        .header("Connection", "x-hop")
        .header("x-hop", "1")
        .header("x-app", "legacy")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = sandbox.seen();
    assert_eq!(seen.len(), 1);
    let req = &seen[0];
    assert_eq!(req.path, "/api/v2/conversations");
    assert_eq!(req.query.as_deref(), Some("pageSize=5"));
    let auth = req.headers.get("authorization").expect("a bearer token");
    assert!(
        sandbox.issued(auth),
        "the upstream got a token the sandbox issued"
    );
    for (name, value) in &req.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        assert!(
            !value.contains(CLIENT_KEY),
            "the client key reached the upstream in {name}"
        );
    }
    assert!(req.headers.get("x-api-key").is_none());
    assert!(
        req.headers.get("x-hop").is_none(),
        "a Connection-named header was forwarded"
    );
    assert_eq!(req.headers.get("x-app").unwrap(), "legacy");
    assert_eq!(
        req.headers.get("host").unwrap().to_str().unwrap(),
        sandbox.api_addr.to_string()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn four_hundred_concurrent_calls_on_a_cold_cache_cost_one_grant() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, "prefetch_tokens = false"));
    assert_eq!(sandbox.grant_requests(), 0, "the cache starts cold");
    let client = client();
    let calls = (0..400).map(|i| {
        let req = client
            .get(proxy.url(&format!("/api/v2/users/{i}")))
            .header("Authorization", bearer(CLIENT_KEY))
            .send();
        async move { req.await.map(|r| r.status().as_u16()) }
    });
    let statuses = futures_util::future::join_all(calls).await;
    let ok = statuses.iter().filter(|s| matches!(s, Ok(200))).count();
    assert_eq!(ok, 400, "{statuses:?}");
    assert_eq!(sandbox.grant_requests(), 1);
    assert_eq!(sandbox.grants(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_of_two_seconds_are_renewed_with_no_failed_call_across_three_lifetimes() {
    let sandbox = Sandbox::start(SandboxOptions {
        token_lifetime: Duration::from_secs(2),
        ..sandbox_options()
    })
    .await
    .unwrap();
    // No background refresher: renewal ahead of expiry must come from the request path.
    let proxy = Proxy::start(&standard_config(&sandbox, "prefetch_tokens = false"));
    let client = client();
    let mut calls = 0u64;
    // Three lifetimes are over once the fourth token is issued (and used).
    while sandbox.grants() < 4 || calls < 50 {
        let workers = (0..4).map(|_| {
            client
                .get(proxy.url("/api/v2/users/me"))
                .header("Authorization", bearer(CLIENT_KEY))
                .send()
        });
        for r in futures_util::future::join_all(workers).await {
            assert_eq!(
                r.unwrap().status(),
                200,
                "a call failed after {calls} calls"
            );
            calls += 1;
        }
        assert!(calls < 200_000, "tokens were not renewed");
    }
    assert_eq!(sandbox.api_401s(), 0, "a token was used after it expired");
    assert!(
        sandbox.grants() <= 6,
        "too many grants: {}",
        sandbox.grants()
    );
}

/// Warm the cache with one call and return the client.
async fn warmed(proxy: &Proxy, sandbox: &Sandbox) -> reqwest::Client {
    let client = client();
    let r = client
        .get(proxy.url("/api/v2/users/me"))
        .header("Authorization", bearer(CLIENT_KEY))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sandbox.grants(), 1);
    idle_question_asked(sandbox).await;
    client
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_token_costs_one_fresh_grant_and_the_body_arrives_intact_on_the_retry() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    let client = warmed(&proxy, &sandbox).await;
    sandbox.revoke_all();
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
    let resp = client
        .post(proxy.url("/api/v2/analytics/conversations/details/query"))
        .header("Authorization", bearer(CLIENT_KEY))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(answer["body_bytes"], 200_000);
    assert_eq!(answer["body_sha256"], hex::encode(Sha256::digest(&body)));
    assert_eq!(
        sandbox.api_401s(),
        2,
        "one 401 for the revoked token, one for the question about it"
    );
    assert_eq!(sandbox.grants(), 2, "one fresh grant");
    let metrics = admin_text(&proxy, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "tokengate_retries_total",
            &["reason=\"unauthorized\""]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_401_for_a_token_the_platform_still_accepts_goes_back_to_the_caller_unchanged() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    let client = warmed(&proxy, &sandbox).await;
    let resp = client
        .get(proxy.url("/api/v2/sandbox/always401"))
        .header("Authorization", bearer(CLIENT_KEY))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(
        resp.headers().contains_key("inin-correlation-id"),
        "the upstream's answer"
    );
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["code"], "bad.credentials");
    assert_eq!(body["status"], 401);
    assert_eq!(sandbox.api_401s(), 1, "the token is good: not sent again");
    assert_eq!(
        sandbox.token_checks(),
        1,
        "the platform was asked about the token"
    );
    assert_eq!(sandbox.grants(), 1, "and no token minted");
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_calls_meeting_one_revoked_token_cost_exactly_one_fresh_grant() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    let client = warmed(&proxy, &sandbox).await;
    // The sandbox holds its 401s until all 50 calls have met one.
    sandbox.revoke_all_and_hold_401s(50);
    let calls = (0..50).map(|i| {
        client
            .put(proxy.url(&format!("/api/v2/users/{i}")))
            .header("Authorization", bearer(CLIENT_KEY))
            .body(format!("{{\"n\":{i}}}"))
            .send()
    });
    for r in futures_util::future::join_all(calls).await {
        assert_eq!(r.unwrap().status(), 200);
    }
    assert_eq!(
        sandbox.api_401s(),
        51,
        "every call met the revoked token, and so did the one question about it"
    );
    assert_eq!(sandbox.grants(), 2, "the revoked token was replaced once");
}

#[tokio::test(flavor = "multi_thread")]
async fn large_bodies_stream_both_ways_in_little_memory() {
    const SIZE: u64 = 200 * 1024 * 1024;
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, "max_body_bytes = 1073741824"));
    let client = warmed(&proxy, &sandbox).await;

    // Download: every byte checked against the sandbox's pattern as it arrives.
    let mut resp = client
        .get(proxy.url(&format!("/api/v2/sandbox/bytes?n={SIZE}")))
        .header("Authorization", bearer(CLIENT_KEY))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut got = 0u64;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        for (i, b) in chunk.iter().enumerate() {
            assert_eq!(
                *b,
                tokengate_sandbox::pattern_byte(got + i as u64),
                "byte {}",
                got + i as u64
            );
        }
        got += chunk.len() as u64;
    }
    assert_eq!(got, SIZE);

    // Upload: a streamed body of unknown length, hashed on both sides.
    let chunk = bytes::Bytes::from(vec![0x5a_u8; 1024 * 1024]);
    let mut expected = Sha256::new();
    for _ in 0..200 {
        expected.update(&chunk);
    }
    let stream =
        futures_util::stream::iter((0..200).map(move |_| Ok::<_, std::io::Error>(chunk.clone())));
    let resp = client
        .post(proxy.url("/api/v2/recordings/upload"))
        .header("Authorization", bearer(CLIENT_KEY))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(answer["body_bytes"], SIZE);
    assert_eq!(answer["body_sha256"], hex::encode(expected.finalize()));

    let peak = proxy.peak_rss();
    eprintln!(
        "proxy peak RSS after 200 MB each way: {:.1} MiB",
        peak as f64 / 1048576.0
    );
    assert!(
        peak < 64 * 1024 * 1024,
        "peak RSS {} MiB",
        peak / (1024 * 1024)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_a_call_in_flight_finish_then_exits_zero() {
    let sandbox = sandbox().await;
    let mut proxy = Proxy::start(&standard_config(&sandbox, ""));
    let client = warmed(&proxy, &sandbox).await;
    let before = sandbox.api_calls();
    let call = tokio::spawn(
        client
            .get(proxy.url("/api/v2/sandbox/gate"))
            .header("Authorization", bearer(CLIENT_KEY))
            .send(),
    );
    wait_for(Duration::from_secs(10), || {
        (sandbox.api_calls() > before).then_some(())
    })
    .await
    .expect("the call reaches the API host");
    proxy.signal("TERM");
    // The listener closes: a new connection is refused while the old call is still open.
    let addr = proxy.addr.clone();
    wait_for(Duration::from_secs(10), || {
        std::net::TcpStream::connect(&addr).is_err().then_some(())
    })
    .await
    .expect("the listener closes on SIGTERM");
    sandbox.open_gate();
    let resp = call.await.unwrap().unwrap();
    assert_eq!(resp.status(), 200);
    let status = tokio::task::spawn_blocking(move || proxy.wait_exit())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_does_not_wait_for_connections_that_have_sent_nothing() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    warmed(&proxy, &sandbox).await;
    // Connections a caller opened ahead of time and has not used: nothing to drain.
    proxy.terminate_with_silent_connections(3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_endpoints_report_health_readiness_and_metrics() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    let client = client();
    assert_eq!(
        client
            .get(proxy.admin_url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // Tokens are fetched at start: readiness follows without any call. The sandbox counts a
    // grant when it is asked, a moment before the proxy holds the answer, so readiness is
    // polled until it turns (or 10 s pass), not read once after the count moves.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut status = 0;
    while std::time::Instant::now() < deadline {
        let r = client.get(proxy.admin_url("/readyz")).send().await.unwrap();
        status = r.status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(status, 200, "/readyz never turned ready");
    assert_eq!(sandbox.grants(), 1, "readiness took exactly one grant");
    client
        .get(proxy.url("/api/v2/users/me"))
        .header("Authorization", bearer(CLIENT_KEY))
        .send()
        .await
        .unwrap();
    let text = admin_text(&proxy, "/metrics").await;
    assert_eq!(
        metric(
            &text,
            "tokengate_requests_total",
            &["upstream=\"genesys\"", "status=\"200\""]
        ),
        1.0
    );
    assert_eq!(
        metric(&text, "tokengate_token_grants_total", &["outcome=\"ok\""]),
        1.0
    );
    assert!(
        text.contains("tokengate_request_duration_seconds_bucket"),
        "{text}"
    );
    assert!(text.contains("# TYPE tokengate_retries counter"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sixty_second_long_poll_answered_304_reaches_the_app_with_the_default_config() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    let started = std::time::Instant::now();
    // The tests' usual client gives up after 60 s: this one waits as an app's long poll does.
    let patient = reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .unwrap();
    let r = patient
        .get(proxy.url("/services/v27.0/agent-sessions/7e4c1b9a/get-next-event?timeout=60"))
        .header("X-Api-Key", CLIENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304, "{:?}", r.headers());
    assert!(started.elapsed() >= Duration::from_secs(60));
    assert!(
        r.headers().get("content-type").is_none(),
        "no body invented"
    );
    assert!(r.bytes().await.unwrap().is_empty());
}
