//! Hardening, round two: what one client, or none, could take from the others. Each test
//! plays one attack of the second attack run, scaled to a test, and checks that the
//! others are still served.

use std::time::Duration;

use crate::support::*;

const MIB: u64 = 1024 * 1024;

/// An HTTP/2 (prior knowledge) connection to `addr` from the loopback address `from`, and
/// the task driving it (finished when the connection ends).
async fn h2c_from(
    from: [u8; 4],
    addr: &str,
    window: Option<u32>,
) -> (
    h2::client::SendRequest<bytes::Bytes>,
    tokio::task::JoinHandle<()>,
) {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::from((from, 0))).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let mut builder = h2::client::Builder::new();
    if let Some(window) = window {
        builder.initial_window_size(window);
    }
    let (send, conn) = builder.handshake(tcp).await.unwrap();
    let driving = tokio::spawn(async move {
        let _ = conn.await;
    });
    (send, driving)
}

/// A keyless token request on `send` that declares a 16 KiB form, sends all of it but the
/// last byte and then nothing: its status (0 when the stream was refused or reset).
async fn slow_token_form(send: h2::client::SendRequest<bytes::Bytes>, url: String) -> u16 {
    let req = http::Request::post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .header("content-length", 16 * 1024)
        .body(())
        .unwrap();
    let Ok(mut send) = send.ready().await else {
        return 0;
    };
    let Ok((resp, mut body)) = send.send_request(req, false) else {
        return 0;
    };
    let _ = body.send_data(bytes::Bytes::from(vec![b'x'; 16 * 1024 - 1]), false);
    let answered = tokio::time::timeout(Duration::from_secs(90), resp).await;
    let status = match answered.expect("an answer within 90 s") {
        Ok(r) => r.status().as_u16(),
        Err(_) => 0,
    };
    drop(body);
    status
}

#[tokio::test(flavor = "multi_thread")]
async fn keyless_slow_token_forms_on_many_http2_connections_stay_in_bounded_memory() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    let mut forms = Vec::new();
    let mut connections = Vec::new();
    for i in 0..300u32 {
        // Spread over a few addresses, as many machines would be.
        let from = [127, 0, 1, 1 + (i % 4) as u8];
        let (send, driving) = h2c_from(from, &proxy.addr, None).await;
        connections.push(driving);
        for _ in 0..64 {
            forms.push(tokio::spawn(slow_token_form(
                send.clone(),
                proxy.url("/oauth/token"),
            )));
        }
    }
    let mut statuses = Vec::new();
    for f in forms {
        statuses.push(f.await.unwrap());
    }
    let peak = proxy.peak_rss();
    for c in &connections {
        c.abort();
    }
    let count = |s: u16| statuses.iter().filter(|x| **x == s).count();
    // Memory comes back once they have left.
    let after = wait_for(Duration::from_secs(30), || {
        let rss = proxy.rss();
        (rss < peak / 2 || rss < 48 * MIB).then_some(rss)
    })
    .await;
    eprintln!(
        "19,200 keyless slow token forms: {} 503, {} 400, {} reset; peak RSS {} MiB, after {:?} MiB",
        count(503),
        count(400),
        count(0),
        peak / MIB,
        after.map(|a| a / MIB)
    );
    assert!(peak < 256 * MIB, "peak RSS {} MiB", peak / MIB);
    assert!(after.is_some(), "RSS stayed at {} MiB", proxy.rss() / MIB);
    // A couple per connection are read (until their caller is too slow: 400); the rest
    // are refused at once.
    assert!(count(503) > 0 && count(400) > 0, "{:?}", &statuses[..64]);
    assert_eq!(get_with_key(&proxy, "/api/v2/users/me").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn keyless_http2_connections_repeating_a_refused_request_are_closed_as_idle() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    let started = std::time::Instant::now();
    let mut attackers = Vec::new();
    for _ in 0..20 {
        let (send, driving) = h2c_from([127, 0, 1, 9], &proxy.addr, None).await;
        let url = proxy.url("/api/v2/users/me");
        let asking = tokio::spawn(async move {
            // One refused request every 3 s: more often than any idle rule's limit.
            let mut every = tokio::time::interval(Duration::from_secs(3));
            loop {
                every.tick().await;
                let Ok(mut send) = send.clone().ready().await else {
                    return;
                };
                let req = http::Request::get(url.clone()).body(()).unwrap();
                let Ok((resp, _)) = send.send_request(req, true) else {
                    return;
                };
                match resp.await {
                    Ok(r) => assert_eq!(r.status(), 401),
                    Err(_) => return,
                }
            }
        });
        attackers.push((driving, asking));
    }
    for (driving, asking) in attackers {
        let closed = tokio::time::timeout(Duration::from_secs(60), driving).await;
        assert!(
            closed.is_ok(),
            "a keyless connection was still open after 60 s"
        );
        asking.abort();
    }
    let took = started.elapsed();
    eprintln!("20 keyless connections asking every 3 s were closed within {took:?}");
    assert_eq!(get_with_key(&proxy, "/api/v2/users/me").await.status(), 200);
}

