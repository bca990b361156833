//! Accept loops: serve a tower service on a listener until shutdown, then drain.
//!
//! HTTP/1.1 and HTTP/2 on the same port: by ALPN over TLS (hyper-util's `auto` builder), by
//! prior knowledge in the clear (a peek at the first bytes picks hyper's HTTP/1 server or
//! `auto`). On shutdown the listener closes at once,
//! connections finish their in-flight requests ([`GracefulShutdown`]), and whatever is left
//! after the grace period is dropped.
//!
//! Hostile or broken clients are bounded here: a request head must arrive within
//! [`HEADER_READ_TIMEOUT`] and fit in [`MAX_HEADER_BYTES`] (else 431); a TLS handshake must
//! finish within the same time; the number of connections is capped in all and per client
//! address, so one client cannot take every slot.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulConnection, GracefulShutdown};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tower::{Service, ServiceExt};

use crate::call::messages::{PeerAddr, PeerIdentity};
use crate::http::body::ProxyBody;
use crate::ingress::head_timer::ConnectionTimer;
use crate::ingress::watch::{until_closing, StallGuard, Verdict, Watch, Watched, ANSWER_STALL};

/// How long a client may take to send a request head, or to finish a TLS handshake:
/// slow or half-open connections cannot hold a slot for ever.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request head accepted (HTTP/1 buffer; HTTP/2 header list).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Concurrent requests on one HTTP/2 connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// HTTP/2 keep-alive: a PING this often, and a peer that does not answer one within the
/// same time is gone.
pub const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(20);

/// What a listener serves: requests with body `B` in, the proxy's answers out, never an
/// error (refusals are answers), cloneable per connection, runnable on any worker. One
/// name for the bound that the proxy's stack, the admin listener and `serve` share.
pub trait HttpService<B>:
    Service<Request<B>, Response = Response<ProxyBody>, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + 'static
{
}

impl<S, B> HttpService<B> for S where
    S: Service<
            Request<B>,
            Response = Response<ProxyBody>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// A listener's service as hyper calls it: through `&self`, once per request.
///
/// hyper-util's `TowerToHyperService` clones the tower service for every request to get
/// the `&mut` that `tower::Service::call` needs: for the proxy, a clone of the whole boxed
/// request path per call. Here the connection owns one copy, and each request borrows it
/// just for `call` (which is synchronous; the futures it returns run on their own, also
/// side by side on one HTTP/2 connection). A service that is not ready at once (none of
/// this proxy's are; each waits inside its call's future) is cloned and driven to
/// readiness for that request, as the adapter would. The lock is the connection's own,
/// never contended (a `RefCell` would do, but could panic where a lock cannot).
///
/// It also marks POST requests with the caller's address ([`PeerAddr`]): the token
/// endpoint slows down failed key checks per address. Only POSTs: the mark costs an
/// allocation, and the usual call is a GET.
struct PerConnection<S> {
    service: std::sync::Mutex<S>,
    peer: IpAddr,
}

impl<S> PerConnection<S> {
    fn new(service: S, peer: IpAddr) -> Self {
        PerConnection {
            service: std::sync::Mutex::new(service),
            peer,
        }
    }
}

impl<S, B> hyper::service::Service<Request<B>> for PerConnection<S>
where
    S: Service<Request<B>> + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures_util::future::Either<S::Future, tower::util::Oneshot<S, Request<B>>>;

    fn call(&self, mut req: Request<B>) -> Self::Future {
        use futures_util::future::Either;
        use std::task::{Context, Poll, Waker};
        if req.method() == http::Method::POST {
            req.extensions_mut().insert(PeerAddr(self.peer));
        }
        let mut service = self
            .service
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match service.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => Either::Left(service.call(req)),
            _ => Either::Right(tower::ServiceExt::oneshot(service.clone(), req)),
        }
    }
}

/// How many connections a listener holds at once.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub max_per_address: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 10_000,
            max_per_address: 10_000,
        }
    }
}

/// The connection slots of one listening address, shared by every socket accepting on it
/// (one per worker), so the caps hold for the address as a whole.
pub struct ConnectionGate {
    max: usize,
    slots: Arc<Semaphore>,
    per_address: Arc<PerAddress>,
    max_per_address: usize,
}

