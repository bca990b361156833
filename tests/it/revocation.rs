//! Revocations as the platform makes them, again and again, and 401s the token did not
//! cause: a dead token is always replaced, a good one never (issue 22).

use sha2::{Digest, Sha256};

use crate::support::*;

fn bearer() -> String {
    format!("Bearer {CLIENT_KEY}")
}

/// The proxy in front of `sandbox`, its first token already minted.
async fn warmed(sandbox: &Sandbox, config: &str) -> (Proxy, reqwest::Client) {
    let proxy = Proxy::start(config);
    let client = client();
    let r = client
        .get(proxy.url("/api/v2/users/me"))
        .header("Authorization", bearer())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(sandbox.grants(), 1);
    if config.contains("provider = \"genesys\"") {
        idle_question_asked(sandbox).await;
    }
    (proxy, client)
}

/// A generic OAuth server (Basic credentials form-encoded first, RFC 6749 §2.3.1) and the
/// usual config with it as a `provider = "oauth2"` upstream, plus the lines `extra` gives.
async fn oauth2(extra: impl FnOnce(&Sandbox) -> String) -> (Sandbox, String) {
    let sandbox = Sandbox::start(SandboxOptions {
        basic_form_encoded: true,
        ..sandbox_options()
    })
    .await
    .unwrap();
    let config = standard_config(&sandbox, "").replace(
        "provider = \"genesys\"\nregion = \"us_east_1\"\n",
        &format!("provider = \"oauth2\"\n{}", extra(&sandbox)),
    );
    assert!(config.contains("provider = \"oauth2\""));
    (sandbox, config)
}

