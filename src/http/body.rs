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

/// A process-wide budget of bytes held in memory (request bodies kept for retries, token
/// forms read before their sender is known): past it, the holder does without.
pub struct ByteBudget {
    held: std::sync::atomic::AtomicUsize,
    limit: usize,
}

impl ByteBudget {
    pub const fn new(limit: usize) -> ByteBudget {
        ByteBudget {
            held: std::sync::atomic::AtomicUsize::new(0),
            limit,
        }
    }
}

/// Bytes counted against a [`ByteBudget`]; given back when dropped.
#[derive(Default)]
pub struct Reserved {
    budget: Option<&'static ByteBudget>,
    bytes: usize,
}

impl Reserved {
    /// Count `n` more bytes against `budget`, if it has room for them.
    pub fn grow(&mut self, budget: &'static ByteBudget, n: usize) -> bool {
        use std::sync::atomic::Ordering;
        let fits = budget
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n).filter(|h| *h <= budget.limit)
            })
            .is_ok();
        if fits {
            self.budget = Some(budget);
            self.bytes += n;
        }
        fits
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if let Some(budget) = self.budget {
            budget
                .held
                .fetch_sub(self.bytes, std::sync::atomic::Ordering::AcqRel);
        }
    }
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
///   `idle`, or the caller takes nothing for `idle` (see `pump`): a stalled answer, or
///   one nobody reads, frees its connection instead of pinning it for ever.
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
    pump(read.into_frames(), body, permit, idle)
}

/// How long a streaming answer's caller may take nothing before the answer is cut and its
/// upstream connection freed, whatever `timeout_secs` says: the connection is shared, and
/// a caller that does not read is not waiting on the API.
pub const CALLER_STALL: std::time::Duration = std::time::Duration::from_secs(10);
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

/// Why a streaming answer was cut (seen in logs; the caller sees its answer end short).
#[derive(Debug, thiserror::Error)]
pub enum AnswerCut {
    #[error("the upstream sent nothing of the answer for {0:?} (timeout_secs); it was cut off")]
    UpstreamStalled(std::time::Duration),
    #[error("the caller took nothing of the answer for {0:?}; it was cut off and its upstream connection freed")]
    CallerStalled(std::time::Duration),
}

/// Frames of a streaming answer in flight between its two ends: enough to keep both sides
/// busy, few enough that a caller who does not read holds little.
const PUMP_FRAMES: usize = 2;

/// The streaming path of [`settle_answer`]: a task of its own moves the answer from the
/// upstream to the caller through a small channel, holding the connection `permit` until
/// the answer has been read from the upstream or cut.
///
/// Its own task, because the caller's side stops polling a body it cannot send on (a full
/// socket, an HTTP/2 caller's zero window): a deadline inside that body would never be
/// looked at, and a caller who does not read would pin the upstream connection for good.
/// Here either end making no progress for `idle` ends the answer: with an error, so the
/// caller's answer ends short (never as if it were whole), and the upstream connection is
/// dropped mid-answer (never reused).
fn pump<B, T>(
    read: Vec<http_body::Frame<Bytes>>,
    mut body: B,
    permit: T,
    idle: std::time::Duration,
) -> ProxyBody
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<BoxError>,
    T: Send + 'static,
{
    let (mut tx, rx) = http_body_util::channel::Channel::<Bytes, BoxError>::new(PUMP_FRAMES);
    tokio::spawn(async move {
        let _held_until_the_answer_is_read = permit;
        let mut read = read.into_iter();
        loop {
            let frame = match read.next() {
                Some(frame) => frame,
                None => match tokio::time::timeout(idle, body.frame()).await {
                    Ok(Some(Ok(frame))) => frame,
                    // The whole answer: the caller's body ends when `tx` is dropped.
                    Ok(None) => return,
                    Ok(Some(Err(e))) => return tx.abort(e.into()),
                    Err(_) => {
                        let cut = AnswerCut::UpstreamStalled(idle);
                        tracing::warn!("{cut}");
                        return tx.abort(Box::new(cut));
                    }
                },
            };
            let caller_idle = idle.min(CALLER_STALL);
            match tokio::time::timeout(caller_idle, tx.send(frame)).await {
                Ok(Ok(())) => {}
                // The caller hung up: nobody is left to tell.
                Ok(Err(_)) => return,
                Err(_) => {
                    let cut = AnswerCut::CallerStalled(caller_idle);
                    tracing::warn!("{cut}");
                    return tx.abort(Box::new(cut));
                }
            }
        }
    });
    boxed(rx)
}

