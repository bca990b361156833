//! A call's hold on its upstream connection: its slot, and the HTTP/1.1 connection it
//! goes back to the idle stack with when the answer has been read.

use std::sync::Arc;

use hyper::client::conn::http1;

use super::connections::WorkerConnections;
use super::origin::Origin;
use super::slots::Slot;
use crate::http::body::ProxyBody;

/// What an answer's body holds while it streams: the connection slot, and the HTTP/1.1
/// connection the answer arrives on. When the body ends (or is dropped) the connection
/// goes back to the worker's idle stack, then the slot is freed, so a call waiting for a
/// slot finds the connection there. A connection whose answer was not read to the end is
/// closed by hyper and not reused.
pub struct Lease {
    sender: Option<http1::SendRequest<ProxyBody>>,
    origin: Arc<Origin>,
    home: Arc<WorkerConnections>,
    _slot: Slot,
}

impl Lease {
    pub fn new(
        home: &Arc<WorkerConnections>,
        origin: &Arc<Origin>,
        sender: Option<http1::SendRequest<ProxyBody>>,
        slot: Slot,
    ) -> Lease {
        Lease {
            sender,
            origin: Arc::clone(origin),
            home: Arc::clone(home),
            _slot: slot,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take() {
            self.home.put_back(Arc::clone(&self.origin), sender);
        }
    }
}
