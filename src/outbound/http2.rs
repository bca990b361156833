//! HTTP/2 to the API host, with hyper's own HTTP/2 crate (`h2`) driven directly.
//!
//! Why not hyper's `client::conn::http2`: it puts two tasks and a channel between a call
//! and its stream. A request goes through a channel to a dispatch task, which opens the
//! stream and spawns a task per request to wait for the answer and hand it back through a
//! oneshot; the connection's frames are written by a third task. Measured on the h2 bench
//! (`benches/load.sh`, case tls2), that was the largest part of what tokengate spent per
//! call above haproxy's `proto h2`. Here the call's own task opens the stream (a lock of
//! the connection's state; no task hop), the connection's one task writes every stream's
//! frames together, and the answer wakes the call's task directly.
//!
//! A request body that is not all there at once is piped by the call's future while it
//! waits for the answer, within the stream's flow-control window, and by a task of its
//! own only if the answer arrives before the body has gone out.

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::{RecvStream, SendStream};
use http::{header, HeaderMap, Request, Response};
use http_body::{Body, Frame};

use crate::http::body::{BoxError, ProxyBody};

// hyper's defaults for its HTTP/2 client, kept: large windows, so one answer does not wait
// for window updates; no server push.
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const MAX_FRAME_SIZE: u32 = 16 * 1024;
const MAX_SEND_BUFFER: usize = 1024 * 1024;
const MAX_HEADER_LIST: u32 = 16 * 1024;
/// Streams opened before the API host's SETTINGS say how many it allows.
const INITIAL_MAX_SEND_STREAMS: usize = 100;

/// The HTTP/2 handshake on `io` (TLS with h2 chosen by ALPN): the sender to open streams
/// with, and a guard whose drop tells the connection's task that the worker has forgotten
/// the connection (it then ends once its last stream does).
pub(super) async fn handshake<T>(
    io: T,
) -> Result<(SendRequest<Bytes>, tokio::sync::oneshot::Sender<()>), h2::Error>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, connection) = h2::client::Builder::new()
        .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_header_list_size(MAX_HEADER_LIST)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await?;
    let (forgotten, forgotten_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        tokio::pin!(connection);
        let ended = tokio::select! {
            ended = &mut connection => ended,
            // No sender is left. h2 closes a client connection that has neither senders
            // nor streams, but only when polled: poll it on to its end.
            _ = forgotten_rx => connection.await,
        };
        if let Err(e) = ended {
            tracing::debug!(error = %e, "an HTTP/2 connection to an upstream ended");
        }
    });
    Ok((sender, forgotten))
}

/// Headers that belong to one HTTP/1.1 connection and are malformed in HTTP/2 (RFC 9113
/// §8.2.2); `TE` only as `trailers`. The caller's own hop-by-hop headers went at the edge;
/// these can still be there (`Transfer-Encoding` of a chunked request, say). One pass
/// over the names first: usually none is there, and then no name is hashed.
fn strip_connection_headers(headers: &mut HeaderMap) {
    if !headers.keys().any(is_connection_specific) {
        return;
    }
    if headers
        .get(header::TE)
        .is_some_and(|te| te.as_bytes() != b"trailers")
    {
        headers.remove(header::TE);
    }
    // Cloning a name copies no bytes (a standard name, or shared bytes).
    while let Some(name) = headers
        .keys()
        .find(|name| is_connection_specific(name) && *name != header::TE)
        .cloned()
    {
        headers.remove(&name);
    }
}