impl ConnectionGate {
    pub fn new(limits: ConnectionLimits) -> Arc<ConnectionGate> {
        Arc::new(ConnectionGate {
            max: limits.max_connections.max(1),
            slots: Arc::new(Semaphore::new(limits.max_connections.max(1))),
            per_address: Arc::new(PerAddress::default()),
            max_per_address: limits.max_per_address,
        })
    }
}

impl ConnectionGate {
    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max.saturating_sub(self.slots.available_permits())
    }
}

/// A listening socket and how to treat what it accepts.
pub struct Listener {
    pub what: &'static str,
    pub tcp: TcpListener,
    /// HTTPS: the handshake happens before HTTP is spoken.
    pub tls: Option<TlsAcceptor>,
    pub gate: Arc<ConnectionGate>,
}

/// Connections per client address.
#[derive(Default)]
struct PerAddress(Mutex<HashMap<IpAddr, usize>>);

/// Holds one slot of an address; frees it when dropped.
struct AddressSlot {
    table: Arc<PerAddress>,
    ip: IpAddr,
}

impl PerAddress {
    fn enter(table: &Arc<PerAddress>, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let mut map = table.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            table: Arc::clone(table),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut map = self.table.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// The common name of a DER certificate's subject.
fn common_name(der: &[u8]) -> Option<Arc<str>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(Arc::from(cn))
}

pub async fn serve<S>(
    listener: Listener,
    service: S,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) where
    S: HttpService<Incoming>,
{
    let Listener {
        what,
        tcp,
        tls,
        gate,
    } = listener;
    // Connection tasks are spawned on the runtime serving this listener: on a worker, its
    // own thread.
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .half_close(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        // hyper allows 200 streams a connection; each may hold a request body in flight
        // (up to its flow-control window), so fewer bound what one connection can hold.
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .keep_alive_interval(HTTP2_PING_INTERVAL)
        .keep_alive_timeout(HTTP2_PING_INTERVAL);
    // Plain connections that start like HTTP/1 skip `auto`'s protocol sniffing (see
    // `peek_protocol`). Half-closes are allowed (here and on `auto`'s HTTP/1 above): a
    // caller that shuts its sending side after the request still gets the answer, and
    // hyper does not watch for that end of stream while a call is in flight, which would
    // take a second 8 KiB read buffer per waiting call (the first is held by the
    // request's headers). A caller that hangs up therefore does not cancel a call already
    // under way; the upstream's timeouts bound it.
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES)
        .half_close(true);
    // Shared, not copied into every connection's task: a task lives as long as its
    // connection, and at 1,000 connections every byte of it is a kilobyte.
    let (builder, http1) = (Arc::new(builder), Arc::new(http1));
    let graceful = GracefulShutdown::new();
    // Tells connections still waiting for their first bytes (not yet watched by
    // `graceful`) that the listener is closing, so they do not hold up the drain.
    let (closing, closed) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    // Accept failures in a row (out of descriptors, say): each waits twice as long as the
    // one before, up to a second, and only the first of a run is logged.
    let mut failures = 0u32;
    loop {
        // At the connection cap, stop accepting: the kernel's backlog holds the rest.
        let slot = tokio::select! {
            slot = Arc::clone(&gate.slots).acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = tcp.accept() => match accepted {
                Ok(conn) => {
                    failures = 0;
                    conn
                }
                Err(e) => {
                    // Out of file descriptors and the like: pause, do not spin.
                    if failures == 0 {
                        tracing::warn!(listener = what, error = %e, "accept failed; pausing accepts until it succeeds again");
                    }
                    let pause = Duration::from_millis(10 << failures.min(7)).min(Duration::from_secs(1));
                    failures = failures.saturating_add(1);
                    drop(slot);
                    tokio::select! {
                        () = tokio::time::sleep(pause) => continue,
                        () = &mut shutdown => break,
                    }
                }
            },
            () = &mut shutdown => break,
        };
        let Some(address_slot) =
            PerAddress::enter(&gate.per_address, peer.ip(), gate.max_per_address)
        else {
            tracing::warn!(listener = what, peer = %peer.ip(), "too many connections from one address; refused");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let builder = Arc::clone(&builder);
        let http1 = Arc::clone(&http1);
        let watcher = graceful.watcher();
        let mut closed = closed.clone();
        let service = service.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let _slots = (slot, address_slot);
            let result = match tls {
                // The common case is served inline; the others are boxed, so that every
                // plain HTTP/1 connection's task is only as large as HTTP/1 needs.
                None => {
                    let protocol = tokio::select! {
                        protocol = peek_protocol(&stream) => protocol,
                        _ = closed.wait_for(|closing| *closing) => None,
                    };
                    match protocol {
                        Some(Protocol::Http1) => {
                            // The head timer: one per connection, reused for every head
                            // (see `connection_timer`).
                            let mut http1 = (*http1).clone();
                            http1.timer(ConnectionTimer::new());
                            // With upgrades: a WebSocket's connection is handed over
                            // after its `101` (see `websocket`).
                            let conn = http1
                                .serve_connection(
                                    TokioIo::new(StallGuard::new(stream)),
                                    PerConnection::new(service, peer.ip()),
                                )
                                .with_upgrades();
                            ServeHttp1 {
                                conn,
                                closing: async move {
                                    let _ = closed.wait_for(|closing| *closing).await;
                                },
                                shutting_down: false,
                                _watcher: watcher,
                            }
                            .await
                        }
                        Some(Protocol::MaybeHttp2) => {
                            let io = TokioIo::new(StallGuard::new(stream));
                            let peer = peer.ip();
                            Box::pin(serve_any(&builder, io, service, watcher, closed, peer)).await
                        }
                        None => return,
                    }
                }
                Some(acceptor) => {
                    let conn = TlsConnection {
                        peer: peer.ip(),
                        acceptor,
                        stream,
                        builder,
                        service,
                    };
                    Box::pin(serve_tls(what, conn, watcher, closed)).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(listener = what, error = %e, "connection ended with an error");
            }
        });
    }
    drop(tcp);
    let _ = closing.send(true);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!(listener = what, "drained"),
        () = tokio::time::sleep(grace) => tracing::warn!(listener = what, "grace period over; dropping the remaining connections"),
    }
}

