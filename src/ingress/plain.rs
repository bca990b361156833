//! A plain (not TLS) connection's task, from accept to rest or close.
//!
//! A connection's task lives as long as it serves, and at 1,000 callers each of its bytes
//! is a kilobyte. So the task is this one future: what the connection needs, owned here
//! once (a callee's future taking it by value would hold a second copy for as long as it
//! runs); what all the listener's connections share is behind one `Arc`. hyper's
//! connection and its buffers are boxed while it serves; once it is quiet (see
//! [`super::resting`]) the task ends and the socket waits in the listener's table
//! ([`super::rests`]), which starts a task again with its next bytes.

use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, PoisonError};
use std::task::Poll;

use futures_util::future::BoxFuture;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use tokio::io::ReadBuf;
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::between::Between;
use super::connection::{serve_any, HttpService, HEADER_READ_TIMEOUT};
use super::resting::hyper_connection;
use super::rests::Rests;
use super::watch::StallGuard;
use crate::http::body::BoxError;

/// What a plain listener's connections share.
pub(super) struct PlainListener<S, H> {
    pub(super) http1: http1::Builder,
    /// For a connection that starts with the HTTP/2 preface.
    pub(super) auto: Arc<auto::Builder<TokioExecutor>>,
    pub(super) service: S,
    pub(super) what: &'static str,
    /// Where its quiet connections wait.
    pub(super) rests: Rests<H>,
}

impl<S, H> PlainListener<S, H>
where
    S: HttpService<Incoming>,
    H: Send + 'static,
{
    /// Watch the listener's table of quiet connections (`poll`, from [`Rests::new`]) on a
    /// task of its own until the listener closes: a socket with new bytes is served again
    /// as one of this listener's connections, `watcher` keeping the drain waiting for it.
    pub(super) fn watch_rests(
        self: &Arc<Self>,
        poll: mio::Poll,
        watcher: Arc<Watcher>,
        closed: watch::Receiver<bool>,
    ) {
        let listener = Arc::clone(self);
        tokio::spawn(async move {
            let wake = |stream, peer, slots| {
                let plain = Plain {
                    listener: Arc::clone(&listener),
                    watcher: Arc::clone(&watcher),
                    closed: closed.clone(),
                    peer,
                    slots,
                };
                tokio::spawn(serve(stream, plain));
            };
            listener.rests.watch(poll, closed.clone(), wake).await;
        });
    }
}

/// What a plain connection holds while it has a task.
pub(super) struct Plain<S, H> {
    pub(super) listener: Arc<PlainListener<S, H>>,
    /// The listener's drain waits for it.
    pub(super) watcher: Arc<Watcher>,
    pub(super) closed: watch::Receiver<bool>,
    pub(super) peer: IpAddr,
    /// Its places under the listener's connection caps, given back when it ends (kept
    /// through its rests).
    pub(super) slots: H,
}

/// Serve a plain connection: HTTP/1.1 (with upgrades) in hyper while it is busy, then
/// rest in the listener's table, or HTTP/2 by prior knowledge (`auto`, boxed); ends when
/// the caller closes it, sends nothing within [`HEADER_READ_TIMEOUT`] of its start, or
/// the listener closes.
///
/// Not an `async fn`: its future would keep `stream` and `plain` twice, as the
/// arguments it was called with and as the body's own (208 bytes more per connection).
/// The `async move` block keeps what it captured once.
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub(super) fn serve<S, H>(
    stream: TcpStream,
    mut plain: Plain<S, H>,
) -> impl Future<Output = ()> + Send + 'static
where
    S: HttpService<Incoming>,
    H: Send + 'static,
{
    async move {
        match peek_protocol(&stream, &mut plain.closed).await {
            Some(Protocol::Http1) => {}
            Some(Protocol::MaybeHttp2) => {
                let what = plain.listener.what;
                return ended(what, by_auto(stream, plain).await);
            }
            None => return,
        }
        let between = Arc::new(Between::default());
        let listener = &plain.listener;
        let served = hyper_connection(
            stream,
            &listener.http1,
            listener.service.clone(),
            plain.peer,
            listener.what,
            plain.closed.clone(),
            &between,
        )
        .await;
        let returned = between
            .returned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match (served, returned) {
            (Ok(()), Some(stream)) => {
                let Plain {
                    listener,
                    peer,
                    slots,
                    ..
                } = plain;
                listener.rests.rest(stream, peer, slots);
            }
            (served, _) => ended(listener.what, served),
        }
    }
}