/// A header [`strip_connection_headers`] looks at.
fn is_connection_specific(name: &http::HeaderName) -> bool {
    [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
    ]
    .contains(name)
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Open a stream for `req` on `sender` now (its URI whole, for `:authority`). The head
/// is queued for the connection's task to write with the other streams' frames; what is
/// here of the body goes with it.
pub(super) fn send(
    sender: &mut SendRequest<Bytes>,
    req: Request<ProxyBody>,
) -> Result<Exchange, h2::Error> {
    let (mut parts, body) = req.into_parts();
    strip_connection_headers(&mut parts.headers);
    let end_of_stream = body.is_end_stream();
    let (response, stream) = sender.send_request(Request::from_parts(parts, ()), end_of_stream)?;
    let pipe = (!end_of_stream).then(|| {
        Box::pin(Pipe {
            body,
            stream,
            pending: None,
        })
    });
    let mut exchange = Exchange { response, pipe };
    // A body that is all here (the retry layer keeps small ones) goes out at once.
    exchange.pipe_on(&mut Context::from_waker(std::task::Waker::noop()));
    Ok(exchange)
}

/// The answer to a stream opened by `send`, while what is left of its body goes out.
pub struct Exchange {
    response: ResponseFuture,
    pipe: Option<Pin<Box<Pipe>>>,
}

impl Exchange {
    /// Send what can go of the body now; the pipe goes once the body is out (or failed).
    fn pipe_on(&mut self, cx: &mut Context<'_>) {
        if let Some(pipe) = &mut self.pipe {
            if let Poll::Ready(done) = pipe.as_mut().poll(cx) {
                body_sent(done);
                self.pipe = None;
            }
        }
    }
}

fn body_sent(done: Result<(), BoxError>) {
    if let Err(e) = done {
        tracing::debug!(error = %e, "a request body could not be sent upstream");
    }
}

impl Future for Exchange {
    type Output = Result<Response<Http2Body>, h2::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.pipe_on(cx);
        let answer = ready!(Pin::new(&mut self.response).poll(cx));
        // Answered before the body went out (an early refusal, say): the rest still goes,
        // on its own, as long as the API host takes it.
        if let Some(pipe) = self.pipe.take() {
            tokio::spawn(async move { body_sent(pipe.await) });
        }
        Poll::Ready(answer.map(|resp| resp.map(Http2Body::new)))
    }
}

/// A request body on its way into its stream, within the stream's flow-control window.
struct Pipe {
    body: ProxyBody,
    stream: SendStream<Bytes>,
    /// Data read from the body, waiting for window.
    pending: Option<Bytes>,
}

impl Future for Pipe {
    type Output = Result<(), BoxError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        loop {
            if let Some(data) = &mut this.pending {
                this.stream.reserve_capacity(data.len());
                while this.stream.capacity() == 0 {
                    match this.stream.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
                        Poll::Ready(None) => return Poll::Ready(Err("the stream closed".into())),
                        // Waiting for window; a reset meanwhile ends the wait.
                        Poll::Pending => {
                            return match ready!(this.stream.poll_reset(cx)) {
                                Ok(reason) => Poll::Ready(Err(format!(
                                    "the API host reset the stream ({reason})"
                                )
                                .into())),
                                Err(e) => Poll::Ready(Err(e.into())),
                            };
                        }
                    }
                }
                let chunk = data.split_to(this.stream.capacity().min(data.len()));
                let last = data.is_empty() && this.body.is_end_stream();
                if data.is_empty() {
                    this.pending = None;
                }
                this.stream.send_data(chunk, last)?;
                if last {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                None => {
                    this.stream.send_data(Bytes::new(), true)?;
                    return Poll::Ready(Ok(()));
                }
                Some(Err(e)) => {
                    this.stream.send_reset(h2::Reason::CANCEL);
                    return Poll::Ready(Err(e));
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) if !data.is_empty() => this.pending = Some(data),
                    Ok(_) => {}
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            this.stream.send_trailers(trailers)?;
                            return Poll::Ready(Ok(()));
                        }
                    }
                },
            }
        }
    }
}

/// An answer's body on an HTTP/2 stream: its data (each frame's window given back as it
/// is taken), then its trailers.
pub struct Http2Body {
    stream: RecvStream,
    data_done: bool,
}

impl Http2Body {
    fn new(stream: RecvStream) -> Http2Body {
        Http2Body {
            stream,
            data_done: false,
        }
    }
}

impl Body for Http2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        if !self.data_done {
            match ready!(self.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    // The window is the connection's too: give it back at once, as hyper
                    // does; what the caller has not taken yet is bounded by the answer pump.
                    let _ = self.stream.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => self.data_done = true,
            }
        }
        match ready!(self.stream.poll_trailers(cx)) {
            Ok(Some(trailers)) => Poll::Ready(Some(Ok(Frame::trailers(trailers)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_headers_do_not_go_into_http2() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "close"),
            ("transfer-encoding", "chunked"),
            ("keep-alive", "timeout=5"),
            ("te", "gzip"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("x-kept", "1"),
        ] {
            headers.insert(
                http::HeaderName::from_static(name),
                http::HeaderValue::from_static(value),
            );
        }
        strip_connection_headers(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        headers.insert(header::TE, http::HeaderValue::from_static("trailers"));
        headers.insert(header::CONNECTION, http::HeaderValue::from_static("te"));
        strip_connection_headers(&mut headers);
        assert!(headers.contains_key(header::TE));
        assert_eq!(headers.len(), 2, "{headers:?}");
    }
}
