//! Genesys Cloud notifications through the gate.
//!
//! An app makes a channel with `POST /api/v2/notifications/channels` and is told to open a
//! WebSocket on `connectUri`, `wss://streaming.<region domain>/channels/<id>`: a host an
//! app that can reach only the proxy cannot reach. So the proxy rewrites `connectUri` to
//! itself (`ws`/`wss` as the app called it, the `Host` it called or `[server] public_url`,
//! the upstream's prefix, then `/channels/<id>`), remembers which client made the channel,
//! and relays a WebSocket on that path to `<streaming_url>/channels/<id>`.
//!
//! The channel id is the socket's credential (the platform wants no `Authorization` on
//! it), so a socket may come without a client key: it then acts as the channel's maker.
//! A channel the proxy did not hand out is `404 no_route` (the streaming host never sees
//! the socket); a key of another client is `403 forbidden`. A channel list
//! (`GET …/channels`) shows a client only its own channels, rewritten the same way.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{header, HeaderValue, Method, Uri};
use tower::{Layer, Service};

use crate::back::websocket::{self, Sockets};
use crate::call::error::ProxyError;
use crate::call::messages::Caller;
use crate::call::messages::{KeylessSocket, UnresolvedChannel};
use crate::call::{BoxFuture, ProxyRequest, ProxyResponse};
use crate::http::body;
use crate::outbound::connections::Origin;
use crate::token::shared::SharedCache;
use crate::upstream::WorkerUpstream;
use arc_swap::ArcSwapOption;

/// Where apps make and list channels (within the upstream).
const CHANNELS: &str = "/api/v2/notifications/channels";
/// Channels live 24 h on the platform; the proxy forgets them after that.
const CHANNEL_LIFE: Duration = Duration::from_secs(24 * 3600);
/// The largest channel answer the proxy rewrites (a list of a few hundred channels).
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

/// A channel made through the proxy.
#[derive(Debug, Clone)]
pub struct Channel {
    pub upstream: Arc<str>,
    /// The client that made it; `None` for an anonymous caller.
    pub client: Option<Arc<str>>,
    made: Instant,
}

/// The channels made through this proxy, by the socket path it handed out
/// (`<prefix>/channels/<id>`). One for the process: a reload keeps them. With `[cache]`
/// the fleet shares them through Redis (sealed like tokens, under a hash of the path), so
/// a socket may land on another replica than the one that made its channel.
#[derive(Default)]
pub struct Channels {
    by_path: Mutex<HashMap<String, Channel>>,
    fleet: Arc<ArcSwapOption<SharedCache>>,
}

impl std::fmt::Debug for Channels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channels").finish_non_exhaustive()
    }
}

/// A channel as the fleet stores it.
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    upstream: String,
    client: Option<String>,
    made_unix: u64,
}

/// The Redis name of a channel's entry: a hash, so Redis never sees a channel id (the
/// socket's credential).
fn fleet_name(path: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(path.as_bytes());
    format!("channel:{}", hex::encode(&digest[..16]))
}

impl Channels {
    /// `fleet`: the fleet's Redis, when `[cache]` is configured (it may change on reload).
    pub fn new(fleet: Arc<ArcSwapOption<SharedCache>>) -> Arc<Channels> {
        Arc::new(Channels {
            by_path: Mutex::default(),
            fleet,
        })
    }

    /// Whether channels made by other replicas can be looked up.
    pub fn shared(&self) -> bool {
        self.fleet.load().is_some()
    }

