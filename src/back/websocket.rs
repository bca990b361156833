//! WebSockets through the gate (RFC 6455 over HTTP/1.1 `Upgrade`).
//!
//! The handshake is an ordinary call: it meets every layer (the client's key, its allow
//! list, the bearer token), and `forward` sends it to the upstream on a connection of its
//! own (never a pooled one: after a `101` the connection is the socket's). When both sides
//! have switched protocols, a task of the worker relays bytes both ways until either side
//! closes: frames, close codes included, pass unchanged, since nothing here parses them.
//!
//! Two limits, so sockets cannot take what calls need: each client may hold
//! `max_websockets` open at once (past it, `429 too_many_websockets`), and a socket on which
//! neither side sends anything for `websocket_idle_secs` is closed.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use http::{header, HeaderMap, HeaderValue, Method, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::back::channels::SocketMark;
use crate::telemetry::metrics::Metrics;

/// Is this the opening handshake of a WebSocket: an HTTP/1.1 `GET` asking to upgrade to
/// `websocket`? Other upgrades (`h2c`, say) are not relayed.
pub fn is_handshake(method: &Method, version: Version, headers: &HeaderMap) -> bool {
    method == Method::GET
        && version == Version::HTTP_11
        && has_token(headers, header::UPGRADE, "websocket")
        && has_token(headers, header::CONNECTION, "upgrade")
}

/// Whether a comma-separated header names `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The two headers a handshake needs on each hop, put back after the caller's hop-by-hop
/// headers (these among them) were removed: the rest of what the caller's `Connection`
/// named stays removed.
pub fn keep_upgrade(headers: &mut HeaderMap) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
}

/// Move the upstream's token from `Authorization` into the query parameter `name` (for
/// platforms whose sockets take it there), replacing any value the caller gave it. The
/// token is in no log line: the audit line never shows a query.
pub fn token_into_query(
    path: &http::uri::PathAndQuery,
    name: &str,
    headers: &mut HeaderMap,
) -> Option<http::uri::PathAndQuery> {
    let token = headers.remove(header::AUTHORIZATION)?;
    let token = token.to_str().ok()?.strip_prefix("Bearer ")?.to_owned();
    let mut target = String::with_capacity(path.as_str().len() + name.len() + token.len() + 2);
    target.push_str(path.path());
    let mut separator = '?';
    for pair in path.query().unwrap_or("").split('&') {
        let key = pair.split('=').next().unwrap_or("");
        let decoded: String = form_urlencoded::parse(key.as_bytes())
            .next()
            .map(|(k, _)| k.into_owned())
            .unwrap_or_default();
        if pair.is_empty() || decoded == name {
            continue;
        }
        target.push(separator);
        target.push_str(pair);
        separator = '&';
    }
    target.push(separator);
    target.push_str(name);
    target.push('=');
    target.extend(form_urlencoded::byte_serialize(token.as_bytes()));
    http::uri::PathAndQuery::try_from(target).ok()
}

/// The open sockets, by client: the `max_websockets` limit and the metrics. One for the
/// process, so a reload does not start the count afresh.
/// (upstream, client): whose sockets, to where.
type SocketKey = (Arc<str>, Arc<str>);

pub struct Sockets {
    open: Mutex<HashMap<SocketKey, usize>>,
    max_per_client: AtomicUsize,
    idle_ms: AtomicU64,
    metrics: Metrics,
}

impl std::fmt::Debug for Sockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sockets")
            .field("max_per_client", &self.max_per_client)
            .finish_non_exhaustive()
    }
}

impl Sockets {
    pub fn new(metrics: Metrics) -> Arc<Sockets> {
        Arc::new(Sockets {
            open: Mutex::new(HashMap::new()),
            max_per_client: AtomicUsize::new(100),
            idle_ms: AtomicU64::new(120_000),
            metrics,
        })
    }

    /// The limits of the config in force (a reload changes them for new sockets).
    pub fn configure(&self, max_per_client: usize, idle: Duration) {
        self.max_per_client.store(max_per_client, Ordering::Relaxed);
        self.idle_ms.store(
            idle.as_millis().min(u64::MAX as u128) as u64,
            Ordering::Relaxed,
        );
    }

    pub fn max_per_client(&self) -> usize {
        self.max_per_client.load(Ordering::Relaxed)
    }

    pub fn idle(&self) -> Duration {
        Duration::from_millis(self.idle_ms.load(Ordering::Relaxed))
    }

    /// A place for one more socket of `client` to `upstream`, if the client has one left.
    pub fn admit(self: &Arc<Self>, upstream: &Arc<str>, client: &Arc<str>) -> Option<Ticket> {
        let max = self.max_per_client.load(Ordering::Relaxed);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let of_client: usize = open
            .iter()
            .filter(|((_, c), _)| c == client)
            .map(|(_, n)| n)
            .sum();
        if of_client >= max {
            return None;
        }
        *open
            .entry((Arc::clone(upstream), Arc::clone(client)))
            .or_default() += 1;
        self.metrics.websocket_opened(upstream, client);
        Some(Ticket {
            book: Arc::clone(self),
            upstream: Arc::clone(upstream),
            client: Arc::clone(client),
            channel: None,
        })
    }

    /// Open sockets by (upstream, client), for the status page.
    pub fn snapshot(&self) -> Vec<(Arc<str>, Arc<str>, usize)> {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.iter()
            .filter(|(_, n)| **n > 0)
            .map(|((u, c), n)| (Arc::clone(u), Arc::clone(c), *n))
            .collect()
    }
}

