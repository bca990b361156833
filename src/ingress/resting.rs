//! A quiet plain HTTP/1.1 connection holds its socket and nothing else.
//!
//! hyper's HTTP/1 connection keeps an 8 KiB read buffer, an 8 KiB write buffer and its
//! parser's state for its whole life, busy or idle: with 10,000 idle keep-alive callers
//! that was about 12 KiB each (`benches/load.sh`), where nginx, which frees an idle
//! connection's buffers, needs about 1 KiB. So here a connection that has been quiet for
//! [`REST_AFTER`] between two requests leaves hyper: its socket reports an end of stream
//! to hyper at that moment, hyper (which allows half-closed connections) ends the
//! connection as a client that finished would end it, but without shutting the socket
//! ([`RestingIo`] hands it back instead), and the socket waits alone for its next request,
//! whose first bytes start a new hyper connection.
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

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use super::between::{Between, RESTED};
use super::connection::{HttpService, PerConnection, ServeHttp1, HEADER_READ_TIMEOUT};
use super::head_timer::ConnectionTimer;
use super::watch::StallGuard;
use crate::http::body::BoxError;

/// How long a connection stays quiet between requests before it leaves hyper (up to twice
/// this: see `RestingIo::quiet`). Long next to the time between a busy caller's calls,
/// short next to an idle one's life.
pub const REST_AFTER: Duration = Duration::from_secs(1);

/// Serve a plain HTTP/1.1 connection (with upgrades), handing it to hyper while it is
/// busy and holding only its socket while it is quiet; ends when the caller closes it,
/// sends nothing within [`HEADER_READ_TIMEOUT`] of resting, or the listener closes.
pub(super) async fn serve<S>(
    mut stream: TcpStream,
    builder: Arc<http1::Builder>,
    service: S,
    peer: IpAddr,
    what: &'static str,
    mut closed: tokio::sync::watch::Receiver<bool>,
) -> Result<(), BoxError>
where
    S: HttpService<Incoming>,
{
    loop {
        // Made for each hyper connection (nothing read, no request yet), and gone with
        // it: a resting connection holds its task and its socket, nothing more.
        let between = Arc::new(Between::default());
        let mut http1 = (*builder).clone();
        // The head timer: one per hyper connection, reused for every head (see
        // `head_timer`); made again after a rest rather than kept through it.
        http1.timer(ConnectionTimer::new());
        let io = RestingIo::new(stream, Arc::clone(&between));
        let service = PerConnection::new(service.clone(), peer, what).resting(&between);
        let mut closing = closed.clone();
        // Boxed: hyper's connection is allocated while it serves, not while it rests.
        let served = Box::pin(ServeHttp1 {
            conn: http1
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades(),
            closing: async move {
                let _ = closing.wait_for(|closing| *closing).await;
            },
            shutting_down: false,
        })
        .await;
        let returned = between
            .returned
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        stream = match (served, returned) {
            (Ok(()), Some(stream)) => stream,
            (served, _) => return served,
        };
        RESTED.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            ready = tokio::time::timeout(HEADER_READ_TIMEOUT, stream.readable()) => {
                if !matches!(ready, Ok(Ok(()))) {
                    return Ok(());
                }
            }
            _ = closed.wait_for(|closing| *closing) => return Ok(()),
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Answers every request with the length of its body; counts its clones (one per
    /// hyper connection a socket was served by).
    struct Counted(Arc<AtomicUsize>);

    impl Clone for Counted {
        fn clone(&self) -> Self {
            self.0.fetch_add(1, Ordering::Relaxed);
            Counted(Arc::clone(&self.0))
        }
    }

    impl tower::Service<http::Request<Incoming>> for Counted {
        type Response = http::Response<crate::http::body::ProxyBody>;
        type Error = Infallible;
        type Future = futures_util::future::BoxFuture<'static, Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, req: http::Request<Incoming>) -> Self::Future {
            Box::pin(async move {
                let body = http_body_util::BodyExt::collect(req.into_body()).await;
                let n = body.map(|b| b.to_bytes().len()).unwrap_or(usize::MAX);
                Ok(http::Response::new(crate::http::body::full(n.to_string())))
            })
        }
    }

    struct Server {
        addr: std::net::SocketAddr,
        served_by: Arc<AtomicUsize>,
    }

    async fn server() -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served_by = Arc::new(AtomicUsize::new(0));
        let counted = Counted(Arc::clone(&served_by));
        tokio::spawn(async move {
            let (_closing, closed) = tokio::sync::watch::channel(false);
            while let Ok((stream, peer)) = listener.accept().await {
                let mut builder = http1::Builder::new();
                builder.half_close(true);
                let (service, closed) = (counted.clone(), closed.clone());
                tokio::spawn(serve(
                    stream,
                    Arc::new(builder),
                    service,
                    peer.ip(),
                    "test",
                    closed,
                ));
            }
        });
        Server { addr, served_by }
    }

    impl Server {
        /// Clones of the service so far: one per accepted socket, one per hyper
        /// connection that served it.
        fn bursts(&self) -> usize {
            self.served_by.load(Ordering::Relaxed)
        }
    }

    async fn answer(client: &mut TcpStream) -> String {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if body.len() >= len {
                    return body.to_string();
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_connection_rests_and_serves_its_next_request() {
        let s = server().await;
        let mut client = TcpStream::connect(s.addr).await.unwrap();
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(answer(&mut client).await, "0");
        let first = s.bursts();
        // Quiet for longer than REST_AFTER (paused time: the clock moves, nothing waits).
        tokio::time::sleep(REST_AFTER * 2).await;
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(answer(&mut client).await, "0");
        assert_eq!(
            s.bursts(),
            first + 1,
            "the second request found the connection resting"
        );
        // A busy connection does not rest: back to back, the same hyper connection.
        for _ in 0..3 {
            client
                .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                .await
                .unwrap();
            assert_eq!(answer(&mut client).await, "0");
        }
        assert_eq!(s.bursts(), first + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_half_sent_or_an_upgrade_keeps_the_connection_in_hyper() {
        let s = server().await;
        let mut client = TcpStream::connect(s.addr).await.unwrap();
        client
            .write_all(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 10\r\n\r\nhello")
            .await
            .unwrap();
        tokio::time::sleep(REST_AFTER * 3).await;
        client.write_all(b"world").await.unwrap();
        assert_eq!(answer(&mut client).await, "10", "the body came whole");
        let first = s.bursts();
        client
            .write_all(
                b"GET / HTTP/1.1\r\nhost: x\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
            )
            .await
            .unwrap();
        assert_eq!(answer(&mut client).await, "0");
        tokio::time::sleep(REST_AFTER * 3).await;
        client
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(answer(&mut client).await, "0");
        assert_eq!(s.bursts(), first, "no rest after an upgrade request");
    }
}
