//! OpenTelemetry traces (issue 26): a collector on a loopback port takes OTLP/HTTP and
//! decodes the protobuf with `opentelemetry-proto`; the tests read the spans the proxy
//! sent: a caller's trace continued, an attempt per send, one grant span per grant, no
//! secret in any attribute; and with no collector, every call still served and counted.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;

use crate::support::*;

/// An OTLP/HTTP collector: every span of every export it took.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let kept = Arc::clone(&spans);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let kept = Arc::clone(&kept);
                let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                    let kept = Arc::clone(&kept);
                    async move {
                        assert_eq!(req.uri().path(), "/v1/traces");
                        assert_eq!(req.headers()["content-type"], "application/x-protobuf");
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let export = ExportTraceServiceRequest::decode(body).unwrap();
                        let mut spans = kept.lock().unwrap();
                        for resource in export.resource_spans {
                            for scope in resource.scope_spans {
                                spans.extend(scope.spans);
                            }
                        }
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::new())))
                    }
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        Collector { addr, spans }
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until `enough` holds of the spans taken so far.
    async fn until(&self, enough: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        wait_for(Duration::from_secs(20), || {
            let spans = self.spans();
            enough(&spans).then_some(spans)
        })
        .await
        .unwrap_or_else(|| panic!("spans never arrived: {:?}", names(&self.spans())))
    }
}

fn names(spans: &[Span]) -> Vec<String> {
    spans.iter().map(|s| s.name.clone()).collect()
}

fn attr(span: &Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.clone()?.value)
}

fn every_value(span: &Span) -> Vec<String> {
    span.attributes
        .iter()
        .filter_map(|a| a.value.clone()?.value)
        .map(|v| format!("{v:?}"))
        .collect()
}

