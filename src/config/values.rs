//! Value parsers shared by the sections: `${VAR}` interpolation, secrets (inline or in a
//! file), addresses, hashes, durations, URLs and prefixes. Each names its key in errors.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use http::Uri;
use secrecy::SecretString;

use super::cx::{Cx, Env};
use super::error::ConfigError;

impl Cx<'_> {
    /// Replace `${NAME}` with the environment variable `NAME`; `$$` is a literal `$`.
    pub(super) fn interpolate(&self, key: &str, value: &str) -> Result<String, ConfigError> {
        let mut out = String::with_capacity(value.len());
        for part in parts(value) {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Var(name) => out.push_str(&(self.env)(name).ok_or_else(|| {
                    self.err(key, format!("environment variable {name} is not set"))
                })?),
                Part::Unclosed => {
                    return Err(self.err(key, "an unclosed \"${\"; write ${NAME}"));
                }
                Part::Invalid(name) => {
                    return Err(self.err(
                        key,
                        format!("\"${{{name}}}\" is not a valid environment variable reference"),
                    ));
                }
            }
        }
        Ok(out)
    }

    pub(super) fn secret(
        &self,
        key: &str,
        inline: Option<String>,
        file: Option<PathBuf>,
    ) -> Result<SecretString, ConfigError> {
        let value = match (inline, file) {
            (Some(_), Some(_)) => {
                return Err(self.err(key, format!("set either {key} or {key}_file, not both")))
            }
            (None, None) => {
                return Err(self.err(key, format!("is required (or {key}_file)")));
            }
            (Some(v), None) => self.interpolate(key, &v)?,
            (None, Some(path)) => {
                let path = self.relative(&path);
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    self.err(
                        &format!("{key}_file"),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                text.trim_end_matches(['\r', '\n']).to_string()
            }
        };
        if value.is_empty() {
            return Err(self.err(key, "is empty"));
        }
        Ok(SecretString::from(value))
    }

    /// An address, `${VAR}` allowed (replicas sharing one file each set their own).
    pub(super) fn socket_addr(&self, key: &str, s: &str) -> Result<SocketAddr, ConfigError> {
        let s = self.interpolate(key, s)?;
        s.parse().map_err(|_| {
            self.err(
                key,
                format!("\"{s}\" is not an IP address and port such as 127.0.0.1:8080"),
            )
        })
    }

    /// A key's SHA-256 as 64 lowercase hex digits; `${VAR}` allowed (a Kubernetes Secret
    /// may hold it).
    pub(super) fn sha256_hex(&self, key: &str, s: &str) -> Result<[u8; 32], ConfigError> {
        let s = self.interpolate(key, s)?;
        let s = s.as_str();
        let bytes = hex::decode(s)
            .ok()
            .filter(|b| b.len() == 32 && s.len() == 64);
        let bytes = bytes.filter(|_| !s.chars().any(|c| c.is_ascii_uppercase()));
        let bytes = bytes.ok_or_else(|| {
            self.err(
                key,
                "must be 64 lowercase hex digits, the SHA-256 of the key (`tokengate key hash`)",
            )
        })?;
        let mut out = [0u8; 32];
        out.copy_from_slice(&bytes);
        Ok(out)
    }

    pub(super) fn secs(
        &self,
        key: &str,
        v: Option<f64>,
        default: f64,
    ) -> Result<Duration, ConfigError> {
        let v = v.unwrap_or(default);
        if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
            return Err(self.err(key, "must be a number of seconds between 0 and 86400"));
        }
        Ok(Duration::from_secs_f64(v))
    }

    pub(super) fn http_url(&self, key: &str, s: &str) -> Result<Uri, ConfigError> {
        let uri: Uri = s
            .parse()
            .map_err(|_| self.err(key, format!("\"{s}\" is not a valid URL")))?;
        match uri.scheme_str() {
            Some("http") | Some("https") => {}
            _ => return Err(self.err(key, format!("\"{s}\" must start with https:// or http://"))),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(self.err(key, format!("\"{s}\" has no host")));
        }
        Ok(uri)
    }

    pub(super) fn base_url(&self, key: &str, s: &str) -> Result<Uri, ConfigError> {
        let uri = self.http_url(key, s)?;
        if uri.query().is_some() {
            return Err(self.err(key, "must not have a query"));
        }
        // Keep the base path without its trailing '/', so joining with a request path
        // (which starts with '/') never doubles it.
        let path = uri.path().trim_end_matches('/').to_string();
        let mut parts = uri.into_parts();
        parts.path_and_query = Some(
            if path.is_empty() { "/" } else { path.as_str() }
                .parse()
                .map_err(|_| self.err(key, "has an invalid path"))?,
        );
        Uri::from_parts(parts).map_err(|_| self.err(key, "is not a valid URL"))
    }

    pub(super) fn prefix(&self, key: &str, s: &str) -> Result<String, ConfigError> {
        if !s.starts_with('/') {
            return Err(self.err(key, format!("\"{s}\" must start with '/'")));
        }
        if s.contains("//")
            || s.split('/').any(|seg| seg == "." || seg == "..")
            || s.contains(['?', '#', '%'])
        {
            return Err(self.err(key, format!("\"{s}\" must be a plain path such as /cxone")));
        }
        let trimmed = s.trim_end_matches('/');
        Ok(if trimmed.is_empty() {
            "/".into()
        } else {
            trimmed.into()
        })
    }
}