    /// The channel whose socket path is `path`: this replica's, else the fleet's.
    pub async fn resolve(&self, path: &str) -> Option<Channel> {
        if let Some(channel) = self.socket(path) {
            return Some(channel);
        }
        let fleet = self.fleet.load_full()?;
        let plain = fleet.get_sealed(&fleet_name(path)).await.ok()??;
        let stored: Stored = serde_json::from_slice(&plain).ok()?;
        let now_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_secs();
        let age = Duration::from_secs(now_unix.saturating_sub(stored.made_unix));
        let channel = Channel {
            upstream: Arc::from(stored.upstream),
            client: stored.client.map(Arc::from),
            made: Instant::now().checked_sub(age)?,
        };
        self.by_path
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.to_string(), channel.clone());
        Some(channel)
    }

    /// The channel whose socket path (as the proxy handed it out) is `path`.
    pub fn socket(&self, path: &str) -> Option<Channel> {
        let by_path = self.by_path.lock().unwrap_or_else(|p| p.into_inner());
        by_path
            .get(path)
            .filter(|c| c.made.elapsed() < CHANNEL_LIFE)
            .cloned()
    }

    /// Remember a channel made here, and tell the fleet (before the app is answered, so
    /// its socket finds the channel on any replica).
    async fn remember(&self, path: String, channel: Channel) {
        if let Some(fleet) = self.fleet.load_full() {
            let stored = Stored {
                upstream: channel.upstream.to_string(),
                client: channel.client.as_deref().map(str::to_owned),
                made_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            };
            if let Ok(plain) = serde_json::to_vec(&stored) {
                // Redis down: the channel works on this replica only.
                let _ = fleet
                    .put_sealed(&fleet_name(&path), &plain, CHANNEL_LIFE)
                    .await;
            }
        }
        let mut by_path = self.by_path.lock().unwrap_or_else(|p| p.into_inner());
        by_path.retain(|_, c| c.made.elapsed() < CHANNEL_LIFE);
        by_path.insert(path, channel);
    }

    /// Live channels by (upstream, client), for the status page.
    pub fn snapshot(&self) -> Vec<(Arc<str>, Option<Arc<str>>)> {
        let by_path = self.by_path.lock().unwrap_or_else(|p| p.into_inner());
        by_path
            .values()
            .filter(|c| c.made.elapsed() < CHANNEL_LIFE)
            .map(|c| (Arc::clone(&c.upstream), c.client.clone()))
            .collect()
    }
}

/// The name a client's keyless channel sockets are counted under for `max_websockets`:
/// apart from its own, so sockets anyone holding a channel id opens cannot use up the
/// sockets of the client that made the channel.
pub fn keyless_sockets_of(client: &str) -> Arc<str> {
    Arc::from(format!("{client} (keyless channel sockets)"))
}

/// Does `path` look like a channel socket's (`…/channels/<id>`)?
pub fn is_socket_path(path: &str) -> bool {
    path.rsplit_once("/channels/")
        .is_some_and(|(_, id)| !id.is_empty() && !id.contains('/'))
}

/// Where an upstream's notification sockets go, and how its channels are shown to apps.
#[derive(Debug, Clone)]
pub struct NotificationsLayer {
    upstream: WorkerUpstream,
    streaming: Arc<Origin>,
    public_url: Option<Uri>,
    /// Whether the proxy listener is HTTPS (`wss` in rewritten URIs).
    tls: bool,
    channels: Arc<Channels>,
    sockets: Arc<Sockets>,
}

impl NotificationsLayer {
    pub fn new(
        upstream: &WorkerUpstream,
        streaming: Arc<Origin>,
        public_url: Option<Uri>,
        tls: bool,
        channels: &Arc<Channels>,
        sockets: &Arc<Sockets>,
    ) -> NotificationsLayer {
        NotificationsLayer {
            upstream: upstream.clone(),
            streaming,
            public_url,
            tls,
            channels: Arc::clone(channels),
            sockets: Arc::clone(sockets),
        }
    }
}

impl<S> Layer<S> for NotificationsLayer {
    type Service = Notifications<S>;

