//! `[events]`: where security events go (see [`crate::telemetry::events`]).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use serde::Deserialize;

use super::cx::Cx;
use super::error::ConfigError;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEvents {
    file: Option<PathBuf>,
    syslog: Option<String>,
}

/// Where security events go: a JSON-lines file, an RFC 5424 syslog receiver over UDP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventsConfig {
    pub file: Option<PathBuf>,
    pub syslog: Option<SocketAddr>,
}

impl Cx<'_> {
    pub(super) fn events(&self, raw: RawEvents) -> Result<EventsConfig, ConfigError> {
        let file = raw.file.map(|f| {
            if f.is_relative() {
                self.file.parent().map_or(f.clone(), |dir| dir.join(&f))
            } else {
                f
            }
        });
        let syslog = match raw.syslog {
            None => None,
            Some(url) => {
                let Some(hostport) = url.strip_prefix("udp://") else {
                    return Err(self.err(
                        "events.syslog",
                        format!("\"{url}\" is not a syslog address; write udp://host:port (RFC 5424 over UDP)"),
                    ));
                };
                let addr = hostport
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.next())
                    .ok_or_else(|| {
                        self.err(
                            "events.syslog",
                            format!("\"{hostport}\" does not resolve to an address (host:port)"),
                        )
                    })?;
                Some(addr)
            }
        };
        Ok(EventsConfig { file, syslog })
    }
}
