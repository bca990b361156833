//! Genesys Cloud's notification service, as its developer docs ("Notifications") and the
//! Java SDK's `NotificationHandler` describe it:
//!
//! - on the API host, `POST /api/v2/notifications/channels` makes a channel:
//!   `{"connectUri": "wss://streaming.<domain>/channels/<id>", "id", "expires"}` (here the
//!   streaming host is `ws://127.0.0.1:<port>`); `GET` lists the channels;
//!   `PUT /api/v2/notifications/channels/{id}/subscriptions` with `[{"id": topic}]`
//!   subscribes topics;
//! - the streaming host takes a WebSocket on `/channels/<id>` with no `Authorization`
//!   (the channel id is the credential; an unknown one gets 404), sends a heartbeat
//!   (`channel.metadata`, `"WebSocket Heartbeat"`) every `heartbeat` (30 s on the platform),
//!   answers a `{"message": "ping"}` text frame with a `pong`, and sends the events of the
//!   subscribed topics as `{"topicName", "eventBody"}`;
//! - an OAuth client holds at most 20 channels: a 21st silently removes the oldest channel
//!   with no socket open (developer forum, "notification channel limit"); with a socket
//!   on every one, the 21st is refused (400; the forum does not say what the platform
//!   does then). `HEAD /api/v2/notifications/channels/{id}` says whether one exists.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tokio_tungstenite::tungstenite::handshake::server::Response as WsResponse;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request as WsRequest};
use tokio_tungstenite::tungstenite::Message;

use crate::{json, lock, Body, State};

/// Channels per user and OAuth client on the platform (every channel here is the one
/// client's), the default of [`crate::SandboxOptions::channels_per_client`].
pub const CHANNELS_PER_CLIENT: usize = 20;

/// One channel: its topics, the sockets open on it, and its place in the order made.
#[derive(Default)]
pub(crate) struct Channel {
    topics: Vec<String>,
    sockets: Vec<mpsc::UnboundedSender<String>>,
    made: u64,
}

/// The notification service's state, shared by the API host and the streaming host.
#[derive(Default)]
pub(crate) struct Notifications {
    pub(crate) channels: std::sync::Mutex<HashMap<String, Channel>>,
    /// The request target of every socket that reached the streaming host.
    pub(crate) seen: std::sync::Mutex<Vec<String>>,
    /// `ws://host:port` of the streaming host, once it listens.
    pub(crate) url: std::sync::OnceLock<String>,
    /// Heartbeats written to sockets so far.
    pub(crate) heartbeats: std::sync::atomic::AtomicU64,
    /// Channels made so far (the order of the next), and removed for a newer one.
    pub(crate) made: std::sync::atomic::AtomicU64,
    pub(crate) evicted: std::sync::atomic::AtomicU64,
    /// Channels the OAuth client may hold (see [`CHANNELS_PER_CLIENT`]).
    pub(crate) limit: std::sync::atomic::AtomicUsize,
}

/// `connectUri`, `id` and `expires` of a channel.
fn channel_json(n: &Notifications, id: &str) -> serde_json::Value {
    serde_json::json!({
        "connectUri": format!("{}/channels/{id}", n.url.get().map(String::as_str).unwrap_or("")),
        "id": id,
        "expires": "2099-01-01T00:00:00.000Z",
    })
}

/// The API host's notification endpoints; any other request is handed back.
pub(crate) async fn answer(
    s: &State,
    req: Request<Incoming>,
) -> Result<Response<Body>, Request<Incoming>> {
    use http_body_util::BodyExt;
    let n = &s.notifications;
    let path = req.uri().path().to_string();
    let Some(rest) = path.strip_prefix("/api/v2/notifications/channels") else {
        return Err(req);
    };
    match (req.method().clone(), rest) {
        (Method::POST, "") => {
            use std::sync::atomic::Ordering;
            let id = format!("streaming-0-{}", hex::encode(rand::random::<[u8; 12]>()));
            let mut channels = lock(&n.channels);
            if channels.len() >= n.limit.load(Ordering::SeqCst) {
                let oldest_idle = channels
                    .iter_mut()
                    .filter_map(|(id, c)| {
                        c.sockets.retain(|s| !s.is_closed());
                        c.sockets.is_empty().then_some((c.made, id.clone()))
                    })
                    .min();
                let Some((_, evicted)) = oldest_idle else {
                    return Ok(json(
                        StatusCode::BAD_REQUEST,
                        serde_json::json!({"message": "channel limit reached", "code": "bad.request", "status": 400}),
                    ));
                };
                channels.remove(&evicted);
                n.evicted.fetch_add(1, Ordering::SeqCst);
            }
            let made = n.made.fetch_add(1, Ordering::SeqCst);
            channels.insert(
                id.clone(),
                Channel {
                    made,
                    ..Channel::default()
                },
            );
            drop(channels);
            Ok(json(StatusCode::OK, channel_json(n, &id)))
        }
        (Method::HEAD, id) if id.len() > 1 && !id[1..].contains('/') => {
            let status = if lock(&n.channels).contains_key(&id[1..]) {
                StatusCode::OK
            } else {
                StatusCode::NOT_FOUND
            };
            Ok(json(status, serde_json::json!({})))
        }
        (Method::GET, "") => {
            let ids: Vec<String> = lock(&n.channels).keys().cloned().collect();
            let entities: Vec<_> = ids.iter().map(|id| channel_json(n, id)).collect();
            Ok(json(
                StatusCode::OK,
                serde_json::json!({ "entities": entities }),
            ))
        }
        (Method::PUT, rest) if rest.ends_with("/subscriptions") => {
            let id = rest
                .trim_start_matches('/')
                .trim_end_matches("/subscriptions")
                .to_string();
            let body = req.into_body().collect().await.map(|b| b.to_bytes());
            let topics: Vec<String> = body
                .ok()
                .and_then(|b| serde_json::from_slice::<Vec<serde_json::Value>>(&b).ok())
                .unwrap_or_default()
                .iter()
                .filter_map(|t| t["id"].as_str().map(str::to_string))
                .collect();
            let mut channels = lock(&n.channels);
            let Some(channel) = channels.get_mut(&id) else {
                return Ok(json(
                    StatusCode::NOT_FOUND,
                    serde_json::json!({"message": "channel not found", "code": "not.found", "status": 404}),
                ));
            };
            channel.topics = topics.clone();
            let entities: Vec<_> = topics
                .iter()
                .map(|t| serde_json::json!({"id": t}))
                .collect();
            Ok(json(
                StatusCode::OK,
                serde_json::json!({ "entities": entities }),
            ))
        }
        _ => Err(req),
    }
}

