//! The platform's other shared limits (issue 25): routes with limits of their own below
//! the token's budget, each app told its share of the budget, the org's idle timeout.

use std::time::Duration;

use crate::support::*;

/// A sandbox whose tokens may make `calls` per `window_secs`, and whose `route` allows
/// `route_calls` per window over the org.
async fn limited_sandbox(calls: u64, window_secs: u64, route: Option<(&str, u64)>) -> Sandbox {
    Sandbox::start(SandboxOptions {
        per_token_limit: Some(calls),
        limit_window: Duration::from_secs(window_secs),
        route_limit: route.map(|(r, n)| (r.to_string(), n)),
        ..sandbox_options()
    })
    .await
    .unwrap()
}

/// `n` concurrent calls of `method` on `path`: how many got each (status, error code).
async fn burst(proxy: &Proxy, method: http::Method, path: &str, n: usize) -> Vec<(u16, String)> {
    let calls = (0..n).map(|_| {
        let req = client()
            .request(method.clone(), proxy.url(path))
            .header("X-Api-Key", CLIENT_KEY)
            .body("{}");
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let body: serde_json::Value = r.json().await.unwrap_or_default();
            (status, body["error"].as_str().unwrap_or("").to_string())
        }
    });
    futures_util::future::join_all(calls).await
}

fn count(results: &[(u16, String)], status: u16, error: &str) -> usize {
    results
        .iter()
        .filter(|(s, e)| *s == status && e == error)
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_route_limit_holds_its_route_and_leaves_the_token_budget_to_the_others() {
    const IVR: &str = "/api/v2/architect/ivrs/3f1c";
    let sandbox = limited_sandbox(60, 10, Some(("PUT /api/v2/architect/ivrs/", 10))).await;
    let proxy = Proxy::start(&config_with(
        &sandbox,
        "",
        "rate_limit_max_wait_secs = 2\n[[upstream.route_limit]]\nroute = \"PUT /api/v2/architect/ivrs/*\"\nrate = \"10/10s\"\n",
    ));
    // A burst of 40 on the limited route: 10 reach the platform, the rest are answered
    // by the proxy, and the platform answers no 429.
    let ivr = burst(&proxy, http::Method::PUT, IVR, 40).await;
    assert_eq!(count(&ivr, 200, ""), 10, "{ivr:?}");
    assert_eq!(count(&ivr, 429, "rate_limited"), 30, "{ivr:?}");
    assert_eq!(sandbox.throttled(), 0);
    // Other routes keep the token's budget: 40 more in the same window all pass.
    let users = burst(&proxy, http::Method::GET, "/api/v2/users/me", 40).await;
    assert_eq!(count(&users, 200, ""), 40, "{users:?}");
    assert_eq!(sandbox.throttled(), 0);
}

const KEY_B: &str = "tg_second-client-key-abcdefghijklmnopqrstuvwxyz";

/// The usual client and a second one, `b`, both of share 1, on `sandbox`.
fn two_clients(sandbox: &Sandbox, upstream_extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{}{upstream_extra}\n{}\n[[client]]\nname = \"b\"\nkey_sha256 = \"{}\"\n",
        upstream_toml(sandbox, "genesys", "/"),
        client_toml("reporting-job", ""),
        tokengate::front::keys::hash_key(KEY_B),
    )
}

