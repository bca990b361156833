//! The official Genesys Cloud Python SDK against the proxy: plain mode (the client key as
//! its access token), its own client-credentials login at `/oauth/token`, and gateway mode
//! (`set_gateway(host, "http", port, "login", "")`). `scripts/test.sh` installs the SDK
//! into `target/sdk-venv` from PyPI; `TOKENGATE_SDK_PYTHON` may point elsewhere.

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
    let (host, port) = addr.rsplit_once(':').unwrap();
    std::process::Command::new(sdk_python())
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/sdk/genesys_sdk.py"
        ))
        .args([mode, host, port, name, key])
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
