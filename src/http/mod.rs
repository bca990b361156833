//! HTTP pieces every part uses: the one body type and its helpers, the proxy's JSON
//! answers and error codes, credentials in headers, and an error's chain of causes.
//! Imports nothing of the crate's.

pub mod answers;
pub mod body;
pub mod causes;
pub mod codes;
pub mod credentials;
