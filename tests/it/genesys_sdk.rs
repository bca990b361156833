//! The official Genesys Cloud Python SDK against the proxy: plain mode (the client key as
//! its access token), its own client-credentials login at `/oauth/token`, and gateway mode
//! (`set_gateway(host, "http", port, "login", "")`), and a notification channel made with
//! it and opened with `websocket-client`. `scripts/test.sh` installs both into
//! `target/sdk-venv` from PyPI; `TOKENGATE_SDK_PYTHON` may point elsewhere.

use std::path::PathBuf;

use crate::support::*;

fn sdk_python() -> PathBuf {
    let python = std::env::var_os("TOKENGATE_SDK_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/sdk-venv/bin/python")
        });
    assert!(
        python.exists(),
        "{} is missing: run scripts/test.sh, which installs the Genesys Python SDK",
        python.display()
    );
    python
}

/// Run the SDK script against the proxy at `addr`; blocking.
fn run_sdk(addr: &str, mode: &str, name: &str, key: &str) -> std::process::Output {
    run_sdk_with(addr, mode, name, key, &[])
}

fn run_sdk_with(
    addr: &str,
    mode: &str,
    name: &str,
    key: &str,
    more: &[&str],
) -> std::process::Output {
    let (host, port) = addr.rsplit_once(':').unwrap();
    std::process::Command::new(sdk_python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/sdk/genesys_sdk.py"
        ))
        .args([mode, host, port, name, key])
        .args(more)
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the Genesys Python SDK: scripts/test.sh installs it and runs these"]
async fn the_official_python_sdk_works_through_the_proxy_in_every_mode() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    for mode in ["key", "oauth", "gateway"] {
        let addr = proxy.addr.clone();
        let out =
            tokio::task::spawn_blocking(move || run_sdk(&addr, mode, "reporting-job", CLIENT_KEY))
                .await
                .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "SDK in {mode} mode failed:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("users/me 7e4c1b9a-"), "{stdout}");
        let seen = sandbox.seen();
        let call = seen
            .iter()
            .find(|r| r.path == format!("/api/v2/users/sdk-{mode}"))
            .expect("the SDK's call reached the API host");
        assert!(sandbox.issued(call.headers.get("authorization").unwrap()));
        assert!(call.headers.get("user-agent").is_some());
    }
    assert_eq!(sandbox.grants(), 1, "one upstream token for all of it");
    // A wrong key gets OAuth's invalid_client from the proxy's token endpoint.
    let addr = proxy.addr.clone();
    let out = tokio::task::spawn_blocking(move || {
        run_sdk(&addr, "gateway", "reporting-job", "not-the-key")
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid_client"));
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the Genesys Python SDK: scripts/test.sh installs it and runs these"]
async fn the_python_sdk_makes_a_notification_channel_through_the_proxy_and_an_event_arrives() {
    const TOPIC: &str = "v2.users.7e4c1b9a-0000-4000-8000-000000000001.presence";
    let sandbox = sandbox().await;
    let config = standard_config(&sandbox, "").replace(
        "client_secret = \"${SANDBOX_SECRET}\"\n",
        &format!(
            "client_secret = \"${{SANDBOX_SECRET}}\"\nstreaming_url = \"{}\"\n",
            sandbox.streaming_url()
        ),
    );
    let proxy = Proxy::start(&config);
    let addr = proxy.addr.clone();
    let script = tokio::task::spawn_blocking(move || {
        run_sdk_with(&addr, "notify", "reporting-job", CLIENT_KEY, &[TOPIC])
    });
    // Publish until the script's socket, subscribed, has taken an event and ended.
    let event = serde_json::json!({"presenceDefinition": {"systemPresence": "On Queue"}});
    wait_for(std::time::Duration::from_secs(60), || {
        sandbox.publish(TOPIC, &event);
        script.is_finished().then_some(())
    })
    .await
    .expect("the SDK script ended");
    let out = script.await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(&format!(
            "connectUri ws://{}/channels/streaming-0-",
            proxy.addr
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(r#"event {"presenceDefinition": {"systemPresence": "On Queue"}}"#),
        "{stdout}"
    );
    assert_eq!(sandbox.streaming_seen().len(), 1);
}
