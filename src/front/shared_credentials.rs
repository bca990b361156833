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

use http::Method;
use percent_encoding::percent_decode_str;

/// `path`'s segments as an API host might read them: decoded (twice over, for double
/// encoding), lower case, with empty and `.` segments gone, `..` applied and `;…` cut off.
fn normalised(path: &str) -> Vec<String> {
    let mut decoded = path.to_string();
    for _ in 0..3 {
        let next = percent_decode_str(&decoded)
            .decode_utf8_lossy()
            .into_owned();
        if next == decoded {
            break;
        }
        decoded = next;
    }
    let mut segments: Vec<String> = Vec::new();
    for segment in decoded.to_ascii_lowercase().split(['/', '\\']) {
        let segment = segment.split(';').next().unwrap_or_default().trim();
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s.to_string()),
        }
    }
    segments
}

/// Does `path` name Genesys' "the token this call carries" (`/api/v2/tokens/me`)?
fn is_token_itself(segments: &[String]) -> bool {
    segments.ends_with(&["api", "v2", "tokens", "me"].map(String::from))
}

/// Is this `DELETE /api/v2/tokens/me` (with the caller's prefix, if any, before it)?
pub fn ends_own_session(method: &Method, path: &str) -> bool {
    method == Method::DELETE && is_token_itself(&normalised(path))
}

/// Why the proxy answers `method path` itself with 403, when it does; `path` is the path
/// within an upstream whose OAuth client is `client_id`.
pub fn refusal(method: &Method, path: &str, client_id: &str) -> Option<String> {
    let segments = normalised(path);
    if method == Method::DELETE && is_token_itself(&segments) {
        return Some(
            "the upstream's token is shared by every client of the proxy: it cannot be revoked through it (a session token from the proxy's /oauth/token is ended this way instead)"
                .into(),
        );
    }
    let own_client = match segments.as_slice() {
        [api, v2, oauth, clients, id, ..] => {
            [api, v2, oauth, clients].map(String::as_str) == ["api", "v2", "oauth", "clients"]
                && !client_id.is_empty()
                && *id == client_id.to_ascii_lowercase()
        }
        _ => false,
    };
    let reads = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    if own_client && !reads {
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
