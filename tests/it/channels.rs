//! The platform's notification channels shared fairly (issue 25): Genesys allows 20
//! channels per OAuth client and a 21st silently removes the oldest one without a socket,
//! so behind the gate one app's new channel would evict another app's. The sandbox's
//! streaming host enforces that rule; the proxy must keep each app within its share.

use std::time::Duration;

use crate::support::*;
use crate::websockets::{next_text, open_url, refused_with, Socket};

const KEY_B: &str = "tg_second-client-key-abcdefghijklmnopqrstuvwxyz";
const CHANNELS: &str = "/genesys/api/v2/notifications/channels";

/// Two clients on one Genesys upstream with the sandbox's streaming host; `a_extra` and
/// `b_extra` go into their `[[client]]` tables.
fn two_apps(sandbox: &Sandbox, a_extra: &str, b_extra: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{}streaming_url = \"{}\"\n{}\n[[client]]\nname = \"b\"\nkey_sha256 = \"{}\"\n{b_extra}\n",
        upstream_toml(sandbox, "genesys", "/genesys"),
        sandbox.streaming_url(),
        client_toml("reporting-job", a_extra),
        tokengate::front::keys::hash_key(KEY_B),
    )
}

/// Ask for a channel with `key`: its status, and its `connectUri` when made.
async fn make_channel(proxy: &Proxy, key: &str) -> (u16, Option<String>, serde_json::Value) {
    let resp = client()
        .post(proxy.url(CHANNELS))
        .header("X-Api-Key", key)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    let uri = body["connectUri"].as_str().map(str::to_string);
    (status, uri, body)
}

/// Make `n` channels with `key`, each answered 200; their `connectUri`s.
async fn make_channels(proxy: &Proxy, key: &str, n: usize) -> Vec<String> {
    let mut uris = Vec::new();
    for i in 0..n {
        let (status, uri, body) = make_channel(proxy, key).await;
        assert_eq!(status, 200, "channel {i}: {body}");
        uris.push(uri.unwrap());
    }
    uris
}

async fn refused_as_too_many(proxy: &Proxy, key: &str) {
    let (status, _, body) = make_channel(proxy, key).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"], "too_many_channels", "{body}");
}

/// A heartbeat on `ws` (the sandbox sends one every 200 ms).
async fn heartbeat(ws: &mut Socket) {
    let frame: serde_json::Value = serde_json::from_str(&next_text(ws).await).unwrap();
    assert_eq!(frame["eventBody"]["message"], "WebSocket Heartbeat");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_apps_share_the_twenty_channels_and_neither_evicts_the_others() {
    let sandbox = sandbox_with_heartbeat(Duration::from_millis(200)).await;
    let proxy = Proxy::start(&two_apps(&sandbox, "", ""));
    // b's channels first (the platform's oldest), one with a socket open on it.
    let b = make_channels(&proxy, KEY_B, 10).await;
    let mut b_socket = open_url(&b[0], None).await.unwrap();
    heartbeat(&mut b_socket).await;
    make_channels(&proxy, CLIENT_KEY, 10).await;
    assert_eq!(sandbox.channels_held(), 20);

    // Each app's 11th would make the platform evict b's oldest channel without a socket.
    refused_as_too_many(&proxy, CLIENT_KEY).await;
    refused_as_too_many(&proxy, KEY_B).await;
    assert_eq!(sandbox.channels_evicted(), 0);
    assert_eq!(sandbox.channels_held(), 20);
    heartbeat(&mut b_socket).await;
    // Every one of b's channels still exists: a socket opens on the next one too.
    let mut second = open_url(&b[1], None).await.unwrap();
    heartbeat(&mut second).await;

    let status: serde_json::Value =
        serde_json::from_str(&admin_text(&proxy, "/status.json").await).unwrap();
    let clients = status["clients"].as_array().unwrap();
    for name in ["reporting-job", "b"] {
        let c = clients.iter().find(|c| c["name"] == name).unwrap();
        assert_eq!(c["channels_live"], 10, "{c}");
    }
    assert_eq!(status["upstreams"][0]["channels_live"], 20);
    assert_eq!(status["upstreams"][0]["notification_channels"], 20);
    let metrics = admin_text(&proxy, "/metrics").await;
    assert_eq!(
        metric(&metrics, "tokengate_channels_open", &["client=\"b\""]),
        10.0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn max_channels_splits_the_upstreams_channels_as_configured() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&two_apps(&sandbox, "max_channels = 15", "max_channels = 5"));
    make_channels(&proxy, CLIENT_KEY, 15).await;
    refused_as_too_many(&proxy, CLIENT_KEY).await;
    make_channels(&proxy, KEY_B, 5).await;
    refused_as_too_many(&proxy, KEY_B).await;
    assert_eq!(sandbox.channels_held(), 20);
    assert_eq!(sandbox.channels_evicted(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn at_the_platforms_total_only_the_asking_apps_own_idle_channel_gives_way() {
    let sandbox = sandbox().await;
    // Shares that add up past the platform's 20: the total decides.
    let proxy = Proxy::start(&two_apps(
        &sandbox,
        "max_channels = 19",
        "max_channels = 19",
    ));
    let b = make_channels(&proxy, KEY_B, 2).await;
    make_channels(&proxy, CLIENT_KEY, 18).await;
    // The platform would evict b's oldest: refused.
    refused_as_too_many(&proxy, CLIENT_KEY).await;
    assert_eq!(sandbox.channels_evicted(), 0);

    // b's own oldest gives way to b's new one, as the platform's rule does within one app.
    let (status, _, body) = make_channel(&proxy, KEY_B).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(sandbox.channels_evicted(), 1);
    assert_eq!(sandbox.channels_held(), 20);
    let gone = open_url(&b[0], None).await.unwrap_err();
    assert_eq!(refused_with(gone), 404);

    // With a socket on b's second, a's first is the platform's oldest without one: a's
    // next channel may replace it, and b's may not.
    let _socket = open_url(&b[1], None).await.unwrap();
    let (status, _, body) = make_channel(&proxy, CLIENT_KEY).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(sandbox.channels_evicted(), 2);
    refused_as_too_many(&proxy, KEY_B).await;
    assert_eq!(sandbox.channels_evicted(), 2);
    assert_eq!(sandbox.channels_held(), 20);
}
