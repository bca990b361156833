//! HTTP pieces every part uses: the one body type and its helpers, the proxy's JSON
//! answers and error codes, credentials in headers, an error's chain of causes, and
//! whether a host is this machine.
//! Imports nothing of the crate's.

pub mod answers;
pub mod body;
pub mod causes;
pub mod codes;
pub mod credentials;

/// Is `host` (a `Host` header or an authority, port allowed) a loopback name:
/// `localhost`, a `*.localhost` name, or a loopback address?
pub fn is_loopback_host(host: &str) -> bool {
    let Ok(authority) = host.parse::<::http::uri::Authority>() else {
        return false;
    };
    let name = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name.to_ascii_lowercase().ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}
