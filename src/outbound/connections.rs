//! One worker's own connections to one upstream: a small stack of idle HTTP/1.1
//! connections (hyper's `client::conn::http1::SendRequest`), or one shared HTTP/2
//! connection when the API host chose h2 by ALPN (see [`super::http2`]).
//!
//! Why not hyper-util's pooled `Client`: a worker runs on one thread, so its pool never
//! needs the legacy client's machinery: a keyed map behind a lock, a background task per
//! returned connection, a channel to each connection, the request URI rebuilt and the
//! `Host` header formatted on every call. A profile of the proxy under load put that at
//! about a sixth of its user time. Here a call pops the most recently used idle
//! connection (one uncontended lock), sends, and its answer's body puts the connection
//! back when it ends ([`Lease`](super::lease::Lease)).
//!
//! How many connections a worker opens is bounded by its [`ConnectionSlots`]: a call holds
//! a slot, and at most one connection, until its answer's body ends.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{ready, Either};
use futures_util::FutureExt as _;
use http::uri::PathAndQuery;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_rustls::{HttpsConnector, MaybeHttpsStream};
use hyper_util::client::legacy::connect::Connection;
use hyper_util::rt::TokioIo;
use tower::Service;

/// An API host's answer body, as it came: on an HTTP/1.1 connection (hyper's) or on an
/// HTTP/2 stream (see [`super::http2`]).
pub type UpstreamBody = http_body_util::Either<hyper::body::Incoming, super::http2::Http2Body>;
use super::http2;
pub use super::origin::Origin;
pub use super::send_error::{never_processed, SendError};
use crate::http::body::ProxyBody;
use crate::outbound::egress::{Connector, Egress};
use crate::outbound::slots::ConnectionSlots;

/// How often idle connections are looked over: one that stayed idle for [`IDLE_TICKS`]
/// looks (90 to 105 s; hyper-util's pool closed them after 90 s) is closed. Counting looks
/// rather than reading the clock keeps the clock off every call's path.
const REAP_EVERY: Duration = Duration::from_secs(15);
const IDLE_TICKS: u64 = 6;

type Stream = MaybeHttpsStream<TokioIo<tokio::net::TcpStream>>;

/// An upstream's answer, with the HTTP/1.1 connection it came on (to give back when its
/// body ends), or why there is none.
pub type Answered = Result<
    (
        Response<UpstreamBody>,
        Option<http1::SendRequest<ProxyBody>>,
    ),
    SendError,
>;

struct Idle {
    origin: Arc<Origin>,
    sender: http1::SendRequest<ProxyBody>,
    /// The reaper's tick when it was put back.
    since: u64,
}

struct Shared {
    origin: Arc<Origin>,
    sender: h2::client::SendRequest<Bytes>,
    /// Tells this connection from the next one made after it went away.
    id: u64,
    /// Dropped with this entry: the connection's task then lets it end with its streams.
    _forgotten: tokio::sync::oneshot::Sender<()>,
}

/// A connection to send one call on (an HTTP/2 one with its [`Shared::id`]).
enum Conn {
    Http1(http1::SendRequest<ProxyBody>),
    Http2(h2::client::SendRequest<Bytes>, u64),
}

/// Whether an HTTP/2 sender can open a stream now: `Some(false)` when its connection has
/// failed or closed, `None` when it must wait (for an earlier stream of the same sender
/// to be opened).
fn h2_ready(sender: &mut h2::client::SendRequest<Bytes>) -> Option<bool> {
    match sender.poll_ready(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(Ok(())) => Some(true),
        Poll::Ready(Err(_)) => Some(false),
        Poll::Pending => None,
    }
}

/// One worker's connections to one upstream, and its share of the connection slots.
pub struct WorkerConnections {
    connector: HttpsConnector<Connector>,
    /// Offers only HTTP/1.1 by ALPN: a WebSocket handshake needs `Upgrade`, which HTTP/2
    /// does not have.
    http1_only: HttpsConnector<Connector>,
    /// HTTP/1.1 connections not in use, the most recently used last.
    idle: Mutex<Vec<Idle>>,
    /// The HTTP/2 connection, when the API host speaks h2: every call shares it.
    shared: Mutex<Option<Shared>>,
    /// At most this many idle connections are kept: the worker's share of `max_connections`.
    idle_max: usize,
    pub slots: Arc<ConnectionSlots>,
    reaper: std::sync::Once,
    /// Looks the reaper has taken so far.
    ticks: AtomicU64,
    /// HTTP/2 connections made so far (each one's [`Shared::id`]); once there was one,
    /// new connections are made one at a time (`connecting`).
    h2_made: AtomicU64,
    connecting: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for WorkerConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerConnections")
            .field("idle_max", &self.idle_max)
            .field("slots", &self.slots)
            .finish_non_exhaustive()
    }
}

