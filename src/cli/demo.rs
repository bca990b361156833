//! `tokengate demo`: the sandbox (a Genesys-like login host and API host) on loopback, the
//! proxy in front of it, and `curl` lines to try — no credentials needed.

use std::net::SocketAddr;
use std::path::Path;

use crate::config::Config;
use tokengate_sandbox::{Sandbox, SandboxOptions};

/// Run the demo until `shutdown` resolves.
pub async fn run(
    listen: SocketAddr,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let sandbox = Sandbox::start(SandboxOptions::default()).await?;
    let secret = sandbox.options().client_secret.clone();
    let proxy_listen = match tokio::net::TcpListener::bind(listen).await {
        Ok(probe) => probe.local_addr()?,
        Err(_) => SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let text = format!(
        r#"
[server]
listen = "{proxy_listen}"
admin_listen = "127.0.0.1:0"

[[upstream]]
name = "sandbox"
provider = "genesys"
region = "us_east_1"
token_url = "{token_url}"
base_url = "{api_url}"
streaming_url = "{streaming_url}"
client_id = "{client_id}"
client_secret = "${{SANDBOX_CLIENT_SECRET}}"
"#,
        token_url = sandbox.token_url(),
        api_url = sandbox.api_url(),
        streaming_url = sandbox.streaming_url(),
        client_id = sandbox.options().client_id,
    );
    let env = move |name: &str| (name == "SANDBOX_CLIENT_SECRET").then(|| secret.clone());
    let config = Config::from_toml(&text, Path::new("(demo)"), &env)?;
    let running = crate::start(config).await?;
    let proxy = running.proxy_addr;
    let api = sandbox.api_addr;
    println!("tokengate demo: a Genesys-like sandbox on loopback, with tokengate in front of it.");
    println!();
    println!("  proxy       http://{proxy}   (anonymous callers: it listens on loopback only)");
    println!("  login host  http://{}/oauth/token", sandbox.login_addr);
    println!("  API host    http://{api}");
    if let Some(admin) = running.admin_addr {
        println!("  status page http://{admin}/   (open it in a browser)");
        println!("  admin       http://{admin}/metrics  /readyz  /healthz");
    }
    println!();
    println!("Try:");
    println!("  curl -s http://{proxy}/api/v2/users/me");
    println!("  curl -s http://{proxy}/api/v2/analytics/conversations/details/query -H 'Content-Type: application/json' -d '{{\"interval\":\"2026-11-01T00:00:00Z/2026-11-02T00:00:00Z\"}}'");
    println!(
        "  curl -s http://{api}/api/v2/users/me          # the API host without the proxy: 401"
    );
    println!("  curl -s -X POST http://{proxy}/api/v2/notifications/channels   # connectUri points at the proxy");
    if let Some(admin) = running.admin_addr {
        println!("  curl -s http://{admin}/metrics | grep ^tokengate_");
    }
    println!();
    println!("Ctrl-C stops the demo.");
    shutdown.await;
    running.shutdown().await;
    Ok(())
}
