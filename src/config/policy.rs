//! Per-client policy: which upstreams and which `METHOD /path` a client may call.
//!
//! Rules read `"GET /api/v2/analytics/**"`: `*` matches one path segment, `**` any number of
//! them (none included), `*` as the method matches every method. Paths are matched only
//! when they are plain (see [`is_plain_path`]), so encodings and normalisation tricks
//! cannot widen a rule.
//!
//! Matching is linear in the path's length: one pass over its segments, carrying the set
//! of rule positions still alive as a bit set (a rule has at most [`MAX_RULE_SEGMENTS`]).
//! A recursive matcher backtracked on rules with several `**`: a 5 KB path against
//! `/api/**/x/**/x/**/y` held a worker for 13 s.

use http::Method;
use percent_encoding::percent_decode_str;

/// Segments in one rule: enough for any real API path, and the matcher's bit set.
pub const MAX_RULE_SEGMENTS: usize = 63;
/// Segments in a path a client with rules may call: no real API path comes near it.
pub const MAX_PATH_SEGMENTS: usize = 256;

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
        const METHODS: [&str; 8] = [
            "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE",
        ];
        let method = match method {
            "*" => None,
            m if METHODS.contains(&m) => Some(
                Method::from_bytes(m.as_bytes())
                    .map_err(|_| format!("\"{m}\" in \"{rule}\" is not an HTTP method"))?,
            ),
            // Methods are case-sensitive: "get" would never match a GET.
            m if METHODS.contains(&m.to_ascii_uppercase().as_str()) => {
                return Err(format!(
                    "\"{m}\" in \"{rule}\" never matches: methods are upper-case (\"{}\")",
                    m.to_ascii_uppercase()
                ))
            }
            m => {
                return Err(format!(
                    "\"{m}\" in \"{rule}\" is not a method a rule can name: {} or *",
                    METHODS.join(", ")
                ))
            }
        };
        let path = path.trim();
        if !path.starts_with('/') {
            return Err(format!("the path in \"{rule}\" must start with '/'"));
        }
        if path.contains(['{', '}']) {
            return Err(format!(
                "\"{rule}\" never matches: a path parameter such as {{id}} is written * (one segment)"
            ));
        }
        if path.contains(['?', '#']) {
            return Err(format!(
                "\"{rule}\" never matches: rules match the path only; leave out the query (? …) and fragment (# …)"
            ));
        }
        let segments: Vec<Segment> = path[1..]
            .split('/')
            .map(|s| match s {
                "*" => Segment::One,
                "**" => Segment::Any,
                lit => Segment::Literal(lit.to_string()),
            })
            .collect();
        if segments.len() > MAX_RULE_SEGMENTS {
            return Err(format!(
                "\"{rule}\" has more than {MAX_RULE_SEGMENTS} path segments"
            ));
        }
        Ok(AllowRule { method, segments })
    }

    /// Does this rule allow `method` on `path` (a plain path, see [`is_plain_path`])?
    pub fn allows(&self, method: &Method, path: &str) -> bool {
        if self.method.as_ref().is_some_and(|m| m != method) {
            return false;
        }
        glob(
            &self.segments,
            path.strip_prefix('/').unwrap_or(path).split('/'),
        )
    }
}

/// Does `pattern` match the whole of `path`? Bit `j` of `alive` says the first `j`
/// pattern segments match the path read so far; each path segment moves every live
/// position on at once, so the cost is (path segments) × (pattern segments), never more.
fn glob<'a>(pattern: &[Segment], path: impl Iterator<Item = &'a str>) -> bool {
    let m = pattern.len();
    // `**` matches no segment too: a live position before one makes the next live.
    let close = |mut alive: u64| {
        for (j, seg) in pattern.iter().enumerate() {
            if alive & (1 << j) != 0 && *seg == Segment::Any {
                alive |= 1 << (j + 1);
            }
        }
        alive
    };
    let mut alive = close(1);
    for p in path {
        let mut next = 0u64;
        for (j, seg) in pattern.iter().enumerate() {
            if alive & (1 << j) == 0 {
                continue;
            }
            match seg {
                Segment::Any => next |= 1 << j,
                Segment::One if !p.is_empty() => next |= 1 << (j + 1),
                Segment::Literal(l) if l == p => next |= 1 << (j + 1),
                _ => {}
            }
        }
        alive = close(next);
        if alive == 0 {
            return false;
        }
    }
    alive & (1 << m) != 0
}

