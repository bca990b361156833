//! Calls that would end or change the proxy's own credentials, which every client shares.
//!
//! Genesys' `DELETE /api/v2/tokens/me` revokes the token the call carries — forwarded, it
//! would revoke the team's token, and one client calling it once a second would leave
//! every other client with 401s. Changing or deleting the proxy's OAuth client, or
//! regenerating its secret, ends the credentials themselves. No client's allow rules open
//! these: the proxy answers them itself ([`refusal`]), and a caller's own session token
//! (from the proxy's `/oauth/token`) is what `DELETE /api/v2/tokens/me` ends instead
//! ([`ends_own_session`]).
//!
//! Paths are compared after the decoding and normalising an API host might do (percent
//! decoding, case, repeated or trailing slashes, dot-segments, `;` parameters), so no
//! spelling of them slips through.

use std::borrow::Cow;

use http::Method;
use percent_encoding::percent_decode_str;

/// `path` as an API host might read it: decoded (twice over, for double encoding) and
/// lower case. Borrowed when it is already so (most paths): this runs on every call that
/// could change something.
fn decoded(path: &str) -> Cow<'_, str> {
    let mut decoded = Cow::Borrowed(path);
    for _ in 0..3 {
        match percent_decode_str(&decoded).decode_utf8_lossy() {
            Cow::Borrowed(_) => break,
            Cow::Owned(next) => decoded = Cow::Owned(next),
        }
    }
    if decoded.bytes().any(|b| b.is_ascii_uppercase()) {
        decoded = Cow::Owned(decoded.to_ascii_lowercase());
    }
    decoded
}

/// A [`decoded`] path's segments, with empty and `.` segments gone, `..` applied and `;…`
/// cut off.
fn segments(decoded: &str) -> Vec<&str> {
    let mut segments = Vec::with_capacity(16);
    for segment in decoded.split(['/', '\\']) {
        let segment = segment.split(';').next().unwrap_or_default().trim();
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    segments
}

/// Does `path` name Genesys' "the token this call carries" (`/api/v2/tokens/me`)?
fn is_token_itself(segments: &[&str]) -> bool {
    segments.ends_with(&["api", "v2", "tokens", "me"])
}

/// Reads change nothing; and a method override cannot turn one into a write (the guard
/// strips those headers).
fn reads(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Is this `DELETE /api/v2/tokens/me` (with the caller's prefix, if any, before it)?
pub fn ends_own_session(method: &Method, path: &str) -> bool {
    method == Method::DELETE && is_token_itself(&segments(&decoded(path)))
}

/// Why the proxy answers `method path` itself with 403, when it does; `path` is the path
/// within an upstream whose OAuth client is `client_id`.
pub fn refusal(method: &Method, path: &str, client_id: &str) -> Option<String> {
    // Neither case below is a read: the path is not even decoded for one.
    if reads(method) {
        return None;
    }
    let decoded = decoded(path);
    let segments = segments(&decoded);
    if method == Method::DELETE && is_token_itself(&segments) {
        return Some(
            "the upstream's token is shared by every client of the proxy: it cannot be revoked through it (a session token from the proxy's /oauth/token is ended this way instead)"
                .into(),
        );
    }
    let own_client = match segments.as_slice() {
        ["api", "v2", "oauth", "clients", id, ..] => {
            !client_id.is_empty() && id.eq_ignore_ascii_case(client_id)
        }
        _ => false,
    };
    if own_client {
        return Some(
            "the proxy's own OAuth client is shared by every client of the proxy: it cannot be changed or deleted through it, nor its secret regenerated"
                .into(),
        );
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "7de3af06-c0b3-4f9b-af45-72f4a1403797";

    #[test]
    fn every_spelling_of_revoking_the_shared_token_is_refused() {
        for path in [
            "/api/v2/tokens/me",
            "/api/v2/tokens/me/",
            "//api/v2//tokens/me",
            "/API/V2/Tokens/ME",
            "/api/v2/tokens/%6De",
            "/api/v2/tokens/%256De",
            "/api/v2/x/../tokens/me",
            "/api/v2/./tokens/me;x=1",
        ] {
            assert!(refusal(&Method::DELETE, path, ID).is_some(), "{path}");
        }
        assert!(refusal(&Method::GET, "/api/v2/tokens/me", ID).is_none());
        assert!(refusal(&Method::HEAD, "/api/v2/tokens/me", ID).is_none());
        assert!(refusal(&Method::DELETE, "/api/v2/tokens/mine", ID).is_none());
        assert!(ends_own_session(
            &Method::DELETE,
            "/genesys/api/v2/tokens/me"
        ));
        assert!(!ends_own_session(&Method::GET, "/api/v2/tokens/me"));
    }

    #[test]
    fn a_path_already_decoded_and_lower_case_is_read_where_it_lies() {
        // Every call that could change something is checked: most paths cost no copy.
        assert!(matches!(decoded("/api/v2/users/me"), Cow::Borrowed(_)));
        assert_eq!(decoded("/API/v2/%2574okens"), "/api/v2/tokens");
        assert_eq!(
            segments("/a//b/./c/../d;x=1/"),
            ["a", "b", "d"],
            "empty and dot segments, parameters"
        );
    }

    #[test]
    fn only_the_proxys_own_oauth_client_is_protected_and_only_from_changes() {
        let own = format!("/api/v2/oauth/clients/{ID}");
        for (method, path) in [
            (Method::PUT, own.clone()),
            (Method::DELETE, own.clone()),
            (Method::PATCH, own.to_uppercase()),
            (Method::POST, format!("{own}/secret")),
            (
                Method::POST,
                format!("/api/v2/oauth/clients/{}/secret", ID.replace('-', "%2D")),
            ),
        ] {
            assert!(refusal(&method, &path, ID).is_some(), "{method} {path}");
        }
        assert!(refusal(&Method::GET, &own, ID).is_none());
        let other = "/api/v2/oauth/clients/0000af06-c0b3-4f9b-af45-72f4a1403797";
        assert!(refusal(&Method::DELETE, other, ID).is_none());
        assert!(refusal(&Method::POST, "/api/v2/oauth/clients", ID).is_none());
    }
}
