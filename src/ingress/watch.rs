//! What a served connection is doing, for the rules that close it.
//!
//! A connection holds a slot of its listener (and of its client's address) and a file
//! descriptor, so a connection that serves nobody must not keep them:
//!
//! - **Idle**: an HTTP/2 (or HTTPS) connection with nothing in flight and no answered
//!   request for [`IDLE`] is closed gracefully. Requests the proxy refused (401: no key,
//!   a wrong key) do not count as activity, and a connection that never carried anything
//!   else is idle after [`IDLE_UNAUTHENTICATED`]: one keyless request every 20 s no
//!   longer keeps a connection open for ever.
//! - **Stuck**: an answer its caller takes nothing of for [`ANSWER_STALL`] (an HTTP/2
//!   reader with a zero window, a caller whose socket stays full) ends its connection: a
//!   graceful close would wait for that very answer. [`StallGuard`] does the same for
//!   writes to the socket (HTTP/1.1 callers that pipeline requests and never read).
//!
//! [`Watch`] is shared by the connection's service ([`Watched`]), the bodies of its
//! answers (`WatchedBody`) and the task serving it, which looks at it every [`TICK`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tower::Service;

use crate::call::messages::{OnConnection, TokenForms};
use crate::http::body::{BoxError, ProxyBody};

/// A connection with nothing in flight and nothing answered (but refusals) for this long
/// is closed.
pub const IDLE: Duration = Duration::from_secs(30);
/// ... and for this long when it never carried anything but refusals.
pub const IDLE_UNAUTHENTICATED: Duration = Duration::from_secs(10);
/// An answer, or a write to the socket, that makes no progress for this long because the
/// caller takes nothing ends the connection.
pub const ANSWER_STALL: Duration = Duration::from_secs(10);
/// How often a connection's serving task looks at its [`Watch`].
pub const TICK: Duration = Duration::from_secs(2);
/// Token-endpoint requests read at once on one connection (see
/// [`crate::front::token_endpoint`]).
pub const TOKEN_READS_PER_CONNECTION: usize = 2;

/// One connection's activity.
#[derive(Debug)]
pub struct Watch {
    since: Instant,
    /// Requests whose answer head is not out yet.
    in_flight: AtomicUsize,
    /// Answer bodies not yet finished or dropped.
    open_bodies: AtomicUsize,
    /// Of those, the ones waiting for the caller to take their next frame.
    awaiting_caller: AtomicUsize,
    /// Milliseconds after `since`: the last answer that was not a refusal.
    last_answered_ms: AtomicU64,
    /// Milliseconds after `since`: the last frame a caller took (or answer that started).
    last_delivery_ms: AtomicU64,
    /// Some answer on it was not a refusal.
    authenticated: AtomicBool,
    /// Token-endpoint forms being read on it.
    token_forms: Arc<TokenForms>,
}

/// What the serving task should do with its connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Serve,
    /// Nothing is happening: close gracefully.
    Idle,
    /// An answer is not being taken: drop it now.
    Stuck,
}

