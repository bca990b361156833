//! Security events (issue 26): a wrong key, a grant failure, a reload with a broken file,
//! a key used outside its policy, a refused admin key — each one JSON line in the events
//! file and one RFC 5424 line over UDP, never a secret in any.

use std::net::UdpSocket;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::*;

const WRONG_KEY: &str = "not-the-key-Zx81!";
const ADMIN_KEY: &str = "admin-key-for-events-Qq7";

/// A syslog receiver on a free loopback port: the lines it got, read on a thread.
fn syslog_receiver() -> (u16, Arc<Mutex<Vec<String>>>) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let got = Arc::clone(&lines);
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok(n) = socket.recv(&mut buf) {
            got.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    });
    (port, lines)
}

/// The events file's lines with `event`.
fn file_events(path: &std::path::Path, event: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == event)
        .collect()
}

fn syslog_events(lines: &Mutex<Vec<String>>, event: &str) -> Vec<String> {
    let needle = format!("\"event\":\"{event}\"");
    lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains(&needle))
        .cloned()
        .collect()
}

/// Waits until `event` is in both sinks, then checks it is there exactly once.
async fn one_event(
    file: &std::path::Path,
    syslog: &Mutex<Vec<String>>,
    event: &str,
) -> (serde_json::Value, String) {
    wait_for(Duration::from_secs(10), || {
        (!file_events(file, event).is_empty() && !syslog_events(syslog, event).is_empty())
            .then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("{event} in the file and over syslog"));
    let (in_file, over_syslog) = (file_events(file, event), syslog_events(syslog, event));
    assert_eq!(in_file.len(), 1, "{in_file:?}");
    assert_eq!(over_syslog.len(), 1, "{over_syslog:?}");
    (in_file[0].clone(), over_syslog[0].clone())
}

fn no_secret_in(text: &str) {
    for secret in [
        WRONG_KEY,
        CLIENT_KEY,
        CLIENT_SECRET,
        ADMIN_KEY,
        "wrong-secret",
    ] {
        assert!(!text.contains(secret), "a secret in an event: {text}");
    }
}

/// The test config with its client allowed only `GET /api/v2/users/*`.
fn users_only(config: &str) -> String {
    config.replace(
        "[[client]]",
        "[[client]]\nallow = [\"GET /api/v2/users/*\"]",
    )
}

fn events_config(base: &str, dir: &std::path::Path, port: u16) -> String {
    format!(
        "{base}\n[events]\nfile = \"{}\"\nsyslog = \"udp://127.0.0.1:{port}\"\n",
        dir.join("events.jsonl").display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_key_a_policy_refusal_an_admin_refusal_and_a_broken_reload_are_one_event_each() {
    let sandbox = Sandbox::start(sandbox_options()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (port, syslog) = syslog_receiver();
    let admin_hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(ADMIN_KEY));
    let base = users_only(&config_with(
        &sandbox,
        &format!("admin_key_sha256 = \"{admin_hash}\""),
        "",
    ));
    let config = events_config(&base, dir.path(), port);
    let proxy = Proxy::start(&config);
    let file = dir.path().join("events.jsonl");
    let c = client();

    // A wrong key: 401, and one key_refused with the caller's address.
    let r = c
        .get(proxy.url("/api/v2/users/me"))
        .header("X-Api-Key", WRONG_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let (event, line) = one_event(&file, &syslog, "key_refused").await;
    assert_eq!(event["peer"], "127.0.0.1", "{event}");
    assert!(
        event["time"].as_str().is_some_and(|t| t.contains('T')),
        "{event}"
    );
    assert!(
        line.starts_with("<36>1 "),
        "RFC 5424, auth facility, warning: {line}"
    );
    assert!(line.contains(" tokengate "), "{line}");

    // A good key outside its allow rules: 403, one policy_refused naming the client.
    let r = c
        .get(proxy.url("/api/v2/routing/queues"))
        .header("X-Api-Key", CLIENT_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let (event, _) = one_event(&file, &syslog, "policy_refused").await;
    assert_eq!(event["client"], "reporting-job", "{event}");
    assert_eq!(event["path"], "/api/v2/routing/queues", "{event}");

    // The admin listener with a wrong key.
    let r = c
        .get(proxy.admin_url("/metrics"))
        .bearer_auth(WRONG_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    one_event(&file, &syslog, "admin_refused").await;

    // A reload with a broken file: refused, one config_refused; then a good one.
    proxy.rewrite_config("[[upstream]]\nname = \"broken\"\nprovider = \"nope\"\n");
    proxy.signal("HUP");
    one_event(&file, &syslog, "config_refused").await;
    proxy.rewrite_config(&config);
    proxy.signal("HUP");
    one_event(&file, &syslog, "config_reloaded").await;
    assert_eq!(get_with_key(&proxy, "/api/v2/users/me").await.status(), 200);

    let all = std::fs::read_to_string(&file).unwrap();
    no_secret_in(&all);
    no_secret_in(&syslog.lock().unwrap().join("\n"));
}

/// With no `[events]` sinks a security event is a log line; with the log taking warnings
/// only (no audit line at INFO to share the path with), a policy refusal still names its
/// path.
#[tokio::test(flavor = "multi_thread")]
async fn a_policy_refusal_in_a_log_of_warnings_only_names_its_path() {
    let sandbox = Sandbox::start(sandbox_options()).await.unwrap();
    let config = users_only(&config_with(&sandbox, "", ""));
    let proxy = Proxy::start_with_env(
        &config,
        &[("SANDBOX_SECRET", CLIENT_SECRET), ("TOKENGATE_LOG", "warn")],
    );
    let r = get_with_key(&proxy, "/api/v2/routing/queues").await;
    assert_eq!(r.status(), 403);
    let line = wait_for(Duration::from_secs(10), || {
        let text = proxy.output.text();
        let line = text.lines().find(|l| l.contains("policy_refused"))?;
        Some(line.to_owned())
    })
    .await
    .expect("a policy_refused line in the log");
    assert!(line.contains("/api/v2/routing/queues"), "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grant_that_fails_and_recovers_is_two_events() {
    let sandbox = Sandbox::start(sandbox_options()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (port, syslog) = syslog_receiver();
    let config = events_config(&config_with(&sandbox, "", ""), dir.path(), port);
    let file = dir.path().join("events.jsonl");
    sandbox.rotate_client_secret("wrong-secret");
    let proxy = Proxy::start(&config);
    let r = get_with_key(&proxy, "/api/v2/users/me").await;
    assert_ne!(r.status(), 200);
    let (event, _) = one_event(&file, &syslog, "grant_failed").await;
    assert_eq!(event["upstream"], "genesys", "{event}");
    sandbox.rotate_client_secret(CLIENT_SECRET);
    wait_for_async(Duration::from_secs(15), || async {
        (get_with_key(&proxy, "/api/v2/users/me").await.status() == 200).then_some(())
    })
    .await
    .expect("calls pass again");
    let (event, line) = one_event(&file, &syslog, "grant_recovered").await;
    assert_eq!(event["upstream"], "genesys", "{event}");
    assert!(line.starts_with("<37>1 "), "notice: {line}");
    no_secret_in(&std::fs::read_to_string(&file).unwrap());
    no_secret_in(&syslog.lock().unwrap().join("\n"));
}
