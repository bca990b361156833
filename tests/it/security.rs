//! Hostile input and the HTTPS listener, over real loopback connections.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::pki::{pki, Pki};
use crate::support::*;

fn key() -> String {
    format!("Bearer {CLIENT_KEY}")
}

async fn works(proxy: &Proxy) -> bool {
    client()
        .get(proxy.url("/api/v2/users/me"))
        .header("Authorization", key())
        .send()
        .await
        .map(|r| r.status() == 200)
        .unwrap_or(false)
}

/// The proxy with an HTTPS listener (the `pki` server certificate), and a first call over
/// it with the client key: 200 over HTTP/2 by ALPN.
async fn https_proxy(sandbox: &Sandbox, pki: &Pki) -> (Proxy, String) {
    let d = pki.dir.path().display();
    let proxy = Proxy::start(&standard_config(
        sandbox,
        &format!("tls_cert = \"{d}/server.pem\"\ntls_key = \"{d}/server.key\""),
    ));
    let url = format!("https://{}/api/v2/users/me", proxy.addr);
    let r = https_client(pki, None)
        .get(&url)
        .header("Authorization", key())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2, "h2 by ALPN");
    (proxy, url)
}

/// Write `bytes` on a fresh connection and read what comes back until close (bounded).
fn exchange(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_request_head_is_refused_with_431() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    let addr = proxy.addr.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let big = "a".repeat(200 * 1024);
        exchange(
            &addr,
            // An echoing path: the API host records every call to it that arrives.
            format!("GET /api/v2/conversations HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n")
                .as_bytes(),
        )
    })
    .await
    .unwrap();
    let head = String::from_utf8_lossy(&answer[..answer.len().min(40)]).into_owned();
    assert!(head.starts_with("HTTP/1.1 431"), "{head}");
    assert!(sandbox.seen().is_empty());
    assert!(works(&proxy).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn random_bytes_and_a_tls_hello_on_the_plain_port_leave_it_serving() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    let addr = proxy.addr.clone();
    tokio::task::spawn_blocking(move || {
        let garbage: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        exchange(&addr, &garbage);
        // The start of a TLS 1.2/1.3 ClientHello record.
        exchange(
            &addr,
            &[
                0x16, 0x03, 0x01, 0x00, 0xa5, 0x01, 0x00, 0x00, 0xa1, 0x03, 0x03, 0x00, 0x01,
            ],
        );
        exchange(&addr, b"\r\n\r\n\r\nGET\r\n");
    })
    .await
    .unwrap();
    assert!(works(&proxy).await);
    assert!(sandbox.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn two_hundred_slow_half_open_connections_do_not_delay_a_real_call() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    assert!(works(&proxy).await, "warm");
    let mut slow = Vec::new();
    for _ in 0..200 {
        let mut s = TcpStream::connect(&proxy.addr).unwrap();
        s.write_all(b"GET /api/v2/users/me HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .unwrap();
        slow.push(s);
    }
    let started = Instant::now();
    assert!(works(&proxy).await);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "a real call took {took:?}");
    drop(slow);
}

/// The slow-loris guard: a request head must be complete within the head timeout (10 s),
/// on a fresh connection and on a kept-alive one that has been in use for longer than
/// that alike (each connection reuses one timer for every head; see `connection_timer`).
/// Both are closed then, and the proxy keeps answering.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_head_must_be_complete_within_the_head_timeout_on_every_request() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    let addr = proxy.addr.clone();
    let (fresh, kept) = tokio::task::spawn_blocking(move || {
        let partial = b"GET /api/v2/users/me HTTP/1.1\r\nHost: x\r\nX-Slow: ";
        let started = Instant::now();
        let mut fresh = TcpStream::connect(&addr).unwrap();
        fresh.write_all(partial).unwrap();
        // Whole requests for longer than the head timeout, so a timer that were not
        // moved on with each head would have closed it; then part of the next head.
        // (With a key: a refused request closes its connection.)
        let mut kept = TcpStream::connect(&addr).unwrap();
        kept.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let busy_since = Instant::now();
        let whole =
            format!("GET /api/v2/users/me HTTP/1.1\r\nHost: x\r\nX-Api-Key: {CLIENT_KEY}\r\n\r\n");
        while busy_since.elapsed() < Duration::from_secs(12) {
            kept.write_all(whole.as_bytes()).unwrap();
            let mut answer = Vec::new();
            let mut buf = [0u8; 4096];
            while !answer_is_whole(&answer) {
                let n = kept.read(&mut buf).unwrap();
                assert!(
                    n > 0,
                    "closed while in use, after {:?}",
                    busy_since.elapsed()
                );
                answer.extend_from_slice(&buf[..n]);
            }
            assert!(answer.starts_with(b"HTTP/1.1 200"));
            // The caller's pace: a call every 100 ms.
            std::thread::sleep(Duration::from_millis(100));
        }
        let kept_started = Instant::now();
        kept.write_all(partial).unwrap();
        // Each is closed by the proxy (EOF or a reset), not by this read's own timeout.
        let closed_after = |mut s: TcpStream, since: Instant| {
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let mut rest = Vec::new();
            match s.read_to_end(&mut rest) {
                Ok(_) => {}
                Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
            }
            assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
            since.elapsed()
        };
        (
            closed_after(fresh, started),
            closed_after(kept, kept_started),
        )
    })
    .await
    .unwrap();
    for took in [fresh, kept] {
        assert!(
            took >= Duration::from_secs(9) && took < Duration::from_secs(20),
            "closed after {took:?}"
        );
    }
    assert!(works(&proxy).await);
}

