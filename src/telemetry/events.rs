//! Security events for a SIEM: one JSON object per line in a file (`[events] file`) and
//! as the message of an RFC 5424 syslog line over UDP (`[events] syslog`).
//!
//! The places that see an event log it as they log anything, with [`TARGET`] and an
//! `event` field (see [`emit`]); the [`EventsLayer`] in the log subscriber picks those up.
//! So no part of the proxy holds a handle to the sinks, and an event is also in the log.
//! Writing happens on a thread of its own, fed through a bounded queue: a flood of refused
//! keys costs the request path a `try_send`, never a write, and events past the queue are
//! counted as dropped, not waited for.
//!
//! An event carries only the fields its emitter gives: names, addresses, counts, causes.
//! Never a key, a token or a secret (the emitters are written so; the tests read every
//! line for them).

use std::fmt::Debug;
use std::io::Write;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

use crate::config::EventsConfig;

/// The log target of security events.
pub const TARGET: &str = "tokengate::event";

/// Events waiting to be written, at most.
const QUEUE: usize = 4096;

/// Log a security event: `emit!(warn, "key_refused", peer = %addr)`. The first word is
/// the level, then the event's name, then its fields.
#[macro_export]
macro_rules! emit {
    ($level:ident, $event:literal $(, $($fields:tt)*)?) => {
        tracing::$level!(target: $crate::telemetry::events::TARGET, event = $event $(, $($fields)*)?, "security event")
    };
}
pub use emit;

/// The log subscriber's layer that writes security events to their sinks.
pub struct EventsLayer {
    queue: SyncSender<(tracing::Level, String)>,
    dropped: Arc<AtomicU64>,
}

impl EventsLayer {
    /// Open the sinks (the file in append mode, created if missing) and start the writer.
    /// `None` when no sink is configured.
    pub fn open(sinks: &EventsConfig) -> Result<Option<EventsLayer>, String> {
        if sinks.file.is_none() && sinks.syslog.is_none() {
            return Ok(None);
        }
        let file = match &sinks.file {
            Some(path) => Some(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|e| format!("[events] file {}: {e}", path.display()))?,
            ),
            None => None,
        };
        let syslog = match sinks.syslog {
            Some(to) => {
                let local: SocketAddr = if to.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let socket = UdpSocket::bind(local).map_err(|e| format!("[events] syslog: {e}"))?;
                Some((socket, to))
            }
            None => None,
        };
        let (queue, lines) = sync_channel::<(tracing::Level, String)>(QUEUE);
        let host = hostname();
        let pid = std::process::id();
        std::thread::Builder::new()
            .name("tokengate-events".into())
            .spawn(move || {
                let mut file = file;
                for (level, line) in lines {
                    if let Some(f) = file.as_mut() {
                        // A full disk loses events, not requests.
                        let _ = f
                            .write_all(line.as_bytes())
                            .and_then(|()| f.write_all(b"\n"));
                    }
                    if let Some((socket, to)) = &syslog {
                        let _ =
                            socket.send_to(syslog_line(level, &host, pid, &line).as_bytes(), to);
                    }
                }
            })
            .map_err(|e| format!("[events]: cannot start the writer: {e}"))?;
        Ok(Some(EventsLayer {
            queue,
            dropped: Arc::new(AtomicU64::new(0)),
        }))
    }
}

/// RFC 5424: `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG`, facility 4
/// (security/authorization); warning for refusals and failures, notice for the rest.
fn syslog_line(level: tracing::Level, host: &str, pid: u32, json: &str) -> String {
    let severity = if level <= tracing::Level::WARN { 4 } else { 5 };
    let pri = 4 * 8 + severity;
    format!(
        "<{pri}>1 {} {host} tokengate {pid} event - {json}",
        now_rfc3339()
    )
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "-".into())
}

/// The machine's name for syslog's HOSTNAME (`-`, the nil value, when unknown).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or_else(|| "-".into())
}

/// An event's fields as JSON values.
struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn Debug) {
        if field.name() != "message" {
            self.0
                .insert(field.name().into(), Value::String(format!("{value:?}")));
        }
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0
            .insert(field.name().into(), Value::String(value.into()));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), value.into());
    }
}

impl<S: Subscriber> Layer<S> for EventsLayer {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        if event.metadata().target() != TARGET {
            return;
        }
        let mut fields = Fields(Map::new());
        fields.0.insert("time".into(), Value::String(now_rfc3339()));
        event.record(&mut fields);
        let line = Value::Object(fields.0).to_string();
        match self.queue.try_send((*event.metadata().level(), line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_syslog_line_is_rfc_5424_with_the_event_as_its_message() {
        let line = syslog_line(
            tracing::Level::WARN,
            "gate-1",
            42,
            r#"{"event":"key_refused"}"#,
        );
        assert!(line.starts_with("<36>1 "), "{line}");
        assert!(
            line.ends_with(r#" gate-1 tokengate 42 event - {"event":"key_refused"}"#),
            "{line}"
        );
        let notice = syslog_line(tracing::Level::INFO, "h", 1, "{}");
        assert!(notice.starts_with("<37>1 "), "{notice}");
    }
}