/// A caller's request body must keep arriving: nothing for this long ends it.
pub const REQUEST_BODY_IDLE: std::time::Duration = std::time::Duration::from_secs(10);
/// ...and all of it must arrive within this long of the request's head.
pub const REQUEST_BODY_TOTAL: std::time::Duration = std::time::Duration::from_secs(60);

/// A request body that fails with [`BodyTimedOut`] when its
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
        use crate::http::body::BodyTimedOut;
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

/// The error a request body yields when it crosses `max_body_bytes` while streaming.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the request body is larger than the limit of {0} bytes")]
pub struct BodyLimitExceeded(pub u64);

/// The error a request body yields when its caller is too slow to send it.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub enum BodyTimedOut {
    #[error("the request body stopped arriving: nothing came for {0:?}")]
    Idle(std::time::Duration),
    #[error("the request body took longer than {0:?} to arrive")]
    Total(std::time::Duration),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A body the test feeds frame by frame; nothing is here until it sends.
    fn fed() -> (
        http_body_util::channel::Sender<Bytes, BoxError>,
        http_body_util::channel::Channel<Bytes, BoxError>,
    ) {
        http_body_util::channel::Channel::new(8)
    }

    /// A permit whose release the test can see.
    fn permit() -> (
        tokio::sync::oneshot::Sender<()>,
        tokio::sync::oneshot::Receiver<()>,
    ) {
        tokio::sync::oneshot::channel()
    }

    #[tokio::test(start_paused = true)]
    async fn a_small_answer_already_here_frees_its_permit_at_once() {
        let (mut tx, upstream) = fed();
        tx.send_data(Bytes::from_static(b"{}")).await.unwrap();
        drop(tx);
        let (held, mut released) = permit();
        let answer = settle_answer(upstream, held, Duration::from_secs(2));
        assert_eq!(
            released.try_recv(),
            Err(tokio::sync::oneshot::error::TryRecvError::Closed),
            "freed before the caller read"
        );
        assert_eq!(answer.collect().await.unwrap().to_bytes(), "{}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_upstream_ends_the_answer_with_an_error_and_frees_the_permit() {
        let (mut tx, upstream) = fed();
        let (held, released) = permit();
        let mut answer = settle_answer(upstream, held, Duration::from_secs(2));
        tx.send_data(Bytes::from_static(b"first")).await.unwrap();
        let first = answer.frame().await.unwrap().unwrap();
        assert_eq!(first.into_data().unwrap(), "first");
        // Nothing more comes: after 2 s the caller gets an error, not a clean end.
        let cut = answer.frame().await.unwrap().unwrap_err();
        assert!(cut.to_string().contains("upstream sent nothing"), "{cut}");
        assert!(released.await.is_err(), "the permit was dropped");
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_stops_reading_loses_the_permit_after_the_idle_time() {
        let (mut tx, upstream) = fed();
        let (held, released) = permit();
        let answer = settle_answer(upstream, held, Duration::from_secs(2));
        // The upstream has more than the pump holds; the caller never polls its body.
        for _ in 0..8 {
            tx.send_data(Bytes::from_static(b"chunk")).await.unwrap();
        }
        let started = tokio::time::Instant::now();
        assert!(released.await.is_err(), "the permit was dropped");
        assert!(started.elapsed() >= Duration::from_secs(2));
        // The frames already handed over are there, then the error: never a clean end.
        let mut answer = answer;
        let mut frames = 0;
        let ended = loop {
            match answer.frame().await {
                Some(Ok(_)) => frames += 1,
                Some(Err(e)) => break e.to_string(),
                None => panic!("the cut answer ended as if it were whole"),
            }
        };
        assert_eq!(frames, PUMP_FRAMES);
        assert!(ended.contains("caller took nothing"), "{ended}");
    }
}
