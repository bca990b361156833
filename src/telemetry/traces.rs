//! OpenTelemetry traces (`[telemetry]`), exported over OTLP/HTTP with protobuf.
//!
//! A call gets a server span in the observe layer (continuing the caller's W3C
//! `traceparent`), carried down the request path as a [`CallTrace`] on the request; each
//! attempt to the API host gets a client span in the forwarder (the 401 replay and 429
//! retries with `http.request.resend_count`), whose context goes to the API host in
//! `traceparent`. A token grant gets a span of its own, under the call that started it
//! (a background refresh's is a root); calls that waited for it link to it, so a single
//! flight shows once. A call the rate governor held gets a span for its wait.
//!
//! Export is batched on the SDK's own thread, never on the request path; the HTTP exchange
//! with the collector runs on the proxy's runtime. An export the collector does not take
//! is counted (`tokengate_telemetry_export_failures_total`) and the spans dropped: a
//! collector that is down costs no call.
//!
//! No attribute holds a header value, a query value, a token, a key or a secret: paths are
//! the audit log's (notification channel ids hashed), query values are redacted.
//!
//! One exporter per process, set at start; a change to `[telemetry]` takes effect at the
//! next restart.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector, HttpClient, HttpError};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, SpanData, SpanExporter};
use prometheus_client::metrics::counter::Counter;
use secrecy::ExposeSecret;

use crate::config::TelemetryConfig;
use crate::telemetry::metrics::Metrics;

/// The process's tracer, when `[telemetry]` is configured.
pub struct Traces {
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

static TRACES: OnceLock<Traces> = OnceLock::new();

/// The tracer, if traces are on (one atomic load).
pub fn on() -> Option<&'static Traces> {
    TRACES.get()
}

/// Start exporting to the collector `config` names. Call from within the runtime that
/// serves the proxy: exports run on it. A second call (an in-process restart) keeps the
/// first exporter.
pub fn start(config: &TelemetryConfig, metrics: &Metrics) -> Result<(), String> {
    if TRACES.get().is_some() {
        return Ok(());
    }
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| "traces need the proxy's runtime to export on".to_string())?;
    let client = reqwest::Client::builder()
        .timeout(EXPORT_TIMEOUT)
        .connect_timeout(Duration::from_secs(3))
        .build()
        .map_err(|e| format!("telemetry: cannot build the collector's HTTP client: {e}"))?;
    let headers = config
        .headers
        .iter()
        .map(|(name, value)| (name.to_string(), value.expose_secret().to_string()))
        .collect();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(OnRuntime { client, runtime })
        .with_endpoint(config.endpoint.to_string())
        .with_timeout(EXPORT_TIMEOUT)
        .with_headers(headers)
        .build()
        .map_err(|e| format!("telemetry.otlp_endpoint: {e}"))?;
    let exporter = Counted {
        inner: exporter,
        failures: metrics.telemetry_export_failures(),
        failing: Arc::new(AtomicBool::new(false)),
        endpoint: config.endpoint.to_string(),
    };
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(config.service_name.clone())
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sample_ratio,
        ))))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("tokengate");
    let _ = TRACES.set(Traces {
        provider,
        tracer,
        propagator: TraceContextPropagator::new(),
    });
    tracing::info!(
        endpoint = %config.endpoint,
        sample_ratio = config.sample_ratio,
        "exporting OpenTelemetry traces"
    );
    Ok(())
}

/// Export what is left (at most the exporter's timeout), at shutdown.
pub async fn flush() {
    if let Some(traces) = on() {
        let provider = traces.provider.clone();
        // The SDK waits on its own thread, which exports on this runtime: off the runtime.
        let _ = tokio::task::spawn_blocking(move || provider.force_flush()).await;
    }
}

/// How long one export may take, connection included.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The collector's answer may be read up to this size (it is a few bytes).
const ANSWER_BYTES: usize = 64 * 1024;

/// Sends the exporter's requests from the SDK's thread on the proxy's runtime.
#[derive(Debug)]
struct OnRuntime {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(
        &self,
        request: http::Request<Bytes>,
    ) -> Result<http::Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let exchange = self.runtime.spawn(async move {
            let request = reqwest::Request::try_from(request)?;
            let mut answer = client.execute(request).await?;
            let mut body = bytes::BytesMut::new();
            while let Some(chunk) = answer.chunk().await? {
                if body.len() + chunk.len() > ANSWER_BYTES {
                    return Err::<_, HttpError>("the collector's answer is over 64 KiB".into());
                }
                body.extend_from_slice(&chunk);
            }
            let mut out = http::Response::new(body.freeze());
            *out.status_mut() = answer.status();
            *out.headers_mut() = std::mem::take(answer.headers_mut());
            Ok(out)
        });
        exchange.await.map_err(|e| Box::new(e) as HttpError)?
    }
}

