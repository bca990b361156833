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
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::PathAndQuery;
use http::{header, HeaderValue, Method, Uri};
use tower::{Layer, Service};

use crate::back::channels::{resolve, Claim};
pub use crate::back::channels::{Channel, Channels};
use crate::back::websocket::{self, Sockets};
use crate::call::error::ProxyError;
use crate::call::messages::Caller;
use crate::call::messages::{KeylessSocket, UnresolvedChannel};
use crate::call::{BoxFuture, ProxyRequest, ProxyResponse};
use crate::config::Config;
use crate::http::body;
use crate::outbound::connections::Origin;
use crate::upstream::WorkerUpstream;

/// Where apps make and list channels (within the upstream).
const CHANNELS: &str = "/api/v2/notifications/channels";
/// The largest channel answer the proxy rewrites (a list of a few hundred channels).
const MAX_ANSWER_BYTES: usize = 1024 * 1024;

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
    /// The channels each client may hold here (see [`Config::channel_share`]).
    shares: Arc<HashMap<Arc<str>, u32>>,
}

impl NotificationsLayer {
    pub fn new(
        upstream: &WorkerUpstream,
        streaming: Arc<Origin>,
        config: &Config,
        channels: &Arc<Channels>,
        sockets: &Arc<Sockets>,
    ) -> NotificationsLayer {
        let shares = config
            .clients
            .iter()
            .filter_map(|c| {
                let share = config.channel_share(&upstream.config, c)?;
                Some((Arc::clone(&c.name), share))
            })
            .collect();
        NotificationsLayer {
            upstream: upstream.clone(),
            streaming,
            public_url: config.server.public_url.clone(),
            tls: config.server.tls.is_some(),
            channels: Arc::clone(channels),
            sockets: Arc::clone(sockets),
            shares: Arc::new(shares),
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
        let claim = if listing {
            None
        } else {
            // Counted before it reaches the platform, which would evict another app's
            // channel to make room for it.
            let share = caller.as_ref().and_then(|c| config.shares.get(c).copied());
            let total = config.upstream.config.notification_channels;
            match config
                .channels
                .claim(config.upstream.name(), caller.as_ref(), share, total)
            {
                Ok(claim) => Some(claim),
                Err(refused) => {
                    tracing::info!(upstream = %config.upstream.name(), client = caller.as_deref().unwrap_or(""), "{refused}");
                    return Either::Right(Box::pin(async move { Ok(refused.into_response()) }));
                }
            }
        };
        // Boxed here, outside the async block: rustc cannot prove a generic future `Send`
        // inside one (rust-lang/rust#110338).
        let answer: BoxFuture = Box::pin(self.inner.call(req));
        Either::Right(Box::pin(async move {
            let resp = answer.await?;
            Ok(rewrite_channels(&config, resp, base, caller, claim).await)
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
    claim: Option<Claim>,
) -> ProxyResponse {
    let listing = claim.is_none();
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
    if let (Some((path, channel)), Some(claim)) = (made, claim) {
        config.channels.made(claim, path, channel).await;
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
            let channel =
                Channel::new(Arc::clone(self.config.upstream.name()), self.caller.clone());
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
    let channel_path = format!("{}{within}", config.prefix());
    let Some(channel) = resolve(&config.channels, &channel_path).await else {
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
    let open = config.channels.socket_opened(&channel_path);
    let answer = crate::back::forward::handshake(
        config.upstream.clone(),
        Arc::clone(&config.sockets),
        Arc::clone(&config.streaming),
        path,
        counted_as,
        Some(open),
        req,
    )
    .await;
    if matches!(&answer, Ok(resp) if resp.status() == http::StatusCode::NOT_FOUND) {
        // The streaming host no longer knows the channel (expired, or evicted by a
        // channel made elsewhere): it frees its place.
        config.channels.gone(&channel_path);
    }
    answer
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
