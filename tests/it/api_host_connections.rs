//! The API host ends connections on its own schedule — an HTTP/2 GOAWAY after so many
//! streams, HTTP/1.1 `Connection: close` after so many requests, as nginx and every load
//! balancer do — and no call is lost to it (issue 22). nginx plays the API host.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::nginx::Nginx;
use crate::support::pki::pki;
use crate::support::*;

/// An upstream at `prefix` whose API host is nginx's server on `port`.
fn nginx_upstream(sandbox: &Sandbox, name: &str, prefix: &str, port: u16, ca: &str) -> String {
    upstream_toml(sandbox, name, prefix).replace(
        &format!("base_url = \"{}\"", sandbox.api_url()),
        &format!("base_url = \"https://127.0.0.1:{port}\"\nca_file = \"{ca}\""),
    )
}

/// 64 callers for `run`, alternating GETs and 1 KiB POSTs under `prefix`: the answers
/// that were not 200, with their bodies.
async fn load(proxy: &Proxy, prefix: &str, run: Duration) -> (u64, Vec<String>) {
    let client = client();
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + run;
    let callers = (0..64).map(|i| {
        let (client, done, url) = (client.clone(), Arc::clone(&done), proxy.url(prefix));
        tokio::spawn(async move {
            let mut failed = Vec::new();
            let mut n = i;
            while Instant::now() < until {
                n += 1;
                let req = if n % 2 == 0 {
                    client.get(format!("{url}/api/v2/users/{n}"))
                } else {
                    client
                        .post(format!("{url}/api/v2/conversations/{n}"))
                        .body(vec![b'x'; 1024])
                };
                let resp = req
                    .header("Authorization", format!("Bearer {CLIENT_KEY}"))
                    .send()
                    .await;
                match resp {
                    Ok(r) if r.status() == 200 => {}
                    Ok(r) => failed.push(format!(
                        "{} {}",
                        r.status(),
                        r.text().await.unwrap_or_default()
                    )),
                    Err(e) => failed.push(format!("client error: {e}")),
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
            failed
        })
    });
    let mut failed = Vec::new();
    for caller in futures_util::future::join_all(callers).await {
        failed.extend(caller.unwrap());
    }
    (done.load(Ordering::Relaxed), failed)
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs nginx (scripts/test.sh installs it)"]
async fn api_hosts_that_end_connections_on_their_own_schedule_lose_no_call() {
    let sandbox = sandbox().await;
    let pki = pki();
    let nginx = Nginx::start(&pki, 500, 100);
    let ca = pki.path("ca.pem");
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{}{}{}",
        nginx_upstream(&sandbox, "h2", "/h2", nginx.h2_port, &ca),
        nginx_upstream(&sandbox, "h1", "/h1", nginx.h1_port, &ca),
        client_toml("reporting-job", "")
    );
    let proxy = Proxy::start(&config);
    for (prefix, port, protocol, per_connection) in [
        ("/h2", nginx.h2_port, "HTTP/2.0", 500),
        ("/h1", nginx.h1_port, "HTTP/1.1", 100),
    ] {
        let (calls, failed) = load(&proxy, prefix, Duration::from_secs(8)).await;
        assert!(
            failed.is_empty(),
            "{prefix}: {} of {calls} calls failed; first: {:?}",
            failed.len(),
            failed.first()
        );
        let logged: Vec<_> = nginx
            .logged()
            .into_iter()
            .filter(|l| l.port == port)
            .collect();
        assert!(
            logged.iter().all(|l| l.protocol == protocol),
            "{prefix}: {:?}",
            logged.first()
        );
        let connections: HashSet<u64> = logged.iter().map(|l| l.connection).collect();
        let most = logged
            .iter()
            .map(|l| l.nth_on_connection)
            .max()
            .unwrap_or(0);
        assert_eq!(
            most, per_connection,
            "{prefix}: connections were ended after {per_connection}"
        );
        assert!(
            connections.len() as u64 >= calls / per_connection,
            "{prefix}: {} connections for {calls} calls",
            connections.len()
        );
        assert!(logged.iter().any(|l| l.method == "POST"));
        eprintln!(
            "{prefix}: {calls} calls, 0 failed, {} connections",
            connections.len()
        );
    }
}
