//! What a caller presents in `Authorization`: the two schemes the proxy reads (client keys
//! as `Bearer`, legacy token requests and browsers as `Basic`), parsed in one place. Scheme
//! names are case-insensitive (RFC 9110 §11.1).

use base64::Engine as _;
use http::HeaderValue;

/// The credentials after `scheme ` (a space), if `value` uses that scheme.
fn after_scheme<'a>(value: &'a HeaderValue, scheme: &str) -> Option<&'a [u8]> {
    let v = value.as_bytes();
    let n = scheme.len();
    (v.len() > n + 1 && v[..n].eq_ignore_ascii_case(scheme.as_bytes()) && v[n] == b' ')
        .then(|| v[n + 1..].trim_ascii())
}

/// Whether `value` uses `scheme` (whatever its credentials).
pub fn uses_scheme(value: &HeaderValue, scheme: &str) -> bool {
    after_scheme(value, scheme).is_some()
}

/// The token of `Authorization: Bearer <token>`.
pub fn bearer(value: &HeaderValue) -> Option<&[u8]> {
    after_scheme(value, "bearer")
}

/// The user and password of `Authorization: Basic base64(user:password)`.
pub fn basic(value: &HeaderValue) -> Option<(Vec<u8>, Vec<u8>)> {
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(after_scheme(value, "basic")?)
        .ok()?;
    let colon = decoded.iter().position(|b| *b == b':')?;
    Some((decoded[..colon].to_vec(), decoded[colon + 1..].to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_are_case_insensitive_and_need_a_value() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(bearer(&v("Bearer abc ")), Some(&b"abc"[..]));
        assert_eq!(bearer(&v("bEARER abc")), Some(&b"abc"[..]));
        assert_eq!(bearer(&v("Bearer")), None);
        assert_eq!(bearer(&v("Bearerabc")), None);
        assert_eq!(bearer(&v("Basic abc")), None);
        // base64("id:se:cret"): the password keeps its own colons.
        let (user, password) = basic(&v("basic aWQ6c2U6Y3JldA==")).unwrap();
        assert_eq!((&user[..], &password[..]), (&b"id"[..], &b"se:cret"[..]));
        assert_eq!(basic(&v("Basic !!!")), None);
        assert_eq!(basic(&v("Basic aWQ=")), None, "no colon");
    }
}