/// The `${NAME}` references in `table`'s strings whose variable `env` does not have, with
/// the key each is in (`upstream[0].client_secret`), in the file's order.
pub(super) fn missing_variables(table: &toml::Table, env: Env<'_>) -> Vec<(String, String)> {
    fn walk(value: &toml::Value, key: &str, env: Env<'_>, out: &mut Vec<(String, String)>) {
        match value {
            toml::Value::String(s) => {
                for part in parts(s) {
                    if let Part::Var(name) = part {
                        if env(name).is_none() && !out.iter().any(|(n, _)| n == name) {
                            out.push((name.to_string(), key.to_string()));
                        }
                    }
                }
            }
            toml::Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    // `[[upstream]]` and `[[client]]` tables by name, as the other errors.
                    let name = v.get("name").and_then(|n| n.as_str());
                    let key = match name {
                        Some(name) => format!("{key} \"{name}\""),
                        None => format!("{key}[{i}]"),
                    };
                    walk(v, &key, env, out);
                }
            }
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if key.is_empty() {
                        k.clone()
                    } else {
                        format!("{key}.{k}")
                    };
                    walk(v, &key, env, out);
                }
            }
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(&toml::Value::Table(table.clone()), "", env, &mut out);
    out
}

/// A piece of a config value, as `${NAME}` references split it.
enum Part<'a> {
    /// Text as written (`$$` already made one `$`).
    Text(&'a str),
    Var(&'a str),
    /// `${` with no `}` after it (the rest of the value is dropped).
    Unclosed,
    /// `${…}` whose name is not letters, digits and `_`.
    Invalid(&'a str),
}

/// `value` split at its `${NAME}` references: one reading of the syntax for
/// [`Cx::interpolate`] and [`missing_variables`].
fn parts(value: &str) -> Vec<Part<'_>> {
    let mut out = Vec::new();
    let mut rest = value;
    while let Some(pos) = rest.find('$') {
        out.push(Part::Text(&rest[..pos]));
        rest = &rest[pos..];
        if let Some(after) = rest.strip_prefix("$$") {
            out.push(Part::Text("$"));
            rest = after;
        } else if let Some(after) = rest.strip_prefix("${") {
            let Some(end) = after.find('}') else {
                out.push(Part::Unclosed);
                return out;
            };
            let name = &after[..end];
            let valid =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            out.push(if valid {
                Part::Var(name)
            } else {
                Part::Invalid(name)
            });
            rest = &after[end + 1..];
        } else {
            out.push(Part::Text("$"));
            rest = &rest[1..];
        }
    }
    out.push(Part::Text(rest));
    out
}
