//! A quiet plain HTTP/1.1 connection holds its socket and nothing else.
//!
//! hyper's HTTP/1 connection keeps an 8 KiB read buffer, an 8 KiB write buffer and its
//! parser's state for its whole life, busy or idle: with 10,000 idle keep-alive callers
//! that was about 12 KiB each (`benches/load.sh`), where nginx, which frees an idle
//! connection's buffers, needs about 1 KiB. So here a connection that has been quiet for
//! [`REST_AFTER`] between two requests leaves hyper: its socket reports an end of stream
//! to hyper at that moment, hyper (which allows half-closed connections) ends the
//! connection as a client that finished would end it, but without shutting the socket
//! (`RestingIo` hands it back instead), and the socket waits in the listener's table
//! ([`super::rests`]) for its next request, whose first bytes start a new task and a new
//! hyper connection.
//!
//! The end of stream is given only where hyper waits for a request head and holds none of
//! one: no bytes reached hyper since the last head went to the service (a pipelined
//! request's first part would be; in that rare case hyper ends with an error and the
//! connection is closed, never reused out of step), the last request had no body left to
//! read and asked for no upgrade, and every byte of the last answer was flushed. A
//! connection busy with calls never waits that long; what it costs is a count per read
//! and a timer that goes off once a second. What the service and the socket share is in
//! [`super::between`].

use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::BoxFuture;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::between::Between;
use super::connection::{HttpService, PerConnection, ServeHttp1};
use super::head_timer::ConnectionTimer;
use super::watch::StallGuard;
use crate::http::body::BoxError;

/// How long a connection stays quiet between requests before it leaves hyper (up to twice
/// this: see `RestingIo::quiet`). Long next to the time between a busy caller's calls,
/// short next to an idle one's life.
pub const REST_AFTER: Duration = Duration::from_secs(1);

/// A hyper connection serving `stream` until it ends or comes to rest (`between` then
/// holds the socket). Boxed: it is allocated while the connection serves, not while it
/// rests.
pub(super) fn hyper_connection<S>(
    stream: TcpStream,
    builder: &http1::Builder,
    service: S,
    peer: IpAddr,
    what: &'static str,
    mut closing: tokio::sync::watch::Receiver<bool>,
    between: &Arc<Between>,
) -> BoxFuture<'static, Result<(), BoxError>>
where
    S: HttpService<Incoming>,
{
    let mut http1 = builder.clone();
    // The head timer: one per hyper connection, reused for every head (see
    // `head_timer`); made again after a rest rather than kept through it.
    http1.timer(ConnectionTimer::new());
    let io = RestingIo::new(stream, Arc::clone(between));
    let service = PerConnection::new(service, peer, what).resting(between);
    Box::pin(ServeHttp1 {
        conn: http1
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades(),
        closing: async move {
            let _ = closing.wait_for(|closing| *closing).await;
        },
        shutting_down: false,
    })
}

/// A connection's socket as hyper sees it while it serves: it reports an end of stream
/// once the connection has been quiet for [`REST_AFTER`] where it may rest (see the
/// module's notes), and then hands the socket back instead of shutting it.
struct RestingIo {
    io: Option<StallGuard<TcpStream>>,
    between: Arc<Between>,
    /// Everything written was flushed.
    flushed: bool,
    /// Set when the connection first waited where it may rest; when it goes off with no
    /// read since it was set, the connection has been quiet that long. Else it is set
    /// again: a busy connection costs a timer once a second, not a clock read per call.
    quiet: Option<Pin<Box<Sleep>>>,
    /// Reads that brought bytes, and their count when `quiet` was set.
    reads: u32,
    reads_when_set: u32,
    /// The end of stream was reported.
    ended: bool,
}

impl RestingIo {
    fn new(stream: TcpStream, between: Arc<Between>) -> RestingIo {
        RestingIo {
            io: Some(StallGuard::new(stream)),
            between,
            flushed: true,
            quiet: None,
            reads: 0,
            reads_when_set: 0,
            ended: false,
        }
    }

    fn io(&mut self) -> io::Result<Pin<&mut StallGuard<TcpStream>>> {
        match &mut self.io {
            Some(io) => Ok(Pin::new(io)),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl AsyncRead for RestingIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let polled = this.io()?.poll_read(cx, buf);
        match polled {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    this.between.read_since_head.store(true, Ordering::Relaxed);
                    this.reads = this.reads.wrapping_add(1);
                }
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
        if !this.flushed || !this.between.may_rest() {
            return Poll::Pending;
        }
        let quiet = match &mut this.quiet {
            // Its waker is this task's: no need to poll it again until it went off.
            Some(quiet) if !quiet.is_elapsed() => return Poll::Pending,
            Some(quiet) => quiet,
            None => {
                this.reads_when_set = this.reads;
                this.quiet.insert(Box::pin(tokio::time::sleep(REST_AFTER)))
            }
        };
        loop {
            std::task::ready!(quiet.as_mut().poll(cx));
            if this.reads_when_set == this.reads {
                this.ended = true;
                return Poll::Ready(Ok(()));
            }
            // Calls came since: quiet from now on, if it stays so.
            this.reads_when_set = this.reads;
            quiet.as_mut().reset(Instant::now() + REST_AFTER);
        }
    }
}

impl AsyncWrite for RestingIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.flushed = false;
        self.io()?.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.flushed = false;
        self.io()?.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let flushed = std::task::ready!(self.io()?.poll_flush(cx));
        self.flushed = flushed.is_ok();
        Poll::Ready(flushed)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.ended {
            // hyper is done with a quiet connection: the socket goes back, open.
            if let Some(io) = self.io.take() {
                *self
                    .between
                    .returned
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = Some(io.into_inner());
            }
            return Poll::Ready(Ok(()));
        }
        self.io()?.poll_shutdown(cx)
    }
}
