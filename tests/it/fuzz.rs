//! Property tests over the proxy's two untrusted inputs: the config file and the request
//! head. Bounded case counts, so CI time is bounded; failures shrink to a minimal input.

use std::io::{Read, Write};
use std::time::Duration;

use crate::support::*;
use proptest::prelude::*;
use tokengate::config::policy::{is_plain_path, AllowRule};
use tokengate::config::Config;

const SECRET: &str = "prop-secret-value-93";

fn load(text: &str) -> Result<Config, String> {
    let env = |name: &str| (name == "S").then(|| SECRET.to_string());
    Config::from_toml(text, "proxy.toml".as_ref(), &env).map_err(|e| e.to_string())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Any text: an answer, never a panic.
    #[test]
    fn any_text_as_config_is_an_answer(text in "\\PC{0,400}") {
        let _ = load(&text);
    }

    /// Plausible configs with hostile values: an answer naming the file, never a panic, and
    /// never the secret in the message.
    #[test]
    fn hostile_values_in_a_config_never_leak_the_secret(
        listen in "\\PC{0,30}",
        region in "[a-z_\\-0-9]{0,16}",
        prefix in "\\PC{0,20}",
        token_url in "\\PC{0,40}",
        hash in "[0-9a-fA-F]{0,70}",
        rule in "\\PC{0,30}",
        timeout in proptest::num::f64::ANY,
    ) {
        let text = format!(
            "[server]\nlisten = {listen:?}\n[[upstream]]\nname = \"g\"\nprovider = \"genesys\"\nregion = {region:?}\nprefix = {prefix:?}\ntoken_url = {token_url:?}\nclient_id = \"id\"\nclient_secret = \"${{S}}\"\ntimeout_secs = {timeout:?}\n[[client]]\nname = \"c\"\nkey_sha256 = {hash:?}\nallow = [{rule:?}]\n"
        );
        if let Err(message) = load(&text) {
            prop_assert!(message.starts_with("proxy.toml: "), "{message}");
            prop_assert!(!message.contains(SECRET));
        }
    }

    /// Paths and rules: never a panic; paths with dot-segments or empty segments are not
    /// plain; and the one-pass matcher agrees with the obvious backtracking one (fine on
    /// inputs this short) on every rule and path.
    #[test]
    fn paths_and_rules_are_total(path in "/[a-z*/.%2]{0,40}", rule in "[A-Z*]{1,7} /[a-z*/.%2]{0,30}") {
        let plain = is_plain_path(&path);
        if let Ok(r) = AllowRule::parse(&rule) {
            let method_matches = rule.starts_with("* ") || rule.starts_with("GET ");
            let pattern = rule.split_once(' ').map_or("", |(_, p)| p);
            let expected = method_matches && backtracking_match(pattern, &path);
            prop_assert_eq!(r.allows(&http::Method::GET, &path), expected, "{} on {}", rule, path);
        }
        if path.contains("/../") || path.contains("//") || path.ends_with("/..") {
            prop_assert!(!plain);
        }
    }
}

/// The reference matcher: `*` one non-empty segment, `**` any number (none included),
/// anything else literally; tried every way (exponential, so short inputs only).
fn backtracking_match(pattern: &str, path: &str) -> bool {
    fn go(pattern: &[&str], path: &[&str]) -> bool {
        match (pattern.split_first(), path.split_first()) {
            (None, _) => path.is_empty(),
            (Some((&"**", rest)), _) => (0..=path.len()).any(|i| go(rest, &path[i..])),
            (Some(_), None) => false,
            (Some((&"*", rest)), Some((p, more))) => !p.is_empty() && go(rest, more),
            (Some((lit, rest)), Some((p, more))) => lit == p && go(rest, more),
        }
    }
    let split = |s: &'_ str| -> Vec<String> {
        s.strip_prefix('/')
            .unwrap_or(s)
            .split('/')
            .map(str::to_string)
            .collect()
    };
    let (pattern, path) = (split(pattern), split(path));
    let pattern: Vec<&str> = pattern.iter().map(String::as_str).collect();
    let path: Vec<&str> = path.iter().map(String::as_str).collect();
    go(&pattern, &path)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The matcher on long paths (no reference: it would not finish): never a panic.
    #[test]
    fn long_paths_against_double_star_rules_are_answered(n in 0usize..2000, tail in "[a-z]{1,3}") {
        let r = AllowRule::parse("GET /api/**/x/**/x/**/y").unwrap();
        let path = format!("/api{}/{tail}", "/x".repeat(n));
        prop_assert_eq!(r.allows(&http::Method::GET, &path), tail == "y" && n >= 2);
    }
}

/// Random request heads at a real proxy: every one gets an answer or a closed connection,
/// and the proxy keeps serving.
#[tokio::test(flavor = "multi_thread")]
async fn random_request_heads_never_break_the_proxy() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    let addr = proxy.addr.clone();
    tokio::task::spawn_blocking(move || {
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases: 128,
            ..ProptestConfig::default()
        });
        let head = (
            "[A-Z]{0,8}|\\PC{0,8}",
            "\\PC{0,80}",
            "HTTP/1\\.[01]|HTTP/2\\.0|\\PC{0,8}",
            proptest::collection::vec(("\\PC{0,20}", "\\PC{0,40}"), 0..8),
        );
        runner
            .run(&head, |(method, target, version, headers)| {
                // A peer that says HTTP/1.0 is answered in HTTP/1.0 (hyper, as RFC 9110
                // §2.5 asks): `A & HTTP/1.0` drew a correct `HTTP/1.0 400`.
                let status_line: &[u8] = if version == "HTTP/1.0" {
                    b"HTTP/1.0 "
                } else {
                    b"HTTP/1.1 "
                };
                let mut req = format!("{method} {target} {version}\r\n");
                for (k, v) in headers {
                    req.push_str(&format!("{k}: {v}\r\n"));
                }
                req.push_str("\r\n");
                let mut s = std::net::TcpStream::connect(&addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                let _ = s.write_all(req.as_bytes());
                let _ = s.shutdown(std::net::Shutdown::Write);
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out);
                prop_assert!(
                    out.is_empty() || out.starts_with(b"HTTP/1.1 ") || out.starts_with(status_line),
                    "{}",
                    String::from_utf8_lossy(&out)
                );
                Ok(())
            })
            .unwrap();
    })
    .await
    .unwrap();
    let r = get_with_key(&proxy, "/api/v2/users/me").await;
    assert_eq!(r.status(), 200);
}
