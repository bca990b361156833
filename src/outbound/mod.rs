//! Connections out of the proxy: to the API hosts (pooled, HTTP/1.1 or one shared HTTP/2
//! connection, shared fairly between clients), and the way out for every side call
//! (egress proxies, CAs, client certificates).

pub mod connections;
pub mod egress;
pub mod http2;
pub mod lease;
pub mod origin;
pub mod send_error;
pub mod slots;