/// One open socket's place; given back when the socket ends (or its handshake fails).
pub struct Ticket {
    book: Arc<Sockets>,
    upstream: Arc<str>,
    client: Arc<str>,
    /// The notification channel the socket is open on: marked open while the socket is.
    channel: Option<SocketMark>,
}

impl Ticket {
    /// Keep the notification channel marked as having a socket while this one lives.
    pub fn hold(&mut self, channel: SocketMark) {
        self.channel = Some(channel);
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut open = self.book.open.lock().unwrap_or_else(|p| p.into_inner());
        let key = (Arc::clone(&self.upstream), Arc::clone(&self.client));
        if let Some(n) = open.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&key);
            }
        }
        self.book
            .metrics
            .websocket_closed(&self.upstream, &self.client);
    }
}

/// Once the caller's connection and the upstream's have both switched protocols, relay
/// bytes between them until either side closes, or neither sends anything for `idle`.
/// Runs on the worker that served the handshake; holds `ticket` until the socket ends.
pub fn relay(caller: OnUpgrade, upstream: OnUpgrade, ticket: Ticket, idle: Duration) {
    tokio::spawn(async move {
        let (caller, upstream) = match tokio::try_join!(caller, upstream) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(error = %e, "a WebSocket handshake did not complete");
                return;
            }
        };
        let last = Arc::new(AtomicU64::new(0));
        let started = tokio::time::Instant::now();
        let mut caller = Watched::new(TokioIo::new(caller), &last, started);
        let mut upstream = Watched::new(TokioIo::new(upstream), &last, started);
        let relayed = tokio::io::copy_bidirectional(&mut caller, &mut upstream);
        let quiet = async {
            loop {
                let due = started + Duration::from_millis(last.load(Ordering::Relaxed)) + idle;
                if tokio::time::Instant::now() >= due {
                    return;
                }
                tokio::time::sleep_until(due).await;
            }
        };
        tokio::select! {
            result = relayed => match result {
                Ok(_) => tracing::debug!(upstream = %ticket.upstream, client = %ticket.client, "a WebSocket closed"),
                Err(e) => tracing::debug!(upstream = %ticket.upstream, client = %ticket.client, error = %e, "a WebSocket ended with an error"),
            },
            () = quiet => tracing::info!(upstream = %ticket.upstream, client = %ticket.client, idle_secs = idle.as_secs(), "a WebSocket idle for websocket_idle_secs was closed"),
        }
        // What each end sent, however the socket ended (the relay's own totals are lost
        // with an error).
        let metrics = &ticket.book.metrics;
        metrics.websocket_bytes("up", caller.received);
        metrics.websocket_bytes("down", upstream.received);
        drop(ticket);
    });
}

/// A socket end that notes when it last received something (milliseconds after `started`),
/// for the idle limit: a read costs a clock read and an atomic store, no timer.
struct Watched<T> {
    inner: T,
    last: Arc<AtomicU64>,
    started: tokio::time::Instant,
    /// Bytes read from this end.
    received: u64,
}

impl<T> Watched<T> {
    fn new(inner: T, last: &Arc<AtomicU64>, started: tokio::time::Instant) -> Watched<T> {
        Watched {
            inner,
            last: Arc::clone(last),
            started,
            received: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.received += (buf.filled().len() - before) as u64;
            let ms = self.started.elapsed().as_millis() as u64;
            self.last.store(ms, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn a_handshake_is_an_http11_get_upgrading_to_websocket() {
        let ws = headers(&[
            ("upgrade", "WebSocket"),
            ("connection", "keep-alive, Upgrade"),
        ]);
        assert!(is_handshake(&Method::GET, Version::HTTP_11, &ws));
        assert!(!is_handshake(&Method::POST, Version::HTTP_11, &ws));
        assert!(!is_handshake(&Method::GET, Version::HTTP_10, &ws));
        let h2c = headers(&[("upgrade", "h2c"), ("connection", "upgrade")]);
        assert!(!is_handshake(&Method::GET, Version::HTTP_11, &h2c));
        let no_connection = headers(&[("upgrade", "websocket")]);
        assert!(!is_handshake(
            &Method::GET,
            Version::HTTP_11,
            &no_connection
        ));
    }

    #[test]
    fn the_token_moves_into_the_query_and_the_callers_value_goes() {
        let mut h = headers(&[("authorization", "Bearer tok/en+=")]);
        let path = "/ws?a=1&access_token=mine&b=2".parse().unwrap();
        let moved = token_into_query(&path, "access_token", &mut h).unwrap();
        assert_eq!(moved.as_str(), "/ws?a=1&b=2&access_token=tok%2Fen%2B%3D");
        assert!(h.get("authorization").is_none());
        let bare = "/ws".parse().unwrap();
        let mut h = headers(&[("authorization", "Bearer t")]);
        assert_eq!(
            token_into_query(&bare, "token", &mut h).unwrap().as_str(),
            "/ws?token=t"
        );
    }

    #[test]
    fn a_client_gets_at_most_its_sockets_and_each_ticket_gives_one_back() {
        let book = Sockets::new(Metrics::new());
        book.configure(2, Duration::from_secs(1));
        let (up, a, b): (Arc<str>, Arc<str>, Arc<str>) = ("u".into(), "a".into(), "b".into());
        let first = book.admit(&up, &a).unwrap();
        let _second = book.admit(&up, &a).unwrap();
        assert!(book.admit(&up, &a).is_none(), "a's third");
        assert!(book.admit(&up, &b).is_some(), "b has its own");
        drop(first);
        assert!(book.admit(&up, &a).is_some(), "a place came back");
    }
}
