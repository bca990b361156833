//! Outages and changes survived: the token endpoint down, 429s, config reloads.

use std::time::{Duration, Instant};

use crate::support::*;

fn key() -> String {
    format!("Bearer {CLIENT_KEY}")
}

async fn call(proxy: &Proxy, path: &str) -> reqwest::Response {
    get_with_key(proxy, path).await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_token_endpoint_costs_nothing_while_the_token_lives_then_503_fast_then_recovery() {
    let mut sandbox = Sandbox::start(SandboxOptions {
        token_lifetime: Duration::from_secs(3),
        ..sandbox_options()
    })
    .await
    .unwrap();
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    assert_eq!(call(&proxy, "/api/v2/users/me").await.status(), 200);
    sandbox.stop_login().await;
    // The cached token keeps serving until it is no longer usable...
    let mut served = 0;
    let first_503 = loop {
        let started = Instant::now();
        let r = call(&proxy, "/api/v2/users/me").await;
        match r.status().as_u16() {
            200 => served += 1,
            503 => break (r, started.elapsed()),
            other => panic!("unexpected {other}"),
        }
        assert!(served < 1_000_000);
    };
    assert!(served > 0, "calls succeeded while the token lived");
    // ...then callers get a fast 503 token_unavailable with Retry-After, never a hang.
    let (resp, took) = first_503;
    assert!(took < Duration::from_secs(2), "503 took {took:?}");
    assert!(resp.headers().contains_key("retry-after"));
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "token_unavailable");
    assert_eq!(sandbox.api_401s(), 0, "no expired token was sent");
    // The token endpoint returns: the proxy recovers by itself.
    sandbox.start_login().await.unwrap();
    let mut ok = false;
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        if call(&proxy, "/api/v2/users/me").await.status() == 200 {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "the proxy did not recover");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_429_goes_back_with_retry_after_unless_retries_are_on() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    sandbox.throttle_next(1);
    let r = call(&proxy, "/api/v2/users/me").await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers().get("retry-after").unwrap(), "1");

    let retrying = config_with(&sandbox, "", "retry_429 = 2");
    let proxy = Proxy::start(&retrying);
    sandbox.throttle_next(1);
    let r = call(&proxy, "/api/v2/users/me").await;
    assert_eq!(r.status(), 200, "the later 200");
    // Not for a POST: it might not be idempotent.
    sandbox.throttle_next(1);
    let r = client()
        .post(proxy.url("/api/v2/analytics/conversations/details/query"))
        .header("Authorization", key())
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    let metrics = admin_text(&proxy, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "tokengate_retries_total",
            &["reason=\"throttled\""]
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_applies_a_new_config_refuses_a_broken_one_and_drops_no_call() {
    let a = sandbox().await;
    let b = sandbox().await;
    let proxy = Proxy::start(&standard_config(&a, ""));
    assert_eq!(call(&proxy, "/api/v2/first").await.status(), 200);
    assert_eq!(a.seen().len(), 1);
    // A legacy app's session token from the proxy's token endpoint, before the reload.
    let session = session_token(&proxy, "reporting-job", CLIENT_KEY).await;

    // A call in flight on the old config...
    let before = a.api_calls();
    let in_flight = tokio::spawn(
        client()
            .get(proxy.url("/api/v2/sandbox/gate"))
            .header("Authorization", key())
            .send(),
    );
    wait_for(Duration::from_secs(10), || {
        (a.api_calls() > before).then_some(())
    })
    .await
    .unwrap();
    // ...while the upstream changes to another host.
    proxy.rewrite_config(&standard_config(&b, ""));
    proxy.signal("HUP");
    let output = proxy.output.clone();
    wait_for(Duration::from_secs(10), || {
        output.text().contains("config reloaded").then_some(())
    })
    .await
    .expect("the reload is logged");
    assert_eq!(call(&proxy, "/api/v2/second").await.status(), 200);
    assert_eq!(b.seen().len(), 1, "new calls go to the new upstream");
    assert_eq!(b.seen()[0].path, "/api/v2/second");
    let r = client()
        .get(proxy.url("/api/v2/with-session"))
        .bearer_auth(&session)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "sessions survive a reload");
    a.open_gate();
    assert_eq!(
        in_flight.await.unwrap().unwrap().status(),
        200,
        "the call in flight finished"
    );

    // A broken file is refused; the running config keeps serving.
    proxy.rewrite_config("[[upstream]]\nname = \"broken\"\nprovider = \"nope\"\n");
    proxy.signal("HUP");
    wait_for(Duration::from_secs(10), || {
        output
            .text()
            .contains("config reload refused")
            .then_some(())
    })
    .await
    .expect("the refusal is logged");
    assert_eq!(call(&proxy, "/api/v2/third").await.status(), 200);
    assert_eq!(b.seen().len(), 3);
}