/// One call with `key`: its status and its `RateLimit-Limit`, `-Remaining`, `-Reset`.
async fn call_as(proxy: &Proxy, key: &str) -> (u16, Option<u64>, Option<u64>, Option<u64>) {
    let r = client()
        .get(proxy.url("/api/v2/users/me"))
        .header("X-Api-Key", key)
        .send()
        .await
        .unwrap();
    let number = |name: &str| {
        r.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
    };
    (
        r.status().as_u16(),
        number("ratelimit-limit"),
        number("ratelimit-remaining"),
        number("ratelimit-reset"),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn each_app_is_told_its_share_and_the_governor_holds_it_to_exactly_that() {
    // 20 calls per 4 s window, learned from the platform's headers; two clients of
    // share 1: each may make 10 a window while both call.
    let sandbox = limited_sandbox(20, 4, None).await;
    let proxy = Proxy::start(&two_clients(&sandbox, "rate_limit_max_wait_secs = 0"));
    assert_eq!(call_as(&proxy, KEY_B).await.0, 200);

    // Its remainder falls with its own calls, and spending exactly that is served.
    let (status, limit, remaining, _) = call_as(&proxy, CLIENT_KEY).await;
    assert_eq!((status, limit), (200, Some(10)));
    let mut remaining = remaining.unwrap();
    assert_eq!(remaining, 9);
    while remaining > 0 {
        let (status, limit, now, _) = call_as(&proxy, CLIENT_KEY).await;
        assert_eq!((status, limit), (200, Some(10)));
        assert_eq!(now, Some(remaining - 1));
        remaining -= 1;
    }
    // The next call is not: the proxy answers 429 itself (no wait configured).
    let (status, _, remaining, reset) = call_as(&proxy, CLIENT_KEY).await;
    assert_eq!((status, remaining), (429, Some(0)));
    let reset = Duration::from_secs(reset.unwrap());
    assert!(reset <= Duration::from_secs(6), "{reset:?}");

    // With the window, the share comes back whole (b keeps calling, so it is still a
    // share of two).
    let asked = std::time::Instant::now();
    let fresh = wait_for_async(Duration::from_secs(10), || async {
        call_as(&proxy, KEY_B).await;
        let (status, limit, remaining, _) = call_as(&proxy, CLIENT_KEY).await;
        (status == 200).then_some((limit, remaining))
    })
    .await
    .expect("the share comes back with the window");
    assert_eq!(fresh, (Some(10), Some(9)));
    assert!(
        asked.elapsed() <= reset + Duration::from_secs(1),
        "{:?}",
        asked.elapsed()
    );
    assert_eq!(sandbox.throttled(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_that_idled_is_replaced_before_a_call_and_check_leaves_the_idle_clock_alone() {
    let sandbox = Sandbox::start(SandboxOptions {
        idle_timeout: Some(Duration::from_secs(5)),
        ..sandbox_options()
    })
    .await
    .unwrap();
    let config = standard_config(&sandbox, "");
    let proxy = Proxy::start(&config);
    assert_eq!(get_with_key(&proxy, "/api/v2/users/me").await.status(), 200);
    // The proxy asks the platform for the org's idle timeout with its new token.
    let learned = wait_for_async(Duration::from_secs(10), || async {
        let status: serde_json::Value =
            serde_json::from_str(&admin_text(&proxy, "/status.json").await).ok()?;
        status["upstreams"][0]["token"]["idle_timeout_secs"].as_u64()
    })
    .await;
    assert_eq!(learned, Some(5));

    // `check` asks about its token with preserveIdleTTL=true: no idle clock starts again.
    let resets = sandbox.idle_resets();
    let (_dir, path) = write_config(&config);
    let out = tokio::task::spawn_blocking(move || {
        binary()
            .args(["check", "-c", path.to_str().unwrap()])
            .env("SANDBOX_SECRET", CLIENT_SECRET)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(sandbox.idle_resets(), resets);

    // A quiet spell past the timeout: the first token idles out on the platform...
    let idled = wait_for(Duration::from_secs(15), || {
        (sandbox.idled_tokens() >= 1).then_some(())
    })
    .await;
    assert!(idled.is_some());
    // ...and the next call goes with a fresh token: the platform sees no idled one.
    assert_eq!(get_with_key(&proxy, "/api/v2/users/me").await.status(), 200);
    assert_eq!(sandbox.idled_calls(), 0);
    assert!(sandbox.grants() >= 3, "the proxy's two and check's one");
}
