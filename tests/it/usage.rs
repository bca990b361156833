//! Usage per app (issue 26): `/usage.json` and `/usage.csv` count each client's calls
//! exactly, by status class, with the proxy's own 429s and the bytes; with two replicas
//! and Redis, the fleet's sum.

use crate::support::redis_server::RedisServer;
use crate::support::*;

const OTHER_KEY: &str = "tg_other-client-key-abcdefghijklmnop0123456789";

/// Two clients: `reporting-job` (only GET /api/v2/users/*) and `wallboard`.
fn two_clients(sandbox: &Sandbox, extra: &str) -> String {
    format!(
        "{}{}\n[[client]]\nname = \"wallboard\"\nkey_sha256 = \"{}\"\n{extra}",
        config_with(sandbox, "", "").replace(
            "[[client]]",
            "[[client]]\nallow = [\"GET /api/v2/users/*\"]"
        ),
        "",
        tokengate::front::keys::hash_key(OTHER_KEY)
    )
}

/// Calls as `key` and what the caller saw: (status, body bytes) per call.
async fn calls(proxy: &Proxy, key: &str, requests: &[(&str, &str, &str)]) -> Vec<(u16, u64)> {
    let c = client();
    let mut seen = Vec::new();
    for (method, path, body) in requests {
        let r = c
            .request(method.parse().unwrap(), proxy.url(path))
            .header("X-Api-Key", key)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let bytes = r.bytes().await.unwrap().len() as u64;
        seen.push((status, bytes));
    }
    seen
}

async fn usage_json(proxy: &Proxy) -> serde_json::Value {
    client()
        .get(proxy.admin_url("/usage.json?since=0"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn row<'a>(doc: &'a serde_json::Value, client: &str) -> &'a serde_json::Value {
    doc["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["client"] == client && r["upstream"] == "genesys")
        .unwrap_or_else(|| panic!("a row for {client}: {doc}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_counts_each_clients_calls_exactly() {
    let sandbox = Sandbox::start(sandbox_options()).await.unwrap();
    let proxy = Proxy::start(&two_clients(&sandbox, ""));
    let a = calls(
        &proxy,
        CLIENT_KEY,
        &[
            ("GET", "/api/v2/users/me", ""),
            ("GET", "/api/v2/users/abc", ""),
            ("GET", "/api/v2/routing/queues", ""),
        ],
    )
    .await;
    assert_eq!(
        a.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        [200, 200, 403]
    );
    let b = calls(
        &proxy,
        OTHER_KEY,
        &[
            ("POST", "/api/v2/conversations", "{\"twelve\":1}"),
            ("GET", "/api/v2/users/me", ""),
        ],
    )
    .await;
    let doc = usage_json(&proxy).await;
    let (ra, rb) = (row(&doc, "reporting-job"), row(&doc, "wallboard"));
    assert_eq!(
        (
            ra["calls"].as_u64(),
            ra["2xx"].as_u64(),
            ra["4xx"].as_u64(),
            ra["5xx"].as_u64()
        ),
        (Some(3), Some(2), Some(1), Some(0)),
        "{doc}"
    );
    assert_eq!(
        ra["bytes_out"].as_u64(),
        Some(a.iter().map(|(_, n)| n).sum()),
        "{doc}"
    );
    assert_eq!(ra["bytes_in"], 0, "{doc}");
    assert_eq!(
        (rb["calls"].as_u64(), rb["2xx"].as_u64()),
        (Some(2), Some(2)),
        "{doc}"
    );
    assert_eq!(rb["bytes_in"], 12, "{doc}");
    assert_eq!(
        rb["bytes_out"].as_u64(),
        Some(b.iter().map(|(_, n)| n).sum()),
        "{doc}"
    );
    assert_eq!(ra["rate_limited"], 0);
    assert_eq!(doc["since"], 0);

    let csv = client()
        .get(proxy.admin_url("/usage.csv"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "client,upstream,calls,2xx,4xx,5xx,rate_limited,bytes_in,bytes_out"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("reporting-job,genesys,3,2,1,0,0,0,")),
        "{csv}"
    );
    // A later `since` leaves earlier hours out; a bad one is a clear 400.
    let later = client()
        .get(proxy.admin_url("/usage.json?since=99999999999"))
        .send()
        .await
        .unwrap();
    let later: serde_json::Value = later.json().await.unwrap();
    assert_eq!(
        later["rows"].as_array().map(Vec::len),
        Some(2),
        "the current hour is in"
    );
    let bad = client()
        .get(proxy.admin_url("/usage.json?since=yesterday"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs redis-server: scripts/test.sh installs it and runs these"]
async fn two_replicas_show_the_fleets_sum() {
    let sandbox = Sandbox::start(sandbox_options()).await.unwrap();
    let redis = RedisServer::start();
    let config = two_clients(
        &sandbox,
        &format!(
            "\n[cache]\nredis_url = \"{}\"\nencryption_key = \"q1w2e3r4t5y6u7i8o9p0a1s2d3f4g5h6j7k8l9z0x1c=\"\n",
            redis.url()
        ),
    );
    let (one, two) = (Proxy::start(&config), Proxy::start(&config));
    calls(&one, CLIENT_KEY, &[("GET", "/api/v2/users/me", ""); 2]).await;
    calls(&two, CLIENT_KEY, &[("GET", "/api/v2/users/me", ""); 3]).await;
    calls(&two, OTHER_KEY, &[("GET", "/api/v2/users/me", ""); 4]).await;
    // Each replica adds its own counts when asked (and once a minute): two adds its
    // calls, then one's answer has both; two's again too.
    usage_json(&two).await;
    for p in [&one, &two] {
        let doc = usage_json(p).await;
        let counts = |client| {
            doc["rows"]
                .as_array()?
                .iter()
                .find(|r| r["client"] == client)?["calls"]
                .as_u64()
        };
        assert_eq!(counts("reporting-job"), Some(5), "{doc}");
        assert_eq!(counts("wallboard"), Some(4), "{doc}");
        assert_eq!(doc["fleet"], true, "{doc}");
    }
}