/// The API host allows `K` calls per token per window; the proxy keeps `tokens` tokens.
async fn pool_run(tokens: u32) -> (Sandbox, Vec<u16>) {
    const K: u64 = 20;
    let sandbox = Sandbox::start(SandboxOptions {
        per_token_limit: Some(K),
        limit_window: Duration::from_secs(120),
        ..sandbox_options()
    })
    .await
    .unwrap();
    let config = config_with(
        &sandbox,
        "prefetch_tokens = false",
        &format!("tokens = {tokens}"),
    );
    let proxy = Proxy::start(&config);
    let c = client();
    let mut statuses = Vec::new();
    // 3K calls, six at a time, well inside one window.
    for _ in 0..(3 * K / 6) {
        let batch = (0..6).map(|_| {
            c.get(proxy.url("/api/v2/routing/queues"))
                .header("Authorization", key())
                .send()
        });
        for r in futures_util::future::join_all(batch).await {
            statuses.push(r.unwrap().status().as_u16());
        }
    }
    (sandbox, statuses)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pool_of_three_tokens_carries_three_times_one_tokens_limit() {
    let (sandbox, statuses) = pool_run(3).await;
    assert_eq!(statuses.len(), 60);
    // Each token's window also carries the proxy's one question for the org's idle
    // timeout: those calls are the only ones the governor holds back, and the platform
    // refuses none.
    let served = statuses.iter().filter(|s| **s == 200).count() as u64;
    assert_eq!(sandbox.idle_questions(), 3);
    assert_eq!(served + sandbox.idle_questions(), 60, "{statuses:?}");
    assert_eq!(sandbox.throttled(), 0);
    assert_eq!(sandbox.grants(), 3, "one grant per pooled token");
    assert_eq!(
        sandbox.max_grants_in_flight(),
        1,
        "never two grants at once"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_token_alone_hits_the_limit_the_pool_avoids() {
    let (sandbox, statuses) = pool_run(1).await;
    let throttled = statuses.iter().filter(|s| **s == 429).count();
    // 20 fit the token's window; the rest are refused (by the rate governor, which may
    // count a few calls in flight when it first learns the budget, so a few more).
    assert!((40..=46).contains(&throttled), "{statuses:?}");
    assert!(
        sandbox.api_calls() <= 21,
        "{} calls reached the API",
        sandbox.api_calls()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn max_connections_caps_the_calls_in_flight_upstream_and_the_rest_wait_their_turn() {
    let sandbox = sandbox().await;
    // A client alone may hold all but the reserve of three: two.
    let config = config_with(&sandbox, "workers = 1", "max_connections = 3");
    let proxy = Proxy::start(&config);
    // Six calls wait at a gate on the API host; only two may be there at once.
    let calls =
        futures_util::future::join_all((0..6).map(|_| call(&proxy, "/api/v2/sandbox/gate")));
    let mut calls = Box::pin(calls);
    let two_there = tokio::select! {
        _ = &mut calls => panic!("the calls finished before the gate opened"),
        r = wait_for(Duration::from_secs(30), || (sandbox.api_calls() >= 2).then_some(())) => r,
    };
    assert!(two_there.is_some(), "two calls reach the API host");
    sandbox.open_gate();
    let statuses: Vec<u16> = calls.await.iter().map(|r| r.status().as_u16()).collect();
    assert_eq!(statuses, [200; 6], "the waiting calls are served in turn");
    assert_eq!(
        sandbox.max_api_in_flight(),
        2,
        "never more than the client's share of max_connections at once"
    );
}

/// Connections the kernel holds open to `port` on loopback, as seen by the listening side
/// (`/proc/net/tcp`: local port `port`, state ESTABLISHED).
fn connections_accepted_on(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let local_port = fields[1].rsplit(':').next().unwrap();
            u16::from_str_radix(local_port, 16).unwrap() == port && fields[3] == "01"
        })
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn bursts_of_calls_never_leave_more_than_max_connections_open_to_the_api_host() {
    let sandbox = sandbox().await;
    let config = config_with(&sandbox, "workers = 1", "max_connections = 4");
    let proxy = Proxy::start(&config);
    let port = sandbox.api_addr.port();
    for burst in 0..20 {
        let statuses =
            futures_util::future::join_all((0..50).map(|_| call(&proxy, "/api/v2/users/me"))).await;
        assert!(statuses.iter().all(|r| r.status() == 200));
        assert!(
            connections_accepted_on(port) >= 1,
            "calls went over loopback"
        );
        // Connections go back to the pool a moment after their answers: wait for that,
        // then no more than max_connections may stay open (idle ones linger for 90 s).
        let settled = wait_for(Duration::from_secs(5), || {
            (connections_accepted_on(port) <= 4).then_some(())
        })
        .await;
        assert!(
            settled.is_some(),
            "after burst {burst}: {} connections open to the API host; max_connections is 4",
            connections_accepted_on(port)
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_any_keeps_the_proxy_ready_while_one_upstreams_grant_fails() {
    let sandbox = sandbox().await;
    let failing = upstream_toml(&sandbox, "cxone-like", "/other").replace(
        &sandbox.token_url(),
        &format!("http://{}/oauth/token", closed_addr()),
    );
    let config = |ready: &str| {
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{ready}\n{}{failing}{}",
            upstream_toml(&sandbox, "genesys", "/"),
            client_toml("reporting-job", "")
        )
    };
    let status = |proxy: &Proxy, path: &str| {
        let url = proxy.admin_url(path);
        async move { client().get(url).send().await.unwrap().status().as_u16() }
    };
    // The default: every upstream must hold a token.
    let all = Proxy::start(&config(""));
    let good = wait_for_async(Duration::from_secs(20), || async {
        (status(&all, "/readyz/genesys").await == 200).then_some(())
    })
    .await;
    assert!(good.is_some());
    assert_eq!(status(&all, "/readyz").await, 503);
    assert_eq!(status(&all, "/readyz/cxone-like").await, 503);
    assert_eq!(status(&all, "/readyz/nowhere").await, 404);
    drop(all);

    // ready = "any": one good upstream keeps the proxy in the load balancer.
    let any = Proxy::start(&config("ready = \"any\""));
    let ready = wait_for_async(Duration::from_secs(20), || async {
        (status(&any, "/readyz").await == 200).then_some(())
    })
    .await;
    assert!(ready.is_some());
    let body: serde_json::Value = client()
        .get(any.admin_url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(body["failing"], serde_json::json!(["cxone-like"]));
    assert_eq!(status(&any, "/readyz/cxone-like").await, 503);
    assert_eq!(status(&any, "/readyz/genesys").await, 200);
}
