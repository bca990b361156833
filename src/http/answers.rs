//! The proxy's own answers (errors, token answers, admin documents): one builder, so every
//! one has its content type and `Cache-Control: no-store` (they describe this moment, and
//! token answers carry secrets: RFC 6749 §5.1).

use http::{header, HeaderValue, Response, StatusCode};

use crate::http::body::{full, ProxyBody};

/// `body` as `content_type`, with `status`, never cached.
pub fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    let headers = resp.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// `value` as JSON, with `status`, never cached.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<ProxyBody> {
    text(status, "application/json", value.to_string())
}
