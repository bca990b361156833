//! What the layers of the request path pass each other: the request and answer types,
//! the proxy's errors, the call's [`Outcome`](outcome::Outcome), and the messages on a
//! request ([`messages`], where every one is listed with its writer and its readers).

pub mod error;
pub mod messages;
pub mod outcome;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;

use http::{Request, Response};

use crate::http::body::ProxyBody;

pub type ProxyRequest = Request<ProxyBody>;
pub type ProxyResponse = Response<ProxyBody>;
pub type BoxFuture = Pin<Box<dyn Future<Output = Result<ProxyResponse, Infallible>> + Send>>;
