//! What the proxy tells its operator: Prometheus metrics, the status board's counters,
//! the batched log writer, security events, usage per app and OpenTelemetry traces.

pub mod board;
pub mod events;
pub mod log_batch;
pub mod metrics;
pub mod traces;
pub mod usage;
