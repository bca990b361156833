//! A fair share of the platform's rate limit (issue 15): the sandbox's API host counts
//! each token's calls in a small window and sends Genesys' `inin-ratelimit-*` headers on
//! every answer (and a 429 past the budget), so tests stay short.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::*;

const NOISY_KEY: &str = "tg_noisy-client-key-0123456789abcdefghijklmnop";

/// A sandbox whose tokens may make `calls` per `window_secs`.
async fn budgeted_sandbox(calls: u64, window_secs: u64) -> Sandbox {
    Sandbox::start(SandboxOptions {
        per_token_limit: Some(calls),
        limit_window: Duration::from_secs(window_secs),
        ..sandbox_options()
    })
    .await
    .unwrap()
}

/// Two clients: `quiet` (the usual key) and `noisy`, with the lines given.
fn two_clients(sandbox: &Sandbox, upstream_extra: &str, quiet: &str, noisy: &str) -> String {
    format!(
        "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{}{upstream_extra}\n{}\n[[client]]\nname = \"noisy\"\nkey_sha256 = \"{}\"\n{noisy}\n",
        upstream_toml(sandbox, "genesys", "/"),
        client_toml("quiet", quiet),
        tokengate::front::keys::hash_key(NOISY_KEY),
    )
}

/// What one client's calls got: statuses, and the longest a call took.
#[derive(Default, Debug)]
struct Tally {
    statuses: HashMap<(u16, String), u64>,
    longest: Duration,
    missing_retry_after: u64,
}

impl Tally {
    fn count(&self, status: u16) -> u64 {
        self.statuses
            .iter()
            .filter(|((s, _), _)| *s == status)
            .map(|(_, n)| n)
            .sum()
    }
}

async fn call_and_tally(proxy: &Proxy, key: &str, tally: &Mutex<Tally>) {
    let started = Instant::now();
    let r = client()
        .get(proxy.url("/api/v2/users/me"))
        .header("Authorization", format!("Bearer {key}"))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let has_retry_after = r.headers().contains_key("retry-after");
    let body = r.text().await.unwrap_or_default();
    let error = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_default();
    let mut t = tally.lock().unwrap();
    if status == 429 && !has_retry_after {
        t.missing_retry_after += 1;
    }
    *t.statuses.entry((status, error)).or_default() += 1;
    t.longest = t.longest.max(started.elapsed());
}

/// `loops` loops of calls with `key` until `stop`.
fn saturate(
    proxy: &Arc<Proxy>,
    key: &'static str,
    loops: usize,
    stop: &Arc<AtomicBool>,
) -> (Arc<Mutex<Tally>>, Vec<tokio::task::JoinHandle<()>>) {
    let tally = Arc::new(Mutex::new(Tally::default()));
    let tasks = (0..loops)
        .map(|_| {
            let (proxy, tally, stop) = (proxy.clone(), tally.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    call_and_tally(&proxy, key, &tally).await;
                }
            })
        })
        .collect();
    (tally, tasks)
}