impl WorkerConnections {
    /// Connections that leave through `egress` (its proxy, CAs and client certificate).
    pub fn new(connect_timeout: Duration, share: usize, egress: &Egress) -> Arc<WorkerConnections> {
        Arc::new(WorkerConnections {
            connector: egress.api_connector(connect_timeout, false),
            http1_only: egress.api_connector(connect_timeout, true),
            idle: Mutex::new(Vec::new()),
            shared: Mutex::new(None),
            idle_max: share,
            slots: ConnectionSlots::new(share),
            reaper: std::sync::Once::new(),
            ticks: AtomicU64::new(0),
            h2_made: AtomicU64::new(0),
            connecting: tokio::sync::Mutex::new(()),
        })
    }

    /// Send `req` (its URI the path within the upstream) to `origin`. The answer comes
    /// with the connection it arrived on, to be given back through a [`Lease`](super::lease::Lease) when its
    /// body ends. A call that an idle connection refused before sending anything (the
    /// upstream had just closed it) is sent again on another one, as hyper-util did.
    ///
    /// Takes what it needs by value: the caller builds this future before it is polled
    /// (see `forward`), and no copy of the request is kept beside it.
    pub async fn send(
        self: Arc<Self>,
        origin: Arc<Origin>,
        path: PathAndQuery,
        mut req: Request<ProxyBody>,
    ) -> Answered {
        loop {
            let (conn, reused) = self.checkout(&origin).await?;
            match conn {
                Conn::Http1(mut sender) => {
                    origin.aim_http1(&mut req, &path);
                    match sender.try_send_request(req).await {
                        Ok(resp) => return Ok((resp.map(UpstreamBody::Left), Some(sender))),
                        Err(mut e) => match e.take_message() {
                            Some(unsent) if reused => req = unsent,
                            _ => return Err(SendError::Exchange(e.into_error())),
                        },
                    }
                }
                Conn::Http2(mut sender, id) => {
                    origin
                        .aim_http2(&mut req, &path)
                        .map_err(|e| SendError::Connect(Box::new(e)))?;
                    let answer = match http2::send(&mut sender, req) {
                        Ok(exchange) => exchange.await,
                        Err(e) => Err(e),
                    };
                    return self.h2_answered(id, answer);
                }
            }
        }
    }

    /// [`send`](Self::send)'s usual case, without waiting: when a connection to `origin`
    /// can take a request at once (the shared HTTP/2 one, or an idle HTTP/1.1 one), `req`
    /// goes out on it now and the answer's future comes back; otherwise `path` and `req`
    /// come back, for `send`. The future is small (it holds no copy of the request): a
    /// call's future is allocated for every call.
    // The request comes back by value, as it came in: boxing it would cost the
    // allocation this saves.
    #[allow(clippy::result_large_err)]
    pub fn send_now(
        self: &Arc<Self>,
        origin: &Arc<Origin>,
        path: PathAndQuery,
        req: Request<ProxyBody>,
    ) -> Result<impl Future<Output = Answered> + Send + 'static, (PathAndQuery, Request<ProxyBody>)>
    {
        let mut req = match self.open_h2_now(origin, &path, req) {
            Ok((sent, id)) => {
                let home = Arc::clone(self);
                let exchange = match sent {
                    Ok(exchange) => Either::Left(exchange),
                    Err(e) => Either::Right(ready(Err(e))),
                };
                return Ok(Either::Right(
                    exchange.map(move |answer| home.h2_answered(id, answer)),
                ));
            }
            Err(req) => req,
        };
        let Some(mut sender) = self.idle_ready_now(origin) else {
            return Err((path, req));
        };
        let (home, origin) = (Arc::clone(self), Arc::clone(origin));
        origin.aim_http1(&mut req, &path);
        let sent = sender.try_send_request(req);
        Ok(Either::Left(sent.then(move |sent| match sent {
            Ok(resp) => Either::Left(ready(Ok((resp.map(UpstreamBody::Left), Some(sender))))),
            // Closed by the upstream before the request went out: another connection, as
            // `send` does.
            Err(mut e) => match e.take_message() {
                Some(unsent) => Either::Right(Box::pin(WorkerConnections::send(
                    home, origin, path, unsent,
                ))),
                None => Either::Left(ready(Err(SendError::Exchange(e.into_error())))),
            },
        })))
    }

