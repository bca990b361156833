//! NICE CXone through the proxy: discovery of the token endpoint, the access-key grant,
//! the tenant's API host found from the id_token, expiry and refresh.

use std::time::Duration;

use crate::support::*;
use tokengate_sandbox::Flavor;

const APP_SECRET: &str = "cxone-app-secret-31";
const KEY_SECRET: &str = "cxone-access-key=secret==";

fn cxone_config(sandbox: &Sandbox, extra: &str) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
prefetch_tokens = false

[[upstream]]
name = "cxone"
provider = "cxone"
prefix = "/cxone"
issuer = "{issuer}"
client_id = "{client_id}"
client_secret = "${{CXONE_CLIENT_SECRET}}"
access_key_id = "{key_id}"
access_key_secret = "${{CXONE_ACCESS_KEY_SECRET}}"
{extra}
{client}"#,
        issuer = sandbox.issuer(),
        client_id = sandbox.options().client_id,
        key_id = sandbox.options().access_key_id,
        client = client_toml("wfm-export", ""),
    )
}

async fn cxone_sandbox(lifetime: Duration) -> Sandbox {
    Sandbox::start(SandboxOptions {
        flavor: Flavor::Cxone,
        client_secret: APP_SECRET.into(),
        access_key_secret: KEY_SECRET.into(),
        token_lifetime: lifetime,
        ..SandboxOptions::default()
    })
    .await
    .unwrap()
}

fn start(config: &str) -> Proxy {
    Proxy::start_with_env(
        config,
        &[
            ("CXONE_CLIENT_SECRET", APP_SECRET),
            ("CXONE_ACCESS_KEY_SECRET", KEY_SECRET),
        ],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn discovery_grant_and_an_api_call_through_the_proxy() {
    let sandbox = cxone_sandbox(Duration::from_secs(3600)).await;
    let proxy = start(&cxone_config(&sandbox, ""));
    let resp = get_with_key(&proxy, "/cxone/inContactAPI/services/v30.0/agents?top=5").await;
    assert_eq!(resp.status(), 200);
    let seen = sandbox.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/inContactAPI/services/v30.0/agents");
    assert_eq!(seen[0].query.as_deref(), Some("top=5"));
    assert!(sandbox.issued(seen[0].headers.get("authorization").unwrap()));
    assert_eq!((sandbox.grants(), sandbox.refresh_grants()), (1, 0));
    let logs = proxy.output.text();
    for secret in [APP_SECRET, KEY_SECRET, CLIENT_KEY] {
        assert!(!logs.contains(secret));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn expiring_tokens_are_renewed_with_the_refresh_token_and_no_call_fails() {
    let sandbox = cxone_sandbox(Duration::from_secs(2)).await;
    let proxy = start(&cxone_config(&sandbox, ""));
    let client = client();
    let mut calls = 0;
    while sandbox.refresh_grants() < 2 || calls < 20 {
        let r = client
            .get(proxy.url("/cxone/inContactAPI/services/v30.0/skills"))
            .header("Authorization", format!("Bearer {CLIENT_KEY}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "call {calls} failed");
        calls += 1;
        assert!(calls < 100_000, "no refresh happened");
    }
    assert_eq!(sandbox.api_401s(), 0, "no expired token was used");
    assert_eq!(
        sandbox.grants() - sandbox.refresh_grants(),
        1,
        "the access key was used once"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn overridden_token_and_api_urls_skip_discovery() {
    let sandbox = cxone_sandbox(Duration::from_secs(3600)).await;
    let extra = format!(
        "token_url = \"{}\"\nbase_url = \"{}/inContactAPI\"",
        sandbox.token_url(),
        sandbox.api_url()
    );
    // The issuer points nowhere: only the overrides can make this work.
    let config = cxone_config(&sandbox, "#EXTRA")
        .replace(&sandbox.issuer(), &format!("http://{}", closed_addr()))
        .replace("#EXTRA", &extra);
    let proxy = start(&config);
    let resp = get_with_key(&proxy, "/cxone/services/v30.0/agents").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        sandbox.seen()[0].path,
        "/inContactAPI/services/v30.0/agents"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn check_diagnoses_cxone_grants() {
    let sandbox = cxone_sandbox(Duration::from_secs(3600)).await;
    let run = |key_secret: &'static str| {
        let config = cxone_config(&sandbox, "");
        move || {
            let (_dir, path) = write_config(&config);
            binary()
                .args(["check", "--json", "-c", path.to_str().unwrap()])
                .env("CXONE_CLIENT_SECRET", APP_SECRET)
                .env("CXONE_ACCESS_KEY_SECRET", key_secret)
                .output()
                .unwrap()
        }
    };
    let out = tokio::task::spawn_blocking(run(KEY_SECRET)).await.unwrap();
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["hint"], "ok", "{d}");
    assert_eq!(d["token_url"], sandbox.token_url());
    let out = tokio::task::spawn_blocking(run("wrong-access-key"))
        .await
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let d: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(d["ok"], false);
    assert_eq!(d["grant_error"], "invalid_grant");
    assert_eq!(d["hint"], "invalid_client");
    assert!(
        d["message"].as_str().unwrap().contains("access_key_secret"),
        "{d}"
    );
    for secret in [APP_SECRET, KEY_SECRET, "wrong-access-key"] {
        assert!(!text.contains(secret));
    }
}
