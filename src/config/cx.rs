//! One load of the config: the file it came from (every error names it) and where
//! `${VAR}` references are read. Each part of the config is resolved by a method of
//! [`Cx`] in its own module.

use std::path::Path;

use super::error::ConfigError;

/// Reads the environment for `${VAR}` references; injected so tests never touch the
/// process environment.
pub type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

/// The context of one load: the file for messages, the environment for `${VAR}`.
pub(super) struct Cx<'a> {
    pub(super) file: &'a Path,
    pub(super) env: Env<'a>,
}

impl Cx<'_> {
    /// An error at `key` (as the operator wrote it: `upstream "genesys".region`).
    pub(super) fn err(&self, key: &str, message: impl std::fmt::Display) -> ConfigError {
        ConfigError::new(self.file, format!("{key}: {message}"))
    }
}