    fn layer(&self, inner: S) -> Notifications<S> {
        Notifications {
            inner,
            config: Arc::new(self.clone()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Notifications<S> {
    inner: S,
    config: Arc<NotificationsLayer>,
}

impl<S> Service<ProxyRequest> for Notifications<S>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = ProxyResponse;
    type Error = Infallible;
    /// Every other call passes straight through, with no allocation of its own.
    type Future = futures_util::future::Either<S::Future, BoxFuture>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ProxyRequest) -> Self::Future {
        use futures_util::future::Either;
        let path = req.uri().path();
        if websocket::is_handshake(req.method(), req.version(), req.headers())
            && is_socket_path(path)
        {
            return Either::Right(Box::pin(socket(Arc::clone(&self.config), req)));
        }
        let lists = path == CHANNELS && matches!(*req.method(), Method::POST | Method::GET);
        if !lists {
            return Either::Left(self.inner.call(req));
        }
        let config = Arc::clone(&self.config);
        let base = config.socket_base(&req);
        let caller = caller_name(&req);
        let listing = req.method() == Method::GET;
        // Boxed here, outside the async block: rustc cannot prove a generic future `Send`
        // inside one (rust-lang/rust#110338).
        let answer: BoxFuture = Box::pin(self.inner.call(req));
        Either::Right(Box::pin(async move {
            let resp = answer.await?;
            Ok(rewrite_channels(&config, resp, base, caller, listing).await)
        }))
    }
}

/// The calling client's name; `None` for an anonymous caller.
fn caller_name(req: &ProxyRequest) -> Option<Arc<str>> {
    match req.extensions().get::<Caller>() {
        Some(Caller(Some(client))) => Some(Arc::clone(&client.name)),
        _ => None,
    }
}

impl NotificationsLayer {
    /// The upstream's prefix as it starts a path: empty for `/`.
    fn prefix(&self) -> &str {
        match self.upstream.config.prefix.as_str() {
            "/" => "",
            p => p,
        }
    }

    /// `ws[s]://host[/public path]<prefix>`: what `/channels/<id>` is appended to in a
    /// rewritten `connectUri`; and `<prefix>`, the start of the path the socket will
    /// arrive on, which the channel is remembered under.
    fn socket_base(&self, req: &ProxyRequest) -> (String, String) {
        let prefix = self.prefix();
        if let Some(public) = &self.public_url {
            let scheme = if public.scheme() == Some(&http::uri::Scheme::HTTPS) {
                "wss"
            } else {
                "ws"
            };
            let authority = public.authority().map(|a| a.as_str()).unwrap_or("");
            let path = public.path().trim_end_matches('/');
            return (
                format!("{scheme}://{authority}{path}{prefix}"),
                prefix.to_string(),
            );
        }
        let scheme = if self.tls { "wss" } else { "ws" };
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()))
            .unwrap_or("localhost");
        (format!("{scheme}://{host}{prefix}"), prefix.to_string())
    }
}

/// Rewrite a channel answer's `connectUri`s to the proxy; remember a made channel, and
/// show a list only the caller's own channels. Anything unexpected passes unchanged.
async fn rewrite_channels(
    config: &NotificationsLayer,
    resp: ProxyResponse,
    (base, key_base): (String, String),
    caller: Option<Arc<str>>,
    listing: bool,
) -> ProxyResponse {
    if !resp.status().is_success() {
        return resp;
    }
    let (mut head, incoming) = resp.into_parts();
    let bytes = match body::read_small(incoming, MAX_ANSWER_BYTES).await {
        Some(bytes) => bytes,
        None => {
            let e = ProxyError::UpstreamUnreachable(
                "the notification channel answer could not be read whole".into(),
            );
            tracing::warn!(upstream = %config.upstream.name(), "{e}");
            return e.into_response();
        }
    };
    let rewritten = Rewrite {
        config,
        base: &base,
        key_base: &key_base,
        caller: &caller,
    }
    .answer(&bytes, listing);
    let Some((body, made)) = rewritten else {
        return http::Response::from_parts(head, body::full(bytes));
    };
    if let Some((path, channel)) = made {
        config.channels.remember(path, channel).await;
    }
    head.headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    http::Response::from_parts(head, body::full(body))
}

/// What a channel answer is rewritten with.
struct Rewrite<'a> {
    config: &'a NotificationsLayer,
    base: &'a str,
    key_base: &'a str,
    caller: &'a Option<Arc<str>>,
}