async fn status(client: &reqwest::Client, proxy: &Proxy, path: &str) -> u16 {
    client
        .get(proxy.url(path))
        .header("Authorization", bearer())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn revocations_in_a_row_are_each_recovered_by_the_next_call() {
    let sandbox = sandbox().await;
    let (proxy, client) = warmed(&sandbox, &standard_config(&sandbox, "")).await;
    for n in 1..=3 {
        sandbox.revoke_all();
        assert_eq!(
            status(&client, &proxy, "/api/v2/users/me").await,
            200,
            "after revocation {n}"
        );
        assert_eq!(sandbox.grants(), 1 + n, "one grant per revocation");
    }
    // A 401 the token did not cause goes back as it came, and costs no grant...
    assert_eq!(
        status(&client, &proxy, "/api/v2/sandbox/always401").await,
        401
    );
    assert_eq!(sandbox.grants(), 4);
    // ...nor keeps a dead token: a revocation right after it is recovered.
    sandbox.revoke_all();
    assert_eq!(status(&client, &proxy, "/api/v2/users/me").await, 200);
    assert_eq!(sandbox.grants(), 5);
    // And a large POST after yet another revocation arrives intact on its second attempt.
    sandbox.revoke_all();
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let resp = client
        .post(proxy.url("/api/v2/analytics/conversations/details/query"))
        .header("Authorization", bearer())
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let answer: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(answer["body_bytes"], 200_000);
    assert_eq!(answer["body_sha256"], hex::encode(Sha256::digest(&body)));
    assert_eq!(sandbox.grants(), 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_calls_meeting_a_second_revocation_all_succeed_on_one_grant() {
    let sandbox = sandbox().await;
    let (proxy, client) = warmed(&sandbox, &standard_config(&sandbox, "")).await;
    sandbox.revoke_all();
    assert_eq!(status(&client, &proxy, "/api/v2/users/me").await, 200);
    assert_eq!(sandbox.grants(), 2);
    // The replacement is revoked too, seconds (here: milliseconds) after it was minted.
    sandbox.revoke_all_and_hold_401s(50);
    let calls = (0..50).map(|i| {
        client
            .put(proxy.url(&format!("/api/v2/users/{i}")))
            .header("Authorization", bearer())
            .body(format!("{{\"n\":{i}}}"))
            .send()
    });
    for r in futures_util::future::join_all(calls).await {
        assert_eq!(r.unwrap().status(), 200);
    }
    assert_eq!(sandbox.grants(), 3, "the second revocation cost one grant");
}

/// 300 calls the platform refuses although the token is good, beside 100 good calls, 20
/// at a time: what the caller gets, and how many grants it cost.
async fn refused_beside_good(proxy: &Proxy, client: &reqwest::Client) -> (Vec<u16>, Vec<u16>) {
    use futures_util::StreamExt;
    let paths = (0..400).map(|i| {
        if i % 4 == 3 {
            "/api/v2/users/me"
        } else {
            "/api/v2/sandbox/always401"
        }
    });
    let answers: Vec<(&str, u16)> = futures_util::stream::iter(paths)
        .map(|path| async move { (path, status(client, proxy, path).await) })
        .buffer_unordered(20)
        .collect()
        .await;
    let of = |p: &str| {
        answers
            .iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, s)| *s)
            .collect()
    };
    (of("/api/v2/sandbox/always401"), of("/api/v2/users/me"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_storm_of_401s_for_a_good_token_costs_no_grant_on_genesys() {
    let sandbox = sandbox().await;
    let (proxy, client) = warmed(&sandbox, &standard_config(&sandbox, "")).await;
    let (refused, good) = refused_beside_good(&proxy, &client).await;
    assert_eq!(refused.len(), 300);
    assert!(refused.iter().all(|s| *s == 401), "{refused:?}");
    assert!(good.iter().all(|s| *s == 200), "{good:?}");
    assert_eq!(good.len(), 100);
    assert_eq!(sandbox.grants(), 1, "the good token was kept: no grant");
    // The platform was asked about the token, a bounded number of times.
    assert!(sandbox.token_checks() >= 1);
    assert!(
        sandbox.token_checks() <= 100,
        "{} questions",
        sandbox.token_checks()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_way_to_ask_replacements_are_bounded_by_a_budget() {
    let (sandbox, config) = oauth2(|_| String::new()).await;
    let started = std::time::Instant::now();
    let (proxy, client) = warmed(&sandbox, &config).await;
    let (refused, good) = refused_beside_good(&proxy, &client).await;
    let took = started.elapsed().as_secs_f64();
    assert!(refused.iter().all(|s| *s == 401), "{refused:?}");
    assert!(good.iter().all(|s| *s == 200), "{good:?}");
    let allowed = 1 + 3 + (took / 2.0).floor() as u64 + 1;
    assert!(
        sandbox.grants() <= allowed,
        "{} grants in {took:.1} s",
        sandbox.grants()
    );
    assert_eq!(
        sandbox.token_checks(),
        0,
        "oauth2 has no HEAD /api/v2/tokens/me"
    );
    // And a real revocation is still recovered once the budget has room.
    sandbox.revoke_all();
    let back = wait_for_async(std::time::Duration::from_secs(10), || async {
        (status(&client, &proxy, "/api/v2/users/me").await == 200).then_some(())
    })
    .await;
    assert!(back.is_some(), "a revoked token was never replaced");
}

const OTHER_KEY: &str = "tg_other-client-key-9876543210zyxwvutsrqponm";

/// Two clients: `reporting-job` (CLIENT_KEY, no allow rules) and `wallboard` (OTHER_KEY).
fn two_clients(sandbox: &Sandbox) -> String {
    format!(
        "{}\n[[client]]\nname = \"wallboard\"\nkey_sha256 = \"{}\"\n",
        standard_config(sandbox, ""),
        tokengate::front::keys::hash_key(OTHER_KEY)
    )
}

async fn as_other(client: &reqwest::Client, proxy: &Proxy, path: &str) -> u16 {
    client
        .get(proxy.url(path))
        .header("Authorization", format!("Bearer {OTHER_KEY}"))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn no_client_can_revoke_or_change_the_shared_credentials() {
    let sandbox = sandbox().await;
    let (proxy, client) = warmed(&sandbox, &two_clients(&sandbox)).await;
    let id = sandbox.options().client_id.clone();
    let attacks = [
        ("DELETE", "/api/v2/tokens/me".to_string()),
        ("DELETE", "/api/v2//tokens/%6De/".to_string()),
        ("DELETE", format!("/api/v2/oauth/clients/{id}")),
        ("PUT", format!("/api/v2/oauth/clients/{id}")),
        ("POST", format!("/api/v2/oauth/clients/{id}/secret")),
    ];
    for round in 0..30 {
        let (method, path) = &attacks[round % attacks.len()];
        let refused = client
            .request(method.parse().unwrap(), proxy.url(path))
            .header("Authorization", bearer())
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 403, "{method} {path}");
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["error"], "forbidden");
        assert!(
            body["message"].as_str().unwrap().contains("shared"),
            "{body}"
        );
        assert_eq!(as_other(&client, &proxy, "/api/v2/users/me").await, 200);
    }
    assert_eq!(
        sandbox.tokens_deleted(),
        0,
        "the API host saw no DELETE of the token"
    );
    assert!(
        !sandbox
            .seen()
            .iter()
            .any(|r| r.path.contains("oauth/clients")),
        "the API host saw no change to the OAuth client"
    );
    assert_eq!(sandbox.grants(), 1);
    // Reading the token's description is a caller's right.
    assert_eq!(status(&client, &proxy, "/api/v2/tokens/me").await, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_token_from_the_proxy_is_the_callers_own_to_end() {
    let sandbox = sandbox().await;
    let (proxy, client) = warmed(&sandbox, &two_clients(&sandbox)).await;
    let session = format!(
        "Bearer {}",
        session_token(&proxy, "reporting-job", CLIENT_KEY).await
    );
    let call = |method: reqwest::Method, path: &str| {
        client
            .request(method, proxy.url(path))
            .header("Authorization", &session)
            .send()
    };
    assert_eq!(
        call(reqwest::Method::GET, "/api/v2/users/me")
            .await
            .unwrap()
            .status(),
        200
    );
    let ended = call(reqwest::Method::DELETE, "/api/v2/tokens/me")
        .await
        .unwrap();
    assert_eq!(ended.status(), 204);
    assert_eq!(
        call(reqwest::Method::GET, "/api/v2/users/me")
            .await
            .unwrap()
            .status(),
        401
    );
    // The team's token, and the client's key, live on.
    assert_eq!(status(&client, &proxy, "/api/v2/users/me").await, 200);
    assert_eq!(sandbox.tokens_deleted(), 0);
    assert_eq!(sandbox.grants(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_401_storm_while_the_token_endpoint_is_rate_limited_leaves_the_others_served() {
    let sandbox = sandbox().await;
    let (proxy, client) = warmed(&sandbox, &two_clients(&sandbox)).await;
    sandbox.rate_limit_grants(true);
    let storm = async {
        let mut answers = Vec::new();
        for _ in 0..60 {
            answers.push(status(&client, &proxy, "/api/v2/sandbox/always401").await);
        }
        answers
    };
    let others = async {
        let mut answers = Vec::new();
        for _ in 0..60 {
            answers.push(as_other(&client, &proxy, "/api/v2/users/me").await);
        }
        answers
    };
    let (storm, others) = tokio::join!(storm, others);
    assert!(storm.iter().all(|s| *s == 401), "{storm:?}");
    assert!(others.iter().all(|s| *s == 200), "{others:?}");
    assert_eq!(sandbox.grants(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oauth2_server_with_introspection_is_asked_before_a_token_is_replaced() {
    let (sandbox, config) = oauth2(|s| {
        format!(
            "introspection_url = \"http://{}/oauth/introspect\"\n",
            s.login_addr
        )
    })
    .await;
    let (proxy, client) = warmed(&sandbox, &config).await;
    let (refused, good) = refused_beside_good(&proxy, &client).await;
    assert!(refused.iter().all(|s| *s == 401), "{refused:?}");
    assert!(good.iter().all(|s| *s == 200), "{good:?}");
    assert_eq!(sandbox.grants(), 1, "the active token was kept");
    assert!(sandbox.introspections() >= 1);
    // Revoked: introspection says inactive, and the next call is served on a new token.
    for n in 0..2 {
        sandbox.revoke_all();
        assert_eq!(
            status(&client, &proxy, "/api/v2/users/me").await,
            200,
            "revocation {n}"
        );
    }
    assert_eq!(sandbox.grants(), 3);
}