/// Publish `event` on `topic` to every socket of a channel subscribed to it; how many
/// sockets it was sent to.
pub(crate) fn publish(n: &Notifications, topic: &str, event: &serde_json::Value) -> usize {
    let text = serde_json::json!({"topicName": topic, "eventBody": event}).to_string();
    let mut sent = 0;
    for channel in lock(&n.channels).values_mut() {
        if channel.topics.iter().any(|t| t == topic) {
            channel.sockets.retain(|s| s.send(text.clone()).is_ok());
            sent += channel.sockets.len();
        }
    }
    sent
}

/// The streaming host: WebSockets on `/channels/<id>`.
pub(crate) fn serve(
    listener: TcpListener,
    n: Arc<Notifications>,
    heartbeat: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut sockets = JoinSet::new();
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(_) => continue,
                },
                Some(_) = sockets.join_next(), if !sockets.is_empty() => continue,
            };
            let n = Arc::clone(&n);
            sockets.spawn(socket(stream, n, heartbeat));
        }
    })
}

#[allow(clippy::result_large_err)] // tungstenite's handshake callback type
async fn socket(stream: tokio::net::TcpStream, n: Arc<Notifications>, heartbeat: Duration) {
    let mut channel_id = None;
    let check = |req: &WsRequest, resp: WsResponse| -> Result<WsResponse, ErrorResponse> {
        let target = req.uri().to_string();
        lock(&n.seen).push(target.clone());
        let id = target.strip_prefix("/channels/").unwrap_or("");
        if !lock(&n.channels).contains_key(id) {
            let mut refused = ErrorResponse::new(Some("channel not found".into()));
            *refused.status_mut() = StatusCode::NOT_FOUND;
            return Err(refused);
        }
        channel_id = Some(id.to_string());
        Ok(resp)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, check).await else {
        return;
    };
    let Some(id) = channel_id else { return };
    let (events, mut queued) = mpsc::unbounded_channel();
    if let Some(channel) = lock(&n.channels).get_mut(&id) {
        channel.sockets.push(events);
    }
    let (mut out, mut incoming) = ws.split();
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + heartbeat, heartbeat);
    let metadata = |message: &str| {
        serde_json::json!({"topicName": "channel.metadata", "eventBody": {"message": message}})
            .to_string()
    };
    loop {
        let sent = tokio::select! {
            _ = beat.tick() => {
                let sent = out.send(Message::Text(metadata("WebSocket Heartbeat").into())).await;
                if sent.is_ok() {
                    n.heartbeats.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                sent
            }
            Some(event) = queued.recv() => out.send(Message::Text(event.into())).await,
            message = incoming.next() => match message {
                Some(Ok(Message::Text(t))) => {
                    let ping = serde_json::from_str::<serde_json::Value>(t.as_str())
                        .is_ok_and(|v| v["message"] == "ping");
                    if ping {
                        out.send(Message::Text(metadata("pong").into())).await
                    } else {
                        Ok(())
                    }
                }
                // tungstenite queued the answering close (the same code): send it.
                Some(Ok(Message::Close(_))) => {
                    let _ = out.flush().await;
                    let _ = out.close().await;
                    return;
                }
                Some(Ok(_)) => Ok(()),
                Some(Err(_)) | None => return,
            },
        };
        if sent.is_err() {
            return;
        }
    }
}