impl Watch {
    pub fn new() -> Arc<Watch> {
        Arc::new(Watch {
            since: Instant::now(),
            in_flight: AtomicUsize::new(0),
            open_bodies: AtomicUsize::new(0),
            awaiting_caller: AtomicUsize::new(0),
            last_answered_ms: AtomicU64::new(0),
            last_delivery_ms: AtomicU64::new(0),
            authenticated: AtomicBool::new(false),
            token_forms: Arc::default(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.since.elapsed().as_millis() as u64
    }

    pub fn verdict(&self) -> Verdict {
        let now = self.now_ms();
        let stalled = now.saturating_sub(self.last_delivery_ms.load(Ordering::Relaxed));
        if self.awaiting_caller.load(Ordering::Relaxed) > 0
            && stalled >= ANSWER_STALL.as_millis() as u64
        {
            return Verdict::Stuck;
        }
        let busy = self.in_flight.load(Ordering::Relaxed) > 0
            || self.open_bodies.load(Ordering::Relaxed) > 0;
        let limit = if self.authenticated.load(Ordering::Relaxed) {
            IDLE
        } else {
            IDLE_UNAUTHENTICATED
        };
        let quiet = now.saturating_sub(self.last_answered_ms.load(Ordering::Relaxed));
        if !busy && quiet >= limit.as_millis() as u64 {
            return Verdict::Idle;
        }
        Verdict::Serve
    }
}

/// Resolves with the first verdict other than [`Verdict::Serve`], looking every [`TICK`].
pub async fn until_closing(watch: &Watch) -> Verdict {
    loop {
        tokio::time::sleep(TICK).await;
        match watch.verdict() {
            Verdict::Serve => {}
            other => return other,
        }
    }
}

/// A connection's service, noting its requests and answers in its [`Watch`].
#[derive(Clone)]
pub struct Watched<S> {
    inner: S,
    watch: Arc<Watch>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, watch: &Arc<Watch>) -> Watched<S> {
        Watched {
            inner,
            watch: Arc::clone(watch),
        }
    }
}

/// Counts a request in flight until its answer head is out (or the call is dropped).
struct InFlight(Arc<Watch>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S, B> Service<Request<B>> for Watched<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>>,
{
    type Response = Response<ProxyBody>;
    type Error = S::Error;
    type Future = WatchedCall<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        self.watch.in_flight.fetch_add(1, Ordering::Relaxed);
        let held = InFlight(Arc::clone(&self.watch));
        // Only POSTs can be token requests; the mark costs an allocation.
        if req.method() == http::Method::POST {
            req.extensions_mut()
                .insert(OnConnection(Arc::clone(&self.watch.token_forms)));
        }
        WatchedCall {
            call: self.inner.call(req),
            held: Some(held),
        }
    }
}

pin_project_lite::pin_project! {
    /// A request's call on a watched connection: counted in flight until its answer.
    pub struct WatchedCall<F> {
        #[pin]
        call: F,
        held: Option<InFlight>,
    }
}

impl<F, E> Future for WatchedCall<F>
where
    F: Future<Output = Result<Response<ProxyBody>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let answer = std::task::ready!(this.call.poll(cx));
        match this.held.take() {
            Some(held) => Poll::Ready(answered(answer, held)),
            None => Poll::Ready(answer),
        }
    }
}

/// Note an answer in its connection's watch, and watch its body.
fn answered<E>(
    answer: Result<Response<ProxyBody>, E>,
    held: InFlight,
) -> Result<Response<ProxyBody>, E> {
    let watch = Arc::clone(&held.0);
    drop(held);
    let resp = answer?;
    let now = watch.now_ms();
    if resp.status() != StatusCode::UNAUTHORIZED {
        watch.authenticated.store(true, Ordering::Relaxed);
        watch.last_answered_ms.store(now, Ordering::Relaxed);
    }
    watch.last_delivery_ms.store(now, Ordering::Relaxed);
    watch.open_bodies.fetch_add(1, Ordering::Relaxed);
    watch.awaiting_caller.fetch_add(1, Ordering::Relaxed);
    Ok(resp.map(|inner| {
        crate::http::body::boxed(WatchedBody {
            inner,
            watch,
            awaiting_caller: true,
            open: true,
        })
    }))
}

/// An answer's body, telling its connection's [`Watch`] whether the caller is taking it.
///
/// Waiting for the caller: from the answer's start, and after each frame handed over,
/// until the next poll. A poll that finds nothing (the upstream has not sent more) is the
/// source's wait, not the caller's.
struct WatchedBody {
    inner: ProxyBody,
    watch: Arc<Watch>,
    awaiting_caller: bool,
    open: bool,
}

