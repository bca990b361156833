//! WebSockets through the gate (issue 14): the handshake meets the gate like any call, and
//! the socket is relayed both ways, close codes included, within its limits.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::support::*;

/// What the WebSocket host saw of one socket.
#[derive(Debug, Clone, Default)]
struct SeenSocket {
    path: String,
    authorization: Option<String>,
    api_key: Option<String>,
    /// The close code the caller sent, once it closed.
    close_code: Option<u16>,
}

/// A WebSocket host: echoes text frames; on `close-me` closes with 4001; records what it
/// saw of each socket.
struct WsHost {
    addr: std::net::SocketAddr,
    seen: Arc<Mutex<Vec<SeenSocket>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WsHost {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[allow(clippy::result_large_err)] // tungstenite's handshake callback type
async fn ws_host() -> WsHost {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<SeenSocket>>> = Arc::default();
    let record = Arc::clone(&seen);
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let mut socket = SeenSocket::default();
                let callback =
                    |req: &tungstenite::handshake::server::Request,
                     resp: tungstenite::handshake::server::Response| {
                        let header = |name: &str| {
                            req.headers()
                                .get(name)
                                .map(|v| v.to_str().unwrap().to_string())
                        };
                        socket.path = req.uri().to_string();
                        socket.authorization = header("authorization");
                        socket.api_key = header("x-api-key");
                        Ok(resp)
                    };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
                    return;
                };
                let index = {
                    let mut seen = record.lock().unwrap();
                    seen.push(socket);
                    seen.len() - 1
                };
                while let Some(Ok(message)) = ws.next().await {
                    match message {
                        Message::Text(t) if t.as_str() == "close-me" => {
                            let frame = CloseFrame {
                                code: CloseCode::from(4001),
                                reason: "bye".into(),
                            };
                            let _ = ws.close(Some(frame)).await;
                        }
                        Message::Text(t) => {
                            let _ = ws.send(Message::Text(t)).await;
                        }
                        Message::Close(frame) => {
                            record.lock().unwrap()[index].close_code =
                                frame.map(|f| u16::from(f.code));
                        }
                        _ => {}
                    }
                }
            });
        }
    });
    WsHost { addr, seen, task }
}

/// The sandbox's login host for tokens, the WebSocket host as the API host.
fn ws_config(sandbox: &Sandbox, host: &WsHost, server_extra: &str) -> String {
    let upstream = upstream_toml(sandbox, "genesys", "/").replace(
        &format!("base_url = \"{}\"", sandbox.api_url()),
        &format!("base_url = \"http://{}\"", host.addr),
    );
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{server_extra}\n{upstream}\n{}",
        client_toml("reporting-job", "")
    )
}

pub type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Open a WebSocket to `path` through the proxy, with `key` if given.
async fn open(proxy: &Proxy, path: &str, key: Option<&str>) -> Result<Socket, tungstenite::Error> {
    open_url(&format!("ws://{}{path}", proxy.addr), key).await
}

/// Open a WebSocket on `url` (`ws://host:port/...`), with `key` if given.
pub async fn open_url(url: &str, key: Option<&str>) -> Result<Socket, tungstenite::Error> {
    use tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().unwrap();
    if let Some(key) = key {
        req.headers_mut()
            .insert("x-api-key", http::HeaderValue::from_str(key).unwrap());
    }
    let host = req.uri().authority().unwrap().as_str().to_string();
    let tcp = tokio::net::TcpStream::connect(host).await.unwrap();
    tokio_tungstenite::client_async(req, tcp)
        .await
        .map(|(ws, _)| ws)
}

/// The status the proxy answered a refused handshake with.
pub fn refused_with(e: tungstenite::Error) -> u16 {
    match e {
        tungstenite::Error::Http(resp) => resp.status().as_u16(),
        other => panic!("not refused with an HTTP answer: {other}"),
    }
}

