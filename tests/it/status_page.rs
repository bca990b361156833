//! The operator's status page, rendered by a real browser (headless Chromium), and the
//! status document; neither ever shows a secret, a key or a token.

use std::path::PathBuf;
use std::process::Command;

use crate::support::*;

const BAD_SECRET: &str = "bad-secret-for-status-7781";

fn chromium() -> PathBuf {
    let path = std::env::var_os("TOKENGATE_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        path.exists(),
        "{} is missing: run scripts/test.sh, which installs Debian's chromium",
        path.display()
    );
    path
}

/// Run headless Chromium with the flags this closed network needs, plus `args`.
pub(crate) fn headless(profile: &std::path::Path, args: &[&str]) -> std::process::Output {
    Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .output()
        .expect("chromium runs")
}

async fn scenario() -> (Sandbox, Proxy) {
    let sandbox = sandbox().await;
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{}{}{}",
        upstream_toml(&sandbox, "genesys", "/"),
        upstream_toml(&sandbox, "bad", "/bad").replace("${SANDBOX_SECRET}", "${BAD_SECRET}"),
        client_toml(
            "reporting-job",
            "upstreams = [\"genesys\", \"bad\"]\nallow = [\"GET /api/v2/**\", \"GET /bad/**\"]"
        )
    );
    let proxy = Proxy::start_with_env(
        &config,
        &[
            ("SANDBOX_SECRET", CLIENT_SECRET),
            ("BAD_SECRET", BAD_SECRET),
        ],
    );
    let c = client();
    let auth = format!("Bearer {CLIENT_KEY}");
    for path in [
        "/api/v2/users/me",
        "/api/v2/routing/queues",
        "/bad/api/v2/users/me",
        "/api/v2/sandbox/always401",
    ] {
        c.get(proxy.url(path))
            .header("Authorization", &auth)
            .send()
            .await
            .unwrap();
    }
    let r = c
        .delete(proxy.url("/api/v2/users/1"))
        .header("Authorization", &auth)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    (sandbox, proxy)
}

