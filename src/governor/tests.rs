use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::config::RateLimit;

fn limit(calls: u64, secs: u64) -> Option<RateLimit> {
    Some(RateLimit {
        calls,
        window: Duration::from_secs(secs),
    })
}

#[tokio::test(start_paused = true)]
async fn without_a_budget_calls_pass_untouched() {
    let g = Governor::with(None, Duration::from_secs(10), 1, None);
    let c: Arc<str> = Arc::from("a");
    for _ in 0..1000 {
        assert_eq!(g.admit(&c, 1, None).await, Ok(None));
    }
    assert_eq!(g.budget(), None);
}

#[tokio::test(start_paused = true)]
async fn calls_within_the_window_go_at_once_and_the_rest_wait_or_are_refused() {
    let g = Governor::with(limit(4, 10), Duration::from_secs(3), 1, None);
    let c: Arc<str> = Arc::from("a");
    let started = Instant::now();
    for _ in 0..4 {
        assert_eq!(g.admit(&c, 1, None).await, Ok(Some(0)));
    }
    assert_eq!(Instant::now(), started, "nobody waited: no pace");
    // The window (10 s and the margin) ends at 11 s: past the 3 s wait, refused at once.
    match g.admit(&c, 1, None).await {
        Err(Refusal::Budget(after)) => assert_eq!(after, Duration::from_secs(11)),
        other => panic!("{other:?}"),
    }
    assert_eq!(Instant::now(), started, "refused without waiting");
    tokio::time::sleep(Duration::from_secs(9)).await;
    // 2 s left: it waits for the reset, then goes.
    assert_eq!(g.admit(&c, 1, None).await, Ok(Some(0)));
    assert_eq!(Instant::now() - started, Duration::from_secs(11));
}

