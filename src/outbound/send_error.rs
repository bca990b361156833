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
    let SendError::Http2(h2) = e else {
        return false;
    };
    (h2.is_go_away() && h2.is_remote())
        || (h2.is_reset() && h2.reason() == Some(h2::Reason::REFUSED_STREAM))
}
