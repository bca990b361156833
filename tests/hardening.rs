//! One client must not be able to turn the gate against the others (issue 11): each test
//! is an attack or a fault, over real loopback sockets, against the real binary.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use support::*;

/// Send `request` on a fresh connection and read the answer until the proxy closes it.
fn raw(addr: &str, request: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(answer: &str) -> u16 {
    answer
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connection_header_cannot_strip_the_proxys_token() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    let addr = proxy.addr.clone();
    let statuses = tokio::task::spawn_blocking(move || {
        (0..300)
            .map(|i| {
                let request = format!(
                    "GET /api/v2/conversations/{i} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CLIENT_KEY}\r\nConnection: close, authorization, host\r\n\r\n"
                );
                status_of(&raw(&addr, &request))
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(
        sandbox.api_401s(),
        0,
        "the API never saw a call without the bearer"
    );
    assert_eq!(sandbox.grants(), 1, "no grant beyond the first");
    let seen = sandbox.seen();
    assert_eq!(seen.len(), 300);
    assert!(seen.iter().all(|r| r
        .headers
        .get("authorization")
        .is_some_and(|v| sandbox.issued(v))));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_path_that_always_answers_401_cannot_make_the_proxy_mint_a_token_per_call() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    assert_eq!(get_with_key(&proxy, "/api/v2/users/me").await.status(), 200);
    for _ in 0..50 {
        let r = get_with_key(&proxy, "/api/v2/sandbox/always401").await;
        assert_eq!(r.status(), 401);
    }
    // The first 401 replaced the token once; its young replacement was kept after that.
    assert_eq!(sandbox.grants(), 2);
    assert_eq!(get_with_key(&proxy, "/api/v2/users/me").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn method_override_and_forwarding_headers_do_not_reach_the_api() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    let r = client()
        .get(proxy.url("/api/v2/conversations"))
        .header("Authorization", format!("Bearer {CLIENT_KEY}"))
        .header("X-HTTP-Method-Override", "DELETE")
        .header("X-Original-URL", "/api/v2/users")
        .header("X-Forwarded-For", "10.0.0.1")
        .header("Forwarded", "for=10.0.0.1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = sandbox.seen();
    let names: Vec<&str> = seen[0].headers.keys().map(|k| k.as_str()).collect();
    for name in [
        "x-http-method-override",
        "x-original-url",
        "x-forwarded-for",
        "forwarded",
    ] {
        assert!(!names.contains(&name), "{name} reached the API: {names:?}");
    }
}
