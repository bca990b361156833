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