/// HTTP/2 by prior knowledge (or too little to tell): `auto`'s connection, boxed.
fn by_auto<S, H>(stream: TcpStream, plain: Plain<S, H>) -> BoxFuture<'static, Result<(), BoxError>>
where
    S: HttpService<Incoming>,
    H: Send + 'static,
{
    let Plain {
        listener,
        watcher,
        closed,
        peer,
        slots,
    } = plain;
    let io = TokioIo::new(StallGuard::new(stream));
    Box::pin(async move {
        let _slots = slots;
        let service = listener.service.clone();
        serve_any(
            &listener.auto,
            io,
            service,
            watcher,
            closed,
            peer,
            listener.what,
        )
        .await
    })
}

/// Logs how a connection ended, if with an error.
fn ended(what: &'static str, served: Result<(), BoxError>) {
    if let Err(e) = served {
        tracing::debug!(listener = what, error = %e, "connection ended with an error");
    }
}

/// What a plain connection's first bytes say it speaks.
enum Protocol {
    Http1,
    /// The start of the HTTP/2 preface (or too little to tell): left to `auto`.
    MaybeHttp2,
}

/// Waits for a plain connection's next bytes: `true` once its socket is readable (or
/// failed: the read that follows tells), `false` if nothing came within
/// [`HEADER_READ_TIMEOUT`] or the listener is closing.
///
/// A new connection waits here for its first request (a quiet one waits in the table,
/// [`super::rests`]): on the socket's own readiness (no waiter of its own), with a timer
/// and the closing signal, nothing more.
async fn next_bytes(stream: &TcpStream, closed: &mut watch::Receiver<bool>) -> bool {
    let timer = tokio::time::sleep(HEADER_READ_TIMEOUT);
    let closing = closed.wait_for(|closing| *closing);
    tokio::pin!(timer, closing);
    std::future::poll_fn(|cx| {
        if closing.as_mut().poll(cx).is_ready() || timer.as_mut().poll(cx).is_ready() {
            Poll::Ready(false)
        } else if stream.poll_read_ready(cx).is_ready() {
            Poll::Ready(true)
        } else {
            Poll::Pending
        }
    })
    .await
}

/// Looks at a plain connection's first bytes without taking them; `None` if it closes,
/// fails or sends nothing within [`HEADER_READ_TIMEOUT`], or the listener is closing.
///
/// Why peek rather than let `auto` sniff: `auto` reads the first 24 bytes itself and hands
/// them to hyper's HTTP/1 parser as a separate first read, which makes hyper grow the
/// connection's read buffer from 8 KiB to 16 KiB for every connection. Peeking leaves the
/// request whole in the socket: at 1,000 keep-alive connections that is 8 MiB less.
async fn peek_protocol(stream: &TcpStream, closed: &mut watch::Receiver<bool>) -> Option<Protocol> {
    let mut first = [0u8; 3];
    loop {
        if !next_bytes(stream, closed).await {
            return None;
        }
        let mut seen = ReadBuf::new(&mut first);
        // One try, not a wait: a readiness that proves stale goes back to `next_bytes`.
        match std::future::poll_fn(|cx| Poll::Ready(stream.poll_peek(cx, &mut seen))).await {
            Poll::Ready(Ok(n)) if n > 0 => {
                return Some(if b"PRI".starts_with(&first[..n]) {
                    Protocol::MaybeHttp2
                } else {
                    Protocol::Http1
                })
            }
            Poll::Ready(_) => return None,
            Poll::Pending => {}
        }
    }
}

#[cfg(test)]
mod tests;
