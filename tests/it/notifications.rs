//! Genesys notifications through the gate (issue 14): a channel made through the proxy
//! points the app back at the proxy, whose socket is relayed to the streaming host.

use std::time::Duration;

use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

use crate::support::*;
use crate::websockets::{next_text, open_url, refused_with, Socket};

const KEY_B: &str = "tg_second-client-key-abcdefghijklmnopqrstuvwxyz";
const PRESENCE: &str = "v2.users.7e4c1b9a-0000-4000-8000-000000000001.presence";

/// The usual config, the sandbox's streaming host for notifications, and a second client.
fn notifications_config(sandbox: &Sandbox, prefix: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{}streaming_url = \"{}\"\n{}\n[[client]]\nname = \"b\"\nkey_sha256 = \"{}\"\n",
        upstream_toml(sandbox, "genesys", prefix),
        sandbox.streaming_url(),
        client_toml("reporting-job", ""),
        tokengate::front::keys::hash_key(KEY_B),
    )
}

async fn call(
    proxy: &Proxy,
    method: http::Method,
    path: &str,
    key: &str,
    body: &str,
) -> reqwest::Response {
    client()
        .request(method, proxy.url(path))
        .header("X-Api-Key", key)
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

/// `call`, and its answer's JSON.
async fn call_json(
    proxy: &Proxy,
    method: http::Method,
    path: &str,
    key: &str,
) -> serde_json::Value {
    call(proxy, method, path, key, "")
        .await
        .json()
        .await
        .unwrap()
}

/// The next frame that is not a heartbeat, as JSON.
async fn next_event(ws: &mut Socket) -> serde_json::Value {
    loop {
        let event: serde_json::Value = serde_json::from_str(&next_text(ws).await).unwrap();
        if event["eventBody"]["message"] != "WebSocket Heartbeat" {
            return event;
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_channel_made_through_the_proxy_is_opened_through_the_proxy() {
    let sandbox = sandbox_with_heartbeat(Duration::from_millis(200)).await;
    let proxy = Proxy::start(&notifications_config(&sandbox, "/genesys"));
    let made = call(
        &proxy,
        http::Method::POST,
        "/genesys/api/v2/notifications/channels",
        CLIENT_KEY,
        "",
    )
    .await;
    assert_eq!(made.status(), 200);
    let channel: serde_json::Value = made.json().await.unwrap();
    let id = channel["id"].as_str().unwrap().to_string();
    let connect = channel["connectUri"].as_str().unwrap().to_string();
    assert_eq!(
        connect,
        format!("ws://{}/genesys/channels/{id}", proxy.addr)
    );
    let subscribed = call(
        &proxy,
        http::Method::PUT,
        &format!("/genesys/api/v2/notifications/channels/{id}/subscriptions"),
        CLIENT_KEY,
        &format!("[{{\"id\": \"{PRESENCE}\"}}]"),
    )
    .await;
    assert_eq!(subscribed.status(), 200);

    // As the platform's docs say: the socket carries no credentials.
    let mut ws = open_url(&connect, None).await.unwrap();
    let heartbeat: serde_json::Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
    assert_eq!(heartbeat["topicName"], "channel.metadata");
    assert_eq!(heartbeat["eventBody"]["message"], "WebSocket Heartbeat");
    ws.send(Message::Text(r#"{"message": "ping"}"#.into()))
        .await
        .unwrap();
    assert_eq!(next_event(&mut ws).await["eventBody"]["message"], "pong");
    let sent = wait_for(Duration::from_secs(10), || {
        let n = sandbox.publish(
            PRESENCE,
            &serde_json::json!({"presenceDefinition": {"systemPresence": "Available"}}),
        );
        (n > 0).then_some(n)
    })
    .await;
    assert_eq!(sent, Some(1));
    let event = next_event(&mut ws).await;
    assert_eq!(event["topicName"], PRESENCE);
    assert_eq!(
        event["eventBody"]["presenceDefinition"]["systemPresence"],
        "Available"
    );
    assert_eq!(sandbox.streaming_seen(), [format!("/channels/{id}")]);
    // The operator sees the socket and the channel, per upstream and per client.
    let status: serde_json::Value =
        serde_json::from_str(&admin_text(&proxy, "/status.json").await).unwrap();
    assert_eq!(status["upstreams"][0]["websockets_open"], 1);
    assert_eq!(status["upstreams"][0]["channels_live"], 1);
    let maker = status["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "reporting-job")
        .unwrap();
    assert_eq!(
        (
            maker["websockets_open"].as_u64(),
            maker["channels_live"].as_u64()
        ),
        (Some(1), Some(1))
    );

    // The maker's own key is welcome too; another client's is not, nor a wrong one.
    let with_key = open_url(&connect, Some(CLIENT_KEY)).await;
    assert!(with_key.is_ok());
    let other = open_url(&connect, Some(KEY_B)).await.unwrap_err();
    assert_eq!(refused_with(other), 403);
    let wrong = open_url(&connect, Some("tg_not-a-key")).await.unwrap_err();
    assert_eq!(refused_with(wrong), 401);
    // A channel the proxy never handed out: no route, and the streaming host sees nothing.
    let made_elsewhere = format!("ws://{}/genesys/channels/streaming-0-elsewhere", proxy.addr);
    let unknown = open_url(&made_elsewhere, None).await.unwrap_err();
    assert_eq!(refused_with(unknown), 404);
    assert_eq!(
        sandbox.streaming_seen().len(),
        2,
        "the maker's two sockets only"
    );

    // A channel list shows each client its own channels only, pointing at the proxy.
    let listed: serde_json::Value = call_json(
        &proxy,
        http::Method::GET,
        "/genesys/api/v2/notifications/channels",
        CLIENT_KEY,
    )
    .await;
    let entities = listed["entities"].as_array().unwrap();
    assert_eq!(entities.len(), 1);
    assert_eq!(entities[0]["connectUri"], connect.as_str());
    let listed_b: serde_json::Value = call_json(
        &proxy,
        http::Method::GET,
        "/genesys/api/v2/notifications/channels",
        KEY_B,
    )
    .await;
    assert_eq!(listed_b["entities"].as_array().map(Vec::len), Some(0));
    // The channel id is the socket's credential: no log line carries it.
    let logs = proxy.output.text();
    assert!(!logs.contains(&id), "the channel id was logged:\n{logs}");
    assert!(logs.contains("channels/ch-"), "{logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn keyless_sockets_on_a_channel_cannot_use_up_its_makers_own_sockets() {
    let sandbox = sandbox_with_heartbeat(Duration::from_millis(200)).await;
    let config = notifications_config(&sandbox, "/genesys").replacen(
        "[server]\n",
        "[server]\nmax_websockets = 2\n",
        1,
    );
    let proxy = Proxy::start(&config);
    let made = call_json(
        &proxy,
        http::Method::POST,
        "/genesys/api/v2/notifications/channels",
        CLIENT_KEY,
    )
    .await;
    let connect = made["connectUri"].as_str().unwrap().to_string();
    // Whoever holds the id opens sockets without a key, up to the limit...
    let _bare: Vec<Socket> = vec![
        open_url(&connect, None).await.unwrap(),
        open_url(&connect, None).await.unwrap(),
    ];
    let third = open_url(&connect, None).await.unwrap_err();
    assert_eq!(refused_with(third), 429);
    // ...and the maker's own sockets, with its key, are still its own.
    let own = open_url(&connect, Some(CLIENT_KEY)).await;
    assert!(
        own.is_ok(),
        "the maker's socket was refused: {:?}",
        own.err()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn public_url_sets_the_rewritten_connect_uri() {
    let sandbox = sandbox_with_heartbeat(Duration::from_millis(200)).await;
    let config = notifications_config(&sandbox, "/").replace(
        "admin_listen = \"127.0.0.1:0\"\n",
        "admin_listen = \"127.0.0.1:0\"\npublic_url = \"https://gateway.example.com/tg\"\n",
    );
    let proxy = Proxy::start(&config);
    let channel: serde_json::Value = call_json(
        &proxy,
        http::Method::POST,
        "/api/v2/notifications/channels",
        CLIENT_KEY,
    )
    .await;
    let id = channel["id"].as_str().unwrap();
    assert_eq!(
        channel["connectUri"],
        format!("wss://gateway.example.com/tg/channels/{id}").as_str()
    );
    // The socket arrives on the path the proxy serves (a load balancer took `/tg` off).
    let mut ws = open_url(&format!("ws://{}/channels/{id}", proxy.addr), None)
        .await
        .unwrap();
    let heartbeat: serde_json::Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
    assert_eq!(heartbeat["eventBody"]["message"], "WebSocket Heartbeat");
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_sockets_for_thirty_seconds_lose_no_heartbeat_and_pass_close_codes() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    const SOCKETS: usize = 50;
    // Fifty channels: past the platform's 20 per OAuth client, set higher on both sides.
    let sandbox = Sandbox::start(SandboxOptions {
        heartbeat: Duration::from_secs(1),
        channels_per_client: SOCKETS,
        ..sandbox_options()
    })
    .await
    .unwrap();
    let config = notifications_config(&sandbox, "/").replace(
        "streaming_url =",
        &format!("notification_channels = {SOCKETS}\nstreaming_url ="),
    );
    let config = config.replacen(
        "\n[[client]]\n",
        &format!("\n[[client]]\nmax_channels = {SOCKETS}\n"),
        1,
    );
    let proxy = Proxy::start(&config);
    let mut sockets = Vec::new();
    for _ in 0..SOCKETS {
        let channel: serde_json::Value = call_json(
            &proxy,
            http::Method::POST,
            "/api/v2/notifications/channels",
            CLIENT_KEY,
        )
        .await;
        let connect = channel["connectUri"].as_str().unwrap().to_string();
        sockets.push(open_url(&connect, None).await.unwrap());
    }
    // Each socket reads for 30 s, then closes with a code of its own and reads on until
    // the streaming host's answering close: every heartbeat it was sent is counted.
    let until = tokio::time::Instant::now() + Duration::from_secs(30);
    let readers: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, mut ws)| {
            tokio::spawn(async move {
                let mut beats = 0u64;
                let code = 4000 + i as u16;
                let mut closing = false;
                loop {
                    let next = if closing {
                        tokio::time::timeout(Duration::from_secs(10), ws.next())
                            .await
                            .ok()
                    } else {
                        match tokio::time::timeout_at(until, ws.next()).await {
                            Ok(next) => Some(next),
                            Err(_) => {
                                let frame = CloseFrame {
                                    code: CloseCode::from(code),
                                    reason: "done".into(),
                                };
                                ws.close(Some(frame)).await.unwrap();
                                closing = true;
                                continue;
                            }
                        }
                    };
                    match next {
                        Some(Some(Ok(Message::Text(t))))
                            if t.as_str().contains("WebSocket Heartbeat") =>
                        {
                            beats += 1
                        }
                        Some(Some(Ok(Message::Close(frame)))) => {
                            return (beats, frame.map(|f| u16::from(f.code)), code)
                        }
                        Some(Some(Ok(_))) => {}
                        other => panic!("socket {i} ended without a close: {other:?}"),
                    }
                }
            })
        })
        .collect();
    let mut received = 0;
    for reader in readers {
        let (beats, echoed, sent) = reader.await.unwrap();
        assert!(beats >= 25, "{beats} heartbeats in 30 s");
        assert_eq!(echoed, Some(sent), "the close code came back");
        received += beats;
    }
    assert_eq!(
        received,
        sandbox.heartbeats_sent(),
        "every heartbeat arrived"
    );
    let peak = proxy.peak_rss();
    eprintln!(
        "{SOCKETS} sockets, {received} heartbeats, peak RSS {} MiB",
        peak >> 20
    );
    assert!(peak < 64 << 20, "peak RSS {peak}");
}