fn secrets(sandbox: &Sandbox) -> Vec<String> {
    let mut s = vec![
        CLIENT_SECRET.to_string(),
        BAD_SECRET.into(),
        CLIENT_KEY.into(),
    ];
    s.extend(sandbox.issued_tokens());
    assert!(!sandbox.issued_tokens().is_empty());
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_document_has_every_upstream_and_client_and_no_secret() {
    let (sandbox, proxy) = scenario().await;
    let c = client();
    let doc: serde_json::Value = c
        .get(proxy.admin_url("/status.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let up = |name: &str| {
        doc["upstreams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["name"] == name)
            .unwrap()
            .clone()
    };
    let good = up("genesys");
    assert_eq!(good["token"]["state"], "valid");
    assert!(good["token"]["expires_in_secs"].as_f64().unwrap() > 80_000.0);
    assert_eq!(
        good["grants"]["ok"], 1,
        "one at start; the 401 was for a token the platform still accepts"
    );
    // The DELETE its allow rules refuse counts under the upstream it asked for.
    assert_eq!(good["last_minute"]["requests"], 4);
    assert_eq!(good["last_minute"]["errors"], 2, "the 401 and the 403");
    assert_eq!(good["retries_401"], 0, "not sent again: the token was good");
    let bad = up("bad");
    assert_eq!(bad["token"]["state"], "failing");
    assert_eq!(bad["last_failure"]["grant_error"], "invalid_client");
    assert_eq!(bad["last_failure"]["hint"], "invalid_client");
    assert!(bad["last_failure"]["message"].as_str().unwrap().len() > 20);
    let client = &doc["clients"][0];
    assert_eq!(
        (
            client["name"].as_str(),
            client["requests"].as_u64(),
            client["forbidden"].as_u64()
        ),
        (Some("reporting-job"), Some(5), Some(1))
    );

    let page = admin_text(&proxy, "/").await;
    let metrics = admin_text(&proxy, "/metrics").await;
    for s in secrets(&sandbox) {
        for (what, text) in [
            ("status.json", doc.to_string()),
            ("page", page.clone()),
            ("metrics", metrics.clone()),
        ] {
            assert!(!text.contains(&s), "a secret is on the {what}");
            assert!(
                !text.contains(&s[..12.min(s.len())]),
                "a secret's prefix is on the {what}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs chromium: scripts/test.sh installs it and runs these"]
async fn the_status_page_renders_in_a_browser() {
    let (sandbox, proxy) = scenario().await;
    let profile = tempfile::tempdir().unwrap();
    let url = proxy.admin_url("/");
    let dom = {
        let (profile, url) = (profile.path().to_path_buf(), url.clone());
        tokio::task::spawn_blocking(move || {
            headless(
                &profile,
                &["--virtual-time-budget=2500", "--dump-dom", &url],
            )
        })
        .await
        .unwrap()
    };
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    assert!(dom.contains("id=\"upstream-genesys\""), "{dom}");
    assert!(dom.contains("id=\"upstream-bad\""), "{dom}");
    assert!(dom.contains("id=\"client-reporting-job\""), "{dom}");
    // The countdown was started by the page's script (it marks what it ticks).
    let countdown = dom
        .find("id=\"countdown-genesys\"")
        .expect("a countdown for the valid token");
    let tag_end = countdown + dom[countdown..].find('>').unwrap();
    assert!(
        dom[countdown..tag_end].contains("data-live=\"1\""),
        "{}",
        &dom[countdown..tag_end + 20]
    );
    assert!(
        dom[tag_end + 1..].starts_with("23:5"),
        "{}",
        &dom[tag_end..tag_end + 20]
    );
    let failure = dom
        .find("id=\"failure-bad\"")
        .expect("the failing upstream's last failure");
    assert!(dom[failure..].contains("invalid_client"));
    // At 1280 px the failures come first, and an upstream nobody called has a line, not
    // an empty chart.
    assert!(failure < dom.find("id=\"upstreams\"").unwrap());
    assert!(dom.contains("id=\"chart-genesys\"") && !dom.contains("id=\"chart-bad\""));
    assert!(
        dom.contains("no calls in the last 10 minutes: bad"),
        "{dom}"
    );
    for s in secrets(&sandbox) {
        assert!(!dom.contains(&s));
    }

    screenshot(profile.path(), &url, "status-page.png", "1280,900").await;
}

/// Screenshot `url` in headless Chromium at `size` into the target's tmp folder as `name`;
/// asserts a real PNG came out.
pub(crate) async fn screenshot(profile: &std::path::Path, url: &str, name: &str, size: &str) {
    let shot = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_file(&shot);
    let out = {
        let profile = profile.to_path_buf();
        let args = [
            format!("--window-size={size}"),
            format!("--screenshot={}", shot.display()),
            url.to_string(),
        ];
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            headless(&profile, &args)
        })
        .await
        .unwrap()
    };
    let png = std::fs::read(&shot)
        .unwrap_or_else(|_| panic!("no screenshot: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000);
    eprintln!("screenshot: {}", shot.display());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_key_protects_the_page_but_not_the_probes() {
    let sandbox = sandbox().await;
    let admin_key = "admin-key-for-tests-5150";
    let config = standard_config(
        &sandbox,
        &format!(
            "admin_key_sha256 = \"{}\"",
            tokengate::front::keys::hash_key(admin_key)
        ),
    );
    let proxy = Proxy::start(&config);
    let c = client();
    assert_eq!(
        c.get(proxy.admin_url("/")).send().await.unwrap().status(),
        401
    );
    assert_eq!(
        c.get(proxy.admin_url("/status.json"))
            .bearer_auth("wrong")
            .send()
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        c.get(proxy.admin_url("/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let r = c
        .get(proxy.admin_url("/status.json"))
        .bearer_auth(admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(proxy.admin_url("/"))
        .basic_auth("operator", Some(admin_key))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}