/// 20 loops of the noisy client's calls beside the quiet client's one call a second (the
/// scenario's shape, not a wait) for `run`: what each got.
async fn quiet_beside_noisy(proxy: &Arc<Proxy>, run: Duration) -> (Tally, Tally) {
    let stop = Arc::new(AtomicBool::new(false));
    let (noisy, loops) = saturate(proxy, NOISY_KEY, 20, &stop);
    let quiet = Mutex::new(Tally::default());
    let mut every_second = tokio::time::interval(Duration::from_secs(1));
    let started = Instant::now();
    while started.elapsed() < run {
        every_second.tick().await;
        call_and_tally(proxy, CLIENT_KEY, &quiet).await;
    }
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    let quiet = std::mem::take(&mut *quiet.lock().unwrap());
    let noisy = std::mem::take(&mut *noisy.lock().unwrap());
    eprintln!("quiet: {quiet:?}\nnoisy: {noisy:?}");
    (quiet, noisy)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_noisy_client_cannot_spend_the_quiet_clients_budget() {
    // 30 calls per 5 s window; three windows and a bit.
    let sandbox = budgeted_sandbox(30, 5).await;
    // The budget configured as well as reported: the proxy holds it from the first call
    // (before its first answer, 20 loops' first calls would go out uncounted).
    let proxy = Arc::new(Proxy::start(&two_clients(
        &sandbox,
        "rate_limit = \"30/5s\"",
        "",
        "",
    )));
    let started = Instant::now();
    let (quiet, noisy) = quiet_beside_noisy(&proxy, Duration::from_secs(18)).await;
    let quiet_calls: u64 = quiet.statuses.values().sum();
    assert_eq!(
        quiet.count(200),
        quiet_calls,
        "every quiet call succeeds: {quiet:?}"
    );
    assert!(quiet_calls >= 15);
    assert_eq!(sandbox.throttled(), 0, "the platform answered no 429");
    // The noisy client was held back: it waited, or the proxy refused it itself.
    let refused = noisy
        .statuses
        .get(&(429, "rate_limited".to_string()))
        .copied()
        .unwrap_or(0);
    assert!(
        refused > 0 || noisy.longest > Duration::from_secs(2),
        "{noisy:?}"
    );
    assert_eq!(noisy.missing_retry_after, 0);
    assert_eq!(noisy.count(429), refused, "every 429 is the proxy's");
    // Within the budget: at most 30 calls per window reached the platform.
    let windows = started.elapsed().as_secs() / 5 + 2;
    assert!(
        sandbox.api_calls() <= windows * 30,
        "{} calls",
        sandbox.api_calls()
    );
    let metrics = admin_text(&proxy, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "tokengate_rate_limited_total",
            &["by=\"platform\""]
        ),
        0.0
    );
    assert_eq!(
        metric(
            &metrics,
            "tokengate_rate_limited_total",
            &["client=\"noisy\"", "by=\"proxy\""]
        ),
        refused as f64
    );
    assert!(
        metrics.contains("tokengate_rate_budget_remaining{upstream=\"genesys\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("tokengate_rate_wait_seconds_count{upstream=\"genesys\"}"));
}

#[tokio::test(flavor = "multi_thread")]
async fn shares_three_and_one_are_served_three_to_one() {
    // 40 calls a 4 s window, 30 loops each: more want in than fit, so shares decide.
    let sandbox = budgeted_sandbox(40, 4).await;
    let config = two_clients(
        &sandbox,
        "rate_limit = \"40/4s\"\nrate_limit_max_wait_secs = 60",
        "share = 3",
        "share = 1",
    );
    let proxy = Arc::new(Proxy::start(&config));
    let stop = Arc::new(AtomicBool::new(false));
    let (three, a) = saturate(&proxy, CLIENT_KEY, 30, &stop);
    let (one, b) = saturate(&proxy, NOISY_KEY, 30, &stop);
    let served = || {
        (
            three.lock().unwrap().count(200),
            one.lock().unwrap().count(200),
        )
    };
    // The first window goes first come, first served (nobody waited yet); then three
    // windows in which both saturate.
    let first = wait_for(Duration::from_secs(20), || {
        let (n3, n1) = served();
        (n3 + n1 >= 40).then_some((n3, n1))
    })
    .await
    .expect("a first window of calls");
    let last = wait_for(Duration::from_secs(40), || {
        let (n3, n1) = served();
        (n3 + n1 >= first.0 + first.1 + 120).then_some((n3, n1))
    })
    .await
    .expect("three more windows of calls");
    stop.store(true, Ordering::Relaxed);
    for t in a.into_iter().chain(b) {
        t.abort();
    }
    let (n3, n1) = (last.0 - first.0, last.1 - first.1);
    let ratio = n3 as f64 / n1 as f64;
    eprintln!("three windows: share 3 got {n3} calls, share 1 got {n1}: {ratio:.2}:1");
    assert!((2.55..=3.45).contains(&ratio), "{n3}:{n1}");
    assert_eq!(sandbox.throttled(), 0, "the platform answered no 429");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_past_max_per_minute_is_refused_by_the_proxy() {
    let sandbox = sandbox().await;
    let config = two_clients(&sandbox, "", "max_per_minute = 5", "");
    let proxy = Proxy::start(&config);
    let tally = Mutex::new(Tally::default());
    for _ in 0..8 {
        call_and_tally(&proxy, CLIENT_KEY, &tally).await;
    }
    let t = std::mem::take(&mut *tally.lock().unwrap());
    assert_eq!(t.count(200), 5);
    assert_eq!(t.statuses.get(&(429, "rate_limited".into())), Some(&3));
    // Nothing of the refused calls reached the API host: the five, and the proxy's own
    // question for the org's idle timeout.
    assert_eq!(sandbox.api_calls() - sandbox.idle_questions(), 5);
    // Another client is not held to it.
    assert_eq!(
        client()
            .get(proxy.url("/api/v2/users/me"))
            .header("Authorization", format!("Bearer {NOISY_KEY}"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs chromium: scripts/test.sh installs it and runs these"]
async fn the_status_page_draws_calls_per_client_against_the_budget() {
    let sandbox = budgeted_sandbox(25, 5).await;
    let proxy = Arc::new(Proxy::start(&two_clients(&sandbox, "", "share = 2", "")));
    let stop = Arc::new(AtomicBool::new(false));
    let (_noisy, loops) = saturate(&proxy, NOISY_KEY, 4, &stop);
    let (_quiet, quiet_loops) = saturate(&proxy, CLIENT_KEY, 1, &stop);
    wait_for(Duration::from_secs(20), || {
        (sandbox.api_calls() >= 40).then_some(())
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    for l in loops.into_iter().chain(quiet_loops) {
        l.abort();
    }
    let profile = tempfile::tempdir().unwrap();
    let url = proxy.admin_url("/");
    let dom = {
        let (profile, url) = (profile.path().to_path_buf(), url.clone());
        tokio::task::spawn_blocking(move || {
            crate::status_page::headless(
                &profile,
                &["--virtual-time-budget=1000", "--dump-dom", &url],
            )
        })
        .await
        .unwrap()
    };
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    let chart = &dom[dom
        .find("id=\"chart-genesys\"")
        .expect("a chart for the upstream")..];
    let chart = &chart[..chart.find("</figure>").unwrap()];
    assert!(chart.contains("<svg"), "{chart}");
    assert!(
        chart.contains("class=\"budget\""),
        "the budget line: {chart}"
    );
    for client in ["quiet", "noisy"] {
        assert!(
            chart.contains(&format!("<title>{client}: ")),
            "{client}'s calls: {chart}"
        );
    }
    assert!(chart.contains("of 25 calls left"), "{chart}");
    let quiet_row = &dom[dom.find("id=\"client-quiet\"").unwrap()..];
    assert!(
        quiet_row.contains("<td class=\"share\">2</td>"),
        "{quiet_row}"
    );
    for s in [CLIENT_KEY, NOISY_KEY, CLIENT_SECRET] {
        assert!(!dom.contains(s));
    }
    for t in sandbox.issued_tokens() {
        assert!(!dom.contains(&t));
    }
    crate::status_page::screenshot(profile.path(), &url, "status-rate-chart.png", "1440,900").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn check_prints_the_budget_as_the_platform_reports_it() {
    let sandbox = budgeted_sandbox(300, 60).await;
    let config = format!(
        "{}{}",
        upstream_toml(&sandbox, "genesys", "/"),
        client_toml("quiet", "")
    );
    let (out, _) = tokio::task::spawn_blocking(move || {
        let (dir, path) = write_config(&config);
        let run = |json: bool| {
            let mut cmd = binary();
            cmd.arg("check")
                .arg("-c")
                .arg(&path)
                .env("SANDBOX_SECRET", CLIENT_SECRET);
            if json {
                cmd.arg("--json");
            }
            String::from_utf8_lossy(&cmd.output().unwrap().stdout).into_owned()
        };
        let out = (run(true), run(false));
        drop(dir);
        out
    })
    .await
    .map(|(json, text)| {
        assert!(text.contains("rate budget 300 calls per window"), "{text}");
        (json, text)
    })
    .unwrap();
    let d: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(d["ok"], true, "{d}");
    let b = &d["rate_budget"];
    assert_eq!(
        (b["source"].as_str(), b["allowed"].as_u64()),
        (Some("platform"), Some(300)),
        "{d}"
    );
    assert_eq!(b["used"], 1);
    assert!(
        (59..=60).contains(&b["window_secs"].as_u64().unwrap()),
        "{d}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs redis-server: scripts/test.sh installs it and runs these"]
async fn three_replicas_share_one_budget_through_redis_leases_and_survive_its_loss() {
    use crate::support::redis_server::RedisServer;
    // 600 calls per 10 s window on the one token the fleet shares.
    let sandbox = budgeted_sandbox(600, 10).await;
    let mut redis = RedisServer::start();
    let config = format!(
        "{}\n[cache]\nredis_url = \"{}\"\nencryption_key = \"q1w2e3r4t5y6u7i8o9p0a1s2d3f4g5h6j7k8l9z0x1c=\"\ntimeout_ms = 300\n",
        config_with(&sandbox, "", "rate_limit_max_wait_secs = 30"),
        redis.url()
    );
    let fleet: Vec<Arc<Proxy>> = (0..3).map(|_| Arc::new(Proxy::start(&config))).collect();
    // Each replica takes the fleet's token (one grant) and learns the budget.
    for p in &fleet {
        assert_eq!(get_with_key(p, "/api/v2/users/me").await.status(), 200);
    }
    redis.reset_stats();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tallies = Vec::new();
    let mut loops = Vec::new();
    for p in &fleet {
        let (tally, tasks) = saturate(p, CLIENT_KEY, 3, &stop);
        tallies.push(tally);
        loops.extend(tasks);
    }
    let served = |tallies: &[Arc<Mutex<Tally>>]| -> u64 {
        tallies.iter().map(|t| t.lock().unwrap().count(200)).sum()
    };
    wait_for(Duration::from_secs(60), || {
        (served(&tallies) >= 1000).then_some(())
    })
    .await
    .expect("a thousand calls");
    let calls = served(&tallies);
    let counts = redis.command_counts();
    let commands: u64 = counts
        .iter()
        .filter(|(name, _)| name != "info" && name != "config|resetstat" && name != "config")
        .map(|(_, n)| n)
        .sum();
    eprintln!("{calls} calls through three replicas: {commands} Redis commands ({counts:?})");
    assert!(
        commands * 1000 <= 100 * calls,
        "{commands} commands for {calls} calls: {counts:?}"
    );
    assert_eq!(sandbox.throttled(), 0, "the platform answered no 429");

    // Redis goes away: each replica goes on with its part of the budget.
    redis.kill();
    let at_kill = served(&tallies);
    wait_for(Duration::from_secs(60), || {
        (served(&tallies) >= at_kill + 500).then_some(())
    })
    .await
    .expect("five hundred calls without Redis");
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        l.await.unwrap();
    }
    for (i, t) in tallies.iter().enumerate() {
        let t = t.lock().unwrap();
        let all: u64 = t.statuses.values().sum();
        assert_eq!(
            t.count(200),
            all,
            "replica {i}: every call succeeded: {t:?}"
        );
    }
    assert_eq!(
        sandbox.throttled(),
        0,
        "the platform answered no 429 without Redis either"
    );
    assert_eq!(sandbox.grants(), 1);
}

/// The budget only in the platform's headers, as Genesys sends it (no `rate_limit`): the
/// governor holds calls to Genesys' documented budget until the first answer, then to the
/// platform's figures (issue 22).
#[tokio::test(flavor = "multi_thread")]
async fn a_budget_known_only_from_headers_is_fair_from_the_first_call() {
    let sandbox = budgeted_sandbox(60, 10).await;
    let proxy = Arc::new(Proxy::start(&two_clients(&sandbox, "", "", "")));
    let (quiet, noisy) = quiet_beside_noisy(&proxy, Duration::from_secs(30)).await;
    let quiet_calls: u64 = quiet.statuses.values().sum();
    assert!(quiet_calls >= 29, "{quiet:?}");
    assert_eq!(
        quiet.count(200),
        quiet_calls,
        "every quiet call succeeds: {quiet:?}"
    );
    assert_eq!(sandbox.throttled(), 0, "the platform answered no 429");
    assert_eq!(noisy.missing_retry_after, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn header_only_shares_three_and_one_are_served_three_to_one_from_the_first_second() {
    let sandbox = budgeted_sandbox(60, 10).await;
    let config = two_clients(
        &sandbox,
        "rate_limit_max_wait_secs = 60",
        "share = 3",
        "share = 1",
    );
    let proxy = Arc::new(Proxy::start(&config));
    let stop = Arc::new(AtomicBool::new(false));
    let (three, a) = saturate(&proxy, CLIENT_KEY, 30, &stop);
    let (one, b) = saturate(&proxy, NOISY_KEY, 30, &stop);
    let served = || {
        (
            three.lock().unwrap().count(200),
            one.lock().unwrap().count(200),
        )
    };
    // Counted from the first second: three windows' calls.
    let first = wait_for(Duration::from_secs(5), || Some(served()))
        .await
        .unwrap();
    let last = wait_for(Duration::from_secs(60), || {
        let (n3, n1) = served();
        (n3 + n1 >= first.0 + first.1 + 180).then_some((n3, n1))
    })
    .await
    .expect("three windows of calls");
    stop.store(true, Ordering::Relaxed);
    for t in a.into_iter().chain(b) {
        t.abort();
    }
    let (n3, n1) = (last.0 - first.0, last.1 - first.1);
    let ratio = n3 as f64 / n1 as f64;
    eprintln!("from the first moment: share 3 got {n3} calls, share 1 got {n1}: {ratio:.2}:1 (before it: {first:?})");
    assert!((2.55..=3.45).contains(&ratio), "{n3}:{n1}");
    assert_eq!(sandbox.throttled(), 0, "the platform answered no 429");
}

/// A budget learned from the first answer must hold the calls let through before it that
/// are still on their way: with `max_connections = 4`, 40 callers' first calls are let
/// through (the documented 300 a minute allowed them) and 36 wait for a connection when
/// the first answer says 60 per 10 s. Counting only the calls holding a connection, the
/// governor believed 56 more were free and the platform answered 429s.
#[tokio::test(flavor = "multi_thread")]
async fn calls_waiting_for_a_connection_when_the_budget_is_learned_count_against_it() {
    let sandbox = budgeted_sandbox(60, 10).await;
    let config = two_clients(
        &sandbox,
        "max_connections = 4\nrate_limit_max_wait_secs = 60",
        "",
        "",
    );
    let proxy = Arc::new(Proxy::start(&config));
    let stop = Arc::new(AtomicBool::new(false));
    let (quiet, a) = saturate(&proxy, CLIENT_KEY, 20, &stop);
    let (noisy, b) = saturate(&proxy, NOISY_KEY, 20, &stop);
    let served = || quiet.lock().unwrap().count(200) + noisy.lock().unwrap().count(200);
    // Two windows' worth: the first window's calls and the next one's.
    wait_for(Duration::from_secs(40), || (served() >= 100).then_some(()))
        .await
        .expect("two windows of calls");
    stop.store(true, Ordering::Relaxed);
    for t in a.into_iter().chain(b) {
        t.abort();
    }
    assert_eq!(
        sandbox.throttled(),
        0,
        "the platform answered no 429: {:?} {:?}",
        quiet.lock().unwrap(),
        noisy.lock().unwrap()
    );
}
