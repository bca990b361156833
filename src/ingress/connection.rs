//! One accepted connection, served in the protocol it speaks: plain HTTP/1.1 straight to
//! hyper's HTTP/1 server (a peek at its first bytes tells), HTTP/2 or HTTPS through
//! hyper-util's `auto` builder, closed when idle or stuck (see [`super::watch`]), and shut
//! down gracefully when its listener closes.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio_rustls::TlsAcceptor;
use tower::{Service, ServiceExt};

use super::between::Between;
use super::watch::{until_closing, StallGuard, Verdict, Watch, Watched, ANSWER_STALL};
use crate::call::messages::{PeerAddr, PeerIdentity};
use crate::http::body::ProxyBody;

/// How long a client may take to send a request head, or to finish a TLS handshake:
/// slow or half-open connections cannot hold a slot for ever.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// What a listener serves: requests with body `B` in, the proxy's answers out, never an
/// error (refusals are answers), cloneable per connection, runnable on any worker, and
/// shared by a listener's connections (`Sync`: kept once per listener, cloned from there
/// for each hyper connection). One name for the bound that the proxy's stack, the admin
/// listener and `serve` share.
pub trait HttpService<B>:
    Service<Request<B>, Response = Response<ProxyBody>, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + Sync
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
        + Sync
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
/// allocation, and the usual call is a GET. And it knows the address for the security
/// event of a refused key (`key_refused`, `admin_refused` on the admin listener), which
/// the layers that refuse do not.
pub(super) struct PerConnection<S> {
    service: std::sync::Mutex<S>,
    peer: IpAddr,
    what: &'static str,
    /// A plain HTTP/1.1 connection that may rest (see [`super::resting`]): told of each
    /// request head.
    between: Option<Arc<Between>>,
}

impl<S> PerConnection<S> {
    pub(super) fn new(service: S, peer: IpAddr, what: &'static str) -> Self {
        PerConnection {
            service: std::sync::Mutex::new(service),
            peer,
            what,
            between: None,
        }
    }

    pub(super) fn resting(mut self, between: &Arc<Between>) -> Self {
        self.between = Some(Arc::clone(between));
        self
    }
}

impl<S, B> hyper::service::Service<Request<B>> for PerConnection<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>> + Clone,
    B: http_body::Body,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = NotingRefusals<
        futures_util::future::Either<S::Future, tower::util::Oneshot<S, Request<B>>>,
    >;

    fn call(&self, mut req: Request<B>) -> Self::Future {
        use futures_util::future::Either;
        use std::task::{Context, Poll, Waker};
        if req.method() == http::Method::POST {
            req.extensions_mut().insert(PeerAddr(self.peer));
        }
        if let Some(between) = &self.between {
            // hyper reads on after the head for a body, or for the stream of an upgrade.
            let reads_on = !req.body().is_end_stream()
                || req.headers().contains_key(http::header::UPGRADE)
                || req.method() == http::Method::CONNECT;
            between.on_request(reads_on);
        }
        let mut service = self
            .service
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let inner = match service.poll_ready(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(Ok(())) => Either::Left(service.call(req)),
            _ => Either::Right(tower::ServiceExt::oneshot(service.clone(), req)),
        };
        NotingRefusals {
            inner,
            peer: self.peer,
            what: self.what,
        }
    }
}

pin_project_lite::pin_project! {
    /// An answer's future that logs the security event of a key the proxy refused (its
    /// own `401`: on the proxy's listener one with the `unauthorized` code, on the admin
    /// listener any), with the caller's address and never the key.
    pub(super) struct NotingRefusals<F> {
        #[pin]
        inner: F,
        peer: IpAddr,
        what: &'static str,
    }
}

impl<F, E> Future for NotingRefusals<F>
where
    F: Future<Output = Result<Response<ProxyBody>, E>>,
{
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = self.project();
        let answer = std::task::ready!(this.inner.poll(cx));
        if let Ok(resp) = &answer {
            if resp.status() == http::StatusCode::UNAUTHORIZED {
                let own = resp
                    .extensions()
                    .get::<crate::call::outcome::Outcome>()
                    .is_some_and(|o| o.error == Some(crate::http::codes::ErrorCode::Unauthorized));
                if *this.what == "admin" {
                    crate::emit!(warn, "admin_refused", peer = %this.peer);
                } else if own {
                    crate::emit!(warn, "key_refused", peer = %this.peer);
                }
            }
        }
        std::task::Poll::Ready(answer)
    }
}

/// The common name of a DER certificate's subject.
pub(super) fn common_name(der: &[u8]) -> Option<Arc<str>> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Some(Arc::from(cn))
}

pin_project_lite::pin_project! {
    /// A plain HTTP/1.1 connection, served until it ends and shut down gracefully once
    /// `closing` (the listener closing) resolves. (hyper-util's `Watcher::watch` does
    /// this for connections without upgrades only.) A struct rather than an `async fn`:
    /// an `async fn` kept the connection twice in its state (as argument and pinned),
    /// 1 KiB more per connection.
    pub(super) struct ServeHttp1<C, F> {
        #[pin]
        pub(super) conn: C,
        #[pin]
        pub(super) closing: F,
        pub(super) shutting_down: bool,
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
pub(super) trait GracefulHttp1 {
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

/// An accepted connection on an HTTPS listener, before its handshake.
pub(super) struct TlsConnection<S> {
    pub(super) peer: IpAddr,
    pub(super) acceptor: TlsAcceptor,
    pub(super) stream: tokio::net::TcpStream,
    pub(super) builder: Arc<auto::Builder<TokioExecutor>>,
    pub(super) service: S,
}

/// An HTTPS connection: the handshake (bounded by [`HEADER_READ_TIMEOUT`], and abandoned
/// if the listener closes meanwhile), the client certificate's name for the key check,
/// then HTTP/1.1 or HTTP/2 by ALPN.
pub(super) async fn serve_tls<S>(
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
        what,
    )
    .await
}

/// Serve one connection of either protocol (HTTP/1.1 or HTTP/2, as the client speaks),
/// closed when idle or stuck (see [`crate::ingress::watch`]).
pub(super) async fn serve_any<I, S>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    watcher: impl Send,
    closed: tokio::sync::watch::Receiver<bool>,
    peer: IpAddr,
    what: &'static str,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: HttpService<Incoming>,
{
    let watch = Watch::new();
    let conn = builder
        .serve_connection_with_upgrades(
            io,
            PerConnection::new(Watched::new(service, &watch), peer, what),
        )
        .into_owned();
    serve_closing_when_idle(conn, watcher, closed, watch).await
}

/// Serve an `auto` connection (HTTP/2 or HTTP/1.1) until it ends, shutting it down
/// gracefully when the listener closes or when it is idle, and dropping it when an answer
/// is stuck (see [`crate::ingress::watch`]). Holds `watcher` (the listener's graceful
/// `Watcher`, or a share of one) so the listener's drain waits for it.
async fn serve_closing_when_idle<C>(
    conn: C,
    watcher: impl Send,
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