    /// The usual HTTP/2 case: a stream opened at once on the shared connection to
    /// `origin`, under its lock (no copy of its sender), and the connection's id; `req`
    /// comes back when there is no such connection or it cannot open one now.
    #[allow(clippy::result_large_err)]
    fn open_h2_now(
        &self,
        origin: &Arc<Origin>,
        path: &PathAndQuery,
        mut req: Request<ProxyBody>,
    ) -> Result<(Result<http2::Exchange, h2::Error>, u64), Request<ProxyBody>> {
        let Ok(mut shared) = self.shared.lock() else {
            return Err(req);
        };
        let Some(s) = shared.as_mut().filter(|s| s.origin.same_as(origin)) else {
            return Err(req);
        };
        match h2_ready(&mut s.sender) {
            Some(true) => {}
            // Closed or failed: the next call makes a new one.
            Some(false) => {
                *shared = None;
                return Err(req);
            }
            // Its last stream waits to be opened (the API host's stream limit): `send`
            // waits with a sender of its own.
            None => return Err(req),
        }
        if origin.aim_http2(&mut req, path).is_err() {
            return Err(req);
        }
        Ok((http2::send(&mut s.sender, req), s.id))
    }

    /// The most recently used idle HTTP/1.1 connection to `origin`, if one can take a
    /// request at once.
    fn idle_ready_now(&self, origin: &Arc<Origin>) -> Option<http1::SendRequest<ProxyBody>> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(top) = idle.pop() {
            if !top.origin.same_as(origin) || top.sender.is_closed() {
                continue;
            }
            if top.sender.is_ready() {
                return Some(top.sender);
            }
            // Its connection task has not caught up yet: `checkout` waits for it.
            idle.push(top);
            break;
        }
        None
    }

    /// Send a WebSocket handshake to `origin` on a new HTTP/1.1 connection of its own:
    /// after a `101` the connection belongs to the socket (see `websocket::relay`, which
    /// takes it through `hyper::upgrade::on` on the answer). Takes no connection slot:
    /// sockets are bounded by `max_websockets`, not by the calls' `max_connections`.
    pub async fn upgrade(
        &self,
        origin: &Origin,
        path: PathAndQuery,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, SendError> {
        let io: Stream = self
            .http1_only
            .clone()
            .call(origin.connect_to.clone())
            .await
            .map_err(SendError::Connect)?;
        let (mut sender, conn) = http1::handshake(io)
            .await
            .map_err(|e| SendError::Connect(Box::new(e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "a WebSocket's connection to an upstream ended");
            }
        });
        origin.aim_http1(&mut req, &path);
        sender.send_request(req).await.map_err(SendError::Exchange)
    }

    /// A ready connection to `origin`, and whether it served calls before: the shared
    /// HTTP/2 one, else the most recently used idle HTTP/1.1 one, else a new one.
    async fn checkout(self: &Arc<Self>, origin: &Arc<Origin>) -> Result<(Conn, bool), SendError> {
        if let Some((mut sender, id)) = self.shared_to(origin) {
            if futures_util::future::poll_fn(|cx| sender.poll_ready(cx))
                .await
                .is_ok()
            {
                return Ok((Conn::Http2(sender, id), true));
            }
            self.forget_shared();
        }
        loop {
            let popped = self.idle.lock().ok().and_then(|mut idle| idle.pop());
            let Some(mut idle) = popped else { break };
            if !idle.origin.same_as(origin) || idle.sender.is_closed() {
                continue;
            }
            // Usually ready at once; just after its last answer ended, its connection task
            // may not have run yet. A connection the upstream closed fails here.
            if idle.sender.is_ready() || idle.sender.ready().await.is_ok() {
                return Ok((Conn::Http1(idle.sender), true));
            }
        }
        // Boxed: connecting (TCP, TLS, handshake) is a large future and rare; inline, it
        // would make every call's future that large, even the ones queued for a slot
        // (measured: 8 MiB more at 1,000 connections).
        Box::pin(self.connect_once(origin))
            .await
            .map(|conn| (conn, false))
    }

    /// A new connection; with an API host that speaks HTTP/2, one at a time: the calls
    /// that found no connection (all of them, just after a GOAWAY) share the one made.
    async fn connect_once(self: &Arc<Self>, origin: &Arc<Origin>) -> Result<Conn, SendError> {
        if self.h2_made.load(Ordering::Relaxed) == 0 {
            return self.connect(origin).await;
        }
        let _turn = self.connecting.lock().await;
        if let Some((mut sender, id)) = self.shared_to(origin) {
            if futures_util::future::poll_fn(|cx| sender.poll_ready(cx))
                .await
                .is_ok()
            {
                return Ok(Conn::Http2(sender, id));
            }
        }
        self.connect(origin).await
    }

    /// The shared HTTP/2 connection, if it goes to `origin`, and its id.
    fn shared_to(&self, origin: &Origin) -> Option<(h2::client::SendRequest<Bytes>, u64)> {
        let shared = self.shared.lock().ok()?;
        let s = shared.as_ref().filter(|s| s.origin.same_as(origin))?;
        Some((s.sender.clone(), s.id))
    }

    async fn connect(self: &Arc<Self>, origin: &Arc<Origin>) -> Result<Conn, SendError> {
        self.start_reaper();
        let io: Stream = self
            .connector
            .clone()
            .call(origin.connect_to.clone())
            .await
            .map_err(SendError::Connect)?;
        if io.connected().is_negotiated_h2() {
            let (sender, forgotten) = http2::handshake(TokioIo::new(io))
                .await
                .map_err(|e| SendError::Connect(Box::new(e)))?;
            let id = self.h2_made.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut shared) = self.shared.lock() {
                *shared = Some(Shared {
                    origin: Arc::clone(origin),
                    sender: sender.clone(),
                    id,
                    _forgotten: forgotten,
                });
            }
            return Ok(Conn::Http2(sender, id));
        }
        let (sender, conn) = http1::handshake(io)
            .await
            .map_err(|e| SendError::Connect(Box::new(e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "an HTTP/1.1 connection to an upstream ended");
            }
        });
        Ok(Conn::Http1(sender))
    }

    fn close_expired(&self) {
        let now = self.ticks.fetch_add(1, Ordering::Relaxed) + 1;
        if let Ok(mut idle) = self.idle.lock() {
            idle.retain(|c| now - c.since < IDLE_TICKS && !c.sender.is_closed());
        }
    }

    /// An HTTP/2 exchange's outcome on connection `id`, as a call's answer.
    fn h2_answered(
        &self,
        id: u64,
        answer: Result<Response<http2::Http2Body>, h2::Error>,
    ) -> Answered {
        match answer {
            Ok(resp) => Ok((resp.map(UpstreamBody::Right), None)),
            Err(e) => Err(self.went_away(id, e)),
        }
    }

    /// A failed HTTP/2 exchange on connection `id`. If the API host said it is going away
    /// (GOAWAY) or refused the stream, that connection takes no more calls: the next one
    /// opens a new connection while the calls it is still answering finish on the old.
    fn went_away(&self, id: u64, e: h2::Error) -> SendError {
        let e = SendError::Http2(e);
        if never_processed(&e) {
            if let Ok(mut shared) = self.shared.lock() {
                if shared.as_ref().is_some_and(|s| s.id == id) {
                    *shared = None;
                }
            }
        }
        e
    }

    /// Forget the shared HTTP/2 connection once it has closed; a new one is made for the
    /// next call.
    fn forget_shared(&self) {
        if let Ok(mut shared) = self.shared.lock() {
            if shared
                .as_mut()
                .is_some_and(|s| h2_ready(&mut s.sender) == Some(false))
            {
                *shared = None;
            }
        }
    }

    /// An HTTP/1.1 connection whose call has ended goes back on the idle stack, unless
    /// the stack is full or the connection closed.
    pub(super) fn put_back(&self, origin: Arc<Origin>, sender: http1::SendRequest<ProxyBody>) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut idle) = self.idle.lock() {
            if idle.len() < self.idle_max {
                idle.push(Idle {
                    origin,
                    sender,
                    since: self.ticks.load(Ordering::Relaxed),
                });
            }
        }
    }

    /// Idle connections are closed after [`IDLE_TIMEOUT`] by a task of the worker that
    /// opened them (started with its first connection); it ends with these connections.
    fn start_reaper(self: &Arc<Self>) {
        self.reaper.call_once(|| {
            let this: Weak<WorkerConnections> = Arc::downgrade(self);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(REAP_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(connections) = this.upgrade() else {
                        return;
                    };
                    connections.close_expired();
                }
            });
        });
    }
}

#[cfg(test)]
mod tests;