/// A path whose meaning cannot change on its way, however the API host decodes or
/// normalises it. Decoded once, it must be valid UTF-8 (no overlong forms), printable
/// ASCII, with no `%` left (double encoding), no `;` (matrix parameters, `..;/`), no
/// backslash, no `.`/`..` or empty segments (a trailing `/` is fine), no encoded `/`, and
/// at most [`MAX_PATH_SEGMENTS`] segments.
pub fn is_plain_path(path: &str) -> bool {
    if !path.starts_with('/') {
        return false;
    }
    let Ok(decoded) = percent_decode_str(path).decode_utf8() else {
        return false;
    };
    if !decoded
        .bytes()
        .all(|b| matches!(b, b' '..=b'~') && !matches!(b, b'%' | b';' | b'\\'))
    {
        return false;
    }
    // An encoded '/' would add a segment only after decoding.
    let count = path.split('/').count();
    if count != decoded.split('/').count() || count > MAX_PATH_SEGMENTS + 1 {
        return false;
    }
    let inner = &decoded[1..];
    inner.is_empty()
        || inner.split('/').enumerate().all(|(i, s)| match s {
            "." | ".." => false,
            // A trailing '/' is harmless; an empty segment inside is not.
            "" => i == count - 2,
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
            "/a/..;/b",
            "/a;x/b",
            "/a/%252e%252e/b",
            "/a/%00/b",
            "/a/%c0%ae%c0%ae/b",
            "/a/%e2%80%a8",
            "/a/%5c",
        ] {
            assert!(!is_plain_path(p), "{p}");
        }
        for p in ["/", "/a", "/a/b/", "/api/v2/users/x%20y"] {
            assert!(is_plain_path(p), "{p}");
        }
    }

    #[test]
    fn globs_with_several_double_stars_match_in_linear_time() {
        let r = rule("GET /api/**/x/**/x/**/y");
        assert!(r.allows(&Method::GET, "/api/x/x/y"));
        assert!(r.allows(&Method::GET, "/api/a/x/b/c/x/y"));
        assert!(!r.allows(&Method::GET, "/api/x/y"));
        // 30,000 segments of "x": a backtracking matcher tries ~n^3 splits and never ends.
        let long = format!("/api{}/z", "/x".repeat(30_000));
        let started = std::time::Instant::now();
        assert!(!r.allows(&Method::GET, &long));
        assert!(r.allows(&Method::GET, &format!("/api{}/y", "/x".repeat(30_000))));
        // Bound only a failure: the linear matcher takes about a millisecond.
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        let r = rule("* /**");
        assert!(r.allows(&Method::GET, "/"));
        assert!(r.allows(&Method::GET, "/a/b"));
        let r = rule("GET /a/*/**");
        assert!(!r.allows(&Method::GET, "/a"));
        assert!(r.allows(&Method::GET, "/a/b"));
    }

    #[test]
    fn long_paths_are_not_plain() {
        assert!(is_plain_path(&"/a".repeat(MAX_PATH_SEGMENTS)));
        assert!(!is_plain_path(&"/a".repeat(MAX_PATH_SEGMENTS + 1)));
    }

    #[test]
    fn bad_rules_are_refused() {
        assert!(AllowRule::parse(&format!("GET {}", "/a".repeat(64))).is_err());
        assert!(AllowRule::parse("/api").is_err());
        assert!(AllowRule::parse("GET api").is_err());
        assert!(AllowRule::parse("G@T /api").is_err());
    }
}
