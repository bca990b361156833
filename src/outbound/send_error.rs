//! Why a call to an API host could not be sent or answered, and what that says about
//! sending it again.

use crate::http::body::BoxError;

/// Why a call could not be sent.
#[derive(Debug)]
pub enum SendError {
    /// No connection could be made (TCP, TLS or the HTTP/2 handshake).
    Connect(BoxError),
    /// The exchange failed after the call was handed to a connection.
    Exchange(hyper::Error),
    /// The same, on an HTTP/2 stream.
    Http2(h2::Error),
}

impl SendError {
    pub fn as_error(&self) -> &(dyn std::error::Error + 'static) {
        match self {
            SendError::Connect(e) => e.as_ref(),
            SendError::Exchange(e) => e,
            SendError::Http2(e) => e,
        }
    }
}

/// Did the API host refuse the request before processing any of it? An HTTP/2 stream above
/// a GOAWAY's last-stream-id, or one sent after the GOAWAY, and a stream reset with
/// `REFUSED_STREAM`, were never processed (RFC 9113 §6.8, §8.7): any method may be sent
/// again, on another connection.
pub fn never_processed(e: &SendError) -> bool {
    h2_cause(e).is_some_and(|h2| {
        (h2.is_go_away() && h2.is_remote())
            || (h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM))
    })
}

/// The HTTP/2 error of a failed exchange, if it is one.
pub fn h2_cause(e: &SendError) -> Option<&h2::Error> {
    let e = match e {
        SendError::Http2(e) => return Some(e),
        SendError::Exchange(e) => e,
        SendError::Connect(_) => return None,
    };
    let mut cause = std::error::Error::source(e);
    while let Some(err) = cause {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        cause = err.source();
    }
    None
}