impl Rewrite<'_> {
    /// The rewritten answer, and the channel made (to remember); `None` if it is not the
    /// JSON expected.
    #[allow(clippy::type_complexity)]
    fn answer(&self, bytes: &[u8], listing: bool) -> Option<(Bytes, Option<(String, Channel)>)> {
        let mut answer: serde_json::Value = serde_json::from_slice(bytes).ok()?;
        let mut made = None;
        if listing {
            let entities = answer.get_mut("entities")?.as_array_mut()?;
            entities.retain_mut(|channel| self.listed(channel));
        } else {
            let path = self.point_at_proxy(&mut answer)?;
            let channel = Channel {
                upstream: Arc::clone(self.config.upstream.name()),
                client: self.caller.clone(),
                made: Instant::now(),
            };
            made = Some((path, channel));
        }
        Some((Bytes::from(answer.to_string()), made))
    }

    /// A listed channel is shown (pointing at the proxy) only if the caller made it here.
    fn listed(&self, channel: &mut serde_json::Value) -> bool {
        let mut shown = channel.clone();
        let Some(path) = self.point_at_proxy(&mut shown) else {
            return false;
        };
        let mine = self
            .config
            .channels
            .socket(&path)
            .is_some_and(|c| &c.client == self.caller);
        if mine {
            *channel = shown;
        }
        mine
    }

    /// Point one channel's `connectUri` at the proxy; the socket path it will arrive on.
    fn point_at_proxy(&self, channel: &mut serde_json::Value) -> Option<String> {
        let id = channel.get("id")?.as_str()?.to_owned();
        if id.is_empty() || id.contains(['/', '?', '#', '%']) {
            return None;
        }
        channel["connectUri"] = serde_json::Value::String(format!("{}/channels/{id}", self.base));
        Some(format!("{}/channels/{id}", self.key_base))
    }
}

/// A WebSocket on a channel's path: relayed to the streaming host if the channel was made
/// here by this caller.
async fn socket(
    config: Arc<NotificationsLayer>,
    mut req: ProxyRequest,
) -> Result<ProxyResponse, Infallible> {
    let within = req.uri().path().to_string();
    let Some(channel) = config
        .channels
        .resolve(&format!("{}{within}", config.prefix()))
        .await
    else {
        return Ok(ProxyError::NoRoute.into_response());
    };
    // A bare socket on a channel another replica made: it acts as the channel's maker.
    let unresolved = req.extensions_mut().remove::<UnresolvedChannel>().is_some();
    let keyless = unresolved || req.extensions_mut().remove::<KeylessSocket>().is_some();
    let caller = if unresolved {
        channel.client.clone()
    } else {
        caller_name(&req)
    };
    if channel.client != caller {
        return Ok(ProxyError::Forbidden(
            "this notification channel was made by another client".into(),
        )
        .into_response());
    }
    // The channel id is the socket's credential: no token goes to the streaming host.
    req.headers_mut().remove(header::AUTHORIZATION);
    let Ok(path) = PathAndQuery::try_from(within.as_str()) else {
        return Ok(ProxyError::BadRequest("the channel path cannot be forwarded").into_response());
    };
    let path = match config.streaming.path(&path) {
        Ok(path) => path,
        Err(_) => {
            return Ok(
                ProxyError::BadRequest("the channel path cannot be forwarded").into_response(),
            )
        }
    };
    let caller = caller.unwrap_or_else(|| Arc::from(""));
    let counted_as = if keyless {
        keyless_sockets_of(&caller)
    } else {
        caller
    };
    crate::back::forward::handshake(
        config.upstream.clone(),
        Arc::clone(&config.sockets),
        Arc::clone(&config.streaming),
        path,
        counted_as,
        req,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_end_in_a_channel_id() {
        assert!(is_socket_path("/channels/streaming-0-abc"));
        assert!(is_socket_path("/genesys/channels/x"));
        assert!(!is_socket_path("/channels/"));
        assert!(!is_socket_path("/channels/a/b"));
        assert!(!is_socket_path("/api/v2/notifications/channels"));
    }
}