/// A whole HTTP/1.1 answer with a `Content-Length`.
fn answer_is_whole(bytes: &[u8]) -> bool {
    let text = String::from_utf8_lossy(bytes);
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        return false;
    };
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_owned())
        })
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    body.len() >= length
}

#[tokio::test(flavor = "multi_thread")]
async fn one_address_cannot_take_every_connection_slot() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(
        &sandbox,
        "max_connections_per_address = 5",
    ));
    // Each held connection is answered once, so the proxy has surely accepted all five
    // (each worker accepts from its own queue: a connect alone proves nothing). With a
    // key: a refused request closes its connection.
    let addr = proxy.addr.clone();
    let held: Vec<TcpStream> = tokio::task::spawn_blocking(move || {
        (0..5)
            .map(|_| {
                let mut s = TcpStream::connect(&addr).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
                let call = format!(
                    "GET /api/v2/users/me HTTP/1.1\r\nHost: x\r\nX-Api-Key: {CLIENT_KEY}\r\n\r\n"
                );
                s.write_all(call.as_bytes()).unwrap();
                let mut head = [0u8; 12];
                s.read_exact(&mut head).unwrap();
                assert_eq!(&head, b"HTTP/1.1 200");
                s
            })
            .collect()
    })
    .await
    .unwrap();
    // The sixth from the same address is closed at once.
    let addr = proxy.addr.clone();
    let answer = tokio::task::spawn_blocking(move || {
        exchange(&addr, b"GET /api/v2/users/me HTTP/1.1\r\nHost: x\r\n\r\n")
    })
    .await
    .unwrap();
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    drop(held);
    // The slots come back as the proxy sees those connections close.
    let mut served = false;
    for _ in 0..500 {
        if works(&proxy).await {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(served);
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_lines_in_json_name_the_call_and_nothing_secret() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(
        &standard_config(&sandbox, "").replace("[server]", "[log]\nformat = \"json\"\n\n[server]"),
    );
    // Revoke the token fetched at start (once it exists), so the call is retried.
    wait_for(Duration::from_secs(10), || {
        (sandbox.grants() == 1).then_some(())
    })
    .await
    .expect("the token is fetched at start");
    sandbox.revoke_all();
    let r = get_with_key(&proxy, "/api/v2/users/me?secret_q=hidden-77").await;
    assert_eq!(r.status(), 200);
    // The line is written before the answer leaves; wait until the reader has it.
    let output = proxy.output.clone();
    let logs = wait_for(Duration::from_secs(10), || {
        let text = output.text();
        text.contains("tokengate::audit").then_some(text)
    })
    .await
    .expect("an audit line");
    let audit: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "tokengate::audit")
        .collect();
    assert_eq!(audit.len(), 1, "{logs}");
    let a = &audit[0];
    assert_eq!(a["client"], "reporting-job");
    assert_eq!(a["upstream"], "genesys");
    assert_eq!(a["method"], "GET");
    assert_eq!(a["path"], "/api/v2/users/me");
    assert_eq!(a["status"], 200);
    assert_eq!(a["retried"], "unauthorized");
    assert_eq!(a["correlation_id"].as_str().map(str::len), Some(32));
    assert!(a["ms"].as_f64().is_some());
    for s in [CLIENT_KEY, CLIENT_SECRET, "hidden-77"] {
        assert!(!logs.contains(s));
    }
    for t in sandbox.issued_tokens() {
        assert!(!logs.contains(&t));
    }
}