/// The proxy exporting to `endpoint`, batches sent every 50 ms (the SDK's own setting).
fn traced_proxy(sandbox: &Sandbox, endpoint: &str, server_extra: &str) -> Proxy {
    let config = format!(
        "{}\n[telemetry]\notlp_endpoint = \"{endpoint}\"\nservice_name = \"gate-under-test\"\nheaders = {{ authorization = \"${{COLLECTOR_KEY}}\" }}\n",
        config_with(sandbox, server_extra, "")
    );
    Proxy::start_with_env(
        &config,
        &[
            ("SANDBOX_SECRET", CLIENT_SECRET),
            ("COLLECTOR_KEY", "collector-key-Pp4"),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    )
}

async fn get(proxy: &Proxy, path: &str, traceparent: Option<&str>) -> u16 {
    let mut req = client()
        .get(proxy.url(path))
        .header("X-Api-Key", CLIENT_KEY);
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_is_followed_from_the_caller_through_the_gate_to_the_api_host() {
    let sandbox = Sandbox::start(sandbox_options()).await.unwrap();
    let collector = Collector::start().await;
    let proxy = traced_proxy(
        &sandbox,
        &format!("http://{}", collector.addr),
        "prefetch_tokens = false",
    );

    // 100 concurrent calls on a cold cache: one grant, one grant span.
    let calls: Vec<_> = (0..100)
        .map(|i| {
            let url = proxy.url(&format!(
                "/api/v2/users/{i}?pageSize=25&secretish=value-Kk1"
            ));
            tokio::spawn(async move {
                client()
                    .get(url)
                    .header("X-Api-Key", CLIENT_KEY)
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap(), 200);
    }
    assert_eq!(sandbox.grants(), 1);
    let spans = collector
        .until(|s| s.iter().filter(|s| s.name == "GET genesys").count() == 100)
        .await;
    let grants: Vec<&Span> = spans.iter().filter(|s| s.name == "token grant").collect();
    assert_eq!(grants.len(), 1, "{:?}", names(&spans));
    let grant = grants[0];
    let servers: Vec<&Span> = spans.iter().filter(|s| s.name == "GET genesys").collect();
    // The grant is a child of the call that started it; calls that waited link to it.
    assert!(servers
        .iter()
        .any(|s| s.span_id == grant.parent_span_id && s.trace_id == grant.trace_id));
    assert!(
        servers
            .iter()
            .any(|s| s.links.iter().any(|l| l.span_id == grant.span_id)),
        "no waiting call links to the grant"
    );
    let server = servers[0];
    assert_eq!(
        attr(server, "url.query"),
        Some(Value::StringValue(
            "pageSize=REDACTED&secretish=REDACTED".into()
        ))
    );
    assert_eq!(
        attr(server, "tokengate.client"),
        Some(Value::StringValue("reporting-job".into()))
    );
    assert_eq!(
        attr(server, "http.response.status_code"),
        Some(Value::IntValue(200))
    );

    // A caller's traceparent: the proxy's spans are its children, and the API host gets
    // the attempt's span as its parent.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent = "00f067aa0ba902b7";
    let tp = format!("00-{trace_id}-{parent}-01");
    assert_eq!(get(&proxy, "/api/v2/routing/queues", Some(&tp)).await, 200);
    let in_trace = |s: &[Span]| -> Vec<Span> {
        s.iter()
            .filter(|s| hex(&s.trace_id) == trace_id)
            .cloned()
            .collect()
    };
    let spans = collector.until(|s| in_trace(s).len() >= 2).await;
    let mine = in_trace(&spans);
    let server = mine.iter().find(|s| s.name == "GET genesys").unwrap();
    assert_eq!(hex(&server.parent_span_id), parent);
    let attempt = mine.iter().find(|s| s.name == "GET").unwrap();
    assert_eq!(attempt.parent_span_id, server.span_id);
    assert_eq!(
        attr(attempt, "server.address"),
        Some(Value::StringValue("127.0.0.1".into()))
    );
    let sent = sandbox
        .seen()
        .into_iter()
        .rev()
        .find(|r| r.path == "/api/v2/routing/queues")
        .unwrap();
    let upstream_tp = sent.headers["traceparent"].to_str().unwrap().to_string();
    assert_eq!(
        upstream_tp,
        format!("00-{trace_id}-{}-01", hex(&attempt.span_id))
    );

    // A revoked token: two attempts (the second with resend_count 1) and one grant, all
    // in the caller's trace.
    let revoked_trace = "0af7651916cd43dd8448eb211c80319c";
    sandbox.revoke_all();
    let tp = format!("00-{revoked_trace}-b7ad6b7169203331-01");
    assert_eq!(get(&proxy, "/api/v2/users/me", Some(&tp)).await, 200);
    let of_revoked = |s: &[Span]| -> Vec<Span> {
        s.iter()
            .filter(|s| hex(&s.trace_id) == revoked_trace)
            .cloned()
            .collect()
    };
    let spans = collector
        .until(|s| {
            let t = of_revoked(s);
            t.iter().any(|s| s.name == "GET genesys")
                && t.iter().filter(|s| s.name == "GET").count() >= 2
                && t.iter().any(|s| s.name == "token grant")
        })
        .await;
    let t = of_revoked(&spans);
    let attempts: Vec<&Span> = t.iter().filter(|s| s.name == "GET").collect();
    assert_eq!(attempts.len(), 2, "{:?}", names(&t));
    assert_eq!(
        attempts
            .iter()
            .filter(|a| attr(a, "http.request.resend_count") == Some(Value::IntValue(1)))
            .count(),
        1
    );
    assert_eq!(t.iter().filter(|s| s.name == "token grant").count(), 1);
    assert_eq!(sandbox.grants(), 2);

    // No attribute of any span holds the secret, a token or the client key.
    let mut secrets = vec![
        CLIENT_KEY.to_string(),
        CLIENT_SECRET.to_string(),
        "value-Kk1".into(),
        "collector-key-Pp4".into(),
    ];
    secrets.extend(sandbox.issued_tokens());
    for span in collector.spans() {
        for value in every_value(&span) {
            for secret in &secrets {
                assert!(
                    !value.contains(secret.as_str()),
                    "a secret in a span: {value}"
                );
            }
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_collector_down_every_call_is_served_and_the_failures_counted() {
    let sandbox = Sandbox::start(sandbox_options()).await.unwrap();
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let proxy = traced_proxy(&sandbox, &endpoint, "");
    for _ in 0..50 {
        assert_eq!(get(&proxy, "/api/v2/users/me", None).await, 200);
    }
    let failures = wait_for_async(Duration::from_secs(30), || async {
        let text = admin_text(&proxy, "/metrics").await;
        let n = metric(&text, "tokengate_telemetry_export_failures_total", &[]);
        (n > 0.0).then_some(n)
    })
    .await;
    assert!(failures.is_some(), "no export failure counted");
    assert!(!proxy.output.text().contains("collector-key-Pp4"));
}
