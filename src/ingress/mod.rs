//! Where connections come in: the listeners' accept loops and connection caps (`gate`),
//! the table where quiet connections wait, the watches that close connections serving
//! nobody, the head timer, the worker threads, the descriptor limits, and memory given
//! back after bursts.

pub mod between;
pub mod connection;
pub mod descriptors;
pub mod gate;
pub mod head_timer;
pub mod memory;
pub mod plain;
pub mod resting;
pub mod rests;
pub mod server;
pub mod watch;
pub mod workers;
