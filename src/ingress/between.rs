//! What a resting connection's service and its socket share (see [`super::resting`]):
//! where hyper is between requests, and the socket it hands back.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use tokio::net::TcpStream;

/// Connections that came to rest since [`came_to_rest`] was last asked.
pub(super) static RESTED: AtomicUsize = AtomicUsize::new(0);

/// How many connections came to rest since the last time this was asked (for
/// [`super::memory`]: the buffers they gave back are worth a trim).
pub fn came_to_rest() -> usize {
    RESTED.swap(0, Ordering::Relaxed)
}

/// What a connection's service and its socket know of where hyper is.
#[derive(Default)]
pub struct Between {
    /// Bytes reached hyper since the last request head went to the service: hyper may hold
    /// part of the next head.
    pub(super) read_since_head: AtomicBool,
    /// hyper may still read the last request's bytes: its body, or the upgraded stream.
    reading_request: AtomicBool,
    /// The socket, handed back when hyper ended a quiet connection.
    pub(super) returned: Mutex<Option<TcpStream>>,
}

impl Between {
    /// A request head went to the service; `reads_on` when hyper may read more of it.
    pub fn on_request(&self, reads_on: bool) {
        self.read_since_head.store(false, Ordering::Relaxed);
        self.reading_request.store(reads_on, Ordering::Relaxed);
    }

    pub(super) fn may_rest(&self) -> bool {
        !self.read_since_head.load(Ordering::Relaxed)
            && !self.reading_request.load(Ordering::Relaxed)
    }
}
