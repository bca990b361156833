//! The one body type that travels through the stack, and the helpers to make it.

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full};

/// Errors inside the stack, where their type does not matter to anyone but a log line.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streamed request or response body: a caller's upload, an upstream's answer, or a
/// body the proxy made itself.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Box any body whose errors can be boxed (hyper's `Incoming`, a limited body, ...).
pub fn boxed<B>(body: B) -> ProxyBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// Read a whole small body; `None` if it is longer than `limit` or fails.
pub async fn read_small(mut body: ProxyBody, limit: usize) -> Option<Bytes> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            if out.len() + data.len() > limit {
                return None;
            }
            out.extend_from_slice(&data);
        }
    }
    Some(out.into())
}

/// Answers whose body is already here when their head arrives, up to this size, are read
/// whole before they are passed on (see [`settle_answer`]).
pub const SETTLED_ANSWER_BYTES: usize = 64 * 1024;

/// An upstream's answer body, made so that a slow or stalled caller cannot hold the
/// upstream connection (`permit`) for longer than the answer needs:
///
/// - what is already here is taken at once, without waiting; if that is the whole body
///   (and at most [`SETTLED_ANSWER_BYTES`]), the permit is given back right away and the
///   caller reads from memory at its own pace. Most API answers are small JSON that
///   arrives with its head.
/// - otherwise the body streams with the permit held, and is cut (the connection to the
///   upstream dropped, the caller's answer truncated) when the upstream sends nothing for
///   `idle`: a stalled answer frees its connection instead of pinning it for ever.
pub fn settle_answer<B, T>(mut body: B, permit: T, idle: std::time::Duration) -> ProxyBody
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
    T: Send + Unpin + 'static,
{
    use futures_util::FutureExt as _;
    // Most answers are one data frame: it is kept apart, and a list is made only for more.
    let mut read = Read::default();
    let mut size = 0usize;
    loop {
        if body.is_end_stream() {
            drop(permit);
            return read.whole();
        }
        match body.frame().now_or_never() {
            Some(None) => {
                drop(permit);
                return read.whole();
            }
            Some(Some(Ok(frame))) => {
                size += frame.data_ref().map_or(0, Bytes::len);
                let more = frame.is_data() && size <= SETTLED_ANSWER_BYTES;
                read.push(frame);
                if !more {
                    break;
                }
            }
            // Not here yet, or failed: the streaming path reports a failure in order.
            Some(Some(Err(e))) => {
                let e: BoxError = e.into();
                let failed = futures_util::stream::once(async move { Err(e) });
                let read = futures_util::stream::iter(read.into_frames().into_iter().map(Ok));
                return boxed(http_body_util::StreamBody::new(
                    futures_util::StreamExt::chain(read, failed),
                ));
            }
            None => break,
        }
    }
    boxed(Streaming {
        read: read.into_frames().into(),
        inner: body,
        _permit: permit,
        idle,
        quiet: QuietTimer::new(),
    })
}

/// The frames of an answer read so far: the first on its own, a list only past it.
#[derive(Default)]
struct Read {
    first: Option<http_body::Frame<Bytes>>,
    more: Vec<http_body::Frame<Bytes>>,
}

impl Read {
    fn push(&mut self, frame: http_body::Frame<Bytes>) {
        if self.first.is_none() {
            self.first = Some(frame);
        } else {
            self.more.push(frame);
        }
    }

    fn into_frames(self) -> Vec<http_body::Frame<Bytes>> {
        let mut frames = Vec::from_iter(self.first);
        frames.extend(self.more);
        frames
    }

    /// The frames read, as one body: one data frame (most answers) needs no list.
    fn whole(self) -> ProxyBody {
        match (self.first, self.more.is_empty()) {
            (Some(first), true) if first.is_data() => match first.into_data() {
                Ok(data) if !data.is_empty() => full(data),
                _ => empty(),
            },
            (first, _) => whole(
                Read {
                    first,
                    more: self.more,
                }
                .into_frames(),
            ),
        }
    }
}

/// The frames read, as one body (one `Bytes` when there was one data frame).
fn whole(mut read: Vec<http_body::Frame<Bytes>>) -> ProxyBody {
    if read.iter().all(http_body::Frame::is_data) {
        let mut data: Vec<Bytes> = read.drain(..).filter_map(|f| f.into_data().ok()).collect();
        return match data.len() {
            0 => empty(),
            1 => full(data.swap_remove(0)),
            _ => full(data.concat()),
        };
    }
    boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
        read.into_iter().map(Ok::<_, std::convert::Infallible>),
    )))
}

