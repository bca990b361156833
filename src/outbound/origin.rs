//! Where calls to an upstream go: the scheme, host and port of its API host, and the
//! path every call's own is joined to.

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderValue, Request, Uri};

use crate::http::body::ProxyBody;

/// Where an upstream's calls go, worked out once: the scheme and authority to connect to,
/// the `Host` header HTTP/1.1 calls carry, and the base URL's own path, if any.
#[derive(Debug)]
pub struct Origin {
    scheme: Scheme,
    authority: Authority,
    pub(super) host: HeaderValue,
    /// The base URL's path without its trailing `/`; empty when it is the root.
    base_path: String,
    /// `scheme://authority/`, what the connector is asked for.
    pub(super) connect_to: Uri,
}

impl Origin {
    /// `None` for a URI without scheme or authority (config validation refuses those).
    pub fn of(base: &Uri) -> Option<Origin> {
        let scheme = base.scheme()?.clone();
        let authority = base.authority()?.clone();
        // RFC 9110 §7.2: the port goes in Host only when it is not the scheme's default.
        let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
        let host = match authority.port_u16() {
            Some(port) if port != default_port => HeaderValue::from_str(authority.as_str()),
            _ => HeaderValue::from_str(authority.host()),
        }
        .ok()?;
        let connect_to = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .ok()?;
        Some(Origin {
            base_path: base.path().trim_end_matches('/').to_owned(),
            scheme,
            authority,
            host,
            connect_to,
        })
    }

    /// The host's name (or address) and its port, as a trace names the server.
    pub fn server(&self) -> (&str, u16) {
        let default_port = if self.scheme == Scheme::HTTPS {
            443
        } else {
            80
        };
        (
            self.authority.host(),
            self.authority.port_u16().unwrap_or(default_port),
        )
    }

    /// The path to ask the upstream for: the base URL's path, then the path within the
    /// upstream (no copy when the base URL is the host's root, the usual case).
    pub fn path(&self, within: &PathAndQuery) -> Result<PathAndQuery, http::uri::InvalidUri> {
        if self.base_path.is_empty() {
            return Ok(within.clone());
        }
        let mut joined = String::with_capacity(self.base_path.len() + within.as_str().len());
        joined.push_str(&self.base_path);
        joined.push_str(within.as_str());
        PathAndQuery::from_maybe_shared(bytes::Bytes::from(joined))
    }

    /// `req` aimed at `path` here over HTTP/1.1: the path as its target, `Host` set.
    pub(super) fn aim_http1(&self, req: &mut Request<ProxyBody>, path: &PathAndQuery) {
        *req.uri_mut() = Uri::from(path.clone());
        req.headers_mut().insert(header::HOST, self.host.clone());
    }

    /// `req` aimed at `path` here over HTTP/2: the whole URI (its `:authority`), no `Host`.
    pub(super) fn aim_http2(
        &self,
        req: &mut Request<ProxyBody>,
        path: &PathAndQuery,
    ) -> Result<(), http::Error> {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path.clone());
        *req.uri_mut() = Uri::from_parts(parts)?;
        req.headers_mut().remove(header::HOST);
        Ok(())
    }

    pub(super) fn same_as(&self, other: &Origin) -> bool {
        std::ptr::eq(self, other)
            || (self.scheme == other.scheme && self.authority == other.authority)
    }
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}://{}{}", self.scheme, self.authority, self.base_path)
    }
}
