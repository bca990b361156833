//! First line: refuse what a reverse proxy must never act on, and bodies over the limit.
//!
//! - `CONNECT` and absolute-form targets (`GET http://elsewhere/ HTTP/1.1`) are a forward
//!   proxy's business; tokengate only ever connects to its configured upstreams.
//! - A declared `Content-Length` over `max_body_bytes` gets 413 before anything is read; a
//!   body without one is wrapped so that it fails when it crosses the limit.

use std::convert::Infallible;
use std::task::{Context, Poll};

use futures_util::future::{ready, Either, Ready};
use http::{header, Method, Version};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tower::{Layer, Service};

use super::{ProxyRequest, ProxyResponse};
use crate::body::{self, BoxError};
use crate::error::{BodyLimitExceeded, ProxyError};

#[derive(Debug, Clone)]
pub struct GuardLayer {
    max_body_bytes: u64,
}

impl GuardLayer {
    pub fn with_body_limit(max_body_bytes: u64) -> Self {
        GuardLayer { max_body_bytes }
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = Guard<S>;
    fn layer(&self, inner: S) -> Guard<S> {
        Guard {
            inner,
            max_body_bytes: self.max_body_bytes,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Guard<S> {
    inner: S,
    max_body_bytes: u64,
}

impl<S> Guard<S> {
    fn check(&self, req: &ProxyRequest) -> Result<(), ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::BadRequest("CONNECT is not supported"));
        }
        // HTTP/2 always carries a scheme and authority; on HTTP/1 they mean absolute form.
        if req.version() < Version::HTTP_2 && req.uri().scheme().is_some() {
            return Err(ProxyError::BadRequest(
                "absolute-form request targets are not supported",
            ));
        }
        if !req.uri().path().starts_with('/') {
            return Err(ProxyError::BadRequest("the request target must be a path"));
        }
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_body_bytes) {
            return Err(ProxyError::BodyTooLarge {
                limit: self.max_body_bytes,
            });
        }
        Ok(())
    }
}

impl<S> Service<ProxyRequest> for Guard<S>
where
    S: Service<ProxyRequest, Response = ProxyResponse, Error = Infallible>,
{
    type Response = ProxyResponse;
    type Error = Infallible;
    type Future = Either<Ready<Result<ProxyResponse, Infallible>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ProxyRequest) -> Self::Future {
        if let Err(e) = self.check(&req) {
            return Either::Left(ready(Ok(e.into_response())));
        }
        let max = self.max_body_bytes;
        let limit = usize::try_from(max).unwrap_or(usize::MAX);
        let req = req.map(|b| {
            body::boxed(Limited::new(b, limit).map_err(move |e| {
                if e.is::<LengthLimitError>() {
                    Box::new(BodyLimitExceeded(max)) as BoxError
                } else {
                    e
                }
            }))
        });
        Either::Right(self.inner.call(req))
    }
}