#[tokio::test(start_paused = true)]
async fn a_backlog_is_let_through_at_the_pace_not_all_at_once() {
    // 40 calls per 10 s: 4 a second, a burst of 10.
    let g = Governor::with(limit(40, 10), Duration::from_secs(60), 1, None);
    let c: Arc<str> = Arc::from("a");
    for _ in 0..40 {
        assert_eq!(g.admit(&c, 1, None).await, Ok(Some(0)));
    }
    let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
    for _ in 0..40 {
        let (g, c, served) = (Arc::clone(&g), Arc::clone(&c), Arc::clone(&served));
        tokio::spawn(async move {
            if g.admit(&c, 1, None).await.is_ok() {
                served.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
    let at = |secs: f64| tokio::time::sleep_until(Instant::now() + Duration::from_secs_f64(secs));
    at(11.01).await; // the window resets at 11 s: the burst goes
    assert_eq!(served.load(Ordering::SeqCst), 10);
    at(2.5).await; // then four a second
    assert_eq!(served.load(Ordering::SeqCst), 20);
    at(5.0).await;
    assert_eq!(served.load(Ordering::SeqCst), 40);
}

#[tokio::test(start_paused = true)]
async fn waiting_calls_are_served_in_the_ratio_of_their_shares() {
    // 20 calls a window for 40 callers: more want in than fit, so shares decide.
    let g = Governor::with(limit(20, 1), Duration::from_secs(600), 1, None);
    let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
    let served = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (client, share) in [(a, 3), (b, 1)] {
        for _ in 0..20 {
            let (g, client, served) = (Arc::clone(&g), Arc::clone(&client), served.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    if g.admit(&client, share, None).await.is_ok() {
                        served
                            .lock()
                            .unwrap()
                            .push((Instant::now(), client.clone()));
                    }
                }
            }));
        }
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(20)).await;
    for t in tasks {
        t.abort();
    }
    let served = served.lock().unwrap();
    assert!(
        (190..=210).contains(&served.len()),
        "20 per 2 s window: {}",
        served.len()
    );
    // After the first window (taken first come, first served, before anyone waited).
    let count = |name: &str| {
        served
            .iter()
            .filter(|(at, c)| c.as_ref() == name && *at > started + Duration::from_secs(3))
            .count()
    };
    let (na, nb) = (count("a"), count("b"));
    let ratio = na as f64 / nb as f64;
    assert!((2.7..=3.3).contains(&ratio), "{na}:{nb}");
}

#[tokio::test(start_paused = true)]
async fn a_quiet_client_goes_ahead_of_a_noisy_backlog() {
    let g = Governor::with(limit(10, 1), Duration::from_secs(600), 1, None);
    let noisy: Arc<str> = Arc::from("noisy");
    for _ in 0..50 {
        let (g, noisy) = (Arc::clone(&g), Arc::clone(&noisy));
        tokio::spawn(async move {
            loop {
                let _ = g.admit(&noisy, 1, None).await;
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let quiet: Arc<str> = Arc::from("quiet");
    let asked = Instant::now();
    assert_eq!(g.admit(&quiet, 1, None).await, Ok(Some(0)));
    // Served at the next reset, not after the noisy client's backlog of 50.
    assert!(Instant::now() - asked <= Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn the_platforms_headers_set_the_budget_and_its_429_spends_it() {
    let g = Governor::with(None, Duration::from_secs(30), 1, None);
    let c: Arc<str> = Arc::from("a");
    let mut h = http::HeaderMap::new();
    h.insert("inin-ratelimit-allowed", "5".parse().unwrap());
    h.insert("inin-ratelimit-count", "4".parse().unwrap());
    h.insert("inin-ratelimit-reset", "20".parse().unwrap());
    g.observe(0, 200, &h, || 0);
    assert_eq!(
        g.budget(),
        Some(Budget {
            allowed: 5,
            used: 4,
            window: Duration::from_secs(20),
            waiting: 0
        })
    );
    assert_eq!(g.admit(&c, 1, None).await, Ok(Some(0)));
    let asked = Instant::now();
    assert_eq!(g.admit(&c, 1, None).await, Ok(Some(0)));
    assert_eq!(Instant::now() - asked, Duration::from_secs(21));
    // A platform 429 spends the window, whatever the count said.
    let mut h = http::HeaderMap::new();
    h.insert("retry-after", "3".parse().unwrap());
    g.observe(0, 429, &h, || 0);
    let asked = Instant::now();
    assert_eq!(g.admit(&c, 1, None).await, Ok(Some(0)));
    assert!(Instant::now() - asked >= Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn max_per_minute_caps_a_client_without_a_budget() {
    let g = Governor::with(None, Duration::from_secs(10), 1, None);
    let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
    for _ in 0..3 {
        assert_eq!(g.admit(&a, 1, Some(3)).await, Ok(None));
    }
    assert_eq!(
        g.admit(&a, 1, Some(3)).await,
        Err(Refusal::ClientCap(Duration::from_secs(60)))
    );
    assert_eq!(g.admit(&b, 1, Some(3)).await, Ok(None));
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(g.admit(&a, 1, Some(3)).await, Ok(None));
}

#[tokio::test(start_paused = true)]
async fn a_pool_multiplies_the_budget() {
    let g = Governor::with(limit(2, 10), Duration::from_secs(30), 3, None);
    let c: Arc<str> = Arc::from("a");
    let started = Instant::now();
    let mut used = Vec::new();
    for _ in 0..6 {
        used.push(g.admit(&c, 1, None).await.unwrap().unwrap());
    }
    used.sort();
    assert_eq!(used, [0, 0, 1, 1, 2, 2]);
    assert_eq!(Instant::now(), started, "within the pool's budget: at once");
    // All three windows spent: the next call waits for the first reset (11 s).
    assert_eq!(g.admit(&c, 1, None).await, Ok(Some(0)));
    assert_eq!(Instant::now() - started, Duration::from_secs(11));
}

#[tokio::test(start_paused = true)]
async fn clients_calling_together_each_hold_their_share_and_are_told_it() {
    // 40 calls per 10 s; shares 3 and 1: 30 and 10 while both call.
    let g = Governor::with(limit(40, 10), Duration::ZERO, 1, None);
    let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
    // Alone, a client may spend the whole budget, and is told so.
    assert_eq!(g.admit(&a, 3, None).await, Ok(Some(0)));
    let alone = g.share_of(&a).unwrap();
    assert_eq!((alone.limit, alone.remaining), (40, 39));
    assert_eq!(g.admit(&b, 1, None).await, Ok(Some(0)));
    let b_share = g.share_of(&b).unwrap();
    assert_eq!((b_share.limit, b_share.remaining), (10, 9));
    let a_share = g.share_of(&a).unwrap();
    assert_eq!((a_share.limit, a_share.remaining), (30, 29));
    for _ in 0..29 {
        assert_eq!(g.admit(&a, 3, None).await, Ok(Some(0)));
    }
    // Its share spent, a waits for the window (refused here: no wait allowed), though
    // the budget has room for b's part.
    assert!(matches!(
        g.admit(&a, 3, None).await,
        Err(Refusal::Budget(_))
    ));
    assert_eq!(g.share_of(&a).unwrap().remaining, 0);
    for _ in 0..9 {
        assert_eq!(g.admit(&b, 1, None).await, Ok(Some(0)));
    }
    assert!(matches!(
        g.admit(&b, 1, None).await,
        Err(Refusal::Budget(_))
    ));
    // The window (10 s and the margin) ends: both shares come back whole.
    tokio::time::sleep(Duration::from_secs(11)).await;
    assert_eq!(g.admit(&a, 3, None).await, Ok(Some(0)));
    // a asked within the window's length: b's is still a share of four.
    assert_eq!(g.admit(&b, 1, None).await, Ok(Some(0)));
    let b_share = g.share_of(&b).unwrap();
    assert_eq!((b_share.limit, b_share.remaining), (10, 9));
    assert_eq!(b_share.reset, Duration::from_secs(11));
    // A window's length after a's last call, b is alone again: the whole budget, less
    // the two calls of the window (a's and its own).
    tokio::time::sleep(Duration::from_secs(10)).await;
    let alone = g.share_of(&b).unwrap();
    assert_eq!((alone.limit, alone.remaining), (40, 38));
}
