//! Client keys with a lifecycle (issue 27): two keys overlap during a rotation, the old
//! one stops at its `not_after`, a reload that removes a key ends the session tokens it
//! got, and the status page shows each key by fingerprint, never the key.

use std::time::{Duration, SystemTime};

use crate::support::*;

const OLD_KEY: &str = "tgk_old-key-of-the-etl-job-Qm4xZ8";
const NEW_KEY: &str = "tgk_new-key-of-the-etl-job-Vt7pL2";

fn rfc3339(t: SystemTime) -> String {
    tokengate::config::rfc3339(t)
}

/// The etl client with `keys` (TOML), in front of `sandbox`.
fn etl_config(sandbox: &Sandbox, keys: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{}\n[[client]]\nname = \"etl\"\nkeys = [{keys}]\n",
        upstream_toml(sandbox, "genesys", "/"),
    )
}

fn key_entry(key: &str, not_after: Option<SystemTime>) -> String {
    match not_after {
        Some(t) => format!(
            "{{ sha256 = \"{}\", not_after = {} }}",
            tokengate::front::keys::hash_key(key),
            rfc3339(t)
        ),
        None => format!(
            "{{ sha256 = \"{}\" }}",
            tokengate::front::keys::hash_key(key)
        ),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn two_keys_overlap_until_the_first_ones_not_after() {
    let sandbox = sandbox().await;
    // Whole seconds: the old key ends two to three seconds from now.
    let ends = SystemTime::now() + Duration::from_secs(3);
    let config = etl_config(
        &sandbox,
        &format!(
            "{}, {}",
            key_entry(OLD_KEY, Some(ends)),
            key_entry(NEW_KEY, None)
        ),
    );
    let proxy = Proxy::start(&config);
    let (old, new) = (format!("Bearer {OLD_KEY}"), format!("Bearer {NEW_KEY}"));
    assert_eq!(status_with_authorization(&proxy, &old).await, 200);
    assert_eq!(status_with_authorization(&proxy, &new).await, 200);
    // The status document shows both by fingerprint, the old one's end, and their use.
    let doc: serde_json::Value =
        serde_json::from_str(&admin_text(&proxy, "/status.json").await).unwrap();
    let keys = doc["clients"][0]["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{doc}");
    let old_hash = tokengate::front::keys::hash_key(OLD_KEY);
    assert_eq!(keys[0]["fingerprint"], format!("sha256:{}", &old_hash[..8]));
    assert_eq!(keys[0]["not_after"], rfc3339(ends));
    assert!(keys[0]["last_used"].is_string(), "{doc}");
    assert!(keys[1]["not_after"].is_null(), "{doc}");
    let metrics = admin_text(&proxy, "/metrics").await;
    let left = metric(
        &metrics,
        "tokengate_client_key_expiry_seconds",
        &["client=\"etl\""],
    );
    assert!((0.0..=3.0).contains(&left), "{left}");
    // Past its not_after the old key is refused like an unknown one; the new one works.
    let refused = wait_for_async(Duration::from_secs(10), || async {
        (status_with_authorization(&proxy, &old).await == 401).then_some(SystemTime::now())
    })
    .await
    .expect("the old key stops");
    assert!(refused >= ends, "refused before its not_after");
    assert_eq!(status_with_authorization(&proxy, &new).await, 200);
    // Nothing of either key, nor a hash to look it up by, in the page, the document or
    // the metrics.
    let page = admin_text(&proxy, "/").await;
    let doc = admin_text(&proxy, "/status.json").await;
    for text in [&page, &doc, &metrics] {
        for secret in [
            OLD_KEY,
            NEW_KEY,
            &old_hash,
            &tokengate::front::keys::hash_key(NEW_KEY),
        ] {
            assert!(!text.contains(secret));
        }
    }
    assert!(page.contains(&format!("sha256:{}", &old_hash[..8])));
    assert!(!proxy.output.text().contains(OLD_KEY));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_removing_a_key_ends_its_session_tokens() {
    let sandbox = sandbox().await;
    let both = format!("{}, {}", key_entry(OLD_KEY, None), key_entry(NEW_KEY, None));
    let proxy = Proxy::start(&etl_config(&sandbox, &both));
    let (old_session, new_session) = (
        format!("Bearer {}", session_token(&proxy, "etl", OLD_KEY).await),
        format!("Bearer {}", session_token(&proxy, "etl", NEW_KEY).await),
    );
    assert_eq!(status_with_authorization(&proxy, &old_session).await, 200);
    assert_eq!(status_with_authorization(&proxy, &new_session).await, 200);
    proxy.rewrite_config(&etl_config(&sandbox, &key_entry(NEW_KEY, None)));
    proxy.signal("HUP");
    let output = proxy.output.clone();
    wait_for(Duration::from_secs(10), || {
        output.text().contains("config reloaded").then_some(())
    })
    .await
    .expect("the reload is logged");
    assert_eq!(
        status_with_authorization(&proxy, &old_session).await,
        401,
        "the removed key's session"
    );
    assert_eq!(
        status_with_authorization(&proxy, &format!("Bearer {OLD_KEY}")).await,
        401
    );
    assert_eq!(status_with_authorization(&proxy, &new_session).await, 200);
    // A session asked for with the removed key is not issued.
    let refused = client()
        .post(proxy.url("/oauth/token"))
        .basic_auth("etl", Some(OLD_KEY))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn check_and_a_security_event_warn_of_a_key_near_its_end() {
    let sandbox = sandbox().await;
    let ends = SystemTime::now() + Duration::from_secs(5 * 24 * 3600);
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let config = format!(
        "{}\n[events]\nfile = \"{}\"\n",
        etl_config(
            &sandbox,
            &format!(
                "{}, {}",
                key_entry(OLD_KEY, Some(ends)),
                key_entry(NEW_KEY, None)
            )
        ),
        events.display()
    );
    let old_hash = tokengate::front::keys::hash_key(OLD_KEY);
    let fingerprint = format!("sha256:{}", &old_hash[..8]);
    let _proxy = Proxy::start(&config);
    let line = wait_for(Duration::from_secs(10), || {
        std::fs::read_to_string(&events)
            .ok()?
            .lines()
            .find(|l| l.contains("key_expiring"))
            .map(str::to_string)
    })
    .await
    .expect("a key_expiring event");
    let event: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(event["client"], "etl", "{line}");
    assert_eq!(event["key"], fingerprint.as_str(), "{line}");
    assert_eq!(event["not_after"], rfc3339(ends), "{line}");
    assert!(
        !line.contains(&old_hash) && !line.contains(OLD_KEY),
        "{line}"
    );
    // The new key never expires: no event for it.
    let all = std::fs::read_to_string(&events).unwrap();
    assert_eq!(all.matches("key_expiring").count(), 1, "{all}");
    let text = tokio::task::spawn_blocking(move || {
        let (_dir, path) = write_config(&config);
        let out = binary()
            .arg("check")
            .arg("-c")
            .arg(&path)
            .env("SANDBOX_SECRET", CLIENT_SECRET)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    })
    .await
    .unwrap();
    assert_eq!(
        text.0,
        Some(0),
        "a key near its end still works: {}",
        text.1
    );
    assert!(
        text.1.contains(&format!(
            "WARN  client \"etl\" key {fingerprint}: expires in 5 day(s)"
        )),
        "{}",
        text.1
    );
    assert!(!text.1.contains(&old_hash), "{}", text.1);
}