pin_project_lite::pin_project! {
    /// A plain HTTP/1.1 connection, served until it ends and shut down gracefully once
    /// `closing` (the listener closing) resolves; holds the listener's drain `watcher`
    /// until then. (hyper-util's `Watcher::watch` does this for connections without
    /// upgrades only.) A struct rather than an `async fn`: an `async fn` kept the
    /// connection twice in its state (as argument and pinned), 1 KiB more per connection.
    struct ServeHttp1<C, F> {
        #[pin]
        conn: C,
        #[pin]
        closing: F,
        shutting_down: bool,
        // Held, never read: the listener's drain waits until it is dropped.
        _watcher: hyper_util::server::graceful::Watcher,
    }
}

impl<C, F> Future for ServeHttp1<C, F>
where
    C: Future<Output = hyper::Result<()>> + GracefulHttp1,
    F: Future<Output = ()>,
{
    type Output = Result<(), Box<dyn std::error::Error + Send + Sync>>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let mut this = self.project();
        if !*this.shutting_down && this.closing.poll(cx).is_ready() {
            *this.shutting_down = true;
            this.conn.as_mut().shut_down();
        }
        this.conn.poll(cx).map_err(Into::into)
    }
}

/// hyper's HTTP/1.1 connection with upgrades, as [`ServeHttp1`] shuts it down.
trait GracefulHttp1 {
    fn shut_down(self: std::pin::Pin<&mut Self>);
}

