use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;

use super::backoff::{Backoff, PROBE_AFTER};
use super::grant::GrantError;
use super::*;
use crate::telemetry::metrics::Metrics;

#[test]
fn sources_are_shared_by_identical_grants_only() {
    let toml = |secret: &str, scope: &str| {
        format!(
            "[[upstream]]\nname = \"a\"\nprovider = \"oauth2\"\ntoken_url = \"http://127.0.0.1:1/t\"\nbase_url = \"http://127.0.0.1:1\"\nclient_id = \"id\"\nclient_secret = \"{secret}\"\n{scope}\n"
        )
    };
    let grant = |secret: &str, scope: &str| {
        let c =
            crate::config::Config::from_toml(&toml(secret, scope), "t.toml".as_ref(), &|_| None)
                .unwrap();
        c.upstreams[0].grant.clone()
    };
    let cache = TokenCache::default();
    let (metrics, name) = (Metrics::new(), Arc::from("a"));
    let a = cache.source_for(&name, &grant("s1", ""), 0, &metrics);
    let same = cache.source_for(&name, &grant("s1", ""), 0, &metrics);
    let other_secret = cache.source_for(&name, &grant("s2", ""), 0, &metrics);
    let other_scope = cache.source_for(&name, &grant("s1", "scope = \"x\""), 0, &metrics);
    let second_of_pool = cache.source_for(&name, &grant("s1", ""), 1, &metrics);
    assert!(!Arc::ptr_eq(&a, &second_of_pool));
    assert!(Arc::ptr_eq(&a, &same));
    assert!(!Arc::ptr_eq(&a, &other_secret));
    assert!(!Arc::ptr_eq(&a, &other_scope));
}

#[test]
fn lifetimes_leave_margins() {
    let now = Instant::now();
    let t = Token::new(
        HeaderValue::from_static("Bearer x"),
        1,
        now,
        Duration::from_secs(2),
    );
    assert_eq!(t.usable_until - now, Duration::from_millis(1800));
    assert_eq!(t.refresh_at - now, Duration::from_millis(1300));
    let t = Token::new(
        HeaderValue::from_static("Bearer x"),
        1,
        now,
        Duration::from_secs(86400),
    );
    assert_eq!(t.usable_until - now, Duration::from_secs(86400 - 60));
    assert_eq!(t.refresh_at - now, Duration::from_secs(86400 - 360));
    assert!(!format!("{t:?}").contains("Bearer x"));
}

#[test]
fn without_a_token_a_transient_failure_is_probed_after_a_second() {
    let now = Instant::now();
    let mut b = Backoff::default();
    for _ in 0..6 {
        b.record(GrantError::Timeout, now);
    }
    assert!(b.active(now).unwrap() > Duration::from_secs(20));
    assert_eq!(b.wait_without_token(now), Some(PROBE_AFTER));
    assert_eq!(b.probe_in(now + PROBE_AFTER), Some(Duration::ZERO));
    let mut refused = Backoff::default();
    refused.record(
        GrantError::NotOAuth {
            status: 200,
            api_code: None,
            what: "html".into(),
        },
        now,
    );
    assert_eq!(refused.probe_in(now + PROBE_AFTER), None);
}

#[test]
fn backoff_grows_and_caps() {
    let now = Instant::now();
    let mut b = Backoff::default();
    let mut last = Duration::ZERO;
    for _ in 0..10 {
        b.record(GrantError::Timeout, now);
        let wait = b.active(now).unwrap();
        assert!(wait <= Duration::from_secs(73), "{wait:?}");
        last = wait;
    }
    assert!(last >= Duration::from_secs(48));
}

/// A token source for the sandbox's login host (a real HTTP token endpoint on loopback);
/// the layers' tests use it too.
pub(crate) async fn sandboxed_source() -> (
    tokengate_sandbox::Sandbox,
    Arc<crate::config::UpstreamConfig>,
    Arc<TokenSource>,
) {
    let sandbox = tokengate_sandbox::Sandbox::start(Default::default())
        .await
        .unwrap();
    let toml = format!(
        "[[upstream]]\nname = \"a\"\nprovider = \"oauth2\"\ntoken_url = \"{}\"\nbase_url = \"{}\"\nclient_id = \"sandbox-client\"\nclient_secret = \"sandbox-secret\"\n",
        sandbox.token_url(),
        sandbox.api_url()
    );
    let config = crate::config::Config::from_toml(&toml, "t.toml".as_ref(), &|_| None).unwrap();
    let granter = grant::Granter::new(config.upstreams[0].grant.clone());
    let source = TokenSource::new(
        Arc::from("a"),
        granter,
        Metrics::new(),
        Default::default(),
        Default::default(),
    );
    (sandbox, Arc::clone(&config.upstreams[0]), source)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_callers_on_a_cold_source_share_one_grant() {
    let (sandbox, _, source) = sandboxed_source().await;
    let calls = (0..50).map(|_| {
        let source = Arc::clone(&source);
        tokio::spawn(async move { source.token().await.map(|t| t.generation) })
    });
    for call in futures_util::future::join_all(calls).await {
        assert_eq!(call.unwrap().unwrap(), 1);
    }
    assert_eq!(sandbox.grants(), 1);
    // A hit costs no grant.
    assert_eq!(source.token().await.unwrap().generation, 1);
    assert_eq!(sandbox.grants(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_replacing_the_same_rejected_token_share_one_new_grant() {
    let (sandbox, _, source) = sandboxed_source().await;
    let first = source.token().await.unwrap();
    let calls = (0..20).map(|_| {
        let source = Arc::clone(&source);
        let rejected = first.generation;
        tokio::spawn(async move {
            let dead: rejection::Check =
                Box::new(|_| Box::pin(async { rejection::Liveness::Dead }));
            match source.replace(rejected, Instant::now(), Some(dead)).await {
                rejection::Rejection::Replaced(t) => t.map(|t| t.generation),
                rejection::Rejection::Stands => panic!("a dead token stood"),
            }
        })
    });
    for call in futures_util::future::join_all(calls).await {
        assert_eq!(call.unwrap().unwrap(), 2);
    }
    assert_eq!(sandbox.grants(), 2, "one grant at start, one to replace it");
    assert_ne!(source.token().await.unwrap().header(), first.header());
}
