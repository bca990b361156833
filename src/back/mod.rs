//! Each upstream's back half: the deadline, retry, the rate budget, the bearer token, and
//! the forwarder to the API host (with WebSockets and notification channels).

pub mod bearer;
pub mod budget;
pub mod channels;
pub mod deadline;
pub mod forward;
pub mod idle;
pub mod notifications;
pub mod retry;
pub mod websocket;