/// An HTTPS client trusting the test CA, presenting client certificate `which` if given.
fn https_client(pki: &Pki, which: Option<usize>) -> reqwest::Client {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(pki.ca_pem.as_bytes()).unwrap());
    if let Some(i) = which {
        let (cert, key) = &pki.clients[i];
        b = b.identity(reqwest::Identity::from_pem(format!("{cert}{key}").as_bytes()).unwrap());
    }
    b.build().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_https_listener_serves_with_a_client_key() {
    let sandbox = sandbox().await;
    let pki = pki();
    let (proxy, url) = https_proxy(&sandbox, &pki).await;
    let c = https_client(&pki, None);
    assert_eq!(
        c.get(&url).send().await.unwrap().status(),
        401,
        "a key is still required"
    );
    // Plain HTTP on the HTTPS port gets nowhere.
    let plain = client()
        .get(proxy.url("/api/v2/users/me"))
        .header("Authorization", key())
        .send()
        .await;
    assert!(plain.is_err());
    assert_eq!(
        sandbox.seen().len(),
        0,
        "users/me is not echoed; nothing else was forwarded"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_identifies_the_client_by_its_certificate() {
    let sandbox = sandbox().await;
    let pki = pki();
    let d = pki.dir.path().display();
    let proxy = Proxy::start(&standard_config(
        &sandbox,
        &format!("tls_cert = \"{d}/server.pem\"\ntls_key = \"{d}/server.key\"\nclient_ca = \"{d}/ca.pem\""),
    ));
    let url = format!("https://{}/api/v2/users/me", proxy.addr);
    let r = https_client(&pki, Some(0)).get(&url).send().await.unwrap();
    assert_eq!(
        r.status(),
        200,
        "the certificate alone identifies reporting-job"
    );
    assert!(
        https_client(&pki, None)
            .get(&url)
            .header("Authorization", key())
            .send()
            .await
            .is_err(),
        "without a client certificate the handshake fails"
    );
    // The right CA, but a name no client has: TLS succeeds, the proxy knows no such client.
    let r = https_client(&pki, Some(1)).get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_with_prior_knowledge_is_served_on_the_plain_port() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let answer = h2
        .get(proxy.url("/api/v2/users/me"))
        .header("Authorization", key())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.version(), reqwest::Version::HTTP_2);
    assert_eq!(answer.status(), 200);
    // And HTTP/1.1 on the same port, after it.
    assert!(works(&proxy).await);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_caller_that_shuts_its_sending_side_after_the_request_still_gets_the_answer() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    let addr = proxy.addr.clone();
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(
            format!(
                "GET /api/v2/users/me HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\n\r\n",
                key()
            )
            .as_bytes(),
        )
        .unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        out
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_does_not_wait_for_tls_handshakes_that_never_start() {
    let sandbox = sandbox().await;
    let pki = pki();
    let (proxy, _) = https_proxy(&sandbox, &pki).await;
    proxy.terminate_with_silent_connections(3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn notification_sockets_pass_the_https_listener_as_wss() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let sandbox = sandbox_with_heartbeat(Duration::from_millis(200)).await;
    let pki = pki();
    let d = pki.dir.path().display();
    let proxy = Proxy::start(&config_with(
        &sandbox,
        &format!("tls_cert = \"{d}/server.pem\"\ntls_key = \"{d}/server.key\""),
        &format!("streaming_url = \"{}\"", sandbox.streaming_url()),
    ));
    let channel: serde_json::Value = https_client(&pki, None)
        .post(format!(
            "https://{}/api/v2/notifications/channels",
            proxy.addr
        ))
        .header("Authorization", key())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let connect = channel["connectUri"].as_str().unwrap();
    let id = channel["id"].as_str().unwrap();
    assert_eq!(connect, format!("wss://{}/channels/{id}", proxy.addr));
    // A WebSocket over TLS to the proxy, trusting the test CA.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
        .unwrap();
    let tls = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(&proxy.addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(connect, stream)
        .await
        .unwrap();
    use futures_util::StreamExt;
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        first.to_text().unwrap().contains("WebSocket Heartbeat"),
        "{first:?}"
    );
    assert_eq!(sandbox.streaming_seen(), [format!("/channels/{id}")]);
}
