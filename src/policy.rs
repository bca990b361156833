//! Per-client policy: which upstreams and which `METHOD /path` a client may call.
//!
//! Rules read `"GET /api/v2/analytics/**"`: `*` matches one path segment, `**` any number of
//! them (none included), `*` as the method matches every method. Paths are matched only
//! when they are plain: a path with dot-segments, empty segments or percent-encoded
//! `.`, `/` or `\` is refused before matching, so such tricks cannot widen a rule.

use http::Method;

/// One `METHOD /path/glob` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowRule {
    method: Option<Method>,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    One,
    Any,
}

impl AllowRule {
    pub fn parse(rule: &str) -> Result<AllowRule, String> {
        let (method, path) = rule.trim().split_once(' ').ok_or_else(|| {
            format!("\"{rule}\" must be METHOD /path, such as \"GET /api/v2/users/**\"")
        })?;
        let method = match method {
            "*" => None,
            m => Some(
                Method::from_bytes(m.as_bytes())
                    .map_err(|_| format!("\"{m}\" in \"{rule}\" is not an HTTP method"))?,
            ),
        };
        let path = path.trim();
        if !path.starts_with('/') {
            return Err(format!("the path in \"{rule}\" must start with '/'"));
        }
        let segments = path[1..]
            .split('/')
            .map(|s| match s {
                "*" => Segment::One,
                "**" => Segment::Any,
                lit => Segment::Literal(lit.to_string()),
            })
            .collect();
        Ok(AllowRule { method, segments })
    }

    /// Does this rule allow `method` on `path` (a plain path, see [`is_plain_path`])?
    pub fn allows(&self, method: &Method, path: &str) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        let segs: Vec<&str> = path.strip_prefix('/').unwrap_or(path).split('/').collect();
        glob(&self.segments, &segs)
    }
}

fn glob(pattern: &[Segment], path: &[&str]) -> bool {
    let Some((seg, rest)) = pattern.split_first() else {
        return path.is_empty();
    };
    match (seg, path.split_first()) {
        (Segment::Any, _) => (0..=path.len()).any(|i| glob(rest, &path[i..])),
        (_, None) => false,
        (Segment::One, Some((p, more))) => !p.is_empty() && glob(rest, more),
        (Segment::Literal(l), Some((p, more))) => l == p && glob(rest, more),
    }
}

/// A path whose meaning cannot change under normalisation: no `.`/`..` segments, no empty
/// segments (`//`), no percent-encoded `.`, `/` or `\`, no backslash.
pub fn is_plain_path(path: &str) -> bool {
    if !path.starts_with('/') || path.contains('\\') {
        return false;
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2e") || lower.contains("%2f") || lower.contains("%5c") {
        return false;
    }
    let inner = &path[1..];
    inner.is_empty()
        || inner.split('/').enumerate().all(|(i, s)| match s {
            "." | ".." => false,
            // A trailing '/' is harmless; an empty segment inside is not.
            "" => i == inner.split('/').count() - 1,
            _ => true,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> AllowRule {
        AllowRule::parse(s).unwrap()
    }

    #[test]
    fn globs_match_segments() {
        let r = rule("GET /api/v2/analytics/**");
        assert!(r.allows(&Method::GET, "/api/v2/analytics"));
        assert!(r.allows(&Method::GET, "/api/v2/analytics/a/b"));
        assert!(!r.allows(&Method::POST, "/api/v2/analytics/a"));
        assert!(!r.allows(&Method::GET, "/api/v2/users"));
        let r = rule("* /api/v2/users/*");
        assert!(r.allows(&Method::DELETE, "/api/v2/users/42"));
        assert!(!r.allows(&Method::GET, "/api/v2/users/42/roles"));
        assert!(!r.allows(&Method::GET, "/api/v2/users/"));
    }

    #[test]
    fn tricks_are_not_plain() {
        for p in [
            "/a/../b",
            "/a/./b",
            "/a//b",
            "/a/%2e%2e/b",
            "/a%2Fb",
            "/a\\b",
            "a",
        ] {
            assert!(!is_plain_path(p), "{p}");
        }
        for p in ["/", "/a", "/a/b/", "/api/v2/users/x%20y"] {
            assert!(is_plain_path(p), "{p}");
        }
    }

    #[test]
    fn bad_rules_are_refused() {
        assert!(AllowRule::parse("/api").is_err());
        assert!(AllowRule::parse("GET api").is_err());
        assert!(AllowRule::parse("G@T /api").is_err());
    }
}
