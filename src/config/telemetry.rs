//! `[telemetry]`: OpenTelemetry traces over OTLP/HTTP (see [`crate::telemetry::traces`]).
//! Off unless `otlp_endpoint` is set.

use std::collections::BTreeMap;
use std::sync::Arc;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::cx::Cx;
use super::error::ConfigError;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTelemetry {
    otlp_endpoint: Option<String>,
    service_name: Option<String>,
    sample_ratio: Option<f64>,
    headers: Option<BTreeMap<String, String>>,
}

/// Where traces go and how many: `endpoint` is the collector's traces URL (the
/// configured base with `/v1/traces`).
#[derive(Clone)]
pub struct TelemetryConfig {
    pub endpoint: http::Uri,
    pub service_name: String,
    /// The share of calls without a caller's sampling decision that are traced; a
    /// caller's `traceparent` decides for its own calls.
    pub sample_ratio: f64,
    /// Sent with each export; values may be credentials (an API key for the collector),
    /// so they are secrets: never in `Debug` or a log.
    pub headers: Arc<Vec<(http::HeaderName, SecretString)>>,
}

impl std::fmt::Debug for TelemetryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
        f.debug_struct("TelemetryConfig")
            .field("endpoint", &self.endpoint)
            .field("service_name", &self.service_name)
            .field("sample_ratio", &self.sample_ratio)
            .field("headers", &names)
            .finish()
    }
}

impl PartialEq for TelemetryConfig {
    fn eq(&self, other: &Self) -> bool {
        let same_headers = self.headers.len() == other.headers.len()
            && self
                .headers
                .iter()
                .zip(other.headers.iter())
                .all(|(a, b)| a.0 == b.0 && a.1.expose_secret() == b.1.expose_secret());
        self.endpoint == other.endpoint
            && self.service_name == other.service_name
            && self.sample_ratio == other.sample_ratio
            && same_headers
    }
}

impl Cx<'_> {
    pub(super) fn telemetry(
        &self,
        raw: RawTelemetry,
    ) -> Result<Option<TelemetryConfig>, ConfigError> {
        let Some(endpoint) = raw.otlp_endpoint else {
            if raw.service_name.is_some() || raw.sample_ratio.is_some() || raw.headers.is_some() {
                return Err(self.err(
                    "telemetry.otlp_endpoint",
                    "is required for [telemetry] (the collector's OTLP/HTTP address, e.g. \"http://127.0.0.1:4318\"); without it no trace is sent",
                ));
            }
            return Ok(None);
        };
        let endpoint = self.interpolate("telemetry.otlp_endpoint", &endpoint)?;
        let base = self.http_url("telemetry.otlp_endpoint", &endpoint)?;
        if base.query().is_some() {
            return Err(self.err("telemetry.otlp_endpoint", "must not have a query"));
        }
        // The OTLP/HTTP convention: the base URL, and traces at `/v1/traces` under it; a
        // URL that already names that path is taken as it is.
        let path = base.path().trim_end_matches('/');
        let traces = if path.ends_with("/v1/traces") {
            base.to_string()
        } else {
            let authority = base.authority().map_or("", |a| a.as_str());
            format!(
                "{}://{authority}{path}/v1/traces",
                base.scheme_str().unwrap_or("http")
            )
        };
        let endpoint = traces
            .parse()
            .map_err(|_| self.err("telemetry.otlp_endpoint", "is not a valid URL"))?;
        let sample_ratio = raw.sample_ratio.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&sample_ratio) {
            return Err(self.err(
                "telemetry.sample_ratio",
                format!("{sample_ratio} is not between 0 and 1 (the share of calls traced)"),
            ));
        }
        let service_name = raw.service_name.unwrap_or_else(|| "tokengate".into());
        if service_name.trim().is_empty() {
            return Err(self.err("telemetry.service_name", "is empty"));
        }
        let mut headers = Vec::new();
        for (name, value) in raw.headers.unwrap_or_default() {
            let key = format!("telemetry.headers.{name}");
            let header = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| self.err(&key, "is not a valid HTTP header name"))?;
            let value = self.interpolate(&key, &value)?;
            if http::HeaderValue::from_str(&value).is_err() {
                // The value is not quoted: it may be a credential.
                return Err(self.err(&key, "its value cannot be sent in an HTTP header"));
            }
            headers.push((header, SecretString::from(value)));
        }
        Ok(Some(TelemetryConfig {
            endpoint,
            service_name,
            sample_ratio,
            headers: Arc::new(headers),
        }))
    }
}
