//! What the proxy tells its operator: Prometheus metrics, the status board's counters,
//! and the batched log writer.

pub mod board;
pub mod events;
pub mod log_batch;
pub mod metrics;
pub mod usage;
