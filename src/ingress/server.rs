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

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::ingress::connection::{serve_tls, TlsConnection};
pub use crate::ingress::connection::{HttpService, HEADER_READ_TIMEOUT};
use crate::ingress::gate::{ConnectionGate, ConnectionLimits, Slots};
use crate::ingress::plain::{self, Plain, PlainListener};
use crate::ingress::rests::Rests;

/// The largest request head accepted (HTTP/1 buffer; HTTP/2 header list).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Concurrent requests on one HTTP/2 connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// HTTP/2 keep-alive: a PING this often, and a peer that does not answer one within the
/// same time is gone.
pub const HTTP2_PING_INTERVAL: Duration = Duration::from_secs(20);

/// A listening socket and how to treat what it accepts.
pub struct Listener {
    pub what: &'static str,
    pub tcp: TcpListener,
    /// HTTPS: the handshake happens before HTTP is spoken.
    pub tls: Option<TlsAcceptor>,
    pub gate: Arc<ConnectionGate>,
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
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    // Tells connections still waiting for their first bytes (not yet watched by
    // `graceful`) that the listener is closing, so they do not hold up the drain.
    let (closing, closed) = tokio::sync::watch::channel(false);
    // A plain listener's connections share what they need (a task lives as long as its
    // connection, and at 1,000 connections every byte of it is a kilobyte), and their
    // quiet ones wait in its table, watched by a task of its own.
    let serving = match tls {
        None => Serving::Plain(plain_listener(
            what,
            http1,
            &builder,
            &service,
            Arc::new(graceful.watcher()),
            &closed,
        )),
        Some(acceptor) => Serving::Tls(acceptor),
    };
    tokio::pin!(shutdown);
    // Accept failures in a row (out of descriptors, say): each waits twice as long as the
    // one before, up to a second, and only the first of a run is logged.
    let mut failures = 0u32;
    loop {
        // At the connection cap, stop accepting: the kernel's backlog holds the rest.
        let slot = tokio::select! {
            slot = gate.slot() => match slot {
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
        let Some(address_slot) = gate.enter(peer.ip()) else {
            tracing::warn!(listener = what, peer = %peer.ip(), "too many connections from one address; refused");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let slots = (slot, address_slot);
        match &serving {
            // The common case: a task only as large as a plain connection needs (see
            // `plain`), which is most of what an idle connection costs.
            Serving::Plain(listener) => {
                let plain = Plain {
                    listener: Arc::clone(listener),
                    watcher: Arc::new(graceful.watcher()),
                    closed: closed.clone(),
                    peer: peer.ip(),
                    slots,
                };
                tokio::spawn(plain::serve(stream, plain));
            }
            Serving::Tls(acceptor) => {
                let conn = TlsConnection {
                    peer: peer.ip(),
                    acceptor: acceptor.clone(),
                    stream,
                    builder: Arc::clone(&builder),
                    service: service.clone(),
                };
                let (watcher, closed) = (graceful.watcher(), closed.clone());
                tokio::spawn(async move {
                    let _slots = slots;
                    if let Err(e) = Box::pin(serve_tls(what, conn, watcher, closed)).await {
                        tracing::debug!(listener = what, error = %e, "connection ended with an error");
                    }
                });
            }
        }
    }
    drop(tcp);
    let _ = closing.send(true);
    tokio::select! {
        () = graceful.shutdown() => tracing::info!(listener = what, "drained"),
        () = tokio::time::sleep(grace) => tracing::warn!(listener = what, "grace period over; dropping the remaining connections"),
    }
}

/// How a listener's connections are served.
enum Serving<S> {
    /// In the clear: what its connections share.
    Plain(Arc<PlainListener<S, Slots>>),
    /// HTTPS: the handshake happens before HTTP is spoken.
    Tls(TlsAcceptor),
}

/// What a plain listener's connections share, with its table of quiet connections
/// watched by a task that ends when the listener closes (holding `watcher` for the
/// connections it wakes).
fn plain_listener<S>(
    what: &'static str,
    http1: hyper::server::conn::http1::Builder,
    auto: &Arc<auto::Builder<TokioExecutor>>,
    service: &S,
    watcher: Arc<Watcher>,
    closed: &tokio::sync::watch::Receiver<bool>,
) -> Arc<PlainListener<S, Slots>>
where
    S: HttpService<Incoming>,
{
    let (rests, poll) = Rests::new(what);
    let listener = Arc::new(PlainListener {
        http1,
        auto: Arc::clone(auto),
        service: service.clone(),
        what,
        rests,
    });
    if let Some(poll) = poll {
        listener.watch_rests(poll, watcher, closed.clone());
    }
    listener
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