/// The error that ends an answer the upstream stopped sending (seen in logs only).
#[derive(Debug, thiserror::Error)]
#[error("the upstream sent nothing of the answer for {0:?} (timeout_secs); it was cut off")]
pub struct AnswerStalled(std::time::Duration);

/// An answer streaming from the upstream with its connection permit (see [`settle_answer`]).
struct Streaming<B, T> {
    read: std::collections::VecDeque<http_body::Frame<Bytes>>,
    inner: B,
    /// Held, never read: the connection is the upstream's until this body ends.
    _permit: T,
    idle: std::time::Duration,
    quiet: QuietTimer,
}

impl<B, T> http_body::Body for Streaming<B, T>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    T: Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let this = self.get_mut();
        if let Some(frame) = this.read.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            this.quiet.progressed();
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let due = this.quiet.last_progress + this.idle;
        if this.quiet.poll_until(due, cx).is_pending() {
            return Poll::Pending;
        }
        let cut = AnswerStalled(this.idle);
        tracing::warn!("{cut}");
        Poll::Ready(Some(Err(Box::new(cut))))
    }

    fn is_end_stream(&self) -> bool {
        self.read.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let read: u64 = self
            .read
            .iter()
            .filter_map(|f| f.data_ref())
            .map(|d| d.len() as u64)
            .sum();
        let inner = self.inner.size_hint();
        let mut hint = http_body::SizeHint::new();
        hint.set_lower(inner.lower() + read);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + read);
        }
        hint
    }
}

/// A caller's request body must keep arriving: nothing for this long ends it.
pub const REQUEST_BODY_IDLE: std::time::Duration = std::time::Duration::from_secs(10);
/// ...and all of it must arrive within this long of the request's head.
pub const REQUEST_BODY_TOTAL: std::time::Duration = std::time::Duration::from_secs(60);

/// A request body that fails with [`BodyTimedOut`](crate::error::BodyTimedOut) when its
/// caller stops sending ([`REQUEST_BODY_IDLE`]) or takes too long in all
/// ([`REQUEST_BODY_TOTAL`]), so a slow upload cannot hold memory, a connection to the
/// upstream, or a token-endpoint read for ever. The timer is armed only when the body has
/// to wait for its caller; a body that is already here costs a clock read.
pub fn with_deadlines(body: ProxyBody) -> ProxyBody {
    let quiet = QuietTimer::new();
    boxed(SlowBodyGuard {
        inner: body,
        total_due: quiet.last_progress + REQUEST_BODY_TOTAL,
        quiet,
    })
}

struct SlowBodyGuard {
    inner: ProxyBody,
    total_due: tokio::time::Instant,
    quiet: QuietTimer,
}

impl http_body::Body for SlowBodyGuard {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        use crate::error::BodyTimedOut;
        use std::task::Poll;
        let this = self.get_mut();
        if let Poll::Ready(frame) = std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            this.quiet.progressed();
            return Poll::Ready(frame);
        }
        let idle_due = this.quiet.last_progress + REQUEST_BODY_IDLE;
        let due = idle_due.min(this.total_due);
        if this.quiet.poll_until(due, cx).is_pending() {
            return Poll::Pending;
        }
        let late = if due == this.total_due {
            BodyTimedOut::Total(REQUEST_BODY_TOTAL)
        } else {
            BodyTimedOut::Idle(REQUEST_BODY_IDLE)
        };
        Poll::Ready(Some(Err(Box::new(late))))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// When a body last made progress, and a timer for "nothing since": armed only when the
/// body has to wait, and moved on lazily, so a frame costs a clock read, not a timer
/// update.
struct QuietTimer {
    last_progress: tokio::time::Instant,
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl QuietTimer {
    fn new() -> QuietTimer {
        QuietTimer {
            last_progress: tokio::time::Instant::now(),
            timer: None,
        }
    }

    fn progressed(&mut self) {
        self.last_progress = tokio::time::Instant::now();
    }

    /// Ready once `due` has passed; otherwise wakes the task at `due`.
    fn poll_until(
        &mut self,
        due: tokio::time::Instant,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        use std::future::Future as _;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if timer.deadline() != due {
            timer.as_mut().reset(due);
        }
        timer.as_mut().poll(cx)
    }
}