impl<I, S, B> GracefulHttp1 for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shut_down(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// What a plain connection's first bytes say it speaks.
enum Protocol {
    Http1,
    /// The start of the HTTP/2 preface (or too little to tell): left to `auto`.
    MaybeHttp2,
}

/// Looks at a plain connection's first bytes without taking them; `None` if it closes,
/// fails or sends nothing within [`HEADER_READ_TIMEOUT`].
///
/// Why peek rather than let `auto` sniff: `auto` reads the first 24 bytes itself and hands
/// them to hyper's HTTP/1 parser as a separate first read, which makes hyper grow the
/// connection's read buffer from 8 KiB to 16 KiB for every connection. Peeking leaves the
/// request whole in the socket: at 1,000 keep-alive connections that is 8 MiB less.
async fn peek_protocol(stream: &tokio::net::TcpStream) -> Option<Protocol> {
    let mut first = [0u8; 3];
    match tokio::time::timeout(HEADER_READ_TIMEOUT, stream.peek(&mut first)).await {
        Ok(Ok(n)) if n > 0 => Some(if b"PRI".starts_with(&first[..n]) {
            Protocol::MaybeHttp2
        } else {
            Protocol::Http1
        }),
        _ => None,
    }
}

/// An accepted connection on an HTTPS listener, before its handshake.
struct TlsConnection<S> {
    peer: IpAddr,
    acceptor: TlsAcceptor,
    stream: tokio::net::TcpStream,
    builder: Arc<auto::Builder<TokioExecutor>>,
    service: S,
}

/// An HTTPS connection: the handshake (bounded by [`HEADER_READ_TIMEOUT`], and abandoned
/// if the listener closes meanwhile), the client certificate's name for the key check,
/// then HTTP/1.1 or HTTP/2 by ALPN.
async fn serve_tls<S>(
    what: &'static str,
    TlsConnection {
        peer,
        acceptor,
        stream,
        builder,
        service,
    }: TlsConnection<S>,
    watcher: hyper_util::server::graceful::Watcher,
    mut closed: tokio::sync::watch::Receiver<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    S: HttpService<Incoming>,
{
    let handshake = tokio::time::timeout(
        HEADER_READ_TIMEOUT,
        acceptor.accept(StallGuard::new(stream)),
    );
    let finished = tokio::select! {
        finished = handshake => finished,
        _ = closed.wait_for(|closing| *closing) => return Ok(()),
    };
    let stream = match finished {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(listener = what, error = %e, "TLS handshake failed");
            return Ok(());
        }
        Err(_) => {
            tracing::debug!(listener = what, "TLS handshake timed out");
            return Ok(());
        }
    };
    let identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|certs| certs.first())
        .and_then(|c| common_name(c.as_ref()))
        .map(PeerIdentity);
    let service = service.map_request(move |mut req: Request<Incoming>| {
        if let Some(id) = &identity {
            req.extensions_mut().insert(id.clone());
        }
        req
    });
    serve_any(
        &builder,
        TokioIo::new(stream),
        service,
        watcher,
        closed,
        peer,
    )
    .await
}

/// Serve one connection of either protocol (HTTP/1.1 or HTTP/2, as the client speaks),
/// closed when idle or stuck (see [`crate::connection_watch`]).
async fn serve_any<I, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    watcher: hyper_util::server::graceful::Watcher,
    closed: tokio::sync::watch::Receiver<bool>,
    peer: IpAddr,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: HttpService<Incoming>,
{
    let watch = Watch::new();
    let conn = builder
        .serve_connection_with_upgrades(io, PerConnection::new(Watched::new(service, &watch), peer))
        .into_owned();
    serve_closing_when_idle(conn, watcher, closed, watch).await
}

/// Serve an `auto` connection (HTTP/2 or HTTP/1.1) until it ends, shutting it down
/// gracefully when the listener closes or when it is idle, and dropping it when an answer
/// is stuck (see [`crate::connection_watch`]). Holds `watcher` so the listener's drain
/// waits for it.
async fn serve_closing_when_idle<C>(
    conn: C,
    watcher: hyper_util::server::graceful::Watcher,
    mut closed: tokio::sync::watch::Receiver<bool>,
    watch: Arc<Watch>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    C: GracefulConnection<Error = Box<dyn std::error::Error + Send + Sync>>,
{
    let _draining_waits_for_this = watcher;
    tokio::pin!(conn);
    let mut shutting_down = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => return result,
            _ = closed.wait_for(|closing| *closing), if !shutting_down => {
                conn.as_mut().graceful_shutdown();
                shutting_down = true;
            }
            verdict = until_closing(&watch) => match verdict {
                Verdict::Stuck => {
                    tracing::debug!("dropping a connection whose caller took nothing of an answer for {ANSWER_STALL:?}");
                    return Ok(());
                }
                _ if !shutting_down => {
                    tracing::debug!("closing an idle connection");
                    conn.as_mut().graceful_shutdown();
                    shutting_down = true;
                }
                _ => {}
            },
        }
    }
}

/// A plain listener with default limits (the tests' own servers).
pub fn plain(what: &'static str, tcp: TcpListener) -> Listener {
    Listener {
        what,
        tcp,
        tls: None,
        gate: ConnectionGate::new(ConnectionLimits::default()),
    }
}