/// Is the proxy's admin `/healthz` answered within 3 s?
async fn healthz_answers(proxy: &Proxy) -> bool {
    let probe = client().get(proxy.admin_url("/healthz")).send();
    matches!(
        tokio::time::timeout(Duration::from_secs(3), probe).await,
        Ok(Ok(r)) if r.status() == 200
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn with_1024_descriptors_1100_keyless_connections_leave_room_for_callers_and_health() {
    // This test process needs more than a shell's usual 1,024 descriptors itself.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let sandbox = sandbox().await;
    let proxy = Proxy::start_with_open_files(&standard_config(&sandbox, ""), 1024);
    assert_eq!(get_with_key(&proxy, "/api/v2/users/me").await.status(), 200);
    let mut held = Vec::new();
    for i in 0..1100u32 {
        let from = [127, 0, 2, 1 + (i % 4) as u8];
        let addr: std::net::SocketAddr = proxy.addr.parse().unwrap();
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(std::net::SocketAddr::from((from, 0))).unwrap();
        // Past the proxy's cap connections wait in the listen queue, or are refused.
        if let Ok(Ok(tcp)) =
            tokio::time::timeout(Duration::from_secs(2), socket.connect(addr)).await
        {
            held.push(tcp);
        }
    }
    // The admin listener keeps descriptors of its own.
    assert!(healthz_answers(&proxy).await, "/healthz did not answer");
    // A caller with a key is served once the keyless connections are let go.
    let served = wait_for_async(Duration::from_secs(60), || async {
        let call = get_with_key(&proxy, "/api/v2/users/me");
        match tokio::time::timeout(Duration::from_secs(5), call).await {
            Ok(r) if r.status() == 200 => Some(()),
            _ => None,
        }
    })
    .await;
    assert!(
        served.is_some(),
        "no caller was served:\n{}",
        proxy.output.text()
    );
    drop(held);
    let spins = proxy.output.text().matches("accept failed").count();
    assert!(spins < 20, "accept failed {spins} times");
}

#[test]
fn the_soft_limit_of_open_files_is_raised_to_the_hard_one_at_start() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sandbox = rt.block_on(sandbox());
    let mut sh = std::process::Command::new("sh");
    sh.arg("-c").arg("ulimit -Hn");
    let hard = String::from_utf8(sh.output().unwrap().stdout).unwrap();
    let proxy = Proxy::start_with_soft_open_files(&standard_config(&sandbox, ""), 512);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", proxy.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let numbers: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    eprintln!("{line} (hard limit of the shell: {})", hard.trim());
    assert_eq!(numbers[0], numbers[1], "{line}");
    assert_ne!(numbers[0], "512", "{line}");
    drop(rt);
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_healthz_readers_do_not_shut_a_probe_from_their_address_out() {
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    let admin = proxy.admin.clone().unwrap();
    // 32 readers that never open their window: the answer to each /healthz stays unsent.
    let mut readers = Vec::new();
    for _ in 0..32 {
        let (send, driving) = h2c_from([127, 0, 3, 1], &admin, Some(0)).await;
        let mut send = send.ready().await.unwrap();
        let req = http::Request::get(format!("http://{admin}/healthz"))
            .body(())
            .unwrap();
        let (resp, _) = send.send_request(req, true).unwrap();
        readers.push((resp, send, driving));
    }
    let started = std::time::Instant::now();
    // A probe from the same address (a liveness probe beside them) is answered.
    let admin_addr: std::net::SocketAddr = admin.parse().unwrap();
    let answered = wait_for_async(Duration::from_secs(60), || async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(std::net::SocketAddr::from(([127, 0, 3, 1], 0)))
            .unwrap();
        let tcp = socket.connect(admin_addr).await.ok()?;
        let (mut send, conn) =
            hyper::client::conn::http1::handshake::<_, String>(hyper_util::rt::TokioIo::new(tcp))
                .await
                .ok()?;
        tokio::spawn(conn);
        let req = http::Request::get("/healthz")
            .header("host", "x")
            .body(String::new())
            .unwrap();
        let probe = send.send_request(req);
        match tokio::time::timeout(Duration::from_secs(2), probe).await {
            Ok(Ok(r)) if r.status() == 200 => Some(()),
            _ => None,
        }
    })
    .await;
    eprintln!(
        "a probe beside 32 stalled /healthz readers answered after {:?}",
        started.elapsed()
    );
    assert!(answered.is_some(), "no probe was answered in 60 s");
    drop(readers);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_http1_request_closes_its_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    let mut s = tokio::net::TcpStream::connect(&proxy.addr).await.unwrap();
    s.write_all(b"GET /api/v2/users/me HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    // Bounds a failure only: the proxy closes at once after its answer.
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(read.is_ok(), "still open after its 401:\n{answer}");
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
}

/// Reload the proxy with the config it has, and wait until it says so.
async fn reload(proxy: &Proxy, reloads_before: usize) {
    proxy.signal("HUP");
    let reloaded = wait_for(Duration::from_secs(10), || {
        (proxy.output.text().matches("config reloaded").count() > reloads_before).then_some(())
    })
    .await;
    assert!(reloaded.is_some(), "no reload:\n{}", proxy.output.text());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_keeps_the_connection_slots_of_an_unchanged_upstream() {
    let sandbox = sandbox().await;
    let proxy = std::sync::Arc::new(Proxy::start(&config_with(
        &sandbox,
        "workers = 1",
        "max_connections = 3\nqueue_timeout_secs = 30",
    )));
    let call = |path: &'static str| {
        let proxy = std::sync::Arc::clone(&proxy);
        tokio::spawn(async move { get_with_key(&proxy, path).await.status().as_u16() })
    };
    // Both connections the client may hold (all but the reserve) held at the API host.
    let held: Vec<_> = (0..2).map(|_| call("/api/v2/sandbox/gate")).collect();
    let both = wait_for(Duration::from_secs(10), || {
        (sandbox.max_api_in_flight() == 2).then_some(())
    })
    .await;
    assert!(both.is_some());
    for n in 0..3 {
        reload(&proxy, n).await;
    }
    // A call after the reloads waits for one of those two connections.
    let third = call("/api/v2/users/me");
    let waited = wait_for(Duration::from_secs(10), || {
        let text = proxy.output.text();
        (text.contains("every connection to the upstream is busy")
            || sandbox.max_api_in_flight() > 2)
            .then_some(())
    })
    .await;
    assert!(waited.is_some());
    assert_eq!(
        sandbox.max_api_in_flight(),
        2,
        "a reload handed out fresh connection slots"
    );
    sandbox.open_gate();
    for h in held {
        assert_eq!(h.await.unwrap(), 200);
    }
    assert_eq!(third.await.unwrap(), 200);
    assert_eq!(sandbox.max_api_in_flight(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_every_two_seconds_under_a_saturated_budget_brings_no_platform_429() {
    use std::sync::atomic::{AtomicBool, Ordering};
    // 20 calls per 5 s window, known to the proxy; 16 callers want far more.
    let sandbox = Sandbox::start(SandboxOptions {
        per_token_limit: Some(20),
        limit_window: Duration::from_secs(5),
        ..sandbox_options()
    })
    .await
    .unwrap();
    let config = config_with(&sandbox, "", "rate_limit = \"20/5s\"\nmax_connections = 8");
    let proxy = std::sync::Arc::new(Proxy::start(&config));
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let callers: Vec<_> = (0..16)
        .map(|_| {
            let (proxy, stop) = (std::sync::Arc::clone(&proxy), std::sync::Arc::clone(&stop));
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    statuses.push(
                        get_with_key(&proxy, "/api/v2/users/me")
                            .await
                            .status()
                            .as_u16(),
                    );
                }
                statuses
            })
        })
        .collect();
    // The attack's shape: a reload every 2 s, six times.
    let mut every = tokio::time::interval(Duration::from_secs(2));
    every.tick().await;
    for n in 0..6 {
        every.tick().await;
        reload(&proxy, n).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut statuses = Vec::new();
    for c in callers {
        statuses.extend(c.await.unwrap());
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    eprintln!(
        "{} calls, {ok} served; {} reached the API, {} answered 429 by it; at most {} in flight",
        statuses.len(),
        sandbox.api_calls(),
        sandbox.throttled(),
        sandbox.max_api_in_flight()
    );
    assert!(ok > 0);
    assert_eq!(sandbox.throttled(), 0, "the platform answered 429");
    assert!(sandbox.max_api_in_flight() <= 8);
}

const GETTER_KEY: &str = "tg_getter-client-key-0123456789abcdefghijklmn";

/// A GET-only key that attacks, and the usual key beside it, on one worker with four
/// connections to the API host.
fn getter_beside_quiet(sandbox: &Sandbox) -> String {
    format!(
        "{}\n[[client]]\nname = \"getter\"\nkey_sha256 = \"{}\"\nallow = [\"GET /api/**\"]\n",
        config_with(
            sandbox,
            "workers = 1",
            "max_connections = 4\nqueue_timeout_secs = 5"
        ),
        tokengate::front::keys::hash_key(GETTER_KEY),
    )
}

/// Slow uploads on GETs: a 2 MiB body declared, a kilobyte a second sent. The statuses.
async fn slow_get_uploads(addr: String, n: usize) -> Vec<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let uploads = (0..n).map(|_| {
        let addr = addr.clone();
        tokio::spawn(async move {
            let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let head = format!("GET /api/v2/users/me HTTP/1.1\r\nHost: x\r\nX-Api-Key: {GETTER_KEY}\r\nContent-Length: 2097152\r\n\r\n");
            s.write_all(head.as_bytes()).await.unwrap();
            let (mut read, mut write) = s.into_split();
            let trickle = tokio::spawn(async move {
                let mut every = tokio::time::interval(Duration::from_secs(1));
                loop {
                    every.tick().await;
                    if write.write_all(&[b'x'; 1024]).await.is_err() {
                        return;
                    }
                }
            });
            let mut answer = [0u8; 12];
            let status = match tokio::time::timeout(Duration::from_secs(90), read.read_exact(&mut answer)).await {
                Ok(Ok(_)) => String::from_utf8_lossy(&answer[9..12]).parse().unwrap_or(0),
                _ => 0,
            };
            trickle.abort();
            status
        })
    });
    let mut statuses = Vec::new();
    for u in uploads.collect::<Vec<_>>() {
        statuses.push(u.await.unwrap());
    }
    statuses
}

/// HTTP/2 readers that never open their window, on answers larger than it, again and again
/// until `stop`.
async fn zero_window_readers(addr: String, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let (send, driving) = h2c_from([127, 0, 4, 1], &addr, Some(0)).await;
        let mut held = Vec::new();
        for _ in 0..8 {
            let Ok(mut s) = send.clone().ready().await else {
                break;
            };
            let req = http::Request::get(format!("http://{addr}/api/v2/sandbox/bytes?n=200000"))
                .header("x-api-key", GETTER_KEY)
                .body(())
                .unwrap();
            if let Ok((resp, _)) = s.send_request(req, true) {
                held.push(resp);
            }
        }
        // Until the proxy ends the connection.
        let _ = driving.await;
        drop(held);
    }
}

/// HTTP/2 readers that take their answers a window at a time, one window a second.
async fn trickling_readers(addr: String, stop: std::sync::Arc<std::sync::atomic::AtomicBool>) {
    let (send, _driving) = h2c_from([127, 0, 4, 2], &addr, Some(16 * 1024)).await;
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let (send, addr, stop) = (send.clone(), addr.clone(), stop.clone());
            tokio::spawn(async move {
                let Ok(mut s) = send.ready().await else {
                    return;
                };
                let req =
                    http::Request::get(format!("http://{addr}/api/v2/sandbox/bytes?n=4000000"))
                        .header("x-api-key", GETTER_KEY)
                        .body(())
                        .unwrap();
                let Ok((resp, _)) = s.send_request(req, true) else {
                    return;
                };
                let Ok(resp) = resp.await else {
                    return;
                };
                let mut body = resp.into_body();
                let mut every = tokio::time::interval(Duration::from_secs(1));
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    every.tick().await;
                    match body.data().await {
                        Some(Ok(chunk)) => {
                            let _ = body.flow_control().release_capacity(chunk.len());
                        }
                        _ => return,
                    }
                }
            })
        })
        .collect();
    for r in readers {
        let _ = r.await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_get_only_key_cannot_take_the_connections_another_client_needs() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&getter_beside_quiet(&sandbox));
    assert_eq!(get_with_key(&proxy, "/api/v2/users/me").await.status(), 200);
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let uploads = tokio::spawn(slow_get_uploads(proxy.addr.clone(), 8));
    let zero = tokio::spawn(zero_window_readers(proxy.addr.clone(), stop.clone()));
    let trickle = tokio::spawn(trickling_readers(proxy.addr.clone(), stop.clone()));
    // The other client calls five times a second for 25 s (the scenario's pace).
    let mut statuses = Vec::new();
    let mut every = tokio::time::interval(Duration::from_millis(200));
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(25) {
        every.tick().await;
        statuses.push(
            get_with_key(&proxy, "/api/v2/users/me")
                .await
                .status()
                .as_u16(),
        );
    }
    stop.store(true, Ordering::Relaxed);
    let uploads = uploads.await.unwrap();
    zero.abort();
    let _ = trickle.await;
    let served = statuses.iter().filter(|s| **s == 200).count();
    eprintln!(
        "the other client: {served} of {} calls served; the slow GET uploads: {uploads:?}; at most {} in flight at the API",
        statuses.len(),
        sandbox.max_api_in_flight()
    );
    assert_eq!(served, statuses.len(), "{statuses:?}");
    assert!(uploads.iter().all(|s| *s == 413), "{uploads:?}");
    assert!(sandbox.max_api_in_flight() <= 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn separators_and_direction_controls_in_a_path_reach_no_log_raw() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sandbox = sandbox().await;
    for format in ["text", "json"] {
        let config = format!(
            "{}\n[log]\nformat = \"{format}\"\n",
            standard_config(&sandbox, "")
        );
        let proxy = Proxy::start(&config);
        // A forged second line (U+2028, U+0085) and a reversed tail (U+202E), raw in the
        // request target.
        let path = "/api/v2/users/a\u{2028}b\u{85}c\u{202e}d";
        let mut s = tokio::net::TcpStream::connect(&proxy.addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nX-Api-Key: {CLIENT_KEY}\r\nConnection: close\r\n\r\n");
        s.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut answer)).await;
        // Escaped: `\u{2028}` in text, `\\u{2028}` inside a JSON string.
        let logged = wait_for(Duration::from_secs(10), || {
            let text = proxy.output.text();
            (text.contains("users/a\\u{2028}b") || text.contains("users/a\\\\u{2028}b"))
                .then_some(())
        })
        .await;
        let text = proxy.output.text();
        assert!(logged.is_some(), "{format}: no escaped path in\n{text}");
        for raw in ['\u{2028}', '\u{85}', '\u{202e}'] {
            assert!(!text.contains(raw), "{format}: {raw:?} reached the log raw");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn key_guesses_at_the_token_endpoint_are_slowed_per_address() {
    use base64::Engine as _;
    let sandbox = sandbox().await;
    let proxy = Proxy::start(&standard_config(&sandbox, ""));
    let from = |ip: [u8; 4]| {
        reqwest::Client::builder()
            .local_address(std::net::IpAddr::from(ip))
            .build()
            .unwrap()
    };
    let basic = |name: &str, key: &str| {
        let pair = base64::engine::general_purpose::STANDARD.encode(format!("{name}:{key}"));
        format!("Basic {pair}")
    };
    let ask = |client: reqwest::Client, auth: String| {
        let url = proxy.url("/oauth/token");
        async move {
            client
                .post(url)
                .header("authorization", auth)
                .header("content-type", "application/x-www-form-urlencoded")
                .body("grant_type=client_credentials")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    // 300 guesses as fast as one connection goes.
    let guesser = from([127, 0, 5, 1]);
    let started = std::time::Instant::now();
    let mut statuses = Vec::new();
    for i in 0..300 {
        statuses.push(
            ask(
                guesser.clone(),
                basic("reporting-job", &format!("tg_guess-{i}")),
            )
            .await,
        );
    }
    let took = started.elapsed();
    let checked = statuses.iter().filter(|s| **s == 401).count();
    let slowed = statuses.iter().filter(|s| **s == 429).count();
    eprintln!("300 key guesses in {took:?}: {checked} checked (401), {slowed} slowed down (429)");
    assert_eq!(checked + slowed, 300);
    assert!(
        (checked as f64) <= 10.0 + took.as_secs_f64() + 1.0,
        "{checked} keys checked in {took:?}"
    );
    // Another address is served as usual.
    let other = ask(from([127, 0, 5, 2]), basic("reporting-job", CLIENT_KEY)).await;
    assert_eq!(other, 200);
}