/// The OTLP exporter, counting the batches it could not deliver and logging the start
/// and the end of an outage once each.
#[derive(Debug)]
struct Counted {
    inner: opentelemetry_otlp::SpanExporter,
    failures: Counter,
    failing: Arc<AtomicBool>,
    endpoint: String,
}

impl SpanExporter for Counted {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let result = self.inner.export(batch).await;
        match &result {
            Err(e) => {
                self.failures.inc();
                if !self.failing.swap(true, Ordering::Relaxed) {
                    let why: String = e.to_string().chars().take(300).collect();
                    tracing::warn!(endpoint = %self.endpoint, error = %why, "the OpenTelemetry collector did not take a batch of spans; calls go on, their spans are dropped until it does");
                }
            }
            Ok(()) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(endpoint = %self.endpoint, "the OpenTelemetry collector takes spans again");
                }
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// One call's trace, on its request from the observe layer down: the server span (in
/// the context) and how many attempts went to the API host so far.
#[derive(Clone)]
pub struct CallTrace {
    cx: Context,
    method: http::Method,
    attempts: Arc<AtomicU32>,
}

impl std::fmt::Debug for CallTrace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallTrace")
    }
}

impl Traces {
    /// Open the server span of a call (its parent the caller's `traceparent`, if any), and
    /// put its trace on the request for the layers below. `audited` makes a path fit for
    /// the log (and a trace).
    pub fn begin_call<B>(
        &self,
        req: &mut http::Request<B>,
        audited: fn(&str) -> String,
    ) -> CallTrace {
        let parent = self.propagator.extract(&HeaderExtractor(req.headers()));
        let method = req.method().clone();
        let mut span = self
            .tracer
            .span_builder(method.to_string())
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer, &parent);
        if span.is_recording() {
            let mut attributes = vec![
                KeyValue::new("http.request.method", method.to_string()),
                KeyValue::new("url.path", audited(req.uri().path())),
            ];
            if let Some(query) = req.uri().query() {
                attributes.push(KeyValue::new("url.query", redacted(query)));
            }
            span.set_attributes(attributes);
        }
        let trace = CallTrace {
            cx: parent.with_span(span),
            method,
            attempts: Arc::new(AtomicU32::new(0)),
        };
        req.extensions_mut().insert(trace.clone());
        trace
    }
}

impl CallTrace {
    /// The call's context (its server span), for work done on its behalf.
    pub fn context(&self) -> &Context {
        &self.cx
    }

    /// End the server span with what the call came to.
    pub fn end(
        &self,
        status: u16,
        upstream: &str,
        client: Option<&str>,
        error: Option<&'static str>,
    ) {
        let span = self.cx.span();
        if span.is_recording() {
            if !upstream.is_empty() {
                span.update_name(format!("{} {upstream}", self.method));
                span.set_attribute(KeyValue::new("tokengate.upstream", upstream.to_string()));
            }
            span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
            if let Some(client) = client {
                span.set_attribute(KeyValue::new("tokengate.client", client.to_string()));
            }
            if let Some(code) = error {
                span.set_attribute(KeyValue::new("error.type", code));
            }
            if status >= 500 {
                span.set_status(Status::error(error.unwrap_or("server error")));
            }
        }
        span.end();
    }
}

