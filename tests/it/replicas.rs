//! Several replicas sharing one Redis: one grant for the fleet, tokens encrypted at rest,
//! Redis outages survived, Redis left alone while tokens are good.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::redis_server::RedisServer;
use crate::support::*;

/// The fleet's encryption key, as an operator would pass it: base64 in the environment.
const CACHE_KEY_B64: &str = "q1w2e3r4t5y6u7i8o9p0a1s2d3f4g5h6j7k8l9z0x1c=";

fn fleet_config(sandbox: &Sandbox, redis: &RedisServer, upstream_extra: &str) -> String {
    format!(
        "{}\n[cache]\nredis_url = \"{}\"\nencryption_key = \"${{TOKENGATE_CACHE_KEY}}\"\ntimeout_ms = 300\n",
        config_with(sandbox, "", upstream_extra),
        redis.url()
    )
}

fn start_fleet(config: &str, n: usize) -> Vec<Proxy> {
    (0..n)
        .map(|_| {
            Proxy::start_with_env(
                config,
                &[
                    ("SANDBOX_SECRET", CLIENT_SECRET),
                    ("TOKENGATE_CACHE_KEY", CACHE_KEY_B64),
                ],
            )
        })
        .collect()
}

/// `n` calls at once, spread round-robin over the replicas; the statuses.
async fn spread_calls(fleet: &[Proxy], n: usize) -> Vec<u16> {
    let calls = (0..n).map(|i| {
        let proxy = &fleet[i % fleet.len()];
        async move {
            get_with_key(proxy, "/api/v2/users/me")
                .await
                .status()
                .as_u16()
        }
    });
    futures_util::future::join_all(calls).await
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs redis-server: scripts/test.sh installs it and runs these"]
async fn three_replicas_sharing_one_redis_serve_three_hundred_calls_with_one_grant() {
    let sandbox = sandbox().await;
    let redis = RedisServer::start();
    let fleet = start_fleet(&fleet_config(&sandbox, &redis, ""), 3);

    let statuses = spread_calls(&fleet, 300).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(sandbox.grants(), 1, "one grant for the whole fleet");
    for proxy in &fleet {
        let metrics = admin_text(proxy, "/metrics").await;
        let served = metric(&metrics, "tokengate_requests_total", &["status=\"200\""]);
        assert_eq!(served, 100.0, "each replica served its share");
    }

    // The status document and the metrics show the shared cache; two replicas took the
    // token the third stored.
    let mut taken = 0;
    let mut stored = 0;
    for proxy in &fleet {
        let doc: serde_json::Value =
            serde_json::from_str(&admin_text(proxy, "/status.json").await).unwrap();
        let cache = &doc["shared_cache"];
        assert_eq!(cache["state"], "ok", "{doc}");
        assert_eq!(cache["redis"], format!("127.0.0.1:{}", redis.port));
        taken += cache["tokens_taken"].as_u64().unwrap();
        stored += cache["tokens_stored"].as_u64().unwrap();
        let metrics = admin_text(proxy, "/metrics").await;
        assert_eq!(metric(&metrics, "tokengate_shared_cache_up", &[]), 1.0);
        let page = admin_text(proxy, "/").await;
        assert!(page.contains("id=\"shared-cache\""), "{page}");
        assert!(!page.contains(&redis.password) && !doc.to_string().contains(&redis.password));
    }
    assert_eq!(
        (taken, stored),
        (2, 1),
        "one replica minted and stored, two took"
    );

    // What Redis holds opens with the fleet's key only: no token, secret or id in clear.
    let stored = redis.dump();
    assert!(
        stored
            .iter()
            .any(|(k, _)| k.starts_with("tokengate:token:")),
        "the token is shared through Redis: {:?}",
        stored.iter().map(|(k, _)| k).collect::<Vec<_>>()
    );
    let tokens = sandbox.issued_tokens();
    assert_eq!(tokens.len(), 1);
    for (key, value) in &stored {
        let text = String::from_utf8_lossy(value);
        for token in &tokens {
            assert!(!text.contains(token.as_str()), "token in clear under {key}");
            assert!(!text.contains(&token[..12]), "token prefix under {key}");
        }
        for secret in [CLIENT_SECRET, sandbox.options().client_id.as_str()] {
            assert!(!text.contains(secret) && !key.contains(secret), "{key}");
        }
    }
    // Nor do the logs carry the Redis password or the encryption key.
    for proxy in &fleet {
        let log = proxy.output.text();
        assert!(log.contains("replicas share tokens through Redis"), "{log}");
        assert!(!log.contains(&redis.password), "Redis password in a log");
        assert!(!log.contains(CACHE_KEY_B64), "encryption key in a log");
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs redis-server: scripts/test.sh installs it and runs these"]
async fn a_thousand_calls_on_a_shared_token_cost_a_handful_of_redis_commands() {
    let sandbox = sandbox().await;
    let redis = RedisServer::start();
    let fleet = start_fleet(&fleet_config(&sandbox, &redis, ""), 3);
    // Every replica has its copy of the fleet's token...
    assert!(spread_calls(&fleet, 3).await.iter().all(|s| *s == 200));
    redis.reset_stats();
    // ...so a thousand calls are served without asking Redis.
    for chunk in 0..10 {
        let statuses = spread_calls(&fleet, 100).await;
        assert!(
            statuses.iter().all(|s| *s == 200),
            "chunk {chunk}: {statuses:?}"
        );
    }
    let counts = redis.command_counts();
    let total: u64 = counts
        .iter()
        .filter(|(name, _)| name != "info" && name != "config")
        .map(|(_, calls)| calls)
        .sum();
    eprintln!("Redis commands over 1000 calls: {total} ({counts:?})");
    assert!(total <= 5, "a handful, not one per call: {counts:?}");
    assert_eq!(sandbox.grants(), 1);
}

/// Calls keep flowing from several tasks while `disturb` runs; returns (ok, failed).
async fn under_load<F: std::future::Future<Output = ()>>(
    fleet: &[Proxy],
    disturb: F,
) -> (u64, Vec<String>) {
    let ok = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let urls: Vec<String> = fleet.iter().map(|p| p.url("/api/v2/users/me")).collect();
    let workers: Vec<_> = (0..6)
        .map(|w| {
            let (ok, failures, stop, urls) =
                (ok.clone(), failures.clone(), stop.clone(), urls.clone());
            tokio::spawn(async move {
                let client = client();
                let mut i = w;
                while !stop.load(Ordering::Relaxed) {
                    let r = client
                        .get(&urls[i % urls.len()])
                        .header("Authorization", format!("Bearer {CLIENT_KEY}"))
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(r) => {
                            let status = r.status();
                            let body = r.text().await.unwrap_or_default();
                            failures.lock().unwrap().push(format!("{status} {body}"));
                        }
                        Err(e) => failures.lock().unwrap().push(e.to_string()),
                    }
                    i += 1;
                }
            })
        })
        .collect();
    disturb.await;
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
    let failures = failures.lock().unwrap().clone();
    (ok.load(Ordering::Relaxed), failures)
}

/// Waits (bounded) until the sandbox has made `n` more grants than `from`.
async fn grants_reach(sandbox: &Sandbox, n: u64) {
    let reached = wait_for(Duration::from_secs(60), || {
        (sandbox.grants() >= n).then_some(())
    })
    .await;
    assert!(reached.is_some(), "grants stayed at {}", sandbox.grants());
}

async fn redis_outage_mid_load_fails_no_call(stop_signal: Option<&str>) {
    // Two-second tokens: replicas renew them while Redis is away, and after it returns.
    let sandbox = Sandbox::start(SandboxOptions {
        token_lifetime: Duration::from_secs(2),
        ..sandbox_options()
    })
    .await
    .unwrap();
    let mut redis = RedisServer::start();
    let fleet = start_fleet(&fleet_config(&sandbox, &redis, ""), 3);
    let (ok, failures) = under_load(&fleet, async {
        grants_reach(&sandbox, 2).await; // shared tokens flowing, one renewal done
        let before = sandbox.grants();
        match stop_signal {
            None => redis.kill(),
            Some(sig) => {
                let pid = redis.pid().unwrap().to_string();
                assert!(std::process::Command::new("kill")
                    .args([sig, &pid])
                    .status()
                    .unwrap()
                    .success());
            }
        }
        // Each replica now renews on its own: several lifetimes pass without Redis, and
        // each one's metrics say so.
        grants_reach(&sandbox, before + 6).await;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut down = 0;
            for p in &fleet {
                let metrics = admin_text(p, "/metrics").await;
                if metric(&metrics, "tokengate_shared_cache_up", &[]) == 0.0 {
                    down += 1;
                }
            }
            if down == fleet.len() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the gauge did not drop"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match stop_signal {
            None => assert!(redis.spawn(), "redis restarts on its port"),
            Some(_) => {
                let pid = redis.pid().unwrap().to_string();
                assert!(std::process::Command::new("kill")
                    .args(["-CONT", &pid])
                    .status()
                    .unwrap()
                    .success());
            }
        }
        // Every replica rejoins the fleet by itself.
        let rejoined = wait_for(Duration::from_secs(60), || {
            fleet
                .iter()
                .all(|p| {
                    p.output
                        .text()
                        .contains("shared token cache reachable again")
                })
                .then_some(())
        })
        .await;
        assert!(rejoined.is_some(), "replicas did not rejoin");
    })
    .await;
    assert!(
        failures.is_empty(),
        "{} failed calls: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 100, "load ran: {ok} calls");
    for p in &fleet {
        let log = p.output.text();
        assert_eq!(
            log.matches("shared token cache unavailable").count(),
            1,
            "the outage is logged once per replica"
        );
    }
    // After the return, tokens are shared through Redis again.
    let shared = wait_for(Duration::from_secs(30), || {
        redis
            .dump()
            .iter()
            .any(|(k, _)| k.starts_with("tokengate:token:"))
            .then_some(())
    })
    .await;
    assert!(shared.is_some(), "no token stored after Redis returned");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs redis-server: scripts/test.sh installs it and runs these"]
async fn redis_killed_mid_load_fails_no_call_and_the_fleet_rejoins() {
    redis_outage_mid_load_fails_no_call(None).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs redis-server: scripts/test.sh installs it and runs these"]
async fn redis_frozen_mid_load_fails_no_call_and_the_fleet_rejoins() {
    redis_outage_mid_load_fails_no_call(Some("-STOP")).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs redis-server: scripts/test.sh installs it and runs these"]
async fn a_token_rejected_by_the_api_is_replaced_once_for_the_whole_fleet() {
    let sandbox = sandbox().await;
    let redis = RedisServer::start();
    let fleet = start_fleet(&fleet_config(&sandbox, &redis, ""), 3);
    assert!(spread_calls(&fleet, 3).await.iter().all(|s| *s == 200));
    assert_eq!(sandbox.grants(), 1);
    // The API host answers 401 to the token everywhere, until 30 calls have met it.
    sandbox.revoke_all_and_hold_401s(30);
    let statuses = spread_calls(&fleet, 30).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(sandbox.grants(), 2, "one replacement for the fleet");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs redis-server: scripts/test.sh installs it and runs these"]
async fn a_token_pool_is_shared_by_the_fleet_and_minted_one_at_a_time() {
    let sandbox = sandbox().await;
    let redis = RedisServer::start();
    let fleet = start_fleet(&fleet_config(&sandbox, &redis, "tokens = 3\n"), 2);
    let statuses = spread_calls(&fleet, 120).await;
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(sandbox.grants(), 3, "one pool of three for both replicas");
    assert_eq!(
        sandbox.max_grants_in_flight(),
        1,
        "never two grants at once"
    );
}

#[test]
fn the_replicas_page_example_is_a_valid_config() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/replicas.md")).unwrap();
    let section = &readme[readme
        .find("# Running several replicas")
        .expect("the section")..];
    let start = section.find("```toml\n").expect("a toml block") + "```toml\n".len();
    let text = &section[start..start + section[start..].find("```").unwrap()];
    let text = text.replace(
        "<tokengate key hash of the team's key>",
        &tokengate::front::keys::hash_key(CLIENT_KEY),
    );
    let env = |name: &str| match name {
        "LISTEN" => Some("127.0.0.1:8081".to_string()),
        "ADMIN_LISTEN" => Some("127.0.0.1:9901".to_string()),
        "TOKENGATE_CACHE_KEY" => Some(CACHE_KEY_B64.to_string()),
        other => Some(format!("value-of-{other}")),
    };
    let config =
        tokengate::config::Config::from_toml(&text, "replicas.toml".as_ref(), &env).unwrap();
    let cache = config.cache.expect("[cache]");
    assert_eq!(cache.redis_target, "127.0.0.1:6379");
    assert_eq!(config.upstreams[0].tokens, 2);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs redis-server: scripts/test.sh installs it and runs these"]
async fn check_says_whether_the_fleet_can_share_tokens() {
    let sandbox = sandbox().await;
    let mut redis = RedisServer::start();
    let config = fleet_config(&sandbox, &redis, "");
    let proxy = start_fleet(&config, 1).pop().unwrap();
    assert_eq!(get_with_key(&proxy, "/api/v2/users/me").await.status(), 200);
    let (_dir, path) = write_config(&config);
    let password = redis.password.clone();
    let check = |cache_key: &str| {
        let out = binary()
            .args(["check", "-c"])
            .arg(&path)
            .env("SANDBOX_SECRET", CLIENT_SECRET)
            .env("TOKENGATE_CACHE_KEY", cache_key)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(!text.contains(&password), "{text}");
        (out.status.code(), text)
    };
    let (code, text) = check(CACHE_KEY_B64);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("ok    shared cache 127.0.0.1:"), "{text}");
    assert!(text.contains("1 shared token(s), all open"), "{text}");
    // Another replica with another key would not be able to use the fleet's tokens.
    let other_key = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
    let (code, text) = check(other_key);
    assert_eq!(code, Some(0), "the grant itself is fine: {text}");
    assert!(
        text.contains("do not open with this cache.encryption_key"),
        "{text}"
    );
    redis.kill();
    let (_, text) = check(CACHE_KEY_B64);
    assert!(
        text.contains("FAIL  shared cache") && text.contains("unreachable"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs redis-server: scripts/test.sh installs it and runs these"]
async fn a_fleet_lock_held_by_someone_else_delays_a_grant_by_seconds_not_its_lease() {
    let sandbox = sandbox().await;
    let redis = RedisServer::start();
    let config = fleet_config(&sandbox, &redis, "");
    let first = start_fleet(&config, 1);
    assert_eq!(spread_calls(&first, 1).await, [200]);
    // Someone who can write to Redis takes the fleet's lock for a minute and removes the
    // stored token: a new replica finds nothing and the lock held.
    let mut conn = redis.connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*:token:*")
        .query(&mut conn)
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let creds = keys[0].split(':').nth(2).unwrap().to_string();
    let prefix = keys[0].split(':').next().unwrap().to_string();
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}:lock:{creds}"))
        .arg("someone-else")
        .arg("PX")
        .arg(60_000)
        .query(&mut conn)
        .unwrap();
    let _: () = redis::cmd("DEL").arg(&keys[0]).query(&mut conn).unwrap();
    let second = start_fleet(&config, 1);
    let started = std::time::Instant::now();
    assert_eq!(spread_calls(&second, 1).await, [200]);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "waited {took:?} for a lock with a 20 s lease"
    );
    assert_eq!(sandbox.grants(), 2);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs redis-server: scripts/test.sh installs it and runs these"]
async fn an_older_token_written_back_into_redis_is_not_taken() {
    let sandbox = sandbox().await;
    let redis = RedisServer::start();
    let fleet = start_fleet(&fleet_config(&sandbox, &redis, ""), 2);
    let (a, b) = (&fleet[0], &fleet[1]);
    let stored_token = || {
        redis
            .dump()
            .into_iter()
            .find(|(k, _)| k.contains(":token:"))
            .expect("a stored token")
    };
    // A mints the first token; its sealed value is copied, as someone who can write to
    // Redis (but has not the encryption key) could.
    assert_eq!(get_with_key(a, "/api/v2/users/me").await.status(), 200);
    let (key, first) = stored_token();
    // It is revoked: B takes it from Redis, meets the 401, and mints the second; A meets
    // its own 401 and takes the second from Redis.
    sandbox.revoke_all();
    assert_eq!(get_with_key(b, "/api/v2/users/me").await.status(), 200);
    assert_eq!(get_with_key(a, "/api/v2/users/me").await.status(), 200);
    assert_eq!(sandbox.grants(), 2);
    assert_ne!(stored_token().1, first);
    // The first token's sealed value is written back. When the second is revoked, A must
    // mint a third rather than take the first back (revoked too: the call would fail).
    let mut c = redis.connection().unwrap();
    redis::cmd("SET")
        .arg(&key)
        .arg(&first)
        .arg("PX")
        .arg(600_000)
        .query::<()>(&mut c)
        .unwrap();
    sandbox.revoke_all();
    let r = get_with_key(a, "/api/v2/users/me").await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    assert_eq!(sandbox.grants(), 3);
    let output = a.output.clone();
    wait_for(Duration::from_secs(5), || {
        output
            .text()
            .contains("older than one this replica already had")
            .then_some(())
    })
    .await
    .expect("the refusal is logged");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs redis-server: scripts/test.sh installs it and runs these"]
async fn a_notification_channel_made_on_one_replica_opens_on_another() {
    use crate::websockets::{next_text, open_url, refused_with};
    let sandbox = sandbox_with_heartbeat(Duration::from_millis(200)).await;
    let redis = RedisServer::start();
    let streaming = format!("streaming_url = \"{}\"\n", sandbox.streaming_url());
    // A second upstream, with no notification channels, at /plain.
    let plain = format!(
        "\n[[upstream]]\nname = \"plain\"\nprovider = \"oauth2\"\nprefix = \"/plain\"\ntoken_url = \"{}\"\nbase_url = \"{}\"\nclient_id = \"{}\"\nclient_secret = \"${{SANDBOX_SECRET}}\"\n",
        sandbox.token_url(),
        sandbox.api_url(),
        sandbox.options().client_id
    );
    let config = fleet_config(&sandbox, &redis, &streaming).replacen(
        "\n[[client]]",
        &format!("{plain}\n[[client]]"),
        1,
    );
    let fleet = start_fleet(&config, 2);
    let (a, b) = (&fleet[0], &fleet[1]);
    let channel: serde_json::Value = client()
        .post(a.url("/api/v2/notifications/channels"))
        .header("X-Api-Key", CLIENT_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = channel["id"].as_str().unwrap();
    // The app's socket lands on replica B, bare, as the platform's docs have it.
    let on_b = format!("ws://{}/channels/{id}", b.addr);
    let mut ws = open_url(&on_b, None).await.unwrap();
    let heartbeat: serde_json::Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
    assert_eq!(heartbeat["eventBody"]["message"], "WebSocket Heartbeat");
    assert_eq!(sandbox.streaming_seen(), [format!("/channels/{id}")]);
    // Redis holds no channel id in the clear, and B still refuses ids nobody handed out.
    assert!(redis
        .dump()
        .iter()
        .all(|(k, v)| !k.contains(id) && !String::from_utf8_lossy(v).contains(id)));
    let unknown = format!("ws://{}/channels/streaming-0-elsewhere", b.addr);
    assert_eq!(
        refused_with(open_url(&unknown, None).await.unwrap_err()),
        404
    );
    assert_eq!(sandbox.streaming_seen().len(), 1);
    // A bare socket to an upstream without notification channels is no route: it never
    // reaches that API host with the team's token.
    let api_calls = sandbox.api_calls();
    let elsewhere = format!("ws://{}/plain/channels/streaming-0-x", b.addr);
    assert_eq!(
        refused_with(open_url(&elsewhere, None).await.unwrap_err()),
        404
    );
    assert_eq!(sandbox.api_calls(), api_calls);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs redis-server: scripts/test.sh installs it and runs these"]
async fn a_sentinel_failover_moves_the_fleet_to_the_new_master_without_a_restart() {
    use crate::support::redis_server::{Sentinel, MASTER_NAME};
    // A budget, so the fleet also shares leases of it through Redis.
    let sandbox = Sandbox::start(SandboxOptions {
        per_token_limit: Some(600),
        limit_window: Duration::from_secs(10),
        ..sandbox_options()
    })
    .await
    .unwrap();
    let mut master = RedisServer::start();
    let replica = RedisServer::replica_of(&master);
    let mut sentinel = Sentinel::watching(&master);
    let config = format!(
        "{}\n[cache]\nsentinels = [\"{}\"]\nmaster_name = \"{MASTER_NAME}\"\nencryption_key = \"${{TOKENGATE_CACHE_KEY}}\"\ntimeout_ms = 300\n",
        config_with(&sandbox, "", "rate_limit_max_wait_secs = 30"),
        sentinel.url()
    );
    let fleet = start_fleet(&config, 2);
    let (ok, failures) = under_load(&fleet, async {
        // The fleet's token and budget are in the master, and copied to the replica.
        let stored = wait_for(Duration::from_secs(30), || {
            let keys = replica.dump();
            (keys.iter().any(|(k, _)| k.starts_with("tokengate:token:"))
                && keys.iter().any(|(k, _)| k.starts_with("tokengate:calls:")))
            .then_some(())
        })
        .await;
        assert!(stored.is_some(), "token and budget reached the replica");
        // Into a second window, so each replica has seen the whole fleet reserve budget
        // (in its first window a replica that leased first knows only itself).
        let reserved_now = || replica.calls_counted();
        let mut most = 0;
        let next_window = wait_for(Duration::from_secs(30), || {
            let now = reserved_now()?;
            most = most.max(now);
            (now < most).then_some(())
        })
        .await;
        assert!(next_window.is_some(), "no second budget window");
        master.kill();
        let promoted = wait_for(Duration::from_secs(60), || {
            (sentinel.master_port() == Some(replica.port)).then_some(())
        })
        .await;
        assert!(promoted.is_some(), "the sentinel promoted the replica");
        // The fleet finds the new master by itself and reserves its budget there.
        replica.reset_stats();
        let moved = wait_for(Duration::from_secs(60), || {
            replica
                .command_counts()
                .iter()
                .any(|(name, n)| name == "incrby" && *n > 0)
                .then_some(())
        })
        .await;
        assert!(moved.is_some(), "no lease reached the new master");
    })
    .await;
    assert!(
        failures.is_empty(),
        "{} failed calls: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 100, "load ran: {ok} calls");
    assert_eq!(
        sandbox.grants(),
        1,
        "one grant for the fleet, before and after"
    );
    assert_eq!(sandbox.throttled(), 0, "the platform answered no 429");
    // A replica whose lease outlived the outage never asked the dead master for anything
    // (an idle replica costs Redis nothing); a usage request makes each one use Redis, and
    // each answers from the new master's fleet sums without a restart.
    for p in &fleet {
        // Past the cool-off after a failed command, the next request tries again.
        let from_fleet = wait_for_async(Duration::from_secs(30), || async {
            let doc: serde_json::Value =
                serde_json::from_str(&admin_text(p, "/usage.json").await).ok()?;
            (doc["fleet"] == true).then_some(())
        })
        .await;
        assert!(
            from_fleet.is_some(),
            "a replica never reached the new master"
        );
        if p.output.text().contains("shared token cache unavailable") {
            let ended = wait_for(Duration::from_secs(10), || {
                p.output
                    .text()
                    .contains("shared token cache reachable again")
                    .then_some(())
            })
            .await;
            assert!(ended.is_some(), "an outage without its end in the log");
        }
        assert!(
            !p.output.text().contains(&replica.password),
            "a password in a log"
        );
    }
    assert!(
        fleet
            .iter()
            .any(|p| p.output.text().contains("shared token cache unavailable")),
        "no replica noticed the master's loss"
    );
}