pub async fn next_text(ws: &mut Socket) -> String {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return t.to_string(),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            other => panic!("expected a text frame: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_websocket_passes_the_gate_and_is_relayed_both_ways_with_close_codes() {
    let sandbox = sandbox().await;
    let host = ws_host().await;
    let proxy = Proxy::start(&ws_config(&sandbox, &host, ""));
    // Without a key the handshake is refused like any call, and never reaches the host.
    assert_eq!(
        refused_with(open(&proxy, "/socket", None).await.unwrap_err()),
        401
    );
    assert!(host.seen.lock().unwrap().is_empty());

    let mut ws = open(&proxy, "/socket?topic=a", Some(CLIENT_KEY))
        .await
        .unwrap();
    ws.send(Message::Text("hello".into())).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "hello");
    let seen = host.seen.lock().unwrap()[0].clone();
    assert_eq!(seen.path, "/socket?topic=a");
    assert_eq!(seen.api_key, None, "the client's key is never forwarded");
    let bearer = seen.authorization.expect("the proxy's bearer token");
    assert!(sandbox.issued(&http::HeaderValue::from_str(&bearer).unwrap()));

    let metrics = admin_text(&proxy, "/metrics").await;
    assert_eq!(
        metric(&metrics, "tokengate_websockets_open", &["reporting-job"]),
        1.0
    );

    // Closed by the caller: the host gets its close code.
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4000),
        reason: "done".into(),
    }))
    .await
    .unwrap();
    wait_for(Duration::from_secs(10), || {
        host.seen.lock().unwrap()[0].close_code
    })
    .await
    .map(|code| assert_eq!(code, 4000))
    .expect("the host saw the close");
    drop(ws);

    // Closed by the host: the caller gets its close code.
    let mut ws = open(&proxy, "/socket", Some(CLIENT_KEY)).await.unwrap();
    ws.send(Message::Text("close-me".into())).await.unwrap();
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => break frame,
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a close frame: {other:?}"),
        }
    };
    assert_eq!(closed.map(|f| u16::from(f.code)), Some(4001));
    drop(ws);
    let admin = proxy.admin_url("/metrics");
    let gone = wait_for_async(Duration::from_secs(10), || {
        let admin = admin.clone();
        async move {
            let text = client().get(admin).send().await.ok()?.text().await.ok()?;
            (metric(&text, "tokengate_websockets_open", &["reporting-job"]) == 0.0).then_some(())
        }
    })
    .await;
    assert!(gone.is_some(), "the gauge went back to 0");
    // Bytes each way, counted as the sockets ended: at least the frames sent.
    let metrics = admin_text(&proxy, "/metrics").await;
    let up = metric(&metrics, "tokengate_websocket_bytes_total", &["\"up\""]);
    let down = metric(&metrics, "tokengate_websocket_bytes_total", &["\"down\""]);
    assert!(up >= 20.0 && down >= 10.0, "up {up}, down {down}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_holds_at_most_max_websockets_and_idle_sockets_are_closed() {
    let sandbox = sandbox().await;
    let host = ws_host().await;
    let proxy = Proxy::start(&ws_config(
        &sandbox,
        &host,
        "max_websockets = 2\nwebsocket_idle_secs = 1",
    ));
    let mut first = open(&proxy, "/a", Some(CLIENT_KEY)).await.unwrap();
    let _second = open(&proxy, "/b", Some(CLIENT_KEY)).await.unwrap();
    let third = open(&proxy, "/c", Some(CLIENT_KEY)).await.unwrap_err();
    assert_eq!(refused_with(third), 429);
    // The host notes a socket just after its handshake: wait for the two, then check that
    // the third never came.
    wait_for(Duration::from_secs(10), || {
        (host.seen.lock().unwrap().len() >= 2).then_some(())
    })
    .await
    .expect("two sockets at the host");
    assert_eq!(
        host.seen.lock().unwrap().len(),
        2,
        "the third never reached the host"
    );
    // Nobody sends anything: after websocket_idle_secs the proxy closes the socket.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match first.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the idle socket was not closed");
    // Its place is given back: a new socket is admitted.
    let admitted = wait_for_async(Duration::from_secs(10), || async {
        open(&proxy, "/d", Some(CLIENT_KEY)).await.ok()
    })
    .await;
    assert!(admitted.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_token_query_puts_the_token_in_the_query_and_never_in_a_log() {
    let sandbox = sandbox().await;
    let host = ws_host().await;
    let config = ws_config(&sandbox, &host, "").replace(
        "client_secret = \"${SANDBOX_SECRET}\"\n",
        "client_secret = \"${SANDBOX_SECRET}\"\nwebsocket_token = \"query:access_token\"\n",
    );
    let proxy = Proxy::start(&config);
    let mut ws = open(
        &proxy,
        "/socket?x=1&access_token=the-callers-own",
        Some(CLIENT_KEY),
    )
    .await
    .unwrap();
    ws.send(Message::Text("hello".into())).await.unwrap();
    assert_eq!(next_text(&mut ws).await, "hello");
    let seen = host.seen.lock().unwrap()[0].clone();
    assert_eq!(seen.authorization, None, "the token went into the query");
    let token = sandbox.issued_tokens().pop().expect("a token");
    let expected = format!("/socket?x=1&access_token={token}");
    assert_eq!(seen.path, expected);
    // Wait for the handshake's audit line, then look for the token in everything logged.
    let output = proxy.output.clone();
    wait_for(Duration::from_secs(5), || {
        output.text().contains("path=/socket").then_some(())
    })
    .await
    .expect("the audit line");
    assert!(!output.text().contains(&token), "the token in a log line");
    assert!(!output.text().contains("the-callers-own"));
}