/// A query with its values replaced: `a=1&b=x` → `a=REDACTED&b=REDACTED` (values can be
/// anything, a credential included; the names say what was asked; a bare item goes too).
fn redacted(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) => format!("{name}=REDACTED"),
            // A bare item may be a value itself (`?<token>`).
            None => "REDACTED".to_string(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// One attempt of a call to the API host: a client span, whose context the API host gets
/// in `traceparent`.
pub struct Attempt {
    span: opentelemetry_sdk::trace::Span,
}

impl Attempt {
    /// For a traced call only: open the attempt's span and put its `traceparent` (and the
    /// caller's `tracestate`) on the request. `server`: the API host's name and port
    /// (asked only for a traced call).
    pub fn begin<'a, B>(
        req: &mut http::Request<B>,
        server: impl FnOnce() -> (&'a str, u16),
    ) -> Option<Attempt> {
        let call = req.extensions().get::<CallTrace>()?;
        let traces = on()?;
        let resends = call.attempts.fetch_add(1, Ordering::Relaxed);
        let (host, port) = server();
        let mut attributes = vec![
            KeyValue::new("http.request.method", req.method().to_string()),
            KeyValue::new("server.address", host.to_string()),
            KeyValue::new("server.port", i64::from(port)),
        ];
        if resends > 0 {
            attributes.push(KeyValue::new(
                "http.request.resend_count",
                i64::from(resends),
            ));
        }
        let span = traces
            .tracer
            .span_builder(req.method().to_string())
            .with_kind(SpanKind::Client)
            .with_attributes(attributes)
            .start_with_context(&traces.tracer, &call.cx);
        let cx = call
            .cx
            .with_remote_span_context(span.span_context().clone());
        traces
            .propagator
            .inject_context(&cx, &mut HeaderInjector(req.headers_mut()));
        Some(Attempt { span })
    }

    /// End the attempt with its answer: the API host's, or the proxy's (`error`, its
    /// code) when none came.
    pub fn end(mut self, status: u16, headers: &http::HeaderMap, error: Option<&'static str>) {
        if self.span.is_recording() {
            self.span.set_attribute(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
            if let Some(id) = headers
                .get("inin-correlation-id")
                .and_then(|v| v.to_str().ok())
            {
                self.span.set_attribute(KeyValue::new(
                    "http.response.header.inin-correlation-id",
                    id.to_string(),
                ));
            }
            if let Some(code) = error {
                self.span.set_attribute(KeyValue::new("error.type", code));
            }
            if status >= 500 || error.is_some() {
                self.span
                    .set_status(Status::error(error.unwrap_or("server error")));
            }
        }
        self.span.end();
    }
}

/// A token grant's span: under the call that started it (from the context the bearer
/// layer runs in), a root for a background refresh.
pub struct GrantSpan(Option<opentelemetry_sdk::trace::Span>);

impl GrantSpan {
    pub fn begin(upstream: &str) -> GrantSpan {
        let Some(traces) = on() else {
            return GrantSpan(None);
        };
        let span = traces
            .tracer
            .span_builder("token grant")
            .with_kind(SpanKind::Client)
            .with_attributes([KeyValue::new("tokengate.upstream", upstream.to_string())])
            .start_with_context(&traces.tracer, &Context::current());
        GrantSpan(Some(span))
    }

    /// The span's context, for the calls that waited on this grant to link to.
    pub fn context(&self) -> Option<SpanContext> {
        self.0
            .as_ref()
            .map(|s| s.span_context().clone())
            .filter(SpanContext::is_sampled)
    }

    /// End it: `failure` is the grant error's kind and its message for callers.
    pub fn end(self, failure: Option<(&'static str, String)>) {
        let Some(mut span) = self.0 else { return };
        if let Some((kind, message)) = failure {
            span.set_attribute(KeyValue::new("error.type", kind));
            span.set_status(Status::error(message));
        }
        span.end();
    }
}

/// Link the current call's server span to the grant it waited for.
pub fn waited_for_grant(grant: Option<&SpanContext>) {
    let Some(grant) = grant else { return };
    let cx = Context::current();
    if cx.has_active_span() {
        cx.span().add_link(grant.clone(), Vec::new());
    }
}

/// A span for the time a traced call waited for room in the rate budget (it ends now).
pub fn waited_for_budget(call: Option<&CallTrace>, waited: Duration, upstream: &str) {
    let (Some(call), Some(traces)) = (call, on()) else {
        return;
    };
    if !call.cx.span().span_context().is_sampled() {
        return;
    }
    let now = SystemTime::now();
    let mut span = traces
        .tracer
        .span_builder("rate limit wait")
        .with_kind(SpanKind::Internal)
        .with_start_time(now.checked_sub(waited).unwrap_or(now))
        .with_attributes([
            KeyValue::new("tokengate.upstream", upstream.to_string()),
            KeyValue::new("tokengate.waited_ms", waited.as_millis() as i64),
        ])
        .start_with_context(&traces.tracer, &call.cx);
    span.end_with_timestamp(now);
}

#[cfg(test)]
mod tests {
    use super::redacted;

    #[test]
    fn a_query_keeps_its_names_and_loses_its_values() {
        assert_eq!(
            redacted("pageSize=25&access_token=abc&flag"),
            "pageSize=REDACTED&access_token=REDACTED&REDACTED"
        );
    }
}
