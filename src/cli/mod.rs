//! The commands beside serving: `check` (why a grant fails) and `demo` (the sandbox with
//! the proxy in front).

pub mod check;
pub mod demo;
