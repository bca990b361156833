//! The tower layers of the proxy, one concern each, in the order a request meets them
//! (the stack itself is composed in [`crate::stack`]).
//!
//! Every service here answers with a response, never an error (`Error = Infallible`): a
//! layer that refuses a request answers with
//! [`ProxyError::into_response`](crate::error::ProxyError::into_response), so the
//! response that reaches the caller is always the contract's.

pub mod bearer;
pub mod budget;
pub mod client_auth;
pub mod deadline;
pub mod guard;
pub mod observe;
pub mod retry;
pub mod route;
pub mod token_endpoint;

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;

use http::{Request, Response};

use crate::body::ProxyBody;

pub type ProxyRequest = Request<ProxyBody>;
pub type ProxyResponse = Response<ProxyBody>;
pub type BoxFuture = Pin<Box<dyn Future<Output = Result<ProxyResponse, Infallible>> + Send>>;
