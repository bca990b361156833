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

pin_project_lite::pin_project! {
    /// A body that keeps `held` alive until the body is dropped (a connection permit).
    struct Holding<B, T> {
        #[pin]
        inner: B,
        held: T,
    }
}

impl<B: http_body::Body, T> http_body::Body for Holding<B, T> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.project().inner.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Box `body`, keeping `held` alive as long as the body is.
pub fn holding<B, T>(body: B, held: T) -> ProxyBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    T: Send + 'static,
{
    boxed(Holding { inner: body, held })
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