impl WatchedBody {
    fn awaiting_caller(&mut self, awaiting: bool) {
        if self.awaiting_caller != awaiting {
            self.awaiting_caller = awaiting;
            if awaiting {
                self.watch.awaiting_caller.fetch_add(1, Ordering::Relaxed);
            } else {
                self.watch.awaiting_caller.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn close(&mut self) {
        if self.open {
            self.awaiting_caller(false);
            self.open = false;
            self.watch.open_bodies.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl http_body::Body for WatchedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Pending => this.awaiting_caller(false),
            Poll::Ready(Some(Ok(_))) => {
                this.watch
                    .last_delivery_ms
                    .store(this.watch.now_ms(), Ordering::Relaxed);
                this.awaiting_caller(true);
            }
            Poll::Ready(_) => this.close(),
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for WatchedBody {
    fn drop(&mut self) {
        self.close();
    }
}

pin_project_lite::pin_project! {
    /// A socket whose writes fail once they have been blocked for [`ANSWER_STALL`]: a
    /// caller that stops reading (and lets its receive window fill) loses its connection
    /// instead of holding it, and its slot, for ever.
    pub struct StallGuard<T> {
        #[pin]
        io: T,
        blocked: Option<Pin<Box<Sleep>>>,
        blocked_now: bool,
    }
}

impl<T> StallGuard<T> {
    pub fn new(io: T) -> StallGuard<T> {
        StallGuard {
            io,
            blocked: None,
            blocked_now: false,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }

    pub fn into_inner(self) -> T {
        self.io
    }
}

/// What a write that stayed blocked fails with.
fn stalled() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("the caller took nothing for {ANSWER_STALL:?}"),
    )
}

impl<T: AsyncWrite> StallGuard<T> {
    /// Pass `polled` on, timing how long writing stays blocked.
    fn timed<R>(
        blocked: &mut Option<Pin<Box<Sleep>>>,
        blocked_now: &mut bool,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<R>>,
    ) -> Poll<std::io::Result<R>> {
        if polled.is_ready() {
            *blocked_now = false;
            return polled;
        }
        let due = Instant::now() + ANSWER_STALL;
        let timer = blocked.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if !*blocked_now {
            *blocked_now = true;
            timer.as_mut().reset(due);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(stalled())),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead> AsyncRead for StallGuard<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<T: AsyncWrite> AsyncWrite for StallGuard<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.io.poll_write(cx, buf);
        Self::timed(this.blocked, this.blocked_now, cx, polled)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.io.poll_write_vectored(cx, bufs);
        Self::timed(this.blocked, this.blocked_now, cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let polled = this.io.poll_flush(cx);
        Self::timed(this.blocked, this.blocked_now, cx, polled)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let polled = this.io.poll_shutdown(cx);
        Self::timed(this.blocked, this.blocked_now, cx, polled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn refusals_alone_leave_a_connection_idle_and_an_untaken_answer_stuck() {
        let watch = Watch::new();
        assert_eq!(watch.verdict(), Verdict::Serve);
        tokio::time::advance(IDLE_UNAUTHENTICATED).await;
        assert_eq!(watch.verdict(), Verdict::Idle);
        // An answered request (not a refusal) makes it busy, then idle only after IDLE.
        let resp = Response::new(crate::http::body::full("ok"));
        let body = answered::<()>(Ok(resp), in_flight(&watch))
            .unwrap()
            .into_body();
        assert_eq!(watch.verdict(), Verdict::Serve);
        // Nobody takes the answer: stuck after ANSWER_STALL.
        tokio::time::advance(ANSWER_STALL).await;
        assert_eq!(watch.verdict(), Verdict::Stuck);
        drop(body);
        assert_eq!(watch.verdict(), Verdict::Serve);
        tokio::time::advance(IDLE).await;
        assert_eq!(watch.verdict(), Verdict::Idle);
    }

    fn in_flight(watch: &Arc<Watch>) -> InFlight {
        watch.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(watch))
    }
}
