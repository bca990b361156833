//! The admin listener: liveness, readiness and metrics for the operator's tooling.
//!
//! - `GET /healthz`: 200 while the process serves.
//! - `GET /readyz`: 200 when every upstream holds a usable token, else 503 and the list of
//!   those that do not.
//! - `GET /metrics`: Prometheus text.

use std::convert::Infallible;
use std::sync::Arc;

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;

use crate::body::{full, ProxyBody};
use crate::metrics::Metrics;
use crate::upstream::Upstream;

#[derive(Debug, Clone)]
pub struct Admin {
    pub upstreams: Arc<[Arc<Upstream>]>,
    pub metrics: Metrics,
}

impl Admin {
    pub fn answer(&self, req: &Request<Incoming>) -> Response<ProxyBody> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "only GET\n".into(),
            );
        }
        match req.uri().path() {
            "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
            "/readyz" => {
                let failing: Vec<&str> = self
                    .upstreams
                    .iter()
                    .filter(|u| u.tokens.usable().is_none())
                    .map(|u| u.name().as_ref())
                    .collect();
                let status = if failing.is_empty() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                let body = serde_json::json!({ "ready": failing.is_empty(), "failing": failing });
                text(status, "application/json", body.to_string())
            }
            "/metrics" => text(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics.render(),
            ),
            _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        }
    }

    pub fn service(
        self,
    ) -> impl tower::Service<
        Request<Incoming>,
        Response = Response<ProxyBody>,
        Error = Infallible,
        Future = impl Send + 'static,
    > + Clone
           + Send
           + 'static {
        tower::service_fn(move |req: Request<Incoming>| {
            let resp = self.answer(&req);
            async move { Ok::<_, Infallible>(resp) }
        })
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    resp
}
